//! The keyword index: an FTS5 table beside the memories, ranked by BM25.

use rusqlite::{Connection, params};

pub(super) fn create(conn: &Connection) -> rusqlite::Result<()> {
    // `remove_diacritics` so that "café" finds "cafe"; the owner is stored for
    // filtering only.
    conn.execute_batch(
        "CREATE VIRTUAL TABLE IF NOT EXISTS memory_keywords USING fts5(
             text, owner UNINDEXED, tokenize = 'unicode61 remove_diacritics 2')",
    )
}

pub(super) fn insert(conn: &Connection, id: i64, owner: &str, text: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO memory_keywords(rowid, text, owner) VALUES (?1, ?2, ?3)",
        params![id, text, owner],
    )?;
    Ok(())
}

pub(super) fn delete(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM memory_keywords WHERE rowid = ?1", [id])?;
    Ok(())
}

/// Ids of the `k` best matches of any word of `query`, best first; only memories of
/// `owners` when given.
pub(super) fn search(
    conn: &Connection,
    query: &str,
    owners: Option<&[&str]>,
    k: usize,
) -> rusqlite::Result<Vec<i64>> {
    let Some(expression) = match_expression(query) else {
        return Ok(Vec::new());
    };
    let mut ids = Vec::new();
    match owners {
        None => {
            let mut stmt = conn.prepare_cached(
                "SELECT rowid FROM memory_keywords WHERE memory_keywords MATCH ?1
                 ORDER BY rank LIMIT ?2",
            )?;
            for id in stmt.query_map(params![expression, k as i64], |r| r.get(0))? {
                ids.push(id?);
            }
        }
        Some(owners) => {
            let mut stmt = conn.prepare_cached(
                "SELECT rowid FROM memory_keywords WHERE memory_keywords MATCH ?1
                 AND owner IN (SELECT value FROM json_each(?2)) ORDER BY rank LIMIT ?3",
            )?;
            let owners = serde_json::to_string(owners).expect("strings serialise");
            for id in stmt.query_map(params![expression, owners, k as i64], |r| r.get(0))? {
                ids.push(id?);
            }
        }
    }
    Ok(ids)
}

/// The words of `query` as an FTS5 expression matching any of them. Each word is
/// quoted, so user text cannot inject FTS5 syntax (`NEAR`, `*`, column filters).
fn match_expression(query: &str) -> Option<String> {
    let words: Vec<String> = query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| format!("\"{}\"", w.to_lowercase()))
        .collect();
    (!words.is_empty()).then(|| words.join(" OR "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_every_word() {
        assert_eq!(
            match_expression("NEAR(a* b) \"x\"").as_deref(),
            Some("\"near\" OR \"a\" OR \"b\" OR \"x\"")
        );
        assert_eq!(match_expression(" ?! "), None);
    }
}
