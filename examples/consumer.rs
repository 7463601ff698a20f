//! Prints the first `COUNT` messages of a topic in total order, one `TOTAL_ORDER PAYLOAD` line
//! each, and fails if they do not come within 30 s of each other.
//!
//! ```sh
//! cargo run --example consumer -- orders 1000
//! ```
//!
//! The control process is found as every `embar` command finds it: `--control ADDR`, else
//! `$EMBAR_CONTROL`, else the cluster directory of `embar cluster up`.

use std::io::Write;
use std::time::Duration;

use embar_client::{Client, StartAt};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (topic, count, control) = match args.as_slice() {
        [topic, count] => (topic, count.parse::<u64>()?, None),
        [topic, count, flag, addr] if flag == "--control" => {
            (topic, count.parse::<u64>()?, Some(addr))
        }
        _ => return Err("usage: consumer TOPIC COUNT [--control ADDR]".into()),
    };
    let mut builder = Client::builder();
    if let Some(addr) = control {
        builder = builder.control(addr.as_str())?;
    }
    let client = builder.connect()?;
    let mut subscriber = client.subscriber(topic, StartAt::Oldest)?;
    let out = std::io::stdout();
    let mut out = out.lock();
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
