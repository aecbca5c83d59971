//! The agent's own configuration file (`--agent-config`): settings of this agent that are not
//! part of the ZoneIngress resource, which Kuma owns. Today it holds the `guard` section (the XDP
//! guard in front of the listener).
//!
//! ```yaml
//! guard:
//!   enabled: true
//!   interface: eth0            # default: the interface that carries networking.address
//!   mode: auto                 # auto (native, else generic), native, generic
//!   allow_cidrs: [10.0.0.0/8, "fd00::/8"]   # empty or absent: every source
//!   syn_rate: 100              # SYNs per second per source; 0 or absent: no limit
//!   syn_burst: 200             # default: syn_rate
//!   global_syn_rate: 10000     # SYNs per second from all sources together; 0: no ceiling
//!   global_syn_burst: 20000    # default: global_syn_rate
//!   max_sources: 65536         # sources whose SYN rate is tracked at once
//! ```
//!
//! Field names are snake_case. Every problem of a file is reported at once, as
//! `FILE: FIELD: problem; fix`.

use std::path::Path;

use ipnet::IpNet;
use serde_norway::Value;

use super::error::ConfigError;
use super::yaml::{self, Fields, Problems, describe, index};

const TOP_FIELDS: &[&str] = &["guard"];
const GUARD_FIELDS: &[&str] = &[
    "enabled",
    "interface",
    "mode",
    "allow_cidrs",
    "syn_rate",
    "syn_burst",
    "global_syn_rate",
    "global_syn_burst",
    "max_sources",
];

/// Default and bounds of `guard.max_sources`.
pub const DEFAULT_MAX_SOURCES: u32 = zone_ingress_common::guard::DEFAULT_MAX_SOURCES;
const MIN_MAX_SOURCES: u32 = 16;
const MAX_MAX_SOURCES: u32 = 16 * 1024 * 1024;
/// Prefixes each allow-list trie holds (matches the BPF map's capacity).
pub const MAX_ALLOW_CIDRS: usize = zone_ingress_common::guard::MAX_ALLOW_PREFIXES as usize;

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Native (driver) mode; generic mode, with a warning, where the driver has no XDP support.
    #[default]
    Auto,
    /// Native mode only: fail if the driver cannot run XDP.
    Native,
    /// Generic (SKB) mode: works on every interface, after the kernel built an skb.
    Generic,
}

impl XdpMode {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "native" => Some(Self::Native),
            "generic" => Some(Self::Generic),
            _ => None,
        }
    }
}

/// The `guard` section, with defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardSection {
    pub enabled: bool,
    pub interface: Option<String>,
    pub mode: XdpMode,
    /// Normalised prefixes (host bits are rejected, not silently cleared). Empty: every source.
    pub allow_cidrs: Vec<IpNet>,
    /// SYNs per second per source; 0: no per-source limit.
    pub syn_rate: u32,
    /// SYNs a source may send at once (at least 1); `None`: as many as `syn_rate`.
    pub syn_burst: Option<u32>,
    /// SYNs per second from all sources together; 0: no global ceiling.
    pub global_syn_rate: u32,
    /// `None`: as many as `global_syn_rate`.
    pub global_syn_burst: Option<u32>,
    pub max_sources: u32,
}

impl Default for GuardSection {
    fn default() -> Self {
        Self {
            enabled: false,
            interface: None,
            mode: XdpMode::Auto,
            allow_cidrs: Vec::new(),
            syn_rate: 0,
            syn_burst: None,
            global_syn_rate: 0,
            global_syn_burst: None,
            max_sources: DEFAULT_MAX_SOURCES,
        }
    }
}

/// A parsed agent configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentConfig {
    pub guard: GuardSection,
}

impl AgentConfig {
    /// Parses and validates an agent configuration document. `origin` prefixes every message.
    /// An empty document is valid: every setting keeps its default.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let doc = yaml::parse(text, origin)?;
        let mut problems = Problems::default();
        let config = read_agent_config(&doc, &mut problems);
        problems.finish(origin, config)
    }

    /// Reads and validates the file at `path`; messages name the path.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        super::load_file(path, Self::from_yaml_str)
    }
}

