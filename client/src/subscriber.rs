//! [`Subscriber`]: reads a topic's messages in total order, from the pool.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use embar_dataplane::client::subscriber::Subscriber as PoolSubscriber;
use embar_dataplane::idle::{Idle, IdlePolicy};
use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::{CoherenceFn, Pool};
use embar_dataplane::PoolResult;

pub use embar_dataplane::client::subscriber::{Message as MessageRef, StartAt};
use embar_dataplane::remote_subscriber::{Dial, RemoteSubscriber, SubscribeError};

use crate::client::{Client, Transport};
use crate::error::{Error, Result};

/// Longest park of a waiting subscriber before it looks again by itself.
const PARK_MAX: Duration = Duration::from_millis(5);

/// One message, owned: what the iterator and the stream yield. ([`Subscriber::poll`] lends
/// [`MessageRef`]s instead, with no copy per message.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Its place in the topic's total order (0, 1, 2, ... over every publisher).
    pub total_order: u64,
    /// The publisher that sent it.
    pub client_id: u64,
    /// Its batch's sequence number among that publisher's batches.
    pub batch_seq: u64,
    /// Its index in that batch.
    pub index: u32,
    /// The messages in that batch.
    pub num_msg: u32,
    pub payload: Vec<u8>,
}

impl From<&MessageRef<'_>> for Message {
    fn from(m: &MessageRef<'_>) -> Message {
        Message {
            total_order: m.total_order,
            client_id: m.client_id,
            batch_seq: m.batch_seq,
            index: m.index,
            num_msg: m.num_msg,
            payload: m.payload.to_vec(),
        }
    }
}

