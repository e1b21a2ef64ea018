//! The SQLite file behind the outbox and the dead-letter queue.
//!
//! One thread owns the connection; async callers send it closures. Consecutive
//! enqueues are written in one transaction (group commit): a burst costs one fsync
//! per batch, and every caller is answered only after its batch is durable.
//!
//! Both tables are bounded ([`StoreLimits`]): a full outbox refuses new messages
//! ([`QueueError::OutboxFull`]) and keeps what it accepted; dead letters past their
//! age, or the oldest beyond the count, are removed, counted and logged. The thread
//! keeps the sizes of both tables in [`Usage`], so checking a limit or reading a
//! gauge costs no query.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nexo_api::config::DeliverySettings;
use rusqlite::{Connection, params};
use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use crate::broker::{BrokerError, Pending};

/// Enqueues committed together at most.
const MAX_GROUP: usize = 1024;
/// What a refused publisher is told to wait before it tries again: about one drain
/// round against a broker that is coming back, short enough for a person retrying.
pub const OUTBOX_FULL_RETRY_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot start the queue database thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("queue database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A group commit failed: every enqueue of the group gets the same error.
    #[error("queue database: {0}")]
    Commit(#[source] Arc<rusqlite::Error>),
    #[error("queue database thread has stopped")]
    Stopped,
    /// The outbox holds as much as it may; nothing more is accepted until it drains.
    #[error(
        "the outbox is full ({messages} messages, {bytes} bytes; limits {max_messages} messages, {max_bytes} bytes): the broker is not taking messages"
    )]
    OutboxFull {
        messages: u64,
        bytes: u64,
        max_messages: u64,
        max_bytes: u64,
    },
}

/// The queue sits in front of the bus: a full outbox is the bus refusing work for now.
impl From<QueueError> for BrokerError {
    fn from(error: QueueError) -> Self {
        match error {
            QueueError::OutboxFull { .. } => BrokerError::Full {
                retry_after: OUTBOX_FULL_RETRY_AFTER,
                source: Box::new(error),
            },
            other => BrokerError::Queue(Box::new(other)),
        }
    }
}

/// How much the store may hold (`worker.delivery` of the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Failed publishes before a message is dead-lettered.
    pub max_attempts: u32,
    pub outbox_max_messages: u64,
    /// Payload bytes.
    pub outbox_max_bytes: u64,
    pub dead_letter_max_messages: u64,
    pub dead_letter_max_age: Duration,
}

impl From<&DeliverySettings> for StoreLimits {
    fn from(settings: &DeliverySettings) -> Self {
        Self {
            max_attempts: settings.max_attempts,
            outbox_max_messages: settings.outbox.max_messages,
            outbox_max_bytes: settings.outbox.max_bytes,
            dead_letter_max_messages: settings.dead_letters.max_messages,
            dead_letter_max_age: Duration::from_secs(settings.dead_letters.max_age_seconds),
        }
    }
}

/// Sizes and counts of the store, kept by its thread (the only writer).
#[derive(Debug, Default)]
struct Usage {
    outbox_messages: AtomicU64,
    outbox_bytes: AtomicU64,
    dead_letters: AtomicU64,
    /// Enqueues refused because the outbox was full.
    refused: AtomicU64,
    /// Dead letters removed because they were older than the retention.
    expired: AtomicU64,
    /// Dead letters removed to make room for newer ones.
    overflowed: AtomicU64,
}

/// A reading of [`Usage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageSnapshot {
    pub outbox_messages: u64,
    pub outbox_bytes: u64,
    pub dead_letters: u64,
    pub refused_total: u64,
    pub expired_total: u64,
    pub overflowed_total: u64,
}

impl Usage {
    fn snapshot(&self) -> UsageSnapshot {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        UsageSnapshot {
            outbox_messages: read(&self.outbox_messages),
            outbox_bytes: read(&self.outbox_bytes),
            dead_letters: read(&self.dead_letters),
            refused_total: read(&self.refused),
            expired_total: read(&self.expired),
            overflowed_total: read(&self.overflowed),
        }
    }

