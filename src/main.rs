//! `embar`: the command line of Embarcadero in Rust.

mod bench;
mod pool_cmd;
mod ringload;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "embar",
    version,
    about = "A totally ordered shared log over a shared memory pool"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or inspect a pool.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Benchmark the pool data path between real processes (the default command).
    Bench(bench::BenchArgs),
    /// A worker process of `embar bench` (started by it).
    #[command(hide = true, subcommand)]
    RingWorker(WorkerCmd),
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Create and format a new pool.
    Create(pool_cmd::CreateArgs),
    /// Show a pool's layout, topics and ring positions.
    Inspect {
        #[arg(long, default_value = "/dev/shm/embar.pool")]
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum WorkerCmd {
    Land {
        #[command(flatten)]
        workload: ringload::Workload,
        #[arg(long)]
        fault: Option<ringload::Fault>,
    },
    Drain {
        #[command(flatten)]
        workload: ringload::Workload,
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

fn print_report<T: serde::Serialize>(r: Result<T, String>) -> Result<bool, String> {
    let r = r?;
    println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
    Ok(true)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let command = cli
        .command
        .unwrap_or_else(|| Cmd::Bench(bench::BenchArgs::parse_defaults()));
    let result = match command {
        Cmd::Pool(PoolCmd::Create(a)) => pool_cmd::create(&a).map(|()| true),
        Cmd::Pool(PoolCmd::Inspect { path, json }) => pool_cmd::inspect(&path, json).map(|()| true),
        Cmd::Bench(a) => bench::run(&a),
        Cmd::RingWorker(WorkerCmd::Land { workload, fault }) => {
            print_report(ringload::run_lander(&workload, fault))
        }
        Cmd::RingWorker(WorkerCmd::Drain { workload, hold }) => {
            print_report(ringload::run_drainer(&workload, hold))
        }
        Cmd::RingWorker(WorkerCmd::SegmentChurn {
            pool,
            broker,
            rounds,
            hold,
        }) => print_report(ringload::run_segment_churn(&pool, broker, rounds, hold)),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("embar: {e}");
            ExitCode::from(2)
        }
    }
}