/// What the client needs of a pool subscriber, whatever its coherence implementation.
trait Read: Send {
    fn poll(&mut self, max_batches: usize, f: &mut dyn FnMut(&MessageRef<'_>))
        -> PoolResult<usize>;
    fn position(&self) -> u64;
    /// Messages delivered from the brokers' disk logs.
    fn messages_from_disk(&self) -> u64 {
        0
    }
    fn set_durable_only(&mut self, yes: bool);
    /// A failure of a remote subscription, after `poll` returned what came before it.
    fn take_failure(&mut self) -> Option<Error> {
        None
    }
    /// Waits up to `timeout` for more to read (may return early).
    fn wait(&mut self, timeout: Duration) {
        std::thread::sleep(timeout.min(Duration::from_micros(50)));
    }
}

impl<C: Coherence> Read for PoolSubscriber<'_, C> {
    fn poll(
        &mut self,
        max_batches: usize,
        f: &mut dyn FnMut(&MessageRef<'_>),
    ) -> PoolResult<usize> {
        PoolSubscriber::poll(self, max_batches, f)
    }

    fn position(&self) -> u64 {
        PoolSubscriber::position(self)
    }

    fn messages_from_disk(&self) -> u64 {
        PoolSubscriber::messages_from_disk(self)
    }

    fn set_durable_only(&mut self, yes: bool) {
        PoolSubscriber::set_durable_only(self, yes)
    }

    /// Parked on the topic's doorbell, which the sequencer rings.
    fn wait(&mut self, timeout: Duration) {
        self.wait_ordered(timeout);
    }
}

/// A remote subscriber (over TCP or verbs), read without blocking.
struct RemoteRead<D: Dial> {
    sub: RemoteSubscriber<D>,
    /// A failure kept for the next call (a remote subscription's errors are not PoolErrors).
    failed: Option<SubscribeError>,
}

impl<D: Dial + Send> Read for RemoteRead<D>
where
    D::Link: Send,
{
    fn poll(
        &mut self,
        max_batches: usize,
        f: &mut dyn FnMut(&MessageRef<'_>),
    ) -> PoolResult<usize> {
        // Messages as they arrived (a window at a time), without waiting: about a batch's
        // worth per batch asked for.
        match self.sub.poll(max_batches.saturating_mul(1024).max(1), f) {
            Ok(n) => Ok(n),
            Err(e) => {
                self.failed = Some(e);
                Ok(0)
            }
        }
    }

    fn position(&self) -> u64 {
        match self.sub.position() {
            StartAt::TotalOrder(t) => t,
            StartAt::Oldest | StartAt::Latest => 0,
        }
    }

    fn set_durable_only(&mut self, _yes: bool) {}

    fn take_failure(&mut self) -> Option<Error> {
        self.failed.take().map(Error::from)
    }

    fn wait(&mut self, timeout: Duration) {
        self.sub.wait(timeout);
    }
}

type DynRead<'p> = Box<dyn Read + 'p>;

self_cell::self_cell!(
    /// The mapped pool (`None` for a remote subscriber) and the subscriber that borrows it.
    struct Cell {
        owner: Option<Arc<Pool>>,
        #[covariant]
        dependent: DynRead,
    }
);

struct OpenSub<'p, 'a> {
    pool: &'p Pool,
    topic: &'a str,
    start: StartAt,
}

impl<'p> CoherenceFn<PoolResult<DynRead<'p>>> for OpenSub<'p, '_> {
    fn call<C: Coherence>(self, c: C) -> PoolResult<DynRead<'p>> {
        Ok(Box::new(PoolSubscriber::open(
            self.pool, c, self.topic, self.start,
        )?))
    }
}

/// The cell of a remote subscriber, or its failure to connect (an unknown topic named).
fn remote<D: Dial + Send + 'static>(
    sub: std::result::Result<RemoteSubscriber<D>, SubscribeError>,
    topic: &str,
) -> Result<Cell>
where
    D::Link: Send,
{
    let sub = sub.map_err(|e| match e {
        SubscribeError::Refused {
            class: Some(embar_dataplane::ErrorClass::NotFound),
            ..
        } => Error::UnknownTopic(topic.to_string()),
        e => Error::from(e),
    })?;
    Ok(Cell::new(None, |_| {
        Box::new(RemoteRead { sub, failed: None }) as DynRead<'static>
    }))
}

/// A verbs subscriber of `topic` over the brokers' verbs ports. The device is opened first,
/// so a host without one hears that, whatever the brokers.
#[cfg(feature = "verbs")]
fn open_verbs(
    client: &Client,
    topic: &str,
    start: StartAt,
    device: &Option<String>,
    gid_index: Option<u8>,
) -> Result<Cell> {
    use embar_dataplane::verbs::subscriber::{VerbsDial, VerbsSubscriberConfig};
    let cfg = VerbsSubscriberConfig {
        device: device.clone().or_else(|| std::env::var("RDMA_DEVICE").ok()),
        gid_index: gid_index
            .or_else(|| std::env::var("RDMA_GID_INDEX").ok()?.parse().ok())
            .unwrap_or(1),
        ..Default::default()
    };
    let dial = VerbsDial::new(&cfg)?;
    let brokers: Vec<std::net::SocketAddr> = client
        .cluster()?
        .verbs_brokers()?
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    let wait = client.config().wait_timeout;
    remote(
        RemoteSubscriber::connect_with(dial, &brokers, topic, start, wait),
        topic,
    )
}

#[cfg(not(feature = "verbs"))]
fn open_verbs(_: &Client, _: &str, _: StartAt, _: &Option<String>, _: Option<u8>) -> Result<Cell> {
    Err(Error::Unsupported(crate::NO_VERBS))
}

/// Reads one topic in total order, from the pool (on the pool host), starting where it was
/// told: every subscriber of a topic sees the same messages in the same order. It holds a
/// cursor in the pool: brokers keep the log space it has not read, up to their retention
/// limit. Past it, a topic with replication is read from the brokers' disk logs until the
/// pool holds the position again; a topic without fails with
/// [`ErrorKind::FellBehind`](crate::ErrorKind).
///
/// Three ways to read: [`poll`](Subscriber::poll) lends each message of the next batches to
/// a closure (no copy per message); [`try_next`](Subscriber::try_next) and
/// [`next_timeout`](Subscriber::next_timeout) return owned messages; as an [`Iterator`] it
/// blocks until the next message.
///
/// ```no_run
/// use std::time::Duration;
/// use embar_client::{Client, StartAt};
///
/// let client = Client::discover()?;
/// let mut subscriber = client.subscriber("orders", StartAt::Oldest)?;
/// while let Some(m) = subscriber.next_timeout(Duration::from_secs(1))? {
///     println!("{}: {}", m.total_order, String::from_utf8_lossy(&m.payload));
/// }
/// # Ok::<(), embar_client::Error>(())
/// ```
pub struct Subscriber {
    cell: Cell,
    topic: String,
    /// Messages of a batch read but not yet returned one at a time.
    pending: VecDeque<Message>,
    #[cfg(feature = "async")]
    pub(crate) poll_interval: (Duration, Duration),
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("topic", &self.topic)
            .field("position", &self.position())
            .finish_non_exhaustive()
    }
}

