//! The drain task: sends the outbox in order through a [`Transport`] and deletes what
//! was sent. While the broker is unreachable nothing is counted as a failure; the
//! outbox grows (up to its limits) and drains on reconnect. It also refreshes the
//! queue's gauges and removes dead letters past their retention.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::retry_delays;
use super::store::{AfterFailure, QueueStore, UsageSnapshot};
use crate::broker::{SendError, Transport};
use crate::metrics::Metrics;

/// Messages read from the outbox and sent per round.
const BATCH: usize = 512;
/// How often the queue's gauges are refreshed and expired dead letters removed.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// How long a send that is under way when the worker closes may still take: enough
/// for a connected broker to confirm, short enough that an unreachable one does not
/// hold the shutdown.
const SEND_GRACE: Duration = Duration::from_secs(1);

/// Drains `store` through `transport` until `cancel`.
pub async fn run_drain(
    store: QueueStore,
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut housekept = Instant::now() - HOUSEKEEPING;
    let mut delays = retry_delays();
    loop {
        if housekept.elapsed() >= HOUSEKEEPING {
            housekeeping(&store, &metrics).await;
            housekept = Instant::now();
        }
        let batch = match store.peek(BATCH).await {
            Ok(batch) => batch,
            Err(err) => {
                tracing::error!(error = %err, "cannot read the outbox");
                if pause(&cancel, &mut delays).await {
                    return;
                }
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = store.wait_enqueued() => continue,
                // Wake up now and then for the housekeeping.
                () = tokio::time::sleep(HOUSEKEEPING) => continue,
            }
        }
        // A send may wait on an unreachable broker: once the worker closes, it gets
        // SEND_GRACE to finish, no more (what was not confirmed stays in the outbox
        // for the next start).
        let closed = async {
            cancel.cancelled().await;
            tokio::time::sleep(SEND_GRACE).await;
        };
        let report = tokio::select! {
            report = transport.send(&batch) => report,
            () = closed => return,
        };
        if !report.sent.is_empty() {
            let seqs = report.sent.iter().map(|&i| batch[i].seq).collect();
            if let Err(err) = store.remove(seqs).await {
                tracing::error!(error = %err, "cannot delete sent messages from the outbox");
            }
            metrics.outbox_published.inc_by(report.sent.len() as u64);
        }
        let mut unavailable = None;
        let mut rejected = false;
        for (index, error) in report.failed {
            let failed = &batch[index];
            match error {
                SendError::Unavailable(reason) => unavailable = Some(reason),
                SendError::Rejected(reason) => {
                    rejected = true;
                    match store.record_failure(failed.seq, reason.clone()).await {
                        Ok(AfterFailure::DeadLettered) => {
                            metrics.dead_lettered.with_label_values(&["publish"]).inc();
                            tracing::warn!(subject = %failed.subject, error = %reason, "message moved to the dead-letter queue");
                        }
                        Ok(AfterFailure::WillRetry) => {
                            tracing::warn!(subject = %failed.subject, error = %reason, attempt = failed.attempts + 1, "publish failed; will retry");
                        }
                        Err(err) => tracing::error!(error = %err, "cannot record a failed publish"),
                    }
                }
            }
        }
        if let Some(reason) = &unavailable {
            tracing::debug!(%reason, "broker unavailable; outbox keeps its messages");
        }
        if unavailable.is_some() || rejected {
            // Whatever was sent meanwhile, the head of some subject is stuck: wait
            // longer each round until everything goes through.
            if pause(&cancel, &mut delays).await {
                return;
            }
        } else {
            delays = retry_delays();
        }
    }
}

/// Refreshes the gauges and counters of the outbox and the dead-letter queue from the
/// store's usage, after removing the dead letters past their retention.
async fn housekeeping(store: &QueueStore, metrics: &Metrics) {
    if let Err(err) = store.expire_dead_letters().await {
        tracing::error!(error = %err, "cannot remove expired dead letters");
    }
    let UsageSnapshot {
        outbox_messages,
        outbox_bytes,
        dead_letters,
        refused_total,
        expired_total,
        overflowed_total,
    } = store.usage();
    metrics.outbox_depth.set(outbox_messages as i64);
    metrics.outbox_bytes.set(outbox_bytes as i64);
    metrics.dlq_depth.set(dead_letters as i64);
    // The store counts; the counters catch up with it.
    let catch_up = |counter: &prometheus::IntCounter, total: u64| {
        counter.inc_by(total.saturating_sub(counter.get()));
    };
    catch_up(&metrics.outbox_refused, refused_total);
    catch_up(
        &metrics.dead_letters_removed.with_label_values(&["expired"]),
        expired_total,
    );
    catch_up(
        &metrics
            .dead_letters_removed
            .with_label_values(&["overflow"]),
        overflowed_total,
    );
}

/// Sleeps for the next of `delays`; `true` when cancelled meanwhile.
async fn pause(cancel: &CancellationToken, delays: &mut impl Iterator<Item = Duration>) -> bool {
    let delay = delays.next().unwrap_or(super::RETRY_MAX);
    tokio::select! {
        () = cancel.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}
