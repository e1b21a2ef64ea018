//! One agent's memory as the rest of the worker uses it: sessions, recall, the
//! memory tools' operations, "forget me", export and import. SQLite work runs on
//! tokio's blocking pool; embedding happens before a write transaction starts, so a
//! slow embedding server never holds the database lock.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::Utc;
use nexo_api::spec::{MemorySpec, RecallMode};
use prometheus::IntGauge;

use super::change::{self, Applied, Change, Embedded, Entry, Rules};
use super::database::{Database, SCHEMA_VERSION, TxError};
use super::durable::{Durable, DurableError, Snapshot};
use super::embedder::Embedder;
use super::item::{Hit, MemoryItem, MemoryKind, NewMemory};
use super::recall::{self, candidates, fuse};
use super::session_store::{Exchange, SessionPolicy, SessionStore};
use super::spent::{self, Spent};
use super::store::{self, Retention};
use super::{MemoryError, keyword, vectors};

pub use super::session_store::Session;

/// Texts embedded per request when every memory is embedded again.
const REINDEX_BATCH: usize = 64;
/// Times a take-over replays the journal and tries to append its marker while the
/// previous owner keeps appending (it has not noticed that it lost the lease yet).
const TAKE_OVER_ATTEMPTS: usize = 20;

pub struct AgentMemory {
    db: Arc<Database>,
    spec: MemorySpec,
    policy: SessionPolicy,
    embedder: Arc<dyn Embedder>,
    /// Set to the number of memories at open and after every write.
    items: Option<IntGauge>,
    /// Where every change is appended before it is committed to the file, when the
    /// memory is durable outside the worker (several workers on one NATS).
    durable: Option<Arc<dyn Durable>>,
    /// The file may be behind the journal: a change reached the journal but its
    /// local commit failed, or an append's outcome is unknown (its acknowledgement was
    /// lost). It catches up before the next change or lookup.
    behind: AtomicBool,
    /// The name this worker took the agent over under ([`AgentMemory::take_over`]).
    owner: std::sync::Mutex<Option<String>>,
    /// Another worker took the agent over: no change of this instance commits again.
    fenced: AtomicBool,
    /// Changes journalled since the last snapshot.
    since_snapshot: AtomicU64,
}

