//! Partition leases in a JetStream key-value bucket. A worker runs the agents of a
//! partition only while it holds the partition's lease: the key `<pool>.<partition>`,
//! created if absent (compare-and-set on "no value"), renewed by its holder with an
//! update on the revision it last wrote, deleted on that revision when handed off. The
//! bucket's `max_age` is the lease's time to live: a holder that stops renewing (it
//! died, or lost NATS) loses the key when that passes, and another worker creates it.
//!
//! The revision at creation is the lease's epoch. A holder that cannot renew gives the
//! lease up on its own before the server would expire it ([`GIVE_UP_AFTER`]), so two
//! workers never both believe they hold one; the memory journal's conditional appends
//! fence whatever a slow holder still tries to commit (see `memory::durable`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::{self};
use bytes::Bytes;
use nexo_api::subject;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How long a lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often a holder renews: three tries before the lease would expire.
pub(crate) const RENEW_EVERY: Duration = Duration::from_millis(LEASE_TTL.as_millis() as u64 / 3);
/// A lease not renewed for this long (counted from when the last successful renewal
/// was sent, which is before the server stored it) is given up: the server expires it
/// no earlier than [`LEASE_TTL`] after that, and the margin covers stopping the
/// partition's agents and a server clock that runs a little fast.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(LEASE_TTL.as_secs() - 3);
/// How often a partition wanted but held by another worker is tried.
const ACQUIRE_EVERY: Duration = Duration::from_millis(250);
/// How often the loop looks at its leases.
const TICK: Duration = Duration::from_millis(100);
/// How often the presence of the pool's workers is read.
const PRESENCE_READ_EVERY: Duration = Duration::from_secs(1);
/// The presence key among the keeper's leases.
const PRESENCE: u32 = u32::MAX;
/// Wait between attempts to open the lease bucket while NATS does not answer.
const OPEN_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the lease is held by another worker")]
    Taken,
    #[error("lease bucket: {0}")]
    Unavailable(String),
}

/// The lease bucket.
#[derive(Clone)]
pub struct LeaseTable {
    kv: kv::Store,
    /// Written as the value of every lease this worker holds.
    worker: Bytes,
}

impl LeaseTable {
    pub async fn open(jetstream: &jetstream::Context, worker: &str) -> Result<Self, LeaseError> {
        let kv = match jetstream.get_key_value(subject::LEASE_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => jetstream
                .create_key_value(kv::Config {
                    bucket: subject::LEASE_BUCKET.to_owned(),
                    description: "nexo: which worker owns each partition".to_owned(),
                    history: 1,
                    max_age: LEASE_TTL,
                    ..Default::default()
                })
                .await
                .map_err(|e| LeaseError::Unavailable(e.to_string()))?,
        };
        Ok(Self {
            kv,
            worker: Bytes::from(worker.to_owned()),
        })
    }

    /// Takes `key` if nobody holds it, or if it is held under this worker's name by
    /// a predecessor on the same data directory (which is gone: see `app`); returns
    /// the revision, the new epoch.
    pub async fn acquire(&self, key: &str) -> Result<u64, LeaseError> {
        let unavailable = |e: &dyn std::fmt::Display| LeaseError::Unavailable(e.to_string());
        match self.kv.create(key, self.worker.clone()).await {
            Ok(revision) => return Ok(revision),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(unavailable(&e)),
        }
        let entry = self.kv.entry(key).await.map_err(|e| unavailable(&e))?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put && entry.value == self.worker => {
                tracing::info!(key, "taking back a lease a predecessor of this worker held");
                self.renew(key, entry.revision).await
            }
            _ => Err(LeaseError::Taken),
        }
    }

    /// Renews `key`, last written at `revision`; returns the new revision.
    pub async fn renew(&self, key: &str, revision: u64) -> Result<u64, LeaseError> {
        self.kv
            .update(key, self.worker.clone(), revision)
            .await
            .map_err(|e| match e.kind() {
                UpdateErrorKind::WrongLastRevision => LeaseError::Taken,
                _ => LeaseError::Unavailable(e.to_string()),
            })
    }

    /// Whether anyone holds `key`.
    pub async fn is_held(&self, key: &str) -> Result<bool, LeaseError> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| LeaseError::Unavailable(e.to_string()))?;
        Ok(entry.is_some_and(|e| e.operation == kv::Operation::Put))
    }

    /// Gives `key` up, if it is still at `revision`.
    pub async fn release(&self, key: &str, revision: u64) -> Result<(), LeaseError> {
        self.kv
            .delete_expect_revision(key, Some(revision))
            .await
            .map_err(|e| LeaseError::Unavailable(e.to_string()))
    }
}

/// A lease held.
#[derive(Debug, Clone, Copy)]
struct Lease {
    epoch: u64,
    revision: u64,
    /// When the last successful renewal (or the creation) was sent.
    renewed: Instant,
}

