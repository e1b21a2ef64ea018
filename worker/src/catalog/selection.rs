//! Which part of a catalog this worker runs: a pure function of the catalog, the
//! worker's pool and its shard.
//!
//! Agents are partitioned: each runs on exactly one worker of its pool (the one
//! [`PartitionMap`] names). Channels are not: every worker of the pool serves every
//! channel whose default agent is in the pool, so a Kubernetes Service can spread
//! channel traffic over all of them. The router consumer of a channel is a shared
//! durable consumer, so each inbound message is routed once, and the broker carries
//! the work to whichever worker owns the agent.

use nexo_api::ResourceKey;
use nexo_api::config::{Catalog, CatalogPlacement, Resource};
use nexo_api::partition::{DEFAULT_PARTITIONS, PartitionMap};
use nexo_api::spec::{AgentSpec, ChannelSpec, ExtensionSpec};

/// This worker's place in its pool, from `--shard i --shards N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: u32,
    /// `None`: the catalog's `placement` says (in a pod, where the pool size lives in
    /// the catalog so scaling restarts nothing); one worker without a placement.
    count: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("--shards must be at least 1")]
    NoShards,
    #[error("--shard {index} is out of range: shards are numbered 0 to {} (--shards {count})", count - 1)]
    OutOfRange { index: u32, count: u32 },
}

impl Shard {
    pub fn new(index: u32, count: u32) -> Result<Self, ShardError> {
        match (index, count) {
            (_, 0) => Err(ShardError::NoShards),
            (index, count) if index >= count => Err(ShardError::OutOfRange { index, count }),
            (index, count) => Ok(Self {
                index,
                count: Some(count),
            }),
        }
    }

    /// Worker `index` of a pool whose size the catalog's `placement` gives. A
    /// worker beyond that size (a pod that is about to be removed) runs nothing.
    pub fn from_catalog(index: u32) -> Self {
        Self { index, count: None }
    }

    /// A worker that runs the whole pool.
    pub fn single() -> Self {
        Self {
            index: 0,
            count: Some(1),
        }
    }

    pub fn index(self) -> u32 {
        self.index
    }

    /// Workers when the catalog has no `placement`.
    pub fn count(self) -> u32 {
        self.count.unwrap_or(1)
    }
}

/// What one worker runs out of a catalog, with the partitioning that decided it.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub agents: Vec<Resource<AgentSpec>>,
    /// Every agent of the pool that is not suspended, whichever worker owns it: with
    /// leases a worker also runs the agents of a worker that is gone.
    pub pool_agents: Vec<Resource<AgentSpec>>,
    pub channels: Vec<Resource<ChannelSpec>>,
    /// Every extension of the catalog; those the selected agents use are connected.
    pub extensions: Vec<Resource<ExtensionSpec>>,
    pub partitions: u32,
    /// Workers the pool's agents are spread over.
    pub workers: u32,
    /// The partitioning that decided it.
    pub map: PartitionMap,
}

impl Selection {
    /// The partitions worker `ordinal` owns.
    pub fn partitions_of(&self, ordinal: u32) -> std::collections::BTreeSet<u32> {
        (0..self.map.partitions())
            .filter(|p| self.map.worker(*p) == ordinal)
            .collect()
    }
}

/// The partitioning in force: the catalog's `placement` when it has one (the operator
/// writes the pool's current size there, so scaling rewrites the catalog instead of
/// restarting pods), else `--shards` and the default partition count.
fn partition_map(placement: Option<CatalogPlacement>, shard: Shard) -> PartitionMap {
    match placement {
        Some(placement) => PartitionMap::new(placement.partitions, placement.workers),
        None => PartitionMap::new(DEFAULT_PARTITIONS, shard.count()),
    }
}

