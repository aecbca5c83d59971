//! `maps dump flows`: `ZI_FLOW_INFO` (addresses, route, start, datapath, bytes the agent moved),
//! plus what the verdict redirected for spliced flows (their two `ZI_FLOWS` entries) and the
//! route's names (`ZI_ROUTES`).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use zone_ingress_common::{
    DATAPATH_SOCKMAP, DATAPATH_SOCKMAP_LOCAL, DATAPATH_USERSPACE, FlowInfo, FlowSide, NO_ROUTE,
    SockAddr, map_names,
};

use super::pinned::{PinDir, entries};
use super::table::{Align, Table};
use super::{Dump, MapsError, routes};

#[derive(Debug, Clone, Serialize)]
pub struct FlowRow {
    /// Socket cookie of the client connection (the map key).
    pub cookie: u64,
    /// `sockmap` (kernel splice) or `userspace` (copied by the agent).
    pub datapath: &'static str,
    pub route_id: Option<u32>,
    pub sni: Option<String>,
    pub cluster: Option<String>,
    /// Downstream pair: the client and the ingress address it connected to.
    pub client: String,
    pub ingress: String,
    /// Upstream pair: the agent's address and the endpoint.
    pub local: String,
    pub upstream: String,
    /// Client -> endpoint (for userspace flows as of the agent's last update, about a second).
    pub bytes_up: u64,
    /// Endpoint -> client.
    pub bytes_down: u64,
    pub started_unix_ms: u64,
    pub age_ms: u64,
}

fn addr(a: &SockAddr) -> String {
    a.to_socket_addr()
        .map_or_else(|| "?".to_owned(), |a| a.to_string())
}

fn datapath(d: u32) -> &'static str {
    match d {
        DATAPATH_SOCKMAP => "sockmap",
        DATAPATH_USERSPACE => "userspace",
        DATAPATH_SOCKMAP_LOCAL => "sockmap_local",
        _ => "unknown",
    }
}

/// `1h02m`, `3m04s`, `12.3s`, `450ms`.
pub(super) fn human_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..60 => format!("{}.{}s", s, (ms % 1000) / 100),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn read(pins: &PinDir) -> Result<Vec<FlowRow>, MapsError> {
    let info = pins.hash::<u64, FlowInfo>(map_names::FLOW_INFO)?;
    let sides = pins.hash::<u64, FlowSide>(map_names::FLOWS)?;
    let names = routes::names(pins)?;
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let redirected = |cookie: u64| sides.get(&cookie, 0).map_or(0, |s| s.redirected_bytes);
    let mut rows = Vec::new();
    for (cookie, f) in entries(map_names::FLOW_INFO, &info)? {
        let (kernel_up, kernel_down) =
            if f.datapath == DATAPATH_SOCKMAP || f.datapath == DATAPATH_SOCKMAP_LOCAL {
                (redirected(cookie), redirected(f.up_cookie))
            } else {
                (0, 0)
            };
        let route = (f.route_id != NO_ROUTE).then_some(f.route_id);
        let name = route.and_then(|id| names.get(&id));
        rows.push(FlowRow {
            cookie,
            datapath: datapath(f.datapath),
            route_id: route,
            sni: name.map(|n| n.0.clone()),
            cluster: name.map(|n| n.1.clone()),
            client: addr(&f.client),
            ingress: addr(&f.ingress),
            local: addr(&f.local),
            upstream: addr(&f.upstream),
            bytes_up: f.agent_bytes_up + kernel_up,
            bytes_down: f.agent_bytes_down + kernel_down,
            started_unix_ms: f.started_unix_ns / 1_000_000,
            age_ms: now_ns.saturating_sub(f.started_unix_ns) / 1_000_000,
        });
    }
    rows.sort_by_key(|r| (r.started_unix_ms, r.cookie));
    Ok(rows)
}

pub fn dump(pins: &PinDir) -> Result<Dump, MapsError> {
    let rows = read(pins)?;
    let mut t = Table::new(&[
        ("DOWNSTREAM", Align::Left),
        ("UPSTREAM", Align::Left),
        ("SNI", Align::Left),
        ("BYTES_UP", Align::Right),
        ("BYTES_DOWN", Align::Right),
        ("AGE", Align::Right),
        ("DATAPATH", Align::Left),
    ]);
    for r in &rows {
        t.row(vec![
            format!("{} -> {}", r.client, r.ingress),
            format!("{} -> {}", r.local, r.upstream),
            r.sni.clone().unwrap_or_else(|| "-".into()),
            r.bytes_up.to_string(),
            r.bytes_down.to_string(),
            human_age(r.age_ms),
            r.datapath.to_owned(),
        ]);
    }
    Ok(Dump {
        json: serde_json::json!({ "flows": rows }),
        text: t.render(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(human_age(450), "450ms");
        assert_eq!(human_age(12_345), "12.3s");
        assert_eq!(human_age(184_000), "3m04s");
        assert_eq!(human_age(3_720_000), "1h02m");
    }
}
