//! The kernel splice: after routing, both sockets go into the SockHash and the `sk_skb` verdict
//! program redirects each one's incoming bytes to the other's egress. The agent only watches.
//!
//! The handoff and the flow control follow DESIGN.md section 3, with two findings of our own:
//! - a receive-queue skb that a plain read consumed in part is later handed to the verdict whole
//!   (duplicating its prefix), so each socket is read until empty before it is inserted, and
//!   skbs that arrive between that read and the insert are pushed through the verdict at once
//!   (SO_RCVLOWAT fires data-ready) instead of being read;
//! - the read path is verdict-only (`tcp_read_skb`), which hands an skb whose head TCP had
//!   already accepted (an overlapping retransmission) to the verdict whole; the agent's integrity
//!   checks turn such a duplicate into a reset of the flow, never a silent corruption. The parser
//!   path that avoids it cannot hold bytes back: 6.18 miscounts `copied_seq` for passed bytes
//!   there and a paused flow stalls (ARCHITECTURE.md, "Reading path and integrity").
//!
//! Bounded memory (DESIGN.md section 3.7): the agent keeps, per direction, a limit of what the
//! peer acknowledged plus the budget (the spliced sockets' send buffers are four budgets, so the
//! kernel's worker always finds room: ARCHITECTURE.md, "The kernel's psock race"). An skb that
//! would pass it pauses the flow: the verdict passes it (and every later one) to the source
//! socket's own queue, where it is charged to the socket's receive memory, so TCP closes the
//! window and the remote sender slows, as it would behind a userspace proxy's full buffer. The
//! agent reads the passed bytes, waits until the redirect queue has drained into the peer's TCP
//! stream, writes them there and publishes how many it forwarded; the verdict redirects again
//! from the first skb that arrives once the agent has forwarded every passed byte, so a
//! redirected byte never overtakes a passed one. While the peer stays slower than the sender the
//! flow stays paused, copied by the agent at the peer's pace.
//!
//! FIN is not forwarded by the kernel: on EOF the agent waits until every redirected byte entered
//! the peer's TCP stream, then shuts the peer's write side; a reset resets the other side.

use std::collections::HashMap as StdHashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData, MapError, RingBuf, SockHash};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use zone_ingress_common::{
    DATAPATH_SOCKMAP, DATAPATH_SOCKMAP_LOCAL, DATAPATH_USERSPACE, DIR_DOWN, DIR_UP, FlowCtrl,
    FlowSide, NO_ROUTE,
};

use super::flowinfo::{self, AgentBytes, AgentCount, FlowRecords};
use super::local::{LocalRedirect, LocalRedirectMode, Registration};
use super::routemap::RouteMap;
use super::userspace::Progress;
use super::{FlowEnd, FlowSummary, reset, sockopt, write_all};
use crate::bpf::BpfPrograms;
use crate::routes::{Route, RouteStore};
use crate::stats::Stats;

/// How often a hot direction's redirect queue is measured.
const HOT_TICK: Duration = Duration::from_millis(1);
/// A direction that moved nothing for this long (and is not paused) stops being watched.
const COOL_AFTER: Duration = Duration::from_millis(200);
/// How long to wait for the verdict program to process the FIN after the agent saw EOF.
const FIN_PROCESSED_WAIT: Duration = Duration::from_secs(2);
/// How often the route map is brought in line with the current route table.
const ROUTE_SYNC_EVERY: Duration = Duration::from_secs(1);

/// Why a flow could not be spliced (it then takes the userspace copy, or is reset).
#[derive(Debug, thiserror::Error)]
pub enum SpliceRefused {
    #[error("the client or endpoint already closed its side (EOPNOTSUPP on insert)")]
    PeerClosed,
    #[error("the socket already belongs to another sockmap user (EBUSY)")]
    Busy,
    #[error("the flow maps are full")]
    MapFull,
    #[error(
        "a peer kept sending before the TLS handshake could progress (more than {0} bytes queued)"
    )]
    EarlyData(usize),
    #[error("{0}")]
    Other(String),
}

impl SpliceRefused {
    pub fn label(&self) -> &'static str {
        match self {
            Self::PeerClosed => "peer_closed",
            Self::Busy => "busy",
            Self::MapFull => "map_full",
            Self::EarlyData(_) => "early_data",
            Self::Other(_) => "other",
        }
    }

    fn from_map_error(e: MapError) -> Self {
        let errno = match &e {
            MapError::SyscallError(s) => s.io_error.raw_os_error(),
            _ => None,
        };
        match errno {
            Some(libc::EOPNOTSUPP) => Self::PeerClosed,
            Some(libc::EBUSY) => Self::Busy,
            Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC) => Self::MapFull,
            _ => Self::Other(e.to_string()),
        }
    }
}

/// What the listener does with a flow the kernel did not take.
pub enum Refusal {
    /// Copy it in userspace, first writing `to_up` to the endpoint and `to_down` to the client
    /// (bytes the handoff already read).
    Fallback {
        down: TcpStream,
        up: TcpStream,
        reason: SpliceRefused,
        to_up: Vec<u8>,
        to_down: Vec<u8>,
    },
    /// The endpoint socket is already in the SockHash but the client socket could not join it:
    /// the flow cannot be copied safely (the endpoint's bytes would have to leave the kernel
    /// through the path that loses track of them), and nothing was sent yet, so both are reset.
    Abort { reason: SpliceRefused },
}

/// The BPF maps the splice needs, shared by every flow.
pub struct Splicer {
    socks: Mutex<SockHash<MapData, u64>>,
    flows: Mutex<HashMap<MapData, u64, FlowSide>>,
    ctrl: Mutex<HashMap<MapData, u64, FlowCtrl>>,
    /// Source socket cookie -> the direction watching it, woken by a limit event.
    watchers: Mutex<StdHashMap<u64, Arc<Notify>>>,
    budget: u64,
    stats: Arc<Stats>,
    /// Route ids and the route entries of the ops maps.
    routes: RouteMap,
    /// The flow entries of the ops maps (spliced and userspace flows).
    records: Arc<FlowRecords>,
    /// A hot restart taking this agent's spliced flows (see `handoff/`).
    takeover: Mutex<Takeover>,
    /// True while live flows should leave their watch loop and go to the takeover.
    detach: watch::Sender<bool>,
    /// Set once another agent took the flows: this one stops reading the shared event ring.
    events_stopped: AtomicBool,
    /// The `sk_msg` path for endpoints on this host (`--local-redirect auto`, when it loaded).
    local: Option<LocalRedirect>,
    /// Keeps the programs attached and the object loaded.
    _ebpf: aya::Ebpf,
}

/// Flows inside [`Splicer::run`], and where detached ones go while a takeover collects them.
#[derive(Default)]
struct Takeover {
    tx: Option<tokio::sync::mpsc::UnboundedSender<DetachedFlow>>,
    running: usize,
}

/// The watch state of one direction of a spliced flow, carried from one agent to the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirectionState {
    /// The direction already forwarded its FIN (nothing left to watch).
    pub finished: bool,
    /// Bytes the agent moved itself on this direction (replayed or passed bytes).
    pub agent_written: u64,
    /// Passed bytes the agent forwarded (its `FlowCtrl::forwarded`; included in `agent_written`).
    pub copied: u64,
    /// Start measuring at once (an adopted flow: its last limit event may have gone elsewhere).
    #[serde(skip)]
    pub hot: bool,
}

/// What a hot restart transfers about one spliced flow besides its two descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowState {
    pub down_cookie: u64,
    pub up_cookie: u64,
    pub route_id: u32,
    /// How long the flow has run, in milliseconds.
    pub age_ms: u64,
    /// Client -> endpoint.
    pub up: DirectionState,
    /// Endpoint -> client.
    pub down: DirectionState,
}

/// A spliced flow taken out of this agent's watch, to be sent to the next agent. Its map entries
/// (SockHash, `ZI_FLOWS`, `ZI_CTRL`, `ZI_FLOW_INFO`) stay: the flow lives on.
pub struct DetachedFlow {
    pub down: TcpStream,
    pub up: TcpStream,
    pub state: FlowState,
}

/// Why an adopted flow was not taken.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("socket cookie of the {side} socket is {actual}, the old agent said {expected}")]
    CookieMismatch {
        side: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("reading SO_COOKIE: {0}")]
    Cookie(io::Error),
    #[error("registering the socket with the runtime: {0}")]
    Register(io::Error),
}

