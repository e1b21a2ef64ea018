//! Channels: adapters between a platform's traffic and envelopes on the broker.
//!
//! A channel publishes what users say on `plugin.inbound.<type>.<instance>` and is
//! handed the agent's answers from `plugin.outbound.<type>.<instance>` through
//! [`Channel::deliver`]. [`router`] moves inbound messages to the channel's agent.

pub mod connection;
pub(crate) mod conversation;
pub mod delivery;
pub(crate) mod deltas;
mod duplicates;
mod markdown;
mod markup;
mod retry_after;
pub mod router;
mod routes;
mod seen;
mod signing;
pub mod slack;
mod split;
pub mod telegram;
pub mod webchat;
pub mod webhook;
pub mod whatsapp;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use bytes::Bytes;
use nexo_api::config::Resource;
use nexo_api::spec::{ChannelSpec, ChannelType};
use nexo_api::{Envelope, ResourceKey, subject};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::{Broker, BrokerError, Subscription};
use crate::metrics::Metrics;
use crate::secrets::Secrets;
use crate::traces;
use connection::{ConnectionReport, Connections};
use deltas::ReplyDeltas;

pub use routes::ChannelRoutes;

#[async_trait]
pub trait Channel: Send + Sync {
    fn context(&self) -> &ChannelContext;
    /// HTTP routes this channel serves (webhook endpoints, pages, sockets).
    fn routes(self: Arc<Self>) -> Router;
    /// Hands an agent's answer to the platform. An error matters only for a
    /// [`Delivery::Durable`] channel: the reply is sent again later, or dead-lettered.
    async fn deliver(&self, reply: Envelope) -> Result<(), DeliverError>;
    /// No more answers will come: release whoever still waits for one.
    async fn close(&self);
    /// Work the channel does on its own while it is served (Telegram's poller), run
    /// until `stop`: cancelled when the instance is stopped or the worker drains.
    fn background(
        self: Arc<Self>,
        _stop: CancellationToken,
    ) -> Option<futures::future::BoxFuture<'static, ()>> {
        None
    }
}

/// How a channel instance gets its agent's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Every worker serving the instance subscribes to `plugin.outbound.…`; the one
    /// holding the user's connection (a chat socket, a waiting HTTP request) delivers,
    /// the others drop it. Nothing is kept for a client that is gone.
    Broadcast,
    /// Answers wait in a durable stream (`plugin.delivery.…`, named as the `replyTo`
    /// of the instance's inbound messages) until one worker of the pool has handed
    /// them to the platform's API: a worker that crashes between an answer and its
    /// send loses nothing, and a send the platform refuses for now is tried again.
    Durable,
}

/// Why an answer did not reach the platform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    /// Worth trying again after `after` (the platform's rate limit, an outage).
    #[error("{reason} (trying again in {after:?})")]
    Retry { after: Duration, reason: String },
    /// Will not succeed (the platform refuses it for good): dead-lettered.
    #[error("{reason}")]
    Failed { reason: String },
}

/// What every channel instance needs to talk to the broker.
pub struct ChannelContext {
    pub key: ResourceKey,
    pub kind: ChannelType,
    pub delivery: Delivery,
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    /// Cancelled when the worker begins to shut down or the instance is stopped: from
    /// then on no message is accepted, since no router would take it any more.
    intake: CancellationToken,
    connection: ConnectionReport,
}

/// Why a user's message was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("this worker is shutting down and takes no new messages; send it again")]
    Closed,
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// How long a client refused because this worker is shutting down should wait: another
/// worker (or this one after its restart) takes the message.
const CLOSED_RETRY_AFTER: Duration = Duration::from_secs(1);

impl InboundError {
    /// When sending the message again later can succeed (shutdown, a full outbox): the
    /// `Retry-After` of a 503.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            InboundError::Closed => Some(CLOSED_RETRY_AFTER),
            InboundError::Broker(BrokerError::Full { retry_after, .. }) => Some(*retry_after),
            InboundError::Broker(_) => None,
        }
    }
}

