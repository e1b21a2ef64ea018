//! The committed CRDs under `crds/` are exactly what the operator generates, and each
//! is a structural schema that an API server accepts, with a description on every
//! field so `kubectl explain` helps.

mod crd_schema;

use std::path::Path;

use nexo_operator::crds;
use serde_json::Value;

#[test]
fn committed_crds_match_the_generated_ones() {
    for dir in ["../crds", "../charts/nexo-crds/templates"] {
        check_generated(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir));
    }
}

/// `dir` holds exactly the generated CRD files (the chart's templates are the same
/// files, so `helm upgrade` upgrades the CRDs).
fn check_generated(dir: &Path) {
    let mut committed: Vec<String> = std::fs::read_dir(dir)
        .expect("crds/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    committed.sort();
    let mut generated: Vec<String> = crds::all().iter().map(crds::file_name).collect();
    generated.sort();
    assert_eq!(
        committed,
        generated,
        "{} holds other files than the operator generates",
        dir.display()
    );
    for crd in crds::all() {
        let path = dir.join(crds::file_name(&crd));
        let on_disk = std::fs::read_to_string(&path).unwrap();
        assert!(
            on_disk == crds::to_yaml(&crd),
            "{} is out of date; run `cargo run -p nexo-operator -- crd --out-dir crds --out-dir charts/nexo-crds/templates`",
            path.display()
        );
    }
}

#[test]
fn the_field_reference_is_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference/crds.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == crds::reference(),
        "{} is out of date; run `cargo run -p nexo-operator -- crd --reference > docs/reference/crds.md`",
        path.display()
    );
    for field in [
        "spec.model.provider",
        "spec.partitions",
        "spec.nats.tls.secretName",
        "status.placement.worker",
    ] {
        assert!(
            committed.contains(&format!("`{field}`")),
            "{field} missing from the reference"
        );
    }
}

#[test]
fn crds_are_structural_and_documented() {
    for crd in crds::all() {
        let name = crd.metadata.name.clone().unwrap();
        let value = serde_json::to_value(&crd).unwrap();
        for version in value["spec"]["versions"].as_array().unwrap() {
            let schema = &version["schema"]["openAPIV3Schema"];
            let mut problems = Vec::new();
            check_node(schema, &format!("{name}:"), false, &mut problems);
            check_described(
                &schema["properties"]["spec"],
                &format!("{name}:.spec"),
                &mut problems,
            );
            // A pool's status says how a scale stands: `kubectl explain` tells what.
            if crd.spec.names.kind == "WorkerPool" {
                let status = &schema["properties"]["status"]["properties"];
                assert!(status.get("handOff").is_some(), "{name}: no status schema");
                for (field, node) in status.as_object().into_iter().flatten() {
                    check_described(node, &format!("{name}:.status.{field}"), &mut problems);
                }
            }
            assert!(
                problems.is_empty(),
                "{name}: schema problems:\n  {}",
                problems.join("\n  ")
            );
        }
    }
}

#[test]
fn crds_carry_the_cel_rules_and_scale_subresource() {
    let all = crds::all();
    let find = |kind: &str| {
        serde_json::to_value(all.iter().find(|c| c.spec.names.kind == kind).unwrap()).unwrap()
    };
    let channel = find("Channel").to_string();
    assert!(
        channel
            .contains("exactly one of webchat, webhook, telegram, whatsapp or slack must be set")
    );
    assert!(channel.contains("a route matches on at least one of"));
    let pool = find("WorkerPool");
    let scale = &pool["spec"]["versions"][0]["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.replicas");
    assert_eq!(scale["statusReplicasPath"], ".status.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.selector");
    assert!(
        pool.to_string().contains("self == oldSelf"),
        "partitions are immutable"
    );
    for kind in ["Agent", "Channel", "Extension", "WorkerPool"] {
        let crd = find(kind);
        let version = &crd["spec"]["versions"][0];
        assert!(
            version["subresources"]["status"].is_object(),
            "{kind} has no status subresource"
        );
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(
            columns.contains(&"Ready") && columns.contains(&"Age"),
            "{kind}: {columns:?}"
        );
    }
}

const TYPES: [&str; 6] = ["object", "array", "string", "integer", "number", "boolean"];

