//! The agent's counters, exposed in the Prometheus text format by the admin API.
//!
//! Counters are plain atomics behind `prometheus-client` metric types: the data path only bumps
//! them, and label sets are fixed small enums, so a scrape never races with a flow.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

/// Envoy's per-cluster (and per tcp_proxy stat prefix) counters, for the Envoy-named metrics.
#[derive(Debug, Default)]
struct ClusterCounters {
    /// EDS updates accepted / rejected for this cluster (Envoy's `cluster.<name>.update_*`).
    update_success: AtomicU64,
    update_rejected: AtomicU64,
    /// Endpoints of this cluster in the applied table (`membership_healthy`: the CP sends only
    /// healthy ones).
    membership_healthy: AtomicU64,
    upstream_cx_total: AtomicU64,
    upstream_cx_connect_fail: AtomicU64,
    downstream_rx_bytes: AtomicU64,
    downstream_tx_bytes: AtomicU64,
}

/// Envoy stat names cannot hold `:`; Kuma gives `mesh:service` clusters the alt_stat_name
/// `mesh_service`, which is what Envoy's metrics then carry.
fn envoy_stat_name(cluster: &str) -> String {
    cluster.replace(':', "_")
}

/// Escapes a Prometheus label value (backslash, double quote, newline).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Why a downstream connection was closed before it was routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    NotTls,
    Malformed,
    NoSni,
    UnknownSni,
    TooLarge,
    Timeout,
    Closed,
    IoError,
}

impl RejectReason {
    pub const ALL: [RejectReason; 8] = [
        Self::NotTls,
        Self::Malformed,
        Self::NoSni,
        Self::UnknownSni,
        Self::TooLarge,
        Self::Timeout,
        Self::Closed,
        Self::IoError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotTls => "not_tls",
            Self::Malformed => "malformed",
            Self::NoSni => "no_sni",
            Self::UnknownSni => "unknown_sni",
            Self::TooLarge => "too_large",
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::IoError => "io_error",
        }
    }

    /// Maps the ClientHello reader's stable labels onto reasons.
    pub fn from_label(label: &str) -> Self {
        match label {
            "not_tls" => Self::NotTls,
            "malformed" => Self::Malformed,
            "no_sni" => Self::NoSni,
            "too_large" => Self::TooLarge,
            "timeout" => Self::Timeout,
            "closed" => Self::Closed,
            _ => Self::IoError,
        }
    }
}

/// The datapath that moved a flow's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DatapathKind {
    Userspace,
    Sockmap,
    /// The kernel splice with the endpoint's sends redirected by `sk_msg` (endpoint on this host).
    SockmapLocal,
}

impl DatapathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Userspace => "userspace",
            Self::Sockmap => "sockmap",
            Self::SockmapLocal => "sockmap_local",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatapathLabel {
    datapath: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Reads the kernel's per-route byte counters, summed per cluster (client -> endpoint, endpoint
/// -> client), when the spliced datapath is loaded.
pub type KernelRouteBytes = Box<dyn Fn() -> BTreeMap<String, (u64, u64)> + Send + Sync>;
/// Which xDS resource type an update carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdsKind {
    Cds,
    Eds,
    Lds,
}

/// Control-plane session counters (Envoy's `cluster_manager.cds.*`, `listener_manager.lds.*`).
#[derive(Default)]
struct XdsCounters {
    connected: std::sync::atomic::AtomicBool,
    cds_success: AtomicU64,
    cds_rejected: AtomicU64,
    lds_success: AtomicU64,
    lds_rejected: AtomicU64,
}

