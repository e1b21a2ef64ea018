//! The `Envelope`: the one message shape that crosses the broker.
//!
//! Workers of two releases run side by side during a rolling upgrade, so the envelope
//! is read leniently: fields a reader does not know are ignored, and fields added
//! later have defaults. `version` says which schema the writer used.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Schema version this release writes. Adding an optional field does not change it;
/// it is raised only when an existing field changes meaning, so a reader can tell
/// which meaning the writer had in mind. An envelope without `version` is version 1.
pub const ENVELOPE_VERSION: u32 = 1;

/// How many times a message may be handed on from agent to agent (`A` asks `B`, `B`
/// asks `C`, …). Validation refuses delegation cycles within one catalog, but two
/// catalog revisions running side by side can still form one (`A → B` in the old,
/// `B → A` in the new); counting hops ends such a loop instead of letting it run
/// until every turn times out.
pub const MAX_DELEGATION_HOPS: u32 = 8;

/// A message between a channel, the broker and an agent.
///
/// `id` is unique per message and is what consumers de-duplicate on; a reply carries
/// the id of the message it answers in `correlation_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
// No `deny_unknown_fields`: a newer worker's envelope must still be read by an older
// one (see the module docs).
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Schema version of the writer ([`ENVELOPE_VERSION`]); absent means 1.
    #[serde(default = "first_version")]
    pub version: u32,
    pub id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// Subject the answer should go to instead of the channel's outbound subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Channel type (`webchat`, `webhook`, …).
    pub channel: String,
    /// Channel instance: the `Channel` resource's name.
    pub instance: String,
    /// Conversation (thread, chat) this message belongs to; sessions are keyed by it.
    pub conversation: String,
    pub sender: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    /// Set on a reply that reports a failure instead of an answer; `text` then holds
    /// what the user may be told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ReplyError>,
    /// How many agents handed this message on before it (0 for a user's message); see
    /// [`MAX_DELEGATION_HOPS`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hops: u32,
    /// W3C trace context of the span that sent this message (`traceparent`, and
    /// `tracestate` when there is one), so the turn it starts joins the sender's
    /// trace. Empty when the sender records no traces.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trace: BTreeMap<String, String>,
    /// Where the deltas of the answer's text go while the model writes it
    /// (`subject::reply_deltas`): set by a channel that can show partial text, and
    /// carried on to delegates so their text reaches the same place. Absent, nobody
    /// watches and none are sent. The reply itself still comes as always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
}

fn first_version() -> u32 {
    1
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Why a turn produced no answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplyError {
    pub kind: ErrorKind,
    /// Safe to show to the user: nothing from the model provider's error body.
    pub message: String,
}

/// The kind of a [`ReplyError`]. A kind added by a newer release reads as `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    /// The model did not answer in time.
    Timeout,
    /// The model service failed or refused the request.
    Model,
    /// The model was still calling tools after the agent's `maxSteps`.
    StepLimit,
    /// The agent's memory could not be read or written.
    Memory,
    /// The agent spent its daily budget (tokens or cost); nothing was asked of the
    /// model.
    Budget,
    #[serde(other)]
    Other,
}

impl Envelope {
    /// A new message from a user on a channel instance.
    pub fn inbound(
        channel: impl Into<String>,
        instance: impl Into<String>,
        conversation: impl Into<String>,
        sender: impl Into<String>,
        text: impl Into<String>,
    ) -> Self {
        Self {
            version: ENVELOPE_VERSION,
            id: Uuid::now_v7(),
            correlation_id: None,
            reply_to: None,
            channel: channel.into(),
            instance: instance.into(),
            conversation: conversation.into(),
            sender: sender.into(),
            text: text.into(),
            metadata: BTreeMap::new(),
            created_at: Utc::now(),
            error: None,
            hops: 0,
            trace: BTreeMap::new(),
            stream: None,
        }
    }

