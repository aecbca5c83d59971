//! xDS resources for the test control plane, as prost messages: Kuma's golden fixtures (parsed by
//! the agent's JSON loader into its model, then re-encoded) with addresses pointed at test
//! backends, plus the admin listener and static clusters a real Kuma CP adds for every proxy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::cluster::v3 as cluster_v3;
use envoy_types::pb::envoy::config::core::v3 as core_v3;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint_v3;
use envoy_types::pb::envoy::config::listener::v3 as listener_v3;
use envoy_types::pb::envoy::extensions::filters::network::direct_response::v3 as direct_v3;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_v3;
use envoy_types::pb::google::protobuf;
use prost::{Message, Name};
use zone_ingress::xds::model::{
    self, DiscoveryType, MetadataValue, NetworkFilter, SelectorFallback, SubsetFallback,
};

/// Kuma's xDS fixtures for ingresses, copied into the repository (see the NOTICE there).
pub fn fixture_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../zone-ingress/tests/fixtures/xds");
    assert!(
        dir.is_dir(),
        "the Kuma xDS fixtures are expected at {}",
        dir.display()
    );
    dir
}

pub fn fixture_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("list the fixtures")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".envoy.golden.yaml"))
        .collect();
    v.sort();
    v
}

/// One resource of each type as `Any`, grouped by type.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub clusters: Vec<protobuf::Any>,
    pub endpoints: Vec<protobuf::Any>,
    pub listeners: Vec<protobuf::Any>,
}

