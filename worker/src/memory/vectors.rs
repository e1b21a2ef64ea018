//! The vector index: a sqlite-vec `vec0` table keyed by memory id, with the owner of
//! each memory (an integer standing for its sender, 0 for the agent's own) as a
//! metadata column that a scoped search filters on.
//!
//! Not a partition key: `vec0` allocates storage per partition in chunks of 1,024
//! vectors, so an agent talking to thousands of people would reserve about 1.5 MB
//! (at 384 dimensions) per person, and inserts were 13 times slower in our
//! measurements. A metadata filter keeps the file compact at the cost of scanning
//! every vector, which exact search does anyway.

use rusqlite::{Connection, params};

pub(super) fn create(conn: &Connection, dimensions: usize) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE VIRTUAL TABLE IF NOT EXISTS memory_vectors USING vec0(
             embedding float[{dimensions}], owner integer)"
    ))
}

/// Drops the table, for a rebuild with other dimensions.
pub(super) fn drop(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("DROP TABLE IF EXISTS memory_vectors")
}

pub(super) fn insert(
    conn: &Connection,
    id: i64,
    owner: i64,
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
/// `owners` when given.
pub(super) fn search(
    conn: &Connection,
    vector: &[f32],
    owners: Option<&[i64]>,
    k: usize,
) -> rusqlite::Result<Vec<(i64, f64)>> {
    let mut sql =
        "SELECT rowid, distance FROM memory_vectors WHERE embedding MATCH ? AND k = ?".to_owned();
    let mut values: Vec<rusqlite::types::Value> = vec![as_blob(vector).into(), (k as i64).into()];
    if let Some(owners) = owners {
        if owners.is_empty() {
            return Ok(Vec::new());
        }
        let marks = vec!["?"; owners.len()].join(", ");
        sql.push_str(&format!(" AND owner IN ({marks})"));
        values.extend(owners.iter().map(|o| rusqlite::types::Value::from(*o)));
    }
    sql.push_str(" ORDER BY distance");
    conn.prepare_cached(&sql)?
        .query_map(rusqlite::params_from_iter(values), |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect()
}

/// The little-endian `f32` blob sqlite-vec reads.
pub fn as_blob(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|f| f.to_le_bytes()).collect()
}
