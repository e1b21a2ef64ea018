//! Runs a [`Handler`] over durable deliveries: a concurrency cap taken before each
//! fetch, progress signals during long handling, at-most `max_attempts` tries before
//! the dead-letter queue, de-duplication by envelope id, panics turned into retries,
//! the messages of one conversation one after another ([`super::lanes`]),
//! acknowledgement only once what the handler published has left the outbox, and on
//! shutdown a drain deadline after which unfinished work is handed back.

use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::lanes::{self, Lanes, Turn};
use super::retry_delays;
use super::store::QueueStore;
use super::stored::StoredRows;
use crate::broker::{Acker, Delivery, Message, WorkSource};
use crate::metrics::Metrics;

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled.
    Ack,
    /// Not handled: redeliver (`requeue`), or give up on it now and dead-letter it.
    Nack { requeue: bool, reason: String },
    /// Not handled, try again after `after`.
    Retry { after: Duration, reason: String },
    /// Not handled here and not a failure of the message: this worker may not handle
    /// it now (it lost the agent to another worker). Delivered again, after
    /// [`HAND_BACK_DELAY`], to whichever worker asks.
    HandBack { reason: String },
}

/// How long a handed-back message waits before it is delivered again: long enough
/// for the worker that handed it back to notice that it lost the agent and stop
/// asking for its work.
pub const HAND_BACK_DELAY: Duration = Duration::from_secs(1);

#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, message: &Message, attempt: u32) -> Outcome;
}

/// How many envelope ids are remembered for de-duplication.
const SEEN_IDS: usize = 16_384;

pub struct ConsumerLoop {
    /// Name for logs and metrics.
    pub name: String,
    pub concurrency: usize,
    pub max_attempts: u32,
    /// Time running handlers get after `cancel` before they are abandoned and their
    /// messages handed back.
    pub drain: Duration,
    /// How often a running handler tells the broker it is still at work.
    pub progress_every: Duration,
    pub dead_letters: QueueStore,
    pub metrics: Arc<Metrics>,
}

/// The `id` of a JSON envelope, for de-duplication, and its conversation, its lane
/// ([`super::lanes`]); anything else has neither.
#[derive(Deserialize)]
struct EnvelopeId {
    id: Uuid,
    #[serde(default)]
    conversation: Option<String>,
}

struct SeenIds {
    set: HashSet<Uuid>,
    order: VecDeque<Uuid>,
}

