//! Walking an untyped YAML tree while collecting problems.
//!
//! We parse into `serde_norway::Value` and check fields by hand instead of deriving
//! `Deserialize` with `deny_unknown_fields`: serde stops at the first mistake, and we want
//! to report every unknown field, wrong type and broken rule of a file in one go, each with
//! its full path and a fix.

use serde_norway::{Mapping, Value};

use super::error::{ConfigError, Problem, parse_error};

/// Parses YAML text into a tree. Syntax errors carry line and column.
pub(crate) fn parse(text: &str, origin: &str) -> Result<Value, ConfigError> {
    let mut value: Value = serde_norway::from_str(text).map_err(|e| parse_error(origin, &e))?;
    // Kuma reads resources with a YAML library that honours `<<` merge keys; do the same so
    // a file that works with kuma-dp works here.
    value.apply_merge().map_err(|e| parse_error(origin, &e))?;
    Ok(value)
}

/// `parent.key`, or `key` at the root.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[index]`.
pub(crate) fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// A short description of a value's kind for "expected X, found Y" messages.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing (null)".to_owned(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// Collected problems of one document.
#[derive(Default)]
pub(crate) struct Problems(pub(crate) Vec<Problem>);

impl Problems {
    pub(crate) fn push(
        &mut self,
        field: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.0.push(Problem::new(field, message, fix));
    }

    /// `Ok(value)` when nothing was reported, else every problem at once.
    pub(crate) fn finish<T>(self, origin: &str, value: Option<T>) -> Result<T, ConfigError> {
        match value {
            Some(v) if self.0.is_empty() => Ok(v),
            _ => {
                let mut problems = self.0;
                // Every path that leaves `value` empty reports why; this guards against a
                // future edit forgetting to, so the caller never sees an empty problem list.
                if problems.is_empty() {
                    problems.push(Problem::new(
                        "",
                        "the document could not be read for an unreported reason (a bug in zone-ingress)",
                        "please report this with the file attached",
                    ));
                }
                Err(ConfigError::Invalid {
                    origin: origin.to_owned(),
                    problems,
                })
            }
        }
    }
}

/// A mapping whose keys have been checked against a list of known fields.
pub(crate) struct Fields<'a> {
    map: &'a Mapping,
    path: String,
    /// Known fields that an unknown key looked like a misspelling of (e.g. `SNI` → `sni`).
    /// Callers skip their "missing" report for these: the rename fix already covers it.
    misspelled: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    /// Checks that `value` is a mapping whose keys are all strings from `known` or `ignored`.
    /// `ignored` fields are accepted silently (Kuma metadata we have no use for). Returns
    /// `None`, with a problem recorded, when `value` is not a mapping at all.
    pub(crate) fn check(
        value: &'a Value,
        path: &str,
        known: &[&'static str],
        ignored: &[&str],
        problems: &mut Problems,
    ) -> Option<Self> {
        let Value::Mapping(map) = value else {
            problems.push(
                path,
                format!("expected a mapping, found {}", describe(value)),
                format!(
                    "write it as `key: value` lines with the fields {}",
                    known.join(", ")
                ),
            );
            return None;
        };
        let mut misspelled = Vec::new();
        for key in map.keys() {
            let Value::String(key) = key else {
                problems.push(
                    path,
                    format!("field names must be strings, found {}", describe(key)),
                    format!("use one of the fields {}", known.join(", ")),
                );
                continue;
            };
            if known.contains(&key.as_str()) || ignored.contains(&key.as_str()) {
                continue;
            }
            let fix = match suggest(key, known) {
                Some(s) => {
                    misspelled.push(s);
                    format!("rename it to `{s}`")
                }
                None => "remove it".to_owned(),
            };
            let mut message = format!("unknown field `{key}` (known fields: {}", known.join(", "));
            if !ignored.is_empty() {
                message.push_str(&format!("; accepted and ignored: {}", ignored.join(", ")));
            }
            message.push(')');
            problems.push(join(path, key), message, fix);
        }
        Some(Self {
            map,
            path: path.to_owned(),
            misspelled,
        })
    }

    /// The value of `key`; an explicit `null` counts as absent, as it does for Kuma
    /// (protobuf JSON treats null as "use the default").
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    /// The value of `key` as written, `null` included, for fields where an empty value is
    /// a mistake worth naming rather than a default.
    pub(crate) fn raw(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    /// Reports `key` as missing, unless an unknown field was already flagged as its
    /// misspelling (one mistake, one problem).
    pub(crate) fn missing(&self, key: &str, fix: impl Into<String>, problems: &mut Problems) {
        self.missing_because(key, "missing", fix, problems);
    }

    /// Like [`Fields::missing`] with a custom message.
    pub(crate) fn missing_because(
        &self,
        key: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
        problems: &mut Problems,
    ) {
        if !self.misspelled.contains(&key) {
            problems.push(self.path(key), message, fix);
        }
    }

    /// Full path of `key` inside this mapping.
    pub(crate) fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// A string field. Non-strings are reported (numbers and booleans would otherwise be
    /// silently turned into text that may not be what the user meant, e.g. `1.10` → `1.1`).
    pub(crate) fn string(&self, key: &str, problems: &mut Problems) -> Option<String> {
        let v = self.get(key)?;
        as_string(v, &self.path(key), problems)
    }

    /// A TCP port, 1-65535.
    pub(crate) fn port(&self, key: &str, problems: &mut Problems) -> Option<u16> {
        let v = self.get(key)?;
        as_port(v, &self.path(key), problems)
    }

    /// An unsigned 32-bit integer.
    pub(crate) fn u32(&self, key: &str, problems: &mut Problems) -> Option<u32> {
        let v = self.get(key)?;
        let field = self.path(key);
        let n = as_integer(v, &field, "a whole number from 0 to 4294967295", problems)?;
        match u32::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                problems.push(
                    field,
                    format!("{n} is out of range"),
                    format!("use a whole number between 0 and {}", u32::MAX),
                );
                None
            }
        }
    }

    /// A boolean.
    pub(crate) fn bool(&self, key: &str, problems: &mut Problems) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            other => {
                problems.push(
                    self.path(key),
                    format!("expected true or false, found {}", describe(other)),
                    "write true or false without quotes",
                );
                None
            }
        }
    }
}