    fn outbox_added(&self, messages: u64, bytes: u64) {
        self.outbox_messages.fetch_add(messages, Ordering::Relaxed);
        self.outbox_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn outbox_removed(&self, messages: u64, bytes: u64) {
        self.outbox_messages.fetch_sub(messages, Ordering::Relaxed);
        self.outbox_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A message that failed for good, with why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub id: i64,
    pub subject: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// The payload as text (lossy for binary payloads).
    pub payload: String,
    pub attempts: u32,
    pub error: String,
    /// `publish` (could not be sent) or `consume` (its handler kept failing).
    pub source: String,
    /// Unix milliseconds.
    pub failed_at: i64,
}

/// What happened to a message after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    WillRetry,
    DeadLettered,
}

/// What the database thread owns.
struct Db {
    connection: Connection,
    limits: StoreLimits,
    usage: Arc<Usage>,
    /// Who waits for which rows to leave the outbox ([`QueueStore::wait_sent`]).
    /// Owned by the database thread, like the rows: a row cannot leave between the
    /// check and the registration.
    waiting: Vec<SentWaiter>,
}

/// Rows of the outbox someone waits for, and how to tell them they all left.
struct SentWaiter {
    seqs: HashSet<i64>,
    done: oneshot::Sender<()>,
}

impl Db {
    /// Rows `seqs` left the outbox (sent, or moved to the dead letters): answers
    /// whoever waited for them, and forgets waiters that stopped waiting.
    fn left(&mut self, seqs: &[i64]) {
        if self.waiting.is_empty() {
            return;
        }
        for mut waiter in std::mem::take(&mut self.waiting) {
            for seq in seqs {
                waiter.seqs.remove(seq);
            }
            if waiter.seqs.is_empty() {
                let _ = waiter.done.send(());
            } else if !waiter.done.is_closed() {
                self.waiting.push(waiter);
            }
        }
    }
}

type Job = Box<dyn FnOnce(&mut Db) + Send>;

enum Command {
    Enqueue {
        subject: String,
        reply: Option<String>,
        payload: Vec<u8>,
        /// Whether the outbox's limits apply (not to work accepted already).
        bounded: bool,
        /// The publish's `Nats-Msg-Id` when the caller names one: a row with it still
        /// in the outbox makes this one a duplicate (not stored again).
        msg_id: Option<String>,
        done: oneshot::Sender<Result<i64, QueueError>>,
    },
    Run(Job),
}

/// Handle to the queue database; cheap to clone.
#[derive(Clone)]
pub struct QueueStore {
    commands: mpsc::Sender<Command>,
    /// Signalled after every committed batch of enqueues.
    enqueued: Arc<Notify>,
    usage: Arc<Usage>,
    limits: StoreLimits,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl QueueStore {
    /// Opens (or creates) the database at `path` with the default limits of
    /// `worker.delivery` and `max_attempts`.
    pub fn open(path: &Path, max_attempts: u32) -> Result<Self, QueueError> {
        let limits = StoreLimits {
            max_attempts,
            ..StoreLimits::from(&DeliverySettings::default())
        };
        Self::open_with_limits(path, limits)
    }

    /// Opens (or creates) the database at `path`. A file that is not a usable SQLite
    /// database is reported with its path, not a panic.
    pub fn open_with_limits(path: &Path, limits: StoreLimits) -> Result<Self, QueueError> {
        let open_error = |source| QueueError::Open {
            path: path.to_owned(),
            source,
        };
        let connection = Connection::open(path).map_err(open_error)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA busy_timeout = 5000;
                 CREATE TABLE IF NOT EXISTS outbox (
                     seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     subject TEXT NOT NULL,
                     reply TEXT,
                     payload BLOB NOT NULL,
                     msg_id TEXT NOT NULL,
                     attempts INTEGER NOT NULL DEFAULT 0,
                     last_error TEXT,
                     created_at INTEGER NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS dead_letters (
                     id INTEGER PRIMARY KEY AUTOINCREMENT,
                     subject TEXT NOT NULL,
                     reply TEXT,
                     payload BLOB NOT NULL,
                     attempts INTEGER NOT NULL,
                     error TEXT NOT NULL,
                     source TEXT NOT NULL,
                     failed_at INTEGER NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS dead_letters_failed_at ON dead_letters (failed_at);
                 CREATE INDEX IF NOT EXISTS outbox_msg_id ON outbox (msg_id);",
            )
            .map_err(open_error)?;
        let usage = Arc::new(Usage::default());
        let (messages, bytes, dead) = connection
            .query_row(
                "SELECT (SELECT count(*) FROM outbox),
                        (SELECT coalesce(sum(length(payload)), 0) FROM outbox),
                        (SELECT count(*) FROM dead_letters)",
                [],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, i64>(2)?,
                    ))
                },
            )
            .map_err(open_error)?;
        // Counts and lengths are never negative.
        usage.outbox_added(messages as u64, bytes as u64);
        usage.dead_letters.store(dead as u64, Ordering::Relaxed);
        let (commands, receiver) = mpsc::channel(4 * MAX_GROUP);
        let enqueued = Arc::new(Notify::new());
        let notify = enqueued.clone();
        let mut db = Db {
            connection,
            limits,
            usage: usage.clone(),
            waiting: Vec::new(),
        };
        std::thread::Builder::new()
            .name("nexo-queue-db".to_owned())
            .spawn(move || serve(&mut db, receiver, &notify))
            .map_err(QueueError::Spawn)?;
        Ok(Self {
            commands,
            enqueued,
            usage,
            limits,
        })
    }

