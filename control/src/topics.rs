//! Topic specifications and the rules the control process adds to the pool's own checks.

use embar_dataplane::pool::topics::{check_topic_name, TopicConfig};
use embar_dataplane::PoolError;
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
    /// values, ACK 2 without replication, sizes) when the topic is written. Replica sets
    /// range over the pool's `broker_slots` (`embar_dataplane::replication::replica_set`),
    /// so an ACK 2 topic (whose acks wait for every replica) needs a live broker in every
    /// slot that is not replaced (`crate::placement`: `replaced_slots` are passed over); at
    /// ACK 0 and 1 the slots without a broker only hold no replica.
    pub fn check_cluster(
        &self,
        live_brokers: u32,
        replaced_slots: u32,
        broker_slots: u32,
    ) -> Result<(), TopicRuleError> {
        check_topic_name(&self.name)?;
        if u32::from(self.replication_factor) > live_brokers {
            return Err(TopicRuleError::ReplicationFactor {
                replication_factor: self.replication_factor,
                live_brokers,
            });
        }
        if self.ack == 2
            && self.replication_factor > 0
            && live_brokers + replaced_slots < broker_slots
        {
            return Err(TopicRuleError::ReplicaSlots {
                live_brokers,
                broker_slots,
            });
        }
        Ok(())
    }
}

/// A topic the cluster cannot take as it is now.
#[derive(Debug, thiserror::Error)]
pub enum TopicRuleError {
    #[error(transparent)]
    Name(#[from] PoolError),
    #[error(
        "replication factor {replication_factor} is larger than the {live_brokers} live brokers"
    )]
    ReplicationFactor {
        replication_factor: u8,
        live_brokers: u32,
    },
    #[error(
        "replica sets range over the pool's {broker_slots} broker slots and only \
         {live_brokers} brokers are live: start a broker in every slot, wait until the \
         control process replaces the empty ones (--replace-after-ms), or make the pool \
         with --max-brokers {live_brokers}"
    )]
    ReplicaSlots {
        live_brokers: u32,
        broker_slots: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, replication_factor: u8) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            order: 5,
            ack: 1,
            replication_factor,
            batch_bytes: 1 << 20,
        }
    }

    #[test]
    fn a_bad_name_and_too_few_brokers_are_refused_with_what_is_wrong() {
        assert!(spec("orders", 2).check_cluster(2, 0, 2).is_ok());
        assert!(spec("orders", 1).check_cluster(2, 0, 4).is_ok());
        let acked = TopicSpec {
            ack: 2,
            ..spec("orders", 1)
        };
        let e = acked.check_cluster(3, 0, 4).unwrap_err();
        assert!(matches!(e, TopicRuleError::ReplicaSlots { .. }), "{e}");
        // The fourth slot's broker died and its slot was replaced: the sets pass over it.
        assert!(acked.check_cluster(3, 1, 4).is_ok());
        let e = spec("", 0).check_cluster(2, 0, 2).unwrap_err();
        assert!(
            matches!(e, TopicRuleError::Name(PoolError::TopicName(..))),
            "{e}"
        );
        let e = spec("orders", 3).check_cluster(2, 0, 2).unwrap_err();
        assert!(matches!(e, TopicRuleError::ReplicationFactor { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "replication factor 3 is larger than the 2 live brokers"
        );
    }
}
