//! Resolution and validation on models built directly (as the ADS client will build them).

use std::collections::BTreeMap;
use std::time::Duration;

use super::model::*;
use super::*;

const L: &str = "inbound:10.0.0.1:10001";

fn sa(address: &str, port: u32) -> SocketAddress {
    SocketAddress {
        address: address.to_owned(),
        port_value: port,
    }
}

fn md(pairs: &[(&str, &str)]) -> BTreeMap<String, MetadataValue> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), MetadataValue::String(v.to_string())))
        .collect()
}

fn ep(addr: &str, port: u32, tags: &[(&str, &str)]) -> LbEndpoint {
    LbEndpoint {
        address: sa(addr, port),
        load_balancing_weight: Some(1),
        lb_metadata: md(tags),
    }
}

fn cla(name: &str, eps: Vec<LbEndpoint>) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            zone: String::new(),
            priority: 0,
            lb_endpoints: eps,
        }],
    }
}

fn cluster(name: &str, subset: Option<LbSubsetConfig>) -> Cluster {
    Cluster {
        name: name.to_owned(),
        discovery_type: DiscoveryType::Eds,
        eds_service_name: None,
        connect_timeout: Some(Duration::from_secs(5)),
        lb_subset_config: subset,
    }
}

/// What Kuma sends: ANY_ENDPOINT for the cluster, NO_FALLBACK per selector.
fn kuma_subset(selectors: &[&[&str]]) -> Option<LbSubsetConfig> {
    Some(LbSubsetConfig {
        fallback_policy: SubsetFallback::AnyEndpoint,
        subset_selectors: selectors
            .iter()
            .map(|keys| SubsetSelector {
                keys: keys.iter().map(|k| k.to_string()).collect(),
                fallback_policy: SelectorFallback::NoFallback,
            })
            .collect(),
    })
}

fn tcp(cluster: &str, mm: &[(&str, &str)]) -> NetworkFilter {
    NetworkFilter::TcpProxy(TcpProxy {
        cluster: cluster.to_owned(),
        metadata_match: md(mm),
    })
}

fn chain(snis: &[&str], filter: NetworkFilter) -> FilterChain {
    FilterChain {
        server_names: snis.iter().map(|s| s.to_string()).collect(),
        transport_protocol: "tls".to_owned(),
        filters: vec![filter],
    }
}

fn listener(chains: Vec<FilterChain>) -> Listener {
    Listener {
        name: L.to_owned(),
        address: sa("10.0.0.1", 10001),
        listener_filters: vec!["envoy.filters.listener.tls_inspector".to_owned()],
        filter_chains: chains,
    }
}

/// Two endpoints (eu/v1 and us/v2) in `c`, the listener's chains as given.
fn two_endpoint_snapshot(subset: Option<LbSubsetConfig>, chains: Vec<FilterChain>) -> Resources {
    Resources {
        listeners: vec![listener(chains)],
        clusters: vec![cluster("c", subset)],
        load_assignments: vec![cla(
            "c",
            vec![
                ep("192.168.0.2", 2521, &[("region", "us"), ("version", "v2")]),
                ep("192.168.0.1", 2521, &[("region", "eu"), ("version", "v1")]),
            ],
        )],
    }
}

fn addrs(r: &XdsRoutes, sni: &str) -> Vec<String> {
    let route = r.routes.iter().find(|x| x.sni == sni).expect("route");
    route
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect()
}

fn err(res: Resources) -> String {
    route_table(&res).expect_err("must be rejected").to_string()
}

#[test]
fn subset_match_selects_the_matching_endpoints() {
    let r = route_table(&two_endpoint_snapshot(
        kuma_subset(&[&["region"], &["region", "version"]]),
        vec![
            chain(&["eu"], tcp("c", &[("region", "eu")])),
            chain(&["us-v2"], tcp("c", &[("region", "us"), ("version", "v2")])),
        ],
    ))
    .unwrap();
    assert_eq!(addrs(&r, "eu"), ["192.168.0.1:2521"]);
    assert_eq!(addrs(&r, "us-v2"), ["192.168.0.2:2521"]);
}

