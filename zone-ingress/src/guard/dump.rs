//! `zone-ingress maps dump guard [--json]`: the guard's configuration, allow-list, counters and
//! tracked sources, read from the pinned maps alone (the agent need not run: the pins outlive it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use serde::Serialize;
use zone_ingress_common::guard::{GuardConfig, GuardCounter, map_names};

/// Sources listed as limited right now, at most (the count covers them all).
const MAX_LIMITED_LISTED: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(
        "{}: no such directory: the agent pins its maps there while it runs (is this its \
         --pin-dir? is bpffs mounted at /sys/fs/bpf?)", dir.display()
    )]
    NoPinDir { dir: PathBuf },
    #[error(
        "{}: not pinned: the agent that used this pin dir never attached the guard (guard.enabled \
         or --guard) or is older than the guard", path.display()
    )]
    NotPinned { path: PathBuf },
    #[error("{}: cannot open the pinned map: {detail} (reading pins needs root)", path.display())]
    Open { path: PathBuf, detail: String },
    #[error(
        "{}: the map does not have the layout this binary expects ({detail}): it was pinned by a \
         different zone-ingress build; use that build's binary, or restart the agent", path.display()
    )]
    Layout { path: PathBuf, detail: String },
    #[error("{}: reading the map: {detail}", path.display())]
    Read { path: PathBuf, detail: String },
}

/// The configuration as the program sees it, in the agent config's units.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ConfigView {
    pub enabled: bool,
    pub port: u32,
    pub allow_list_v4: bool,
    pub allow_list_v6: bool,
    /// SYNs per second per source (0: no limit).
    pub syn_rate: u64,
    pub syn_burst: u64,
    pub global_syn_rate: u64,
    pub global_syn_burst: u64,
}

