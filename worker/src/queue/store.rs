//! The SQLite file behind the outbox and the dead-letter queue.
//!
//! One thread owns the connection; async callers send it closures. Consecutive
//! enqueues are written in one transaction (group commit): a burst costs one fsync
//! per batch, and every caller is answered only after its batch is durable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, params};
use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

/// Enqueues committed together at most.
const MAX_GROUP: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("queue database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("queue database thread has stopped")]
    Stopped,
}

/// A message to publish, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub seq: i64,
    pub subject: String,
    pub reply: Option<String>,
    pub payload: Vec<u8>,
    /// Unique per stored message; JetStream de-duplicates re-sends by it.
    pub msg_id: String,
    pub attempts: u32,
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

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

enum Command {
    Enqueue {
        subject: String,
        reply: Option<String>,
        payload: Vec<u8>,
        done: oneshot::Sender<Result<(), QueueError>>,
    },
    Run(Job),
}

/// Handle to the queue database; cheap to clone.
#[derive(Clone)]
pub struct QueueStore {
    commands: mpsc::Sender<Command>,
    /// Signalled after every committed batch of enqueues.
    enqueued: Arc<Notify>,
    max_attempts: u32,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl QueueStore {
    /// Opens (or creates) the database at `path`. A file that is not a usable SQLite
    /// database is reported with its path, not a panic.
    pub fn open(path: &Path, max_attempts: u32) -> Result<Self, QueueError> {
        let open_error = |source| QueueError::Open {
            path: path.to_owned(),
            source,
        };
        let mut connection = Connection::open(path).map_err(open_error)?;
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
                 );",
            )
            .map_err(open_error)?;
        let (commands, receiver) = mpsc::channel(4 * MAX_GROUP);
        let enqueued = Arc::new(Notify::new());
        let notify = enqueued.clone();
        std::thread::Builder::new()
            .name("nexo-queue-db".to_owned())
            .spawn(move || serve(&mut connection, receiver, &notify))
            .map_err(|e| QueueError::Open {
                path: path.to_owned(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(Self {
            commands,
            enqueued,
            max_attempts,
        })
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Waits until new messages were enqueued (returns at once if some were enqueued
    /// since the last wait).
    pub async fn wait_enqueued(&self) {
        self.enqueued.notified().await;
    }

    /// Stores a message to publish; returns once it is on disk.
    pub async fn enqueue(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
    ) -> Result<(), QueueError> {
        let (done, result) = oneshot::channel();
        self.commands
            .send(Command::Enqueue {
                subject: subject.to_owned(),
                reply: reply.map(str::to_owned),
                payload: payload.to_vec(),
                done,
            })
            .await
            .map_err(|_| QueueError::Stopped)?;
        result.await.map_err(|_| QueueError::Stopped)?
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, QueueError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |connection| {
            let _ = tx.send(job(connection));
        });
        self.commands
            .send(Command::Run(job))
            .await
            .map_err(|_| QueueError::Stopped)?;
        Ok(rx.await.map_err(|_| QueueError::Stopped)??)
    }

    /// The oldest `limit` messages waiting to be published, in order.
    pub async fn peek(&self, limit: usize) -> Result<Vec<Pending>, QueueError> {
        self.run(move |c| {
            let mut statement = c.prepare_cached(
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
            rows.collect()
        })
        .await
    }

    /// Forgets messages that were published.
    pub async fn remove(&self, seqs: Vec<i64>) -> Result<(), QueueError> {
        self.run(move |c| {
            let tx = c.transaction()?;
            {
                let mut statement = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
                for seq in seqs {
                    statement.execute([seq])?;
                }
            }
            tx.commit()
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
        let max_attempts = self.max_attempts;
        self.run(move |c| {
            let tx = c.transaction()?;
            let attempts: u32 = tx.query_row(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?2 WHERE seq = ?1 RETURNING attempts",
                params![seq, error],
                |row| row.get(0),
            )?;
            let outcome = if attempts >= max_attempts {
                tx.execute(
                    "INSERT INTO dead_letters (subject, reply, payload, attempts, error, source, failed_at)
                     SELECT subject, reply, payload, attempts, last_error, 'publish', ?2 FROM outbox WHERE seq = ?1",
                    params![seq, now_ms()],
                )?;
                tx.execute("DELETE FROM outbox WHERE seq = ?1", [seq])?;
                AfterFailure::DeadLettered
            } else {
                AfterFailure::WillRetry
            };
            tx.commit()?;
            Ok(outcome)
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
        self.run(move |c| {
            c.execute(
                "INSERT INTO dead_letters (subject, reply, payload, attempts, error, source, failed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'consume', ?6)",
                params![subject, reply, payload, attempts, error, now_ms()],
            )
            .map(|_| ())
        })
        .await
    }

    /// Dead letters, oldest first.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.run(move |c| {
            let mut statement = c.prepare_cached(
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
            rows.collect()
        })
        .await
    }

    /// Moves a dead letter back into the outbox, to be published again with a fresh
    /// attempt count. `false` when there is no such dead letter.
    pub async fn replay(&self, id: i64) -> Result<bool, QueueError> {
        let replayed = self
            .run(move |c| {
                let tx = c.transaction()?;
                let moved = tx.execute(
                    "INSERT INTO outbox (subject, reply, payload, msg_id, created_at)
                     SELECT subject, reply, payload, ?2, ?3 FROM dead_letters WHERE id = ?1",
                    params![id, Uuid::now_v7().to_string(), now_ms()],
                )?;
                tx.execute("DELETE FROM dead_letters WHERE id = ?1", [id])?;
                tx.commit()?;
                Ok(moved == 1)
            })
            .await?;
        if replayed {
            self.enqueued.notify_one();
        }
        Ok(replayed)
    }

    /// Deletes a dead letter; `false` when there is no such dead letter.
    pub async fn delete_dead_letter(&self, id: i64) -> Result<bool, QueueError> {
        self.run(move |c| Ok(c.execute("DELETE FROM dead_letters WHERE id = ?1", [id])? == 1))
            .await
    }

    /// Messages waiting to be published, and dead letters.
    pub async fn depths(&self) -> Result<(u64, u64), QueueError> {
        self.run(|c| {
            let outbox: i64 = c.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))?;
            let dead: i64 = c.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))?;
            Ok((outbox as u64, dead as u64))
        })
        .await
    }
}

/// The database thread: runs jobs in order, committing runs of enqueues together.
fn serve(connection: &mut Connection, mut commands: mpsc::Receiver<Command>, enqueued: &Notify) {
    let mut next = commands.blocking_recv();
    while let Some(command) = next.take() {
        match command {
            Command::Run(job) => job(connection),
            Command::Enqueue {
                subject,
                reply,
                payload,
                done,
            } => {
                let mut group = vec![(subject, reply, payload, done)];
                while group.len() < MAX_GROUP {
                    match commands.try_recv() {
                        Ok(Command::Enqueue {
                            subject,
                            reply,
                            payload,
                            done,
                        }) => {
                            group.push((subject, reply, payload, done));
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let result = write_group(connection, &group);
                for (.., done) in group {
                    let _ = done.send(
                        result
                            .as_ref()
                            .map(|_| ())
                            .map_err(|e| QueueError::Sqlite(clone_error(e))),
                    );
                }
                if result.is_ok() {
                    enqueued.notify_one();
                }
            }
        }
        if next.is_none() {
            next = commands.blocking_recv();
        }
    }
}

type Entry = (
    String,
    Option<String>,
    Vec<u8>,
    oneshot::Sender<Result<(), QueueError>>,
);

fn write_group(connection: &mut Connection, group: &[Entry]) -> Result<(), rusqlite::Error> {
    let tx = connection.transaction()?;
    {
        let mut statement = tx.prepare_cached(
            "INSERT INTO outbox (subject, reply, payload, msg_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let now = now_ms();
        for (subject, reply, payload, _) in group {
            statement.execute(params![
                subject,
                reply,
                payload,
                Uuid::now_v7().to_string(),
                now
            ])?;
        }
    }
    tx.commit()
}

/// One failed commit answers every caller of the group; rusqlite errors are not Clone.
fn clone_error(error: &rusqlite::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(error.to_string().into())
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
        assert_eq!(store.depths().await.unwrap(), (2, 1));
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
        assert_eq!(store.depths().await.unwrap(), (3, 0));
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
