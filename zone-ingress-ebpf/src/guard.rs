//! `zi_guard` (XDP): the guard in front of the listener.
//!
//! It only looks at TCP (IPv4 and IPv6, behind up to two VLAN tags) to the listener port and
//! drops, before the stack sees them, packets from sources outside the allow-list and SYNs over
//! the per-source or global SYN rate. Everything else passes untouched. A packet whose headers
//! are truncated or inconsistent is passed too (the kernel decides what to do with it) and
//! counted as malformed: the guard never drops what it cannot read.
//!
//! Concurrency: the SYN state of one source (and the global state) is read and written without
//! a lock. Two CPUs racing on the same entry can both pass a SYN that only one should have,
//! which lets a flood spread over N receive queues exceed its limit by at most N SYNs per race;
//! the limit still holds in the mean. Exactness would cost a spin lock per SYN.
use aya_ebpf::{
    bindings::xdp_action::XDP_DROP,
    bindings::xdp_action::XDP_PASS,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use zone_ingress_common::guard::{
    GUARD_COUNTERS, GuardConfig, GuardCounter, MAX_ALLOW_PREFIXES, SOURCES_IN_OBJECT,
};

#[map(name = "ZI_GUARD_CONFIG")]
static ZI_GUARD_CONFIG: Array<GuardConfig> = Array::with_max_entries(1, 0);

#[map(name = "ZI_GUARD_ALLOW_V4")]
static ZI_GUARD_ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_ALLOW_PREFIXES, 0);

#[map(name = "ZI_GUARD_ALLOW_V6")]
static ZI_GUARD_ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_ALLOW_PREFIXES, 0);

/// Source address (IPv4 as ::ffff:a.b.c.d) -> theoretical arrival time of its next SYN.
#[map(name = "ZI_GUARD_SOURCES")]
static ZI_GUARD_SOURCES: LruHashMap<[u8; 16], u64> =
    LruHashMap::with_max_entries(SOURCES_IN_OBJECT, 0);

/// The global SYN state: theoretical arrival time of the next SYN from anyone.
#[map(name = "ZI_GUARD_GLOBAL")]
static ZI_GUARD_GLOBAL: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "ZI_GUARD_COUNTERS")]
static ZI_GUARD_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GUARD_COUNTERS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

#[inline(always)]
fn count(counter: GuardCounter) {
    if let Some(slot) = ZI_GUARD_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, valid for the duration of the program.
        unsafe { *slot += 1 };
    }
}

/// What the parser decided.
enum Verdict {
    /// Not TCP to the listener (or not inspectable, like a non-first fragment): pass, uncounted.
    Ignore,
    /// Headers too short or inconsistent: pass, counted as malformed.
    Malformed,
    /// TCP to the listener that the guard lets through.
    Pass,
    Drop(GuardCounter),
}

/// Packet bytes at `[off, off + N)`, or `None` when the packet is shorter. Every packet read goes
/// through here, so the verifier sees a bound check before each access.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, off: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + N > end {
        return None;
    }
    // SAFETY: [start + off, start + off + N) lies inside the packet (checked just above).
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const [u8; N]) })
}

#[inline(always)]
fn be16_at(ctx: &XdpContext, off: usize) -> Option<u16> {
    bytes::<2>(ctx, off).map(u16::from_be_bytes)
}

#[xdp(frags)]
pub fn zi_guard(ctx: XdpContext) -> u32 {
    let Some(cfg) = ZI_GUARD_CONFIG.get(0) else {
        return XDP_PASS;
    };
    if cfg.enabled == 0 {
        return XDP_PASS;
    }
    match inspect(&ctx, cfg) {
        Verdict::Ignore => XDP_PASS,
        Verdict::Malformed => {
            count(GuardCounter::Malformed);
            XDP_PASS
        }
        Verdict::Pass => {
            count(GuardCounter::Passed);
            XDP_PASS
        }
        Verdict::Drop(reason) => {
            count(reason);
            XDP_DROP
        }
    }
}

/// The source of a packet, as found in its IP header.
enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[inline(always)]
fn inspect(ctx: &XdpContext, cfg: &GuardConfig) -> Verdict {
    let Some(mut proto) = be16_at(ctx, 12) else {
        return Verdict::Malformed;
    };
    let mut off = ETH_HLEN;
    // Up to two VLAN tags (802.1Q, or QinQ with an 802.1ad outer tag).
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            let Some(inner) = be16_at(ctx, off + 2) else {
                return Verdict::Malformed;
            };
            proto = inner;
            off += 4;
        }
    }
    let (source, tcp) = match proto {
        ETH_P_IP => match ipv4(ctx, off) {
            Ok(v) => v,
            Err(v) => return v,
        },
        ETH_P_IPV6 => match ipv6(ctx, off) {
            Ok(v) => v,
            Err(v) => return v,
        },
        _ => return Verdict::Ignore,
    };
    let Some(ports) = bytes::<4>(ctx, tcp) else {
        return Verdict::Malformed;
    };
    if u16::from_be_bytes([ports[2], ports[3]]) as u32 != cfg.port {
        return Verdict::Ignore;
    }
    // The whole fixed header must be there (data offset and flags; the kernel drops a shorter one).
    let Some(hdr) = bytes::<20>(ctx, tcp) else {
        return Verdict::Malformed;
    };
    let (data_offset, flags) = (hdr[12] >> 4, hdr[13]);
    if data_offset < 5 {
        return Verdict::Malformed;
    }
    let allowed = match &source {
        Source::V4(a) => cfg.allow_v4 == 0 || ZI_GUARD_ALLOW_V4.get(Key::new(32, *a)).is_some(),
        Source::V6(a) => cfg.allow_v6 == 0 || ZI_GUARD_ALLOW_V6.get(Key::new(128, *a)).is_some(),
    };
    if !allowed {
        return Verdict::Drop(GuardCounter::DroppedAllowList);
    }
    // Only a connection request is rate limited; every segment of an established (or
    // establishing) connection carries ACK.
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return Verdict::Pass;
    }
    syn_verdict(cfg, &source)
}