/// All counters of one agent.
pub struct Stats {
    registry: Registry,
    downstream_cx: Counter,
    downstream_cx_active: Gauge,
    rejected: Family<ReasonLabel, Counter>,
    flows: Family<DatapathLabel, Counter>,
    copied_bytes: Family<DatapathLabel, Counter>,
    upstream_connect_failures: Counter,
    upstream_unavailable: Counter,
    route_reloads: Family<ResultLabel, Counter>,
    splice_fallbacks: Family<ReasonLabel, Counter>,
    splice_pauses: Counter,
    queue_peak: Gauge,
    integrity_errors: Counter,
    access_log_dropped: Counter,
    started: Instant,
    /// Envoy's `envoy_listener_address` label value (`0.0.0.0_10001`), set once the agent binds.
    listener_address: OnceLock<String>,
    clusters: RwLock<BTreeMap<String, Arc<ClusterCounters>>>,
    /// Bytes of spliced flows, live ones included, read from the kernel at each scrape. The
    /// cluster counters then hold only what the kernel does not count (the replayed ClientHello,
    /// userspace flows): see [`crate::datapath::FlowSummary::uncounted`].
    kernel_route_bytes: OnceLock<KernelRouteBytes>,
    /// Reads the XDP guard's counters at scrape time; set once the guard is attached.
    guard: OnceLock<GuardCountersFn>,
    xds: XdsCounters,
}

/// Reads the XDP guard's counters (in `GuardCounter::ALL` order); `None` when they cannot be read.
pub type GuardCountersFn = Box<
    dyn Fn() -> Option<[u64; zone_ingress_common::guard::GUARD_COUNTERS as usize]> + Send + Sync,
