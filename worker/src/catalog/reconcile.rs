//! Makes the running agents and channels match a [`Selection`]: starts what is new,
//! stops what is gone, restarts what changed, and leaves the rest alone (their
//! conversations and in-flight turns are not disturbed).

use std::collections::BTreeMap;
use std::sync::Arc;

use nexo_api::ResourceKey;
use nexo_api::config::Resource;
use tokio::task::JoinSet;

use nexo_api::report::CatalogReport;

use super::agent::{RunningAgent, Stopped, build_agent};
use super::channel::{RunningChannel, build_channel};
use super::error::BuildError;
use super::live::Live;
use super::selection::Selection;
use super::shared::Shared;
use super::tasks::Tasks;
use crate::channels::ChannelRoutes;

/// What one reconciliation did, for the log.
#[derive(Debug, Default)]
pub struct Changes {
    pub started: Vec<String>,
    pub restarted: Vec<String>,
    pub stopped: Vec<String>,
    /// What could not be built (a missing API key, an unreadable memory file). The
    /// rest of the catalog runs; a version of these that ran before keeps running.
    pub failed: Vec<BuildError>,
}

impl Changes {
    fn record(&mut self, what: &str, key: &ResourceKey, replaced: bool) {
        let entry = format!("{what} {key}");
        if replaced {
            self.restarted.push(entry);
        } else {
            self.started.push(entry);
        }
    }
}

pub struct Reconciler {
    shared: Shared,
    agents: BTreeMap<ResourceKey, RunningAgent>,
    channels: BTreeMap<ResourceKey, RunningChannel>,
    tasks: Tasks,
    /// Agents removed while their turns may still run, with the signal that they
    /// have stopped: one that comes back waits for it.
    departing: BTreeMap<ResourceKey, Stopped>,
    routes: ChannelRoutes,
    live: Arc<Live>,
}

/// The resources of `wanted` that do not run as they are.
fn changed<'a, T, R>(
    wanted: &'a [Resource<T>],
    running: &BTreeMap<ResourceKey, R>,
    is_current: impl Fn(&R, &Resource<T>) -> bool,
) -> Vec<&'a Resource<T>> {
    wanted
        .iter()
        .filter(|w| running.get(&w.key()).is_none_or(|r| !is_current(r, w)))
        .collect()
}

/// Keys running but no longer wanted.
fn gone<T, R>(wanted: &[Resource<T>], running: &BTreeMap<ResourceKey, R>) -> Vec<ResourceKey> {
    running
        .keys()
        .filter(|k| !wanted.iter().any(|w| &w.key() == *k))
        .cloned()
        .collect()
}

impl Reconciler {
    pub fn new(shared: Shared, routes: ChannelRoutes, live: Arc<Live>) -> Self {
        Self {
            shared,
            agents: BTreeMap::new(),
            channels: BTreeMap::new(),
            tasks: Tasks::default(),
            departing: BTreeMap::new(),
            routes,
            live,
        }
    }

