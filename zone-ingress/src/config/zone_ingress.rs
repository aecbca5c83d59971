//! The ZoneIngress resource in Kuma's universal YAML format.
//!
//! The same file a user hands `kuma-dp run --proxy-type=ingress --dataplane-file` works
//! here. The rules are Kuma's (`zone_ingress_validator.go`, see PROTOCOL.md 1.1) plus one
//! of ours: `networking.address` must be an IP because we bind a socket to it ourselves.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde_json::{Map, Value as Json, json};
use serde_norway::Value;

use super::error::ConfigError;
use super::yaml::{self, Fields, Problems, describe, index};

/// Listener port when `networking.port` is absent (kuma-dp's and Kuma docs' usual value).
pub const DEFAULT_PORT: u16 = 10001;
/// Admin API port when `networking.admin.port` is absent (kuma-dp's default).
pub const DEFAULT_ADMIN_PORT: u16 = 9901;

/// The `kuma.io/service` tag every available service must carry.
const SERVICE_TAG: &str = "kuma.io/service";

const TOP_FIELDS: &[&str] = &[
    "type",
    "name",
    "mesh",
    "zone",
    "networking",
    "availableServices",
];
/// Metadata `kumactl get zoneingress -o yaml` prints next to the spec. Accepting it lets a
/// user feed the output straight back in; none of it affects the data path.
const IGNORED_TOP_FIELDS: &[&str] = &["creationTime", "modificationTime", "labels"];
const NETWORKING_FIELDS: &[&str] = &[
    "address",
    "port",
    "advertisedAddress",
    "advertisedPort",
    "admin",
];
const ADMIN_FIELDS: &[&str] = &["port"];
const SERVICE_FIELDS: &[&str] = &["tags", "instances", "mesh", "externalService"];

/// A Kuma ZoneIngress resource (`api/mesh/v1alpha1/zone_ingress.proto`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneIngress {
    pub name: String,
    /// Set by the global control plane; absent in hand-written files.
    pub zone: Option<String>,
    pub networking: Networking,
    /// Normally filled in by the zone control plane; a file may carry them (e.g. one
    /// produced by `kumactl get zoneingress -o yaml`).
    pub available_services: Vec<AvailableService>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Networking {
    /// Where the listener binds.
    pub address: IpAddr,
    /// Listener port, default [`DEFAULT_PORT`].
    pub port: u16,
    /// What other zones dial: an IP or DNS name. Kuma ignores an ingress without it in
    /// other zones, so it is required in real multi-zone use.
    pub advertised_address: Option<String>,
    pub advertised_port: Option<u16>,
    pub admin: Admin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Admin API port, default [`DEFAULT_ADMIN_PORT`].
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvailableService {
    pub tags: BTreeMap<String, String>,
    pub instances: u32,
    pub mesh: String,
    pub external_service: bool,
}

impl ZoneIngress {
    /// Parses and validates a ZoneIngress document. `origin` (a path, or "embedded default")
    /// prefixes every message.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let doc = yaml::parse(text, origin)?;
        let mut problems = Problems::default();
        let zi = read_zone_ingress(&doc, &mut problems);
        problems.finish(origin, zi)
    }

    /// Reads and validates the file at `path`; messages name the path.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        super::load_file(path, Self::from_yaml_str)
    }

    /// The socket the data-path listener binds.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.networking.address, self.networking.port)
    }

    /// The resource as Kuma's REST/JSON form, with its camelCase names, for the bootstrap
    /// request's `dataplaneResource`. Unset optional fields are left out rather than sent as
    /// null or zero: Kuma reads both the same, and the smaller form matches what kuma-dp sends.
    pub fn to_json(&self) -> Json {
        let mut networking = Map::new();
        networking.insert("address".into(), json!(self.networking.address.to_string()));
        networking.insert("port".into(), json!(self.networking.port));
        if let Some(a) = &self.networking.advertised_address {
            networking.insert("advertisedAddress".into(), json!(a));
        }
        if let Some(p) = self.networking.advertised_port {
            networking.insert("advertisedPort".into(), json!(p));
        }
        networking.insert(
            "admin".into(),
            json!({ "port": self.networking.admin.port }),
        );

        let mut out = Map::new();
        out.insert("type".into(), json!("ZoneIngress"));
        out.insert("name".into(), json!(self.name));
        if let Some(zone) = &self.zone {
            out.insert("zone".into(), json!(zone));
        }
        out.insert("networking".into(), Json::Object(networking));
        if !self.available_services.is_empty() {
            let services = self
                .available_services
                .iter()
                .map(|s| {
                    json!({
                        "tags": s.tags,
                        "instances": s.instances,
                        "mesh": s.mesh,
                        "externalService": s.external_service,
                    })
                })
                .collect();
            out.insert("availableServices".into(), Json::Array(services));
        }
        Json::Object(out)
    }
}

