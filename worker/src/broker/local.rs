//! In-process broker for single-machine runs: NATS subject semantics over tokio
//! channels. Subscriptions buffer without bound, as a NATS server does for a
//! consumer that keeps up; agents bound their own mailboxes.
//!
//! Durable subjects (those of `nexo_api::subject::DURABLE_STREAMS`) behave like a
//! JetStream work-queue stream, in memory: each durable consumer name has a queue
//! that lives in the broker, not in the consumer, so work waits while no consumer is
//! attached (at start, during a restart after a catalog change) and what a stopped
//! consumer nacked goes to the next one. Work published before any consumer of its
//! subject exists is kept, up to [`MAX_UNCLAIMED`] messages, for the first consumer
//! that attaches.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use nexo_api::subject;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{
    Acker, Broker, BrokerError, ConsumeOptions, Delivery, Message, Subscription, WorkSource,
    new_inbox,
};
use crate::queue::{Pending, SendError, SendReport, Transport};

/// Durable messages kept for consumers that have not attached yet, at most; beyond
/// that a publish on a durable subject nobody consumes fails (the outbox retries it and
/// finally dead-letters it) instead of growing memory without bound.
pub const MAX_UNCLAIMED: usize = 65_536;

#[derive(Default)]
pub struct LocalBroker {
    subscribers: Mutex<Vec<Subscriber>>,
    /// Round-robin cursor for queue groups.
    turn: AtomicUsize,
    durable: Mutex<Durables>,
}

/// The in-memory work-queue streams.
#[derive(Default)]
struct Durables {
    /// Work per durable consumer name.
    queues: HashMap<String, Arc<WorkQueue>>,
    /// Durable messages no consumer's filter matched yet, oldest first.
    unclaimed: VecDeque<Message>,
}

/// The work of one durable consumer: waiting deliveries with their attempt number.
struct WorkQueue {
    filter: String,
    work: Mutex<Queued>,
    available: Notify,
}

#[derive(Default)]
struct Queued {
    ready: VecDeque<(Message, u32)>,
    /// Nacked with a delay: delivered again once due. Kept here, not in a timer, so
    /// that shutdown ([`LocalBroker::take_durable`]) and the next consumer see them.
    delayed: Vec<(Instant, Message, u32)>,
}

impl Queued {
    /// Moves the delayed deliveries due at `now` to the back of the ready ones, in
    /// order of their due time.
    fn promote(&mut self, now: Instant) {
        if self.delayed.iter().all(|(due, ..)| *due > now) {
            return;
        }
        self.delayed.sort_by_key(|(due, ..)| *due);
        let later = self.delayed.partition_point(|(due, ..)| *due <= now);
        let rest = self.delayed.split_off(later);
        let due = std::mem::replace(&mut self.delayed, rest);
        self.ready.extend(
            due.into_iter()
                .map(|(_, message, attempt)| (message, attempt)),
        );
    }

    /// Everything waiting, ready first, then delayed by due time.
    fn take(&mut self) -> impl Iterator<Item = Message> + use<> {
        let mut delayed = std::mem::take(&mut self.delayed);
        delayed.sort_by_key(|(due, ..)| *due);
        std::mem::take(&mut self.ready)
            .into_iter()
            .map(|(message, _)| message)
            .chain(delayed.into_iter().map(|(_, message, _)| message))
    }
}

impl WorkQueue {
    fn push(&self, message: Message, attempt: u32) {
        self.work
            .lock()
            .unwrap()
            .ready
            .push_back((message, attempt));
        self.available.notify_one();
    }

    fn push_after(&self, delay: Duration, message: Message, attempt: u32) {
        let due = Instant::now() + delay;
        self.work
            .lock()
            .unwrap()
            .delayed
            .push((due, message, attempt));
        // A waiting consumer looks again and waits until this one is due.
        self.available.notify_one();
    }
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

    /// Puts a message of a durable subject into the queue of the consumer whose
    /// filter matches it, or keeps it until one attaches.
    fn enqueue_durable(&self, message: &Message) -> Result<(), BrokerError> {
        let mut durables = self.durable.lock().unwrap();
        // A work-queue stream allows one consumer per subject.
        if let Some(queue) = durables
            .queues
            .values()
            .find(|q| subject::matches(&q.filter, &message.subject))
        {
            queue.push(message.clone(), 1);
            return Ok(());
        }
        if durables.unclaimed.len() >= MAX_UNCLAIMED {
            return Err(BrokerError::Backlog {
                subject: message.subject.clone(),
                limit: MAX_UNCLAIMED,
            });
        }
        durables.unclaimed.push_back(message.clone());
        Ok(())
    }

