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
    /// Socket cookie -> [`super::FlowCtrl`] (armed, redirect limit, forwarded bytes), written by
    /// the agent.
    pub const CTRL: &str = "ZI_CTRL";
    /// Ring buffer of socket cookies whose redirected bytes passed their limit.
    pub const EVENTS: &str = "ZI_EVENTS";
    /// Per-CPU program counters, indexed by [`super::ProgCounter`].
    pub const COUNTERS: &str = "ZI_COUNTERS";
    /// Route id -> [`super::RouteInfo`] (SNI, cluster, agent-side counters), written by the agent.
    pub const ROUTES: &str = "ZI_ROUTES";
    /// Per-CPU array, route id -> [`super::RouteBytes`], added to by the verdict for every
    /// redirected skb.
    pub const ROUTE_BYTES: &str = "ZI_ROUTE_BYTES";
    /// Downstream socket cookie -> [`super::FlowInfo`] (addresses, route, start, datapath), written
    /// by the agent for every routed flow, spliced or copied.
    pub const FLOW_INFO: &str = "ZI_FLOW_INFO";
    /// SockHash of endpoint sockets on the agent's host (the `sk_msg` program is attached to it),
    /// keyed by socket cookie. Filled by the `sock_ops` program.
    pub const LOCAL_SOCKS: &str = "ZI_LOCAL_SOCKS";
    /// [`super::LocalKey`] -> [`super::LocalFlow`]: upstream connections the agent registered for
    /// the local redirect.
    pub const LOCAL_FLOWS: &str = "ZI_LOCAL_FLOWS";
}

/// Program names in the BPF object.
pub mod prog_names {
    pub const SK_SKB_VERDICT: &str = "zi_stream_verdict";
    /// cgroup `sock_ops`: puts the endpoint side of a registered upstream connection into
    /// `ZI_LOCAL_SOCKS`.
    pub const LOCAL_SOCK_OPS: &str = "zi_local_sockops";
    /// `sk_msg` on `ZI_LOCAL_SOCKS`: redirects an endpoint's sends to the client socket's egress.
    pub const LOCAL_SK_MSG: &str = "zi_local_msg";
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
    /// Bytes passed to the socket's own queue for the agent: before the flow is armed, and while
    /// it is paused (the peer's redirect queue was over budget).
    pub passed_bytes: u64,
    /// Events sent to the agent (redirected bytes near or at the limit).
    pub limit_events: u64,
    /// Zero-length skbs (FIN) dropped by the verdict program; non-zero once the FIN was processed,
    /// i.e. after every byte before it went through the verdict.
    pub dropped_empty: u64,
    /// The `FlowCtrl::notify_at` the last event was sent for, so one value produces one event.
    pub notified_limit: u64,
    /// Index into `ZI_ROUTE_BYTES` of the flow's route ([`NO_ROUTE`]: none). Set by the agent.
    pub route_id: u32,
    /// Which way this socket's incoming bytes go: [`DIR_UP`] (client -> endpoint) or
    /// [`DIR_DOWN`]. Set by the agent.
    pub direction: u32,
    /// 1 while paused: the verdict passes every skb to the socket's own queue, where it is
    /// charged to the socket's receive memory, so its TCP window closes and the sender slows.
    /// The agent forwards those bytes; the verdict resumes redirecting at the first skb that
    /// arrives once the agent forwarded every passed byte (`FlowCtrl::forwarded`).
    pub paused: u64,
    /// Times the flow paused.
    pub pauses: u64,
    /// TCP sequence number just past the last byte the verdict handed on (valid when `seq_known`).
    pub next_seq: u32,
    /// 1 once the verdict saw this socket's first data skb.
    pub seq_known: u32,
    /// Bytes the verdict cut off the head of skbs because they were already handed on: a
    /// retransmission that overlaps received data reaches the verdict whole (`tcp_read_skb`
    /// ignores how much of an skb was already consumed).
    pub overlap_bytes: u64,
}

/// [`FlowSide::direction`] of the client's socket: its bytes go to the endpoint.
pub const DIR_UP: u32 = 0;
/// [`FlowSide::direction`] of the endpoint's socket: its bytes go to the client.
pub const DIR_DOWN: u32 = 1;