impl ChannelContext {
    /// Whether new messages are accepted (not once shutdown has begun).
    pub fn is_accepting(&self) -> bool {
        !self.intake.is_cancelled()
    }

    /// An exchange with the platform succeeded (a poll, a registered webhook, a
    /// send); `cursor` is where a poller is in the platform's updates. See
    /// [`connection`].
    pub(crate) fn connected(&self, detail: &str, cursor: Option<String>) {
        self.connection.connected(detail, cursor);
    }

    /// The platform cannot be reached or refuses the instance, for `reason`.
    pub(crate) fn disconnected(&self, reason: &str) {
        self.connection.disconnected(reason);
    }

    /// The value of `secret` (the channel's `what`, for the log), or `None`, logged,
    /// when it cannot be read: the instance then refuses what needs it.
    pub(crate) fn read_secret(
        &self,
        secrets: &Secrets,
        secret: &nexo_api::spec::SecretRef,
        what: &str,
    ) -> Option<String> {
        secrets
            .read(secret)
            .inspect_err(|err| {
                tracing::error!(channel = %self.key, secret = %crate::secrets::describe(secret), error = %err, "cannot read the {} {what}", self.kind.as_str());
            })
            .ok()
    }

    /// A new user message on this instance, ready to publish.
    pub fn envelope(&self, conversation: String, sender: String, text: String) -> Envelope {
        let mut envelope = Envelope::inbound(
            self.kind.as_str(),
            self.key.name.clone(),
            conversation,
            sender,
            text,
        );
        if self.delivery == Delivery::Durable {
            envelope.reply_to = Some(subject::delivery(self.kind.as_str(), &self.key));
        }
        envelope
    }

    pub async fn publish_inbound(&self, envelope: &Envelope) -> Result<(), InboundError> {
        if !self.is_accepting() {
            return Err(InboundError::Closed);
        }
        self.metrics
            .messages_in
            .with_label_values(&[self.kind.as_str(), &self.key.name])
            .inc();
        let subject = subject::inbound(self.kind.as_str(), &self.key);
        // The first span of the message's trace (or the child of the current one).
        let mut envelope = envelope.clone();
        let span = traces::context::send(&subject, &mut envelope);
        // Published once per envelope id: a platform's message published again (a
        // Telegram update re-polled after a crash, with its id from
        // [`Self::platform_id`]) is dropped as a duplicate.
        let id = envelope.id.to_string();
        self.broker
            .publish_once(&subject, Bytes::from(envelope.to_json()), &id)
            .instrument(span)
            .await?;
        Ok(())
    }

    /// The envelope id of the platform's message `message` (a Telegram update id, a
    /// WhatsApp message id, a Slack channel and timestamp): the same on every worker
    /// and after a restart, so the message is taken once however often the platform,
    /// or a poller that restarted, hands it over.
    pub(crate) fn platform_id(&self, message: &str) -> uuid::Uuid {
        let key = format!("{}\0{}\0{message}", self.kind.as_str(), self.key);
        let hash = xxhash_rust::xxh3::xxh3_128(key.as_bytes());
        uuid::Builder::from_custom_bytes(hash.to_be_bytes()).into_uuid()
    }

    /// Watches the deltas of the answer to `envelope` (before it is published): its
    /// `stream` names the watch. `None`, and no `stream`, when the broker refuses the
    /// subscription: the reply comes all the same.
    pub(crate) async fn watch_reply(&self, envelope: &mut Envelope) -> Option<ReplyDeltas> {
        match ReplyDeltas::watch(self.broker.as_ref()).await {
            Ok(watch) => {
                envelope.stream = Some(watch.subject().to_owned());
                Some(watch)
            }
            Err(err) => {
                tracing::warn!(channel = %self.key, error = %err, "cannot watch a reply's deltas; it comes whole");
                None
            }
        }
    }

    pub async fn subscribe_outbound(&self) -> Result<Subscription, BrokerError> {
        self.broker
            .subscribe(&subject::outbound(self.kind.as_str(), &self.key))
            .await
    }
}