/// The agents and channels of `catalog` that worker `shard` of pool `pool` runs:
/// agents of the pool that are not suspended and that its shard owns; channels that
/// are not suspended and whose default agent belongs to the pool (suspended or not:
/// messages to a suspended agent wait in the broker).
pub fn select(catalog: &Catalog, pool: &str, shard: Shard) -> Selection {
    let map = partition_map(catalog.placement, shard);
    let in_pool = |key: &ResourceKey| {
        catalog
            .agents
            .iter()
            .any(|a| a.spec.worker_pool == pool && &a.key() == key)
    };
    let pool_agents: Vec<Resource<AgentSpec>> = catalog
        .agents
        .iter()
        .filter(|a| a.spec.worker_pool == pool && !a.spec.suspend)
        .cloned()
        .collect();
    Selection {
        agents: pool_agents
            .iter()
            .filter(|a| map.owns(shard.index, &a.key()))
            .cloned()
            .collect(),
        pool_agents,
        channels: catalog
            .channels
            .iter()
            .filter(|c| !c.spec.suspend)
            .filter(|c| in_pool(&ResourceKey::new(&c.namespace, &c.spec.default_agent)))
            .cloned()
            .collect(),
        extensions: catalog.extensions.clone(),
        partitions: map.partitions(),
        workers: map.workers(),
        map,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexo_api::spec::WebhookSpec;

    fn agent(name: &str, pool: &str, suspend: bool) -> Resource<AgentSpec> {
        let spec: AgentSpec = serde_json::from_value(serde_json::json!({
            "model": {"provider": "scripted"},
            "workerPool": pool,
            "suspend": suspend,
        }))
        .unwrap();
        Resource {
            name: name.to_owned(),
            namespace: "team".to_owned(),
            spec,
        }
    }

    fn channel(name: &str, agent: &str, suspend: bool) -> Resource<ChannelSpec> {
        Resource {
            name: name.to_owned(),
            namespace: "team".to_owned(),
            spec: ChannelSpec {
                default_agent: agent.to_owned(),
                routes: Vec::new(),
                suspend,
                webchat: None,
                webhook: Some(WebhookSpec::default()),
                telegram: None,
                whatsapp: None,
                slack: None,
            },
        }
    }

    fn names<T>(resources: &[Resource<T>]) -> Vec<&str> {
        resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn shard_must_be_below_shards() {
        assert_eq!(Shard::new(0, 0), Err(ShardError::NoShards));
        let err = Shard::new(2, 2).unwrap_err();
        assert_eq!(err, ShardError::OutOfRange { index: 2, count: 2 });
        assert_eq!(
            err.to_string(),
            "--shard 2 is out of range: shards are numbered 0 to 1 (--shards 2)"
        );
        assert_eq!(Shard::new(1, 2).unwrap().index(), 1);
    }

    #[test]
    fn one_worker_runs_its_pool_except_suspended_agents_and_channels() {
        let catalog = Catalog {
            agents: vec![
                agent("a", "default", false),
                agent("b", "default", true),
                agent("c", "gpu", false),
            ],
            channels: vec![
                channel("to-a", "a", false),
                // A suspended agent's channel is served: its messages wait.
                channel("to-b", "b", false),
                channel("to-c", "c", false),
                channel("off", "a", true),
            ],
            ..Catalog::default()
        };
        let selection = select(&catalog, "default", Shard::single());
        assert_eq!(names(&selection.agents), ["a"]);
        assert_eq!(names(&selection.channels), ["to-a", "to-b"]);
        assert_eq!((selection.partitions, selection.workers), (64, 1));

        let gpu = select(&catalog, "gpu", Shard::single());
        assert_eq!(names(&gpu.agents), ["c"]);
        assert_eq!(names(&gpu.channels), ["to-c"]);
    }

    fn many_agents() -> Catalog {
        Catalog {
            agents: (0..40)
                .map(|i| agent(&format!("agent-{i}"), "default", false))
                .collect(),
            channels: vec![channel("api", "agent-0", false)],
            ..Catalog::default()
        }
    }

    #[test]
    fn shards_split_the_agents_and_all_serve_the_channels() {
        let catalog = many_agents();
        let map = PartitionMap::new(DEFAULT_PARTITIONS, 3);
        let mut seen = Vec::new();
        for index in 0..3 {
            let selection = select(&catalog, "default", Shard::new(index, 3).unwrap());
            assert_eq!(names(&selection.channels), ["api"]);
            assert_eq!(selection.workers, 3);
            for agent in &selection.agents {
                assert!(map.owns(index, &agent.key()));
                seen.push(agent.name.clone());
            }
            assert!(!selection.agents.is_empty(), "shard {index} got no agent");
        }
        seen.sort();
        let mut all: Vec<_> = catalog.agents.iter().map(|a| a.name.clone()).collect();
        all.sort();
        assert_eq!(seen, all, "every agent runs exactly once");
    }

    #[test]
    fn placement_in_the_catalog_overrides_shards() {
        let mut catalog = many_agents();
        catalog.placement = Some(CatalogPlacement {
            partitions: 16,
            workers: 2,
        });
        // Started as 1 of 1, told by the catalog that the pool has 2 workers.
        let selection = select(&catalog, "default", Shard::single());
        assert_eq!((selection.partitions, selection.workers), (16, 2));
        let map = PartitionMap::new(16, 2);
        let expected: Vec<_> = catalog
            .agents
            .iter()
            .filter(|a| map.owns(0, &a.key()))
            .map(|a| a.name.as_str())
            .collect();
        assert_eq!(names(&selection.agents), expected);
        assert!(expected.len() < catalog.agents.len());

        // A worker beyond the pool's size (being scaled away) runs no agent.
        let beyond = select(&catalog, "default", Shard::new(2, 3).unwrap());
        assert!(beyond.agents.is_empty());
        assert_eq!(names(&beyond.channels), ["api"]);
    }

    #[test]
    fn a_pod_learns_the_pool_size_from_the_catalog() {
        // In a pod only the index is given (NEXO_SHARD); NEXO_SHARDS is not.
        let mut catalog = many_agents();
        catalog.placement = Some(CatalogPlacement {
            partitions: 16,
            workers: 2,
        });
        let second = select(&catalog, "default", Shard::from_catalog(1));
        let map = PartitionMap::new(16, 2);
        let expected: Vec<_> = catalog
            .agents
            .iter()
            .filter(|a| map.owns(1, &a.key()))
            .map(|a| a.name.as_str())
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(names(&second.agents), expected);

        // Without a placement the pool is one worker: only index 0 runs agents.
        catalog.placement = None;
        assert!(
            select(&catalog, "default", Shard::from_catalog(1))
                .agents
                .is_empty()
        );
        assert_eq!(
            select(&catalog, "default", Shard::from_catalog(0))
                .agents
                .len(),
            catalog.agents.len()
        );
    }
}
