//! Builds the [`crate::xds::model`] from the prost types of an ADS response.
//!
//! The model keeps only the fields a zone ingress acts on. Every other field that is *set* in a
//! resource is refused, by number, the way the JSON loader refuses unknown keys: applying a
//! config while silently ignoring part of it (a health check, an idle timeout, a weighted
//! cluster) would route differently from what the control plane meant. The check clears the
//! fields this module reads from a copy of each message and re-encodes the rest: any byte left
//! is a field we do not honour.
//!
//! Kuma's admin listener (`kuma:envoy:admin`, an HTTP connection manager behind mTLS) and the
//! static clusters only it uses (`kuma:envoy:admin`, `kuma:readiness`) are kept by name and
//! address only: the agent serves its own admin API and does not need their contents.

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster_v3;
use envoy_types::pb::envoy::config::core::v3 as core_v3;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint_v3;
use envoy_types::pb::envoy::config::listener::v3 as listener_v3;
use envoy_types::pb::envoy::extensions::filters::network::direct_response::v3 as direct_v3;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_v3;
use envoy_types::pb::google::protobuf;
use prost::Message;

use crate::xds::XdsError;
use crate::xds::model::{
    Cluster, ClusterLoadAssignment, DiscoveryType, FilterChain, LbEndpoint, LbSubsetConfig,
    Listener, LocalityLbEndpoints, MetadataValue, NetworkFilter, SelectorFallback, SocketAddress,
    SubsetFallback, SubsetSelector, TcpProxy,
};

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const CLA_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const TCP_PROXY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const DIRECT_RESPONSE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config";

/// Names of the admin-only resources Kuma adds for every proxy (`AdminProxyGenerator`).
fn is_kuma_admin_resource(name: &str) -> bool {
    matches!(name, "kuma:envoy:admin" | "kuma:readiness")
}

fn decode_err(field: String, message: impl Into<String>, fix: impl Into<String>) -> XdsError {
    XdsError::decode(field, message, fix)
}

