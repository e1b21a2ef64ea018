//! A [`Broker`] whose publishes go through the outbox.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nexo_api::subject;

use super::store::QueueStore;
use super::stored;
use crate::broker::{Broker, BrokerError, ConsumeOptions, Message, Subscription, WorkSource};

/// Publishes are stored durably and sent by the drain task; subscriptions and
/// requests go straight to the broker underneath. Replies to request inboxes, the
/// deltas of a reply being written (`subject::reply_deltas`) and channels' health
/// (`subject::channel_health`) skip the outbox: their reader is waiting now or not at
/// all, and a lost delta loses nothing (the reply itself goes through the outbox).
///
/// A message being handled by a [`crate::queue::ConsumerLoop`] is acknowledged only
/// once what its handler published here has left the outbox (see [`super::stored`]).
///
/// The outbox's limits apply to new work only (a channel's inbound message): a full
/// outbox refuses it, and the channel tells its client to come back. What follows
/// from work already accepted (the router's hand-off to the agent, a delegation, the
/// reply, events) is always stored: refusing it would lose an answer the model was
/// already paid for, and it is bounded by the turns in flight.
pub struct QueuedBroker {
    inner: Arc<dyn Broker>,
    store: QueueStore,
}

impl QueuedBroker {
    pub fn new(inner: Arc<dyn Broker>, store: QueueStore) -> Self {
        Self { inner, store }
    }
}

/// Request inboxes, a reply's deltas and channels' health go to the bus at once (see
/// [`QueuedBroker`]).
fn skips_outbox(subject: &str) -> bool {
    subject.starts_with(subject::INBOX_PREFIX)
        || subject::is_reply_deltas(subject)
        || subject::is_channel_health(subject)
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
        if skips_outbox(subject) {
            return self.inner.publish_with_reply(subject, reply, payload).await;
        }
        if let Some(reply) = reply {
            subject::check_publish(reply)?;
        }
        let seq = if subject::is_inbound(subject) {
            // A full outbox is `BrokerError::Full`: the channel's client comes back.
            self.store.enqueue(subject, reply, &payload).await?
        } else {
            self.store.keep(subject, reply, &payload).await?
        };
        // The message being handled, if any, is acknowledged once this row is sent.
        stored::note(&self.store, seq);
        Ok(())
    }

    async fn publish_once(
        &self,
        subject: &str,
        payload: Bytes,
        msg_id: &str,
    ) -> Result<(), BrokerError> {
        subject::check_publish(subject)?;
        if skips_outbox(subject) {
            return self.inner.publish_once(subject, payload, msg_id).await;
        }
        let seq = self
            .store
            .enqueue_once(subject, &payload, msg_id, subject::is_inbound(subject))
            .await?;
        stored::note(&self.store, seq);
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::LocalBroker;
    use crate::queue::StoreLimits;
    use nexo_api::ResourceKey;
    use nexo_api::config::DeliverySettings;

    /// A full outbox refuses a channel's new message, but never what follows from a
    /// message already accepted: the agent's reply and its events are kept.
    #[tokio::test]
    async fn a_full_outbox_refuses_new_messages_but_keeps_replies() {
        let dir = std::env::temp_dir().join(format!("nexo-queued-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut limits = StoreLimits::from(&DeliverySettings::default());
        limits.outbox_max_messages = 1;
        let store = QueueStore::open_with_limits(&dir.join("queue.db"), limits).unwrap();
        let broker = QueuedBroker::new(Arc::new(LocalBroker::new()), store.clone());
        let api = ResourceKey::new("default", "api");
        let inbound = subject::inbound("webhook", &api);
        broker
            .publish(&inbound, Bytes::from("first"))
            .await
            .unwrap();
        let refused = broker.publish(&inbound, Bytes::from("second")).await;
        assert!(
            matches!(refused, Err(BrokerError::Full { .. })),
            "{refused:?}"
        );

        let outbound = subject::outbound("webhook", &api);
        broker
            .publish(&outbound, Bytes::from("the reply"))
            .await
            .unwrap();
        let events = subject::agent_events(&ResourceKey::new("default", "a"));
        broker
            .publish(&events, Bytes::from("an event"))
            .await
            .unwrap();
        assert_eq!(store.peek(10).await.unwrap().len(), 3);

        // A reply's deltas go to the bus at once, never to the outbox.
        let deltas = subject::reply_deltas(&uuid::Uuid::now_v7());
        let mut watching = broker.subscribe(&deltas).await.unwrap();
        broker.publish(&deltas, Bytes::from("Hel")).await.unwrap();
        let delta = tokio::time::timeout(Duration::from_secs(5), watching.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(delta.payload, Bytes::from("Hel"));
        assert_eq!(store.peek(10).await.unwrap().len(), 3);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
