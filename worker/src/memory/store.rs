//! The long-term store: the `memories` table and the two indexes kept beside it
//! ([`keyword`](super::keyword), [`vectors`](super::vectors)), written together in the
//! caller's transaction so they never disagree.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::item::{MemoryItem, MemoryKind, NewMemory};
use super::{keyword, vectors};

/// How much long-term memory is kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    pub max_items: u64,
    /// 0: no age limit.
    pub max_age_days: u32,
}

/// The memory tables; the vector table is created by [`ensure_vectors`] once the
/// dimensions are known.
pub(super) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS memory_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS memories (
             id INTEGER PRIMARY KEY,
             kind TEXT NOT NULL,
             text TEXT NOT NULL,
             sender TEXT,
             conversation TEXT,
             source_id TEXT,
             metadata TEXT NOT NULL DEFAULT '{}',
             created_at INTEGER NOT NULL
         );
         CREATE INDEX IF NOT EXISTS memories_sender ON memories(sender);
         CREATE TABLE IF NOT EXISTS memory_owners (
             id INTEGER PRIMARY KEY,
             sender TEXT NOT NULL UNIQUE
         );
         CREATE INDEX IF NOT EXISTS memories_created ON memories(created_at);",
    )?;
    keyword::create(conn)
}

/// Which embedder wrote the vectors (its id, which includes the dimensions).
pub(super) fn embedder_id(conn: &Connection) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT value FROM memory_meta WHERE key = 'embedder'",
        [],
        |r| r.get(0),
    )
    .optional()
}

/// Makes the vector table fit `embedder` (id) of `dimensions`. `true` when the table
/// was (re)created empty and every memory must be embedded again; the caller records
/// the embedder with [`set_embedder_id`] once that is done.
pub(super) fn ensure_vectors(
    conn: &Connection,
    embedder: &str,
    dimensions: usize,
) -> rusqlite::Result<bool> {
    let current = embedder_id(conn)?;
    conn.execute(
        "INSERT INTO memory_meta(key, value) VALUES ('dimensions', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [dimensions.to_string()],
    )?;
    if current.as_deref() == Some(embedder) {
        vectors::create(conn, dimensions)?;
        return Ok(false);
    }
    vectors::drop(conn)?;
    vectors::create(conn, dimensions)?;
    Ok(true)
}

/// The dimensions of the vector index, when the file records them.
pub(super) fn dimensions(conn: &Connection) -> rusqlite::Result<Option<usize>> {
    let value: Option<String> = conn
        .prepare_cached("SELECT value FROM memory_meta WHERE key = 'dimensions'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(value.and_then(|v| v.parse().ok()))
}

/// Forgets which embedder wrote the vectors: the next prepare embeds every memory
/// again.
pub(super) fn forget_embedder(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM memory_meta WHERE key = 'embedder'", [])?;
    Ok(())
}

/// Records that the vectors in the file are `embedder`'s.
pub(super) fn set_embedder_id(conn: &Connection, embedder: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO memory_meta(key, value) VALUES ('embedder', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [embedder],
    )?;
    Ok(())
}

/// The integer standing for `sender` in the vector index (0: the agent's own),
/// created on first use.
pub(super) fn owner_id(conn: &Connection, sender: Option<&str>) -> rusqlite::Result<i64> {
    let Some(sender) = sender else {
        return Ok(0);
    };
    conn.prepare_cached("INSERT INTO memory_owners(sender) VALUES (?1) ON CONFLICT DO NOTHING")?
        .execute([sender])?;
    conn.prepare_cached("SELECT id FROM memory_owners WHERE sender = ?1")?
        .query_row([sender], |r| r.get(0))
}

/// The owner ids of `senders` that have memories (`""` is the agent's own, 0).
pub(super) fn owner_ids(conn: &Connection, senders: &[&str]) -> rusqlite::Result<Vec<i64>> {
    let mut ids = Vec::new();
    let mut stmt = conn.prepare_cached("SELECT id FROM memory_owners WHERE sender = ?1")?;
    for sender in senders {
        if sender.is_empty() {
            ids.push(0);
        } else if let Some(id) = stmt.query_row([sender], |r| r.get(0)).optional()? {
            ids.push(id);
        }
    }
    Ok(ids)
}

pub(super) fn insert(
    conn: &Connection,
    memory: &NewMemory,
    vector: &[f32],
    now: DateTime<Utc>,
) -> rusqlite::Result<i64> {
    let id = insert_without_vector(conn, memory, now)?;
    vectors::insert(conn, id, owner_id(conn, memory.sender.as_deref())?, vector)?;
    Ok(id)
}

/// Stores a memory and its keyword index entry; its vector is added later (when
/// every memory is embedded again).
pub(super) fn insert_without_vector(
    conn: &Connection,
    memory: &NewMemory,
    now: DateTime<Utc>,
) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO memories(kind, text, sender, conversation, source_id, metadata, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        memory.kind.as_str(),
        memory.text,
        memory.sender,
        memory.conversation,
        memory.source_id,
        serde_json::to_string(&memory.metadata).expect("string maps serialise"),
        now.timestamp_millis(),
    ])?;
    let id = conn.last_insert_rowid();
    keyword::insert(
        conn,
        id,
        memory.sender.as_deref().unwrap_or(""),
        &memory.text,
    )?;
    Ok(id)
}

