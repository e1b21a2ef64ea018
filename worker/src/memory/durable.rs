//! Where an agent's memory is durable when several workers share a broker: a journal
//! of its changes and a snapshot of the whole file, both outside the worker (on
//! JetStream, see `ownership::store`). The worker's SQLite file is then a cache that a
//! new owner rebuilds from the newest snapshot and the journal after it.
//!
//! Appends are conditional on the last entry the writer knows. Only the owner appends,
//! one change at a time, so a mismatch means another worker took the agent over: the
//! change is refused ([`DurableError::Fenced`]) and the write rolled back.

use async_trait::async_trait;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurableError {
    /// The journal has an entry this writer did not write: another worker owns the
    /// agent now.
    #[error("another worker took this agent over (its journal moved past entry {expected})")]
    Fenced { expected: u64 },
    /// The broker did not answer, or refused for another reason; nothing was changed
    /// by this call, or it is unknown whether it was (a lost acknowledgement).
    #[error("memory journal: {0}")]
    Unavailable(String),
    #[error("memory journal: {0}")]
    Corrupt(String),
}

/// A snapshot: the memory file as exported, and the journal entry it includes last.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub seq: u64,
    pub bytes: Vec<u8>,
}

/// One agent's journal and snapshot.
#[async_trait]
pub trait Durable: Send + Sync {
    /// Appends `entry` if the agent's last entry is `last` (0: it has none); returns
    /// the new entry's sequence.
    async fn append(&self, entry: Vec<u8>, last: u64) -> Result<u64, DurableError>;

    /// The agent's entries after sequence `after`, oldest first.
    async fn entries_after(&self, after: u64) -> Result<Vec<(u64, Vec<u8>)>, DurableError>;

    /// The sequence of the agent's last entry (0: none).
    async fn last(&self) -> Result<u64, DurableError>;

    /// The newest snapshot, if one was stored.
    async fn snapshot(&self) -> Result<Option<Snapshot>, DurableError>;

    /// Stores `snapshot` as the newest and removes the journal entries it includes
    /// (all but its last, which later appends are conditional on).
    async fn store_snapshot(&self, snapshot: Snapshot) -> Result<(), DurableError>;
}
