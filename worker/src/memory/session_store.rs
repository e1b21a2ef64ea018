//! Short-term memory: the last turns of each conversation, in the agent's memory file
//! so they survive a restart. Bounded per conversation by turns and by estimated
//! tokens; the oldest turns beyond the bounds are dropped or folded into a summary.

use nexo_api::spec::{HistoryOverflow, MemorySpec};
use rusqlite::{Connection, OptionalExtension, params};

use super::estimate_tokens;

/// Conversations an agent remembers at most; beyond that the least recently active
/// one is forgotten, so conversation ids chosen by clients cannot grow the file
/// without bound.
pub const MAX_CONVERSATIONS: usize = 10_000;

/// Characters of each side of a turn kept in a summary.
const SUMMARY_EXCERPT: usize = 160;

/// One exchange: the user's message and the agent's final answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Exchange {
    pub user: String,
    pub agent: String,
}

/// A conversation's history as the next turn sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Session {
    /// Extractive summary of turns that fell out of the history
    /// (`historyOverflow: summarize`).
    pub summary: Option<String>,
    /// The kept turns, oldest first.
    pub turns: Vec<Exchange>,
}

/// The bounds of conversation histories.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionPolicy {
    pub max_turns: usize,
    /// 0: no token bound.
    pub max_tokens: usize,
    pub overflow: HistoryOverflow,
}

impl SessionPolicy {
    pub fn from_spec(spec: &MemorySpec) -> Self {
        Self {
            max_turns: spec.history_turns as usize,
            max_tokens: spec.history_tokens as usize,
            overflow: spec.history_overflow,
        }
    }

    /// Longest summary, in estimated tokens: a quarter of the history's budget.
    fn summary_tokens(&self) -> usize {
        if self.max_tokens == 0 {
            1000
        } else {
            self.max_tokens / 4
        }
    }
}

/// The session tables of an agent's memory file.
pub struct SessionStore;

impl SessionStore {
    pub(super) fn create(conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sessions (
                 conversation TEXT PRIMARY KEY,
                 last_active INTEGER NOT NULL,
                 sender TEXT,
                 summary TEXT NOT NULL DEFAULT ''
             );
             CREATE INDEX IF NOT EXISTS sessions_active ON sessions(last_active);
             CREATE TABLE IF NOT EXISTS session_turns (
                 id INTEGER PRIMARY KEY,
                 conversation TEXT NOT NULL,
                 sender TEXT,
                 user TEXT NOT NULL,
                 agent TEXT NOT NULL,
                 tokens INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS session_turns_conversation
                 ON session_turns(conversation, id);
             CREATE INDEX IF NOT EXISTS session_turns_sender ON session_turns(sender);",
        )
    }

    pub(super) fn load(conn: &Connection, conversation: &str) -> rusqlite::Result<Session> {
        let summary: Option<String> = conn
            .query_row(
                "SELECT summary FROM sessions WHERE conversation = ?1",
                [conversation],
                |r| r.get(0),
            )
            .optional()?
            .filter(|s: &String| !s.is_empty());
        let mut stmt = conn.prepare_cached(
            "SELECT user, agent FROM session_turns WHERE conversation = ?1 ORDER BY id",
        )?;
        let turns = stmt
            .query_map([conversation], |r| {
                Ok(Exchange {
                    user: r.get(0)?,
                    agent: r.get(1)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Session { summary, turns })
    }

    /// Appends `exchange` to `conversation` and applies the bounds, in the caller's
    /// transaction.
    pub(super) fn record(
        conn: &Connection,
        policy: &SessionPolicy,
        conversation: &str,
        sender: Option<&str>,
        exchange: &Exchange,
    ) -> rusqlite::Result<()> {
        if policy.max_turns == 0 {
            return Ok(());
        }
        let updated = conn
            .prepare_cached(
                "UPDATE sessions SET sender = ?2,
                     last_active = (SELECT max(last_active) + 1 FROM sessions)
                 WHERE conversation = ?1",
            )?
            .execute(params![conversation, sender])?;
        let created = updated == 0;
        if created {
            conn.prepare_cached(
                "INSERT INTO sessions(conversation, sender, last_active)
                 VALUES (?1, ?2, (SELECT coalesce(max(last_active), 0) + 1 FROM sessions))",
            )?
            .execute(params![conversation, sender])?;
        }
        let tokens = estimate_tokens(&exchange.user) + estimate_tokens(&exchange.agent);
        conn.prepare_cached(
            "INSERT INTO session_turns(conversation, sender, user, agent, tokens)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            conversation,
            sender,
            exchange.user,
            exchange.agent,
            tokens as i64
        ])?;
        Self::trim(conn, policy, conversation)?;
        // Only a new conversation can take the count over the cap.
        if created {
            Self::cap(conn)?;
        }
        Ok(())
    }

    /// Forgets the least recently active conversations beyond [`MAX_CONVERSATIONS`].
    fn cap(conn: &Connection) -> rusqlite::Result<()> {
        let offset = MAX_CONVERSATIONS as i64;
        conn.prepare_cached(
            "DELETE FROM session_turns WHERE conversation IN (
                 SELECT conversation FROM sessions ORDER BY last_active DESC LIMIT -1 OFFSET ?1)",
        )?
        .execute([offset])?;
        conn.prepare_cached(
            "DELETE FROM sessions WHERE conversation IN (
                 SELECT conversation FROM sessions ORDER BY last_active DESC LIMIT -1 OFFSET ?1)",
        )?
        .execute([offset])?;
        Ok(())
    }