pub fn any<M: Message + Name>(m: &M) -> protobuf::Any {
    protobuf::Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// Loads a fixture, points its listener at `listen` and every distinct endpoint address at the
/// next of `backends` (in order of first appearance); returns the resources and the address map.
pub fn fixture(
    path: &Path,
    listen: SocketAddr,
    backends: &mut dyn Iterator<Item = SocketAddr>,
) -> (model::Resources, BTreeMap<String, SocketAddr>) {
    let mut res = zone_ingress::xds::load_file(path)
        .unwrap_or_else(|e| panic!("fixture {} does not load: {e}", path.display()));
    for l in &mut res.listeners {
        l.address = model::SocketAddress {
            address: listen.ip().to_string(),
            port_value: u32::from(listen.port()),
        };
    }
    let mut map = BTreeMap::new();
    for cla in &mut res.load_assignments {
        for loc in &mut cla.endpoints {
            for ep in &mut loc.lb_endpoints {
                let key = format!("{}:{}", ep.address.address, ep.address.port_value);
                let to = *map.entry(key).or_insert_with(|| {
                    backends
                        .next()
                        .expect("enough backend addresses for the fixture's endpoints")
                });
                ep.address = model::SocketAddress {
                    address: to.ip().to_string(),
                    port_value: u32::from(to.port()),
                };
            }
        }
    }
    (res, map)
}

/// The model as prost `Any`s, plus Kuma's admin listener on `admin` and its static clusters.
pub fn encode(res: &model::Resources, admin: Option<SocketAddr>) -> Resources {
    let mut out = Resources {
        clusters: res.clusters.iter().map(|c| any(&cluster(c))).collect(),
        endpoints: res.load_assignments.iter().map(|a| any(&cla(a))).collect(),
        listeners: res.listeners.iter().map(|l| any(&listener(l))).collect(),
    };
    if let Some(admin) = admin {
        out.listeners.push(any(&admin_listener(admin)));
        for (name, port) in [("kuma:envoy:admin", 9901), ("kuma:readiness", 9902)] {
            out.clusters.push(any(&static_cluster(name, port)));
        }
    }
    out
}

fn socket_address(a: &model::SocketAddress) -> core_v3::Address {
    core_v3::Address {
        address: Some(core_v3::address::Address::SocketAddress(
            core_v3::SocketAddress {
                address: a.address.clone(),
                port_specifier: Some(core_v3::socket_address::PortSpecifier::PortValue(
                    a.port_value,
                )),
                ..Default::default()
            },
        )),
    }
}

fn lb_struct(m: &BTreeMap<String, MetadataValue>) -> protobuf::Struct {
    protobuf::Struct {
        fields: m
            .iter()
            .map(|(k, v)| {
                let kind = match v {
                    MetadataValue::String(s) => protobuf::value::Kind::StringValue(s.clone()),
                    MetadataValue::Number(n) => protobuf::value::Kind::NumberValue(*n),
                    MetadataValue::Bool(b) => protobuf::value::Kind::BoolValue(*b),
                    MetadataValue::Null => protobuf::value::Kind::NullValue(0),
                };
                (k.clone(), protobuf::Value { kind: Some(kind) })
            })
            .collect(),
    }
}

fn lb_metadata(m: &BTreeMap<String, MetadataValue>) -> Option<core_v3::Metadata> {
    (!m.is_empty()).then(|| core_v3::Metadata {
        filter_metadata: [("envoy.lb".to_owned(), lb_struct(m))]
            .into_iter()
            .collect(),
        ..Default::default()
    })
}

pub fn listener(l: &model::Listener) -> listener_v3::Listener {
    listener_v3::Listener {
        name: l.name.clone(),
        address: Some(socket_address(&l.address)),
        traffic_direction: core_v3::TrafficDirection::Inbound as i32,
        listener_filters: l
            .listener_filters
            .iter()
            .map(|f| listener_v3::ListenerFilter {
                name: "envoy.filters.listener.tls_inspector".into(),
                config_type: f.starts_with("type.googleapis.com/").then(|| {
                    listener_v3::listener_filter::ConfigType::TypedConfig(protobuf::Any {
                        type_url: f.clone(),
                        value: Vec::new(),
                    })
                }),
                ..Default::default()
            })
            .collect(),
        filter_chains: l
            .filter_chains
            .iter()
            .map(|c| listener_v3::FilterChain {
                filter_chain_match: (!c.server_names.is_empty()
                    || !c.transport_protocol.is_empty())
                .then(|| listener_v3::FilterChainMatch {
                    server_names: c.server_names.clone(),
                    transport_protocol: c.transport_protocol.clone(),
                    ..Default::default()
                }),
                filters: c.filters.iter().map(network_filter).collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn network_filter(f: &NetworkFilter) -> listener_v3::Filter {
    let (name, typed) = match f {
        NetworkFilter::TcpProxy(t) => (
            "envoy.filters.network.tcp_proxy",
            any(&tcp_v3::TcpProxy {
                stat_prefix: t.cluster.replace(':', "_"),
                cluster_specifier: Some(tcp_v3::tcp_proxy::ClusterSpecifier::Cluster(
                    t.cluster.clone(),
                )),
                metadata_match: lb_metadata(&t.metadata_match),
                ..Default::default()
            }),
        ),
        NetworkFilter::DirectResponse { response } => (
            "envoy.filters.network.direct_response",
            any(&direct_v3::Config {
                response: Some(core_v3::DataSource {
                    specifier: Some(core_v3::data_source::Specifier::InlineBytes(
                        response.clone(),
                    )),
                    ..Default::default()
                }),
            }),
        ),
        NetworkFilter::Other { name, type_url } => {
            return listener_v3::Filter {
                name: name.clone(),
                config_type: Some(listener_v3::filter::ConfigType::TypedConfig(
                    protobuf::Any {
                        type_url: type_url.clone(),
                        value: Vec::new(),
                    },
                )),
            };
        }
    };
    listener_v3::Filter {
        name: name.into(),
        config_type: Some(listener_v3::filter::ConfigType::TypedConfig(typed)),
    }
}

pub fn cluster(c: &model::Cluster) -> cluster_v3::Cluster {
    use cluster_v3::cluster::lb_subset_config::LbSubsetFallbackPolicy as P;
    use cluster_v3::cluster::lb_subset_config::lb_subset_selector::LbSubsetSelectorFallbackPolicy as S;
    let ty = match c.discovery_type {
        DiscoveryType::Eds => cluster_v3::cluster::DiscoveryType::Eds,
        DiscoveryType::Other(_) => cluster_v3::cluster::DiscoveryType::Static,
    };
    cluster_v3::Cluster {
        name: c.name.clone(),
        alt_stat_name: c.name.replace(':', "_"),
        cluster_discovery_type: Some(cluster_v3::cluster::ClusterDiscoveryType::Type(ty as i32)),
        eds_cluster_config: Some(cluster_v3::cluster::EdsClusterConfig {
            eds_config: Some(core_v3::ConfigSource {
                resource_api_version: core_v3::ApiVersion::V3 as i32,
                config_source_specifier: Some(core_v3::config_source::ConfigSourceSpecifier::Ads(
                    core_v3::AggregatedConfigSource::default(),
                )),
                ..Default::default()
            }),
            service_name: c.eds_service_name.clone().unwrap_or_default(),
        }),
        connect_timeout: c.connect_timeout.map(|d| protobuf::Duration {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }),
        lb_subset_config: c.lb_subset_config.as_ref().map(|s| {
            cluster_v3::cluster::LbSubsetConfig {
                fallback_policy: match s.fallback_policy {
                    SubsetFallback::NoFallback => P::NoFallback,
                    SubsetFallback::AnyEndpoint => P::AnyEndpoint,
                    SubsetFallback::DefaultSubset => P::DefaultSubset,
                } as i32,
                subset_selectors: s
                    .subset_selectors
                    .iter()
                    .map(
                        |sel| cluster_v3::cluster::lb_subset_config::LbSubsetSelector {
                            keys: sel.keys.clone(),
                            fallback_policy: match sel.fallback_policy {
                                SelectorFallback::NotDefined => S::NotDefined,
                                SelectorFallback::NoFallback => S::NoFallback,
                                SelectorFallback::AnyEndpoint => S::AnyEndpoint,
                                SelectorFallback::Unsupported(_) => S::KeysSubset,
                            } as i32,
                            ..Default::default()
                        },
                    )
                    .collect(),
                ..Default::default()
            }
        }),
        ..Default::default()
    }
}

pub fn cla(a: &model::ClusterLoadAssignment) -> endpoint_v3::ClusterLoadAssignment {
    endpoint_v3::ClusterLoadAssignment {
        cluster_name: a.cluster_name.clone(),
        endpoints: a
            .endpoints
            .iter()
            .map(|loc| endpoint_v3::LocalityLbEndpoints {
                locality: (!loc.zone.is_empty()).then(|| core_v3::Locality {
                    zone: loc.zone.clone(),
                    ..Default::default()
                }),
                priority: loc.priority,
                lb_endpoints: loc
                    .lb_endpoints
                    .iter()
                    .map(|e| endpoint_v3::LbEndpoint {
                        host_identifier: Some(endpoint_v3::lb_endpoint::HostIdentifier::Endpoint(
                            endpoint_v3::Endpoint {
                                address: Some(socket_address(&e.address)),
                                ..Default::default()
                            },
                        )),
                        load_balancing_weight: e
                            .load_balancing_weight
                            .map(|value| protobuf::UInt32Value { value }),
                        metadata: lb_metadata(&e.lb_metadata),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Kuma's `kuma:envoy:admin` listener: an HTTP connection manager (opaque bytes here: the agent
/// keeps only the name and address of this listener).
pub fn admin_listener(addr: SocketAddr) -> listener_v3::Listener {
    listener_v3::Listener {
        name: "kuma:envoy:admin".into(),
        address: Some(socket_address(&model::SocketAddress {
            address: addr.ip().to_string(),
            port_value: u32::from(addr.port()),
        })),
        filter_chains: vec![listener_v3::FilterChain {
            filters: vec![listener_v3::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener_v3::filter::ConfigType::TypedConfig(protobuf::Any {
                    type_url: "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager".into(),
                    value: vec![0x0a, 0x05, b'a', b'd', b'm', b'i', b'n'],
                })),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn static_cluster(name: &str, port: u16) -> cluster_v3::Cluster {
    cluster_v3::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster_v3::cluster::ClusterDiscoveryType::Type(
            cluster_v3::cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(endpoint_v3::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![endpoint_v3::LocalityLbEndpoints {
                lb_endpoints: vec![endpoint_v3::LbEndpoint {
                    host_identifier: Some(endpoint_v3::lb_endpoint::HostIdentifier::Endpoint(
                        endpoint_v3::Endpoint {
                            address: Some(socket_address(&model::SocketAddress {
                                address: "127.0.0.1".into(),
                                port_value: u32::from(port),
                            })),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}
