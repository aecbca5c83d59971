//! The routing table: an immutable snapshot from SNI to route, swapped atomically.
//!
//! A flow takes the snapshot current when its ClientHello arrives and keeps its `Arc<Route>`; an
//! update never touches flows already routed (and never blocks the data path: readers only load an
//! `Arc`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;

/// Where one SNI goes.
#[derive(Debug)]
pub struct Route {
    pub sni: Arc<str>,
    /// The cluster (a Kuma service) the route belongs to; the SNI itself for standalone routes.
    pub cluster: Arc<str>,
    pub endpoints: Vec<SocketAddr>,
    /// Round-robin position, shared by the flows of this route in this snapshot.
    next: AtomicUsize,
}

impl Route {
    pub fn new(
        sni: impl Into<Arc<str>>,
        cluster: impl Into<Arc<str>>,
        endpoints: Vec<SocketAddr>,
    ) -> Self {
        Self {
            sni: sni.into(),
            cluster: cluster.into(),
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    /// Every endpoint once, starting at the next round-robin position: the first is the pick, the
    /// rest are the failover order.
    pub fn endpoints_round_robin(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let n = self.endpoints.len();
        let start = if n == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % n
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