fn read_zone_ingress(doc: &Value, problems: &mut Problems) -> Option<ZoneIngress> {
    if matches!(doc, Value::Null) {
        problems.push(
            "",
            "the document is empty",
            "write a ZoneIngress resource: `type: ZoneIngress`, `name: ...`, `networking: {address: ..., port: ...}`",
        );
        return None;
    }
    let top = Fields::check(doc, "", TOP_FIELDS, IGNORED_TOP_FIELDS, problems)?;

    match top.get("type") {
        None => top.missing(
            "type",
            "add `type: ZoneIngress` (Kuma's universal format names the resource type)",
            problems,
        ),
        Some(Value::String(t)) if t == "ZoneIngress" => {}
        Some(other) => problems.push(
            "type",
            format!("must be ZoneIngress, found {}", describe(other)),
            "set `type: ZoneIngress` (this agent only runs as a zone ingress, sidecars and egresses still use kuma-dp)",
        ),
    }

    let name = match top.string("name", problems) {
        Some(n) if !n.trim().is_empty() => Some(n),
        Some(_) => {
            problems.push(
                "name",
                "must not be empty",
                "set `name:` to this ingress's unique name, e.g. zone-ingress-1",
            );
            None
        }
        None => {
            if top.get("name").is_none() {
                top.missing(
                    "name",
                    "add `name:` with this ingress's unique name, e.g. zone-ingress-1",
                    problems,
                );
            }
            None
        }
    };

    // ZoneIngress is global-scoped, so Kuma has it under the empty mesh. kuma-dp tolerates
    // `mesh: ""` in resource files; anything else is a sign the wrong file was given.
    if let Some(mesh) = top.string("mesh", problems)
        && !mesh.is_empty()
    {
        problems.push(
            "mesh",
            format!("a ZoneIngress belongs to no mesh, found {mesh:?}"),
            "remove `mesh:` (a ZoneIngress serves every mesh in its zone)",
        );
    }

    // The zone is stamped by the global control plane; an empty string means "not set yet".
    let zone = top.string("zone", problems).filter(|z| !z.is_empty());

    let networking = match top.get("networking") {
        Some(v) => read_networking(v, problems),
        None => {
            top.missing(
                "networking",
                "add `networking:` with at least `address:` (the IP to listen on) and `port:`",
                problems,
            );
            None
        }
    };

    let available_services = read_available_services(top.get("availableServices"), problems);

    Some(ZoneIngress {
        name: name?,
        zone,
        networking: networking?,
        available_services: available_services?,
    })
}

