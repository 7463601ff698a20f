//! `embar`: the command line of Embarcadero in Rust.

mod bench_cmd;
mod broker_cmd;
mod client_cmd;
mod cluster_cmd;
mod control_cmd;
mod exit;
mod log_cmd;
mod pool_cmd;
mod units;

/// The error of a DPDK option in a build without the transport.
pub const NO_DPDK: &str = "this embar was built without the DPDK transport: build it with `cargo build --release --features dpdk` (needs libdpdk-dev and pkg-config)";

/// EAL options: `given` split on spaces, else those for virtual devices on any host.
pub fn dpdk_eal_args(given: Option<&str>) -> Vec<String> {
    match given {
        Some(s) => s.split_ascii_whitespace().map(String::from).collect(),
        #[cfg(feature = "dpdk")]
        None => embar_sys::dpdk::vdev_eal_args(256),
        #[cfg(not(feature = "dpdk"))]
        None => Vec::new(),
    }
}

/// The error of a verbs option in a build without the transport.
pub const NO_VERBS: &str = "this embar was built without the verbs transport: build it with `cargo build --release --features verbs` (needs libibverbs-dev, librdmacm-dev, libclang-dev)";

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use exit::{CliError, CliResult};

#[derive(Parser)]
#[command(
    name = "embar",
    version,
    about = "A totally ordered shared log over a shared memory pool",
    after_help = exit::EXIT_CODES_HELP
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
    /// The main job: a local cluster, publishers and subscribers, every message checked,
    /// throughput and latency (the default command).
    Bench(bench_cmd::BenchArgs),
    /// Benchmark the pool data path alone (segments and one ring) between two processes.
    RingBench(bench_cmd::RingBenchArgs),
    /// Run the sequencer of one topic until SIGINT or SIGTERM.
    Sequencer(SequencerArgs),
    /// Publish each line of stdin as one message; exit 0 only when all are acknowledged.
    Publish(client_cmd::PublishArgs),
    /// Print a topic's messages in total order.
    Subscribe(client_cmd::SubscribeArgs),
    /// Run a broker (and optionally the sequencer) until SIGINT or SIGTERM.
    Broker(broker_cmd::BrokerArgs),
    /// Run the control process (membership, topics, pool formatting) until SIGINT or SIGTERM.
    Control(control_cmd::ControlArgs),
    /// Create, list, describe or delete topics (through the control process).
    Topic {
        #[command(flatten)]
        client: control_cmd::ClientArgs,
        #[command(subcommand)]
        cmd: control_cmd::TopicCmd,
    },
    /// Cluster commands (through the control process).
    Cluster {
        #[command(flatten)]
        client: control_cmd::ClientArgs,
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// A broker's disk logs (docs/durability.md).
    #[command(subcommand)]
    Log(LogCmd),
    /// A worker process of the benches and the process tests (started by them).
    #[command(hide = true, subcommand)]
    RingWorker(WorkerCmd),
}

