//! The Kubernetes samples under `config/samples/kubernetes/` are resources the CRDs
//! accept (the typed specs reject unknown fields, as the API server's pruning would
//! drop them), and together they form a valid catalog: every reference resolves.

use std::path::Path;

use nexo_api::config::{Catalog, Resource};
use nexo_api::crd::{Agent, Channel, Extension, WorkerPool};
use serde_json::Value;

fn documents() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples/kubernetes");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        out.extend(docs.into_iter().map(|d| (path.display().to_string(), d)));
    }
    out
}

fn typed<T: serde::de::DeserializeOwned>(file: &str, doc: &Value) -> T {
    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn samples_are_valid_resources_that_reference_each_other() {
    let mut catalog = Catalog::default();
    let (mut pools, mut extensions) = (Vec::new(), Vec::new());
    for (file, doc) in documents() {
        assert_eq!(doc["apiVersion"], "nexo.dev/v1alpha1", "{file}");
        let namespace = "default".to_owned();
        match doc["kind"].as_str().unwrap_or_default() {
            "Agent" => {
                let agent: Agent = typed(&file, &doc);
                catalog.agents.push(Resource {
                    name: agent.metadata.name.unwrap(),
                    namespace,
                    spec: agent.spec,
                });
            }
            "Channel" => {
                let channel: Channel = typed(&file, &doc);
                assert!(
                    channel.spec.channel_type().is_some(),
                    "{file}: exactly one channel type"
                );
                catalog.channels.push(Resource {
                    name: channel.metadata.name.unwrap(),
                    namespace,
                    spec: channel.spec,
                });
            }
            "WorkerPool" => pools.push(typed::<WorkerPool>(&file, &doc)),
            "Extension" => extensions.push(typed::<Extension>(&file, &doc)),
            other => panic!("{file}: unexpected kind {other}"),
        }
    }
    assert_eq!(pools.len(), 1);
    assert_eq!(extensions.len(), 1);
    assert!(!catalog.agents.is_empty() && !catalog.channels.is_empty());
    let pool = pools[0].metadata.name.clone().unwrap();
    assert!(
        catalog.agents.iter().all(|a| a.spec.worker_pool == pool),
        "agents use the sample pool"
    );
    // The extensions agents use are samples too.
    for used in catalog.agents.iter().flat_map(|a| &a.spec.extensions) {
        assert!(
            extensions
                .iter()
                .any(|e| e.metadata.name.as_deref() == Some(used.name.as_str())),
            "no sample Extension `{}`",
            used.name
        );
    }
    let problems = nexo_api::validate::validate_catalog(&catalog);
    assert!(problems.is_empty(), "{problems:?}");
}
