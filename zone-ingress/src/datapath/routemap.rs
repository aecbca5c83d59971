//! Route ids for the pinned route maps: `ZI_ROUTES` (id -> SNI, cluster, the agent's counters) and
//! `ZI_ROUTE_BYTES` (id -> bytes the verdict redirected, per CPU).
//!
//! An id names one (SNI, cluster) pair for as long as the agent runs, across route-table reloads,
//! so the kernel's counters of a route keep adding up when a reload keeps the route. A route a
//! reload removed keeps its id (and its entry, marked inactive) for its counters and the flows
//! still on it. Ids are indices into a fixed-size per-CPU array; only when all [`MAX_ROUTES`]
//! are taken is the id of a removed route that no flow holds any more given to a new route, and
//! its kernel bytes are kept aside first so the Prometheus byte counters never go down. Past that,
//! a flow gets [`NO_ROUTE`] and the agent accounts its bytes itself when it ends.
//!
//! One mutex guards the map handles and the bookkeeping: the agent is the only writer of
//! `ZI_ROUTES`, so whole-value writes under the lock never lose an update.

use std::collections::{BTreeMap, HashMap as StdHashMap, HashSet};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
use zone_ingress_common::{
    DATAPATH_SOCKMAP, MAX_ROUTES, NO_ROUTE, ROUTE_ACTIVE, ROUTE_NAME_MAX, RouteBytes, RouteInfo,
};

use crate::routes::{Route, RouteTable};

type RouteKey = (Arc<str>, Arc<str>);

/// Kernel-counted bytes per cluster: (client -> endpoint, endpoint -> client).
pub type ClusterBytes = BTreeMap<String, (u64, u64)>;

struct Slot {
    key: RouteKey,
    info: RouteInfo,
    /// Flows holding this id now.
    live: u64,
}

struct Inner {
    info_map: HashMap<MapData, u32, RouteInfo>,
    bytes_map: PerCpuArray<MapData, RouteBytes>,
    ids: StdHashMap<RouteKey, u32>,
    /// Index = route id.
    slots: Vec<Slot>,
    /// Kernel bytes of ids that were given to another route, per cluster.
    reused_bytes: ClusterBytes,
    /// The table the flags were last synced with (kept alive so a pointer comparison is exact).
    synced: Option<Arc<RouteTable>>,
    /// Another agent owns the shared entries now (hot restart): write nothing more.
    frozen: bool,
}

pub struct RouteMap {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for RouteMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMap").finish_non_exhaustive()
    }
}

fn key_of(route: &Route) -> RouteKey {
    (route.sni.clone(), route.cluster.clone())
}

/// Copies `name` into a fixed field, cut at [`ROUTE_NAME_MAX`]; returns the full length.
fn put_name(field: &mut [u8; ROUTE_NAME_MAX], name: &str) -> u16 {
    let bytes = name.as_bytes();
    let n = bytes.len().min(ROUTE_NAME_MAX);
    field[..n].copy_from_slice(&bytes[..n]);
    u16::try_from(bytes.len()).unwrap_or(u16::MAX)
}

/// A fresh entry. Active: a route gets an id because it is in the current table (a sync) or a
/// flow was just routed by it; the next sync corrects the flag if a reload removed it meanwhile.
fn new_info(key: &RouteKey) -> RouteInfo {
    let mut info = RouteInfo {
        flags: ROUTE_ACTIVE,
        ..RouteInfo::default()
    };
    info.sni_len = put_name(&mut info.sni, &key.0);
    info.cluster_len = put_name(&mut info.cluster, &key.1);
    info
}

impl Inner {
    fn write(&mut self, id: u32) {
        if self.frozen {
            return;
        }
        let Some(slot) = self.slots.get(id as usize) else {
            return;
        };
        if let Err(e) = self.info_map.insert(id, slot.info, 0) {
            tracing::debug!(id, error = %e, "cannot write the route entry; `maps dump routes` will miss it");
        }
    }