impl std::fmt::Debug for Splicer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splicer")
            .field("budget", &self.budget)
            .finish()
    }
}

/// A flow that was handed to the kernel; [`Splicer::run`] watches it to its end.
pub struct SplicedFlow {
    down: TcpStream,
    up: TcpStream,
    down_cookie: u64,
    up_cookie: u64,
    /// Bytes the agent itself wrote upstream (the ClientHello and anything read with it).
    initial: u64,
    /// Bytes the agent itself wrote to the client (anything the endpoint sent before the splice).
    initial_down: u64,
    started: Instant,
    /// The flow's route id (counted in `ZI_ROUTE_BYTES`), or `NO_ROUTE`.
    route_id: u32,
    /// The watch state of each direction (up, down): fresh, or carried over from another agent.
    resume: [DirectionState; 2],
    /// The local redirect's registration and the endpoint socket's cookie, when the endpoint's
    /// sends go straight to the client socket.
    local: Option<(Registration, u64)>,
    /// What each direction's agent wrote so far (up, down), kept current by the directions: a
    /// drain that cuts them off mid-way still knows what is in the peers' streams, and the flow
    /// map's publisher reads it.
    written: Arc<[Forwarding; 2]>,
}

impl SplicedFlow {
    /// Whether the endpoint's sends bypass TCP (`sk_msg`, endpoint on this host).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }
}

/// Counts a flow inside [`Splicer::run`] for the takeover.
struct RunGuard<'a>(&'a Splicer);

impl<'a> RunGuard<'a> {
    fn enter(splicer: &'a Splicer) -> Self {
        lock(&splicer.takeover).running += 1;
        Self(splicer)
    }
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        let mut t = lock(&self.0.takeover);
        t.running = t.running.saturating_sub(1);
    }
}

/// A flow the userspace copy carries while the BPF maps exist: recorded in the flow map with
/// datapath `userspace` until [`Splicer::end_userspace`].
pub struct UserspaceFlow {
    cookie: u64,
    route_id: u32,
    /// The copy's live byte counts, published to the flow map about once a second.
    pub progress: Arc<Progress>,
}

/// The outcome of one direction.
struct DirectionEnd {
    /// Passed bytes the agent read and forwarded.
    copied: u64,
    /// Bytes that reached `dst`'s stream without passing `src` (the local redirect's `sk_msg`).
    bypassed: u64,
}

impl Splicer {
    /// Takes over the loaded programs. `route_store` is followed so the route map lists the
    /// routes of the current table; `stats` sums the kernel's route counters at each scrape.
    pub fn new(
        programs: BpfPrograms,
        budget: u64,
        stats: Arc<Stats>,
        route_store: Arc<RouteStore>,
        local_mode: LocalRedirectMode,
    ) -> Arc<Self> {
        let BpfPrograms {
            mut ebpf,
            reused,
            socks,
            flows,
            ctrl,
            events,
            routes,
            route_bytes,
            flow_info,
            ..
        } = programs;
        let local = match local_mode {
            LocalRedirectMode::Off => None,
            LocalRedirectMode::Auto => LocalRedirect::load(&mut ebpf)
                .inspect_err(|e| {
                    tracing::warn!(
                        "local redirect unavailable, endpoints on this host take the plain splice: {}",
                        e.chain()
                    )
                })
                .ok(),
        };
        let splicer = Arc::new(Self {
            socks: Mutex::new(socks),
            flows: Mutex::new(flows),
            ctrl: Mutex::new(ctrl),
            watchers: Mutex::new(StdHashMap::new()),
            budget: budget.max(1),
            stats: stats.clone(),
            routes: RouteMap::new(routes, route_bytes),
            records: FlowRecords::new(flow_info),
            takeover: Mutex::new(Takeover::default()),
            detach: watch::channel(false).0,
            events_stopped: AtomicBool::new(false),
            local,
            _ebpf: ebpf,
        });
        if reused {
            let n = splicer.routes.adopt_existing();
            tracing::info!(
                routes = n,
                "route ids and counters carried over from the previous agent"
            );
        }
        splicer.routes.sync(&route_store.load());
        let weak = Arc::downgrade(&splicer);
        stats.set_kernel_route_bytes(Box::new(move || {
            weak.upgrade()
                .map(|s| s.routes.kernel_bytes_by_cluster())
                .unwrap_or_default()
        }));
        // Keeps the route map in line with the current route table (a reload swaps the table).
        Self::spawn_periodic(&splicer, ROUTE_SYNC_EVERY, move |s| {
            s.routes.sync(&route_store.load())
        });
        // Keeps the flow map's byte counts current and adds what the agent moved for live flows
        // (userspace flows, paused directions) to the route and Prometheus counters as it goes.
        Self::spawn_periodic(&splicer, flowinfo::PUBLISH_EVERY, |s| {
            s.records.publish(&mut |route_id, cluster, up, down| {
                s.routes.agent_bytes(route_id, up, down);
                if let Some(cluster) = cluster {
                    s.stats.flow_bytes(cluster, up, down);
                }
            })
        });
        Self::spawn_event_reader(splicer.clone(), events);
        splicer
    }

