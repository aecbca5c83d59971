//! Routes from xDS: the Listener, Cluster and ClusterLoadAssignment resources a Kuma control
//! plane sends a zone ingress, resolved into SNI → (cluster, endpoints).
//!
//! - [`model`]: a typed model of exactly the subset Kuma emits (PROTOCOL.md §2–3).
//! - [`json`]: builds the model from Envoy's proto3 JSON mapping (or the same as YAML), the form
//!   of Kuma's golden files, for `zone-ingress routes --xds` and `run --xds-file`.
//! - [`route_table`]: validation and resolution, shared by every way of building the model (the
//!   ADS client will build it from prost types and NACK with the [`XdsError`] text).
//!
//! Resolution follows Envoy: one route per `server_names` entry of a chain whose only filter is
//! tcp_proxy; the chain's `metadata_match` on `envoy.lb` picks an LB subset of the cluster's EDS
//! endpoints; the catch-all direct_response chain (Kuma's zero-cluster answer) becomes
//! [`XdsRoutes::direct_response`].

pub mod json;
pub mod model;

mod error;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub use error::XdsError;
pub use json::{load_file, resources_from_str};
use model::{
    Cluster, ClusterLoadAssignment, DiscoveryType, LbEndpoint, Listener, MetadataValue,
    NetworkFilter, Resources, SelectorFallback, SubsetFallback,
};

use crate::config::MAX_SNI_LEN;
use crate::routes::{Route, RouteTable};

/// The admin listener a Kuma CP also pushes (`AdminProxyGenerator`); not a data listener.
pub const ADMIN_LISTENER_NAME: &str = "kuma:envoy:admin";
const TLS_INSPECTOR_NAME: &str = "envoy.filters.listener.tls_inspector";
const TLS_INSPECTOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";

/// One endpoint of a route, with its EDS weight (Kuma sends 1 for every endpoint today).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
}

/// Where one SNI goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsRoute {
    pub sni: String,
    pub cluster: String,
    /// After LB subset selection, of the lowest priority that has any, sorted by address,
    /// one per address. Empty means connections to this SNI are reset (no healthy upstream).
    pub endpoints: Vec<Endpoint>,
    /// The cluster's `connect_timeout` (5s when unset).
    pub connect_timeout: Duration,
}

/// Everything the data listener needs from one xDS snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsRoutes {
    pub listener_name: String,
    pub listener: SocketAddr,
    /// The catch-all direct_response bytes (Kuma's zero-cluster `{"proxy":…,"zone":…}`): sent to
    /// a connection whose SNI matches no route, before closing it.
    pub direct_response: Option<Vec<u8>>,
    /// Sorted by SNI.
    pub routes: Vec<XdsRoute>,
}

impl XdsRoutes {
    /// The `routes --xds --json` document, keys in this order: `{"listener", "direct_response",
    /// "routes": [{"sni", "cluster", "endpoints"}]}`; direct_response decoded as UTF-8
    /// (lossily) or null.
    pub fn to_json(&self) -> String {
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            listener: String,
            direct_response: Option<String>,
            routes: Vec<Row<'a>>,
        }
        #[derive(serde::Serialize)]
        struct Row<'a> {
            sni: &'a str,
            cluster: &'a str,
            endpoints: Vec<String>,
        }
        let doc = Doc {
            listener: self.listener.to_string(),
            direct_response: self
                .direct_response
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned()),
            routes: self
                .routes
                .iter()
                .map(|r| Row {
                    sni: &r.sni,
                    cluster: &r.cluster,
                    endpoints: r.endpoints.iter().map(|e| e.address.to_string()).collect(),
                })
                .collect(),
        };
        // Strings, options and lists of them: serialising cannot fail.
        serde_json::to_string(&doc).unwrap_or_default()
    }

    /// The routing snapshot the listener uses: EDS weights shape the round robin and the
    /// cluster's `connect_timeout` bounds each connection attempt.
    pub fn to_route_table(&self, source: impl Into<String>) -> RouteTable {
        let routes = self.routes.iter().map(|r| {
            let weights: Vec<u32> = r.endpoints.iter().map(|e| e.weight).collect();
            Route::new(
                r.sni.as_str(),
                r.cluster.as_str(),
                r.endpoints.iter().map(|e| e.address).collect(),
            )
            .with_weights(&weights)
            .with_connect_timeout(Some(r.connect_timeout))
        });
        RouteTable::new(source, routes)
            .with_direct_response(self.direct_response.as_deref().map(Arc::<[u8]>::from))
    }
}

