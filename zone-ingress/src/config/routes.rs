//! The standalone routes file: SNI → endpoints, for running without a control plane.
//!
//! It stands in for what Kuma would send over xDS (one filter chain per SNI, one EDS
//! cluster per chain), so the rules mirror what that data can express: exact SNIs and
//! literal `IP:port` endpoints.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde_norway::Value;

use super::error::ConfigError;
use super::yaml::{self, Fields, Problems, describe, index};

/// Longest SNI a route may have. Envoy rejects an SNI over 255 bytes (envoyproxy/envoy#8915,
/// which Kuma's SNI code works around), so no Kuma sidecar can send a longer one and a longer
/// route could never match.
pub const MAX_SNI_LEN: usize = 255;

const TOP_FIELDS: &[&str] = &["routes"];
const ROUTE_FIELDS: &[&str] = &["sni", "endpoints"];

/// One route: a ClientHello whose SNI equals `sni` byte for byte goes to one of `endpoints`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub sni: String,
    pub endpoints: Vec<SocketAddr>,
}

/// A parsed routes file. May be empty: every connection is then rejected as unknown SNI.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoutesFile {
    pub routes: Vec<RouteSpec>,
}

impl RoutesFile {
    /// Parses and validates a routes document. `origin` prefixes every message.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let doc = yaml::parse(text, origin)?;
        let mut problems = Problems::default();
        let routes = read_routes_file(&doc, &mut problems);
        problems.finish(origin, routes)
    }

    /// Reads and validates the file at `path`; messages name the path.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        super::load_file(path, Self::from_yaml_str)
    }
}

/// One line, so each problem stays one line of output.
const EXAMPLE: &str = r#"routes: [{sni: "backend{mesh=default}", endpoints: ["10.0.0.5:8443"]}]"#;

fn read_routes_file(doc: &Value, problems: &mut Problems) -> Option<RoutesFile> {
    if matches!(doc, Value::Null) {
        problems.push(
            "",
            "the document is empty",
            format!("write `routes: []` for an empty table, or routes such as {EXAMPLE}"),
        );
        return None;
    }
    let top = Fields::check(doc, "", TOP_FIELDS, &[], problems)?;
    // An explicit `routes:` with nothing after it is null; we ask for `[]` so that an empty
    // table is always a deliberate choice rather than the result of commenting everything out.
    let items = match top.raw("routes") {
        Some(Value::Sequence(items)) => items,
        Some(other) => {
            problems.push(
                "routes",
                format!("must be a list, found {}", describe(other)),
                format!("write `routes: []` for an empty table, or a list such as {EXAMPLE}"),
            );
            return None;
        }
        None => {
            top.missing(
                "routes",
                format!("add `routes: []` for an empty table, or a list such as {EXAMPLE}"),
                problems,
            );
            return None;
        }
    };

    let mut routes = Vec::with_capacity(items.len());
    let mut ok = true;
    // SNI → index of the first route that claimed it.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let path = index("routes", i);
        let Some(route) = read_route(item, &path, problems) else {
            ok = false;
            continue;
        };
        if let Some(first) = seen.get(&route.sni) {
            problems.push(
                format!("{path}.sni"),
                format!(
                    "duplicate SNI {:?}: routes[{first}] and routes[{i}] both claim it",
                    route.sni
                ),
                format!(
                    "merge the endpoints of routes[{i}] into routes[{first}] and delete routes[{i}]"
                ),
            );
            ok = false;
            continue;
        }
        seen.insert(route.sni.clone(), i);
        routes.push(route);
    }
    ok.then_some(RoutesFile { routes })
}

fn read_route(v: &Value, path: &str, problems: &mut Problems) -> Option<RouteSpec> {
    let route = Fields::check(v, path, ROUTE_FIELDS, &[], problems)?;
    let sni = read_sni(&route, problems);
    let endpoints = read_endpoints(&route, problems);
    Some(RouteSpec {
        sni: sni?,
        endpoints: endpoints?,
    })
}

