//! Reading secret values named by [`SecretRef`]s: from the process environment, or
//! from files under `worker.secretsDir` (where the operator mounts the Kubernetes
//! Secret keys a pool needs). Values are read when a component is built (and kept by
//! it), never logged, and never written back anywhere. A mounted key can be rotated
//! while the worker runs: a component built with a [`Secrets::recording`] reader
//! keeps a [`Fingerprint`] of the files it read, and a [`SecretWatch`] reads those
//! files again in the background to tell when one changed. Environment variables
//! cannot change while the process runs, so they are not watched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexo_api::spec::SecretRef;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

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
    /// What a recording reader read from files.
    read: Option<Arc<Mutex<BTreeMap<PathBuf, FileRead>>>>,
}

/// One read of a mounted secret file: a digest of the value (`None`: missing or
/// empty) and when the read started.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FileRead {
    digest: Option<[u8; 32]>,
    at: Instant,
}

impl FileRead {
    fn of(value: Option<&str>, at: Instant) -> Self {
        Self {
            digest: value.map(|v| Sha256::digest(v.as_bytes()).into()),
            at,
        }
    }
}

/// The mounted secret files a component read when it was built, with a digest of
/// what it read in each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fingerprint(BTreeMap<PathBuf, FileRead>);

impl Fingerprint {
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        self.0.keys()
    }
}

impl Secrets {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            read: None,
        }
    }

    /// A reader of the same secrets that notes what it reads from files: build a
    /// component with it, then take its [`Secrets::fingerprint`].
    pub fn recording(&self) -> Self {
        Self {
            dir: self.dir.clone(),
            read: Some(Arc::default()),
        }
    }

    /// What this (recording) reader read from files so far.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint(
            self.read
                .as_ref()
                .map(|read| read.lock().unwrap().clone())
                .unwrap_or_default(),
        )
    }

    /// The value `secret` names. An unset or empty value is an error: callers that
    /// can go on without one use [`Secrets::read_optional`].
    pub fn read(&self, secret: &SecretRef) -> Result<String, SecretError> {
        self.read_optional(secret)?
            .ok_or_else(|| SecretError::Missing(describe(secret)))
    }

    /// An API key: the value `secret` names. A missing key (unset, empty, no file) is
    /// an error when `required`; otherwise it is `None` and a warning, given once per
    /// key, says the service is called without one (servers such as Ollama need none).
    pub fn read_key(
        &self,
        secret: &SecretRef,
        required: bool,
    ) -> Result<Option<String>, SecretError> {
        match self.read_optional(secret)? {
            Some(value) => Ok(Some(value)),
            None if required => Err(SecretError::Missing(describe(secret))),
            None => {
                static WARNED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
                let what = describe(secret);
                if WARNED.lock().unwrap().insert(what.clone()) {
                    tracing::warn!(secret = %what, "API key is not set; calling without a key");
                }
                Ok(None)
            }
        }
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
        let at = Instant::now();
        let value = match std::fs::read_to_string(&path) {
            Ok(value) => Ok(file_value(value)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SecretError::Unreadable {
                what: describe(secret),
                path: path.clone(),
                source,
            }),
        };
        if let Some(read) = &self.read {
            let seen = value.as_ref().ok().and_then(Option::as_deref);
            read.lock().unwrap().insert(path, FileRead::of(seen, at));
        }
        value
    }
}

/// The value in a secret file: files written by tools often end in a newline that is
/// not part of a key.
fn file_value(text: String) -> Option<String> {
    Some(text.trim_end_matches(['\r', '\n']).to_owned()).filter(|v| !v.is_empty())
}

/// Reads the mounted secret files of running components again every `period`
/// (asynchronously, each file once per period), so that a rotated key is noticed
/// without reading files on every check.
#[derive(Clone, Default)]
pub struct SecretWatch(Arc<Mutex<Watched>>);

#[derive(Default)]
struct Watched {
    files: BTreeSet<PathBuf>,
    /// The latest read of each watched file.
    seen: HashMap<PathBuf, FileRead>,
}

impl SecretWatch {
    /// Starts reading the watched files every `period` until `stop`.
    pub fn spawn(period: Duration, stop: CancellationToken) -> Self {
        let watch = Self::default();
        let reader = watch.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(period) => {}
                }
                reader.refresh().await;
            }
        });
        watch
    }

    /// Watches exactly `files` from now on.
    pub fn watch(&self, files: impl IntoIterator<Item = PathBuf>) {
        let mut watched = self.0.lock().unwrap();
        watched.files = files.into_iter().collect();
        let Watched { files, seen } = &mut *watched;
        seen.retain(|path, _| files.contains(path));
    }

    /// Reads every watched file once.
    pub async fn refresh(&self) {
        let files = self.0.lock().unwrap().files.clone();
        for path in files {
            let at = Instant::now();
            let value = match tokio::fs::read_to_string(&path).await {
                Ok(text) => file_value(text),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
                Err(err) => {
                    tracing::warn!(file = %path.display(), error = %err, "cannot read a mounted secret to see whether it was rotated");
                    continue;
                }
            };
            let read = FileRead::of(value.as_deref(), at);
            let mut watched = self.0.lock().unwrap();
            if watched.files.contains(&path) {
                watched.seen.insert(path, read);
            }
        }
    }

    /// Whether a file of `fingerprint` has changed since the component read it: a
    /// read of the file that started after the component's shows another value.
    pub fn rotated(&self, fingerprint: &Fingerprint) -> bool {
        let watched = self.0.lock().unwrap();
        fingerprint.0.iter().any(|(path, built)| {
            watched
                .seen
                .get(path)
                .is_some_and(|now| now.at > built.at && now.digest != built.digest)
        })
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

    #[tokio::test]
    async fn a_rotation_after_the_read_is_seen() {
        let dir = std::env::temp_dir().join(format!("nexo-secrets-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let reference = SecretRef::secret_key("llm", "api-key");
        let file = dir.join(
            reference
                .secret_key_ref
                .as_ref()
                .unwrap()
                .mounted_file_name(),
        );
        std::fs::write(&file, "old\n").unwrap();
        let watch = SecretWatch::default();
        watch.watch([file.clone()]);
        // A read of the watch that started before the component's says nothing.
        watch.refresh().await;

        let secrets = Secrets::new(&dir).recording();
        assert_eq!(secrets.read(&reference).unwrap(), "old");
        // Environment variables are not watched: they cannot change.
        secrets.read_optional(&SecretRef::env("PATH")).unwrap();
        let fingerprint = secrets.fingerprint();
        assert_eq!(fingerprint.files().collect::<Vec<_>>(), [&file]);
        assert!(!watch.rotated(&fingerprint));
        watch.refresh().await;
        assert!(!watch.rotated(&fingerprint));

        std::fs::write(&file, "new\n").unwrap();
        assert!(!watch.rotated(&fingerprint), "not read again yet");
        watch.refresh().await;
        assert!(watch.rotated(&fingerprint));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_key_fails_only_when_required() {
        let secrets = Secrets::new("/nonexistent");
        let unset = SecretRef::secret_key("llm", "api-key");
        assert_eq!(secrets.read_key(&unset, false).unwrap(), None);
        let err = secrets.read_key(&unset, true).unwrap_err().to_string();
        assert!(err.contains("key `api-key` of Secret `llm`"), "{err}");
        let set = SecretRef::env("PATH");
        assert!(secrets.read_key(&set, true).unwrap().is_some());
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
