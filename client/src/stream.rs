//! A topic's messages as a [`Stream`] (feature `async`), for any executor.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;

use crate::error::Result;
use crate::notifier::wake_after;
use crate::subscriber::{Message, Subscriber};

/// A [`Subscriber`] as a [`Stream`] of messages in total order. It never ends (a log does
/// not); an error is yielded once and the stream goes on trying. While nothing new is
/// ordered it is woken by the [notifier thread](crate::notifier) to look again, first after
/// [`Config::poll_interval`](crate::Config), backing off to `poll_interval_max`; a message
/// resets the interval.
///
/// ```no_run
/// # async fn demo() -> embar_client::Result<()> {
/// use embar_client::{Client, StartAt};
/// use futures_util::StreamExt;
///
/// let client = Client::discover()?;
/// let mut messages = client.subscriber("orders", StartAt::Oldest)?.into_stream();
/// while let Some(m) = messages.next().await {
///     let m = m?;
///     println!("{}: {:?}", m.total_order, m.payload);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct MessageStream {
    subscriber: Subscriber,
    interval: Duration,
}

impl Subscriber {
    /// This subscriber as a [`Stream`] of messages.
    pub fn into_stream(self) -> MessageStream {
        MessageStream {
            interval: self.poll_interval.0,
            subscriber: self,
        }
    }
}

impl MessageStream {
    /// The subscriber, for its other calls.
    pub fn subscriber(&mut self) -> &mut Subscriber {
        &mut self.subscriber
    }

    pub fn into_inner(self) -> Subscriber {
        self.subscriber
    }
}

impl Stream for MessageStream {
    type Item = Result<Message>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Message>>> {
        let this = self.get_mut();
        let (first, max) = this.subscriber.poll_interval;
        match this.subscriber.try_next() {
            Ok(Some(m)) => {
                this.interval = first;
                Poll::Ready(Some(Ok(m)))
            }
            Err(e) => Poll::Ready(Some(Err(e))),
            Ok(None) => {
                wake_after(cx.waker(), this.interval);
                this.interval = (this.interval * 2).min(max);
                Poll::Pending
            }
        }
    }
}
