//! The worker processes: `embar ring-worker NAME` runs one (the `embar` binary parses the
//! subcommand and hands it to [`run`]). The ring bench starts the lander and the drainer;
//! the process tests start the others. Each prints one JSON report line on stdout, except
//! the heartbeat worker, which prints its broker id and runs until killed.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use embar_control::ControlClient;
use serde::Serialize;

use crate::order_load::{FeedArgs, VerifyArgs};
use crate::ringload::{Fault, Workload};
use crate::BenchResult;

/// The `embar` subcommand that runs a worker.
pub const COMMAND: &str = "ring-worker";

#[derive(Clone, Debug, clap::Subcommand)]
pub enum Worker {
    /// Play one broker feeding a topic's ring with striped, partly duplicated client batches.
    Feed(FeedArgs),
    /// Check a finished run's order (the ring must hold the whole run).
    VerifyOrder(VerifyArgs),
    /// Register with the control process and heartbeat until killed (the membership half of
    /// a broker, for tests of failure detection).
    Heartbeat {
        #[arg(long)]
        control: SocketAddr,
    },
    /// Write batches into the pool and publish them into a ring (the ring bench's lander).
    Land {
        #[command(flatten)]
        workload: Workload,
        #[arg(long)]
        fault: Option<Fault>,
    },
    /// Take batches from a ring, check every message, finish the slots (its drainer).
    Drain {
        #[command(flatten)]
        workload: Workload,
        #[arg(long, default_value_t = 0)]
        hold: usize,
    },
    /// Allocate and free segments in a loop, checking that no segment has two owners.
    SegmentChurn {
        #[arg(long)]
        pool: PathBuf,
        #[arg(long)]
        broker: u32,
        #[arg(long, default_value_t = 20_000)]
        rounds: u64,
        #[arg(long, default_value_t = 8)]
        hold: usize,
    },
}

/// Runs one worker. `Ok(false)`: it printed its report, and a check in it failed.
pub fn run(w: &Worker) -> BenchResult<bool> {
    match w {
        Worker::Feed(a) => print(&crate::order_load::feed(a)?),
        Worker::VerifyOrder(a) => {
            let r = crate::order_load::verify(a)?;
            print(&r)?;
            Ok(r.check == "passed")
        }
        Worker::Heartbeat { control } => heartbeat(*control),
        Worker::Land { workload, fault } => print(&crate::ringload::run_lander(workload, *fault)?),
        Worker::Drain { workload, hold } => print(&crate::ringload::run_drainer(workload, *hold)?),
        Worker::SegmentChurn {
            pool,
            broker,
            rounds,
            hold,
        } => print(&crate::ringload::run_segment_churn(
            pool, *broker, *rounds, *hold,
        )?),
    }
}

fn print<T: Serialize>(report: &T) -> BenchResult<bool> {
    println!("{}", serde_json::to_string(report)?);
    Ok(true)
}

/// Registers with the control process at `control`, prints the broker id it got, then
/// heartbeats until killed; returns only when a heartbeat fails.
fn heartbeat(control: SocketAddr) -> BenchResult<bool> {
    let client = ControlClient::new(control);
    let addrs: BTreeMap<String, String> =
        [("pid".to_string(), std::process::id().to_string())].into();
    let r = client.register(&addrs)?;
    let (id, interval) = (r.broker_id, r.heartbeat);
    println!("{id}");
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(interval);
        client.heartbeat(id)?;
    }
}
