//! The pure core: desired objects of a pool for given specs. Golden files hold the
//! full rendering (`NEXO_UPDATE_GOLDEN=1 cargo test -p nexo-operator --test render`
//! rewrites them after an intended change); the other tests pin the rules that
//! matter for operating a pool.

mod fixtures;
mod k8s_names;

use std::path::Path;

use fixtures::{agent, channel, pool, secret_key};
use k8s_names::{assert_dns_label, assert_label_value, label_values};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use nexo_api::spec::SecretRef;
use nexo_operator::render::{
    self, PoolInputs, PoolObjects, SecretValues, Workers, names, workload,
};

fn render(
    pool: &nexo_api::crd::WorkerPool,
    agents: &[nexo_api::crd::Agent],
    channels: &[nexo_api::crd::Channel],
    secrets: &SecretValues,
) -> PoolObjects {
    render::pool(PoolInputs {
        pool,
        agents,
        channels,
        extensions: &[],
        secrets,
        workers: Workers::settled(pool),
    })
}

fn template(objects: &PoolObjects) -> PodTemplateSpec {
    objects.stateful_set.spec.clone().unwrap().template
}

fn sample() -> (
    nexo_api::crd::WorkerPool,
    Vec<nexo_api::crd::Agent>,
    Vec<nexo_api::crd::Channel>,
    SecretValues,
) {
    let mut concierge = agent("concierge", "default");
    concierge.spec.model.api_key = Some(SecretRef::secret_key("llm", "api-key"));
    concierge.spec.delegates = vec!["researcher".into()];
    let agents = vec![
        concierge,
        agent("researcher", "default"),
        agent("elsewhere", "other"),
    ];
    let channels = vec![
        channel("web", "concierge"),
        channel("other-web", "elsewhere"),
    ];
    let secrets = SecretValues::from([(secret_key("llm", "api-key"), b"sk-1".to_vec())]);
    (pool("default", 2), agents, channels, secrets)
}

#[test]
fn pool_objects_match_the_golden_file() {
    let (pool, agents, channels, secrets) = sample();
    let objects = render(&pool, &agents, &channels, &secrets);
    let documents = [
        serde_saphyr::to_string(&objects.catalog_config_map).unwrap(),
        serde_saphyr::to_string(&objects.worker_config_map).unwrap(),
        serde_saphyr::to_string(&objects.secrets).unwrap(),
        serde_saphyr::to_string(&objects.stateful_set).unwrap(),
        serde_saphyr::to_string(&objects.headless_service).unwrap(),
        serde_saphyr::to_string(&objects.http_service).unwrap(),
        serde_saphyr::to_string(&objects.disruption_budget).unwrap(),
    ]
    .join("---\n");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/pool.yaml");
    if std::env::var_os("NEXO_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &documents).unwrap();
    }
    let golden = std::fs::read_to_string(&path)
        .expect("golden file exists (NEXO_UPDATE_GOLDEN=1 writes it)");
    assert!(
        golden == documents,
        "rendering differs from {}:\n{documents}",
        path.display()
    );
}

#[test]
fn a_pool_hosts_its_own_agents_and_their_channels() {
    let (pool, mut agents, channels, secrets) = sample();
    let objects = render(&pool, &agents, &channels, &secrets);
    let names: Vec<&str> = objects
        .catalog
        .agents
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(names, ["concierge", "researcher"]);
    let channel_names: Vec<&str> = objects
        .catalog
        .channels
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(channel_names, ["web"]);
    assert_eq!(objects.agent_count(), 2);

    // An agent being deleted leaves the catalog (its finalizer waits for that).
    agents[1].metadata.deletion_timestamp = Some(fixtures::time());
    let objects = render(&pool, &agents, &channels, &secrets);
    let names: Vec<&str> = objects
        .catalog
        .agents
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(names, ["concierge"]);
}

#[test]
fn agent_changes_rewrite_the_catalog_but_never_the_pod_template() {
    let (pool, agents, channels, secrets) = sample();
    let before = render(&pool, &agents, &channels, &secrets);

    let mut changed = agents.clone();
    changed[0].spec.system_prompt = "Be terse.".into();
    changed.push(agent("newcomer", "default"));
    let after = render(&pool, &changed, &channels, &secrets);
    assert_ne!(before.catalog.revision, after.catalog.revision);
    assert_ne!(before.catalog_config_map, after.catalog_config_map);
    assert_eq!(
        template(&before),
        template(&after),
        "an agent change would restart the pool"
    );
    assert_eq!(before.worker_config_map, after.worker_config_map);
}

#[test]
fn a_rotated_secret_reaches_the_workers_without_a_restart() {
    let (pool, agents, channels, secrets) = sample();
    let before = render(&pool, &agents, &channels, &secrets);
    let rotated = SecretValues::from([(secret_key("llm", "api-key"), b"sk-2".to_vec())]);
    let after = render(&pool, &agents, &channels, &rotated);
    assert_ne!(
        before.catalog.revision, after.catalog.revision,
        "workers would not reload"
    );
    assert_ne!(before.secrets, after.secrets);
    assert_eq!(template(&before), template(&after));
    // The mirrored Secret holds the value under the file name workers read.
    let file = secret_key("llm", "api-key").mounted_file_name();
    assert_eq!(after.secrets.data.as_ref().unwrap()[&file].0, b"sk-2");
    // A missing key is simply absent (the agent's status reports it).
    let none = render(&pool, &agents, &channels, &SecretValues::new());
    assert!(none.secrets.data.as_ref().unwrap().is_empty());
}