/// The rules of a structural schema (KEP-2335), as the API server checks them.
fn check_node(node: &Value, path: &str, in_junctor: bool, problems: &mut Vec<String>) {
    let Some(map) = node.as_object() else {
        problems.push(format!("{path}: not a schema object"));
        return;
    };
    for forbidden in [
        "$ref",
        "definitions",
        "$schema",
        "additionalItems",
        "dependencies",
        "patternProperties",
    ] {
        if map.contains_key(forbidden) {
            problems.push(format!("{path}: `{forbidden}` is not allowed"));
        }
    }
    let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let int_or_string = map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if in_junctor {
        for key in [
            "type",
            "default",
            "additionalProperties",
            "description",
            "nullable",
        ] {
            if map.contains_key(key) {
                problems.push(format!("{path}: `{key}` inside allOf/anyOf/oneOf/not"));
            }
        }
    } else {
        match map.get("type").and_then(Value::as_str) {
            Some(t) if TYPES.contains(&t) => {}
            Some(t) => problems.push(format!("{path}: unknown type `{t}`")),
            None if preserve || int_or_string => {}
            None => problems.push(format!("{path}: no `type`")),
        }
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        problems.push(format!(
            "{path}: `properties` and `additionalProperties` together"
        ));
    }
    if let Some(additional) = map.get("additionalProperties") {
        match additional {
            Value::Object(_) => {
                check_node(additional, &format!("{path}{{*}}"), in_junctor, problems)
            }
            _ => problems.push(format!(
                "{path}: `additionalProperties` must be a schema, not a boolean"
            )),
        }
    }
    if let Some(properties) = map.get("properties").and_then(Value::as_object) {
        for (key, child) in properties {
            check_node(child, &format!("{path}.{key}"), in_junctor, problems);
        }
    }
    match map.get("items") {
        Some(items @ Value::Object(_)) => {
            check_node(items, &format!("{path}[]"), in_junctor, problems)
        }
        Some(_) => problems.push(format!("{path}: `items` must be one schema")),
        None if map.get("type") == Some(&Value::String("array".into())) => {
            problems.push(format!("{path}: array without `items`"))
        }
        None => {}
    }
    for junctor in ["allOf", "anyOf", "oneOf"] {
        for (i, child) in map
            .get(junctor)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            check_node(child, &format!("{path}/{junctor}[{i}]"), true, problems);
        }
    }
    if let Some(not) = map.get("not") {
        check_node(not, &format!("{path}/not"), true, problems);
    }
}

/// Every property of the spec explains itself (`kubectl explain agent.spec.model`).
fn check_described(node: &Value, path: &str, problems: &mut Vec<String>) {
    if node
        .get("description")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        problems.push(format!("{path}: no description"));
    }
    if let Some(properties) = node.get("properties").and_then(Value::as_object) {
        for (key, child) in properties {
            check_described(child, &format!("{path}.{key}"), problems);
        }
    }
    if let Some(properties) = node
        .get("items")
        .and_then(|items| items.get("properties"))
        .and_then(Value::as_object)
    {
        for (key, child) in properties {
            check_described(child, &format!("{path}[].{key}"), problems);
        }
    }
}

fn pool_schema() -> Value {
    crd_schema::of_kind("WorkerPool")
}

/// A valid pool document, to spoil one field of.
fn pool_document() -> Value {
    serde_json::json!({
        "apiVersion": "nexo.dev/v1alpha1",
        "kind": "WorkerPool",
        "metadata": {"name": "default", "namespace": "team-a"},
        "spec": {
            "image": "ghcr.io/nexo-dev/nexo-worker:1",
            "nats": {"urls": ["nats://nats:4222"]},
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": 1073741824}},
            "storage": {"size": "1Gi"},
            "env": [{"name": "LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}}],
        },
    })
}

#[test]
fn a_valid_pool_passes_the_schema() {
    let problems = crd_schema::validate(&pool_schema(), &pool_document());
    assert!(problems.is_empty(), "{problems:?}");
    for size in ["1Gi", "500Mi", "1.5", "1e3", "+2k", ".5", "100m"] {
        let mut pool = pool_document();
        pool["spec"]["storage"]["size"] = size.into();
        let problems = crd_schema::validate(&pool_schema(), &pool);
        assert!(problems.is_empty(), "{size}: {problems:?}");
    }
}

#[test]
fn a_pool_with_a_bad_quantity_is_refused() {
    let schema = pool_schema();
    for (pointer, bad) in [
        ("/spec/storage/size", "lots"),
        ("/spec/storage/size", "1 Gi"),
        ("/spec/storage/size", "1GB"),
        ("/spec/storage/size", ""),
        ("/spec/resources/requests/memory", "128MB"),
        ("/spec/resources/limits/memory", "big"),
        ("/spec/env/0/valueFrom/resourceFieldRef/divisor", "one"),
    ] {
        let mut pool = pool_document();
        *pool.pointer_mut(pointer).unwrap() = bad.into();
        let problems = crd_schema::validate(&schema, &pool);
        let path = pointer.trim_start_matches('/').replace('/', ".");
        assert!(
            problems.iter().any(|p| p.starts_with(&format!("{path}: "))),
            "{pointer} = {bad:?} accepted: {problems:?}"
        );
    }
}

#[test]
fn pool_names_that_cannot_name_a_stateful_set_are_refused() {
    let schema = pool_schema();
    let longest = "p".repeat(nexo_operator::render::names::MAX_POOL_NAME);
    for good in ["default", "a", longest.as_str()] {
        let mut pool = pool_document();
        pool["metadata"]["name"] = good.into();
        let problems = crd_schema::validate(&schema, &pool);
        assert!(problems.is_empty(), "{good}: {problems:?}");
    }
    let too_long = format!("{longest}p");
    for bad in [too_long.as_str(), "1pool", "my.pool", "Pool", "pool-"] {
        let mut pool = pool_document();
        pool["metadata"]["name"] = bad.into();
        let problems = crd_schema::validate(&schema, &pool);
        assert!(
            problems.iter().any(|p| p.starts_with("metadata.name: ")),
            "{bad} accepted: {problems:?}"
        );
    }
}
