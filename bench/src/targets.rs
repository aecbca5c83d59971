//! The targets of the benchmark issue, as ratios of medians from one run: the kernel splice (`sockmap`)
//! against the userspace copy, the direct connection and HAProxy, each met or not.

use std::fmt::Write as _;

use crate::report::Record;

/// Which side of the bound passes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cmp {
    /// ratio >= bound (throughput, rates).
    AtLeast,
    /// ratio <= bound (CPU, latency).
    AtMost,
}

/// One target: `sockmap`'s median of `metric` over `vs`'s, compared with `bound`.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub what: &'static str,
    pub workload: &'static str,
    pub metric: &'static str,
    pub vs: &'static str,
    pub cmp: Cmp,
    pub bound: f64,
}

/// The path every target is about.
pub const SUBJECT: &str = "sockmap";

pub const TARGETS: &[Target] = &[
    Target {
        what: "bulk throughput vs the userspace copy",
        workload: "bulk",
        metric: "mb_s",
        vs: "userspace",
        cmp: Cmp::AtLeast,
        bound: 1.0,
    },
    Target {
        what: "bulk throughput vs direct",
        workload: "bulk",
        metric: "mb_s",
        vs: "direct",
        cmp: Cmp::AtLeast,
        bound: 0.8,
    },
    Target {
        what: "paced machine CPU per GB vs HAProxy",
        workload: "paced",
        metric: "cpu_s_per_gb",
        vs: "haproxy",
        cmp: Cmp::AtMost,
        bound: 0.6,
    },
    Target {
        what: "paced machine CPU per GB vs the userspace copy",
        workload: "paced",
        metric: "cpu_s_per_gb",
        vs: "userspace",
        cmp: Cmp::AtMost,
        bound: 0.8,
    },
    Target {
        what: "rpc p99 latency vs HAProxy",
        workload: "rpc",
        metric: "p99_us",
        vs: "haproxy",
        cmp: Cmp::AtMost,
        bound: 1.0,
    },
    Target {
        what: "connect rate vs HAProxy",
        workload: "connect",
        metric: "conn_s",
        vs: "haproxy",
        cmp: Cmp::AtLeast,
        bound: 1.0,
    },
];

/// A target's result; `ratio` is None when either side was not measured (or the divisor is zero).
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub target: &'static Target,
    pub ratio: Option<f64>,
}

impl Outcome {
    pub fn met(&self) -> Option<bool> {
        self.ratio.map(|r| match self.target.cmp {
            Cmp::AtLeast => r >= self.target.bound,
            Cmp::AtMost => r <= self.target.bound,
        })
    }
}

fn median(records: &[Record], path: &str, t: &Target) -> Option<f64> {
    records
        .iter()
        .find(|r| r.path == path && r.workload == t.workload && r.metric == t.metric && r.runs > 0)
        .map(|r| r.median)
}

pub fn evaluate(records: &[Record]) -> Vec<Outcome> {
    TARGETS
        .iter()
        .map(|t| {
            let ratio = match (median(records, SUBJECT, t), median(records, t.vs, t)) {
                (Some(a), Some(b)) if b != 0.0 => Some(a / b),
                _ => None,
            };
            Outcome { target: t, ratio }
        })
        .collect()
}

/// A Markdown table: target, bound, ratio from this run, verdict.
pub fn render_markdown(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "| target | sockmap / peer, medians | bound | verdict |\n|---|---:|---:|---|\n",
    );
    for o in outcomes {
        let t = o.target;
        let bound = match t.cmp {
            Cmp::AtLeast => format!("≥ {:.1}×", t.bound),
            Cmp::AtMost => format!("≤ {:.1}×", t.bound),
        };
        let (ratio, verdict) = match (o.ratio, o.met()) {
            (Some(r), Some(true)) => (format!("{r:.2}×"), "**met**"),
            (Some(r), _) => (format!("{r:.2}×"), "not met"),
            (None, _) => ("-".to_string(), "not measured"),
        };
        let _ = writeln!(
            s,
            "| {} (`{}` {}) | {ratio} | {bound} | {verdict} |",
            t.what, t.workload, t.metric
        );
    }
    s
}

/// One line per target for the terminal.
pub fn render_text(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    for o in outcomes {
        let t = o.target;
        let op = match t.cmp {
            Cmp::AtLeast => ">=",
            Cmp::AtMost => "<=",
        };
        let _ = writeln!(
            s,
            "  {:<48} {:>7}  (target {op} {:.1})  {}",
            t.what,
            o.ratio.map_or("-".to_string(), |r| format!("{r:.2}x")),
            t.bound,
            match o.met() {
                Some(true) => "met",
                Some(false) => "NOT MET",
                None => "not measured",
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(path: &str, wl: &str, metric: &str, median: f64) -> Record {
        Record {
            path: path.into(),
            workload: wl.into(),
            metric: metric.into(),
            median,
            min: median,
            max: median,
            unit: String::new(),
            runs: 3,
        }
    }

    #[test]
    fn ratios_and_verdicts() {
        let records = vec![
            rec("sockmap", "bulk", "mb_s", 300.0),
            rec("userspace", "bulk", "mb_s", 250.0),
            rec("direct", "bulk", "mb_s", 400.0),
            rec("sockmap", "paced", "cpu_s_per_gb", 1.2),
            rec("haproxy", "paced", "cpu_s_per_gb", 2.0),
            rec("userspace", "paced", "cpu_s_per_gb", 1.4),
            rec("sockmap", "rpc", "p99_us", 400.0),
            rec("haproxy", "rpc", "p99_us", 400.0),
            rec("haproxy", "connect", "conn_s", 0.0),
            rec("sockmap", "connect", "conn_s", 100.0),
        ];
        let out = evaluate(&records);
        let by = |what: &str| {
            out.iter()
                .find(|o| o.target.what == what)
                .copied()
                .expect("target present")
        };
        let o = by("bulk throughput vs the userspace copy");
        assert_eq!(o.ratio, Some(1.2));
        assert_eq!(o.met(), Some(true));
        let o = by("bulk throughput vs direct");
        assert_eq!(o.ratio, Some(0.75));
        assert_eq!(o.met(), Some(false), "0.75 < 0.8");
        let o = by("paced machine CPU per GB vs HAProxy");
        assert_eq!(o.ratio, Some(0.6));
        assert_eq!(o.met(), Some(true), "exactly at the bound passes");
        assert_eq!(
            by("paced machine CPU per GB vs the userspace copy").met(),
            Some(false),
            "1.2/1.4 = 0.86 > 0.8"
        );
        assert_eq!(by("rpc p99 latency vs HAProxy").met(), Some(true));
        let o = by("connect rate vs HAProxy");
        assert_eq!(o.ratio, None, "a zero divisor is not a ratio");
        assert_eq!(o.met(), None);

        let md = render_markdown(&out);
        assert_eq!(md.lines().count(), 2 + TARGETS.len());
        assert!(
            md.contains("| bulk throughput vs direct (`bulk` mb_s) | 0.75× | ≥ 0.8× | not met |"),
            "{md}"
        );
        assert!(md.contains("| 1.20× | ≥ 1.0× | **met** |"), "{md}");
        assert!(md.contains("| - | ≥ 1.0× | not measured |"), "{md}");
        assert!(render_text(&out).contains("NOT MET"));
    }
}
