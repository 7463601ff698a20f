//! The control process of Embarcadero (`embar control`): broker membership (register,
//! heartbeat, failure detection), topic metadata (create, describe, list, delete), discovery,
//! formatting of the pool, and durable state. API: HTTP/JSON (`docs/control-api.md`).
//!
//! - [`membership`]: the sans-IO membership state machine.
//! - [`topics`]: topic specifications and the cluster-level rules.
//! - [`store`]: durable state, replaced atomically.
//! - [`keepalive`]: a broker's side of membership (heartbeats, backoff, grace), sans-IO.
//! - [`server`]: the process; [`client`]: its Rust client; [`http`]: the wire.

pub mod client;
pub mod http;
pub mod keepalive;
pub mod membership;
pub mod server;
pub mod store;
pub mod topics;

pub use client::ControlClient;
pub use server::{start, ControlConfig, ControlHandle};
