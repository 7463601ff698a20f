//! Finding the cluster: where its control process listens ([`ControlAddr`]), and from the
//! control process where the pool is and which brokers are live ([`ClusterView`]).
//!
//! The control address is taken, in this order, from:
//!
//! 1. the caller ([`ClientBuilder::control`](crate::ClientBuilder::control), or `--control`
//!    on the command line);
//! 2. the `EMBAR_CONTROL` environment variable (`host:port`);
//! 3. the cluster description `cluster.json` that `embar cluster up` writes into its
//!    directory: `$EMBAR_CLUSTER_DIR` if set (then the file must be there), else
//!    `/tmp/embar-cluster`, the directory `cluster up` and `cluster down` use by default;
//! 4. `127.0.0.1:7400`, where `embar control` listens by default.
//!
//! So a local cluster started with `embar cluster up` is found with no flag at all, one in
//! another directory with `EMBAR_CLUSTER_DIR` (which `cluster up` and `cluster down` take
//! too), and any other with `EMBAR_CONTROL`. The directory is the profile: nothing is
//! written outside it, so clusters in two directories never overwrite each other's.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use embar_control::ControlClient;
use serde_json::Value;

use crate::error::{cluster_file_error, Error, Result};

/// The variable that names the control process's address.
pub const CONTROL_ENV: &str = "EMBAR_CONTROL";
/// The variable that names the directory of a cluster started by `embar cluster up`.
pub const CLUSTER_DIR_ENV: &str = "EMBAR_CLUSTER_DIR";
/// Where `embar cluster up` keeps its cluster unless told otherwise.
pub const DEFAULT_CLUSTER_DIR: &str = "/tmp/embar-cluster";
/// Where `embar control` listens unless told otherwise.
pub const DEFAULT_CONTROL: &str = "127.0.0.1:7400";
/// The file in a cluster directory that names its control process (`"control": "ip:port"`).
pub const CLUSTER_FILE: &str = "cluster.json";

/// Where a control address came from (errors name it: a stale `cluster.json` is a common
/// reason for an unreachable control process).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlSource {
    /// Given by the caller.
    Given,
    /// The `EMBAR_CONTROL` variable.
    Env,
    /// The `cluster.json` of a cluster directory.
    ClusterFile(PathBuf),
    /// Nothing named one: `127.0.0.1:7400`.
    Default,
}

impl ControlSource {
    /// ` (address from ...)` for an error message; empty for an address the caller gave.
    pub(crate) fn note(&self) -> String {
        match self {
            ControlSource::Given => String::new(),
            other => format!(" (address from {other})"),
        }
    }
}

impl fmt::Display for ControlSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlSource::Given => f.write_str("the caller"),
            ControlSource::Env => write!(f, "${CONTROL_ENV}"),
            ControlSource::ClusterFile(p) => write!(f, "{}", p.display()),
            ControlSource::Default => f.write_str("the default address"),
        }
    }
}

/// A control process's address and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlAddr {
    pub addr: SocketAddr,
    pub source: ControlSource,
}

impl ControlAddr {
    /// An address the caller names (`host:port`; a name is resolved, its first address
    /// taken).
    pub fn given(addr: impl ToSocketAddrs) -> Result<ControlAddr> {
        Ok(ControlAddr {
            addr: resolve(addr, "the control address")?,
            source: ControlSource::Given,
        })
    }

    /// Looks the address up in the process's environment and the cluster directory (see
    /// the [module docs](self)).
    pub fn discover() -> Result<ControlAddr> {
        ControlAddr::discover_with(|k| std::env::var(k).ok())
    }

    /// [`ControlAddr::discover`] with the environment given by `env` (a lookup by variable
    /// name), for tests and for programs that keep their settings elsewhere.
    ///
    /// ```
    /// use embar_client::discovery::{ControlAddr, ControlSource};
    ///
    /// let env = |k: &str| (k == "EMBAR_CONTROL").then(|| "127.0.0.1:7555".to_string());
    /// let found = ControlAddr::discover_with(env)?;
    /// assert_eq!(found.addr, "127.0.0.1:7555".parse()?);
    /// assert_eq!(found.source, ControlSource::Env);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn discover_with(env: impl Fn(&str) -> Option<String>) -> Result<ControlAddr> {
        if let Some(v) = env(CONTROL_ENV).filter(|v| !v.trim().is_empty()) {
            return Ok(ControlAddr {
                addr: resolve(v.trim(), &format!("${CONTROL_ENV}"))?,
                source: ControlSource::Env,
            });
        }
        let named = env(CLUSTER_DIR_ENV).filter(|v| !v.trim().is_empty());
        let dir = PathBuf::from(named.as_deref().unwrap_or(DEFAULT_CLUSTER_DIR));
        let file = dir.join(CLUSTER_FILE);
        match std::fs::read_to_string(&file) {
            Ok(text) => Ok(ControlAddr {
                addr: control_in(&file, &text)?,
                source: ControlSource::ClusterFile(file),
            }),
            // A directory the user named must hold a cluster.
            Err(e) if named.is_some() => Err(Error::NoCluster {
                var: CLUSTER_DIR_ENV,
                reason: format!("{}: {e}", file.display()),
                dir,
            }),
            Err(_) => Ok(ControlAddr {
                addr: DEFAULT_CONTROL.parse().expect("a valid address"),
                source: ControlSource::Default,
            }),
        }
    }

    /// The control address of the cluster in `dir`, a directory `embar cluster up` wrote
    /// (its `cluster.json`), for a program that started the cluster there.
    pub fn in_cluster_dir(dir: &Path) -> Result<ControlAddr> {
        let file = dir.join(CLUSTER_FILE);
        let text =
            std::fs::read_to_string(&file).map_err(|e| cluster_file_error(file.clone(), e))?;
        Ok(ControlAddr {
            addr: control_in(&file, &text)?,
            source: ControlSource::ClusterFile(file),
        })
    }

    /// A failed request to this control process, naming where its address came from.
    pub(crate) fn error(&self, source: embar_control::http::ClientError) -> Error {
        Error::Control {
            source,
            from: self.source.clone(),
        }
    }
}