/// Route ids are indices into `ZI_ROUTE_BYTES`, below this.
pub const MAX_ROUTES: u32 = 4096;
/// The route id of a flow whose route got no id (more than [`MAX_ROUTES`] routes at once).
pub const NO_ROUTE: u32 = u32::MAX;

/// Bytes the verdict redirected for one route, per CPU. Only the verdict writes it (the agent
/// zeroes a slot before it reuses a route id that no flow holds any more).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteBytes {
    /// Client -> endpoint.
    pub up: u64,
    /// Endpoint -> client.
    pub down: u64,
    /// Flows the verdict carried: counted on the first skb it redirects from the endpoint to the
    /// client (the ServerHello of every TLS flow), so a flow counts once, in the kernel.
    pub flows: u64,
}

/// Longest SNI or cluster name kept in [`RouteInfo`]; longer ones are cut (the length field keeps
/// the full length, so a reader knows).
pub const ROUTE_NAME_MAX: usize = 256;

/// One route as the agent knows it: names and the counters only the agent sees. Only the agent
/// writes it (whole values); the bytes the kernel moved are in `ZI_ROUTE_BYTES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// Flows handed to the kernel splice.
    pub flows_spliced: u64,
    /// Flows copied in userspace (the kernel refused them).
    pub flows_userspace: u64,
    /// Bytes the agent moved client -> endpoint: the replayed ClientHello of spliced flows, and
    /// every byte of userspace flows (added when they end).
    pub agent_bytes_up: u64,
    /// Bytes the agent moved endpoint -> client.
    pub agent_bytes_down: u64,
    /// Full length of the SNI (may exceed [`ROUTE_NAME_MAX`]).
    pub sni_len: u16,
    /// Full length of the cluster name.
    pub cluster_len: u16,
    /// [`ROUTE_ACTIVE`] while the route is in the current table.
    pub flags: u32,
    pub sni: [u8; ROUTE_NAME_MAX],
    pub cluster: [u8; ROUTE_NAME_MAX],
}

/// [`RouteInfo::flags`]: the route is in the agent's current route table (else it was removed by
/// a reload and is kept for its counters and the flows still on it).
pub const ROUTE_ACTIVE: u32 = 1;

impl Default for RouteInfo {
    fn default() -> Self {
        Self {
            flows_spliced: 0,
            flows_userspace: 0,
            agent_bytes_up: 0,
            agent_bytes_down: 0,
            sni_len: 0,
            cluster_len: 0,
            flags: 0,
            sni: [0; ROUTE_NAME_MAX],
            cluster: [0; ROUTE_NAME_MAX],
        }
    }
}

/// A socket address in a map value: IPv4 as an IPv4-mapped IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockAddr {
    /// IPv6 address bytes (network order); IPv4 is `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Port, host order.
    pub port: u16,
    /// 4 or 6 (0: unknown).
    pub family: u16,
    pub _pad: u32,
}

impl SockAddr {
    pub fn from_socket_addr(a: core::net::SocketAddr) -> Self {
        let (addr, family) = match a.ip() {
            core::net::IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 4),
            core::net::IpAddr::V6(v6) => (v6.octets(), 6),
        };
        Self {
            addr,
            port: a.port(),
            family,
            _pad: 0,
        }
    }

    /// The address, or `None` for an unknown family (an entry never filled in).
    pub fn to_socket_addr(&self) -> Option<core::net::SocketAddr> {
        let v6 = core::net::Ipv6Addr::from(self.addr);
        let ip = match self.family {
            4 => core::net::IpAddr::V4(v6.to_ipv4_mapped()?),
            6 => core::net::IpAddr::V6(v6),
            _ => return None,
        };
        Some(core::net::SocketAddr::new(ip, self.port))
    }
}

/// [`FlowInfo::datapath`]: the kernel splice moves the flow's bytes.
pub const DATAPATH_SOCKMAP: u32 = 1;
/// [`FlowInfo::datapath`]: the agent copies the flow's bytes in userspace.
pub const DATAPATH_USERSPACE: u32 = 2;
/// [`FlowInfo::datapath`]: the kernel splice, with the endpoint on the agent's host: the
/// endpoint's sends go straight to the client socket (`sk_msg`), not through loopback TCP.
pub const DATAPATH_SOCKMAP_LOCAL: u32 = 3;

