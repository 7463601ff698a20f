//! The Rust client of the control API, used by the command line and the brokers: blocking,
//! on `ureq`, with a timeout on every call.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::keepalive::Beat;
use crate::topics::TopicSpec;

/// Longest wait for the control process to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A client-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the control process at {addr}: {source} (is `embar control` running?)")]
    Unreachable { addr: SocketAddr, source: io::Error },
    #[error("control process at {addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
    #[error("control process at {addr} sent a malformed response: {detail}")]
    Malformed { addr: SocketAddr, detail: String },
    #[error("{message}")]
    Api { status: u16, message: String },
}

impl ClientError {
    /// Sorts a failed call: no connection is [`Unreachable`](Self::Unreachable), a timeout or
    /// a broken connection [`Io`](Self::Io), an answer that is not HTTP
    /// [`Malformed`](Self::Malformed).
    fn from_ureq(addr: SocketAddr, e: ureq::Error) -> ClientError {
        use io::ErrorKind as K;
        match e {
            ureq::Error::Timeout(ureq::Timeout::Connect) => ClientError::Unreachable {
                addr,
                source: io::Error::new(K::TimedOut, "connection timed out"),
            },
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => ClientError::Unreachable {
                addr,
                source: e.into_io(),
            },
            ureq::Error::Io(source)
                if matches!(
                    source.kind(),
                    K::ConnectionRefused
                        | K::HostUnreachable
                        | K::NetworkUnreachable
                        | K::AddrNotAvailable
                ) =>
            {
                ClientError::Unreachable { addr, source }
            }
            ureq::Error::Timeout(t) => ClientError::Io {
                addr,
                source: io::Error::new(K::TimedOut, format!("timed out ({t})")),
            },
            ureq::Error::Io(source) => ClientError::Io { addr, source },
            e @ (ureq::Error::Protocol(_)
            | ureq::Error::LargeResponseHeader(..)
            | ureq::Error::BodyExceedsLimit(_)) => ClientError::Malformed {
                addr,
                detail: e.to_string(),
            },
            e => ClientError::Io {
                addr,
                source: e.into_io(),
            },
        }
    }
}

/// What a broker gets when it registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registration {
    pub broker_id: u32,
    /// Index of its regions in the pool.
    pub slot: u32,
    pub heartbeat: Duration,
    pub epoch: u64,
}

/// The methods the client calls with.
#[derive(Clone, Copy, Debug)]
enum Method {
    Get,
    Post,
    Delete,
}

/// `name` as one path segment: every byte but the unreserved ones percent-encoded.
fn segment(name: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(name, RESERVED).to_string()
}

#[derive(Clone, Copy, Debug)]
pub struct ControlClient {
    pub addr: SocketAddr,
}

impl ControlClient {
    pub fn new(addr: SocketAddr) -> ControlClient {
        ControlClient { addr }
    }

    /// One call: `(status, body)` of the answer, whatever its status.
    fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(u16, String), ClientError> {
        // An agent per call: the server answers one request per connection, so there is no
        // connection to keep, and each call has its own timeout.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT.min(timeout)))
            .timeout_global(Some(timeout))
            .max_idle_connections(0)
            .build()
            .into();
        let url = format!("http://{}{path}", self.addr);
        let body = body.map(Value::to_string);
        let answer = match (method, body) {
            (Method::Get, _) => agent.get(&url).call(),
            (Method::Delete, _) => agent.delete(&url).call(),
            (Method::Post, None) => agent.post(&url).send_empty(),
            (Method::Post, Some(b)) => agent
                .post(&url)
                .content_type("application/json")
                .send(b.as_str()),
        };
        let err = |e| ClientError::from_ureq(self.addr, e);
        let mut answer = answer.map_err(err)?;
        let status = answer.status().as_u16();
        let text = answer.body_mut().read_to_string().map_err(err)?;
        Ok((status, text))
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let (status, body) = self.call(method, path, body.as_ref(), timeout)?;
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
        self.request(Method::Get, path, None, Duration::from_secs(10))
    }

    /// Registers a broker.
    pub fn register(
        &self,
        addresses: &BTreeMap<String, String>,
    ) -> Result<Registration, ClientError> {
        let body = json!({ "addresses": addresses });
        let v = self.request(
            Method::Post,
            "/v1/brokers",
            Some(body),
            Duration::from_secs(10),
        )?;
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
            Method::Post,
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
        let answer = self.request(
            Method::Post,
            "/v1/brokers",
            Some(body),
            Duration::from_secs(5),
        );
        Beat::from_result(answer.map(|_| Beat::Alive { sequencer: false }))
    }

    /// The brokers; with `wait`, blocks until the membership changes past `since` or the
    /// wait ends (long poll).
    pub fn brokers(&self, since: u64, wait: Duration) -> Result<Value, ClientError> {
        let path = format!("/v1/brokers?since={since}&wait_ms={}", wait.as_millis());
        self.request(Method::Get, &path, None, wait + Duration::from_secs(10))
    }

    pub fn create_topic(&self, spec: &TopicSpec) -> Result<Value, ClientError> {
        let body = serde_json::to_value(spec).map_err(|e| ClientError::Malformed {
            addr: self.addr,
            detail: e.to_string(),
        })?;
        self.request(
            Method::Post,
            "/v1/topics",
            Some(body),
            Duration::from_secs(10),
        )
    }

    pub fn list_topics(&self) -> Result<Value, ClientError> {
        self.get("/v1/topics")
    }

    pub fn describe_topic(&self, name: &str) -> Result<Value, ClientError> {
        self.get(&format!("/v1/topics/{}", segment(name)))
    }

    pub fn delete_topic(&self, name: &str) -> Result<Value, ClientError> {
        self.request(
            Method::Delete,
            &format!("/v1/topics/{}", segment(name)),
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
