//! Starting and stopping one agent or one channel instance. Building (the model client,
//! the channel's outbound subscription) is separate from starting, so a reload can
//! build everything it needs before it stops anything, and leave out the pieces that
//! cannot be built.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use nexo_api::config::{DeliverySettings, Resource};
use nexo_api::spec::{AgentSpec, ChannelSpec, MemorySpec};
use nexo_api::{ResourceKey, subject};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::agent::AgentRuntime;
use crate::broker::{Broker, BrokerError, ConsumeOptions, Subscription, WorkSource};
use crate::channels::{self, Channel, router::Route};
use crate::http::{ConsumerAttachment, Readiness};
use crate::http::{NotRunning, ResourceKind};
use crate::llm::LlmError;
use crate::memory::{self, AgentMemory, MemoryError, embedder};
use crate::metrics::Metrics;
use crate::queue::{ConsumerLoop, Handler, QueueStore};
use crate::secrets::{Fingerprint, SecretWatch, Secrets};

/// Concurrent deliveries a channel's router handles.
const ROUTER_CONCURRENCY: usize = 16;

/// Why a component could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("agent `{agent}`: {source}")]
    Agent {
        agent: ResourceKey,
        source: LlmError,
    },
    #[error("agent `{agent}`: {source}")]
    Memory {
        agent: ResourceKey,
        source: MemoryError,
    },
    #[error("channel `{channel}`: {source}")]
    Channel {
        channel: ResourceKey,
        source: BrokerError,
    },
}

impl BuildError {
    /// The report entry of this failure: which resource, and why.
    pub fn not_running(&self) -> NotRunning {
        let (kind, key, reason) = match self {
            BuildError::Agent { agent, source } => (ResourceKind::Agent, agent, source.to_string()),
            BuildError::Memory { agent, source } => {
                (ResourceKind::Agent, agent, source.to_string())
            }
            BuildError::Channel { channel, source } => {
                (ResourceKind::Channel, channel, source.to_string())
            }
        };
        NotRunning {
            kind,
            name: key.to_string(),
            reason,
        }
    }
}

/// What every component needs from the worker.
pub struct Env {
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    /// Dead letters of consumers.
    pub queue: QueueStore,
    pub secrets: Secrets,
    /// Reads the mounted secret files of running components again, to restart those
    /// whose keys were rotated.
    pub secret_watch: SecretWatch,
    /// The worker's data directory; agents keep their memory under `memory/`.
    pub data_dir: PathBuf,
    pub readiness: Arc<Readiness>,
    pub delivery: DeliverySettings,
    /// Time running work gets once its consumer is stopped.
    pub drain: Duration,
    /// The worker's shutdown: every consumer stops on it.
    pub shutdown: CancellationToken,
    /// Cancelled after the drain at shutdown: channels stop delivering answers.
    pub closing: CancellationToken,
}

impl Env {
    fn consume_options(&self) -> ConsumeOptions {
        ConsumeOptions {
            ack_wait: Duration::from_secs(self.delivery.ack_wait_seconds),
        }
    }
}

/// A durable consumer running in its own task.
pub struct RunningConsumer {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningConsumer {
    /// Attaches a consumer of `filter` and runs `handler` on its deliveries. The first
    /// attach is awaited, so work published right after this returns is consumed; if
    /// the broker is unreachable, attaching goes on in the background.
    async fn start(
        env: &Env,
        name: String,
        filter: String,
        concurrency: usize,
        handler: Arc<dyn Handler>,
    ) -> Self {
        let attachment = env.readiness.expect_consumer();
        let first = env
            .broker
            .consume(&filter, &name, env.consume_options())
            .await;
        let (stop, serve) = Self::serve(env, name, filter, concurrency, handler, attachment);
        let task = tokio::spawn(serve.run(Some(first)));
        Self { stop, task }
    }