#[test]
fn subset_without_a_match_is_empty_under_no_fallback() {
    let r = route_table(&two_endpoint_snapshot(
        kuma_subset(&[&["version"]]),
        vec![chain(&["v3"], tcp("c", &[("version", "v3")]))],
    ))
    .unwrap();
    assert!(addrs(&r, "v3").is_empty());
    // The route still exists: Envoy accepts the connection, then resets it.
    assert_eq!(r.routes[0].cluster, "c");
}

#[test]
fn no_metadata_match_takes_the_whole_cluster_sorted() {
    let r = route_table(&two_endpoint_snapshot(
        kuma_subset(&[&["version"]]),
        vec![chain(&["all"], tcp("c", &[]))],
    ))
    .unwrap();
    assert_eq!(addrs(&r, "all"), ["192.168.0.1:2521", "192.168.0.2:2521"]);
}

#[test]
fn metadata_match_without_lb_subset_config_is_ignored() {
    let r = route_table(&two_endpoint_snapshot(
        None,
        vec![chain(&["eu"], tcp("c", &[("region", "eu")]))],
    ))
    .unwrap();
    assert_eq!(addrs(&r, "eu"), ["192.168.0.1:2521", "192.168.0.2:2521"]);
}

#[test]
fn criteria_matching_no_selector_use_the_cluster_fallback() {
    // Keys {region} have no selector (only {version}): no such subset, so ANY_ENDPOINT.
    let r = route_table(&two_endpoint_snapshot(
        kuma_subset(&[&["version"]]),
        vec![chain(&["eu"], tcp("c", &[("region", "eu")]))],
    ))
    .unwrap();
    assert_eq!(addrs(&r, "eu").len(), 2);
    // With the proto default NO_FALLBACK, nothing; a NOT_DEFINED selector defers to it too.
    let cfg = LbSubsetConfig {
        fallback_policy: SubsetFallback::NoFallback,
        subset_selectors: vec![SubsetSelector {
            keys: vec!["version".to_owned()],
            fallback_policy: SelectorFallback::NotDefined,
        }],
    };
    let r = route_table(&two_endpoint_snapshot(
        Some(cfg),
        vec![
            chain(&["eu"], tcp("c", &[("region", "eu")])),
            chain(&["v9"], tcp("c", &[("version", "v9")])),
            chain(&["v1"], tcp("c", &[("version", "v1")])),
            chain(&["none"], tcp("c", &[])),
        ],
    ))
    .unwrap();
    assert!(addrs(&r, "eu").is_empty());
    assert!(addrs(&r, "v9").is_empty());
    assert_eq!(addrs(&r, "v1"), ["192.168.0.1:2521"]);
    assert!(addrs(&r, "none").is_empty());
    // A selector with ANY_ENDPOINT of its own falls back to every endpoint.
    let cfg = LbSubsetConfig {
        fallback_policy: SubsetFallback::NoFallback,
        subset_selectors: vec![SubsetSelector {
            keys: vec!["version".to_owned()],
            fallback_policy: SelectorFallback::AnyEndpoint,
        }],
    };
    let r = route_table(&two_endpoint_snapshot(
        Some(cfg),
        vec![chain(&["v9"], tcp("c", &[("version", "v9")]))],
    ))
    .unwrap();
    assert_eq!(addrs(&r, "v9").len(), 2);
}