    /// Whether `other` is a handle to the same database.
    pub fn is_same(&self, other: &QueueStore) -> bool {
        self.commands.same_channel(&other.commands)
    }

    pub fn max_attempts(&self) -> u32 {
        self.limits.max_attempts
    }

    /// Sizes of both tables and the counts of refused and removed messages.
    pub fn usage(&self) -> UsageSnapshot {
        self.usage.snapshot()
    }

    /// Waits until new messages were enqueued (returns at once if some were enqueued
    /// since the last wait).
    pub async fn wait_enqueued(&self) {
        self.enqueued.notified().await;
    }

    /// Stores a message to publish; returns its row's `seq` once it is on disk. A
    /// full outbox refuses it with [`QueueError::OutboxFull`].
    pub async fn enqueue(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
    ) -> Result<i64, QueueError> {
        self.store(subject, reply, payload, true, None).await
    }

    /// Stores a message to publish with the id `msg_id` (its `Nats-Msg-Id`), unless
    /// a row with that id is still in the outbox: then its `seq` is returned and
    /// nothing is stored. `bounded`: whether the outbox's limits apply.
    pub async fn enqueue_once(
        &self,
        subject: &str,
        payload: &[u8],
        msg_id: &str,
        bounded: bool,
    ) -> Result<i64, QueueError> {
        self.store(subject, None, payload, bounded, Some(msg_id.to_owned()))
            .await
    }

    /// Stores what follows from work accepted already (replies, events, hand-offs,
    /// and what the in-process bus still holds at shutdown), beyond the outbox's
    /// limits if need be: refusing it would lose it.
    pub async fn keep(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
    ) -> Result<i64, QueueError> {
        self.store(subject, reply, payload, false, None).await
    }