    /// The route's id, giving it one if it has none (`None`: every id is held).
    fn id_for(&mut self, key: &RouteKey) -> Option<u32> {
        if let Some(id) = self.ids.get(key) {
            return Some(*id);
        }
        let id = if self.slots.len() < MAX_ROUTES as usize {
            self.slots.push(Slot {
                key: key.clone(),
                info: new_info(key),
                live: 0,
            });
            u32::try_from(self.slots.len() - 1).ok()?
        } else {
            let id = self
                .slots
                .iter()
                .position(|s| s.info.flags & ROUTE_ACTIVE == 0 && s.live == 0)?;
            let id = u32::try_from(id).ok()?;
            self.recycle(id, key);
            id
        };
        self.ids.insert(key.clone(), id);
        self.write(id);
        Some(id)
    }

    /// Gives the id of a removed, unused route to `key`: its kernel bytes are set aside, its
    /// counters zeroed.
    fn recycle(&mut self, id: u32, key: &RouteKey) {
        let (up, down) = self.kernel_bytes(id);
        let old = &self.slots[id as usize];
        let e = self.reused_bytes.entry(old.key.1.to_string()).or_default();
        e.0 += up;
        e.1 += down;
        self.ids.remove(&old.key);
        let zeros = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .and_then(|n| PerCpuValues::try_from(vec![RouteBytes::default(); n]));
        match zeros {
            Ok(z) => {
                if let Err(e) = self.bytes_map.set(id, z, 0) {
                    tracing::warn!(id, error = %e, "cannot zero a reused route's byte counters");
                }
            }
            Err(e) => tracing::warn!(id, error = %e, "cannot zero a reused route's byte counters"),
        }
        self.slots[id as usize] = Slot {
            key: key.clone(),
            info: new_info(key),
            live: 0,
        };
        tracing::debug!(id, sni = %key.0, "route id reused");
    }

    fn kernel_bytes(&self, id: u32) -> (u64, u64) {
        match self.bytes_map.get(&id, 0) {
            Ok(per_cpu) => per_cpu.iter().fold((0, 0), |(u, d), b| {
                (u.wrapping_add(b.up), d.wrapping_add(b.down))
            }),
            Err(e) => {
                tracing::debug!(id, error = %e, "cannot read a route's kernel byte counters");
                (0, 0)
            }
        }
    }
}

