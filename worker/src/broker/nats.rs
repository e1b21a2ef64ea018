//! [`Broker`] on NATS core through async-nats: the same semantics as the local bus,
//! across processes and machines.

use std::time::Duration;

use async_nats::{ConnectOptions, Request, RequestErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use nexo_api::config::NatsSettings;
use nexo_api::subject;

use super::{Broker, BrokerError, Message, Subscription};

pub struct NatsBroker {
    client: async_nats::Client,
}

/// Reads a secret named in the config from the environment.
fn secret(env: &str) -> Result<String, BrokerError> {
    std::env::var(env)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| BrokerError::Connect(format!("environment variable `{env}` is not set")))
}

/// Connection options from the config: credentials, TLS, time-outs. The client
/// reconnects on its own with backoff; the first connection is retried too, so a
/// worker can start before NATS is up (it reports not-ready meanwhile).
pub async fn connect_options(settings: &NatsSettings) -> Result<ConnectOptions, BrokerError> {
    let mut options = ConnectOptions::new()
        .name("nexo-worker")
        .connection_timeout(Duration::from_secs(settings.connect_timeout_seconds))
        .retry_on_initial_connect();
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        options = options.user_and_password(user.clone(), secret(&password.env)?);
    }
    if let Some(token) = &settings.token {
        options = options.token(secret(&token.env)?);
    }
    if let Some(seed) = &settings.nkey_seed {
        options = options.nkey(secret(&seed.env)?);
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
    pub async fn connect(settings: &NatsSettings) -> Result<Self, BrokerError> {
        // async-nats brings rustls; make sure a provider is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let options = connect_options(settings).await?;
        let client = options
            .connect(settings.urls.join(","))
            .await
            .map_err(|e| BrokerError::Connect(e.to_string()))?;
        Ok(Self { client })
    }

    /// Connects to one URL without credentials (tests, tools).
    pub async fn connect_url(url: &str) -> Result<Self, BrokerError> {
        Self::connect(&NatsSettings {
            urls: vec![url.to_owned()],
            ..NatsSettings::default()
        })
        .await
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    async fn registered(
        &self,
        subscriber: async_nats::Subscriber,
    ) -> Result<Subscription, BrokerError> {
        // Wait until the server has the subscription, so a publish that follows is seen.
        self.client
            .flush()
            .await
            .map_err(|e| BrokerError::Nats(e.to_string()))?;
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
        result.map_err(|e| BrokerError::Nats(e.to_string()))
    }

    async fn subscribe(&self, pattern: &str) -> Result<Subscription, BrokerError> {
        subject::check_pattern(pattern)?;
        let subscriber = self
            .client
            .subscribe(pattern.to_owned())
            .await
            .map_err(|e| BrokerError::Nats(e.to_string()))?;
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
            .map_err(|e| BrokerError::Nats(e.to_string()))?;
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
                _ => BrokerError::Nats(err.to_string()),
            }),
        }
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}
