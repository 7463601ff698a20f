//! Acknowledgements as futures (feature `async`): [`AsyncPublisher`] is a [`Publisher`] that
//! tasks share, and every publish or flush gives an [`AckFuture`] that resolves once the
//! message (and every one published before it) is acknowledged. Runtime-agnostic: a pending
//! future is woken by the [notifier thread](crate::notifier) and then reads the
//! acknowledgements itself.

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
/// takes the publisher's lock for its duration (uncontended, a few tens of nanoseconds; use
/// [`publish_all`](AsyncPublisher::publish_all) for many messages at a time).
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

    fn future(&self, count: u64) -> AckFuture {
        AckFuture {
            shared: Arc::clone(&self.shared),
            count,
            deadline: Instant::now() + self.shared.ack_timeout,
        }
    }

    /// Appends one message (see [`Publisher::publish`]); the future resolves once it is
    /// acknowledged.
    pub fn publish(&self, payload: &[u8]) -> Result<AckFuture> {
        let seq = self.lock()?.publish(payload)?;
        Ok(self.future(seq + 1))
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
        Ok(self.future(count))
    }

    /// Seals the open batch now; the future resolves once everything published so far is
    /// acknowledged.
    pub fn flush(&self) -> Result<AckFuture> {
        let mut p = self.lock()?;
        p.flush()?;
        let count = p.published();
        drop(p);
        Ok(self.future(count))
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
/// all acknowledged; fails if a broker rejects a batch of the publisher, or after
/// [`Config::ack_timeout`](crate::Config) ([`ErrorKind::TimedOut`](crate::ErrorKind)).
/// While pending it also sends a batch that has lingered, so awaiting the future of a
/// message in an open batch needs no flush. Dropping it cancels nothing.
#[must_use = "a future does nothing unless awaited; the message is published either way"]
pub struct AckFuture {
    shared: Arc<Shared>,
    count: u64,
    deadline: Instant,
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
        let seen = self.shared.acked.load(Ordering::Relaxed);
        if seen >= self.count {
            return Poll::Ready(Ok(seen));
        }
        match self.look() {
            Ok(n) if n >= self.count => return Poll::Ready(Ok(n)),
            Ok(n) if Instant::now() >= self.deadline => {
                return Poll::Ready(Err(PublishError::Timeout {
                    what: format!(
                        "acknowledgements of {} messages ({n} acknowledged)",
                        self.count
                    ),
                    waited: self.shared.ack_timeout,
                }
                .into()))
            }
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
        wake_after(cx.waker(), self.shared.poll_interval);
        Poll::Pending
    }
}
