//! `#[repr(C)]` layouts of the pinned BPF maps, shared by the BPF programs (`no_std`) and the agent.
//!
//! Every value here is read by the kernel and by userspace, so a change of layout is a change of
//! the pinned maps' format. The agent replaces its pins at every start, so a running agent and its
//! pins always agree; tools that read pins left by another build must check value sizes.
#![no_std]

pub mod guard;

/// Directory under bpffs where the agent pins its maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/zone-ingress";

/// Map names, as they appear in the BPF object and under the pin directory.
pub mod map_names {
    /// SockHash of spliced sockets, keyed by socket cookie.
    pub const SOCKS: &str = "ZI_SOCKS";
    /// Socket cookie -> [`super::FlowSide`] (peer cookie and counters), written by the verdict.
    pub const FLOWS: &str = "ZI_FLOWS";
    /// Socket cookie -> [`super::FlowCtrl`] (armed, redirect limit), written by the agent.
    pub const CTRL: &str = "ZI_CTRL";
    /// Ring buffer of socket cookies whose redirected bytes passed their limit.
    pub const EVENTS: &str = "ZI_EVENTS";
    /// Per-CPU program counters, indexed by [`super::ProgCounter`].
    pub const COUNTERS: &str = "ZI_COUNTERS";
}

/// Program names in the BPF object.
pub mod prog_names {
    pub const SK_SKB_VERDICT: &str = "zi_stream_verdict";
    pub const SK_SKB_PARSER: &str = "zi_stream_parser";
}

/// Capacity of the SockHash and the flow map (sockets, two per flow).
pub const MAX_SOCKETS: u32 = 131_072;

/// One side of a spliced flow, keyed by the socket cookie of the socket whose *incoming* bytes
/// the verdict program redirects. The agent creates it and deletes it when the flow ends; in
/// between only the verdict program writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSide {
    /// Cookie of the peer socket: incoming bytes are redirected to its egress.
    pub peer_cookie: u64,
    /// Bytes the verdict program redirected from this socket to the peer.
    pub redirected_bytes: u64,
    /// Segments (skbs) redirected.
    pub redirected_skbs: u64,
    /// Bytes passed to the socket's own queue for the agent (only before the flow is armed).
    pub passed_bytes: u64,
    /// Times the redirected bytes passed the agent's limit (one event each).
    pub limit_events: u64,
    /// Zero-length skbs (FIN) dropped by the verdict program; non-zero once the FIN was processed,
    /// i.e. after every byte before it went through the verdict.
    pub dropped_empty: u64,
    /// The limit the last event was sent for, so one limit produces one event.
    pub notified_limit: u64,
}

/// The agent's side of one socket's flow control. Only the agent writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCtrl {
    /// 0 until the agent armed the flow: the verdict passes every byte to the socket's own queue
    /// (where the userspace copy reads it). 1: redirect.
    pub armed: u64,
    /// When `redirected_bytes` passes this, the verdict sends the cookie on `ZI_EVENTS` (and keeps
    /// redirecting: bytes are never held back in the program). The agent sets it to (bytes the
    /// peer's TCP stream took) + budget, so an event means the redirect queue may hold more than
    /// the budget; the agent then slows the sender by clamping this socket's receive window.
    pub redirect_limit: u64,
}

/// Size of the `ZI_EVENTS` ring buffer.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Indices into the per-CPU counters array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgCounter {
    /// skbs redirected to a peer.
    Redirected = 0,
    /// skbs seen for a socket that has no flow entry (passed to the socket itself).
    NoFlow = 1,
    /// Zero-length skbs dropped.
    DroppedEmpty = 2,
    /// `bpf_sk_redirect_hash` failed (peer not in the SockHash).
    RedirectFailed = 3,
    /// skbs passed to the socket's own queue because the flow was not armed.
    Passed = 4,
    /// Limit events sent to the agent.
    LimitEvents = 5,
    /// Limit events lost because the ring buffer was full.
    EventsLost = 6,
}

/// Number of [`ProgCounter`] slots.
pub const PROG_COUNTERS: u32 = 7;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), only u64 fields, no padding.
    unsafe impl aya::Pod for super::FlowSide {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowCtrl {}
}
