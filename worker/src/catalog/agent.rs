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
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::consumer::{ConsumerSpec, RunningConsumer};
use super::error::BuildError;
use super::health::Tracked;
use super::shared::Shared;
use super::tasks::Tasks;
use crate::agent::AgentRuntime;
use crate::extensions::ExtensionTools;
use crate::memory::{self, AgentMemory, MemoryError, embedder};
use crate::secrets::{Fingerprint, Secrets};
use crate::tools::browser_tools;

/// Waits between attempts to prepare a memory file (an embedding server that is down
/// while every memory is embedded again): a re-embedding is expensive, so it is not
/// hammered, and tried at least twice a minute.
const PREPARE_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_secs(1))
    .with_max_delay(Duration::from_secs(30))
    .with_jitter()
    .without_max_times();

/// A durable memory is snapshotted once this many changes were journalled since the
/// last snapshot (a take-over replays at most about this many entries)...
const SNAPSHOT_AFTER_CHANGES: u64 = 500;
/// ...or this long after the first change since the last snapshot.
const SNAPSHOT_AT_LEAST_EVERY: Duration = Duration::from_secs(300);
/// How often the conditions above are checked.
const SNAPSHOT_CHECK: Duration = Duration::from_secs(5);

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
    // An extension the catalog does not have (the operator leaves out one that does
    // not exist): the agent does not run without the tools it was given.
    if let Some(missing) = shared.extensions.missing(resource) {
        return Err(BuildError::MissingExtension {
            agent: key.clone(),
            extension: missing.name.clone(),
        });
    }
    let secrets = shared.secrets.recording();
    let memory = open_memory(shared, &secrets, &key, &spec.memory)
        .await
        .map_err(|source| BuildError::Memory {
            agent: key.clone(),
            source,
        })?;
    let mut runtime = AgentRuntime::new(
        key.clone(),
        spec.clone(),
        shared.broker.clone(),
        shared.metrics.clone(),
        &secrets,
        Arc::new(memory),
        shared.models.clone(),
    )
    .map_err(|source| BuildError::Agent {
        agent: key.clone(),
        source,
    })?;
    if let Some(tools) = browser_tools(&shared.browser, &key, spec) {
        runtime.add_tool_source(tools);
    }
    for used in &spec.extensions {
        runtime.add_tool_source(Arc::new(ExtensionTools::new(
            shared.extensions.clone(),
            &key.namespace,
            used,
        )));
    }
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
    let memory = AgentMemory::open_file(&file, spec, embedder)
        .await?
        .with_items_gauge(items);
    Ok(match &shared.ownership {
        Some(ownership) => memory.with_durable(Arc::new(ownership.journals.agent(key))),
        None => memory,
    })
}

