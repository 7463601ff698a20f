//! Prints the first `COUNT` messages of a topic in total order, one `TOTAL_ORDER PAYLOAD` line
//! each, and fails if they do not come within 30 s of each other.
//!
//! ```sh
//! cargo run --example consumer -- orders 1000
//! ```
//!
//! The cluster is found by the library ([`Client::discover`]) as every `embar` command finds
//! it without `--control`: `$EMBAR_CONTROL`, else the directory of `embar cluster up`
//! (`$EMBAR_CLUSTER_DIR`, else /tmp/embar-cluster).

use std::io::Write;
use std::time::Duration;

use embar_client::{Client, StartAt};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [topic, count] = args.as_slice() else {
        return Err("usage: consumer TOPIC COUNT".into());
    };
    let count: u64 = count.parse()?;

    let client = Client::discover()?;
    let mut subscriber = client.subscriber(topic, StartAt::Oldest)?;
    let mut out = std::io::stdout().lock();
    for got in 0..count {
        let Some(m) = subscriber.next_timeout(Duration::from_secs(30))? else {
            return Err(format!("{got} of {count} messages came; then none for 30 s").into());
        };
        writeln!(
            out,
            "{} {}",
            m.total_order,
            String::from_utf8_lossy(&m.payload)
        )?;
    }
    Ok(())
}