fn read_agent_config(doc: &Value, problems: &mut Problems) -> Option<AgentConfig> {
    if matches!(doc, Value::Null) {
        return Some(AgentConfig::default());
    }
    let top = Fields::check(doc, "", TOP_FIELDS, &[], problems)?;
    let guard = match top.get("guard") {
        None => GuardSection::default(),
        Some(v) => read_guard(v, problems)?,
    };
    Some(AgentConfig { guard })
}

fn read_guard(v: &Value, problems: &mut Problems) -> Option<GuardSection> {
    let f = Fields::check(v, "guard", GUARD_FIELDS, &[], problems)?;
    let before = problems.0.len();
    let mut g = GuardSection::default();
    if let Some(b) = f.bool("enabled", problems) {
        g.enabled = b;
    }
    if let Some(name) = f.string("interface", problems) {
        match interface_problem(&name) {
            None => g.interface = Some(name),
            Some(why) => problems.push(
                f.path("interface"),
                why,
                "write the name of a network interface as `ip link` shows it, e.g. eth0",
            ),
        }
    }
    if let Some(mode) = f.string("mode", problems) {
        match XdpMode::parse(&mode) {
            Some(m) => g.mode = m,
            None => problems.push(
                f.path("mode"),
                format!("unknown mode {mode:?}"),
                "use auto (native, falling back to generic), native or generic",
            ),
        }
    }
    if let Some(cidrs) = read_cidrs(&f, problems) {
        g.allow_cidrs = cidrs;
    }
    g.syn_rate = f.u32("syn_rate", problems).unwrap_or(0);
    g.global_syn_rate = f.u32("global_syn_rate", problems).unwrap_or(0);
    g.syn_burst = read_burst(&f, "syn_burst", "syn_rate", g.syn_rate, problems);
    g.global_syn_burst = read_burst(
        &f,
        "global_syn_burst",
        "global_syn_rate",
        g.global_syn_rate,
        problems,
    );
    if let Some(n) = f.u32("max_sources", problems) {
        if (MIN_MAX_SOURCES..=MAX_MAX_SOURCES).contains(&n) {
            g.max_sources = n;
        } else {
            problems.push(
                f.path("max_sources"),
                format!("{n} is out of range"),
                format!(
                    "use a number of sources between {MIN_MAX_SOURCES} and {MAX_MAX_SOURCES} \
                     (each costs about 80 bytes of kernel memory)"
                ),
            );
        }
    }
    (problems.0.len() == before).then_some(g)
}

