//! Events an agent publishes on `agent.events.<agent>`: what it did, for dashboards,
//! audits and tests.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentEvent {
    /// `namespace/name` of the agent.
    pub agent: String,
    /// Id of the envelope the turn works on.
    pub message_id: Uuid,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: AgentEventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum AgentEventKind {
    TurnStarted,
    ToolCalled { tool: String, ok: bool },
    TurnFinished { steps: u32, duration_ms: u64 },
    TurnFailed { error: String },
}

impl AgentEvent {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("event serialises")
    }
}
