//! A [`Broker`] whose publishes go through the outbox.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nexo_api::subject;

use super::store::QueueStore;
use crate::broker::{Broker, BrokerError, ConsumeOptions, Message, Subscription, WorkSource};

/// Publishes are stored durably and sent by the drain task; subscriptions and
/// requests go straight to the broker underneath. Replies to request inboxes skip the
/// outbox: their requester is waiting now or not at all.
pub struct QueuedBroker {
    inner: Arc<dyn Broker>,
    store: QueueStore,
}

impl QueuedBroker {
    pub fn new(inner: Arc<dyn Broker>, store: QueueStore) -> Self {
        Self { inner, store }
    }
}

#[async_trait]
impl Broker for QueuedBroker {
    async fn publish_with_reply(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: Bytes,
    ) -> Result<(), BrokerError> {
        subject::check_publish(subject)?;
        if subject.starts_with(subject::INBOX_PREFIX) {
            return self.inner.publish_with_reply(subject, reply, payload).await;
        }
        if let Some(reply) = reply {
            subject::check_publish(reply)?;
        }
        // A full outbox is `BrokerError::Full`: the publisher is told to come back.
        Ok(self.store.enqueue(subject, reply, &payload).await?)
    }

    async fn subscribe(&self, pattern: &str) -> Result<Subscription, BrokerError> {
        self.inner.subscribe(pattern).await
    }

    async fn queue_subscribe(
        &self,
        pattern: &str,
        group: &str,
    ) -> Result<Subscription, BrokerError> {
        self.inner.queue_subscribe(pattern, group).await
    }

    async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BrokerError> {
        self.inner.request(subject, payload, timeout).await
    }

    async fn consume(
        &self,
        filter: &str,
        durable: &str,
        options: ConsumeOptions,
    ) -> Result<Box<dyn WorkSource>, BrokerError> {
        self.inner.consume(filter, durable, options).await
    }

    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }
}