impl SeenIds {
    fn insert(&mut self, id: Uuid) {
        if self.set.insert(id) {
            self.order.push_back(id);
            if self.order.len() > SEEN_IDS
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
}

impl ConsumerLoop {
    pub async fn run(
        self,
        mut source: Box<dyn WorkSource>,
        handler: Arc<dyn Handler>,
        cancel: CancellationToken,
    ) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(this.concurrency.max(1)));
        let seen = Arc::new(std::sync::Mutex::new(SeenIds {
            set: HashSet::new(),
            order: VecDeque::new(),
        }));
        let abandon = CancellationToken::new();
        let mut lanes = Lanes::default();
        let mut running = JoinSet::new();
        let mut delays = retry_delays();
        loop {
            // The permit comes first: without one, nothing is fetched.
            let permit = tokio::select! {
                () = cancel.cancelled() => break,
                permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            };
            let delivery = tokio::select! {
                () = cancel.cancelled() => break,
                delivery = source.next() => delivery,
            };
            while running.try_join_next().is_some() {}
            let delivery = match delivery {
                Ok(delivery) => {
                    delays = retry_delays();
                    delivery
                }
                Err(err) => {
                    tracing::warn!(consumer = %this.name, error = %err, "cannot fetch work");
                    let wait = delays.next().unwrap_or(super::RETRY_MAX);
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            let (id, conversation) =
                match serde_json::from_slice::<EnvelopeId>(&delivery.message.payload) {
                    Ok(e) => (Some(e.id), e.conversation),
                    Err(_) => (None, None),
                };
            if let Some(id) = id
                && seen.lock().unwrap().set.contains(&id)
            {
                this.count("duplicate");
                let _ = delivery.acker.ack().await;
                continue;
            }
            let (turn, in_lane) = lanes.enter(conversation, 4 * this.concurrency.max(1));
            let (this, handler, seen, abandon) =
                (this.clone(), handler.clone(), seen.clone(), abandon.clone());
            running.spawn(async move {
                let handled = this
                    .process(delivery, turn, handler.as_ref(), &abandon)
                    .await;
                drop(in_lane);
                // Remember what was handled even if the ack got lost: the redelivery
                // that follows is then recognised as a duplicate.
                if let (true, Some(id)) = (handled, id) {
                    seen.lock().unwrap().insert(id);
                }
                drop(permit);
            });
        }
        while running.try_join_next().is_some() {}
        if !running.is_empty() {
            tracing::info!(consumer = %this.name, running = running.len(), "draining");
        }
        let drained = tokio::time::timeout(this.drain, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(consumer = %this.name, abandoned = running.len(), "drain deadline passed; handing unfinished messages back");
            abandon.cancel();
            while running.join_next().await.is_some() {}
        }
    }

    /// Runs `work` for a delivery, telling the broker now and then that it is still
    /// at work; `None` when the drain deadline abandoned it (the delivery is handed
    /// back).
    async fn at_work<T>(
        &self,
        work: impl Future<Output = T>,
        acker: &dyn Acker,
        progress: &mut tokio::time::Interval,
        abandon: &CancellationToken,
    ) -> Option<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return Some(output),
                _ = progress.tick() => {
                    let _ = acker.in_progress().await;
                }
                () = abandon.cancelled() => {
                    self.count("abandoned");
                    let _ = acker.nak(None).await;
                    return None;
                }
            }
        }
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .consumed
            .with_label_values(&[&self.name, outcome])
            .inc();
    }

    /// Handles one delivery and settles it; `true` when the handler succeeded.
    async fn process(
        &self,
        delivery: Delivery,
        turn: Turn,
        handler: &dyn Handler,
        abandon: &CancellationToken,
    ) -> bool {
        let Delivery {
            message,
            attempt,
            acker,
        } = delivery;
        if attempt > self.max_attempts {
            // Delivered again and again without being settled: its handler keeps
            // crashing or stalling the worker.
            let reason = format!("delivered {attempt} times without being settled");
            self.dead_letter(&message, attempt, &reason).await;
            let _ = acker.term().await;
            return false;
        }
        let mut progress = tokio::time::interval(self.progress_every);
        progress.tick().await;
        // The message before it in its conversation comes first.
        let waited = self.at_work(lanes::wait(turn), &*acker, &mut progress, abandon);
        if waited.await.is_none() {
            return false;
        }
        let handling =
            AssertUnwindSafe(StoredRows::collect(handler.handle(&message, attempt))).catch_unwind();
        let Some(handled) = self
            .at_work(handling, &*acker, &mut progress, abandon)
            .await
        else {
            return false;
        };
        let (outcome, stored) = handled.unwrap_or_else(|_| {
            let panicked = Outcome::Nack {
                requeue: true,
                reason: "handler panicked".to_owned(),
            };
            (panicked, StoredRows::default())
        });
        let settled = match outcome {
            Outcome::Ack => {
                // What the handler published must be on the bus first (see
                // `super::stored`): a kill before that delivers the message again.
                let sent = self.at_work(stored.wait_sent(), &*acker, &mut progress, abandon);
                match sent.await {
                    None => return false,
                    Some(Err(err)) => {
                        tracing::warn!(consumer = %self.name, error = %err, "cannot tell whether the outbox sent what the handler published; handing the message back");
                        let _ = acker.nak(None).await;
                        return false;
                    }
                    Some(Ok(())) => {}
                }
                self.count("ack");
                if let Err(err) = acker.ack().await {
                    tracing::warn!(consumer = %self.name, error = %err, "ack lost; the message will come again and be skipped");
                }
                return true;
            }
            Outcome::HandBack { reason } => {
                self.count("handed_back");
                tracing::info!(consumer = %self.name, subject = %message.subject, error = %reason, "handed back");
                let _ = acker.nak(Some(HAND_BACK_DELAY)).await;
                return false;
            }
            Outcome::Nack {
                requeue: false,
                reason,
            } => (reason, None),
            Outcome::Nack {
                requeue: true,
                reason,
            } => (reason, Some(None)),
            Outcome::Retry { after, reason } => (reason, Some(Some(after))),
        };
        match settled {
            (reason, Some(delay)) if attempt < self.max_attempts => {
                self.count("retry");
                tracing::warn!(consumer = %self.name, subject = %message.subject, attempt, error = %reason, "handling failed; will retry");
                let _ = acker.nak(delay).await;
            }
            (reason, _) => {
                self.dead_letter(&message, attempt, &reason).await;
                let _ = acker.term().await;
            }
        }
        false
    }

    async fn dead_letter(&self, message: &Message, attempt: u32, reason: &str) {
        self.count("dead_letter");
        self.metrics
            .dead_lettered
            .with_label_values(&["consume"])
            .inc();
        tracing::warn!(consumer = %self.name, subject = %message.subject, attempt, error = %reason, "message moved to the dead-letter queue");
        if let Err(err) = self
            .dead_letters
            .dead_letter(
                &message.subject,
                message.reply.as_deref(),
                &message.payload,
                attempt,
                reason,
            )
            .await
        {
            tracing::error!(error = %err, "cannot store a dead letter");
        }
    }
}
