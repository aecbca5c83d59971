//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (its own workspace), built with the
//! stable toolchain.
//!
//! cargo-fuzz passes `-Zsanitizer=address` to rustc for the default AddressSanitizer build, a
//! nightly-only flag. The project's rule is stable for everything but the BPF crate, so the build
//! runs on stable with `RUSTC_BOOTSTRAP=1`, which lets a stable rustc accept `-Z` flags; the
//! compiler is the same one that builds the agent, so the fuzzed code is the shipped code. ASan
//! matters here even though the parsers are safe Rust: the YAML parser underneath
//! (`unsafe-libyaml-norway`) is unsafe code translated from C.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::build::clean_cargo;
use crate::{step, workspace_root};

/// Pinned so a fuzz run means the same thing on every machine; bump deliberately.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Seconds per target for the smoke run of `cargo xtask test`: enough to replay the seeds and
/// the local corpus and explore a little, so a regression in a parser is caught.
pub const SMOKE_SECONDS: u64 = 30;

/// One fuzz target: its name (a `[[bin]]` of fuzz/Cargo.toml), where its seeds live (relative
/// to the workspace root; real configs and xDS fixtures are used where they already are, not
/// copied), and its dictionary.
pub struct Target {
    pub name: &'static str,
    pub seeds: &'static [&'static str],
    pub dict: &'static str,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "client_hello",
        seeds: &["fuzz/seeds/client_hello"],
        dict: "fuzz/dicts/client_hello.dict",
    },
    Target {
        name: "routes_config",
        seeds: &["fuzz/seeds/routes_config", "config"],
        dict: "fuzz/dicts/config.dict",
    },
    Target {
        name: "zone_ingress_config",
        seeds: &["fuzz/seeds/zone_ingress_config", "config"],
        dict: "fuzz/dicts/config.dict",
    },
    Target {
        name: "xds",
        seeds: &["zone-ingress/tests/fixtures/xds"],
        dict: "fuzz/dicts/xds.dict",
    },
];

/// What one run printed last: libFuzzer's final status line and stats.
#[derive(Debug, Default)]
pub struct RunStats {
    pub target: String,
    pub seconds: u64,
    pub execs: Option<u64>,
    pub cov: Option<u64>,
    pub ft: Option<u64>,
    pub corpus: Option<String>,
    pub exec_per_sec: Option<u64>,
}

/// `cargo xtask fuzz`: every target (or one) for `seconds` each, one after the other.
pub fn run(target: Option<&str>, seconds: u64, sanitizer: &str) -> Result<()> {
    let targets: Vec<&Target> = match target {
        Some(name) => vec![TARGETS.iter().find(|t| t.name == name).with_context(|| {
            format!(
                "no fuzz target {name:?}; targets: {}",
                TARGETS
                    .iter()
                    .map(|t| t.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?],
        None => TARGETS.iter().collect(),
    };
    let root = workspace_root();
    ensure_cargo_fuzz()?;
    build(&root, sanitizer)?;
    let mut all = Vec::new();
    for t in targets {
        all.push(run_target(&root, t, seconds, sanitizer)?);
    }
    print_summary(&all);
    Ok(())
}

/// The smoke step of `cargo xtask test`.
pub fn smoke() -> Result<()> {
    run(None, SMOKE_SECONDS, "address")
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)
        });
    if installed {
        return Ok(());
    }
    step(&format!(
        "cargo install cargo-fuzz {CARGO_FUZZ_VERSION} --locked (once, about a minute)"
    ));
    let status = clean_cargo()
        .args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("`cargo install cargo-fuzz --locked` failed (it needs crates.io and a C++ compiler)");
    }
    Ok(())
}

/// A `cargo fuzz` command in the workspace root, on stable with `-Z` flags allowed.
fn cargo_fuzz(root: &Path) -> Command {
    let mut cmd = clean_cargo();
    cmd.current_dir(root)
        .env("RUSTC_BOOTSTRAP", "1")
        .arg("fuzz");
    cmd
}

fn build(root: &Path, sanitizer: &str) -> Result<()> {
    step(&format!(
        "cargo fuzz build (stable + RUSTC_BOOTSTRAP=1, sanitizer {sanitizer})"
    ));
    let status = cargo_fuzz(root)
        .args(["build", "--sanitizer", sanitizer])
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("building the fuzz targets failed (see above)");
    }
    Ok(())
}

