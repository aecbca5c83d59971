//! The routing table: an immutable snapshot from SNI to route, swapped atomically.
//!
//! A flow takes the snapshot current when its ClientHello arrives and keeps its `Arc<Route>`; an
//! update never touches flows already routed (and never blocks the data path: readers only load an
//! `Arc`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

/// Where one SNI goes.
#[derive(Debug)]
pub struct Route {
    pub sni: Arc<str>,
    /// The cluster (a Kuma service) the route belongs to; the SNI itself for standalone routes.
    pub cluster: Arc<str>,
    pub endpoints: Vec<SocketAddr>,
    /// The order picks visit `endpoints` in (indices): each endpoint once with equal weights,
    /// `weight` times, interleaved, otherwise (Envoy's weighted round robin).
    schedule: Vec<u32>,
    /// The cluster's `connect_timeout` (xDS); `None`: the agent's `--connect-timeout`.
    pub connect_timeout: Option<Duration>,
    /// Round-robin position, shared by the flows of this route in this snapshot.
    next: AtomicUsize,
}

/// Longest weighted schedule kept per route; larger weights are scaled down to fit (the ratio
/// stays within a rounding error, and every endpoint keeps at least one slot).
const MAX_SCHEDULE: u64 = 4096;

/// Interleaves endpoints by weight, earliest-deadline-first: endpoint `i` is due at
/// `(k + 1/2) / w_i` for its k-th pick, so a heavy endpoint is spread over the cycle rather than
/// picked in a burst.
fn weighted_schedule(weights: &[u32]) -> Vec<u32> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let total: u64 = weights.iter().map(|w| u64::from((*w).max(1))).sum();
    let scale = total.div_ceil(MAX_SCHEDULE).max(1);
    let w: Vec<u64> = weights
        .iter()
        .map(|x| (u64::from((*x).max(1)) / scale).max(1))
        .collect();
    let slots: u64 = w.iter().sum();
    let mut picked = vec![0u64; n];
    let mut out = Vec::with_capacity(usize::try_from(slots).unwrap_or(0));
    for _ in 0..slots {
        // Next due: smallest (2·picked+1)/(2w), compared exactly by cross-multiplying.
        let mut best = 0;
        for i in 1..n {
            if (2 * picked[i] + 1) * w[best] < (2 * picked[best] + 1) * w[i] {
                best = i;
            }
        }
        picked[best] += 1;
        out.push(u32::try_from(best).unwrap_or(0));
    }
    out
}

impl Route {
    pub fn new(
        sni: impl Into<Arc<str>>,
        cluster: impl Into<Arc<str>>,
        endpoints: Vec<SocketAddr>,
    ) -> Self {
        let schedule = (0..u32::try_from(endpoints.len()).unwrap_or(u32::MAX)).collect();
        Self {
            sni: sni.into(),
            cluster: cluster.into(),
            endpoints,
            schedule,
            connect_timeout: None,
            next: AtomicUsize::new(0),
        }
    }

    /// The same route with EDS weights, one per endpoint (in `endpoints` order). Weights of 0
    /// count as 1 (Envoy refuses 0; the xDS layer already did).
    pub fn with_weights(mut self, weights: &[u32]) -> Self {
        if weights.len() == self.endpoints.len() && weights.iter().any(|w| *w != weights[0]) {
            self.schedule = weighted_schedule(weights);
        }
        self
    }

    pub fn with_connect_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Every endpoint once, starting at the next (weighted) round-robin pick: the first is the
    /// pick, the rest are the failover order.
    pub fn endpoints_round_robin(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let n = self.endpoints.len();
        let start = if n == 0 || self.schedule.is_empty() {
            0
        } else {
            let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
            self.schedule[slot] as usize
        };
        (0..n).map(move |i| self.endpoints[(start + i) % n])
    }
}

/// One immutable version of the routing table.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_sni: HashMap<Box<[u8]>, Arc<Route>>,
    /// Bytes sent to a connection whose SNI has no route, before closing it (Kuma's zero-cluster
    /// direct_response). `None`: such a connection is closed without a byte, as Envoy does.
    direct_response: Option<Arc<[u8]>>,
    /// Where this table came from (a file path, "embedded default", an xDS version), for logs.
    pub source: String,
}

