//! Starting a worker (listen, apply the first catalog, start the outbox drain and the
//! reload loop) and stopping it in the order of its phases (`lifecycle.rs`): stop
//! intake, drain running turns up to a deadline, flush the outbox, then close.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nexo_api::WorkerConfig;
use nexo_api::config::BrokerSettings;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, LocalBroker, NatsBroker, Transport};
use crate::catalog::{CatalogSource, Health, Live, Reconciler, Reloader, Shard, Shared};
use crate::channels::ChannelRoutes;
use crate::channels::connection::Connections;
use crate::config::ConfigError;
use crate::extensions::{ConnectContext, Extensions};
use crate::http::{self, AdminToken, DeadLetterQueue, HttpState};
use crate::lifecycle::{Lifecycle, Phase};
use crate::lock::{DataDirLock, LockError};
use crate::metrics::Metrics;
use crate::ownership::Ownership;
use crate::queue::{DeadLetter, QueueError, QueueStore, QueuedBroker, StoreLimits, run_drain};
use crate::secrets::{SecretWatch, Secrets};
use crate::serve::Served;
use crate::tools::Browsers;

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
    /// The NATS client, when it is the broker: agents are then owned through leases
    /// and their memory is journalled on JetStream.
    nats: Option<Arc<NatsBroker>>,
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
        let metrics = Arc::new(Metrics::new());
        let mut local = None;
        let mut nats_broker = None;
        let (inner, transport): (Arc<dyn Broker>, Arc<dyn Transport>) = match &settings.broker {
            BrokerSettings::Local {} => {
                let broker =
                    Arc::new(LocalBroker::new().count_drops_in(metrics.local_bus_dropped.clone()));
                local = Some(broker.clone());
                (broker.clone(), broker)
            }
            BrokerSettings::Nats(nats) => {
                let nats = Arc::new(
                    NatsBroker::connect(nats, &Secrets::new(&settings.secrets_dir)).await?,
                );
                nats_broker = Some(nats.clone());
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
            nats: nats_broker,
            metrics,
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
    /// applied (what cannot be built is left out, reported in `/catalog` and tried
    /// again). Agents attach in the background once their memory files are prepared.
    /// Cancelling `shutdown` stops it gracefully, in the order of
    /// [`Phase`](crate::lifecycle::Phase).
    pub async fn start(self, shutdown: CancellationToken) -> Result<Running, AppError> {
        let settings = &self.config.worker;
        let (source, catalog) =
            CatalogSource::open(&self.config, self.config_file.as_deref()).await?;

        let lifecycle = Lifecycle::new();
        let health = Arc::new(Health::new(self.metrics.components_not_running.clone()));
        let worker = worker_name(&settings.data_dir, self.shard);
        let connections = Connections::new(
            self.broker.clone(),
            worker.clone(),
            self.metrics.channel_connected.clone(),
        );
        let ownership = self.nats.as_ref().map(|nats| {
            Ownership::start(
                nats.jetstream().clone(),
                worker,
                &settings.pool,
                self.shard.index(),
                self.metrics.clone(),
            )
        });
        let secrets = Secrets::new(&settings.secrets_dir);
        let extensions = Arc::new(Extensions::new(
            ConnectContext {
                broker: self.broker.clone(),
                secrets: secrets.clone(),
            },
            lifecycle.reached(Phase::Closing),
        ));
        let shared = Shared {
            browser: Browsers::new(
                settings.browser.clone(),
                &settings.data_dir,
                lifecycle.reached(Phase::Closing),
            ),
            extensions: extensions.clone(),
            broker: self.broker.clone(),
            metrics: self.metrics.clone(),
            queue: self.queue.clone(),
            secrets,
            secret_watch: SecretWatch::spawn(
                SECRET_POLL_INTERVAL,
                lifecycle.reached(Phase::Draining),
            ),
            data_dir: settings.data_dir.clone(),
            health: health.clone(),
            connections: connections.clone(),
            delivery: settings.delivery.clone(),
            drain: Duration::from_secs(settings.drain_timeout_seconds),
            lifecycle: lifecycle.clone(),
            ownership: ownership.clone(),
            models: Arc::new(crate::llm::SharedModels::new(
                &settings.models,
                &self.metrics,
            )),
        };
        let live = Arc::new(Live::new(health, extensions, connections));
        if let Some(nats) = &self.nats {
            let agents = live.clone();
            let consumers = Arc::new(move || {
                agents
                    .agents()
                    .iter()
                    .map(|a| {
                        let key = nexo_api::ResourceKey::new(&a.namespace, &a.name);
                        nexo_api::subject::agent_consumer(&key)
                    })
                    .collect()
            });
            tokio::spawn(crate::ownership::lag::report(
                nats.jetstream().clone(),
                consumers,
                self.metrics
                    .partition_lag
                    .with_label_values(&[&settings.pool]),
                lifecycle.reached(Phase::Draining),
            ));
        }
        let routes = ChannelRoutes::default();
        let mut reloader = Reloader::new(
            Reconciler::new(shared, routes.clone(), live.clone()),
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
            lifecycle: lifecycle.clone(),
            broker: self.broker.clone(),
            catalog: live.clone(),
            dead_letters: Arc::new(Dlq(self.queue.clone())),
            admin_token,
            channels: routes,
            serve: Served::new(
                &settings.serve,
                self.broker.clone(),
                &live,
                self.metrics.clone(),
                lifecycle.clone(),
            ),
        };
        // Listening before the catalog is applied: opening memory files and attaching
        // consumers can take a while, and liveness probes must be answered meanwhile
        // (`/readyz` says not ready until the first catalog is applied).
        let listener = tokio::net::TcpListener::bind(settings.http.listen)
            .await
            .map_err(|source| AppError::Bind {
                addr: settings.http.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(AppError::Serve)?;
        let server = tokio::spawn(
            axum::serve(listener, http::router(state))
                .with_graceful_shutdown(lifecycle.reached(Phase::Closing).cancelled_owned())
                .into_future(),
        );
        if let Err(err) = reloader.apply(&catalog).await {
            // One agent that cannot be built (a missing key, a corrupt memory file)
            // must not keep the others from running: it is left out, reported in
            // `/catalog` and the log, and tried again.
            tracing::error!(error = %err, "starting without what cannot be built; it is tried again");
        }
        // Only now that reply subscriptions and routers are attached: what a crash left
        // in the outbox is sent to them, not to an empty bus. Agents attach once their
        // memory file is prepared; until then the broker keeps their work.
        let outbox = tokio::spawn(run_drain(
            self.queue.clone(),
            self.transport.clone(),
            self.metrics.clone(),
            lifecycle.reached(Phase::Closing),
        ));

        // A shutdown asked for while the catalog was applied goes straight on to
        // draining, without a moment of readiness.
        if !shutdown.is_cancelled() {
            lifecycle.advance(Phase::Serving);
        }
        log_started(addr, &live, &catalog);
        let watcher = tokio::spawn(reloader.watch(source, lifecycle.reached(Phase::Draining)));

        let stopping = Stopping {
            lifecycle,
            watcher,
            outbox,
            server,
            queue: self.queue.clone(),
            local: self.local.clone(),
            ownership,
            drain: Duration::from_secs(settings.drain_timeout_seconds),
        };
        let lock = self.lock;
        let task = tokio::spawn(async move {
            let _lock = lock;
            shutdown.cancelled().await;
            stopping.run().await
        });
        Ok(Running { addr, task })
    }
}

/// What a started worker stops, and the order it stops it in: one step per
/// [`Phase`], each waiting for what it promises before the next begins.
struct Stopping {
    lifecycle: Lifecycle,
    /// The catalog's reload loop; it returns what runs, to be drained.
    watcher: JoinHandle<Reconciler>,
    outbox: JoinHandle<()>,
    server: JoinHandle<std::io::Result<()>>,
    queue: QueueStore,
    /// The in-process bus, when it is the broker: work it still holds at the end goes
    /// back to the outbox.
    local: Option<Arc<LocalBroker>>,
    /// Leases to release once the agents are handed off.
    ownership: Option<Arc<Ownership>>,
    drain: Duration,
}

impl Stopping {
    async fn run(self) -> Result<(), AppError> {
        // Draining: `/readyz` says not ready, channels refuse new messages, consumers
        // stop fetching and the reload loop ends; running turns get the drain period.
        self.lifecycle.advance(Phase::Draining);
        tracing::info!(
            deadline_seconds = self.drain.as_secs(),
            "shutting down: draining agents"
        );
        let reconciler = self
            .watcher
            .await
            .expect("the catalog watcher does not panic");
        let mut delivery = reconciler.drain().await;
        // Every agent is drained and its memory snapshotted: the partitions can go
        // to other workers now, without waiting for the leases to expire.
        if let Some(ownership) = &self.ownership {
            ownership.leases.release_all().await;
        }

        // Flushing: the replies of the last turns leave the outbox while channels can
        // still hand them to their clients.
        self.lifecycle.advance(Phase::Flushing);
        flush_outbox(&self.queue, OUTBOX_FLUSH_GRACE).await;

        // Closing: channels stop delivering, the outbox drain and HTTP server stop.
        self.lifecycle.advance(Phase::Closing);
        while delivery.join_next().await.is_some() {}
        if let Err(join) = self.outbox.await {
            tracing::error!(error = %join, "outbox drain task failed");
        }
        if let Some(local) = &self.local {
            park_unhandled(&self.queue, local).await;
        }
        let server_abort = self.server.abort_handle();
        let served = match tokio::time::timeout(HTTP_CLOSE_GRACE, self.server).await {
            Ok(Ok(result)) => result.map_err(AppError::Serve),
            Ok(Err(join)) => {
                tracing::error!(error = %join, "HTTP server task failed");
                Ok(())
            }
            Err(_) => {
                tracing::info!("closing remaining HTTP connections");
                server_abort.abort();
                Ok(())
            }
        };
        self.lifecycle.advance(Phase::Stopped);
        tracing::info!("worker stopped");
        served
    }
}

/// The name this worker holds leases under, kept in its data directory: a worker
/// restarted on the same directory (after a crash, or a pod restarted on its volume)
/// takes back the leases its predecessor still holds at once instead of waiting for
/// them to expire. That is safe because only one process can hold the directory's
/// lock, so the predecessor is gone. The host (a pod's name) and shard make it
/// readable; the random part tells directories apart.
fn worker_name(data_dir: &std::path::Path, shard: Shard) -> String {
    let file = data_dir.join("worker-name");
    if let Ok(name) = std::fs::read_to_string(&file)
        && !name.trim().is_empty()
    {
        return name.trim().to_owned();
    }
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{host}-{}-{}", shard.index(), &suffix[..8]);
    if let Err(err) = std::fs::write(&file, &name) {
        tracing::warn!(file = %file.display(), error = %err, "cannot keep the worker's name; after a restart its leases are taken back only once they expire");
    }
    name
}

/// Says what the worker runs and where its chat pages are.
fn log_started(addr: SocketAddr, live: &Live, catalog: &nexo_api::config::Catalog) {
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
            .keep(&message.subject, message.reply.as_deref(), &message.payload)
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
        if queue.depths().0 == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
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