    async fn store(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
        bounded: bool,
        msg_id: Option<String>,
    ) -> Result<i64, QueueError> {
        let (done, result) = oneshot::channel();
        self.commands
            .send(Command::Enqueue {
                subject: subject.to_owned(),
                reply: reply.map(str::to_owned),
                payload: payload.to_vec(),
                bounded,
                msg_id,
                done,
            })
            .await
            .map_err(|_| QueueError::Stopped)?;
        result.await.map_err(|_| QueueError::Stopped)?
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Db) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |db| {
            let _ = tx.send(job(db));
        });
        self.commands
            .send(Command::Run(job))
            .await
            .map_err(|_| QueueError::Stopped)?;
        rx.await.map_err(|_| QueueError::Stopped)?
    }

    /// Waits until every row of `seqs` has left the outbox: published (the broker
    /// confirmed it) or, after its attempts, moved to the dead letters. Rows that left
    /// already count as left.
    pub async fn wait_sent(&self, seqs: Vec<i64>) -> Result<(), QueueError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (done, left) = oneshot::channel();
        self.run(move |db| {
            let mut statement = db
                .connection
                .prepare_cached("SELECT 1 FROM outbox WHERE seq = ?1")?;
            let mut waiting = HashSet::new();
            for seq in seqs {
                if statement.exists([seq])? {
                    waiting.insert(seq);
                }
            }
            drop(statement);
            if waiting.is_empty() {
                let _ = done.send(());
            } else {
                db.waiting.push(SentWaiter {
                    seqs: waiting,
                    done,
                });
            }
            Ok(())
        })
        .await?;
        left.await.map_err(|_| QueueError::Stopped)
    }

    /// The oldest `limit` messages waiting to be published, in order.
    pub async fn peek(&self, limit: usize) -> Result<Vec<Pending>, QueueError> {
        self.run(move |db| {
            let mut statement = db.connection.prepare_cached(
                "SELECT seq, subject, reply, payload, msg_id, attempts FROM outbox ORDER BY seq LIMIT ?1",
            )?;
            let rows = statement.query_map([limit as i64], |row| {
                Ok(Pending {
                    seq: row.get(0)?,
                    subject: row.get(1)?,
                    reply: row.get(2)?,
                    payload: row.get(3)?,
                    msg_id: row.get(4)?,
                    attempts: row.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Forgets messages that were published.
    pub async fn remove(&self, seqs: Vec<i64>) -> Result<(), QueueError> {
        self.run(move |db| {
            let tx = db.connection.transaction()?;
            let (mut messages, mut bytes) = (0, 0);
            {
                let mut statement = tx.prepare_cached(
                    "DELETE FROM outbox WHERE seq = ?1 RETURNING length(payload)",
                )?;
                for &seq in &seqs {
                    let removed: Option<i64> = statement
                        .query_row([seq], |row| row.get(0))
                        .map(Some)
                        .or_else(none_if_no_rows)?;
                    if let Some(length) = removed {
                        messages += 1;
                        bytes += length as u64;
                    }
                }
            }
            tx.commit()?;
            db.usage.outbox_removed(messages, bytes);
            db.left(&seqs);
            Ok(())
        })
        .await
    }

    /// Counts a failed attempt to publish; after `max_attempts` the message moves to
    /// the dead-letter queue with `error`.
    pub async fn record_failure(
        &self,
        seq: i64,
        error: String,
    ) -> Result<AfterFailure, QueueError> {
        self.run(move |db| {
            let max_attempts = db.limits.max_attempts;
            let tx = db.connection.transaction()?;
            let (attempts, length): (u32, i64) = tx.query_row(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?2 WHERE seq = ?1 RETURNING attempts, length(payload)",
                params![seq, error],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            if attempts < max_attempts {
                tx.commit()?;
                return Ok(AfterFailure::WillRetry);
            }
            tx.execute(
                "INSERT INTO dead_letters (subject, reply, payload, attempts, error, source, failed_at)
                 SELECT subject, reply, payload, attempts, last_error, 'publish', ?2 FROM outbox WHERE seq = ?1",
                params![seq, now_ms()],
            )?;
            tx.execute("DELETE FROM outbox WHERE seq = ?1", [seq])?;
            let overflowed = make_room(&tx, &db.limits, &db.usage)?;
            tx.commit()?;
            db.usage.outbox_removed(1, length as u64);
            db.dead_letters_added(overflowed);
            db.left(&[seq]);
            Ok(AfterFailure::DeadLettered)
        })
        .await
    }

    /// Records a consumed message whose handling failed for good.
    pub async fn dead_letter(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
        attempts: u32,
        error: &str,
    ) -> Result<(), QueueError> {
        let (subject, reply, payload, error) = (
            subject.to_owned(),
            reply.map(str::to_owned),
            payload.to_vec(),
            error.to_owned(),
        );
        self.run(move |db| {
            let tx = db.connection.transaction()?;
            tx.execute(
                "INSERT INTO dead_letters (subject, reply, payload, attempts, error, source, failed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'consume', ?6)",
                params![subject, reply, payload, attempts, error, now_ms()],
            )?;
            let overflowed = make_room(&tx, &db.limits, &db.usage)?;
            tx.commit()?;
            db.dead_letters_added(overflowed);
            Ok(())
        })
        .await
    }

    /// Dead letters, oldest first.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.run(move |db| {
            let mut statement = db.connection.prepare_cached(
                "SELECT id, subject, reply, payload, attempts, error, source, failed_at FROM dead_letters ORDER BY id LIMIT ?1",
            )?;
            let rows = statement.query_map([limit as i64], |row| {
                let payload: Vec<u8> = row.get(3)?;
                Ok(DeadLetter {
                    id: row.get(0)?,
                    subject: row.get(1)?,
                    reply: row.get(2)?,
                    payload: String::from_utf8_lossy(&payload).into_owned(),
                    attempts: row.get(4)?,
                    error: row.get(5)?,
                    source: row.get(6)?,
                    failed_at: row.get(7)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Moves a dead letter back into the outbox, to be published again with a fresh
    /// attempt count. `false` when there is no such dead letter; a full outbox refuses
    /// it ([`QueueError::OutboxFull`]) and the dead letter stays.
    pub async fn replay(&self, id: i64) -> Result<bool, QueueError> {
        let replayed = self
            .run(move |db| {
                let length: Option<i64> = db
                    .connection
                    .query_row(
                        "SELECT length(payload) FROM dead_letters WHERE id = ?1",
                        [id],
                        |row| row.get(0),
                    )
                    .map(Some)
                    .or_else(none_if_no_rows)?;
                let Some(length) = length.map(|l| l as u64) else {
                    return Ok(false);
                };
                db.check_room((0, 0), length)?;
                let tx = db.connection.transaction()?;
                tx.execute(
                    "INSERT INTO outbox (subject, reply, payload, msg_id, created_at)
                     SELECT subject, reply, payload, ?2, ?3 FROM dead_letters WHERE id = ?1",
                    params![id, Uuid::now_v7().to_string(), now_ms()],
                )?;
                tx.execute("DELETE FROM dead_letters WHERE id = ?1", [id])?;
                tx.commit()?;
                db.usage.outbox_added(1, length);
                db.usage.dead_letters.fetch_sub(1, Ordering::Relaxed);
                Ok(true)
            })
            .await?;
        if replayed {
            self.enqueued.notify_one();
        }
        Ok(replayed)
    }

    /// Deletes a dead letter; `false` when there is no such dead letter.
    pub async fn delete_dead_letter(&self, id: i64) -> Result<bool, QueueError> {
        self.run(move |db| {
            let deleted = db
                .connection
                .execute("DELETE FROM dead_letters WHERE id = ?1", [id])?
                == 1;
            if deleted {
                db.usage.dead_letters.fetch_sub(1, Ordering::Relaxed);
            }
            Ok(deleted)
        })
        .await
    }

    /// Removes the dead letters older than the retention (`deadLetters.maxAgeSeconds`);
    /// returns how many.
    pub async fn expire_dead_letters(&self) -> Result<u64, QueueError> {
        self.run(|db| {
            let max_age =
                i64::try_from(db.limits.dead_letter_max_age.as_millis()).unwrap_or(i64::MAX);
            let removed = db.connection.execute(
                "DELETE FROM dead_letters WHERE failed_at < ?1",
                [now_ms().saturating_sub(max_age)],
            )? as u64;
            if removed > 0 {
                db.usage.dead_letters.fetch_sub(removed, Ordering::Relaxed);
                db.usage.expired.fetch_add(removed, Ordering::Relaxed);
                tracing::info!(
                    removed,
                    max_age_seconds = db.limits.dead_letter_max_age.as_secs(),
                    "dead letters past their retention removed"
                );
            }
            Ok(removed)
        })
        .await
    }

    /// Messages waiting to be published, and dead letters.
    pub fn depths(&self) -> (u64, u64) {
        let usage = self.usage();
        (usage.outbox_messages, usage.dead_letters)
    }
}

/// `QueryReturnedNoRows` as `None`.
fn none_if_no_rows<T>(error: rusqlite::Error) -> Result<Option<T>, rusqlite::Error> {
    match error {
        rusqlite::Error::QueryReturnedNoRows => Ok(None),
        other => Err(other),
    }
}

/// After a dead letter was added in `tx`: removes the oldest beyond
/// `deadLetters.maxMessages`; returns how many.
fn make_room(
    tx: &rusqlite::Transaction<'_>,
    limits: &StoreLimits,
    usage: &Usage,
) -> Result<u64, rusqlite::Error> {
    let count = usage.dead_letters.load(Ordering::Relaxed) + 1;
    let excess = count.saturating_sub(limits.dead_letter_max_messages);
    if excess == 0 {
        return Ok(0);
    }
    let removed = tx.execute(
        "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters ORDER BY id LIMIT ?1)",
        [i64::try_from(excess).unwrap_or(i64::MAX)],
    )? as u64;
    tracing::warn!(
        removed,
        limit = limits.dead_letter_max_messages,
        "dead-letter queue full: the oldest dead letters were removed"
    );
    Ok(removed)
}

impl Db {
    /// Counts one added dead letter and `overflowed` removed to make room for it.
    fn dead_letters_added(&self, overflowed: u64) {
        self.usage.dead_letters.fetch_add(1, Ordering::Relaxed);
        self.usage
            .dead_letters
            .fetch_sub(overflowed, Ordering::Relaxed);
        self.usage
            .overflowed
            .fetch_add(overflowed, Ordering::Relaxed);
    }

    /// Whether the outbox has room for one more message of `length` payload bytes,
    /// besides `uncommitted` (messages, bytes) about to be stored with it. Counts a
    /// refusal.
    fn check_room(&self, uncommitted: (u64, u64), length: u64) -> Result<(), QueueError> {
        let usage = &self.usage;
        let messages = usage.outbox_messages.load(Ordering::Relaxed) + uncommitted.0;
        let bytes = usage.outbox_bytes.load(Ordering::Relaxed) + uncommitted.1;
        if messages < self.limits.outbox_max_messages
            && bytes.saturating_add(length) <= self.limits.outbox_max_bytes
        {
            return Ok(());
        }
        usage.refused.fetch_add(1, Ordering::Relaxed);
        Err(QueueError::OutboxFull {
            messages,
            bytes,
            max_messages: self.limits.outbox_max_messages,
            max_bytes: self.limits.outbox_max_bytes,
        })
    }
}

/// The database thread: runs jobs in order, committing runs of enqueues together.
fn serve(db: &mut Db, mut commands: mpsc::Receiver<Command>, enqueued: &Notify) {
    let mut next = commands.blocking_recv();
    while let Some(command) = next.take() {
        match command {
            Command::Run(job) => job(db),
            Command::Enqueue {
                subject,
                reply,
                payload,
                bounded,
                msg_id,
                done,
            } => {
                let mut group = vec![(subject, reply, payload, bounded, msg_id, done)];
                while group.len() < MAX_GROUP {
                    match commands.try_recv() {
                        Ok(Command::Enqueue {
                            subject,
                            reply,
                            payload,
                            bounded,
                            msg_id,
                            done,
                        }) => {
                            group.push((subject, reply, payload, bounded, msg_id, done));
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                write_group(db, group, enqueued);
            }
        }
        if next.is_none() {
            next = commands.blocking_recv();
        }
    }
}

/// Subject, reply subject, payload, whether the limits apply, the caller's message
/// id, and who waits.
type Entry = (
    String,
    Option<String>,
    Vec<u8>,
    bool,
    Option<String>,
    oneshot::Sender<Result<i64, QueueError>>,
);

/// Stores the entries the outbox has room for in one transaction and answers every
/// caller: refused ones at once, the others once the commit is durable.
fn write_group(db: &mut Db, group: Vec<Entry>, enqueued: &Notify) {
    let (mut messages, mut bytes) = (0, 0);
    let mut accepted = Vec::with_capacity(group.len());
    for entry in group {
        let length = entry.2.len() as u64;
        let room = if entry.3 {
            db.check_room((messages, bytes), length)
        } else {
            Ok(())
        };
        match room {
            Ok(()) => {
                messages += 1;
                bytes += length;
                accepted.push(entry);
            }
            Err(full) => {
                let _ = entry.5.send(Err(full));
            }
        }
    }
    if accepted.is_empty() {
        return;
    }
    match insert_all(&mut db.connection, &accepted) {
        Ok(rows) => {
            // What was a duplicate of a pending row was not stored.
            let (mut messages, mut bytes) = (0, 0);
            for ((_, _, payload, ..), (_, stored)) in accepted.iter().zip(&rows) {
                if *stored {
                    messages += 1;
                    bytes += payload.len() as u64;
                }
            }
            db.usage.outbox_added(messages, bytes);
            for ((.., done), (seq, _)) in accepted.into_iter().zip(rows) {
                let _ = done.send(Ok(seq));
            }
            enqueued.notify_one();
        }
        Err(err) => {
            let err = Arc::new(err);
            for (.., done) in accepted {
                let _ = done.send(Err(QueueError::Commit(err.clone())));
            }
        }
    }
}

/// Inserts `group` in one transaction; each entry's row `seq`, in order, and whether
/// it was stored (not when a row with its message id was pending already).
fn insert_all(
    connection: &mut Connection,
    group: &[Entry],
) -> Result<Vec<(i64, bool)>, rusqlite::Error> {
    let tx = connection.transaction()?;
    let mut seqs = Vec::with_capacity(group.len());
    {
        let mut statement = tx.prepare_cached(
            "INSERT INTO outbox (subject, reply, payload, msg_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut pending = tx.prepare_cached("SELECT seq FROM outbox WHERE msg_id = ?1")?;
        let now = now_ms();
        for (subject, reply, payload, _, msg_id, _) in group {
            if let Some(id) = msg_id
                && let Some(seq) = pending
                    .query_row([id], |row| row.get(0))
                    .map(Some)
                    .or_else(none_if_no_rows)?
            {
                seqs.push((seq, false));
                continue;
            }
            let id = msg_id.clone().unwrap_or_else(|| Uuid::now_v7().to_string());
            statement.execute(params![subject, reply, payload, id, now])?;
            seqs.push((tx.last_insert_rowid(), true));
        }
    }
    tx.commit()?;
    Ok(seqs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db() -> (PathBuf, QueueStore) {
        let dir = std::env::temp_dir().join(format!("nexo-queue-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = QueueStore::open(&dir.join("queue.db"), 3).unwrap();
        (dir, store)
    }

    /// A message published again under the same id while the first is still in the
    /// outbox is not stored twice, and sent with that id (its `Nats-Msg-Id`, which
    /// JetStream de-duplicates after the outbox sent it).
    #[tokio::test]
    async fn a_message_stored_once_for_its_id_while_it_waits() {
        let (path, store) = temp_db();
        let first = store
            .enqueue_once("a.b", b"one", "update-1", true)
            .await
            .unwrap();
        let again = store
            .enqueue_once("a.b", b"one", "update-1", true)
            .await
            .unwrap();
        let other = store
            .enqueue_once("a.b", b"two", "update-2", true)
            .await
            .unwrap();
        assert_eq!(first, again);
        let pending = store.peek(10).await.unwrap();
        assert_eq!(payloads(&pending), ["one", "two"]);
        assert_eq!(pending[0].msg_id, "update-1");
        assert_eq!(store.usage().outbox_messages, 2);
        assert_ne!(first, other);
        std::fs::remove_dir_all(path).unwrap();
    }

    #[tokio::test]
    async fn fifo_remove_and_dead_letter_after_max_attempts() {
        let (dir, store) = temp_db();
        for i in 0..5 {
            store
                .enqueue("a.b", None, format!("m{i}").as_bytes())
                .await
                .unwrap();
        }
        let pending = store.peek(10).await.unwrap();
        let payloads: Vec<_> = pending
            .iter()
            .map(|p| String::from_utf8(p.payload.clone()).unwrap())
            .collect();
        assert_eq!(payloads, ["m0", "m1", "m2", "m3", "m4"]);
        store
            .remove(vec![pending[0].seq, pending[1].seq])
            .await
            .unwrap();
        let head = pending[2].seq;
        assert_eq!(
            store.record_failure(head, "nope 1".into()).await.unwrap(),
            AfterFailure::WillRetry
        );
        assert_eq!(
            store.record_failure(head, "nope 2".into()).await.unwrap(),
            AfterFailure::WillRetry
        );
        assert_eq!(
            store.record_failure(head, "nope 3".into()).await.unwrap(),
            AfterFailure::DeadLettered
        );
        assert_eq!(store.depths(), (2, 1));
        let dead = store.dead_letters(10).await.unwrap();
        assert_eq!(dead[0].payload, "m2");
        assert_eq!(dead[0].attempts, 3);
        assert_eq!(dead[0].error, "nope 3");
        assert_eq!(dead[0].source, "publish");

        assert!(store.replay(dead[0].id).await.unwrap());
        assert!(!store.replay(dead[0].id).await.unwrap());
        let requeued = store.peek(10).await.unwrap();
        assert_eq!(requeued.last().unwrap().payload, b"m2");
        assert_eq!(requeued.last().unwrap().attempts, 0);
        assert_eq!(store.depths(), (3, 0));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn limited(limits: impl FnOnce(&mut StoreLimits)) -> (PathBuf, QueueStore) {
        let dir = std::env::temp_dir().join(format!("nexo-queue-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut all = StoreLimits::from(&DeliverySettings::default());
        limits(&mut all);
        let store = QueueStore::open_with_limits(&dir.join("queue.db"), all).unwrap();
        (dir, store)
    }

    fn payloads(pending: &[Pending]) -> Vec<String> {
        pending
            .iter()
            .map(|p| String::from_utf8(p.payload.clone()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_new_messages_and_keeps_what_it_has() {
        let (dir, store) = limited(|l| l.outbox_max_messages = 2);
        store.enqueue("a.b", None, b"one").await.unwrap();
        store.enqueue("a.b", None, b"two").await.unwrap();
        let refused = store.enqueue("a.b", None, b"three").await.unwrap_err();
        assert!(
            matches!(
                refused,
                QueueError::OutboxFull {
                    messages: 2,
                    max_messages: 2,
                    ..
                }
            ),
            "{refused}"
        );
        assert!(matches!(
            BrokerError::from(refused),
            BrokerError::Full { retry_after, .. } if retry_after == OUTBOX_FULL_RETRY_AFTER
        ));
        let pending = store.peek(10).await.unwrap();
        assert_eq!(payloads(&pending), ["one", "two"]);
        let usage = store.usage();
        assert_eq!(
            (
                usage.outbox_messages,
                usage.outbox_bytes,
                usage.refused_total
            ),
            (2, 6, 1)
        );

        store.remove(vec![pending[0].seq]).await.unwrap();
        store.enqueue("a.b", None, b"three").await.unwrap();
        assert_eq!(payloads(&store.peek(10).await.unwrap()), ["two", "three"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// What the in-process bus still holds at shutdown was accepted already: it is
    /// kept beyond the limits rather than lost.
    #[tokio::test]
    async fn accepted_work_is_kept_beyond_the_limits() {
        let (dir, store) = limited(|l| l.outbox_max_messages = 1);
        store.enqueue("a.b", None, b"one").await.unwrap();
        assert!(matches!(
            store.enqueue("a.b", None, b"refused").await,
            Err(QueueError::OutboxFull { .. })
        ));
        store.keep("a.b", None, b"parked").await.unwrap();
        assert_eq!(payloads(&store.peek(10).await.unwrap()), ["one", "parked"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn the_outbox_is_bounded_in_bytes() {
        let (dir, store) = limited(|l| l.outbox_max_bytes = 10);
        // Sent together: the database thread may commit them as one group.
        let results = futures::future::join_all(
            ["123456", "12345", "1234"]
                .map(|payload| store.enqueue("a.b", None, payload.as_bytes())),
        )
        .await;
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(matches!(results[1], Err(QueueError::OutboxFull { .. })));
        assert_eq!(payloads(&store.peek(10).await.unwrap()), ["123456", "1234"]);
        assert_eq!(store.usage().outbox_bytes, 10);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn usage_is_read_back_when_the_file_is_opened_again() {
        let (dir, store) = temp_db();
        store.enqueue("a.b", None, b"kept").await.unwrap();
        store
            .dead_letter("a.b", None, b"dead", 3, "no")
            .await
            .unwrap();
        drop(store);
        let store = QueueStore::open(&dir.join("queue.db"), 3).unwrap();
        let usage = store.usage();
        assert_eq!(
            (
                usage.outbox_messages,
                usage.outbox_bytes,
                usage.dead_letters
            ),
            (1, 4, 1)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_new_dead_letter_beyond_the_count_removes_the_oldest() {
        let (dir, store) = limited(|l| l.dead_letter_max_messages = 2);
        for payload in ["first", "second", "third"] {
            store
                .dead_letter("a.b", None, payload.as_bytes(), 3, "no")
                .await
                .unwrap();
        }
        let kept: Vec<_> = store
            .dead_letters(10)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.payload)
            .collect();
        assert_eq!(kept, ["second", "third"]);
        let usage = store.usage();
        assert_eq!((usage.dead_letters, usage.overflowed_total), (2, 1));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn dead_letters_past_their_retention_are_removed() {
        let (dir, store) = limited(|l| l.dead_letter_max_age = Duration::from_secs(60));
        store
            .dead_letter("a.b", None, b"old", 3, "no")
            .await
            .unwrap();
        store
            .dead_letter("a.b", None, b"new", 3, "no")
            .await
            .unwrap();
        let old = store.dead_letters(1).await.unwrap()[0].id;
        let two_minutes_ago = now_ms() - 120_000;
        store
            .run(move |db| {
                db.connection.execute(
                    "UPDATE dead_letters SET failed_at = ?2 WHERE id = ?1",
                    params![old, two_minutes_ago],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(store.expire_dead_letters().await.unwrap(), 1);
        assert_eq!(store.expire_dead_letters().await.unwrap(), 0);
        let kept = store.dead_letters(10).await.unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].payload, "new");
        let usage = store.usage();
        assert_eq!((usage.dead_letters, usage.expired_total), (1, 1));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_replay_into_a_full_outbox_keeps_the_dead_letter() {
        let (dir, store) = limited(|l| l.outbox_max_messages = 1);
        store.enqueue("a.b", None, b"waiting").await.unwrap();
        store
            .dead_letter("a.b", None, b"dead", 3, "no")
            .await
            .unwrap();
        let id = store.dead_letters(1).await.unwrap()[0].id;
        assert!(matches!(
            store.replay(id).await,
            Err(QueueError::OutboxFull { .. })
        ));
        assert_eq!(store.dead_letters(10).await.unwrap().len(), 1);
        assert_eq!(store.depths(), (1, 1));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_corrupt_file_is_reported_with_its_path() {
        let dir = std::env::temp_dir().join(format!("nexo-queue-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("queue.db");
        std::fs::write(
            &path,
            b"this is not a database, just some text that is long enough",
        )
        .unwrap();
        let message = match QueueStore::open(&path, 3) {
            Err(err) => err.to_string(),
            Ok(_) => panic!("opened a corrupt file"),
        };
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("not a database"), "{message}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