/// A live broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broker {
    pub id: u32,
    /// Its regions in the pool.
    pub slot: u32,
    /// Where it takes verbs (RDMA) publishers, if it does.
    pub verbs: Option<SocketAddr>,
    /// Where it takes TCP publishers and subscribers, if it does.
    pub tcp: Option<SocketAddr>,
}

/// The cluster as its control process describes it (`GET /v1/status`,
/// docs/control-api.md): where the pool is and which brokers are live. What a publisher
/// needs to open its sessions; [`Client`](crate::Client) asks for it, and so may a program
/// that drives the data plane itself (the bench).
///
/// ```no_run
/// use embar_client::discovery::{ClusterView, ControlAddr};
///
/// let cluster = ClusterView::ask(&ControlAddr::discover()?)?;
/// println!("pool {}, brokers {:?}", cluster.pool_path.display(), cluster.broker_slots()?);
/// # Ok::<(), embar_client::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    /// The pool's path on the pool host.
    pub pool_path: PathBuf,
    /// The live brokers, in pool-slot order.
    pub brokers: Vec<Broker>,
}

impl ClusterView {
    /// Asks the control process at `control` (one request).
    pub fn ask(control: &ControlAddr) -> Result<ClusterView> {
        let status = ControlClient::new(control.addr)
            .status()
            .map_err(|e| control.error(e))?;
        ClusterView::of_status(control.addr, &status)
    }

    /// The view in a status document that the control process at `addr` sent.
    fn of_status(addr: SocketAddr, status: &Value) -> Result<ClusterView> {
        let pool_path = status["pool"]["path"].as_str().ok_or(Error::Discovery {
            addr,
            what: "a pool path",
        })?;
        let mut brokers: Vec<Broker> = status["brokers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["alive"] == true)
            .filter_map(|b| {
                Some(Broker {
                    id: b["id"].as_u64()? as u32,
                    slot: b["slot"].as_u64()? as u32,
                    verbs: b["addresses"]["verbs"]
                        .as_str()
                        .and_then(|a| a.parse().ok()),
                    tcp: b["addresses"]["tcp"].as_str().and_then(|a| a.parse().ok()),
                })
            })
            .collect();
        // A slot listed twice counts once, as first listed (a stable sort keeps that one
        // first).
        brokers.sort_by_key(|b| b.slot);
        brokers.dedup_by_key(|b| b.slot);
        Ok(ClusterView {
            pool_path: PathBuf::from(pool_path),
            brokers,
        })
    }

    /// The pool slots of the live brokers, which shm publishers stripe over;
    /// [`Error::NoLiveBroker`] when there is none.
    pub fn broker_slots(&self) -> Result<Vec<u32>> {
        let slots: Vec<u32> = self.brokers.iter().map(|b| b.slot).collect();
        if slots.is_empty() {
            return Err(Error::NoLiveBroker);
        }
        Ok(slots)
    }

    /// `(pool slot, verbs address)` of every live broker that accepts verbs publishers;
    /// [`Error::NoVerbsBroker`] when there is none.
    pub fn verbs_brokers(&self) -> Result<Vec<(u32, SocketAddr)>> {
        self.brokers_at(|b| b.verbs, Error::NoVerbsBroker)
    }

    /// `(pool slot, TCP address)` of every live broker that takes TCP publishers and
    /// subscribers; [`Error::NoTcpBroker`] when there is none.
    pub fn tcp_brokers(&self) -> Result<Vec<(u32, SocketAddr)>> {
        self.brokers_at(|b| b.tcp, Error::NoTcpBroker)
    }

    /// `(pool slot, address)` of the live brokers that have the address `at` picks.
    fn brokers_at(
        &self,
        at: impl Fn(&Broker) -> Option<SocketAddr>,
        none: Error,
    ) -> Result<Vec<(u32, SocketAddr)>> {
        let v: Vec<(u32, SocketAddr)> = self
            .brokers
            .iter()
            .filter_map(|b| Some((b.slot, at(b)?)))
            .collect();
        if v.is_empty() {
            return Err(none);
        }
        Ok(v)
    }
}

/// The control address a cluster description names.
fn control_in(file: &Path, text: &str) -> Result<SocketAddr> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| cluster_file_error(file.to_path_buf(), e))?;
    v["control"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| cluster_file_error(file.to_path_buf(), "no \"control\" address in it"))
}