impl RouteTable {
    pub fn new(source: impl Into<String>, routes: impl IntoIterator<Item = Route>) -> Self {
        let by_sni = routes
            .into_iter()
            .map(|r| (Box::<[u8]>::from(r.sni.as_bytes()), Arc::new(r)))
            .collect();
        Self {
            by_sni,
            direct_response: None,
            source: source.into(),
        }
    }

    /// The same table, answering unknown SNIs with `bytes` (then closing) when given.
    pub fn with_direct_response(mut self, bytes: Option<Arc<[u8]>>) -> Self {
        self.direct_response = bytes;
        self
    }

    /// What to send a connection whose SNI matches no route, if anything.
    pub fn direct_response(&self) -> Option<&Arc<[u8]>> {
        self.direct_response.as_ref()
    }

    /// Exact, byte-for-byte SNI match (Kuma's SNIs are not DNS names: no case folding).
    pub fn lookup(&self, sni: &[u8]) -> Option<Arc<Route>> {
        self.by_sni.get(sni).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_sni.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_sni.is_empty()
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_sni.values()
    }
}

/// The current table, shared by the listener and the sources that update it.
#[derive(Debug, Default)]
pub struct RouteStore {
    current: ArcSwap<RouteTable>,
}

impl RouteStore {
    pub fn new(table: RouteTable) -> Self {
        Self {
            current: ArcSwap::from_pointee(table),
        }
    }

    pub fn load(&self) -> Arc<RouteTable> {
        self.current.load_full()
    }

    pub fn replace(&self, table: RouteTable) {
        self.current.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_robin_visits_every_endpoint_once_per_pick() {
        let r = Route::new(
            "a",
            "a",
            vec![addr("10.0.0.1:1"), addr("10.0.0.2:1"), addr("10.0.0.3:1")],
        );
        let first: Vec<_> = r.endpoints_round_robin().collect();
        let second: Vec<_> = r.endpoints_round_robin().collect();
        assert_eq!(
            first,
            vec![addr("10.0.0.1:1"), addr("10.0.0.2:1"), addr("10.0.0.3:1")]
        );
        assert_eq!(
            second,
            vec![addr("10.0.0.2:1"), addr("10.0.0.3:1"), addr("10.0.0.1:1")]
        );
        let empty = Route::new("b", "b", vec![]);
        assert_eq!(empty.endpoints_round_robin().count(), 0);
    }

    #[test]
    fn weights_shape_the_picks_and_failover_still_visits_everyone() {
        let eps = vec![addr("10.0.0.1:1"), addr("10.0.0.2:1"), addr("10.0.0.3:1")];
        let r = Route::new("a", "a", eps.clone()).with_weights(&[3, 1, 0]);
        let mut firsts = HashMap::new();
        for _ in 0..500 {
            let order: Vec<_> = r.endpoints_round_robin().collect();
            assert_eq!(order.len(), 3);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, eps);
            *firsts.entry(order[0]).or_insert(0u32) += 1;
        }
        // Schedule of 5 slots (3, 1, 1): 300 / 100 / 100 over 500 picks.
        assert_eq!(firsts[&eps[0]], 300);
        assert_eq!(firsts[&eps[1]], 100);
        assert_eq!(firsts[&eps[2]], 100);
        // Interleaved, not a burst of three.
        assert_eq!(weighted_schedule(&[3, 1]), vec![0, 0, 1, 0]);
        // Huge weights are scaled into a bounded schedule.
        assert!(weighted_schedule(&[u32::MAX, 1]).len() as u64 <= MAX_SCHEDULE + 1);
    }

    #[test]
    fn lookup_is_exact_and_swaps_atomically() {
        let store = RouteStore::new(RouteTable::new(
            "t1",
            [Route::new(
                "backend{mesh=default}",
                "c",
                vec![addr("10.0.0.1:1")],
            )],
        ));
        let old = store.load();
        assert!(old.lookup(b"backend{mesh=default}").is_some());
        assert!(old.lookup(b"Backend{mesh=default}").is_none());
        store.replace(RouteTable::new("t2", []));
        assert!(store.load().lookup(b"backend{mesh=default}").is_none());
        // A flow holding the old snapshot still sees its route.
        assert!(old.lookup(b"backend{mesh=default}").is_some());
    }
}
