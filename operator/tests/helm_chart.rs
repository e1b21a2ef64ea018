//! The Helm charts, through the real `helm` binary (`NEXO_HELM`; scripts/test.sh
//! installs it): `helm lint`, and `helm template` with the default values and every
//! file under charts/nexo/ci/, each rendered object checked for what a cluster
//! needs: a known apiVersion/kind, the required fields (the objects deserialize into
//! the typed Kubernetes and nexo resources), non-root read-only containers with
//! resources; a rendered WorkerPool also passes the CRD's schema. The worker pods a
//! rendered WorkerPool leads to are rendered with the operator's own core and checked
//! the same way. Bad values files must fail with the message their first line expects.

mod crd_schema;
mod k8s_names;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use nexo_api::crd::WorkerPool;
use nexo_operator::render::{self, PoolInputs, SecretValues, Workers};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn helm() -> Command {
    let binary = std::env::var_os("NEXO_HELM").expect(
        "NEXO_HELM must name a helm binary (./scripts/test.sh installs one into .tools/helm)",
    );
    let mut command = Command::new(binary);
    command.current_dir(repo());
    command
}

/// Runs helm; Ok(stdout) or Err(stderr).
fn run(args: &[&str]) -> Result<String, String> {
    let output = helm().args(args).output().expect("helm runs");
    if output.status.success() {
        Ok(String::from_utf8(output.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn template(chart: &str, values: Option<&Path>) -> Vec<Value> {
    template_release("nexo", chart, values, &[])
}

fn template_release(
    release: &str,
    chart: &str,
    values: Option<&Path>,
    extra: &[&str],
) -> Vec<Value> {
    let mut args = vec!["template", release, chart, "--namespace", "nexo-system"];
    let values = values.map(|v| v.display().to_string());
    if let Some(values) = &values {
        args.extend(["--values", values.as_str()]);
    }
    args.extend(extra);
    let rendered = run(&args).unwrap_or_else(|e| panic!("helm template {values:?}: {e}"));
    serde_saphyr::from_multiple::<Value>(&rendered)
        .expect("helm output is YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

#[test]
fn charts_lint() {
    for chart in ["charts/nexo", "charts/nexo-crds"] {
        run(&["lint", "--strict", chart]).unwrap_or_else(|e| panic!("helm lint {chart}: {e}"));
    }
}

#[test]
fn the_crd_chart_renders_the_crds() {
    let documents = template("charts/nexo-crds", None);
    assert_eq!(documents.len(), 4);
    for document in documents {
        let crd: CustomResourceDefinition = serde_json::from_value(document).unwrap();
        let annotations = crd.metadata.annotations.unwrap();
        assert_eq!(annotations["helm.sh/resource-policy"], "keep");
    }
}

#[test]
fn default_and_custom_values_render_valid_objects() {
    let mut values: Vec<Option<PathBuf>> = vec![None];
    for entry in std::fs::read_dir(repo().join("charts/nexo/ci")).unwrap() {
        values.push(Some(entry.unwrap().path()));
    }
    assert!(values.len() > 1, "charts/nexo/ci/ holds non-default values");
    for values in values {
        let documents = template("charts/nexo", values.as_deref());
        let label = format!("{values:?}");
        let mut kinds = Vec::new();
        for document in &documents {
            kinds.push(check_object(document, &label));
        }
        for required in ["Deployment", "ServiceAccount", "Service"] {
            assert!(
                kinds.iter().any(|k| k == required),
                "{label}: no {required}"
            );
        }
        assert!(
            kinds.iter().any(|k| k == "ClusterRole") || kinds.iter().any(|k| k == "Role"),
            "{label}: no RBAC"
        );
        // An install renders NOTES.txt too (`helm template` does not).
        let mut args = vec![
            "install",
            "nexo",
            "charts/nexo",
            "--dry-run=client",
            "--namespace",
            "nexo-system",
        ];
        let file = values.as_ref().map(|v| v.display().to_string());
        if let Some(file) = &file {
            args.extend(["--values", file.as_str()]);
        }
        let output = run(&args).unwrap_or_else(|e| panic!("{label}: helm install --dry-run: {e}"));
        assert!(
            output.contains("is installed in namespace nexo-system"),
            "{label}: no NOTES in:\n{output}"
        );
    }
}

#[test]
fn a_namespaced_install_grants_nothing_cluster_wide() {
    let values = repo().join("charts/nexo/ci/namespaced-keda-values.yaml");
    let documents = template("charts/nexo", Some(&values));
    let kinds: Vec<&str> = documents
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert!(!kinds.contains(&"ClusterRole") && !kinds.contains(&"ClusterRoleBinding"));
    let role_namespaces: Vec<&str> = documents
        .iter()
        .filter(|d| d["kind"] == "Role")
        .map(|d| d["metadata"]["namespace"].as_str().unwrap())
        .collect();
    for ns in ["team-a", "team-b", "nexo-system"] {
        assert!(
            role_namespaces.contains(&ns),
            "no Role in {ns}: {role_namespaces:?}"
        );
    }
    let deployment = documents
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--watch-namespace=team-a,team-b"), "{args}");
    // A pool sized by KEDA leaves `replicas` to it.
    let bursty = documents
        .iter()
        .find(|d| d["kind"] == "WorkerPool" && d["metadata"]["name"] == "bursty")
        .unwrap();
    assert!(bursty["spec"].get("replicas").is_none());
}

#[test]
fn bad_values_fail_with_the_schemas_message() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helm/bad");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| {
                panic!(
                    "{}: first line must be `# expect: <message>`",
                    path.display()
                )
            });
        let values = path.display().to_string();
        let error = run(&["template", "nexo", "charts/nexo", "--values", &values])
            .expect_err(&format!("{values} rendered"));
        assert!(
            error.contains(expected),
            "{values}: expected `{expected}` in:\n{error}"
        );
        count += 1;
    }
    assert!(count >= 3);
}

/// Checks one rendered object; returns its kind.
fn check_object(document: &Value, label: &str) -> String {
    let api_version = document["apiVersion"].as_str().unwrap_or_default();
    let kind = document["kind"].as_str().unwrap_or_default().to_owned();
    let name = document["metadata"]["name"].as_str().unwrap_or_default();
    let at = format!("{label}: {kind}/{name}");
    assert!(!name.is_empty(), "{at}: no metadata.name");
    match (api_version, kind.as_str()) {
        ("v1", "ServiceAccount") => drop(parse::<ServiceAccount>(document, &at)),
        ("v1", "Service") => {
            let service: Service = parse(document, &at);
            assert!(
                service
                    .spec
                    .unwrap()
                    .selector
                    .is_some_and(|s| !s.is_empty()),
                "{at}: no selector"
            );
        }
        ("apps/v1", "Deployment") => {
            let deployment: Deployment = parse(document, &at);
            let spec = deployment.spec.unwrap();
            check_pod(&spec.template.spec.unwrap(), &at);
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            drop(parse::<ClusterRole>(document, &at))
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            drop(parse::<ClusterRoleBinding>(document, &at))
        }
        ("rbac.authorization.k8s.io/v1", "Role") => drop(parse::<Role>(document, &at)),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            drop(parse::<RoleBinding>(document, &at))
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => drop(parse::<NetworkPolicy>(document, &at)),
        ("nexo.dev/v1alpha1", "WorkerPool") => {
            // What the API server will check: the chart's values schema agrees with the CRD.
            let problems = crd_schema::validate(&crd_schema::of_kind("WorkerPool"), document);
            assert!(
                problems.is_empty(),
                "{at}: the CRD refuses it: {problems:?}"
            );
            let mut pool: WorkerPool = parse(document, &at);
            pool.metadata.uid = Some("uid".into());
            // What the operator will make of it: the worker pods must pass too.
            let objects = render::pool(PoolInputs {
                pool: &pool,
                agents: &[],
                channels: &[],
                extensions: &[],
                secrets: &SecretValues::new(),
                workers: Workers::settled(&pool),
            });
            let stateful_set: StatefulSet = objects.stateful_set;
            check_pod(
                &stateful_set.spec.unwrap().template.spec.unwrap(),
                &format!("{at} (rendered StatefulSet)"),
            );
        }
        ("keda.sh/v1alpha1", "ScaledObject") => {
            let spec = &document["spec"];
            assert_eq!(spec["scaleTargetRef"]["kind"], "WorkerPool", "{at}");
            assert!(
                spec["maxReplicaCount"].as_i64().is_some(),
                "{at}: no maxReplicaCount"
            );
            assert!(
                spec["fallback"]["replicas"].as_i64().is_some(),
                "{at}: no fallback"
            );
            let triggers = spec["triggers"].as_array().expect("triggers");
            assert!(!triggers.is_empty(), "{at}: no triggers");
            for trigger in triggers {
                assert_eq!(trigger["type"], "nats-jetstream", "{at}");
                for key in [
                    "natsServerMonitoringEndpoint",
                    "stream",
                    "consumer",
                    "lagThreshold",
                ] {
                    assert!(
                        trigger["metadata"][key].is_string(),
                        "{at}: trigger without {key}"
                    );
                }
            }
        }
        ("monitoring.coreos.com/v1", "ServiceMonitor") => {
            assert!(
                document["spec"]["selector"]["matchLabels"].is_object(),
                "{at}: no selector"
            );
            assert!(
                document["spec"]["endpoints"][0]["port"].is_string(),
                "{at}: no endpoint"
            );
        }
        ("v1", "ConfigMap") => {
            let map: ConfigMap = parse(document, &at);
            // The only ConfigMap is the Grafana dashboard: JSON with panels that query.
            let data = map.data.unwrap_or_default();
            let dashboard: Value = serde_json::from_str(&data["nexo-workers.json"])
                .unwrap_or_else(|e| panic!("{at}: the dashboard is not JSON: {e}"));
            let panels = dashboard["panels"].as_array().expect("panels");
            assert!(
                panels.iter().any(|p| p["targets"][0]["expr"].is_string()),
                "{at}: no panel queries anything"
            );
        }
        ("monitoring.coreos.com/v1", "PrometheusRule") => {
            let groups = document["spec"]["groups"].as_array().expect("groups");
            for rule in groups.iter().flat_map(|g| g["rules"].as_array().unwrap()) {
                let alert = rule["alert"].as_str().unwrap_or_default();
                assert!(!alert.is_empty(), "{at}: a rule without a name");
                assert!(rule["expr"].is_string(), "{at}: {alert} has no expr");
                let runbook = rule["annotations"]["runbook"].as_str().unwrap_or_default();
                let section = runbook.strip_prefix("docs/troubleshooting.md: ");
                assert!(
                    section.is_some_and(|s| troubleshooting_sections().contains(s)),
                    "{at}: {alert}'s runbook `{runbook}` is no section of docs/troubleshooting.md"
                );
            }
        }
        other => panic!("{at}: unknown apiVersion/kind {other:?}"),
    }
    kind
}

/// `document` as a typed resource: what a kind requires is present and well formed.
/// The headings of docs/troubleshooting.md, without `#` and backticks.
fn troubleshooting_sections() -> BTreeSet<String> {
    let page = std::fs::read_to_string(repo().join("docs/troubleshooting.md")).unwrap();
    page.lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| {
            line.trim_start_matches('#')
                .replace('`', "")
                .trim()
                .to_owned()
        })
        .collect()
}

fn parse<T: serde::de::DeserializeOwned>(document: &Value, at: &str) -> T {
    serde_json::from_value(document.clone()).unwrap_or_else(|e| panic!("{at}: {e}"))
}

/// Non-root, read-only root file system, no privilege escalation, resources set.
fn check_pod(pod: &PodSpec, at: &str) {
    let pod_non_root = pod
        .security_context
        .as_ref()
        .and_then(|c| c.run_as_non_root)
        .unwrap_or(false);
    for container in &pod.containers {
        let at = format!("{at} container {}", container.name);
        let security = container.security_context.clone().unwrap_or_default();
        assert!(
            security.run_as_non_root.unwrap_or(pod_non_root),
            "{at}: may run as root"
        );
        assert_eq!(
            security.read_only_root_filesystem,
            Some(true),
            "{at}: writable root file system"
        );
        assert_eq!(
            security.allow_privilege_escalation,
            Some(false),
            "{at}: privilege escalation allowed"
        );
        let resources = container.resources.clone().unwrap_or_default();
        assert!(
            resources.requests.is_some_and(|r| !r.is_empty()),
            "{at}: no resource requests"
        );
        assert!(
            resources.limits.is_some_and(|l| l.contains_key("memory")),
            "{at}: no memory limit"
        );
        let image = container.image.as_deref().unwrap_or_default();
        let reference = ImageReference::parse(image)
            .unwrap_or_else(|| panic!("{at}: `{image}` is not a valid image reference"));
        assert!(
            reference.tag.is_some() || reference.digest.is_some(),
            "{at}: image `{image}` without a tag or digest"
        );
    }
}

#[test]
fn the_argo_cd_example_values_are_valid() {
    let text = std::fs::read_to_string(repo().join("deploy/argocd/applications.yaml")).unwrap();
    let applications: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let nexo = applications
        .iter()
        .find(|a| a["spec"]["source"]["path"] == "charts/nexo")
        .expect("an Application for charts/nexo");
    let values = &nexo["spec"]["source"]["helm"]["valuesObject"];
    let file = std::env::temp_dir().join(format!("nexo-argocd-values-{}.yaml", std::process::id()));
    std::fs::write(&file, serde_json::to_string(values).unwrap()).unwrap();
    let documents = template("charts/nexo", Some(&file));
    std::fs::remove_file(&file).unwrap();
    assert!(documents.iter().any(|d| d["kind"] == "WorkerPool"));
    // The CRDs sync before anything that uses them.
    let waves: Vec<&str> = applications
        .iter()
        .map(|a| {
            a["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(waves, ["-1", "0"]);
}

/// An image reference as the container runtime reads it:
/// `[registry[:port]/]path[:tag][@sha256:<64 hex>]` (the distribution reference
/// grammar).
#[derive(Debug, PartialEq)]
struct ImageReference<'a> {
    name: &'a str,
    tag: Option<&'a str>,
    digest: Option<&'a str>,
}

impl<'a> ImageReference<'a> {
    fn parse(image: &'a str) -> Option<Self> {
        let grammar = regex::Regex::new(concat!(
            r"^(?P<name>",
            r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*(?::[0-9]+)?/)?",
            r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*",
            r")(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$",
        ))
        .unwrap();
        let captures = grammar.captures(image)?;
        Some(Self {
            name: captures.name("name")?.as_str(),
            tag: captures.name("tag").map(|m| m.as_str()),
            digest: captures.name("digest").map(|m| m.as_str()),
        })
    }
}

#[test]
fn the_image_reference_grammar_refuses_what_a_runtime_refuses() {
    let digest = format!("sha256:{}", "a".repeat(64));
    for good in [
        "nexo:1".to_owned(),
        "registry.example:5000/team/nexo-worker:0.1.0".to_owned(),
        format!("ghcr.io/nexo-dev/nexo-operator@{digest}"),
        format!("ghcr.io/nexo-dev/nexo-operator:0.1.0@{digest}"),
    ] {
        assert!(ImageReference::parse(&good).is_some(), "{good} refused");
    }
    for bad in [
        // What `repository: …@sha256` with the default tag used to render.
        format!("ghcr.io/nexo-dev/nexo-operator@{digest}:0.1.0"),
        "ghcr.io/nexo-dev/nexo-operator@sha256:abc".to_owned(),
        "Nexo:1".to_owned(),
        "nexo:".to_owned(),
    ] {
        assert!(ImageReference::parse(&bad).is_none(), "{bad} accepted");
    }
}

#[test]
fn image_digests_render_valid_references() {
    let values = repo().join("charts/nexo/ci/digests-values.yaml");
    let documents = template("charts/nexo", Some(&values));
    let deployment = documents
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let operator = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap();
    assert_eq!(
        ImageReference::parse(operator),
        Some(ImageReference {
            name: "registry.example/nexo-operator",
            tag: None,
            digest: Some("sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"),
        }),
        "{operator}"
    );
    // The worker image the operator is told to run, and what it renders from it.
    let document = documents
        .iter()
        .find(|d| d["kind"] == "WorkerPool")
        .unwrap();
    let pool: WorkerPool = parse(document, "WorkerPool");
    assert_eq!(
        ImageReference::parse(&pool.spec.image),
        Some(ImageReference {
            name: "registry.example:5000/team/nexo-worker",
            tag: Some("0.1.0"),
            digest: Some("sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"),
        }),
        "{}",
        pool.spec.image
    );
    let objects = render::pool(PoolInputs {
        pool: &pool,
        agents: &[],
        channels: &[],
        extensions: &[],
        secrets: &SecretValues::new(),
        workers: Workers::settled(&pool),
    });
    let pod = objects.stateful_set.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.containers[0].image.as_ref(), Some(&pool.spec.image));
}

#[test]
fn the_longest_release_names_give_valid_distinct_names() {
    // Helm refuses release names over 53 characters; these two differ only at the end.
    let releases = [
        format!("{}a", "r".repeat(52)),
        format!("{}b", "r".repeat(52)),
    ];
    // Every optional object: NetworkPolicies, ServiceMonitors, per-namespace Roles;
    // the ServiceAccount named after the release, not as these values name it.
    let values = repo().join("charts/nexo/ci/namespaced-keda-values.yaml");
    let mut per_release = Vec::new();
    for release in &releases {
        let documents = template_release(
            release,
            "charts/nexo",
            Some(&values),
            &["--set", "serviceAccount.name="],
        );
        let mut names = BTreeSet::new();
        for document in &documents {
            let kind = document["kind"].as_str().unwrap();
            let name = document["metadata"]["name"].as_str().unwrap();
            let at = format!("{release}: {kind}/{name}");
            k8s_names::assert_dns_label(name, &at);
            for (path, value) in k8s_names::label_values(document, "") {
                k8s_names::assert_label_value(&value, &format!("{at} {path}"));
            }
            // Names that refer to other objects of the release.
            for pointer in ["/roleRef/name", "/spec/template/spec/serviceAccountName"] {
                if let Some(referenced) = document.pointer(pointer).and_then(Value::as_str) {
                    k8s_names::assert_dns_label(referenced, &format!("{at} {pointer}"));
                }
            }
            // Pools and their ScaledObjects are named by the user, not the release.
            if !["WorkerPool", "ScaledObject"].contains(&kind) {
                let namespace = document["metadata"]["namespace"].as_str().unwrap_or("");
                names.insert(format!("{kind}/{namespace}/{name}"));
            }
        }
        assert!(names.len() > 8, "{release}: only {names:?}");
        per_release.push(names);
    }
    let shared: Vec<_> = per_release[0].intersection(&per_release[1]).collect();
    assert!(shared.is_empty(), "two releases share {shared:?}");
}