    /// Like [`RunningConsumer::start`], but attaches only once `before` has finished
    /// (in the background: this returns at once). The worker is not ready until then.
    fn start_after(
        env: &Env,
        name: String,
        filter: String,
        concurrency: usize,
        handler: Arc<dyn Handler>,
        before: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        let attachment = env.readiness.expect_consumer();
        let (stop, serve) = Self::serve(env, name, filter, concurrency, handler, attachment);
        let cancel = stop.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = before => {}
            }
            serve.run(None).await;
        });
        Self { stop, task }
    }

    /// The stop token of a consumer, and what serves it.
    fn serve(
        env: &Env,
        name: String,
        filter: String,
        concurrency: usize,
        handler: Arc<dyn Handler>,
        attachment: ConsumerAttachment,
    ) -> (CancellationToken, Serve) {
        let options = env.consume_options();
        let consumer = ConsumerLoop {
            name: name.clone(),
            concurrency,
            max_attempts: env.delivery.max_attempts,
            drain: env.drain,
            progress_every: (options.ack_wait / 3).max(Duration::from_secs(1)),
            dead_letters: env.queue.clone(),
            metrics: env.metrics.clone(),
        };
        let stop = env.shutdown.child_token();
        let serve = Serve {
            attach: Attach {
                broker: env.broker.clone(),
                name,
                filter,
                options,
            },
            attachment,
            consumer,
            handler,
            cancel: stop.clone(),
        };
        (stop, serve)
    }

    /// Stops fetching; the returned future resolves once running work has finished,
    /// or at the drain deadline, when what did not finish has been handed back to the
    /// broker (so another worker, or this one, gets it again).
    pub fn stop(self) -> impl Future<Output = ()> + Send + 'static {
        self.stop.cancel();
        async move {
            if let Err(err) = self.task.await {
                tracing::error!(error = %err, "consumer task failed");
            }
        }
    }
}

/// How to (re)attach one durable consumer.
struct Attach {
    broker: Arc<dyn Broker>,
    name: String,
    filter: String,
    options: ConsumeOptions,
}

/// One durable consumer, ready to run.
struct Serve {
    attach: Attach,
    attachment: ConsumerAttachment,
    consumer: ConsumerLoop,
    handler: Arc<dyn Handler>,
    cancel: CancellationToken,
}

impl Serve {
    /// Runs the consumer until cancelled, attaching (again) while the broker is
    /// unreachable. `first` is the result of a first attach, if one was tried.
    async fn run(self, first: Option<Result<Box<dyn WorkSource>, BrokerError>>) {
        let Self {
            attach,
            attachment,
            consumer,
            handler,
            cancel,
        } = self;
        let mut attempt = match first {
            Some(first) => first,
            None => {
                attach
                    .broker
                    .consume(&attach.filter, &attach.name, attach.options)
                    .await
            }
        };
        let mut wait = Duration::from_millis(200);
        let source = loop {
            match attempt {
                Ok(source) => break source,
                Err(err) => {
                    tracing::warn!(consumer = %attach.name, error = %err, "cannot attach the consumer; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                    attempt = attach
                        .broker
                        .consume(&attach.filter, &attach.name, attach.options)
                        .await;
                }
            }
        };
        attachment.attached();
        consumer.run(source, handler, cancel).await;
    }
}

/// A running agent: its runtime and the consumer of its route subject.
pub struct RunningAgent {
    pub resource: Resource<AgentSpec>,
    pub runtime: Arc<AgentRuntime>,
    /// The mounted secrets (model and embedding API keys) the runtime was built with.
    fingerprint: Fingerprint,
    consumer: RunningConsumer,
}

/// An agent built but not started yet.
pub struct BuiltAgent {
    pub runtime: AgentRuntime,
    /// The mounted secrets `runtime` read: a rotation after this read restarts it.
    fingerprint: Fingerprint,
}

/// Builds the runtime of `resource`, opening the agent's memory file with its memory
/// settings. Building only opens the file (a corrupt one is an error here): the
/// runtime it replaces keeps using the file as it is until it stops, and
/// [`RunningAgent::start`] prepares it for the new settings after that. The histories
/// and memories are in the file, so nothing is lost, and a changed embedding key
/// takes effect.
pub async fn build_agent(
    env: &Env,
    resource: &Resource<AgentSpec>,
) -> Result<BuiltAgent, BuildError> {
    let key = resource.key();
    let spec = &resource.spec;
    let secrets = env.secrets.recording();
    let memory = open_memory(env, &secrets, &key, &spec.memory)
        .await
        .map_err(|source| BuildError::Memory {
            agent: key.clone(),
            source,
        })?;
    let runtime = AgentRuntime::new(
        key.clone(),
        spec.clone(),
        env.broker.clone(),
        env.metrics.clone(),
        &secrets,
        Arc::new(memory),
    )
    .map_err(|source| BuildError::Agent { agent: key, source })?;
    Ok(BuiltAgent {
        runtime,
        fingerprint: secrets.fingerprint(),
    })
}

async fn open_memory(
    env: &Env,
    secrets: &Secrets,
    key: &ResourceKey,
    spec: &MemorySpec,
) -> Result<AgentMemory, MemoryError> {
    let embedder = embedder::from_spec(&spec.long_term.embedder, secrets)?;
    let items = env
        .metrics
        .memory_items
        .with_label_values(&[&key.to_string()]);
    let file = memory::database_path(&env.data_dir, key);
    Ok(AgentMemory::open_file(&file, spec, embedder)
        .await?
        .with_items_gauge(items))
}

impl RunningAgent {
    /// Starts `runtime`, replacing `previous` (the running version of the agent, if
    /// any). The memory file is prepared for the new runtime (tables, and every memory
    /// embedded again after a change of embedder) only once `previous` has finished
    /// its turns, so they keep writing to the file as it was; the agent consumes once
    /// that is done. Both happen in the background: this returns at once.
    pub fn start(
        env: &Env,
        resource: Resource<AgentSpec>,
        built: BuiltAgent,
        previous: Option<RunningAgent>,
        tasks: &mut Tasks,
    ) -> Self {
        let BuiltAgent {
            runtime,
            fingerprint,
        } = built;
        let runtime = Arc::new(runtime);
        let previous = previous.map(|old| old.stop_signalled(tasks));
        let memory = runtime.memory().clone();
        let key = runtime.key().clone();
        let ready = async move {
            if let Some(previous) = previous {
                // Sent, or dropped at shutdown: either way the old consumer is gone.
                let _ = previous.await;
            }
            prepare_memory(&key, &memory).await;
        };
        let consumer = RunningConsumer::start_after(
            env,
            runtime.consumer(),
            subject::agent_route(runtime.key()),
            runtime.max_concurrency(),
            runtime.clone(),
            ready,
        );
        Self {
            fingerprint,
            resource,
            runtime,
            consumer,
        }
    }

