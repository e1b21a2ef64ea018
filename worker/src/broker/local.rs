//! In-process broker for single-machine runs: NATS subject semantics over tokio
//! channels. Subscriptions buffer without bound, as a NATS server does for a
//! consumer that keeps up; agents bound their own mailboxes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nexo_api::subject;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{
    Acker, Broker, BrokerError, ConsumeOptions, Delivery, Message, Subscription, WorkSource,
    new_inbox,
};
use crate::queue::{Pending, SendError, SendReport, Transport};

#[derive(Default)]
pub struct LocalBroker {
    subscribers: Mutex<Vec<Subscriber>>,
    /// Round-robin cursor for queue groups.
    turn: AtomicUsize,
}

struct Subscriber {
    pattern: String,
    group: Option<String>,
    tx: mpsc::UnboundedSender<Message>,
}

impl LocalBroker {
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&self, pattern: &str, group: Option<&str>) -> Result<Subscription, BrokerError> {
        subject::check_pattern(pattern)?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.lock().unwrap().push(Subscriber {
            pattern: pattern.to_owned(),
            group: group.map(str::to_owned),
            tx,
        });
        Ok(Subscription::new(UnboundedReceiverStream::new(rx)))
    }

    /// Delivers to every plain subscriber and one member of each queue group;
    /// returns how many received it.
    fn deliver(&self, message: Message) -> usize {
        let mut subscribers = self.subscribers.lock().unwrap();
        // Dropped subscriptions are pruned here rather than on drop, which keeps
        // `Subscription` independent of the broker type.
        subscribers.retain(|s| !s.tx.is_closed());
        let mut delivered = 0;
        let mut groups: Vec<(&str, Vec<&Subscriber>)> = Vec::new();
        for sub in subscribers
            .iter()
            .filter(|s| subject::matches(&s.pattern, &message.subject))
        {
            match &sub.group {
                None => {
                    if sub.tx.send(message.clone()).is_ok() {
                        delivered += 1;
                    }
                }
                Some(group) => match groups.iter_mut().find(|(g, _)| g == group) {
                    Some((_, members)) => members.push(sub),
                    None => groups.push((group, vec![sub])),
                },
            }
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        for (_, members) in groups {
            let pick = members[turn % members.len()];
            if pick.tx.send(message.clone()).is_ok() {
                delivered += 1;
            }
        }
        delivered
    }
}

#[async_trait]
impl Broker for LocalBroker {
    async fn publish_with_reply(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: Bytes,
    ) -> Result<(), BrokerError> {
        subject::check_publish(subject)?;
        if let Some(reply) = reply {
            subject::check_publish(reply)?;
        }
        self.deliver(Message {
            subject: subject.to_owned(),
            reply: reply.map(str::to_owned),
            payload,
        });
        Ok(())
    }

    async fn subscribe(&self, pattern: &str) -> Result<Subscription, BrokerError> {
        self.add(pattern, None)
    }

    async fn queue_subscribe(
        &self,
        pattern: &str,
        group: &str,
    ) -> Result<Subscription, BrokerError> {
        self.add(pattern, Some(group))
    }

    async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BrokerError> {
        subject::check_publish(subject)?;
        let inbox = new_inbox();
        let mut replies = self.add(&inbox, None)?;
        let delivered = self.deliver(Message {
            subject: subject.to_owned(),
            reply: Some(inbox),
            payload,
        });
        if delivered == 0 {
            return Err(BrokerError::NoResponders(subject.to_owned()));
        }
        match tokio::time::timeout(timeout, replies.next()).await {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(BrokerError::Closed),
            Err(_) => Err(BrokerError::Timeout {
                subject: subject.to_owned(),
                timeout,
            }),
        }
    }

    async fn consume(
        &self,
        filter: &str,
        durable: &str,
        _options: ConsumeOptions,
    ) -> Result<Box<dyn WorkSource>, BrokerError> {
        let subscription = self.add(filter, Some(durable))?;
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        Ok(Box::new(LocalWork {
            subscription,
            retry_tx,
            retry_rx,
        }))
    }

    fn is_connected(&self) -> bool {
        true
    }
}

/// In-process durable consumption: a queue subscription plus redelivery of nacked
/// messages. Not durable across restarts; the outbox is what survives them.
struct LocalWork {
    subscription: Subscription,
    retry_tx: mpsc::UnboundedSender<(Message, u32)>,
    retry_rx: mpsc::UnboundedReceiver<(Message, u32)>,
}

#[async_trait]
impl WorkSource for LocalWork {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        let (message, attempt) = tokio::select! {
            Some(retry) = self.retry_rx.recv() => retry,
            message = self.subscription.next() => (message.ok_or(BrokerError::Closed)?, 1),
        };
        let acker = LocalAcker {
            message: message.clone(),
            attempt,
            retry: self.retry_tx.clone(),
        };
        Ok(Delivery {
            message,
            attempt,
            acker: Box::new(acker),
        })
    }
}

struct LocalAcker {
    message: Message,
    attempt: u32,
    retry: mpsc::UnboundedSender<(Message, u32)>,
}

#[async_trait]
impl Acker for LocalAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<(), BrokerError> {
        let (message, attempt, retry) =
            (self.message.clone(), self.attempt + 1, self.retry.clone());
        tokio::spawn(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            // The consumer may be gone (shutdown); then the message is dropped.
            let _ = retry.send((message, attempt));
        });
        Ok(())
    }

    async fn term(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}

/// The outbox drains straight onto the bus, in order.
#[async_trait]
impl Transport for LocalBroker {
    async fn send(&self, batch: &[Pending]) -> SendReport {
        let mut report = SendReport::default();
        for (index, item) in batch.iter().enumerate() {
            let payload = Bytes::copy_from_slice(&item.payload);
            match self
                .publish_with_reply(&item.subject, item.reply.as_deref(), payload)
                .await
            {
                Ok(()) => report.sent.push(index),
                Err(err) => report
                    .failed
                    .push((index, SendError::Rejected(err.to_string()))),
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        super::super::conformance::run_all(|| async {
            std::sync::Arc::new(LocalBroker::new()) as std::sync::Arc<dyn Broker>
        })
        .await;
    }
}
