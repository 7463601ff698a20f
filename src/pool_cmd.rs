//! `embar pool create|inspect`: format a pool from a config file and flags, and show what a
//! pool holds.

use std::path::{Path, PathBuf};

use embar_dataplane::pool::coherence::CoherenceMode;
use embar_dataplane::pool::geometry::PoolConfig;
use embar_dataplane::pool::{CreateOptions, OpenOptions, Pool};
use serde::{Deserialize, Serialize};

use crate::exit::CliResult;
use crate::units::{format_bytes, parse_bytes};

/// A topic's settings, as flags (shared by `pool create-topic` and `topic create`).
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct TopicSettings {
    #[arg(long, default_value_t = 5)]
    pub order: u8,
    #[arg(long, default_value_t = 1)]
    pub ack: u8,
    /// Brokers that keep each batch on disk, the one it landed on included (`--rf`); ACK 2
    /// needs at least 1 (docs/durability.md).
    #[arg(long, visible_alias = "rf", default_value_t = 0)]
    pub replication_factor: u8,
    #[arg(long, default_value = "2MiB", value_parser = parse_bytes)]
    pub batch_bytes: u64,
}

impl TopicSettings {
    pub fn config(&self) -> embar_dataplane::pool::topics::TopicConfig {
        embar_dataplane::pool::topics::TopicConfig {
            order: self.order,
            ack: self.ack,
            replication_factor: self.replication_factor,
            batch_bytes: self.batch_bytes,
        }
    }
}

#[derive(Clone, Debug, Default, clap::Args)]
pub struct CreateArgs {
    /// TOML file with a [pool] table (see configs/local.toml); flags override its keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub path: Option<PathBuf>,
    #[arg(long, value_parser = parse_bytes)]
    pub pool_bytes: Option<u64>,
    #[arg(long)]
    pub max_topics: Option<u32>,
    #[arg(long)]
    pub max_brokers: Option<u32>,
    #[arg(long)]
    pub ring_slots: Option<u32>,
    #[arg(long, value_parser = parse_bytes)]
    pub segment_bytes: Option<u64>,
    #[arg(long)]
    pub coherence: Option<CoherenceMode>,
    #[arg(long)]
    pub numa_node: Option<u32>,
    #[arg(long)]
    pub populate: bool,
}

/// The `[pool]` table of a config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolToml {
    path: Option<PathBuf>,
    pool_bytes: Option<String>,
    max_topics: Option<u32>,
    max_brokers: Option<u32>,
    ring_slots: Option<u32>,
    segment_bytes: Option<String>,
    coherence: Option<String>,
    numa_node: Option<u32>,
    populate: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigToml {
    #[serde(default)]
    pool: PoolToml,
}

fn read_config(path: &Path) -> Result<PoolToml, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    let cfg: ConfigToml =
        toml::from_str(&text).map_err(|e| format!("bad config {}: {e}", path.display()))?;
    Ok(cfg.pool)
}

/// The pool path, configuration and options from a config file overridden by flags.
pub fn resolve(a: &CreateArgs) -> Result<(PathBuf, PoolConfig, CreateOptions), String> {
    let file = match &a.config {
        Some(p) => read_config(p)?,
        None => PoolToml::default(),
    };
    let d = PoolConfig::default();
    let size = |flag: Option<u64>, key: &Option<String>, default: u64| -> Result<u64, String> {
        match (flag, key) {
            (Some(v), _) => Ok(v),
            (None, Some(s)) => parse_bytes(s).map_err(|e| e.to_string()),
            (None, None) => Ok(default),
        }
    };
    let cfg = PoolConfig {
        pool_bytes: size(a.pool_bytes, &file.pool_bytes, d.pool_bytes)?,
        max_topics: a.max_topics.or(file.max_topics).unwrap_or(d.max_topics),
        max_brokers: a.max_brokers.or(file.max_brokers).unwrap_or(d.max_brokers),
        ring_slots: a.ring_slots.or(file.ring_slots).unwrap_or(d.ring_slots),
        segment_bytes: size(a.segment_bytes, &file.segment_bytes, d.segment_bytes)?,
    };
    let coherence = match (a.coherence, &file.coherence) {
        (Some(c), _) => c,
        (None, Some(s)) => s
            .parse()
            .map_err(|e| format!("the config file's [pool] coherence: {e}"))?,
        (None, None) => CoherenceMode::Coherent,
    };
    let path = a
        .path
        .clone()
        .or(file.path)
        .unwrap_or_else(|| PathBuf::from("/dev/shm/embar.pool"));
    let opts = CreateOptions {
        populate: a.populate || file.populate.unwrap_or(false),
        numa_node: a.numa_node.or(file.numa_node),
        coherence,
    };
    Ok((path, cfg, opts))
}

