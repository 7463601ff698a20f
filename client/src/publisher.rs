//! [`Publisher`]: appends messages to a topic, in batches striped over the live brokers, and
//! tells which are acknowledged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use embar_dataplane::client::publisher::{Publisher as ShmPublisher, PublisherConfig};
use embar_dataplane::client::{new_client_id, Publish, PublishError};
use embar_dataplane::idle::{Idle, IdlePolicy};
use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::{CoherenceFn, Pool};

use crate::client::{Client, Transport};
use crate::error::{Error, Result};

/// A publisher of either transport, borrowing the pool it writes to (if any).
type DynPublish<'p> = Box<dyn Publish + Send + 'p>;

self_cell::self_cell!(
    /// The mapped pool (shm; `None` for verbs) and the publisher that borrows it.
    struct Cell {
        owner: Option<Arc<Pool>>,
        #[covariant]
        dependent: DynPublish,
    }
);

/// Appends messages to one topic. `publish` does not block (unless the brokers have granted
/// no log space: backpressure, bounded by [`Config::wait_timeout`](crate::Config)); a batch
/// is sealed and sent when full, on [`flush`](Publisher::flush), or once it has lingered
/// [`Config::linger`](crate::Config) and the publisher is called again
/// ([`poll`](Publisher::poll) does that when there is nothing to publish). Batches carry a
/// per-publisher sequence, so the topic keeps this publisher's order (ORDER 4 and 5).
///
/// Acknowledgements count messages in publish order: [`acked`](Publisher::acked) is how
/// many of the first messages are all acknowledged per the topic's ACK level, so waiting for
/// message `n` means waiting for `acked() > n`.
///
/// ```no_run
/// use embar_client::Client;
///
/// let client = Client::discover()?;
/// let mut publisher = client.publisher("orders")?;
/// for i in 0..1000 {
///     publisher.publish(format!("order {i}").as_bytes())?;
/// }
/// let acked = publisher.wait_acks()?; // flushes, then waits for all 1000
/// assert_eq!(acked, 1000);
/// # Ok::<(), embar_client::Error>(())
/// ```
pub struct Publisher {
    cell: Cell,
    topic: String,
    ack_timeout: Duration,
    published: u64,
    #[cfg(feature = "async")]
    pub(crate) poll_interval: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.topic)
            .field("client_id", &self.client_id())
            .field("published", &self.published)
            .finish_non_exhaustive()
    }
}

/// Opens a shm publisher with the pool's coherence implementation.
struct OpenShm<'p, 'a> {
    pool: &'p Pool,
    topic: &'a str,
    brokers: &'a [u32],
    client_id: u64,
    cfg: PublisherConfig,
}

impl<'p> CoherenceFn<Result<DynPublish<'p>, PublishError>> for OpenShm<'p, '_> {
    fn call<C: Coherence>(self, c: C) -> Result<DynPublish<'p>, PublishError> {
        let p = ShmPublisher::open(
            self.pool,
            c,
            self.topic,
            self.brokers,
            self.client_id,
            self.cfg,
        )?;
        Ok(Box::new(p))
    }
}

