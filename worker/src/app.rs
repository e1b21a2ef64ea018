//! The worker's lifecycle: start every component under one cancellation token, serve,
//! and on shutdown stop intake, drain running turns up to a deadline, flush the
//! outbox, then stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::Router;
use nexo_api::config::BrokerSettings;
use nexo_api::{ResourceKey, WorkerConfig, subject};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::{AgentInfo, AgentRuntime};
use crate::broker::{Broker, BrokerError, ConsumeOptions, LocalBroker, NatsBroker, WorkSource};
use crate::channels::{self, router::Route};
use crate::http::{self, AdminToken, AgentDirectory, DeadLetterQueue, HttpState, Readiness};
use crate::llm::LlmError;
use crate::lock::{DataDirLock, LockError};
use crate::metrics::Metrics;
use crate::queue::{
    ConsumerLoop, DeadLetter, Handler, QueueError, QueueStore, QueuedBroker, Transport, run_drain,
};
use crate::secrets::Secrets;

/// How long open HTTP connections get after the drain before they are cut.
const HTTP_CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long replies of drained turns get to leave the outbox before channels close.
const OUTBOX_FLUSH_GRACE: Duration = Duration::from_secs(2);
/// Concurrent deliveries a channel's router handles.
const ROUTER_CONCURRENCY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("agent `{agent}`: {source}")]
    Model {
        agent: ResourceKey,
        source: LlmError,
    },
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

pub struct Application {
    config: WorkerConfig,
    lock: DataDirLock,
    queue: QueueStore,
    /// Publishes through the outbox.
    broker: Arc<dyn Broker>,
    /// Where the outbox drains to.
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
}

/// A started worker.
pub struct Running {
    /// Address the HTTP server listens on (useful with port 0).
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<Result<(), AppError>>,
}

impl Running {
    /// Waits until the worker has shut down (after its token is cancelled).
    pub async fn wait(self) -> Result<(), AppError> {
        self.task.await.expect("worker task does not panic")
    }
}

struct Agents(Vec<Arc<AgentRuntime>>);

impl AgentDirectory for Agents {
    fn agents(&self) -> Vec<AgentInfo> {
        self.0.iter().map(|a| a.info()).collect()
    }
}

struct Dlq(QueueStore);

#[async_trait]
impl DeadLetterQueue for Dlq {
    async fn list(&self, limit: usize) -> Result<Vec<DeadLetter>, String> {
        self.0.dead_letters(limit).await.map_err(|e| e.to_string())
    }

    async fn replay(&self, id: i64) -> Result<bool, String> {
        self.0.replay(id).await.map_err(|e| e.to_string())
    }

    async fn delete(&self, id: i64) -> Result<bool, String> {
        self.0
            .delete_dead_letter(id)
            .await
            .map_err(|e| e.to_string())
    }
}

/// A durable consumer to run: what it consumes and who handles it.
struct ConsumerSpec {
    name: String,
    filter: String,
    concurrency: usize,
    handler: Arc<dyn Handler>,
}

