//! Loading the worker's YAML files (the config, and the catalog it may point at):
//! `${VAR}` expansion (config only), parsing, validation, and errors that name the
//! file, the line, the path in the document and what was expected.

use std::fmt;
use std::path::{Path, PathBuf};

use nexo_api::WorkerConfig;
use nexo_api::config::Catalog;
use nexo_api::validate::{self, DocPath, PathSegment};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<LocatedProblem>,
    },
}

/// A problem with its place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedProblem {
    pub line: Option<u64>,
    pub column: Option<u64>,
    /// Path in the document, such as `agents[0].spec.model`; empty for the root.
    pub doc_path: String,
    pub message: String,
}

impl fmt::Display for LocatedProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "{line}:")?;
            if let Some(column) = self.column {
                write!(f, "{column}:")?;
            }
            write!(f, " ")?;
        }
        if !self.doc_path.is_empty() {
            write!(f, "{}: ", self.doc_path)?;
        }
        write!(f, "{}", self.message)
    }
}

fn render_problems(path: &Path, problems: &[LocatedProblem]) -> String {
    let mut out = format!("{}: invalid config", path.display());
    for problem in problems {
        out.push_str(&format!("\n  {}:{problem}", path.display()));
    }
    out
}

/// Reads, expands, parses and validates the config at `path`.
pub fn load(path: &Path) -> Result<WorkerConfig, ConfigError> {
    parse(path, &read(path)?, |name| std::env::var(name).ok())
}

/// Parses config text; `env` looks up variables for `${VAR}` expansion.
pub fn parse(
    path: &Path,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<WorkerConfig, ConfigError> {
    let text = expand_env(text, env).map_err(|p| invalid(path, vec![p]))?;
    parse_document(path, &text, validate::validate)
}

/// Reads, parses and validates the catalog file at `path` (`worker.catalogFile`).
pub fn load_catalog(path: &Path) -> Result<Catalog, ConfigError> {
    parse_catalog(path, &read(path)?)
}

/// Parses and validates catalog text. Unlike a config file, a catalog is not
/// `${VAR}`-expanded: the operator renders it from cluster resources whose text (a
/// system prompt, say) may contain `$` literally, and the worker's environment must
/// not leak into it.
pub fn parse_catalog(path: &Path, text: &str) -> Result<Catalog, ConfigError> {
    parse_document(path, text, validate::validate_catalog)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, problems: Vec<LocatedProblem>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        problems,
    }
}

/// Deserializes `text` into a `T`, then runs `check` on it; every problem is located
/// in the file.
fn parse_document<T: DeserializeOwned>(
    path: &Path,
    text: &str,
    check: impl FnOnce(&T) -> Vec<validate::Problem>,
) -> Result<T, ConfigError> {
    let document = deserialize(text).map_err(|p| invalid(path, vec![p]))?;
    let problems = check(&document);
    if problems.is_empty() {
        return Ok(document);
    }
    // Only now is the located tree worth building: it serves error messages.
    let tree: Option<Spanned<Node>> = serde_saphyr::from_str(text).ok();
    Err(invalid(
        path,
        problems
            .into_iter()
            .map(|p| {
                let location = tree.as_ref().and_then(|t| t.locate(&p.path));
                LocatedProblem {
                    line: location.map(|l| l.line()),
                    column: location.map(|l| l.column()),
                    doc_path: p.path.to_string(),
                    message: p.message,
                }
            })
            .collect(),
    ))
}