#[derive(Default)]
struct Requests {
    wanted: BTreeSet<u32>,
    release: BTreeSet<u32>,
    /// Workers in the pool's placement, whose presence is watched.
    workers: u32,
}

/// What the keeper knows: the partitions this worker holds (partition → epoch), and
/// which workers of the pool are alive (hold their presence key), once read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Held {
    pub partitions: BTreeMap<u32, u64>,
    pub alive: Option<BTreeSet<u32>>,
}

/// Keeps the leases of one pool's partitions: acquires those wanted, renews those
/// held, releases those handed off, and publishes what is held. One task owns the
/// leases; callers only ask.
#[derive(Clone)]
pub struct PartitionLeases {
    requests: Arc<Mutex<Requests>>,
    wake: Arc<Notify>,
    held: watch::Receiver<Held>,
    stop: CancellationToken,
    task: Arc<Mutex<Option<KeepTask>>>,
    pool: String,
    ordinal: u32,
}

/// The loop owning the leases: once stopped, the bucket (if it was reached) and the
/// leases still held.
type KeepTask = tokio::task::JoinHandle<Option<(LeaseTable, BTreeMap<u32, Lease>)>>;

impl PartitionLeases {
    /// Starts keeping the leases of `pool`'s partitions as `worker`. The bucket is
    /// opened in the background (tried again until NATS answers): nothing waits for
    /// NATS here, and nothing is held until it answers.
    pub fn start(
        jetstream: jetstream::Context,
        worker: &str,
        pool: &str,
        ordinal: u32,
        metrics: Arc<Metrics>,
    ) -> Self {
        let requests = Arc::new(Mutex::new(Requests::default()));
        let wake = Arc::new(Notify::new());
        let (publish, held) = watch::channel(Held::default());
        let stop = CancellationToken::new();
        let (worker, pool_name) = (worker.to_owned(), pool.to_owned());
        let (r, w, s) = (requests.clone(), wake.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let table = loop {
                match LeaseTable::open(&jetstream, &worker).await {
                    Ok(table) => break table,
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot open the lease bucket; trying again");
                        tokio::select! {
                            () = s.cancelled() => return None,
                            () = tokio::time::sleep(OPEN_RETRY) => {}
                        }
                    }
                }
            };
            let leases = keep(
                table.clone(),
                Keys {
                    pool: pool_name,
                    ordinal,
                },
                r,
                w,
                publish,
                metrics,
                s,
            )
            .await;
            Some((table, leases))
        });
        Self {
            requests,
            wake,
            held,
            stop,
            task: Arc::new(Mutex::new(Some(task))),
            pool: pool.to_owned(),
            ordinal,
        }
    }

    /// The partitions to acquire and keep, in a pool of `workers`. Held partitions not
    /// in it stay held until [`PartitionLeases::release`].
    pub fn want(&self, partitions: BTreeSet<u32>, workers: u32) {
        let changed = {
            let mut requests = self.requests.lock().unwrap();
            let changed = requests.wanted != partitions || requests.workers != workers;
            requests.wanted = partitions;
            requests.workers = workers;
            changed
        };
        if changed {
            self.wake.notify_one();
        }
    }

    /// Gives up `partition` (its agents are handed off).
    pub fn release(&self, partition: u32) {
        self.requests.lock().unwrap().release.insert(partition);
        self.wake.notify_one();
    }

    /// What is held now.
    pub fn held(&self) -> Held {
        self.held.borrow().clone()
    }

    /// Changes of what is held.
    pub fn watch(&self) -> watch::Receiver<Held> {
        self.held.clone()
    }

    /// Stops renewing and releases every lease still held (at shutdown, once the
    /// agents are drained and snapshotted).
    pub async fn release_all(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap().take();
        let Some(task) = task else { return };
        let Ok(Some((table, leases))) = task.await else {
            return;
        };
        for (partition, lease) in leases {
            let key = match partition {
                PRESENCE => subject::worker_presence(&self.pool, self.ordinal),
                partition => subject::partition_lease(&self.pool, partition),
            };
            if let Err(err) = table.release(&key, lease.revision).await {
                tracing::warn!(partition, error = %err, "cannot release a lease; it expires on its own");
            }
        }
    }
}

/// Which keys a keeper holds: the partitions of `pool`, and the presence key of
/// worker `ordinal`.
struct Keys {
    pool: String,
    ordinal: u32,
}

