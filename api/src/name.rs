//! Resource names and the key (`namespace/name`) that identifies an agent or a channel.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Namespace used for resources declared in a local worker config file.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Worker pool of agents that name none, and of a worker that is not told its pool.
pub const DEFAULT_POOL: &str = "default";

/// Identity of a namespaced resource. Rendered as `namespace/name` for people and as
/// two subject tokens `namespace.name` on the broker (see [`crate::subject`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ResourceKey {
    pub namespace: String,
    pub name: String,
}

impl ResourceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Checks a Kubernetes DNS-1123 label: 1–63 characters of `a-z`, `0-9` and `-`,
/// starting and ending with an alphanumeric. Such names are safe as NATS subject
/// tokens, which is why every agent and channel name must be one.
pub fn check_dns_label(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "`{name}` must be 1 to 63 characters long (a DNS-1123 label)"
        ));
    }
    if !name.chars().all(ok_char) || name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "`{name}` must consist of lowercase letters, digits and '-', and start and end with a letter or digit (a DNS-1123 label)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(check_dns_label("concierge").is_ok());
        assert!(check_dns_label("a-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", "a*", &"x".repeat(64)] {
            assert!(check_dns_label(bad).is_err(), "{bad} accepted");
        }
    }
}