/// Validates a snapshot and resolves every SNI of the data listener.
pub fn route_table(resources: &Resources) -> Result<XdsRoutes, XdsError> {
    let listener = data_listener(&resources.listeners)?;
    let listen = listener_address(listener)?;
    let clusters = unique_by_name(
        &resources.clusters,
        |c| &c.name,
        |name, count| XdsError::DuplicateCluster { name, count },
    )?;
    let assignments = unique_by_name(
        &resources.load_assignments,
        |a| &a.cluster_name,
        |name, count| XdsError::DuplicateLoadAssignment { name, count },
    )?;
    check_listener_filters(listener)?;

    let lname = &listener.name;
    let mut direct_response: Option<(usize, Vec<u8>)> = None;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut routes = Vec::new();
    for (i, chain) in listener.filter_chains.iter().enumerate() {
        let names = &chain.server_names;
        let filter = match chain.filters.as_slice() {
            [one] => one,
            other => {
                return Err(XdsError::FilterCount {
                    listener: lname.clone(),
                    chain: i,
                    server_names: names.clone(),
                    count: other.len(),
                });
            }
        };
        let tcp = match filter {
            NetworkFilter::Other { name, type_url } => {
                return Err(XdsError::UnsupportedFilter {
                    listener: lname.clone(),
                    chain: i,
                    server_names: names.clone(),
                    name: name.clone(),
                    type_url: type_url.clone(),
                });
            }
            NetworkFilter::DirectResponse { response } => {
                if !names.is_empty() || !chain.transport_protocol.is_empty() {
                    return Err(XdsError::MatchedDirectResponse {
                        listener: lname.clone(),
                        chain: i,
                        server_names: names.clone(),
                    });
                }
                if let Some((first, _)) = direct_response {
                    return Err(XdsError::DuplicateCatchAll {
                        listener: lname.clone(),
                        first,
                        second: i,
                    });
                }
                direct_response = Some((i, response.clone()));
                continue;
            }
            NetworkFilter::TcpProxy(tcp) => tcp,
        };
        if names.is_empty() {
            return Err(XdsError::CatchAllTcpProxy {
                listener: lname.clone(),
                chain: i,
            });
        }
        if !matches!(chain.transport_protocol.as_str(), "tls" | "") {
            return Err(XdsError::TransportProtocol {
                listener: lname.clone(),
                chain: i,
                server_names: names.clone(),
                found: chain.transport_protocol.clone(),
            });
        }
        let Some(cluster) = clusters.get(tcp.cluster.as_str()) else {
            return Err(XdsError::UnknownCluster {
                listener: lname.clone(),
                chain: i,
                server_names: names.clone(),
                cluster: tcp.cluster.clone(),
            });
        };
        let endpoints = resolve_endpoints(cluster, &assignments, &tcp.metadata_match)?;
        for sni in names {
            check_sni(lname, i, sni)?;
            if let Some(first) = seen.insert(sni, i) {
                return Err(XdsError::DuplicateSni {
                    listener: lname.clone(),
                    sni: sni.clone(),
                    first,
                    second: i,
                });
            }
            routes.push(XdsRoute {
                sni: sni.clone(),
                cluster: cluster.name.clone(),
                endpoints: endpoints.clone(),
                connect_timeout: cluster
                    .connect_timeout
                    .unwrap_or(Cluster::DEFAULT_CONNECT_TIMEOUT),
            });
        }
    }
    routes.sort_by(|a, b| a.sni.cmp(&b.sni));
    Ok(XdsRoutes {
        listener_name: listener.name.clone(),
        listener: listen,
        direct_response: direct_response.map(|(_, b)| b),
        routes,
    })
}

/// The one listener that is not Kuma's admin listener.
fn data_listener(listeners: &[Listener]) -> Result<&Listener, XdsError> {
    let data: Vec<&Listener> = listeners
        .iter()
        .filter(|l| l.name != ADMIN_LISTENER_NAME)
        .collect();
    match data.as_slice() {
        [one] => Ok(one),
        [] => Err(XdsError::NoListener {
            seen: listeners.iter().map(|l| l.name.clone()).collect(),
        }),
        many => Err(XdsError::ManyListeners {
            names: many.iter().map(|l| l.name.clone()).collect(),
        }),
    }
}

