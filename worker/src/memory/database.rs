//! One agent's memory file: opening it (with sqlite-vec registered), its schema
//! version, and running reads and writes on its single connection with errors that
//! name the file.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use rusqlite::{Connection, ErrorCode, Transaction};

use super::MemoryError;

/// Bumped when the schema changes incompatibly; a file of another version is refused
/// (or, on import, rejected) instead of being misread.
pub(super) const SCHEMA_VERSION: i64 = 1;

/// Why a write transaction failed.
#[derive(Debug)]
pub enum TxError {
    Sqlite(rusqlite::Error),
    Memory(MemoryError),
}

impl From<rusqlite::Error> for TxError {
    fn from(e: rusqlite::Error) -> Self {
        TxError::Sqlite(e)
    }
}

impl From<MemoryError> for TxError {
    fn from(e: MemoryError) -> Self {
        TxError::Memory(e)
    }
}

/// The SQLite file of one agent's memory. One connection, behind a mutex: SQLite
/// serialises writers anyway, and turns of one agent are few at a time.
pub struct Database {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl Database {
    /// Opens (creating if needed) the file at `path` in WAL mode. A file that is not
    /// a SQLite database, or of another schema version, is an error naming it.
    pub fn open(path: &Path) -> Result<Self, MemoryError> {
        register_sqlite_vec();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| MemoryError::Directory {
                path: dir.to_owned(),
                source,
            })?;
        }
        let open_error = |source| MemoryError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open_error)?;
        // Reading the header is what reveals a corrupt or foreign file.
        conn.pragma_update(None, "journal_mode", "WAL")
            .and_then(|_| conn.pragma_update(None, "synchronous", "NORMAL"))
            .and_then(|_| conn.busy_timeout(std::time::Duration::from_secs(5)))
            .map_err(open_error)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(open_error)?;
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(open_error)?;
        if tables > 0 && version != SCHEMA_VERSION {
            return Err(MemoryError::Schema {
                path: path.to_owned(),
                found: version,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one transaction: all of it is written, or none (a full disk rolls
    /// the whole write back).
    pub fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, MemoryError> {
        self.write_with(|tx| f(tx).map_err(TxError::Sqlite))
    }

    /// [`Database::write`] for a transaction that may also fail for another reason
    /// (a journal append refused): any error rolls the whole write back.
    pub fn write_with<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, TxError>,
    ) -> Result<T, MemoryError> {
        let mut conn = self.conn.lock().unwrap();
        let run = |conn: &mut Connection| {
            let tx = conn.transaction()?;
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        };
        run(&mut conn).map_err(|e| match e {
            TxError::Sqlite(e) => self.error(e),
            TxError::Memory(e) => e,
        })
    }

    /// Runs `f` on the connection (reads, or statements that manage their own
    /// transaction such as `VACUUM INTO`).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, MemoryError> {
        f(&mut self.conn.lock().unwrap()).map_err(|e| self.error(e))
    }

    /// A SQLite error of this file, with a full database told apart.
    pub fn error(&self, source: rusqlite::Error) -> MemoryError {
        match source.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => MemoryError::Full {
                path: self.path.clone(),
            },
            _ => MemoryError::Sqlite {
                path: self.path.clone(),
                source,
            },
        }
    }
}

/// Makes every connection opened afterwards in this process load sqlite-vec (`vec0`,
/// `vec_distance_l2`, …). Statically linked, so no extension file is loaded.
pub fn register_sqlite_vec() {
    static ONCE: Once = Once::new();
    ONCE.call_once(auto_extension);
}

/// The one place the workspace uses `unsafe`; see docs/adr/0007-sqlite-vec-registration.md.
#[allow(unsafe_code)]
fn auto_extension() {
    type Init = unsafe extern "C" fn(
        *mut rusqlite::ffi::sqlite3,
        *mut *mut std::ffi::c_char,
        *const rusqlite::ffi::sqlite3_api_routines,
    ) -> std::ffi::c_int;
    // SAFETY: `sqlite3_vec_init` is the C entry point of the statically linked
    // sqlite-vec, whose real signature is `Init` (the crate declares it without
    // arguments); SQLite calls it with exactly those arguments for each new connection.
    // Registering an auto-extension has no other precondition and may happen at any
    // time; `Once` keeps it to one registration.
    unsafe {
        let init =
            std::mem::transmute::<*const (), Init>(sqlite_vec::sqlite3_vec_init as *const ());
        rusqlite::ffi::sqlite3_auto_extension(Some(init));
    }
}
