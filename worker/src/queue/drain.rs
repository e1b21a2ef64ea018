//! The drain task: sends the outbox in order through a [`Transport`] and deletes what
//! was sent. While the broker is unreachable nothing is counted as a failure; the
//! outbox grows and drains on reconnect.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::store::{AfterFailure, Pending, QueueStore};
use crate::metrics::Metrics;

/// Messages read from the outbox and sent per round.
const BATCH: usize = 512;
/// How often the queue depth gauges are refreshed from the database.
const GAUGE_REFRESH: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The broker cannot be reached; try again later, it is not the message's fault.
    Unavailable(String),
    /// The broker refused this message; it counts as a failed attempt.
    Rejected(String),
}

/// What became of a batch, by index into it. Messages in neither list were held back
/// because an earlier one on their subject failed; they stay in the outbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    pub sent: Vec<usize>,
    pub failed: Vec<(usize, SendError)>,
}

/// Where the drain publishes to.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Publishes `batch`, keeping the order of messages that share a subject: a
    /// message is not sent while an earlier one on its subject has failed.
    async fn send(&self, batch: &[Pending]) -> SendReport;
}

/// Drains `store` through `transport` until `cancel`.
pub async fn run_drain(
    store: QueueStore,
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut refreshed = Instant::now() - GAUGE_REFRESH;
    let mut backoff = Duration::from_millis(50);
    loop {
        if refreshed.elapsed() >= GAUGE_REFRESH {
            if let Ok((outbox, dead)) = store.depths().await {
                metrics.outbox_depth.set(outbox as i64);
                metrics.dlq_depth.set(dead as i64);
            }
            refreshed = Instant::now();
        }
        let batch = match store.peek(BATCH).await {
            Ok(batch) => batch,
            Err(err) => {
                tracing::error!(error = %err, "cannot read the outbox");
                if pause(&cancel, Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = store.wait_enqueued() => continue,
                // Wake up now and then to refresh the gauges.
                () = tokio::time::sleep(GAUGE_REFRESH) => continue,
            }
        }
        let report = transport.send(&batch).await;
        if !report.sent.is_empty() {
            let seqs = report.sent.iter().map(|&i| batch[i].seq).collect();
            if let Err(err) = store.remove(seqs).await {
                tracing::error!(error = %err, "cannot delete sent messages from the outbox");
            }
            metrics.outbox_published.inc_by(report.sent.len() as u64);
            backoff = Duration::from_millis(50);
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
        if let Some(reason) = unavailable {
            tracing::debug!(%reason, waiting = ?backoff, "broker unavailable; outbox keeps its messages");
            if pause(&cancel, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        } else if rejected && pause(&cancel, Duration::from_millis(100)).await {
            return;
        }
    }
}

/// Sleeps for `duration`; `true` when cancelled meanwhile.
async fn pause(cancel: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        () = cancel.cancelled() => true,
        () = tokio::time::sleep(duration) => false,
    }
}
