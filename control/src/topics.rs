//! Topic specifications and the rules the control process adds to the pool's own checks.

use embar_dataplane::pool::topics::{check_topic_name, TopicConfig};
use serde::{Deserialize, Serialize};

/// A topic as operators create it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    pub order: u8,
    pub ack: u8,
    pub replication_factor: u8,
    pub batch_bytes: u64,
}

impl TopicSpec {
    pub fn config(&self) -> TopicConfig {
        TopicConfig {
            order: self.order,
            ack: self.ack,
            replication_factor: self.replication_factor,
            batch_bytes: self.batch_bytes,
        }
    }

    /// The rules that need the cluster's state; the pool checks the rest (ORDER and ACK
    /// values, ACK 2 without replication, sizes) when the topic is written.
    pub fn check_cluster(&self, live_brokers: u32) -> Result<(), String> {
        check_topic_name(&self.name).map_err(|e| e.to_string())?;
        if u32::from(self.replication_factor) > live_brokers {
            return Err(format!(
                "replication factor {} is larger than the {live_brokers} live brokers",
                self.replication_factor
            ));
        }
        Ok(())
    }
}
