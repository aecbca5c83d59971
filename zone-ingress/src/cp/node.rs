//! The Envoy `Node` the agent presents on the ADS stream (PROTOCOL.md §1.4): id `.<name>`
//! (an ingress has no mesh), cluster `ingress`, and kuma-dp's metadata. Ports in the metadata
//! are strings, as Envoy's bootstrap carries them; the readiness port must be non-zero whenever
//! the admin port is set or the CP's admin generator fails.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{self, ListValue, Struct, Value, value::Kind};
use serde_json::{Value as Json, json};

use super::CpOptions;

/// Features announced to the CP. kuma-dp announces `feature-tcp-accesslog-via-named-pipe` by
/// default; the agent writes its own access log and cannot serve that pipe, so it announces
/// nothing it does not implement.
pub const FEATURES: &[&str] = &[];

/// `version` of the bootstrap request and of the node metadata.
pub fn version_json() -> Json {
    let v = env!("CARGO_PKG_VERSION");
    json!({
        "kumaDp": {
            "version": v,
            "gitTag": format!("zone-ingress-{v}"),
            "gitCommit": "",
            "buildDate": "",
        },
        "envoy": {
            "version": "",
            "build": format!("zone-ingress/{v}"),
            "kumaDpCompatible": true,
        },
    })
}

pub fn node(opts: &CpOptions) -> Node {
    let mut md: Vec<(&str, Json)> = vec![
        ("version", version_json()),
        ("features", json!(FEATURES)),
        ("dataplane.proxyType", json!("ingress")),
        ("dataplane.admin.port", json!(opts.admin_port.to_string())),
        ("dataplane.admin.address", json!("127.0.0.1")),
        (
            "dataplane.readinessReporter.port",
            json!(opts.readiness_port.to_string()),
        ),
    ];
    if let Some(resource) = &opts.dataplane_resource {
        md.push(("dataplane.resource", json!(resource)));
    }
    Node {
        id: format!(".{}", opts.name),
        cluster: "ingress".into(),
        metadata: Some(Struct {
            fields: md
                .into_iter()
                .map(|(k, v)| (k.to_owned(), value(&v)))
                .collect(),
        }),
        user_agent_name: "zone-ingress".into(),
        ..Default::default()
    }
}

/// JSON to `google.protobuf.Value`.
fn value(v: &Json) -> Value {
    let kind = match v {
        Json::Null => Kind::NullValue(protobuf::NullValue::NullValue as i32),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(value).collect(),
        }),
        Json::Object(o) => Kind::StructValue(Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), value(v)))
                .collect::<HashMap<_, _>>(),
        }),
    };
    Value { kind: Some(kind) }
}