/// IPv4: the source and the offset of the TCP header, or the verdict when there is no TCP
/// header to look at.
#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize) -> Result<(Source, usize), Verdict> {
    let Some(h) = bytes::<20>(ctx, off) else {
        return Err(Verdict::Malformed);
    };
    let ihl = (h[0] & 0x0f) as usize * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Err(Verdict::Malformed);
    }
    if h[9] != IPPROTO_TCP {
        return Err(Verdict::Ignore);
    }
    // A non-first fragment carries no TCP header; without its first fragment (which is
    // inspected) it can never be reassembled into a segment.
    if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
        return Err(Verdict::Ignore);
    }
    Ok((Source::V4([h[12], h[13], h[14], h[15]]), off + ihl))
}

/// IPv6: the source and the offset of the TCP header, after at most four extension headers
/// (a SYN behind a Destination Options header reaches the socket too, so it must not slip by).
#[inline(always)]
fn ipv6(ctx: &XdpContext, off: usize) -> Result<(Source, usize), Verdict> {
    let Some(h) = bytes::<40>(ctx, off) else {
        return Err(Verdict::Malformed);
    };
    if h[0] >> 4 != 6 {
        return Err(Verdict::Malformed);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    let mut next = h[6];
    let mut l4 = off + 40;
    for _ in 0..4 {
        match next {
            // Hop-by-hop, Routing, Destination Options: length in 8-byte units, minus one.
            0 | 43 | 60 => {
                let Some(e) = bytes::<2>(ctx, l4) else {
                    return Err(Verdict::Malformed);
                };
                next = e[0];
                l4 += (e[1] as usize + 1) * 8;
            }
            // Fragment: 8 bytes; only the first fragment holds the TCP header.
            44 => {
                let Some(e) = bytes::<4>(ctx, l4) else {
                    return Err(Verdict::Malformed);
                };
                if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                    return Err(Verdict::Ignore);
                }
                next = e[0];
                l4 += 8;
            }
            // Authentication Header: length in 4-byte units, minus two.
            51 => {
                let Some(e) = bytes::<2>(ctx, l4) else {
                    return Err(Verdict::Malformed);
                };
                next = e[0];
                l4 += (e[1] as usize + 2) * 4;
            }
            _ => break,
        }
    }
    if next != IPPROTO_TCP {
        return Err(Verdict::Ignore);
    }
    Ok((Source::V6(src), l4))
}

/// GCRA step: the new theoretical arrival time when a SYN at `now` fits, `None` when it does not.
#[inline(always)]
fn gcra(tat: u64, now: u64, interval: u64, burst: u64) -> Option<u64> {
    let next = if tat > now { tat } else { now } + interval;
    if next - now > burst { None } else { Some(next) }
}

#[inline(always)]
fn syn_verdict(cfg: &GuardConfig, source: &Source) -> Verdict {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if cfg.syn_interval_ns != 0 {
        let key = match source {
            Source::V4(a) => [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
            ],
            Source::V6(a) => *a,
        };
        match ZI_GUARD_SOURCES.get_ptr_mut(&key) {
            // SAFETY (both derefs): a map value pointer, valid while the program runs; a race
            // with another CPU only loses an update (see the module comment).
            Some(tat) => match gcra(unsafe { *tat }, now, cfg.syn_interval_ns, cfg.syn_burst_ns) {
                Some(next) => unsafe { *tat = next },
                None => return Verdict::Drop(GuardCounter::DroppedSynRate),
            },
            None => {
                // A new (or forgotten) source starts with a full burst. A full LRU map
                // evicts the least recently seen source, so the insert cannot fail for room.
                let _ = ZI_GUARD_SOURCES.insert(&key, &(now + cfg.syn_interval_ns), 0);
            }
        }
    }
    if cfg.global_interval_ns != 0
        && let Some(tat) = ZI_GUARD_GLOBAL.get_ptr_mut(0)
    {
        // SAFETY: as above.
        match gcra(
            unsafe { *tat },
            now,
            cfg.global_interval_ns,
            cfg.global_burst_ns,
        ) {
            Some(next) => unsafe { *tat = next },
            None => return Verdict::Drop(GuardCounter::DroppedGlobalSynRate),
        }
    }
    Verdict::Pass
}
