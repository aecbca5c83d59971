//! The admin API: `/ready` with Kuma's semantics, `/stats/prometheus`, `/config_dump` and
//! `/clusters`.
//!
//! Bound to 127.0.0.1 (Envoy's admin is localhost-only too). `/ready` alone is also served on
//! `networking.address:<admin port>`, where Kuma's CP-pushed admin listener answers the
//! Kubernetes probe for Envoy ([`serve_ready_only`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::config::ZoneIngress;
use crate::routes::{RouteStore, RouteTable};
use crate::stats::Stats;

/// `/ready` states, as kuma-dp's readiness reporter answers them.
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

const NOT_READY: u8 = 0;
const READY: u8 = 1;
const TERMINATING: u8 = 2;

impl Readiness {
    pub fn set_ready(&self) {
        let _ = self
            .0
            .compare_exchange(NOT_READY, READY, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn set_terminating(&self) {
        self.0.store(TERMINATING, Ordering::SeqCst);
    }

    fn answer(&self) -> (StatusCode, &'static str) {
        match self.0.load(Ordering::SeqCst) {
            READY => (StatusCode::OK, "READY"),
            TERMINATING => (StatusCode::SERVICE_UNAVAILABLE, "TERMINATING"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "NOT_READY"),
        }
    }
}

/// What the admin API reads.
#[derive(Clone)]
pub struct AdminState {
    pub readiness: Arc<Readiness>,
    pub stats: Arc<Stats>,
    pub routes: Arc<RouteStore>,
    /// The ZoneIngress resource as loaded, if one was (it holds no credentials: tokens never
    /// reach it).
    pub zone_ingress: Option<Arc<ZoneIngress>>,
    /// The data listener, once bound (with a control plane: after the first configuration).
    pub listen: Arc<std::sync::OnceLock<SocketAddr>>,
    /// The control-plane session (address, name); never the token.
    pub control_plane: Option<Arc<serde_json::Value>>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot bind the admin API on {addr}: {source} (another Envoy or zone-ingress there? set \
     networking.admin.port to a free port)"
)]
pub struct AdminBindError {
    addr: SocketAddr,
    source: std::io::Error,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminBindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminBindError { addr, source })
}

pub async fn serve(listener: TcpListener, state: AdminState) {
    let app = Router::new()
        .route("/ready", get(ready))
        .route("/stats/prometheus", get(prometheus))
        .route("/config_dump", get(config_dump))
        .route("/clusters", get(clusters))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin API stopped");
    }
}

/// `/ready` only: for `networking.address:<admin port>`, reachable from outside the host, where
/// nothing else of the admin API may be exposed (Kuma's admin listener routes only `/ready`
/// there without mTLS).
pub async fn serve_ready_only(listener: TcpListener, readiness: Arc<Readiness>) {
    let app = Router::new()
        .route("/ready", get(ready_only))
        .with_state(readiness);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "readiness endpoint stopped");
    }
}

async fn ready_only(State(r): State<Arc<Readiness>>) -> impl IntoResponse {
    let (code, body) = r.answer();
    (code, [(header::CONTENT_TYPE, "text/plain")], body)
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    ready_only(State(s.readiness)).await
}

async fn config_dump(State(s): State<AdminState>) -> impl IntoResponse {
    let body = config_dump_json(
        s.zone_ingress.as_deref(),
        s.listen.get().copied(),
        s.control_plane.as_deref(),
        &s.routes.load(),
    );
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body:#}\n"),
    )
}

