//! The controllers: thin IO around [`crate::render`] and [`crate::status`]. Each
//! reads what it needs, asks the pure core what should exist, and applies it with
//! server-side apply under one field manager.

pub mod agent;
pub mod channel;
pub mod extension;
pub mod pool;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::future::Future;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::metrics::Metrics;
use crate::probe::WorkerProbe;
use crate::render::SecretValues;
use nexo_api::spec::SecretKeySelector;

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
    /// Retry delays of objects whose last reconciliation failed, by `kind/ns/name`.
    failures: Mutex<HashMap<String, ExponentialBackoff>>,
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
            failures: Mutex::default(),
        }
    }

    /// When to retry an object that failed: 1 s, doubling up to 5 minutes, with
    /// jitter; the waits the controllers expect anyway (a finalizer waiting for the
    /// catalog) retry every 2 s.
    pub fn retry_after(&self, object: &str, error: &Error) -> Duration {
        if let Error::StillInCatalog { .. } = error {
            return Duration::from_secs(2);
        }
        let mut failures = self.failures.lock().expect("failures lock is not poisoned");
        failures
            .entry(object.to_owned())
            .or_insert_with(|| {
                ExponentialBuilder::new()
                    .with_min_delay(Duration::from_secs(1))
                    .with_max_delay(Duration::from_secs(300))
                    .with_jitter()
                    .without_max_times()
                    .build()
            })
            .next()
            .unwrap_or(Duration::from_secs(300))
    }

    /// The object reconciled: its next failure starts the backoff from the beginning.
    pub fn succeeded(&self, object: &str) {
        self.failures
            .lock()
            .expect("failures lock is not poisoned")
            .remove(object);
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

/// Replaces the status of `name` as a whole. A JSON patch `add` of `/status` (which
/// replaces an existing member): a merge patch would keep fields the new status
/// leaves out, such as a placement or a problem that went away.
pub async fn patch_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<(), Error>
where
    K: Resource + DeserializeOwned + Clone + Debug,
    S: Serialize,
{
    let value = serde_json::to_value(status).expect("a status serializes");
    let patch = json_patch::Patch(vec![json_patch::PatchOperation::Add(
        json_patch::AddOperation {
            path: json_patch::jsonptr::PointerBuf::parse("/status").expect("a valid pointer"),
            value,
        },
    )]);
    api.patch_status(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    Ok(())
}

/// Reads the values of `keys` from Secrets in `namespace`; absent Secrets or keys
/// are left out (callers report them).
pub async fn read_secrets(
    client: &Client,
    namespace: &str,
    keys: &BTreeSet<SecretKeySelector>,
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
pub fn missing_secrets(keys: &BTreeSet<SecretKeySelector>, values: &SecretValues) -> Vec<String> {
    keys.iter()
        .filter(|k| !values.contains_key(*k))
        .map(|k| format!("Secret `{}` (key `{}`)", k.name, k.key))
        .collect()
}

pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Requeue policy on errors: exponential backoff per object (see
/// [`Context::retry_after`]).
pub fn error_action<K: Resource<DynamicType = ()>>(
    object: &K,
    error: &Error,
    ctx: &Context,
) -> Action {
    Action::requeue(ctx.retry_after(&backoff_key(object), error))
}

fn backoff_key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!("{}/{}", K::kind(&()), object_name(object))
}

/// Records the outcome of one reconciliation in the metrics and the log.
pub fn record<K: Resource<DynamicType = ()>, T>(
    ctx: &Context,
    controller: &str,
    object: &K,
    started: Instant,
    result: &Result<T, Error>,
) {
    let error = result.as_ref().err();
    if error.is_none() {
        ctx.succeeded(&backoff_key(object));
    }
    ctx.metrics
        .observe(controller, started.elapsed(), error.map(Error::kind));
    if let Some(error) = error {
        let object = object_name(object);
        tracing::warn!(controller, object, %error, "reconcile failed");
    }
}

/// Runs `controller` with `reconcile` until `shutdown`, retrying failures with
/// backoff ([`error_action`]) and logging what did not reconcile.
pub async fn serve<K, F, Fut>(
    name: &'static str,
    controller: Controller<K>,
    reconcile: F,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    F: FnMut(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    controller
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |object, error, ctx| error_action(&*object, error, &ctx),
            ctx,
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(controller = name, %error, "reconcile not completed");
            }
        })
        .await;
}

/// References to the cached objects of `store` in `namespace` that `wanted` selects:
/// what a watch mapper returns to trigger reconciliations.
pub fn matching<K>(
    store: &Store<K>,
    namespace: Option<String>,
    wanted: impl Fn(&K) -> bool,
) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store
        .state()
        .into_iter()
        .filter(|o| o.namespace() == namespace && wanted(o))
        .map(|o| ObjectRef::from_obj(&*o))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_back_off_exponentially_and_reset_on_success() {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        struct NoWorkers;
        impl WorkerProbe for NoWorkers {
            fn report<'a>(
                &'a self,
                _: &'a nexo_api::crd::WorkerPool,
                _: u32,
            ) -> futures::future::BoxFuture<'a, Option<nexo_api::report::CatalogReport>>
            {
                Box::pin(async { None })
            }
        }
        let ctx = Context::new(client, Arc::new(Metrics::new()), None, Arc::new(NoWorkers));
        let error = || Error::Finalizer("boom".into());
        let delays: Vec<Duration> = (0..12).map(|_| ctx.retry_after("a", &error())).collect();
        // Jitter adds up to one more delay's worth; the trend still doubles.
        assert!(delays[0] < Duration::from_secs(3), "{delays:?}");
        assert!(delays[6] > delays[1], "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(600)),
            "{delays:?}"
        );
        assert!(delays[11] >= Duration::from_secs(300), "{delays:?}");
        // Another object has its own schedule; success starts over.
        assert!(ctx.retry_after("b", &error()) < Duration::from_secs(3));
        ctx.succeeded("a");
        assert!(ctx.retry_after("a", &error()) < Duration::from_secs(3));
        // Expected waits are not failures.
        let waiting = Error::StillInCatalog {
            agent: "x".into(),
            pool: "p".into(),
        };
        assert_eq!(ctx.retry_after("c", &waiting), Duration::from_secs(2));
    }
}
