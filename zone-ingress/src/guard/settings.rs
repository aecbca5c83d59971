//! The guard's effective settings: the `guard` section of `--agent-config`, with the command
//! line flags on top, turned into the map layout the program reads.
//!
//! A flag wins over the file for as long as the agent runs: a reload re-reads the file and puts
//! the same flags on top again, so a value given on the command line cannot be changed live.

use ipnet::IpNet;
use zone_ingress_common::guard::GuardConfig;

use crate::config::{GuardSection, XdpMode, parse_cidr};

/// `zone-ingress run` flags of the XDP guard (each overrides its `guard.*` field).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct GuardArgs {
    /// Turn the XDP guard in front of the listener on (`--guard`, `--guard=true`) or off
    /// (`--guard=false`); overrides guard.enabled of --agent-config.
    #[arg(long = "guard", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", env = "ZONE_INGRESS_GUARD")]
    pub enabled: Option<bool>,
    /// Interface the guard attaches to (default: the one that carries networking.address).
    #[arg(long, value_name = "IFACE", env = "ZONE_INGRESS_XDP_IFACE", value_parser = parse_iface)]
    pub xdp_iface: Option<String>,
    /// XDP attach mode: auto (native, falling back to generic with a warning), native, generic.
    #[arg(long, value_enum, value_name = "MODE")]
    pub xdp_mode: Option<XdpMode>,
    /// Sources allowed to reach the listener, as CIDRs (repeat the flag or separate with
    /// commas); replaces guard.allow_cidrs. Without any, every source is allowed.
    #[arg(long = "guard-allow", value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr_flag)]
    pub allow: Vec<IpNet>,
    /// SYNs per second one source may send to the listener (0: no per-source limit).
    #[arg(long = "guard-syn-rate", value_name = "PER_SEC")]
    pub syn_rate: Option<u32>,
    /// SYNs one source may send at once (default: its rate).
    #[arg(long = "guard-syn-burst", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub syn_burst: Option<u32>,
    /// SYNs per second all sources together may send to the listener (0: no ceiling).
    #[arg(long = "guard-global-syn-rate", value_name = "PER_SEC")]
    pub global_syn_rate: Option<u32>,
    /// SYNs all sources together may send at once (default: the global rate).
    #[arg(long = "guard-global-syn-burst", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub global_syn_burst: Option<u32>,
}

fn parse_cidr_flag(s: &str) -> Result<IpNet, String> {
    parse_cidr(s).map_err(|(why, fix)| format!("{why}; {fix}"))
}

fn parse_iface(s: &str) -> Result<String, String> {
    match crate::config::interface_problem(s) {
        None => Ok(s.to_owned()),
        Some(why) => Err(why),
    }
}

impl GuardArgs {
    /// The file's section with these flags on top. Errors name the flag or field and the fix.
    pub fn apply_to(&self, file: &GuardSection) -> Result<GuardSection, String> {
        let mut g = file.clone();
        if let Some(b) = self.enabled {
            g.enabled = b;
        }
        if let Some(i) = &self.xdp_iface {
            g.interface = Some(i.clone());
        }
        if let Some(m) = self.xdp_mode {
            g.mode = m;
        }
        if !self.allow.is_empty() {
            g.allow_cidrs = self.allow.clone();
        }
        if let Some(r) = self.syn_rate {
            g.syn_rate = r;
        }
        if self.syn_burst.is_some() {
            g.syn_burst = self.syn_burst;
        }
        if let Some(r) = self.global_syn_rate {
            g.global_syn_rate = r;
        }
        if self.global_syn_burst.is_some() {
            g.global_syn_burst = self.global_syn_burst;
        }
        if g.syn_rate == 0 && self.syn_burst.is_some() {
            return Err(
                "--guard-syn-burst has no effect without a SYN rate; set --guard-syn-rate \
                        or guard.syn_rate too"
                    .to_owned(),
            );
        }
        if g.global_syn_rate == 0 && self.global_syn_burst.is_some() {
            return Err(
                "--guard-global-syn-burst has no effect without a global SYN rate; set \
                 --guard-global-syn-rate or guard.global_syn_rate too"
                    .to_owned(),
            );
        }
        Ok(g)
    }
}

/// (nanoseconds per SYN, burst in nanoseconds) of a rate; (0, 0) when there is no limit.
pub fn gcra_params(rate: u32, burst: Option<u32>) -> (u64, u64) {
    if rate == 0 {
        return (0, 0);
    }
    let interval = 1_000_000_000 / u64::from(rate);
    let burst = u64::from(burst.unwrap_or(rate).max(1));
    (interval, interval * burst)
}

/// The map entry the program reads for `g`, guarding the listener `port`.
pub fn map_config(g: &GuardSection, port: u16) -> GuardConfig {
    let (syn_interval_ns, syn_burst_ns) = gcra_params(g.syn_rate, g.syn_burst);
    let (global_interval_ns, global_burst_ns) = gcra_params(g.global_syn_rate, g.global_syn_burst);
    // A non-empty allow-list is a list of the sources that may connect: a source of the other
    // family is not in it either (an IPv4-only list does not leave IPv6 open).
    let allow = u32::from(!g.allow_cidrs.is_empty());
    GuardConfig {
        enabled: u32::from(g.enabled),
        port: u32::from(port),
        allow_v4: allow,
        allow_v6: allow,
        syn_interval_ns,
        syn_burst_ns,
        global_interval_ns,
        global_burst_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let file = GuardSection {
            enabled: false,
            syn_rate: 10,
            syn_burst: Some(20),
            allow_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            ..GuardSection::default()
        };
        let flags = GuardArgs {
            enabled: Some(true),
            syn_rate: Some(50),
            allow: vec!["192.0.2.0/24".parse().unwrap()],
            ..GuardArgs::default()
        };
        let g = flags.apply_to(&file).unwrap();
        assert!(g.enabled);
        assert_eq!((g.syn_rate, g.syn_burst), (50, Some(20)));
        assert_eq!(
            g.allow_cidrs,
            vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]
        );
        // No flags: the file as it is.
        assert_eq!(GuardArgs::default().apply_to(&file).unwrap(), file);
    }

    #[test]
    fn burst_flag_without_rate_is_refused() {
        let flags = GuardArgs {
            syn_burst: Some(5),
            ..GuardArgs::default()
        };
        let e = flags.apply_to(&GuardSection::default()).unwrap_err();
        assert!(e.contains("--guard-syn-rate"), "{e}");
    }

    #[test]
    fn map_config_computes_gcra_and_allow_flags() {
        let g = GuardSection {
            enabled: true,
            syn_rate: 100,
            global_syn_rate: 1000,
            global_syn_burst: Some(5000),
            allow_cidrs: vec!["fd00::/8".parse().unwrap()],
            ..GuardSection::default()
        };
        let c = map_config(&g, 10001);
        assert_eq!((c.enabled, c.port), (1, 10001));
        assert_eq!((c.allow_v4, c.allow_v6), (1, 1));
        assert_eq!(c.syn_interval_ns, 10_000_000);
        assert_eq!(
            c.syn_burst_ns,
            100 * 10_000_000,
            "burst defaults to the rate"
        );
        assert_eq!(c.global_interval_ns, 1_000_000);
        assert_eq!(c.global_burst_ns, 5000 * 1_000_000);
        let off = map_config(&GuardSection::default(), 1);
        assert_eq!(
            (
                off.enabled,
                off.allow_v4,
                off.syn_interval_ns,
                off.global_interval_ns
            ),
            (0, 0, 0, 0)
        );
    }
}
