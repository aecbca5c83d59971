//! `#[repr(C)]` layouts of the pinned BPF maps, shared by the BPF programs (`no_std`) and the agent.
//!
//! Every value here is read by the kernel and by userspace, so a change of layout is a change of
//! the pinned-map ABI: bump [`MAP_ABI_VERSION`] with it.
#![no_std]

/// Version of the pinned map layouts. The agent refuses to reuse pinned maps of another version.
pub const MAP_ABI_VERSION: u32 = 1;

/// Directory under bpffs where the agent pins its maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/zone-ingress";

/// Map names, as they appear in the BPF object and under the pin directory.
pub mod map_names {
    /// SockHash of spliced sockets, keyed by socket cookie.
    pub const SOCKS: &str = "ZI_SOCKS";
    /// Socket cookie -> [`super::FlowSide`] (peer cookie and counters), written by the verdict.
    pub const FLOWS: &str = "ZI_FLOWS";
    /// Socket cookie -> [`super::FlowCtrl`] (budget and consumed bytes), written by the agent.
    pub const CTRL: &str = "ZI_CTRL";
    /// Per-CPU program counters, indexed by [`super::ProgCounter`].
    pub const COUNTERS: &str = "ZI_COUNTERS";
}

/// Program names in the BPF object.
pub mod prog_names {
    pub const SK_SKB_VERDICT: &str = "zi_stream_verdict";
}

/// Capacity of the SockHash and the flow map (sockets, two per flow).
pub const MAX_SOCKETS: u32 = 131_072;

/// One side of a spliced flow, keyed by the socket cookie of the socket whose *incoming* bytes
/// the verdict program redirects. The agent creates it (peer, `paused = 1`) and deletes it when the
/// flow ends; in between only the verdict program writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSide {
    /// Cookie of the peer socket: incoming bytes are redirected to its egress.
    pub peer_cookie: u64,
    /// Bytes the verdict program redirected from this socket to the peer.
    pub redirected_bytes: u64,
    /// Segments (skbs) redirected.
    pub redirected_skbs: u64,
    /// Bytes passed to the socket's own queue for the agent while the flow was paused.
    pub passed_bytes: u64,
    /// Times the flow paused (went over its budget).
    pub pauses: u64,
    /// Zero-length skbs (FIN) dropped by the verdict program; non-zero once the FIN was processed,
    /// i.e. after every byte before it went through the verdict.
    pub dropped_empty: u64,
    /// 1 while paused: every skb is passed to the agent until it has consumed all passed bytes.
    pub paused: u64,
}

/// The agent's side of the flow control for one socket. Only the agent writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCtrl {
    /// The verdict may redirect while `redirected_bytes + len <= redirect_limit`; past it the flow
    /// pauses. The agent sets it to (bytes the peer's TCP has taken) + budget, so at most `budget`
    /// bytes wait in the kernel's redirect queue, outside TCP's own memory limits.
    pub redirect_limit: u64,
    /// Passed bytes the agent has read and written to the peer. A paused flow resumes only when it
    /// equals `passed_bytes`, so a redirected skb never overtakes bytes still waiting for the agent.
    pub consumed_bytes: u64,
}

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
    /// skbs passed to the agent because the flow was paused.
    Passed = 4,
    /// Times a flow paused.
    Paused = 5,
    /// Times a paused flow resumed redirecting.
    Resumed = 6,
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
