//! The `Envelope`: the one message shape that crosses the broker.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A message between a channel, the broker and an agent.
///
/// `id` is unique per message and is what consumers de-duplicate on; a reply carries
/// the id of the message it answers in `correlation_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Envelope {
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    /// Delivery attempt, starting at 1.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
}

fn first_attempt() -> u32 {
    1
}

/// A file or media item that came with a message, by reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Attachment {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
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
            id: Uuid::now_v7(),
            correlation_id: None,
            reply_to: None,
            channel: channel.into(),
            instance: instance.into(),
            conversation: conversation.into(),
            sender: sender.into(),
            text: text.into(),
            attachments: Vec::new(),
            metadata: BTreeMap::new(),
            created_at: Utc::now(),
            attempt: 1,
        }
    }

    /// The answer to this message, sent by `sender` (an agent), on the same channel
    /// instance and conversation.
    pub fn reply(&self, sender: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            id: Uuid::now_v7(),
            correlation_id: Some(self.id),
            reply_to: None,
            channel: self.channel.clone(),
            instance: self.instance.clone(),
            conversation: self.conversation.clone(),
            sender: sender.into(),
            text: text.into(),
            attachments: Vec::new(),
            metadata: BTreeMap::new(),
            created_at: Utc::now(),
            attempt: 1,
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

    #[test]
    fn json_round_trip_uses_camel_case() {
        let msg = Envelope::inbound("webhook", "api", "c1", "alice", "hi");
        let reply = msg.reply("default/concierge", "hello");
        let json = String::from_utf8(reply.to_json()).unwrap();
        assert!(json.contains("\"correlationId\""), "{json}");
        assert!(json.contains("\"createdAt\""), "{json}");
        assert_eq!(Envelope::from_json(json.as_bytes()).unwrap(), reply);
        assert_eq!(reply.correlation_id, Some(msg.id));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = Envelope::from_json(br#"{"id":"0192d3c4-0000-7000-8000-000000000000","channel":"x","instance":"y","conversation":"c","sender":"s","text":"t","createdAt":"2026-01-01T00:00:00Z","bogus":1}"#).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
