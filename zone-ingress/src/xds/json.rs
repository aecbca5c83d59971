//! Builds the [`model`](super::model) from Envoy's proto3 JSON mapping, or the same as YAML: the
//! form of Kuma's golden files (`resources: [{name, resource: {"@type": …, …}}]`).
//!
//! Why a loader of our own: `envoy-types` (the prost/tonic types the ADS client will use) has
//! no serde or pbjson support, so it cannot read proto3 JSON, and a full proto3 JSON codec for
//! Envoy's API is far larger than the dozen messages a zone ingress receives. This walks a
//! `serde_json::Value` over exactly that subset. It accepts both field spellings proto3 JSON
//! allows (`filterChains` and `filter_chains`), enums by name or number, and 64-bit-style
//! numbers as strings. A field outside the subset is an error naming its path, never silently
//! ignored: a `transportSocket` or `weightedClusters` we skipped would route differently from
//! Envoy. Fields that do not change routing (`statPrefix`, `altStatName`, `trafficDirection`…)
//! are accepted and dropped.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use super::XdsError;
use super::model::{
    Cluster, ClusterLoadAssignment, DiscoveryType, FilterChain, LbEndpoint, LbSubsetConfig,
    Listener, LocalityLbEndpoints, MetadataValue, NetworkFilter, Resources, SelectorFallback,
    SocketAddress, SubsetFallback, SubsetSelector, TcpProxy,
};

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const CLA_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const TCP_PROXY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const DIRECT_RESPONSE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config";

/// Why reading a file failed: the file, then what is wrong in it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read the file: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Invalid {
        path: std::path::PathBuf,
        #[source]
        source: Box<XdsError>,
    },
}