#[test]
fn weights_priorities_duplicates_and_timeouts() {
    let mut res = two_endpoint_snapshot(None, vec![chain(&["b", "a"], tcp("c", &[]))]);
    let la = &mut res.load_assignments[0];
    la.endpoints[0].lb_endpoints[0].load_balancing_weight = Some(7);
    la.endpoints[0].lb_endpoints[1].load_balancing_weight = None;
    // Same address again, and a priority-1 locality that gets no traffic while 0 has endpoints.
    la.endpoints[0]
        .lb_endpoints
        .push(ep("192.168.0.1", 2521, &[]));
    la.endpoints.push(LocalityLbEndpoints {
        zone: "other".to_owned(),
        priority: 1,
        lb_endpoints: vec![ep("10.9.9.9", 1, &[])],
    });
    res.clusters[0].connect_timeout = None;
    let r = route_table(&res).unwrap();
    assert_eq!(r.routes.len(), 2);
    assert_eq!(r.routes[0].sni, "a");
    assert_eq!(r.routes[1].sni, "b");
    let a = &r.routes[0];
    assert_eq!(a.connect_timeout, Duration::from_secs(5));
    assert_eq!(
        a.endpoints,
        [
            Endpoint {
                address: "192.168.0.1:2521".parse().unwrap(),
                weight: 1
            },
            Endpoint {
                address: "192.168.0.2:2521".parse().unwrap(),
                weight: 7
            }
        ]
    );
    // Only priority 1 left once priority 0 is empty.
    res.load_assignments[0].endpoints[0].lb_endpoints.clear();
    let r = route_table(&res).unwrap();
    assert_eq!(addrs(&r, "a"), ["10.9.9.9:1"]);
}

#[test]
fn eds_service_name_picks_the_assignment() {
    let mut res = two_endpoint_snapshot(None, vec![chain(&["a"], tcp("c", &[]))]);
    res.clusters[0].eds_service_name = Some("svc".to_owned());
    assert_eq!(
        err(res.clone()),
        "cluster \"c\": no ClusterLoadAssignment named \"svc\" in EDS; send one (with no endpoints if the service has none)"
    );
    res.load_assignments[0].cluster_name = "svc".to_owned();
    assert_eq!(addrs(&route_table(&res).unwrap(), "a").len(), 2);
}

#[test]
fn direct_response_is_the_unknown_sni_answer() {
    let body = br#"{"proxy":"default.ingress","zone":"zone-main"}"#.to_vec();
    let mut l = listener(vec![FilterChain {
        server_names: vec![],
        transport_protocol: String::new(),
        filters: vec![NetworkFilter::DirectResponse {
            response: body.clone(),
        }],
    }]);
    l.address = sa("::1", 10001);
    let admin = Listener {
        name: ADMIN_LISTENER_NAME.to_owned(),
        address: sa("10.0.0.1", 9901),
        listener_filters: vec![],
        filter_chains: vec![],
    };
    let res = Resources {
        listeners: vec![admin, l],
        ..Resources::default()
    };
    let r = route_table(&res).unwrap();
    assert_eq!(r.listener.to_string(), "[::1]:10001");
    assert_eq!(r.direct_response.as_deref(), Some(body.as_slice()));
    assert!(r.routes.is_empty());
    assert_eq!(
        r.to_json(),
        r#"{"listener":"[::1]:10001","direct_response":"{\"proxy\":\"default.ingress\",\"zone\":\"zone-main\"}","routes":[]}"#
    );
    let table = r.to_route_table("t");
    assert_eq!(
        table.direct_response().map(|b| &b[..]),
        Some(body.as_slice())
    );
    assert!(table.lookup(b"anything").is_none());
    // Without it, no direct response.
    let r = route_table(&two_endpoint_snapshot(
        None,
        vec![chain(&["a"], tcp("c", &[]))],
    ))
    .unwrap();
    assert!(r.direct_response.is_none());
    let table = r.to_route_table("t");
    assert!(table.direct_response().is_none());
    assert_eq!(table.lookup(b"a").map(|x| x.endpoints.len()), Some(2));
}

#[test]
fn unknown_cluster_names_listener_chain_and_cluster() {
    let res = two_endpoint_snapshot(
        None,
        vec![
            chain(&["a"], tcp("c", &[])),
            chain(&["b"], tcp("c", &[])),
            chain(&["x1"], tcp("c", &[])),
            chain(&["backend{mesh=m}"], tcp("x", &[])),
        ],
    );
    assert_eq!(
        err(res),
        "listener inbound:10.0.0.1:10001: filter chain 3 (server_names [\"backend{mesh=m}\"]): tcp_proxy references cluster \"x\" that is not in CDS"
    );
}

