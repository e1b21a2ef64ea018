//! The controllers through a real `kube::Client` against the in-process API server
//! double (tests/support/apiserver.rs): what they create, the status they report,
//! the agent finalizer, missing references and scaling.

mod fixtures;
mod support;

use std::sync::Arc;
use std::time::Duration;

use fixtures::{NAMESPACE, agent, channel, pool, secret_key};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use nexo_api::crd::{
    Agent, AgentPlacement, Channel, Extension, WorkerPool, WorkerPoolStatus, condition,
};
use nexo_api::spec::SecretRef;
use nexo_api::{Catalog, PartitionMap, ResourceKey};
use nexo_operator::controller::{self, Context, DefaultPool, Scope};
use nexo_operator::metrics::Metrics;
use support::apiserver::ApiServer;
use support::{WorkerReports, eventually};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);

struct Cluster {
    server: ApiServer,
    client: Client,
    /// Stops the running operator.
    stop: CancellationToken,
    operator: Option<tokio::task::JoinHandle<()>>,
    default_pool: Option<DefaultPool>,
    workers: Arc<WorkerReports>,
    metrics: Arc<Metrics>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Cluster {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    async fn start_with(default_pool: Option<DefaultPool>) -> Self {
        let server = ApiServer::start().await;
        let client = server.client();
        let mut cluster = Self {
            server,
            client,
            stop: CancellationToken::new(),
            operator: None,
            default_pool,
            workers: Arc::new(WorkerReports::default()),
            metrics: Arc::new(Metrics::new()),
        };
        cluster.start_operator();
        cluster
    }

    /// Starts an operator (every controller) against the double.
    fn start_operator(&mut self) {
        let ctx = Arc::new(Context::new(
            self.server.operator_client(),
            self.metrics.clone(),
            self.default_pool.clone(),
            self.workers.clone(),
        ));
        let scope = Scope {
            namespace: Some(NAMESPACE.into()),
        };
        self.stop = CancellationToken::new();
        self.operator = Some(tokio::spawn(controller::run_all(
            ctx,
            scope,
            self.stop.clone(),
        )));
    }

    /// Stops the operator and waits until its controllers have finished.
    async fn stop_operator(&mut self) {
        self.stop.cancel();
        if let Some(operator) = self.operator.take() {
            tokio::time::timeout(DEADLINE, operator)
                .await
                .expect("the operator stops")
                .unwrap();
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    async fn create<K>(&self, object: &K)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let mut object = object.clone();
        object.meta_mut().uid = None;
        object.meta_mut().generation = None;
        self.api::<K>()
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
    }

    /// The catalog the pool's ConfigMap holds, once it exists.
    async fn catalog(&self, pool: &str) -> Option<Catalog> {
        let config_map = self
            .api::<ConfigMap>()
            .get_opt(&format!("{pool}-catalog"))
            .await
            .ok()??;
        serde_saphyr::from_str(&config_map.data?["catalog.yaml"]).ok()
    }

    async fn agent(&self, name: &str) -> Option<Agent> {
        self.api::<Agent>().get_opt(name).await.unwrap()
    }

    /// Waits until condition `type_` of agent `name` has `status` ("True"/"False");
    /// returns its (status, reason, message).
    async fn agent_condition(
        &self,
        name: &str,
        type_: &str,
        status: &str,
    ) -> (String, String, String) {
        self.agent_condition_within(name, type_, status, DEADLINE)
            .await
    }

    /// [`Self::agent_condition`], failing after `deadline`.
    async fn agent_condition_within(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        deadline: Duration,
    ) -> (String, String, String) {
        let what = format!("{type_}={status} on agent {name}");
        eventually(&what, deadline, || async {
            let agent = self.agent(name).await?;
            condition_of(&agent, type_).filter(|c| c.0 == status)
        })
        .await
    }

    /// Waits until the catalog of `pool` lists agent `name`.
    async fn catalog_with(&self, pool: &str, name: &str) -> Catalog {
        eventually("the catalog lists the agent", DEADLINE, || async {
            self.catalog(pool)
                .await
                .filter(|c| c.agents.iter().any(|a| a.name == name))
        })
        .await
    }

    /// What a kubelet would report: every replica of the pool's StatefulSet ready.
    async fn workers_ready(&self, pool: &str, replicas: i32) {
        eventually("the StatefulSet", DEADLINE, || async {
            self.api::<StatefulSet>().get_opt(pool).await.unwrap()
        })
        .await;
        let status =
            serde_json::json!({"status": {"replicas": replicas, "readyReplicas": replicas}});
        self.api::<StatefulSet>()
            .patch_status(pool, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }

    async fn secret(&self, name: &str, key: &str, value: &[u8]) {
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some([(key.to_owned(), ByteString(value.to_vec()))].into()),
            ..Default::default()
        };
        self.create(&secret).await;
    }

    /// Waits until the mirrored Secret of `pool` holds `value` for `key`, under the
    /// file name workers read.
    async fn mirrored(&self, pool: &str, key: &nexo_api::spec::SecretKeySelector, value: &[u8]) {
        let file = key.mounted_file_name();
        eventually("the mirrored Secret holds the key", DEADLINE, || async {
            let mirrored = self
                .api::<Secret>()
                .get_opt(&format!("{pool}-secrets"))
                .await
                .ok()??;
            mirrored
                .data?
                .get(&file)
                .filter(|v| v.0 == value)
                .map(|_| ())
        })
        .await;
    }

    /// Sets `spec.replicas` of `pool`, as `kubectl scale` does.
    async fn scale(&self, pool: &str, replicas: i32) {
        let patch = serde_json::json!({"spec": {"replicas": replicas}});
        self.api::<WorkerPool>()
            .patch(pool, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// The pool's StatefulSet replicas.
    async fn replicas(&self, pool: &str) -> Option<i32> {
        self.api::<StatefulSet>()
            .get_opt(pool)
            .await
            .unwrap()?
            .spec?
            .replicas
    }

    /// Waits until the status of `pool` satisfies `check`, and returns it.
    async fn pool_status(
        &self,
        pool: &str,
        what: &str,
        check: impl Fn(&WorkerPoolStatus) -> bool,
    ) -> WorkerPoolStatus {
        eventually(what, DEADLINE, || async {
            let pool = self.api::<WorkerPool>().get_opt(pool).await.unwrap()?;
            pool.status.filter(|s| check(s))
        })
        .await
    }

    async fn template(&self, pool: &str) -> PodTemplateSpec {
        self.api::<StatefulSet>()
            .get(pool)
            .await
            .unwrap()
            .spec
            .unwrap()
            .template
    }
}

fn condition_of(agent: &Agent, type_: &str) -> Option<(String, String, String)> {
    let status = agent.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn expected_placement(name: &str, workers: u32) -> AgentPlacement {
    let placed = PartitionMap::new(64, workers).place(&ResourceKey::new(NAMESPACE, name));
    AgentPlacement {
        pool: "default".into(),
        partition: placed.partition,
        worker: placed.worker,
    }
}

#[tokio::test]
async fn a_pool_and_an_agent_become_ready_with_their_placement() {
    let cluster = Cluster::start().await;
    cluster.create(&pool("default", 2)).await;
    cluster.create(&agent("concierge", "default")).await;

    let catalog = cluster.catalog_with("default", "concierge").await;
    assert_eq!(catalog.placement.unwrap().workers, 2);
    // Both workers loaded the catalog (what their `GET /catalog` would say).
    cluster
        .workers
        .set("default", 0, &catalog.revision, Vec::new());
    cluster
        .workers
        .set("default", 1, &catalog.revision, Vec::new());
    cluster.workers_ready("default", 2).await;

    cluster
        .agent_condition("concierge", condition::READY, "True")
        .await;
    let agent = cluster.agent("concierge").await.unwrap();
    let status = agent.status.unwrap();
    assert_eq!(status.placement, Some(expected_placement("concierge", 2)));
    assert_eq!(status.observed_generation, agent.metadata.generation);
    for type_ in [
        condition::ACCEPTED,
        condition::RESOLVED_REFS,
        condition::SCHEDULED,
    ] {
        let c = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
        assert_eq!(c.status, "True", "{type_}: {c:?}");
    }

    let pool = eventually("the pool reports ready", DEADLINE, || async {
        cluster
            .api::<WorkerPool>()
            .get("default")
            .await
            .ok()
            .filter(|p| {
                p.status
                    .as_ref()
                    .is_some_and(|s| s.ready_replicas == 2 && s.catalog_revision.is_some())
            })
    })
    .await;
    let status = pool.status.unwrap();
    assert_eq!(status.agents, 1);
    assert_eq!(
        status.workers_on_catalog_revision, 2,
        "{status:?} vs {}",
        catalog.revision
    );
    // The pool's own Secrets (NATS token, admin token) do not exist yet.
    let resolved = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::RESOLVED_REFS)
        .unwrap();
    assert_eq!(resolved.status, "False");
    assert!(
        resolved.message.contains("Secret `nats` (key `token`)"),
        "{}",
        resolved.message
    );

    cluster.secret("nats", "token", b"t").await;
    cluster.secret("nexo-admin", "token", b"a").await;
    let pool = eventually(
        "the pool is ready once its Secrets exist",
        DEADLINE,
        || async {
            cluster
                .api::<WorkerPool>()
                .get("default")
                .await
                .ok()
                .filter(|p| {
                    p.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == condition::READY && c.status == "True")
                    })
                })
        },
    )
    .await;
    let status = pool.status.unwrap();
    assert_eq!(status.catalog_revision, Some(catalog.revision.clone()));
    assert!(
        status.selector.contains("nexo.dev/pool=default"),
        "{}",
        status.selector
    );
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == condition::READY && c.status == "True")
    );
}

