//! The Kuma control-plane session, as `kuma-dp run --proxy-type=ingress` holds it
//! (PROTOCOL.md §1): `POST /bootstrap`, then one long-lived ADS stream (state of the world, over
//! gRPC/TLS, authenticated by the dataplane token) whose Listener, Cluster and
//! ClusterLoadAssignment resources become the route table.
//!
//! - [`tls`]: the verified TLS connection both calls use.
//! - [`bootstrap`]: the bootstrap request with kuma-dp's retry rules.
//! - [`node`]: the Envoy node identity and metadata the CP keys the proxy by.
//! - [`proto`]: prost resources → [`crate::xds::model`], refusing fields we do not implement.
//! - [`ads`]: the stream itself: subscribe, ACK/NACK, apply, reconnect.
//! - [`token`]: the dataplane token, re-read at every connection, never logged.
//!
//! The data path never waits for any of this: flows use whatever table was applied last, and a
//! control plane that goes away only stops updates.

pub mod ads;
pub mod bootstrap;
pub mod node;
pub mod proto;
pub mod tls;
pub mod token;

use std::time::Duration;

pub use ads::{AdsClient, Applied};
pub use bootstrap::BootstrapInfo;
pub use tls::Trust;
pub use token::TokenSource;

/// Kuma's readiness reporter port (`KUMA_READINESS_PORT`).
pub const DEFAULT_READINESS_PORT: u16 = 9902;

#[derive(Debug, thiserror::Error)]
pub enum CpError {
    /// Bad flags, files or addresses: nothing to retry.
    #[error("{0}")]
    Config(String),
    #[error(
        "the control plane rejected the bootstrap request with HTTP {status}: {body} (the \
         ZoneIngress or the request is invalid; check --dataplane-file and --name)"
    )]
    BootstrapRejected { status: u16, body: String },
    #[error(
        "no bootstrap from the control plane at {cp} after {attempts} attempts in {after:?}; \
         last error: {last}"
    )]
    BootstrapGaveUp {
        cp: String,
        after: Duration,
        attempts: u32,
        last: String,
    },
    #[error("the control plane's bootstrap answer is unusable: {0}")]
    BadBootstrap(String),
    #[error(
        "the control plane rejected the dataplane token: {0} (check that the token is a zone \
         token with scope `ingress` for this zone (`kumactl generate zone-token --zone <zone> \
         --scope ingress`), not expired or revoked, and that --dataplane-token-file points at it)"
    )]
    TokenRejected(String),
}

/// `--cp-address`: `https://host:port` (Kuma's dp-server, 5678) or `http://` for a CP without
/// TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpAddress {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl CpAddress {
    pub fn parse(s: &str) -> Result<Self, CpError> {
        let bad = |why: &str| {
            CpError::Config(format!(
                "--cp-address {s:?}: {why} (expected e.g. https://kuma-control-plane.kuma-system:5678)"
            ))
        };
        let uri: http::Uri = s.trim().parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(_) => return Err(bad("the scheme must be https or http")),
            None => return Err(bad("the scheme (https://) is missing")),
        };
        let host = uri
            .host()
            .ok_or_else(|| bad("the host is missing"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if !matches!(uri.path(), "" | "/") {
            return Err(bad("give only scheme, host and port, no path"));
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Self { tls, host, port })
    }

    /// `host:port`, with brackets around an IPv6 host.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for CpAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

/// Everything the session needs, from flags and environment (see `cli.rs`).
#[derive(Debug, Clone)]
pub struct CpOptions {
    pub address: CpAddress,
    /// `None` with an `http://` address.
    pub trust: Option<Trust>,
    pub token: TokenSource,
    /// The ZoneIngress name: `--name`, the resource's name, or `$POD_NAME.$POD_NAMESPACE`.
    pub name: String,
    /// The ZoneIngress resource as JSON (universal), sent as `dataplaneResource` and as node
    /// metadata; the CP upserts it on connect.
    pub dataplane_resource: Option<String>,
    pub admin_port: u16,
    pub readiness_port: u16,
    /// How long `/bootstrap` is retried (kuma-dp: 5 minutes).
    pub bootstrap_retry_for: Duration,
    /// How long a control plane may stay silent where it owes an answer: the TLS handshake, and
    /// the first response on a new ADS stream (Envoy's `initial_fetch_timeout`, 15 s). Past it
    /// the connection is dropped and retried.
    pub response_timeout: Duration,
}

/// [`CpOptions::response_timeout`] by default.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// A development knob: [`CpOptions::response_timeout`] in seconds (tests shorten it).
pub const RESPONSE_TIMEOUT_ENV: &str = "ZONE_INGRESS_CP_RESPONSE_TIMEOUT";

impl CpOptions {
    /// The CA PEM for the bootstrap request's `caCert`.
    pub fn ca_pem_string(&self) -> String {
        match &self.trust {
            Some(Trust::CaPem(pem)) => String::from_utf8_lossy(pem).into_owned(),
            _ => String::new(),
        }
    }
}
