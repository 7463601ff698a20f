//! A rogue publisher (`embar ring-worker rogue-publish`), a test fixture: it opens an honest
//! session, publishes good messages, then breaks one rule of the session protocol (a bad
//! descriptor, a bad message header, a garbage word of its own session; over verbs a write
//! past its grant, a bad immediate, a vanished writer) and reports what its broker answered.
//! tests/rogue_publishers.rs and the verbs suite run it beside honest clients.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use embar_dataplane::client::publisher::{Publisher, PublisherConfig};
use embar_dataplane::client::{new_client_id, Publish};
use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::{CoherenceFn, Pool};

use crate::cluster::{cluster_view, open_pool};

/// What a rogue publisher does (`embar ring-worker rogue-publish`).
#[derive(Clone, Debug, clap::Args)]
pub struct RogueArgs {
    #[arg(long)]
    pub topic: String,
    #[arg(long, env = "EMBAR_CONTROL")]
    pub control: SocketAddr,
    /// What the rogue batch does wrong: metadata, outside-grant, past-grant, bad-size,
    /// huge-size, wrong-client (its descriptor); message-size-max, message-past-batch (a
    /// valid descriptor, a bad first message header); ready-word, submitted-ahead,
    /// grants-taken-ahead (a word of its session); with `--transport verbs` also write-past-grant (an RDMA write past the
    /// end of its grant), bad-immediate, unknown-grant (a descriptor naming space outside its
    /// grants), vanish (writes half a batch, then exits).
    #[arg(long)]
    pub fault: String,
    /// `shm` or `verbs`.
    #[arg(long, default_value = "shm", value_parser = ["shm", "verbs"])]
    pub transport: String,
    /// verbs: RDMA device (default: $RDMA_DEVICE, else the first).
    #[arg(long, env = "RDMA_DEVICE")]
    pub rdma_device: Option<String>,
    /// verbs: GID index.
    #[arg(long, env = "RDMA_GID_INDEX", default_value_t = 1)]
    pub gid_index: u8,
}

/// A publisher that sends good messages, then one batch descriptor that breaks the rules,
/// and reports what its broker answered.
pub fn rogue_publish(a: &RogueArgs) -> Result<(), String> {
    use embar_dataplane::batch::BatchDesc;
    if a.transport == "verbs" {
        #[cfg(feature = "verbs")]
        return rogue_verbs(a);
        #[cfg(not(feature = "verbs"))]
        return Err("the verbs rogue needs embar-bench's `verbs` feature".into());
    }
    use embar_dataplane::pool::layout::BATCH_HEADER_VERSION;
    let cluster = cluster_view(a.control).map_err(|e| e.to_string())?;
    let brokers = cluster.broker_slots().map_err(|e| e.to_string())?;
    let pool = open_pool(&cluster.pool_path).map_err(|e| e.to_string())?;
    struct Go<'a>(&'a Pool, &'a RogueArgs, &'a [u32]);
    impl CoherenceFn<Result<(), String>> for Go<'_> {
        fn call<C: Coherence>(self, c: C) -> Result<(), String> {
            let Go(pool, a, brokers) = self;
            let mut p = Publisher::open(
                pool,
                c,
                &a.topic,
                &brokers[..1],
                new_client_id(),
                PublisherConfig::default(),
            )
            .map_err(|e| e.to_string())?;
            publish_good(&mut p)?;
            let (offset, bytes, used) = p.grant(0).ok_or("no grant")?;
            let good = BatchDesc {
                batch_seq: 1,
                client_id: p.client_id(),
                num_msg: 1,
                broker_id: brokers[0],
                total_size: 64,
                log_idx: offset + used,
                start_logical_offset: 0,
                version_flags: u64::from(BATCH_HEADER_VERSION),
            };
            if let Some(word) = session_word_fault(pool, c, brokers[0], p.client_id(), &a.fault)? {
                eprintln!("rogue: wrote {word}");
                report_rogue(&mut p);
                return Ok(());
            }
            let bad = match a.fault.as_str() {
                // Pool metadata: fails the descriptor's bounds check.
                "metadata" => BatchDesc {
                    log_idx: pool.geometry().ring_region_offset,
                    ..good
                },
                // Log space this session was never granted: a free segment.
                "outside-grant" => {
                    let free = (0..pool.geometry().segment_count)
                        .find(|i| pool.segment_owner(c, *i).is_none())
                        .ok_or("no free segment to aim at")?;
                    BatchDesc {
                        log_idx: pool.geometry().segment_offset(free),
                        ..good
                    }
                }
                "past-grant" => BatchDesc {
                    log_idx: offset + bytes - 64,
                    total_size: 128,
                    ..good
                },
                "bad-size" => BatchDesc {
                    num_msg: 4,
                    total_size: 64,
                    ..good
                },
                "huge-size" => BatchDesc {
                    total_size: 1 << 40,
                    ..good
                },
                // A valid descriptor; its first message says 4 GiB.
                "message-size-max" => {
                    write_rogue_header(pool, &good, u32::MAX)?;
                    BatchDesc {
                        num_msg: 4,
                        total_size: 256,
                        ..good
                    }
                }
                // A valid descriptor; its only message runs past the batch's 128 bytes.
                "message-past-batch" => {
                    write_rogue_header(pool, &good, 200)?;
                    BatchDesc {
                        total_size: 128,
                        ..good
                    }
                }
                "wrong-client" => BatchDesc {
                    client_id: p.client_id() ^ 1,
                    ..good
                },
                other => return Err(format!("unknown fault {other:?}")),
            };
            p.submit_unchecked(0, &bad).map_err(|e| e.to_string())?;
            report_rogue(&mut p);
            Ok(())
        }
    }
    Pool::with_coherence(pool.coherence_mode(), Go(&pool, a, &brokers))
}

