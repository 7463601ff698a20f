//! Publishes `COUNT` messages (`message 0`, `message 1`, ...) to a topic and waits until all
//! are acknowledged.
//!
//! ```sh
//! embar cluster up && embar topic create orders --batch-bytes 64KiB
//! cargo run --example producer -- orders 1000
//! ```
//!
//! The control process is found as every `embar` command finds it: `--control ADDR`, else
//! `$EMBAR_CONTROL`, else the cluster directory of `embar cluster up`.

use std::time::Instant;

use embar_client::Client;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (topic, count, control) = match args.as_slice() {
        [topic, count] => (topic, count.parse::<u64>()?, None),
        [topic, count, flag, addr] if flag == "--control" => {
            (topic, count.parse::<u64>()?, Some(addr))
        }
        _ => return Err("usage: producer TOPIC COUNT [--control ADDR]".into()),
    };
    let mut builder = Client::builder();
    if let Some(addr) = control {
        builder = builder.control(addr.as_str())?;
    }
    let client = builder.connect()?;
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