/// Reads a YAML or JSON file of xDS resources.
pub fn load_file(path: &Path) -> Result<Resources, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    resources_from_str(&text).map_err(|source| LoadError::Invalid {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// Parses YAML or JSON text (JSON is YAML) holding `resources: [...]`.
pub fn resources_from_str(text: &str) -> Result<Resources, XdsError> {
    let doc: Value = serde_norway::from_str(text).map_err(|e| XdsError::Syntax(e.to_string()))?;
    resources_from_value(&doc)
}

/// Builds the model from a parsed document. Each entry of `resources` is either
/// `{name, resource: Any}` (Kuma's golden files) or the `Any` itself (a DiscoveryResponse).
pub fn resources_from_value(doc: &Value) -> Result<Resources, XdsError> {
    let top = Obj::new(doc, "", &["resources", "versionInfo", "typeUrl"])?;
    let Some(items) = top.get("resources") else {
        return Err(XdsError::decode(
            "resources",
            "is missing",
            "the file holds `resources:`, a list of {name, resource} entries as in Kuma's *.envoy.golden.yaml",
        ));
    };
    let items = list(items, "resources")?;
    let mut out = Resources::default();
    for (i, item) in items.iter().enumerate() {
        let path = format!("resources[{i}]");
        let obj = as_object(item, &path)?;
        let (any, path) = if obj.contains_key("@type") {
            (item, path)
        } else {
            let entry = Obj::new(item, &path, &["name", "version", "resource"])?;
            let Some(r) = entry.get("resource") else {
                return Err(XdsError::decode(
                    &path,
                    "has no `resource`",
                    "write {name: N, resource: {\"@type\": ..., ...}}",
                ));
            };
            (r, format!("{path}.resource"))
        };
        match type_url(any, &path)? {
            LISTENER_TYPE => out.listeners.push(listener(any, &path)?),
            CLUSTER_TYPE => out.clusters.push(cluster(any, &path)?),
            CLA_TYPE => out.load_assignments.push(load_assignment(any, &path)?),
            other => {
                return Err(XdsError::decode(
                    format!("{path}.@type"),
                    format!("resource type {other:?} is not one a zone ingress receives"),
                    "send only Listener, Cluster and ClusterLoadAssignment (v3) resources",
                ));
            }
        }
    }
    Ok(out)
}

fn listener(v: &Value, path: &str) -> Result<Listener, XdsError> {
    let o = Obj::new(
        v,
        path,
        &[
            "name",
            "address",
            "filterChains",
            "listenerFilters",
            "trafficDirection",
            "enableReusePort",
        ],
    )?;
    let name = o.string_or_default("name")?;
    let address = match o.get("address") {
        Some(a) => address(a, &o.field("address"))?,
        None => {
            return Err(XdsError::decode(
                o.field("address"),
                "is missing",
                "give the listener {socketAddress: {address, portValue}}",
            ));
        }
    };
    let mut listener_filters = Vec::new();
    for (i, f) in o.list_or_empty("listenerFilters")?.iter().enumerate() {
        let p = format!("{}[{i}]", o.field("listenerFilters"));
        let fo = Obj::new(f, &p, &["name", "typedConfig"])?;
        let name = fo.string_or_default("name")?;
        let ty = match fo.get("typedConfig") {
            Some(tc) => type_url(tc, &fo.field("typedConfig"))?.to_owned(),
            None => String::new(),
        };
        listener_filters.push(if ty.is_empty() { name } else { ty });
    }
    let mut filter_chains = Vec::new();
    for (i, c) in o.list_or_empty("filterChains")?.iter().enumerate() {
        filter_chains.push(filter_chain(
            c,
            &format!("{}[{i}]", o.field("filterChains")),
        )?);
    }
    Ok(Listener {
        name,
        address,
        listener_filters,
        filter_chains,
    })
}

fn address(v: &Value, path: &str) -> Result<SocketAddress, XdsError> {
    let o = Obj::new(v, path, &["socketAddress"])?;
    let Some(sa) = o.get("socketAddress") else {
        return Err(XdsError::decode(
            path,
            "has no socketAddress",
            "write {socketAddress: {address: IP, portValue: PORT}}",
        ));
    };
    let p = o.field("socketAddress");
    let s = Obj::new(sa, &p, &["address", "portValue", "protocol"])?;
    if let Some(proto) = s.get("protocol") {
        let ok = matches!(proto, Value::String(x) if x == "TCP") || proto.as_u64() == Some(0);
        if !ok {
            return Err(XdsError::decode(
                s.field("protocol"),
                format!("protocol {proto} is not supported"),
                "use TCP (or leave it out)",
            ));
        }
    }
    Ok(SocketAddress {
        address: s.string_or_default("address")?,
        port_value: match s.get("portValue") {
            Some(p) => uint32(p, &s.field("portValue"))?,
            None => 0,
        },
    })
}

fn filter_chain(v: &Value, path: &str) -> Result<FilterChain, XdsError> {
    let o = Obj::new(v, path, &["name", "filterChainMatch", "filters"])?;
    let (mut server_names, mut transport_protocol) = (Vec::new(), String::new());
    if let Some(m) = o.get("filterChainMatch") {
        let mo = Obj::new(
            m,
            &o.field("filterChainMatch"),
            &["serverNames", "transportProtocol"],
        )?;
        for (i, n) in mo.list_or_empty("serverNames")?.iter().enumerate() {
            server_names.push(string(n, &format!("{}[{i}]", mo.field("serverNames")))?);
        }
        transport_protocol = mo.string_or_default("transportProtocol")?;
    }
    let mut filters = Vec::new();
    for (i, f) in o.list_or_empty("filters")?.iter().enumerate() {
        filters.push(network_filter(f, &format!("{}[{i}]", o.field("filters")))?);
    }
    Ok(FilterChain {
        server_names,
        transport_protocol,
        filters,
    })
}

fn network_filter(v: &Value, path: &str) -> Result<NetworkFilter, XdsError> {
    let o = Obj::new(v, path, &["name", "typedConfig"])?;
    let name = o.string_or_default("name")?;
    let Some(tc) = o.get("typedConfig") else {
        return Ok(NetworkFilter::Other {
            name,
            type_url: "no typed_config".to_owned(),
        });
    };
    let tp = o.field("typedConfig");
    match type_url(tc, &tp)? {
        TCP_PROXY_TYPE => {
            let t = Obj::new(tc, &tp, &["cluster", "statPrefix", "metadataMatch"])?;
            let cluster = t.string_or_default("cluster")?;
            if cluster.is_empty() {
                return Err(XdsError::decode(
                    t.field("cluster"),
                    "is missing or empty",
                    "name the cluster (weighted_clusters is not supported)",
                ));
            }
            let metadata_match = match t.get("metadataMatch") {
                Some(m) => lb_metadata(m, &t.field("metadataMatch"))?,
                None => BTreeMap::new(),
            };
            Ok(NetworkFilter::TcpProxy(TcpProxy {
                cluster,
                metadata_match,
            }))
        }
        DIRECT_RESPONSE_TYPE => {
            let d = Obj::new(tc, &tp, &["response"])?;
            let response = match d.get("response") {
                None => Vec::new(),
                Some(r) => {
                    let ro = Obj::new(r, &d.field("response"), &["inlineBytes", "inlineString"])?;
                    if let Some(b) = ro.get("inlineBytes") {
                        bytes(b, &ro.field("inlineBytes"))?
                    } else {
                        ro.string_or_default("inlineString")?.into_bytes()
                    }
                }
            };
            Ok(NetworkFilter::DirectResponse { response })
        }
        other => Ok(NetworkFilter::Other {
            name,
            type_url: other.to_owned(),
        }),
    }
}

/// `{filterMetadata: {"envoy.lb": {k: v}}}` → the `envoy.lb` map; other namespaces are not
/// used by the load balancer and are skipped.
fn lb_metadata(v: &Value, path: &str) -> Result<BTreeMap<String, MetadataValue>, XdsError> {
    let o = Obj::new(v, path, &["filterMetadata", "typedFilterMetadata"])?;
    let mut out = BTreeMap::new();
    let Some(fm) = o.get("filterMetadata") else {
        return Ok(out);
    };
    let fp = o.field("filterMetadata");
    let Some(lb) = as_object(fm, &fp)?.get("envoy.lb") else {
        return Ok(out);
    };
    let lp = format!("{fp}.envoy.lb");
    for (k, val) in as_object(lb, &lp)? {
        let mv = match val {
            Value::String(s) => MetadataValue::String(s.clone()),
            Value::Bool(b) => MetadataValue::Bool(*b),
            Value::Null => MetadataValue::Null,
            Value::Number(n) => MetadataValue::Number(n.as_f64().unwrap_or(f64::NAN)),
            Value::Array(_) | Value::Object(_) => {
                return Err(XdsError::decode(
                    format!("{lp}.{k}"),
                    "lists and structs are not supported as LB metadata values",
                    "use a string, as Kuma does",
                ));
            }
        };
        out.insert(k.clone(), mv);
    }
    Ok(out)
}

fn cluster(v: &Value, path: &str) -> Result<Cluster, XdsError> {
    let o = Obj::new(
        v,
        path,
        &[
            "name",
            "type",
            "altStatName",
            "connectTimeout",
            "edsClusterConfig",
            "lbSubsetConfig",
            "lbPolicy",
        ],
    )?;
    let discovery_type = match o.get("type") {
        None => DiscoveryType::Other("STATIC (the default when `type` is unset)".to_owned()),
        Some(t) => match enum_value(
            t,
            &o.field("type"),
            &["STATIC", "STRICT_DNS", "LOGICAL_DNS", "EDS", "ORIGINAL_DST"],
        )? {
            "EDS" => DiscoveryType::Eds,
            other => DiscoveryType::Other(other.to_owned()),
        },
    };
    if let Some(p) = o.get("lbPolicy") {
        let lp = o.field("lbPolicy");
        let policy = enum_value(
            p,
            &lp,
            &[
                "ROUND_ROBIN",
                "LEAST_REQUEST",
                "RING_HASH",
                "RANDOM",
                "ORIGINAL_DST_LB",
                "MAGLEV",
                "CLUSTER_PROVIDED",
                "LOAD_BALANCING_POLICY_CONFIG",
            ],
        )?;
        if policy != "ROUND_ROBIN" {
            return Err(XdsError::decode(
                lp,
                format!("lb_policy {policy} is not supported"),
                "use ROUND_ROBIN (Kuma's default for a zone ingress), or leave it out",
            ));
        }
    }
    let mut eds_service_name = None;
    if let Some(e) = o.get("edsClusterConfig") {
        let ep = o.field("edsClusterConfig");
        let eo = Obj::new(e, &ep, &["edsConfig", "serviceName"])?;
        if let Some(c) = eo.get("edsConfig") {
            Obj::new(
                c,
                &eo.field("edsConfig"),
                &["ads", "resourceApiVersion", "initialFetchTimeout"],
            )?;
        }
        let s = eo.string_or_default("serviceName")?;
        eds_service_name = (!s.is_empty()).then_some(s);
    }
    let connect_timeout = match o.get("connectTimeout") {
        Some(t) => Some(duration(t, &o.field("connectTimeout"))?),
        None => None,
    };
    let lb_subset_config = match o.get("lbSubsetConfig") {
        Some(s) => Some(subset_config(s, &o.field("lbSubsetConfig"))?),
        None => None,
    };
    Ok(Cluster {
        name: o.string_or_default("name")?,
        discovery_type,
        eds_service_name,
        connect_timeout,
        lb_subset_config,
    })
}

fn subset_config(v: &Value, path: &str) -> Result<LbSubsetConfig, XdsError> {
    let o = Obj::new(v, path, &["fallbackPolicy", "subsetSelectors"])?;
    let fallback_policy = match o.get("fallbackPolicy") {
        None => SubsetFallback::NoFallback,
        Some(f) => match enum_value(
            f,
            &o.field("fallbackPolicy"),
            &["NO_FALLBACK", "ANY_ENDPOINT", "DEFAULT_SUBSET"],
        )? {
            "ANY_ENDPOINT" => SubsetFallback::AnyEndpoint,
            "DEFAULT_SUBSET" => SubsetFallback::DefaultSubset,
            _ => SubsetFallback::NoFallback,
        },
    };
    let mut subset_selectors = Vec::new();
    for (i, s) in o.list_or_empty("subsetSelectors")?.iter().enumerate() {
        let sp = format!("{}[{i}]", o.field("subsetSelectors"));
        let so = Obj::new(s, &sp, &["keys", "fallbackPolicy"])?;
        let mut keys = Vec::new();
        for (j, k) in so.list_or_empty("keys")?.iter().enumerate() {
            keys.push(string(k, &format!("{}[{j}]", so.field("keys")))?);
        }
        let fallback_policy = match so.get("fallbackPolicy") {
            None => SelectorFallback::NotDefined,
            Some(f) => match enum_value(
                f,
                &so.field("fallbackPolicy"),
                &[
                    "NOT_DEFINED",
                    "NO_FALLBACK",
                    "ANY_ENDPOINT",
                    "DEFAULT_SUBSET",
                    "KEYS_SUBSET",
                ],
            )? {
                "NO_FALLBACK" => SelectorFallback::NoFallback,
                "ANY_ENDPOINT" => SelectorFallback::AnyEndpoint,
                "DEFAULT_SUBSET" => SelectorFallback::Unsupported("DEFAULT_SUBSET"),
                "KEYS_SUBSET" => SelectorFallback::Unsupported("KEYS_SUBSET"),
                _ => SelectorFallback::NotDefined,
            },
        };
        subset_selectors.push(SubsetSelector {
            keys,
            fallback_policy,
        });
    }
    Ok(LbSubsetConfig {
        fallback_policy,
        subset_selectors,
    })
}

fn load_assignment(v: &Value, path: &str) -> Result<ClusterLoadAssignment, XdsError> {
    let o = Obj::new(v, path, &["clusterName", "endpoints"])?;
    let mut endpoints = Vec::new();
    for (i, l) in o.list_or_empty("endpoints")?.iter().enumerate() {
        let lp = format!("{}[{i}]", o.field("endpoints"));
        let lo = Obj::new(
            l,
            &lp,
            &["locality", "lbEndpoints", "priority", "loadBalancingWeight"],
        )?;
        let zone = match lo.get("locality") {
            Some(loc) => Obj::new(loc, &lo.field("locality"), &["region", "zone", "subZone"])?
                .string_or_default("zone")?,
            None => String::new(),
        };
        let priority = match lo.get("priority") {
            Some(p) => uint32(p, &lo.field("priority"))?,
            None => 0,
        };
        let mut lb_endpoints = Vec::new();
        for (j, e) in lo.list_or_empty("lbEndpoints")?.iter().enumerate() {
            lb_endpoints.push(lb_endpoint(
                e,
                &format!("{}[{j}]", lo.field("lbEndpoints")),
            )?);
        }
        endpoints.push(LocalityLbEndpoints {
            zone,
            priority,
            lb_endpoints,
        });
    }
    Ok(ClusterLoadAssignment {
        cluster_name: o.string_or_default("clusterName")?,
        endpoints,
    })
}

fn lb_endpoint(v: &Value, path: &str) -> Result<LbEndpoint, XdsError> {
    let o = Obj::new(
        v,
        path,
        &[
            "endpoint",
            "loadBalancingWeight",
            "metadata",
            "healthStatus",
        ],
    )?;
    if let Some(h) = o.get("healthStatus") {
        let hp = o.field("healthStatus");
        let status = enum_value(
            h,
            &hp,
            &[
                "UNKNOWN",
                "HEALTHY",
                "UNHEALTHY",
                "DRAINING",
                "TIMEOUT",
                "DEGRADED",
            ],
        )?;
        if !matches!(status, "UNKNOWN" | "HEALTHY") {
            return Err(XdsError::decode(
                hp,
                format!("health_status {status} is not supported"),
                "send only healthy endpoints, as Kuma does (leave health_status out)",
            ));
        }
    }
    let Some(ep) = o.get("endpoint") else {
        return Err(XdsError::decode(
            path,
            "has no endpoint",
            "write {endpoint: {address: {socketAddress: {address, portValue}}}}",
        ));
    };
    let eo = Obj::new(ep, &o.field("endpoint"), &["address"])?;
    let Some(addr) = eo.get("address") else {
        return Err(XdsError::decode(
            eo.field("address"),
            "is missing",
            "write {socketAddress: {address: IP, portValue: PORT}}",
        ));
    };
    Ok(LbEndpoint {
        address: address(addr, &eo.field("address"))?,
        load_balancing_weight: match o.get("loadBalancingWeight") {
            Some(w) => Some(uint32(w, &o.field("loadBalancingWeight"))?),
            None => None,
        },
        lb_metadata: match o.get("metadata") {
            Some(m) => lb_metadata(m, &o.field("metadata"))?,
            None => BTreeMap::new(),
        },
    })
}

/// A JSON object with its path, whose keys were checked against an allow list.
struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    /// `allowed` in lowerCamelCase; `@type` is always allowed. Null values count as absent.
    fn new(v: &'a Value, path: &str, allowed: &[&str]) -> Result<Self, XdsError> {
        let map = as_object(v, path)?;
        for key in map.keys() {
            if key != "@type" && !allowed.contains(&camel(key).as_str()) {
                return Err(XdsError::decode(
                    join(path, key),
                    "is not part of what a Kuma control plane sends a zone ingress, so it is not supported",
                    format!("remove it (supported here: {})", allowed.join(", ")),
                ));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            map,
        })
    }

    fn field(&self, camel_name: &str) -> String {
        let key = if self.map.contains_key(camel_name) {
            camel_name.to_owned()
        } else {
            snake(camel_name)
        };
        join(&self.path, &key)
    }

    fn get(&self, camel_name: &str) -> Option<&'a Value> {
        self.map
            .get(camel_name)
            .or_else(|| self.map.get(&snake(camel_name)))
            .filter(|v| !v.is_null())
    }

    fn string_or_default(&self, name: &str) -> Result<String, XdsError> {
        match self.get(name) {
            None => Ok(String::new()),
            Some(v) => string(v, &self.field(name)),
        }
    }

    fn list_or_empty(&self, name: &str) -> Result<&'a [Value], XdsError> {
        match self.get(name) {
            None => Ok(&[]),
            Some(v) => list(v, &self.field(name)),
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn camel(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn snake(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn as_object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, XdsError> {
    v.as_object().ok_or_else(|| {
        XdsError::decode(
            path,
            format!("must be a mapping, found {}", kind(v)),
            "write a mapping",
        )
    })
}

fn list<'a>(v: &'a Value, path: &str) -> Result<&'a [Value], XdsError> {
    v.as_array().map(Vec::as_slice).ok_or_else(|| {
        XdsError::decode(
            path,
            format!("must be a list, found {}", kind(v)),
            "write a list",
        )
    })
}

fn string(v: &Value, path: &str) -> Result<String, XdsError> {
    v.as_str().map(str::to_owned).ok_or_else(|| {
        XdsError::decode(
            path,
            format!("must be a string, found {}", kind(v)),
            "quote the value",
        )
    })
}

/// A uint32: a JSON number or a string of digits (both are proto3 JSON).
fn uint32(v: &Value, path: &str) -> Result<u32, XdsError> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    n.and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
        XdsError::decode(
            path,
            format!("must be a whole number from 0 to 4294967295, found {v}"),
            "write an unsigned integer",
        )
    })
}

