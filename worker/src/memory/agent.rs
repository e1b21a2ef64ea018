//! One agent's memory as the rest of the worker uses it: sessions, recall, the
//! memory tools' operations, "forget me", export and import. SQLite work runs on
//! tokio's blocking pool; embedding happens before a write transaction starts, so a
//! slow embedding server never holds the database lock.

use std::path::Path;
use std::sync::Arc;

use chrono::Utc;
use nexo_api::spec::{MemorySpec, RecallMode};
use prometheus::IntGauge;

use super::database::{Database, SCHEMA_VERSION};
use super::embedder::Embedder;
use super::item::{Hit, MemoryItem, MemoryKind, NewMemory};
use super::recall::{self, candidates, fuse};
use super::session_store::{Exchange, SessionPolicy, SessionStore};
use super::store::{self, Retention};
use super::{MemoryError, keyword, vectors};

pub use super::session_store::Session;

/// Texts embedded per request when every memory is embedded again.
const REINDEX_BATCH: usize = 64;

pub struct AgentMemory {
    db: Arc<Database>,
    spec: MemorySpec,
    policy: SessionPolicy,
    embedder: Arc<dyn Embedder>,
    /// Set to the number of memories at open and after every write.
    items: Option<IntGauge>,
}

impl AgentMemory {
    /// Opens (or creates) the memory file at `path` and makes it ready for use
    /// ([`AgentMemory::open_file`], then [`AgentMemory::prepare`]).
    pub async fn open(
        path: &Path,
        spec: &MemorySpec,
        embedder: Arc<dyn Embedder>,
    ) -> Result<Self, MemoryError> {
        let memory = Self::open_file(path, spec, embedder).await?;
        memory.prepare().await?;
        Ok(memory)
    }

    /// Opens (or creates) the memory file at `path` without changing it: a corrupt
    /// file, or one this worker cannot create, is an error naming it. Another
    /// instance of the agent may still be using the file; [`AgentMemory::prepare`]
    /// must run before this one reads or writes memories, once that instance stopped.
    pub async fn open_file(
        path: &Path,
        spec: &MemorySpec,
        embedder: Arc<dyn Embedder>,
    ) -> Result<Self, MemoryError> {
        let path = path.to_owned();
        let db = tokio::task::spawn_blocking(move || Database::open(&path))
            .await
            .map_err(|e| MemoryError::Task(e.to_string()))??;
        Ok(Self {
            db: Arc::new(db),
            spec: spec.clone(),
            policy: SessionPolicy::from_spec(spec),
            embedder,
            items: None,
        })
    }

    /// Keeps `gauge` at the number of memories (from [`AgentMemory::prepare`] on).
    pub fn with_items_gauge(mut self, gauge: IntGauge) -> Self {
        self.items = Some(gauge);
        self
    }

    /// Reports `items` memories.
    fn counted(&self, items: u64) {
        if let Some(gauge) = &self.items {
            gauge.set(items as i64);
        }
    }

    /// Creates missing tables and makes the vector table fit the embedder: when the
    /// vectors in the file came from another embedder, every memory is embedded again
    /// (which may take long). The new embedder is recorded only once every memory has
    /// its vector, so an interrupted run starts over at the next open.
    pub async fn prepare(&self) -> Result<(), MemoryError> {
        let id = self.embedder.id();
        let dimensions = self.embedder.dimensions();
        let stale = self
            .blocking(move |db| {
                db.write(|tx| {
                    store::create(tx)?;
                    SessionStore::create(tx)?;
                    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
                    store::ensure_vectors(tx, &id, dimensions)
                })
            })
            .await?;
        if stale {
            self.reindex().await?;
            let id = self.embedder.id();
            self.blocking(move |db| db.write(|tx| store::set_embedder_id(tx, &id)))
                .await?;
        }
        self.counted(self.count().await?);
        Ok(())
    }