#[test]
fn pool_level_changes_roll_the_pods() {
    let (pool, agents, channels, secrets) = sample();
    let before = render(&pool, &agents, &channels, &secrets);

    let mut new_nats = pool.clone();
    new_nats.spec.nats.urls = vec!["nats://nats.other:4222".into()];
    let after = render(&new_nats, &agents, &channels, &secrets);
    let annotation = |o: &PoolObjects| {
        template(o).metadata.unwrap().annotations.unwrap()["nexo.dev/config-hash"].clone()
    };
    assert_ne!(annotation(&before), annotation(&after));

    let mut new_image = pool.clone();
    new_image.spec.image = "ghcr.io/nexo/worker:2".into();
    let after = render(&new_image, &agents, &channels, &secrets);
    assert_ne!(template(&before), template(&after));
}

#[test]
fn scaling_changes_the_catalog_placement_not_the_template() {
    let (pool, agents, channels, secrets) = sample();
    let before = render(&pool, &agents, &channels, &secrets);
    let mut scaled = pool.clone();
    scaled.spec.replicas = 3;
    let after = render(&scaled, &agents, &channels, &secrets);
    assert_eq!(after.catalog.placement.unwrap().workers, 3);
    assert_ne!(before.catalog.revision, after.catalog.revision);
    assert_eq!(
        template(&before),
        template(&after),
        "scaling would restart every worker"
    );
    assert_eq!(after.stateful_set.spec.unwrap().replicas, Some(3));
}

#[test]
fn during_a_scale_the_catalog_and_the_stateful_set_follow_the_step_not_the_spec() {
    let (pool, agents, channels, secrets) = sample();
    let mut scaled_down = pool.clone();
    scaled_down.spec.replicas = 1;
    let objects = render::pool(PoolInputs {
        pool: &scaled_down,
        agents: &agents,
        channels: &channels,
        extensions: &[],
        secrets: &secrets,
        // Partitions leave worker 1 while its pod still runs.
        workers: Workers {
            placement: 1,
            replicas: 2,
        },
    });
    assert_eq!(objects.catalog.placement.unwrap().workers, 1);
    assert_eq!(objects.stateful_set.spec.unwrap().replicas, Some(2));
}

#[test]
fn a_stopping_worker_leaves_the_service_first_and_gets_time_to_hand_off() {
    let (mut pool, agents, channels, secrets) = sample();
    pool.spec.drain_timeout_seconds = 120;
    let spec = template(&render(&pool, &agents, &channels, &secrets))
        .spec
        .unwrap();
    let pre_stop = spec.containers[0]
        .lifecycle
        .clone()
        .unwrap()
        .pre_stop
        .unwrap();
    let sleep = pre_stop.sleep.expect("a preStop sleep").seconds;
    assert_eq!(sleep, workload::PRE_STOP_SLEEP_SECONDS);
    assert!(pre_stop.exec.is_none() && pre_stop.http_get.is_none());
    // The grace period covers the sleep, the drain and the hand-off after it.
    assert_eq!(
        spec.termination_grace_period_seconds,
        Some(sleep + 120 + workload::SHUTDOWN_MARGIN_SECONDS)
    );
}

#[test]
fn workers_run_locked_down() {
    let (pool, agents, channels, secrets) = sample();
    let spec = template(&render(&pool, &agents, &channels, &secrets))
        .spec
        .unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));
    let pod = spec.security_context.unwrap();
    assert_eq!(pod.run_as_non_root, Some(true));
    let container = &spec.containers[0];
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    let resources = container.resources.clone().unwrap();
    assert!(resources.requests.is_some() && resources.limits.is_some());
    // Nothing secret is in the environment by value.
    for var in container.env.clone().unwrap() {
        assert!(var.value.is_none(), "{} has a literal value", var.name);
    }
}

