//! Durable publishing: every publish lands in an SQLite outbox first, a drain task
//! sends it in order and deletes it once the broker has it; messages that keep
//! failing end in a dead-letter queue that can be listed, replayed and purged.
//!
//! The queue depends on the broker (it sends through [`crate::broker::Transport`] and
//! consumes [`crate::broker::WorkSource`]s), never the other way round.

mod consumer;
mod drain;
mod lanes;
mod queued;
mod store;
mod stored;

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

pub use consumer::{ConsumerLoop, Handler, Outcome};
pub use drain::run_drain;
pub use queued::QueuedBroker;
pub use store::{
    AfterFailure, DeadLetter, OUTBOX_FULL_RETRY_AFTER, QueueError, QueueStore, StoreLimits,
    UsageSnapshot,
};

/// First wait after a failure: short, so a blip costs little latency.
const RETRY_MIN: Duration = Duration::from_millis(50);
/// Longest wait between tries: how late a recovered broker or database is noticed.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The waits between tries of the queue's loops (the drain while the broker is
/// unreachable or its database fails, the consumer while fetching fails): exponential
/// with jitter, so workers that lost the same broker do not retry in step, and never
/// ending. Start a fresh one after a success.
fn retry_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}
