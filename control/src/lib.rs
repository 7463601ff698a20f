//! The control process of Embarcadero (`embar control`): broker membership (register,
//! heartbeat, failure detection), topic metadata (create, describe, list, delete), discovery
//! (where brokers and the sequencer are), formatting the pool, and keeping its own state
//! durable.
//!
//! It writes the pool's topic table through `embar_dataplane::pool::Pool::create_topic`, which
//! already refuses invalid topics; membership and the API come with the control-process issue.
