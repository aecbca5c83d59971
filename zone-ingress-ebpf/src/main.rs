//! BPF programs of zone-ingress.
//!
//! `zi_stream_verdict` (sk_skb/stream_verdict, attached to the `ZI_SOCKS` SockHash) splices the two TCP
//! streams of a flow inside the kernel: every skb that arrives on one socket of a flow is redirected to
//! the egress of its peer. The agent inserts both sockets (keyed by socket cookie) and their
//! [`FlowSide`] entries after it has read the ClientHello and connected upstream (DESIGN.md section 3).
#![no_std]
#![no_main]

mod guard;
mod local;

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel, bpf_skb_adjust_room},
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use zone_ingress_common::{
    DIR_UP, EVENTS_BYTES, FlowCtrl, FlowInfo, FlowSide, MAX_ROUTES, MAX_SOCKETS, PROG_COUNTERS,
    ProgCounter, RouteBytes, RouteInfo,
};

/// Spliced sockets, keyed by socket cookie.
#[map(name = "ZI_SOCKS")]
pub(crate) static ZI_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie -> its side of the flow (peer cookie, counters, pause state). Verdict-written.
#[map(name = "ZI_FLOWS")]
pub(crate) static ZI_FLOWS: HashMap<u64, FlowSide> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie -> the agent's flow control (budget, consumed bytes). Agent-written.
#[map(name = "ZI_CTRL")]
pub(crate) static ZI_CTRL: HashMap<u64, FlowCtrl> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Cookies of sockets whose redirected bytes passed their limit; the agent then watches the flow.
#[map(name = "ZI_EVENTS")]
pub(crate) static ZI_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Program counters, per CPU (summed by the agent).
#[map(name = "ZI_COUNTERS")]
static ZI_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROG_COUNTERS, 0);

/// Sends `cookie` on `ZI_EVENTS` (the agent wakes the watch of that socket's direction), counted
/// as sent or lost.
#[inline(always)]
pub(crate) fn notify(cookie: u64) {
    if ZI_EVENTS.output::<u64>(&cookie, 0).is_ok() {
        count(ProgCounter::LimitEvents);
    } else {
        count(ProgCounter::EventsLost);
    }
}

/// Route id -> bytes redirected for the route, per CPU: one inlined array access per redirected
/// skb, no atomics, no shared cache line.
#[map(name = "ZI_ROUTE_BYTES")]
pub(crate) static ZI_ROUTE_BYTES: PerCpuArray<RouteBytes> = PerCpuArray::with_max_entries(MAX_ROUTES, 0);

/// Route id -> SNI, cluster and the agent's own counters. Agent-only: declared here so the object
/// carries every pinned map, never touched by the programs. Allocated as routes appear.
#[map(name = "ZI_ROUTES")]
static ZI_ROUTES: HashMap<u32, RouteInfo> =
    HashMap::with_max_entries(MAX_ROUTES, BPF_F_NO_PREALLOC);

/// Downstream socket cookie -> addresses, route, start and datapath of a routed flow. Agent-only,
/// like `ZI_ROUTES`: the verdict's per-skb state stays in the small `ZI_FLOWS` value.
#[map(name = "ZI_FLOW_INFO")]
static ZI_FLOW_INFO: HashMap<u64, FlowInfo> =
    HashMap::with_max_entries(MAX_SOCKETS / 2, BPF_F_NO_PREALLOC);

#[inline(always)]
pub(crate) fn count(counter: ProgCounter) {
    if let Some(slot) = ZI_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, valid for the duration of the program.
        unsafe { *slot += 1 };
    }
}