    /// Runs `work` every `every` for as long as the splicer lives (nothing without a runtime).
    fn spawn_periodic(splicer: &Arc<Self>, every: Duration, work: impl Fn(&Self) + Send + 'static) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let splicer = Arc::downgrade(splicer);
        handle.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(splicer) = splicer.upgrade() else {
                    return;
                };
                work(&splicer);
            }
        });
    }

    /// Brings the route map in line with `table` now (the periodic sync lags up to
    /// [`ROUTE_SYNC_EVERY`]): the agent calls it before it reports ready, so `maps dump routes`
    /// lists the routes it serves from the first moment.
    pub fn sync_routes(&self, table: &Arc<crate::routes::RouteTable>) {
        self.routes.sync(table);
    }

    /// Records a flow the userspace copy is about to carry in the flow map (datapath
    /// `userspace`). `None` when its socket cookie cannot be read: the flow runs unrecorded.
    pub fn track_userspace(
        &self,
        down: &TcpStream,
        up: &TcpStream,
        route: &Route,
    ) -> Option<UserspaceFlow> {
        let cookie = socket_cookie(down).ok()?;
        let up_cookie = socket_cookie(up).unwrap_or(0);
        let route_id = self.routes.hold(route);
        self.routes.started(route_id, DATAPATH_USERSPACE, 0, 0);
        let progress = Arc::new(Progress::default());
        let info = flowinfo::describe(down, up, up_cookie, route_id, DATAPATH_USERSPACE);
        self.records.track(
            cookie,
            info,
            AgentCount {
                bytes: progress.clone(),
                counted: (0, 0),
                cluster: Some(route.cluster.clone()),
            },
        );
        Some(UserspaceFlow {
            cookie,
            route_id,
            progress,
        })
    }

    /// A userspace flow ended: its entry goes, and the bytes the publisher did not count yet go
    /// to its route (and, through `summary`, to Prometheus).
    pub fn end_userspace(&self, flow: UserspaceFlow, summary: &mut FlowSummary) {
        let (up, down) = self.records.untrack(flow.cookie).unwrap_or_default();
        self.routes.release(
            flow.route_id,
            summary.bytes_up.saturating_sub(up),
            summary.bytes_down.saturating_sub(down),
        );
        (summary.live_counted_up, summary.live_counted_down) = (up, down);
    }

    /// Reads limit events from the ring buffer and wakes the direction they concern.
    fn spawn_event_reader(splicer: Arc<Self>, ring: RingBuf<MapData>) {
        crate::bpf::spawn_ring_reader(
            ring,
            move |ring: &mut RingBuf<MapData>| {
                // Another agent took the flows and reads this (shared, pinned) ring now.
                if splicer.events_stopped.load(Ordering::SeqCst) {
                    return;
                }
                while let Some(item) = ring.next() {
                    let Some(bytes) = item.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok())
                    else {
                        continue;
                    };
                    let cookie = u64::from_ne_bytes(bytes);
                    if let Some(n) = lock(&splicer.watchers).get(&cookie) {
                        n.notify_one();
                    }
                }
            },
            |e| tracing::error!(error = %e, "cannot poll the flow-control ring buffer: slow receivers are not throttled"),
        );
    }

    /// The local redirect and the client socket's cookie, for [`crate::upstream::connect`], when
    /// it is loaded.
    pub fn local_redirect_for(&self, down: &TcpStream) -> Option<(&LocalRedirect, u64)> {
        let local = self.local.as_ref()?;
        Some((local, socket_cookie(down).ok()?))
    }

    /// Hands the pair to the kernel. `route` names the flow in the ops maps and its counters.
    /// `local`: the upstream connection was registered for the local redirect.
    pub async fn handoff(
        &self,
        down: TcpStream,
        up: TcpStream,
        initial: &[u8],
        route: &Route,
        local: Option<Registration>,
    ) -> Result<SplicedFlow, Refusal> {
        let mut local_ep = None;
        if let (Some(redirect), Some(reg)) = (&self.local, local) {
            match redirect.endpoint_cookie(&reg).await {
                Some(cookie) => local_ep = Some((reg, cookie)),
                None => redirect.forget(&reg),
            }
        }
        let result = self.handoff_inner(down, up, initial, route, local_ep).await;
        if result.is_err()
            && let (Some(redirect), Some((reg, ep))) = (&self.local, local_ep)
        {
            redirect.forget(&reg);
            let _ = lock(&self.flows).remove(&ep);
            let _ = lock(&self.ctrl).remove(&ep);
        }
        result
    }

    async fn handoff_inner(
        &self,
        down: TcpStream,
        up: TcpStream,
        initial: &[u8],
        route: &Route,
        mut local_ep: Option<(Registration, u64)>,
    ) -> Result<SplicedFlow, Refusal> {
        // A receive-queue skb that a plain read consumed only in part is later handed to the
        // verdict whole (tcp_read_skb ignores the read offset): its prefix would be sent twice. So
        // read each socket until it is empty before it joins the SockHash. A TLS peer has nothing
        // queued here (the client waits for the ServerHello, the server for the ClientHello).
        let mut to_up = initial.to_vec();
        let mut to_down = Vec::new();
        let drained = drain_queued(&down, &mut to_up).and_then(|_| drain_queued(&up, &mut to_down));
        let cookies = match drained {
            Ok(()) => socket_cookie(&down)
                .and_then(|d| Ok((d, socket_cookie(&up)?)))
                .map_err(|e| SpliceRefused::Other(format!("SO_COOKIE: {e}"))),
            Err(reason) => Err(reason),
        };
        let (down_cookie, up_cookie) = match cookies {
            Ok(c) => c,
            Err(reason) => {
                return Err(Refusal::Fallback {
                    down,
                    up,
                    reason,
                    to_up,
                    to_down,
                });
            }
        };
        let route_id = self.routes.hold(route);
        // Armed before inserted, but held: until the replayed bytes below are in the peers'
        // streams, the verdict passes what arrives to the socket's own queue (a flow paused from
        // the start, with nothing forwarded yet). Redirected at once, a client's early bytes
        // would enter the endpoint's stream between two parts of a replay the send buffer took
        // in pieces (seen: 92 KB out of place in a client that sent right after its hello).
        let held = FlowCtrl {
            forwarded: REPLAY_PENDING,
            ..self.flow_ctrl(0, 0)
        };
        let entries = self.set_ctrl(down_cookie, held).and_then(|_| {
            self.set_ctrl(up_cookie, held)?;
            let mut flows = lock(&self.flows);
            flows.insert(down_cookie, held_side(up_cookie, route_id, DIR_UP), 0)?;
            if let Some((_, ep)) = local_ep {
                // The endpoint socket's side: sk_msg counts the bytes it redirects here.
                flows.insert(ep, side(down_cookie, route_id, DIR_DOWN), 0)?;
            }
            flows.insert(up_cookie, held_side(down_cookie, route_id, DIR_DOWN), 0)
        });
        if let Err(e) = entries {
            self.forget(down_cookie, up_cookie);
            self.routes.release(route_id, 0, 0);
            return Err(Refusal::Fallback {
                down,
                up,
                reason: SpliceRefused::from_map_error(e),
                to_up,
                to_down,
            });
        }
        {
            let mut socks = lock(&self.socks);
            // The endpoint first: it sends nothing before it gets the ClientHello, so if the client
            // socket is then refused, no byte has moved yet.
            if let Err(e) = socks.insert(up_cookie, up.as_raw_fd(), 0) {
                drop(socks);
                self.forget(down_cookie, up_cookie);
                self.routes.release(route_id, 0, 0);
                return Err(Refusal::Fallback {
                    down,
                    up,
                    reason: SpliceRefused::from_map_error(e),
                    to_up,
                    to_down,
                });
            }
            if let Err(e) = socks.insert(down_cookie, down.as_raw_fd(), 0) {
                drop(socks);
                reset(&down);
                reset(&up);
                self.forget(down_cookie, up_cookie);
                self.routes.release(route_id, 0, 0);
                return Err(Refusal::Abort {
                    reason: SpliceRefused::from_map_error(e),
                });
            }
        }
        // A paused direction's bytes wait in the psock's queue, not the receive queue, so a
        // socket closed by a dying agent would send a FIN over them (and a client behind a zero
        // window would wait forever) where any proxy's unread bytes send a reset. So the sockets
        // reset on close until the flow ends in order (`Splicer::run` clears it).
        for s in [&down, &up] {
            reset(s);
        }
        // Send buffers the psock worker never finds full. It sends a socket's redirect queue only
        // while the socket is writable (queued memory under half its send buffer) and otherwise
        // retries a jiffy later; meanwhile a passed skb of the other direction waits behind that
        // queue and is charged by the worker without the socket lock, a kernel race that leaks
        // TCP memory (ARCHITECTURE.md, "The kernel's psock race"). The limit counts from
        // acknowledged bytes (`Direction::regulate`), so the redirect queue and the
        // unacknowledged send queue together hold about a budget, under half of four budgets
        // even at skb overhead.
        let sndbuf = spliced_sndbuf(self.budget);
        for s in [&down, &up] {
            if let Err(e) = set_sndbuf(s, sndbuf) {
                tracing::debug!(error = %e, "SO_SNDBUFFORCE failed; the send buffer autotunes");
            }
        }
        // skbs that arrived between the drain and the insert sit in the receive queue until the
        // next data-ready event; fire it now so they go through the verdict like every later byte.
        for s in [&down, &up] {
            if let Err(e) = set_rcvlowat(s, 1) {
                tracing::debug!(error = %e, "SO_RCVLOWAT failed; queued bytes wait for the next segment");
            }
        }
        // Both spliced sockets are in the SockHash and the endpoint has not been sent anything:
        // from its first byte on, its sends go to the client socket.
        let window = super::local::WINDOW.min(self.budget);
        if let (Some(redirect), Some((reg, ep))) = (&self.local, local_ep)
            && let Err(e) = set_sndbuf(&down, (2 * window) as libc::c_int)
                .and_then(|()| {
                    self.set_ctrl(ep, local_ctrl(window))
                        .map_err(io::Error::other)
                })
                .and_then(|()| redirect.arm(&reg, ep, window))
        {
            tracing::debug!(error = %e, "local redirect: arming failed; plain splice");
            redirect.forget(&reg);
            let _ = lock(&self.flows).remove(&ep);
            let _ = lock(&self.ctrl).remove(&ep);
            local_ep = None;
        }
        let written = match write_all(&up, &to_up).await {
            Ok(()) => write_all(&down, &to_down).await,
            Err(e) => Err(e),
        }
        .and_then(|()| {
            // Release the hold: the verdict resumes at the next skb once the agent forwarded
            // what it passed meanwhile (nothing, usually: a TLS peer waits for the other side).
            self.set_ctrl(down_cookie, self.flow_ctrl(0, 0))
                .and_then(|()| self.set_ctrl(up_cookie, self.flow_ctrl(0, 0)))
                .map_err(io::Error::other)
        });
        if let Err(e) = written {
            // A peer broke before the flow started; the other learns it from a reset.
            tracing::debug!(error = %e, "writing the replayed bytes failed");
            reset(&down);
            reset(&up);
            self.forget(down_cookie, up_cookie);
            self.routes.release(route_id, 0, 0);
            return Err(Refusal::Abort {
                reason: SpliceRefused::Other(format!("writing the replayed bytes: {e}")),
            });
        }
        let (initial_up, initial_down) = (to_up.len() as u64, to_down.len() as u64);
        let written = Arc::new([Forwarding::new(initial_up), Forwarding::new(initial_down)]);
        self.routes
            .started(route_id, DATAPATH_SOCKMAP, initial_up, initial_down);
        // From now on the flow's bytes show in Prometheus while it runs: these here, the rest
        // through the kernel's route counters.
        self.stats
            .flow_bytes(&route.cluster, initial_up, initial_down);
        // A local flow's endpoint->client bytes are counted in the endpoint socket's side.
        let mut info = match local_ep {
            Some((_, ep)) => flowinfo::describe(&down, &up, ep, route_id, DATAPATH_SOCKMAP_LOCAL),
            None => flowinfo::describe(&down, &up, up_cookie, route_id, DATAPATH_SOCKMAP),
        };
        info.agent_bytes_up = initial_up;
        info.agent_bytes_down = initial_down;
        self.records.track(
            down_cookie,
            info,
            AgentCount {
                bytes: written.clone(),
                counted: (initial_up, initial_down),
                cluster: Some(route.cluster.clone()),
            },
        );
        Ok(SplicedFlow {
            down,
            up,
            down_cookie,
            up_cookie,
            initial: initial_up,
            initial_down,
            started: Instant::now(),
            route_id,
            resume: [
                DirectionState {
                    agent_written: initial_up,
                    ..DirectionState::default()
                },
                DirectionState {
                    agent_written: initial_down,
                    ..DirectionState::default()
                },
            ],
            local: local_ep,
            written,
        })
    }

    /// Watches a spliced flow until both directions ended (FIN forwarded after the data) or one
    /// side broke (both reset), or `drain` turns true (the agent's drain time is over): then both
    /// sides get a FIN once everything already redirected has reached their TCP streams. Removes
    /// the flow's map entries at the end. During a takeover (a hot restart) the flow leaves its
    /// watch instead and goes to the next agent with its map entries intact: the summary then
    /// says [`FlowEnd::HandedOver`].
    pub async fn run(&self, flow: SplicedFlow, mut drain: watch::Receiver<bool>) -> FlowSummary {
        let SplicedFlow {
            down,
            up,
            down_cookie,
            up_cookie,
            initial,
            initial_down,
            started,
            route_id,
            resume,
            local,
            written,
        } = flow;
        // A local flow (the endpoint's sends go through sk_msg) stays with this agent through a
        // hot restart, like a userspace copy: the handoff carries no local-redirect state, so it
        // is neither counted for the takeover nor ever asked to leave its watch.
        let _running = local.is_none().then(|| RunGuard::enter(self));
        let (_never_tx, never_detach) = watch::channel(false);
        let detach = if local.is_some() {
            never_detach
        } else {
            self.detach.subscribe()
        };
        let [mut up_state, mut down_state] = resume;
        let (mut down, mut up) = (down, up);
        let mut bypassed = None;
        let end = loop {
            // The agent opened `up` (its acknowledged bytes count the SYN); the client opened `down`.
            let to_up = Direction::new(
                self,
                (&down, &up),
                down_cookie,
                up_state,
                1,
                &written[0],
                detach.clone(),
            );
            let mut to_down = Direction::new(
                self,
                (&up, &down),
                up_cookie,
                down_state,
                0,
                &written[1],
                detach.clone(),
            );
            if let Some((_, ep)) = local {
                to_down.bypass = Some(ep);
                // sk_msg's limit events carry the endpoint socket's cookie.
                lock(&self.watchers).insert(ep, to_down.wake.clone());
            }
            let drained = async {
                // A dropped sender means nobody will ask this flow to drain.
                if drain.wait_for(|d| *d).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            // The first error ends the flow at once: the other direction may be idle forever (its
            // peer waiting), and the reset is what tells it the stream broke.
            let outcome = tokio::select! {
                result = async { tokio::try_join!(to_up.run(), to_down.run()) } => match result {
                    Ok((Outcome::Ended(_), Outcome::Ended(d))) => {
                        bypassed = Some(d.bypassed);
                        break FlowEnd::Closed;
                    }
                    Ok((u, d)) => Some((u.state(), d.state())),
                    Err(e) => {
                        tracing::debug!(error = %e, "spliced flow broke; resetting both sides");
                        reset(&down);
                        reset(&up);
                        break FlowEnd::Reset;
                    }
                },
                () = drained => None,
            };
            let Some((u, d)) = outcome else {
                // The redirect queues drain into the TCP streams, then the bytes a paused
                // direction still holds on its socket follow them, then both get a FIN: what the
                // kernel accepted so far is delivered, within a second per direction.
                let queues = [
                    (down_cookie, &down, &up, &written[0], 1),
                    (up_cookie, &up, &down, &written[1], 0),
                ];
                if written.iter().any(|w| w.writing.load(Ordering::Relaxed)) {
                    // The drain cut a direction in the middle of writing bytes it had read:
                    // some of them may be in the peer's stream, and which is unknown. A FIN
                    // would close a stream with a hole or a repeat; a reset says it broke.
                    reset(&down);
                    reset(&up);
                    break FlowEnd::Reset;
                }
                for (src_cookie, src, dst, written, dst_syn) in queues {
                    // The endpoint's sk_msg bytes go to the client's stream too.
                    let bypass = local.filter(|_| src_cookie == up_cookie).map(|(_, ep)| ep);
                    let deadline = Instant::now() + Duration::from_secs(1);
                    let agent_written = written.bytes.load(Ordering::Relaxed);
                    while Instant::now() < deadline
                        && matches!(
                            self.redirects_in_tcp(src_cookie, dst, agent_written, dst_syn, bypass),
                            Ok(false)
                        )
                    {
                        tokio::time::sleep(Duration::from_micros(200)).await
                    }
                    // A paused flow stays paused (the agent publishes nothing more), so nothing
                    // is redirected behind these bytes.
                    let moved = tokio::time::timeout_at(deadline.into(), forward_queued(src, dst))
                        .await
                        .unwrap_or(Ok(0))
                        .unwrap_or(0);
                    written.bytes.fetch_add(moved, Ordering::Relaxed);
                }
                for s in [&up, &down] {
                    let _ = socket2::SockRef::from(s).shutdown(Shutdown::Write);
                }
                break FlowEnd::Closed;
            };
            (up_state, down_state) = (u, d);
            let state = FlowState {
                down_cookie,
                up_cookie,
                route_id,
                age_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                up: up_state,
                down: down_state,
            };
            let tx = lock(&self.takeover).tx.clone();
            let Some(tx) = tx else {
                // The takeover ended before this flow got there: keep watching it here.
                continue;
            };
            // Sending cannot fail while `tx` exists (the receiver outlives the takeover); a flow
            // that comes back is watched here again.
            match tx.send(DetachedFlow { down, up, state }) {
                Ok(()) => {
                    lock(&self.watchers).remove(&down_cookie);
                    lock(&self.watchers).remove(&up_cookie);
                    // Its entry stays for the next agent, which counts its bytes from here on.
                    self.records.hand_over(down_cookie);
                    return FlowSummary {
                        end: FlowEnd::HandedOver,
                        bytes_up: 0,
                        bytes_down: 0,
                        copied: 0,
                        live_counted_up: 0,
                        live_counted_down: 0,
                        duration: started.elapsed(),
                    };
                }
                Err(tokio::sync::mpsc::error::SendError(back)) => {
                    tracing::warn!(
                        cookie = down_cookie,
                        "the takeover went away; this agent keeps the flow"
                    );
                    (down, up) = (back.down, back.up);
                }
            }
        };
        if matches!(end, FlowEnd::Closed) {
            // Both FINs went out after every byte: a plain close delivers what is still queued.
            for s in [&down, &up] {
                if let Err(e) = socket2::SockRef::from(s).set_linger(None) {
                    tracing::debug!(error = %e, "clearing SO_LINGER failed; the close resets");
                }
            }
        }
        let (d, mut u) = (self.side(down_cookie), self.side(up_cookie));
        if let (Some(redirect), Some((reg, ep))) = (&self.local, local) {
            // A cleanly closed flow's count was checked against the client's stream at EOF.
            let e = self.side(ep);
            u.redirected_bytes += bypassed.unwrap_or(e.redirected_bytes);
            redirect.forget(&reg);
            let _ = lock(&self.flows).remove(&ep);
            let _ = lock(&self.ctrl).remove(&ep);
            lock(&self.watchers).remove(&ep);
        }
        // What the agent moved itself: the replay, then the passed bytes it forwarded (also
        // those of a flow that broke: they reached the peer).
        let agent = written.agent_bytes();
        let (copied_up, copied_down) = (
            agent.0.saturating_sub(initial),
            agent.1.saturating_sub(initial_down),
        );
        // The publisher handed some of them to the route and Prometheus counters while the flow
        // ran (the replay at the handoff); the rest go now.
        let published = self
            .records
            .untrack(down_cookie)
            .unwrap_or((initial, initial_down));
        self.forget(down_cookie, up_cookie);
        self.routes.release(
            route_id,
            agent.0.saturating_sub(published.0),
            agent.1.saturating_sub(published.1),
        );
        // The verdict added every redirected byte to the route's counters, if it had an id.
        let counted = |redirected| if route_id == NO_ROUTE { 0 } else { redirected };
        FlowSummary {
            end,
            bytes_up: initial + d.redirected_bytes + copied_up,
            bytes_down: initial_down + u.redirected_bytes + copied_down,
            copied: initial + initial_down + copied_up + copied_down,
            live_counted_up: published.0 + counted(d.redirected_bytes),
            live_counted_down: published.1 + counted(u.redirected_bytes),
            duration: started.elapsed(),
        }
    }

    /// Starts a takeover: every live flow leaves its watch at its next idle point and comes out
    /// of the returned channel with its state. Flows keep running in the kernel meanwhile.
    pub fn begin_takeover(&self) -> tokio::sync::mpsc::UnboundedReceiver<DetachedFlow> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut t = lock(&self.takeover);
        t.tx = Some(tx);
        self.detach.send_replace(true);
        rx
    }

    /// Ends the takeover if every flow left (or `force`): returns whether it ended. Flows still
    /// running after a forced end stay with this agent.
    pub fn end_takeover(&self, force: bool) -> bool {
        let mut t = lock(&self.takeover);
        if t.running > 0 && !force {
            return false;
        }
        t.tx = None;
        self.detach.send_replace(false);
        true
    }

    /// The next agent took over: stop consuming the shared event ring (it reads it now) and stop
    /// writing the shared route entries. Flows that stay here finish without flow-control events.
    pub fn retire(&self) {
        self.events_stopped.store(true, Ordering::SeqCst);
        self.routes.freeze();
    }

    /// Takes a flow another agent handed over: checks the cookies against the sockets and
    /// returns it ready for [`Splicer::run`]. Its map entries are already in the (reused) maps.
    pub fn adopt(
        &self,
        down: std::os::fd::OwnedFd,
        up: std::os::fd::OwnedFd,
        state: &FlowState,
    ) -> Result<SplicedFlow, AdoptError> {
        let stream = |fd: std::os::fd::OwnedFd| {
            let std = std::net::TcpStream::from(fd);
            std.set_nonblocking(true).map_err(AdoptError::Register)?;
            TcpStream::from_std(std).map_err(AdoptError::Register)
        };
        let (down, up) = (stream(down)?, stream(up)?);
        for (side, s, expected) in [
            ("client", &down, state.down_cookie),
            ("endpoint", &up, state.up_cookie),
        ] {
            let actual = socket_cookie(s).map_err(AdoptError::Cookie)?;
            if actual != expected {
                return Err(AdoptError::CookieMismatch {
                    side,
                    expected,
                    actual,
                });
            }
        }
        let route_id = self.routes.hold_adopted(state.route_id);
        let written = Arc::new([
            Forwarding::new(state.up.agent_written),
            Forwarding::new(state.down.agent_written),
        ]);
        // The entry the old agent kept current; this agent counts what it moves from now on.
        self.records.follow(
            state.down_cookie,
            route_id,
            AgentCount {
                bytes: written.clone(),
                counted: (state.up.agent_written, state.down.agent_written),
                cluster: self.routes.cluster(route_id),
            },
        );
        let started = Instant::now()
            .checked_sub(Duration::from_millis(state.age_ms))
            .unwrap_or_else(Instant::now);
        Ok(SplicedFlow {
            down,
            up,
            down_cookie: state.down_cookie,
            up_cookie: state.up_cookie,
            // What the agents forwarded of passed bytes is counted as `copied`; the rest of
            // what they wrote is the replay.
            initial: state.up.agent_written.saturating_sub(state.up.copied),
            initial_down: state.down.agent_written.saturating_sub(state.down.copied),
            started,
            route_id,
            // Adopted directions start hot: a limit event may have gone to the old agent.
            resume: [
                DirectionState {
                    hot: true,
                    ..state.up
                },
                DirectionState {
                    hot: true,
                    ..state.down
                },
            ],
            // Local flows stay with the agent that spliced them (see `Splicer::run`).
            local: None,
            written,
        })
    }

    /// Whether every byte redirected from `src_cookie`'s socket, plus the `agent_written` bytes,
    /// has entered `dst`'s TCP send stream (`dst_syn`: 1 if `dst` sent the SYN, which its acked
    /// bytes count). Stream bytes are read before the redirected count: both only grow, so a
    /// count read later can only make the answer "not yet", never a premature "yes".
    fn redirects_in_tcp(
        &self,
        src_cookie: u64,
        dst: &TcpStream,
        agent_written: u64,
        dst_syn: u64,
        bypass: Option<u64>,
    ) -> io::Result<bool> {
        let Some(in_tcp) = tcp_stream_bytes(dst)?.map(StreamBytes::total) else {
            return Ok(false);
        };
        let side = self.side(src_cookie);
        let bypassed = bypass.map_or(0, |ep| self.side(ep).redirected_bytes);
        Ok(in_tcp.saturating_sub(dst_syn) >= side.redirected_bytes + agent_written + bypassed)
    }

    /// The kernel's view of one side (zeros if the entry is gone).
    fn side(&self, cookie: u64) -> FlowSide {
        lock(&self.flows).get(&cookie, 0).unwrap_or_default()
    }

    /// Exercises the map operations flows make (a lookup, an insert and a removal on the control
    /// map, under key 0: no socket has cookie 0, so the verdict never reads it). Used to prove the
    /// agent still may use its maps before it drops the capabilities that loaded them.
    pub fn probe_map_access(&self) -> Result<(), MapError> {
        let mut ctrl = lock(&self.ctrl);
        match ctrl.get(&0, 0) {
            Ok(_) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
        ctrl.insert(0, FlowCtrl::default(), 0)?;
        ctrl.remove(&0)
    }

    fn set_ctrl(&self, cookie: u64, ctrl: FlowCtrl) -> Result<(), MapError> {
        lock(&self.ctrl).insert(cookie, ctrl, 0)
    }

    /// The control entry of an armed direction whose peer has taken `taken` bytes of what was
    /// redirected (acknowledged them, or, right after the agent forwarded, everything redirected),
    /// and whose passed bytes the agent forwarded up to `forwarded`.
    fn flow_ctrl(&self, taken: u64, forwarded: u64) -> FlowCtrl {
        FlowCtrl {
            armed: 1,
            redirect_limit: taken + self.budget,
            notify_at: taken + self.budget / 2,
            forwarded,
        }
    }

    /// Removes a flow's entries (the SockHash entries go with the sockets when they close).
    fn forget(&self, down_cookie: u64, up_cookie: u64) {
        for cookie in [down_cookie, up_cookie] {
            let _ = lock(&self.flows).remove(&cookie);
            let _ = lock(&self.ctrl).remove(&cookie);
            lock(&self.watchers).remove(&cookie);
        }
    }
}