pub(crate) fn as_string(v: &Value, field: &str, problems: &mut Problems) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        other => {
            problems.push(
                field,
                format!("expected a string, found {}", describe(other)),
                "write a string, quoted if it looks like a number or boolean",
            );
            None
        }
    }
}

/// A port: 1-65535. A quoted number is accepted because Kuma's protobuf JSON reader
/// accepts `"10001"` for a numeric field, and a file that works with kuma-dp should work here.
pub(crate) fn as_port(v: &Value, field: &str, problems: &mut Problems) -> Option<u16> {
    let n = as_integer(v, field, "a port number between 1 and 65535", problems)?;
    match u16::try_from(n) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            problems.push(
                field,
                format!("port {n} is not a valid TCP port"),
                "use a port between 1 and 65535",
            );
            None
        }
    }
}

fn as_integer(v: &Value, field: &str, what: &str, problems: &mut Problems) -> Option<i128> {
    let parsed = match v {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from)),
        Value::String(s) => s.trim().parse::<i128>().ok(),
        _ => None,
    };
    if parsed.is_none() {
        problems.push(
            field,
            format!("expected {what}, found {}", describe(v)),
            format!("write {what}, without quotes"),
        );
    }
    parsed
}

/// The known field that `key` most likely meant: same letters ignoring case, `_` and `-`
/// (`advertised_address`, `AdvertisedAddress` → `advertisedAddress`).
fn suggest(key: &str, known: &[&'static str]) -> Option<&'static str> {
    let norm = |s: &str| {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    let key = norm(key);
    known.iter().copied().find(|k| norm(k) == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggest_matches_snake_and_pascal_case() {
        let known = ["advertisedAddress", "port"];
        assert_eq!(
            suggest("advertised_address", &known),
            Some("advertisedAddress")
        );
        assert_eq!(
            suggest("AdvertisedAddress", &known),
            Some("advertisedAddress")
        );
        assert_eq!(suggest("portt", &known), None);
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let err = match parse("a: b\n  c: [", "f.yaml") {
            Err(e) => e,
            Ok(v) => panic!("parsed {v:?}"),
        };
        let ConfigError::Parse { line, column, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*line, 2);
        assert!(*column > 0);
        let text = err.to_string();
        assert!(text.starts_with("f.yaml:2:"), "{text}");
        assert!(
            !text.contains(" at line "),
            "position printed twice: {text}"
        );
    }

    #[test]
    fn merge_keys_are_applied() {
        let v = match parse("base: &b {port: 1}\nx:\n  <<: *b\n", "f") {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(v["x"]["port"], Value::from(1));
    }
}
