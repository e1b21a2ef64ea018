//! Agent memory: the recent turns of each conversation (persisted, so they survive a
//! restart) and a long-term store of facts and past turns, recalled by keyword (FTS5),
//! by vector (sqlite-vec) or both. One SQLite file per agent,
//! `<dataDir>/memory/<namespace>_<name>.db`, which is also the unit of export.
//! See docs/memory.md.

mod agent;
mod change;
mod database;
mod durable;
pub mod embedder;
mod export;
mod item;
mod keyword;
mod recall;
mod session_store;
mod spent;
mod store;
mod vectors;

use std::path::{Path, PathBuf};

use nexo_api::ResourceKey;

pub use agent::{AgentMemory, owners};
pub use change::MAX_ANSWERED;
pub use database::register_sqlite_vec;
pub use durable::{Durable, DurableError, Snapshot};
pub use embedder::{EmbedError, Embedder};
pub use item::{Hit, MemoryItem, NewMemory};
pub use session_store::Exchange;
pub use spent::Spent;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the memory directory {}: {source}", path.display())]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the memory database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the memory database {} has schema version {found}, this worker reads version {}",
        path.display(),
        database::SCHEMA_VERSION
    )]
    Schema { path: PathBuf, found: i64 },
    #[error("the memory database {} is full", path.display())]
    Full { path: PathBuf },
    #[error("memory database {}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("memory file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a memory export: {0}")]
    InvalidExport(String),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error("a memory task stopped: {0}")]
    Task(String),
}

/// Where the memory file of `agent` lives under the worker's data directory. Names
/// and namespaces are DNS labels, so `_` cannot occur in either and the name is
/// unambiguous.
pub fn database_path(data_dir: &Path, agent: &ResourceKey) -> PathBuf {
    data_dir
        .join("memory")
        .join(format!("{}_{}.db", agent.namespace, agent.name))
}

/// Tokens a text costs, estimated as one per 4 characters (rounded up): close enough
/// for budgets without shipping a tokenizer per model.
pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4)
}
