//! `ReplyDelta`: a piece of an answer's text while the model writes it, published on
//! the subject an envelope's `stream` names.
//!
//! Deltas are a preview: they travel on core (non-durable) subjects, may be dropped
//! under pressure, and the reply envelope still carries the whole answer. A reader
//! shows them in order and starts the shown text over at a delta with `restart`: the
//! first delta of every model step has it (the text of a step that ended in tool calls
//! is void, and a delegate's text replaces its caller's), and so does a delta sent
//! when a model call starts over (a retry, a fallback model). Read leniently like the
//! envelope: unknown fields are ignored.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Schema version this release writes; absent means 1.
pub const DELTA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplyDelta {
    #[serde(default = "first_version")]
    pub version: u32,
    /// The message whose turn wrote this text: the message the stream was opened for,
    /// or a delegated message of that turn.
    pub message_id: Uuid,
    /// Counts the deltas of one `message_id` from 0; a gap means some were dropped.
    #[serde(default)]
    pub seq: u64,
    /// The model step (call) of the turn the text belongs to, from 1.
    #[serde(default)]
    pub step: u32,
    #[serde(default)]
    pub text: String,
    /// The text shown so far is void: show `text` in its place.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart: bool,
}

fn first_version() -> u32 {
    1
}

impl ReplyDelta {
    pub fn to_json(&self) -> Vec<u8> {
        // Plain data with string keys cannot fail to serialise.
        serde_json::to_vec(self).expect("delta serialises")
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
    fn round_trips_and_leaves_out_a_false_restart() {
        let delta = ReplyDelta {
            version: DELTA_VERSION,
            message_id: Uuid::now_v7(),
            seq: 3,
            step: 1,
            text: "Hel".into(),
            restart: false,
        };
        let value: serde_json::Value = serde_json::from_slice(&delta.to_json()).unwrap();
        assert_eq!(value["messageId"], json!(delta.message_id));
        assert!(value.get("restart").is_none(), "{value}");
        assert_eq!(ReplyDelta::from_json(&delta.to_json()).unwrap(), delta);
    }

    #[test]
    fn a_newer_delta_is_read_and_unknown_fields_are_ignored() {
        let newer = json!({
            "version": 2,
            "messageId": "0192d3c4-0000-7000-8000-000000000000",
            "text": "lo",
            "restart": true,
            "tokenLogprob": -0.2,
        });
        let delta = ReplyDelta::from_json(newer.to_string().as_bytes()).unwrap();
        assert_eq!(delta.version, 2);
        assert_eq!((delta.seq, delta.step), (0, 0));
        assert!(delta.restart);
        assert_eq!(delta.text, "lo");
    }
}