#[tokio::test]
async fn a_missing_secret_is_reported_until_it_exists_and_secrets_are_watched_by_metadata() {
    let cluster = Cluster::start().await;
    cluster
        .secret("unrelated", "key", b"not for the operator")
        .await;
    cluster.create(&pool("default", 1)).await;
    let mut concierge = agent("concierge", "default");
    concierge.spec.model.api_key = Some(SecretRef::secret_key("llm", "api-key"));
    cluster.create(&concierge).await;

    let (_, reason, message) = cluster
        .agent_condition("concierge", condition::RESOLVED_REFS, "False")
        .await;
    assert_eq!(reason, "MissingReferences");
    assert!(
        message.contains("Secret `llm` (key `api-key`)"),
        "{message}"
    );
    let stalled = condition_of(
        &cluster.agent("concierge").await.unwrap(),
        condition::STALLED,
    )
    .unwrap();
    assert_eq!(stalled.0, "True");

    cluster.secret("llm", "api-key", b"sk-1").await;
    cluster
        .agent_condition("concierge", condition::RESOLVED_REFS, "True")
        .await;
    // The value reached the pool's mirrored Secret, under the name workers read.
    cluster
        .mirrored("default", &secret_key("llm", "api-key"), b"sk-1")
        .await;

    // The creation reached the controllers through watches of metadata only; values
    // were read of the referenced Secret alone.
    let secrets: Vec<_> = cluster
        .server
        .operator_requests()
        .into_iter()
        .filter(|r| r.collection == "/secrets")
        .collect();
    let watches: Vec<_> = secrets
        .iter()
        .filter(|r| r.verb == "list" || r.verb == "watch")
        .collect();
    assert!(!watches.is_empty(), "{secrets:?}");
    assert!(watches.iter().all(|r| r.metadata_only), "{watches:?}");
    let read: Vec<_> = secrets
        .iter()
        .filter(|r| r.verb == "get")
        .filter_map(|r| r.name.as_deref())
        .collect();
    assert!(read.contains(&"llm"), "{read:?}");
    assert!(!read.contains(&"unrelated"), "{read:?}");
}

