//! What an agent's model calls spent per UTC day, in the agent's memory file: it
//! moves with the agent (the file is the snapshot, each turn's share travels in its
//! journal entry) and survives a restart, so a daily budget holds across both.

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// Days of spending kept; older rows are removed when a day is added to.
const DAYS_KEPT: i64 = 62;

/// Tokens and cost spent on one UTC day.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spent {
    /// `YYYY-MM-DD`.
    pub day: String,
    #[serde(default)]
    pub tokens: u64,
    /// In the price table's currency.
    #[serde(default)]
    pub cost: f64,
}

impl Spent {
    /// Nothing spent on `day` yet.
    pub fn on(day: impl Into<String>) -> Self {
        Self {
            day: day.into(),
            ..Self::default()
        }
    }

    /// Adds `other`'s tokens and cost (whatever its day).
    pub fn add(&mut self, other: &Spent) {
        self.tokens += other.tokens;
        self.cost += other.cost;
    }

    pub fn is_nothing(&self) -> bool {
        self.tokens == 0 && self.cost == 0.0
    }
}

pub(super) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS spent (
             day TEXT PRIMARY KEY,
             tokens INTEGER NOT NULL,
             cost REAL NOT NULL
         );",
    )
}

/// Adds `spent` to its day, and forgets days long past.
pub(super) fn add(conn: &Connection, spent: &Spent) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO spent(day, tokens, cost) VALUES (?1, ?2, ?3)
         ON CONFLICT(day) DO UPDATE SET tokens = tokens + excluded.tokens,
                                        cost = cost + excluded.cost",
    )?
    .execute(params![
        spent.day,
        i64::try_from(spent.tokens).unwrap_or(i64::MAX),
        spent.cost
    ])?;
    conn.prepare_cached(
        "DELETE FROM spent WHERE day NOT IN (SELECT day FROM spent ORDER BY day DESC LIMIT ?1)",
    )?
    .execute([DAYS_KEPT])?;
    Ok(())
}

/// What was spent on `day`.
pub(super) fn on(conn: &Connection, day: &str) -> rusqlite::Result<Spent> {
    let row: Option<(i64, f64)> = conn
        .prepare_cached("SELECT tokens, cost FROM spent WHERE day = ?1")?
        .query_row([day], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (tokens, cost) = row.unwrap_or_default();
    Ok(Spent {
        day: day.to_owned(),
        tokens: u64::try_from(tokens).unwrap_or_default(),
        cost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_adds_up_and_other_days_stay_apart() {
        let conn = Connection::open_in_memory().unwrap();
        create(&conn).unwrap();
        let spend = |day: &str, tokens, cost| Spent {
            day: day.into(),
            tokens,
            cost,
        };
        add(&conn, &spend("2026-12-01", 100, 0.5)).unwrap();
        add(&conn, &spend("2026-12-01", 20, 0.25)).unwrap();
        add(&conn, &spend("2026-12-02", 7, 0.0)).unwrap();
        assert_eq!(
            on(&conn, "2026-12-01").unwrap(),
            spend("2026-12-01", 120, 0.75)
        );
        assert_eq!(
            on(&conn, "2026-12-02").unwrap(),
            spend("2026-12-02", 7, 0.0)
        );
        assert_eq!(on(&conn, "2026-11-30").unwrap(), Spent::on("2026-11-30"));
    }
}
