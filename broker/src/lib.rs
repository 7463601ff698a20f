//! A broker of Embarcadero as a library.
//!
//! - [`node::BrokerNode`]: a whole broker process's work (register with the control process,
//!   map the pool, serve the data path, heartbeat, metrics), started and stopped by its
//!   caller; `embar broker` is a thin command line over it.
//! - [`driver::Driver`]: one round of a broker slot's data path, driven by the caller: the
//!   sessions and rings (`embar_dataplane::broker`, where a batch lands and is checked and
//!   where acks are decided), the sequencers when they run here ([`sequencers`], over
//!   `embar_dataplane::sequencer`, where order is assigned), the verbs frontend.
//! - [`membership`]: the heartbeat loop, over the sans-IO keepalive policy of
//!   `embar_control::keepalive`.
//!
//! ```no_run
//! use embar_broker::node::{BrokerConfig, BrokerNode};
//!
//! let node = BrokerNode::start(BrokerConfig::new("127.0.0.1:7400".parse()?))?;
//! println!("broker {} in slot {}", node.broker_id(), node.slot());
//! node.stop()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod driver;
pub mod membership;
pub mod node;
pub mod replication;
pub mod sequencers;

pub use driver::{Driver, DriverError, DriverOptions};
pub use node::{
    BrokerConfig, BrokerNode, ReplicationConfig, RunError, SequencerRole, StartError, VerbsConfig,
};