/// Deletes memories older than the age limit, then the oldest beyond the count
/// limit. Returns how many memories are left.
pub(super) fn prune(
    conn: &Connection,
    retention: Retention,
    now: DateTime<Utc>,
) -> rusqlite::Result<u64> {
    let mut doomed: Vec<i64> = Vec::new();
    if retention.max_age_days > 0 {
        let cutoff = now - chrono::Duration::days(retention.max_age_days.into());
        let mut stmt = conn.prepare_cached("SELECT id FROM memories WHERE created_at < ?1")?;
        for id in stmt.query_map([cutoff.timestamp_millis()], |r| r.get(0))? {
            doomed.push(id?);
        }
    }
    let mut count = count(conn)? - doomed.len() as u64;
    if count > retention.max_items {
        let mut stmt = conn.prepare_cached(
            "SELECT id FROM memories WHERE id NOT IN (SELECT value FROM json_each(?1))
             ORDER BY created_at, id LIMIT ?2",
        )?;
        let skip = serde_json::to_string(&doomed).expect("ids serialise");
        let extra = (count - retention.max_items) as i64;
        let more: Vec<i64> = stmt
            .query_map(params![skip, extra], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        count -= more.len() as u64;
        doomed.extend(more);
    }
    for id in &doomed {
        delete(conn, *id)?;
    }
    Ok(count)
}

pub(super) fn delete(conn: &Connection, id: i64) -> rusqlite::Result<bool> {
    let deleted = conn.execute("DELETE FROM memories WHERE id = ?1", [id])? > 0;
    if deleted {
        keyword::delete(conn, id)?;
        vectors::delete(conn, id)?;
    }
    Ok(deleted)
}

/// Deletes every memory of `sender`, and the sender's name from the owner table;
/// returns how many rows went.
pub(super) fn delete_sender(conn: &Connection, sender: &str) -> rusqlite::Result<usize> {
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM memories WHERE sender = ?1")?
        .query_map([sender], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in &ids {
        delete(conn, *id)?;
    }
    let owners = conn.execute("DELETE FROM memory_owners WHERE sender = ?1", [sender])?;
    Ok(ids.len() + owners)
}

/// The sender of memory `id`: `None` when there is no such memory, `Some(None)` for
/// the agent's own.
pub(super) fn sender_of(conn: &Connection, id: i64) -> rusqlite::Result<Option<Option<String>>> {
    conn.query_row("SELECT sender FROM memories WHERE id = ?1", [id], |r| {
        r.get(0)
    })
    .optional()
}

pub(super) fn count(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT count(*) FROM memories", [], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}

/// Memories with the given ids, in the order of `ids` (missing ones skipped).
pub(super) fn get(conn: &Connection, ids: &[i64]) -> rusqlite::Result<Vec<MemoryItem>> {
    let mut stmt = conn.prepare_cached(&format!(
        "{SELECT} WHERE id IN (SELECT value FROM json_each(?1))"
    ))?;
    let json = serde_json::to_string(ids).expect("ids serialise");
    let mut by_id: HashMap<i64, MemoryItem> = stmt
        .query_map([json], item)?
        .map(|r| r.map(|i| (i.id, i)))
        .collect::<Result<_, _>>()?;
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

/// The newest memories first, of `sender` when given.
pub(super) fn list(
    conn: &Connection,
    sender: Option<&str>,
    limit: usize,
) -> rusqlite::Result<Vec<MemoryItem>> {
    let mut stmt = conn.prepare_cached(&format!(
        "{SELECT} WHERE (?1 IS NULL OR sender = ?1) ORDER BY created_at DESC, id DESC LIMIT ?2"
    ))?;
    stmt.query_map(params![sender, limit as i64], item)?
        .collect()
}

/// Every memory's id, owner id and text, for embedding them again.
pub(super) fn texts(conn: &Connection) -> rusqlite::Result<Vec<(i64, i64, String)>> {
    conn.prepare(
        "SELECT m.id, coalesce(o.id, 0), m.text FROM memories m
         LEFT JOIN memory_owners o ON o.sender = m.sender ORDER BY m.id",
    )?
    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
    .collect()
}

const SELECT: &str =
    "SELECT id, kind, text, sender, conversation, source_id, metadata, created_at FROM memories";

fn item(row: &Row<'_>) -> rusqlite::Result<MemoryItem> {
    let metadata: String = row.get(6)?;
    let millis: i64 = row.get(7)?;
    Ok(MemoryItem {
        id: row.get(0)?,
        memory: NewMemory {
            kind: MemoryKind::parse(&row.get::<_, String>(1)?),
            text: row.get(2)?,
            sender: row.get(3)?,
            conversation: row.get(4)?,
            source_id: row.get(5)?,
            metadata: serde_json::from_str::<BTreeMap<String, String>>(&metadata)
                .unwrap_or_default(),
        },
        created_at: Utc
            .timestamp_millis_opt(millis)
            .single()
            .unwrap_or_default(),
    })
}
