//! `embar control`, `embar topic ...`, `embar cluster status`: the control process and the
//! operator commands that talk to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use embar_control::topics::TopicSpec;
use embar_control::{ControlClient, ControlConfig};
use serde_json::Value;

use crate::exit::CliResult;
use crate::pool_cmd::{CreateArgs, TopicSettings};
use crate::units::format_bytes;

pub const DEFAULT_CONTROL: &str = "127.0.0.1:7400";

#[derive(Clone, Debug, clap::Args)]
pub struct ControlArgs {
    /// Address of the HTTP/JSON API (`:0` picks a free port, printed at start).
    #[arg(long, default_value = DEFAULT_CONTROL)]
    pub listen: SocketAddr,
    /// Where the durable state (topics, broker ids, epoch) is kept.
    #[arg(long, default_value = "/var/tmp/embar-control")]
    pub state_dir: PathBuf,
    /// Heartbeat interval brokers are told to use.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Missed heartbeats after which a broker is dead.
    #[arg(long, default_value_t = 3)]
    pub miss_limit: u32,
    /// A broker slot without a live broker for this long is passed over by the replica
    /// sets of what its broker had not made durable (docs/durability.md); 0: never.
    #[arg(long, default_value_t = embar_control::server::REPLACE_AFTER_DEFAULT.as_millis() as u64)]
    pub replace_after_ms: u64,
    /// The pool this control process formats (if missing) or attaches to.
    #[command(flatten)]
    pub pool: CreateArgs,
}

pub fn run_control(a: &ControlArgs) -> Result<(), String> {
    let (pool_path, pool, pool_options) = crate::pool_cmd::resolve(&a.pool)?;
    if a.heartbeat_ms == 0 || a.miss_limit == 0 {
        return Err("--heartbeat-ms and --miss-limit must be at least 1".into());
    }
    let cfg = ControlConfig {
        listen: a.listen,
        state_dir: a.state_dir.clone(),
        pool_path,
        pool,
        pool_options,
        heartbeat: Duration::from_millis(a.heartbeat_ms),
        miss_limit: a.miss_limit,
        replace_after: (a.replace_after_ms > 0).then(|| Duration::from_millis(a.replace_after_ms)),
    };
    let handle = embar_control::start(cfg).map_err(|e| e.to_string())?;
    println!(
        "embar control listening on {} (epoch {})",
        handle.addr, handle.epoch
    );
    let stop = embar_sys::signal::stop_on_term();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    log::info!("control process stopping");
    Ok(())
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum TopicCmd {
    /// Create a topic.
    Create {
        name: String,
        #[command(flatten)]
        settings: TopicSettings,
    },
    /// List topics.
    List,
    /// Show a topic and its progress per broker.
    Describe { name: String },
    /// Delete a topic.
    Delete { name: String },
}

#[derive(Clone, Debug, clap::Args)]
pub struct ClientArgs {
    /// Address of the control process (default: $EMBAR_CONTROL, else the cluster of
    /// `embar cluster up` in $EMBAR_CLUSTER_DIR or /tmp/embar-cluster, else 127.0.0.1:7400).
    #[arg(long, global = true)]
    pub control: Option<SocketAddr>,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

fn show(json: bool, v: &Value, human: impl FnOnce(&Value)) -> Result<(), String> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
        );
    } else {
        human(v);
    }
    Ok(())
}

fn topic_line(t: &Value) -> String {
    format!(
        "{:<24} ORDER {} ACK {} RF {} batch {}",
        t["name"].as_str().unwrap_or("?"),
        t["order"],
        t["ack"],
        t["replication_factor"],
        format_bytes(t["batch_bytes"].as_u64().unwrap_or(0))
    )
}