    /// Embeds every memory again (after a change of embedder, or an import from a
    /// worker that used another one).
    async fn reindex(&self) -> Result<(), MemoryError> {
        let rows = self.blocking(|db| db.read(|c| store::texts(c))).await?;
        if !rows.is_empty() {
            tracing::info!(file = %self.db.path().display(), memories = rows.len(), "embedding memories again for a new embedder");
        }
        for chunk in rows.chunks(REINDEX_BATCH) {
            let texts: Vec<String> = chunk.iter().map(|r| r.2.clone()).collect();
            let vectors = self.embedder.embed(&texts).await?;
            let chunk = chunk.to_vec();
            self.blocking(move |db| {
                db.write(|tx| {
                    for ((id, owner, _), vector) in chunk.iter().zip(&vectors) {
                        vectors::insert(tx, *id, *owner, vector)?;
                    }
                    Ok(())
                })
            })
            .await?;
        }
        Ok(())
    }

    pub fn spec(&self) -> &MemorySpec {
        &self.spec
    }

    pub fn path(&self) -> &Path {
        self.db.path()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, MemoryError> + Send + 'static,
    ) -> Result<T, MemoryError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| MemoryError::Task(e.to_string()))?
    }

    async fn embed_one(&self, text: &str) -> Result<Vec<f32>, MemoryError> {
        let mut vectors = self.embedder.embed(&[text.to_owned()]).await?;
        Ok(vectors.pop().unwrap_or_default())
    }

    fn retention(&self) -> Retention {
        Retention {
            max_items: self.spec.long_term.max_items,
            max_age_days: self.spec.long_term.max_age_days,
        }
    }

    /// The history of `conversation` for the next turn.
    pub async fn session(&self, conversation: &str) -> Result<Session, MemoryError> {
        let conversation = conversation.to_owned();
        self.blocking(move |db| db.read(|c| SessionStore::load(c, &conversation)))
            .await
    }

    /// Memories closest to `query`: `k` at most, by `mode`. With `owners`, only
    /// memories of those senders (`""` for the agent's own).
    pub async fn search(
        &self,
        query: &str,
        mode: RecallMode,
        k: usize,
        owners: Option<Vec<String>>,
    ) -> Result<Vec<Hit>, MemoryError> {
        if k == 0 || query.trim().is_empty() {
            return Ok(Vec::new());
        }
        let vector = match mode {
            RecallMode::Keyword => None,
            RecallMode::Vector | RecallMode::Hybrid => Some(self.embed_one(query).await?),
        };
        let query = query.to_owned();
        self.blocking(move |db| {
            db.read(|conn| {
                let senders: Option<Vec<&str>> = owners
                    .as_ref()
                    .map(|o| o.iter().map(String::as_str).collect());
                let senders = senders.as_deref();
                let owner_ids = senders.map(|s| store::owner_ids(conn, s)).transpose()?;
                let owner_ids = owner_ids.as_deref();
                let scored: Vec<(i64, f64)> = match (mode, vector) {
                    (RecallMode::Keyword, _) | (_, None) => {
                        let ids = keyword::search(conn, &query, senders, k)?;
                        fuse(&[&ids], k)
                    }
                    (RecallMode::Vector, Some(v)) => vectors::search(conn, &v, owner_ids, k)?
                        .into_iter()
                        .map(|(id, distance)| (id, 1.0 - distance / 2.0))
                        .collect(),
                    (RecallMode::Hybrid, Some(v)) => {
                        let n = candidates(k);
                        let words = keyword::search(conn, &query, senders, n)?;
                        let near: Vec<i64> = vectors::search(conn, &v, owner_ids, n)?
                            .into_iter()
                            .map(|(id, _)| id)
                            .collect();
                        fuse(&[&words, &near], k)
                    }
                };
                let ids: Vec<i64> = scored.iter().map(|s| s.0).collect();
                let items = store::get(conn, &ids)?;
                Ok(items
                    .into_iter()
                    .zip(scored)
                    .map(|(item, (_, score))| Hit { item, score })
                    .collect())
            })
        })
        .await
    }

    /// The recall block for the system prompt of a turn answering `query` from
    /// `sender` in `conversation`: memories of that sender and the agent's own, by the
    /// configured mode, within the token budget. Past turns of `conversation` itself
    /// are left out (the history already carries them). `None` when long-term memory
    /// is off or nothing fits.
    pub async fn recall_for_prompt(
        &self,
        query: &str,
        sender: &str,
        conversation: &str,
    ) -> Result<Option<String>, MemoryError> {
        let recall = &self.spec.long_term.recall;
        if !self.spec.long_term.enabled || recall.k == 0 {
            return Ok(None);
        }
        let k = recall.k as usize;
        let mut hits = self
            .search(query, recall.mode, candidates(k), Some(owners(sender)))
            .await?;
        hits.retain(|h| {
            h.item.memory.kind != MemoryKind::Turn
                || h.item.memory.conversation.as_deref() != Some(conversation)
        });
        hits.truncate(k);
        Ok(recall::prompt_block(&hits, recall.token_budget as usize))
    }

    /// Stores `memory`; returns its id.
    pub async fn remember(&self, memory: NewMemory) -> Result<i64, MemoryError> {
        let vector = self.embed_one(&memory.text).await?;
        let retention = self.retention();
        let (id, items) = self
            .blocking(move |db| {
                db.write(|tx| {
                    let now = Utc::now();
                    let id = store::insert(tx, &memory, &vector, now)?;
                    Ok((id, store::prune(tx, retention, now)?))
                })
            })
            .await?;
        self.counted(items);
        Ok(id)
    }

    /// Stores many memories in one transaction (imports, benchmarks).
    pub async fn remember_all(&self, memories: Vec<NewMemory>) -> Result<Vec<i64>, MemoryError> {
        let texts: Vec<String> = memories.iter().map(|m| m.text.clone()).collect();
        let vectors = self.embedder.embed(&texts).await?;
        let retention = self.retention();
        let (ids, items) = self
            .blocking(move |db| {
                db.write(|tx| {
                    let now = Utc::now();
                    let ids = memories
                        .iter()
                        .zip(&vectors)
                        .map(|(m, v)| store::insert(tx, m, v, now))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok((ids, store::prune(tx, retention, now)?))
                })
            })
            .await?;
        self.counted(items);
        Ok(ids)
    }

    /// Writes an answered turn: to the conversation's history and, when configured,
    /// to long-term memory, in one transaction. If it fails (a full disk) nothing is
    /// written and the history stays as it was.
    pub async fn record_turn(
        &self,
        conversation: &str,
        sender: &str,
        source_id: &str,
        exchange: Exchange,
    ) -> Result<(), MemoryError> {
        let long_term = &self.spec.long_term;
        let turn = (long_term.enabled && long_term.record_turns).then(|| NewMemory {
            kind: MemoryKind::Turn,
            text: format!("User: {}\nAnswer: {}", exchange.user, exchange.agent),
            sender: Some(sender.to_owned()),
            conversation: Some(conversation.to_owned()),
            source_id: Some(source_id.to_owned()),
            metadata: Default::default(),
        });
        // Without an embedding the turn still goes into the history; only its
        // long-term copy is skipped (an embedding server that is down must not make
        // every turn fail).
        let vector = match &turn {
            Some(turn) => self
                .embed_one(&turn.text)
                .await
                .inspect_err(
                    |err| tracing::warn!(error = %err, "turn not stored in long-term memory"),
                )
                .ok(),
            None => None,
        };
        let policy = self.policy;
        let retention = self.retention();
        let conversation = conversation.to_owned();
        let sender = sender.to_owned();
        let items = self
            .blocking(move |db| {
                db.write(|tx| {
                    SessionStore::record(tx, &policy, &conversation, Some(&sender), &exchange)?;
                    match (&turn, &vector) {
                        (Some(turn), Some(vector)) => {
                            let now = Utc::now();
                            store::insert(tx, turn, vector, now)?;
                            store::prune(tx, retention, now).map(Some)
                        }
                        _ => Ok(None),
                    }
                })
            })
            .await?;
        if let Some(items) = items {
            self.counted(items);
        }
        Ok(())
    }

    /// Deletes one memory; `false` when there is none with that id.
    pub async fn forget(&self, id: i64) -> Result<bool, MemoryError> {
        let (deleted, items) = self
            .blocking(move |db| db.write(|tx| Ok((store::delete(tx, id)?, store::count(tx)?))))
            .await?;
        self.counted(items);
        Ok(deleted)
    }

    /// Deletes memory `id` if it belongs to `sender`; `false` when there is no such
    /// memory of that sender.
    pub async fn forget_own(&self, id: i64, sender: &str) -> Result<bool, MemoryError> {
        let sender = sender.to_owned();
        let (deleted, items) = self
            .blocking(move |db| {
                db.write(|tx| {
                    let deleted = match store::sender_of(tx, id)? {
                        Some(Some(owner)) if owner == sender => store::delete(tx, id)?,
                        _ => false,
                    };
                    Ok((deleted, store::count(tx)?))
                })
            })
            .await?;
        self.counted(items);
        Ok(deleted)
    }

    /// "Forget me": deletes every memory and every history row of `sender`; returns
    /// how many rows went.
    pub async fn forget_sender(&self, sender: &str) -> Result<usize, MemoryError> {
        let sender = sender.to_owned();
        let (deleted, items) = self
            .blocking(move |db| {
                db.write(|tx| {
                    let deleted = store::delete_sender(tx, &sender)?
                        + SessionStore::delete_sender(tx, &sender)?;
                    Ok((deleted, store::count(tx)?))
                })
            })
            .await?;
        self.counted(items);
        Ok(deleted)
    }

    /// Rows (memories, owner entry and history) that still name `sender`.
    pub async fn rows_of_sender(&self, sender: &str) -> Result<u64, MemoryError> {
        let sender = sender.to_owned();
        self.blocking(move |db| {
            db.read(|c| {
                c.query_row(
                    "SELECT (SELECT count(*) FROM memories WHERE sender = ?1)
                          + (SELECT count(*) FROM memory_owners WHERE sender = ?1)
                          + (SELECT count(*) FROM session_turns WHERE sender = ?1)
                          + (SELECT count(*) FROM sessions WHERE sender = ?1)",
                    [&sender],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n as u64)
            })
        })
        .await
    }

    /// The newest memories, of `sender` when given.
    pub async fn list(
        &self,
        sender: Option<String>,
        limit: usize,
    ) -> Result<Vec<MemoryItem>, MemoryError> {
        self.blocking(move |db| db.read(|c| store::list(c, sender.as_deref(), limit)))
            .await
    }

    /// Caps the file at `pages` database pages (SQLite's `max_page_count`, per
    /// connection): a write that would grow it further fails as if the disk were
    /// full; `None` lifts the cap.
    ///
    /// Test support only: the integration tests (`tests/memory.rs`,
    /// `tests/memory_worker.rs`) simulate a full disk with it. It is public because
    /// they link the crate like any user, and hidden from the docs because nothing
    /// in the worker calls it.
    #[doc(hidden)]
    pub async fn cap_pages(&self, pages: Option<u64>) -> Result<u64, MemoryError> {
        self.blocking(move |db| {
            db.read(|c| {
                let current: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                let cap = pages.map_or(i64::from(u32::MAX), |p| p as i64).max(current);
                c.query_row(&format!("PRAGMA max_page_count = {cap}"), [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n as u64)
            })
        })
        .await
    }

    pub async fn count(&self) -> Result<u64, MemoryError> {
        self.blocking(|db| db.read(|c| store::count(c))).await
    }

    /// The whole memory as one SQLite file.
    pub async fn export(&self) -> Result<Vec<u8>, MemoryError> {
        self.blocking(super::export::export).await
    }

    /// Replaces the whole memory with an export. Memories embedded by another
    /// embedder are embedded again with this one.
    pub async fn import(&self, bytes: Vec<u8>) -> Result<(), MemoryError> {
        self.blocking(move |db| super::export::import(db, &bytes))
            .await?;
        self.prepare().await
    }
}

/// The owners a sender's turn may recall: the sender's own memories and the agent's.
pub fn owners(sender: &str) -> Vec<String> {
    vec![sender.to_owned(), String::new()]
}
