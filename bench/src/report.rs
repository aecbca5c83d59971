//! Aggregation (median, min, max over runs), the terminal table, `results.json` and `BENCHMARKS.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::Workload;
use crate::proxy::PathKind;

/// One record of `results.json`.
#[derive(Serialize, Clone, Debug)]
pub struct Record {
    pub path: String,
    pub workload: String,
    pub metric: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub unit: String,
    pub runs: usize,
}

/// Every successful run's values: (path, workload, metric) -> (unit, values).
#[derive(Default)]
pub struct Samples(pub BTreeMap<(PathKind, Workload, &'static str), (&'static str, Vec<f64>)>);

impl Samples {
    pub fn add(
        &mut self,
        path: PathKind,
        wl: Workload,
        metric: &'static str,
        v: f64,
        unit: &'static str,
    ) {
        self.0
            .entry((path, wl, metric))
            .or_insert_with(|| (unit, Vec::new()))
            .1
            .push(v);
    }

    pub fn records(&self) -> Vec<Record> {
        self.0
            .iter()
            .map(|((path, wl, metric), (unit, vals))| {
                let mut v = vals.clone();
                v.sort_by(f64::total_cmp);
                Record {
                    path: path.as_str().to_string(),
                    workload: wl.as_str().to_string(),
                    metric: metric.to_string(),
                    median: median(&v),
                    min: v.first().copied().unwrap_or(0.0),
                    max: v.last().copied().unwrap_or(0.0),
                    unit: unit.to_string(),
                    runs: v.len(),
                }
            })
            .collect()
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The table's columns: (workload, metric, heading).
const COLUMNS: &[(Workload, &str, &str)] = &[
    (Workload::Bulk, "mb_s", "bulk MB/s each way"),
    (Workload::Paced, "cpu_s_per_gb", "paced machine CPU s/GB"),
    (
        Workload::Paced,
        "proxy_cpu_s_per_gb",
        "paced proxy CPU s/GB",
    ),
    (Workload::Rpc, "req_s", "rpc req/s"),
    (Workload::Rpc, "p50_us", "rpc p50 µs"),
    (Workload::Rpc, "p99_us", "rpc p99 µs"),
    (Workload::Rpc, "p999_us", "rpc p99.9 µs"),
    (Workload::Connect, "conn_s", "connect conn/s"),
    (
        Workload::Idle,
        "rss_kib_per_flow",
        "idle proxy RSS KiB/flow",
    ),
    (
        Workload::Idle,
        "kernel_kib_per_flow",
        "idle kernel KiB/flow",
    ),
];

/// A figure with three significant digits or so (no digits after the point from 100 up).
pub fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(r: Option<&Record>) -> String {
    match r {
        None => "-".to_string(),
        Some(r) if r.runs == 1 => fmt_num(r.median),
        Some(r) => format!(
            "{} [{}-{}]",
            fmt_num(r.median),
            fmt_num(r.min),
            fmt_num(r.max)
        ),
    }
}

/// Rows of cells: a header row, then one row per path (only columns with data).
pub fn table(records: &[Record], paths: &[PathKind]) -> Vec<Vec<String>> {
    let find = |p: PathKind, wl: Workload, m: &str| {
        records
            .iter()
            .find(|r| r.path == p.as_str() && r.workload == wl.as_str() && r.metric == m)
    };
    let cols: Vec<&(Workload, &str, &str)> = COLUMNS
        .iter()
        .filter(|(wl, m, _)| paths.iter().any(|&p| find(p, *wl, m).is_some()))
        .collect();
    let mut rows = vec![
        std::iter::once("path".to_string())
            .chain(cols.iter().map(|c| c.2.to_string()))
            .collect::<Vec<_>>(),
    ];
    for &p in paths {
        rows.push(
            std::iter::once(p.as_str().to_string())
                .chain(cols.iter().map(|(wl, m, _)| cell(find(p, *wl, m))))
                .collect(),
        );
    }
    rows
}

/// Fixed-width text table for the terminal.
pub fn render_text(rows: &[Vec<String>]) -> String {
    let ncols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..ncols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (s, w))| {
                let pad = w - s.chars().count();
                if c == 0 {
                    format!("{s}{}", " ".repeat(pad))
                } else {
                    format!("{}{s}", " ".repeat(pad))
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  "));
        if i == 0 {
            let _ = writeln!(
                out,
                "{}",
                widths
                    .iter()
                    .map(|w| "-".repeat(*w))
                    .collect::<Vec<_>>()
                    .join("  ")
            );
        }
    }
    out
}

/// GitHub-flavoured Markdown table.
pub fn render_markdown(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(out, "| {} |", r.join(" | "));
        if i == 0 {
            let _ = writeln!(
                out,
                "|{}",
                r.iter()
                    .enumerate()
                    .map(|(c, _)| if c == 0 { "---|" } else { "---:|" })
                    .collect::<String>()
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_median_min_max_per_path_workload_metric() {
        let mut s = Samples::default();
        for v in [300.0, 100.0, 200.0] {
            s.add(PathKind::Sockmap, Workload::Bulk, "mb_s", v, "MB/s");
        }
        for v in [4.0, 2.0] {
            s.add(
                PathKind::Haproxy,
                Workload::Idle,
                "rss_kib_per_flow",
                v,
                "KiB",
            );
        }
        s.add(
            PathKind::Direct,
            Workload::Idle,
            "kernel_kib_per_flow",
            9.5,
            "KiB",
        );
        let r = s.records();
        assert_eq!(r.len(), 3);
        let bulk = r
            .iter()
            .find(|r| r.path == "sockmap" && r.workload == "bulk")
            .expect("bulk record");
        assert_eq!(
            (bulk.median, bulk.min, bulk.max, bulk.runs),
            (200.0, 100.0, 300.0, 3)
        );
        assert_eq!(bulk.metric, "mb_s");
        assert_eq!(bulk.unit, "MB/s");
        let idle = r
            .iter()
            .find(|r| r.path == "haproxy" && r.metric == "rss_kib_per_flow")
            .expect("idle record");
        assert_eq!(
            (idle.median, idle.runs),
            (3.0, 2),
            "even count: mean of the middle two"
        );
        let json = serde_json::to_value(idle).expect("serializes");
        assert_eq!(json["workload"], "idle");
        assert_eq!(json["unit"], "KiB");

        let paths = [PathKind::Direct, PathKind::Sockmap, PathKind::Haproxy];
        let rows = table(&r, &paths);
        assert_eq!(
            rows[0],
            [
                "path",
                "bulk MB/s each way",
                "idle proxy RSS KiB/flow",
                "idle kernel KiB/flow"
            ]
        );
        assert_eq!(rows[1], ["direct", "-", "-", "9.50"]);
        assert_eq!(rows[2], ["sockmap", "200 [100-300]", "-", "-"]);
        assert_eq!(rows[3], ["haproxy", "-", "3.00 [2.00-4.00]", "-"]);
        let md = render_markdown(&rows);
        assert!(md.starts_with("| path | bulk MB/s each way |"), "{md}");
        assert!(md.lines().nth(1).unwrap().starts_with("|---|---:|"), "{md}");
    }
}