/// The control entry of a local endpoint socket: `sk_msg` redirects up to `limit`.
fn local_ctrl(limit: u64) -> FlowCtrl {
    FlowCtrl {
        armed: 1,
        redirect_limit: limit,
        notify_at: limit,
        forwarded: 0,
    }
}

fn side(peer_cookie: u64, route_id: u32, direction: u32) -> FlowSide {
    FlowSide {
        peer_cookie,
        route_id,
        direction,
        ..FlowSide::default()
    }
}

/// `FlowCtrl::forwarded` while a flow's replayed bytes are being written: never equal to a
/// passed-byte count, so a held flow does not resume before the agent releases it.
const REPLAY_PENDING: u64 = u64::MAX;

/// A spliced socket's side, paused from the start (see the handoff); not counted as a pause.
fn held_side(peer_cookie: u64, route_id: u32, direction: u32) -> FlowSide {
    FlowSide {
        paused: 1,
        ..side(peer_cookie, route_id, direction)
    }
}

/// One direction of a spliced flow: bytes arriving on `src` go to `dst`.
struct Direction<'a> {
    splicer: &'a Splicer,
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_cookie: u64,
    /// Bytes the agent moved itself ([`Direction::agent_written`]), shared with
    /// [`Splicer::run`] (its drain reads it).
    published: &'a Forwarding,
    /// 1 when `dst` is the socket the agent connected: its `tcpi_bytes_acked` counts the SYN.
    dst_syn: u64,
    wake: Arc<Notify>,
    /// The endpoint socket's cookie when the local redirect carries this direction's bytes from
    /// the endpoint straight into `dst` (`src` brings the FIN or reset, and the bytes after a
    /// fallback): `dst`'s stream holds those bytes besides what went through `src`.
    bypass: Option<u64>,
    /// Passed bytes the agent forwarded so far (`FlowCtrl::forwarded`).
    copied: u64,
    /// `copied` as last written to the control map.
    published_forwarded: u64,
    /// The verdict's pause count at the last look, to count new pauses.
    pauses_seen: u64,
    /// Already forwarded its FIN (in this agent or the one before).
    finished: bool,
    /// Start hot (measure at once).
    hot: bool,
    /// Turns true when the flow should leave its watch for a takeover.
    detach: watch::Receiver<bool>,
}

