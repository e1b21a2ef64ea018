//! The worker's lifecycle: start every component under one cancellation token, serve,
//! and on shutdown stop intake, drain running turns up to a deadline, then stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use nexo_api::config::BrokerSettings;
use nexo_api::{ResourceKey, WorkerConfig, subject};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::{AgentInfo, AgentRuntime};
use crate::broker::{Broker, BrokerError, LocalBroker, NatsBroker};
use crate::channels::{self, router::Route};
use crate::http::{self, AdminToken, AgentDirectory, HttpState, Readiness};
use crate::llm::LlmError;
use crate::lock::{DataDirLock, LockError};
use crate::metrics::Metrics;

/// How long open HTTP connections get after the drain before they are cut.
const HTTP_CLOSE_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Lock(#[from] LockError),
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
    broker: Arc<dyn Broker>,
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

impl Application {
    /// Builds the application and its broker client. A NATS client connects in the
    /// background, so this returns even while NATS is unreachable.
    pub async fn new(config: WorkerConfig) -> Result<Self, AppError> {
        let broker: Arc<dyn Broker> = match &config.worker.broker {
            BrokerSettings::Local => Arc::new(LocalBroker::new()),
            BrokerSettings::Nats(settings) => Arc::new(NatsBroker::connect(settings).await?),
        };
        Ok(Self {
            config,
            broker,
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// The broker this application runs on (tests observe events through it).
    pub fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }

    /// Starts every component; returns once the worker is ready to serve.
    /// Cancelling `shutdown` stops it gracefully.
    pub async fn start(self, shutdown: CancellationToken) -> Result<Running, AppError> {
        let settings = &self.config.worker;
        let lock = DataDirLock::acquire(&settings.data_dir)?;
        let drain = Duration::from_secs(settings.drain_timeout_seconds);

        // Agents stop on `shutdown`; channels and HTTP keep delivering the answers of
        // draining turns and stop on `closing`, after the agents.
        let closing = CancellationToken::new();
        let mut agent_tasks = JoinSet::new();
        let mut channel_tasks = JoinSet::new();

        let mut agents = Vec::new();
        for resource in &self.config.agents {
            let key = resource.key();
            let agent = AgentRuntime::new(
                key.clone(),
                resource.spec.clone(),
                self.broker.clone(),
                self.metrics.clone(),
            )
            .map_err(|source| AppError::Model { agent: key, source })?;
            let agent = Arc::new(agent);
            let inbox = agent.subscribe().await?;
            agent_tasks.spawn(agent.clone().run(inbox, shutdown.clone(), drain));
            agents.push(agent);
        }

        let mut channel_routes: Vec<Router> = Vec::new();
        for resource in &self.config.channels {
            let Some(channel) =
                channels::from_resource(resource, self.broker.clone(), self.metrics.clone())
            else {
                continue;
            };
            let kind = channel.context().kind;
            let route = Route {
                inbound: subject::inbound(kind.as_str(), &resource.key()),
                agent: ResourceKey::new(&resource.namespace, &resource.spec.default_agent),
            };
            let inbound = route.subscribe(self.broker.as_ref()).await?;
            channel_tasks.spawn(route.run(self.broker.clone(), inbound, closing.clone()));
            let outbound = channel.context().subscribe_outbound().await?;
            channel_tasks.spawn(channels::deliver_outbound(
                channel.clone(),
                outbound,
                closing.clone(),
            ));
            channel_routes.push(channel.clone().routes());
        }

        let readiness = Arc::new(Readiness::new(self.broker.clone()));
        let admin_token = AdminToken::from_env(&settings.admin.token_env);
        if !admin_token.is_set() {
            tracing::warn!(env = %settings.admin.token_env, "admin API disabled: token environment variable is not set");
        }
        let state = HttpState {
            metrics: self.metrics.clone(),
            readiness: readiness.clone(),
            agents: Arc::new(Agents(agents)),
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

        let task = tokio::spawn(async move {
            let _lock = lock;
            shutdown.cancelled().await;
            readiness.set_started(false);
            tracing::info!(
                deadline_seconds = drain.as_secs(),
                "shutting down: draining agents"
            );
            while agent_tasks.join_next().await.is_some() {}
            closing.cancel();
            while channel_tasks.join_next().await.is_some() {}
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