fn run_target(root: &Path, t: &Target, seconds: u64, sanitizer: &str) -> Result<RunStats> {
    step(&format!("fuzzing {} for {seconds} s", t.name));
    let corpus = root.join("fuzz/corpus").join(t.name);
    std::fs::create_dir_all(&corpus).with_context(|| format!("create {}", corpus.display()))?;
    let log_dir = root.join("fuzz/target/logs");
    std::fs::create_dir_all(&log_dir)?;
    let log_path = log_dir.join(format!("{}.log", t.name));
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("create {}", log_path.display()))?;
    let mut cmd = cargo_fuzz(root);
    cmd.args(["run", "--sanitizer", sanitizer, t.name])
        .arg(&corpus)
        .args(t.seeds.iter().map(|s| root.join(s)))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-dict={}", root.join(t.dict).display()))
        // A single input that takes this long is a hang worth reporting.
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running cargo fuzz run")?;
    // libFuzzer writes everything to stderr; keep it all in the log, show progress lines.
    let stderr = child.stderr.take().context("piped stderr")?;
    let mut stats = RunStats {
        target: t.name.to_string(),
        seconds,
        ..RunStats::default()
    };
    let mut tail: std::collections::VecDeque<String> = Default::default();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        let _ = writeln!(log, "{line}");
        parse_status(&line, &mut stats);
        if line.contains("INITED") || line.contains("DONE") || line.contains("pulse") {
            eprintln!("    {line}");
        }
        tail.push_back(line);
        if tail.len() > 60 {
            tail.pop_front();
        }
    }
    let status = child.wait().context("waiting for cargo fuzz run")?;
    if !status.success() {
        for l in &tail {
            eprintln!("    {l}");
        }
        bail!(
            "fuzz target {} failed ({status}): the crashing input is in fuzz/artifacts/{}/ (reproduce with \
             `RUSTC_BOOTSTRAP=1 cargo fuzz run {} <file>`); full log {}",
            t.name,
            t.name,
            t.name,
            log_path.display()
        );
    }
    Ok(stats)
}

/// Reads libFuzzer's status lines (`#123 pulse cov: 456 ft: 789 corp: 10/2Kb ... exec/s: 1000`)
/// and final stats (`stat::number_of_executed_units: 123`).
fn parse_status(line: &str, stats: &mut RunStats) {
    if let Some(rest) = line.strip_prefix("stat::number_of_executed_units:") {
        stats.execs = rest.trim().parse().ok();
        return;
    }
    if let Some(rest) = line.strip_prefix("stat::average_exec_per_sec:") {
        stats.exec_per_sec = rest.trim().parse().ok();
        return;
    }
    if !line.starts_with('#') {
        return;
    }
    let mut words = line.split_whitespace();
    let mut prev = "";
    if let Some(Ok(n)) = words.next().map(|w| w.trim_start_matches('#').parse()) {
        stats.execs = Some(n);
    }
    for w in words {
        match prev {
            "cov:" => stats.cov = w.parse().ok().or(stats.cov),
            "ft:" => stats.ft = w.parse().ok().or(stats.ft),
            "corp:" => stats.corpus = Some(w.to_string()),
            "exec/s:" => stats.exec_per_sec = w.parse().ok().or(stats.exec_per_sec),
            _ => {}
        }
        prev = w;
    }
}

fn print_summary(all: &[RunStats]) {
    let show = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    eprintln!("fuzz summary:");
    eprintln!(
        "    {:<20} {:>6} {:>12} {:>8} {:>7} {:>7} {:>14}",
        "target", "secs", "execs", "exec/s", "cov", "ft", "corpus"
    );
    for s in all {
        eprintln!(
            "    {:<20} {:>6} {:>12} {:>8} {:>7} {:>7} {:>14}",
            s.target,
            s.seconds,
            show(s.execs),
            show(s.exec_per_sec),
            show(s.cov),
            show(s.ft),
            s.corpus.as_deref().unwrap_or("?")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_status_lines() {
        let mut s = RunStats::default();
        parse_status(
            "#4096\tpulse  cov: 812 ft: 2345 corp: 120/9876b lim: 4096 exec/s: 2048 rss: 80Mb",
            &mut s,
        );
        assert_eq!((s.execs, s.cov, s.ft), (Some(4096), Some(812), Some(2345)));
        parse_status(
            "#61234\tDONE   cov: 900 ft: 2500 corp: 130/10Kb lim: 4096 exec/s: 2041 rss: 81Mb",
            &mut s,
        );
        assert_eq!((s.execs, s.cov, s.ft), (Some(61234), Some(900), Some(2500)));
        assert_eq!(s.corpus.as_deref(), Some("130/10Kb"));
        parse_status("stat::number_of_executed_units: 61240", &mut s);
        assert_eq!(s.execs, Some(61240));
    }

    #[test]
    fn every_target_is_a_bin_of_the_fuzz_crate_with_its_seeds() {
        let root = workspace_root();
        let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{}\"", t.name)),
                "{} is not a [[bin]] of fuzz/Cargo.toml",
                t.name
            );
            assert!(root.join(t.dict).is_file(), "{} missing", t.dict);
            for s in t.seeds {
                let n = std::fs::read_dir(root.join(s)).map_or(0, |d| d.count());
                assert!(n > 0, "seed dir {s} of {} is empty or missing", t.name);
            }
        }
    }
}
