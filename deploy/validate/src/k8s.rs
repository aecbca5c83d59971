//! Validation of Kubernetes manifests against the API types of a released Kubernetes version
//! (k8s-openapi, feature `v1_33`).
//!
//! Each YAML document is deserialized into the typed object its `apiVersion`/`kind` name. The
//! types alone catch wrong types and missing required fields; unknown fields need two more
//! checks, because k8s-openapi skips them silently (as the API server does without
//! `--validate=strict`):
//! - `serde_ignored` reports every key the typed deserializer skipped, with its path;
//! - the typed object is serialized back and compared with the document: anything the types
//!   dropped or changed (a `null`, a value in a shape the type normalises) is reported too.

use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// One problem in one document, with the JSON path to the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// Index of the YAML document in the file (0-based).
    pub doc: usize,
    /// `.spec.template.spec.containers[0].name` style; `.` for the document itself.
    pub path: String,
    pub kind: ProblemKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// Not YAML, or a document that is not a mapping.
    Syntax,
    /// `apiVersion`/`kind` missing, or a pair this validator has no schema for.
    UnknownKind,
    /// A field the schema does not have.
    UnknownField,
    /// A field of the wrong type, or a value the types reject.
    Schema,
    /// A required field is missing (k8s-openapi fills it with a default; the round trip shows it).
    MissingRequired,
    /// The object does not survive a round trip through its type unchanged.
    RoundTrip,
    /// `metadata.name` missing (the schema allows it, `kubectl apply` does not).
    MissingName,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (document {}): {}: {:?}: {}",
            self.file.display(),
            self.doc,
            self.path,
            self.kind,
            self.message
        )
    }
}

/// Errors of the YAML/JSON plumbing itself (not of the manifests).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A document that validated: its identity and its content (as JSON) for further checks.
#[derive(Debug, Clone)]
pub struct Object {
    pub file: PathBuf,
    pub doc: usize,
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    pub value: Value,
}

/// The result of validating one file: the objects that passed and the problems of the others.
#[derive(Debug, Default)]
pub struct Report {
    pub objects: Vec<Object>,
    pub problems: Vec<Problem>,
}

/// Reads and validates one manifest file (any number of `---`-separated documents).
pub fn validate_file(path: &Path) -> Result<Report, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(validate_str(path, &text))
}

/// Validates manifest text; `file` only names it in problems.
pub fn validate_str(file: &Path, text: &str) -> Report {
    let mut report = Report::default();
    for (doc, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let problem = |path: &str, kind, message: String| Problem {
            file: file.to_path_buf(),
            doc,
            path: path.to_owned(),
            kind,
            message,
        };
        let value: Value = match serde::Deserialize::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                report
                    .problems
                    .push(problem(".", ProblemKind::Syntax, e.to_string()));
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        if value.is_null() {
            // An empty document (a trailing `---`, a file of comments): nothing to apply.
            continue;
        }
        match validate_value(&value) {
            Ok(()) => {
                let meta = &value["metadata"];
                report.objects.push(Object {
                    file: file.to_path_buf(),
                    doc,
                    api_version: value["apiVersion"].as_str().unwrap_or_default().to_owned(),
                    kind: value["kind"].as_str().unwrap_or_default().to_owned(),
                    name: meta["name"].as_str().unwrap_or_default().to_owned(),
                    namespace: meta["namespace"].as_str().map(str::to_owned),
                    value,
                });
            }
            Err(found) => report.problems.extend(
                found
                    .into_iter()
                    .map(|(path, kind, message)| problem(&path, kind, message)),
            ),
        }
    }
    report
}

type Found = Vec<(String, ProblemKind, String)>;

