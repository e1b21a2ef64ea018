//! Answers to Telegram: the reply's Markdown as Telegram HTML, split into messages of
//! at most 4096 characters, each sent within the rate limits. A `429` is waited out
//! here when it asks for a short wait; otherwise the reply is handed back to be
//! delivered again later. While a turn runs, the chat shows "typing…" and, with
//! `streaming`, the answer as it is written, at most every [`DRAFT_EVERY`]: in a
//! private chat as a draft (`sendMessageDraft`, then the message itself is sent), in a
//! group as a message of its own, edited as the text grows (`editMessageText`) and
//! edited into the answer at the end.

use std::sync::Arc;
use std::time::Duration;

use nexo_api::Envelope;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::api::{ApiError, SendMessage};
use super::format::{self, MAX_MESSAGE};
use super::{Telegram, chat_of};
use crate::channels::DeliverError;
use crate::channels::deltas::ReplyDeltas;

/// The longest a `429` is waited out within one delivery; past it the reply is
/// handed back with the wait Telegram asked for.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(10);
/// Telegram shows a chat action for about five seconds: renewed before it fades.
const TYPING_EVERY: Duration = Duration::from_secs(4);
/// Drafts of one answer are sent at most this often.
pub(crate) const DRAFT_EVERY: Duration = Duration::from_millis(1500);
/// A turn's typing and drafts stop after this even if its reply never comes here
/// (it was delivered by another worker, or the turn failed without one).
const MAX_TURN: Duration = Duration::from_secs(120);
/// Turns shown at once per instance; past it a message gets no typing or drafts.
const MAX_TURNS: usize = 1024;
/// How long the end of a turn waits for a draft being sent.
const TURN_END_WAIT: Duration = Duration::from_secs(5);
/// Longest draft text (characters): Telegram takes 4096 after entity parsing.
const MAX_DRAFT_CHARS: usize = 4000;

/// How a chat is shown the answer while it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Preview {
    /// A draft (`sendMessageDraft`): private chats only.
    Draft,
    /// A message sent with the first words and edited as more come (groups, where
    /// drafts do not exist); the answer replaces its text at the end.
    Edits,
}

/// A running turn's typing and drafts.
pub(crate) struct Turn {
    stop: CancellationToken,
    /// Ends with the message showing the text so far (`Preview::Edits`), if it was
    /// sent.
    task: JoinHandle<Option<i64>>,
}

impl Turn {
    /// Stops the typing and drafts, once a draft being sent has gone, so no draft
    /// comes after the answer; the message that showed the text so far, if any.
    pub(crate) async fn end(self) -> Option<i64> {
        self.stop.cancel();
        tokio::time::timeout(TURN_END_WAIT, self.task)
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    }
}

impl Telegram {
    pub(crate) async fn send_reply(&self, reply: Envelope) -> Result<(), DeliverError> {
        let mut shown = None;
        if let Some(answers) = reply.correlation_id {
            let turn = self.turns.lock().unwrap().remove(&answers);
            if let Some(turn) = turn {
                shown = turn.end().await;
            }
        }
        let Some(api) = &self.api else {
            return Err(DeliverError::Failed {
                reason: "the bot token is not set".to_owned(),
            });
        };
        let Some(chat) = chat_of(&reply.conversation) else {
            return Err(DeliverError::Failed {
                reason: "the reply's conversation names no Telegram chat".to_owned(),
            });
        };
        // An error's text is a sentence for the user, not Markdown.
        let html = match reply.error {
            Some(_) => format::escape(&reply.text),
            None => format::to_telegram_html(&reply.text),
        };
        for part in format::split(&html, MAX_MESSAGE) {
            // The group's message showing the text so far becomes the answer's first
            // part; if it cannot be edited (deleted meanwhile), the part is sent.
            if let Some(preview) = shown.take() {
                let message = SendMessage {
                    chat_id: chat,
                    text: &part,
                    parse_mode: Some("HTML"),
                };
                self.limiter.message(chat).await;
                match api.edit_message_text(preview, &message).await {
                    Ok(_) => {
                        self.context.connected("sent", None);
                        continue;
                    }
                    Err(err) => {
                        tracing::debug!(channel = %self.context.key, error = %err, "cannot edit the streamed message into the answer; sending it");
                    }
                }
            }
            self.send_part(api, chat, &part).await?;
        }
        Ok(())
    }