/// The ZoneIngress resource and the route table in force, routes sorted by SNI.
fn config_dump_json(
    zi: Option<&ZoneIngress>,
    listen: Option<SocketAddr>,
    control_plane: Option<&serde_json::Value>,
    table: &RouteTable,
) -> serde_json::Value {
    let mut routes: Vec<_> = table.routes().collect();
    routes.sort_by(|a, b| a.sni.cmp(&b.sni));
    let routes: Vec<_> = routes
        .iter()
        .map(|r| {
            serde_json::json!({
                "sni": &*r.sni,
                "cluster": &*r.cluster,
                "endpoints": r.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "zone_ingress": zi.map(ZoneIngress::to_json),
        "control_plane": control_plane,
        "route_table": {
            "source": table.source,
            "listener": listen.map(|l| l.to_string()),
            "direct_response": table
                .direct_response()
                .map(|b| String::from_utf8_lossy(b).into_owned()),
            "routes": routes,
        },
    })
}

/// Cluster name -> its endpoints, from the routes (several SNIs can share a cluster).
fn clusters_of(table: &RouteTable) -> BTreeMap<String, BTreeSet<SocketAddr>> {
    let mut out: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
    for r in table.routes() {
        out.entry(r.cluster.to_string())
            .or_default()
            .extend(r.endpoints.iter().copied());
    }
    out
}

/// Envoy's `/clusters` shapes: `cluster::host::stat::value` lines, or `?format=json`. There are
/// no health checks, so every endpoint is reported healthy, as Envoy does without them.
async fn clusters(State(s): State<AdminState>, RawQuery(q): RawQuery) -> impl IntoResponse {
    let clusters = clusters_of(&s.routes.load());
    let json = q
        .as_deref()
        .is_some_and(|q| q.split('&').any(|kv| kv == "format=json"));
    if json {
        let statuses: Vec<_> = clusters
            .iter()
            .map(|(name, eps)| {
                let hosts: Vec<_> = eps
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "address": {"socket_address": {"address": e.ip().to_string(), "port_value": e.port()}},
                            "health_status": {"eds_health_status": "HEALTHY"},
                            "weight": 1,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": name,
                    "observability_name": name.replace(':', "_"),
                    "added_via_api": true,
                    "host_statuses": hosts,
                })
            })
            .collect();
        let body = serde_json::json!({ "cluster_statuses": statuses });
        return (
            [(header::CONTENT_TYPE, "application/json")],
            format!("{body:#}\n"),
        );
    }
    let mut out = String::new();
    for (name, eps) in &clusters {
        out.push_str(&format!(
            "{name}::observability_name::{}\n{name}::added_via_api::true\n",
            name.replace(':', "_")
        ));
        for e in eps {
            out.push_str(&format!(
                "{name}::{e}::health_flags::healthy\n{name}::{e}::weight::1\n"
            ));
        }
    }
    ([(header::CONTENT_TYPE, "text/plain")], out)
}

async fn prometheus(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.stats.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::Route;

    #[test]
    fn config_dump_has_resource_and_sorted_routes() {
        let zi = ZoneIngress::from_yaml_str(
            "type: ZoneIngress\nname: zi\nnetworking:\n  address: 10.0.0.1\n  port: 10001\n",
            "test",
        )
        .unwrap();
        let table = RouteTable::new(
            "t",
            [
                Route::new("b.sni", "default:b", vec!["10.0.1.2:80".parse().unwrap()]),
                Route::new("a.sni", "default:a", vec![]),
            ],
        );
        let v = config_dump_json(Some(&zi), Some(zi.listen_addr()), None, &table);
        assert_eq!(v["zone_ingress"]["name"], "zi");
        assert_eq!(v["route_table"]["listener"], "10.0.0.1:10001");
        assert_eq!(v["route_table"]["routes"][0]["sni"], "a.sni");
        assert_eq!(v["route_table"]["routes"][1]["cluster"], "default:b");
        assert_eq!(v["route_table"]["routes"][1]["endpoints"][0], "10.0.1.2:80");
        assert!(v["route_table"]["direct_response"].is_null());
    }

    #[test]
    fn clusters_merge_the_routes_of_one_cluster() {
        let ep = |s: &str| s.parse::<SocketAddr>().unwrap();
        let table = RouteTable::new(
            "t",
            [
                Route::new("a1", "default:a", vec![ep("10.0.0.1:1")]),
                Route::new("a2", "default:a", vec![ep("10.0.0.2:1"), ep("10.0.0.1:1")]),
            ],
        );
        let c = clusters_of(&table);
        assert_eq!(c.len(), 1);
        assert_eq!(c["default:a"].len(), 2);
    }
}