    /// The queue of durable consumer `durable`, created with the unclaimed work its
    /// filter matches.
    fn work_queue(&self, filter: &str, durable: &str) -> Arc<WorkQueue> {
        let mut durables = self.durable.lock().unwrap();
        if let Some(queue) = durables.queues.get(durable) {
            return queue.clone();
        }
        let (claimed, rest) = std::mem::take(&mut durables.unclaimed)
            .into_iter()
            .partition::<VecDeque<_>, _>(|m| subject::matches(filter, &m.subject));
        durables.unclaimed = rest;
        let queue = Arc::new(WorkQueue {
            filter: filter.to_owned(),
            work: Mutex::new(Queued {
                ready: claimed.into_iter().map(|m| (m, 1)).collect(),
                delayed: Vec::new(),
            }),
            available: Notify::new(),
        });
        durables.queues.insert(durable.to_owned(), queue.clone());
        queue
    }

    /// Takes every durable message no consumer has taken (waiting in a consumer's
    /// queue, nacked with a delay that has not passed, or waiting for a consumer to
    /// attach), in order per queue. At shutdown the worker stores them in the outbox,
    /// so the next start delivers them.
    pub fn take_durable(&self) -> Vec<Message> {
        let mut durables = self.durable.lock().unwrap();
        let mut taken: Vec<Message> = durables
            .queues
            .values()
            .flat_map(|q| q.work.lock().unwrap().take())
            .collect();
        taken.extend(std::mem::take(&mut durables.unclaimed));
        taken
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
        let message = Message {
            subject: subject.to_owned(),
            reply: reply.map(str::to_owned),
            payload,
        };
        if subject::durable_stream(subject).is_some() {
            self.enqueue_durable(&message)?;
        }
        self.deliver(message);
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
        subject::check_pattern(filter)?;
        if subject::durable_stream(filter).is_none() {
            return Err(BrokerError::NotDurable(filter.to_owned()));
        }
        Ok(Box::new(LocalWork {
            queue: self.work_queue(filter, durable),
        }))
    }

    fn is_connected(&self) -> bool {
        true
    }
}

/// One attachment to a durable consumer's queue. Several may share a queue (a
/// consumer being replaced); each delivery goes to one of them.
struct LocalWork {
    queue: Arc<WorkQueue>,
}

#[async_trait]
impl WorkSource for LocalWork {
    /// Cancel-safe: a delivery is taken from the queue only when it is returned.
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        loop {
            let available = self.queue.available.notified();
            tokio::pin!(available);
            // Registered before looking, so a push right after the look wakes us.
            available.as_mut().enable();
            let (next, wake) = {
                let mut work = self.queue.work.lock().unwrap();
                work.promote(Instant::now());
                let next = work.ready.pop_front();
                (next, work.delayed.iter().map(|(due, ..)| *due).min())
            };
            if let Some((message, attempt)) = next {
                let acker = LocalAcker {
                    message: message.clone(),
                    attempt,
                    queue: self.queue.clone(),
                };
                return Ok(Delivery {
                    message,
                    attempt,
                    acker: Box::new(acker),
                });
            }
            match wake {
                Some(due) => {
                    tokio::select! {
                        () = available => {}
                        () = tokio::time::sleep_until(due) => {}
                    }
                }
                None => available.await,
            }
        }
    }
}

struct LocalAcker {
    message: Message,
    attempt: u32,
    /// Owned by the broker: a nak after the consumer stopped reaches the next one.
    queue: Arc<WorkQueue>,
}

#[async_trait]
impl Acker for LocalAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<(), BrokerError> {
        let (message, attempt, queue) =
            (self.message.clone(), self.attempt + 1, self.queue.clone());
        match delay {
            None => queue.push(message, attempt),
            Some(delay) => queue.push_after(delay, message, attempt),
        }
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

    /// Work nacked with a delay is held by the bus, so a shutdown keeps it.
    #[tokio::test]
    async fn delayed_work_is_taken_at_shutdown() {
        let broker = LocalBroker::new();
        let subject = "agent.route.local.delayed";
        let mut work = broker
            .consume(subject, "local_delayed", ConsumeOptions::default())
            .await
            .unwrap();
        for text in ["retried", "waiting"] {
            broker.publish(subject, Bytes::from(text)).await.unwrap();
        }
        let delivery = work.next().await.unwrap();
        delivery
            .acker
            .nak(Some(Duration::from_secs(3600)))
            .await
            .unwrap();
        let taken: Vec<Bytes> = broker
            .take_durable()
            .into_iter()
            .map(|m| m.payload)
            .collect();
        assert_eq!(taken, ["waiting", "retried"]);
    }

    #[tokio::test]
    async fn conformance() {
        super::super::conformance::run_all(|| async {
            std::sync::Arc::new(LocalBroker::new()) as std::sync::Arc<dyn Broker>
        })
        .await;
    }
}