#[stream_verdict]
pub fn zi_stream_verdict(ctx: SkBuffContext) -> u32 {
    let len = ctx.len() as u64;
    // SAFETY: sk_skb programs may call bpf_get_socket_cookie on their skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    let Some(side) = ZI_FLOWS.get_ptr_mut(cookie) else {
        // Not (or no longer) a spliced flow: leave the bytes on the socket for the agent.
        count(ProgCounter::NoFlow);
        return SK_PASS;
    };
    // SAFETY (all derefs of `side` and `ctrl` below): map value pointers, valid while the program
    // runs. skbs of one socket go through the verdict one at a time under the socket lock, so the
    // FlowSide fields have a single writer; FlowCtrl is only read here (the agent writes it whole).
    if len == 0 {
        // A FIN arrives as a zero-length skb; redirecting it puts EPIPE on the peer and disables its
        // transmit path. The agent propagates the FIN itself once the spliced bytes reached the peer.
        unsafe { (*side).dropped_empty += 1 };
        count(ProgCounter::DroppedEmpty);
        return SK_DROP;
    }
    let len = match skip_repeated_bytes(&ctx, side, len) {
        Some(len) => len,
        None => return SK_DROP,
    };
    // Not armed (no control entry, or armed = 0): pass everything to the socket's own queue, where
    // the agent's userspace copy reads it.
    let (armed, limit, notify_at, forwarded) = match ZI_CTRL.get_ptr(cookie) {
        Some(ctrl) => unsafe {
            (
                (*ctrl).armed,
                (*ctrl).redirect_limit,
                (*ctrl).notify_at,
                (*ctrl).forwarded,
            )
        },
        None => (0, 0, 0, 0),
    };
    if armed == 0 {
        unsafe { (*side).passed_bytes += len };
        count(ProgCounter::Passed);
        return SK_PASS;
    }
    // Flow control (DESIGN.md section 3.7). Egress redirect has no backpressure, so past the
    // limit the flow pauses: its bytes stay on this socket, charged to its receive memory, and
    // TCP closes the window as a userspace proxy's full buffer would. The agent forwards them
    // once the peer's queue drained; the first skb after it caught up is redirected again.
    unsafe {
        let after = (*side).redirected_bytes + len;
        if after > notify_at && (*side).notified_limit != notify_at {
            // Near the limit: wake the agent's watch of this direction (once per value); it
            // moves the limit along with what the peer takes.
            (*side).notified_limit = notify_at;
            (*side).limit_events += 1;
            notify(cookie);
        }
        if (*side).paused != 0 {
            if !(after <= limit && (*side).passed_bytes == forwarded) {
                // Counted, not avoided: a paused direction's bytes must pass to keep their order.
                if redirect_queue_len(&ctx) > 0 {
                    count(ProgCounter::PassedBehindQueue);
                }
                (*side).passed_bytes += len;
                count(ProgCounter::Passed);
                return SK_PASS;
            }
            (*side).paused = 0;
            count(ProgCounter::Resumed);
        } else if after > limit {
            // A passed skb that finds this socket's redirect queue non-empty waits in it, and the
            // kernel's worker charges it to the socket later without the socket lock (a race that
            // leaks TCP memory). So while the other direction's bytes wait there, the pause is
            // put off, up to half a budget (`limit - notify_at`) past the limit.
            let queued = redirect_queue_len(&ctx);
            if queued > 0 && after - limit <= limit.saturating_sub(notify_at) {
                count(ProgCounter::PauseDeferred);
            } else {
                if queued > 0 {
                    count(ProgCounter::PassedBehindQueue);
                }
                (*side).paused = 1;
                (*side).pauses += 1;
                (*side).passed_bytes += len;
                count(ProgCounter::Paused);
                count(ProgCounter::Passed);
                return SK_PASS;
            }
        }
    }
    let mut peer = unsafe { (*side).peer_cookie };
    let verdict = ZI_SOCKS.redirect_skb(&ctx, &mut peer, 0) as u32;
    if verdict == SK_PASS {
        let (route_id, direction, first) = unsafe {
            let first = (*side).redirected_skbs == 0;
            (*side).redirected_bytes += len;
            (*side).redirected_skbs += 1;
            ((*side).route_id, (*side).direction, first)
        };
        // Out of range (NO_ROUTE) finds no slot: the agent accounts such flows itself.
        if let Some(route) = ZI_ROUTE_BYTES.get_ptr_mut(route_id) {
            // SAFETY: per-CPU slot, valid for the duration of the program.
            unsafe {
                if direction == DIR_UP {
                    (*route).up += len;
                } else {
                    (*route).down += len;
                    // The endpoint's first bytes (the ServerHello of a TLS flow): one flow,
                    // counted once and by the kernel.
                    if first {
                        (*route).flows += 1;
                    }
                }
            }
        }
        count(ProgCounter::Redirected);
    } else {
        count(ProgCounter::RedirectFailed);
    }
    verdict
}

/// 1 when the verdict may read the kernel's `struct sk_buff` (`bpf_probe_read_kernel` needs
/// CAP_PERFMON): set by the loader. At 0 the trim below is dead code, which the verifier skips.
#[unsafe(no_mangle)]
static TRIM_REPEATS: u8 = 1;

/// Offset of a received TCP skb's sequence number (`TCP_SKB_CB(skb)->seq`: `tcp_skb_cb.seq` in
/// `sk_buff.cb`) from the start of `struct sk_buff`: set by the loader from the running kernel's
/// BTF (40 on x86-64 since 4.x); the loader turns the trim off when it cannot find it.
#[unsafe(no_mangle)]
static SKB_SEQ_OFFSET: u32 = 40;
/// 1 when the verdict may read its socket's redirect queue length (needs CAP_PERFMON and the
/// offsets below from the kernel's BTF): set by the loader.
#[unsafe(no_mangle)]
static PSOCK_READS: u8 = 0;
/// `sk_buff.sk`, `sock.sk_user_data` and `sk_psock.ingress_skb.qlen`: set by the loader.
#[unsafe(no_mangle)]
static SKB_SK_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SK_USER_DATA_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static PSOCK_QUEUE_LEN_OFFSET: u32 = 0;
/// Flag bits the kernel keeps in the low bits of `sk_user_data` (`SK_USER_DATA_PTRMASK`).
const SK_USER_DATA_FLAGS: u64 = 0b111;

