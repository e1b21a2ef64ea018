//! The pure core of the operator: specs in, desired Kubernetes objects out. No IO
//! here, so every rule about what a pool looks like is tested without a cluster.

pub mod catalog;
pub mod extension;
pub mod names;
pub mod pod;
pub mod workload;

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use nexo_api::Catalog;
use nexo_api::crd::{Agent, Channel, Extension, WorkerPool};

pub use crate::scale::Workers;
pub use catalog::SecretValues;

/// What the operator reads to render one pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolInputs<'a> {
    pub pool: &'a WorkerPool,
    /// Agents and channels of the pool's namespace (all of them; the pool picks its own).
    pub agents: &'a [Agent],
    pub channels: &'a [Channel],
    /// Extensions of the pool's namespace (the pool's agents pick theirs).
    pub extensions: &'a [Extension],
    /// Values of the Secret keys the pool's specs reference, as far as they exist.
    pub secrets: &'a SecretValues,
    /// Workers the catalog places partitions on and pods the StatefulSet runs: the
    /// spec's replicas ([`Workers::settled`]) unless a scale is under way.
    pub workers: Workers,
}

/// Everything the operator keeps in place for one pool, all owned by the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolObjects {
    pub catalog: Catalog,
    pub catalog_config_map: ConfigMap,
    pub worker_config_map: ConfigMap,
    pub secrets: Secret,
    pub stateful_set: StatefulSet,
    pub headless_service: Service,
    pub http_service: Service,
    pub disruption_budget: PodDisruptionBudget,
}

impl PoolObjects {
    /// The catalog's agents.
    pub fn agent_count(&self) -> u32 {
        self.catalog.agents.len() as u32
    }
}

/// The desired objects of a pool.
pub fn pool(inputs: PoolInputs<'_>) -> PoolObjects {
    let pool = inputs.pool;
    let name = pool.name_any();
    let members = catalog::members(pool, inputs.agents, inputs.channels, inputs.extensions);
    let referenced = catalog::referenced_secrets(&members);
    let catalog = catalog::catalog(pool, inputs.workers, &members, inputs.secrets);
    let worker_config = workload::worker_config(pool);
    let config_hash = workload::config_hash(&worker_config);

    let catalog_yaml = serde_saphyr::to_string(&catalog).expect("a catalog serializes");
    PoolObjects {
        catalog_config_map: ConfigMap {
            metadata: owned_meta(pool, names::catalog(&name)),
            data: Some(BTreeMap::from([(
                workload::CATALOG_FILE.to_owned(),
                catalog_yaml,
            )])),
            ..ConfigMap::default()
        },
        worker_config_map: ConfigMap {
            metadata: owned_meta(pool, names::worker_config(&name)),
            data: Some(BTreeMap::from([(
                workload::WORKER_CONFIG_FILE.to_owned(),
                worker_config,
            )])),
            ..ConfigMap::default()
        },
        secrets: Secret {
            metadata: owned_meta(pool, names::secrets(&name)),
            data: Some(
                catalog::mirrored_secret_data(&referenced, inputs.secrets)
                    .into_iter()
                    .map(|(k, v)| (k, ByteString(v)))
                    .collect(),
            ),
            type_: Some("Opaque".into()),
            ..Secret::default()
        },
        stateful_set: workload::stateful_set(
            pool,
            inputs.workers.replicas,
            owned_meta(pool, name.clone()),
            &config_hash,
            &members.extensions,
        ),
        headless_service: workload::headless_service(pool, {
            let mut meta = owned_meta(pool, names::headless_service(&name));
            // Lets a ServiceMonitor scrape each worker once, through this Service only.
            meta.labels
                .get_or_insert_with(Default::default)
                .insert(names::METRICS_LABEL.to_owned(), "true".to_owned());
            meta
        }),
        http_service: workload::http_service(pool, owned_meta(pool, name.clone())),
        disruption_budget: workload::disruption_budget(pool, owned_meta(pool, name)),
        catalog,
    }
}

/// Metadata of an object the pool owns: its labels, and an owner reference so
/// Kubernetes garbage-collects it with the pool.
fn owned_meta(pool: &WorkerPool, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: pool.namespace(),
        labels: Some(names::labels(&pool.name_any())),
        owner_references: pool.controller_owner_ref(&()).map(|owner| vec![owner]),
        ..ObjectMeta::default()
    }
}
