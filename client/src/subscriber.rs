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

use crate::client::{Client, Transport};
use crate::error::{Error, Result};

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
    fn set_durable_only(&mut self, yes: bool);
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

    fn set_durable_only(&mut self, yes: bool) {
        PoolSubscriber::set_durable_only(self, yes)
    }
}

type DynRead<'p> = Box<dyn Read + 'p>;

self_cell::self_cell!(
    /// The mapped pool and the subscriber that borrows it.
    struct Cell {
        owner: Arc<Pool>,
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

/// Reads one topic in total order, from the pool (on the pool host), starting where it was
/// told: every subscriber of a topic sees the same messages in the same order. It holds a
/// cursor in the pool: brokers keep the log space it has not read, up to their retention
/// limit (past it, reading fails with [`ErrorKind::FellBehind`](crate::ErrorKind)).
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
        if client.config().transport != Transport::Shm {
            return Err(Error::Unsupported(
                "a subscriber reads the pool: it runs on the pool host (transport shm)",
            ));
        }
        // The pool's topic table says whether the topic exists: no control request (a
        // subscriber needs no live broker).
        let cell = Cell::try_new(client.pool()?, |pool| {
            let open = OpenSub { pool, topic, start };
            Pool::with_coherence(pool.coherence_mode(), open).map_err(Error::from)
        })?;
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
    /// subscriber reads.
    pub fn position(&self) -> u64 {
        self.cell.borrow_dependent().position()
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
        Ok(n + read)
    }

    /// The next message if one is ordered already (never blocks).
    pub fn try_next(&mut self) -> Result<Option<Message>> {
        if self.pending.is_empty() {
            let pending = &mut self.pending;
            self.cell
                .with_dependent_mut(|_, r| r.poll(1, &mut |m| pending.push_back(m.into())))?;
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
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            idle.after(0, |rest| {
                std::thread::sleep(rest.min(timeout.saturating_sub(start.elapsed())))
            });
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
