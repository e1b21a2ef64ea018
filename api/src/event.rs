//! Events an agent publishes on `agent.events.<agent>`: what it did, for dashboards,
//! audits and tests.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Schema version of [`AgentEvent`] this release writes; like the envelope's (see
/// [`crate::envelope::ENVELOPE_VERSION`]), raised only when a field changes meaning.
pub const EVENT_VERSION: u32 = 1;

/// Read leniently, as the envelope is: unknown fields are ignored and an unknown
/// `type` reads as [`AgentEventKind::Other`], so a newer worker's events do not break
/// an older reader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentEvent {
    /// Absent means 1.
    #[serde(default = "first_version")]
    pub version: u32,
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
    ToolCalled {
        tool: String,
        ok: bool,
    },
    TurnFinished {
        steps: u32,
        duration_ms: u64,
        /// The model that gave the turn's answer, as the spec names it (its `model`,
        /// or the provider for `scripted`); absent from older workers and for an
        /// answer repeated from memory.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
    },
    TurnFailed {
        error: String,
    },
    /// A model call went to the next model of the agent's list: `from` failed with
    /// `error` (after its retries), or its circuit breaker was open.
    ModelFellBack {
        from: String,
        to: String,
        error: String,
    },
    /// The turn was refused without a model call: the agent spent its daily budget.
    BudgetExceeded {
        /// The UTC day, `YYYY-MM-DD`.
        day: String,
        /// Tokens spent that day.
        tokens: u64,
        /// Cost that day, in the price table's currency.
        cost: f64,
        /// Which limit was reached: `tokensPerDay` or `costPerDay`.
        limit: String,
    },
    /// An event type of a newer release.
    #[serde(other)]
    Other,
}

fn first_version() -> u32 {
    1
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
            version: EVENT_VERSION,
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
            model: Some("m".into()),
        });
        let value: serde_json::Value = serde_json::from_slice(&finished.to_json()).unwrap();
        assert_eq!(
            value,
            json!({
                "version": 1,
                "agent": "default/a",
                "messageId": Uuid::nil(),
                "at": "2026-01-02T03:04:05Z",
                "type": "turnFinished",
                "steps": 2,
                "durationMs": 1500,
                "model": "m",
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
    fn a_newer_event_is_read() {
        let newer = json!({
            "version": 2, "agent": "default/a", "messageId": Uuid::nil(),
            "at": "2026-01-02T03:04:05Z", "type": "memoryCompacted", "items": 3,
        });
        let event: AgentEvent = serde_json::from_value(newer).unwrap();
        assert_eq!(event.kind, AgentEventKind::Other);
        let known = json!({
            "agent": "default/a", "messageId": Uuid::nil(), "at": "2026-01-02T03:04:05Z",
            "type": "toolCalled", "tool": "t", "ok": true, "durationMs": 4,
        });
        let event: AgentEvent = serde_json::from_value(known).unwrap();
        assert_eq!(event.version, 1);
        assert_eq!(
            event.kind,
            AgentEventKind::ToolCalled {
                tool: "t".into(),
                ok: true
            }
        );
    }

    #[test]
    fn the_schema_names_the_camel_case_field() {
        let schema = serde_json::to_string(&schemars::schema_for!(AgentEvent)).unwrap();
        assert!(schema.contains("\"durationMs\""), "{schema}");
        assert!(!schema.contains("duration_ms"), "{schema}");
    }
}
