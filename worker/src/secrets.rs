//! Reading secret values named by [`SecretRef`]s: from the process environment, or
//! from files under `worker.secretsDir` (where the operator mounts the Kubernetes
//! Secret keys a pool needs). Values are read when a component is built, never
//! logged, and never written back anywhere.

use std::path::{Path, PathBuf};

use nexo_api::spec::SecretRef;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{0} is not set or empty")]
    Missing(String),
    #[error("{what}: cannot read {}: {source}", path.display())]
    Unreadable {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret reference sets neither `env` nor `secretKeyRef`")]
    Empty,
}

/// Where `secretKeyRef` values live.
#[derive(Debug, Clone)]
pub struct Secrets {
    dir: PathBuf,
}

impl Secrets {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The value `secret` names. An unset or empty value is an error: callers that
    /// can go on without one use [`Secrets::read_optional`].
    pub fn read(&self, secret: &SecretRef) -> Result<String, SecretError> {
        self.read_optional(secret)?
            .ok_or_else(|| SecretError::Missing(describe(secret)))
    }

    /// The value `secret` names, or `None` when it is unset or empty.
    pub fn read_optional(&self, secret: &SecretRef) -> Result<Option<String>, SecretError> {
        if let Some(env) = &secret.env {
            return Ok(std::env::var(env).ok().filter(|v| !v.is_empty()));
        }
        let Some(selector) = &secret.secret_key_ref else {
            return Err(SecretError::Empty);
        };
        let path = self.dir.join(selector.mounted_file_name());
        match std::fs::read_to_string(&path) {
            // Files written by tools often end in a newline that is not part of a key.
            Ok(value) => {
                Ok(Some(value.trim_end_matches(['\r', '\n']).to_owned()).filter(|v| !v.is_empty()))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SecretError::Unreadable {
                what: describe(secret),
                path,
                source,
            }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// How a secret reference reads in messages: which variable or Secret key, never
/// the value.
pub fn describe(secret: &SecretRef) -> String {
    match (&secret.env, &secret.secret_key_ref) {
        (Some(env), _) => format!("environment variable `{env}`"),
        (None, Some(selector)) => format!(
            "key `{}` of Secret `{}` (file {})",
            selector.key,
            selector.name,
            selector.mounted_file_name()
        ),
        (None, None) => "an empty secret reference".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mounted_secret_keys() {
        let dir = std::env::temp_dir().join(format!("nexo-secrets-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let secrets = Secrets::new(&dir);
        let reference = SecretRef::secret_key("llm", "api-key");
        let selector = reference.secret_key_ref.clone().unwrap();
        assert!(secrets.read_optional(&reference).unwrap().is_none());
        let err = secrets.read(&reference).unwrap_err().to_string();
        assert!(err.contains("key `api-key` of Secret `llm`"), "{err}");

        std::fs::write(dir.join(selector.mounted_file_name()), "sk-123\n").unwrap();
        assert_eq!(secrets.read(&reference).unwrap(), "sk-123");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_environment_variables() {
        let secrets = Secrets::new("/nonexistent");
        let unset = SecretRef::env("NEXO_TEST_SURELY_UNSET_VARIABLE");
        assert!(secrets.read_optional(&unset).unwrap().is_none());
        let err = secrets.read(&unset).unwrap_err().to_string();
        assert!(err.contains("NEXO_TEST_SURELY_UNSET_VARIABLE"), "{err}");
        // PATH is set in every test environment.
        assert!(secrets.read(&SecretRef::env("PATH")).is_ok());
    }
}
