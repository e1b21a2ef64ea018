//! Updates to envelopes: each text message of a chat is published on the channel's
//! inbound subject with the chat as its conversation; `/start` and `/reset` are
//! answered here and never reach the agent. Updates of one chat are taken in order,
//! chats side by side. Also the webhook endpoint, `POST /v1/telegram/<channel>`,
//! whose secret token is checked before its body is read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header::RETRY_AFTER};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use backon::{BackoffBuilder, ExponentialBuilder};
use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use super::api::{SendMessage, Update};
use super::outbound::Preview;
use super::state::StateError;
use super::{Telegram, conversation};
use crate::channels::InboundError;

pub(crate) const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// What `/start` answers.
const GREETING: &str =
    "Hello! Write me a message and I will answer. Send /reset to start a new conversation.";
const RESET_DONE: &str = "Done: this is a new conversation.";
/// Longest text taken from a message (Telegram's own limit is 4096 characters).
const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Between attempts to register the webhook.
const REGISTER_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_secs(1))
    .with_max_delay(Duration::from_secs(60))
    .with_jitter()
    .without_max_times();

/// Why updates were not taken; they are to be offered again.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcceptError {
    #[error(transparent)]
    Inbound(#[from] InboundError),
    #[error(transparent)]
    State(#[from] StateError),
}

impl AcceptError {
    pub(crate) fn retry_after(&self) -> Duration {
        match self {
            AcceptError::Inbound(err) => err.retry_after().unwrap_or(Duration::from_secs(1)),
            AcceptError::State(_) => Duration::from_secs(1),
        }
    }
}

/// The chat an update is about (0 for updates without one), to keep each chat's in
/// order.
fn chat_of_update(update: &Value) -> i64 {
    update["message"]["chat"]["id"].as_i64().unwrap_or(0)
}

impl Telegram {
    /// Takes `updates` (as Telegram sent them): each chat's in order, chats at once.
    /// An error means some were not taken; offering all of them again is safe (those
    /// taken are known by their id).
    pub(crate) async fn accept_all(self: &Arc<Self>, updates: &[Value]) -> Result<(), AcceptError> {
        let mut chats: BTreeMap<i64, Vec<&Value>> = BTreeMap::new();
        for update in updates {
            chats
                .entry(chat_of_update(update))
                .or_default()
                .push(update);
        }
        let results = futures::future::join_all(chats.into_values().map(|updates| async move {
            for update in updates {
                self.accept(update).await?;
            }
            Ok::<(), AcceptError>(())
        }))
        .await;
        results.into_iter().collect()
    }

    async fn accept(self: &Arc<Self>, raw: &Value) -> Result<(), AcceptError> {
        let Some(update_id) = raw["update_id"].as_i64() else {
            tracing::debug!(channel = %self.context.key, "dropping an update without an id");
            return Ok(());
        };
        if self.seen.lock().unwrap().contains(&update_id.to_string()) {
            return Ok(());
        }
        let update: Option<Update> = serde_json::from_value(raw.clone())
            .inspect_err(|err| tracing::debug!(channel = %self.context.key, update_id, error = %err, "dropping an unreadable update"))
            .ok();
        let message = update.and_then(|u| u.message);
        if let Some(message) = message
            && let Some(text) = message.text.as_deref()
        {
            let chat = message.chat.id;
            let private = message.chat.kind == "private";
            match command(text) {
                Some("start") => self.say(chat, GREETING).await,
                Some("reset") => {
                    self.state().await?.reset(chat).await?;
                    self.say(chat, RESET_DONE).await;
                }
                _ => {
                    let text = truncate(text, MAX_TEXT_BYTES);
                    let generation = self.state().await?.generation(chat).await?;
                    let sender = match &message.from {
                        Some(user) => format!("telegram:{}", user.id),
                        None => format!("telegram:chat:{chat}"),
                    };
                    let mut envelope = self.context.envelope(
                        conversation(chat, generation),
                        sender,
                        text.to_owned(),
                    );
                    envelope.metadata.insert(
                        "telegram.messageId".to_owned(),
                        message.message_id.to_string(),
                    );
                    // A message is its chat and its id there (update ids may start
                    // again after a quiet week; message ids in a chat do not).
                    envelope.id = self
                        .context
                        .platform_id(&format!("{chat}:{}", message.message_id));
                    let watch = match self.spec.streaming {
                        true => self.context.watch_reply(&mut envelope).await,
                        false => None,
                    };
                    self.context.publish_inbound(&envelope).await?;
                    let preview = match private {
                        true => Preview::Draft,
                        false => Preview::Edits,
                    };
                    self.start_turn(chat, envelope.id, watch, preview);
                }
            }
        }
        self.seen.lock().unwrap().first(&update_id.to_string());
        Ok(())
    }

    /// Sends `text` to `chat` at once (the answer to a command); a failure is logged.
    async fn say(&self, chat: i64, text: &str) {
        let Some(api) = &self.api else { return };
        self.limiter.message(chat).await;
        let message = SendMessage {
            chat_id: chat,
            text,
            parse_mode: None,
        };
        if let Err(err) = api.send_message(&message).await {
            tracing::warn!(channel = %self.context.key, error = %err, "cannot answer a command");
        }
    }

    async fn post_update(self: Arc<Self>, headers: HeaderMap, body: Bytes) -> Response {
        if !self.context.is_accepting() {
            return unavailable(Duration::from_secs(1), "shutting down");
        }
        let Some(expected) = &self.webhook_secret else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "webhook secret token is not configured",
            )
                .into_response();
        };
        let given = headers
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        // Compared in constant time, before anything of the body is read.
        if !bool::from(given.ct_eq(expected.as_bytes())) {
            return (StatusCode::UNAUTHORIZED, "wrong secret token").into_response();
        }
        let update: Value = match serde_json::from_slice(&body) {
            Ok(update @ Value::Object(_)) => update,
            _ => return (StatusCode::BAD_REQUEST, "expected an update object").into_response(),
        };
        match self.accept_all(std::slice::from_ref(&update)).await {
            Ok(()) => StatusCode::OK.into_response(),
            // Telegram sends the update again later.
            Err(err) => unavailable(err.retry_after(), &err.to_string()),
        }
    }
}

