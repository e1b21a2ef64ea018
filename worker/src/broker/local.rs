//! In-process broker for single-machine runs: NATS subject semantics over in-memory
//! queues, every one of them bounded (see docs/adr/0008-bounded-local-bus.md).
//!
//! Core subscriptions are at-most-once, as on NATS: a subscriber that does not keep up
//! buffers up to [`SUBSCRIPTION_CAPACITY`] messages, then loses the oldest (counted and
//! logged), so a stuck reader cannot grow memory without bound.
//!
//! Durable subjects (those of `nexo_api::subject::DURABLE_STREAMS`) behave like a
//! JetStream work-queue stream, in memory: each durable consumer name has a queue
//! that lives in the broker, not in the consumer, so work waits while no consumer is
//! attached (at start, during a restart after a catalog change) and what a stopped
//! consumer nacked goes to the next one. Work published before any consumer of its
//! subject exists is kept, up to [`MAX_UNCLAIMED`] messages, for the first consumer
//! that attaches; a consumer's queue holds up to [`MAX_READY`]. Beyond either, a
//! publish is refused ([`BrokerError::Backlog`]), never dropped: the outbox keeps the
//! message and sends it again once there is room.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use nexo_api::subject;
use prometheus::IntCounter;
use tokio::sync::Notify;

use super::{
    Acker, Broker, BrokerError, ConsumeOptions, Delivery, Message, Pending, SendError, SendReport,
    Subscription, Transport, WorkSource, new_inbox,
};

/// Durable messages kept for consumers that have not attached yet, at most; beyond
/// that a publish on a durable subject nobody consumes is refused (the outbox keeps it
/// and sends it again) instead of growing memory without bound.
pub const MAX_UNCLAIMED: usize = 65_536;
/// Durable messages waiting in one consumer's queue, at most (work nacked back is
/// always taken: it was accepted already, and there is at most one per running
/// handler). Beyond it a publish is refused like one beyond [`MAX_UNCLAIMED`]: the
/// consumer is slower than its publishers, and the outbox in front of the bus holds the
/// rest.
pub const MAX_READY: usize = 65_536;
/// Messages one core subscription buffers for a subscriber that does not keep up, at
/// most; beyond it the oldest is dropped. async-nats's default subscription capacity,
/// so a slow consumer loses messages at the same depth on either bus.
pub const SUBSCRIPTION_CAPACITY: usize = 65_536;

/// The bounds of one bus (the constants above; smaller in tests).
#[derive(Debug, Clone, Copy)]
struct Limits {
    unclaimed: usize,
    ready: usize,
    subscription: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            unclaimed: MAX_UNCLAIMED,
            ready: MAX_READY,
            subscription: SUBSCRIPTION_CAPACITY,
        }
    }
}

#[derive(Default)]
pub struct LocalBroker {
    subscribers: Mutex<Vec<Subscriber>>,
    /// Round-robin cursor for queue groups.
    turn: AtomicUsize,
    durable: Mutex<Durables>,
    limits: Limits,
    /// Messages dropped for subscribers that fell behind (a metric once
    /// [`LocalBroker::count_drops_in`] names one).
    dropped: DropCounter,
}

/// A counter of dropped messages; one of its own until the worker's metric is given.
#[derive(Clone)]
struct DropCounter(IntCounter);

impl Default for DropCounter {
    fn default() -> Self {
        Self(
            IntCounter::new("nexo_local_bus_dropped_total", "unregistered")
                .expect("a valid metric name"),
        )
    }
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
    /// Deliveries waiting, ready or delayed.
    fn waiting(&self) -> usize {
        let work = self.work.lock().unwrap();
        work.ready.len() + work.delayed.len()
    }

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
    mailbox: Arc<Mailbox>,
}

impl Subscriber {
    /// The subscription was dropped: only the broker still holds the mailbox.
    fn is_gone(&self) -> bool {
        Arc::strong_count(&self.mailbox) == 1
    }
}

/// The buffer of one core subscription: at most `capacity` messages, dropping the
/// oldest beyond that.
struct Mailbox {
    pattern: String,
    capacity: usize,
    /// The bus's count of dropped messages.
    dropped: IntCounter,
    state: Mutex<MailboxState>,
    available: Notify,
    /// Set when the broker is dropped: the subscription ends once it is empty.
    closed: AtomicBool,
}

#[derive(Default)]
struct MailboxState {
    messages: VecDeque<Message>,
    dropped: u64,
}

