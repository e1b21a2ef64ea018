//! Answers to Telegram: the reply's Markdown as Telegram HTML, split into messages of
//! at most 4096 characters, each sent within the rate limits. A `429` is waited out
//! here when it asks for a short wait; otherwise the reply is handed back to be
//! delivered again later. While a turn runs, the chat shows "typing…" and, in a
//! private chat with `streaming`, a draft of the answer (`sendMessageDraft`) updated
//! at most every [`DRAFT_EVERY`].

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

/// A running turn's typing and drafts.
pub(crate) struct Turn {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Turn {
    /// Stops the typing and drafts, once a draft being sent has gone, so no draft
    /// comes after the answer.
    pub(crate) async fn end(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(TURN_END_WAIT, self.task).await;
    }
}

impl Telegram {
    pub(crate) async fn send_reply(&self, reply: Envelope) -> Result<(), DeliverError> {
        if let Some(answers) = reply.correlation_id {
            let turn = self.turns.lock().unwrap().remove(&answers);
            if let Some(turn) = turn {
                turn.end().await;
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
    ) {
        let mut turns = self.turns.lock().unwrap();
        if turns.len() >= MAX_TURNS {
            return;
        }
        let stop = CancellationToken::new();
        let bot = self.clone();
        let task = tokio::spawn(show_turn(bot, chat, message, watch, stop.clone()));
        turns.insert(message, Turn { stop, task });
    }
}

async fn show_turn(
    bot: Arc<Telegram>,
    chat: i64,
    message: Uuid,
    mut watch: Option<ReplyDeltas>,
    stop: CancellationToken,
) {
    let Some(api) = &bot.api else { return };
    let deadline = tokio::time::sleep(MAX_TURN);
    tokio::pin!(deadline);
    let mut typing = tokio::time::interval(TYPING_EVERY);
    let draft_id = i64::from((message.as_u128() as u32 & 0x7fff_ffff).max(1));
    let mut text = String::new();
    let mut last_draft: Option<Instant> = None;
    let mut pending = false;
    loop {
        let due = last_draft.map_or_else(Instant::now, |at| at + DRAFT_EVERY);
        if pending && Instant::now() >= due {
            pending = false;
            last_draft = Some(Instant::now());
            let draft: String = text.chars().take(MAX_DRAFT_CHARS).collect();
            bot.limiter.any().await;
            if stop.is_cancelled() {
                break;
            }
            if let Err(err) = api.send_message_draft(chat, draft_id, &draft).await {
                tracing::debug!(channel = %bot.context.key, error = %err, "cannot show a draft");
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
}

async fn next_delta(watch: &mut Option<ReplyDeltas>) -> Option<nexo_api::delta::ReplyDelta> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}