fn read_networking(v: &Value, problems: &mut Problems) -> Option<Networking> {
    let net = Fields::check(v, "networking", NETWORKING_FIELDS, &[], problems)?;

    let address = read_listen_address(&net, problems);

    let port_given = net.get("port").is_some();
    let port = if port_given {
        net.port("port", problems)
    } else {
        Some(DEFAULT_PORT)
    };

    // Kuma treats an empty advertisedAddress and a zero advertisedPort as unset (proto3
    // defaults); keep that so the "set together" rule reads the same as Kuma's.
    let advertised_address = net
        .string("advertisedAddress", problems)
        .filter(|a| !a.is_empty());
    if let Some(a) = &advertised_address {
        check_advertised_address(a, problems);
    }
    let advertised_port_raw = net.get("advertisedPort");
    let advertised_port_zero = advertised_port_raw.is_some_and(|v| {
        matches!(v, Value::Number(n) if n.as_u64() == Some(0))
            || matches!(v, Value::String(s) if s.trim() == "0")
    });
    let advertised_port = if advertised_port_zero {
        None
    } else {
        net.port("advertisedPort", problems)
    };
    // Only judge the pairing on fields that were present (a present but malformed one has
    // already been reported).
    let address_present = advertised_address.is_some();
    let port_present = advertised_port_raw.is_some() && !advertised_port_zero;
    if address_present && !port_present {
        net.missing_because(
            "advertisedPort",
            "missing while networking.advertisedAddress is set (Kuma requires both or neither: \
             other zones only route to an ingress that advertises both)",
            format!(
                "set networking.advertisedPort to the port other zones reach this ingress on \
                 (often networking.port, {}), or remove networking.advertisedAddress",
                port.unwrap_or(DEFAULT_PORT)
            ),
            problems,
        );
    }
    if port_present && !address_present && net.get("advertisedAddress").is_none_or(is_empty_str) {
        net.missing_because(
            "advertisedAddress",
            "missing while networking.advertisedPort is set (Kuma requires both or neither: \
             other zones only route to an ingress that advertises both)",
            "set networking.advertisedAddress to the IP or DNS name other zones reach this \
             ingress on, or remove networking.advertisedPort",
            problems,
        );
    }

    let admin = net
        .get("admin")
        .map(|v| Fields::check(v, "networking.admin", ADMIN_FIELDS, &[], problems));
    let admin_port_given = matches!(&admin, Some(Some(a)) if a.get("port").is_some());
    let admin_port = match &admin {
        Some(Some(a)) if admin_port_given => a.port("port", problems),
        // `admin` absent, or present without a port: kuma-dp's default.
        None | Some(Some(_)) => Some(DEFAULT_ADMIN_PORT),
        // Not a mapping; already reported.
        Some(None) => None,
    };
    if let (Some(p), Some(a)) = (port, admin_port)
        && p == a
    {
        // Say which side was defaulted: "both are 9901" is puzzling when the file only
        // mentions one of them.
        let defaults = match (port_given, admin_port_given) {
            (_, false) => format!(" (networking.admin.port defaults to {DEFAULT_ADMIN_PORT})"),
            (false, true) => format!(" (networking.port defaults to {DEFAULT_PORT})"),
            (true, true) => String::new(),
        };
        let free = [DEFAULT_ADMIN_PORT, 9903, 9904]
            .into_iter()
            .find(|c| *c != p)
            .unwrap_or(DEFAULT_ADMIN_PORT);
        problems.push(
            "networking.admin.port",
            format!("must differ from networking.port (both are {p}){defaults}"),
            format!("set networking.admin.port to a free port such as {free}"),
        );
    }

    Some(Networking {
        address: address?,
        port: port?,
        advertised_address,
        advertised_port,
        admin: Admin { port: admin_port? },
    })
}

fn is_empty_str(v: &Value) -> bool {
    matches!(v, Value::String(s) if s.is_empty())
}

/// `networking.address` must be an IP: it is where we bind, and we do not resolve names
/// (a name resolving to several addresses, or changing, has no single right answer).
fn read_listen_address(net: &Fields<'_>, problems: &mut Problems) -> Option<IpAddr> {
    const FIELD: &str = "networking.address";
    let Some(raw) = net.get("address") else {
        net.missing(
            "address",
            "set networking.address to an IP address of this host to listen on, e.g. 192.168.0.1 \
             (0.0.0.0 or :: listens on all)",
            problems,
        );
        return None;
    };
    let text = yaml::as_string(raw, FIELD, problems)?;
    let trimmed = text.trim();
    if let Ok(ip) = trimmed.parse::<IpAddr>() {
        return Some(ip);
    }
    let (message, fix) = if trimmed.is_empty() {
        (
            "must not be empty".to_owned(),
            "set it to an IP address of this host, e.g. 192.168.0.1".to_owned(),
        )
    } else if let Some(ip) = trimmed
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse::<IpAddr>().ok())
    {
        (
            format!("{text:?} has brackets around an IPv6 address"),
            format!("write it without brackets: {ip}"),
        )
    } else if let Ok(sa) = trimmed.parse::<SocketAddr>() {
        (
            format!("{text:?} includes a port"),
            format!(
                "set networking.address to {} and networking.port to {}",
                sa.ip(),
                sa.port()
            ),
        )
    } else {
        (
            format!(
                "{text:?} is not an IP address (the agent binds its listener to this address \
                 and does not resolve host names)"
            ),
            "use this host's IP address, e.g. 192.168.0.1 (0.0.0.0 or :: listens on all), and put a \
             DNS name in networking.advertisedAddress instead"
                .to_owned(),
        )
    };
    problems.push(FIELD, message, fix);
    None
}