fn read_sni(route: &Fields<'_>, problems: &mut Problems) -> Option<String> {
    let field = route.path("sni");
    if route.get("sni").is_none() {
        route.missing(
            "sni",
            "add `sni:` with the exact TLS server name clients send, e.g. \"backend{mesh=default}\"",
            problems,
        );
        return None;
    }
    let sni = route.string("sni", problems)?;
    if sni.is_empty() {
        problems.push(
            field,
            "must not be empty",
            "set it to the exact TLS server name clients send, e.g. \"backend{mesh=default}\"",
        );
        return None;
    }
    if sni.len() > MAX_SNI_LEN {
        problems.push(
            field,
            format!(
                "is {} bytes long, but SNIs are limited to {MAX_SNI_LEN} bytes (Envoy rejects longer \
                 ones, so no Kuma sidecar could ever send it and the route would never match)",
                sni.len()
            ),
            format!("shorten it to at most {MAX_SNI_LEN} bytes"),
        );
        return None;
    }
    Some(sni)
}

fn read_endpoints(route: &Fields<'_>, problems: &mut Problems) -> Option<Vec<SocketAddr>> {
    let field = route.path("endpoints");
    let items = match route.get("endpoints") {
        Some(Value::Sequence(items)) if !items.is_empty() => items,
        Some(Value::Sequence(_)) | None => {
            problems.push(
                field,
                "needs at least one endpoint",
                "list the upstream addresses, e.g. endpoints: [\"10.0.0.5:8443\"], or delete the \
                 route to reject its SNI",
            );
            return None;
        }
        Some(other) => {
            problems.push(
                field,
                format!("must be a list, found {}", describe(other)),
                "write a list of IP:port strings, e.g. endpoints: [\"10.0.0.5:8443\"]",
            );
            return None;
        }
    };
    let mut out: Vec<SocketAddr> = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let path = index(&field, i);
        let Some(addr) = read_endpoint(item, &path, problems) else {
            ok = false;
            continue;
        };
        // Compare parsed addresses so `[fd00::5]:1` and `[fd00:0::5]:1` count as the same.
        if let Some(first) = out.iter().position(|a| *a == addr) {
            // `out` only holds accepted endpoints; find the original index for the message.
            let first_index = items
                .iter()
                .position(|v| endpoint_of(v) == Some(addr))
                .unwrap_or(first);
            problems.push(
                path,
                format!("{addr} is listed twice (endpoints[{first_index}] and endpoints[{i}])"),
                format!("remove endpoints[{i}]"),
            );
            ok = false;
            continue;
        }
        out.push(addr);
    }
    ok.then_some(out)
}