fn deserialize<T: DeserializeOwned>(text: &str) -> Result<T, LocatedProblem> {
    let mut doc_path = String::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |deserializer| {
        serde_path_to_error::deserialize::<_, T>(deserializer).map_err(|err| {
            doc_path = err.path().to_string();
            err.into_inner()
        })
    });
    let error = match result {
        Ok(document) => return Ok(document),
        Err(error) => error,
    };
    let location = error.location();
    let mut message = error.without_snippet().to_string();
    // The location is reported separately; drop the parser's own copy of it.
    if let Some(location) = location {
        let suffix = format!(" at line {}, column {}", location.line(), location.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_owned();
        }
    }
    // An unknown key where no key is allowed (`type: local` takes no other): the
    // parser lists the choices, which are none.
    if let Some(stripped) = message.strip_suffix(", expected one of ") {
        message = format!("{stripped}: no other key is allowed here");
    }
    Err(LocatedProblem {
        line: location.map(|l| l.line()),
        column: location.map(|l| l.column()),
        doc_path: if doc_path == "." {
            String::new()
        } else {
            doc_path
        },
        message,
    })
}

/// Replaces `${NAME}` and `${NAME:-default}` with environment values, line by line so
/// reported line numbers stay true. `$$` stands for a literal `$`.
fn expand_env(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<String, LocatedProblem> {
    let mut out = String::with_capacity(text.len());
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let problem = |message: String| LocatedProblem {
            line: Some(index as u64 + 1),
            column: None,
            doc_path: String::new(),
            message,
        };
        let mut rest = line;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
            } else if let Some(body) = after.strip_prefix('{') {
                let end = body
                    .find('}')
                    .ok_or_else(|| problem("`${` without a closing `}`".to_owned()))?;
                let (name, default) = match body[..end].split_once(":-") {
                    Some((name, default)) => (name, Some(default)),
                    None => (&body[..end], None),
                };
                let value = env(name)
                    .filter(|v| !v.is_empty())
                    .or(default.map(str::to_owned));
                match value {
                    Some(value) if value.contains('\n') => {
                        return Err(problem(format!(
                            "environment variable `{name}` holds a line break; only single-line values can be substituted"
                        )));
                    }
                    Some(value) => out.push_str(&value),
                    None => {
                        return Err(problem(format!(
                            "environment variable `{name}` is not set and `${{{name}}}` has no default (write `${{{name}:-default}}`)"
                        )));
                    }
                }
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// A YAML document with the location of every value, used to point validation
/// errors at a line.
#[derive(Debug)]
enum Node {
    Scalar,
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(String, Spanned<Node>)>),
}

trait Locate {
    fn locate(&self, path: &DocPath) -> Option<serde_saphyr::Location>;
}

impl Locate for Spanned<Node> {
    fn locate(&self, path: &DocPath) -> Option<serde_saphyr::Location> {
        let mut node = self;
        // Deepest value found so far: a missing key points at its parent.
        let mut found = node.referenced;
        for segment in &path.0 {
            let next = match (&node.value, segment) {
                (Node::Map(entries), PathSegment::Key(key)) => {
                    entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
                }
                (Node::Seq(items), PathSegment::Index(index)) => items.get(*index),
                _ => None,
            };
            match next {
                Some(next) => {
                    node = next;
                    found = node.referenced;
                }
                None => break,
            }
        }
        Some(found)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NodeVisitor;

        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = Node;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }

            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Spanned<Node>>()? {
                    entries.push((key, value));
                }
                Ok(Node::Map(entries))
            }
        }

        deserializer.deserialize_any(NodeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(text: &str) -> Result<String, LocatedProblem> {
        expand_env(text, |name| (name == "SET").then(|| "value".to_owned()))
    }

    #[test]
    fn env_expansion() {
        assert_eq!(expand("a: ${SET}\n").unwrap(), "a: value\n");
        assert_eq!(expand("a: ${UNSET:-dflt}\n").unwrap(), "a: dflt\n");
        assert_eq!(expand("a: ${SET:-dflt}\n").unwrap(), "a: value\n");
        assert_eq!(expand("a: $$HOME $x\n").unwrap(), "a: $HOME $x\n");
        let err = expand("a: 1\nb: ${UNSET}\n").unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(
            err.message.contains("`UNSET` is not set"),
            "{}",
            err.message
        );
        assert_eq!(expand("a: ${OPEN\n").unwrap_err().line, Some(1));
    }
}
