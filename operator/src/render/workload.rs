//! The pods of a pool: the worker config, the StatefulSet, its Services and its
//! PodDisruptionBudget. Only pool-level settings flow in here, so agent and channel
//! changes never alter the pod template; the hash of the worker config in a pod
//! annotation rolls the pods when a pool-level setting does change.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, Lifecycle, LifecycleHandler, LocalObjectReference, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe, Service,
    ServicePort, ServiceSpec, SleepAction, Volume, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use nexo_api::config::{
    AdminSettings, BrokerSettings, HttpSettings, NatsSettings, NatsTls, WorkerSettings,
};
use nexo_api::crd::{Extension, WorkerPool};
use nexo_api::spec::{SecretKeySelector, SecretRef};
use xxhash_rust::xxh3::xxh3_64;

use super::catalog::{EXTENSIONS_DIR, copied_program};
use super::names;
use super::pod::{
    self, ENV_NATS_NKEY_SEED, ENV_NATS_PASSWORD, ENV_NATS_TOKEN, NATS_CREDS_DIR, NATS_TLS_DIR,
    NatsAccess, mount, secret_env, secret_volume,
};

/// Port of the worker's HTTP server (probes, metrics, webhooks, web chat).
pub const HTTP_PORT: i32 = 8080;

const CONFIG_DIR: &str = "/etc/nexo/config";
const CATALOG_DIR: &str = "/etc/nexo/catalog";
const DATA_DIR: &str = "/var/lib/nexo";
const SECRETS_DIR: &str = "/var/run/nexo/secrets";

/// File names inside the mounted ConfigMaps.
pub const WORKER_CONFIG_FILE: &str = "worker.yaml";
pub const CATALOG_FILE: &str = "catalog.yaml";

/// Environment variables the pod template fills from Secrets.
const ENV_ADMIN_TOKEN: &str = "NEXO_ADMIN_TOKEN";

/// Pod annotation holding the hash of the worker config: it changes (and the pods
/// roll) only with pool-level settings.
pub const CONFIG_HASH_ANNOTATION: &str = "nexo.dev/config-hash";

/// The `worker:` block of every worker of the pool, as YAML.
pub fn worker_config(pool: &WorkerPool) -> String {
    let nats = &pool.spec.nats;
    let settings = WorkerSettings {
        data_dir: DATA_DIR.into(),
        http: HttpSettings {
            listen: ([0, 0, 0, 0], HTTP_PORT as u16).into(),
        },
        broker: BrokerSettings::Nats(NatsSettings {
            urls: nats.urls.clone(),
            user: nats.user.as_ref().map(|u| u.name.clone()),
            password: nats
                .user
                .as_ref()
                .map(|_| SecretRef::env(ENV_NATS_PASSWORD)),
            token: nats.token.as_ref().map(|_| SecretRef::env(ENV_NATS_TOKEN)),
            nkey_seed: nats
                .nkey_seed
                .as_ref()
                .map(|_| SecretRef::env(ENV_NATS_NKEY_SEED)),
            credentials_file: nats
                .credentials
                .as_ref()
                .map(|c| format!("{NATS_CREDS_DIR}/{}", c.key).into()),
            tls: nats.tls.as_ref().map(|tls| NatsTls {
                ca_file: Some(format!("{NATS_TLS_DIR}/ca.crt").into()),
                cert_file: tls
                    .client_certificate
                    .then(|| format!("{NATS_TLS_DIR}/tls.crt").into()),
                key_file: tls
                    .client_certificate
                    .then(|| format!("{NATS_TLS_DIR}/tls.key").into()),
            }),
            ..NatsSettings::default()
        }),
        drain_timeout_seconds: pool.spec.drain_timeout_seconds,
        admin: AdminSettings {
            token_env: ENV_ADMIN_TOKEN.to_owned(),
        },
        pool: pool.name_any(),
        catalog_file: Some(format!("{CATALOG_DIR}/{CATALOG_FILE}").into()),
        secrets_dir: SECRETS_DIR.into(),
        models: pool.spec.models.clone().unwrap_or_default(),
        ..WorkerSettings::default()
    };
    #[derive(serde::Serialize)]
    struct Document<'a> {
        worker: &'a WorkerSettings,
    }
    serde_saphyr::to_string(&Document { worker: &settings }).expect("worker settings serialize")
}