/// The `@type` of a `google.protobuf.Any`.
fn type_url<'a>(v: &'a Value, path: &str) -> Result<&'a str, XdsError> {
    match as_object(v, path)?.get("@type") {
        Some(Value::String(s)) => Ok(s.as_str()),
        _ => Err(XdsError::decode(
            format!("{path}.@type"),
            "is missing or not a string",
            "give the type URL, e.g. type.googleapis.com/envoy.config.cluster.v3.Cluster",
        )),
    }
}

/// An enum by name or by number; returns the name from `names` (indexed by number).
fn enum_value<'n>(v: &Value, path: &str, names: &[&'n str]) -> Result<&'n str, XdsError> {
    let found = match v {
        Value::String(s) => names.iter().find(|n| **n == s.as_str()).copied(),
        Value::Number(n) => n
            .as_u64()
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| names.get(i).copied()),
        _ => None,
    };
    found.ok_or_else(|| {
        XdsError::decode(
            path,
            format!("unknown value {v}"),
            format!("use one of {}", names.join(", ")),
        )
    })
}

/// A `google.protobuf.Duration` in proto3 JSON: `"5s"`, `"0.250s"`.
fn duration(v: &Value, path: &str) -> Result<Duration, XdsError> {
    let bad = || {
        XdsError::decode(
            path,
            format!("must be a duration such as \"5s\" or \"0.250s\", found {v}"),
            "write seconds with an `s` suffix",
        )
    };
    let s = v.as_str().ok_or_else(bad)?;
    let digits = s.strip_suffix('s').ok_or_else(bad)?;
    let (secs, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if secs.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let secs: u64 = secs.parse().map_err(|_| bad())?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().map_err(|_| bad())?
    };
    Ok(Duration::new(secs, nanos))
}

