//! What the HTTP endpoints see of the running catalog: the report of `GET /catalog`
//! and the agents of `/admin/agents`, replaced together after every applied change;
//! what does not run, and what is still attaching, is read from [`Health`] when asked.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use nexo_api::ResourceKey;
use nexo_api::report::CatalogReport;

use super::health::Health;
use crate::agent::{AgentInfo, AgentRuntime};
use crate::extensions::Extensions;
use crate::memory::AgentMemory;

pub struct Live {
    snapshot: RwLock<Snapshot>,
    health: Arc<Health>,
    extensions: Arc<Extensions>,
    /// The keys of the running agents, sent on every change of them: the served
    /// surfaces (`serve/`) list and announce them.
    agent_keys: watch::Sender<Arc<[ResourceKey]>>,
}

#[derive(Default)]
struct Snapshot {
    report: CatalogReport,
    agents: Vec<Arc<AgentRuntime>>,
}

impl Live {
    pub fn new(health: Arc<Health>, extensions: Arc<Extensions>) -> Self {
        Self {
            snapshot: RwLock::default(),
            health,
            extensions,
            agent_keys: watch::Sender::new(Arc::from([])),
        }
    }

    pub fn publish(&self, report: CatalogReport, agents: Vec<Arc<AgentRuntime>>) {
        let keys: Arc<[ResourceKey]> = agents.iter().map(|a| a.key().clone()).collect();
        *self.snapshot.write().unwrap() = Snapshot { report, agents };
        self.agent_keys.send_if_modified(|current| {
            let changed = *current != keys;
            if changed {
                *current = keys;
            }
            changed
        });
    }

    /// The keys of the agents running now, in key order; it changes when they do.
    pub fn agent_keys(&self) -> watch::Receiver<Arc<[ResourceKey]>> {
        self.agent_keys.subscribe()
    }

    /// The report of `GET /catalog`.
    pub fn report(&self) -> CatalogReport {
        let mut report = self.snapshot.read().unwrap().report.clone();
        report.failed = self.health.not_running();
        report.attaching = self.health.attaching();
        report.extensions = self.extensions.report();
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
