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
// `rename_all` names the variants (the `type` tag); `rename_all_fields` the fields
// inside them.
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "type"
)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(kind: AgentEventKind) -> AgentEvent {
        AgentEvent {
            agent: "default/a".into(),
            message_id: Uuid::nil(),
            at: DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
                .unwrap()
                .with_timezone(&Utc),
            kind,
        }
    }

    #[test]
    fn every_field_is_camel_case() {
        let finished = event(AgentEventKind::TurnFinished {
            steps: 2,
            duration_ms: 1500,
        });
        let value: serde_json::Value = serde_json::from_slice(&finished.to_json()).unwrap();
        assert_eq!(
            value,
            json!({
                "agent": "default/a",
                "messageId": Uuid::nil(),
                "at": "2026-01-02T03:04:05Z",
                "type": "turnFinished",
                "steps": 2,
                "durationMs": 1500,
            })
        );
        let back: AgentEvent = serde_json::from_value(value).unwrap();
        assert_eq!(back, finished);

        let tool = event(AgentEventKind::ToolCalled {
            tool: "t".into(),
            ok: true,
        });
        let value: serde_json::Value = serde_json::from_slice(&tool.to_json()).unwrap();
        assert_eq!(value["type"], "toolCalled");
        assert_eq!(value["tool"], "t");
    }

    #[test]
    fn the_schema_names_the_camel_case_field() {
        let schema = serde_json::to_string(&schemars::schema_for!(AgentEvent)).unwrap();
        assert!(schema.contains("\"durationMs\""), "{schema}");
        assert!(!schema.contains("duration_ms"), "{schema}");
    }
}
