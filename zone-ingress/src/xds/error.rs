//! Why a set of xDS resources cannot become a route table.
//!
//! The messages become the `error_detail` of a NACK once the ADS client exists, so each names
//! the resource (listener, filter chain, cluster, endpoint) and says what Kuma would have sent
//! instead. They never name a file: a caller reading a file prefixes its path.

/// Filter chains are numbered from 0, their index in `filter_chains`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XdsError {
    /// The YAML/JSON text does not parse.
    #[error("not valid YAML or JSON: {0}")]
    Syntax(String),

    /// A field of the proto3 JSON document has a wrong type, an unsupported value, or is not
    /// part of what a Kuma control plane sends a zone ingress. `field` is its path, e.g.
    /// `resources[2].resource.filterChains[0].filterChainMatch.destinationPort`.
    #[error("{field}: {message}; {fix}")]
    Decode {
        field: String,
        message: String,
        fix: String,
    },

    #[error(
        "no data listener in LDS (listeners seen: {seen:?}); a Kuma zone ingress gets one listener named inbound:<address>:<port>"
    )]
    NoListener { seen: Vec<String> },

    #[error(
        "{} data listeners in LDS ({names:?}); a zone ingress serves exactly one (besides kuma:envoy:admin)",
        names.len()
    )]
    ManyListeners { names: Vec<String> },

    #[error("listener {listener}: address {address:?}: {reason}")]
    ListenerAddress {
        listener: String,
        address: String,
        reason: String,
    },

    #[error(
        "listener {listener}: listener filter {filter:?} is not supported; only envoy.filters.listener.tls_inspector is"
    )]
    UnsupportedListenerFilter { listener: String, filter: String },

    #[error(
        "listener {listener}: filter chains match on server_names but listener_filters has no envoy.filters.listener.tls_inspector, so no SNI would ever be seen; add it"
    )]
    MissingTlsInspector { listener: String },

    #[error(
        "listener {listener}: filter chain {chain}{sni}: has {count} network filters; a zone ingress chain has exactly one (tcp_proxy, or direct_response for the catch-all)",
        sni = fmt_snis(server_names)
    )]
    FilterCount {
        listener: String,
        chain: usize,
        server_names: Vec<String>,
        count: usize,
    },

    #[error(
        "listener {listener}: filter chain {chain}{sni}: network filter {name:?} ({type_url}) is not supported; only envoy.filters.network.tcp_proxy and envoy.filters.network.direct_response are",
        sni = fmt_snis(server_names)
    )]
    UnsupportedFilter {
        listener: String,
        chain: usize,
        server_names: Vec<String>,
        name: String,
        type_url: String,
    },

    #[error(
        "listener {listener}: filter chain {chain}: tcp_proxy without server_names would take every connection; a zone ingress routes by exact SNI, so give the chain filter_chain_match.server_names"
    )]
    CatchAllTcpProxy { listener: String, chain: usize },

    #[error(
        "listener {listener}: filter chain {chain}{sni}: direct_response is only supported as the catch-all chain (no filter_chain_match), as Kuma sends it when there are no clusters",
        sni = fmt_snis(server_names)
    )]
    MatchedDirectResponse {
        listener: String,
        chain: usize,
        server_names: Vec<String>,
    },

    #[error(
        "listener {listener}: filter chains {first} and {second} are both catch-all chains (no filter_chain_match); keep one"
    )]
    DuplicateCatchAll {
        listener: String,
        first: usize,
        second: usize,
    },

    #[error(
        "listener {listener}: filter chain {chain}{sni}: transport_protocol {found:?} is not supported; use \"tls\" (the ingress only routes TLS by SNI)",
        sni = fmt_snis(server_names)
    )]
    TransportProtocol {
        listener: String,
        chain: usize,
        server_names: Vec<String>,
        found: String,
    },

    #[error("listener {listener}: filter chain {chain}: server name {sni:?}: {reason}")]
    BadSni {
        listener: String,
        chain: usize,
        sni: String,
        reason: String,
    },

    #[error(
        "listener {listener}: server name {sni:?} is in filter chains {first} and {second}; each SNI must select exactly one chain"
    )]
    DuplicateSni {
        listener: String,
        sni: String,
        first: usize,
        second: usize,
    },

    #[error(
        "listener {listener}: filter chain {chain}{sni}: tcp_proxy references cluster {cluster:?} that is not in CDS",
        sni = fmt_snis(server_names)
    )]
    UnknownCluster {
        listener: String,
        chain: usize,
        server_names: Vec<String>,
        cluster: String,
    },

    #[error("cluster {name:?} appears {count} times in CDS; cluster names must be unique")]
    DuplicateCluster { name: String, count: usize },

    #[error("ClusterLoadAssignment {name:?} appears {count} times in EDS; send one per cluster")]
    DuplicateLoadAssignment { name: String, count: usize },

    #[error(
        "cluster {cluster:?}: type {found} is not supported; a zone ingress cluster is type EDS"
    )]
    UnsupportedClusterType { cluster: String, found: String },

    #[error(
        "cluster {cluster:?}: no ClusterLoadAssignment named {eds_name:?} in EDS; send one (with no endpoints if the service has none)"
    )]
    NoLoadAssignment { cluster: String, eds_name: String },

    #[error(
        "cluster {cluster:?}: lb_subset_config: {what} is not supported; Kuma sends fallback_policy ANY_ENDPOINT with NO_FALLBACK selectors"
    )]
    UnsupportedSubsetPolicy { cluster: String, what: String },

    #[error(
        "ClusterLoadAssignment {cluster:?}: endpoints[{locality}].lb_endpoints[{endpoint}]: address {address:?} port {port}: {reason}"
    )]
    EndpointAddress {
        cluster: String,
        locality: usize,
        endpoint: usize,
        address: String,
        port: u32,
        reason: String,
    },

    #[error(
        "ClusterLoadAssignment {cluster:?}: endpoints[{locality}].lb_endpoints[{endpoint}]: load_balancing_weight 0 is invalid; it must be at least 1 (or unset, meaning 1)"
    )]
    ZeroWeight {
        cluster: String,
        locality: usize,
        endpoint: usize,
    },
}

/// ` (server_names ["a", "b"])`, or nothing for a chain without server names.
fn fmt_snis(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" (server_names {names:?})")
    }
}

impl XdsError {
    /// The snapshot refers to something not delivered yet (a listener, a cluster, its
    /// endpoints): valid so far, but not a table to apply. Over ADS such an update is ACKed and
    /// applied when the rest arrives, as Envoy warms clusters.
    pub fn is_incomplete(&self) -> bool {
        matches!(
            self,
            XdsError::NoListener { .. }
                | XdsError::UnknownCluster { .. }
                | XdsError::NoLoadAssignment { .. }
        )
    }

    pub(crate) fn decode(
        field: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        XdsError::Decode {
            field: field.into(),
            message: message.into(),
            fix: fix.into(),
        }
    }
}
