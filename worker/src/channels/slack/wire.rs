//! What the Events API `POST`s, read leniently (unknown fields ignored).
//! api.slack.com/apis/events-api#callback-field, api.slack.com/events/message

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Request {
    /// Sent once when the Request URL is set: answer with its `challenge`.
    UrlVerification { challenge: String },
    EventCallback {
        event_id: String,
        #[serde(default)]
        team_id: String,
        event: Box<Event>,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
pub(super) struct Event {
    /// `message` or `app_mention` are handled.
    #[serde(rename = "type")]
    pub kind: String,
    /// Set on edits, deletions, joins, bot messages…: none of them is a user speaking.
    #[serde(default)]
    pub subtype: Option<String>,
    /// Set on every message a bot (this one included) posted.
    #[serde(default)]
    pub bot_id: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub ts: String,
    #[serde(default)]
    pub thread_ts: Option<String>,
}

impl Event {
    /// Whether this is a person's new message we answer.
    pub(super) fn is_user_message(&self) -> bool {
        matches!(self.kind.as_str(), "message" | "app_mention")
            && self.subtype.is_none()
            && self.bot_id.is_none()
            && self.user.is_some()
            && !self.channel.is_empty()
            && !self.ts.is_empty()
    }
}

/// `text` without the leading mentions (`<@U123> hello` is `hello`).
pub(super) fn without_leading_mentions(text: &str) -> &str {
    let mut rest = text.trim_start();
    while let Some(after) = rest.strip_prefix("<@") {
        match after.find('>') {
            Some(end) => rest = after[end + 1..].trim_start(),
            None => break,
        }
    }
    rest.trim_end()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_mentions_are_dropped() {
        assert_eq!(
            without_leading_mentions("<@U1> <@U2>  hi <@U3>"),
            "hi <@U3>"
        );
        assert_eq!(without_leading_mentions("<@U1"), "<@U1");
    }

    #[test]
    fn edits_and_bot_messages_are_not_user_messages() {
        let event = |extra: serde_json::Value| -> Event {
            let mut base = serde_json::json!({"type": "message", "user": "U1", "text": "hi", "channel": "C1", "ts": "1.2"});
            base.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::from_value(base).unwrap()
        };
        assert!(event(serde_json::json!({})).is_user_message());
        assert!(!event(serde_json::json!({"subtype": "message_changed"})).is_user_message());
        assert!(!event(serde_json::json!({"bot_id": "B1"})).is_user_message());
        assert!(!event(serde_json::json!({"type": "reaction_added"})).is_user_message());
    }
}