/// Field numbers set in `rest` (a message whose supported fields were cleared), as an error.
fn refuse_rest<M: Message>(rest: &M, path: &str, message_name: &str) -> Result<(), XdsError> {
    let bytes = rest.encode_to_vec();
    if bytes.is_empty() {
        return Ok(());
    }
    let tags = field_numbers(&bytes);
    Err(decode_err(
        path.to_owned(),
        format!(
            "sets field{} {} of {message_name}, which a zone ingress does not implement",
            if tags.len() == 1 { "" } else { "s" },
            tags.iter()
                .map(|t| format!("#{t}"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        "a Kuma control plane does not send it to a zone ingress; check the CP version and any \
         custom xDS (ProxyTemplate, MeshProxyPatch) aimed at the ingress",
    ))
}

/// The top-level field numbers in an encoded message, in order, without repeats.
fn field_numbers(mut buf: &[u8]) -> Vec<u32> {
    let mut tags: Vec<u32> = Vec::new();
    let ctx = prost::encoding::DecodeContext::default();
    while !buf.is_empty() {
        let Ok((tag, wire_type)) = prost::encoding::decode_key(&mut buf) else {
            break;
        };
        if !tags.contains(&tag) {
            tags.push(tag);
        }
        if prost::encoding::skip_field(wire_type, tag, &mut buf, ctx.clone()).is_err() {
            break;
        }
    }
    tags
}

fn decode_any<M: Message + Default>(any: &protobuf::Any, path: &str) -> Result<M, XdsError> {
    M::decode(any.value.as_slice()).map_err(|e| {
        decode_err(
            path.to_owned(),
            format!("{} does not decode: {e}", any.type_url),
            "the control plane sent a malformed resource; check its logs",
        )
    })
}

// ---------------------------------------------------------------- listeners

pub fn listener(any: &protobuf::Any, path: &str) -> Result<Listener, XdsError> {
    let mut l: listener_v3::Listener = decode_any(any, path)?;
    let path = format!("{path} (listener {:?})", l.name);
    let name = std::mem::take(&mut l.name);
    let address = address(l.address.take(), &format!("{path}.address"))?;
    if name == crate::xds::ADMIN_LISTENER_NAME {
        // Served by the agent's own admin API; only its address matters (see module docs).
        return Ok(Listener {
            name,
            address,
            listener_filters: Vec::new(),
            filter_chains: Vec::new(),
        });
    }
    let mut listener_filters = Vec::new();
    for (i, mut f) in std::mem::take(&mut l.listener_filters)
        .into_iter()
        .enumerate()
    {
        let p = format!("{path}.listener_filters[{i}]");
        let fname = std::mem::take(&mut f.name);
        let ty = match f.config_type.take() {
            Some(listener_v3::listener_filter::ConfigType::TypedConfig(any)) => any.type_url,
            Some(_) => {
                return Err(decode_err(
                    p,
                    "config_discovery is not supported",
                    "give the filter an inline typed_config",
                ));
            }
            None => String::new(),
        };
        refuse_rest(&f, &p, "ListenerFilter")?;
        listener_filters.push(if ty.is_empty() { fname } else { ty });
    }
    let mut filter_chains = Vec::new();
    for (i, c) in std::mem::take(&mut l.filter_chains).into_iter().enumerate() {
        filter_chains.push(filter_chain(c, &format!("{path}.filter_chains[{i}]"))?);
    }
    // Envoy bookkeeping that changes nothing for a TCP ingress.
    l.traffic_direction = 0;
    l.enable_reuse_port = None;
    #[allow(deprecated)] // still on the wire from older CPs
    {
        l.reuse_port = false;
    }
    l.stat_prefix.clear();
    refuse_rest(&l, &path, "envoy.config.listener.v3.Listener")?;
    Ok(Listener {
        name,
        address,
        listener_filters,
        filter_chains,
    })
}

fn address(a: Option<core_v3::Address>, path: &str) -> Result<SocketAddress, XdsError> {
    let missing = || {
        decode_err(
            path.to_owned(),
            "is missing or not a socket_address",
            "give it {socket_address: {address, port_value}}",
        )
    };
    let Some(core_v3::address::Address::SocketAddress(mut sa)) = a.and_then(|a| a.address) else {
        return Err(missing());
    };
    let port_value = match sa.port_specifier.take() {
        Some(core_v3::socket_address::PortSpecifier::PortValue(p)) => p,
        Some(core_v3::socket_address::PortSpecifier::NamedPort(n)) => {
            return Err(decode_err(
                format!("{path}.socket_address.named_port"),
                format!("named port {n:?} is not supported"),
                "use port_value",
            ));
        }
        None => 0,
    };
    let address = std::mem::take(&mut sa.address);
    sa.protocol = 0; // TCP, the proto default; UDP would be refused below as a set field.
    refuse_rest(&sa, &format!("{path}.socket_address"), "SocketAddress")?;
    Ok(SocketAddress {
        address,
        port_value,
    })
}

fn filter_chain(mut c: listener_v3::FilterChain, path: &str) -> Result<FilterChain, XdsError> {
    let (server_names, transport_protocol) = match c.filter_chain_match.take() {
        Some(mut m) => {
            let names = std::mem::take(&mut m.server_names);
            let tp = std::mem::take(&mut m.transport_protocol);
            refuse_rest(
                &m,
                &format!("{path}.filter_chain_match"),
                "FilterChainMatch",
            )?;
            (names, tp)
        }
        None => (Vec::new(), String::new()),
    };
    let mut filters = Vec::new();
    for (i, f) in std::mem::take(&mut c.filters).into_iter().enumerate() {
        filters.push(network_filter(f, &format!("{path}.filters[{i}]"))?);
    }
    c.name.clear();
    refuse_rest(&c, path, "FilterChain")?;
    Ok(FilterChain {
        server_names,
        transport_protocol,
        filters,
    })
}

fn network_filter(mut f: listener_v3::Filter, path: &str) -> Result<NetworkFilter, XdsError> {
    let name = std::mem::take(&mut f.name);
    let any = match f.config_type.take() {
        Some(listener_v3::filter::ConfigType::TypedConfig(any)) => any,
        Some(_) => {
            return Err(decode_err(
                path.to_owned(),
                "config_discovery is not supported",
                "give the filter an inline typed_config",
            ));
        }
        None => {
            return Ok(NetworkFilter::Other {
                name,
                type_url: String::new(),
            });
        }
    };
    let tp = format!("{path}.typed_config");
    match any.type_url.as_str() {
        TCP_PROXY_TYPE => {
            let mut t: tcp_v3::TcpProxy = decode_any(&any, &tp)?;
            let cluster = match t.cluster_specifier.take() {
                Some(tcp_v3::tcp_proxy::ClusterSpecifier::Cluster(c)) => c,
                Some(tcp_v3::tcp_proxy::ClusterSpecifier::WeightedClusters(_)) => {
                    return Err(decode_err(
                        format!("{tp}.weighted_clusters"),
                        "weighted_clusters is not supported",
                        "route each SNI to one cluster, as Kuma does for a zone ingress",
                    ));
                }
                None => String::new(),
            };
            let metadata_match = match t.metadata_match.take() {
                Some(m) => lb_metadata(m, &format!("{tp}.metadata_match"))?,
                None => BTreeMap::new(),
            };
            t.stat_prefix.clear();
            // Envoy's tcp_proxy idle timeout (1h default); the agent has none of its own yet, so
            // an explicit one is accepted as the default behaviour would be: flows live until
            // either side closes. Kuma never sets it on the ingress.
            refuse_rest(&t, &tp, "TcpProxy")?;
            Ok(NetworkFilter::TcpProxy(TcpProxy {
                cluster,
                metadata_match,
            }))
        }
        DIRECT_RESPONSE_TYPE => {
            let mut d: direct_v3::Config = decode_any(&any, &tp)?;
            let response = match d.response.take().and_then(|r| r.specifier) {
                Some(core_v3::data_source::Specifier::InlineBytes(b)) => b,
                Some(core_v3::data_source::Specifier::InlineString(s)) => s.into_bytes(),
                Some(_) => {
                    return Err(decode_err(
                        format!("{tp}.response"),
                        "only inline_bytes and inline_string are supported",
                        "inline the response bytes",
                    ));
                }
                None => Vec::new(),
            };
            refuse_rest(&d, &tp, "direct_response Config")?;
            Ok(NetworkFilter::DirectResponse { response })
        }
        other => Ok(NetworkFilter::Other {
            name,
            type_url: other.to_owned(),
        }),
    }
}

fn lb_metadata(
    mut m: core_v3::Metadata,
    path: &str,
) -> Result<BTreeMap<String, MetadataValue>, XdsError> {
    let mut out = BTreeMap::new();
    // Other namespaces (envoy.transport_socket_match, io.kuma.labels) are informational.
    if let Some(lb) = m.filter_metadata.remove("envoy.lb") {
        for (k, v) in lb.fields {
            let p = format!("{path}.filter_metadata[\"envoy.lb\"].{k}");
            let value = match v.kind {
                Some(protobuf::value::Kind::StringValue(s)) => MetadataValue::String(s),
                Some(protobuf::value::Kind::NumberValue(n)) => MetadataValue::Number(n),
                Some(protobuf::value::Kind::BoolValue(b)) => MetadataValue::Bool(b),
                Some(protobuf::value::Kind::NullValue(_)) | None => MetadataValue::Null,
                Some(_) => {
                    return Err(decode_err(
                        p,
                        "lists and structs are not supported in envoy.lb metadata",
                        "use string values, as Kuma's tags are",
                    ));
                }
            };
            out.insert(k, value);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- clusters

pub fn cluster(any: &protobuf::Any, path: &str) -> Result<Cluster, XdsError> {
    let mut c: cluster_v3::Cluster = decode_any(any, path)?;
    let name = std::mem::take(&mut c.name);
    let path = format!("{path} (cluster {name:?})");
    let discovery_type = match c.cluster_discovery_type.take() {
        Some(cluster_v3::cluster::ClusterDiscoveryType::Type(t)) => {
            match cluster_v3::cluster::DiscoveryType::try_from(t) {
                Ok(cluster_v3::cluster::DiscoveryType::Eds) => DiscoveryType::Eds,
                Ok(other) => DiscoveryType::Other(other.as_str_name().to_owned()),
                Err(_) => DiscoveryType::Other(format!("type {t}")),
            }
        }
        Some(cluster_v3::cluster::ClusterDiscoveryType::ClusterType(t)) => {
            DiscoveryType::Other(format!("cluster_type {}", t.name))
        }
        None => DiscoveryType::Other("STATIC (the default when `type` is unset)".to_owned()),
    };
    if is_kuma_admin_resource(&name) {
        // A static cluster of Kuma's admin listener; see module docs.
        return Ok(Cluster {
            name,
            discovery_type,
            eds_service_name: None,
            connect_timeout: None,
            lb_subset_config: None,
        });
    }
    if c.lb_policy != cluster_v3::cluster::LbPolicy::RoundRobin as i32 {
        return Err(decode_err(
            format!("{path}.lb_policy"),
            format!("lb_policy {} is not supported", c.lb_policy),
            "use ROUND_ROBIN (Kuma's default for a zone ingress), or leave it out",
        ));
    }
    let eds_service_name = match c.eds_cluster_config.take() {
        Some(mut e) => {
            if let Some(mut src) = e.eds_config.take() {
                let ads = matches!(
                    src.config_source_specifier.take(),
                    Some(core_v3::config_source::ConfigSourceSpecifier::Ads(_))
                );
                if !ads {
                    return Err(decode_err(
                        format!("{path}.eds_cluster_config.eds_config"),
                        "endpoints from a source other than ADS are not supported",
                        "use eds_config: {ads: {}}",
                    ));
                }
                src.resource_api_version = 0;
                src.initial_fetch_timeout = None;
                refuse_rest(
                    &src,
                    &format!("{path}.eds_cluster_config.eds_config"),
                    "ConfigSource",
                )?;
            }
            let s = std::mem::take(&mut e.service_name);
            refuse_rest(
                &e,
                &format!("{path}.eds_cluster_config"),
                "EdsClusterConfig",
            )?;
            (!s.is_empty()).then_some(s)
        }
        None => None,
    };
    let connect_timeout = c
        .connect_timeout
        .take()
        .map(|d| duration(&d, &format!("{path}.connect_timeout")))
        .transpose()?;
    let lb_subset_config = c
        .lb_subset_config
        .take()
        .map(|s| subset_config(s, &format!("{path}.lb_subset_config")))
        .transpose()?;
    c.alt_stat_name.clear();
    refuse_rest(&c, &path, "envoy.config.cluster.v3.Cluster")?;
    Ok(Cluster {
        name,
        discovery_type,
        eds_service_name,
        connect_timeout,
        lb_subset_config,
    })
}

fn duration(d: &protobuf::Duration, path: &str) -> Result<Duration, XdsError> {
    let (Ok(secs), Ok(nanos)) = (u64::try_from(d.seconds), u32::try_from(d.nanos)) else {
        return Err(decode_err(
            path.to_owned(),
            "is negative",
            "give a positive duration, e.g. 5s",
        ));
    };
    if nanos >= 1_000_000_000 {
        return Err(decode_err(
            path.to_owned(),
            "has nanos ≥ 1e9",
            "normalise the duration",
        ));
    }
    Ok(Duration::new(secs, nanos))
}

fn subset_config(
    mut s: cluster_v3::cluster::LbSubsetConfig,
    path: &str,
) -> Result<LbSubsetConfig, XdsError> {
    use cluster_v3::cluster::lb_subset_config::LbSubsetFallbackPolicy as P;
    use cluster_v3::cluster::lb_subset_config::lb_subset_selector::LbSubsetSelectorFallbackPolicy as S;
    let fallback_policy = match P::try_from(s.fallback_policy) {
        Ok(P::NoFallback) => SubsetFallback::NoFallback,
        Ok(P::AnyEndpoint) => SubsetFallback::AnyEndpoint,
        Ok(P::DefaultSubset) => SubsetFallback::DefaultSubset,
        Err(_) => {
            return Err(decode_err(
                format!("{path}.fallback_policy"),
                format!("unknown value {}", s.fallback_policy),
                "use NO_FALLBACK or ANY_ENDPOINT",
            ));
        }
    };
    s.fallback_policy = 0;
    let mut subset_selectors = Vec::new();
    for (i, mut sel) in std::mem::take(&mut s.subset_selectors)
        .into_iter()
        .enumerate()
    {
        let p = format!("{path}.subset_selectors[{i}]");
        let fallback_policy = match S::try_from(sel.fallback_policy) {
            Ok(S::NotDefined) => SelectorFallback::NotDefined,
            Ok(S::NoFallback) => SelectorFallback::NoFallback,
            Ok(S::AnyEndpoint) => SelectorFallback::AnyEndpoint,
            Ok(S::DefaultSubset) => SelectorFallback::Unsupported("DEFAULT_SUBSET"),
            Ok(S::KeysSubset) => SelectorFallback::Unsupported("KEYS_SUBSET"),
            Err(_) => {
                return Err(decode_err(
                    format!("{p}.fallback_policy"),
                    format!("unknown value {}", sel.fallback_policy),
                    "use NO_FALLBACK or ANY_ENDPOINT",
                ));
            }
        };
        sel.fallback_policy = 0;
        let keys = std::mem::take(&mut sel.keys);
        refuse_rest(&sel, &p, "LbSubsetSelector")?;
        subset_selectors.push(SubsetSelector {
            keys,
            fallback_policy,
        });
    }
    refuse_rest(&s, path, "LbSubsetConfig")?;
    Ok(LbSubsetConfig {
        fallback_policy,
        subset_selectors,
    })
}

// ---------------------------------------------------------------- endpoints

pub fn load_assignment(any: &protobuf::Any, path: &str) -> Result<ClusterLoadAssignment, XdsError> {
    let mut a: endpoint_v3::ClusterLoadAssignment = decode_any(any, path)?;
    let cluster_name = std::mem::take(&mut a.cluster_name);
    let path = format!("{path} (load assignment {cluster_name:?})");
    let mut endpoints = Vec::new();
    for (i, mut le) in std::mem::take(&mut a.endpoints).into_iter().enumerate() {
        let p = format!("{path}.endpoints[{i}]");
        let zone = le.locality.take().map(|l| l.zone).unwrap_or_default();
        let priority = std::mem::take(&mut le.priority);
        let mut lb_endpoints = Vec::new();
        for (j, e) in std::mem::take(&mut le.lb_endpoints).into_iter().enumerate() {
            lb_endpoints.push(lb_endpoint(e, &format!("{p}.lb_endpoints[{j}]"))?);
        }
        // A locality weight only matters with locality-weighted LB, which Kuma does not enable;
        // locality metadata is informational.
        le.load_balancing_weight = None;
        le.metadata = None;
        refuse_rest(&le, &p, "LocalityLbEndpoints")?;
        endpoints.push(LocalityLbEndpoints {
            zone,
            priority,
            lb_endpoints,
        });
    }
    // Kuma leaves `policy` unset; overprovisioning/drop_overloads would change the balancing.
    refuse_rest(&a, &path, "ClusterLoadAssignment")?;
    Ok(ClusterLoadAssignment {
        cluster_name,
        endpoints,
    })
}

fn lb_endpoint(mut e: endpoint_v3::LbEndpoint, path: &str) -> Result<LbEndpoint, XdsError> {
    use core_v3::HealthStatus;
    let address = match e.host_identifier.take() {
        Some(endpoint_v3::lb_endpoint::HostIdentifier::Endpoint(mut ep)) => {
            let a = address(ep.address.take(), &format!("{path}.endpoint.address"))?;
            ep.hostname.clear();
            refuse_rest(&ep, &format!("{path}.endpoint"), "Endpoint")?;
            a
        }
        _ => {
            return Err(decode_err(
                format!("{path}.endpoint"),
                "is missing",
                "give the endpoint {address: {socket_address: {address, port_value}}}",
            ));
        }
    };
    // The CP only sends healthy inbounds; an explicit UNKNOWN/HEALTHY is the same thing. An
    // unhealthy status is refused rather than silently routed to.
    match HealthStatus::try_from(e.health_status) {
        Ok(HealthStatus::Unknown | HealthStatus::Healthy) => e.health_status = 0,
        _ => {
            return Err(decode_err(
                format!("{path}.health_status"),
                format!("health_status {} is not supported", e.health_status),
                "send only healthy endpoints, as Kuma does",
            ));
        }
    }
    let load_balancing_weight = e.load_balancing_weight.take().map(|w| w.value);
    let lb_metadata = match e.metadata.take() {
        Some(m) => lb_metadata(m, &format!("{path}.metadata"))?,
        None => BTreeMap::new(),
    };
    refuse_rest(&e, path, "LbEndpoint")?;
    Ok(LbEndpoint {
        address,
        load_balancing_weight,
        lb_metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any<M: Message + prost::Name>(m: &M) -> protobuf::Any {
        protobuf::Any {
            type_url: M::type_url(),
            value: m.encode_to_vec(),
        }
    }

    #[test]
    fn set_fields_outside_the_model_are_refused_by_number() {
        let mut c = cluster_v3::Cluster {
            name: "mesh:backend".into(),
            cluster_discovery_type: Some(cluster_v3::cluster::ClusterDiscoveryType::Type(
                cluster_v3::cluster::DiscoveryType::Eds as i32,
            )),
            ..Default::default()
        };
        assert!(cluster(&any(&c), "resources[0]").is_ok());
        c.per_connection_buffer_limit_bytes = Some(protobuf::UInt32Value { value: 1 });
        let err = cluster(&any(&c), "resources[0]").unwrap_err().to_string();
        assert!(err.contains("cluster \"mesh:backend\""), "{err}");
        // per_connection_buffer_limit_bytes is field 5 of Cluster.
        assert!(
            err.contains("#5 of envoy.config.cluster.v3.Cluster"),
            "{err}"
        );
    }

    #[test]
    fn garbage_bytes_are_a_decode_error_not_a_panic() {
        let bad = protobuf::Any {
            type_url: LISTENER_TYPE.into(),
            value: vec![0xff, 0xff, 0xff],
        };
        let err = listener(&bad, "resources[0]").unwrap_err().to_string();
        assert!(err.contains("does not decode"), "{err}");
    }

    #[test]
    fn field_numbers_lists_each_tag_once() {
        let l = listener_v3::Listener {
            name: "x".into(),
            stat_prefix: "y".into(),
            ..Default::default()
        };
        assert_eq!(field_numbers(&l.encode_to_vec()), vec![1, 28]);
    }
}
