//! The admin API: `/ready` with Kuma's semantics and `/stats/prometheus`.
//!
//! Bound to 127.0.0.1 (Envoy's admin is localhost-only too).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

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

#[derive(Clone)]
struct AdminState {
    readiness: Arc<Readiness>,
    stats: Arc<Stats>,
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

pub async fn serve(listener: TcpListener, readiness: Arc<Readiness>, stats: Arc<Stats>) {
    let app = Router::new()
        .route("/ready", get(ready))
        .route("/stats/prometheus", get(prometheus))
        .with_state(AdminState { readiness, stats });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin API stopped");
    }
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    let (code, body) = s.readiness.answer();
    (code, [(header::CONTENT_TYPE, "text/plain")], body)
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
