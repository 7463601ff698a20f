//! Acknowledgements as futures (feature `async`): [`AsyncPublisher`] is a [`Publisher`] that
//! tasks share, and every publish or flush gives an [`AckFuture`] that resolves once the
//! message (and every one published before it) is acknowledged. Runtime-agnostic: a pending
//! future is woken by the [notifier thread](crate::notifier) and then reads the
//! acknowledgements itself.
//!
//! What a message costs: all of a publisher's futures share its one state, so a future is a
//! reference to it and a count, and it reads the clock only once it is found pending (its
//! timeout starts then). `publish` takes the publisher's lock once per message; the bulk
//! paths take it once per call and make one future: [`AsyncPublisher::publish_all`], or the
//! publisher itself ([`AsyncPublisher::lock_publisher`]) with a future asked for afterwards
//! ([`AsyncPublisher::until_acked`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use embar_dataplane::client::PublishError;

use crate::error::{Error, Result};
use crate::notifier::wake_after;
use crate::publisher::Publisher;

struct Shared {
    publisher: Mutex<Publisher>,
    /// The acknowledged prefix last seen (only grows): a future whose message is below it
    /// is done without taking the lock.
    acked: AtomicU64,
    ack_timeout: Duration,
    poll_interval: Duration,
}

/// A [`Publisher`] shared by tasks (and threads): `Clone`, `Send` and `Sync`. Each call
/// takes the publisher's lock for its duration (uncontended, a few tens of nanoseconds; for
/// many messages at a time, [`publish_all`](AsyncPublisher::publish_all), or
/// [`lock_publisher`](AsyncPublisher::lock_publisher) and
/// [`until_acked`](AsyncPublisher::until_acked): no lock, no future and no clock read per
/// message).
///
/// ```no_run
/// # async fn demo() -> embar_client::Result<()> {
/// use embar_client::Client;
///
/// let client = Client::discover()?;
/// let publisher = client.publisher("orders")?.into_async();
/// let first = publisher.publish(b"first")?;
/// let second = publisher.publish(b"second")?;
/// // Acknowledgements come in publish order: the second implies the first.
/// second.await?;
/// first.await?; // ready at once
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct AsyncPublisher {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AsyncPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncPublisher")
            .field("acked", &self.shared.acked.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// This publisher, shared by tasks, with futures for its acknowledgements.
    pub fn into_async(self) -> AsyncPublisher {
        let (ack_timeout, poll_interval) = (self.ack_timeout(), self.poll_interval);
        AsyncPublisher {
            shared: Arc::new(Shared {
                publisher: Mutex::new(self),
                acked: AtomicU64::new(0),
                ack_timeout,
                poll_interval,
            }),
        }
    }
}

impl AsyncPublisher {
    fn lock(&self) -> Result<MutexGuard<'_, Publisher>> {
        self.shared.publisher.lock().map_err(|_| Error::Poisoned)
    }

    /// A future that resolves once the first `count` messages of this publisher are all
    /// acknowledged: for messages published through [`lock_publisher`], whose
    /// [`Publisher::publish`] numbers them (message `n` is acknowledged once `n + 1` are).
    /// Futures are made only when asked for: publishing many messages this way costs no
    /// future per message.
    ///
    /// ```no_run
    /// # async fn demo(publisher: embar_client::AsyncPublisher) -> embar_client::Result<()> {
    /// let last = {
    ///     let mut p = publisher.lock_publisher()?;
    ///     let mut last = 0;
    ///     for i in 0..1000 {
    ///         last = p.publish(format!("order {i}").as_bytes())?;
    ///     }
    ///     last
    /// };
    /// publisher.until_acked(last + 1).await?; // all 1000 (it sends a lingering batch)
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// [`lock_publisher`]: AsyncPublisher::lock_publisher
    pub fn until_acked(&self, count: u64) -> AckFuture {
        AckFuture {
            shared: Arc::clone(&self.shared),
            count,
            deadline: None,
        }
    }

    /// Appends one message (see [`Publisher::publish`]); the future resolves once it is
    /// acknowledged.
    pub fn publish(&self, payload: &[u8]) -> Result<AckFuture> {
        let seq = self.lock()?.publish(payload)?;
        Ok(self.until_acked(seq + 1))
    }

    /// Appends every message of `payloads` under one lock; the future resolves once the
    /// last is acknowledged (and with it all before).
    pub fn publish_all<I>(&self, payloads: I) -> Result<AckFuture>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        let mut p = self.lock()?;
        for m in payloads {
            p.publish(m.as_ref())?;
        }
        let count = p.published();
        drop(p);
        Ok(self.until_acked(count))
    }

    /// Seals the open batch now; the future resolves once everything published so far is
    /// acknowledged.
    pub fn flush(&self) -> Result<AckFuture> {
        let mut p = self.lock()?;
        p.flush()?;
        let count = p.published();
        drop(p);
        Ok(self.until_acked(count))
    }

    /// How many of the first messages are acknowledged (never blocks).
    pub fn acked(&self) -> Result<u64> {
        let n = self.lock()?.acked()?;
        self.shared.acked.fetch_max(n, Ordering::Relaxed);
        Ok(n)
    }

    /// The publisher itself, for the calls this type does not repeat.
    pub fn lock_publisher(&self) -> Result<MutexGuard<'_, Publisher>> {
        self.lock()
    }
}

/// Resolves to the acknowledged count once the first `count` messages of its publisher are
/// all acknowledged; fails if a broker rejects a batch of the publisher, or
/// ([`ErrorKind::TimedOut`](crate::ErrorKind)) when they are not acknowledged within
/// [`Config::ack_timeout`](crate::Config) of the first poll that finds the future pending
/// (a future is made without a look at the clock). While pending it also sends a batch
/// that has lingered, so awaiting the future of a message in an open batch needs no flush.
/// Dropping it cancels nothing.
#[must_use = "a future does nothing unless awaited; the message is published either way"]
pub struct AckFuture {
    shared: Arc<Shared>,
    count: u64,
    /// When waiting fails: set by the first poll that finds the future pending.
    deadline: Option<Instant>,
}

impl std::fmt::Debug for AckFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckFuture")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl AckFuture {
    /// The messages this future waits for (the first `count` of its publisher).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Looks at the acknowledgements if the publisher is free (else its holder is busy with
    /// it, and the next look will do).
    fn look(&self) -> Result<u64> {
        let s = &self.shared;
        match s.publisher.try_lock() {
            Ok(mut p) => {
                p.poll()?;
                let n = p.acked()?;
                Ok(s.acked.fetch_max(n, Ordering::Relaxed).max(n))
            }
            Err(TryLockError::WouldBlock) => Ok(s.acked.load(Ordering::Relaxed)),
            Err(TryLockError::Poisoned(_)) => Err(Error::Poisoned),
        }
    }
}

impl Future for AckFuture {
    type Output = Result<u64>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<u64>> {
        let this = self.get_mut();
        let seen = this.shared.acked.load(Ordering::Relaxed);
        if seen >= this.count {
            return Poll::Ready(Ok(seen));
        }
        let n = match this.look() {
            Ok(n) if n >= this.count => return Poll::Ready(Ok(n)),
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let now = Instant::now();
        let deadline = *this.deadline.get_or_insert(now + this.shared.ack_timeout);
        if now >= deadline {
            return Poll::Ready(Err(PublishError::Timeout {
                what: format!(
                    "acknowledgements of {} messages ({n} acknowledged)",
                    this.count
                ),
                waited: this.shared.ack_timeout,
            }
            .into()));
        }
        wake_after(cx.waker(), this.shared.poll_interval);
        Poll::Pending
    }
}
