//! The pinned flow map `ZI_FLOW_INFO`: one entry per routed flow (spliced or copied), keyed by the
//! client socket's cookie, so `zone-ingress maps dump flows` can show every live flow with its
//! addresses, route, bytes, age and datapath, even after the agent died.
//!
//! Spliced flows: the entry holds the bytes the agent moved itself (the replayed ClientHello); the
//! kernel's count is in the flow's `ZI_FLOWS` entries, which a reader adds. Userspace flows: the
//! copy bumps shared counters and one task rewrites the entries of flows that moved bytes, once a
//! second ([`PUBLISH_EVERY`]); a flow's entry is deleted when it ends.

use std::collections::HashMap as StdHashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aya::maps::{HashMap, MapData};
use tokio::net::TcpStream;
use zone_ingress_common::{FlowInfo, SockAddr};

use super::userspace::Progress;

/// How often the entries of userspace flows get their byte counts.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

pub struct FlowRecords {
    map: Mutex<HashMap<MapData, u64, FlowInfo>>,
    /// Live userspace flows: client cookie -> their entry and the copy's counters. Locked before
    /// `map`, and held while an entry is written or deleted, so the publisher can never write back
    /// the entry of a flow that just ended.
    userspace: Mutex<StdHashMap<u64, (FlowInfo, Arc<Progress>)>>,
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
        let records = Arc::new(Self {
            map: Mutex::new(map),
            userspace: Mutex::new(StdHashMap::new()),
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(publish(Arc::downgrade(&records)));
        }
        records
    }

    fn write(&self, cookie: u64, info: &FlowInfo) {
        if let Err(e) = lock(&self.map).insert(cookie, info, 0) {
            // Full map or no memory: the flow runs on, only the dump misses it.
            tracing::debug!(cookie, error = %e, "cannot record the flow in the flow map");
        }
    }

    /// Records a spliced flow.
    pub fn insert(&self, cookie: u64, info: &FlowInfo) {
        self.write(cookie, info);
    }

    /// Deletes a spliced flow's entry.
    pub fn remove(&self, cookie: u64) {
        let _ = lock(&self.map).remove(&cookie);
    }

    /// Records a userspace flow whose copy counts its bytes in `progress`.
    pub fn track_userspace(&self, cookie: u64, info: FlowInfo, progress: Arc<Progress>) {
        let mut live = lock(&self.userspace);
        self.write(cookie, &info);
        live.insert(cookie, (info, progress));
    }

    /// Deletes a userspace flow's entry.
    pub fn untrack_userspace(&self, cookie: u64) {
        let mut live = lock(&self.userspace);
        live.remove(&cookie);
        let _ = lock(&self.map).remove(&cookie);
    }

    /// Rewrites the entries of userspace flows that moved bytes since the last time.
    fn publish_userspace(&self) {
        let mut live = lock(&self.userspace);
        for (cookie, (info, progress)) in live.iter_mut() {
            let up = progress.up.load(Ordering::Relaxed);
            let down = progress.down.load(Ordering::Relaxed);
            if (up, down) != (info.agent_bytes_up, info.agent_bytes_down) {
                info.agent_bytes_up = up;
                info.agent_bytes_down = down;
                self.write(*cookie, info);
            }
        }
    }
}

async fn publish(records: std::sync::Weak<FlowRecords>) {
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(records) = records.upgrade() else {
            return;
        };
        records.publish_userspace();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded state is a map handle (an fd) and plain values: consistent after a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
