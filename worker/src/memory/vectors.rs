//! The vector index: a sqlite-vec `vec0` table keyed by memory id, partitioned by
//! owner (the sender a memory belongs to, `""` for the agent's own) so that a scoped
//! search only scans that owner's vectors.

use rusqlite::{Connection, params};

pub(super) fn create(conn: &Connection, dimensions: usize) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE VIRTUAL TABLE IF NOT EXISTS memory_vectors USING vec0(
             owner text partition key, embedding float[{dimensions}])"
    ))
}

/// Drops the table, for a rebuild with other dimensions.
pub(super) fn drop(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("DROP TABLE IF EXISTS memory_vectors")
}

pub(super) fn insert(
    conn: &Connection,
    id: i64,
    owner: &str,
    vector: &[f32],
) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO memory_vectors(rowid, owner, embedding) VALUES (?1, ?2, ?3)")?
        .execute(params![id, owner, as_blob(vector)])?;
    Ok(())
}

pub(super) fn delete(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM memory_vectors WHERE rowid = ?1", [id])?;
    Ok(())
}

/// Ids and distances of the `k` nearest vectors, nearest first; only those of
/// `owners` when given (one KNN per owner partition, merged).
pub(super) fn search(
    conn: &Connection,
    vector: &[f32],
    owners: Option<&[&str]>,
    k: usize,
) -> rusqlite::Result<Vec<(i64, f64)>> {
    let blob = as_blob(vector);
    let mut found = Vec::new();
    match owners {
        None => {
            let mut stmt = conn.prepare_cached(
                "SELECT rowid, distance FROM memory_vectors
                 WHERE embedding MATCH ?1 AND k = ?2 ORDER BY distance",
            )?;
            for row in stmt.query_map(params![blob, k as i64], |r| Ok((r.get(0)?, r.get(1)?)))? {
                found.push(row?);
            }
        }
        Some(owners) => {
            let mut stmt = conn.prepare_cached(
                "SELECT rowid, distance FROM memory_vectors
                 WHERE embedding MATCH ?1 AND k = ?2 AND owner = ?3 ORDER BY distance",
            )?;
            for owner in owners {
                for row in stmt.query_map(params![blob, k as i64, owner], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })? {
                    found.push(row?);
                }
            }
            found.sort_by(|a: &(i64, f64), b| a.1.total_cmp(&b.1));
            found.truncate(k);
        }
    }
    Ok(found)
}

/// The little-endian `f32` blob sqlite-vec reads.
pub fn as_blob(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|f| f.to_le_bytes()).collect()
}