    /// Whether this agent runs `resource` as it is, with its current API keys.
    pub fn is_current(&self, env: &Env, resource: &Resource<AgentSpec>) -> bool {
        self.resource == *resource && !self.rotated(env)
    }

    /// Whether a mounted secret the agent was built with was rotated since.
    pub fn rotated(&self, env: &Env) -> bool {
        env.secret_watch.rotated(&self.fingerprint)
    }

    /// The mounted secret files the agent was built with.
    pub fn secret_files(&self) -> impl Iterator<Item = &std::path::PathBuf> {
        self.fingerprint.files()
    }

    /// Stops taking work; running turns finish (or are handed back at the drain
    /// deadline) in `tasks`.
    pub fn stop(self, tasks: &mut Tasks) {
        tasks.draining.spawn(self.consumer.stop());
    }

    /// [`RunningAgent::stop`], with a signal sent once its turns have finished.
    fn stop_signalled(self, tasks: &mut Tasks) -> tokio::sync::oneshot::Receiver<()> {
        let (done, stopped) = tokio::sync::oneshot::channel();
        let stop = self.consumer.stop();
        tasks.draining.spawn(async move {
            stop.await;
            let _ = done.send(());
        });
        stopped
    }
}

/// Longest wait before preparing a memory file is tried again.
const MAX_PREPARE_RETRY: Duration = Duration::from_secs(30);

/// Prepares the memory file of agent `key`, trying again with backoff while it fails
/// (an embedding server that is down while memories are embedded again).
async fn prepare_memory(key: &ResourceKey, memory: &AgentMemory) {
    let mut wait = Duration::from_secs(1);
    while let Err(err) = memory.prepare().await {
        tracing::error!(agent = %key, error = %err, retry_in = ?wait, "cannot prepare the agent's memory; it does not take work until it can");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_PREPARE_RETRY);
    }
}

/// A channel instance built but not started yet.
pub struct BuiltChannel {
    channel: Arc<dyn Channel>,
    outbound: Subscription,
    /// Closes the instance's intake: cancelled when it is stopped, and by shutdown.
    intake: CancellationToken,
    /// The mounted secrets (a webhook's signing secret) the instance read.
    fingerprint: Fingerprint,
}

