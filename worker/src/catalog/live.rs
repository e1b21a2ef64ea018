//! What the HTTP endpoints see of the running catalog: the report of `GET /catalog`
//! and the agents of `/admin/agents`, replaced together after every applied change;
//! what does not run, and what is still attaching, is read from [`Health`] when asked.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use nexo_api::ResourceKey;
use nexo_api::report::CatalogReport;

use super::health::Health;
use crate::agent::{AgentInfo, AgentRuntime};
use crate::channels::connection::Connections;
use crate::extensions::Extensions;
use crate::memory::AgentMemory;

pub struct Live {
    snapshot: RwLock<Snapshot>,
    health: Arc<Health>,
    extensions: Arc<Extensions>,
    connections: Arc<Connections>,
    /// The agents of the worker's pool (not suspended), whichever worker of the pool
    /// runs them, in key order; sent on every change. The served surfaces (`serve/`)
    /// list them: every worker of a pool lists the same, and the broker takes a
    /// question to the one that runs the agent.
    pool_agents: watch::Sender<Arc<[ResourceKey]>>,
}

#[derive(Default)]
struct Snapshot {
    report: CatalogReport,
    agents: Vec<Arc<AgentRuntime>>,
}

impl Live {
    pub fn new(
        health: Arc<Health>,
        extensions: Arc<Extensions>,
        connections: Arc<Connections>,
    ) -> Self {
        Self {
            snapshot: RwLock::default(),
            health,
            extensions,
            connections,
            pool_agents: watch::Sender::new(Arc::from([])),
        }
    }

    pub fn publish(
        &self,
        report: CatalogReport,
        agents: Vec<Arc<AgentRuntime>>,
        pool_agents: impl IntoIterator<Item = ResourceKey>,
    ) {
        let keys: Arc<[ResourceKey]> = pool_agents
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        *self.snapshot.write().unwrap() = Snapshot { report, agents };
        self.pool_agents.send_if_modified(|current| {
            let changed = *current != keys;
            if changed {
                *current = keys;
            }
            changed
        });
    }

    /// The agents of the worker's pool, in key order; it changes when they do.
    pub fn pool_agents(&self) -> watch::Receiver<Arc<[ResourceKey]>> {
        self.pool_agents.subscribe()
    }

    /// The report of `GET /catalog`.
    pub fn report(&self) -> CatalogReport {
        let snapshot = self.snapshot.read().unwrap();
        let mut report = snapshot.report.clone();
        report.over_budget = snapshot
            .agents
            .iter()
            .filter_map(|a| a.over_budget())
            .collect();
        report.over_budget.sort_by(|a, b| a.agent.cmp(&b.agent));
        drop(snapshot);
        report.failed = self.health.not_running();
        report.attaching = self.health.attaching();
        report.extensions = self.extensions.report();
        report.channel_connections = self.connections.report();
        report
    }

    /// The agents this worker runs, for `/admin/agents`.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let snapshot = self.snapshot.read().unwrap();
        snapshot.agents.iter().map(|a| a.info()).collect()
    }

    /// The memory of a running agent, for the admin API.
    pub fn memory(&self, agent: &ResourceKey) -> Option<Arc<AgentMemory>> {
        let snapshot = self.snapshot.read().unwrap();
        snapshot
            .agents
            .iter()
            .find(|a| a.key() == agent)
            .map(|a| a.memory().clone())
    }
}
