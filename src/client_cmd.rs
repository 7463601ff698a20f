//! `embar publish` and `embar subscribe`: flags in, calls of the client library
//! (`embar-client`) out. The control process is found as the library finds it when
//! `--control` is not given: `$EMBAR_CONTROL`, else the directory of `embar cluster up`
//! (`$EMBAR_CLUSTER_DIR`, else /tmp/embar-cluster), else 127.0.0.1:7400.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use embar_client::{Client, ClientBuilder, MessageRef, StartAt, Transport};
use embar_dataplane::checker::{Delivered, OrderChecker};

use crate::exit::{CliError, CliResult};

/// A client of the control process at `control`, or of the one discovery finds.
pub fn connect(control: Option<SocketAddr>, b: ClientBuilder) -> CliResult<Client> {
    let b = match control {
        Some(c) => b.control(c)?,
        None => b,
    };
    Ok(b.connect()?)
}

/// The control process's address: `control`, or the one discovery finds.
pub fn control_addr(control: Option<SocketAddr>) -> CliResult<SocketAddr> {
    match control {
        Some(c) => Ok(c),
        None => Ok(embar_client::ControlAddr::discover()?.addr),
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct PublishArgs {
    #[arg(long)]
    pub topic: String,
    /// The control process (default: $EMBAR_CONTROL, else the cluster of `embar cluster
    /// up` in $EMBAR_CLUSTER_DIR or /tmp/embar-cluster, else 127.0.0.1:7400).
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// How long to wait for the acks of everything published.
    #[arg(long, default_value_t = 30)]
    pub ack_timeout_s: u64,
    /// Longest wait for log space or a broker before giving up.
    #[arg(long, default_value_t = 30)]
    pub wait_timeout_s: u64,
    /// Read and check the whole input (UTF-8, every line fits a batch) before publishing
    /// any of it: a bad line then publishes nothing. The input is held in memory.
    #[arg(long)]
    pub validate_first: bool,
    #[command(flatten)]
    pub transport: TransportArgs,
}

/// How a publisher reaches its brokers.
#[derive(Clone, Debug, clap::Args)]
pub struct TransportArgs {
    /// `shm` (on the pool host: store into the pool), `verbs` (RDMA writes into
    /// broker-registered grants; brokers started with --verbs; a build with --features verbs)
    /// `tcp` (from any host: batches over TCP to the brokers) or `dpdk` (Ethernet frames
    /// from a DPDK port; brokers started with --dpdk; a build with --features dpdk).
    #[arg(long, default_value = "shm", value_parser = ["shm", "verbs", "tcp", "dpdk"])]
    pub transport: String,
    /// dpdk: a port on the brokers' Ethernet segment (device arguments, e.g.
    /// `net_af_packet0,iface=veth1`; default: a memif link per broker).
    #[arg(long)]
    pub dpdk_port: Option<String>,
    /// dpdk: largest frame in bytes (default 1514; the broker's limit applies too).
    #[arg(long)]
    pub dpdk_frame_bytes: Option<u32>,
    /// dpdk: environment (EAL) options, space-separated.
    #[arg(long, allow_hyphen_values = true)]
    pub dpdk_eal: Option<String>,
    /// dpdk, for tests of the link's recovery: drop every Nth data frame sent.
    #[arg(long, default_value_t = 0)]
    pub dpdk_drop_every: u32,
    /// dpdk, for tests of the link's checks: corrupt every Nth data frame sent.
    #[arg(long, default_value_t = 0)]
    pub dpdk_corrupt_every: u32,
    #[command(flatten)]
    pub rdma: RdmaArgs,
}

/// The RDMA device a verbs client uses.
#[derive(Clone, Debug, clap::Args)]
pub struct RdmaArgs {
    /// verbs: RDMA device (default: $RDMA_DEVICE, else the first).
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// verbs: GID index (default: $RDMA_GID_INDEX, else 1).
    #[arg(long)]
    pub gid_index: Option<u8>,
}

impl RdmaArgs {
    pub fn rdma_device(&self) -> Option<String> {
        self.rdma_device
            .clone()
            .or_else(|| std::env::var("RDMA_DEVICE").ok())
    }

    pub fn gid_index(&self) -> u8 {
        self.gid_index
            .or_else(|| std::env::var("RDMA_GID_INDEX").ok()?.parse().ok())
            .unwrap_or(1)
    }

    /// The library's verbs transport on this device (a usage error in a build without it).
    pub fn transport(&self) -> CliResult<Transport> {
        if !cfg!(feature = "verbs") {
            return Err(CliError::usage(crate::NO_VERBS));
        }
        Ok(Transport::Verbs {
            device: self.rdma_device(),
            gid_index: Some(self.gid_index()),
        })
    }
}

impl TransportArgs {
    pub fn verbs(&self) -> bool {
        self.transport == "verbs"
    }

    /// The library's transport for these flags.
    pub fn client_transport(&self) -> CliResult<Transport> {
        if self.transport == "tcp" {
            return Ok(Transport::Tcp);
        }
        if self.transport == "dpdk" {
            if !cfg!(feature = "dpdk") {
                return Err(CliError::usage(crate::NO_DPDK));
            }
            let mut o = embar_client::DpdkOptions::memif();
            o.port = self.dpdk_port.clone();
            o.frame_bytes = self.dpdk_frame_bytes;
            o.eal_args = self
                .dpdk_eal
                .as_deref()
                .map(|s| crate::dpdk_eal_args(Some(s)));
            o.drop_every = self.dpdk_drop_every;
            o.corrupt_every = self.dpdk_corrupt_every;
            return Ok(Transport::Dpdk(o));
        }
        if !self.verbs() {
            return Ok(Transport::Shm);
        }
        self.rdma.transport()
    }
}

/// Publishes each line of stdin as one message; succeeds only when all are acked per the
/// topic's ACK level.
pub fn publish(a: &PublishArgs) -> CliResult<()> {
    let b = Client::builder()
        .transport(a.transport.client_transport()?)
        .wait_timeout(Duration::from_secs(a.wait_timeout_s))
        .ack_timeout(Duration::from_secs(a.ack_timeout_s));
    let client = connect(a.control, b)?;
    let mut p = client.publisher(&a.topic)?;
    publish_lines(&mut p, a)
}

/// Publishes each line of stdin; returns once all are acked.
fn publish_lines(p: &mut embar_client::Publisher, a: &PublishArgs) -> CliResult<()> {
    // Lines come from a reader thread, so that a batch still lingers out (is sealed and
    // sent) while stdin is quiet, as an interactive producer expects.
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<String>>(4096);
    if a.validate_first {
        let checked = read_checked(p)?;
        std::thread::spawn(move || {
            for line in checked {
                if tx.send(Ok(line)).is_err() {
                    break;
                }
            }
        });
    } else {
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let mut n = 0u64;
    let fed: CliResult<()> = loop {
        // Wake when the open batch's linger runs out, to seal and send it.
        let wait = p.linger_remaining().unwrap_or(Duration::from_secs(3600));
        match rx.recv_timeout(wait) {
            Ok(line) => {
                let line = match line {
                    Ok(l) => l,
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        break Err(CliError::data(format!(
                            "stdin line {}: not UTF-8 text ({e})",
                            n + 1
                        )))
                    }
                    Err(e) => break Err(CliError::from(format!("cannot read stdin: {e}"))),
                };
                if let Err(e) = p.publish(line.as_bytes()) {
                    break Err(CliError::from(e).context(format_args!("stdin line {}", n + 1)));
                }
                n += 1;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = p.poll() {
                    break Err(e.into());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
        }
    };
    if let Err(e) = fed {
        // Say how far it got, so that a retry resends only what was not acknowledged.
        let so_far = match p.wait_acks() {
            Ok(k) => format!("{k} acknowledged"),
            Err(w) => format!("acknowledgements not complete: {w}"),
        };
        return Err(CliError {
            kind: e.kind,
            message: format!(
                "{}; lines 1..={n} before it were published ({so_far}); nothing after it was; to go on, resend from line {}",
                e.message,
                n + 1
            ),
        });
    }
    let acked = p.wait_acks()?;
    eprintln!(
        "published {n} messages to {:?}, {acked} acknowledged",
        a.topic
    );
    Ok(())
}

/// Every line of stdin, once all are checked (UTF-8 text, each fits a batch of the topic);
/// the first bad line is an error and nothing is published.
fn read_checked(p: &embar_client::Publisher) -> CliResult<Vec<String>> {
    let mut out = Vec::new();
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let nothing = "nothing was published (--validate-first)";
        let line = match line {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(CliError::data(format!(
                    "stdin line {}: not UTF-8 text ({e}); {nothing}",
                    i + 1
                )))
            }
            Err(e) => return Err(CliError::from(format!("cannot read stdin: {e}"))),
        };
        if let Err(e) = p.check_size(line.len()) {
            let e = CliError::from(e).context(format_args!("stdin line {}", i + 1));
            return Err(CliError {
                message: format!("{}; {nothing}", e.message),
                ..e
            });
        }
        out.push(line);
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Jsonl,
}

#[derive(Clone, Debug, clap::Args)]
pub struct SubscribeArgs {
    #[arg(long)]
    pub topic: String,
    /// The control process (default: as for `embar publish`).
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// `oldest`, `latest`, or a total order.
    #[arg(long, default_value = "oldest")]
    pub from: String,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Stop when no message arrives for this long (default: wait forever).
    #[arg(long)]
    pub idle_timeout_s: Option<u64>,
    /// Register, then wait this long before reading (holds log space: for tests of
    /// backpressure).
    #[arg(long, hide = true)]
    pub pause_ms: Option<u64>,
    /// Only messages durable on every broker of their batch's replica set (synced to disk,
    /// as ACK 2 waits for); waits at the first that is not yet.
    #[arg(long)]
    pub durable_only: bool,
    /// `shm` (on the pool host: read the pool), `tcp` (from any host: read the total
    /// order from a broker, resuming on another when the connection drops) or `verbs` (the
    /// same from a host with an RDMA device: a broker RDMA-writes the log into this
    /// subscriber's ring; brokers started with --verbs; a build with --features verbs).
    #[arg(long, default_value = "shm", value_parser = ["shm", "tcp", "verbs"])]
    pub transport: String,
    #[command(flatten)]
    pub rdma: RdmaArgs,
    /// Check the order of every message delivered: total orders contiguous from the first,
    /// each batch's messages together, and (ORDER 4, 5) each publisher's batches in its
    /// order. The first violation is printed to stderr, after the messages up to and
    /// including the offending one, and exits 65; at the end a summary goes to stderr.
    #[arg(long)]
    pub check_order: bool,
}

/// The checker of `--check-order` for a topic of ORDER `order`.
fn order_checker(topic: &str, order: u8) -> CliResult<OrderChecker> {
    if order == 1 {
        return Err(CliError::usage(format!(
            "--check-order: topic {topic:?} is ORDER 1, which numbers messages per broker, \
             not in one total order (ORDER 0, 2, 4 and 5 can be checked)"
        )));
    }
    Ok(OrderChecker::from_first(matches!(order, 4 | 5)))
}

pub fn subscribe(a: &SubscribeArgs) -> CliResult<()> {
    let start = match a.from.as_str() {
        "oldest" => StartAt::Oldest,
        "latest" => StartAt::Latest,
        n => StartAt::TotalOrder(n.parse().map_err(|_| {
            CliError::usage(format!("--from {n:?}: expected oldest, latest or a number"))
        })?),
    };
    let transport = match a.transport.as_str() {
        "tcp" => Transport::Tcp,
        "verbs" => a.rdma.transport()?,
        _ => Transport::Shm,
    };
    let client = connect(a.control, Client::builder().transport(transport))?;
    let mut checker = match a.check_order {
        true => Some(order_checker(&a.topic, client.topic(&a.topic)?.spec.order)?),
        false => None,
    };
    let mut sub = client.subscriber(&a.topic, start)?;
    sub.set_durable_only(a.durable_only);
    if let Some(ms) = a.pause_ms {
        eprintln!(
            "subscriber registered at delivery index {}; pausing {ms} ms",
            sub.position()
        );
        std::thread::sleep(Duration::from_millis(ms));
    }
    let stop = embar_sys::signal::stop_on_term();
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let mut printed = 0u64;
    let limit = a.count.unwrap_or(u64::MAX);
    let mut last = Instant::now();
    let mut err = None;
    let mut violation = None;
    while printed < limit && violation.is_none() && !stop.load(std::sync::atomic::Ordering::Relaxed)
    {
        let n = sub.poll(1, |m| {
            if printed >= limit || err.is_some() || violation.is_some() {
                return;
            }
            if let Some(c) = checker.as_mut() {
                violation = check_message(c, m).err();
            }
            let r = match a.format {
                Format::Text => out.write_all(m.payload).and_then(|()| out.write_all(b"\n")),
                Format::Jsonl => writeln!(
                    out,
                    "{}",
                    serde_json::json!({
                        "total_order": m.total_order,
                        "client_id": m.client_id,
                        "batch_seq": m.batch_seq,
                        "index": m.index,
                        "size": m.payload.len(),
                        "payload": String::from_utf8_lossy(m.payload),
                    })
                ),
            };
            if let Err(e) = r {
                err = Some(e);
            }
            printed += 1;
        })?;
        if let Some(e) = err.take() {
            return Err(format!("cannot write to stdout: {e}").into());
        }
        if n > 0 {
            last = Instant::now();
            continue;
        }
        let _ = out.flush();
        if a.idle_timeout_s
            .is_some_and(|t| last.elapsed() > Duration::from_secs(t))
        {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    out.flush()
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    if let Some(v) = violation {
        return Err(v);
    }
    if let Some(c) = checker {
        eprintln!("{}", passed(&c, sub.messages_from_disk()));
    }
    Ok(())
}

/// Feeds one delivered message to the `--check-order` checker; a broken rule is a data error.
fn check_message(c: &mut OrderChecker, m: &MessageRef<'_>) -> CliResult<()> {
    c.push(&Delivered::from(m))
        .map_err(|v| CliError::data(format!("order check failed: {v}")))
}

/// The summary line of a check that found nothing wrong. The reading may end inside a batch
/// (`--count`, a signal, `--idle-timeout-s`), so the last batch's completeness is no rule here.
fn passed(c: &OrderChecker, from_disk: u64) -> String {
    let disk = match from_disk {
        0 => String::new(),
        n => format!(" ({n} read from the disk logs)"),
    };
    format!(
        "order check passed: {} messages, {} publishers{disk}",
        c.delivered(),
        c.publishers()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitKind;

    fn message(
        total_order: u64,
        client_id: u64,
        batch_seq: u64,
        index: u32,
    ) -> MessageRef<'static> {
        MessageRef {
            total_order,
            client_id,
            batch_seq,
            index,
            num_msg: 2,
            payload: b"m",
        }
    }

    #[test]
    fn a_broken_order_is_a_data_error_naming_the_rule() {
        let mut c = order_checker("t", 5).unwrap();
        check_message(&mut c, &message(7, 1, 3, 0)).unwrap();
        check_message(&mut c, &message(8, 1, 3, 1)).unwrap();
        let e = check_message(&mut c, &message(10, 2, 0, 0)).unwrap_err();
        assert_eq!(e.kind.code(), 65);
        assert!(
            e.message
                .starts_with("order check failed: message 2: total order 10, expected 9"),
            "{e}"
        );
        let mut c = order_checker("t", 4).unwrap();
        check_message(&mut c, &message(7, 1, 3, 0)).unwrap();
        check_message(&mut c, &message(8, 1, 3, 1)).unwrap();
        let e = check_message(&mut c, &message(9, 1, 5, 0)).unwrap_err();
        assert!(e.message.contains("per-client FIFO"), "{e}");
        // ORDER 2 has no per-client rule.
        let mut c = order_checker("t", 2).unwrap();
        for m in [
            message(0, 1, 3, 0),
            message(1, 1, 3, 1),
            message(2, 2, 9, 0),
        ] {
            check_message(&mut c, &m).unwrap();
        }
        assert_eq!(
            passed(&c, 0),
            "order check passed: 3 messages, 2 publishers"
        );
    }

    #[test]
    fn order_1_has_no_total_order_to_check() {
        let e = order_checker("t", 1).unwrap_err();
        assert_eq!(e.kind, ExitKind::Usage);
        assert!(e.message.contains("ORDER 1"), "{e}");
    }
}