pub fn create(a: &CreateArgs) -> CliResult<()> {
    let (path, cfg, opts) = resolve(a)?;
    let pool = Pool::create(&path, &cfg, &opts)?;
    let g = pool.geometry();
    println!(
        "created pool {} ({}, {}): {} segments of {}, {} topics x {} brokers, rings of {} slots",
        path.display(),
        format_bytes(g.pool_bytes),
        opts.coherence.name(),
        g.segment_count,
        format_bytes(g.segment_bytes),
        g.max_topics,
        g.max_brokers,
        g.ring_slots
    );
    Ok(())
}

#[derive(Debug, Serialize)]
struct TopicView {
    slot: u32,
    name: String,
    order: u8,
    ack: u8,
    replication_factor: u8,
    batch_bytes: u64,
    /// Per broker: ring slots published (`written`) and consumed.
    rings: Vec<(u64, u64)>,
    /// Per broker: messages ordered by the sequencer.
    ordered: Vec<u64>,
}

#[derive(Debug, Serialize)]
struct PoolView {
    path: String,
    pool_id: String,
    backing: String,
    coherence: &'static str,
    epoch: u64,
    pool_bytes: u64,
    max_topics: u32,
    max_brokers: u32,
    ring_slots: u32,
    segment_bytes: u64,
    segment_count: u64,
    segments_in_use: u64,
    regions: Vec<(&'static str, u64)>,
    topics: Vec<TopicView>,
}

pub fn inspect(path: &Path, json: bool) -> CliResult<()> {
    let pool = Pool::open(path, &OpenOptions::default())?;
    let c = embar_dataplane::pool::coherence::NonCoherent::detect();
    let g = *pool.geometry();
    let topics = pool
        .list_topics(c)
        .into_iter()
        .map(|t| {
            let rings = (0..g.max_brokers)
                .map(|b| {
                    let e = &pool.tinode(t.slot).brokers[b as usize];
                    (
                        e.broker.written.load(std::sync::atomic::Ordering::Acquire),
                        e.sequencer
                            .ring_consumed
                            .load(std::sync::atomic::Ordering::Acquire),
                    )
                })
                .collect();
            let ordered = (0..g.max_brokers)
                .map(|b| {
                    pool.tinode(t.slot).brokers[b as usize]
                        .sequencer
                        .ordered
                        .load(std::sync::atomic::Ordering::Acquire)
                })
                .collect();
            TopicView {
                slot: t.slot,
                name: t.name,
                order: t.config.order,
                ack: t.config.ack,
                replication_factor: t.config.replication_factor,
                batch_bytes: t.config.batch_bytes,
                rings,
                ordered,
            }
        })
        .collect();
    let view = PoolView {
        path: path.display().to_string(),
        pool_id: format!("{:016x}", pool.pool_id()),
        backing: pool.backing().describe(),
        coherence: pool.coherence_mode().name(),
        epoch: pool.epoch(),
        pool_bytes: g.pool_bytes,
        max_topics: g.max_topics,
        max_brokers: g.max_brokers,
        ring_slots: g.ring_slots,
        segment_bytes: g.segment_bytes,
        segment_count: g.segment_count,
        segments_in_use: pool.segments_in_use(c),
        regions: vec![
            ("superblock", 0),
            ("topic_table", g.topic_table_offset),
            ("rings", g.ring_region_offset),
            ("sequencer", g.sequencer_region_offset),
            ("segment_table", g.segment_table_offset),
            ("segment_pool", g.segment_pool_offset),
        ],
        topics,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&view).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "pool {} (id {}, {}, {})",
        view.path, view.pool_id, view.backing, view.coherence
    );
    println!(
        "  {} in {} segments of {} ({} in use); epoch {}",
        format_bytes(view.pool_bytes),
        view.segment_count,
        format_bytes(view.segment_bytes),
        view.segments_in_use,
        view.epoch
    );
    for (name, off) in &view.regions {
        println!("  {name:<14} at {off:#x}");
    }
    for t in &view.topics {
        println!(
            "  topic {:?} (slot {}): ORDER {} ACK {} RF {} batch {}",
            t.name,
            t.slot,
            t.order,
            t.ack,
            t.replication_factor,
            format_bytes(t.batch_bytes)
        );
    }
    Ok(())
}

pub fn create_topic(path: &Path, name: &str, t: &TopicSettings) -> CliResult<()> {
    use embar_dataplane::pool::topics::TopicConfig;
    use embar_dataplane::PoolResult;
    let pool = Pool::open(path, &OpenOptions::default())?;
    struct Go<'a>(&'a Pool, &'a str, TopicConfig);
    impl embar_dataplane::pool::CoherenceFn<PoolResult<u32>> for Go<'_> {
        fn call<C: embar_dataplane::pool::coherence::Coherence>(self, c: C) -> PoolResult<u32> {
            self.0.create_topic(c, self.1, &self.2)
        }
    }
    let slot = Pool::with_coherence(pool.coherence_mode(), Go(&pool, name, t.config()))?;
    println!(
        "created topic {name:?} in slot {slot}: ORDER {} ACK {} RF {} batch {}",
        t.order,
        t.ack,
        t.replication_factor,
        format_bytes(t.batch_bytes)
    );
    Ok(())
}
