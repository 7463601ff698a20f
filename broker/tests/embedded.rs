//! A cluster embedded in one process, as a service that uses Embarcadero as its ordered
//! transport would run it: the control process (`embar_control::server`), two
//! [`BrokerNode`]s (one pinned to run the sequencers) and the client library, no `embar`
//! binary. Every message comes back once, in publish order; the brokers stop on request.

use std::time::Duration;

use embar_broker::{BrokerConfig, BrokerNode, SequencerRole};
use embar_client::{Client, StartAt, TopicSpec};
use embar_control::server::{start, ControlConfig};
use embar_dataplane::pool::geometry::PoolConfig;

#[test]
fn an_embedded_control_process_and_two_broker_nodes_serve_a_client() {
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("embar-broker-embedded-{id}"));
    let pool_path = std::path::PathBuf::from(format!("/dev/shm/embar-broker-embedded-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&pool_path);
    let control = start(ControlConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: dir.clone(),
        pool_path: pool_path.clone(),
        pool: PoolConfig {
            pool_bytes: 64 << 20,
            max_topics: 2,
            max_brokers: 2,
            ring_slots: 64,
            segment_bytes: 1 << 20,
        },
        ..ControlConfig::default()
    })
    .unwrap();
    let nodes: Vec<BrokerNode> = [SequencerRole::Pinned, SequencerRole::Never]
        .into_iter()
        .map(|role| {
            BrokerNode::start(BrokerConfig {
                sequencer: role,
                ..BrokerConfig::new(control.addr)
            })
            .unwrap()
        })
        .collect();
    assert_ne!(nodes[0].slot(), nodes[1].slot());

    let client = Client::connect(control.addr).unwrap();
    client
        .create_topic(&TopicSpec {
            name: "embedded".into(),
            order: 5,
            ack: 1,
            replication_factor: 0,
            batch_bytes: 16 << 10,
        })
        .unwrap();
    let mut subscriber = client.subscriber("embedded", StartAt::Oldest).unwrap();
    let mut publisher = client.publisher("embedded").unwrap();
    let n = 5_000u64;
    for i in 0..n {
        publisher.publish(format!("m{i}").as_bytes()).unwrap();
    }
    assert_eq!(publisher.wait_acks().unwrap(), n);
    for i in 0..n {
        let m = subscriber
            .next_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap_or_else(|| panic!("message {i} never came"));
        assert_eq!(m.total_order, i);
        assert_eq!(m.payload, format!("m{i}").as_bytes());
    }
    for node in nodes {
        assert!(!node.is_finished());
        node.stop().unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&pool_path);
}