/// proto3 JSON `bytes`: standard or URL-safe base64, padded or not.
fn bytes(v: &Value, path: &str) -> Result<Vec<u8>, XdsError> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = string(v, path)?;
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(&s).ok())
        .ok_or_else(|| {
            XdsError::decode(
                path,
                "is not base64",
                "encode the bytes in base64 (proto3 JSON bytes)",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_names() {
        let p = "x";
        assert_eq!(duration(&Value::from("5s"), p), Ok(Duration::from_secs(5)));
        assert_eq!(
            duration(&Value::from("0.250s"), p),
            Ok(Duration::from_millis(250))
        );
        assert!(duration(&Value::from("5"), p).is_err());
        assert!(duration(&Value::from("1.1234567891s"), p).is_err());
        assert_eq!(camel("filter_chains"), "filterChains");
        assert_eq!(snake("filterChains"), "filter_chains");
        assert_eq!(uint32(&Value::from("2521"), p), Ok(2521));
        assert!(uint32(&Value::from(-1), p).is_err());
    }

    #[test]
    fn snake_case_fields_and_numeric_enums_are_accepted() {
        let doc = r#"{"resources": [
          {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "c", "type": 3,
           "connect_timeout": "1s",
           "lb_subset_config": {"fallback_policy": 1, "subset_selectors": [{"keys": ["v"], "fallback_policy": "NO_FALLBACK"}]}}
        ]}"#;
        let r = resources_from_str(doc).unwrap();
        let c = &r.clusters[0];
        assert_eq!(c.discovery_type, DiscoveryType::Eds);
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(1)));
        let s = c.lb_subset_config.as_ref().unwrap();
        assert_eq!(s.fallback_policy, SubsetFallback::AnyEndpoint);
        assert_eq!(
            s.subset_selectors[0].fallback_policy,
            SelectorFallback::NoFallback
        );
    }

    #[test]
    fn unsupported_fields_are_named_with_their_path() {
        let doc = r#"
resources:
- name: l
  resource:
    '@type': type.googleapis.com/envoy.config.listener.v3.Listener
    name: l
    address: {socketAddress: {address: 10.0.0.1, portValue: 10001}}
    filterChains:
    - filterChainMatch: {serverNames: [a], transportProtocol: tls, destinationPort: 80}
"#;
        let e = resources_from_str(doc).unwrap_err();
        assert_eq!(
            e.to_string(),
            "resources[0].resource.filterChains[0].filterChainMatch.destinationPort: is not part of \
             what a Kuma control plane sends a zone ingress, so it is not supported; remove it \
             (supported here: serverNames, transportProtocol)"
        );
        let e = resources_from_str(
            "resources:\n- '@type': type.googleapis.com/envoy.config.route.v3.RouteConfiguration\n",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("resources[0].@type: resource type \"type.googleapis.com/envoy.config.route.v3.RouteConfiguration\""), "{e}");
        let e = resources_from_str("routes: []").unwrap_err();
        assert!(e.to_string().starts_with("routes: is not part of"), "{e}");
        let e = resources_from_str("resources: [").unwrap_err();
        assert!(matches!(e, XdsError::Syntax(_)), "{e}");
    }
}