    /// The answer to this message, sent by `sender` (an agent), on the same channel
    /// instance and conversation.
    pub fn reply(&self, sender: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            correlation_id: Some(self.id),
            ..Self::inbound(
                self.channel.clone(),
                self.instance.clone(),
                self.conversation.clone(),
                sender,
                text,
            )
        }
    }

    /// The failure reply to this message: `text` says what went wrong in a sentence
    /// for the user (what a reader that does not know `error` shows), `error` the same
    /// for programs.
    pub fn error_reply(
        &self,
        sender: impl Into<String>,
        error: ReplyError,
        text: impl Into<String>,
    ) -> Self {
        Self {
            error: Some(error),
            ..self.reply(sender, text)
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).expect("envelope serialises")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trip_uses_camel_case() {
        let msg = Envelope::inbound("webhook", "api", "c1", "alice", "hi");
        let reply = msg.reply("default/concierge", "hello");
        let value: serde_json::Value = serde_json::from_slice(&reply.to_json()).unwrap();
        assert_eq!(value["correlationId"], json!(msg.id));
        assert!(value["createdAt"].is_string(), "{value}");
        assert_eq!(value["version"], ENVELOPE_VERSION);
        assert_eq!(Envelope::from_json(&reply.to_json()).unwrap(), reply);
        assert_eq!(reply.correlation_id, Some(msg.id));
    }

    /// What a later release might send: a higher version, fields this one does not
    /// know (top level and inside `error`), and an error kind it does not know.
    #[test]
    fn a_newer_envelope_is_read_and_unknown_fields_are_ignored() {
        let newer = json!({
            "version": ENVELOPE_VERSION + 1,
            "id": "0192d3c4-0000-7000-8000-000000000000",
            "channel": "webhook", "instance": "api", "conversation": "c", "sender": "s",
            "text": "t", "createdAt": "2026-01-01T00:00:00Z",
            "priority": "high", "attachments": [{"url": "https://x.invalid/a.png"}],
            "attempt": 3,
            "error": {"kind": "quotaExceeded", "message": "m", "retryInSeconds": 5},
        });
        let envelope = Envelope::from_json(newer.to_string().as_bytes()).unwrap();
        assert_eq!(envelope.version, ENVELOPE_VERSION + 1);
        assert_eq!(envelope.text, "t");
        assert_eq!(
            envelope.error,
            Some(ReplyError {
                kind: ErrorKind::Other,
                message: "m".into()
            })
        );
    }

    #[test]
    fn an_envelope_without_version_is_version_one() {
        let old = br#"{"id":"0192d3c4-0000-7000-8000-000000000000","channel":"x","instance":"y","conversation":"c","sender":"s","text":"t","createdAt":"2026-01-01T00:00:00Z"}"#;
        let envelope = Envelope::from_json(old).unwrap();
        assert_eq!(envelope.version, 1);
        assert_eq!(envelope.hops, 0);
        assert_eq!(envelope.error, None);
        assert!(envelope.trace.is_empty());
    }

    #[test]
    fn the_trace_context_is_written_only_when_there_is_one() {
        let mut msg = Envelope::inbound("webhook", "api", "c1", "alice", "hi");
        let value: serde_json::Value = serde_json::from_slice(&msg.to_json()).unwrap();
        assert!(value.get("trace").is_none(), "{value}");
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        msg.trace.insert("traceparent".into(), traceparent.into());
        let value: serde_json::Value = serde_json::from_slice(&msg.to_json()).unwrap();
        assert_eq!(value["trace"], json!({"traceparent": traceparent}));
        assert_eq!(Envelope::from_json(&msg.to_json()).unwrap(), msg);
    }

    #[test]
    fn an_error_reply_carries_a_typed_error_and_the_text() {
        let msg = Envelope::inbound("webhook", "api", "c1", "alice", "hi");
        let error = ReplyError {
            kind: ErrorKind::Timeout,
            message: "too slow".into(),
        };
        let reply = msg.error_reply("default/a", error, "Sorry: too slow");
        let value: serde_json::Value = serde_json::from_slice(&reply.to_json()).unwrap();
        assert_eq!(
            value["error"],
            json!({"kind": "timeout", "message": "too slow"})
        );
        assert_eq!(value["text"], "Sorry: too slow");
        assert!(value.get("metadata").is_none(), "{value}");
        assert_eq!(reply.correlation_id, Some(msg.id));
    }
}
