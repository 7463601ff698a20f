//! Prometheus metrics of the control process and of the brokers, encoded by
//! `prometheus-client` in the Prometheus text format (version 0.0.4).
//!
//! - [`ControlMetrics`]: the control process's `/metrics` (`embar_control_*`): request
//!   counters kept as requests are answered, gauges read from its state at each scrape.
//! - [`serve_broker`]: a broker's metrics endpoint (`embar_broker_*{slot="N"}`), which shows
//!   the [`BrokerSnapshot`] the broker's data path last published (it publishes every 100 ms;
//!   the data path never waits for a scrape).
//!
//! Counters are registered without their `_total` suffix, which the encoder adds.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use embar_dataplane::broker::BrokerStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::http::{self, Handler, Limits, Request, Response};

/// The content type of every metrics answer.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type U64Gauge = Gauge<u64, AtomicU64>;

/// The control process's state as its gauges show it, read at each scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlGauges {
    pub epoch: u64,
    pub brokers_registered: u64,
    pub brokers_live: u64,
    pub membership_version: u64,
    pub topics: u64,
    pub pool_segments_in_use: u64,
}

/// The control process's metrics.
#[derive(Debug)]
pub struct ControlMetrics {
    registry: Registry,
    requests: Counter,
    request_errors: Counter,
    epoch: U64Gauge,
    brokers_registered: U64Gauge,
    brokers_live: U64Gauge,
    membership_version: U64Gauge,
    topics: U64Gauge,
    pool_segments_in_use: U64Gauge,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlMetrics {
    pub fn new() -> ControlMetrics {
        let mut registry = Registry::with_prefix("embar_control");
        let requests = Counter::default();
        let request_errors = Counter::default();
        registry.register("requests", "API requests served", requests.clone());
        registry.register(
            "request_errors",
            "API requests answered with an error",
            request_errors.clone(),
        );
        let mut gauge = |name: &str, help: &str| {
            let g = U64Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        ControlMetrics {
            epoch: gauge("epoch", "Cluster epoch"),
            brokers_registered: gauge("brokers_registered", "Brokers registered since start"),
            brokers_live: gauge("brokers_live", "Brokers alive"),
            membership_version: gauge("membership_version", "Membership changes"),
            topics: gauge("topics", "Topics"),
            pool_segments_in_use: gauge("pool_segments_in_use", "Pool segments allocated"),
            registry,
            requests,
            request_errors,
        }
    }

    /// Counts one answered request; 4xx and 5xx are errors.
    pub fn answered(&self, status: u16) {
        self.requests.inc();
        if status >= 400 {
            self.request_errors.inc();
        }
    }

    /// The exposition, with the gauges set to `now`.
    pub fn encode(&self, now: &ControlGauges) -> String {
        self.epoch.set(now.epoch);
        self.brokers_registered.set(now.brokers_registered);
        self.brokers_live.set(now.brokers_live);
        self.membership_version.set(now.membership_version);
        self.topics.set(now.topics);
        self.pool_segments_in_use.set(now.pool_segments_in_use);
        encode(&self.registry)
    }
}

fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail, and every metric here encodes.
    if let Err(e) = prometheus_text::encode(&mut out, registry) {
        log::error!("cannot encode metrics: {e}");
    }
    out
}

/// What a broker's metrics endpoint shows: the data path's counters as last published.
#[derive(Clone, Copy, Debug, Default)]
pub struct BrokerSnapshot {
    pub broker: BrokerStats,
    pub sessions_open: usize,
    /// Batches in this broker's rings not yet ordered.
    pub ring_occupancy: u64,
    /// Failed writes, syncs or opens of this broker's disk logs (every topic).
    pub disk_failures: u64,
    pub verbs: VerbsSnapshot,
    pub tcp: TcpSnapshot,
    /// The DPDK frontend's counters (zero without `--dpdk`).
    pub dpdk: embar_dataplane::tcp::frontend::DpdkCounters,
}

/// The TCP frontend's counters (zero without `--tcp`).
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpSnapshot {
    pub sessions_open: u64,
    pub sessions_opened: u64,
    pub sessions_refused: u64,
    /// Sessions dropped for a malformed, truncated or stalled frame or unread acks.
    pub sessions_dropped: u64,
    pub batches_received: u64,
    pub bytes_received: u64,
    pub subscribers_opened: u64,
}

/// The verbs frontend's counters (zero without `--verbs`).
#[derive(Clone, Copy, Debug, Default)]
pub struct VerbsSnapshot {
    pub sessions_open: u64,
    pub sessions_opened: u64,
    pub sessions_closed: u64,
    pub sessions_refused: u64,
    pub batches_forwarded: u64,
    pub resends_copied: u64,
    pub bad_immediates: u64,
    pub grants_registered: u64,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Counter,
    Gauge,
}

/// A metric's value in a snapshot.
type Read = fn(&BrokerSnapshot) -> u64;

/// Every metric a broker shows: name (without the prefix, and for counters without
/// `_total`), help, kind, and where its value is.
const BROKER_METRICS: &[(&str, &str, Kind, Read)] = &[
    (
        "batches_landed",
        "Batches checked and published into a ring",
        Kind::Counter,
        |s| s.broker.batches_landed,
    ),
    ("batches_rejected", "Batches rejected", Kind::Counter, |s| {
        s.broker.batches_rejected
    }),
    (
        "batches_acked",
        "Batches acknowledged",
        Kind::Counter,
        |s| s.broker.batches_acked,
    ),
    (
        "messages_acked",
        "Messages acknowledged",
        Kind::Counter,
        |s| s.broker.messages_acked,
    ),
    (
        "grants_issued",
        "Segments granted to sessions",
        Kind::Counter,
        |s| s.broker.grants_issued,
    ),
    (
        "grant_waits",
        "Times no segment was free for a grant",
        Kind::Counter,
        |s| s.broker.grant_waits,
    ),
    (
        "ring_full_waits",
        "Times the topic ring was full",
        Kind::Counter,
        |s| s.broker.ring_full_waits,
    ),
    (
        "resends_dropped",
        "Resent batches the sequencer had ordered already, decided duplicate without a ring slot",
        Kind::Counter,
        |s| s.broker.resends_dropped,
    ),
    (
        "segments_reclaimed",
        "Segments freed after every reader passed",
        Kind::Counter,
        |s| s.broker.segments_reclaimed,
    ),
    (
        "sessions_ended",
        "Sessions ended because their publisher broke the session protocol",
        Kind::Counter,
        |s| s.broker.sessions_ended,
    ),
    (
        "sessions_open",
        "Open publisher sessions",
        Kind::Gauge,
        |s| s.sessions_open as u64,
    ),
    (
        "ring_occupancy",
        "Batches in this broker's rings not yet ordered",
        Kind::Gauge,
        |s| s.ring_occupancy,
    ),
    (
        "disk_failures",
        "Failed writes, syncs or opens of this broker's disk logs; nothing they cover is acked at ACK 2",
        Kind::Counter,
        |s| s.disk_failures,
    ),
    (
        "verbs_sessions_open",
        "Open verbs sessions",
        Kind::Gauge,
        |s| s.verbs.sessions_open,
    ),
    (
        "verbs_sessions_opened",
        "Verbs sessions opened",
        Kind::Counter,
        |s| s.verbs.sessions_opened,
    ),
    (
        "verbs_sessions_closed",
        "Verbs sessions ended (closed, failed or vanished)",
        Kind::Counter,
        |s| s.verbs.sessions_closed,
    ),
    (
        "verbs_sessions_refused",
        "Verbs connection requests refused",
        Kind::Counter,
        |s| s.verbs.sessions_refused,
    ),
    (
        "verbs_batches_forwarded",
        "Descriptors taken from verbs sessions",
        Kind::Counter,
        |s| s.verbs.batches_forwarded,
    ),
    (
        "verbs_resends_copied",
        "Verbs publishers' resends after a broker died, copied inside the pool instead of written again",
        Kind::Counter,
        |s| s.verbs.resends_copied,
    ),
    (
        "verbs_bad_immediates",
        "WRITE_WITH_IMM naming no expected staging slot",
        Kind::Counter,
        |s| s.verbs.bad_immediates,
    ),
    (
        "verbs_grants_registered",
        "Grants registered for remote writes",
        Kind::Counter,
        |s| s.verbs.grants_registered,
    ),
    (
        "tcp_sessions_open",
        "Open TCP publisher sessions",
        Kind::Gauge,
        |s| s.tcp.sessions_open,
    ),
    (
        "tcp_sessions_opened",
        "TCP publisher sessions opened",
        Kind::Counter,
        |s| s.tcp.sessions_opened,
    ),
    (
        "tcp_sessions_refused",
        "TCP connection requests refused",
        Kind::Counter,
        |s| s.tcp.sessions_refused,
    ),
    (
        "tcp_sessions_dropped",
        "TCP sessions dropped for a malformed, truncated or stalled frame or unread acks",
        Kind::Counter,
        |s| s.tcp.sessions_dropped,
    ),
    (
        "tcp_batches_received",
        "Batches read from TCP publishers into the pool",
        Kind::Counter,
        |s| s.tcp.batches_received,
    ),
    (
        "tcp_bytes_received",
        "Bytes read from TCP publishers into the pool",
        Kind::Counter,
        |s| s.tcp.bytes_received,
    ),
    (
        "tcp_subscribers_opened",
        "Remote subscribers served over TCP",
        Kind::Counter,
        |s| s.tcp.subscribers_opened,
    ),
    (
        "dpdk_sessions_open",
        "Open DPDK publisher sessions",
        Kind::Gauge,
        |s| s.dpdk.sessions_open,
    ),
    (
        "dpdk_sessions_opened",
        "DPDK publisher sessions opened",
        Kind::Counter,
        |s| s.dpdk.sessions_opened,
    ),
    (
        "dpdk_sessions_dropped",
        "DPDK sessions dropped for a protocol violation or a stall mid-batch",
        Kind::Counter,
        |s| s.dpdk.sessions_dropped,
    ),
    (
        "dpdk_frames_received",
        "Frames received on DPDK ports",
        Kind::Counter,
        |s| s.dpdk.frames_received,
    ),
    (
        "dpdk_frames_bad",
        "DPDK frames dropped for a failed checksum or a truncated header",
        Kind::Counter,
        |s| s.dpdk.frames_bad,
    ),
    (
        "dpdk_frames_unknown_session",
        "DPDK frames dropped for naming no open session",
        Kind::Counter,
        |s| s.dpdk.frames_unknown_session,
    ),
    (
        "dpdk_frames_not_taken",
        "DPDK data frames not taken: duplicates, out of order, or no room for their batch",
        Kind::Counter,
        |s| s.dpdk.frames_not_taken,
    ),
    (
        "dpdk_batches_received",
        "Batches received from DPDK publishers into the pool",
        Kind::Counter,
        |s| s.dpdk.batches_received,
    ),
    (
        "dpdk_bytes_copied",
        "Payload bytes copied from DPDK frame buffers into the pool",
        Kind::Counter,
        |s| s.dpdk.bytes_copied,
    ),
];

/// Encodes the latest [`BrokerSnapshot`] at each scrape.
#[derive(Debug)]
struct BrokerCollector {
    latest: Arc<Mutex<BrokerSnapshot>>,
}

impl Collector for BrokerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self
            .latest
            .lock()
            .map(|g| *g)
            .unwrap_or_else(|p| *p.into_inner());
        for &(name, help, kind, read) in BROKER_METRICS {
            let value = read(&snap);
            match kind {
                Kind::Counter => {
                    let c = ConstCounter::new(value);
                    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
                }
                Kind::Gauge => {
                    let g = ConstGauge::new(value);
                    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
                }
            }
        }
        Ok(())
    }
}

