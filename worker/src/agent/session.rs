//! Short-term memory: the last turns of each conversation, in process.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::llm::ChatMessage;

/// One exchange: the user's message and the agent's final answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub user: String,
    pub agent: String,
}

/// Conversation histories of one agent, each bounded to `max_turns` exchanges.
pub struct SessionStore {
    max_turns: usize,
    conversations: Mutex<HashMap<String, VecDeque<Exchange>>>,
}

impl SessionStore {
    pub fn new(max_turns: usize) -> Self {
        Self {
            max_turns,
            conversations: Mutex::new(HashMap::new()),
        }
    }

    /// The conversation so far, oldest first, as model messages.
    pub fn history(&self, conversation: &str) -> Vec<ChatMessage> {
        let conversations = self.conversations.lock().unwrap();
        conversations
            .get(conversation)
            .into_iter()
            .flatten()
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
        if self.max_turns == 0 {
            return;
        }
        let mut conversations = self.conversations.lock().unwrap();
        let turns = conversations.entry(conversation.to_owned()).or_default();
        turns.push_back(exchange);
        while turns.len() > self.max_turns {
            turns.pop_front();
        }
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
}