fn unavailable(after: Duration, reason: &str) -> Response {
    let seconds = after.as_secs().max(1).to_string();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(RETRY_AFTER, seconds)],
        reason.to_owned(),
    )
        .into_response()
}

/// The command a message is (`/reset`, `/reset@my_bot`), without its slash.
fn command(text: &str) -> Option<&str> {
    let word = text.split_whitespace().next()?;
    let command = word.strip_prefix('/')?;
    Some(command.split('@').next().unwrap_or(command))
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

pub(super) fn routes(bot: Arc<Telegram>) -> Router {
    Router::new()
        .route(
            &format!("/v1/telegram/{}", bot.context.key.name),
            post(
                |State(bot): State<Arc<Telegram>>, headers: HeaderMap, body: Bytes| {
                    bot.post_update(headers, body)
                },
            ),
        )
        .with_state(bot)
}

/// Registers the webhook's `url` with Telegram (when one is configured), trying again
/// until it succeeds or `stop`.
pub(super) async fn register_webhook(bot: Arc<Telegram>, stop: CancellationToken) {
    let (Some(api), Some(webhook)) = (&bot.api, &bot.spec.webhook) else {
        return;
    };
    let (Some(url), Some(secret)) = (&webhook.url, &bot.webhook_secret) else {
        return;
    };
    let mut backoff = REGISTER_BACKOFF.build();
    loop {
        match api.set_webhook(url, secret).await {
            Ok(_) => {
                bot.context.connected("webhook registered", None);
                return;
            }
            Err(err) => {
                tracing::warn!(channel = %bot.context.key, error = %err, "cannot register the Telegram webhook; trying again");
                bot.context.disconnected(&err.to_string());
            }
        }
        let wait = backoff.next().unwrap_or(Duration::from_secs(60));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_read_with_or_without_the_bot_name() {
        assert_eq!(command("/reset"), Some("reset"));
        assert_eq!(command("  /start@my_bot hello"), Some("start"));
        assert_eq!(command("reset"), None);
        assert_eq!(command(""), None);
    }
}
