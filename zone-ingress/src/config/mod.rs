//! Configuration: the ZoneIngress resource and the standalone routes file.
//!
//! - [`ZoneIngress`]: Kuma's universal-format resource, the same file `kuma-dp run
//!   --proxy-type=ingress --dataplane-file` takes, validated with Kuma's rules so that a file
//!   we accept is one the control plane accepts too.
//! - [`RoutesFile`]: SNI → endpoints for running without a control plane (`cargo xtask run`).
//! - [`AgentConfig`]: this agent's own settings (`--agent-config`), next to the resource: the
//!   XDP guard.
//!
//! The parsers report every problem of a document at once, each naming the file, the field
//! and a fix (see [`ConfigError`]). The defaults in `config/` are compiled in so the binary
//! runs with no files at all, and the tests keep them valid.

mod agent;
mod error;
mod routes;
mod yaml;
mod zone_ingress;

pub use agent::{
    AgentConfig, DEFAULT_MAX_SOURCES, GuardSection, XdpMode, interface_problem, parse_cidr,
};
pub use error::{ConfigError, Problem};
pub use routes::{MAX_SNI_LEN, RouteSpec, RoutesFile};
pub use zone_ingress::{
    Admin, AvailableService, DEFAULT_ADMIN_PORT, DEFAULT_PORT, Networking, ZoneIngress,
};

/// `config/zone-ingress.yaml`: a local ingress on 127.0.0.1:10001, admin on 9901.
pub const DEFAULT_ZONE_INGRESS_YAML: &str = include_str!("../../../config/zone-ingress.yaml");
/// `config/routes.yaml`: two SNIs routed to `openssl s_server`'s default 127.0.0.1:4433.
pub const DEFAULT_ROUTES_YAML: &str = include_str!("../../../config/routes.yaml");

/// Reads the file at `path` and parses it with `parse(text, origin)`; messages name the path.
fn load_file<T>(
    path: &std::path::Path,
    parse: impl FnOnce(&str, &str) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}