/// Builds the channel instance `resource` describes and subscribes to its answers.
pub async fn build_channel(
    env: &Env,
    resource: &Resource<ChannelSpec>,
) -> Result<Option<BuiltChannel>, BuildError> {
    let intake = env.shutdown.child_token();
    let secrets = env.secrets.recording();
    let Some(channel) = channels::from_resource(
        resource,
        env.broker.clone(),
        env.metrics.clone(),
        &secrets,
        intake.clone(),
    ) else {
        return Ok(None);
    };
    let outbound = channel
        .context()
        .subscribe_outbound()
        .await
        .map_err(|source| BuildError::Channel {
            channel: resource.key(),
            source,
        })?;
    Ok(Some(BuiltChannel {
        channel,
        outbound,
        intake,
        fingerprint: secrets.fingerprint(),
    }))
}

/// A served channel: its HTTP routes, the consumer routing its inbound messages to
/// its agent, and the task handing its agent's answers to it.
pub struct RunningChannel {
    pub resource: Resource<ChannelSpec>,
    pub routes: Router,
    router: RunningConsumer,
    /// Stops the outbound delivery (which then closes the channel).
    outbound: CancellationToken,
    intake: CancellationToken,
    fingerprint: Fingerprint,
}

impl RunningChannel {
    /// Starts the channel; its outbound delivery runs in `tasks`.
    pub async fn start(
        env: &Env,
        resource: Resource<ChannelSpec>,
        built: BuiltChannel,
        tasks: &mut Tasks,
    ) -> Self {
        let BuiltChannel {
            channel,
            outbound,
            intake,
            fingerprint,
        } = built;
        let route = Route {
            channel_type: channel.context().kind.as_str(),
            instance: resource.key(),
            agent: ResourceKey::new(&resource.namespace, &resource.spec.default_agent),
            broker: env.broker.clone(),
        };
        let router = RunningConsumer::start(
            env,
            route.consumer(),
            route.inbound(),
            ROUTER_CONCURRENCY,
            Arc::new(route),
        )
        .await;
        let stop_outbound = env.closing.child_token();
        tasks.delivery.spawn(channels::deliver_outbound(
            channel.clone(),
            outbound,
            stop_outbound.clone(),
        ));
        Self {
            resource,
            routes: channel.routes(),
            router,
            outbound: stop_outbound,
            intake,
            fingerprint,
        }
    }

    /// Whether this instance serves `resource` as it is, with its current secrets.
    pub fn is_current(&self, env: &Env, resource: &Resource<ChannelSpec>) -> bool {
        self.resource == *resource && !env.secret_watch.rotated(&self.fingerprint)
    }

    /// The mounted secret files the instance was built with.
    pub fn secret_files(&self) -> impl Iterator<Item = &std::path::PathBuf> {
        self.fingerprint.files()
    }

    /// Stops routing new messages at once; answers to requests this instance still
    /// holds (a synchronous webhook call, an open chat socket) keep arriving for the
    /// drain period (or until the worker closes), then the instance closes.
    pub fn stop(self, env: &Env, tasks: &mut Tasks) {
        // Requests still reaching this instance (its routes were just replaced) are
        // refused: nothing would route them.
        self.intake.cancel();
        tasks.draining.spawn(self.router.stop());
        let (drain, closing, outbound) = (env.drain, env.closing.clone(), self.outbound);
        tasks.delivery.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(drain) => {}
                () = closing.cancelled() => {}
            }
            outbound.cancel();
        });
    }
}

/// Background work of components, awaited in two steps at shutdown.
#[derive(Default)]
pub struct Tasks {
    /// Consumers of stopped components finishing their work: awaited before the
    /// outbox is flushed.
    pub draining: JoinSet<()>,
    /// Channels' outbound delivery: runs until the worker closes, after the flush.
    pub delivery: JoinSet<()>,
}

