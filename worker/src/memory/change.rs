//! One change to an agent's memory, as a value: what the worker applies to its SQLite
//! file and, when the memory is durable on NATS, what it appends to the agent's journal
//! first. Replaying the journal applies the same values in the same order to the same
//! snapshot, so it must give the same file: everything a change depends on travels in
//! it (the time it was made, the vectors already computed) and nothing is read from the
//! clock or an embedding server while applying.

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::item::NewMemory;
use super::session_store::{Exchange, SessionPolicy, SessionStore};
use super::spent::Spent;
use super::store::{self, Retention};

/// Messages whose answer is kept, so a message delivered again after a hand-off is
/// answered with what was already said instead of a second turn. About 5 MB at 500
/// characters an answer.
pub const MAX_ANSWERED: i64 = 10_000;

/// A memory with the vector it was embedded as.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Embedded {
    pub memory: NewMemory,
    pub vector: Vec<f32>,
}

/// A change, as journalled. Unknown fields are ignored (a newer worker may add some);
/// an unknown kind of change is an error: skipping it would lose memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "camelCase")]
pub enum Change {
    /// An answered turn: into the conversation's history, its answer kept for
    /// redeliveries, and into long-term memory when configured.
    #[serde(rename_all = "camelCase")]
    Turn {
        conversation: String,
        sender: String,
        message_id: String,
        exchange: Exchange,
        long_term: Option<Box<Embedded>>,
        /// Milliseconds since the epoch.
        at: i64,
        /// What the agent's model calls spent on this turn (and on failed turns
        /// before it), for its daily budget. Absent in entries of older workers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spent: Option<Spent>,
    },
    #[serde(rename_all = "camelCase")]
    Remember {
        memories: Vec<Embedded>,
        at: i64,
    },
    Forget {
        id: i64,
    },
    #[serde(rename_all = "camelCase")]
    ForgetOwn {
        id: i64,
        sender: String,
    },
    ForgetSender {
        sender: String,
    },
    /// A new owner took the agent over: nothing to apply, but appending it fences off
    /// the previous owner (its next append expects an older last entry and fails).
    TakeOver {
        worker: String,
    },
}

/// A journal entry: a change and the worker that wrote it. Every entry names its
/// writer so a worker can tell its own entries (an append whose acknowledgement was
/// lost) from another owner's, even after snapshots trimmed the journal: the last
/// entry always stays, and names whoever wrote last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub writer: String,
    #[serde(flatten)]
    pub change: Change,
}

/// What applying a change did.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    /// Memories in the long-term store afterwards, when the change may have changed
    /// their number.
    pub items: Option<u64>,
    /// Ids of the memories it stored.
    pub ids: Vec<i64>,
    /// Rows it deleted.
    pub deleted: usize,
}

/// The memory settings a change is applied with.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub policy: SessionPolicy,
    pub retention: Retention,
}

/// The tables this module keeps beside the memory tables.
pub(super) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS answered (
             id INTEGER PRIMARY KEY,
             message_id TEXT NOT NULL UNIQUE,
             reply TEXT NOT NULL
         );",
    )
}

