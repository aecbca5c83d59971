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
];

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
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
