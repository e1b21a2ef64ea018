//! What a memory is: a row of the long-term store.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Why a memory exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MemoryKind {
    /// Something the model chose to remember (`memory_remember`) or an import.
    Fact,
    /// A past exchange: the user's message and the answer.
    Turn,
}

impl MemoryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryKind::Fact => "fact",
            MemoryKind::Turn => "turn",
        }
    }

    pub fn parse(s: &str) -> Self {
        if s == "turn" {
            MemoryKind::Turn
        } else {
            MemoryKind::Fact
        }
    }
}

/// A memory to store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewMemory {
    pub kind: MemoryKind,
    pub text: String,
    /// Who it is about or from (the envelope's sender). `None`: the agent's own,
    /// recalled for everyone.
    pub sender: Option<String>,
    pub conversation: Option<String>,
    /// Id of the envelope it came from.
    pub source_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

impl NewMemory {
    pub fn fact(text: impl Into<String>) -> Self {
        Self {
            kind: MemoryKind::Fact,
            text: text.into(),
            sender: None,
            conversation: None,
            source_id: None,
            metadata: BTreeMap::new(),
        }
    }

    pub fn from_sender(mut self, sender: impl Into<String>) -> Self {
        self.sender = Some(sender.into());
        self
    }
}

/// A stored memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryItem {
    pub id: i64,
    #[serde(flatten)]
    pub memory: NewMemory,
    pub created_at: DateTime<Utc>,
}

/// A memory found by a search, with its fused (or single-method) score: higher is
/// closer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hit {
    #[serde(flatten)]
    pub item: MemoryItem,
    pub score: f64,
}