impl Change {
    /// Applies the change in the caller's transaction.
    pub(super) fn apply(&self, conn: &Connection, rules: &Rules) -> rusqlite::Result<Applied> {
        let mut applied = Applied::default();
        match self {
            Change::Turn {
                conversation,
                sender,
                message_id,
                exchange,
                long_term,
                at,
                spent,
            } => {
                SessionStore::record(conn, &rules.policy, conversation, Some(sender), exchange)?;
                if let Some(spent) = spent {
                    super::spent::add(conn, spent)?;
                }
                conn.prepare_cached(
                    "INSERT INTO answered(message_id, reply) VALUES (?1, ?2)
                     ON CONFLICT(message_id) DO UPDATE SET reply = excluded.reply",
                )?
                .execute(params![message_id, exchange.agent])?;
                conn.prepare_cached(
                    "DELETE FROM answered WHERE id <= (SELECT max(id) FROM answered) - ?1",
                )?
                .execute([MAX_ANSWERED])?;
                if let Some(embedded) = long_term {
                    applied.ids.push(insert(conn, embedded, *at)?);
                    applied.items = Some(store::prune(conn, rules.retention, time(*at))?);
                }
            }
            Change::Remember { memories, at } => {
                for embedded in memories {
                    applied.ids.push(insert(conn, embedded, *at)?);
                }
                applied.items = Some(store::prune(conn, rules.retention, time(*at))?);
            }
            Change::Forget { id } => {
                applied.deleted = usize::from(store::delete(conn, *id)?);
                applied.items = Some(store::count(conn)?);
            }
            Change::ForgetOwn { id, sender } => {
                if let Some(Some(owner)) = store::sender_of(conn, *id)?
                    && owner == *sender
                {
                    applied.deleted = usize::from(store::delete(conn, *id)?);
                }
                applied.items = Some(store::count(conn)?);
            }
            Change::ForgetSender { sender } => {
                applied.deleted = store::delete_sender(conn, sender)?
                    + SessionStore::delete_sender(conn, sender)?
                    + conn.execute(
                        "DELETE FROM answered WHERE message_id IN (
                             SELECT source_id FROM memories WHERE sender = ?1)",
                        [sender],
                    )?;
                applied.items = Some(store::count(conn)?);
            }
            Change::TakeOver { .. } => {}
        }
        Ok(applied)
    }
}

/// Stores one memory. A vector of other dimensions than the file's index (a change
/// replayed after the embedder changed) is left out, and the file is marked for
/// embedding every memory again at the next prepare.
fn insert(conn: &Connection, embedded: &Embedded, at: i64) -> rusqlite::Result<i64> {
    let fits = store::dimensions(conn)?.is_none_or(|d| d == embedded.vector.len());
    if fits {
        return store::insert(conn, &embedded.memory, &embedded.vector, time(at));
    }
    store::forget_embedder(conn)?;
    store::insert_without_vector(conn, &embedded.memory, time(at))
}

fn time(millis: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(millis).unwrap_or_default()
}

/// The answer already given to message `message_id`, if its turn was recorded.
pub(super) fn answer_of(conn: &Connection, message_id: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT reply FROM answered WHERE message_id = ?1")?
        .query_row([message_id], |r| r.get(0))
        .optional()
}

/// The sequence of the last journal entry applied to this file (0: none, or a file
/// that was never journalled).
pub(super) fn journal_seq(conn: &Connection) -> rusqlite::Result<u64> {
    let value: Option<String> = conn
        .query_row(
            "SELECT value FROM memory_meta WHERE key = 'journal_seq'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
}

pub(super) fn set_journal_seq(conn: &Connection, seq: u64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO memory_meta(key, value) VALUES ('journal_seq', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [seq.to_string()],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a turn spent travels in its journal entry; an entry of an older worker,
    /// without it, still reads.
    #[test]
    fn a_turns_spending_is_journalled_and_older_entries_read() {
        let turn = Change::Turn {
            conversation: "c".into(),
            sender: "s".into(),
            message_id: "m".into(),
            exchange: Exchange {
                user: "hi".into(),
                agent: "ok".into(),
            },
            long_term: None,
            at: 1,
            spent: Some(Spent {
                day: "2026-12-01".into(),
                tokens: 18,
                cost: 0.5,
            }),
        };
        let json = serde_json::to_value(&turn).unwrap();
        assert_eq!(json["spent"]["tokens"], 18);
        assert_eq!(
            serde_json::from_value::<Change>(json.clone()).unwrap(),
            turn
        );
        let mut older = json;
        older.as_object_mut().unwrap().remove("spent");
        let Change::Turn { spent, .. } = serde_json::from_value(older).unwrap() else {
            panic!("a turn");
        };
        assert_eq!(spent, None);
    }
}