/// What a direction has forwarded itself, shared with [`Splicer::run`]: its drain may cut the
/// direction at any await point and must know what is in the peer's stream.
struct Forwarding {
    /// The direction's `agent_written`.
    bytes: AtomicU64,
    /// Between taking bytes off the source (read, or peek) and counting them as written: if the
    /// watch is cut here, part of them may be in the peer's stream.
    writing: AtomicBool,
}

impl Forwarding {
    fn new(bytes: u64) -> Self {
        Self {
            bytes: AtomicU64::new(bytes),
            writing: AtomicBool::new(false),
        }
    }
}

/// A spliced flow's two directions (up, down).
impl AgentBytes for [Forwarding; 2] {
    fn agent_bytes(&self) -> (u64, u64) {
        (
            self[0].bytes.load(Ordering::Relaxed),
            self[1].bytes.load(Ordering::Relaxed),
        )
    }
}

/// How a direction's watch ended.
enum Outcome {
    Ended(DirectionEnd),
    /// Left for a takeover; the state to resume from.
    Detached(DirectionState),
}

impl Outcome {
    fn state(self) -> DirectionState {
        match self {
            Self::Ended(end) => DirectionState {
                finished: true,
                copied: end.copied,
                ..DirectionState::default()
            },
            Self::Detached(state) => state,
        }
    }
}