#[test]
fn duplicate_sni_across_chains() {
    let res = two_endpoint_snapshot(
        None,
        vec![
            chain(&["a"], tcp("c", &[])),
            chain(&["b", "a"], tcp("c", &[])),
        ],
    );
    assert_eq!(
        err(res),
        "listener inbound:10.0.0.1:10001: server name \"a\" is in filter chains 0 and 1; each SNI must select exactly one chain"
    );
}

#[test]
fn unsupported_filters_are_named() {
    let other = NetworkFilter::Other {
        name: "envoy.filters.network.http_connection_manager".to_owned(),
        type_url: "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager".to_owned(),
    };
    let res = two_endpoint_snapshot(None, vec![chain(&["a"], other.clone())]);
    assert_eq!(
        err(res),
        "listener inbound:10.0.0.1:10001: filter chain 0 (server_names [\"a\"]): network filter \"envoy.filters.network.http_connection_manager\" (type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager) is not supported; only envoy.filters.network.tcp_proxy and envoy.filters.network.direct_response are"
    );
    let mut two = chain(&["a"], tcp("c", &[]));
    two.filters.insert(0, other);
    let res = two_endpoint_snapshot(None, vec![two]);
    assert!(err(res).contains("filter chain 0 (server_names [\"a\"]): has 2 network filters"));
    let mut res = two_endpoint_snapshot(None, vec![chain(&["a"], tcp("c", &[]))]);
    res.listeners[0]
        .listener_filters
        .push("envoy.filters.listener.original_dst".to_owned());
    assert_eq!(
        err(res),
        "listener inbound:10.0.0.1:10001: listener filter \"envoy.filters.listener.original_dst\" is not supported; only envoy.filters.listener.tls_inspector is"
    );
    let mut res = two_endpoint_snapshot(None, vec![chain(&["a"], tcp("c", &[]))]);
    res.listeners[0].listener_filters.clear();
    assert!(err(res).contains("listener_filters has no envoy.filters.listener.tls_inspector"));
}

#[test]
fn chain_match_errors() {
    let mut catch_all = chain(&[], tcp("c", &[]));
    catch_all.transport_protocol.clear();
    assert_eq!(
        err(two_endpoint_snapshot(None, vec![catch_all])),
        "listener inbound:10.0.0.1:10001: filter chain 0: tcp_proxy without server_names would take every connection; a zone ingress routes by exact SNI, so give the chain filter_chain_match.server_names"
    );
    let mut raw = chain(&["a"], tcp("c", &[]));
    raw.transport_protocol = "raw_buffer".to_owned();
    assert!(err(two_endpoint_snapshot(None, vec![raw])).ends_with(
        "filter chain 0 (server_names [\"a\"]): transport_protocol \"raw_buffer\" is not supported; use \"tls\" (the ingress only routes TLS by SNI)"
    ));
    let dr = || NetworkFilter::DirectResponse {
        response: b"x".to_vec(),
    };
    assert!(err(two_endpoint_snapshot(None, vec![chain(&["a"], dr())]))
        .contains("filter chain 0 (server_names [\"a\"]): direct_response is only supported as the catch-all chain"));
    let bare = || FilterChain {
        server_names: vec![],
        transport_protocol: String::new(),
        filters: vec![dr()],
    };
    assert_eq!(
        err(two_endpoint_snapshot(None, vec![bare(), bare()])),
        "listener inbound:10.0.0.1:10001: filter chains 0 and 1 are both catch-all chains (no filter_chain_match); keep one"
    );
    assert!(err(two_endpoint_snapshot(None, vec![chain(&["*.mesh"], tcp("c", &[]))]))
        .ends_with("filter chain 0: server name \"*.mesh\": wildcard server names are not supported; Kuma sends exact SNIs"));
    assert!(
        err(two_endpoint_snapshot(
            None,
            vec![chain(&[""], tcp("c", &[]))]
        ))
        .ends_with("server name \"\": is empty")
    );
    let long = "a".repeat(256);
    assert!(
        err(two_endpoint_snapshot(
            None,
            vec![chain(&[&long], tcp("c", &[]))]
        ))
        .ends_with("is longer than 255 bytes, which no TLS client can send")
    );
}

