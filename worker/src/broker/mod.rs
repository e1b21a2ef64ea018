//! The message bus between channels, agents and other workers.
//!
//! [`Broker`] has NATS core semantics: subjects with `*` / `>` wildcards, queue groups
//! (one member of a group gets each message), request/reply through a private inbox.
//! `local` implements it in process, `nats` on a NATS server; both pass the
//! conformance suite of the integration tests (`worker/tests/support/conformance.rs`).

pub mod local;
pub mod nats;
mod transport;
pub mod work;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use nexo_api::subject::{self, SubjectError};

pub use local::LocalBroker;
pub use nats::NatsBroker;
pub use transport::{Pending, SendError, SendReport, Transport};
pub use work::{Acker, ConsumeOptions, Delivery, WorkSource};

/// A message as it travels on the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub subject: String,
    /// Where a response to this message should be published (request/reply).
    pub reply: Option<String>,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Subject(#[from] SubjectError),
    #[error("no subscriber for `{0}`")]
    NoResponders(String),
    #[error("no reply on `{subject}` within {timeout:?}")]
    Timeout { subject: String, timeout: Duration },
    #[error("broker is closed")]
    Closed,
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// A NATS operation failed. `source` is async-nats's own error: downcast it (to
    /// `async_nats::PublishError`, `async_nats::jetstream::stream::ConsumerError`, …)
    /// for its `kind()`.
    #[error("NATS {operation}: {source}")]
    Nats {
        operation: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The outbox in front of the bus failed (its database, its thread).
    #[error("outbox: {0}")]
    Queue(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The outbox in front of the bus is full: nothing more is accepted until it drains
    /// (the broker is unreachable or slower than the publishers). Try again after
    /// `retry_after`.
    #[error("{source}")]
    Full {
        retry_after: Duration,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("`{0}` is not in a durable stream")]
    NotDurable(String),
    /// `limit` durable messages already wait for the consumer of `subject` (or for
    /// one to attach): the publish is refused, not dropped, and can be sent again.
    #[error("`{subject}`: {limit} messages already wait for a consumer")]
    Backlog { subject: String, limit: usize },
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publishes `payload` on `subject`, optionally naming where replies go.
    async fn publish_with_reply(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: Bytes,
    ) -> Result<(), BrokerError>;

    /// Every message matching `pattern`, until the subscription is dropped.
    async fn subscribe(&self, pattern: &str) -> Result<Subscription, BrokerError>;

    /// Like [`Broker::subscribe`], but each message goes to one member of `group`.
    async fn queue_subscribe(
        &self,
        pattern: &str,
        group: &str,
    ) -> Result<Subscription, BrokerError>;

    /// Sends a request and waits for the first reply, at most `timeout`.
    async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BrokerError>;

    /// Durable consumption of `filter`, a subject inside a durable stream (see
    /// `nexo_api::subject::DURABLE_STREAMS`). Consumers with the same `durable` name
    /// share the work, across processes on NATS.
    async fn consume(
        &self,
        filter: &str,
        durable: &str,
        options: ConsumeOptions,
    ) -> Result<Box<dyn WorkSource>, BrokerError>;

    /// Whether the broker can currently deliver messages (drives `/readyz`).
    fn is_connected(&self) -> bool;

    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BrokerError> {
        self.publish_with_reply(subject, None, payload).await
    }

    /// Publishes `payload` on `subject` once for `msg_id`: a second publish with the
    /// same id is dropped while the first is still known (a row of the outbox not
    /// sent yet; on NATS, JetStream's duplicate window of 120 s, through
    /// `Nats-Msg-Id`). What a platform delivers again (a Telegram update re-polled
    /// after a crash) is then taken once. Without an outbox, a plain publish.
    async fn publish_once(
        &self,
        subject: &str,
        payload: Bytes,
        _msg_id: &str,
    ) -> Result<(), BrokerError> {
        self.publish(subject, payload).await
    }
}

/// A fresh inbox subject for one request.
pub fn new_inbox() -> String {
    format!(
        "{}.{}",
        subject::INBOX_PREFIX,
        uuid::Uuid::new_v4().simple()
    )
}

/// A stream of messages; unsubscribes when dropped.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = Message> + Send>>,
}

impl Subscription {
    pub fn new(stream: impl Stream<Item = Message> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(stream),
        }
    }

    /// The next message, or `None` once the broker closed the subscription.
    pub async fn next(&mut self) -> Option<Message> {
        futures::StreamExt::next(self).await
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.inner.as_mut().poll_next(cx)
    }
}
