//! `telegram`: a Telegram bot through the Bot API. Users write to the bot; each chat
//! is a conversation, answered in the same chat.
//!
//! Updates come by long polling ([`poller`]: one poller per channel instance in a
//! pool, under a lease, its offset kept durably) or by Telegram posting them to any
//! worker ([`inbound`], `POST /v1/telegram/<channel>`). Answers go out through
//! [`outbound`]: Markdown as Telegram HTML ([`format`]), long texts split, rate
//! limited ([`limiter`]), with the typing action and, in private chats, a draft of
//! the answer while it is written. See docs/channels/telegram.md.

mod api;
mod format;
mod inbound;
mod limiter;
mod outbound;
mod poller;
mod state;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use async_trait::async_trait;
use axum::Router;
use futures::future::BoxFuture;
use nexo_api::Envelope;
use nexo_api::spec::{TelegramMode, TelegramSpec};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::seen::SeenEvents;
use super::{Channel, ChannelContext, DeliverError};
use crate::secrets::Secrets;
use api::BotApi;
use limiter::RateLimiter;
use state::{BotState, FileState, KvState, StateError};

/// Where a bot keeps its state and how its poller is placed: in the worker's data
/// directory on the local bus; in JetStream, under a lease, when workers share NATS.
pub(crate) enum Placement {
    Local {
        data_dir: PathBuf,
    },
    Pool {
        jetstream: Box<jetstream::Context>,
        /// The name this worker holds leases under.
        worker: String,
    },
}

pub struct Telegram {
    context: ChannelContext,
    spec: TelegramSpec,
    /// `None` when the token is not set: nothing is polled or sent.
    api: Option<BotApi>,
    /// The webhook's secret token (`mode: webhook`); `None` refuses every update.
    webhook_secret: Option<String>,
    placement: Placement,
    state: OnceCell<Arc<dyn BotState>>,
    limiter: RateLimiter,
    /// Turns running for messages of this instance: their typing and drafts, ended
    /// by the reply.
    turns: Mutex<HashMap<Uuid, outbound::Turn>>,
    /// Update ids already accepted, so an update Telegram sends again (a webhook
    /// retry, a batch fetched again after a failure) is published once by this
    /// worker (across workers, the envelope id does it: `ChannelContext::platform_id`).
    seen: Mutex<SeenEvents>,
}

impl Telegram {
    pub(crate) fn new(
        context: ChannelContext,
        spec: TelegramSpec,
        secrets: &Secrets,
        placement: Placement,
    ) -> Self {
        let read = |secret, what| context.read_secret(secrets, secret, what);
        let api =
            read(&spec.bot_token, "bot token").map(|token| BotApi::new(&spec.api_base_url, &token));
        let webhook_secret = spec
            .webhook
            .as_ref()
            .and_then(|webhook| read(&webhook.secret_token, "webhook secret token"));
        let limiter = RateLimiter::new(
            spec.limits.per_chat_per_second,
            spec.limits.global_per_second,
        );
        Self {
            context,
            spec,
            api,
            webhook_secret,
            placement,
            state: OnceCell::new(),
            limiter,
            turns: Mutex::default(),
            seen: Mutex::new(SeenEvents::new()),
        }
    }

    /// The bot's state store, opened on first use.
    async fn state(&self) -> Result<&Arc<dyn BotState>, StateError> {
        self.state
            .get_or_try_init(|| async {
                Ok(match &self.placement {
                    Placement::Local { data_dir } => {
                        Arc::new(FileState::open(data_dir, &self.context.key)) as Arc<dyn BotState>
                    }
                    Placement::Pool { jetstream, .. } => {
                        Arc::new(KvState::open(jetstream, &self.context.key).await?)
                    }
                })
            })
            .await
    }
}

#[async_trait]
impl Channel for Telegram {
    fn context(&self) -> &ChannelContext {
        &self.context
    }

    fn routes(self: Arc<Self>) -> Router {
        match self.spec.mode {
            TelegramMode::Webhook => inbound::routes(self),
            TelegramMode::Polling => Router::new(),
        }
    }

    fn background(self: Arc<Self>, stop: CancellationToken) -> Option<BoxFuture<'static, ()>> {
        self.api.as_ref()?;
        Some(match self.spec.mode {
            TelegramMode::Polling => Box::pin(poller::run(self, stop)),
            TelegramMode::Webhook => Box::pin(inbound::register_webhook(self, stop)),
        })
    }

    async fn deliver(&self, reply: Envelope) -> Result<(), DeliverError> {
        self.send_reply(reply).await
    }

    async fn close(&self) {
        let turns: Vec<outbound::Turn> =
            self.turns.lock().unwrap().drain().map(|(_, t)| t).collect();
        for turn in turns {
            turn.end().await;
        }
    }
}

/// The conversation of `chat` in `generation`: the chat id, then `~<generation>`
/// once it was reset.
fn conversation(chat: i64, generation: u64) -> String {
    match generation {
        0 => chat.to_string(),
        n => format!("{chat}~{n}"),
    }
}

/// The chat a conversation id of [`conversation`] is in.
fn chat_of(conversation: &str) -> Option<i64> {
    conversation.split('~').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_names_its_chat_in_every_generation() {
        assert_eq!(conversation(-1001, 0), "-1001");
        assert_eq!(conversation(42, 3), "42~3");
        assert_eq!(chat_of("-1001"), Some(-1001));
        assert_eq!(chat_of("42~3"), Some(42));
        assert_eq!(chat_of("webchat-id"), None);
    }
}
