//! The subset of Envoy's xDS resources a Kuma control plane sends a zone ingress.
//!
//! Each type mirrors one proto message (`envoy.config.listener.v3.Listener`,
//! `envoy.config.cluster.v3.Cluster`, `envoy.config.endpoint.v3.ClusterLoadAssignment` and the
//! messages inside them), with proto field names, keeping only the fields the ingress acts on.
//! Values stay close to the wire (addresses as strings, enums with an `Other` case) so that
//! every check that can fail lives in one place, [`super::route_table`], whichever way the model
//! was built: from the proto3 JSON of a file ([`super::json`]) today, from the prost types of an
//! ADS stream later. A builder from prost types must reject the fields this model leaves out
//! when they are set, as the JSON loader does.

use std::collections::BTreeMap;
use std::time::Duration;

/// One snapshot: every listener, cluster and load assignment, in the order received.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
    pub load_assignments: Vec<ClusterLoadAssignment>,
}

/// `core.v3.SocketAddress` with a port (`port_value`); `address` is not parsed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAddress {
    pub address: String,
    pub port_value: u32,
}

/// `listener.v3.Listener`.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddress,
    /// Listener filter names (or type URLs when unnamed), e.g.
    /// `envoy.filters.listener.tls_inspector`.
    pub listener_filters: Vec<String>,
    pub filter_chains: Vec<FilterChain>,
}

/// `listener.v3.FilterChain`: its match and its network filters.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterChain {
    /// `filter_chain_match.server_names`; empty matches any SNI.
    pub server_names: Vec<String>,
    /// `filter_chain_match.transport_protocol`; empty matches any.
    pub transport_protocol: String,
    pub filters: Vec<NetworkFilter>,
}

/// One entry of `FilterChain.filters`, decoded by the type URL of its `typed_config`.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkFilter {
    /// `envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy`.
    TcpProxy(TcpProxy),
    /// `envoy.extensions.filters.network.direct_response.v3.Config`: bytes sent, then close.
    DirectResponse { response: Vec<u8> },
    /// Any other filter; kept so the error can name it with its listener and chain.
    Other { name: String, type_url: String },
}

/// `tcp_proxy.v3.TcpProxy` (the `cluster` form; `weighted_clusters` is not supported).
#[derive(Debug, Clone, PartialEq)]
pub struct TcpProxy {
    pub cluster: String,
    /// `metadata_match.filter_metadata["envoy.lb"]`; empty when there is no metadata_match.
    pub metadata_match: BTreeMap<String, MetadataValue>,
}

/// A `google.protobuf.Value` in endpoint or match metadata. Kuma only writes strings; lists
/// and structs are refused by the builders.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    String(String),
    Number(f64),
    Bool(bool),
    Null,
}

impl std::fmt::Display for MetadataValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetadataValue::String(s) => write!(f, "{s:?}"),
            MetadataValue::Number(n) => write!(f, "{n}"),
            MetadataValue::Bool(b) => write!(f, "{b}"),
            MetadataValue::Null => f.write_str("null"),
        }
    }
}

/// `cluster.v3.Cluster.DiscoveryType`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryType {
    Eds,
    /// STATIC, STRICT_DNS, LOGICAL_DNS, ORIGINAL_DST or a number: named in the error.
    Other(String),
}

/// `cluster.v3.Cluster`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub name: String,
    pub discovery_type: DiscoveryType,
    /// `eds_cluster_config.service_name`: the CLA name when it differs from the cluster's.
    pub eds_service_name: Option<String>,
    /// `connect_timeout`; Envoy's default is 5s when unset.
    pub connect_timeout: Option<Duration>,
    pub lb_subset_config: Option<LbSubsetConfig>,
}

impl Cluster {
    /// Envoy's default connect timeout.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// The name of the ClusterLoadAssignment that feeds this cluster.
    pub fn eds_name(&self) -> &str {
        self.eds_service_name.as_deref().unwrap_or(&self.name)
    }
}

/// `Cluster.LbSubsetConfig.LbSubsetFallbackPolicy` (the cluster-wide fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubsetFallback {
    /// The proto default: no endpoint when no subset matches.
    NoFallback,
    AnyEndpoint,
    /// DEFAULT_SUBSET: needs `default_subset`, which Kuma never sends; refused.
    DefaultSubset,
}

/// `Cluster.LbSubsetConfig.LbSubsetSelector.LbSubsetSelectorFallbackPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectorFallback {
    /// The proto default: use the cluster-wide fallback.
    NotDefined,
    NoFallback,
    AnyEndpoint,
    /// DEFAULT_SUBSET or KEYS_SUBSET: refused (Kuma never sends them).
    Unsupported(&'static str),
}

/// `Cluster.LbSubsetConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbSubsetConfig {
    pub fallback_policy: SubsetFallback,
    pub subset_selectors: Vec<SubsetSelector>,
}

/// `Cluster.LbSubsetConfig.LbSubsetSelector`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsetSelector {
    pub keys: Vec<String>,
    pub fallback_policy: SelectorFallback,
}

/// `endpoint.v3.ClusterLoadAssignment`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterLoadAssignment {
    pub cluster_name: String,
    pub endpoints: Vec<LocalityLbEndpoints>,
}

/// `endpoint.v3.LocalityLbEndpoints`.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalityLbEndpoints {
    /// `locality.zone` (Kuma's `kuma.io/zone`); informational at the ingress.
    pub zone: String,
    pub priority: u32,
    pub lb_endpoints: Vec<LbEndpoint>,
}

/// `endpoint.v3.LbEndpoint`.
#[derive(Debug, Clone, PartialEq)]
pub struct LbEndpoint {
    pub address: SocketAddress,
    /// `load_balancing_weight`; `None` when unset (Envoy then uses 1).
    pub load_balancing_weight: Option<u32>,
    /// `metadata.filter_metadata["envoy.lb"]`.
    pub lb_metadata: BTreeMap<String, MetadataValue>,
}
