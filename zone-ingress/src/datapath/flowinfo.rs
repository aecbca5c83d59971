//! The pinned flow map `ZI_FLOW_INFO`: one entry per routed flow (spliced or copied), keyed by the
//! client socket's cookie, so `zone-ingress maps dump flows` can show every live flow with its
//! addresses, route, bytes, age and datapath, even after the agent died.
//!
//! The entry holds the bytes the agent moved itself: all of a userspace flow's, and a spliced
//! flow's replayed ClientHello plus what it forwarded while the flow was paused; the kernel's
//! count of a spliced flow is in its `ZI_FLOWS` entries, which a reader adds. The flow's task bumps
//! shared counters ([`AgentBytes`]) and one task ([`FlowRecords::publish`], every
//! [`PUBLISH_EVERY`]) rewrites the entries of flows that moved bytes and hands the new bytes to
//! the route and Prometheus counters, so those grow while a flow runs, not only when it ends. A
//! flow's entry is deleted when it ends.

use std::collections::HashMap as StdHashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aya::maps::{HashMap, MapData};
use tokio::net::TcpStream;
use zone_ingress_common::{FlowInfo, SockAddr};

use super::userspace::Progress;

/// How often the entries of live flows get their byte counts.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Bytes the agent itself has moved for a live flow so far, (client -> endpoint, endpoint ->
/// client). Read by the publisher; only ever grows.
pub trait AgentBytes: Send + Sync {
    fn agent_bytes(&self) -> (u64, u64);
}

impl AgentBytes for Progress {
    fn agent_bytes(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

/// What the publisher counts of a live flow.
pub struct AgentCount {
    pub bytes: Arc<dyn AgentBytes>,
    /// Of `bytes`, those already in the route and Prometheus counters.
    pub counted: (u64, u64),
    /// The flow's cluster, for the Prometheus counters (`None`: not known to this agent).
    pub cluster: Option<Arc<str>>,
}

/// A live flow the publisher follows.
struct Tracked {
    /// Its entry as last written; `None` when it could not be read (then only counted).
    info: Option<FlowInfo>,
    route_id: u32,
    count: AgentCount,
}

/// Where the publisher hands a flow's new agent bytes: (route id, cluster, up, down).
pub type CountSink<'a> = dyn FnMut(u32, Option<&str>, u64, u64) + 'a;

pub struct FlowRecords {
    map: Mutex<HashMap<MapData, u64, FlowInfo>>,
    /// Live flows: client cookie -> what the publisher needs. Locked before `map`, and held while
    /// an entry is written or deleted, so the publisher can never write back the entry of a flow
    /// that just ended, nor count bytes its end counts too.
    live: Mutex<StdHashMap<u64, Tracked>>,
}

impl std::fmt::Debug for FlowRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowRecords").finish_non_exhaustive()
    }
}

/// The entry of a new flow: addresses from the two sockets, start time now.
pub fn describe(
    down: &TcpStream,
    up: &TcpStream,
    up_cookie: u64,
    route_id: u32,
    datapath: u32,
) -> FlowInfo {
    let addr = |a: std::io::Result<std::net::SocketAddr>| {
        a.map(SockAddr::from_socket_addr).unwrap_or_default()
    };
    FlowInfo {
        up_cookie,
        started_unix_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        route_id,
        datapath,
        client: addr(down.peer_addr()),
        ingress: addr(down.local_addr()),
        local: addr(up.local_addr()),
        upstream: addr(up.peer_addr()),
        ..FlowInfo::default()
    }
}

impl FlowRecords {
    pub fn new(map: HashMap<MapData, u64, FlowInfo>) -> Arc<Self> {
        Arc::new(Self {
            map: Mutex::new(map),
            live: Mutex::new(StdHashMap::new()),
        })
    }

    fn write(&self, cookie: u64, info: &FlowInfo) {
        if let Err(e) = lock(&self.map).insert(cookie, info, 0) {
            // Full map or no memory: the flow runs on, only the dump misses it.
            tracing::debug!(cookie, error = %e, "cannot record the flow in the flow map");
        }
    }

    /// Writes a flow's entry and follows it: the publisher keeps its bytes current.
    pub fn track(&self, cookie: u64, info: FlowInfo, count: AgentCount) {
        let mut live = lock(&self.live);
        self.write(cookie, &info);
        let route_id = info.route_id;
        live.insert(
            cookie,
            Tracked {
                info: Some(info),
                route_id,
                count,
            },
        );
    }

    /// Follows a flow whose entry is already in the map (written by the agent before this one).
    pub fn follow(&self, cookie: u64, route_id: u32, count: AgentCount) {
        let mut live = lock(&self.live);
        let info = lock(&self.map).get(&cookie, 0).ok();
        live.insert(
            cookie,
            Tracked {
                info,
                route_id,
                count,
            },
        );
    }

    /// A flow ended: its entry goes. Returns its agent bytes already counted (`None` if it was
    /// not followed); the caller counts the rest.
    pub fn untrack(&self, cookie: u64) -> Option<(u64, u64)> {
        let mut live = lock(&self.live);
        let tracked = live.remove(&cookie);
        let _ = lock(&self.map).remove(&cookie);
        tracked.map(|t| t.count.counted)
    }

    /// A flow went to another agent: its entry stays, with its bytes as of now, and this agent
    /// stops following it (the next one counts its bytes from there).
    pub fn hand_over(&self, cookie: u64) {
        let mut live = lock(&self.live);
        if let Some(mut tracked) = live.remove(&cookie)
            && let Some(info) = tracked.info.as_mut()
        {
            (info.agent_bytes_up, info.agent_bytes_down) = tracked.count.bytes.agent_bytes();
            self.write(cookie, info);
        }
    }

    /// Rewrites the entries of flows that moved bytes since the last time and hands their new
    /// bytes to `sink` (before the entry is written: a reader that sees the entry's bytes sees
    /// them in the counters too).
    pub fn publish(&self, sink: &mut CountSink<'_>) {
        let mut live = lock(&self.live);
        for (cookie, t) in live.iter_mut() {
            let c = &mut t.count;
            let (up, down) = c.bytes.agent_bytes();
            let (new_up, new_down) = (
                up.saturating_sub(c.counted.0),
                down.saturating_sub(c.counted.1),
            );
            if new_up > 0 || new_down > 0 {
                sink(t.route_id, c.cluster.as_deref(), new_up, new_down);
                c.counted = (c.counted.0.max(up), c.counted.1.max(down));
            }
            if let Some(info) = t.info.as_mut()
                && (up, down) != (info.agent_bytes_up, info.agent_bytes_down)
            {
                (info.agent_bytes_up, info.agent_bytes_down) = (up, down);
                self.write(*cookie, info);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded state is a map handle (an fd) and plain values: consistent after a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
