//! Errors of the configuration module.
//!
//! Every error names where the text came from (a file path or "embedded default") so an
//! operator can find the line to change without reading our source. Validation problems
//! are collected, not returned one at a time: fixing a file by rerunning the agent once
//! per mistake is the experience we want to avoid.

use std::fmt;
use std::path::PathBuf;

/// One thing wrong with a configuration document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path of the offending field, e.g. `networking.admin.port` or `routes[2].endpoints[0]`.
    /// Empty when the problem concerns the whole document (e.g. an empty file).
    pub field: String,
    /// What is wrong, with the offending value where that helps.
    pub message: String,
    /// What to write instead.
    pub fix: String,
}

impl Problem {
    pub(crate) fn new(
        field: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Problem {
    /// `field: message; fix`, the part after the origin in a [`ConfigError::Invalid`] line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}; {}", self.message, self.fix)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("{}: cannot read the file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The text is not YAML. `line` and `column` are 1-based; both are 0 when the parser
    /// did not report a position (it does for every syntax error we have seen).
    #[error("{}", fmt_parse(origin, *line, *column, message))]
    Parse {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },

    /// The YAML is well formed but breaks one or more rules. `problems` is never empty.
    #[error("{}", fmt_invalid(origin, problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The validation problems, empty for read and parse errors. Handy for callers that
    /// render problems themselves (e.g. the admin API on a rejected reload).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            ConfigError::Read { .. } | ConfigError::Parse { .. } => &[],
        }
    }
}

fn fmt_parse(origin: &str, line: usize, column: usize, message: &str) -> String {
    if line == 0 {
        format!("{origin}: invalid YAML: {message}")
    } else {
        format!("{origin}:{line}:{column}: invalid YAML: {message}")
    }
}

/// One line per problem, each prefixed with the origin, so every line can be read (and
/// grepped) on its own.
fn fmt_invalid(origin: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{origin}: {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Turns a serde_norway error into [`ConfigError::Parse`], moving the position out of the
/// message into `line`/`column` so it is printed once, in the `file:line:column` form
/// editors and terminals make clickable.
pub(crate) fn parse_error(origin: &str, err: &serde_norway::Error) -> ConfigError {
    let mut message = err.to_string();
    let (line, column) = match err.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            message = message.replacen(&suffix, "", 1);
            (loc.line(), loc.column())
        }
        None => (0, 0),
    };
    ConfigError::Parse {
        origin: origin.to_owned(),
        line,
        column,
        message,
    }
}