#[tokio::test]
async fn a_missing_delegate_is_reported_until_it_exists() {
    let cluster = Cluster::start().await;
    cluster.create(&pool("default", 1)).await;
    let mut concierge = agent("concierge", "default");
    concierge.spec.delegates = vec!["researcher".into()];
    cluster.create(&concierge).await;
    let (_, _, message) = cluster
        .agent_condition("concierge", condition::RESOLVED_REFS, "False")
        .await;
    assert!(
        message.contains("Agent `researcher` (delegate)"),
        "{message}"
    );

    // The delegate appearing is enough: nothing touches the delegating agent, and
    // the delegate runs in another pool so that the status of concierge's pool (which
    // its agents follow) does not change either.
    cluster.create(&agent("researcher", "elsewhere")).await;
    cluster
        .agent_condition("concierge", condition::RESOLVED_REFS, "True")
        .await;
}

#[tokio::test]
async fn a_channels_missing_signing_secret_is_reported_until_it_exists() {
    let cluster = Cluster::start().await;
    let mut web = channel("web", "concierge");
    web.spec.webhook.as_mut().unwrap().signing_secret =
        Some(SecretRef::secret_key("hooks", "signing-key"));
    cluster.create(&web).await;
    cluster.create(&agent("concierge", "default")).await;
    let resolved_refs = || async {
        let channel = cluster.api::<Channel>().get_opt("web").await.unwrap()?;
        let c = channel
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == condition::RESOLVED_REFS)?;
        Some((c.status, c.message))
    };
    // Only the Secret is missing once the default agent is seen (its pool need not
    // exist).
    let only_the_secret = (
        "False".to_owned(),
        "not found: Secret `hooks` (key `signing-key`)".to_owned(),
    );
    eventually("the missing Secret is reported", DEADLINE, || async {
        resolved_refs().await.filter(|r| *r == only_the_secret)
    })
    .await;

    cluster.secret("hooks", "signing-key", b"s3cret").await;
    eventually("the Secret resolves", DEADLINE, || async {
        resolved_refs().await.filter(|(status, _)| status == "True")
    })
    .await;
}

/// A route to an agent that does not exist, or that another pool runs, is a missing
/// reference, and the channel stays out of the pool's catalog (its workers would
/// refuse a catalog naming an agent they do not have) until the route is right.
#[tokio::test]
async fn a_route_to_an_unknown_or_foreign_agent_is_reported_and_kept_out_of_the_catalog() {
    let cluster = Cluster::start().await;
    cluster.create(&pool("default", 1)).await;
    cluster.create(&agent("concierge", "default")).await;
    cluster.create(&agent("billing", "other")).await;
    let mut web = channel("web", "concierge");
    web.spec.routes = serde_json::from_value(serde_json::json!([
        {"agent": "billing", "match": {"command": "invoice"}},
        {"agent": "ghost", "match": {"sender": "ada"}},
    ]))
    .unwrap();
    cluster.create(&web).await;
    let resolved_refs = || async {
        let channel = cluster.api::<Channel>().get_opt("web").await.unwrap()?;
        let c = channel
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == condition::RESOLVED_REFS)?;
        Some((c.status, c.message))
    };
    let both = (
        "False".to_owned(),
        "not found: Agent `billing` in pool `other` (a route's agent must be in the default agent's pool `default`), Agent `ghost` (a route's)".to_owned(),
    );
    eventually("both routes reported", DEADLINE, || async {
        resolved_refs().await.filter(|r| *r == both)
    })
    .await;
    let catalog = eventually("a catalog with the agent", DEADLINE, || async {
        cluster
            .catalog("default")
            .await
            .filter(|c| !c.agents.is_empty())
    })
    .await;
    assert!(catalog.channels.is_empty(), "{:?}", catalog.channels);

    // Fixed: the channel resolves and is served.
    cluster.create(&agent("ghost", "default")).await;
    let patch =
        serde_json::json!({"spec": {"routes": [{"agent": "ghost", "match": {"sender": "ada"}}]}});
    cluster
        .api::<Channel>()
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually("the routes resolve", DEADLINE, || async {
        resolved_refs().await.filter(|(status, _)| status == "True")
    })
    .await;
    eventually("the channel in the catalog", DEADLINE, || async {
        cluster
            .catalog("default")
            .await
            .filter(|c| c.channels.iter().any(|ch| ch.name == "web"))
    })
    .await;
}

