//! End-to-end against a real cluster (kind, k3d, …). The tests are `#[ignore]`d, so a
//! plain `cargo test` lists them as ignored; run them with `NEXO_E2E_KUBECONFIG` set
//! to a kubeconfig file and `--ignored` (they fail without the variable). See
//! docs/operator.md ("Testing against a real cluster") for the steps.
//!
//! The controllers run in this process against the cluster's API server; no worker
//! image is needed, because the tests check what the operator and the API server do
//! (CRD validation, rendered objects, status), not the pods.

mod fixtures;
mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use nexo_api::crd::{Agent, Channel, WorkerPool, condition};
use nexo_operator::controller::{self, Context, Scope};
use nexo_operator::crds;
use nexo_operator::metrics::Metrics;
use support::eventually;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

/// The cluster `NEXO_E2E_KUBECONFIG` names. Asked for a run of the ignored tests,
/// its absence is a failure, not a pass.
async fn cluster() -> Client {
    let path = std::env::var_os("NEXO_E2E_KUBECONFIG").expect(
        "NEXO_E2E_KUBECONFIG must name a kubeconfig file for the end-to-end tests (see docs/operator.md)",
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig =
        Kubeconfig::read_from(&path).expect("NEXO_E2E_KUBECONFIG is a kubeconfig file");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable");
    Client::try_from(config).expect("client builds")
}

/// `result` is the API server's refusal of an invalid object (422 `Invalid`) with a
/// cause at `field` whose message contains `says` (a CEL rule's message, the refused
/// value).
fn assert_refused<T: std::fmt::Debug>(result: Result<T, kube::Error>, field: &str, says: &str) {
    let status = match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected the API server to refuse {field} ({says}), got {other:?}"),
    };
    assert_eq!(
        (status.code, status.reason.as_str()),
        (422, "Invalid"),
        "{status:?}"
    );
    let causes = status
        .details
        .as_ref()
        .map(|d| d.causes.as_slice())
        .unwrap_or_default();
    assert!(
        causes
            .iter()
            .any(|cause| cause.field == field && cause.message.contains(says)),
        "no cause at {field} saying {says:?}: {status:?}"
    );
}

#[tokio::test]
#[ignore = "needs a cluster: set NEXO_E2E_KUBECONFIG and run with --ignored"]
async fn operator_reconciles_a_pool_on_a_real_cluster() {
    let client = cluster().await;
    let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds::all() {
        let name = crd.metadata.name.clone().unwrap();
        crd_api
            .patch(
                &name,
                &PatchParams::apply("nexo-e2e").force(),
                &Patch::Apply(&crd),
            )
            .await
            .expect("CRD applies");
    }
    // Established CRDs serve their kinds.
    eventually("CRDs established", DEADLINE, || async {
        Api::<WorkerPool>::all(client.clone())
            .list(&Default::default())
            .await
            .ok()
    })
    .await;

    let namespace = format!("nexo-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(namespace.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");

    let stop = CancellationToken::new();
    let probe = Arc::new(nexo_operator::probe::HttpProbe::default());
    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(Metrics::new()),
        None,
        probe,
    ));
    let scope = Scope {
        namespace: Some(namespace.clone()),
    };
    tokio::spawn(controller::run::<controller::pool::Pools>(
        ctx.clone(),
        scope.clone(),
        stop.clone().cancelled_owned(),
    ));
    tokio::spawn(controller::run::<controller::agent::Agents>(
        ctx,
        scope,
        stop.clone().cancelled_owned(),
    ));

    let result = async {
        let pools: Api<WorkerPool> = Api::namespaced(client.clone(), &namespace);
        let agents: Api<Agent> = Api::namespaced(client.clone(), &namespace);
        let channels: Api<Channel> = Api::namespaced(client.clone(), &namespace);
        let strip = |mut meta: kube::api::ObjectMeta| {
            meta.namespace = None;
            meta.uid = None;
            meta.generation = None;
            meta
        };
        let mut pool = fixtures::pool("default", 2);
        pool.metadata = strip(pool.metadata);
        pool.spec.nats.token = None;
        pool.spec.admin_token_secret = None;
        pools
            .create(&PostParams::default(), &pool)
            .await
            .expect("pool");
        let mut agent = fixtures::agent("concierge", "default");
        agent.metadata = strip(agent.metadata);
        agents
            .create(&PostParams::default(), &agent)
            .await
            .expect("agent");

        // The API server enforces the CRDs' CEL rules.
        let mut both = fixtures::channel("both", "concierge");
        both.metadata = strip(both.metadata);
        both.spec.webchat = Some(Default::default());
        assert_refused(
            channels.create(&PostParams::default(), &both).await,
            "spec",
            "exactly one of webchat, webhook, telegram, whatsapp or slack must be set",
        );
        // And the schema's patterns and lengths: a size that is no quantity, a name
        // too long for the pool's StatefulSet.
        let mut lots = fixtures::pool("lots", 1);
        lots.metadata = strip(lots.metadata);
        lots.spec.nats.token = None;
        lots.spec.admin_token_secret = None;
        lots.spec.storage = Some(nexo_api::crd::PoolStorage {
            size: Quantity("lots".into()),
            storage_class_name: None,
        });
        assert_refused(
            pools.create(&PostParams::default(), &lots).await,
            "spec.storage.size",
            "\"lots\"",
        );
        let long_name = "p".repeat(nexo_operator::render::names::MAX_POOL_NAME + 1);
        let mut long = fixtures::pool(&long_name, 1);
        long.metadata = strip(long.metadata);
        long.spec.nats.token = None;
        long.spec.admin_token_secret = None;
        assert_refused(
            pools.create(&PostParams::default(), &long).await,
            "metadata.name",
            "",
        );

        let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
        eventually("the StatefulSet", DEADLINE, || async {
            sts.get_opt("default").await.ok().flatten()
        })
        .await;
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
        eventually("the catalog", DEADLINE, || async {
            config_maps.get_opt("default-catalog").await.ok().flatten()
        })
        .await;
        eventually("the agent is scheduled", DEADLINE, || async {
            agents
                .get_opt("concierge")
                .await
                .ok()
                .flatten()
                .filter(|a| {
                    a.status.as_ref().is_some_and(|s| {
                        s.placement.is_some()
                            && s.conditions
                                .iter()
                                .any(|c| c.type_ == condition::SCHEDULED && c.status == "True")
                    })
                })
        })
        .await;
        let immutable = serde_json::json!({"spec": {"partitions": 32}});
        let changed = pools
            .patch(
                "default",
                &PatchParams::default(),
                &Patch::Merge(&immutable),
            )
            .await;
        assert_refused(
            changed,
            "spec.partitions",
            "partitions cannot be changed; create a new pool instead",
        );

        // Delete the agent while the controllers run, so its finalizer completes and
        // the namespace can go.
        agents
            .delete("concierge", &DeleteParams::default())
            .await
            .expect("delete");
        eventually("the agent is gone", DEADLINE, || async {
            agents
                .get_opt("concierge")
                .await
                .ok()
                .flatten()
                .is_none()
                .then_some(())
        })
        .await;
    }
    .await;
    stop.cancel();
    let _ = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await;
    result
}
