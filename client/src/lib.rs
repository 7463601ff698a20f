//! The client library of Embarcadero: publishers and subscribers of a topic, found through
//! the cluster's control process.
//!
//! ```no_run
//! use embar_client::{Client, StartAt};
//!
//! // The control process: given, or discovered ($EMBAR_CONTROL, then the directory of
//! // `embar cluster up`; see [`discovery`]).
//! let client = Client::discover()?;
//!
//! let mut publisher = client.publisher("orders")?;
//! publisher.publish(b"first")?;
//! publisher.publish(b"second")?;
//! publisher.wait_acks()?; // both acknowledged per the topic's ACK level
//!
//! let mut subscriber = client.subscriber("orders", StartAt::Oldest)?;
//! for message in subscriber.by_ref().take(2) {
//!     let m = message?;
//!     println!("{} from {:x}: {:?}", m.total_order, m.client_id, m.payload);
//! }
//! # Ok::<(), embar_client::Error>(())
//! ```
//!
//! - [`Client`] ([`ClientBuilder`]): the control address, the transport, timeouts; topics
//!   and live brokers; opens publishers and subscribers, which own what they use (the
//!   mapped pool is shared between them) and may outlive it.
//! - [`Publisher`]: `publish` appends to a batch without blocking; batches are sealed when
//!   full, on `flush`, or after lingering, and striped over the live brokers; `acked` tells
//!   how many of the first messages are acknowledged.
//! - [`Subscriber`]: every message of a topic in total order, from a [`StartAt`] position:
//!   lent to a closure, returned one at a time, or as a blocking [`Iterator`].
//! - With the `async` feature: [`AsyncPublisher`], whose publishes and flushes give an
//!   [`AckFuture`], and [`MessageStream`], a `futures_core::Stream` of messages. They work on
//!   any executor: see [`notifier`] for how they are woken.
//! - [`Error`], with [`ErrorKind`] to act on; the error types of the layers below are
//!   re-exported.
//!
//! Transports: `shm` on the pool host (publishers write into the mapped pool); `verbs` for
//! publishers on other hosts (the `verbs` feature). Subscribers read the pool: on the pool
//! host.

#![forbid(unsafe_code)]

mod client;
pub mod discovery;
mod error;
mod publisher;
mod subscriber;

#[cfg(feature = "async")]
mod async_ack;
#[cfg(feature = "async")]
pub mod notifier;
#[cfg(feature = "async")]
mod stream;

pub use client::{Client, ClientBuilder, Config, DpdkOptions, Topic, Transport};
pub use discovery::{Broker, ClusterView, ControlAddr, ControlSource};
pub use error::{Error, ErrorKind, Result};
pub use publisher::Publisher;
pub use subscriber::{Message, MessageRef, StartAt, Subscriber};

#[cfg(feature = "async")]
pub use async_ack::{AckFuture, AsyncPublisher};
#[cfg(feature = "async")]
pub use stream::MessageStream;

/// The errors of the layers below, as [`Error`] wraps them.
pub use embar_control::http::ClientError;
pub use embar_control::topics::TopicSpec;
pub use embar_dataplane::client::PublishError;
pub use embar_dataplane::PoolError;

/// The error of a DPDK publisher in a build without the `dpdk` feature.
pub const NO_DPDK: &str = "this build has no DPDK transport: build with the `dpdk` feature (`cargo build --release --features dpdk`; needs libdpdk-dev and pkg-config)";
/// The error of the verbs transport in a build without it.
pub const NO_VERBS: &str = "this build has no verbs transport: build with the `verbs` feature (`cargo build --release --features verbs`; needs libibverbs-dev, librdmacm-dev, libclang-dev)";
