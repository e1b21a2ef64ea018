//! What the HTTP endpoints see of the running catalog: the report of `GET /catalog`
//! and the agents of `/admin/agents`, replaced together after every applied change.

use std::sync::{Arc, RwLock};

use nexo_api::ResourceKey;

use crate::agent::{AgentInfo, AgentRuntime};
use crate::http::{AgentDirectory, CatalogReport, CatalogView};
use crate::memory::AgentMemory;

#[derive(Default)]
pub struct Live(RwLock<Snapshot>);

#[derive(Default)]
struct Snapshot {
    report: CatalogReport,
    agents: Vec<Arc<AgentRuntime>>,
}

impl Live {
    pub fn publish(&self, report: CatalogReport, agents: Vec<Arc<AgentRuntime>>) {
        *self.0.write().unwrap() = Snapshot { report, agents };
    }
}

impl CatalogView for Live {
    fn report(&self) -> CatalogReport {
        self.0.read().unwrap().report.clone()
    }
}

impl AgentDirectory for Live {
    fn agents(&self) -> Vec<AgentInfo> {
        let snapshot = self.0.read().unwrap();
        snapshot.agents.iter().map(|a| a.info()).collect()
    }

    fn memory(&self, agent: &ResourceKey) -> Option<Arc<AgentMemory>> {
        let snapshot = self.0.read().unwrap();
        snapshot
            .agents
            .iter()
            .find(|a| a.key() == agent)
            .map(|a| a.memory().clone())
    }
}
