//! The reload loop: every second, ask the source whether the catalog changed; apply a
//! valid change in place (leaving out, and retrying with backoff, what cannot be
//! built), keep running the previous catalog when the change is invalid, and count
//! all three outcomes.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use nexo_api::config::Catalog;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::reconcile::Reconciler;
use super::selection::{Shard, select};
use super::source::{CatalogSource, revision};
use crate::metrics::Metrics;
use nexo_api::report::CatalogReport;

/// How often the catalog files are read (see `source` for why they are polled).
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Waits before a catalog with parts that could not be built is tried again: soon at
/// first (a Secret mounted a moment late), then up to half a minute, so a part that
/// keeps failing costs little.
const RETRY_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(POLL_INTERVAL)
    .with_max_delay(Duration::from_secs(30))
    .with_jitter()
    .without_max_times();

/// The catalog applied last, and how to apply the next one.
pub struct Reloader {
    pub reconciler: Reconciler,
    pub pool: String,
    pub shard: Shard,
    pub metrics: Arc<Metrics>,
    running: Option<Catalog>,
    /// When the running catalog has parts left out: when to try it again.
    retry: Option<Retry>,
}

impl Reloader {
    pub fn new(reconciler: Reconciler, pool: String, shard: Shard, metrics: Arc<Metrics>) -> Self {
        for result in ["applied", "invalid", "failed"] {
            metrics.catalog_reloads.with_label_values(&[result]);
        }
        Self {
            reconciler,
            pool,
            shard,
            metrics,
            running: None,
            retry: None,
        }
    }

    /// Runs this worker's share of `catalog`. What cannot be built is left out (a
    /// version of it that ran before keeps running) and the first such error is
    /// returned; everything else runs either way.
    pub async fn apply(&mut self, catalog: &Catalog) -> Result<(), super::BuildError> {
        let selection = select(catalog, &self.pool, self.shard);
        if self.shard.index() >= selection.workers {
            tracing::warn!(
                shard = self.shard.index(),
                workers = selection.workers,
                "this worker's shard is beyond the pool's size: it runs no agent (it is being scaled away)"
            );
        }
        let revision = revision(catalog);
        let report = CatalogReport {
            revision: revision.clone(),
            pool: self.pool.clone(),
            shard: self.shard.index(),
            shards: selection.workers,
            partitions: selection.partitions,
            agents: Vec::new(),
            ..CatalogReport::default()
        };
        let changes = self.reconciler.apply(&selection, report).await;
        self.metrics.catalog_info.reset();
        self.metrics
            .catalog_info
            .with_label_values(&[&revision])
            .set(1);
        self.running = Some(catalog.clone());
        tracing::info!(
            %revision,
            agents = selection.agents.len(),
            channels = selection.channels.len(),
            started = ?changes.started,
            restarted = ?changes.restarted,
            stopped = ?changes.stopped,
            "catalog applied"
        );
        for failure in &changes.failed {
            tracing::error!(%revision, error = %failure, "left out of the catalog: cannot be built");
        }
        self.retry = if changes.failed.is_empty() {
            None
        } else {
            // The same catalog failing again waits longer; another one starts afresh.
            let mut delays = match self.retry.take() {
                Some(last) if last.catalog == *catalog => last.delays,
                _ => RETRY_BACKOFF.build(),
            };
            let wait = delays.next().unwrap_or(POLL_INTERVAL);
            Some(Retry {
                catalog: catalog.clone(),
                delays,
                wait,
                at: Instant::now() + wait,
            })
        };
        match changes.failed.into_iter().next() {
            None => Ok(()),
            Some(first) => Err(first),
        }
    }

    /// Polls `source` until `shutdown`, applying every change; returns the reconciler
    /// so the caller can drain what runs.
    pub async fn watch(
        mut self,
        mut source: CatalogSource,
        shutdown: CancellationToken,
    ) -> Reconciler {
        let from = source.describe();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return self.reconciler,
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            let candidate = match source.poll().await {
                Some(Ok(catalog)) => catalog,
                Some(Err(err)) => {
                    // The running catalog (and any retry of its left-out parts) stays.
                    self.count("invalid");
                    tracing::error!(source = %from, error = %err, "catalog change refused; the previous catalog keeps running");
                    continue;
                }
                None => match (&self.retry, &self.running) {
                    (Some(due), _) if Instant::now() >= due.at => due.catalog.clone(),
                    (None, Some(running)) if self.reconciler.credentials_rotated() => {
                        tracing::info!("an API key changed; restarting the agents that use it");
                        running.clone()
                    }
                    _ => continue,
                },
            };
            // A catalog with parts left out is tried again (with backoff) even though
            // it is the one running.
            let retrying = self.retry.as_ref().is_some_and(|r| r.catalog == candidate);
            if !retrying
                && self.running.as_ref() == Some(&candidate)
                && !self.reconciler.credentials_rotated()
            {
                continue;
            }
            // A shutdown does not wait for a change being applied: until everything
            // new is built nothing has changed (building is the only wait in it),
            // and what runs is drained as it is.
            let applied = tokio::select! {
                () = shutdown.cancelled() => None,
                applied = self.apply(&candidate) => Some(applied),
            };
            let Some(applied) = applied else {
                return self.reconciler;
            };
            match applied {
                Ok(()) => self.count("applied"),
                Err(err) => {
                    self.count("failed");
                    let wait = self.retry.as_ref().map(|r| r.wait);
                    tracing::error!(source = %from, error = %err, retry_in = ?wait, "catalog applied without what cannot be built (a version of it that ran before keeps running); trying again");
                }
            }
        }
    }

    fn count(&self, result: &str) {
        self.metrics
            .catalog_reloads
            .with_label_values(&[result])
            .inc();
    }
}

/// A valid catalog that could not be built (a Secret not mounted yet, say), tried
/// again with backoff: nothing in the file will change to trigger it.
struct Retry {
    catalog: Catalog,
    /// The waits still to come for this catalog.
    delays: ExponentialBackoff,
    wait: Duration,
    at: Instant,
}
