//! Checks of the names and label values Kubernetes accepts, for tests that render
//! objects (the operator's core, the Helm chart).

#![allow(dead_code)]

/// Every value of a label map (`labels`, `matchLabels`, a Service `selector`) in
/// `value`, with its path.
pub fn label_values(value: &serde_json::Value, path: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    match value {
        serde_json::Value::Object(map) => {
            for (key, child) in map {
                let child_path = format!("{path}.{key}");
                let is_label_map = ["labels", "matchLabels", "selector"].contains(&key.as_str());
                match child.as_object() {
                    Some(labels) if is_label_map && labels.values().all(|v| v.is_string()) => found
                        .extend(labels.iter().map(|(k, v)| {
                            (format!("{child_path}.{k}"), v.as_str().unwrap().to_owned())
                        })),
                    _ => found.extend(label_values(child, &child_path)),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                found.extend(label_values(item, &format!("{path}[{i}]")));
            }
        }
        _ => {}
    }
    found
}

pub fn assert_dns_label(name: &str, what: &str) {
    if let Err(why) = nexo_api::name::check_dns_label(name) {
        panic!("{what}: {why}");
    }
}

/// A label value: at most 63 characters of alphanumerics, `-`, `_` and `.`, starting
/// and ending with an alphanumeric (or empty).
pub fn assert_label_value(value: &str, what: &str) {
    let edge = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
    assert!(
        value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && edge(value.chars().next())
            && edge(value.chars().last()),
        "{what}: `{value}` is not a valid label value"
    );
}