#[derive(Subcommand)]
enum LogCmd {
    /// Verify every record of a topic's disk log and print its messages in total order.
    Dump(log_cmd::DumpArgs),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Brokers and their liveness, the pool, topics with sequencer and per-broker progress.
    Status,
    /// Start a local cluster (control process, brokers, sequencer) in the background.
    Up(Box<cluster_cmd::UpArgs>),
    /// Stop the local cluster started by `cluster up`. Its disk logs and control state stay
    /// in the directory (`cluster up` on it brings the cluster back with its topics and
    /// logs) unless `--purge`.
    Down {
        #[arg(long, env = "EMBAR_CLUSTER_DIR", default_value = embar_client::discovery::DEFAULT_CLUSTER_DIR)]
        dir: PathBuf,
        /// Also delete the control state and the brokers' disk logs.
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Create and format a new pool.
    Create(pool_cmd::CreateArgs),
    /// Create a topic in the pool's topic table directly (the control process does this
    /// for a cluster: `embar topic create`).
    CreateTopic {
        #[arg(long, default_value = "/dev/shm/embar.pool")]
        path: PathBuf,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        settings: pool_cmd::TopicSettings,
    },
    /// Show a pool's layout, topics and ring positions.
    Inspect {
        #[arg(long, default_value = "/dev/shm/embar.pool")]
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct SequencerArgs {
    #[arg(long, default_value = "/dev/shm/embar.pool")]
    pool: PathBuf,
    #[arg(long)]
    topic: String,
    /// Brokers whose rings to order (ids 0..N).
    #[arg(long)]
    brokers: u32,
    /// Pin the polling thread to this CPU.
    #[arg(long)]
    pin_cpu: Option<usize>,
    /// Fence a client whose sequence gap stays open this long.
    #[arg(long, default_value_t = 5000)]
    hold_timeout_ms: u64,
    /// Never forget a client of ORDER 4/5 (its entry lives until the topic is deleted). For
    /// ring writers that bypass publisher sessions (`embar ring-worker feed`), whose clients
    /// never look live (docs/sequencer.md, "Client table reclaim").
    #[arg(long)]
    no_client_reclaim: bool,
}

#[derive(Subcommand)]
enum WorkerCmd {
    /// Publish good messages, then a batch that breaks the rules; report the broker's answer.
    RoguePublish(embar_bench::rogue::RogueArgs),
    /// The bench crate's workers: load generators and test fixtures.
    #[command(flatten)]
    Bench(embar_bench::workers::Worker),
}

fn run_sequencer(a: &SequencerArgs) -> CliResult<()> {
    use embar_dataplane::pool::coherence::Coherence;
    use embar_dataplane::pool::{CoherenceFn, OpenOptions, Pool};
    use embar_dataplane::sequencer::driver::{DriverConfig, Sequencer};
    use embar_dataplane::sequencer::Limits;

    let pool = Pool::open(&a.pool, &OpenOptions::default())?;
    let stop = embar_sys::signal::stop_on_term();
    struct Go<'a>(
        &'a Pool,
        &'a SequencerArgs,
        &'static std::sync::atomic::AtomicBool,
    );
    impl CoherenceFn<CliResult<()>> for Go<'_> {
        fn call<C: Coherence>(self, c: C) -> CliResult<()> {
            let Go(pool, a, stop) = self;
            let topic = pool.find_topic(c, &a.topic)?;
            let cfg = DriverConfig {
                limits: Limits {
                    hold_timeout_ns: a.hold_timeout_ms * 1_000_000,
                    ..Limits::default()
                },
                pin_cpu: a.pin_cpu,
                client_reclaim: !a.no_client_reclaim,
                ..DriverConfig::default()
            };
            let mut s = Sequencer::start(pool, c, topic, a.brokers, cfg)
                .map_err(|e| CliError::from(e.to_string()))?;
            log::info!(
                "sequencer for topic {:?} (slot {topic}), {} brokers, epoch {}, resumed at total order {} ({} batches replayed)",
                a.topic,
                a.brokers,
                s.epoch(),
                s.core().next_global(),
                s.stats().replayed
            );
            s.run(stop).map_err(|e| CliError::from(e.to_string()))?;
            log::info!("sequencer stopped: {:?} {:?}", s.stats(), s.core().stats());
            Ok(())
        }
    }
    Pool::with_coherence(pool.coherence_mode(), Go(&pool, a, stop))
}

/// Runs one command. `Ok(false)`: it ran and printed its report, and a check in it failed.
fn run(command: Cmd) -> CliResult<bool> {
    match command {
        Cmd::Pool(PoolCmd::Create(a)) => pool_cmd::create(&a)?,
        Cmd::Pool(PoolCmd::Inspect { path, json }) => pool_cmd::inspect(&path, json)?,
        Cmd::Pool(PoolCmd::CreateTopic {
            path,
            name,
            settings,
        }) => pool_cmd::create_topic(&path, &name, &settings)?,
        Cmd::Bench(a) => return bench_cmd::bench(&a),
        Cmd::RingBench(a) => return bench_cmd::ring_bench(&a),
        Cmd::Sequencer(a) => run_sequencer(&a)?,
        Cmd::Control(a) => control_cmd::run_control(&a)?,
        Cmd::Broker(a) => broker_cmd::run(&a)?,
        Cmd::Topic { client, cmd } => control_cmd::topic(&client, &cmd)?,
        Cmd::Cluster {
            client,
            cmd: ClusterCmd::Status,
        } => control_cmd::cluster_status(&client)?,
        Cmd::Cluster {
            cmd: ClusterCmd::Up(a),
            ..
        } => {
            let f = cluster_cmd::up(&a)?;
            // Commands find this cluster by its directory when it is the one they look in.
            let found = embar_client::ControlAddr::discover().is_ok_and(|c| c.addr == f.control);
            let hint = if found {
                String::new()
            } else {
                format!(
                    "\n  other commands find it with: export EMBAR_CLUSTER_DIR={}",
                    a.dir.display()
                )
            };
            println!(
                "cluster up: control at {}, {} brokers, pool {}{hint}\n  embar topic create NAME\n  stop: embar cluster down --dir {}",
                f.control,
                f.pids.len() - 1,
                f.pool.display(),
                a.dir.display()
            );
        }
        Cmd::Cluster {
            cmd: ClusterCmd::Down { dir, purge },
            ..
        } => {
            let stopped = cluster_cmd::down(&dir, purge)?;
            if stopped.is_empty() {
                println!("cluster down: no process of it was running");
            }
            for s in stopped {
                println!("stopped {s}");
            }
        }
        Cmd::Publish(a) => client_cmd::publish(&a)?,
        Cmd::Subscribe(a) => client_cmd::subscribe(&a)?,
        Cmd::Log(LogCmd::Dump(a)) => return log_cmd::dump(&a),
        Cmd::RingWorker(WorkerCmd::RoguePublish(a)) => embar_bench::rogue::rogue_publish(&a)?,
        Cmd::RingWorker(WorkerCmd::Bench(w)) => return Ok(embar_bench::workers::run(&w)?),
    }
    Ok(true)
}

fn main() -> ExitCode {
    // A reader that goes away (`embar cluster status | head -1`) ends the command quietly.
    embar_sys::signal::default_sigpipe();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let command = cli
        .command
        .unwrap_or_else(|| Cmd::Bench(bench_cmd::BenchArgs::parse_defaults()));
    match run(command) {
        Ok(true) => ExitCode::SUCCESS,
        // The command ran and printed its report, and a check in it failed.
        Ok(false) => ExitCode::from(exit::ExitKind::DataError.code()),
        Err(e) => {
            eprintln!("{}", e.line());
            ExitCode::from(e.kind.code())
        }
    }
}