/// Bytes read from a paused socket per read call.
const FORWARD_CHUNK: usize = 256 * 1024;

/// The largest peek buffer. A socket holding more (receive buffers autotune up to
/// `tcp_rmem[2]`, 6 MiB by default) is forwarded in pieces, and may then stay paused for as long
/// as its sender keeps up with the agent.
const MAX_PEEK: usize = 16 * 1024 * 1024;

impl<'a> Direction<'a> {
    fn new(
        splicer: &'a Splicer,
        (src, dst): (&'a TcpStream, &'a TcpStream),
        src_cookie: u64,
        state: DirectionState,
        dst_syn: u64,
        published: &'a Forwarding,
        detach: watch::Receiver<bool>,
    ) -> Self {
        let wake = Arc::new(Notify::new());
        if !state.finished {
            lock(&splicer.watchers).insert(src_cookie, wake.clone());
        }
        // (A finished direction's state no longer carries its count; nothing reads it.)
        debug_assert!(
            state.finished || published.bytes.load(Ordering::Relaxed) == state.agent_written,
            "the run's shared count starts where the direction's state does"
        );
        Self {
            splicer,
            src,
            dst,
            src_cookie,
            published,
            dst_syn,
            wake,
            bypass: None,
            copied: state.copied,
            published_forwarded: state.copied,
            pauses_seen: 0,
            finished: state.finished,
            hot: state.hot,
            detach,
        }
    }

    async fn run(mut self) -> io::Result<Outcome> {
        if self.finished {
            return Ok(Outcome::Ended(DirectionEnd {
                copied: self.copied,
                bypassed: 0,
            }));
        }
        self.pauses_seen = self.splicer.side(self.src_cookie).pauses;
        let result = self.watch().await;
        // Pauses since the last tick (a flow can pause and end between two).
        self.count_pauses(&self.splicer.side(self.src_cookie));
        result
    }

    /// Bytes the agent moved itself: read from `src` and written to `dst` (the replayed
    /// ClientHello or drained bytes, and the passed bytes it forwarded). The same count on both
    /// sides.
    fn agent_written(&self) -> u64 {
        self.published.bytes.load(Ordering::Relaxed)
    }

    fn detached_state(&self) -> DirectionState {
        DirectionState {
            finished: false,
            agent_written: self.agent_written(),
            copied: self.copied,
            hot: false,
        }
    }

