//! [`Broker`] on NATS core through async-nats: the same semantics as the local bus,
//! across processes and machines.

use crate::secrets::Secrets;
use nexo_api::spec::SecretRef;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::pull::{self, BatchConfig};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::{ConnectOptions, HeaderMap, Request, RequestErrorKind, jetstream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use nexo_api::config::NatsSettings;
use nexo_api::subject;

use super::{
    Acker, Broker, BrokerError, ConsumeOptions, Delivery, Message, Pending, SendError, SendReport,
    Subscription, Transport, WorkSource,
};

/// How long a flush may wait for the server. While NATS is unreachable a flush waits
/// for the reconnect, and neither a start (subscribing a channel's replies) nor the
/// outbox drain (which a shutdown waits for) may hang on that.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one pull waits for a message before asking again.
const FETCH_EXPIRY: Duration = Duration::from_secs(5);
/// Extra wait for the server's answer to an expired pull before asking again.
const FETCH_GRACE: Duration = Duration::from_secs(1);
/// How long JetStream remembers message ids to drop re-sent duplicates.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Durable consumers a stream may have: one per agent on the route stream, one per
/// channel instance on the inbound one. nats-server 2.15 allows 1,000 per stream unless
/// the stream says otherwise (`-1` included), which a pool of more agents would hit;
/// what each consumer costs the server is measured in `benches/ownership_cost.rs` and
/// recorded in ADR 0010.
const MAX_CONSUMERS: i32 = 100_000;

pub struct NatsBroker {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// Set once the durable streams are known to exist on the server.
    streams_ready: AtomicBool,
}

/// Keeps async-nats's error (and so its kind) as the source of a [`BrokerError`].
fn nats_error<E>(operation: impl Into<String>) -> impl FnOnce(E) -> BrokerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let operation = operation.into();
    move |source| BrokerError::Nats {
        operation,
        source: Box::new(source),
    }
}

/// Connection options from the config: credentials, TLS, time-outs. The client
/// reconnects on its own with backoff; the first connection is retried too, so a
/// worker can start before NATS is up (it reports not-ready meanwhile).
pub async fn connect_options(
    settings: &NatsSettings,
    secrets: &Secrets,
) -> Result<ConnectOptions, BrokerError> {
    let secret = |reference: &SecretRef| {
        secrets
            .read(reference)
            .map_err(|e| BrokerError::Connect(e.to_string()))
    };
    let drops: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let mut options = ConnectOptions::new()
        .name("nexo-worker")
        .connection_timeout(Duration::from_secs(settings.connect_timeout_seconds))
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let drops = drops.clone();
            async move {
                match event {
                    // The client buffers 65,536 messages per subscription (as the local
                    // bus does) and drops what does not fit, one event per message:
                    // logged at 1, 2, 4, … drops of a subscription.
                    async_nats::Event::SlowConsumer(subscription) => {
                        let dropped = {
                            let mut drops = drops.lock().unwrap();
                            let count = drops.entry(subscription).or_insert(0);
                            *count += 1;
                            *count
                        };
                        if dropped.is_power_of_two() {
                            tracing::warn!(
                                subscription,
                                dropped,
                                "slow subscriber: the NATS client dropped messages for it"
                            );
                        }
                    }
                    other => tracing::debug!(event = %other, "NATS connection event"),
                }
            }
        });
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        options = options.user_and_password(user.clone(), secret(password)?);
    }
    if let Some(token) = &settings.token {
        options = options.token(secret(token)?);
    }
    if let Some(seed) = &settings.nkey_seed {
        options = options.nkey(secret(seed)?);
    }
    if let Some(path) = &settings.credentials_file {
        options = options.credentials_file(path).await.map_err(|e| {
            BrokerError::Connect(format!("credentials file {}: {e}", path.display()))
        })?;
    }
    if let Some(tls) = &settings.tls {
        options = options.require_tls(true);
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    Ok(options)
}

impl NatsBroker {
    /// Connects with the settings of a worker config.
    pub async fn connect(settings: &NatsSettings, secrets: &Secrets) -> Result<Self, BrokerError> {
        // async-nats brings rustls; make sure a provider is installed.
        crate::tls::install_provider();
        let options = connect_options(settings, secrets).await?;
        let client = options
            .connect(settings.urls.as_slice())
            .await
            .map_err(|e| BrokerError::Connect(e.to_string()))?;
        Ok(Self::from_client(client))
    }