/// What a take-over found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TakeOver {
    /// The snapshot it restored (its last journal entry), if the file was older.
    pub restored: Option<u64>,
    /// Journal entries applied after the snapshot or the file.
    pub replayed: usize,
    /// The take-over marker's sequence: the epoch of this owner's writes.
    pub marker: u64,
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
            durable: None,
            behind: AtomicBool::new(false),
            owner: std::sync::Mutex::new(None),
            fenced: AtomicBool::new(false),
            since_snapshot: AtomicU64::new(0),
        })
    }

    /// Makes every change durable in `durable` before it is committed to the file.
    /// [`AgentMemory::take_over`] must run before the first change.
    pub fn with_durable(mut self, durable: Arc<dyn Durable>) -> Self {
        self.durable = Some(durable);
        self
    }

    /// Whether changes are journalled outside the worker.
    pub fn is_durable(&self) -> bool {
        self.durable.is_some()
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
                    change::create(tx)?;
                    spent::create(tx)?;
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

    fn rules(&self) -> Rules {
        Rules {
            policy: self.policy,
            retention: Retention {
                max_items: self.spec.long_term.max_items,
                max_age_days: self.spec.long_term.max_age_days,
            },
        }
    }

    /// Applies `change` to the file in one transaction and, when the memory is
    /// durable, appends it to the journal inside that transaction: the change counts
    /// only if both succeed. A journal that refuses it (another worker took the agent
    /// over, or NATS is unreachable) rolls the file back, so a stale owner's write
    /// never survives. The append waits for JetStream's acknowledgement on this
    /// blocking thread, holding the file's lock: changes of one agent are serialised,
    /// which the conditional append needs anyway.
    ///
    /// A refused append is either another owner's doing or this worker's own: an
    /// earlier append whose acknowledgement was lost did land. The journal tells them
    /// apart (every entry names its writer): the file catches up with its own entries
    /// and the change is tried once more; another writer's entry fences this instance
    /// for good.
    async fn commit(&self, change: Change) -> Result<Applied, MemoryError> {
        match self.commit_once(change.clone()).await {
            Err(MemoryError::Durable(DurableError::Fenced { .. }))
                if !self.fenced.load(Ordering::Acquire) =>
            {
                self.catch_up().await?;
                self.commit_once(change).await
            }
            result => result,
        }
    }

    async fn commit_once(&self, change: Change) -> Result<Applied, MemoryError> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(DurableError::Fenced { expected: 0 }.into());
        }
        if self.behind.load(Ordering::Acquire) {
            self.catch_up().await?;
        }
        let durable = self.durable.clone();
        let writer = self.owner.lock().unwrap().clone().unwrap_or_default();
        let rules = self.rules();
        let appended = Arc::new(AtomicBool::new(false));
        let flag = appended.clone();
        let runtime = tokio::runtime::Handle::current();
        let result = self
            .blocking(move |db| {
                db.write_with(|tx| {
                    let applied = change.apply(tx, &rules)?;
                    if let Some(durable) = &durable {
                        let last = change::journal_seq(tx)?;
                        let entry = Entry { writer, change };
                        let entry = serde_json::to_vec(&entry).expect("changes serialise");
                        let seq = runtime
                            .block_on(durable.append(entry, last))
                            .map_err(|e| TxError::Memory(e.into()))?;
                        flag.store(true, Ordering::Release);
                        change::set_journal_seq(tx, seq)?;
                    }
                    Ok(applied)
                })
            })
            .await;
        match &result {
            Ok(applied) => {
                if let Some(items) = applied.items {
                    self.counted(items);
                }
                if self.durable.is_some() {
                    self.since_snapshot.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(err) if appended.load(Ordering::Acquire) => {
                tracing::error!(file = %self.db.path().display(), error = %err, "a journalled change could not be committed to the memory file; it catches up from the journal");
                self.behind.store(true, Ordering::Release);
            }
            // The append may have landed although it looked failed.
            Err(MemoryError::Durable(_)) => self.behind.store(true, Ordering::Release),
            Err(_) => {}
        }
        result
    }

    /// Applies the journal entries the file does not have yet.
    async fn catch_up(&self) -> Result<u64, MemoryError> {
        let Some(durable) = self.durable.clone() else {
            return Ok(0);
        };
        let local = self
            .blocking(|db| db.read(|c| change::journal_seq(c)))
            .await?;
        let entries = durable.entries_after(local).await?;
        let owner = self.owner.lock().unwrap().clone();
        let (last, _) = match self.replay(entries, owner).await {
            Err(err @ MemoryError::Durable(DurableError::Fenced { .. })) => {
                tracing::warn!(file = %self.db.path().display(), "another worker took this agent over: its memory is read-only here");
                self.fenced.store(true, Ordering::Release);
                return Err(err);
            }
            result => result?,
        };
        self.behind.store(false, Ordering::Release);
        Ok(last)
    }

    /// Applies `entries` (those the file has are skipped) in one transaction; returns
    /// the last sequence applied and how many were. With `owner`, the entries must be
    /// that owner's own: another writer's entry among them fails the replay (and
    /// nothing is applied).
    async fn replay(
        &self,
        entries: Vec<(u64, Vec<u8>)>,
        owner: Option<String>,
    ) -> Result<(u64, usize), MemoryError> {
        let rules = self.rules();
        self.blocking(move |db| {
            db.write_with(|tx| {
                let mut last = change::journal_seq(tx)?;
                let mut applied = 0;
                for (seq, bytes) in entries {
                    if seq <= last {
                        continue;
                    }
                    let entry: Entry = serde_json::from_slice(&bytes).map_err(|e| {
                        TxError::Memory(
                            DurableError::Corrupt(format!("journal entry {seq}: {e}")).into(),
                        )
                    })?;
                    if owner.as_ref().is_some_and(|owner| *owner != entry.writer) {
                        return Err(TxError::Memory(
                            DurableError::Fenced { expected: last }.into(),
                        ));
                    }
                    entry.change.apply(tx, &rules)?;
                    last = seq;
                    applied += 1;
                }
                change::set_journal_seq(tx, last)?;
                Ok((last, applied))
            })
        })
        .await
    }

    /// Makes this worker the writer of the agent's memory: restores the newest
    /// snapshot when the file is older than it, applies the journal after it, and
    /// appends a take-over marker, after which a previous owner's appends are refused.
    /// Then prepares the file (tables, embedder). Without a journal it only prepares.
    ///
    /// A file that was never journalled, with no snapshot stored yet (memory from
    /// before the journal), is kept as it is and snapshotted, so it moves from now on.
    pub async fn take_over(&self, worker: &str) -> Result<TakeOver, MemoryError> {
        self.prepare().await?;
        let Some(durable) = self.durable.clone() else {
            return Ok(TakeOver::default());
        };
        let mut result = TakeOver::default();
        *self.owner.lock().unwrap() = Some(worker.to_owned());
        self.fenced.store(false, Ordering::Release);
        self.behind.store(false, Ordering::Release);
        let last = durable.last().await?;
        let mut local = self
            .blocking(|db| db.read(|c| change::journal_seq(c)))
            .await?;
        if local > last {
            // Journalled on a journal that is gone (NATS's storage was reset): what
            // the file holds is all there is.
            tracing::warn!(file = %self.db.path().display(), local, last, "the memory file is ahead of its journal; keeping the file");
            self.blocking(|db| db.write(|tx| change::set_journal_seq(tx, 0)))
                .await?;
            local = 0;
        }
        let snapshot = durable.snapshot().await?;
        let had_snapshot = snapshot.is_some();
        if let Some(snapshot) = snapshot.filter(|s| s.seq > local) {
            let seq = snapshot.seq;
            self.blocking(move |db| super::export::import(db, &snapshot.bytes))
                .await?;
            result.restored = Some(seq);
        }
        for _ in 0..TAKE_OVER_ATTEMPTS {
            let local = self
                .blocking(|db| db.read(|c| change::journal_seq(c)))
                .await?;
            let entries = durable.entries_after(local).await?;
            result.replayed += self.replay(entries, None).await?.1;
            // Caught up with whatever anyone wrote: the previous owner's entries are
            // this owner's history now.
            self.behind.store(false, Ordering::Release);
            self.fenced.store(false, Ordering::Release);
            match self
                .commit_once(Change::TakeOver {
                    worker: worker.to_owned(),
                })
                .await
            {
                Ok(_) => {
                    result.marker = self
                        .blocking(|db| db.read(|c| change::journal_seq(c)))
                        .await?;
                    break;
                }
                // The previous owner appended meanwhile: read that too.
                Err(MemoryError::Durable(DurableError::Fenced { .. })) => continue,
                Err(err) => return Err(err),
            }
        }
        if result.marker == 0 {
            return Err(DurableError::Unavailable(
                "the previous owner keeps writing; the take-over is tried again".to_owned(),
            )
            .into());
        }
        self.prepare().await?;
        self.since_snapshot
            .store(result.replayed as u64, Ordering::Relaxed);
        if !had_snapshot {
            self.store_snapshot().await?;
        }
        Ok(result)
    }

    /// Stores a snapshot of the whole file in the durable store and trims the journal
    /// up to it; returns the journal entry it includes last. Without a journal, 0.
    pub async fn store_snapshot(&self) -> Result<u64, MemoryError> {
        let Some(durable) = self.durable.clone() else {
            return Ok(0);
        };
        let taken = self.since_snapshot.load(Ordering::Relaxed);
        let (bytes, seq) = self.blocking(super::export::export_with_seq).await?;
        durable.store_snapshot(Snapshot { seq, bytes }).await?;
        // Changes made while the snapshot was stored are counted towards the next.
        let _ = self
            .since_snapshot
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(taken))
            });
        Ok(seq)
    }

    /// Changes journalled since the last snapshot.
    pub fn changes_since_snapshot(&self) -> u64 {
        self.since_snapshot.load(Ordering::Relaxed)
    }

    /// The answer already recorded for message `message_id` (it was delivered again,
    /// after its turn was written but before it was acknowledged).
    pub async fn answer_of(&self, message_id: &str) -> Result<Option<String>, MemoryError> {
        // The turn may have been journalled by an append that looked failed.
        if self.behind.load(Ordering::Acquire) {
            let _ = self.catch_up().await;
        }
        let message_id = message_id.to_owned();
        self.blocking(move |db| db.read(|c| change::answer_of(c, &message_id)))
            .await
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
        let ids = self.remember_all(vec![memory]).await?;
        Ok(ids.first().copied().unwrap_or_default())
    }

    /// Stores many memories in one transaction (imports, benchmarks).
    pub async fn remember_all(&self, memories: Vec<NewMemory>) -> Result<Vec<i64>, MemoryError> {
        let texts: Vec<String> = memories.iter().map(|m| m.text.clone()).collect();
        let vectors = self.embedder.embed(&texts).await?;
        let memories = memories
            .into_iter()
            .zip(vectors)
            .map(|(memory, vector)| Embedded { memory, vector })
            .collect();
        let applied = self
            .commit(Change::Remember {
                memories,
                at: Utc::now().timestamp_millis(),
            })
            .await?;
        Ok(applied.ids)
    }

    /// Writes an answered turn: to the conversation's history, to the answers kept
    /// for redeliveries and, when configured, to long-term memory, in one
    /// transaction. If it fails (a full disk, a journal that refuses it) nothing is
    /// written and the history stays as it was.
    pub async fn record_turn(
        &self,
        conversation: &str,
        sender: &str,
        source_id: &str,
        exchange: Exchange,
    ) -> Result<(), MemoryError> {
        self.record_turn_spent(conversation, sender, source_id, exchange, None)
            .await
    }

    /// What `day` spent so far (tokens and cost of the turns recorded that day).
    pub async fn spent_on(&self, day: &str) -> Result<Spent, MemoryError> {
        let day = day.to_owned();
        self.blocking(move |db| db.read(|c| spent::on(c, &day)))
            .await
    }

    /// [`Self::record_turn`], adding `spent` to its day in the same change: the turn
    /// and what it cost count together, or neither does.
    pub async fn record_turn_spent(
        &self,
        conversation: &str,
        sender: &str,
        source_id: &str,
        exchange: Exchange,
        spent: Option<Spent>,
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
        let long_term = match turn {
            Some(memory) => match self.embed_one(&memory.text).await {
                Ok(vector) => Some(Box::new(Embedded { memory, vector })),
                Err(err) => {
                    tracing::warn!(error = %err, "turn not stored in long-term memory");
                    None
                }
            },
            None => None,
        };
        self.commit(Change::Turn {
            conversation: conversation.to_owned(),
            sender: sender.to_owned(),
            message_id: source_id.to_owned(),
            exchange,
            long_term,
            at: Utc::now().timestamp_millis(),
            spent,
        })
        .await?;
        Ok(())
    }

    /// Deletes one memory; `false` when there is none with that id.
    pub async fn forget(&self, id: i64) -> Result<bool, MemoryError> {
        Ok(self.commit(Change::Forget { id }).await?.deleted > 0)
    }

    /// Deletes memory `id` if it belongs to `sender`; `false` when there is no such
    /// memory of that sender.
    pub async fn forget_own(&self, id: i64, sender: &str) -> Result<bool, MemoryError> {
        let change = Change::ForgetOwn {
            id,
            sender: sender.to_owned(),
        };
        Ok(self.commit(change).await?.deleted > 0)
    }

    /// "Forget me": deletes every memory and every history row of `sender`; returns
    /// how many rows went. With a journal, the entries that name the sender stay in
    /// the journal until the next snapshot, which is taken at once.
    pub async fn forget_sender(&self, sender: &str) -> Result<usize, MemoryError> {
        let change = Change::ForgetSender {
            sender: sender.to_owned(),
        };
        let deleted = self.commit(change).await?.deleted;
        if self.durable.is_some() {
            self.store_snapshot().await?;
        }
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
    ///
    /// With a journal the import counts once it is snapshotted (when this returns):
    /// the journal position of the file is kept, a marker appended after it (which
    /// also proves this worker still owns the agent), and a snapshot stored.
    pub async fn import(&self, bytes: Vec<u8>) -> Result<(), MemoryError> {
        let seq = self
            .blocking(move |db| {
                let seq = db.read(|c| change::journal_seq(c)).unwrap_or(0);
                super::export::import(db, &bytes)?;
                Ok(seq)
            })
            .await?;
        self.prepare().await?;
        if self.durable.is_some() {
            self.blocking(move |db| db.write(|tx| change::set_journal_seq(tx, seq)))
                .await?;
            let owner = self.owner.lock().unwrap().clone().unwrap_or_default();
            self.commit(Change::TakeOver { worker: owner }).await?;
            self.store_snapshot().await?;
        }
        Ok(())
    }
}

/// The owners a sender's turn may recall: the sender's own memories and the agent's.
pub fn owners(sender: &str) -> Vec<String> {
    vec![sender.to_owned(), String::new()]
}