/// A broker's `/metrics`: every metric labelled with the broker's pool slot.
struct BrokerEndpoint {
    registry: Registry,
}

impl Handler for BrokerEndpoint {
    fn handle(&self, req: &Request) -> Response {
        if req.path != "/metrics" {
            return Response::error(
                404,
                format!("no such endpoint: {} {}", req.method, req.path),
            );
        }
        if req.method != "GET" {
            return Response::error(405, format!("{} is not allowed on /metrics", req.method));
        }
        Response {
            status: 200,
            content_type: CONTENT_TYPE,
            body: encode(&self.registry),
        }
    }
}

/// Connections a broker's metrics endpoint serves at once.
pub const BROKER_CONNECTIONS_MAX: usize = 16;

/// Serves broker `slot`'s metrics on `listener` from threads of its own, showing what is in
/// `latest` at each scrape. Returns the address it serves on.
pub fn serve_broker(
    listener: TcpListener,
    slot: u32,
    latest: Arc<Mutex<BrokerSnapshot>>,
) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let mut registry = Registry::with_prefix_and_labels(
        "embar_broker",
        [("slot".into(), slot.to_string().into())].into_iter(),
    );
    registry.register_collector(Box::new(BrokerCollector { latest }));
    let limits = Limits {
        connections_max: BROKER_CONNECTIONS_MAX,
        request_deadline: std::time::Duration::from_secs(5),
        ..Limits::default()
    };
    http::spawn(
        "broker-metrics",
        listener,
        limits,
        Arc::new(BrokerEndpoint { registry }),
    )?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn control_metrics_keep_their_names_and_count_errors() {
        let m = ControlMetrics::new();
        m.answered(200);
        m.answered(404);
        m.answered(503);
        let text = m.encode(&ControlGauges {
            epoch: 7,
            brokers_registered: 3,
            brokers_live: 2,
            membership_version: 9,
            topics: 1,
            pool_segments_in_use: 4,
        });
        for line in [
            "embar_control_epoch 7",
            "embar_control_brokers_registered 3",
            "embar_control_brokers_live 2",
            "embar_control_membership_version 9",
            "embar_control_topics 1",
            "embar_control_pool_segments_in_use 4",
            "embar_control_requests_total 3",
            "embar_control_request_errors_total 2",
            "# TYPE embar_control_requests_total counter",
            "# TYPE embar_control_epoch gauge",
            "# HELP embar_control_brokers_live Brokers alive.",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
    }

    fn scrape(addr: SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn a_brokers_endpoint_shows_its_latest_snapshot_labelled_with_its_slot() {
        let latest = Arc::new(Mutex::new(BrokerSnapshot::default()));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = serve_broker(listener, 3, latest.clone()).unwrap();
        {
            let mut g = latest.lock().unwrap();
            g.broker.batches_landed = 11;
            g.broker.grant_waits = 2;
            g.ring_occupancy = 5;
            g.verbs.bad_immediates = 1;
        }
        let text = scrape(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
            "{text}"
        );
        for line in [
            "embar_broker_batches_landed_total{slot=\"3\"} 11",
            "embar_broker_grant_waits_total{slot=\"3\"} 2",
            "embar_broker_batches_rejected_total{slot=\"3\"} 0",
            "embar_broker_ring_occupancy{slot=\"3\"} 5",
            "embar_broker_sessions_open{slot=\"3\"} 0",
            "embar_broker_verbs_bad_immediates_total{slot=\"3\"} 1",
            "# TYPE embar_broker_batches_acked_total counter",
            "# TYPE embar_broker_ring_occupancy gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
        assert!(scrape(addr, "GET /other HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(scrape(addr, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
        assert!(scrape(addr, "garbage\r\n\r\n").starts_with("HTTP/1.1 400 "));
    }
}