impl Tasks {
    /// Forgets tasks that have finished.
    pub fn reap(&mut self) {
        while self.draining.try_join_next().is_some() {}
        while self.delivery.try_join_next().is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::LocalBroker;
    use crate::memory::NewMemory;
    use nexo_api::spec::RecallMode;

    /// A worker environment on the local bus, in `dir`.
    fn env(dir: &std::path::Path) -> Env {
        let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new());
        Env {
            broker: broker.clone(),
            metrics: Arc::new(Metrics::new()),
            queue: QueueStore::open(&dir.join("queue.db"), 5).unwrap(),
            secrets: Secrets::new(dir.join("secrets")),
            secret_watch: SecretWatch::default(),
            data_dir: dir.to_owned(),
            readiness: Arc::new(Readiness::new(broker)),
            delivery: DeliverySettings::default(),
            drain: Duration::from_secs(5),
            shutdown: CancellationToken::new(),
            closing: CancellationToken::new(),
        }
    }

    fn agent(dimensions: u32) -> Resource<AgentSpec> {
        agent_with(serde_json::json!({
            "model": {"provider": "scripted"},
            "memory": {"longTerm": {"embedder": {"provider": "hashing", "dimensions": dimensions}}},
        }))
    }

    fn agent_with(spec: serde_json::Value) -> Resource<AgentSpec> {
        Resource {
            name: "assistant".to_owned(),
            namespace: "default".to_owned(),
            spec: serde_json::from_value(spec).unwrap(),
        }
    }

    fn fact(text: &str) -> NewMemory {
        NewMemory::fact(text)
    }

    /// Waits until every consumer is attached (agents attach once their memory is
    /// prepared).
    async fn attached(env: &Env) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !env
            .readiness
            .not_ready()
            .iter()
            .all(|r| r.contains("not started"))
        {
            assert!(tokio::time::Instant::now() < deadline, "consumers attach");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_new_embedder_is_applied_after_the_running_agent_stopped() {
        let dir = std::env::temp_dir().join(format!("nexo-components-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let env = env(&dir);
        let mut tasks = Tasks::default();
        let v1 = agent(16);
        let runtime = build_agent(&env, &v1).await.unwrap();
        let old = RunningAgent::start(&env, v1, runtime, None, &mut tasks);
        attached(&env).await;
        let old_memory = old.runtime.memory().clone();
        old_memory.remember(fact("the first fact")).await.unwrap();

        // Building the new version (another size of vectors) leaves the file alone:
        // the running version still writes its vectors.
        let v2 = agent(8);
        let runtime = build_agent(&env, &v2).await.unwrap();
        old_memory
            .remember(fact("a fact during the rebuild"))
            .await
            .expect("the running agent keeps writing while the new one is built");

        // Once the old one stopped, the new one embeds every memory again.
        let new = RunningAgent::start(&env, v2, runtime, Some(old), &mut tasks);
        attached(&env).await;
        let memory = new.runtime.memory();
        assert_eq!(memory.count().await.unwrap(), 2);
        let hits = memory
            .search("rebuild", RecallMode::Vector, 1, None)
            .await
            .unwrap();
        assert_eq!(hits[0].item.memory.text, "a fact during the rebuild");
        memory.remember(fact("a third fact")).await.unwrap();
        env.shutdown.cancel();
        while tasks.draining.join_next().await.is_some() {}
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The digest of a key is taken from what the build read: a rotation between
    /// build and start is not missed.
    #[tokio::test]
    async fn a_key_rotated_after_the_build_restarts_the_agent() {
        let dir = std::env::temp_dir().join(format!("nexo-components-{}", uuid::Uuid::new_v4()));
        let key = nexo_api::spec::SecretRef::secret_key("llm", "api-key");
        let file = dir
            .join("secrets")
            .join(key.secret_key_ref.as_ref().unwrap().mounted_file_name());
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "old-key").unwrap();
        let env = env(&dir);
        let resource = agent_with(serde_json::json!({
            "model": {"provider": "openai", "model": "m", "baseUrl": "http://127.0.0.1:9/v1",
                      "apiKey": {"secretKeyRef": {"name": "llm", "key": "api-key"}}},
        }));
        let built = build_agent(&env, &resource).await.unwrap();
        std::fs::write(&file, "new-key").unwrap();
        let mut tasks = Tasks::default();
        let running = RunningAgent::start(&env, resource.clone(), built, None, &mut tasks);
        env.secret_watch.watch(running.secret_files().cloned());
        assert!(running.is_current(&env, &resource), "not read again yet");
        env.secret_watch.refresh().await;
        assert!(!running.is_current(&env, &resource));

        env.shutdown.cancel();
        while tasks.draining.join_next().await.is_some() {}
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
