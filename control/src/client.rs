//! The Rust client of the control API, used by the command line and the brokers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::http::{call, ClientError};
use crate::keepalive::Beat;
use crate::topics::TopicSpec;

/// What a broker gets when it registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registration {
    pub broker_id: u32,
    /// Index of its regions in the pool.
    pub slot: u32,
    pub heartbeat: Duration,
    pub epoch: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct ControlClient {
    pub addr: SocketAddr,
}

impl ControlClient {
    pub fn new(addr: SocketAddr) -> ControlClient {
        ControlClient { addr }
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let text = body.map(|b| b.to_string());
        let (status, body) = call(self.addr, method, path, text.as_deref(), timeout)?;
        let v: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&body).map_err(|e| ClientError::Malformed {
                addr: self.addr,
                detail: format!("{e}: {body:?}"),
            })?
        };
        if status >= 400 {
            let message = v["error"]
                .as_str()
                .unwrap_or("error without a message")
                .to_string();
            return Err(ClientError::Api { status, message });
        }
        Ok(v)
    }

    fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request("GET", path, None, Duration::from_secs(10))
    }

    /// Registers a broker.
    pub fn register(
        &self,
        addresses: &BTreeMap<String, String>,
    ) -> Result<Registration, ClientError> {
        let body = json!({ "addresses": addresses });
        let v = self.request("POST", "/v1/brokers", Some(body), Duration::from_secs(10))?;
        let field = |k: &str| {
            v[k].as_u64().ok_or_else(|| ClientError::Malformed {
                addr: self.addr,
                detail: format!("registration answer without {k}: {v}"),
            })
        };
        Ok(Registration {
            broker_id: field("broker_id")? as u32,
            slot: field("slot")? as u32,
            heartbeat: Duration::from_millis(field("heartbeat_ms")?),
            epoch: field("epoch")?,
        })
    }

    /// Heartbeat of broker `id`; answers whether this broker is to run the sequencer.
    pub fn heartbeat(&self, id: u32) -> Result<bool, ClientError> {
        self.request(
            "POST",
            &format!("/v1/brokers/{id}/heartbeat"),
            None,
            Duration::from_secs(5),
        )
        .map(|v| v["sequencer"] == true)
    }

    /// A heartbeat, as the broker's [`Keepalive`](crate::keepalive::Keepalive) takes it.
    pub fn beat(&self, id: u32) -> Beat {
        Beat::from_result(
            self.heartbeat(id)
                .map(|sequencer| Beat::Alive { sequencer }),
        )
    }

    /// Asks a control process that does not know broker `reg` (it restarted without its
    /// state) to take it back in its own id and slot.
    pub fn rejoin(&self, reg: &Registration, addresses: &BTreeMap<String, String>) -> Beat {
        let body = json!({
            "addresses": addresses,
            "rejoin": { "broker_id": reg.broker_id, "slot": reg.slot },
        });
        let answer = self.request("POST", "/v1/brokers", Some(body), Duration::from_secs(5));
        Beat::from_result(answer.map(|_| Beat::Alive { sequencer: false }))
    }

    /// The brokers; with `wait`, blocks until the membership changes past `since` or the
    /// wait ends (long poll).
    pub fn brokers(&self, since: u64, wait: Duration) -> Result<Value, ClientError> {
        let path = format!("/v1/brokers?since={since}&wait_ms={}", wait.as_millis());
        self.request("GET", &path, None, wait + Duration::from_secs(10))
    }

    pub fn create_topic(&self, spec: &TopicSpec) -> Result<Value, ClientError> {
        let body = serde_json::to_value(spec).map_err(|e| ClientError::Malformed {
            addr: self.addr,
            detail: e.to_string(),
        })?;
        self.request("POST", "/v1/topics", Some(body), Duration::from_secs(10))
    }

    pub fn list_topics(&self) -> Result<Value, ClientError> {
        self.get("/v1/topics")
    }

    pub fn describe_topic(&self, name: &str) -> Result<Value, ClientError> {
        self.get(&format!("/v1/topics/{name}"))
    }

    pub fn delete_topic(&self, name: &str) -> Result<Value, ClientError> {
        self.request(
            "DELETE",
            &format!("/v1/topics/{name}"),
            None,
            Duration::from_secs(10),
        )
    }

    pub fn status(&self) -> Result<Value, ClientError> {
        self.get("/v1/status")
    }
}

impl Beat {
    fn from_result(r: Result<Beat, ClientError>) -> Beat {
        match r {
            Ok(b) => b,
            Err(ClientError::Api { status: 404, .. }) => Beat::Unknown,
            Err(ClientError::Api {
                status: 410,
                message,
            }) => Beat::Dead(message),
            Err(ClientError::Api {
                status: 409,
                message,
            }) => Beat::Refused(message),
            Err(e) => Beat::Unreachable(e.to_string()),
        }
    }
}
