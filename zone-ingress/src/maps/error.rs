//! What can go wrong reading the pinned maps, each saying what to check.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error(
        "the pin directory {dir} does not exist: is an agent running (or did one run) with \
         `--pin-dir {dir}` and a kernel datapath (`--datapath auto|sockmap`; `userspace` pins \
         nothing)? Pass the agent's directory with --pin-dir"
    )]
    PinDirMissing { dir: PathBuf },
    #[error("cannot read the pin directory {dir}: {source} (reading pinned maps needs root)")]
    PinDir { dir: PathBuf, source: io::Error },
    #[error(
        "{path} is missing: the pin directory holds no {name} map (an agent of another version, \
         or not a zone-ingress pin directory)"
    )]
    MapMissing { name: &'static str, path: PathBuf },
    #[error(
        "opening the pinned map {path}: {detail} (reading pinned maps needs root: CAP_BPF or CAP_SYS_ADMIN)"
    )]
    Open { path: PathBuf, detail: String },
    #[error(
        "{name} at {path} has an unexpected layout: {what} is {found}, this zone-ingress expects \
         {expected} (the pins were left by an agent of another version; read them with that \
         version, or restart the agent to re-pin)"
    )]
    Layout {
        name: &'static str,
        path: PathBuf,
        what: &'static str,
        expected: String,
        found: String,
    },
    #[error("reading {name}: {detail}")]
    Read { name: &'static str, detail: String },
}
