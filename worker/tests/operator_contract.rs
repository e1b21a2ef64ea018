//! The worker accepts what the operator renders for a pool: the worker config and the
//! catalog from the operator's golden rendering (operator/tests/golden/pool.yaml) load
//! and validate here. The two crates never depend on each other; this file is the
//! contract between them.

use std::path::Path;

use nexo_api::config::BrokerSettings;
use nexo_worker::config;
use serde_json::Value;

fn rendered_config_maps() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../operator/tests/golden/pool.yaml");
    let text = std::fs::read_to_string(&path).expect("the operator's golden rendering exists");
    let documents: Vec<Value> = serde_saphyr::from_multiple(&text).expect("golden file is YAML");
    documents
        .into_iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .collect()
}

fn data(key: &str) -> String {
    rendered_config_maps()
        .iter()
        .find_map(|cm| cm["data"][key].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no ConfigMap holds {key}"))
}

#[test]
fn the_rendered_worker_config_loads() {
    // The pod fills these from Secrets; their presence is all the parser checks.
    let env = |name: &str| {
        ["NEXO_NATS_TOKEN", "NEXO_ADMIN_TOKEN"]
            .contains(&name)
            .then(|| "x".to_owned())
    };
    let config = config::parse(Path::new("worker.yaml"), &data("worker.yaml"), env)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.worker.pool, "default");
    assert!(config.worker.catalog_file.is_some());
    assert!(matches!(config.worker.broker, BrokerSettings::Nats(_)));
    assert!(config.agents.is_empty(), "agents come from the catalog");
}

#[test]
fn the_rendered_catalog_loads() {
    let catalog = config::parse_catalog(Path::new("catalog.yaml"), &data("catalog.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(catalog.agents.len(), 2);
    assert_eq!(catalog.channels.len(), 1);
    assert_eq!(catalog.placement.map(|p| p.workers), Some(2));
    assert!(!catalog.revision.is_empty());
}
