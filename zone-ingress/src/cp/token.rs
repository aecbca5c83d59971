//! The dataplane token: a zone token (universal) or the pod's ServiceAccount token (Kubernetes),
//! sent raw as the `authorization` metadata of every ADS stream and in the bootstrap request.
//!
//! A file is re-read at every (re)connection, so a rotated ServiceAccount token or a renewed
//! zone token is picked up without a restart. The token is a secret: it is never logged, never
//! in `/config_dump`, and a file others can read draws a warning.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::CpError;

#[derive(Clone, Default)]
pub enum TokenSource {
    /// `--dataplane-token-file` / `KUMA_DATAPLANE_RUNTIME_TOKEN_PATH`.
    File(PathBuf),
    /// `--dataplane-token`.
    Inline(String),
    /// No token: for a CP with zone proxy authentication `none`.
    #[default]
    None,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::File(p) => write!(f, "File({})", p.display()),
            TokenSource::Inline(_) => f.write_str("Inline(<redacted>)"),
            TokenSource::None => f.write_str("None"),
        }
    }
}

impl TokenSource {
    /// The token now, whitespace trimmed; `None` when there is no token source.
    pub fn read(&self) -> Result<Option<String>, CpError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Inline(t) => Ok(Some(t.trim().to_owned())),
            TokenSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    CpError::Config(format!(
                        "cannot read the dataplane token file {}: {e} (generate one with \
                         `kumactl generate zone-token --zone <zone> --scope ingress`, or on \
                         Kubernetes mount the ServiceAccount token)",
                        path.display()
                    ))
                })?;
                let token = text.trim().to_owned();
                if token.is_empty() {
                    return Err(CpError::Config(format!(
                        "the dataplane token file {} is empty",
                        path.display()
                    )));
                }
                Ok(Some(token))
            }
        }
    }

    /// The path for the bootstrap request's `dataplaneTokenPath`.
    pub fn path_string(&self) -> String {
        match self {
            TokenSource::File(p) => p.display().to_string(),
            _ => String::new(),
        }
    }

    /// Warns once if the token file is readable by group or others.
    pub fn warn_if_exposed(&self) {
        if let TokenSource::File(path) = self {
            warn_if_group_or_world_readable(path, "dataplane token");
        }
    }
}

/// Logs a warning when a secret file's mode lets group or others read it.
pub fn warn_if_group_or_world_readable(path: &std::path::Path, what: &str) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o044 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the {what} file is readable by group or others; restrict it with chmod 600"
            );
        }
    }
}
