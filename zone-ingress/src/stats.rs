//! The agent's counters, exposed in the Prometheus text format by the admin API.
//!
//! Counters are plain atomics behind `prometheus-client` metric types: the data path only bumps
//! them, and label sets are fixed small enums, so a scrape never races with a flow.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
}

impl DatapathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Userspace => "userspace",
            Self::Sockmap => "sockmap",
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
    sender_clamps: Counter,
    queue_peak: Gauge,
    integrity_errors: Counter,
}

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
        let sender_clamps = Counter::default();
        registry.register(
            "splice_sender_clamps",
            "Times a spliced flow's redirect queue exceeded the budget and its sender's window was clamped",
            sender_clamps.clone(),
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
        // Pre-create every label so a dashboard sees zeros rather than absent series.
        for r in RejectReason::ALL {
            let _ = rejected.get_or_create(&ReasonLabel { reason: r.as_str() });
        }
        for d in [DatapathKind::Userspace, DatapathKind::Sockmap] {
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
            sender_clamps,
            queue_peak,
            integrity_errors,
        }
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

    pub fn sender_clamped(&self) {
        self.sender_clamps.inc();
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

    pub fn upstream_connect_failed(&self) {
        self.upstream_connect_failures.inc();
    }

    pub fn upstream_unavailable(&self) {
        self.upstream_unavailable.inc();
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
        out
    }
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
}