/// The loop owning the leases; returns those still held when stopped (the presence
/// key among them, as partition `u32::MAX`).
async fn keep(
    table: LeaseTable,
    keys: Keys,
    requests: Arc<Mutex<Requests>>,
    wake: Arc<Notify>,
    publish: watch::Sender<Held>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> BTreeMap<u32, Lease> {
    let pool = keys.pool.clone();
    let key_of = |partition: u32| match partition {
        PRESENCE => subject::worker_presence(&keys.pool, keys.ordinal),
        partition => subject::partition_lease(&keys.pool, partition),
    };
    let mut leases: BTreeMap<u32, Lease> = BTreeMap::new();
    let mut next_acquire = Instant::now();
    let mut next_presence_read = Instant::now();
    let mut alive: Option<BTreeSet<u32>> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return leases,
            () = tokio::time::sleep(TICK) => {}
            () = wake.notified() => next_acquire = Instant::now(),
        }
        let (mut wanted, release, workers) = {
            let mut requests = requests.lock().unwrap();
            (
                requests.wanted.clone(),
                std::mem::take(&mut requests.release),
                requests.workers,
            )
        };
        // This worker's presence is kept like a lease.
        wanted.insert(PRESENCE);
        for partition in release {
            if let Some(lease) = leases.remove(&partition) {
                let key = key_of(partition);
                match table.release(&key, lease.revision).await {
                    Ok(()) => tracing::info!(partition, "lease released"),
                    Err(err) => {
                        tracing::warn!(partition, error = %err, "cannot release a lease; it expires on its own")
                    }
                }
                metrics
                    .ownership_changes
                    .with_label_values(&["released"])
                    .inc();
            }
        }
        let due: Vec<u32> = leases
            .iter()
            .filter(|(_, lease)| lease.renewed.elapsed() >= RENEW_EVERY)
            .map(|(p, _)| *p)
            .collect();
        let renewals = futures::future::join_all(due.iter().map(|&partition| {
            let (table, key) = (&table, key_of(partition));
            let revision = leases[&partition].revision;
            async move {
                let sent = Instant::now();
                (partition, sent, table.renew(&key, revision).await)
            }
        }))
        .await;
        for (partition, sent, result) in renewals {
            let lease = leases.get_mut(&partition).expect("renewed leases are held");
            match result {
                Ok(revision) => {
                    lease.revision = revision;
                    lease.renewed = sent;
                }
                Err(LeaseError::Taken) => {
                    tracing::error!(partition, "lease lost: another worker holds it");
                    leases.remove(&partition);
                    metrics.leases_lost.inc();
                }
                Err(err) => tracing::warn!(partition, error = %err, "cannot renew a lease"),
            }
        }
        leases.retain(|partition, lease| {
            let keep = lease.renewed.elapsed() < GIVE_UP_AFTER;
            if !keep {
                tracing::error!(
                    partition,
                    "lease given up: not renewed in time (NATS unreachable?)"
                );
                metrics.leases_lost.inc();
            }
            keep
        });
        if Instant::now() >= next_acquire {
            next_acquire = Instant::now() + ACQUIRE_EVERY;
            let missing: Vec<u32> = wanted
                .iter()
                .filter(|p| !leases.contains_key(p))
                .copied()
                .collect();
            let acquired = futures::future::join_all(missing.iter().map(|&partition| {
                let (table, key) = (&table, key_of(partition));
                async move {
                    let sent = Instant::now();
                    (partition, sent, table.acquire(&key).await)
                }
            }))
            .await;
            for (partition, sent, result) in acquired {
                match result {
                    Ok(revision) => {
                        if partition != PRESENCE {
                            tracing::info!(partition, epoch = revision, "lease acquired");
                            metrics
                                .ownership_changes
                                .with_label_values(&["acquired"])
                                .inc();
                        }
                        leases.insert(
                            partition,
                            Lease {
                                epoch: revision,
                                revision,
                                renewed: sent,
                            },
                        );
                    }
                    Err(LeaseError::Taken) => {}
                    Err(err) => tracing::debug!(partition, error = %err, "cannot acquire a lease"),
                }
            }
        }
        if Instant::now() >= next_presence_read {
            next_presence_read = Instant::now() + PRESENCE_READ_EVERY;
            let read = futures::future::join_all((0..workers).map(|ordinal| {
                let (table, key) = (&table, subject::worker_presence(&pool, ordinal));
                async move { (ordinal, table.is_held(&key).await) }
            }))
            .await;
            // One that cannot be read leaves the last answer standing.
            if read.iter().all(|(_, held)| held.is_ok()) {
                alive = Some(
                    read.into_iter()
                        .filter(|(_, held)| matches!(held, Ok(true)))
                        .map(|(ordinal, _)| ordinal)
                        .collect(),
                );
            }
        }
        let held = Held {
            partitions: leases
                .iter()
                .filter(|(p, _)| **p != PRESENCE)
                .map(|(p, l)| (*p, l.epoch))
                .collect(),
            alive: alive.clone(),
        };
        metrics.partitions_held.set(held.partitions.len() as i64);
        publish.send_if_modified(|current| {
            let changed = *current != held;
            *current = held;
            changed
        });
    }
}