    async fn watch(&mut self) -> io::Result<Outcome> {
        let mut buf: Vec<u8> = Vec::new();
        // While hot, the redirect queue is measured every tick; `last` is (redirected, when it last
        // moved) to notice the direction going quiet.
        let mut hot = self.hot;
        let mut last = (0u64, Instant::now());
        let mut detach = self.detach.clone();
        loop {
            let wake = self.wake.clone();
            let tick = async {
                if hot {
                    tokio::time::sleep(HOT_TICK).await
                } else {
                    wake.notified().await
                }
            };
            tokio::select! {
                r = self.src.readable() => r?,
                _ = tick => {
                    hot = self.regulate(&mut last)?;
                    if !hot {
                        // Only a busy direction keeps a buffer.
                        buf = Vec::new();
                    }
                    continue;
                }
                // An idle point: nothing read and not written yet, so the next agent can resume
                // exactly here.
                Ok(_) = detach.wait_for(|d| *d) => {
                    return Ok(Outcome::Detached(self.detached_state()));
                }
            }
            // Read interest only: a spliced socket becomes readable on EOF or an error, or with
            // bytes the verdict passed (a paused flow, or one that was never armed).

            loop {
                // Two ways to forward. While the peer is slow (its send queue holds a good part
                // of a budget), read and forward in chunks: the flow stays paused anyway, and
                // the agent copies at the peer's pace like any proxy. Once the peer has room,
                // try to resume: peek everything queued, write it, publish, then consume. While
                // the bytes are only peeked they stay charged to the socket, its window stays
                // closed and the sender waits, so by the time the agent has forwarded it all
                // nothing new was passed behind it and the verdict resumes at the next skb.
                // Reading first (or a part) reopens the window before the write, and under a
                // fast sender the agent chases new passed bytes for as long as the sender keeps
                // up (seen: a bulk flow copied by the agent from its first pause to its end).
                let outq = send_queue(self.dst)?;
                let resume = outq < self.splicer.budget / 4;
                if !resume && outq >= self.splicer.budget {
                    // The send buffer is sized for the redirect (four budgets): a copy that
                    // filled it would park that much for a slow receiver. Keep the copy's queue
                    // to about a budget, as the redirect's is.
                    tokio::time::sleep(HOT_TICK).await;
                    continue;
                }
                let got = if resume {
                    let queued = inq(self.src).unwrap_or(0).clamp(FORWARD_CHUNK, MAX_PEEK);
                    buf.resize(queued, 0);
                    self.src
                        .try_io(Interest::READABLE, || peek(self.src, &mut buf))
                } else {
                    buf.resize(FORWARD_CHUNK, 0);
                    self.src.try_read(&mut buf)
                };
                match got {
                    Ok(0) if self.splicer.side(self.src_cookie).passed_bytes > self.copied => {
                        // EOF on an empty queue, but the verdict passed bytes that have not
                        // reached it: on a socket whose psock also queues bytes redirected *to*
                        // it, passed skbs wait behind those (the kernel keeps them in order) and
                        // arrive later. Ask again shortly (readiness stays set at EOF).
                        tokio::time::sleep(HOT_TICK).await;
                        continue;
                    }
                    Ok(0) => {
                        let bypassed = self.finish().await?;
                        return Ok(Outcome::Ended(DirectionEnd {
                            copied: self.copied,
                            bypassed,
                        }));
                    }
                    Ok(n) => {
                        // Passed bytes come after everything redirected so far, so they go out
                        // only once the redirect queue drained into the peer's TCP stream.
                        self.published.writing.store(true, Ordering::Relaxed);
                        self.wait_redirects_in_tcp().await?;
                        write_all(self.dst, &buf[..n]).await?;
                        self.published.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        self.copied += n as u64;
                        if resume {
                            // In the peer's stream: skbs arriving from now on may be
                            // redirected (they come after these bytes), before or after the
                            // consume below.
                            self.publish_forwarded()?;
                            consume(self.src, &mut buf[..n])?;
                        }
                        self.published.writing.store(false, Ordering::Relaxed);
                        hot = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Caught up: every byte passed so far is in the peer's stream.
                        self.publish_forwarded()?;
                        buf.truncate(FORWARD_CHUNK);
                        buf.shrink_to_fit();
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Tells the verdict how many passed bytes are in the peer's stream, with a limit a budget
    /// past what was redirected (which is all in the peer's stream too: the agent wrote after it).
    fn publish_forwarded(&mut self) -> io::Result<()> {
        if self.copied == self.published_forwarded {
            return Ok(());
        }
        let side = self.splicer.side(self.src_cookie);
        let ctrl = self.splicer.flow_ctrl(side.redirected_bytes, self.copied);
        self.splicer
            .set_ctrl(self.src_cookie, ctrl)
            .map_err(io::Error::other)?;
        self.published_forwarded = self.copied;
        Ok(())
    }

    /// Adds the verdict's new pauses of this direction to the agent's counter.
    fn count_pauses(&mut self, side: &FlowSide) {
        if side.pauses > self.pauses_seen {
            self.splicer
                .stats
                .splice_paused(side.pauses - self.pauses_seen);
            self.pauses_seen = side.pauses;
        }
    }

    /// One flow-control step: measure the redirect queue, check the accounting, move the limit.
    /// Returns whether the direction is still hot.
    fn regulate(&mut self, last: &mut (u64, Instant)) -> io::Result<bool> {
        if let Some(ep) = self.bypass {
            let e = self.splicer.side(ep);
            if e.passed_bytes == 0 {
                // sk_msg still redirects: keep its limit a window past what the client acked.
                let acked = tcp_bytes_acked(self.dst)?.saturating_sub(self.agent_written());
                let window = super::local::WINDOW.min(self.splicer.budget);
                self.splicer
                    .set_ctrl(ep, local_ctrl(acked + window))
                    .map_err(io::Error::other)?;
                let now = Instant::now();
                if e.redirected_bytes != last.0 {
                    *last = (e.redirected_bytes, now);
                }
                return Ok(now.duration_since(last.1) < COOL_AFTER);
            }
        }
        // Stream bytes first, redirected bytes second: both only grow, and the kernel keeps
        // redirecting and sending in between, so this order can only overstate what was
        // redirected, never flag bytes that are simply newer than the first reading.
        let Some(stream) = self.dst_stream_bytes()? else {
            // The stream is moving too fast to read consistently: measure at the next tick.
            return Ok(true);
        };
        let in_tcp = stream.total();
        let side = self.splicer.side(self.src_cookie);
        let bypassed = self.bypassed();
        self.check_not_ahead(&side, in_tcp, bypassed)?;
        // Redirected first, received second (received only grows): more redirected than received
        // means the kernel handed the same bytes to the verdict twice.
        let received = tcp_bytes_received(self.src)?;
        if side.redirected_bytes + self.agent_written() > received {
            return Err(self.integrity_error(format!(
                "{} bytes redirected or moved but only {received} received",
                side.redirected_bytes + self.agent_written()
            )));
        }
        self.count_pauses(&side);
        let taken = in_tcp.saturating_sub(self.agent_written() + bypassed);
        let queued = side.redirected_bytes.saturating_sub(taken);
        self.splicer.stats.redirect_queue_measured(queued);
        // The limit counts from what the peer acknowledged, not from what entered its send
        // queue: redirect queue plus unacknowledged bytes stay within about a budget, which is
        // what keeps the send buffer sized at setup writable. (The agent's own bytes count as
        // not yet taken until acknowledged: that only lowers the limit.)
        let acked_taken = stream.acked.saturating_sub(self.agent_written() + bypassed);
        let ctrl = self
            .splicer
            .flow_ctrl(acked_taken, self.published_forwarded);
        self.splicer
            .set_ctrl(self.src_cookie, ctrl)
            .map_err(io::Error::other)?;
        let now = Instant::now();
        let moved = side.redirected_bytes + side.passed_bytes;
        if moved != last.0 {
            *last = (moved, now);
        }
        // Ticks only while the queue is deep: a shallow one is followed by the verdict's event at
        // `notify_at`, which comes again at the next skb if the queue is still half a budget deep
        // then. Ticking every flow that merely moves (an rpc flow always does) cost a wake-up per
        // direction per millisecond on the CPU the splice's kernel worker needs.
        let deep = queued > self.splicer.budget / 4;
        Ok(side.paused != 0 || (deep && now.duration_since(last.1) < COOL_AFTER))
    }

    /// Every byte in `dst`'s TCP stream came from the redirect or from the agent, so more than
    /// that means the kernel sent something twice. On 6.18 we saw one loopback skb (65483 bytes)
    /// arrive twice in about one of 16 slow-receiver runs, with no byte through userspace. Such a
    /// stream is broken: reset it (the caller resets both sides) rather than let it go on silently.
    fn check_not_ahead(&self, side: &FlowSide, in_tcp: u64, bypassed: u64) -> io::Result<()> {
        let expected_max = side.redirected_bytes + self.agent_written() + bypassed;
        if in_tcp > expected_max {
            return Err(self.integrity_error(format!(
                "the peer's TCP stream holds {in_tcp} bytes but only {expected_max} were redirected or \
                 written into it"
            )));
        }
        Ok(())
    }

    /// At EOF: what `src` received went exactly once into `dst`'s stream. Returns the bytes that
    /// reached `dst`'s stream past `src` (local redirect; 0 otherwise).
    fn check_complete(&self) -> io::Result<u64> {
        let side = self.splicer.side(self.src_cookie);
        let moved = side.redirected_bytes + self.agent_written();
        // At EOF the FIN has been received, and counts as one byte.
        let received = tcp_bytes_received(self.src)?.saturating_sub(1);
        // At EOF the stream is quiet but ACKs of its tail may still arrive: ask until a
        // consistent reading comes (each ask is up to STREAM_READ_ATTEMPTS pairs of reads).
        let mut in_tcp = None;
        for _ in 0..STREAM_READ_ATTEMPTS {
            in_tcp = self.dst_stream_bytes()?.map(StreamBytes::total);
            if in_tcp.is_some() {
                break;
            }
        }
        let Some(in_tcp) = in_tcp else {
            return Err(io::Error::other(
                "the peer's send stream kept moving at EOF; cannot confirm the spliced bytes",
            ));
        };
        let bypassed = self.bypassed();
        if received != moved || in_tcp != moved + bypassed {
            return Err(self.integrity_error(format!(
                "{received} bytes received, {} redirected + {} moved by the agent, {in_tcp} in the \
                 peer's stream ({bypassed} sent there directly by a local endpoint)",
                side.redirected_bytes,
                self.agent_written()
            )));
        }
        Ok(bypassed)
    }

    /// Bytes the local redirect pushed into `dst` from the endpoint (0 without it). Read after
    /// `dst`'s stream: the count only grows, so it can only overstate what the stream should hold.
    fn bypassed(&self) -> u64 {
        self.bypass
            .map_or(0, |ep| self.splicer.side(ep).redirected_bytes)
    }

    /// Data bytes of `dst`'s TCP send stream, without the SYN (valid until the agent sends its
    /// FIN); `None` when no consistent reading could be taken (see [`tcp_stream_bytes`]).
    fn dst_stream_bytes(&self) -> io::Result<Option<StreamBytes>> {
        Ok(tcp_stream_bytes(self.dst)?.map(|b| StreamBytes {
            acked: b.acked.saturating_sub(self.dst_syn),
            ..b
        }))
    }

    fn integrity_error(&self, detail: String) -> io::Error {
        self.splicer.stats.splice_integrity_error();
        tracing::error!(
            cookie = self.src_cookie,
            "spliced stream integrity check failed, resetting the flow: {detail}"
        );
        io::Error::new(io::ErrorKind::InvalidData, detail)
    }

    /// Resolves once every byte redirected from `src` has entered `dst`'s TCP stream (so a write
    /// by the agent, or a FIN, cannot overtake it).
    async fn wait_redirects_in_tcp(&self) -> io::Result<()> {
        let mut delay = Duration::from_micros(50);
        loop {
            let done = self.splicer.redirects_in_tcp(
                self.src_cookie,
                self.dst,
                self.agent_written(),
                self.dst_syn,
                self.bypass,
            )?;
            if done {
                return Ok(());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(5));
        }
    }

    /// EOF on `src`: forward the FIN once every byte before it went through the verdict and
    /// reached `dst`'s TCP stream.
    async fn finish(&self) -> io::Result<u64> {
        // Every data byte `src` received is redirected or was moved by the agent; the FIN counts
        // one. Until the two agree the kernel is still working through the receive queue.
        let deadline = Instant::now() + FIN_PROCESSED_WAIT;
        loop {
            let side = self.splicer.side(self.src_cookie);
            let moved = side.redirected_bytes + self.agent_written();
            let received = tcp_bytes_received(self.src)?.saturating_sub(1);
            if moved == received {
                break;
            }
            if moved > received {
                return Err(self.integrity_error(format!(
                    "{moved} bytes went through the verdict or the agent but only {received} were received"
                )));
            }
            if Instant::now() >= deadline {
                return Err(self.integrity_error(format!(
                    "{} of {received} received bytes still not through the verdict after {FIN_PROCESSED_WAIT:?}",
                    received - moved
                )));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        self.wait_redirects_in_tcp().await?;
        let bypassed = self.check_complete()?;
        match socket2::SockRef::from(self.dst).shutdown(Shutdown::Write) {
            Ok(()) => Ok(bypassed),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(bypassed),
            Err(e) => Err(e),
        }
    }
}

/// Data bytes a socket's TCP has received (not counting SYN/FIN).
fn tcp_bytes_received(stream: &TcpStream) -> io::Result<u64> {
    let info: libc::tcp_info = sockopt::get(stream, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok(info.tcpi_bytes_received)
}

/// The `SO_SNDBUFFORCE` value of a spliced socket: twice the budget, which the kernel doubles.
fn spliced_sndbuf(budget: u64) -> libc::c_int {
    libc::c_int::try_from(budget.saturating_mul(2)).unwrap_or(libc::c_int::MAX / 2)
}

/// Bytes in `stream`'s send queue, unsent or unacknowledged (`SIOCOUTQ`).
fn send_queue(stream: &TcpStream) -> io::Result<u64> {
    Ok(ioctl_int(stream, libc::TIOCOUTQ)?.max(0) as u64)
}

/// Fixes the send buffer (CAP_NET_ADMIN: not capped by `net.core.wmem_max`).
fn set_sndbuf(stream: &TcpStream, bytes: libc::c_int) -> io::Result<()> {
    sockopt::set_int(stream, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes)
}

fn set_rcvlowat(stream: &TcpStream, bytes: libc::c_int) -> io::Result<()> {
    sockopt::set_int(stream, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// Bytes queued on `stream` for reading (`FIONREAD`): on a spliced socket, what the verdict
/// passed and nobody read yet.
fn inq(stream: &TcpStream) -> io::Result<usize> {
    Ok(usize::try_from(ioctl_int(stream, libc::FIONREAD)?).unwrap_or(0))
}

/// A socket ioctl that reports one int (`FIONREAD`, `SIOCOUTQ`).
fn ioctl_int(stream: &TcpStream, request: libc::c_ulong) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    // SAFETY: these requests write one int.
    if unsafe { libc::ioctl(stream.as_raw_fd(), request, &mut value) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Reads up to `buf.len()` bytes from `stream` without consuming them (`MSG_PEEK`, non-blocking).
fn peek(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(stream, buf, libc::MSG_PEEK | libc::MSG_DONTWAIT)
}

/// Reads up to `buf.len()` bytes from `stream`, non-blocking, always asking the kernel.
fn recv_nonblocking(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(stream, buf, libc::MSG_DONTWAIT)
}

fn recv_flags(stream: &TcpStream, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: recv writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Consumes exactly `buf.len()` bytes that [`peek`] returned (they are queued: a read of them
/// cannot block or come up short, unless the socket broke).
fn consume(stream: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match stream.try_read(&mut buf[done..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peeked bytes vanished from the socket",
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies what is queued on `src` to `dst` until `src` has nothing more (or EOF); returns the
/// bytes moved. For a flow's last moments (the drain), where the agent forwards what a paused
/// direction still holds.
async fn forward_queued(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; FORWARD_CHUNK];
    let mut moved = 0u64;
    loop {
        // Asks the kernel each time, as `drain_queued` does: a WouldBlock from tokio's cached
        // readiness would end the flow with a FIN ahead of bytes still queued.
        match recv_nonblocking(src, &mut buf) {
            Ok(0) => return Ok(moved),
            Ok(n) => {
                write_all(dst, &buf[..n]).await?;
                moved += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(moved),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Most bytes the handoff reads off a socket before giving up on splicing it.
const MAX_EARLY_BYTES: usize = 256 * 1024;

/// Reads everything queued on `stream` into `out`, until the queue is empty.
fn drain_queued(stream: &TcpStream, out: &mut Vec<u8>) -> Result<(), SpliceRefused> {
    let mut buf = [0u8; 16 * 1024];
    let start = out.len();
    loop {
        // A plain non-blocking recv, not `try_read`: tokio answers WouldBlock from its cached
        // readiness without asking the kernel once a read saw the queue empty, and bytes that
        // came since (or the rest of an skb a read took only in part) would be left behind.
        match recv_nonblocking(stream, &mut buf) {
            Ok(0) => return Err(SpliceRefused::PeerClosed),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() - start > MAX_EARLY_BYTES {
                    return Err(SpliceRefused::EarlyData(MAX_EARLY_BYTES));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SpliceRefused::Other(format!("reading queued bytes: {e}"))),
        }
    }
}

/// `TCP_CLOSE` from the kernel's tcp_states.h (not exported by libc).
const TCP_CLOSE: u8 = 7;

/// Sequence space that entered a socket's TCP send stream: acknowledged plus still queued
/// (SIOCOUTQ). The redirect queue sits in front of it, outside TCP's accounting. On a socket that
/// sent the SYN this includes it (one byte); callers subtract it.
///
/// The two figures come from two syscalls: an ACK that lands between them moves bytes from "queued"
/// to "acknowledged" after the acknowledged count was read, and the sum comes out short by what it
/// acknowledged (a soak saw a finished bulk upload reset for being 766 bytes short this way). So the
/// acknowledged count is read again after SIOCOUTQ and the pair is used only when it did not move.
/// `None` when ACKs kept arriving between every pair of reads (the stream is moving; ask again).
fn tcp_stream_bytes(stream: &TcpStream) -> io::Result<Option<StreamBytes>> {
    let mut acked = tcp_bytes_acked(stream)?;
    for _ in 0..STREAM_READ_ATTEMPTS {
        let queued = send_queue(stream)?;
        let again = tcp_bytes_acked(stream)?;
        if again == acked {
            return Ok(Some(StreamBytes { acked, queued }));
        }
        acked = again;
    }
    Ok(None)
}

/// One consistent reading of a TCP send stream (see [`tcp_stream_bytes`]).
#[derive(Clone, Copy, Debug)]
struct StreamBytes {
    /// Acknowledged by the peer (`tcpi_bytes_acked`).
    acked: u64,
    /// Still in the send queue, unsent or unacknowledged (SIOCOUTQ).
    queued: u64,
}

impl StreamBytes {
    /// Everything that entered the stream.
    fn total(self) -> u64 {
        self.acked + self.queued
    }
}

/// How many times [`tcp_stream_bytes`] tries for a pair of reads no ACK fell between.
const STREAM_READ_ATTEMPTS: usize = 16;

/// `tcpi_bytes_acked`, or an error if the socket is closed (its counters no longer describe a
/// stream the redirect can reach).
fn tcp_bytes_acked(stream: &TcpStream) -> io::Result<u64> {
    let info: libc::tcp_info = sockopt::get(stream, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    if info.tcpi_state == TCP_CLOSE {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "peer socket closed while spliced bytes were in flight",
        ));
    }
    Ok(info.tcpi_bytes_acked)
}

fn socket_cookie(stream: &TcpStream) -> io::Result<u64> {
    sockopt::get(stream, libc::SOL_SOCKET, libc::SO_COOKIE)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a map handle cannot leave the handle inconsistent (it is an fd).
    m.lock().unwrap_or_else(|p| p.into_inner())
}