/// What the worker gives a channel instance it builds.
pub struct ChannelInputs<'a> {
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    pub secrets: &'a Secrets,
    pub connections: &'a Arc<Connections>,
    /// Cancelled once the instance takes no new messages.
    pub intake: CancellationToken,
    /// `data_dir` and `ownership` place what a channel keeps beyond a process (a
    /// Telegram poller's offset): in the worker's data directory on the local bus, in
    /// JetStream when workers share NATS.
    pub data_dir: &'a std::path::Path,
    pub ownership: Option<&'a crate::ownership::Ownership>,
}

/// The channel instance a resource describes; it accepts messages until `intake` is
/// cancelled. `None` when its spec names no type (validation rejects such a config
/// before this is called).
pub fn from_resource(
    resource: &Resource<ChannelSpec>,
    inputs: ChannelInputs<'_>,
) -> Option<Arc<dyn Channel>> {
    let ChannelInputs {
        broker,
        metrics,
        secrets,
        connections,
        intake,
        data_dir,
        ownership,
    } = inputs;
    let kind = resource.spec.channel_type()?;
    let delivery = if kind.is_platform() {
        Delivery::Durable
    } else {
        Delivery::Broadcast
    };
    let context = ChannelContext {
        key: resource.key(),
        kind,
        delivery,
        broker,
        metrics,
        intake,
        connection: connections.report_for(kind.as_str(), resource.key()),
    };
    Some(match kind {
        ChannelType::Webchat => Arc::new(webchat::Webchat::new(
            context,
            resource.spec.webchat.clone().unwrap_or_default(),
        )),
        ChannelType::Webhook => Arc::new(webhook::Webhook::new(
            context,
            resource.spec.webhook.clone().unwrap_or_default(),
            secrets,
        )),
        ChannelType::Telegram => Arc::new(telegram::Telegram::new(
            context,
            resource.spec.telegram.clone()?,
            secrets,
            match ownership {
                Some(ownership) => telegram::Placement::Pool {
                    jetstream: Box::new(ownership.jetstream.clone()),
                    worker: ownership.worker.clone(),
                },
                None => telegram::Placement::Local {
                    data_dir: data_dir.to_owned(),
                },
            },
        )),
        ChannelType::Whatsapp => Arc::new(whatsapp::Whatsapp::new(
            context,
            resource.spec.whatsapp.clone()?,
            secrets,
        )),
        ChannelType::Slack => Arc::new(slack::Slack::new(
            context,
            resource.spec.slack.clone()?,
            secrets,
        )),
    })
}

/// Hands every outbound envelope of the channel to [`Channel::deliver`] until `cancel`,
/// once per answered message: a second reply to a message this instance already
/// delivered an answer to is dropped ([`duplicates`]) and counted in
/// `nexo_channel_duplicate_replies_total`. A reply that names no message it answers is
/// always delivered.
pub async fn deliver_outbound(
    channel: Arc<dyn Channel>,
    mut outbound: Subscription,
    cancel: CancellationToken,
) {
    let context = channel.context();
    let labels = [context.kind.as_str(), context.key.name.as_str()];
    let counter = context.metrics.messages_out.with_label_values(&labels);
    let duplicates = context.metrics.duplicate_replies.with_label_values(&labels);
    let mut delivered = duplicates::DeliveredReplies::new();
    loop {
        let message = tokio::select! {
            () = cancel.cancelled() => break,
            message = outbound.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        match Envelope::from_json(&message.payload) {
            Ok(reply) => {
                if let Some(answers) = reply.correlation_id
                    && !delivered.first_delivery(answers)
                {
                    duplicates.inc();
                    tracing::debug!(channel = %context.key, answers = %answers, "dropping a second reply to a message already answered");
                    continue;
                }
                counter.inc();
                let span = traces::context::process(&message.subject, &reply);
                // A broadcast delivery has no one to retry for: a client that is gone
                // does not come back for this answer.
                if let Err(err) = channel.deliver(reply).instrument(span).await {
                    tracing::warn!(channel = %context.key, error = %err, "an answer was not delivered");
                }
            }
            Err(err) => {
                tracing::warn!(channel = %context.key, error = %err, "dropping a malformed outbound envelope")
            }
        }
    }
    channel.close().await;
}