#[tokio::test]
async fn an_agent_change_updates_the_catalog_without_touching_the_pod_template() {
    let cluster = Cluster::start().await;
    cluster.create(&pool("default", 1)).await;
    cluster.create(&agent("concierge", "default")).await;
    let before = eventually("first catalog", DEADLINE, || async {
        cluster
            .catalog("default")
            .await
            .filter(|c| !c.agents.is_empty())
    })
    .await;
    eventually("the StatefulSet", DEADLINE, || async {
        cluster
            .api::<StatefulSet>()
            .get_opt("default")
            .await
            .unwrap()
    })
    .await;
    let template = cluster.template("default").await;

    let patch = serde_json::json!({"spec": {"systemPrompt": "Answer in French."}});
    cluster
        .api::<Agent>()
        .patch("concierge", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let after = eventually("the catalog carries the new prompt", DEADLINE, || async {
        cluster.catalog("default").await.filter(|c| {
            c.agents
                .iter()
                .any(|a| a.spec.system_prompt == "Answer in French.")
        })
    })
    .await;
    assert_ne!(before.revision, after.revision);
    assert_eq!(
        cluster.template("default").await,
        template,
        "the pods would restart"
    );
}

#[tokio::test]
async fn scaling_the_pool_moves_agent_placements() {
    let cluster = Cluster::start().await;
    cluster.create(&pool("default", 2)).await;
    let names: Vec<String> = (0..12).map(|i| format!("agent-{i}")).collect();
    for name in &names {
        cluster.create(&agent(name, "default")).await;
    }
    for name in &names {
        eventually("placed on 2 workers", DEADLINE, || async {
            cluster.agent(name).await.filter(|a| {
                a.status.as_ref().and_then(|s| s.placement.clone())
                    == Some(expected_placement(name, 2))
            })
        })
        .await;
    }

    cluster.scale("default", 3).await;
    // The new worker runs: the catalog places partitions on it.
    cluster.workers_ready("default", 3).await;
    for name in &names {
        eventually("placed on 3 workers", DEADLINE, || async {
            cluster.agent(name).await.filter(|a| {
                a.status.as_ref().and_then(|s| s.placement.clone())
                    == Some(expected_placement(name, 3))
            })
        })
        .await;
    }
    assert!(
        names.iter().any(|n| expected_placement(n, 3).worker == 2),
        "the new worker got no agent; pick more agents"
    );
    let catalog = cluster.catalog("default").await.unwrap();
    assert_eq!(catalog.placement.unwrap().workers, 3);
    let replicas = cluster
        .api::<StatefulSet>()
        .get("default")
        .await
        .unwrap()
        .spec
        .unwrap()
        .replicas;
    assert_eq!(replicas, Some(3));
}

#[tokio::test]
async fn deleting_an_agent_waits_until_the_catalog_drops_it() {
    let cluster = Cluster::start().await;
    cluster.create(&pool("default", 1)).await;
    cluster.create(&agent("concierge", "default")).await;
    cluster.create(&agent("researcher", "default")).await;
    eventually(
        "the finalizer is set and the agent is in the catalog",
        DEADLINE,
        || async {
            let agent = cluster.agent("concierge").await?;
            let listed = cluster
                .catalog("default")
                .await?
                .agents
                .iter()
                .any(|a| a.name == "concierge");
            (listed
                && agent
                    .metadata
                    .finalizers
                    .unwrap_or_default()
                    .contains(&controller::agent::FINALIZER.to_owned()))
            .then_some(())
        },
    )
    .await;

    cluster
        .api::<Agent>()
        .delete("concierge", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the agent is gone", DEADLINE, || async {
        cluster.agent("concierge").await.is_none().then_some(())
    })
    .await;
    let catalog = cluster.catalog("default").await.unwrap();
    let names: Vec<&str> = catalog.agents.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["researcher"]);
}

#[tokio::test]
async fn the_default_pool_is_created_when_the_operator_is_asked_to() {
    let template = pool("default", 1).spec;
    let cluster = Cluster::start_with(Some(DefaultPool {
        spec: template.clone(),
    }))
    .await;
    cluster.create(&agent("concierge", "default")).await;
    let created = eventually("the default pool", DEADLINE, || async {
        cluster
            .api::<WorkerPool>()
            .get_opt("default")
            .await
            .unwrap()
    })
    .await;
    assert_eq!(created.spec, template);
    cluster
        .agent_condition("concierge", condition::SCHEDULED, "True")
        .await;

    // Without the option, an agent of a missing pool is only reported.
    let plain = Cluster::start().await;
    plain.create(&agent("concierge", "default")).await;
    let (_, reason, message) = plain
        .agent_condition("concierge", condition::SCHEDULED, "False")
        .await;
    assert_eq!(reason, "PoolNotFound", "{message}");
    assert!(
        plain
            .api::<WorkerPool>()
            .get_opt("default")
            .await
            .unwrap()
            .is_none()
    );
}

/// An Extension of the test namespace with `spec` (JSON, as a user writes it).
fn extension(name: &str, spec: serde_json::Value) -> Extension {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "nexo.dev/v1alpha1", "kind": "Extension",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec
    }))
    .unwrap()
}

