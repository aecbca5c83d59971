//! `maps dump stats`: the verdict program's counters (`ZI_COUNTERS`, summed over CPUs).

use zone_ingress_common::{PROG_COUNTER_NAMES, map_names};

use super::pinned::{PinDir, per_cpu_sum};
use super::table::{Align, Table};
use super::{Dump, MapsError};

pub fn read(pins: &PinDir) -> Result<Vec<(&'static str, u64)>, MapsError> {
    let counters = pins.per_cpu_array::<u64>(map_names::COUNTERS)?;
    let mut out = Vec::new();
    for (i, name) in PROG_COUNTER_NAMES.iter().enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        let v = per_cpu_sum(map_names::COUNTERS, &counters, index, |a, b| {
            a.wrapping_add(*b)
        })?;
        out.push((*name, v));
    }
    Ok(out)
}

pub fn dump(pins: &PinDir) -> Result<Dump, MapsError> {
    let counters = read(pins)?;
    let mut t = Table::new(&[("COUNTER", Align::Left), ("VALUE", Align::Right)]);
    for (name, v) in &counters {
        t.row(vec![(*name).to_owned(), v.to_string()]);
    }
    let json: serde_json::Map<String, serde_json::Value> = counters
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).into()))
        .collect();
    Ok(Dump {
        json: serde_json::json!({ "counters": json }),
        text: t.render(),
    })
}