/// A running agent: its runtime and the consumer of its route subject.
pub struct RunningAgent {
    pub resource: Resource<AgentSpec>,
    pub runtime: Arc<AgentRuntime>,
    /// The mounted secrets (model and embedding API keys) the runtime was built with.
    fingerprint: Fingerprint,
    consumer: RunningConsumer,
    /// Ends the periodic snapshots of a durable memory.
    snapshots: CancellationToken,
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
        let snapshots = CancellationToken::new();
        let owner = shared.ownership.as_ref().map(|o| o.worker.clone());
        let took_over = snapshots.clone();
        let metrics = shared.metrics.clone();
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
                let started = Instant::now();
                take_over_memory(&key, &memory, &tracked, owner.as_deref()).await;
                if memory.is_durable() {
                    metrics
                        .agent_move_duration
                        .with_label_values(&["take_over"])
                        .observe(started.elapsed().as_secs_f64());
                    tokio::spawn(snapshot_periodically(key, memory, took_over));
                }
            },
        );
        Self {
            fingerprint,
            resource,
            runtime,
            consumer,
            snapshots,
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
    /// With a durable memory this is a hand-off: once the turns are over a snapshot
    /// is stored, so the next owner restores it instead of replaying the journal.
    pub fn stop(self, shared: &Shared, tasks: &mut Tasks) -> Stopped {
        let (metrics, health) = (shared.metrics.clone(), shared.health.clone());
        self.stop_then(tasks, true, move |runtime| {
            if !health.is_started(ResourceKind::Agent, runtime.key()) {
                runtime.forget_metrics(&metrics);
            }
        })
    }

    /// Stops taking work because a new version replaces it; the signal says when its
    /// turns are over. Its metric series go on with the new version, and its memory
    /// stays on this worker.
    pub fn stop_replaced(self, tasks: &mut Tasks) -> Stopped {
        self.stop_then(tasks, false, |_| {})
    }

    /// Stops the consumer; once its turns are over, snapshots a durable memory if
    /// `hand_off`, runs `after` and signals.
    fn stop_then(
        self,
        tasks: &mut Tasks,
        hand_off: bool,
        after: impl FnOnce(&AgentRuntime) + Send + 'static,
    ) -> Stopped {
        let (done, stopped) = tokio::sync::oneshot::channel();
        let started = Instant::now();
        let consumer = self.consumer.stop();
        self.snapshots.cancel();
        let runtime = self.runtime;
        tasks.draining.spawn(async move {
            consumer.await;
            let memory = runtime.memory();
            if hand_off && memory.is_durable() {
                match memory.store_snapshot().await {
                    Ok(seq) => tracing::info!(agent = %runtime.key(), seq, took_ms = started.elapsed().as_millis() as u64, "handed off: memory snapshot stored"),
                    // The journal has every change: the next owner replays it.
                    Err(err) => tracing::warn!(agent = %runtime.key(), error = %err, "cannot store a memory snapshot at hand-off; the next owner replays the journal"),
                }
                runtime.observe_move("hand_off", started.elapsed());
            }
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

/// Prepares the memory file of agent `key` and, with a durable memory, takes it over
/// as `owner` (restore, replay, fence: `AgentMemory::take_over`), trying again with
/// backoff while it fails; meanwhile the agent is reported not running, with the
/// error.
async fn take_over_memory(
    key: &ResourceKey,
    memory: &AgentMemory,
    tracked: &Tracked,
    owner: Option<&str>,
) {
    let attempt = || async {
        match owner {
            Some(owner) => memory.take_over(owner).await.map(Some),
            None => memory.prepare().await.map(|()| None),
        }
    };
    let prepared = attempt
        .retry(PREPARE_BACKOFF)
        .notify(|err: &MemoryError, wait| {
            tracing::error!(agent = %key, error = %err, retry_in = ?wait, "cannot prepare the agent's memory; it does not take work until it can");
            tracked.failed(format!("cannot prepare its memory: {err}"));
        })
        .await;
    match prepared {
        Ok(Some(took)) => {
            tracing::info!(agent = %key, restored = ?took.restored, replayed = took.replayed, epoch = took.marker, "took the agent over")
        }
        Ok(None) => {}
        // Retried without limit: an error is not returned.
        Err(err) => {
            tracked.failed(format!("cannot prepare its memory: {err}"));
            std::future::pending::<()>().await;
        }
    }
}

/// Stores a snapshot of a durable memory once [`SNAPSHOT_AFTER_CHANGES`] changes were
/// journalled, or [`SNAPSHOT_AT_LEAST_EVERY`] after a change: the journal is trimmed
/// up to each snapshot, so a take-over replays little.
async fn snapshot_periodically(
    key: ResourceKey,
    memory: Arc<AgentMemory>,
    stop: CancellationToken,
) {
    let mut oldest_change: Option<Instant> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SNAPSHOT_CHECK) => {}
        }
        let changes = memory.changes_since_snapshot();
        if changes == 0 {
            oldest_change = None;
            continue;
        }
        let since = *oldest_change.get_or_insert_with(Instant::now);
        if changes < SNAPSHOT_AFTER_CHANGES && since.elapsed() < SNAPSHOT_AT_LEAST_EVERY {
            continue;
        }
        match memory.store_snapshot().await {
            Ok(seq) => {
                tracing::debug!(agent = %key, seq, changes, "memory snapshot stored");
                oldest_change = None;
            }
            Err(err) => {
                tracing::warn!(agent = %key, error = %err, "cannot store a memory snapshot; trying again later")
            }
        }
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
            models: Arc::new(crate::llm::SharedModels::new(&Default::default(), &metrics)),
            health: Arc::new(Health::new(metrics.components_not_running.clone())),
            connections: crate::channels::connection::Connections::new(
                broker.clone(),
                "test".to_owned(),
                metrics.channel_connected.clone(),
            ),
            extensions: Arc::new(crate::extensions::Extensions::new(
                crate::extensions::ConnectContext {
                    broker: broker.clone(),
                    secrets: Secrets::new(dir.join("secrets")),
                },
                tokio_util::sync::CancellationToken::new(),
            )),
            browser: crate::tools::Browsers::new(
                Default::default(),
                dir,
                tokio_util::sync::CancellationToken::new(),
            ),
            broker,
            metrics,
            queue: QueueStore::open(&dir.join("queue.db"), 5).unwrap(),
            secrets: Secrets::new(dir.join("secrets")),
            secret_watch: SecretWatch::default(),
            data_dir: dir.to_owned(),
            delivery: DeliverySettings::default(),
            drain: Duration::from_secs(5),
            lifecycle: Lifecycle::new(),
            ownership: None,
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