#[test]
fn listener_set_and_address_errors() {
    assert_eq!(
        err(Resources::default()),
        "no data listener in LDS (listeners seen: []); a Kuma zone ingress gets one listener named inbound:<address>:<port>"
    );
    let mut res = two_endpoint_snapshot(None, vec![]);
    let mut second = listener(vec![]);
    second.name = "inbound:10.0.0.2:10001".to_owned();
    res.listeners.push(second);
    assert!(err(res).starts_with(
        "2 data listeners in LDS ([\"inbound:10.0.0.1:10001\", \"inbound:10.0.0.2:10001\"])"
    ));
    let mut res = two_endpoint_snapshot(None, vec![]);
    res.listeners[0].address = sa("ingress.local", 10001);
    assert_eq!(
        err(res),
        "listener inbound:10.0.0.1:10001: address \"ingress.local:10001\": socket_address.address is not an IP literal (e.g. 10.0.0.1 or ::1)"
    );
    let mut res = two_endpoint_snapshot(None, vec![]);
    res.listeners[0].address = sa("10.0.0.1", 70000);
    assert!(err(res).ends_with("port_value is above 65535"));
}

#[test]
fn cluster_and_endpoint_errors() {
    let base = || two_endpoint_snapshot(None, vec![chain(&["a"], tcp("c", &[]))]);
    let mut res = base();
    res.clusters.push(cluster("c", None));
    assert_eq!(
        err(res),
        "cluster \"c\" appears 2 times in CDS; cluster names must be unique"
    );
    let mut res = base();
    res.load_assignments.push(cla("c", vec![]));
    assert_eq!(
        err(res),
        "ClusterLoadAssignment \"c\" appears 2 times in EDS; send one per cluster"
    );
    let mut res = base();
    res.load_assignments.clear();
    assert!(err(res).starts_with("cluster \"c\": no ClusterLoadAssignment named \"c\" in EDS"));
    let mut res = base();
    res.clusters[0].discovery_type = DiscoveryType::Other("STRICT_DNS".to_owned());
    assert_eq!(
        err(res),
        "cluster \"c\": type STRICT_DNS is not supported; a zone ingress cluster is type EDS"
    );
    let mut res = base();
    res.clusters[0].lb_subset_config = Some(LbSubsetConfig {
        fallback_policy: SubsetFallback::DefaultSubset,
        subset_selectors: vec![],
    });
    assert_eq!(
        err(res),
        "cluster \"c\": lb_subset_config: fallback_policy DEFAULT_SUBSET is not supported; Kuma sends fallback_policy ANY_ENDPOINT with NO_FALLBACK selectors"
    );
    let mut res = base();
    res.clusters[0].lb_subset_config = Some(LbSubsetConfig {
        fallback_policy: SubsetFallback::AnyEndpoint,
        subset_selectors: vec![SubsetSelector {
            keys: vec!["v".to_owned()],
            fallback_policy: SelectorFallback::Unsupported("KEYS_SUBSET"),
        }],
    });
    assert!(err(res).contains(
        "lb_subset_config: subset_selectors [\"v\"]: fallback_policy KEYS_SUBSET is not supported"
    ));
    let mut res = base();
    res.load_assignments[0].endpoints[0].lb_endpoints[1].address = sa("backend.svc", 2521);
    assert_eq!(
        err(res),
        "ClusterLoadAssignment \"c\": endpoints[0].lb_endpoints[1]: address \"backend.svc\" port 2521: not an IP literal; EDS endpoints are IP addresses (e.g. 192.168.0.1)"
    );
    let mut res = base();
    res.load_assignments[0].endpoints[0].lb_endpoints[0].address = sa("10.0.0.9", 0);
    assert!(err(res).ends_with("port 0: port 0 cannot be connected to"));
    let mut res = base();
    res.load_assignments[0].endpoints[0].lb_endpoints[0].load_balancing_weight = Some(0);
    assert_eq!(
        err(res),
        "ClusterLoadAssignment \"c\": endpoints[0].lb_endpoints[0]: load_balancing_weight 0 is invalid; it must be at least 1 (or unset, meaning 1)"
    );
}
