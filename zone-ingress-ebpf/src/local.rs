//! The local redirect: when a flow's endpoint is a socket of the agent's own network namespace,
//! the endpoint's sends skip the loopback TCP hop to the agent's upstream socket.
//!
//! - `zi_local_sockops` (cgroup `sock_ops`, attached to the cgroup v2 root by every agent that uses
//!   it, multi-attach) runs when a passive connection is established. If the connection is one the
//!   agent registered in `ZI_LOCAL_FLOWS` (its upstream connection, seen from the endpoint's
//!   accepted socket, in the same network namespace), it puts the endpoint's socket into
//!   `ZI_LOCAL_SOCKS` and records its cookie for the agent.
//! - `zi_local_msg` (`sk_msg`, attached to `ZI_LOCAL_SOCKS`) runs for every send of such a socket.
//!   Once the agent armed the flow, it redirects the bytes to the egress of the client socket
//!   (`ZI_SOCKS`, where the splice keeps it): the bytes are pushed into the client socket's TCP
//!   send queue inside the endpoint's `sendmsg`, so by the time `sendmsg` returns they are in the
//!   client's stream. Counted in the endpoint socket's `FlowSide` and the route's bytes, like the
//!   verdict does for spliced skbs.
//! - Pacing: a push into a full client send buffer fails with EAGAIN for a non-blocking endpoint,
//!   and nothing wakes the endpoint when the buffer drains (measured: a tokio endpoint stalled
//!   for good after 39 of 64 MiB). So the redirected bytes never run more than a window ahead of
//!   what the client acknowledged (the agent keeps `ZI_CTRL[endpoint].redirect_limit` current
//!   and forces the client socket's send buffer well above the window); a flow that reaches its
//!   limit falls back for good: its later sends take TCP and the plain splice, in order.
//!
//! The other direction (client -> endpoint) stays on the stream verdict (redirect to the upstream
//! socket's egress): the agent must know when every redirected byte reached the endpoint before it
//! forwards the client's FIN, and an ingress redirect into the endpoint's socket is not visible
//! from the agent's sockets (see ARCHITECTURE.md, "Local endpoints").

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action::SK_PASS},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{map, sk_msg, sock_ops},
    maps::{HashMap, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use zone_ingress_common::{LocalFlow, LocalKey, MAX_SOCKETS, ProgCounter};

use crate::{ZI_CTRL, ZI_FLOWS, ZI_ROUTE_BYTES, ZI_SOCKS, count, notify};

/// Endpoint sockets whose sends `zi_local_msg` sees, keyed by socket cookie.
#[map(name = "ZI_LOCAL_SOCKS")]
static ZI_LOCAL_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS / 2, 0);

/// Upstream connections registered by the agent, keyed as the endpoint's socket sees them.
#[map(name = "ZI_LOCAL_FLOWS")]
static ZI_LOCAL_FLOWS: HashMap<LocalKey, LocalFlow> =
    HashMap::with_max_entries(MAX_SOCKETS / 2, BPF_F_NO_PREALLOC);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The key of a connection from the context's fields. An IPv4 connection on a dual-stack IPv6
/// socket is keyed as IPv4, so the agent need not know which kind the endpoint listens on.
#[inline(always)]
fn key(
    netns: u64,
    family: u32,
    local4: u32,
    remote4: u32,
    local6: [u32; 4],
    remote6: [u32; 4],
    local_port: u32,
    remote_port: u32,
) -> LocalKey {
    // remote_port is in network order, in the upper half of the word on little-endian hosts.
    let raw = if remote_port & 0xffff == 0 {
        remote_port >> 16
    } else {
        remote_port & 0xffff
    };
    let remote_port = u16::from_be(raw as u16) as u32;
    let mapped = |a: [u32; 4]| a[0] == 0 && a[1] == 0 && a[2] == u32::from_be(0xffff).to_be();
    let (family, local_ip, remote_ip) = if family == AF_INET6 && mapped(local6) && mapped(remote6)
    {
        (AF_INET, [local6[3], 0, 0, 0], [remote6[3], 0, 0, 0])
    } else if family == AF_INET {
        (AF_INET, [local4, 0, 0, 0], [remote4, 0, 0, 0])
    } else {
        (family, local6, remote6)
    };
    LocalKey {
        netns,
        family,
        local_port,
        remote_port,
        _pad: 0,
        local_ip,
        remote_ip,
    }
}

