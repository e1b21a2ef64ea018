//! The worker's lifecycle: start every component under one cancellation token, serve,
//! and on shutdown stop intake, drain running turns up to a deadline, flush the
//! outbox, then stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nexo_api::WorkerConfig;
use nexo_api::config::BrokerSettings;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, LocalBroker, NatsBroker, Transport};
use crate::catalog::{BuildError, CatalogSource, Env, Live, Reconciler, Reloader, Shard};
use crate::config::ConfigError;
use crate::http::{self, AdminToken, ChannelRoutes, DeadLetterQueue, HttpState, Readiness};
use crate::lock::{DataDirLock, LockError};
use crate::metrics::Metrics;
use crate::queue::{DeadLetter, QueueError, QueueStore, QueuedBroker, StoreLimits, run_drain};
use crate::secrets::{SecretWatch, Secrets};

/// How often mounted secrets of running components are read to notice a rotation.
const SECRET_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long open HTTP connections get after the drain before they are cut.
const HTTP_CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long replies of drained turns get to leave the outbox before channels close.
const OUTBOX_FLUSH_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The catalog file cannot be read or is invalid.
    #[error(transparent)]
    Catalog(#[from] ConfigError),
    /// An agent or channel of the catalog cannot be built.
    #[error(transparent)]
    Build(#[from] BuildError),
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
    /// The file `config` was read from: watched for catalog changes.
    config_file: Option<PathBuf>,
    shard: Shard,
    lock: DataDirLock,
    queue: QueueStore,
    /// Publishes through the outbox.
    broker: Arc<dyn Broker>,
    /// Where the outbox drains to.
    transport: Arc<dyn Transport>,
    /// The in-process bus, when it is the broker: at shutdown, work it still holds
    /// goes back to the outbox.
    local: Option<Arc<LocalBroker>>,
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

struct Dlq(QueueStore);

#[async_trait]
impl DeadLetterQueue for Dlq {
    async fn list(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.0.dead_letters(limit).await
    }

    async fn replay(&self, id: i64) -> Result<bool, QueueError> {
        self.0.replay(id).await
    }

    async fn delete(&self, id: i64) -> Result<bool, QueueError> {
        self.0.delete_dead_letter(id).await
    }
}

impl Application {
    /// Takes the data directory, opens the outbox and builds the broker client. A
    /// NATS client connects in the background, so this returns even while NATS is
    /// unreachable.
    pub async fn new(config: WorkerConfig) -> Result<Self, AppError> {
        let settings = &config.worker;
        let lock = DataDirLock::acquire(&settings.data_dir)?;
        let queue = QueueStore::open_with_limits(
            &settings.data_dir.join("queue.db"),
            StoreLimits::from(&settings.delivery),
        )?;
        let mut local = None;
        let (inner, transport): (Arc<dyn Broker>, Arc<dyn Transport>) = match &settings.broker {
            BrokerSettings::Local {} => {
                let broker = Arc::new(LocalBroker::new());
                local = Some(broker.clone());
                (broker.clone(), broker)
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
            config_file: None,
            shard: Shard::single(),
            lock,
            queue,
            transport,
            local,
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// Runs shard `shard` of the pool (default: the only one).
    pub fn with_shard(mut self, shard: Shard) -> Self {
        self.shard = shard;
        self
    }

    /// Names the file the config was loaded from, so changes to the agents and
    /// channels in it are applied in place (without `worker.catalogFile`).
    pub fn with_config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// The broker this application publishes through (tests observe events with it).
    pub fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }

    /// The outbox and dead-letter store.
    pub fn queue(&self) -> QueueStore {
        self.queue.clone()
    }

    /// Starts every component; returns once the worker listens and its catalog is
    /// applied. Agents attach in the background once their memory files are prepared
    /// (`/readyz` answers 200 when everything is attached). Cancelling `shutdown`
    /// stops it gracefully.
    pub async fn start(self, shutdown: CancellationToken) -> Result<Running, AppError> {
        let settings = &self.config.worker;
        let (source, catalog) =
            CatalogSource::open(&self.config, self.config_file.as_deref()).await?;

        // Intake (agents, routers) stops on `shutdown`; the outbox drain, channels and
        // HTTP keep delivering the answers of draining turns and stop on `closing`.
        let closing = CancellationToken::new();

        let readiness = Arc::new(Readiness::new(self.broker.clone()));
        let env = Env {
            broker: self.broker.clone(),
            metrics: self.metrics.clone(),
            queue: self.queue.clone(),
            secrets: Secrets::new(&settings.secrets_dir),
            secret_watch: SecretWatch::spawn(SECRET_POLL_INTERVAL, shutdown.clone()),
            data_dir: settings.data_dir.clone(),
            readiness: readiness.clone(),
            delivery: settings.delivery.clone(),
            drain: Duration::from_secs(settings.drain_timeout_seconds),
            shutdown: shutdown.clone(),
            closing: closing.clone(),
        };
        let live = Arc::new(Live::default());
        let routes = ChannelRoutes::default();
        let mut reloader = Reloader::new(
            Reconciler::new(env, routes.clone(), live.clone()),
            settings.pool.clone(),
            self.shard,
            self.metrics.clone(),
        );
        let admin_token = AdminToken::from_env(&settings.admin.token_env);
        if !admin_token.is_set() {
            tracing::warn!(env = %settings.admin.token_env, "admin API disabled: token environment variable is not set");
        }
        let state = HttpState {
            metrics: self.metrics.clone(),
            readiness: readiness.clone(),
            agents: live.clone(),
            catalog: live.clone(),
            dead_letters: Arc::new(Dlq(self.queue.clone())),
            admin_token,
            channels: routes,
        };
        // Listening before the catalog is applied: opening memory files and attaching
        // consumers can take a while, and liveness probes must be answered meanwhile
        // (`/readyz` says not ready until everything is started and attached).
        let listener = tokio::net::TcpListener::bind(settings.http.listen)
            .await
            .map_err(|source| AppError::Bind {
                addr: settings.http.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(AppError::Serve)?;
        let server = tokio::spawn(
            axum::serve(listener, http::router(state))
                .with_graceful_shutdown(closing.clone().cancelled_owned())
                .into_future(),
        );
        if let Err(err) = reloader.apply(&catalog).await {
            // On a laptop a missing key should stop the start with its reason; in a
            // pool (a catalog file), one agent must not keep the others from running.
            if self.config.worker.catalog_file.is_none() {
                closing.cancel();
                return Err(err.into());
            }
            tracing::error!(error = %err, "starting without what cannot be built; it is tried again");
        }
        // Only now that reply subscriptions and routers are attached: what a crash left
        // in the outbox is sent to them, not to an empty bus. Agents attach once their
        // memory file is prepared; until then the broker keeps their work.
        let outbox = tokio::spawn(run_drain(
            self.queue.clone(),
            self.transport.clone(),
            self.metrics.clone(),
            closing.clone(),
        ));

        readiness.set_started(true);
        log_started(addr, &live, &catalog);
        let watcher = tokio::spawn(reloader.watch(source, shutdown.clone()));

        let queue = self.queue.clone();
        let local = self.local.clone();
        let lock = self.lock;
        let drain = Duration::from_secs(settings.drain_timeout_seconds);
        let task = tokio::spawn(async move {
            let _lock = lock;
            shutdown.cancelled().await;
            readiness.set_started(false);
            tracing::info!(
                deadline_seconds = drain.as_secs(),
                "shutting down: draining agents"
            );
            let reconciler = watcher.await.expect("the catalog watcher does not panic");
            let mut delivery = reconciler.drain().await;
            flush_outbox(&queue, OUTBOX_FLUSH_GRACE).await;
            closing.cancel();
            while delivery.join_next().await.is_some() {}
            if let Err(join) = outbox.await {
                tracing::error!(error = %join, "outbox drain task failed");
            }
            if let Some(local) = local {
                park_unhandled(&queue, &local).await;
            }
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

/// Says what the worker runs and where its chat pages are.
fn log_started(addr: SocketAddr, live: &Live, catalog: &nexo_api::config::Catalog) {
    use crate::http::CatalogView;
    let report = live.report();
    tracing::info!(%addr, revision = %report.revision, shard = report.shard, shards = report.shards, agents = report.agents.len(), channels = report.channels.len(), "worker started");
    for resource in catalog
        .channels
        .iter()
        .filter(|c| c.spec.webchat.is_some() && report.channels.contains(&c.key().to_string()))
    {
        tracing::info!(channel = %resource.name, "web chat at http://{addr}/chat/{}", resource.name);
    }
}

/// Stores the work the in-process bus still holds (accepted, but no consumer took it
/// before the drain ended) in the outbox, which survives the process: the next start
/// delivers it. Runs after the drain task stopped, so nothing sends it back meanwhile.
async fn park_unhandled(queue: &QueueStore, local: &LocalBroker) {
    let unhandled = local.take_durable();
    if unhandled.is_empty() {
        return;
    }
    let count = unhandled.len();
    for message in unhandled {
        if let Err(err) = queue
            .enqueue(&message.subject, message.reply.as_deref(), &message.payload)
            .await
        {
            tracing::error!(subject = %message.subject, error = %err, "cannot keep unhandled work in the outbox; it is lost");
        }
    }
    tracing::info!(
        messages = count,
        "unhandled work kept in the outbox for the next start"
    );
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