impl Subscriber {
    pub(crate) fn open(client: &Client, topic: &str, start: StartAt) -> Result<Subscriber> {
        let cell = match client.config().transport {
            Transport::Shm => {
                // The pool's topic table says whether the topic exists: no control request
                // (a subscriber needs no live broker).
                Cell::try_new(Some(client.pool()?), |pool| {
                    let pool = pool.as_deref().expect("a pool subscriber has a pool");
                    let open = OpenSub { pool, topic, start };
                    Pool::with_coherence(pool.coherence_mode(), open).map_err(Error::from)
                })?
            }
            Transport::Tcp => {
                let brokers: Vec<std::net::SocketAddr> =
                    client.tcp_brokers()?.into_iter().map(|(_, a)| a).collect();
                let sub = embar_dataplane::tcp::subscriber::TcpSubscriber::connect(
                    &brokers,
                    topic,
                    start,
                    client.config().wait_timeout,
                );
                remote(sub, topic)?
            }
            Transport::Verbs {
                ref device,
                gid_index,
            } => open_verbs(client, topic, start, device, gid_index)?,
            _ => return Err(Error::Unsupported(
                "a subscriber reads the pool (transport shm) or a broker over TCP or verbs (transports tcp, verbs)",
            )),
        };
        Ok(Subscriber {
            cell,
            topic: topic.to_string(),
            pending: VecDeque::new(),
            #[cfg(feature = "async")]
            poll_interval: (
                client.config().poll_interval,
                client.config().poll_interval_max,
            ),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Deliver only messages durable on every broker of their batch's replica set (what
    /// ACK 2 waits for; `docs/durability.md`). On a topic without replication nothing is.
    pub fn set_durable_only(&mut self, yes: bool) {
        self.cell.with_dependent_mut(|_, r| r.set_durable_only(yes));
    }

    /// The delivery index (the number of ordered batches before it) of the next batch this
    /// subscriber reads; for a subscriber over TCP, the total order of the next message
    /// (0 before the first from `Oldest` or `Latest`).
    pub fn position(&self) -> u64 {
        self.cell.borrow_dependent().position()
    }

    /// How many of the messages delivered so far came from the brokers' disk logs: a
    /// subscriber on the pool host reads a position the pool no longer holds (retention) from
    /// them, on a topic with replication (`docs/durability.md`). 0 over TCP (the broker
    /// reads the disks there).
    pub fn messages_from_disk(&self) -> u64 {
        self.cell.borrow_dependent().messages_from_disk()
    }

    /// Lends every message of up to `max_batches` ordered batches to `f`, in total order,
    /// without copying each; returns how many (0: nothing new is ordered yet; never
    /// blocks). A message's payload is valid during the call only.
    pub fn poll(
        &mut self,
        max_batches: usize,
        mut f: impl FnMut(&MessageRef<'_>),
    ) -> Result<usize> {
        let mut n = 0;
        for m in self.pending.drain(..) {
            f(&MessageRef {
                total_order: m.total_order,
                client_id: m.client_id,
                batch_seq: m.batch_seq,
                index: m.index,
                num_msg: m.num_msg,
                payload: &m.payload,
            });
            n += 1;
        }
        let read = self
            .cell
            .with_dependent_mut(|_, r| r.poll(max_batches, &mut f))?;
        if read == 0 && n == 0 {
            if let Some(e) = self.cell.with_dependent_mut(|_, r| r.take_failure()) {
                return Err(e);
            }
        }
        Ok(n + read)
    }

    /// The next message if one is ordered already (never blocks).
    pub fn try_next(&mut self) -> Result<Option<Message>> {
        if self.pending.is_empty() {
            let pending = &mut self.pending;
            self.cell
                .with_dependent_mut(|_, r| r.poll(1, &mut |m| pending.push_back(m.into())))?;
            if self.pending.is_empty() {
                if let Some(e) = self.cell.with_dependent_mut(|_, r| r.take_failure()) {
                    return Err(e);
                }
            }
        }
        Ok(self.pending.pop_front())
    }

    /// The next message, waiting up to `timeout` for one to be ordered (`None`: none was).
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Message>> {
        // A message already here costs no clock read and no idle state.
        if let Some(m) = self.try_next()? {
            return Ok(Some(m));
        }
        let start = Instant::now();
        let mut idle = Idle::new(IdlePolicy::default());
        loop {
            if let Some(m) = self.try_next()? {
                return Ok(Some(m));
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            // Spin, then yield, then park (on the pool's doorbell, rung when the sequencer
            // orders more; bounded, so a durable-only wait or a lost wake-up costs one park).
            if idle.step(0).is_some() {
                let cell = &mut self.cell;
                cell.with_dependent_mut(|_, r| r.wait(left.min(PARK_MAX)));
            }
        }
    }
}

/// Blocks until the next message is ordered (a log does not end); an error is yielded once,
/// and the next call tries again.
impl Iterator for Subscriber {
    type Item = Result<Message>;

    fn next(&mut self) -> Option<Result<Message>> {
        loop {
            match self.next_timeout(Duration::from_secs(3600)) {
                Ok(Some(m)) => return Some(Ok(m)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