    /// Runs `selection` and publishes `report` (completed with the running names).
    /// Everything new is built before anything stops. What cannot be built is left
    /// out and reported in [`Changes::failed`]: in a pool of hundreds of agents, one
    /// agent's missing key must not stop the others (a version of it that ran before
    /// keeps running).
    pub async fn apply(&mut self, selection: &Selection, mut report: CatalogReport) -> Changes {
        self.tasks.reap();
        self.departing.retain(|_, stopped| !stopped.is_done());
        let mut changes = Changes::default();
        // Extensions first: an agent is built only if the extensions it names are.
        let used = selection
            .agents
            .iter()
            .flat_map(|a| {
                a.spec
                    .extensions
                    .iter()
                    .map(|e| ResourceKey::new(&a.namespace, &e.name))
            })
            .collect();
        self.shared.extensions.apply(&selection.extensions, &used);
        let mut agents = Vec::new();
        let shared = &self.shared;
        // An agent that names an extension the catalog no longer has is built again,
        // which fails and reports it (the running version keeps running, as for any
        // agent that cannot be built).
        for resource in changed(&selection.agents, &self.agents, |a, r| {
            a.is_current(shared, r) && shared.extensions.missing(r).is_none()
        }) {
            match build_agent(&self.shared, resource).await {
                Ok(built) => agents.push((resource, built)),
                Err(err) => changes.failed.push(err),
            }
        }
        let mut channels = Vec::new();
        for resource in changed(&selection.channels, &self.channels, |c, r| {
            c.is_current(shared, r)
        }) {
            match build_channel(&self.shared, resource).await {
                Ok(Some(built)) => channels.push((resource, built)),
                Ok(None) => {}
                Err(err) => changes.failed.push(err),
            }
        }

        for key in gone(&selection.agents, &self.agents) {
            if let Some(agent) = self.agents.remove(&key) {
                let stopped = agent.stop(&self.shared, &mut self.tasks);
                self.departing.insert(key.clone(), stopped);
                changes.stopped.push(format!("agent {key}"));
            }
        }
        for key in gone(&selection.channels, &self.channels) {
            if let Some(channel) = self.channels.remove(&key) {
                channel.stop(&self.shared, &mut self.tasks);
                changes.stopped.push(format!("channel {key}"));
            }
        }
        for (resource, built) in agents {
            let key = resource.key();
            let replaced = self.agents.remove(&key);
            changes.record("agent", &key, replaced.is_some());
            // The version this one follows: the running one, or one removed by an
            // earlier change that may still be finishing its turns (a suspend and a
            // resume in quick succession). Its memory file is prepared after either.
            let previous = match replaced {
                Some(old) => Some(old.stop_replaced(&mut self.tasks)),
                None => self.departing.remove(&key),
            };
            let agent = RunningAgent::start(&self.shared, resource.clone(), built, previous);
            self.agents.insert(key, agent);
        }
        for (resource, built) in channels {
            let key = resource.key();
            let replaced = self.channels.remove(&key);
            changes.record("channel", &key, replaced.is_some());
            if let Some(old) = replaced {
                old.stop_replaced(&self.shared, &mut self.tasks);
            }
            let channel =
                RunningChannel::start(&self.shared, resource.clone(), built, &mut self.tasks);
            self.channels.insert(key, channel);
        }

        let agent_files = self.agents.values().flat_map(|a| a.secret_files());
        let channel_files = self.channels.values().flat_map(|c| c.secret_files());
        self.shared
            .secret_watch
            .watch(agent_files.chain(channel_files).cloned());
        self.routes
            .replace(self.channels.values().map(|c| c.routes.clone()));
        report.agents = self.agents.keys().map(ToString::to_string).collect();
        report.channels = self.channels.keys().map(ToString::to_string).collect();
        self.shared
            .health
            .set_build_failures(changes.failed.iter().map(|failure| {
                let (kind, key, reason) = failure.parts();
                (kind, key.clone(), reason)
            }));
        self.live.publish(
            report,
            self.agents.values().map(|a| a.runtime.clone()).collect(),
            selection.pool_agents.iter().map(Resource::key),
        );
        changes
    }

    /// The worker's parts the components are built with.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Agents running here, or stopped but still finishing their turns (or their
    /// hand-off snapshot).
    pub fn busy_agents(&mut self) -> Vec<ResourceKey> {
        self.departing.retain(|_, stopped| !stopped.is_done());
        self.agents
            .keys()
            .chain(self.departing.keys())
            .cloned()
            .collect()
    }

    /// Whether a mounted secret a running agent or channel was built with changed
    /// since (a rotated Secret): applying the same selection again restarts it.
    /// Cheap: the files are read in the background (see
    /// [`crate::secrets::SecretWatch`]).
    pub fn credentials_rotated(&self) -> bool {
        self.agents.values().any(|a| a.rotated(&self.shared))
            || self
                .channels
                .values()
                .any(|c| !c.is_current(&self.shared, &c.resource))
    }

    /// Stops every component and waits until running work has finished or been
    /// handed back. Returns the channels' outbound delivery, which goes on (answers of
    /// the last turns may still be in the outbox) until the worker reaches
    /// [`Phase::Closing`](crate::lifecycle::Phase::Closing).
    pub async fn drain(mut self) -> JoinSet<()> {
        for (_, agent) in std::mem::take(&mut self.agents) {
            agent.stop(&self.shared, &mut self.tasks);
        }
        for (_, channel) in std::mem::take(&mut self.channels) {
            channel.stop(&self.shared, &mut self.tasks);
        }
        while self.tasks.draining.join_next().await.is_some() {}
        self.shared.extensions.close();
        self.tasks.delivery
    }
}