impl RouteMap {
    pub fn new(
        info_map: HashMap<MapData, u32, RouteInfo>,
        bytes_map: PerCpuArray<MapData, RouteBytes>,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner {
                info_map,
                bytes_map,
                ids: StdHashMap::new(),
                slots: Vec::new(),
                reused_bytes: BTreeMap::new(),
                synced: None,
                frozen: false,
            }),
        }
    }

    /// Takes over the entries a previous agent left in the (reused, pinned) maps, so route ids and
    /// their counters carry on across a hot restart. Names longer than the entry holds cannot be
    /// matched again: such an id keeps its slot (and counters) but new flows get a fresh id.
    pub fn adopt_existing(&self) -> usize {
        let mut inner = lock(&self.inner);
        let entries: Vec<(u32, RouteInfo)> = inner
            .info_map
            .iter()
            .filter_map(Result::ok)
            .filter(|(id, _)| *id < MAX_ROUTES)
            .collect();
        let Some(max) = entries.iter().map(|(id, _)| *id).max() else {
            return 0;
        };
        let name = |b: &[u8], len: u16| -> Arc<str> {
            let n = usize::from(len).min(b.len());
            String::from_utf8_lossy(&b[..n]).into()
        };
        inner.slots = (0..=max)
            .map(|id| Slot {
                key: (format!("\u{0}unused-{id}").into(), "".into()),
                info: RouteInfo::default(),
                live: 0,
            })
            .collect();
        for (id, info) in &entries {
            let key = (
                name(&info.sni, info.sni_len),
                name(&info.cluster, info.cluster_len),
            );
            let whole = usize::from(info.sni_len) <= ROUTE_NAME_MAX
                && usize::from(info.cluster_len) <= ROUTE_NAME_MAX;
            if whole {
                inner.ids.insert(key.clone(), *id);
            }
            inner.slots[*id as usize] = Slot {
                key,
                info: *info,
                live: 0,
            };
        }
        entries.len()
    }

    /// A flow adopted from a previous agent holds `id` (its kernel counters keep adding there).
    pub fn hold_adopted(&self, id: u32) -> u32 {
        let mut inner = lock(&self.inner);
        match inner.slots.get_mut(id as usize) {
            Some(slot) => {
                slot.live += 1;
                id
            }
            None => NO_ROUTE,
        }
    }

    /// Stops writing the shared entries: the next agent of a hot restart owns them.
    pub fn freeze(&self) {
        lock(&self.inner).frozen = true;
    }

    /// Brings the entries in line with `table`: its routes get ids and are marked active, routes
    /// no longer in it are marked inactive. Does nothing when `table` is the one last synced.
    pub fn sync(&self, table: &Arc<RouteTable>) {
        let mut inner = lock(&self.inner);
        if inner.synced.as_ref().is_some_and(|t| Arc::ptr_eq(t, table)) {
            return;
        }
        let current: HashSet<RouteKey> = table.routes().map(|r| key_of(r)).collect();
        for key in &current {
            if inner.id_for(key).is_none() {
                tracing::warn!(sni = %key.0, max = MAX_ROUTES, "more routes than route ids: this route has no kernel counters (its bytes are still counted when flows end)");
            }
        }
        for id in 0..inner.slots.len() {
            let slot = &mut inner.slots[id];
            let flags = if current.contains(&slot.key) {
                slot.info.flags | ROUTE_ACTIVE
            } else {
                slot.info.flags & !ROUTE_ACTIVE
            };
            if flags != slot.info.flags {
                slot.info.flags = flags;
                inner.write(id as u32);
            }
        }
        inner.synced = Some(table.clone());
    }

    /// Takes an id for a flow of `route` (released by [`RouteMap::release`]); [`NO_ROUTE`] when
    /// every id is held.
    pub fn hold(&self, route: &Route) -> u32 {
        let mut inner = lock(&self.inner);
        let key = key_of(route);
        let Some(id) = inner.id_for(&key) else {
            return NO_ROUTE;
        };
        inner.slots[id as usize].live += 1;
        id
    }

    /// A flow holding `id` started on `datapath`, after the agent itself moved `up`/`down` bytes.
    pub fn started(&self, id: u32, datapath: u32, up: u64, down: u64) {
        self.update(id, |info| {
            if datapath == DATAPATH_SOCKMAP {
                info.flows_spliced += 1;
            } else {
                info.flows_userspace += 1;
            }
            info.agent_bytes_up += up;
            info.agent_bytes_down += down;
        });
    }

    /// A live flow holding `id` had the agent move `up`/`down` more bytes itself.
    pub fn agent_bytes(&self, id: u32, up: u64, down: u64) {
        if up == 0 && down == 0 {
            return;
        }
        self.update(id, |info| {
            info.agent_bytes_up += up;
            info.agent_bytes_down += down;
        });
    }

    /// The cluster of route `id`, if it is one.
    pub fn cluster(&self, id: u32) -> Option<Arc<str>> {
        let inner = lock(&self.inner);
        let slot = inner.slots.get(id as usize)?;
        (!slot.key.1.is_empty()).then(|| slot.key.1.clone())
    }

    /// A flow gives `id` back, after the agent moved `up`/`down` more bytes itself.
    pub fn release(&self, id: u32, up: u64, down: u64) {
        let mut inner = lock(&self.inner);
        let Some(slot) = inner.slots.get_mut(id as usize) else {
            return;
        };
        slot.live = slot.live.saturating_sub(1);
        if up == 0 && down == 0 {
            return;
        }
        slot.info.agent_bytes_up += up;
        slot.info.agent_bytes_down += down;
        inner.write(id);
    }

    fn update(&self, id: u32, f: impl FnOnce(&mut RouteInfo)) {
        let mut inner = lock(&self.inner);
        let Some(slot) = inner.slots.get_mut(id as usize) else {
            return;
        };
        f(&mut slot.info);
        inner.write(id);
    }

    /// Bytes the verdict redirected, per cluster, read from the kernel now (including routes whose
    /// id was reused). Monotonic: for the Prometheus byte counters at scrape time.
    pub fn kernel_bytes_by_cluster(&self) -> ClusterBytes {
        let inner = lock(&self.inner);
        let mut out = inner.reused_bytes.clone();
        for (id, slot) in inner.slots.iter().enumerate() {
            if slot.key.1.is_empty() {
                // A gap left by adopt_existing: no route, no bytes.
                continue;
            }
            let (up, down) = inner.kernel_bytes(id as u32);
            let e = out.entry(slot.key.1.to_string()).or_default();
            e.0 += up;
            e.1 += down;
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded state is map handles (fds) and counters: still consistent after a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::BpfPrograms;
    use std::path::PathBuf;

    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn table(routes: impl IntoIterator<Item = (String, String)>) -> Arc<RouteTable> {
        Arc::new(RouteTable::new(
            "test",
            routes
                .into_iter()
                .map(|(sni, cluster)| Route::new(sni, cluster, vec![])),
        ))
    }

    fn flags(m: &RouteMap, id: u32) -> u32 {
        let inner = lock(&m.inner);
        inner.info_map.get(&id, 0).expect("route entry").flags
    }

    /// Ids survive reloads, removed routes turn inactive, and only when every id is taken does a
    /// removed, unheld route's id go to a new route (its kernel counters zeroed). Needs root and
    /// the BPF object (`cargo xtask test`); it fails, never skips, without them.
    #[tokio::test]
    async fn ids_are_stable_across_reloads_and_reused_only_when_exhausted() {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/zi-test-{}-routemap",
            std::process::id()
        ));
        let _cleanup = Cleanup(dir.clone());
        let programs = BpfPrograms::load(&dir, crate::bpf::Pins::Replace).unwrap_or_else(|e| {
            panic!("BPF programs must load in the test environment (run `cargo xtask test` as root): {e}")
        });
        let m = RouteMap::new(programs.routes, programs.route_bytes);
        let pair = |i: usize| (format!("sni-{i}"), format!("cluster-{}", i % 3));
        m.sync(&table((0..2).map(pair)));
        let a = Route::new("sni-0", "cluster-0", vec![]);
        let id_a = m.hold(&a);
        assert_eq!(flags(&m, id_a), ROUTE_ACTIVE);
        m.started(id_a, DATAPATH_SOCKMAP, 100, 5);

        // A reload without sni-0: same id, inactive, counters kept.
        m.sync(&table((1..2).map(pair)));
        assert_eq!(flags(&m, id_a), 0);
        assert_eq!(m.hold(&a), id_a, "a route keeps its id");
        m.release(id_a, 0, 0);
        m.release(id_a, 0, 0);
        let info = lock(&m.inner).info_map.get(&id_a, 0).expect("entry");
        assert_eq!(
            (
                info.flows_spliced,
                info.agent_bytes_up,
                info.agent_bytes_down
            ),
            (1, 100, 5)
        );

        // Every id taken by the current table plus sni-0 (removed, no flow holds it): a new route
        // gets sni-0's id; one more gets none.
        let full: Vec<_> = (1..MAX_ROUTES as usize).map(pair).collect();
        m.sync(&table(full.clone()));
        let mut bigger = full;
        bigger.push(("new".into(), "cluster-new".into()));
        m.sync(&table(bigger.clone()));
        let new = Route::new("new", "cluster-new", vec![]);
        assert_eq!(m.hold(&new), id_a, "the removed route's id is reused");
        let info = lock(&m.inner).info_map.get(&id_a, 0).expect("entry");
        assert_eq!(
            (info.flows_spliced, info.agent_bytes_up, &info.sni[..3]),
            (0, 0, &b"new"[..])
        );
        bigger.push(("one-too-many".into(), "c".into()));
        m.sync(&table(bigger));
        assert_eq!(m.hold(&Route::new("one-too-many", "c", vec![])), NO_ROUTE);
        let by_cluster = m.kernel_bytes_by_cluster();
        assert_eq!(by_cluster.get("cluster-new"), Some(&(0, 0)));
        assert_eq!(by_cluster.get("cluster-0"), Some(&(0, 0)));
    }
}