>;

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("zone_ingress");
        let downstream_cx = Counter::default();
        registry.register(
            "downstream_cx",
            "Downstream connections accepted",
            downstream_cx.clone(),
        );
        let downstream_cx_active = Gauge::default();
        registry.register(
            "downstream_cx_active",
            "Downstream connections open now (routing or moving bytes)",
            downstream_cx_active.clone(),
        );
        let rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "client_hello_rejected",
            "Connections closed without a byte sent, by reason",
            rejected.clone(),
        );
        let flows = Family::<DatapathLabel, Counter>::default();
        registry.register("flows", "Routed flows, by datapath", flows.clone());
        let copied_bytes = Family::<DatapathLabel, Counter>::default();
        registry.register(
            "userspace_copied_bytes",
            "Payload bytes copied through the agent's userspace, by the flow's datapath",
            copied_bytes.clone(),
        );
        let upstream_connect_failures = Counter::default();
        registry.register(
            "upstream_connect_failures",
            "Failed connection attempts to endpoints (each attempt counts)",
            upstream_connect_failures.clone(),
        );
        let upstream_unavailable = Counter::default();
        registry.register(
            "upstream_unavailable",
            "Flows reset because no endpoint of the route could be reached",
            upstream_unavailable.clone(),
        );
        let route_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "route_table_updates",
            "Route table updates, applied or rejected",
            route_reloads.clone(),
        );
        let splice_fallbacks = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "splice_fallbacks",
            "Flows the kernel splice refused (they took the userspace copy), by reason",
            splice_fallbacks.clone(),
        );
        let splice_pauses = Counter::default();
        registry.register(
            "splice_pauses",
            "Times a spliced direction paused: its peer's redirect queue reached --splice-budget, so its bytes waited on its own socket (the sender slowed through TCP) and the agent forwarded them",
            splice_pauses.clone(),
        );
        let queue_peak = Gauge::default();
        registry.register(
            "splice_redirect_queue_peak_bytes",
            "Largest redirect queue (bytes waiting in the kernel for one direction of one spliced flow) the flow controller measured since start",
            queue_peak.clone(),
        );
        let integrity_errors = Counter::default();
        registry.register(
            "splice_integrity_errors",
            "Spliced flows reset because the kernel delivered a different byte count than it received",
            integrity_errors.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped_lines",
            "Access log lines dropped because the writer was behind (the data path never waits for it)",
            access_log_dropped.clone(),
        );
        // Pre-create every label so a dashboard sees zeros rather than absent series.
        for r in RejectReason::ALL {
            let _ = rejected.get_or_create(&ReasonLabel { reason: r.as_str() });
        }
        for d in [
            DatapathKind::Userspace,
            DatapathKind::Sockmap,
            DatapathKind::SockmapLocal,
        ] {
            let _ = flows.get_or_create(&DatapathLabel {
                datapath: d.as_str(),
            });
            let _ = copied_bytes.get_or_create(&DatapathLabel {
                datapath: d.as_str(),
            });
        }
        for result in ["applied", "rejected"] {
            let _ = route_reloads.get_or_create(&ResultLabel { result });
        }
        Self {
            registry,
            downstream_cx,
            downstream_cx_active,
            rejected,
            flows,
            copied_bytes,
            upstream_connect_failures,
            upstream_unavailable,
            route_reloads,
            splice_fallbacks,
            splice_pauses,
            queue_peak,
            integrity_errors,
            access_log_dropped,
            started: Instant::now(),
            listener_address: OnceLock::new(),
            clusters: RwLock::new(BTreeMap::new()),
            kernel_route_bytes: OnceLock::new(),
            guard: OnceLock::new(),
            xds: XdsCounters::default(),
        }
    }

    /// Makes the scrape include the XDP guard's counters (first call wins).
    pub fn set_guard_counters(&self, read: GuardCountersFn) {
        let _ = self.guard.set(read);
    }

    /// The `zone_ingress_guard_*` series: zeros (and `attached 0`) while no guard is attached, so
    /// a dashboard sees the series either way.
    fn encode_guard(&self, out: &mut String) {
        use zone_ingress_common::guard::GuardCounter;
        let counters = self.guard.get().and_then(|read| read());
        let attached = u64::from(counters.is_some());
        let c = counters.unwrap_or_default();
        let mut metric = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        metric(
            "zone_ingress_guard_attached",
            "gauge",
            "1 while the XDP guard is attached in front of the listener",
            &[(String::new(), attached)],
        );
        metric(
            "zone_ingress_guard_passed_total",
            "counter",
            "TCP packets to the listener the XDP guard passed to the stack",
            &[(String::new(), c[GuardCounter::Passed as usize])],
        );
        let dropped = [
            ("allow_list", GuardCounter::DroppedAllowList),
            ("syn_rate", GuardCounter::DroppedSynRate),
            ("global_syn_rate", GuardCounter::DroppedGlobalSynRate),
        ]
        .map(|(reason, i)| (format!("{{reason=\"{reason}\"}}"), c[i as usize]));
        metric(
            "zone_ingress_guard_dropped_total",
            "counter",
            "Packets to the listener the XDP guard dropped, by reason (allow_list: source not allowed; syn_rate: the source's SYN rate; global_syn_rate: the SYN ceiling of all sources)",
            &dropped,
        );
        metric(
            "zone_ingress_guard_malformed_total",
            "counter",
            "Packets with truncated or inconsistent headers the XDP guard passed untouched",
            &[(String::new(), c[GuardCounter::Malformed as usize])],
        );
    }

    pub fn access_log_dropped(&self) {
        self.access_log_dropped.inc();
    }

    /// Sets the listener address the Envoy-named listener metrics carry (first call wins).
    pub fn set_listener_address(&self, addr: std::net::SocketAddr) {
        // Envoy's stat prefix is `listener.<ip>_<port>.`; IPv6 keeps its brackets-free form.
        let _ = self
            .listener_address
            .set(format!("{}_{}", addr.ip(), addr.port()));
    }

    fn cluster(&self, cluster: &str) -> Arc<ClusterCounters> {
        let name = envoy_stat_name(cluster);
        // A poisoned lock only means a panic elsewhere while inserting; the map is still valid.
        if let Some(c) = self
            .clusters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
        {
            return c.clone();
        }
        self.clusters
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name)
            .or_default()
            .clone()
    }

    /// A connection to an endpoint of `cluster` was established (Envoy's `upstream_cx_total`
    /// counts attempts: failed ones are added by [`Stats::upstream_connect_failed`]).
    pub fn upstream_connected(&self, cluster: &str) {
        self.cluster(cluster)
            .upstream_cx_total
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Sets where spliced flows' bytes are read at scrape time (first call wins).
    pub fn set_kernel_route_bytes(&self, read: KernelRouteBytes) {
        let _ = self.kernel_route_bytes.set(read);
    }

    /// A flow of `cluster` ended: bytes received from the client (`rx`) and sent to it (`tx`)
    /// that the kernel's route counters do not already hold.
    pub fn flow_bytes(&self, cluster: &str, rx: u64, tx: u64) {
        let c = self.cluster(cluster);
        c.downstream_rx_bytes.fetch_add(rx, Ordering::Relaxed);
        c.downstream_tx_bytes.fetch_add(tx, Ordering::Relaxed);
    }

    /// The Envoy-named series, in the text format.
    fn encode_envoy(&self, out: &mut String) {
        let listener = self
            .listener_address
            .get()
            .map(|a| format!("{{envoy_listener_address=\"{}\"}}", label_value(a)))
            .unwrap_or_default();
        let mut metric = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        metric(
            "envoy_listener_downstream_cx_total",
            "counter",
            "Downstream connections accepted (Envoy name)",
            &[(listener.clone(), self.downstream_cx.get())],
        );
        metric(
            "envoy_listener_downstream_cx_active",
            "gauge",
            "Downstream connections open now (Envoy name)",
            &[(
                listener,
                u64::try_from(self.downstream_cx_active.get()).unwrap_or(0),
            )],
        );
        // Kernel first, agent counters second: a flow that ends in between moves nothing from one
        // to the other (the kernel keeps what it counted), so each only grows.
        let kernel: BTreeMap<String, (u64, u64)> = match self.kernel_route_bytes.get() {
            Some(read) => {
                let mut by_name: BTreeMap<String, (u64, u64)> = BTreeMap::new();
                for (cluster, (rx, tx)) in read() {
                    let e = by_name.entry(envoy_stat_name(&cluster)).or_default();
                    e.0 += rx;
                    e.1 += tx;
                }
                by_name
            }
            None => BTreeMap::new(),
        };
        for name in kernel.keys() {
            // A cluster whose only bytes so far are spliced ones still gets its rows.
            let _ = self.cluster(name);
        }
        let clusters: Vec<(String, Arc<ClusterCounters>, (u64, u64))> = self
            .clusters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| {
                let spliced = kernel.get(k).copied().unwrap_or_default();
                (label_value(k), v.clone(), spliced)
            })
            .collect();
        let rows =
            |label: &str, f: &dyn Fn(&ClusterCounters, (u64, u64)) -> u64| -> Vec<(String, u64)> {
                clusters
                    .iter()
                    .map(|(name, c, k)| (format!("{{{label}=\"{name}\"}}"), f(c, *k)))
                    .collect()
            };
        metric(
            "envoy_tcp_downstream_cx_rx_bytes_total",
            "counter",
            "Bytes received from clients: spliced flows live from the kernel's counters, userspace flows when they end (Envoy name)",
            &rows("envoy_tcp_prefix", &|c, k| {
                c.downstream_rx_bytes.load(Ordering::Relaxed) + k.0
            }),
        );
        metric(
            "envoy_tcp_downstream_cx_tx_bytes_total",
            "counter",
            "Bytes sent to clients: spliced flows live from the kernel's counters, userspace flows when they end (Envoy name)",
            &rows("envoy_tcp_prefix", &|c, k| {
                c.downstream_tx_bytes.load(Ordering::Relaxed) + k.1
            }),
        );
        // Per-cluster series: one row per cluster, labelled with its Envoy stat name.
        type Field = fn(&ClusterCounters) -> &AtomicU64;
        let per_cluster: [(&str, &str, &str, Field); 5] = [
            (
                "envoy_cluster_upstream_cx_total",
                "counter",
                "Connection attempts to endpoints, failed ones included (Envoy name)",
                |c| &c.upstream_cx_total,
            ),
            (
                "envoy_cluster_upstream_cx_connect_fail",
                "counter",
                "Failed connection attempts to endpoints (Envoy name)",
                |c| &c.upstream_cx_connect_fail,
            ),
            (
                "envoy_cluster_membership_healthy",
                "gauge",
                "Endpoints of the cluster in the applied route table (Envoy name)",
                |c| &c.membership_healthy,
            ),
            (
                "envoy_cluster_update_success",
                "counter",
                "EDS updates applied to the cluster (Envoy name)",
                |c| &c.update_success,
            ),
            (
                "envoy_cluster_update_rejected",
                "counter",
                "EDS updates rejected (NACKed) while the cluster existed (Envoy name)",
                |c| &c.update_rejected,
            ),
        ];
        for (name, kind, help, field) in per_cluster {
            metric(
                name,
                kind,
                help,
                &rows("envoy_cluster_name", &|c, _| {
                    field(c).load(Ordering::Relaxed)
                }),
            );
        }
        metric(
            "envoy_server_uptime",
            "gauge",
            "Seconds since the agent started (Envoy name)",
            &[(String::new(), self.started.elapsed().as_secs())],
        );
        metric(
            "envoy_server_memory_heap_size",
            "gauge",
            "The agent's resident set size in bytes (Envoy reports its heap; the agent reports RSS, which includes it)",
            &[(String::new(), resident_bytes())],
        );
        // Control-plane session series, without labels.
        let x = &self.xds;
        for (name, help, value) in [
            (
                "envoy_cluster_manager_cds_update_success",
                "CDS updates accepted (Envoy name)",
                &x.cds_success,
            ),
            (
                "envoy_cluster_manager_cds_update_rejected",
                "CDS updates rejected (Envoy name)",
                &x.cds_rejected,
            ),
            (
                "envoy_listener_manager_lds_update_success",
                "LDS updates accepted (Envoy name)",
                &x.lds_success,
            ),
            (
                "envoy_listener_manager_lds_update_rejected",
                "LDS updates rejected (Envoy name)",
                &x.lds_rejected,
            ),
        ] {
            metric(
                name,
                "counter",
                help,
                &[(String::new(), value.load(Ordering::Relaxed))],
            );
        }
        metric(
            "envoy_control_plane_connected_state",
            "gauge",
            "1 while the ADS stream to the control plane is open (Envoy name); 0 with file-based routes",
            &[(
                String::new(),
                u64::from(x.connected.load(Ordering::Relaxed)),
            )],
        );
    }

    pub fn splice_integrity_error(&self) {
        self.integrity_errors.inc();
    }

    /// Records a measured redirect queue depth; the gauge keeps the largest.
    pub fn redirect_queue_measured(&self, bytes: u64) {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        let mut current = self.queue_peak.get();
        while bytes > current {
            match self.queue_peak.inner().compare_exchange(
                current,
                bytes,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
    }

    pub fn splice_paused(&self, n: u64) {
        self.splice_pauses.inc_by(n);
    }

    pub fn splice_fallback(&self, reason: &'static str) {
        self.splice_fallbacks
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn connection_opened(&self) {
        self.downstream_cx.inc();
        self.downstream_cx_active.inc();
    }

    pub fn connection_closed(&self) {
        self.downstream_cx_active.dec();
    }

    pub fn rejected(&self, reason: RejectReason) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn flow_started(&self, datapath: DatapathKind) {
        self.flows
            .get_or_create(&DatapathLabel {
                datapath: datapath.as_str(),
            })
            .inc();
    }

    pub fn copied(&self, datapath: DatapathKind, bytes: u64) {
        self.copied_bytes
            .get_or_create(&DatapathLabel {
                datapath: datapath.as_str(),
            })
            .inc_by(bytes);
    }

    /// A connection attempt to an endpoint of `cluster` failed (each failover attempt counts).
    pub fn upstream_connect_failed(&self, cluster: &str) {
        self.upstream_connect_failures.inc();
        let c = self.cluster(cluster);
        c.upstream_cx_total.fetch_add(1, Ordering::Relaxed);
        c.upstream_cx_connect_fail.fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_unavailable(&self) {
        self.upstream_unavailable.inc();
    }

    pub fn set_control_plane_connected(&self, connected: bool) {
        self.xds.connected.store(connected, Ordering::Relaxed);
    }

    /// An xDS response was accepted or rejected. `clusters` are the clusters an accepted EDS
    /// update carried (each gets `update_success`); a rejected EDS update counts for every
    /// cluster known so far, as Envoy cannot tell which one was meant either.
    pub fn xds_update(&self, kind: XdsKind, accepted: bool, clusters: &[String]) {
        let bump = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        match (kind, accepted) {
            (XdsKind::Cds, true) => bump(&self.xds.cds_success),
            (XdsKind::Cds, false) => bump(&self.xds.cds_rejected),
            (XdsKind::Lds, true) => bump(&self.xds.lds_success),
            (XdsKind::Lds, false) => bump(&self.xds.lds_rejected),
            (XdsKind::Eds, true) => {
                for c in clusters {
                    bump(&self.cluster(c).update_success);
                }
            }
            (XdsKind::Eds, false) => {
                let all: Vec<Arc<ClusterCounters>> = self
                    .clusters
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect();
                for c in all {
                    bump(&c.update_rejected);
                }
            }
        }
        self.route_update(accepted);
    }

    /// Sets `membership_healthy` of every cluster from the route table just applied (the
    /// endpoints of all its routes, once each).
    pub fn set_cluster_membership(&self, table: &crate::routes::RouteTable) {
        let mut per_cluster: BTreeMap<&str, std::collections::BTreeSet<std::net::SocketAddr>> =
            BTreeMap::new();
        for r in table.routes() {
            per_cluster
                .entry(&r.cluster)
                .or_default()
                .extend(r.endpoints.iter().copied());
        }
        let known: Vec<Arc<ClusterCounters>> = self
            .clusters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for c in known {
            c.membership_healthy.store(0, Ordering::Relaxed);
        }
        for (name, eps) in per_cluster {
            self.cluster(name)
                .membership_healthy
                .store(eps.len() as u64, Ordering::Relaxed);
        }
    }

    pub fn route_update(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.route_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail (fmt::Write for String is infallible).
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        // The Envoy-named series go before OpenMetrics' `# EOF` terminator (a plain comment to the
        // 0.0.4 text parser Prometheus uses for our content type), so both parsers see them.
        let eof = out.rfind("# EOF").unwrap_or(out.len());
        let mut envoy = String::new();
        self.encode_envoy(&mut envoy);
        self.encode_guard(&mut envoy);
        out.insert_str(eof, &envoy);
        out
    }
}

/// The process's resident set size, from `/proc/self/statm` (0 where it cannot be read).
fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_counters_with_labels() {
        let s = Stats::new();
        s.connection_opened();
        s.rejected(RejectReason::UnknownSni);
        s.rejected(RejectReason::UnknownSni);
        s.copied(DatapathKind::Userspace, 42);
        let text = s.encode();
        assert!(
            text.contains("zone_ingress_downstream_cx_total 1"),
            "{text}"
        );
        assert!(
            text.contains("zone_ingress_client_hello_rejected_total{reason=\"unknown_sni\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("zone_ingress_client_hello_rejected_total{reason=\"timeout\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("zone_ingress_userspace_copied_bytes_total{datapath=\"userspace\"} 42"),
            "{text}"
        );
    }

    #[test]
    fn envoy_names_with_envoy_labels() {
        let s = Stats::new();
        s.set_listener_address("0.0.0.0:10001".parse().unwrap());
        s.connection_opened();
        s.upstream_connected("default:backend");
        s.upstream_connect_failed("default:backend");
        // Another cluster's failure moves the zone_ingress total, not default:backend's counters.
        s.upstream_connect_failed("other:svc");
        s.flow_bytes("default:backend", 517, 42);
        // Spliced bytes are read from the kernel at scrape time, live flows included.
        s.set_kernel_route_bytes(Box::new(|| {
            BTreeMap::from([
                ("default:backend".to_string(), (1000, 2000)),
                ("default:spliced-only".to_string(), (7, 8)),
            ])
        }));
        let text = s.encode();
        for line in [
            "envoy_listener_downstream_cx_total{envoy_listener_address=\"0.0.0.0_10001\"} 1",
            "envoy_listener_downstream_cx_active{envoy_listener_address=\"0.0.0.0_10001\"} 1",
            "envoy_tcp_downstream_cx_rx_bytes_total{envoy_tcp_prefix=\"default_backend\"} 1517",
            "envoy_tcp_downstream_cx_tx_bytes_total{envoy_tcp_prefix=\"default_backend\"} 2042",
            "envoy_tcp_downstream_cx_rx_bytes_total{envoy_tcp_prefix=\"default_spliced-only\"} 7",
            "envoy_tcp_downstream_cx_tx_bytes_total{envoy_tcp_prefix=\"default_spliced-only\"} 8",
            "envoy_cluster_upstream_cx_total{envoy_cluster_name=\"default_backend\"} 2",
            "envoy_cluster_upstream_cx_connect_fail{envoy_cluster_name=\"default_backend\"} 1",
            "zone_ingress_upstream_connect_failures_total 2",
            "envoy_control_plane_connected_state 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
        let heap = text
            .lines()
            .find_map(|l| l.strip_prefix("envoy_server_memory_heap_size "))
            .and_then(|v| v.parse::<u64>().ok());
        assert!(heap.is_some_and(|h| h > 0), "{text}");
    }
}