    fn from_client(client: async_nats::Client) -> Self {
        let mut jetstream = jetstream::new(client.clone());
        // An outage should surface as a failed batch quickly; the drain retries.
        jetstream.set_timeout(Duration::from_secs(3));
        Self {
            client,
            jetstream,
            streams_ready: AtomicBool::new(false),
        }
    }

    /// Creates the durable streams, or updates them to the expected configuration.
    /// Idempotent; safe for many workers to run at once.
    pub async fn ensure_streams(&self) -> Result<(), BrokerError> {
        if self.streams_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        for stream in &subject::DURABLE_STREAMS {
            let config = jetstream::stream::Config {
                name: stream.name.to_owned(),
                subjects: vec![stream.subjects.to_owned()],
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                storage: jetstream::stream::StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                max_consumers: MAX_CONSUMERS,
                ..Default::default()
            };
            self.jetstream
                .create_or_update_stream(config)
                .await
                .map_err(nats_error(format!("stream {}", stream.name)))?;
        }
        self.streams_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Connects to one URL without credentials (tests, tools).
    pub async fn connect_url(url: &str) -> Result<Self, BrokerError> {
        let settings = NatsSettings {
            urls: vec![url.to_owned()],
            ..NatsSettings::default()
        };
        // No credentials are read, so the directory is never looked at.
        Self::connect(&settings, &Secrets::new("")).await
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context (leases, memory journals).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn registered(
        &self,
        subscriber: async_nats::Subscriber,
    ) -> Result<Subscription, BrokerError> {
        // Wait until the server has the subscription, so a publish that follows is seen.
        // While NATS is unreachable the flush would wait for the reconnect; the client
        // sends its subscriptions again when it reconnects, so go on without it.
        if self.connected() {
            match tokio::time::timeout(FLUSH_TIMEOUT, self.client.flush()).await {
                Ok(flushed) => flushed.map_err(nats_error("flush"))?,
                Err(_) => {
                    tracing::debug!("NATS unreachable: the subscription is made on reconnect")
                }
            }
        }
        Ok(Subscription::new(subscriber.map(|m| Message {
            subject: m.subject.to_string(),
            reply: m.reply.map(|r| r.to_string()),
            payload: m.payload,
        })))
    }
}

#[async_trait]
impl Broker for NatsBroker {
    async fn publish_with_reply(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: Bytes,
    ) -> Result<(), BrokerError> {
        subject::check_publish(subject)?;
        let result = match reply {
            Some(reply) => {
                subject::check_publish(reply)?;
                self.client
                    .publish_with_reply(subject.to_owned(), reply.to_owned(), payload)
                    .await
            }
            None => self.client.publish(subject.to_owned(), payload).await,
        };
        result.map_err(nats_error("publish"))
    }

    async fn subscribe(&self, pattern: &str) -> Result<Subscription, BrokerError> {
        subject::check_pattern(pattern)?;
        let subscriber = self
            .client
            .subscribe(pattern.to_owned())
            .await
            .map_err(nats_error("subscribe"))?;
        self.registered(subscriber).await
    }

    async fn queue_subscribe(
        &self,
        pattern: &str,
        group: &str,
    ) -> Result<Subscription, BrokerError> {
        subject::check_pattern(pattern)?;
        let subscriber = self
            .client
            .queue_subscribe(pattern.to_owned(), group.to_owned())
            .await
            .map_err(nats_error("queue subscribe"))?;
        self.registered(subscriber).await
    }

    async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BrokerError> {
        subject::check_publish(subject)?;
        let request = Request::new().payload(payload).timeout(Some(timeout));
        match self.client.send_request(subject.to_owned(), request).await {
            Ok(m) => Ok(Message {
                subject: m.subject.to_string(),
                reply: m.reply.map(|r| r.to_string()),
                payload: m.payload,
            }),
            Err(err) => Err(match err.kind() {
                RequestErrorKind::NoResponders => BrokerError::NoResponders(subject.to_owned()),
                RequestErrorKind::TimedOut => BrokerError::Timeout {
                    subject: subject.to_owned(),
                    timeout,
                },
                _ => nats_error("request")(err),
            }),
        }
    }

    async fn consume(
        &self,
        filter: &str,
        durable: &str,
        options: ConsumeOptions,
    ) -> Result<Box<dyn WorkSource>, BrokerError> {
        subject::check_pattern(filter)?;
        let stream = subject::durable_stream(filter)
            .ok_or_else(|| BrokerError::NotDurable(filter.to_owned()))?;
        self.ensure_streams().await?;
        let stream = self
            .jetstream
            .get_stream(stream.name)
            .await
            .map_err(nats_error("get stream"))?;
        let consumer: PullConsumer = stream
            .get_or_create_consumer(
                durable,
                pull::Config {
                    durable_name: Some(durable.to_owned()),
                    filter_subject: filter.to_owned(),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: options.ack_wait,
                    // Attempts are counted by the worker, which dead-letters; the
                    // server keeps redelivering until the worker settles a message.
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(nats_error(format!("consumer {durable}")))?;
        let inbox = self.client.new_inbox();
        let replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(nats_error("subscribe"))?;
        Ok(Box::new(NatsWork {
            consumer,
            context: self.jetstream.clone(),
            inbox,
            replies,
            requested: None,
        }))
    }

    fn is_connected(&self) -> bool {
        self.connected()
    }
}

/// Pulls one message per call, so a worker fetches only what it can start now. Pull
/// requests are answered on one long-lived inbox subscription (re-established by the
/// client after a reconnect), which keeps a pull to one round trip.
struct NatsWork {
    consumer: PullConsumer,
    context: jetstream::Context,
    inbox: String,
    replies: async_nats::Subscriber,
    /// When the outstanding pull request was sent, if one is.
    requested: Option<Instant>,
}

#[async_trait]
impl WorkSource for NatsWork {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        loop {
            // A request the server may have lost (restart, reconnect) is renewed once
            // it must have expired.
            if self
                .requested
                .is_none_or(|at| at.elapsed() > FETCH_EXPIRY + FETCH_GRACE)
            {
                let request = BatchConfig {
                    batch: 1,
                    expires: Some(FETCH_EXPIRY),
                    ..Default::default()
                };
                self.consumer
                    .request_batch(request, self.inbox.clone().into())
                    .await
                    .map_err(nats_error("pull request"))?;
                self.requested = Some(Instant::now());
            }
            let message =
                match tokio::time::timeout(FETCH_EXPIRY + FETCH_GRACE, self.replies.next()).await {
                    Ok(Some(message)) => message,
                    Ok(None) => return Err(BrokerError::Closed),
                    Err(_) => {
                        self.requested = None;
                        continue;
                    }
                };
            // Status messages (no messages, request expired, …) end the request.
            self.requested = None;
            if message.status.is_some() {
                continue;
            }
            let message = jetstream::Message {
                message,
                context: self.context.clone(),
            };
            let attempt = message.info().map(|i| i.delivered).unwrap_or(1).max(1) as u32;
            let (message, acker) = message.split();
            return Ok(Delivery {
                message: Message {
                    subject: message.subject.to_string(),
                    // The reply subject of a JetStream delivery is its ack subject.
                    reply: None,
                    payload: message.payload,
                },
                attempt,
                acker: Box::new(NatsAcker(acker)),
            });
        }
    }
}

struct NatsAcker(jetstream::message::Acker);

impl NatsAcker {
    async fn send(&self, kind: AckKind) -> Result<(), BrokerError> {
        self.0
            .ack_with(kind)
            .await
            // The acker's error is boxed already.
            .map_err(|source| BrokerError::Nats {
                operation: "ack".to_owned(),
                source,
            })
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.send(AckKind::Ack).await
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<(), BrokerError> {
        self.send(AckKind::Nak(delay)).await
    }

    async fn term(&self) -> Result<(), BrokerError> {
        self.send(AckKind::Term).await
    }

    async fn in_progress(&self) -> Result<(), BrokerError> {
        self.send(AckKind::Progress).await
    }
}

/// The outbox drains onto NATS: durable subjects through JetStream, with the outbox
/// row's id as `Nats-Msg-Id` so a re-send after a crash is dropped as a duplicate;
/// other subjects as core publishes confirmed by a flush.
///
/// Publishes to different subjects are pipelined, but one subject has at most one
/// unacknowledged message at a time: after a reconnect, writes the client buffered
/// could otherwise land behind the re-send of an earlier, lost message.
#[async_trait]
impl Transport for NatsBroker {
    async fn send(&self, batch: &[Pending]) -> SendReport {
        let mut report = SendReport::default();
        let all_unavailable = |reason: String| SendReport {
            sent: Vec::new(),
            failed: vec![(0, SendError::Unavailable(reason))],
        };
        if !self.connected() {
            return all_unavailable("not connected to NATS".to_owned());
        }
        if let Err(err) = self.ensure_streams().await {
            return all_unavailable(err.to_string());
        }

        // Core messages: publish in order, confirmed together by one flush.
        let mut core = Vec::new();
        // Durable messages: a queue of batch indexes per subject, in order.
        let mut durable: Vec<(&str, std::collections::VecDeque<usize>)> = Vec::new();
        for (index, item) in batch.iter().enumerate() {
            if subject::durable_stream(&item.subject).is_none() {
                core.push(index);
            } else if let Some((_, queue)) = durable.iter_mut().find(|(s, _)| *s == item.subject) {
                queue.push_back(index);
            } else {
                durable.push((&item.subject, [index].into()));
            }
        }

        for &index in &core {
            let item = &batch[index];
            let payload = Bytes::copy_from_slice(&item.payload);
            let result = match &item.reply {
                Some(reply) => {
                    self.client
                        .publish_with_reply(item.subject.clone(), reply.clone(), payload)
                        .await
                }
                None => self.client.publish(item.subject.clone(), payload).await,
            };
            if let Err(err) = result {
                report
                    .failed
                    .push((index, SendError::Unavailable(err.to_string())));
                return report;
            }
        }
        if !core.is_empty() {
            let flushed = tokio::time::timeout(FLUSH_TIMEOUT, self.client.flush()).await;
            match flushed {
                Ok(Ok(())) => report.sent.extend(core),
                Ok(Err(err)) => {
                    report
                        .failed
                        .push((core[0], SendError::Unavailable(err.to_string())));
                    return report;
                }
                // Not confirmed: sent again later (at least once).
                Err(_) => {
                    report.failed.push((
                        core[0],
                        SendError::Unavailable("NATS did not confirm in time".to_owned()),
                    ));
                    return report;
                }
            }
        }

        // Waves: the head of every subject's queue, pipelined; a failed head stops
        // its subject for this round.
        while durable.iter().any(|(_, queue)| !queue.is_empty()) {
            let mut acks = Vec::new();
            for (_, queue) in durable.iter_mut() {
                let Some(&index) = queue.front() else {
                    continue;
                };
                let item = &batch[index];
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", item.msg_id.as_str());
                let payload = Bytes::copy_from_slice(&item.payload);
                match self
                    .jetstream
                    .publish_with_headers(item.subject.clone(), headers, payload)
                    .await
                {
                    Ok(ack) => acks.push((index, Some(ack))),
                    Err(err) => {
                        report
                            .failed
                            .push((index, SendError::Unavailable(err.to_string())));
                        acks.push((index, None));
                    }
                }
            }
            // Awaited together: after a reconnect, lost acks time out at once rather
            // than one after another.
            let (indexes, pending): (Vec<usize>, Vec<_>) = acks.into_iter().unzip();
            let results = futures::future::join_all(pending.into_iter().map(|ack| async move {
                match ack {
                    Some(ack) => Some(ack.await),
                    None => None,
                }
            }))
            .await;
            for (index, result) in indexes.into_iter().zip(results) {
                let subject = batch[index].subject.as_str();
                let queue = &mut durable
                    .iter_mut()
                    .find(|(s, _)| *s == subject)
                    .expect("subject queued")
                    .1;
                match result {
                    None => queue.clear(),
                    Some(Ok(_)) => {
                        report.sent.push(index);
                        queue.pop_front();
                    }
                    Some(Err(err)) => {
                        let error = match err.kind() {
                            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                                SendError::Unavailable(err.to_string())
                            }
                            PublishErrorKind::StreamNotFound => {
                                // Deleted behind our back: create it again before the retry.
                                self.streams_ready.store(false, Ordering::Release);
                                SendError::Unavailable(err.to_string())
                            }
                            _ => SendError::Rejected(err.to_string()),
                        };
                        report.failed.push((index, error));
                        queue.clear();
                    }
                }
            }
        }
        report
    }
}
