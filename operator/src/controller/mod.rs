//! The controllers: thin IO around [`crate::render`] and [`crate::status`]. Each
//! reads what it needs from caches its own watches fill, asks the pure core what
//! should exist, and applies it (objects and status) with server-side apply under one
//! field manager. Each kind says what it watches and how it reconciles (a
//! [`Reconciler`]); [`run`] does the rest, the same for all of them.

pub mod agent;
pub mod channel;
pub mod extension;
pub mod pool;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self as runtime, Action};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::probe::WorkerProbe;
use crate::render::SecretValues;
use nexo_api::spec::SecretKeySelector;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "nexo-operator";

/// How often an object that reconciled is looked at again even when nothing it
/// watches changed: the safety net for a missed event.
pub(crate) const RESYNC: Duration = Duration::from_secs(300);

/// The Secrets' metadata, as the controllers watch them: a change is all they need to
/// hear of; the values are read (GET) only where they are used.
pub(crate) type SecretMeta = PartialObjectMeta<Secret>;

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
    /// Retry delays of objects whose last reconciliation failed, by `kind/ns/name`;
    /// an entry goes when its object reconciles or is found deleted ([`run`]).
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
        let delay = failures
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
            .unwrap_or(Duration::from_secs(300));
        self.metrics.retrying.set(failures.len() as i64);
        delay
    }

    /// The object reconciled, or is gone: its next failure starts the backoff from
    /// the beginning, and a deleted object leaves nothing behind.
    pub fn forget(&self, object: &str) {
        let mut failures = self.failures.lock().expect("failures lock is not poisoned");
        failures.remove(object);
        self.metrics.retrying.set(failures.len() as i64);
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

/// Applies the status of `name` (server-side apply of the status subresource, forced,
/// under [`FIELD_MANAGER`]). The operator owns every status field, so a field the new
/// status leaves out (a placement, a problem that went away) is removed.
pub(crate) async fn apply_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Reads the values of `keys` from Secrets in `namespace`; absent Secrets or keys
/// are left out (callers report them). Only Secrets the cache `known` holds are asked
/// for: a Secret that does not exist costs no request (its creation triggers the
/// caller again).
pub(crate) async fn read_secrets(
    client: &Client,
    known: &Store<SecretMeta>,
    namespace: &str,
    keys: &BTreeSet<SecretKeySelector>,
) -> Result<SecretValues, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut values = SecretValues::new();
    let names: BTreeSet<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    for name in names {
        if cached(known, namespace, name).is_none() {
            continue;
        }
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
fn error_action<K: Resource<DynamicType = ()>>(object: &K, error: &Error, ctx: &Context) -> Action {
    Action::requeue(ctx.retry_after(
        &backoff_key::<K>(object.namespace(), &object.name_any()),
        error,
    ))
}

fn backoff_key<K: Resource<DynamicType = ()>>(namespace: Option<String>, name: &str) -> String {
    format!("{}/{}/{name}", K::kind(&()), namespace.unwrap_or_default())
}

/// Records the outcome of one reconciliation in the metrics and the log.
fn record<K: Resource<DynamicType = ()>, T>(
    ctx: &Context,
    controller: &str,
    object: &K,
    started: Instant,
    result: &Result<T, Error>,
) {
    let error = result.as_ref().err();
    if error.is_none() {
        ctx.forget(&backoff_key::<K>(object.namespace(), &object.name_any()));
    }
    ctx.metrics
        .observe(controller, started.elapsed(), error.map(Error::kind));
    if let Some(error) = error {
        let object = object_name(object);
        tracing::warn!(controller, object, %error, "reconcile failed");
    }
}

/// One kind of controller: the watches that trigger it together with the caches its
/// reconciliation reads, and the reconciliation. [`run`] does the rest.
pub trait Reconciler: Send + Sync + Sized + 'static {
    /// The kind it reconciles.
    type Object: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static;
    /// Its name in metrics and logs.
    const NAME: &'static str;
    /// The controller of `scope`, and the reconciler holding the caches its watches
    /// fill.
    fn build(scope: &Scope, client: &Client) -> (Controller<Self::Object>, Self);
    /// Resolves once every cache the reconciliation reads holds a first full list, so
    /// no reconciliation sees a half-empty cluster (and renders a catalog without
    /// agents that exist).
    fn ready(&self) -> impl Future<Output = ()> + Send;
    /// Brings the cluster in line with `object`.
    fn reconcile(
        &self,
        object: Arc<Self::Object>,
        ctx: &Context,
    ) -> impl Future<Output = Result<Action, Error>> + Send;
}

/// Runs controller `R` in `scope` until `shutdown`: reconciles, records the outcome,
/// retries failures with backoff ([`error_action`]), and forgets the backoff of an
/// object found deleted when its retry comes.
pub async fn run<R: Reconciler>(
    ctx: Arc<Context>,
    scope: Scope,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (controller, reconciler) = R::build(&scope, &ctx.client);
    let state = Arc::new((reconciler, ctx.clone()));
    controller
        .graceful_shutdown_on(shutdown)
        .run(
            |object, state| async move {
                let (reconciler, ctx) = &*state;
                reconciler.ready().await;
                let started = Instant::now();
                let result = reconciler.reconcile(object.clone(), ctx).await;
                record(ctx, R::NAME, &*object, started, &result);
                result
            },
            |object, error, state| error_action(&*object, error, &state.1),
            state,
        )
        .for_each(|result| {
            match result {
                Err(runtime::Error::ObjectNotFound(gone)) => {
                    ctx.forget(&backoff_key::<R::Object>(
                        gone.namespace.clone(),
                        &gone.name,
                    ));
                }
                Err(error) => {
                    tracing::debug!(controller = R::NAME, %error, "reconcile not completed");
                }
                Ok(_) => {}
            }
            std::future::ready(())
        })
        .await;
}

/// Every controller of `scope`, until `shutdown` is cancelled.
pub async fn run_all(ctx: Arc<Context>, scope: Scope, shutdown: CancellationToken) {
    let until = || shutdown.clone().cancelled_owned();
    futures::join!(
        run::<pool::Pools>(ctx.clone(), scope.clone(), until()),
        run::<agent::Agents>(ctx.clone(), scope.clone(), until()),
        run::<channel::Channels>(ctx.clone(), scope.clone(), until()),
        run::<extension::Extensions>(ctx, scope, until()),
    );
}

/// What the controllers cache: namespaced kinds with a static type.
pub(crate) trait Cacheable:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Cacheable for K where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static
{
}

/// A cache, and the watch that fills it as a stream of the objects it touches.
pub(crate) type Cache<K> = (Store<K>, BoxStream<'static, Result<K, watcher::Error>>);

/// A cache of `K` in `scope` and the watch that fills it, as a trigger stream for
/// [`Controller::watches_stream`]: the cache holds a change before the reconciliation
/// it triggers runs. Deletions trigger too. Cached objects keep no `managedFields`
/// (nothing reads them; they are often the larger part of an object).
pub(crate) fn cache<K: Cacheable>(scope: &Scope, client: &Client) -> Cache<K> {
    cache_trimmed(scope, client, |object: &mut K| {
        object.managed_fields_mut().clear();
    })
}

/// [`cache`] of the Secrets' metadata, without annotations either: `kubectl apply`
/// keeps the whole Secret, values included, in one, and the operator needs only the
/// names and labels.
pub(crate) fn secret_cache(scope: &Scope, client: &Client) -> Cache<SecretMeta> {
    cache_trimmed(scope, client, trim_secret)
}

fn trim_secret(secret: &mut SecretMeta) {
    secret.managed_fields_mut().clear();
    secret.annotations_mut().clear();
}

fn cache_trimmed<K: Cacheable>(
    scope: &Scope,
    client: &Client,
    trim: impl FnMut(&mut K) + Send + 'static,
) -> Cache<K> {
    let (store, writer) = reflector::store();
    let events = watcher(scope.api::<K>(client), watcher::Config::default()).modify(trim);
    let stream = reflector::reflector(writer, events).touched_objects();
    (store, stream.boxed())
}

/// The cached object `name` in `namespace`.
pub(crate) fn cached<K>(store: &Store<K>, namespace: &str, name: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store.get(&ObjectRef::new(name).within(namespace))
}

/// The cached objects of `namespace`, in no particular order.
pub(crate) fn in_namespace<K>(store: &Store<K>, namespace: &str) -> Vec<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store
        .state()
        .into_iter()
        .filter(|o| o.namespace().as_deref() == Some(namespace))
        .map(|o| (*o).clone())
        .collect()
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

    #[test]
    fn cached_secrets_hold_no_values() {
        let mut secret: SecretMeta = serde_json::from_value(serde_json::json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {
                "name": "llm", "namespace": "team-a",
                "labels": {"team": "a"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration":
                        "{\"data\":{\"api-key\":\"c2stMQ==\"}}"
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            }
        }))
        .unwrap();
        trim_secret(&mut secret);
        assert!(secret.annotations().is_empty());
        assert!(secret.managed_fields().is_empty());
        assert_eq!(
            secret.labels()["team"],
            "a",
            "labels stay (mappers read them)"
        );
    }

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
        assert_eq!(ctx.metrics.retrying.get(), 2);
        ctx.forget("a");
        assert_eq!(ctx.metrics.retrying.get(), 1);
        assert!(ctx.retry_after("a", &error()) < Duration::from_secs(3));
        ctx.forget("a");
        ctx.forget("b");
        assert_eq!(ctx.metrics.retrying.get(), 0, "a forgotten object is gone");
        // Expected waits are not failures.
        let waiting = Error::StillInCatalog {
            agent: "x".into(),
            pool: "p".into(),
        };
        assert_eq!(ctx.retry_after("c", &waiting), Duration::from_secs(2));
    }
}
