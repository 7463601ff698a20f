//! `embar log dump`: reads a broker's disk log of one topic (docs/durability.md), verifies
//! every record's CRC32C and message framing, and prints the messages in log order (total
//! order within each pool era), one JSON object a line. A record that does not verify ends
//! the log: nothing after it is printed, and the command says so and exits non-zero.

use std::io::Write;
use std::path::{Path, PathBuf};

use embar_dataplane::replication::backfill_dirs;
use embar_dataplane::replication::log::{messages, read_log, topic_dir};

use crate::exit::{CliError, CliResult};

#[derive(Clone, Debug, clap::Args)]
pub struct DumpArgs {
    /// The broker's data directory (`embar broker --data-dir`; `D/broker-N` of `cluster up
    /// --dir D`).
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub topic: String,
    /// Print one summary line per batch instead of every message.
    #[arg(long)]
    pub batches: bool,
    /// Also dump the topic's backfill logs (batches a re-placement of replicas put in this
    /// broker's sets after it had read them; docs/durability.md), after the log, each line
    /// naming its backfill.
    #[arg(long)]
    pub backfills: bool,
}

/// `Ok(false)`: the log has a damaged tail (what verified was printed).
pub fn dump(a: &DumpArgs) -> CliResult<bool> {
    let dir = topic_dir(&a.dir, &a.topic);
    if !dir.is_dir() {
        return Err(CliError::not_found(format!(
            "no log of topic {:?} in {} ({} does not exist)",
            a.topic,
            a.dir.display(),
            dir.display()
        )));
    }
    let mut logs = vec![(dir.clone(), None)];
    if a.backfills {
        for (d, ..) in backfill_dirs(&dir) {
            let name = d.file_name().map(|n| n.to_string_lossy().to_string());
            logs.push((d, name));
        }
    }
    let mut complete = true;
    for (dir, backfill) in logs {
        complete &= dump_one(a, &dir, backfill.as_deref())?;
    }
    Ok(complete)
}

/// Dumps the log in `dir`; `Ok(false)`: it has a damaged tail.
fn dump_one(a: &DumpArgs, dir: &Path, backfill: Option<&str>) -> CliResult<bool> {
    let (records, rec) = read_log(dir).map_err(|e| e.to_string())?;
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let mut print = |mut v: serde_json::Value| {
        if let Some(b) = backfill {
            v["backfill"] = b.into();
        }
        writeln!(out, "{v}")
    };
    for r in &records {
        let m = &r.meta;
        let line = if a.batches {
            print(serde_json::json!({
                "era": m.era, "total_order": m.total_order, "num_msg": m.num_msg,
                "client_id": m.client_id, "batch_seq": m.batch_seq, "broker": m.broker,
                "delivery_index": m.delivery_index, "bytes": r.body.len(),
            }))
        } else {
            messages(&r.body).enumerate().try_for_each(|(i, p)| {
                print(serde_json::json!({
                    "era": m.era,
                    "total_order": m.total_order + i as u64,
                    "client_id": m.client_id,
                    "batch_seq": m.batch_seq,
                    "index": i,
                    "broker": m.broker,
                    "payload": String::from_utf8_lossy(p),
                }))
            })
        };
        line.map_err(|e| format!("cannot write: {e}"))?;
    }
    out.flush().map_err(|e| format!("cannot write: {e}"))?;
    drop(out);
    eprintln!(
        "log dump: {} batches verified in {}",
        records.len(),
        dir.display()
    );
    if let Some(why) = rec.reason {
        eprintln!(
            "log dump: the log ends at a record that does not verify ({} bytes left out): {why}",
            rec.truncated_bytes
        );
        return Ok(false);
    }
    Ok(true)
}
