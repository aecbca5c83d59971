//! Reloading a route file (standalone routes or xDS resources) on SIGHUP and when its content changes.
//!
//! The file is polled (content compared once a second) rather than watched with inotify: a
//! Kubernetes ConfigMap is updated by swapping a symlink, which an inotify watch on the file
//! misses, and a one-second poll of a small file costs nothing. A file that fails to parse or
//! validate is rejected with the reason logged; the running table stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::config::RoutesFile;
use crate::routes::{Route, RouteStore, RouteTable};
use crate::stats::Stats;

const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Builds a route table from a parsed routes file. Standalone routes have no cluster of their own:
/// the SNI names it.
pub fn table_from_file(file: &RoutesFile, source: &str) -> RouteTable {
    RouteTable::new(
        source,
        file.routes
            .iter()
            .map(|r| Route::new(r.sni.as_str(), r.sni.as_str(), r.endpoints.clone())),
    )
}

/// Parses a routes file's text into a table; the error is logged whole on a rejected reload.
type Parser = fn(&str, &str) -> Result<RouteTable, String>;

/// Watches the standalone routes file (`--routes`) forever.
pub async fn watch_routes_file(path: PathBuf, store: Arc<RouteStore>, stats: Arc<Stats>) {
    watch_file(path, store, stats, |text, origin| {
        RoutesFile::from_yaml_str(text, origin)
            .map(|file| table_from_file(&file, origin))
            .map_err(|e| e.to_string())
    })
    .await
}

/// Builds a route table from the text of a file of xDS resources (`--xds-file`).
pub fn table_from_xds(text: &str, origin: &str) -> Result<RouteTable, String> {
    crate::xds::resources_from_str(text)
        .and_then(|r| crate::xds::route_table(&r))
        .map(|routes| routes.to_route_table(origin))
        .map_err(|e| format!("{origin}: {e}"))
}

/// Watches a file of xDS resources (`--xds-file`) forever.
pub async fn watch_xds_file(path: PathBuf, store: Arc<RouteStore>, stats: Arc<Stats>) {
    watch_file(path, store, stats, table_from_xds).await
}

/// Watches `path` forever, replacing the table in `store` on every valid change.
async fn watch_file(path: PathBuf, store: Arc<RouteStore>, stats: Arc<Stats>, parse: Parser) {
    let mut last = std::fs::read(&path).ok();
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file change only");
            None
        }
    };
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let content = match std::fs::read(&path) {
            Ok(c) => c,
            Err(e) => {
                if forced {
                    tracing::error!(path = %path.display(), error = %e, "SIGHUP: cannot read the routes file; keeping the current table");
                    stats.route_update(false);
                }
                continue;
            }
        };
        if !forced && last.as_deref() == Some(content.as_slice()) {
            continue;
        }
        last = Some(content.clone());
        let origin = path.display().to_string();
        let text = String::from_utf8_lossy(&content);
        match parse(&text, &origin) {
            Ok(table) => {
                tracing::info!(path = %origin, routes = table.len(), trigger = if forced { "SIGHUP" } else { "file change" }, "route table reloaded");
                stats.set_cluster_membership(&table);
                store.replace(table);
                stats.route_update(true);
            }
            Err(e) => {
                tracing::error!("rejected routes reload, keeping the current table: {e}");
                stats.route_update(false);
            }
        }
    }
}

/// Why a watched file is being read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Sighup,
    FileChange,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sighup => "SIGHUP",
            Self::FileChange => "file change",
        }
    }
}

/// Watches any file forever like the route files: calls `apply(text, origin, trigger)` when its
/// content changes (one-second poll) and on every SIGHUP. A file that cannot be read is logged
/// (on SIGHUP) and skipped; `apply` decides what a bad content means.
pub async fn watch_text_file(
    path: PathBuf,
    what: &'static str,
    mut apply: impl FnMut(&str, &str, Trigger) + Send + 'static,
) {
    let mut last = std::fs::read(&path).ok();
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, what, "cannot listen for SIGHUP; reloading on file change only");
            None
        }
    };
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        let trigger = tokio::select! {
            _ = tick.tick() => Trigger::FileChange,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => Trigger::Sighup,
        };
        let content = match std::fs::read(&path) {
            Ok(c) => c,
            Err(e) => {
                if trigger == Trigger::Sighup {
                    tracing::error!(path = %path.display(), error = %e, what, "SIGHUP: cannot read the file; keeping the current settings");
                }
                continue;
            }
        };
        if trigger == Trigger::FileChange && last.as_deref() == Some(content.as_slice()) {
            continue;
        }
        last = Some(content.clone());
        apply(
            &String::from_utf8_lossy(&content),
            &path.display().to_string(),
            trigger,
        );
    }
}