/// Hash of the worker config, for the pod template annotation.
pub fn config_hash(worker_config: &str) -> String {
    format!("{:016x}", xxh3_64(worker_config.as_bytes()))
}

/// Seconds a stopping worker pod waits (`preStop` sleep) before it gets SIGTERM and
/// stops taking messages: time for the endpoints controller to take it out of the
/// pool's Service and for kube-proxy and ingresses to follow, so new requests go to
/// the other workers instead of meeting a `503`.
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;

/// Seconds a worker needs after its drain (`drainTimeoutSeconds`) to stop: snapshot the
/// memory of the agents it hands off and release their leases, flush the outbox (2 s),
/// close channels and HTTP (2 s), with room for a slow object store.
pub const SHUTDOWN_MARGIN_SECONDS: i64 = 30;

/// The pod's `terminationGracePeriodSeconds`: the `preStop` sleep, the drain and what
/// follows it. The kubelet kills the container once it has passed.
pub fn termination_grace_seconds(pool: &WorkerPool) -> i64 {
    let drain = i64::try_from(pool.spec.drain_timeout_seconds).unwrap_or(i64::MAX);
    PRE_STOP_SLEEP_SECONDS
        .saturating_add(drain)
        .saturating_add(SHUTDOWN_MARGIN_SECONDS)
}

/// Volume the programs of stdio extensions are copied into.
const EXTENSIONS_VOLUME: &str = "extensions";

/// One init container per stdio extension that comes as an image: it copies the
/// program out of that image into a volume the worker mounts read-only, where the
/// catalog names it ([`copied_program`]). The copy runs the image's own `cp`, under
/// the pool's security context. See docs/adr/0011-extensions-in-pools.md.
fn extension_copies(pool: &WorkerPool, extensions: &[&Extension]) -> Vec<Container> {
    extensions
        .iter()
        .filter_map(|extension| {
            let stdio = extension.spec.stdio.as_ref()?;
            let image = stdio.image.clone()?;
            let name = extension.name_any();
            Some(Container {
                name: names::derived(&name, "extension"),
                image: Some(image),
                image_pull_policy: pool.spec.image_pull_policy.clone(),
                command: Some(vec![
                    "cp".into(),
                    stdio.command.clone(),
                    copied_program(&name),
                ]),
                resources: Some(pod::default_resources()),
                security_context: Some(pod::container_security()),
                volume_mounts: Some(vec![mount(EXTENSIONS_VOLUME, EXTENSIONS_DIR, false)]),
                ..Container::default()
            })
        })
        .collect()
}