/// Validates one document (already parsed to JSON) against the type its apiVersion/kind name.
pub fn validate_value(value: &Value) -> Result<(), Found> {
    if !value.is_object() {
        return Err(vec![(
            ".".into(),
            ProblemKind::Syntax,
            "a manifest document must be a mapping".into(),
        )]);
    }
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    let kind = value.get("kind").and_then(Value::as_str);
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        return Err(vec![(
            ".".into(),
            ProblemKind::UnknownKind,
            "apiVersion and kind must both be set (strings)".into(),
        )]);
    };
    let mut found = match (api_version, kind) {
        ("v1", "Namespace") => check_typed::<Namespace>(value),
        ("v1", "ServiceAccount") => check_typed::<ServiceAccount>(value),
        ("v1", "Service") => check_typed::<Service>(value),
        ("v1", "ConfigMap") => check_typed::<ConfigMap>(value),
        ("v1", "Secret") => check_typed::<Secret>(value),
        ("apps/v1", "DaemonSet") => check_typed::<DaemonSet>(value),
        ("apps/v1", "Deployment") => check_typed::<Deployment>(value),
        ("rbac.authorization.k8s.io/v1", "Role") => check_typed::<Role>(value),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => check_typed::<RoleBinding>(value),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => check_typed::<ClusterRole>(value),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            check_typed::<ClusterRoleBinding>(value)
        }
        _ => vec![(
            ".".into(),
            ProblemKind::UnknownKind,
            format!(
                "no schema for apiVersion {api_version:?} kind {kind:?} (known: v1 Namespace, \
                 ServiceAccount, Service, ConfigMap, Secret; apps/v1 DaemonSet, Deployment; \
                 rbac.authorization.k8s.io/v1 Role, RoleBinding, ClusterRole, ClusterRoleBinding)"
            ),
        )],
    };
    let has_name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if !has_name {
        found.push((
            ".metadata.name".into(),
            ProblemKind::MissingName,
            "every applied object needs a name".into(),
        ));
    }
    if found.is_empty() { Ok(()) } else { Err(found) }
}

fn check_typed<T: DeserializeOwned + Serialize>(value: &Value) -> Found {
    let mut found = Found::new();
    let mut ignored = Vec::new();
    let typed: Result<T, _> = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        value.clone(),
        &mut |path: serde_ignored::Path<'_>| ignored.push(path.to_string()),
    ));
    for path in ignored {
        found.push((
            ignored_path(&path),
            ProblemKind::UnknownField,
            "the schema has no such field (misspelt, or indented under the wrong parent?)".into(),
        ));
    }
    let typed = match typed {
        Ok(t) => t,
        Err(e) => {
            found.push((
                format!(".{}", e.path()),
                ProblemKind::Schema,
                e.inner().to_string(),
            ));
            return found;
        }
    };
    match serde_json::to_value(&typed) {
        Ok(back) => {
            let mut diffs = Vec::new();
            diff(value, &back, String::new(), &mut diffs);
            found.extend(diffs);
        }
        Err(e) => found.push((
            ".".into(),
            ProblemKind::RoundTrip,
            format!("the typed object does not serialize back: {e}"),
        )),
    }
    found
}

/// serde_ignored's `spec.?.containers.?.0.name` (`?` for an Option) in the style of
/// serde_path_to_error: `.spec.containers[0].name`.
fn ignored_path(path: &str) -> String {
    let mut out = String::new();
    for seg in path.split('.').filter(|s| *s != "?") {
        if !seg.is_empty() && seg.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            out.push('.');
            out.push_str(seg);
        }
    }
    out
}

/// Records where `original` and `back` (the same document after the typed round trip) differ.
/// A field only in `back` is a required field the document lacks: k8s-openapi deserializes a
/// missing required field to its default instead of failing.
fn diff(original: &Value, back: &Value, path: String, out: &mut Found) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(vb) => diff(va, vb, p, out),
                    None => out.push((
                        p,
                        ProblemKind::RoundTrip,
                        format!("dropped by the schema (value {va})"),
                    )),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push((
                    format!("{path}.{k}"),
                    ProblemKind::MissingRequired,
                    "required by the schema, missing here".into(),
                ));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                diff(va, vb, format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push((
            if path.is_empty() { ".".into() } else { path },
            ProblemKind::RoundTrip,
            format!("{a} became {b}"),
        )),
    }
}

/// The `.yaml`/`.yml` files directly in `dir`, sorted.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let read = |source| LoadError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The file name kustomize reads in a directory; not a Kubernetes API object.
pub const KUSTOMIZATION: &str = "kustomization.yaml";
