//! What a pool's workers run: the catalog (agents, channels, extensions, placement) and the values
//! of the Secret keys those specs reference, mirrored into one Secret per pool.
//!
//! Mirroring lets a new agent bring a new Secret reference without touching the pod
//! template (a mounted Secret volume is updated in place by the kubelet), so adding or
//! changing agents never restarts a pool; see docs/adr/0006-pool-catalog-and-secrets.md.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use nexo_api::config::{Catalog, CatalogPlacement, Resource};
use nexo_api::crd::{Agent, Channel, Extension, WorkerPool};
use nexo_api::spec::{SecretKeySelector, SecretRef};
use xxhash_rust::xxh3::xxh3_64;

use crate::scale::Workers;

/// Values of referenced Secret keys as read from the cluster; a key that is absent
/// (missing Secret or missing key) has no entry.
pub type SecretValues = BTreeMap<SecretKeySelector, Vec<u8>>;

/// What a pool's catalog holds.
#[derive(Debug, Clone, Default)]
pub struct Members<'a> {
    pub agents: Vec<&'a Agent>,
    /// Channels whose default agent is one of `agents`.
    pub channels: Vec<&'a Channel>,
    /// Extensions one of `agents` uses.
    pub extensions: Vec<&'a Extension>,
}

/// The agents of `pool`, the channels whose default agent is one of them and the
/// extensions they use; all without resources that are being deleted. Sorted by name
/// so the rendering is stable whatever order the API server lists them in.
pub fn members<'a>(
    pool: &WorkerPool,
    agents: &'a [Agent],
    channels: &'a [Channel],
    extensions: &'a [Extension],
) -> Members<'a> {
    let pool_name = pool.name_any();
    let mut members: Vec<&Agent> = agents
        .iter()
        .filter(|a| a.metadata.deletion_timestamp.is_none() && a.spec.worker_pool == pool_name)
        .collect();
    members.sort_by_key(|a| a.name_any());
    let names: BTreeSet<String> = members.iter().map(|a| a.name_any()).collect();
    let mut served: Vec<&Channel> = channels
        .iter()
        // Its default agent and every route's agent must be the pool's: a worker
        // refuses a catalog naming an agent it does not have (the Channel's
        // `ResolvedRefs` says which is missing).
        .filter(|c| {
            c.metadata.deletion_timestamp.is_none()
                && c.spec.agents().iter().all(|a| names.contains(*a))
        })
        .collect();
    served.sort_by_key(|c| c.name_any());
    let used: BTreeSet<&str> = members
        .iter()
        .flat_map(|a| a.spec.extensions.iter().map(|e| e.name.as_str()))
        .collect();
    let mut extensions: Vec<&Extension> = extensions
        .iter()
        .filter(|e| e.metadata.deletion_timestamp.is_none() && used.contains(e.name_any().as_str()))
        .collect();
    extensions.sort_by_key(|e| e.name_any());
    Members {
        agents: members,
        channels: served,
        extensions,
    }
}

/// Every Secret key the members reference.
pub fn referenced_secrets(members: &Members<'_>) -> BTreeSet<SecretKeySelector> {
    let agent_refs = members.agents.iter().flat_map(|a| a.spec.secret_refs());
    let channel_refs = members.channels.iter().flat_map(|c| c.spec.secret_refs());
    let extension_refs = members.extensions.iter().flat_map(|e| e.spec.secret_refs());
    agent_refs
        .chain(channel_refs)
        .chain(extension_refs)
        .filter_map(|r: &SecretRef| r.secret_key_ref.clone())
        .collect()
}

/// Where the init containers of a pool's workers put the programs of stdio
/// extensions that come as images (see docs/adr/0011-extensions-in-pools.md).
pub const EXTENSIONS_DIR: &str = "/opt/nexo/extensions";

/// Path of the program of stdio extension `extension` once copied into the worker.
pub fn copied_program(extension: &str) -> String {
    format!("{EXTENSIONS_DIR}/{extension}")
}

/// The catalog of `pool`, placing its partitions on `workers.placement` workers. Its
/// revision hashes the content and the referenced Secret values, so a rotated key also
/// produces a new revision that workers reload.
pub fn catalog(
    pool: &WorkerPool,
    workers: Workers,
    members: &Members<'_>,
    secrets: &SecretValues,
) -> Catalog {
    let namespace = pool.namespace().unwrap_or_default();
    let mut catalog = Catalog {
        revision: String::new(),
        placement: Some(CatalogPlacement {
            partitions: pool.spec.partitions,
            // A pool scaled to zero still names one worker: a catalog with none
            // is invalid, and no worker runs to read it anyway.
            workers: workers.placement.max(1),
        }),
        agents: members
            .agents
            .iter()
            .map(|a| Resource {
                name: a.name_any(),
                namespace: namespace.clone(),
                spec: a.spec.clone(),
            })
            .collect(),
        channels: members
            .channels
            .iter()
            .map(|c| Resource {
                name: c.name_any(),
                namespace: namespace.clone(),
                spec: c.spec.clone(),
            })
            .collect(),
        extensions: members
            .extensions
            .iter()
            .map(|e| {
                let mut spec = e.spec.clone();
                // The init container copied the program out of its image.
                if let Some(stdio) = spec.stdio.as_mut()
                    && stdio.image.is_some()
                {
                    stdio.command = copied_program(&e.name_any());
                }
                Resource {
                    name: e.name_any(),
                    namespace: namespace.clone(),
                    spec,
                }
            })
            .collect(),
    };
    let content = serde_json::to_vec(&catalog).expect("a catalog serializes");
    let mut hashed = content;
    for (key, value) in secrets {
        hashed.extend_from_slice(key.mounted_file_name().as_bytes());
        hashed.extend_from_slice(&xxh3_64(value).to_le_bytes());
    }
    catalog.revision = format!("{:016x}", xxh3_64(&hashed));
    catalog
}

/// Data of the pool's mirrored Secret: one entry per referenced key that exists.
pub fn mirrored_secret_data(
    referenced: &BTreeSet<SecretKeySelector>,
    secrets: &SecretValues,
) -> BTreeMap<String, Vec<u8>> {
    referenced
        .iter()
        .filter_map(|key| Some((key.mounted_file_name(), secrets.get(key)?.clone())))
        .collect()
}
