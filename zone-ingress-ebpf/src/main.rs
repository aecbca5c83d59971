//! BPF programs of zone-ingress.
//!
//! `zi_stream_verdict` (sk_skb/stream_verdict, attached to the `ZI_SOCKS` SockHash) splices the two TCP
//! streams of a flow inside the kernel: every skb that arrives on one socket of a flow is redirected to
//! the egress of its peer. The agent inserts both sockets (keyed by socket cookie) and their
//! [`FlowSide`] entries after it has read the ClientHello and connected upstream (DESIGN.md section 3).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, SockHash},
    programs::SkBuffContext,
};
use zone_ingress_common::{FlowSide, MAX_SOCKETS, PROG_COUNTERS, ProgCounter};

/// Spliced sockets, keyed by socket cookie.
#[map(name = "ZI_SOCKS")]
static ZI_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie -> its side of the flow (peer cookie, counters).
#[map(name = "ZI_FLOWS")]
static ZI_FLOWS: HashMap<u64, FlowSide> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Program counters, per CPU (summed by the agent).
#[map(name = "ZI_COUNTERS")]
static ZI_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROG_COUNTERS, 0);

#[inline(always)]
fn count(counter: ProgCounter) {
    if let Some(slot) = ZI_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, valid for the duration of the program.
        unsafe { *slot += 1 };
    }
}

#[stream_verdict]
pub fn zi_stream_verdict(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
    // SAFETY: sk_skb programs may call bpf_get_socket_cookie on their skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    let Some(side) = ZI_FLOWS.get_ptr_mut(cookie) else {
        // Not (or no longer) a spliced flow: leave the bytes on the socket for the agent.
        count(ProgCounter::NoFlow);
        return SK_PASS;
    };
    if len == 0 {
        // A FIN arrives as a zero-length skb; redirecting it puts EPIPE on the peer and disables its
        // transmit path. The agent propagates the FIN itself once the spliced bytes are acknowledged.
        // SAFETY: entry pointer from the map, valid during the program.
        unsafe { (*side).dropped_empty += 1 };
        count(ProgCounter::DroppedEmpty);
        return SK_DROP;
    }
    // SAFETY: as above. skbs of one socket are processed one at a time under the socket lock, so
    // these counters have a single writer.
    let mut peer = unsafe { (*side).peer_cookie };
    let verdict = ZI_SOCKS.redirect_skb(&ctx, &mut peer, 0) as u32;
    if verdict == SK_PASS {
        unsafe {
            (*side).redirected_bytes += len as u64;
            (*side).redirected_skbs += 1;
        }
        count(ProgCounter::Redirected);
    } else {
        count(ProgCounter::RedirectFailed);
    }
    verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