/// Kuma accepts an IP or a DNS name here; other zones dial it.
fn check_advertised_address(a: &str, problems: &mut Problems) {
    if a.parse::<IpAddr>().is_ok() || is_dns_name(a) {
        return;
    }
    let fix = match a.parse::<SocketAddr>() {
        Ok(sa) => format!(
            "set networking.advertisedAddress to {} and networking.advertisedPort to {}",
            sa.ip(),
            sa.port()
        ),
        Err(_) => "use a bare IP or DNS name, without scheme, port or path, e.g. 10.0.0.1 or \
                   ingress.zone-2.example.com"
            .to_owned(),
    };
    problems.push(
        "networking.advertisedAddress",
        format!("{a:?} is neither an IP address nor a DNS name"),
        fix,
    );
}

/// Letters, digits, `-` and `_` in dot-separated labels of 1-63 bytes, 253 bytes in all.
/// `_` is allowed because real zones use names like `_ingress.example` and Kuma does not
/// reject it either.
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn read_available_services(
    v: Option<&Value>,
    problems: &mut Problems,
) -> Option<Vec<AvailableService>> {
    const FIELD: &str = "availableServices";
    let Some(v) = v else {
        return Some(Vec::new());
    };
    let Value::Sequence(items) = v else {
        problems.push(
            FIELD,
            format!("expected a list, found {}", describe(v)),
            "write a list of `- tags: {kuma.io/service: ...}` entries, or remove the field",
        );
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match read_available_service(item, &index(FIELD, i), problems) {
            Some(s) => out.push(s),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn read_available_service(
    v: &Value,
    path: &str,
    problems: &mut Problems,
) -> Option<AvailableService> {
    let svc = Fields::check(v, path, SERVICE_FIELDS, &[], problems)?;
    let tags_path = svc.path("tags");
    let tags = match svc.get("tags") {
        None => Some(BTreeMap::new()),
        Some(Value::Mapping(map)) => {
            let mut tags = BTreeMap::new();
            let mut ok = true;
            for (k, val) in map {
                let Value::String(k) = k else {
                    problems.push(
                        tags_path.as_str(),
                        format!("tag names must be strings, found {}", describe(k)),
                        "quote the tag name",
                    );
                    ok = false;
                    continue;
                };
                match val {
                    Value::String(s) => {
                        tags.insert(k.clone(), s.clone());
                    }
                    other => {
                        problems.push(
                            format!("{tags_path}[{k:?}]"),
                            format!("tag values must be strings, found {}", describe(other)),
                            "quote the value, e.g. version: \"2\"",
                        );
                        ok = false;
                    }
                }
            }
            ok.then_some(tags)
        }
        Some(other) => {
            problems.push(
                tags_path.as_str(),
                format!(
                    "expected a mapping of tag names to values, found {}",
                    describe(other)
                ),
                format!("write `tags: {{{SERVICE_TAG}: <service name>}}`"),
            );
            None
        }
    };
    if let Some(tags) = &tags {
        match tags.get(SERVICE_TAG) {
            None => problems.push(
                tags_path.as_str(),
                format!(
                    "the {SERVICE_TAG} tag is missing (Kuma requires it on every available service)"
                ),
                format!("add `{SERVICE_TAG}: <service name>` to the tags"),
            ),
            Some(s) if s.is_empty() => problems.push(
                format!("{tags_path}[{SERVICE_TAG:?}]"),
                format!("the {SERVICE_TAG} tag is empty"),
                "set it to the name of the service",
            ),
            Some(_) => {}
        }
    }
    let instances = if svc.get("instances").is_some() {
        svc.u32("instances", problems)
    } else {
        Some(0)
    };
    let mesh = if svc.get("mesh").is_some() {
        svc.string("mesh", problems)
    } else {
        Some(String::new())
    };
    let external_service = if svc.get("externalService").is_some() {
        svc.bool("externalService", problems)
    } else {
        Some(false)
    };
    Some(AvailableService {
        tags: tags?,
        instances: instances?,
        mesh: mesh?,
        external_service: external_service?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_ZONE_INGRESS_YAML, Problem};

    fn ok(text: &str) -> ZoneIngress {
        match ZoneIngress::from_yaml_str(text, "test.yaml") {
            Ok(z) => z,
            Err(e) => panic!("expected valid, got:\n{e}"),
        }
    }

    fn problems(text: &str) -> Vec<Problem> {
        match ZoneIngress::from_yaml_str(text, "test.yaml") {
            Ok(z) => panic!("expected invalid, got {z:?}"),
            Err(ConfigError::Invalid { origin, problems }) => {
                assert_eq!(origin, "test.yaml");
                assert!(!problems.is_empty());
                problems
            }
            Err(e) => panic!("expected Invalid, got {e:?}"),
        }
    }

    /// The single problem of `text`, checked to be on `field` and to mention each of
    /// `in_message` and `in_fix`.
    fn one_problem(text: &str, field: &str, in_message: &str, in_fix: &str) -> Problem {
        let ps = problems(text);
        assert_eq!(ps.len(), 1, "{ps:#?}");
        let p = ps[0].clone();
        assert_eq!(p.field, field, "{p:#?}");
        assert!(p.message.contains(in_message), "message: {}", p.message);
        assert!(p.fix.contains(in_fix), "fix: {}", p.fix);
        p
    }

    const MINIMAL: &str = "type: ZoneIngress\nname: zi\nnetworking:\n  address: 192.168.0.1\n";

    #[test]
    fn protocol_md_example_parses() {
        let z = ok("
type: ZoneIngress
name: zone-ingress-1
networking:
  address: 192.168.0.1
  port: 10001
  advertisedAddress: 10.0.0.1
  advertisedPort: 10000
  admin:
    port: 9901
availableServices: [ { tags: { kuma.io/service: backend }, instances: 1, mesh: default } ]
");
        assert_eq!(z.name, "zone-ingress-1");
        assert_eq!(z.zone, None);
        assert_eq!(z.listen_addr(), "192.168.0.1:10001".parse().unwrap());
        assert_eq!(z.networking.advertised_address.as_deref(), Some("10.0.0.1"));
        assert_eq!(z.networking.advertised_port, Some(10000));
        assert_eq!(z.networking.admin.port, 9901);
        assert_eq!(z.available_services.len(), 1);
        let s = &z.available_services[0];
        assert_eq!(
            s.tags.get("kuma.io/service").map(String::as_str),
            Some("backend")
        );
        assert_eq!(
            (s.instances, s.mesh.as_str(), s.external_service),
            (1, "default", false)
        );
    }

    #[test]
    fn kumactl_output_with_metadata_parses() {
        // Shape of `kumactl get zoneingress zi -o yaml` on a zone that global has synced.
        let z = ok(r#"
type: ZoneIngress
name: zi
creationTime: "2025-01-01T10:00:00Z"
modificationTime: "2025-01-01T10:05:00Z"
labels:
  kuma.io/origin: zone
  kuma.io/zone: zone-2
zone: zone-2
networking:
  address: 10.244.0.7
  port: 10001
  advertisedAddress: ingress.zone-2.example.com
  advertisedPort: 30001
  admin:
    port: 9901
availableServices:
  - tags:
      kuma.io/service: backend_kuma-demo_svc_3001
      kuma.io/protocol: http
      version: "2"
    instances: 2
    mesh: default
  - tags: {kuma.io/service: httpbin}
    instances: 1
    mesh: default
    externalService: true
"#);
        assert_eq!(z.zone.as_deref(), Some("zone-2"));
        assert_eq!(z.available_services.len(), 2);
        assert!(z.available_services[1].external_service);
        assert_eq!(
            z.networking.advertised_address.as_deref(),
            Some("ingress.zone-2.example.com")
        );
    }

    #[test]
    fn defaults_apply() {
        let z = ok(MINIMAL);
        assert_eq!(z.networking.port, DEFAULT_PORT);
        assert_eq!(z.networking.admin.port, DEFAULT_ADMIN_PORT);
        assert!(z.available_services.is_empty());
        assert_eq!(z.networking.advertised_address, None);
    }

    #[test]
    fn embedded_default_parses() {
        let z = match ZoneIngress::from_yaml_str(DEFAULT_ZONE_INGRESS_YAML, "embedded default") {
            Ok(z) => z,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(z.name, "zone-ingress-local");
        assert_eq!(z.listen_addr(), "127.0.0.1:10001".parse().unwrap());
        assert_eq!(z.networking.admin.port, 9901);
        assert_eq!(z.networking.advertised_address, None);
        assert_eq!(z.networking.advertised_port, None);
    }

    #[test]
    fn ipv6_listen_address() {
        let z = ok("type: ZoneIngress\nname: zi\nnetworking: {address: 'fd00::1', port: 10001}\n");
        assert_eq!(z.listen_addr(), "[fd00::1]:10001".parse().unwrap());
    }

    #[test]
    fn quoted_port_accepted_like_kuma() {
        let z = ok("type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, port: '10002'}\n");
        assert_eq!(z.networking.port, 10002);
    }

    #[test]
    fn type_must_be_zone_ingress() {
        one_problem(
            "type: Dataplane\nname: zi\nnetworking: {address: 1.2.3.4}\n",
            "type",
            "must be ZoneIngress",
            "type: ZoneIngress",
        );
        one_problem(
            "name: zi\nnetworking: {address: 1.2.3.4}\n",
            "type",
            "missing",
            "type: ZoneIngress",
        );
    }

    #[test]
    fn name_must_be_non_empty() {
        one_problem(
            "type: ZoneIngress\nname: ''\nnetworking: {address: 1.2.3.4}\n",
            "name",
            "must not be empty",
            "name:",
        );
        one_problem(
            "type: ZoneIngress\nnetworking: {address: 1.2.3.4}\n",
            "name",
            "missing",
            "name:",
        );
    }

    #[test]
    fn port_must_be_valid() {
        for bad in ["0", "65536", "-1", "abc", "[1]"] {
            let text = format!(
                "type: ZoneIngress\nname: zi\nnetworking: {{address: 1.2.3.4, port: {bad}}}\n"
            );
            one_problem(&text, "networking.port", "", "between 1 and 65535");
        }
    }

    #[test]
    fn advertised_fields_set_together() {
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, advertisedAddress: 10.0.0.1}\n",
            "networking.advertisedPort",
            "networking.advertisedAddress is set",
            "set networking.advertisedPort",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, advertisedPort: 10000}\n",
            "networking.advertisedAddress",
            "networking.advertisedPort is set",
            "set networking.advertisedAddress",
        );
        // Kuma reads "" and 0 as unset.
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, advertisedAddress: '', advertisedPort: 10000}\n",
            "networking.advertisedAddress",
            "missing",
            "remove networking.advertisedPort",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, advertisedAddress: a.example, advertisedPort: 0}\n",
            "networking.advertisedPort",
            "missing",
            "remove networking.advertisedAddress",
        );
    }

    #[test]
    fn advertised_address_must_be_ip_or_dns_name() {
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, advertisedAddress: '10.0.0.1:10000', advertisedPort: 10000}\n",
            "networking.advertisedAddress",
            "neither an IP address nor a DNS name",
            "networking.advertisedPort to 10000",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, advertisedAddress: 'https://x.example/', advertisedPort: 10000}\n",
            "networking.advertisedAddress",
            "neither",
            "without scheme",
        );
    }

    #[test]
    fn admin_port_must_differ_from_port() {
        let p = one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, port: 10001, admin: {port: 10001}}\n",
            "networking.admin.port",
            "must differ from networking.port (both are 10001)",
            "such as 9901",
        );
        let err = ConfigError::Invalid {
            origin: "config/zone-ingress.yaml".into(),
            problems: vec![p],
        };
        assert_eq!(
            err.to_string(),
            "config/zone-ingress.yaml: networking.admin.port: must differ from networking.port \
             (both are 10001); set networking.admin.port to a free port such as 9901"
        );
    }

    #[test]
    fn admin_port_default_collision_is_explained() {
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, port: 9901}\n",
            "networking.admin.port",
            "defaults to 9901",
            "such as 9903",
        );
    }

    #[test]
    fn admin_port_collision_with_default_port_is_explained() {
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, admin: {port: 10001}}\n",
            "networking.admin.port",
            "(both are 10001) (networking.port defaults to 10001)",
            "such as 9901",
        );
    }

    #[test]
    fn admin_port_must_be_valid() {
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, admin: {port: 70000}}\n",
            "networking.admin.port",
            "70000",
            "between 1 and 65535",
        );
    }

    #[test]
    fn service_tag_required() {
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4}\navailableServices:\n  - {tags: {kuma.io/service: a}}\n  - {tags: {version: v1}, mesh: default}\n",
            "availableServices[1].tags",
            "kuma.io/service tag is missing",
            "add `kuma.io/service: <service name>`",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4}\navailableServices:\n  - {mesh: default}\n",
            "availableServices[0].tags",
            "kuma.io/service tag is missing",
            "kuma.io/service",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4}\navailableServices:\n  - {tags: {kuma.io/service: a, version: 2}}\n",
            "availableServices[0].tags[\"version\"]",
            "must be strings",
            "quote the value",
        );
    }

    #[test]
    fn address_must_be_ip() {
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: ingress.example.com}\n",
            "networking.address",
            "does not resolve host names",
            "networking.advertisedAddress",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: '1.2.3.4:10001'}\n",
            "networking.address",
            "includes a port",
            "networking.port to 10001",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: '[::1]'}\n",
            "networking.address",
            "brackets",
            "::1",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {port: 10001}\n",
            "networking.address",
            "missing",
            "IP address",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\n",
            "networking",
            "missing",
            "address",
        );
    }

    #[test]
    fn unknown_fields_rejected_with_known_list() {
        let p = one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4}\nspec: {}\n",
            "spec",
            "unknown field `spec` (known fields: type, name, mesh, zone, networking, availableServices; accepted and ignored: creationTime, modificationTime, labels)",
            "remove it",
        );
        assert!(p.message.contains("creationTime"), "{}", p.message);
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, advertised_port: 1}\n",
            "networking.advertised_port",
            "known fields: address, port, advertisedAddress, advertisedPort, admin)",
            "rename it to `advertisedPort`",
        );
        // A misspelling is one problem, not also a "missing" advertisedPort.
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, advertisedAddress: a.example, advertised_port: 1}\n",
            "networking.advertised_port",
            "unknown field",
            "rename it to `advertisedPort`",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4, admin: {address: x}}\n",
            "networking.admin.address",
            "known fields: port",
            "remove it",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4}\navailableServices: [{tags: {kuma.io/service: a}, zone: z}]\n",
            "availableServices[0].zone",
            "known fields: tags, instances, mesh, externalService",
            "remove it",
        );
    }

    #[test]
    fn mesh_must_be_empty() {
        ok("type: ZoneIngress\nmesh: ''\nname: zi\nnetworking: {address: 1.2.3.4}\n");
        one_problem(
            "type: ZoneIngress\nmesh: default\nname: zi\nnetworking: {address: 1.2.3.4}\n",
            "mesh",
            "belongs to no mesh",
            "remove `mesh:`",
        );
    }

    #[test]
    fn wrong_types_reported() {
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: [1]\n",
            "networking",
            "expected a mapping, found a list",
            "address",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4}\navailableServices: {}\n",
            "availableServices",
            "expected a list",
            "kuma.io/service",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4}\navailableServices: [{tags: {kuma.io/service: a}, instances: -1}]\n",
            "availableServices[0].instances",
            "out of range",
            "between 0 and",
        );
        one_problem(
            "type: ZoneIngress\nname: zi\nnetworking: {address: 1.2.3.4}\navailableServices: [{tags: {kuma.io/service: a}, externalService: 'yes'}]\n",
            "availableServices[0].externalService",
            "expected true or false",
            "true or false",
        );
        one_problem("", "", "empty", "type: ZoneIngress");
        one_problem("- a\n", "", "expected a mapping, found a list", "type");
    }

    #[test]
    fn all_problems_collected() {
        let ps = problems(
            "type: Dataplane\nname: ''\nbogus: 1\nnetworking:\n  address: host.example\n  port: 0\n  advertisedAddress: 10.0.0.1\n  admin: {port: 70000}\navailableServices: [{tags: {}}]\n",
        );
        let fields: Vec<&str> = ps.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "bogus",
                "type",
                "name",
                "networking.address",
                "networking.port",
                "networking.advertisedPort",
                "networking.admin.port",
                "availableServices[0].tags",
            ],
            "{ps:#?}"
        );
    }

    #[test]
    fn syntax_error_names_file_line_column() {
        let err = match ZoneIngress::from_yaml_str("type: ZoneIngress\nname: [zi\n", "zi.yaml") {
            Err(e) => e,
            Ok(z) => panic!("{z:?}"),
        };
        // The unclosed `[` is detected at the end of the input, line 3.
        assert!(
            matches!(
                err,
                ConfigError::Parse {
                    line: 3,
                    column: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("zi.yaml:"), "{err}");
    }

    #[test]
    fn duplicate_keys_are_a_parse_error() {
        let err = match ZoneIngress::from_yaml_str(
            "type: ZoneIngress\nname: a\nname: b\nnetworking: {address: 1.2.3.4}\n",
            "zi.yaml",
        ) {
            Err(e) => e,
            Ok(z) => panic!("{z:?}"),
        };
        // serde_norway points at the start of the mapping holding the duplicate, not at the
        // second key; the message names the key.
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.starts_with("zi.yaml:1:1: "), "{text}");
        assert!(text.contains("duplicate entry with key \"name\""), "{text}");
    }

    #[test]
    fn load_errors_name_the_path() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let missing = dir.path().join("missing.yaml");
        let err = match ZoneIngress::load(&missing) {
            Err(e) => e,
            Ok(z) => panic!("{z:?}"),
        };
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        let bad = dir.path().join("bad.yaml");
        if let Err(e) = std::fs::write(
            &bad,
            "type: ZoneIngress\nname: zi\nnetworking: {address: x y}\n",
        ) {
            panic!("{e}");
        }
        let err = match ZoneIngress::load(&bad) {
            Err(e) => e,
            Ok(z) => panic!("{z:?}"),
        };
        assert!(
            err.to_string()
                .starts_with(&format!("{}: networking.address: ", bad.display())),
            "{err}"
        );

        let good = dir.path().join("good.yaml");
        if let Err(e) = std::fs::write(&good, MINIMAL) {
            panic!("{e}");
        }
        match ZoneIngress::load(&good) {
            Ok(z) => assert_eq!(z.name, "zi"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn to_json_uses_kuma_names() {
        let z = ok("
type: ZoneIngress
name: zi
zone: z2
networking: {address: 192.168.0.1, port: 10001, advertisedAddress: 10.0.0.1, advertisedPort: 10000, admin: {port: 9901}}
availableServices: [{tags: {kuma.io/service: backend}, instances: 1, mesh: default}]
");
        assert_eq!(
            z.to_json(),
            json!({
                "type": "ZoneIngress",
                "name": "zi",
                "zone": "z2",
                "networking": {
                    "address": "192.168.0.1",
                    "port": 10001,
                    "advertisedAddress": "10.0.0.1",
                    "advertisedPort": 10000,
                    "admin": {"port": 9901}
                },
                "availableServices": [{
                    "tags": {"kuma.io/service": "backend"},
                    "instances": 1,
                    "mesh": "default",
                    "externalService": false
                }]
            })
        );
        // Unset optional fields are omitted, not null.
        let min = ok(MINIMAL).to_json();
        assert_eq!(min["networking"].get("advertisedAddress"), None);
        assert_eq!(min.get("zone"), None);
        assert_eq!(min.get("availableServices"), None);
    }

    #[test]
    fn to_json_round_trips_through_the_parser() {
        let z = ok("
type: ZoneIngress
name: zi
networking: {address: 'fd00::1', port: 10001, advertisedAddress: a.example, advertisedPort: 1}
availableServices: [{tags: {kuma.io/service: backend}, instances: 3, mesh: m, externalService: true}]
");
        // JSON is YAML, so the bootstrap form must read back to the same resource.
        let text = z.to_json().to_string();
        assert_eq!(ok(&text), z);
    }
}