impl Application {
    /// Takes the data directory, opens the outbox and builds the broker client. A
    /// NATS client connects in the background, so this returns even while NATS is
    /// unreachable.
    pub async fn new(config: WorkerConfig) -> Result<Self, AppError> {
        let settings = &config.worker;
        let lock = DataDirLock::acquire(&settings.data_dir)?;
        let queue = QueueStore::open(
            &settings.data_dir.join("queue.db"),
            settings.delivery.max_attempts,
        )?;
        let (inner, transport): (Arc<dyn Broker>, Arc<dyn Transport>) = match &settings.broker {
            BrokerSettings::Local => {
                let local = Arc::new(LocalBroker::new());
                (local.clone(), local)
            }
            BrokerSettings::Nats(nats) => {
                let nats = Arc::new(
                    NatsBroker::connect(nats, &Secrets::new(&settings.secrets_dir)).await?,
                );
                (nats.clone(), nats)
            }
        };
        Ok(Self {
            broker: Arc::new(QueuedBroker::new(inner, queue.clone())),
            config,
            lock,
            queue,
            transport,
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// The broker this application publishes through (tests observe events with it).
    pub fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }

    /// The outbox and dead-letter store.
    pub fn queue(&self) -> QueueStore {
        self.queue.clone()
    }

    /// Starts every component; returns once the worker is serving. Cancelling
    /// `shutdown` stops it gracefully.
    pub async fn start(self, shutdown: CancellationToken) -> Result<Running, AppError> {
        let settings = &self.config.worker;
        let drain = Duration::from_secs(settings.drain_timeout_seconds);

        // Intake (agents, routers) stops on `shutdown`; the outbox drain, channels and
        // HTTP keep delivering the answers of draining turns and stop on `closing`.
        let closing = CancellationToken::new();
        let mut intake = JoinSet::new();
        let mut delivery = JoinSet::new();
        delivery.spawn(run_drain(
            self.queue.clone(),
            self.transport.clone(),
            self.metrics.clone(),
            closing.clone(),
        ));

        let secrets = Secrets::new(&settings.secrets_dir);
        let mut consumers = Vec::new();
        let mut agents = Vec::new();
        for resource in &self.config.agents {
            let key = resource.key();
            let agent = AgentRuntime::new(
                key.clone(),
                resource.spec.clone(),
                self.broker.clone(),
                self.metrics.clone(),
                &secrets,
            )
            .map_err(|source| AppError::Model {
                agent: key.clone(),
                source,
            })?;
            let agent = Arc::new(agent);
            consumers.push(ConsumerSpec {
                name: agent.consumer(),
                filter: subject::agent_route(&key),
                concurrency: agent.max_concurrency(),
                handler: agent.clone(),
            });
            agents.push(agent);
        }

        let mut channel_routes: Vec<Router> = Vec::new();
        for resource in &self.config.channels {
            let Some(channel) = channels::from_resource(
                resource,
                self.broker.clone(),
                self.metrics.clone(),
                &secrets,
            ) else {
                continue;
            };
            let route = Route {
                channel_type: channel.context().kind.as_str(),
                instance: resource.key(),
                agent: ResourceKey::new(&resource.namespace, &resource.spec.default_agent),
                broker: self.broker.clone(),
            };
            consumers.push(ConsumerSpec {
                name: route.consumer(),
                filter: route.inbound(),
                concurrency: ROUTER_CONCURRENCY,
                handler: Arc::new(route),
            });
            let outbound = channel.context().subscribe_outbound().await?;
            delivery.spawn(channels::deliver_outbound(
                channel.clone(),
                outbound,
                closing.clone(),
            ));
            channel_routes.push(channel.clone().routes());
        }

        let readiness = Arc::new(Readiness::new(self.broker.clone(), consumers.len()));
        let options = ConsumeOptions {
            ack_wait: Duration::from_secs(settings.delivery.ack_wait_seconds),
        };
        for spec in consumers {
            // Attach now when the broker is there, so work published right after start
            // is consumed; otherwise keep trying in the background.
            let first = self.broker.consume(&spec.filter, &spec.name, options).await;
            let consumer = ConsumerLoop {
                name: spec.name.clone(),
                concurrency: spec.concurrency,
                max_attempts: settings.delivery.max_attempts,
                drain,
                progress_every: (options.ack_wait / 3).max(Duration::from_secs(1)),
                dead_letters: self.queue.clone(),
                metrics: self.metrics.clone(),
            };
            intake.spawn(serve_consumer(
                first,
                spec,
                options,
                consumer,
                self.broker.clone(),
                readiness.clone(),
                shutdown.clone(),
            ));
        }

        let admin_token = AdminToken::from_env(&settings.admin.token_env);
        if !admin_token.is_set() {
            tracing::warn!(env = %settings.admin.token_env, "admin API disabled: token environment variable is not set");
        }
        let state = HttpState {
            metrics: self.metrics.clone(),
            readiness: readiness.clone(),
            agents: Arc::new(Agents(agents)),
            dead_letters: Arc::new(Dlq(self.queue.clone())),
            admin_token,
        };
        let app = http::router(state, channel_routes);
        let listener = tokio::net::TcpListener::bind(settings.http.listen)
            .await
            .map_err(|source| AppError::Bind {
                addr: settings.http.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(AppError::Serve)?;
        let server = tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(closing.clone().cancelled_owned())
                .into_future(),
        );
        readiness.set_started(true);
        tracing::info!(%addr, agents = self.config.agents.len(), channels = self.config.channels.len(), "worker started");
        for resource in self
            .config
            .channels
            .iter()
            .filter(|c| c.spec.webchat.is_some())
        {
            tracing::info!(channel = %resource.name, "web chat at http://{addr}/chat/{}", resource.name);
        }

        let queue = self.queue.clone();
        let lock = self.lock;
        let task = tokio::spawn(async move {
            let _lock = lock;
            shutdown.cancelled().await;
            readiness.set_started(false);
            tracing::info!(
                deadline_seconds = drain.as_secs(),
                "shutting down: draining agents"
            );
            while intake.join_next().await.is_some() {}
            flush_outbox(&queue, OUTBOX_FLUSH_GRACE).await;
            closing.cancel();
            while delivery.join_next().await.is_some() {}
            let server_abort = server.abort_handle();
            match tokio::time::timeout(HTTP_CLOSE_GRACE, server).await {
                Ok(Ok(result)) => result.map_err(AppError::Serve)?,
                Ok(Err(join)) => tracing::error!(error = %join, "HTTP server task failed"),
                Err(_) => {
                    tracing::info!("closing remaining HTTP connections");
                    server_abort.abort();
                }
            }
            tracing::info!("worker stopped");
            Ok(())
        });
        Ok(Running { addr, task })
    }
}

/// Runs one durable consumer until `cancel`, attaching (again) while the broker is
/// unreachable.
async fn serve_consumer(
    first: Result<Box<dyn WorkSource>, BrokerError>,
    spec: ConsumerSpec,
    options: ConsumeOptions,
    consumer: ConsumerLoop,
    broker: Arc<dyn Broker>,
    readiness: Arc<Readiness>,
    cancel: CancellationToken,
) {
    let mut attempt = first;
    let mut wait = Duration::from_millis(200);
    let source = loop {
        match attempt {
            Ok(source) => break source,
            Err(err) => {
                tracing::warn!(consumer = %spec.name, error = %err, "cannot attach the consumer; retrying");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(5));
                attempt = broker.consume(&spec.filter, &spec.name, options).await;
            }
        }
    };
    readiness.consumer_attached();
    consumer.run(source, spec.handler, cancel).await;
}

/// Waits until the outbox is empty, at most `grace` (it may not drain while the broker
/// is unreachable; what is left is sent after the next start).
async fn flush_outbox(queue: &QueueStore, grace: Duration) {
    let started = Instant::now();
    while started.elapsed() < grace {
        match queue.depths().await {
            Ok((0, _)) | Err(_) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    tracing::warn!("outbox not empty at shutdown; it will drain after the next start");
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once.
pub async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("shutdown signal received; send another to exit immediately");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler can be installed");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