fn extension_condition(extension: &Extension, type_: &str) -> Option<(String, String, String)> {
    let c = extension
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn a_nats_extension_with_an_image_gets_a_deployment_on_its_pools_nats() {
    let cluster = Cluster::start().await;
    let weather = extension(
        "weather",
        serde_json::json!({"nats": {"image": "registry.example/weather:1"}}),
    );
    cluster.create(&weather).await;
    let (_, reason, message) = eventually("the missing pool is reported", DEADLINE, || async {
        let extension = cluster
            .api::<Extension>()
            .get_opt("weather")
            .await
            .unwrap()?;
        extension_condition(&extension, condition::RESOLVED_REFS).filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(reason, "MissingReferences");
    assert!(message.contains("WorkerPool `default`"), "{message}");

    cluster.create(&pool("default", 1)).await;
    let deployment = eventually("the extension's Deployment", DEADLINE, || async {
        cluster
            .api::<Deployment>()
            .get_opt("weather-extension")
            .await
            .unwrap()
    })
    .await;
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/weather:1")
    );
    let env: std::collections::BTreeMap<String, Option<String>> = container
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value))
        .collect();
    assert_eq!(
        env["NEXO_EXTENSION_SUBJECT"].as_deref(),
        Some("ext.team-a.weather.call")
    );
    assert_eq!(
        env["NEXO_NATS_URLS"].as_deref(),
        Some("nats://nats.nats:4222")
    );
    // The pool's NATS token, by reference.
    assert!(env.contains_key("NEXO_NATS_TOKEN") && env["NEXO_NATS_TOKEN"].is_none());
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(pod.automount_service_account_token, Some(false));

    let status = serde_json::json!({"status": {"availableReplicas": 1, "replicas": 1}});
    cluster
        .api::<Deployment>()
        .patch_status(
            "weather-extension",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .unwrap();
    // Available, but no agent uses it: no worker connects it, so it is not ready.
    let (_, reason, _) = eventually("Ready=False: not used", DEADLINE, || async {
        let extension = cluster
            .api::<Extension>()
            .get_opt("weather")
            .await
            .unwrap()?;
        extension_condition(&extension, condition::READY).filter(|c| c.1 == "NotUsed")
    })
    .await;
    assert_eq!(reason, "NotUsed");
}

/// A report of worker 0 on `revision` that lists extension `name` with `tools`.
fn report_listing(revision: &str, name: &str, tools: &[&str]) -> nexo_api::report::CatalogReport {
    nexo_api::report::CatalogReport {
        revision: revision.to_owned(),
        pool: "default".to_owned(),
        extensions: vec![nexo_api::report::ExtensionReport {
            name: format!("{NAMESPACE}/{name}"),
            transport: "http".to_owned(),
            ready: true,
            tools: tools.iter().map(|t| t.to_string()).collect(),
            problem: None,
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn an_extension_is_ready_once_a_worker_lists_its_tools_and_its_agents_follow() {
    let cluster = Cluster::start().await;
    cluster.create(&pool("default", 1)).await;
    let tools = extension(
        "tools",
        serde_json::json!({"http": {"url": "http://tools.example/mcp"}}),
    );
    cluster.create(&tools).await;
    let mut concierge = agent("concierge", "default");
    concierge.spec.extensions = vec![nexo_api::spec::ExtensionUse {
        name: "tools".into(),
        tools: Vec::new(),
    }];
    cluster.create(&concierge).await;
    let mut lost = agent("lost", "default");
    lost.spec.extensions = vec![nexo_api::spec::ExtensionUse {
        name: "nope".into(),
        tools: Vec::new(),
    }];
    cluster.create(&lost).await;

    // The catalog carries the extension the pool's agents use, and only that one.
    let catalog = cluster.catalog_with("default", "lost").await;
    let names: Vec<&str> = catalog.extensions.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["tools"]);

    // No worker lists its tools yet: the extension waits, and so does its agent.
    let (_, reason, message) =
        eventually("the agent waits for its extension", DEADLINE, || async {
            cluster
                .agent("concierge")
                .await
                .and_then(|a| condition_of(&a, condition::RESOLVED_REFS))
                .filter(|c| c.0 == "False")
        })
        .await;
    assert_eq!(reason, "ExtensionNotReady");
    assert!(message.contains("Extension `tools`"), "{message}");
    let agent = cluster.agent("concierge").await.unwrap();
    assert_eq!(
        condition_of(&agent, condition::STALLED).map(|c| c.0),
        Some("False".to_owned()),
        "the cluster may still fix it"
    );
    let (_, reason, message) = eventually("a missing extension is named", DEADLINE, || async {
        cluster
            .agent("lost")
            .await
            .and_then(|a| condition_of(&a, condition::RESOLVED_REFS))
            .filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(reason, "MissingReferences");
    assert!(message.contains("Extension `nope`"), "{message}");

    // A worker connects it and lists its tools.
    cluster.workers.set_report(
        "default",
        0,
        report_listing(&catalog.revision, "tools", &["search", "fetch"]),
    );
    cluster.workers_ready("default", 1).await;
    let status = eventually(
        "the extension is ready with its tools",
        DEADLINE,
        || async {
            let extension = cluster.api::<Extension>().get_opt("tools").await.unwrap()?;
            extension_condition(&extension, condition::READY).filter(|c| c.0 == "True")?;
            extension.status
        },
    )
    .await;
    assert_eq!(status.tools, ["fetch", "search"]);
    assert_eq!(status.ready_workers, 1);
    cluster
        .agent_condition("concierge", condition::RESOLVED_REFS, "True")
        .await;
}

#[tokio::test]
async fn a_pool_reports_a_missing_secret_its_env_reads() {
    let cluster = Cluster::start().await;
    let mut with_env = pool("default", 1);
    with_env.spec.env = vec![
        serde_json::from_value(serde_json::json!({
            "name": "OPENAI_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "llm", "key": "api-key"}}
        }))
        .unwrap(),
    ];
    cluster.create(&with_env).await;
    let message = eventually(
        "ResolvedRefs=False naming the env Secret",
        DEADLINE,
        || async {
            let pool = cluster
                .api::<WorkerPool>()
                .get_opt("default")
                .await
                .unwrap()?;
            let c = pool
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == condition::RESOLVED_REFS && c.status == "False")?;
            Some(c.message)
        },
    )
    .await;
    assert!(
        message.contains("Secret `llm` (key `api-key`)"),
        "{message}"
    );
}

#[tokio::test]
async fn an_agent_its_worker_cannot_run_is_not_ready_until_the_worker_recovers() {
    let cluster = Cluster::start().await;
    cluster.create(&pool("default", 1)).await;
    cluster.create(&agent("concierge", "default")).await;
    let catalog = cluster.catalog_with("default", "concierge").await;
    let problem = nexo_api::report::NotRunning {
        kind: nexo_api::report::ResourceKind::Agent,
        name: format!("{NAMESPACE}/concierge"),
        reason: "API key: environment variable `ANTHROPIC_API_KEY` is not set".into(),
    };
    cluster
        .workers
        .set("default", 0, &catalog.revision, vec![problem.clone()]);
    cluster.workers_ready("default", 1).await;

    let (_, _, message) = eventually("Ready=False from the worker's report", DEADLINE, || async {
        cluster
            .agent("concierge")
            .await
            .and_then(|a| condition_of(&a, condition::READY))
            .filter(|c| c.1 == "WorkerCannotRun")
    })
    .await;
    assert!(message.contains("ANTHROPIC_API_KEY"), "{message}");
    let pool = cluster.api::<WorkerPool>().get("default").await.unwrap();
    assert_eq!(pool.status.unwrap().not_running, vec![problem]);

    // The worker recovers (the key arrived) and nothing in the cluster changes: the
    // pool controller asks its workers again soon while one reports a problem, and
    // the agent follows its pool's status, well before the periodic resync.
    cluster
        .workers
        .set("default", 0, &catalog.revision, Vec::new());
    let soon = controller::pool::WORKER_RECHECK * 2 + Duration::from_secs(2);
    cluster
        .agent_condition_within("concierge", condition::READY, "True", soon)
        .await;
    // The applied status no longer has the list at all (not a stale copy of it).
    let stored = cluster
        .server
        .object("nexo.dev/workerpools", NAMESPACE, "default")
        .unwrap();
    assert!(
        stored["status"].get("notRunning").is_none(),
        "{}",
        stored["status"]
    );
}

#[tokio::test]
async fn an_agent_over_its_budget_says_so_in_its_status_until_its_worker_answers_again() {
    let cluster = Cluster::start().await;
    cluster.create(&pool("default", 1)).await;
    let mut concierge = agent("concierge", "default");
    concierge.spec.budget = Some(nexo_api::spec::BudgetSpec {
        tokens_per_day: Some(1000),
        cost_per_day: None,
    });
    cluster.create(&concierge).await;
    let catalog = cluster.catalog_with("default", "concierge").await;
    let report = |over_budget| nexo_api::report::CatalogReport {
        revision: catalog.revision.clone(),
        pool: "default".to_owned(),
        over_budget,
        ..Default::default()
    };
    cluster.workers.set_report(
        "default",
        0,
        report(vec![nexo_api::report::OverBudget {
            agent: format!("{NAMESPACE}/concierge"),
            day: "2026-12-01".to_owned(),
            tokens: 1012,
            cost: 0.0,
            limit: "tokensPerDay".to_owned(),
        }]),
    );
    cluster.workers_ready("default", 1).await;
    let (_, reason, message) = cluster
        .agent_condition("concierge", condition::BUDGET_EXCEEDED, "True")
        .await;
    assert_eq!(reason, "DailyBudgetSpent");
    assert!(
        message.contains("tokensPerDay reached on 2026-12-01 (UTC): 1012 tokens"),
        "{message}"
    );
    let pool = cluster.api::<WorkerPool>().get("default").await.unwrap();
    assert_eq!(pool.status.unwrap().over_budget.len(), 1);

    // A new day: the worker no longer lists it.
    cluster.workers.set_report("default", 0, report(Vec::new()));
    let (_, reason, _) = cluster
        .agent_condition("concierge", condition::BUDGET_EXCEEDED, "False")
        .await;
    assert_eq!(reason, "WithinBudget");
}

/// The value of an unlabelled gauge or counter in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let mut parts = line.split_whitespace();
            (parts.next()? == name).then(|| parts.next()?.parse().ok())?
        })
}

#[tokio::test]
async fn a_failing_object_that_is_deleted_leaves_no_retry_behind() {
    let cluster = Cluster::start().await;
    cluster.server.fail_status_writes("nexo.dev/channels");
    cluster.create(&channel("web", "concierge")).await;
    let retrying = || metric(&cluster.metrics.render(), "nexo_operator_retrying_objects");
    eventually("the channel waits for a retry", DEADLINE, || async {
        (retrying() == Some(1.0)).then_some(())
    })
    .await;

    cluster
        .api::<Channel>()
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    eventually("its retry is forgotten", DEADLINE, || async {
        (retrying() == Some(0.0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn reconciles_read_the_caches_instead_of_listing_and_getting() {
    let cluster = Cluster::start().await;
    cluster.create(&pool("default", 1)).await;
    let mut concierge = agent("concierge", "default");
    concierge.spec.delegates = vec!["researcher".into()];
    cluster.create(&concierge).await;
    cluster.create(&agent("researcher", "default")).await;
    cluster.create(&channel("web", "concierge")).await;
    eventually(
        "the catalog lists the agents and the channel",
        DEADLINE,
        || async {
            cluster
                .catalog("default")
                .await
                .filter(|c| c.agents.len() == 2 && c.channels.len() == 1)
        },
    )
    .await;
    cluster
        .agent_condition("concierge", condition::RESOLVED_REFS, "True")
        .await;
    let lists = |cluster: &Cluster| {
        cluster
            .server
            .operator_requests()
            .into_iter()
            .filter(|r| r.verb == "list")
            .count()
    };
    let listed = lists(&cluster);

    // Reconcile every controller again: the pool, both agents and the channel.
    let patch = serde_json::json!({"spec": {"systemPrompt": "Answer in French."}});
    cluster
        .api::<Agent>()
        .patch("concierge", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually("the catalog carries the new prompt", DEADLINE, || async {
        cluster.catalog("default").await.filter(|c| {
            c.agents
                .iter()
                .any(|a| a.spec.system_prompt == "Answer in French.")
        })
    })
    .await;
    eventually("the agent's status follows", DEADLINE, || async {
        let agent = cluster.agent("concierge").await?;
        (agent.status?.observed_generation == agent.metadata.generation).then_some(())
    })
    .await;

    assert_eq!(lists(&cluster), listed, "a reconcile listed");
    let reads: Vec<_> = cluster
        .server
        .operator_requests()
        .into_iter()
        .filter(|r| r.verb == "get" && r.collection.starts_with("nexo.dev/"))
        .collect();
    assert!(reads.is_empty(), "reconciles read nexo objects: {reads:?}");
}

/// Whether `object`'s status was written by a server-side apply of the operator.
fn status_applied_by_operator(object: &serde_json::Value) -> bool {
    object["metadata"]["managedFields"]
        .as_array()
        .is_some_and(|entries| {
            entries.iter().any(|e| {
                e["manager"] == controller::FIELD_MANAGER
                    && e["operation"] == "Apply"
                    && e["subresource"] == "status"
                    && e["fieldsV1"]["f:status"].is_object()
            })
        })
}

#[tokio::test]
async fn every_status_is_server_side_applied_by_the_operator() {
    let cluster = Cluster::start().await;
    cluster.create(&pool("default", 1)).await;
    cluster.create(&agent("concierge", "default")).await;
    cluster.create(&channel("web", "concierge")).await;
    let tools = extension(
        "tools",
        serde_json::json!({"http": {"url": "http://tools.example"}}),
    );
    cluster.create(&tools).await;
    for (collection, name) in [
        ("nexo.dev/workerpools", "default"),
        ("nexo.dev/agents", "concierge"),
        ("nexo.dev/channels", "web"),
        ("nexo.dev/extensions", "tools"),
    ] {
        eventually(&format!("{collection} {name}"), DEADLINE, || async {
            let object = cluster.server.object(collection, NAMESPACE, name)?;
            status_applied_by_operator(&object).then_some(())
        })
        .await;
    }
}

/// The partitions worker `ordinal` owns among `workers` (64 partitions).
fn partitions_of(ordinal: u32, workers: u32) -> Vec<u32> {
    let map = PartitionMap::new(64, workers);
    (0..64).filter(|&p| map.worker(p) == ordinal).collect()
}

/// A pool of `replicas` workers whose every worker runs and holds its partitions, once
/// the operator recorded it settled.
async fn settled_pool(cluster: &Cluster, replicas: u32) -> Catalog {
    // The pool's own Secrets exist: nothing but the scale keeps it from `Ready`.
    cluster.secret("nats", "token", b"t").await;
    cluster.secret("nexo-admin", "token", b"a").await;
    cluster.create(&pool("default", replicas as i32)).await;
    let catalog = eventually("the catalog", DEADLINE, || async {
        cluster.catalog("default").await
    })
    .await;
    for ordinal in 0..replicas {
        let held = partitions_of(ordinal, replicas);
        cluster
            .workers
            .owning("default", ordinal, &catalog.revision, &held, &[], &[]);
    }
    cluster.workers_ready("default", replicas as i32).await;
    cluster
        .pool_status("default", "the pool settled and ready", |s| {
            s.placement_workers == Some(replicas)
                && s.hand_off.is_none()
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == condition::READY && c.status == "True")
        })
        .await;
    catalog
}

fn placement_workers(catalog: &Catalog) -> u32 {
    catalog.placement.as_ref().unwrap().workers
}

#[tokio::test]
async fn scaling_down_keeps_the_pod_until_its_worker_holds_nothing() {
    let cluster = Cluster::start().await;
    settled_pool(&cluster, 4).await;

    cluster.scale("default", 3).await;
    let status = cluster
        .pool_status("default", "a hand-off waiting for worker 3", |s| {
            s.hand_off.as_ref().is_some_and(|h| h.waiting_for == [3])
        })
        .await;
    // The catalog moved first; the pod stays while worker 3 holds partitions.
    let moving = cluster.catalog("default").await.unwrap();
    assert_eq!(placement_workers(&moving), 3);
    assert_eq!(status.placement_workers, Some(3));
    assert_eq!(cluster.replicas("default").await, Some(4));
    let hand_off = status.hand_off.clone().unwrap();
    assert_eq!((hand_off.from, hand_off.to), (4, 3));
    assert!(hand_off.deadline.is_some(), "{hand_off:?}");
    let reconciling = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::RECONCILING)
        .unwrap();
    assert_eq!(
        (reconciling.status.as_str(), reconciling.reason.as_str()),
        ("True", "HandingOff"),
        "{reconciling:?}"
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Scaling")
    );
    assert!(
        ready
            .message
            .contains("waiting for workers 3 to hand their partitions off"),
        "{}",
        ready.message
    );

    // Mid-move: worker 3 releases what worker 2 acquires. The status shows who holds
    // what and what moves, and a later look still keeps the pod.
    let leaving = partitions_of(3, 4);
    let moved_to_2: Vec<u32> = leaving
        .iter()
        .copied()
        .filter(|&p| PartitionMap::new(64, 3).worker(p) == 2)
        .collect();
    assert!(!moved_to_2.is_empty());
    cluster
        .workers
        .owning("default", 3, &moving.revision, &leaving, &[], &leaving);
    cluster.workers.owning(
        "default",
        2,
        &moving.revision,
        &partitions_of(2, 4),
        &moved_to_2,
        &[],
    );
    let status = cluster
        .pool_status("default", "ownership in the status", |s| {
            s.ownership
                .iter()
                .any(|w| w.worker == 3 && w.releasing == leaving)
        })
        .await;
    let by_worker: std::collections::BTreeMap<u32, _> =
        status.ownership.iter().map(|w| (w.worker, w)).collect();
    assert_eq!(by_worker.len(), 4, "{:?}", status.ownership);
    assert_eq!(by_worker[&3].held, leaving.len() as u32);
    assert_eq!(by_worker[&2].acquiring, moved_to_2);
    assert_eq!(by_worker[&0].held, partitions_of(0, 4).len() as u32);
    assert_eq!(cluster.replicas("default").await, Some(4));

    // Worker 3 let go of everything: now the pod goes.
    cluster
        .workers
        .owning("default", 3, &moving.revision, &[], &[], &[]);
    eventually("the StatefulSet scaled to 3", DEADLINE, || async {
        (cluster.replicas("default").await == Some(3)).then_some(())
    })
    .await;
    cluster
        .pool_status("default", "the hand-off is over", |s| {
            s.hand_off.is_none() && s.placement_workers == Some(3)
        })
        .await;
}

#[tokio::test]
async fn a_scale_down_removes_the_pod_at_its_deadline_even_across_an_operator_restart() {
    let mut cluster = Cluster::start().await;
    settled_pool(&cluster, 2).await;

    // Worker 1 cannot be asked any more: it is waited for, until the deadline.
    cluster.workers.silence("default", 1);
    cluster.scale("default", 1).await;
    let status = cluster
        .pool_status("default", "a hand-off waiting for worker 1", |s| {
            s.hand_off.as_ref().is_some_and(|h| h.waiting_for == [1])
        })
        .await;
    assert_eq!(cluster.replicas("default").await, Some(2));
    let hand_off = status.hand_off.unwrap();
    let deadline = hand_off.deadline.clone().unwrap();
    let grace = nexo_operator::scale::hand_off_deadline(&pool("default", 1));
    assert_eq!(
        deadline.0.duration_since(hand_off.started_at.0).as_secs(),
        grace.as_secs() as i64
    );

    // While the operator is down, the scale's start moves back past its deadline (as
    // if that much time went by): the next operator reads it from the status.
    cluster.stop_operator().await;
    assert_eq!(cluster.replicas("default").await, Some(2));
    let long_ago = serde_json::json!({"status": {"handOff": {
        "startedAt": "2026-01-01T00:00:00Z",
        "deadline": "2026-01-01T00:02:00Z",
    }}});
    cluster
        .api::<WorkerPool>()
        .patch_status("default", &PatchParams::default(), &Patch::Merge(&long_ago))
        .await
        .unwrap();
    cluster.start_operator();
    eventually("the StatefulSet scaled to 1", DEADLINE, || async {
        (cluster.replicas("default").await == Some(1)).then_some(())
    })
    .await;
    cluster
        .pool_status("default", "the hand-off is over", |s| s.hand_off.is_none())
        .await;
}

#[tokio::test]
async fn scaling_up_places_partitions_on_the_new_worker_only_once_it_answers() {
    let cluster = Cluster::start().await;
    let catalog = settled_pool(&cluster, 2).await;

    cluster.scale("default", 3).await;
    let status = cluster
        .pool_status("default", "a hand-off waiting for worker 2", |s| {
            s.hand_off.as_ref().is_some_and(|h| h.waiting_for == [2])
        })
        .await;
    // The pod first; the catalog stays until it runs.
    assert_eq!(cluster.replicas("default").await, Some(3));
    assert_eq!(status.placement_workers, Some(2));
    let waiting = cluster.catalog("default").await.unwrap();
    assert_eq!(placement_workers(&waiting), 2);
    assert_eq!(status.hand_off.unwrap().deadline, None);

    // The new worker answers (and has nothing to run yet): partitions move to it.
    cluster
        .workers
        .owning("default", 2, &catalog.revision, &[], &[], &[]);
    eventually("the catalog places on 3 workers", DEADLINE, || async {
        cluster
            .catalog("default")
            .await
            .filter(|c| placement_workers(c) == 3)
    })
    .await;
    cluster
        .pool_status("default", "the hand-off is over", |s| {
            s.hand_off.is_none() && s.placement_workers == Some(3)
        })
        .await;
}
