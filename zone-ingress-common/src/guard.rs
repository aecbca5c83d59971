//! Layouts of the XDP guard's maps (`zi_guard`, in front of the listener).
//!
//! The agent writes [`GuardConfig`] and the allow-list tries; the program writes the per-source
//! SYN state, the global SYN state and the counters. Addresses are kept in network byte order
//! (as they are on the wire), so the program never swaps bytes.

/// Map names, as they appear in the BPF object and under the pin directory.
pub mod map_names {
    /// `Array<GuardConfig>` with one entry: port, enabled, limits. Agent-written.
    pub const CONFIG: &str = "ZI_GUARD_CONFIG";
    /// `LpmTrie<[u8; 4], u8>`: IPv4 source prefixes allowed to reach the listener.
    pub const ALLOW_V4: &str = "ZI_GUARD_ALLOW_V4";
    /// `LpmTrie<[u8; 16], u8>`: IPv6 source prefixes allowed to reach the listener.
    pub const ALLOW_V6: &str = "ZI_GUARD_ALLOW_V6";
    /// `LruHashMap<[u8; 16], u64>`: source address -> its SYN state (see [`super::GuardConfig`]).
    pub const SOURCES: &str = "ZI_GUARD_SOURCES";
    /// `Array<u64>` with one entry: the global SYN state.
    pub const GLOBAL: &str = "ZI_GUARD_GLOBAL";
    /// `PerCpuArray<u64>`, indexed by [`super::GuardCounter`].
    pub const COUNTERS: &str = "ZI_GUARD_COUNTERS";

    /// Every guard map, in the order the agent pins them.
    pub const ALL: [&str; 6] = [CONFIG, ALLOW_V4, ALLOW_V6, SOURCES, GLOBAL, COUNTERS];
}

/// The XDP program's name in the BPF object.
pub const PROG_NAME: &str = "zi_guard";

/// Capacity of each allow-list trie (prefixes).
pub const MAX_ALLOW_PREFIXES: u32 = 16_384;

/// Capacity of the per-source SYN map in the object. The map is preallocated (LRU), so the
/// object declares it tiny and the agent sizes it when it loads the guard (`guard.max_sources`):
/// a program set loaded from the same object that does not use the guard pays nothing.
pub const SOURCES_IN_OBJECT: u32 = 1;

/// Default `guard.max_sources`: source addresses whose SYN rate is tracked at once. Beyond it the
/// least recently seen source is forgotten (and starts again with a full burst).
pub const DEFAULT_MAX_SOURCES: u32 = 65_536;

/// The guard's configuration, one entry of [`map_names::CONFIG`].
///
/// SYN limits are a GCRA token bucket: per source, the map holds the *theoretical arrival time*
/// (TAT, `bpf_ktime_get_ns`). A SYN at `now` is allowed when `max(tat, now) + interval_ns - now <=
/// burst_ns`, and then moves the TAT by `interval_ns`. `interval_ns` is 10^9 / rate and
/// `burst_ns` is burst * interval_ns, both computed by the agent so the program never divides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// 0: the program passes everything untouched (and counts nothing).
    pub enabled: u32,
    /// The listener's TCP port, host byte order.
    pub port: u32,
    /// 1: IPv4 sources must match [`map_names::ALLOW_V4`]; 0: every IPv4 source is allowed.
    pub allow_v4: u32,
    /// 1: IPv6 sources must match [`map_names::ALLOW_V6`]; 0: every IPv6 source is allowed.
    pub allow_v6: u32,
    /// Per source: nanoseconds per SYN (10^9 / rate); 0 disables the per-source limit.
    pub syn_interval_ns: u64,
    /// Per source: the burst, in nanoseconds of credit (burst * interval).
    pub syn_burst_ns: u64,
    /// All sources together: nanoseconds per SYN; 0 disables the global ceiling.
    pub global_interval_ns: u64,
    /// All sources together: the burst, in nanoseconds of credit.
    pub global_burst_ns: u64,
}

/// Indices into [`map_names::COUNTERS`]. Only TCP packets to the listener port are counted
/// (plus malformed headers, which cannot be told apart).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardCounter {
    /// TCP packets to the listener passed to the stack.
    Passed = 0,
    /// Dropped: the source is not in the allow-list.
    DroppedAllowList = 1,
    /// SYNs dropped: the source was over its SYN rate.
    DroppedSynRate = 2,
    /// SYNs dropped: all sources together were over the global SYN ceiling.
    DroppedGlobalSynRate = 3,
    /// Packets whose headers were truncated or inconsistent; passed to the stack untouched.
    Malformed = 4,
}

/// Number of [`GuardCounter`] slots.
pub const GUARD_COUNTERS: u32 = 5;

impl GuardCounter {
    pub const ALL: [GuardCounter; GUARD_COUNTERS as usize] = [
        Self::Passed,
        Self::DroppedAllowList,
        Self::DroppedSynRate,
        Self::DroppedGlobalSynRate,
        Self::Malformed,
    ];

    /// Stable name, used in the dump and the metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::DroppedAllowList => "dropped_allow_list",
            Self::DroppedSynRate => "dropped_syn_rate",
            Self::DroppedGlobalSynRate => "dropped_global_syn_rate",
            Self::Malformed => "malformed",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), u32 fields then u64 fields (4 x 4 bytes keep the u64s
    // aligned), no padding.
    unsafe impl aya::Pod for super::GuardConfig {}
}
