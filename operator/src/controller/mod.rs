//! The controllers: thin IO around [`crate::render`] and [`crate::status`]. Each
//! reads what it needs, asks the pure core what should exist, and applies it with
//! server-side apply under one field manager.

pub mod agent;
pub mod channel;
pub mod extension;
pub mod pool;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::metrics::Metrics;
use crate::probe::WorkerProbe;
use crate::render::{SecretKeyRef, SecretValues};

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "nexo-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("agent `{agent}` is still in the catalog of pool `{pool}`")]
    StillInCatalog { agent: String, pool: String },
}

impl Error {
    /// Short label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::StillInCatalog { .. } => "waiting_for_catalog",
        }
    }
}

/// Which namespaces the operator manages.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// `None`: every namespace.
    pub namespace: Option<String>,
}

impl Scope {
    pub fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
}

/// A template for the pool named `default`, created on demand when an agent refers to
/// it and none exists (the operator's `--default-pool-*` flags).
#[derive(Debug, Clone)]
pub struct DefaultPool {
    pub spec: nexo_api::crd::WorkerPoolSpec,
}

/// What every reconciler shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub default_pool: Option<DefaultPool>,
    pub probe: Arc<dyn WorkerProbe>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        default_pool: Option<DefaultPool>,
        probe: Arc<dyn WorkerProbe>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            default_pool,
            probe,
        }
    }
}

/// Applies `object` (server-side apply, forced: the operator owns these fields).
pub async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?)
}

/// Replaces the status of `name` (a merge patch of the whole `status`).
pub async fn patch_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<(), Error>
where
    K: Resource + DeserializeOwned + Clone + Debug,
    S: Serialize,
{
    let patch = serde_json::json!({ "status": status });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Reads the values of `keys` from Secrets in `namespace`; absent Secrets or keys
/// are left out (callers report them).
pub async fn read_secrets(
    client: &Client,
    namespace: &str,
    keys: &BTreeSet<SecretKeyRef>,
) -> Result<SecretValues, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut values = SecretValues::new();
    let names: BTreeSet<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    for name in names {
        let Some(secret) = api.get_opt(name).await? else {
            continue;
        };
        let data = secret.data.unwrap_or_default();
        for key in keys.iter().filter(|k| k.name == name) {
            if let Some(value) = data.get(&key.key) {
                values.insert(key.clone(), value.0.clone());
            }
        }
    }
    Ok(values)
}

/// Human-readable names of the `keys` missing from `values`.
pub fn missing_secrets(keys: &BTreeSet<SecretKeyRef>, values: &SecretValues) -> Vec<String> {
    keys.iter()
        .filter(|k| !values.contains_key(*k))
        .map(|k| format!("Secret `{}` (key `{}`)", k.name, k.key))
        .collect()
}

pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Requeue policy on errors: soon for expected waits, with backoff for API errors
/// (kube's controller already spreads retries per object).
pub fn error_action(error: &Error) -> Action {
    match error {
        Error::StillInCatalog { .. } => Action::requeue(Duration::from_secs(2)),
        _ => Action::requeue(Duration::from_secs(15)),
    }
}

/// Records the outcome of one reconciliation in the metrics and the log.
pub fn record<T>(
    ctx: &Context,
    controller: &str,
    object: &str,
    started: Instant,
    result: &Result<T, Error>,
) {
    let error = result.as_ref().err();
    ctx.metrics
        .observe(controller, started.elapsed(), error.map(Error::kind));
    if let Some(error) = error {
        tracing::warn!(controller, object, %error, "reconcile failed");
    }
}

/// Runs a controller's stream to its end, logging what does not reconcile.
pub async fn drive<S, T, E>(name: &'static str, stream: S)
where
    S: futures::Stream<Item = Result<T, E>>,
    E: std::fmt::Display,
{
    stream
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(controller = name, %error, "reconcile not completed");
            }
        })
        .await;
}

/// Records a Kubernetes Event on `object` (best effort: a failure is only logged).
pub async fn publish<K>(ctx: &Context, object: &K, type_: EventType, reason: &str, note: String)
where
    K: Resource<DynamicType = ()>,
{
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::debug!(%error, "cannot publish event");
    }
}

/// `namespace/name` of an object, for logs.
pub fn object_name<K: Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}