/// One TCP connection as its *endpoint* side sees it (the agent's upstream connection, seen from
/// the accepted socket), in the form both `sock_ops` and `sk_msg` contexts give it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalKey {
    /// The network namespace (`SO_NETNS_COOKIE` / `bpf_get_netns_cookie`): the same 4-tuple in
    /// another namespace is another connection.
    pub netns: u64,
    /// 2 (AF_INET) or 10 (AF_INET6).
    pub family: u32,
    /// The endpoint's port, host order.
    pub local_port: u32,
    /// The agent's port, host order.
    pub remote_port: u32,
    pub _pad: u32,
    /// The endpoint's address, as the context's u32 words (network order); IPv4 in word 0.
    pub local_ip: [u32; 4],
    /// The agent's address, same form.
    pub remote_ip: [u32; 4],
}

/// An upstream connection the agent registered for the local redirect.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalFlow {
    /// Cookie of the client (downstream) socket: the endpoint's sends go to its egress.
    pub down_cookie: u64,
    /// Cookie of the endpoint's socket, written by `sock_ops` when it was put into
    /// `ZI_LOCAL_SOCKS` (0 until then).
    pub endpoint_cookie: u64,
    /// 0: `sk_msg` lets the endpoint's sends take TCP; 1: it redirects them. Agent-written.
    pub armed: u64,
    /// How far (bytes) the redirected bytes may run ahead of what the client acknowledged: the
    /// agent's `FlowCtrl::redirect_limit` for the endpoint socket is (client-acked + window).
    /// `sk_msg` asks the agent for a new limit (`ZI_EVENTS`) three quarters of a window before it
    /// is reached.
    pub window: u64,
}

/// What an operator needs to know about one routed flow, keyed by the downstream (client) socket's
/// cookie. Only the agent writes it; the verdict never reads it (its per-skb state is
/// [`FlowSide`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowInfo {
    /// Cookie of the endpoint socket (the spliced flow's second [`FlowSide`]).
    pub up_cookie: u64,
    /// When the flow was routed, nanoseconds since the Unix epoch.
    pub started_unix_ns: u64,
    /// Client -> endpoint bytes the agent moved itself: every byte of a userspace flow (updated
    /// about once a second), the replayed ClientHello of a spliced flow (whose other bytes are in
    /// the `FlowSide` of the client socket).
    pub agent_bytes_up: u64,
    /// Endpoint -> client bytes the agent moved itself.
    pub agent_bytes_down: u64,
    /// The flow's route (a `ZI_ROUTES` key), or [`NO_ROUTE`].
    pub route_id: u32,
    /// [`DATAPATH_SOCKMAP`] or [`DATAPATH_USERSPACE`].
    pub datapath: u32,
    /// The client (downstream peer).
    pub client: SockAddr,
    /// The ingress address the client connected to.
    pub ingress: SockAddr,
    /// The agent's address on the upstream connection.
    pub local: SockAddr,
    /// The endpoint (upstream peer).
    pub upstream: SockAddr,
}

// Every value is a multiple of 8 bytes with no padding, so `bpftool map dump` shows whole u64
// words and a reader can check a pinned map against these sizes.
const _: () = assert!(core::mem::size_of::<FlowSide>() == 96);
const _: () = assert!(core::mem::size_of::<FlowCtrl>() == 32);
const _: () = assert!(core::mem::size_of::<RouteBytes>() == 24);
const _: () = assert!(core::mem::size_of::<RouteInfo>() == 40 + 2 * ROUTE_NAME_MAX);
const _: () = assert!(core::mem::size_of::<SockAddr>() == 24);
const _: () = assert!(core::mem::size_of::<FlowInfo>() == 136);
const _: () = assert!(core::mem::size_of::<LocalKey>() == 56);
const _: () = assert!(core::mem::size_of::<LocalFlow>() == 32);