/// `None` when `name` can be an interface name (what the kernel accepts: 1-15 bytes, no `/`,
/// no whitespace, not `.` or `..`).
pub fn interface_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > 15 {
        return Some(format!(
            "interface name {name:?} must be 1 to 15 characters long"
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Some(format!("{name:?} is not a valid interface name"));
    }
    None
}

/// A burst: at least 1 (absent: the rate's); meaningless without its rate.
fn read_burst(
    f: &Fields<'_>,
    key: &str,
    rate_key: &str,
    rate: u32,
    problems: &mut Problems,
) -> Option<u32> {
    match f.u32(key, problems) {
        None => None,
        Some(_) if rate == 0 => {
            problems.push(
                f.path(key),
                format!("has no effect without {rate_key}"),
                format!("set {rate_key} (SYNs per second) too, or remove {key}"),
            );
            None
        }
        Some(0) => {
            problems.push(
                f.path(key),
                "a burst of 0 would drop every SYN",
                format!("use at least 1, or set {rate_key}: 0 to remove the limit"),
            );
            None
        }
        Some(n) => Some(n),
    }
}

fn read_cidrs(f: &Fields<'_>, problems: &mut Problems) -> Option<Vec<IpNet>> {
    let field = f.path("allow_cidrs");
    let items = match f.get("allow_cidrs")? {
        Value::Sequence(items) => items,
        other => {
            problems.push(
                field,
                format!("must be a list, found {}", describe(other)),
                "write a list of CIDRs, e.g. [10.0.0.0/8, \"fd00::/8\"]",
            );
            return None;
        }
    };
    if items.len() > MAX_ALLOW_CIDRS {
        problems.push(
            field.clone(),
            format!(
                "{} prefixes, more than the {MAX_ALLOW_CIDRS} the guard holds",
                items.len()
            ),
            "merge neighbouring prefixes into shorter ones",
        );
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = index(&field, i);
        let Some(text) = yaml::as_string(item, &path, problems) else {
            continue;
        };
        match parse_cidr(&text) {
            Ok(net) => out.push(net),
            Err((why, fix)) => problems.push(path, why, fix),
        }
    }
    Some(out)
}

/// A CIDR (`10.0.0.0/8`, `fd00::/8`) or a single address (a /32 or /128). Host bits must be
/// zero: `10.0.0.1/8` is far more often a typo than a wish to allow all of 10/8.
pub fn parse_cidr(text: &str) -> Result<IpNet, (String, String)> {
    let text = text.trim();
    let net = match text.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match text.parse::<std::net::IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err((
                    format!("{text:?} is not a CIDR"),
                    "write ADDRESS/PREFIX, e.g. 10.0.0.0/8 or fd00::/8 (a bare address means only \
                     that address)"
                        .to_owned(),
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err((
            format!("{text} has bits set after its /{} prefix", net.prefix_len()),
            format!("write {} (the network it names)", net.trunc()),
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match AgentConfig::from_yaml_str(text, "agent.yaml") {
            Ok(c) => panic!("accepted {text:?} as {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_document_is_all_defaults() {
        let c = AgentConfig::from_yaml_str("", "agent.yaml").expect("empty is valid");
        assert_eq!(c, AgentConfig::default());
        assert!(!c.guard.enabled);
    }

    #[test]
    fn full_guard_section() {
        let c = AgentConfig::from_yaml_str(
            "guard:\n  enabled: true\n  interface: eth0\n  mode: generic\n  allow_cidrs: [10.0.0.0/8, \"fd00::/8\", 192.0.2.7]\n  syn_rate: 100\n  global_syn_rate: 5000\n  global_syn_burst: 9000\n  max_sources: 1024\n",
            "agent.yaml",
        )
        .expect("valid");
        let g = c.guard;
        assert!(g.enabled);
        assert_eq!(g.interface.as_deref(), Some("eth0"));
        assert_eq!(g.mode, XdpMode::Generic);
        let cidrs: Vec<String> = g.allow_cidrs.iter().map(|n| n.to_string()).collect();
        assert_eq!(cidrs, ["10.0.0.0/8", "fd00::/8", "192.0.2.7/32"]);
        assert_eq!(
            (g.syn_rate, g.syn_burst),
            (100, None),
            "burst defaults to the rate"
        );
        assert_eq!((g.global_syn_rate, g.global_syn_burst), (5000, Some(9000)));
        assert_eq!(g.max_sources, 1024);
    }

    #[test]
    fn every_problem_names_file_field_and_fix() {
        let text = err(
            "guard:\n  enabled: yes please\n  allow_cidrs: [10.0.0.1/8, nonsense, 7]\n  syn_burst: 5\n  mode: turbo\n  max_sources: 1\n  synRate: 3\n",
        );
        for needle in [
            "agent.yaml: guard.enabled: expected true or false",
            "agent.yaml: guard.allow_cidrs[0]: 10.0.0.1/8 has bits set after its /8 prefix; write 10.0.0.0/8",
            "agent.yaml: guard.allow_cidrs[1]: \"nonsense\" is not a CIDR; write ADDRESS/PREFIX",
            "agent.yaml: guard.allow_cidrs[2]: expected a string",
            "agent.yaml: guard.syn_burst: has no effect without syn_rate; set syn_rate",
            "agent.yaml: guard.mode: unknown mode \"turbo\"; use auto",
            "agent.yaml: guard.max_sources: 1 is out of range",
            "agent.yaml: guard.synRate: unknown field `synRate`",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(text.lines().count(), 8, "{text}");
    }

    #[test]
    fn unknown_top_level_section_and_zero_burst() {
        let text = err("guard:\n  syn_rate: 10\n  syn_burst: 0\nrouting: {}\n");
        assert!(
            text.contains("agent.yaml: routing: unknown field"),
            "{text}"
        );
        assert!(text.contains("guard.syn_burst: a burst of 0"), "{text}");
    }

    #[test]
    fn shipped_example_is_valid_and_off() {
        let c = AgentConfig::from_yaml_str(
            include_str!("../../../config/agent.yaml"),
            "config/agent.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c,
            AgentConfig::default(),
            "the example spells out the defaults"
        );
    }

    #[test]
    fn bad_interface_names() {
        assert!(interface_problem("eth0").is_none());
        assert!(interface_problem("").is_some());
        assert!(interface_problem("a-very-long-interface").is_some());
        assert!(interface_problem("a/b").is_some());
    }
}