pub fn topic(c: &ClientArgs, cmd: &TopicCmd) -> CliResult<()> {
    let client = ControlClient::new(crate::client_cmd::control_addr(c.control)?);
    match cmd {
        TopicCmd::Create { name, settings } => {
            let spec = TopicSpec {
                name: name.clone(),
                order: settings.order,
                ack: settings.ack,
                replication_factor: settings.replication_factor,
                batch_bytes: settings.batch_bytes,
            };
            let v = client.create_topic(&spec)?;
            Ok(show(c.json, &v, |v| {
                println!("created {} in slot {}", topic_line(&v["topic"]), v["slot"])
            })?)
        }
        TopicCmd::List => {
            let v = client.list_topics()?;
            Ok(show(c.json, &v, |v| {
                for t in v["topics"].as_array().into_iter().flatten() {
                    println!("{}", topic_line(t));
                }
            })?)
        }
        TopicCmd::Describe { name } => {
            let v = client.describe_topic(name)?;
            Ok(show(c.json, &v, print_topic)?)
        }
        TopicCmd::Delete { name } => {
            let v = client.delete_topic(name)?;
            Ok(show(c.json, &v, |_| println!("deleted topic {name:?}"))?)
        }
    }
}

fn print_topic(v: &Value) {
    println!("{} (slot {})", topic_line(&v["topic"]), v["slot"]);
    let s = &v["sequencer"];
    println!(
        "  sequencer epoch {}, next total order {}, duplicates dropped {}, clients fenced {}",
        s["epoch"], s["next_total_order"], s["duplicates_dropped"], s["clients_fenced"]
    );
    for b in v["brokers"].as_array().into_iter().flatten() {
        if b["written"].as_u64().unwrap_or(0) > 0 {
            println!(
                "  broker {}: {} batches published, {} consumed, {} messages ordered{}",
                b["broker"],
                b["written"],
                b["consumed"],
                b["ordered_messages"],
                if v["topic"]["replication_factor"].as_u64().unwrap_or(0) > 0 {
                    format!(", durable below total order {}", b["durable_total_order"])
                } else {
                    String::new()
                }
            );
        }
    }
    for e in v["excluded_slots"].as_array().into_iter().flatten() {
        match e["until_total_order"].as_u64() {
            Some(u) => println!(
                "  slot {} held no replicas of total orders {}..{}",
                e["slot"], e["from_total_order"], u
            ),
            None => println!(
                "  slot {} holds no replicas from total order {} on (re-placed)",
                e["slot"], e["from_total_order"]
            ),
        }
    }
}

pub fn cluster_status(c: &ClientArgs) -> CliResult<()> {
    let v = ControlClient::new(crate::client_cmd::control_addr(c.control)?).status()?;
    Ok(show(c.json, &v, |v| {
        let p = &v["pool"];
        println!(
            "cluster epoch {}; pool {} ({}, {}, {}/{} segments in use)",
            v["epoch"],
            p["path"].as_str().unwrap_or("?"),
            format_bytes(p["bytes"].as_u64().unwrap_or(0)),
            p["coherence"].as_str().unwrap_or("?"),
            p["segments_in_use"],
            p["segments"]
        );
        println!("brokers: {} live", v["live_brokers"]);
        match v["sequencer"].as_object() {
            Some(q) => println!(
                "sequencer: in broker {} (pool slot {}, {}), all topics",
                q["broker_id"],
                q["slot"],
                match q["mode"].as_str() {
                    Some("pinned") => "pinned there with --sequencer",
                    _ => "assigned by the control process",
                }
            ),
            None => println!(
                "sequencer: no live broker can run it (brokers started with --no-sequencer?)"
            ),
        }
        for b in v["brokers"].as_array().into_iter().flatten() {
            println!(
                "  broker {:<3} slot {:<2} {:<5} last heartbeat {} ms ago  {}",
                b["id"],
                b["slot"],
                if b["alive"].as_bool() == Some(true) {
                    "alive"
                } else {
                    "dead"
                },
                b["last_heartbeat_ms_ago"],
                b["addresses"]
            );
        }
        println!("topics:");
        for t in v["topics"].as_array().into_iter().flatten() {
            print_topic(t);
        }
    })?)
}