pub(crate) fn resolve(addr: impl ToSocketAddrs, what: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| Error::invalid(what, e))?
        .next()
        .ok_or_else(|| Error::invalid(what, "resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn cluster_dir(name: &str, control: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("embar-client-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(CLUSTER_FILE),
            format!("{{\"control\": \"{control}\", \"pool\": \"/dev/shm/x\", \"pids\": []}}"),
        )
        .unwrap();
        dir
    }

    #[test]
    fn the_variable_wins_over_the_cluster_directory() {
        let dir = cluster_dir("wins", "127.0.0.1:9001");
        let d = dir.display().to_string();
        let found = ControlAddr::discover_with(env(&[
            (CONTROL_ENV, "127.0.0.1:9002"),
            (CLUSTER_DIR_ENV, &d),
        ]))
        .unwrap();
        assert_eq!(found.addr, "127.0.0.1:9002".parse().unwrap());
        assert_eq!(found.source, ControlSource::Env);
        let found = ControlAddr::discover_with(env(&[(CLUSTER_DIR_ENV, &d)])).unwrap();
        assert_eq!(found.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(
            found.source,
            ControlSource::ClusterFile(dir.join(CLUSTER_FILE))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_named_directory_without_a_cluster_is_an_error_naming_it() {
        let missing = std::env::temp_dir().join("embar-client-no-such-cluster");
        let e =
            ControlAddr::discover_with(env(&[(CLUSTER_DIR_ENV, &missing.display().to_string())]))
                .unwrap_err();
        assert!(
            e.to_string().contains("embar-client-no-such-cluster"),
            "{e}"
        );
        assert!(e.to_string().contains("embar cluster up"), "{e}");
    }

    #[test]
    fn a_bad_variable_or_a_damaged_description_is_an_error_that_says_which() {
        let e = ControlAddr::discover_with(env(&[(CONTROL_ENV, "not an address")])).unwrap_err();
        assert!(e.to_string().starts_with("$EMBAR_CONTROL: "), "{e}");
        let dir = cluster_dir("damaged", "nowhere");
        let e = ControlAddr::discover_with(env(&[(CLUSTER_DIR_ENV, &dir.display().to_string())]))
            .unwrap_err();
        assert!(e.to_string().contains("no \"control\" address"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_cluster_view_takes_the_live_brokers_in_slot_order_once_each() {
        let addr: SocketAddr = "127.0.0.1:7400".parse().unwrap();
        let status = serde_json::json!({
            "pool": {"path": "/dev/shm/embar.pool"},
            "brokers": [
                {"id": 3, "slot": 2, "alive": true, "addresses": {"verbs": "10.0.0.2:7500"}},
                {"id": 1, "slot": 0, "alive": true, "addresses": {}},
                {"id": 2, "slot": 1, "alive": false, "addresses": {"verbs": "10.0.0.1:7500"}},
                {"id": 4, "slot": 2, "alive": true, "addresses": {}},
            ],
        });
        let view = ClusterView::of_status(addr, &status).unwrap();
        assert_eq!(view.pool_path, PathBuf::from("/dev/shm/embar.pool"));
        assert_eq!(view.broker_slots().unwrap(), vec![0, 2]);
        assert_eq!(
            view.verbs_brokers().unwrap(),
            vec![(2, "10.0.0.2:7500".parse().unwrap())]
        );

        let none = serde_json::json!({"pool": {"path": "/p"}, "brokers": []});
        let view = ClusterView::of_status(addr, &none).unwrap();
        assert!(matches!(view.broker_slots(), Err(Error::NoLiveBroker)));
        assert!(matches!(view.verbs_brokers(), Err(Error::NoVerbsBroker)));
        let e = ClusterView::of_status(addr, &serde_json::json!({"brokers": []})).unwrap_err();
        assert!(e.to_string().contains("without a pool path"), "{e}");
    }

    #[test]
    fn a_cluster_directory_names_its_control_process() {
        let dir = cluster_dir("in-dir", "127.0.0.1:9003");
        let found = ControlAddr::in_cluster_dir(&dir).unwrap();
        assert_eq!(found.addr, "127.0.0.1:9003".parse().unwrap());
        assert_eq!(
            found.source,
            ControlSource::ClusterFile(dir.join(CLUSTER_FILE))
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let e = ControlAddr::in_cluster_dir(&dir).unwrap_err();
        assert!(e.to_string().contains(CLUSTER_FILE), "{e}");
    }
}