    /// Removes the oldest turns while the conversation is over its bounds, keeping at
    /// least the newest turn.
    fn trim(conn: &Connection, policy: &SessionPolicy, conversation: &str) -> rusqlite::Result<()> {
        // Ids and sizes only: the text is read for the dropped turns, and only to
        // summarise them.
        let turns: Vec<(i64, usize)> = conn
            .prepare_cached(
                "SELECT id, tokens FROM session_turns WHERE conversation = ?1 ORDER BY id",
            )?
            .query_map([conversation], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as usize))
            })?
            .collect::<Result<_, _>>()?;
        let mut total: usize = turns.iter().map(|t| t.1).sum();
        let mut count = turns.len();
        let mut dropped = Vec::new();
        for (id, tokens) in &turns {
            let over_tokens = policy.max_tokens > 0 && total > policy.max_tokens;
            if count <= 1 || (count <= policy.max_turns && !over_tokens) {
                break;
            }
            total -= tokens;
            count -= 1;
            dropped.push(*id);
        }
        if dropped.is_empty() {
            return Ok(());
        }
        if policy.overflow == HistoryOverflow::Summarize {
            let old: String = conn.query_row(
                "SELECT summary FROM sessions WHERE conversation = ?1",
                [conversation],
                |r| r.get(0),
            )?;
            let mut lines: Vec<String> = old.lines().map(str::to_owned).collect();
            let mut text =
                conn.prepare_cached("SELECT user, agent FROM session_turns WHERE id = ?1")?;
            for id in &dropped {
                let (user, agent): (String, String) =
                    text.query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
                lines.push(format!(
                    "- user: {} / answer: {}",
                    excerpt(&user),
                    excerpt(&agent)
                ));
            }
            // Oldest summary lines go first when it outgrows its share.
            while lines.len() > 1 && estimate_tokens(&lines.join("\n")) > policy.summary_tokens() {
                lines.remove(0);
            }
            conn.execute(
                "UPDATE sessions SET summary = ?2 WHERE conversation = ?1",
                params![conversation, lines.join("\n")],
            )?;
        }
        let mut delete = conn.prepare_cached("DELETE FROM session_turns WHERE id = ?1")?;
        for id in &dropped {
            delete.execute([id])?;
        }
        Ok(())
    }

    /// Deletes the turns `sender` took part in, and the conversations (with their
    /// summaries) `sender` spoke in last; returns how many rows went.
    pub(super) fn delete_sender(conn: &Connection, sender: &str) -> rusqlite::Result<usize> {
        let turns = conn.execute("DELETE FROM session_turns WHERE sender = ?1", [sender])?;
        let sessions = conn.execute("DELETE FROM sessions WHERE sender = ?1", [sender])?;
        Ok(turns + sessions)
    }
}

/// The first sentence of `text`, at most [`SUMMARY_EXCERPT`] characters.
fn excerpt(text: &str) -> String {
    let first = text
        .split_inclusive(['.', '!', '?', '\n'])
        .next()
        .unwrap_or("")
        .trim();
    let mut out: String = first.chars().take(SUMMARY_EXCERPT).collect();
    if first.chars().count() > SUMMARY_EXCERPT {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SessionPolicy {
        SessionPolicy::from_spec(&MemorySpec::default())
    }

    fn exchange(text: &str) -> Exchange {
        Exchange {
            user: text.to_owned(),
            agent: format!("re: {text}"),
        }
    }

    fn conversations(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn the_least_recently_active_conversation_goes_beyond_the_cap() {
        let mut conn = Connection::open_in_memory().unwrap();
        SessionStore::create(&conn).unwrap();
        let tx = conn.transaction().unwrap();
        let policy = policy();
        for n in 0..MAX_CONVERSATIONS {
            SessionStore::record(&tx, &policy, &format!("c{n}"), None, &exchange("hi")).unwrap();
        }
        // Speaking again in the oldest conversation makes it the newest.
        SessionStore::record(&tx, &policy, "c0", Some("ada"), &exchange("again")).unwrap();
        assert_eq!(conversations(&tx), MAX_CONVERSATIONS as i64);
        SessionStore::record(&tx, &policy, "new", None, &exchange("hi")).unwrap();
        assert_eq!(conversations(&tx), MAX_CONVERSATIONS as i64);
        assert!(SessionStore::load(&tx, "c1").unwrap().turns.is_empty());
        assert_eq!(SessionStore::load(&tx, "c0").unwrap().turns.len(), 2);
        assert_eq!(SessionStore::load(&tx, "new").unwrap().turns.len(), 1);
    }
}
