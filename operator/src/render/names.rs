//! Names and labels of the objects the operator makes for a pool.
//!
//! Kubernetes limits Service names, and label values, to 63 characters (a DNS label).
//! The pool's own name is kept short enough by its CRD ([`MAX_POOL_NAME`]); names
//! derived from it (`<pool>-workers`, …) are cut to fit and end in a hash of the
//! whole name, so two long pools never share an object.

use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64;

/// Label every pool object carries; selects a pool's pods.
pub const POOL_LABEL: &str = "nexo.dev/pool";

/// Label of the one Service per pool that monitoring scrapes (the headless one).
pub const METRICS_LABEL: &str = "nexo.dev/metrics";

/// Longest name the operator derives, and longest label value: a DNS-1123 label.
pub const MAX_NAME: usize = 63;

/// Longest pool name the WorkerPool CRD accepts. The pool's StatefulSet is named after
/// it, and Kubernetes labels each of its pods `controller-revision-hash:
/// <pool>-<10-character hash>`, a label value of at most 63 characters: a longer
/// StatefulSet name gets no pods.
pub const MAX_POOL_NAME: usize = MAX_NAME - 11;

/// Pattern of a pool name: a DNS-1035 label, because the pool's Services are named
/// after it (Service names must start with a letter).
pub const POOL_NAME_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";

/// Hex digits of the hash that ends a shortened name: 32 bits, so the chance that two
/// long names of one namespace collide is negligible.
const HASH_DIGITS: usize = 8;

/// The pool's catalog ConfigMap (agents, channels; reloaded in place by workers).
pub fn catalog(pool: &str) -> String {
    derived(pool, "catalog")
}

/// The pool's worker config ConfigMap (pool-level settings; changes roll the pods).
pub fn worker_config(pool: &str) -> String {
    derived(pool, "config")
}

/// The Secret mirroring the keys the pool's specs reference.
pub fn secrets(pool: &str) -> String {
    derived(pool, "secrets")
}

/// The headless Service behind the StatefulSet (`<pool>-<i>.<pool>-workers`).
pub fn headless_service(pool: &str) -> String {
    derived(pool, "workers")
}

/// `<base>-<suffix>` when that is at most [`MAX_NAME`] characters; otherwise `base`
/// cut short, a hash of the whole name and the suffix (`<base…>-<hash>-<suffix>`),
/// at most [`MAX_NAME`] long. The suffix stays readable; the hash keeps two long names
/// that share a prefix apart.
pub(crate) fn derived(base: &str, suffix: &str) -> String {
    let full = format!("{base}-{suffix}");
    if full.len() <= MAX_NAME {
        return full;
    }
    let hash = format!("{:016x}", xxh3_64(full.as_bytes()));
    let keep = MAX_NAME.saturating_sub(suffix.len() + HASH_DIGITS + 2);
    // Kubernetes names are ASCII; counting chars keeps a non-ASCII one from panicking.
    let prefix: String = base.chars().take(keep).collect();
    // A cut right after a `-` would leave `--` before the hash: valid, but untidy.
    let prefix = prefix.trim_end_matches('-');
    format!("{prefix}-{}-{suffix}", &hash[..HASH_DIGITS])
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

#[cfg(test)]
mod tests {
    use nexo_api::name::check_dns_label;

    use super::*;

    #[test]
    fn short_names_are_kept_as_they_are() {
        assert_eq!(headless_service("default"), "default-workers");
        let longest = "p".repeat(MAX_POOL_NAME);
        assert_eq!(catalog(&longest), format!("{longest}-catalog"));
    }

    #[test]
    fn long_derived_names_are_cut_with_a_hash_and_stay_distinct() {
        let a = format!("{}-a", "x".repeat(70));
        let b = format!("{}-b", "x".repeat(70));
        for derive in [catalog, worker_config, secrets, headless_service] {
            let (name_a, name_b) = (derive(&a), derive(&b));
            for name in [&name_a, &name_b] {
                assert_eq!(name.len(), MAX_NAME, "{name}");
                check_dns_label(name).unwrap();
            }
            assert_ne!(name_a, name_b);
        }
        assert!(headless_service(&a).ends_with("-workers"));
    }

    #[test]
    fn a_cut_right_after_a_dash_leaves_no_double_dash() {
        let keep = MAX_NAME - "workers".len() - HASH_DIGITS - 2;
        let base = format!("{}-{}", "x".repeat(keep - 1), "y".repeat(20));
        let name = headless_service(&base);
        check_dns_label(&name).unwrap();
        assert!(!name.contains("--"), "{name}");
    }
}