    async fn send_part(
        &self,
        api: &super::BotApi,
        chat: i64,
        html: &str,
    ) -> Result<(), DeliverError> {
        let started = Instant::now();
        let message = SendMessage {
            chat_id: chat,
            text: html,
            parse_mode: Some("HTML"),
        };
        loop {
            self.limiter.message(chat).await;
            let err = match api.send_message(&message).await {
                Ok(_) => {
                    self.context.connected("sent", None);
                    return Ok(());
                }
                Err(err) => err,
            };
            match err {
                ApiError::RateLimited { retry_after, .. }
                    if started.elapsed() + retry_after <= MAX_INLINE_WAIT =>
                {
                    tracing::debug!(channel = %self.context.key, ?retry_after, "Telegram asks to slow down");
                    tokio::time::sleep(retry_after).await;
                }
                ApiError::RateLimited { retry_after, .. } => {
                    return Err(DeliverError::Retry {
                        after: retry_after,
                        reason: err.to_string(),
                    });
                }
                err if err.is_transient() => {
                    self.context.disconnected(&err.to_string());
                    return Err(DeliverError::Retry {
                        after: Duration::from_secs(1),
                        reason: err.to_string(),
                    });
                }
                err => {
                    if let ApiError::Refused {
                        code: 401 | 404, ..
                    } = err
                    {
                        // A wrong token (or base URL): nothing gets through.
                        self.context.disconnected(&err.to_string());
                    }
                    return Err(DeliverError::Failed {
                        reason: err.to_string(),
                    });
                }
            }
        }
    }

    /// Shows the chat that `message` is being answered: typing, and the answer's
    /// text so far from `watch`, until its reply is delivered (or [`MAX_TURN`]).
    pub(crate) fn start_turn(
        self: &Arc<Self>,
        chat: i64,
        message: Uuid,
        watch: Option<ReplyDeltas>,
        preview: Preview,
    ) {
        let mut turns = self.turns.lock().unwrap();
        if turns.len() >= MAX_TURNS {
            return;
        }
        let stop = CancellationToken::new();
        let bot = self.clone();
        let shown = ShownTurn {
            chat,
            message,
            preview,
        };
        let task = tokio::spawn(show_turn(bot, shown, watch, stop.clone()));
        turns.insert(message, Turn { stop, task });
    }
}

/// Which turn is shown, where and how.
struct ShownTurn {
    chat: i64,
    message: Uuid,
    preview: Preview,
}

/// Shows the chat the turn of `shown.message` until `stop`; the message that showed
/// the text so far, if one was sent.
async fn show_turn(
    bot: Arc<Telegram>,
    shown: ShownTurn,
    mut watch: Option<ReplyDeltas>,
    stop: CancellationToken,
) -> Option<i64> {
    let ShownTurn {
        chat,
        message,
        preview,
    } = shown;
    let api = bot.api.as_ref()?;
    let mut edited: Option<i64> = None;
    let deadline = tokio::time::sleep(MAX_TURN);
    tokio::pin!(deadline);
    let mut typing = tokio::time::interval(TYPING_EVERY);
    let draft_id = i64::from((message.as_u128() as u32 & 0x7fff_ffff).max(1));
    let mut text = String::new();
    // A group's message is sent only for an answer still being written after a
    // while: a quick one arrives as one message, without a send and an edit.
    let mut last_draft: Option<Instant> = match preview {
        Preview::Draft => None,
        Preview::Edits => Some(Instant::now()),
    };
    let mut pending = false;
    loop {
        let due = last_draft.map_or_else(Instant::now, |at| at + DRAFT_EVERY);
        if pending && Instant::now() >= due {
            pending = false;
            last_draft = Some(Instant::now());
            let draft: String = text.chars().take(MAX_DRAFT_CHARS).collect();
            match preview {
                Preview::Draft => bot.limiter.any().await,
                // A group's message, sent or edited, counts in the chat's limit.
                Preview::Edits => bot.limiter.message(chat).await,
            }
            if stop.is_cancelled() {
                break;
            }
            let shown = match (preview, edited) {
                (Preview::Draft, _) => api
                    .send_message_draft(chat, draft_id, &draft)
                    .await
                    .map(drop),
                (Preview::Edits, None) => {
                    // Plain text: the Markdown of a half-written answer is not yet
                    // well-formed HTML.
                    let first = SendMessage {
                        chat_id: chat,
                        text: &draft,
                        parse_mode: None,
                    };
                    api.send_message(&first)
                        .await
                        .map(|sent| edited = Some(sent.message_id))
                }
                (Preview::Edits, Some(id)) => {
                    let grown = SendMessage {
                        chat_id: chat,
                        text: &draft,
                        parse_mode: None,
                    };
                    api.edit_message_text(id, &grown).await.map(drop)
                }
            };
            if let Err(err) = shown {
                tracing::debug!(channel = %bot.context.key, error = %err, "cannot show the answer so far");
            }
            continue;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = &mut deadline => break,
            () = tokio::time::sleep_until(due), if pending => {}
            _ = typing.tick() => {
                bot.limiter.any().await;
                if let Err(err) = api.send_chat_action(chat, "typing").await {
                    tracing::debug!(channel = %bot.context.key, error = %err, "cannot show typing");
                }
            }
            delta = next_delta(&mut watch) => match delta {
                Some(delta) => {
                    if delta.restart {
                        text.clear();
                    }
                    text.push_str(&delta.text);
                    pending = !text.trim().is_empty();
                }
                None => watch = None,
            },
        }
    }
    bot.turns.lock().unwrap().remove(&message);
    edited
}

async fn next_delta(watch: &mut Option<ReplyDeltas>) -> Option<nexo_api::delta::ReplyDelta> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}