fn listener_address(l: &Listener) -> Result<SocketAddr, XdsError> {
    let err = |reason: String| XdsError::ListenerAddress {
        listener: l.name.clone(),
        address: format!("{}:{}", l.address.address, l.address.port_value),
        reason,
    };
    let ip: IpAddr = l.address.address.parse().map_err(|_| {
        err("socket_address.address is not an IP literal (e.g. 10.0.0.1 or ::1)".to_owned())
    })?;
    let port = u16::try_from(l.address.port_value)
        .map_err(|_| err("port_value is above 65535".to_owned()))?;
    Ok(SocketAddr::new(ip, port))
}

fn check_listener_filters(l: &Listener) -> Result<(), XdsError> {
    let mut inspector = false;
    for f in &l.listener_filters {
        if f == TLS_INSPECTOR_NAME || f == TLS_INSPECTOR_TYPE {
            inspector = true;
        } else {
            return Err(XdsError::UnsupportedListenerFilter {
                listener: l.name.clone(),
                filter: f.clone(),
            });
        }
    }
    let needs_inspector = l
        .filter_chains
        .iter()
        .any(|c| !c.server_names.is_empty() || !c.transport_protocol.is_empty());
    if needs_inspector && !inspector {
        return Err(XdsError::MissingTlsInspector {
            listener: l.name.clone(),
        });
    }
    Ok(())
}

fn check_sni(listener: &str, chain: usize, sni: &str) -> Result<(), XdsError> {
    let reason = if sni.is_empty() {
        "is empty"
    } else if sni.starts_with('*') {
        "wildcard server names are not supported; Kuma sends exact SNIs"
    } else if sni.len() > MAX_SNI_LEN {
        "is longer than 255 bytes, which no TLS client can send"
    } else {
        return Ok(());
    };
    Err(XdsError::BadSni {
        listener: listener.to_owned(),
        chain,
        sni: sni.to_owned(),
        reason: reason.to_owned(),
    })
}

fn unique_by_name<T>(
    items: &[T],
    name: impl Fn(&T) -> &String,
    dup: impl Fn(String, usize) -> XdsError,
) -> Result<HashMap<&str, &T>, XdsError> {
    let mut map = HashMap::with_capacity(items.len());
    for item in items {
        if map.insert(name(item).as_str(), item).is_some() {
            let n = name(item);
            let count = items.iter().filter(|i| name(i) == n).count();
            return Err(dup(n.clone(), count));
        }
    }
    Ok(map)
}