#[sock_ops]
pub fn zi_local_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 1;
    }
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return 1;
    }
    // SAFETY: sock_ops programs may call these helpers on their context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut _) };
    let k = key(
        netns,
        family,
        ctx.local_ip4(),
        ctx.remote_ip4(),
        ctx.local_ip6(),
        ctx.remote_ip6(),
        ctx.local_port(),
        ctx.remote_port(),
    );
    let Some(flow) = ZI_LOCAL_FLOWS.get_ptr_mut(&k) else {
        return 1;
    };
    // SAFETY: map value pointer, valid while the program runs. Until the agent saw the cookie,
    // only this program writes the entry.
    if unsafe { (*flow).endpoint_cookie } != 0 {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
    // SAFETY: the context is the sock_ops struct the helper expects.
    match ZI_LOCAL_SOCKS.update(cookie, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64) {
        Ok(()) => {
            unsafe { (*flow).endpoint_cookie = cookie };
            count(ProgCounter::LocalInserted);
        }
        Err(_) => count(ProgCounter::LocalInsertFailed),
    }
    1
}

#[sk_msg]
pub fn zi_local_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // SAFETY: the context fields are plain reads the verifier allows on sk_msg_md.
    let k = unsafe {
        key(
            bpf_get_netns_cookie(md as *mut _),
            (*md).family,
            (*md).local_ip4,
            (*md).remote_ip4,
            (*md).local_ip6,
            (*md).remote_ip6,
            (*md).local_port,
            (*md).remote_port,
        )
    };
    // Copied out: the agent rewrites the entry whole when it arms the flow.
    let Some(flow) = (unsafe { ZI_LOCAL_FLOWS.get(&k) }).copied() else {
        count(ProgCounter::LocalPassed);
        return SK_PASS;
    };
    if flow.armed == 0 {
        count(ProgCounter::LocalPassed);
        return SK_PASS;
    }
    let Some(side) = ZI_FLOWS.get_ptr_mut(flow.endpoint_cookie) else {
        count(ProgCounter::LocalPassed);
        return SK_PASS;
    };
    let len = ctx.size() as u64;
    let limit = match ZI_CTRL.get_ptr(flow.endpoint_cookie) {
        // SAFETY: map value pointer, valid while the program runs; only read here.
        Some(ctrl) => unsafe { (*ctrl).redirect_limit },
        None => 0,
    };
    // SAFETY (derefs of `side`): map value pointer; sk_msg runs under the endpoint socket's
    // lock, so this socket's FlowSide has one writer at a time.
    unsafe {
        if (*side).passed_bytes > 0 {
            // Fell back earlier: everything after the first passed byte takes TCP, in order.
            (*side).passed_bytes += len;
            count(ProgCounter::LocalPassed);
            return SK_PASS;
        }
        if (*side).redirected_bytes + len > limit {
            // The client did not acknowledge fast enough: the next push could find its send
            // buffer full, and a non-blocking endpoint would get EAGAIN with nothing to wake it
            // when the buffer drains (its own socket stays writable). So this byte and every
            // later one take TCP (after all redirected bytes, which are in the client's send
            // queue already), where the plain splice's flow control paces the endpoint.
            (*side).passed_bytes += len;
            count(ProgCounter::LocalFellBack);
            return SK_PASS;
        }
        // Early (a quarter window in), so the agent has most of a window to answer.
        let ask_at = limit.saturating_sub(flow.window / 4 * 3);
        if (*side).redirected_bytes + len > ask_at && (*side).notified_limit != limit {
            (*side).notified_limit = limit;
            (*side).limit_events += 1;
            notify(flow.endpoint_cookie);
        }
    }
    let mut down = flow.down_cookie;
    if ZI_SOCKS.redirect_msg(&ctx, &mut down, 0) as u32 != SK_PASS {
        // The client socket is gone (the flow is ending): TCP from here on.
        unsafe { (*side).passed_bytes += len };
        count(ProgCounter::LocalRedirectFailed);
        return SK_PASS;
    }
    count(ProgCounter::LocalRedirected);
    let (route_id, first) = unsafe {
        let first = (*side).redirected_skbs == 0;
        (*side).redirected_bytes += len;
        (*side).redirected_skbs += 1;
        ((*side).route_id, first)
    };
    if let Some(route) = ZI_ROUTE_BYTES.get_ptr_mut(route_id) {
        // SAFETY: per-CPU slot, valid for the duration of the program.
        unsafe {
            (*route).down += len;
            if first {
                (*route).flows += 1;
            }
        }
    }
    SK_PASS
}