/// skbs waiting in the psock queue of the skb's socket: the other direction's redirected bytes
/// not yet sent (and passed skbs queued behind them). 0 when it cannot be read.
#[inline(always)]
fn redirect_queue_len(ctx: &SkBuffContext) -> u32 {
    // SAFETY: reads of constants the loader set, and of kernel memory through
    // bpf_probe_read_kernel, which copes with any address.
    unsafe {
        if core::ptr::read_volatile(&PSOCK_READS) == 0 {
            return 0;
        }
        let skb = ctx.skb.skb as *const u8;
        let Ok(sk) = bpf_probe_read_kernel(
            skb.add(core::ptr::read_volatile(&SKB_SK_OFFSET) as usize) as *const u64,
        ) else {
            return 0;
        };
        if sk == 0 {
            return 0;
        }
        let Ok(user_data) = bpf_probe_read_kernel(
            (sk as *const u8).add(core::ptr::read_volatile(&SK_USER_DATA_OFFSET) as usize)
                as *const u64,
        ) else {
            return 0;
        };
        let psock = user_data & !SK_USER_DATA_FLAGS;
        if psock == 0 {
            return 0;
        }
        bpf_probe_read_kernel(
            (psock as *const u8).add(core::ptr::read_volatile(&PSOCK_QUEUE_LEN_OFFSET) as usize)
                as *const u32,
        )
        .unwrap_or(0)
    }
}

/// `bpf_skb_adjust_room` on an sk_skb trims at most 4095 bytes per call.
const TRIM_STEP: u32 = 4095;
/// Steps per skb: up to ~256 KiB of repeated bytes (a whole GSO retransmission).
const TRIM_STEPS: u32 = 64;

/// `tcp_read_skb` hands the verdict whole skbs, including the head of one that repeats bytes
/// already received (a retransmission that overlaps them: TCP queues it with `seq < rcv_nxt`
/// and a reader is meant to skip the overlap). Redirected or passed whole, those bytes would
/// reach the peer twice. So the verdict remembers where the stream is and cuts the repeat off.
/// Returns the skb's new length, or `None` when it held nothing new (drop it).
#[inline(always)]
fn skip_repeated_bytes(ctx: &SkBuffContext, side: *mut FlowSide, len: u64) -> Option<u64> {
    // SAFETY: a read of a constant the loader set; volatile so the compiler keeps the branch.
    if unsafe { core::ptr::read_volatile(&TRIM_REPEATS) } == 0 {
        return Some(len);
    }
    // SAFETY: reads 4 bytes of the kernel's sk_buff behind this program's context; the helper
    // copes with any address.
    let seq = unsafe {
        let offset = core::ptr::read_volatile(&SKB_SEQ_OFFSET) as usize;
        bpf_probe_read_kernel((ctx.skb.skb as *const u8).add(offset) as *const u32)
    };
    let Ok(seq) = seq else {
        return Some(len);
    };
    // SAFETY: map value pointer, single writer (see the verdict).
    unsafe {
        let end = seq.wrapping_add(len as u32);
        let behind = if (*side).seq_known == 0 {
            0
        } else {
            (*side).next_seq.wrapping_sub(seq) as i32
        };
        (*side).seq_known = 1;
        if behind <= 0 {
            (*side).next_seq = end;
            return Some(len);
        }
        count(ProgCounter::Overlaps);
        let repeat = (behind as u64).min(len) as u32;
        if u64::from(repeat) < len {
            // New bytes follow the repeat: the mark moves to their end. (An skb of old bytes only
            // ends before the mark and must not move it back.)
            (*side).next_seq = end;
        }
        let mut left = repeat;
        for _ in 0..TRIM_STEPS {
            if left == 0 {
                break;
            }
            let step = if left > TRIM_STEP { TRIM_STEP } else { left };
            if bpf_skb_adjust_room(ctx.skb.skb, -(step as i32), 0, 0) != 0 {
                break;
            }
            left -= step;
        }
        (*side).overlap_bytes += u64::from(repeat - left);
        if left != 0 {
            // The rest of the repeat goes on with the skb; the agent's accounting sees more
            // bytes handed on than received and resets the flow.
            count(ProgCounter::OverlapTrimFailed);
            return Some(ctx.len() as u64);
        }
        if u64::from(repeat) == len {
            // Nothing new; trimmed to zero length so the kernel's stream position stays put.
            return None;
        }
        Some(ctx.len() as u64)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