/// The agent's side of one socket's flow control. Only the agent writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCtrl {
    /// 0 until the agent armed the flow: the verdict passes every byte to the socket's own queue
    /// (where the userspace copy reads it). 1: redirect.
    pub armed: u64,
    /// The agent sets it to (redirected bytes the peer acknowledged) + budget: redirected bytes
    /// past it would leave more than the budget in the peer's redirect queue (outside TCP's memory
    /// accounting) and unacknowledged send queue together. An skb that would pass it pauses the
    /// flow (`FlowSide::paused`) and sends the socket's cookie on `ZI_EVENTS` (once per limit
    /// value).
    pub redirect_limit: u64,
    /// Redirected bytes past this (half a budget before the limit) send the socket's cookie on
    /// `ZI_EVENTS`, once per value, and keep being redirected: the agent then watches the
    /// direction and moves the limit along with what the peer takes, so a queue that keeps
    /// draining never pauses the flow.
    pub notify_at: u64,
    /// Passed bytes the agent has read and written into the peer's TCP stream. A paused flow
    /// resumes only when this equals `FlowSide::passed_bytes`: a redirected skb then lands behind
    /// every byte the agent forwarded, never ahead of one still on its way.
    pub forwarded: u64,
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
    /// skbs passed to the socket's own queue: the flow was not armed, or paused.
    Passed = 4,
    /// Limit events sent to the agent.
    LimitEvents = 5,
    /// Limit events lost because the ring buffer was full.
    EventsLost = 6,
    /// Endpoint sockets `sock_ops` put into `ZI_LOCAL_SOCKS`.
    LocalInserted = 7,
    /// `sock_ops` found a registered connection but the insert failed.
    LocalInsertFailed = 8,
    /// Endpoint sends (`sk_msg` calls) redirected to the client socket.
    LocalRedirected = 9,
    /// Endpoint sends let through to TCP (flow not armed, or no longer registered).
    LocalPassed = 10,
    /// `bpf_msg_redirect_hash` failed (client socket gone): the send takes TCP.
    LocalRedirectFailed = 11,
    /// Local flows that reached their redirect limit (the client is slower than the endpoint):
    /// from then on their endpoint's sends take TCP, through the plain splice.
    LocalFellBack = 12,
    /// Flows paused: an skb would have put more than the budget into the peer's redirect queue.
    Paused = 13,
    /// Paused flows that resumed redirecting.
    Resumed = 14,
    /// skbs that repeated bytes already handed on (an overlapping retransmission): trimmed to
    /// their new bytes, or dropped when they held nothing new.
    Overlaps = 15,
    /// Overlapping skbs the verdict could not trim (the repeat goes on; the agent's accounting
    /// then resets the flow).
    OverlapTrimFailed = 16,
    /// skbs passed while their socket's psock queue held the other direction's redirected skbs:
    /// they wait behind them, and the kernel charges them later without the socket lock.
    PassedBehindQueue = 17,
    /// skbs redirected past the limit because a pause would have passed them behind the other
    /// direction's redirected skbs.
    PauseDeferred = 18,
}

/// Number of [`ProgCounter`] slots.
pub const PROG_COUNTERS: u32 = 19;

/// Names of the [`ProgCounter`] slots, by index, for the ops tooling.
pub const PROG_COUNTER_NAMES: [&str; PROG_COUNTERS as usize] = [
    "redirected",
    "no_flow",
    "dropped_empty",
    "redirect_failed",
    "passed",
    "limit_events",
    "events_lost",
    "local_inserted",
    "local_insert_failed",
    "local_redirected",
    "local_passed",
    "local_redirect_failed",
    "local_fell_back",
    "paused",
    "resumed",
    "overlaps",
    "overlap_trim_failed",
    "passed_behind_queue",
    "pause_deferred",
];

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), only u64 fields, no padding.
    unsafe impl aya::Pod for super::FlowSide {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowCtrl {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RouteBytes {}
    // SAFETY: repr(C), u64 fields then u16/u16/u32 then byte arrays: no padding.
    unsafe impl aya::Pod for super::RouteInfo {}
    // SAFETY: repr(C), u64 fields, two u32, then SockAddrs (16 + 2 + 2 + 4 bytes, 8-aligned
    // total): no padding.
    unsafe impl aya::Pod for super::FlowInfo {}
    // SAFETY: repr(C), u64 then five u32 then two [u32; 4]: 56 bytes, no padding.
    unsafe impl aya::Pod for super::LocalKey {}
    // SAFETY: repr(C), only u64 fields.
    unsafe impl aya::Pod for super::LocalFlow {}
}
