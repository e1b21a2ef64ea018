//! Export and import of one agent's memory as a single SQLite file: the unit a
//! rebalance moves between workers, and what an operator backs up.

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use rusqlite::backup::Backup;

use super::MemoryError;
use super::database::{Database, SCHEMA_VERSION, register_sqlite_vec};

/// A consistent copy of the whole file (sessions, memories, both indexes), compacted
/// and without a WAL, as bytes.
pub(super) fn export(db: &Database) -> Result<Vec<u8>, MemoryError> {
    export_with_seq(db).map(|(bytes, _)| bytes)
}

/// [`export`], with the sequence of the last journal entry the copy includes (read
/// under the same lock, so no write comes between).
pub(super) fn export_with_seq(db: &Database) -> Result<(Vec<u8>, u64), MemoryError> {
    let tmp = TempFile::beside(db.path(), "export");
    let seq = db.read(|conn| {
        let seq = super::change::journal_seq(conn)?;
        conn.execute("VACUUM INTO ?1", [tmp.0.to_string_lossy()])?;
        Ok(seq)
    })?;
    let bytes = std::fs::read(&tmp.0).map_err(|source| MemoryError::Io {
        path: tmp.0.clone(),
        source,
    })?;
    Ok((bytes, seq))
}

/// Replaces everything in `db` with the export `bytes`, after checking they are a
/// memory file of this schema version. The live file is replaced page by page through
/// SQLite's backup API, so readers never see a half-written file.
pub(super) fn import(db: &Database, bytes: &[u8]) -> Result<(), MemoryError> {
    if !bytes.starts_with(b"SQLite format 3\0") {
        return Err(MemoryError::InvalidExport(
            "the file is not a SQLite database".to_owned(),
        ));
    }
    let tmp = TempFile::beside(db.path(), "import");
    std::fs::write(&tmp.0, bytes).map_err(|source| MemoryError::Io {
        path: tmp.0.clone(),
        source,
    })?;
    register_sqlite_vec();
    let invalid = |e: rusqlite::Error| MemoryError::InvalidExport(e.to_string());
    let source = Connection::open(&tmp.0).map_err(invalid)?;
    let version: i64 = source
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(invalid)?;
    if version != SCHEMA_VERSION {
        return Err(MemoryError::InvalidExport(format!(
            "schema version {version}, this worker reads version {SCHEMA_VERSION}"
        )));
    }
    let tables: i64 = source
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name IN ('memories', 'sessions')",
            [],
            |r| r.get(0),
        )
        .map_err(invalid)?;
    if tables != 2 {
        return Err(MemoryError::InvalidExport(
            "it has no memory tables".to_owned(),
        ));
    }
    db.read(|conn| {
        Backup::new(&source, conn)?.run_to_completion(256, std::time::Duration::ZERO, None)
    })
}

/// A file next to the memory file (same file system, so a full disk shows there too),
/// removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn beside(path: &Path, what: &str) -> Self {
        let name = format!(
            "{}.{what}-{}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy(),
            uuid::Uuid::new_v4()
        );
        Self(path.with_file_name(name))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
