//! Names and labels of the objects the operator makes for a pool.

use std::collections::BTreeMap;

/// Label every pool object carries; selects a pool's pods.
pub const POOL_LABEL: &str = "nexo.dev/pool";

/// Label of the one Service per pool that monitoring scrapes (the headless one).
pub const METRICS_LABEL: &str = "nexo.dev/metrics";

/// The pool's catalog ConfigMap (agents, channels; reloaded in place by workers).
pub fn catalog(pool: &str) -> String {
    format!("{pool}-catalog")
}

/// The pool's worker config ConfigMap (pool-level settings; changes roll the pods).
pub fn worker_config(pool: &str) -> String {
    format!("{pool}-config")
}

/// The Secret mirroring the keys the pool's specs reference.
pub fn secrets(pool: &str) -> String {
    format!("{pool}-secrets")
}

/// The headless Service behind the StatefulSet (`<pool>-<i>.<pool>-workers`).
pub fn headless_service(pool: &str) -> String {
    format!("{pool}-workers")
}

/// Labels that select a pool's pods.
pub fn selector_labels(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "nexo-worker".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), pool.to_owned()),
        (POOL_LABEL.to_owned(), pool.to_owned()),
    ])
}

/// Labels of every object of a pool.
pub fn labels(pool: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(pool);
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        "nexo-operator".to_owned(),
    );
    labels
}

/// The selector string the `/scale` subresource reports (HPA, KEDA).
pub fn selector_string(pool: &str) -> String {
    selector_labels(pool)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