#[test]
fn the_longest_pool_name_gives_valid_names_and_labels() {
    let name = "p".repeat(names::MAX_POOL_NAME);
    let mut pool = pool(&name, 2);
    pool.spec.partitions = 4096;
    pool.spec.replicas = 4096;
    let objects = render(
        &pool,
        &[agent("concierge", &name)],
        &[],
        &SecretValues::new(),
    );
    let documents = [
        serde_json::to_value(&objects.catalog_config_map).unwrap(),
        serde_json::to_value(&objects.worker_config_map).unwrap(),
        serde_json::to_value(&objects.secrets).unwrap(),
        serde_json::to_value(&objects.stateful_set).unwrap(),
        serde_json::to_value(&objects.headless_service).unwrap(),
        serde_json::to_value(&objects.http_service).unwrap(),
        serde_json::to_value(&objects.disruption_budget).unwrap(),
    ];
    let mut checked = 0;
    for document in &documents {
        let kind = document["kind"].as_str().unwrap_or("?");
        let object = document["metadata"]["name"].as_str().unwrap();
        assert_dns_label(object, &format!("{kind} name"));
        for (path, value) in label_values(document, "") {
            assert_label_value(&value, &format!("{kind}/{object} {path}"));
            checked += 1;
        }
    }
    assert!(checked > 10, "found only {checked} label values");
    // What Kubernetes derives from the StatefulSet: pod names (host names, and the
    // `statefulset.kubernetes.io/pod-name` label) and `controller-revision-hash:
    // <name>-<10-character hash>`.
    let stateful_set = objects.stateful_set.metadata.name.clone().unwrap();
    let last_pod = format!("{stateful_set}-{}", pool.spec.replicas - 1);
    assert_dns_label(&last_pod, "pod name");
    assert_label_value(
        &format!("{stateful_set}-7b9c5d6f4a"),
        "controller-revision-hash",
    );
    // The pod's DNS name `<pod>.<headless Service>` is two labels.
    assert_eq!(
        objects.stateful_set.spec.unwrap().service_name.as_deref(),
        objects.headless_service.metadata.name.as_deref()
    );
}

#[test]
fn workers_are_reachable_by_name_before_they_are_ready() {
    let (pool, agents, channels, secrets) = sample();
    let objects = render(&pool, &agents, &channels, &secrets);
    // The operator asks a worker that is not ready what it cannot run.
    let headless = objects.headless_service.spec.unwrap();
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless.publish_not_ready_addresses, Some(true));
    // Clients reach ready workers only.
    let http = objects.http_service.spec.unwrap();
    assert_ne!(http.publish_not_ready_addresses, Some(true));
}

#[test]
fn a_stdio_extension_from_an_image_is_copied_into_the_workers_and_the_catalog_names_the_copy() {
    let (pool, mut agents, channels, _) = sample();
    agents[0].spec.extensions = vec![nexo_api::spec::ExtensionUse {
        name: "github".into(),
        tools: Vec::new(),
    }];
    let extension = |name: &str, spec: serde_json::Value| -> nexo_api::crd::Extension {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nexo.dev/v1alpha1", "kind": "Extension",
            "metadata": {"name": name, "namespace": fixtures::NAMESPACE},
            "spec": spec,
        }))
        .unwrap()
    };
    let extensions = [
        extension(
            "github",
            serde_json::json!({"stdio": {
                "command": "/usr/local/bin/github-mcp",
                "image": "ghcr.io/example/github-mcp:1",
                "env": [{"name": "GITHUB_TOKEN", "secret": {"secretKeyRef": {"name": "gh", "key": "token"}}}],
            }}),
        ),
        extension(
            "unused",
            serde_json::json!({"http": {"url": "http://x/mcp"}}),
        ),
    ];
    let token = secret_key("gh", "token");
    let secrets = SecretValues::from([(token.clone(), b"ghp-1".to_vec())]);
    let objects = render::pool(PoolInputs {
        pool: &pool,
        agents: &agents,
        channels: &channels,
        extensions: &extensions,
        secrets: &secrets,
        workers: Workers::settled(&pool),
    });

    // Only the extension an agent of the pool uses, naming the copied program.
    let listed = &objects.catalog.extensions;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let stdio = listed[0].spec.stdio.as_ref().unwrap();
    assert_eq!(stdio.command, "/opt/nexo/extensions/github");
    // Its secret is mirrored like an agent's.
    let data = objects.secrets.data.as_ref().unwrap();
    assert_eq!(data[&token.mounted_file_name()].0, b"ghp-1");

    let pod = template(&objects).spec.unwrap();
    let copies = pod
        .init_containers
        .expect("an init container copies the program");
    assert_eq!(copies.len(), 1);
    let copy = &copies[0];
    assert_eq!(copy.image.as_deref(), Some("ghcr.io/example/github-mcp:1"));
    assert_eq!(
        copy.command.as_deref().unwrap(),
        [
            "cp",
            "/usr/local/bin/github-mcp",
            "/opt/nexo/extensions/github"
        ]
    );
    assert_eq!(
        copy.security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(true)
    );
    let worker = &pod.containers[0];
    let mount = worker
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == "/opt/nexo/extensions")
        .expect("the worker mounts the copies");
    assert_eq!(mount.read_only, Some(true));
}

#[test]
fn the_pools_model_settings_reach_the_worker_config() {
    let (mut pool, agents, channels, secrets) = sample();
    pool.spec.models = Some(
        serde_json::from_value(serde_json::json!({
            "circuitBreaker": {"failures": 3, "coolDownSeconds": 10},
            "prices": [{"model": "gpt-4o-mini", "input": 0.15, "output": 0.6}]
        }))
        .unwrap(),
    );
    let objects = render(&pool, &agents, &channels, &secrets);
    let text = &objects.worker_config_map.data.as_ref().unwrap()
        [nexo_operator::render::workload::WORKER_CONFIG_FILE];
    let config: nexo_api::config::WorkerConfig = serde_saphyr::from_str(text).unwrap();
    assert_eq!(Some(config.worker.models), pool.spec.models);
}
