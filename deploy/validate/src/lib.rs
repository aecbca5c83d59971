//! Checks of zone-ingress's deployment files (`deploy/`, `Dockerfile`): the Kubernetes manifests
//! against the API schema of a released Kubernetes, the flags and variables they pass against the
//! agent's own command line, the Dockerfile against what `cargo xtask build` does, and the systemd
//! unit. The tests in `tests/` use these readers; they run in `cargo xtask test`.

pub mod clihelp;
pub mod dockerfile;
pub mod k8s;
pub mod unit;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The agent binary: `$ZONE_INGRESS_BIN` (set by `cargo xtask test`), else
/// `<repo>/target/release/zone-ingress`.
pub fn agent_binary() -> PathBuf {
    let path = std::env::var_os("ZONE_INGRESS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/zone-ingress"));
    assert!(
        path.is_file(),
        "agent binary {} not found: run `cargo xtask build` (or `cargo xtask test`), or point \
         ZONE_INGRESS_BIN at a built zone-ingress",
        path.display()
    );
    path
}

/// kuma-dp's control-plane flags and the variable each reads: the interface a drop-in for
/// `kuma-dp run --proxy-type=ingress` exposes (PROTOCOL.md 1.2). `None`: no variable.
pub const KUMA_DP_INTERFACE: &[(&str, Option<&str>)] = &[
    ("--cp-address", Some("KUMA_CONTROL_PLANE_URL")),
    ("--ca-cert-file", Some("KUMA_CONTROL_PLANE_CA_CERT_FILE")),
    (
        "--dataplane-token-file",
        Some("KUMA_DATAPLANE_RUNTIME_TOKEN_PATH"),
    ),
    ("--dataplane-token", Some("KUMA_DATAPLANE_RUNTIME_TOKEN")),
    // kuma-dp reads the resource file from its flag only; zone-ingress also takes it from
    // ZONE_INGRESS_CONFIG (the variable of its `--config` alias).
    ("--dataplane-file", Some("ZONE_INGRESS_CONFIG")),
    ("--name", Some("KUMA_DATAPLANE_NAME")),
    ("--proxy-type", Some("KUMA_DATAPLANE_PROXY_TYPE")),
    ("--drain-time", Some("KUMA_DATAPLANE_DRAIN_TIME")),
];

/// The flag whose presence in `run --help` means the control-plane client has landed: from then
/// on every entry of [`KUMA_DP_INTERFACE`] must be there, bound to its variable.
pub const CONTROL_PLANE_MARKER: &str = "--cp-address";

/// Variables the agent reads without a flag: the pod identity it names itself after on
/// Kubernetes, and the log filter.
pub const PLAIN_ENV: &[&str] = &["POD_NAME", "POD_NAMESPACE", "RUST_LOG", "NO_COLOR"];

/// The capabilities to load, attach and pin the BPF programs, in Kubernetes' spelling (no
/// `CAP_` prefix). The manifests and the unit must grant exactly these; the capabilities test
/// proves they are enough and that each one is needed (PERFMON for the verdict's retransmission
/// trim, which the agent otherwise reports it cannot do).
pub const BPF_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "PERFMON"];
