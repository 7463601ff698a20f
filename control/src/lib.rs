//! The control process of Embarcadero (`embar control`): broker membership (register,
//! heartbeat, failure detection), topic metadata (create, describe, list, delete), discovery,
//! formatting of the pool, and durable state. API: HTTP/JSON (`docs/control-api.md`).
//!
//! - [`membership`]: the sans-IO membership state machine.
//! - [`topics`]: topic specifications and the cluster-level rules.
//! - [`store`]: durable state, replaced atomically.
//! - [`keepalive`]: a broker's side of membership (heartbeats, backoff, grace), sans-IO.
//! - [`placement`]: re-placing the replicas of a broker slot that stays vacant.
//! - [`server`]: the process; [`client`]: its Rust client (on `ureq`); [`http`]: the small
//!   server under the API and the metrics endpoints (request heads parsed by `httparse`).
//! - [`metrics`]: Prometheus metrics of the control process and of the brokers
//!   (`prometheus-client`).

pub mod client;
pub mod http;
pub mod keepalive;
pub mod membership;
pub mod metrics;
pub mod placement;
pub mod server;
pub mod store;
pub mod topics;

pub use client::{ClientError, ControlClient};
pub use server::{start, ControlConfig, ControlHandle};
