//! `maps dump routes`: `ZI_ROUTES` (names, the agent's counters) joined with `ZI_ROUTE_BYTES`
//! (what the verdict redirected, summed over CPUs).

use std::collections::BTreeMap;

use serde::Serialize;
use zone_ingress_common::{ROUTE_ACTIVE, ROUTE_NAME_MAX, RouteBytes, RouteInfo, map_names};

use super::pinned::{PinDir, entries, per_cpu_sum};
use super::table::{Align, Table};
use super::{Dump, MapsError};

#[derive(Debug, Clone, Serialize)]
pub struct RouteRow {
    pub id: u32,
    pub sni: String,
    pub cluster: String,
    /// In the agent's current route table (else removed by a reload, kept for its counters).
    pub active: bool,
    /// Flows the agent handed to the kernel splice.
    pub flows_spliced: u64,
    /// Flows the verdict program carried, counted by the program itself (the endpoint's first
    /// redirected bytes); a handed-over flow whose endpoint never answered is not in it.
    pub kernel_flows: u64,
    pub flows_userspace: u64,
    /// Client -> endpoint: redirected by the kernel plus moved by the agent.
    pub bytes_up: u64,
    /// Endpoint -> client.
    pub bytes_down: u64,
    /// Of `bytes_up`, what the verdict redirected (live spliced flows included).
    pub kernel_bytes_up: u64,
    pub kernel_bytes_down: u64,
}

/// A name field of [`RouteInfo`]; a name longer than the field ends with `...`.
pub(super) fn name_of(field: &[u8; ROUTE_NAME_MAX], len: u16) -> String {
    let len = usize::from(len);
    let mut s = String::from_utf8_lossy(&field[..len.min(ROUTE_NAME_MAX)]).into_owned();
    if len > ROUTE_NAME_MAX {
        s.push_str("...");
    }
    s
}

/// Route id -> (SNI, cluster), for the flow dump.
pub(super) fn names(pins: &PinDir) -> Result<BTreeMap<u32, (String, String)>, MapsError> {
    let map = pins.hash::<u32, RouteInfo>(map_names::ROUTES)?;
    Ok(entries(map_names::ROUTES, &map)?
        .into_iter()
        .map(|(id, r)| {
            (
                id,
                (
                    name_of(&r.sni, r.sni_len),
                    name_of(&r.cluster, r.cluster_len),
                ),
            )
        })
        .collect())
}

pub fn read(pins: &PinDir) -> Result<Vec<RouteRow>, MapsError> {
    let info = pins.hash::<u32, RouteInfo>(map_names::ROUTES)?;
    let bytes = pins.per_cpu_array::<RouteBytes>(map_names::ROUTE_BYTES)?;
    let mut rows = Vec::new();
    for (id, r) in entries(map_names::ROUTES, &info)? {
        let k = per_cpu_sum(map_names::ROUTE_BYTES, &bytes, id, |acc, b| RouteBytes {
            up: acc.up.wrapping_add(b.up),
            down: acc.down.wrapping_add(b.down),
            flows: acc.flows.wrapping_add(b.flows),
        })?;
        rows.push(RouteRow {
            id,
            sni: name_of(&r.sni, r.sni_len),
            cluster: name_of(&r.cluster, r.cluster_len),
            active: r.flags & ROUTE_ACTIVE != 0,
            flows_spliced: r.flows_spliced,
            kernel_flows: k.flows,
            flows_userspace: r.flows_userspace,
            bytes_up: k.up + r.agent_bytes_up,
            bytes_down: k.down + r.agent_bytes_down,
            kernel_bytes_up: k.up,
            kernel_bytes_down: k.down,
        });
    }
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

pub fn dump(pins: &PinDir) -> Result<Dump, MapsError> {
    let rows = read(pins)?;
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("SNI", Align::Left),
        ("CLUSTER", Align::Left),
        ("ACTIVE", Align::Left),
        ("SPLICED", Align::Right),
        ("KERNEL_FLOWS", Align::Right),
        ("USERSPACE", Align::Right),
        ("BYTES_UP", Align::Right),
        ("BYTES_DOWN", Align::Right),
    ]);
    for r in &rows {
        t.row(vec![
            r.id.to_string(),
            r.sni.clone(),
            r.cluster.clone(),
            if r.active { "yes" } else { "no" }.into(),
            r.flows_spliced.to_string(),
            r.kernel_flows.to_string(),
            r.flows_userspace.to_string(),
            r.bytes_up.to_string(),
            r.bytes_down.to_string(),
        ]);
    }
    Ok(Dump {
        json: serde_json::json!({ "routes": rows }),
        text: t.render(),
    })
}