impl From<GuardConfig> for ConfigView {
    fn from(c: GuardConfig) -> Self {
        let rate = |interval: u64| 1_000_000_000u64.checked_div(interval).unwrap_or(0);
        let burst = |interval: u64, burst_ns: u64| burst_ns.checked_div(interval).unwrap_or(0);
        Self {
            enabled: c.enabled != 0,
            port: c.port,
            allow_list_v4: c.allow_v4 != 0,
            allow_list_v6: c.allow_v6 != 0,
            syn_rate: rate(c.syn_interval_ns),
            syn_burst: burst(c.syn_interval_ns, c.syn_burst_ns),
            global_syn_rate: rate(c.global_interval_ns),
            global_syn_burst: burst(c.global_interval_ns, c.global_burst_ns),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct GuardDump {
    pub pin_dir: PathBuf,
    pub config: ConfigView,
    pub allow_cidrs: Vec<String>,
    /// Counter name ([`GuardCounter::as_str`]) -> value summed over CPUs.
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    /// Sources whose SYN state the program holds.
    pub tracked_sources: usize,
    /// Sources whose next SYN would be dropped now (at most [`MAX_LIMITED_LISTED`] listed).
    pub limited_sources: Vec<String>,
    pub limited_sources_total: usize,
}

fn open(dir: &Path, name: &str) -> Result<(PathBuf, Map), DumpError> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(DumpError::NotPinned { path });
    }
    let data = MapData::from_pin(&path).map_err(|e| DumpError::Open {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    let map = Map::from_map_data(data).map_err(|e| DumpError::Layout {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    Ok((path, map))
}

fn layout(path: &Path) -> impl Fn(aya::maps::MapError) -> DumpError + '_ {
    move |e| DumpError::Layout {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn read_err(path: &Path) -> impl Fn(aya::maps::MapError) -> DumpError + '_ {
    move |e| DumpError::Read {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Reads every guard map pinned under `dir`.
pub fn read(dir: &Path) -> Result<GuardDump, DumpError> {
    if !dir.is_dir() {
        return Err(DumpError::NoPinDir {
            dir: dir.to_path_buf(),
        });
    }
    let (path, map) = open(dir, map_names::CONFIG)?;
    let config: Array<MapData, GuardConfig> = Array::try_from(map).map_err(layout(&path))?;
    let config = config.get(&0, 0).map_err(read_err(&path))?;

    let mut allow_cidrs = Vec::new();
    let (path, map) = open(dir, map_names::ALLOW_V4)?;
    let v4: LpmTrie<MapData, [u8; 4], u8> = LpmTrie::try_from(map).map_err(layout(&path))?;
    for key in v4.keys() {
        let key = key.map_err(read_err(&path))?;
        allow_cidrs.push(format!(
            "{}/{}",
            Ipv4Addr::from(key.data()),
            key.prefix_len()
        ));
    }
    let (path, map) = open(dir, map_names::ALLOW_V6)?;
    let v6: LpmTrie<MapData, [u8; 16], u8> = LpmTrie::try_from(map).map_err(layout(&path))?;
    for key in v6.keys() {
        let key = key.map_err(read_err(&path))?;
        allow_cidrs.push(format!(
            "{}/{}",
            Ipv6Addr::from(key.data()),
            key.prefix_len()
        ));
    }

    let (path, map) = open(dir, map_names::COUNTERS)?;
    let counters: PerCpuArray<MapData, u64> = PerCpuArray::try_from(map).map_err(layout(&path))?;
    let values = super::program::read_counters(&counters).map_err(|e| DumpError::Read {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    let counters = GuardCounter::ALL
        .iter()
        .map(|c| (c.as_str(), values[*c as usize]))
        .collect();

    let (path, map) = open(dir, map_names::SOURCES)?;
    let sources: HashMap<MapData, [u8; 16], u64> = HashMap::try_from(map).map_err(layout(&path))?;
    let now = monotonic_ns();
    let mut tracked_sources = 0;
    let mut limited = Vec::new();
    for entry in sources.iter() {
        // An entry can vanish (LRU eviction) between listing and reading: skip it.
        let Ok((addr, tat)) = entry else { continue };
        tracked_sources += 1;
        // Over its rate when one more SYN would not fit in the burst.
        if config.syn_interval_ns != 0
            && tat.saturating_sub(now) + config.syn_interval_ns > config.syn_burst_ns
        {
            limited.push(source_addr(addr));
        }
    }
    limited.sort();
    let limited_sources_total = limited.len();
    limited.truncate(MAX_LIMITED_LISTED);
    Ok(GuardDump {
        pin_dir: dir.to_path_buf(),
        config: config.into(),
        allow_cidrs,
        counters,
        tracked_sources,
        limited_sources: limited.iter().map(|a| a.to_string()).collect(),
        limited_sources_total,
    })
}

/// A key of the sources map: IPv4 is stored as ::ffff:a.b.c.d.
fn source_addr(key: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(key);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

impl GuardDump {
    pub fn to_text(&self) -> String {
        let c = &self.config;
        let limit = |rate: u64, burst: u64| {
            if rate == 0 {
                "none".to_owned()
            } else {
                format!("{rate}/s, burst {burst}")
            }
        };
        let mut out = format!(
            "guard maps in {}\n\
             enabled:           {}\n\
             listener port:     {}\n\
             allow-list:        {}\n\
             per-source SYNs:   {}\n\
             global SYNs:       {}\n",
            self.pin_dir.display(),
            if c.enabled { "yes" } else { "no" },
            c.port,
            if !c.allow_list_v4 && !c.allow_list_v6 {
                "off (every source)".to_owned()
            } else if self.allow_cidrs.is_empty() {
                "on, empty (no source)".to_owned()
            } else {
                self.allow_cidrs.join(", ")
            },
            limit(c.syn_rate, c.syn_burst),
            limit(c.global_syn_rate, c.global_syn_burst),
        );
        out.push_str("counters:\n");
        for (name, v) in &self.counters {
            out.push_str(&format!("  {name:<24} {v}\n"));
        }
        out.push_str(&format!("tracked sources:   {}\n", self.tracked_sources));
        out.push_str(&format!(
            "limited sources:   {}{}\n",
            self.limited_sources_total,
            if self.limited_sources.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.limited_sources.join(", "))
            }
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_view_in_config_units() {
        let v = ConfigView::from(GuardConfig {
            enabled: 1,
            port: 10001,
            allow_v4: 1,
            allow_v6: 1,
            syn_interval_ns: 10_000_000,
            syn_burst_ns: 200_000_000,
            global_interval_ns: 0,
            global_burst_ns: 0,
        });
        assert_eq!((v.syn_rate, v.syn_burst), (100, 20));
        assert_eq!((v.global_syn_rate, v.global_syn_burst), (0, 0));
    }

    #[test]
    fn source_keys_map_back_to_addresses() {
        let mut k = [0u8; 16];
        k[10] = 0xff;
        k[11] = 0xff;
        k[12..].copy_from_slice(&[10, 0, 0, 7]);
        assert_eq!(source_addr(k).to_string(), "10.0.0.7");
        let v6: Ipv6Addr = "fd00::7".parse().unwrap();
        assert_eq!(source_addr(v6.octets()).to_string(), "fd00::7");
    }

    #[test]
    fn missing_pin_dir_is_named() {
        let e = read(Path::new("/nonexistent/zi-pins")).unwrap_err();
        assert!(
            e.to_string()
                .contains("/nonexistent/zi-pins: no such directory"),
            "{e}"
        );
    }

    #[test]
    fn missing_pin_is_named() {
        let dir = std::env::temp_dir().join(format!("zi-dump-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = read(&dir).unwrap_err();
        let _ = std::fs::remove_dir(&dir);
        assert!(e.to_string().contains("ZI_GUARD_CONFIG: not pinned"), "{e}");
    }
}