/// The endpoints a tcp_proxy with `criteria` (its `envoy.lb` metadata_match) reaches in
/// `cluster`, as Envoy's subset load balancer picks them:
/// - no `lb_subset_config`: metadata_match is ignored, the whole cluster;
/// - no criteria: the cluster's `fallback_policy` (Kuma: ANY_ENDPOINT, the whole cluster);
/// - criteria whose key set equals a selector's keys: the endpoints whose `envoy.lb` metadata
///   hold every criterion; when none does, the selector's `fallback_policy` (Kuma: NO_FALLBACK,
///   no endpoint) or, NOT_DEFINED, the cluster's;
/// - criteria matching no selector's key set: no such subset exists, the cluster's fallback.
///
/// Of what is selected, only the lowest priority is kept (every endpoint is healthy as far as
/// the ingress knows, so Envoy sends all traffic there).
fn resolve_endpoints(
    cluster: &Cluster,
    assignments: &HashMap<&str, &ClusterLoadAssignment>,
    criteria: &BTreeMap<String, MetadataValue>,
) -> Result<Vec<Endpoint>, XdsError> {
    if let DiscoveryType::Other(found) = &cluster.discovery_type {
        return Err(XdsError::UnsupportedClusterType {
            cluster: cluster.name.clone(),
            found: found.clone(),
        });
    }
    let Some(cla) = assignments.get(cluster.eds_name()) else {
        return Err(XdsError::NoLoadAssignment {
            cluster: cluster.name.clone(),
            eds_name: cluster.eds_name().to_owned(),
        });
    };
    let all = endpoints_of(cla)?;
    let pick = |policy: SubsetFallback| -> Result<Vec<(u32, Endpoint)>, XdsError> {
        match policy {
            SubsetFallback::AnyEndpoint => Ok(all.iter().map(|(p, _, e)| (*p, *e)).collect()),
            SubsetFallback::NoFallback => Ok(Vec::new()),
            SubsetFallback::DefaultSubset => Err(XdsError::UnsupportedSubsetPolicy {
                cluster: cluster.name.clone(),
                what: "fallback_policy DEFAULT_SUBSET".to_owned(),
            }),
        }
    };
    let selected = match &cluster.lb_subset_config {
        None => all.iter().map(|(p, _, e)| (*p, *e)).collect(),
        Some(cfg) => {
            for s in &cfg.subset_selectors {
                if let SelectorFallback::Unsupported(what) = s.fallback_policy {
                    return Err(XdsError::UnsupportedSubsetPolicy {
                        cluster: cluster.name.clone(),
                        what: format!("subset_selectors {:?}: fallback_policy {what}", s.keys),
                    });
                }
            }
            let keys: BTreeSet<&str> = criteria.keys().map(String::as_str).collect();
            let selector = cfg
                .subset_selectors
                .iter()
                .find(|s| s.keys.iter().map(String::as_str).collect::<BTreeSet<_>>() == keys);
            match (criteria.is_empty(), selector) {
                (true, _) | (false, None) => pick(cfg.fallback_policy)?,
                (false, Some(sel)) => {
                    let matched: Vec<(u32, Endpoint)> = all
                        .iter()
                        .filter(|(_, md, _)| criteria.iter().all(|(k, v)| md.get(k) == Some(v)))
                        .map(|(p, _, e)| (*p, *e))
                        .collect();
                    if !matched.is_empty() {
                        matched
                    } else {
                        match sel.fallback_policy {
                            SelectorFallback::NoFallback => Vec::new(),
                            SelectorFallback::AnyEndpoint => pick(SubsetFallback::AnyEndpoint)?,
                            SelectorFallback::NotDefined => pick(cfg.fallback_policy)?,
                            SelectorFallback::Unsupported(_) => Vec::new(),
                        }
                    }
                }
            }
        }
    };
    let Some(top) = selected.iter().map(|(p, _)| *p).min() else {
        return Ok(Vec::new());
    };
    let mut out: Vec<Endpoint> = selected
        .into_iter()
        .filter(|(p, _)| *p == top)
        .map(|(_, e)| e)
        .collect();
    out.sort();
    // Envoy keeps one host per address in a cluster.
    out.dedup_by_key(|e| e.address);
    Ok(out)
}

type Candidate<'a> = (u32, &'a BTreeMap<String, MetadataValue>, Endpoint);

/// Every endpoint of a CLA with its priority and `envoy.lb` metadata, addresses checked.
fn endpoints_of(cla: &ClusterLoadAssignment) -> Result<Vec<Candidate<'_>>, XdsError> {
    let mut out = Vec::new();
    for (li, locality) in cla.endpoints.iter().enumerate() {
        for (ei, ep) in locality.lb_endpoints.iter().enumerate() {
            out.push((
                locality.priority,
                &ep.lb_metadata,
                endpoint(&cla.cluster_name, li, ei, ep)?,
            ));
        }
    }
    Ok(out)
}

fn endpoint(
    cluster: &str,
    locality: usize,
    index: usize,
    ep: &LbEndpoint,
) -> Result<Endpoint, XdsError> {
    let err = |reason: &str| XdsError::EndpointAddress {
        cluster: cluster.to_owned(),
        locality,
        endpoint: index,
        address: ep.address.address.clone(),
        port: ep.address.port_value,
        reason: reason.to_owned(),
    };
    let ip: IpAddr =
        ep.address.address.parse().map_err(|_| {
            err("not an IP literal; EDS endpoints are IP addresses (e.g. 192.168.0.1)")
        })?;
    let port = match u16::try_from(ep.address.port_value) {
        Ok(0) => return Err(err("port 0 cannot be connected to")),
        Ok(p) => p,
        Err(_) => return Err(err("port is above 65535")),
    };
    let weight = match ep.load_balancing_weight {
        None => 1,
        Some(0) => {
            return Err(XdsError::ZeroWeight {
                cluster: cluster.to_owned(),
                locality,
                endpoint: index,
            });
        }
        Some(w) => w,
    };
    Ok(Endpoint {
        address: SocketAddr::new(ip, port),
        weight,
    })
}

#[cfg(test)]
mod tests;