impl Publisher {
    pub(crate) fn open(client: &Client, topic: &str) -> Result<Publisher> {
        let cfg = client.config();
        // The control process's answer is the one that says a topic does not exist.
        client.topic(topic)?;
        let pc = PublisherConfig {
            linger: cfg.linger,
            wait_timeout: cfg.wait_timeout,
            ..PublisherConfig::default()
        };
        let client_id = new_client_id();
        let cell = match &cfg.transport {
            Transport::Shm => {
                let brokers = client.cluster()?.broker_slots()?;
                Cell::try_new(Some(client.pool()?), |pool| {
                    let pool = pool.as_deref().expect("a shm publisher has a pool");
                    let open = OpenShm {
                        pool,
                        topic,
                        brokers: &brokers,
                        client_id,
                        cfg: pc,
                    };
                    Pool::with_coherence(pool.coherence_mode(), open).map_err(Error::from)
                })?
            }
            Transport::Verbs { device, gid_index } => {
                let p = open_verbs(client, topic, client_id, device, *gid_index, pc)?;
                Cell::new(None, |_| p)
            }
            Transport::Tcp => {
                let brokers = client.tcp_brokers()?;
                let tc = embar_dataplane::tcp::publisher::TcpPublisherConfig {
                    publisher: pc,
                    ..Default::default()
                };
                let p = embar_dataplane::tcp::publisher::TcpPublisher::connect(
                    &brokers, topic, client_id, &tc,
                )?;
                Cell::new(None, |_| Box::new(p) as DynPublish<'static>)
            }
            Transport::Dpdk(opts) => {
                let p = open_dpdk(client, topic, client_id, opts, pc)?;
                Cell::new(None, |_| p)
            }
        };
        Ok(Publisher {
            cell,
            topic: topic.to_string(),
            ack_timeout: cfg.ack_timeout,
            published: 0,
            #[cfg(feature = "async")]
            poll_interval: cfg.poll_interval,
        })
    }

    fn with<R>(&mut self, f: impl FnOnce(&mut dyn Publish) -> R) -> R {
        self.cell.with_dependent_mut(|_, p| f(p.as_mut()))
    }

    fn get<R>(&self, f: impl FnOnce(&dyn Publish) -> R) -> R {
        f(self.cell.borrow_dependent().as_ref())
    }

    /// Appends one message to the open batch; returns its number among this publisher's
    /// messages (0, 1, 2, ...): it is acknowledged once [`acked`](Publisher::acked) is
    /// above that number.
    pub fn publish(&mut self, payload: &[u8]) -> Result<u64> {
        self.with(|p| p.publish(payload))?;
        self.published += 1;
        Ok(self.published - 1)
    }

    /// Whether a message of `payload_len` bytes can be published on this topic (fits a
    /// batch), without publishing anything: for checking a whole input first.
    pub fn check_size(&self, payload_len: usize) -> Result<()> {
        Ok(self.get(|p| p.check_size(payload_len))?)
    }

    /// Seals the open batch and sends it now.
    pub fn flush(&mut self) -> Result<()> {
        Ok(self.with(|p| p.flush())?)
    }

    /// Seals and sends the open batch if it has lingered; call it when there is nothing to
    /// publish, by [`linger_remaining`](Publisher::linger_remaining) at the latest (no thread
    /// of the library's own touches a batch, so `publish` takes no lock).
    pub fn poll(&mut self) -> Result<()> {
        Ok(self.with(|p| p.poll())?)
    }

    /// How long until the open batch has lingered (then [`poll`](Publisher::poll) sends
    /// it); `None` when no batch is open.
    pub fn linger_remaining(&self) -> Option<Duration> {
        let deadline = self.get(|p| p.linger_deadline_ns())?;
        Some(Duration::from_nanos(
            deadline.saturating_sub(embar_sys::clock::monotonic_ns()),
        ))
    }

    /// How many of this publisher's first messages are all acknowledged (never blocks). An
    /// error if a broker rejected a batch of this publisher.
    pub fn acked(&mut self) -> Result<u64> {
        Ok(self.with(|p| p.acked_prefix())?)
    }

    /// Flushes, then waits up to [`Config::ack_timeout`](crate::Config) until every message
    /// published so far is acknowledged; returns how many are.
    pub fn wait_acks(&mut self) -> Result<u64> {
        self.wait_acks_timeout(self.ack_timeout)
    }

    /// [`wait_acks`](Publisher::wait_acks) with its own timeout.
    pub fn wait_acks_timeout(&mut self, timeout: Duration) -> Result<u64> {
        self.flush()?;
        self.wait_acked(self.published, timeout)
    }

    /// Waits up to `timeout` until the first `count` messages are acknowledged, sealing a
    /// lingering batch meanwhile; returns how many are.
    pub fn wait_acked(&mut self, count: u64, timeout: Duration) -> Result<u64> {
        let start = Instant::now();
        let mut idle = Idle::new(IdlePolicy::default());
        loop {
            let acked = self.acked()?;
            if acked >= count {
                return Ok(acked);
            }
            if start.elapsed() > timeout {
                return Err(PublishError::Timeout {
                    what: format!(
                        "acknowledgements of {count} messages ({acked} acknowledged){}",
                        self.disk_trouble()
                    ),
                    waited: start.elapsed(),
                }
                .into());
            }
            self.poll()?;
            idle.after(0, std::thread::sleep);
        }
    }

    /// Why acknowledgements may be held back: the brokers whose disk log of this topic is
    /// failing (ACK 2 waits for every replica's sync), as the pool on this host or the
    /// brokers' acks (TCP, verbs, DPDK) say. Empty when there is nothing to say.
    fn disk_trouble(&self) -> String {
        embar_dataplane::replication::describe_faults(&self.get(|p| p.disk_faults()))
    }

    /// Messages published (handed to `publish`) so far.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// Messages sealed into batches sent to brokers so far.
    pub fn sealed(&self) -> u64 {
        self.get(|p| p.sealed_messages())
    }

    /// The id that the topic's messages from this publisher carry.
    pub fn client_id(&self) -> u64 {
        self.get(|p| p.client_id())
    }

    /// The topic's ACK level (0: nothing is waited for).
    pub fn ack_level(&self) -> u8 {
        self.get(|p| p.ack_level())
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    #[cfg(feature = "async")]
    pub(crate) fn ack_timeout(&self) -> Duration {
        self.ack_timeout
    }
}

#[cfg(feature = "verbs")]
fn open_verbs(
    client: &Client,
    topic: &str,
    client_id: u64,
    device: &Option<String>,
    gid_index: Option<u8>,
    publisher: PublisherConfig,
) -> Result<DynPublish<'static>> {
    use embar_dataplane::verbs::publisher::{VerbsConfig, VerbsPublisher};
    let brokers = client.cluster()?.verbs_brokers()?;
    let vc = VerbsConfig {
        device: device.clone().or_else(|| std::env::var("RDMA_DEVICE").ok()),
        gid_index: gid_index
            .or_else(|| std::env::var("RDMA_GID_INDEX").ok()?.parse().ok())
            .unwrap_or(1),
        publisher,
    };
    Ok(Box::new(VerbsPublisher::connect(
        &brokers, topic, client_id, &vc,
    )?))
}

#[cfg(feature = "dpdk")]
fn open_dpdk(
    client: &Client,
    topic: &str,
    client_id: u64,
    opts: &crate::DpdkOptions,
    publisher: PublisherConfig,
) -> Result<DynPublish<'static>> {
    use embar_dataplane::dpdk::publisher::{DpdkLinkConfig, LinkKind};
    let brokers = client.tcp_brokers()?;
    let mut link = DpdkLinkConfig::memif();
    if let Some(devargs) = &opts.port {
        link.link = LinkKind::Port {
            devargs: devargs.clone(),
        };
    }
    if let Some(args) = &opts.eal_args {
        link.eal_args = args.clone();
    }
    if let Some(n) = opts.frame_bytes {
        link.frame_bytes = n;
    }
    link.drop_every = opts.drop_every;
    link.corrupt_every = opts.corrupt_every;
    let tc = embar_dataplane::tcp::publisher::TcpPublisherConfig {
        publisher,
        ..Default::default()
    };
    Ok(Box::new(
        embar_dataplane::tcp::publisher::TcpPublisher::connect_dpdk(
            &brokers, topic, client_id, &tc, &link,
        )?,
    ))
}

#[cfg(not(feature = "dpdk"))]
fn open_dpdk(
    _: &Client,
    _: &str,
    _: u64,
    _: &crate::DpdkOptions,
    _: PublisherConfig,
) -> Result<DynPublish<'static>> {
    Err(Error::Unsupported(crate::NO_DPDK))
}

#[cfg(not(feature = "verbs"))]
fn open_verbs(
    _: &Client,
    _: &str,
    _: u64,
    _: &Option<String>,
    _: Option<u8>,
    _: PublisherConfig,
) -> Result<DynPublish<'static>> {
    Err(Error::Unsupported(crate::NO_VERBS))
}