impl Mailbox {
    fn new(pattern: &str, capacity: usize, dropped: IntCounter) -> Self {
        Self {
            pattern: pattern.to_owned(),
            capacity,
            dropped,
            state: Mutex::default(),
            available: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    fn push(&self, message: Message) {
        let dropped = {
            let mut state = self.state.lock().unwrap();
            let dropped = if state.messages.len() >= self.capacity {
                state.messages.pop_front();
                state.dropped += 1;
                Some(state.dropped)
            } else {
                None
            };
            state.messages.push_back(message);
            dropped
        };
        // Logged at 1, 2, 4, 8, … drops: a stuck subscriber is seen at once without a
        // line per message.
        if dropped.is_some() {
            self.dropped.inc();
        }
        if let Some(total) = dropped.filter(|n| n.is_power_of_two()) {
            tracing::warn!(pattern = %self.pattern, dropped = total, capacity = self.capacity, "slow subscriber: the oldest buffered messages were dropped");
        }
        self.available.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.available.notify_one();
    }

    /// The next message and the mailbox, as `futures::stream::unfold` wants them.
    async fn next(self: Arc<Self>) -> Option<(Message, Arc<Self>)> {
        let message = self.recv().await?;
        Some((message, self))
    }

    /// The next message; `None` once the broker is gone and nothing is left.
    async fn recv(&self) -> Option<Message> {
        loop {
            let available = self.available.notified();
            tokio::pin!(available);
            // Registered before looking, so a push right after the look wakes us.
            available.as_mut().enable();
            let next = self.state.lock().unwrap().messages.pop_front();
            if next.is_some() {
                return next;
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            available.await;
        }
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        for subscriber in self.subscribers.get_mut().unwrap().iter() {
            subscriber.mailbox.close();
        }
    }
}

impl LocalBroker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts the messages dropped for slow subscribers in `counter` (the worker's
    /// `nexo_local_bus_dropped_total`).
    pub fn count_drops_in(mut self, counter: IntCounter) -> Self {
        self.dropped = DropCounter(counter);
        self
    }

    #[cfg(test)]
    fn with_limits(limits: Limits) -> Self {
        let mut broker = Self::default();
        broker.limits = limits;
        broker
    }

    fn add(&self, pattern: &str, group: Option<&str>) -> Result<Subscription, BrokerError> {
        subject::check_pattern(pattern)?;
        let mailbox = Arc::new(Mailbox::new(
            pattern,
            self.limits.subscription,
            self.dropped.0.clone(),
        ));
        self.subscribers.lock().unwrap().push(Subscriber {
            pattern: pattern.to_owned(),
            group: group.map(str::to_owned),
            mailbox: mailbox.clone(),
        });
        Ok(Subscription::new(futures::stream::unfold(
            mailbox,
            Mailbox::next,
        )))
    }

    /// Puts a message of a durable subject into the queue of the consumer whose
    /// filter matches it, or keeps it until one attaches.
    fn enqueue_durable(&self, message: &Message) -> Result<(), BrokerError> {
        let mut durables = self.durable.lock().unwrap();
        // A work-queue stream allows one consumer per subject.
        let backlog = |limit| BrokerError::Backlog {
            subject: message.subject.clone(),
            limit,
        };
        if let Some(queue) = durables
            .queues
            .values()
            .find(|q| subject::matches(&q.filter, &message.subject))
        {
            if queue.waiting() >= self.limits.ready {
                return Err(backlog(self.limits.ready));
            }
            queue.push(message.clone(), 1);
            return Ok(());
        }
        if durables.unclaimed.len() >= self.limits.unclaimed {
            return Err(backlog(self.limits.unclaimed));
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
        subscribers.retain(|s| !s.is_gone());
        let mut delivered = 0;
        let mut groups: Vec<(&str, Vec<&Subscriber>)> = Vec::new();
        for sub in subscribers
            .iter()
            .filter(|s| subject::matches(&s.pattern, &message.subject))
        {
            match &sub.group {
                None => {
                    sub.mailbox.push(message.clone());
                    delivered += 1;
                }
                Some(group) => match groups.iter_mut().find(|(g, _)| g == group) {
                    Some((_, members)) => members.push(sub),
                    None => groups.push((group, vec![sub])),
                },
            }
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        for (_, members) in groups {
            members[turn % members.len()].mailbox.push(message.clone());
            delivered += 1;
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

/// The outbox drains straight onto the bus, in order. Durable work the bus has no
/// room for ([`BrokerError::Backlog`]) is unavailable, not rejected: it stays in the
/// outbox without counting an attempt, and later messages on its subject wait behind it.
#[async_trait]
impl Transport for LocalBroker {
    async fn send(&self, batch: &[Pending]) -> SendReport {
        let mut report = SendReport::default();
        let mut held: Vec<&str> = Vec::new();
        for (index, item) in batch.iter().enumerate() {
            if held.contains(&item.subject.as_str()) {
                continue;
            }
            let payload = Bytes::copy_from_slice(&item.payload);
            let error = match self
                .publish_with_reply(&item.subject, item.reply.as_deref(), payload)
                .await
            {
                Ok(()) => {
                    report.sent.push(index);
                    continue;
                }
                Err(err @ BrokerError::Backlog { .. }) => SendError::Unavailable(err.to_string()),
                Err(err) => SendError::Rejected(err.to_string()),
            };
            held.push(&item.subject);
            report.failed.push((index, error));
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn pending(seq: i64, subject: &str, payload: &str) -> Pending {
        Pending {
            seq,
            subject: subject.to_owned(),
            reply: None,
            payload: payload.as_bytes().to_vec(),
            msg_id: seq.to_string(),
            attempts: 0,
        }
    }

    /// A subscriber that does not read keeps the newest `subscription` messages and
    /// loses the older ones, counted; memory does not grow with what is published.
    #[tokio::test]
    async fn a_slow_subscriber_keeps_the_newest_messages_within_its_capacity() {
        let broker = LocalBroker::with_limits(Limits {
            subscription: 3,
            ..Limits::default()
        });
        let mut slow = broker.subscribe("bus.slow").await.unwrap();
        for i in 0..5 {
            broker
                .publish("bus.slow", Bytes::from(i.to_string()))
                .await
                .unwrap();
        }
        let mailbox = broker.subscribers.lock().unwrap()[0].mailbox.clone();
        assert_eq!(broker.dropped.0.get(), 2);
        {
            let state = mailbox.state.lock().unwrap();
            assert_eq!((state.messages.len(), state.dropped), (3, 2));
        }
        for expected in ["2", "3", "4"] {
            let message = tokio::time::timeout(WAIT, slow.next())
                .await
                .expect("a buffered message")
                .expect("subscription open");
            assert_eq!(message.payload, expected);
        }
    }

    /// Durable work beyond a consumer's queue is refused, not dropped: the outbox's
    /// transport reports it unavailable (no attempt counted) and holds its subject back,
    /// and it goes through once the consumer took some.
    #[tokio::test]
    async fn durable_work_beyond_the_ready_limit_waits_in_the_outbox() {
        let broker = LocalBroker::with_limits(Limits {
            ready: 2,
            ..Limits::default()
        });
        let subject = "agent.route.local.full";
        let mut work = broker
            .consume(subject, "local_full", ConsumeOptions::default())
            .await
            .unwrap();
        let batch = [
            pending(1, subject, "a"),
            pending(2, subject, "b"),
            pending(3, subject, "c"),
            pending(4, subject, "d"),
            pending(5, "bus.other", "core"),
        ];
        let report = broker.send(&batch).await;
        assert_eq!(report.sent, [0, 1, 4]);
        assert!(
            matches!(report.failed.as_slice(), [(2, SendError::Unavailable(_))]),
            "{:?}",
            report.failed
        );
        assert!(matches!(
            broker.publish(subject, Bytes::from("direct")).await,
            Err(BrokerError::Backlog { limit: 2, .. })
        ));

        let first = tokio::time::timeout(WAIT, work.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.message.payload, "a");
        first.acker.ack().await.unwrap();
        let report = broker.send(&batch[2..4]).await;
        assert_eq!(report.sent, [0]);
        assert_eq!(report.failed.len(), 1);
    }

    /// A dropped subscription is forgotten by the bus; the bus going away ends the
    /// subscriptions still open.
    #[tokio::test]
    async fn subscriptions_end_with_the_bus() {
        let broker = LocalBroker::new();
        drop(broker.subscribe("bus.gone").await.unwrap());
        let mut open = broker.subscribe("bus.open").await.unwrap();
        broker.publish("bus.gone", Bytes::new()).await.unwrap();
        assert_eq!(broker.subscribers.lock().unwrap().len(), 1);
        drop(broker);
        let end = tokio::time::timeout(WAIT, open.next()).await.unwrap();
        assert!(end.is_none());
    }

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
}
