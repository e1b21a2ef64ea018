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
use super::selection::{Selection, Shard, select};
use super::source::{CatalogSource, revision};
use crate::metrics::Metrics;
use crate::ownership::Held;
use nexo_api::partition::PartitionMap;
use nexo_api::report::CatalogReport;
use nexo_api::report::{HeldPartition, Ownership};
use std::collections::BTreeSet;
use tokio::sync::watch;

/// How often the catalog files are read (see `source` for why they are polled).
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often, while partitions are being handed off, the loop looks whether their
/// agents are done (drained and snapshotted) so it can release the leases: the new
/// owner waits for that.
const HAND_OFF_CHECK: Duration = Duration::from_millis(50);
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
    /// With leases: the partitioning in force and the partitions this worker owns in
    /// it (it holds their leases, or is acquiring them).
    owned: Option<(PartitionMap, BTreeSet<u32>)>,
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
            owned: None,
        }
    }

    /// Runs this worker's share of `catalog`. What cannot be built is left out (a
    /// version of it that ran before keeps running) and the first such error is
    /// returned; everything else runs either way.
    pub async fn apply(&mut self, catalog: &Catalog) -> Result<(), super::BuildError> {
        let mut selection = select(catalog, &self.pool, self.shard);
        let ownership = self.claim(&mut selection);
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
            ownership,
            ..CatalogReport::default()
        };
        let changes = self.reconciler.apply(&selection, report).await;
        self.hand_off();
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

    /// With leases, narrows `selection` to the agents of partitions this worker holds
    /// the lease of, and asks for the leases of the partitions it owns; returns what
    /// the report says of it. Held partitions it no longer owns lose their agents here
    /// and are released by [`Reloader::hand_off`] once those are done.
    fn claim(&mut self, selection: &mut Selection) -> Option<Ownership> {
        let ownership = self.reconciler.shared().ownership.clone()?;
        let me = self.shard.index();
        let leases = ownership.leases.held();
        let mut wanted = selection.partitions_of(me);
        if let Some(alive) = &leases.alive {
            wanted.extend(adopted(&selection.map, me, alive));
        }
        ownership.leases.want(wanted.clone(), selection.workers);
        let held = &leases.partitions;
        let map = &selection.map;
        selection.agents = selection
            .pool_agents
            .iter()
            .filter(|agent| {
                let partition = map.partition(&agent.key());
                wanted.contains(&partition) && held.contains_key(&partition)
            })
            .cloned()
            .collect();
        let report = Ownership {
            worker: ownership.worker.clone(),
            held: held
                .iter()
                .map(|(&partition, &epoch)| HeldPartition { partition, epoch })
                .collect(),
            acquiring: wanted
                .iter()
                .filter(|p| !held.contains_key(p))
                .copied()
                .collect(),
            releasing: held
                .keys()
                .filter(|p| !wanted.contains(p))
                .copied()
                .collect(),
        };
        self.owned = Some((selection.map.clone(), wanted));
        Some(report)
    }

    /// Releases the leases of held partitions this worker no longer owns whose agents
    /// are done (drained, memory snapshotted). `true` while some are still busy.
    fn hand_off(&mut self) -> bool {
        let Some(ownership) = self.reconciler.shared().ownership.clone() else {
            return false;
        };
        let Some((map, wanted)) = &self.owned else {
            return false;
        };
        let releasing: Vec<u32> = ownership
            .leases
            .held()
            .partitions
            .into_keys()
            .filter(|p| !wanted.contains(p))
            .collect();
        if releasing.is_empty() {
            return false;
        }
        let map = map.clone();
        let busy: BTreeSet<u32> = self
            .reconciler
            .busy_agents()
            .iter()
            .map(|agent| map.partition(agent))
            .collect();
        let mut waiting = false;
        for partition in releasing {
            if busy.contains(&partition) {
                waiting = true;
            } else {
                ownership.leases.release(partition);
            }
        }
        waiting
    }

    /// Polls `source` until `shutdown`, applying every change; returns the reconciler
    /// so the caller can drain what runs.
    pub async fn watch(
        mut self,
        mut source: CatalogSource,
        shutdown: CancellationToken,
    ) -> Reconciler {
        let from = source.describe();
        let mut held = self
            .reconciler
            .shared()
            .ownership
            .as_ref()
            .map(|o| o.leases.watch());
        let mut handing_off = false;
        let mut polled_at = Instant::now();
        loop {
            let wait = if handing_off {
                HAND_OFF_CHECK
            } else {
                POLL_INTERVAL
            };
            // A lease acquired or lost changes which agents run here at once.
            let ownership_changed = tokio::select! {
                () = shutdown.cancelled() => return self.reconciler,
                () = tokio::time::sleep(wait) => false,
                () = changed(&mut held) => true,
            };
            handing_off = self.hand_off();
            let poll_due = polled_at.elapsed() >= POLL_INTERVAL;
            if !ownership_changed && !poll_due {
                continue;
            }
            let polled = if poll_due {
                polled_at = Instant::now();
                source.poll().await
            } else {
                None
            };
            let candidate = match polled {
                Some(Ok(catalog)) => catalog,
                Some(Err(err)) => {
                    // The running catalog (and any retry of its left-out parts) stays.
                    self.count("invalid");
                    tracing::error!(source = %from, error = %err, "catalog change refused; the previous catalog keeps running");
                    continue;
                }
                None => match (&self.retry, &self.running) {
                    (_, Some(running)) if ownership_changed => running.clone(),
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
                && !ownership_changed
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

/// The partitions worker `me` runs for workers that are not alive (a worker that died
/// or lost NATS: its presence key expired): those of each absent worker go to the
/// first live worker after it in ordinal order, so exactly one adopts them, until the
/// absent one is back and they are handed to it again. A worker beyond the pool's size
/// adopts nothing.
fn adopted(map: &PartitionMap, me: u32, alive: &BTreeSet<u32>) -> BTreeSet<u32> {
    let workers = map.workers();
    if me >= workers || !alive.contains(&me) {
        return BTreeSet::new();
    }
    let heir = |absent: u32| {
        (1..workers)
            .map(|k| (absent + k) % workers)
            .find(|o| alive.contains(o))
    };
    (0..map.partitions())
        .filter(|&p| {
            let owner = map.worker(p);
            owner != me && !alive.contains(&owner) && heir(owner) == Some(me)
        })
        .collect()
}

/// Resolves when what `held` holds changes; never without leases (or once their
/// keeper stopped).
async fn changed(held: &mut Option<watch::Receiver<Held>>) {
    if let Some(receiver) = held
        && receiver.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
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