fn endpoint_of(v: &Value) -> Option<SocketAddr> {
    match v {
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn read_endpoint(v: &Value, path: &str, problems: &mut Problems) -> Option<SocketAddr> {
    let Value::String(raw) = v else {
        problems.push(
            path,
            format!("expected an \"IP:port\" string, found {}", describe(v)),
            "write it as a quoted string, e.g. \"10.0.0.5:8443\" or \"[fd00::5]:8443\"",
        );
        return None;
    };
    let text = raw.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            problems.push(
                path,
                format!("{text:?} has port 0, which cannot be connected to"),
                "use the upstream's real port, e.g. \"10.0.0.5:8443\"",
            );
            return None;
        }
        if addr.ip().is_unspecified() {
            problems.push(
                path,
                format!(
                    "{text:?} is the unspecified address, a listening wildcard, not a destination"
                ),
                format!(
                    "use the upstream's own IP, e.g. \"127.0.0.1:{}\"",
                    addr.port()
                ),
            );
            return None;
        }
        return Some(addr);
    }
    let (message, fix) = if let Ok(ip) = text.parse::<IpAddr>() {
        let example = SocketAddr::new(ip, 8443);
        (
            format!("{text:?} has no port"),
            format!(
                "add the port, e.g. \"{example}\"{}",
                if ip.is_ipv6() {
                    " (IPv6 addresses go in brackets)"
                } else {
                    ""
                }
            ),
        )
    } else if let Some((host, port)) = text.rsplit_once(':')
        && !host.is_empty()
        && !host.contains(':')
        && !host.starts_with('[')
        && port.parse::<u16>().is_ok()
    {
        // Looks like `name:port`: resolving names would make the route table depend on DNS
        // at load time and go stale silently, so we take literal addresses only.
        (
            format!(
                "{text:?} uses a host name, but endpoints must be IP addresses (DNS names are \
                 not resolved)"
            ),
            format!("resolve {host} yourself and write \"<IP>:{port}\""),
        )
    } else if let Some((_, port)) = text.rsplit_once(':')
        && port.parse::<u32>().is_ok_and(|p| p > u32::from(u16::MAX))
    {
        (
            format!("{text:?} has port {port}, beyond 65535"),
            "use a port between 1 and 65535".to_owned(),
        )
    } else {
        (
            format!("{text:?} is not an IP:port address"),
            "write \"IP:port\", e.g. \"10.0.0.5:8443\" or \"[fd00::5]:8443\" (no DNS names)"
                .to_owned(),
        )
    };
    problems.push(path, message, fix);
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_ROUTES_YAML, Problem};

    fn ok(text: &str) -> RoutesFile {
        match RoutesFile::from_yaml_str(text, "routes.yaml") {
            Ok(r) => r,
            Err(e) => panic!("expected valid, got:\n{e}"),
        }
    }

    fn problems(text: &str) -> Vec<Problem> {
        match RoutesFile::from_yaml_str(text, "routes.yaml") {
            Ok(r) => panic!("expected invalid, got {r:?}"),
            Err(ConfigError::Invalid { origin, problems }) => {
                assert_eq!(origin, "routes.yaml");
                problems
            }
            Err(e) => panic!("expected Invalid, got {e:?}"),
        }
    }

    fn one_problem(text: &str, field: &str, in_message: &str, in_fix: &str) -> Problem {
        let ps = problems(text);
        assert_eq!(ps.len(), 1, "{ps:#?}");
        let p = ps[0].clone();
        assert_eq!(p.field, field, "{p:#?}");
        assert!(p.message.contains(in_message), "message: {}", p.message);
        assert!(p.fix.contains(in_fix), "fix: {}", p.fix);
        p
    }

    fn sa(s: &str) -> SocketAddr {
        match s.parse() {
            Ok(a) => a,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn example_parses_with_ipv6() {
        let r = ok(r#"
routes:
  - sni: "backend{mesh=default}"
    endpoints: ["10.0.0.5:8443", "10.0.0.6:8443", "[fd00::5]:8443"]
  - sni: a601e0c00295a9fbe.backend.80.default.ms
    endpoints: ["[::1]:4433"]
"#);
        assert_eq!(r.routes.len(), 2);
        assert_eq!(r.routes[0].sni, "backend{mesh=default}");
        assert_eq!(
            r.routes[0].endpoints,
            [
                sa("10.0.0.5:8443"),
                sa("10.0.0.6:8443"),
                sa("[fd00::5]:8443")
            ]
        );
        assert_eq!(r.routes[1].endpoints, [sa("[::1]:4433")]);
    }

    #[test]
    fn embedded_default_parses() {
        let r = match RoutesFile::from_yaml_str(DEFAULT_ROUTES_YAML, "embedded default") {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let pairs: Vec<(&str, &[SocketAddr])> = r
            .routes
            .iter()
            .map(|r| (r.sni.as_str(), r.endpoints.as_slice()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("backend{mesh=default}", &[sa("127.0.0.1:4433")][..]),
                (
                    "a601e0c00295a9fbe.backend.80.default.ms",
                    &[sa("127.0.0.1:4433")][..]
                ),
            ]
        );
    }

    #[test]
    fn empty_table_is_valid() {
        assert!(ok("routes: []\n").routes.is_empty());
    }

    #[test]
    fn routes_must_be_a_list() {
        one_problem(
            "routes:\n",
            "routes",
            "must be a list, found nothing",
            "routes: []",
        );
        one_problem(
            "routes: {sni: a}\n",
            "routes",
            "must be a list, found a mapping",
            "routes: []",
        );
        let ps = problems("other: 1\n");
        let fields: Vec<&str> = ps.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["other", "routes"], "{ps:#?}");
    }

    #[test]
    fn missing_routes_and_empty_file() {
        one_problem("{}\n", "routes", "missing", "routes: []");
        one_problem("# only a comment\n", "", "empty", "routes: []");
    }

    #[test]
    fn sni_rules() {
        one_problem(
            "routes: [{sni: '', endpoints: ['1.2.3.4:1']}]\n",
            "routes[0].sni",
            "must not be empty",
            "backend{mesh=default}",
        );
        one_problem(
            "routes: [{endpoints: ['1.2.3.4:1']}]\n",
            "routes[0].sni",
            "missing",
            "add `sni:`",
        );
        one_problem(
            "routes: [{sni: 42, endpoints: ['1.2.3.4:1']}]\n",
            "routes[0].sni",
            "expected a string",
            "quote",
        );
        let long = "a".repeat(256);
        one_problem(
            &format!("routes: [{{sni: {long}, endpoints: ['1.2.3.4:1']}}]\n"),
            "routes[0].sni",
            "256 bytes long, but SNIs are limited to 255 bytes (Envoy rejects",
            "at most 255 bytes",
        );
        // Exactly 255 is fine.
        let max = "a".repeat(255);
        ok(&format!(
            "routes: [{{sni: {max}, endpoints: ['1.2.3.4:1']}}]\n"
        ));
    }

    #[test]
    fn sni_is_matched_exactly_so_case_variants_are_distinct() {
        let r = ok(
            "routes: [{sni: a, endpoints: ['1.2.3.4:1']}, {sni: A, endpoints: ['1.2.3.4:1']}]\n",
        );
        assert_eq!(r.routes.len(), 2);
    }

    #[test]
    fn duplicate_sni_names_both_indices() {
        one_problem(
            "routes:\n  - {sni: a, endpoints: ['1.2.3.4:1']}\n  - {sni: b, endpoints: ['1.2.3.4:1']}\n  - {sni: a, endpoints: ['1.2.3.5:1']}\n",
            "routes[2].sni",
            "duplicate SNI \"a\": routes[0] and routes[2]",
            "into routes[0] and delete routes[2]",
        );
    }

    #[test]
    fn endpoints_required() {
        one_problem(
            "routes: [{sni: a, endpoints: []}]\n",
            "routes[0].endpoints",
            "at least one endpoint",
            "10.0.0.5:8443",
        );
        one_problem(
            "routes: [{sni: a}]\n",
            "routes[0].endpoints",
            "at least one endpoint",
            "endpoints:",
        );
        one_problem(
            "routes: [{sni: a, endpoints: '1.2.3.4:1'}]\n",
            "routes[0].endpoints",
            "must be a list",
            "endpoints: [",
        );
    }

    #[test]
    fn endpoint_must_be_ip_port() {
        let cases = [
            (
                "'backend.local:8443'",
                "DNS names are not resolved",
                "resolve backend.local",
            ),
            ("'10.0.0.5'", "has no port", "\"10.0.0.5:8443\""),
            ("'fd00::5'", "has no port", "[fd00::5]:8443"),
            ("'10.0.0.5:0'", "port 0", "real port"),
            ("'10.0.0.5:70000'", "beyond 65535", "between 1 and 65535"),
            ("'0.0.0.0:8443'", "unspecified", "127.0.0.1:8443"),
            ("'not an address'", "not an IP:port", "no DNS names"),
            ("8443", "expected an \"IP:port\" string", "quoted"),
        ];
        for (value, in_message, in_fix) in cases {
            one_problem(
                &format!("routes: [{{sni: a, endpoints: ['1.2.3.4:1', {value}]}}]\n"),
                "routes[0].endpoints[1]",
                in_message,
                in_fix,
            );
        }
    }

    #[test]
    fn duplicate_endpoint_within_route() {
        one_problem(
            "routes: [{sni: a, endpoints: ['[fd00::5]:1', '1.2.3.4:1', '[fd00:0::5]:1']}]\n",
            "routes[0].endpoints[2]",
            "[fd00::5]:1 is listed twice (endpoints[0] and endpoints[2])",
            "remove endpoints[2]",
        );
        // The same endpoint in two routes is fine.
        ok("routes: [{sni: a, endpoints: ['1.2.3.4:1']}, {sni: b, endpoints: ['1.2.3.4:1']}]\n");
    }

    #[test]
    fn unknown_fields_rejected() {
        one_problem(
            "routes: [{sni: a, endpoints: ['1.2.3.4:1'], weight: 2}]\n",
            "routes[0].weight",
            "unknown field `weight` (known fields: sni, endpoints)",
            "remove it",
        );
        one_problem(
            "routes: []\nlisteners: []\n",
            "listeners",
            "known fields: routes",
            "remove it",
        );
        one_problem(
            "routes: [{SNI: a, endpoints: ['1.2.3.4:1']}]\n",
            "routes[0].SNI",
            "unknown field",
            "rename it to `sni`",
        );
    }

    #[test]
    fn all_problems_collected() {
        let ps = problems(
            "routes:\n  - {sni: '', endpoints: ['x:1', '1.2.3.4']}\n  - {sni: b, endpoints: []}\n  - not-a-mapping\n",
        );
        let fields: Vec<&str> = ps.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "routes[0].sni",
                "routes[0].endpoints[0]",
                "routes[0].endpoints[1]",
                "routes[1].endpoints",
                "routes[2]",
            ],
            "{ps:#?}"
        );
    }

    #[test]
    fn messages_name_origin_field_and_fix() {
        let err = match RoutesFile::from_yaml_str(
            "routes: [{sni: a, endpoints: ['db.internal:5432']}]\n",
            "config/routes.yaml",
        ) {
            Err(e) => e,
            Ok(r) => panic!("{r:?}"),
        };
        assert_eq!(
            err.to_string(),
            "config/routes.yaml: routes[0].endpoints[0]: \"db.internal:5432\" uses a host name, \
             but endpoints must be IP addresses (DNS names are not resolved); resolve db.internal \
             yourself and write \"<IP>:5432\""
        );
    }

    #[test]
    fn syntax_error_names_file_line_column() {
        let err = match RoutesFile::from_yaml_str("routes:\n  - sni: \"a\n", "r.yaml") {
            Err(e) => e,
            Ok(r) => panic!("{r:?}"),
        };
        assert!(
            matches!(err, ConfigError::Parse { line, column, .. } if line > 0 && column > 0),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("r.yaml:"), "{err}");
    }

    #[test]
    fn load_errors_name_the_path() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let missing = dir.path().join("nope.yaml");
        let err = match RoutesFile::load(&missing) {
            Err(e) => e,
            Ok(r) => panic!("{r:?}"),
        };
        assert!(
            err.to_string().starts_with(&missing.display().to_string()),
            "{err}"
        );

        let bad = dir.path().join("routes.yaml");
        if let Err(e) = std::fs::write(&bad, "routes: [{sni: a, endpoints: ['x']}]\n") {
            panic!("{e}");
        }
        let err = match RoutesFile::load(&bad) {
            Err(e) => e,
            Ok(r) => panic!("{r:?}"),
        };
        assert!(
            err.to_string()
                .starts_with(&format!("{}: routes[0].endpoints[0]: ", bad.display())),
            "{err}"
        );

        let syntax = dir.path().join("syntax.yaml");
        if let Err(e) = std::fs::write(&syntax, "routes: [\n") {
            panic!("{e}");
        }
        let err = match RoutesFile::load(&syntax) {
            Err(e) => e,
            Ok(r) => panic!("{r:?}"),
        };
        assert!(
            err.to_string()
                .starts_with(&format!("{}:", syntax.display())),
            "{err}"
        );
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    }
}