/// Writes a message header of `size` payload bytes at the start of `good`'s range (the
/// rogue's own grant, past its acknowledged batches).
fn write_rogue_header(
    pool: &Pool,
    good: &embar_dataplane::batch::BatchDesc,
    size: u32,
) -> Result<(), String> {
    use embar_dataplane::pool::layout::MessageHeader;
    let dst = pool.data_ptr(good.log_idx, 64).map_err(|e| e.to_string())?;
    let h = MessageHeader {
        size,
        client_id: good.client_id,
        batch_seq: good.batch_seq,
        ..MessageHeader::default()
    };
    // SAFETY: 64 bytes of this process's own grant, bounds-checked by `data_ptr`, 64-byte
    // aligned (grants and batch ends are); no other process reads them before a submission.
    unsafe { dst.cast::<MessageHeader>().write(h) };
    Ok(())
}

/// The session-word faults: stores garbage into a word of the rogue's own session on broker
/// slot `broker` (`None` for any other fault). Says what it wrote.
fn session_word_fault<C: Coherence>(
    pool: &Pool,
    c: C,
    broker: u32,
    client_id: u64,
    fault: &str,
) -> Result<Option<String>, String> {
    use embar_dataplane::session::SESSIONS;
    use std::sync::atomic::Ordering::Relaxed;
    if !matches!(
        fault,
        "ready-word" | "submitted-ahead" | "grants-taken-ahead"
    ) {
        return Ok(None);
    }
    let pid = embar_sys::process::ProcessId::current().pack();
    let s = (0..SESSIONS)
        .filter_map(|i| pool.session(broker, i).ok())
        .find(|s| s.client_id.load(Relaxed) == client_id && s.pid.load(Relaxed) == pid)
        .ok_or("the rogue's own session is not in the pool")?;
    let next = s.submitted.load(Relaxed);
    Ok(Some(match fault {
        "ready-word" => {
            let slot = (next % s.submissions.len() as u64) as usize;
            c.publish(&s.submissions[slot].ready, 999);
            format!("ready=999 into submission slot {slot}")
        }
        "submitted-ahead" => {
            c.publish(&s.submitted, next + (1 << 40));
            format!("submitted={}", next + (1 << 40))
        }
        _ => {
            let taken = s.grants_taken.load(Relaxed);
            c.publish(&s.grants_taken, taken + (1 << 40));
            format!("grants_taken={}", taken + (1 << 40))
        }
    }))
}

/// A rogue publisher's honest start: ten good messages, acknowledged (its grant is taken).
fn publish_good(p: &mut impl Publish) -> Result<(), String> {
    for i in 0..10 {
        p.publish(format!("good {i}").as_bytes())
            .map_err(|e| e.to_string())?;
    }
    p.wait_acks(Duration::from_secs(10))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Reports how a rogue publisher's session ended: `{"rejected": bool, "error": ...}`.
fn report_rogue(p: &mut impl Publish) {
    let start = Instant::now();
    loop {
        match p.acked() {
            Err(e) => {
                println!(
                    "{}",
                    serde_json::json!({ "rejected": true, "error": e.to_string() })
                );
                return;
            }
            Ok(_) if start.elapsed() > Duration::from_secs(10) => {
                println!("{}", serde_json::json!({ "rejected": false }));
                return;
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The verbs transport's rogue publishers (see `RogueArgs::fault`).
#[cfg(feature = "verbs")]
fn rogue_verbs(a: &RogueArgs) -> Result<(), String> {
    use embar_dataplane::batch::BatchDesc;
    use embar_dataplane::pool::layout::BATCH_HEADER_VERSION;
    use embar_dataplane::verbs::publisher::{VerbsConfig, VerbsPublisher};
    let brokers = cluster_view(a.control)
        .and_then(|c| Ok(c.verbs_brokers()?))
        .map_err(|e| e.to_string())?;
    let vc = VerbsConfig {
        device: a.rdma_device.clone(),
        gid_index: a.gid_index,
        publisher: PublisherConfig::default(),
    };
    let mut p = VerbsPublisher::connect(&brokers, &a.topic, new_client_id(), &vc)
        .map_err(|e| e.to_string())?;
    publish_good(&mut p)?;
    let (offset, bytes, used) = p.grant(0).ok_or("no grant")?;
    match a.fault.as_str() {
        // Straddles the end of the grant by 64 bytes: the NIC refuses it.
        "write-past-grant" => p
            .write_unchecked(0, bytes - 256, 320)
            .map_err(|e| e.to_string())?,
        "bad-immediate" | "unknown-grant" => {
            let broker = brokers[0].0;
            let mut desc = BatchDesc {
                batch_seq: 1,
                client_id: p.client_id(),
                num_msg: 1,
                broker_id: broker,
                total_size: 64,
                log_idx: offset + used,
                start_logical_offset: 0,
                version_flags: u64::from(BATCH_HEADER_VERSION),
            };
            let imm = if a.fault == "bad-immediate" {
                1_000_000
            } else {
                // The right slot, naming log space that is not free space of a grant of
                // this session: the start of its grant, where its good batches are.
                desc.log_idx = offset;
                p.next_slot(0).ok_or("no link")?
            };
            p.signal_unchecked(0, imm, &desc)
                .map_err(|e| e.to_string())?;
        }
        "vanish" => {
            // Half a batch lands in the grant, its descriptor never does.
            p.write_unchecked(0, used, 4096)
                .map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(200));
            println!("{}", serde_json::json!({ "vanished": true }));
            std::process::exit(0);
        }
        other => return Err(format!("unknown verbs fault {other:?}")),
    }
    report_rogue(&mut p);
    Ok(())
}