/// The worker StatefulSet with `replicas` pods. Pod `<pool>-<i>` runs shard `i`; the
/// shard count comes from the catalog, so scaling rewrites the catalog and never the
/// template.
pub fn stateful_set(
    pool: &WorkerPool,
    replicas: u32,
    meta: ObjectMeta,
    config_hash: &str,
    extensions: &[&Extension],
) -> StatefulSet {
    let name = pool.name_any();
    let labels = names::selector_labels(&name);
    let spec = &pool.spec;
    let mut volumes = vec![
        config_map_volume("config", &names::worker_config(&name)),
        config_map_volume("catalog", &names::catalog(&name)),
        secret_volume("secrets", &names::secrets(&name)),
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        mount("config", CONFIG_DIR, true),
        mount("catalog", CATALOG_DIR, true),
        mount("secrets", SECRETS_DIR, true),
        mount("tmp", "/tmp", false),
        mount("data", DATA_DIR, false),
    ];
    if spec.storage.is_none() {
        volumes.push(Volume {
            name: "data".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
    }
    let nats = NatsAccess::for_pool(&spec.nats);
    volumes.extend(nats.volumes);
    mounts.extend(nats.mounts);
    let copies = extension_copies(pool, extensions);
    if !copies.is_empty() {
        volumes.push(Volume {
            name: EXTENSIONS_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
        mounts.push(mount(EXTENSIONS_VOLUME, EXTENSIONS_DIR, true));
    }

    let mut env = spec.env.clone();
    env.push(EnvVar {
        name: "NEXO_SHARD".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.labels['apps.kubernetes.io/pod-index']".into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    });
    env.extend(nats.env);
    if let Some(secret) = &spec.admin_token_secret {
        env.push(secret_env(
            ENV_ADMIN_TOKEN,
            &SecretKeySelector {
                name: secret.clone(),
                key: "token".into(),
            },
        ));
    }

    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    };
    let container = Container {
        name: "worker".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        args: Some(vec![
            "run".into(),
            "--config".into(),
            format!("{CONFIG_DIR}/{WORKER_CONFIG_FILE}"),
            "--log-format".into(),
            "json".into(),
        ]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: HTTP_PORT,
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe("/readyz", 5)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SLEEP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: Some(
            spec.resources
                .clone()
                .unwrap_or_else(pod::default_resources),
        ),
        security_context: Some(pod::container_security()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };

    let mut annotations = BTreeMap::new();
    annotations.insert(CONFIG_HASH_ANNOTATION.to_owned(), config_hash.to_owned());
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(names::labels(&name)),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            init_containers: (!copies.is_empty()).then_some(copies),
            containers: vec![container],
            // Workers never talk to the Kubernetes API.
            automount_service_account_token: Some(false),
            image_pull_secrets: (!spec.image_pull_secrets.is_empty()).then(|| {
                spec.image_pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect()
            }),
            enable_service_links: Some(false),
            security_context: Some(pod::pod_security()),
            termination_grace_period_seconds: Some(termination_grace_seconds(pool)),
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
    };

    StatefulSet {
        metadata: meta,
        spec: Some(StatefulSetSpec {
            replicas: Some(i32::try_from(replicas).unwrap_or(i32::MAX)),
            service_name: Some(names::headless_service(&name)),
            // Workers are independent: start and stop them all at once.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(labels),
                ..LabelSelector::default()
            },
            template,
            volume_claim_templates: spec.storage.as_ref().map(|storage| {
                vec![PersistentVolumeClaim {
                    metadata: ObjectMeta {
                        name: Some("data".into()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(PersistentVolumeClaimSpec {
                        access_modes: Some(vec!["ReadWriteOnce".into()]),
                        storage_class_name: storage.storage_class_name.clone(),
                        resources: Some(VolumeResourceRequirements {
                            requests: Some(BTreeMap::from([(
                                "storage".to_owned(),
                                storage.size.clone(),
                            )])),
                            ..VolumeResourceRequirements::default()
                        }),
                        ..PersistentVolumeClaimSpec::default()
                    }),
                    ..PersistentVolumeClaim::default()
                }]
            }),
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

/// The headless Service that gives each worker pod a stable DNS name, ready or not.
pub fn headless_service(pool: &WorkerPool, meta: ObjectMeta) -> Service {
    service(pool, meta, true)
}

/// The Service in front of every worker of the pool: webhooks and the web chat.
pub fn http_service(pool: &WorkerPool, meta: ObjectMeta) -> Service {
    service(pool, meta, false)
}

fn service(pool: &WorkerPool, meta: ObjectMeta, headless: bool) -> Service {
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            cluster_ip: headless.then(|| "None".to_owned()),
            // Workers get DNS names before they are ready: the operator asks a worker
            // that is not ready what it cannot run (`GET /catalog`), which is when that
            // report matters. The Service in front of the pool only routes to ready ones.
            publish_not_ready_addresses: headless.then_some(true),
            // Keeps a client on one worker, so `GET` of an asynchronous webhook answer
            // usually reaches the worker that holds it (answers are kept per worker).
            session_affinity: (!headless).then(|| "ClientIP".to_owned()),
            selector: Some(names::selector_labels(&pool.name_any())),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: if headless { HTTP_PORT } else { 80 },
                target_port: Some(IntOrString::String("http".into())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// At most one worker of the pool down for voluntary disruptions (node drains): its
/// agents wait in their durable consumers until it is back.
pub fn disruption_budget(pool: &WorkerPool, meta: ObjectMeta) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(names::selector_labels(&pool.name_any())),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

fn config_map_volume(name: &str, config_map: &str) -> Volume {
    Volume {
        name: name.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map.into(),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }
}
