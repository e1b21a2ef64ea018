//! One agent of the catalog: built (model client, memory file opened) apart from
//! being started, so a reload can build everything before it stops anything; started
//! once the version it replaces has finished its turns and its memory file is
//! prepared; stopped with a drain.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use nexo_api::config::Resource;
use nexo_api::report::ResourceKind;
use nexo_api::spec::{AgentSpec, MemorySpec};
use nexo_api::{ResourceKey, subject};

use super::consumer::{ConsumerSpec, RunningConsumer};
use super::error::BuildError;
use super::health::Tracked;
use super::shared::Shared;
use super::tasks::Tasks;
use crate::agent::AgentRuntime;
use crate::memory::{self, AgentMemory, MemoryError, embedder};
use crate::secrets::{Fingerprint, Secrets};

/// Waits between attempts to prepare a memory file (an embedding server that is down
/// while every memory is embedded again): a re-embedding is expensive, so it is not
/// hammered, and tried at least twice a minute.
const PREPARE_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_secs(1))
    .with_max_delay(Duration::from_secs(30))
    .with_jitter()
    .without_max_times();

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
    shared: &Shared,
    resource: &Resource<AgentSpec>,
) -> Result<BuiltAgent, BuildError> {
    let key = resource.key();
    let spec = &resource.spec;
    let secrets = shared.secrets.recording();
    let memory = open_memory(shared, &secrets, &key, &spec.memory)
        .await
        .map_err(|source| BuildError::Memory {
            agent: key.clone(),
            source,
        })?;
    let runtime = AgentRuntime::new(
        key.clone(),
        spec.clone(),
        shared.broker.clone(),
        shared.metrics.clone(),
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
    shared: &Shared,
    secrets: &Secrets,
    key: &ResourceKey,
    spec: &MemorySpec,
) -> Result<AgentMemory, MemoryError> {
    let embedder = embedder::from_spec(&spec.long_term.embedder, secrets)?;
    let items = shared
        .metrics
        .memory_items
        .with_label_values(&[&key.to_string()]);
    let file = memory::database_path(&shared.data_dir, key);
    Ok(AgentMemory::open_file(&file, spec, embedder)
        .await?
        .with_items_gauge(items))
}

/// A running agent: its runtime and the consumer of its route subject.
pub struct RunningAgent {
    pub resource: Resource<AgentSpec>,
    pub runtime: Arc<AgentRuntime>,
    /// The mounted secrets (model and embedding API keys) the runtime was built with.
    fingerprint: Fingerprint,
    consumer: RunningConsumer,
}

impl RunningAgent {
    /// Starts `runtime` after `previous` (the version it replaces, or one removed a
    /// moment ago). The memory file is prepared for the new runtime (tables, and
    /// every memory embedded again after a change of embedder) only once `previous`
    /// has finished its turns, so they keep writing to the file as it was; the agent
    /// consumes once that is done. Both happen in the background: this returns at once. While the
    /// file cannot be prepared the agent is reported not running, and the rest of the
    /// worker serves on.
    pub fn start(
        shared: &Shared,
        resource: Resource<AgentSpec>,
        built: BuiltAgent,
        previous: Option<Stopped>,
    ) -> Self {
        let BuiltAgent {
            runtime,
            fingerprint,
        } = built;
        let runtime = Arc::new(runtime);
        let memory = runtime.memory().clone();
        let key = runtime.key().clone();
        let tracked = shared.health.track(ResourceKind::Agent, key.clone());
        let consumer = RunningConsumer::start(
            shared,
            ConsumerSpec {
                name: runtime.consumer(),
                filter: subject::agent_route(runtime.key()),
                concurrency: runtime.max_concurrency(),
                handler: runtime.clone(),
            },
            tracked,
            move |tracked| async move {
                if let Some(previous) = previous {
                    previous.wait().await;
                }
                prepare_memory(&key, &memory, &tracked).await;
            },
        );
        Self {
            fingerprint,
            resource,
            runtime,
            consumer,
        }
    }

    /// Whether this agent runs `resource` as it is, with its current API keys.
    pub fn is_current(&self, shared: &Shared, resource: &Resource<AgentSpec>) -> bool {
        self.resource == *resource && !self.rotated(shared)
    }

    /// Whether a mounted secret the agent was built with was rotated since.
    pub fn rotated(&self, shared: &Shared) -> bool {
        shared.secret_watch.rotated(&self.fingerprint)
    }

    /// The mounted secret files the agent was built with.
    pub fn secret_files(&self) -> impl Iterator<Item = &std::path::PathBuf> {
        self.fingerprint.files()
    }

    /// Stops taking work for good (the agent left this worker): running turns finish
    /// (or are handed back at the drain deadline) in `tasks`, then the agent's metric
    /// series are removed, so an agent that moved away leaves no stale series, unless
    /// it has been started again meanwhile. The returned signal says when its turns
    /// are over.
    pub fn stop(self, shared: &Shared, tasks: &mut Tasks) -> Stopped {
        let (metrics, health) = (shared.metrics.clone(), shared.health.clone());
        self.stop_then(tasks, move |runtime| {
            if !health.is_started(ResourceKind::Agent, runtime.key()) {
                runtime.forget_metrics(&metrics);
            }
        })
    }

    /// Stops taking work because a new version replaces it; the signal says when its
    /// turns are over. Its metric series go on with the new version.
    pub fn stop_replaced(self, tasks: &mut Tasks) -> Stopped {
        self.stop_then(tasks, |_| {})
    }

    /// Stops the consumer; once its turns are over, runs `after` and signals.
    fn stop_then(
        self,
        tasks: &mut Tasks,
        after: impl FnOnce(&AgentRuntime) + Send + 'static,
    ) -> Stopped {
        let (done, stopped) = tokio::sync::oneshot::channel();
        let consumer = self.consumer.stop();
        let runtime = self.runtime;
        tasks.draining.spawn(async move {
            consumer.await;
            after(&runtime);
            let _ = done.send(());
        });
        Stopped(stopped)
    }
}

/// Resolves once a stopped agent's running turns have finished or been handed back
/// (or the worker shut down meanwhile).
pub struct Stopped(tokio::sync::oneshot::Receiver<()>);

impl Stopped {
    /// Waits for the signal.
    pub async fn wait(self) {
        // Sent, or dropped at shutdown: either way the old consumer is gone.
        let _ = self.0.await;
    }

    /// Whether the signal has come (or can no longer come).
    pub fn is_done(&mut self) -> bool {
        !matches!(
            self.0.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        )
    }
}

/// Prepares the memory file of agent `key`, trying again with backoff while it fails;
/// meanwhile the agent is reported not running, with the error.
async fn prepare_memory(key: &ResourceKey, memory: &AgentMemory, tracked: &Tracked) {
    let prepare = || memory.prepare();
    let prepared = prepare
        .retry(PREPARE_BACKOFF)
        .notify(|err: &MemoryError, wait| {
            tracing::error!(agent = %key, error = %err, retry_in = ?wait, "cannot prepare the agent's memory; it does not take work until it can");
            tracked.failed(format!("cannot prepare its memory: {err}"));
        })
        .await;
    // Retried without limit: an error is not returned.
    if let Err(err) = prepared {
        tracked.failed(format!("cannot prepare its memory: {err}"));
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{Broker, LocalBroker};
    use crate::catalog::health::Health;
    use crate::lifecycle::{Lifecycle, Phase};
    use crate::memory::NewMemory;
    use crate::metrics::Metrics;
    use crate::queue::QueueStore;
    use crate::secrets::SecretWatch;
    use nexo_api::config::DeliverySettings;
    use nexo_api::spec::RecallMode;

    /// A worker's shared parts on the local bus, in `dir`.
    fn env(dir: &std::path::Path) -> Shared {
        let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new());
        let metrics = Arc::new(Metrics::new());
        Shared {
            health: Arc::new(Health::new(metrics.components_not_running.clone())),
            broker,
            metrics,
            queue: QueueStore::open(&dir.join("queue.db"), 5).unwrap(),
            secrets: Secrets::new(dir.join("secrets")),
            secret_watch: SecretWatch::default(),
            data_dir: dir.to_owned(),
            delivery: DeliverySettings::default(),
            drain: Duration::from_secs(5),
            lifecycle: Lifecycle::new(),
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
    async fn attached(env: &Shared) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !env.health.attaching().is_empty() {
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
        let old = RunningAgent::start(&env, v1, runtime, None);
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
        let new = RunningAgent::start(&env, v2, runtime, Some(old.stop_replaced(&mut tasks)));
        attached(&env).await;
        let memory = new.runtime.memory();
        assert_eq!(memory.count().await.unwrap(), 2);
        let hits = memory
            .search("rebuild", RecallMode::Vector, 1, None)
            .await
            .unwrap();
        assert_eq!(hits[0].item.memory.text, "a fact during the rebuild");
        memory.remember(fact("a third fact")).await.unwrap();
        env.lifecycle.advance(Phase::Draining);
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
        let running = RunningAgent::start(&env, resource.clone(), built, None);
        env.secret_watch.watch(running.secret_files().cloned());
        assert!(running.is_current(&env, &resource), "not read again yet");
        env.secret_watch.refresh().await;
        assert!(!running.is_current(&env, &resource));

        env.lifecycle.advance(Phase::Draining);
        while tasks.draining.join_next().await.is_some() {}
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
