//! Short-term memory: the last turns of each conversation, in process.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use crate::llm::ChatMessage;

/// One exchange: the user's message and the agent's final answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub user: String,
    pub agent: String,
}

/// Conversations an agent remembers at most; beyond that the least recently active
/// one is forgotten, so conversation ids chosen by clients cannot grow memory without
/// bound.
pub const MAX_CONVERSATIONS: usize = 10_000;

/// Conversation histories of one agent, each bounded to `max_turns` exchanges, at most
/// `max_conversations` of them (least recently active forgotten first).
pub struct SessionStore {
    max_turns: usize,
    max_conversations: usize,
    inner: Mutex<Conversations>,
}

#[derive(Default)]
struct Conversations {
    by_id: HashMap<String, Conversation>,
    /// Conversation ids by the tick of their last exchange, oldest first.
    recency: BTreeMap<u64, String>,
    tick: u64,
}

struct Conversation {
    last_active: u64,
    turns: VecDeque<Exchange>,
}

impl SessionStore {
    pub fn new(max_turns: usize) -> Self {
        Self::with_limit(max_turns, MAX_CONVERSATIONS)
    }

    pub fn with_limit(max_turns: usize, max_conversations: usize) -> Self {
        Self {
            max_turns,
            max_conversations,
            inner: Mutex::default(),
        }
    }

    /// The conversation so far, oldest first, as model messages.
    pub fn history(&self, conversation: &str) -> Vec<ChatMessage> {
        let inner = self.inner.lock().unwrap();
        inner
            .by_id
            .get(conversation)
            .into_iter()
            .flat_map(|c| &c.turns)
            .flat_map(|e| {
                [
                    ChatMessage::User(e.user.clone()),
                    ChatMessage::Assistant {
                        text: e.agent.clone(),
                        tool_calls: Vec::new(),
                    },
                ]
            })
            .collect()
    }

    pub fn record(&self, conversation: &str, exchange: Exchange) {
        if self.max_turns == 0 || self.max_conversations == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        inner.tick += 1;
        let tick = inner.tick;
        let entry = inner
            .by_id
            .entry(conversation.to_owned())
            .or_insert_with(|| Conversation {
                last_active: tick,
                turns: VecDeque::new(),
            });
        inner.recency.remove(&entry.last_active);
        entry.last_active = tick;
        inner.recency.insert(tick, conversation.to_owned());
        entry.turns.push_back(exchange);
        while entry.turns.len() > self.max_turns {
            entry.turns.pop_front();
        }
        while inner.by_id.len() > self.max_conversations {
            let Some((_, oldest)) = inner.recency.pop_first() else {
                break;
            };
            inner.by_id.remove(&oldest);
        }
    }

    /// How many conversations are remembered.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_turns_per_conversation() {
        let store = SessionStore::new(2);
        for i in 0..3 {
            store.record(
                "a",
                Exchange {
                    user: format!("q{i}"),
                    agent: format!("r{i}"),
                },
            );
        }
        store.record(
            "b",
            Exchange {
                user: "other".into(),
                agent: "x".into(),
            },
        );
        let history = store.history("a");
        assert_eq!(history.len(), 4);
        assert_eq!(history[0], ChatMessage::User("q1".into()));
        assert_eq!(store.history("b").len(), 2);
        assert!(store.history("none").is_empty());
    }

    fn exchange(i: usize) -> Exchange {
        Exchange {
            user: format!("q{i}"),
            agent: format!("r{i}"),
        }
    }

    #[test]
    fn forgets_the_least_recently_active_conversation_beyond_the_limit() {
        let store = SessionStore::with_limit(5, 3);
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            store.record(id, exchange(i));
        }
        // `a` speaks again, so `b` is now the least recently active.
        store.record("a", exchange(3));
        store.record("d", exchange(4));
        assert_eq!(store.len(), 3);
        assert!(store.history("b").is_empty());
        assert_eq!(store.history("a").len(), 4);
        assert_eq!(store.history("c").len(), 2);
        assert_eq!(store.history("d").len(), 2);

        for i in 0..1000 {
            store.record(&format!("many-{i}"), exchange(i));
        }
        assert_eq!(store.len(), 3);
        assert_eq!(store.history("many-999").len(), 2);
        assert!(store.history("a").is_empty());
    }

    #[test]
    fn the_default_limit_bounds_conversations() {
        let store = SessionStore::new(1);
        for i in 0..MAX_CONVERSATIONS + 10 {
            store.record(&i.to_string(), exchange(i));
        }
        assert_eq!(store.len(), MAX_CONVERSATIONS);
        assert!(store.history("0").is_empty());
    }
}
