//! Publishes `COUNT` messages (`message 0`, `message 1`, ...) to a topic and waits until all
//! are acknowledged.
//!
//! ```sh
//! embar cluster up && embar topic create orders --batch-bytes 64KiB
//! cargo run --example producer -- orders 1000
//! ```
//!
//! The cluster is found by the library ([`Client::discover`]) as every `embar` command finds
//! it without `--control`: `$EMBAR_CONTROL`, else the directory of `embar cluster up`
//! (`$EMBAR_CLUSTER_DIR`, else /tmp/embar-cluster).

use std::time::Instant;

use embar_client::Client;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [topic, count] = args.as_slice() else {
        return Err("usage: producer TOPIC COUNT".into());
    };
    let count: u64 = count.parse()?;

    let client = Client::discover()?;
    let mut publisher = client.publisher(topic)?;
    let start = Instant::now();
    for i in 0..count {
        publisher.publish(format!("message {i}").as_bytes())?;
    }
    let acked = publisher.wait_acks()?;
    println!(
        "published {count} messages to {topic:?} as client {:x}, {acked} acknowledged in {:?}",
        publisher.client_id(),
        start.elapsed()
    );
    Ok(())
}
