//! What the Cloud API's webhook `POST`s (a `whatsapp_business_account` notification),
//! read leniently: only the fields used are named, unknown ones are ignored, and a
//! message of a type not handled here is skipped, not an error.
//! Shape: developers.facebook.com/docs/whatsapp/cloud-api/webhooks/components

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub(super) struct Notification {
    #[serde(default)]
    pub object: String,
    #[serde(default)]
    pub entry: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Entry {
    #[serde(default)]
    pub changes: Vec<Change>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Change {
    #[serde(default)]
    pub field: String,
    #[serde(default)]
    pub value: Value,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct Value {
    #[serde(default)]
    pub metadata: Option<Metadata>,
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(default)]
    pub statuses: Vec<Status>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Metadata {
    #[serde(default)]
    pub phone_number_id: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct Message {
    /// The user's WhatsApp id (their number, digits only).
    pub from: String,
    /// `wamid.…`: what a redelivery repeats.
    pub id: String,
    /// Unix seconds, as a string.
    #[serde(default)]
    pub timestamp: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<Text>,
    #[serde(default)]
    pub interactive: Option<Interactive>,
    /// A quick-reply button of a template.
    #[serde(default)]
    pub button: Option<TemplateButton>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Text {
    #[serde(default)]
    pub body: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct Interactive {
    #[serde(default)]
    pub button_reply: Option<Choice>,
    #[serde(default)]
    pub list_reply: Option<Choice>,
}

/// The reply button or list row the user chose.
#[derive(Debug, Deserialize)]
pub(super) struct Choice {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub title: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct TemplateButton {
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub payload: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct Status {
    #[serde(default)]
    pub id: String,
    /// `sent`, `delivered`, `read`, `failed`.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub errors: Vec<serde_json::Value>,
}

/// What a user said in one message: its text, and the id of the button or list row
/// when it is a choice.
pub(super) fn said(message: &Message) -> Option<(String, Option<String>)> {
    match message.kind.as_str() {
        "text" => message
            .text
            .as_ref()
            .map(|t| (t.body.clone(), None))
            .filter(|(body, _)| !body.trim().is_empty()),
        "interactive" => {
            let interactive = message.interactive.as_ref()?;
            let choice = interactive
                .button_reply
                .as_ref()
                .or(interactive.list_reply.as_ref())?;
            Some((choice.title.clone(), Some(choice.id.clone())))
        }
        "button" => message
            .button
            .as_ref()
            .map(|b| (b.text.clone(), Some(b.payload.clone()))),
        _ => None,
    }
}
