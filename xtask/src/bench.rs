//! `cargo xtask bench`: build the agent (and its BPF programs), then run the side-by-side benchmark
//! (`zone-ingress-bench`, release) against it. The benchmark writes `target/bench/results.json` and the
//! charts, copies the charts to `bench/charts/` and regenerates `BENCHMARKS.md` at the repository root.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::{build, debian, step, workspace_root};

pub fn run(args: &[String]) -> Result<()> {
    if !debian::is_root() {
        bail!(
            "the benchmark creates network namespaces, loads BPF programs and may apt-get install haproxy and \
             nginx: run `cargo xtask bench` as root"
        );
    }
    debian::ensure(debian::TEST_PACKAGES)?;
    // The charts' text is drawn with DejaVu Sans (read from this package, never through fontconfig).
    debian::ensure_file(debian::CHART_FONT, "fonts-dejavu-core")?;
    let agent = build::build_all()?;
    let root = workspace_root();
    step(&format!("zone-ingress-bench {}", args.join(" ")));
    let status = build::clean_cargo()
        .current_dir(&root)
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "zone-ingress-bench",
            "--bin",
            "zone-ingress-bench",
            "--",
        ])
        .arg("--agent")
        .arg(&agent)
        .arg("--markdown")
        .arg(root.join("BENCHMARKS.md"))
        .arg("--charts-dir")
        .arg(root.join("bench/charts"))
        .arg("--levers")
        .arg(root.join("bench/levers.md"))
        .args(args)
        .env(
            "ZI_BENCH_COMMAND",
            format!("cargo xtask bench {}", args.join(" ")).trim_end(),
        )
        .status()
        .context("running cargo run -p zone-ingress-bench")?;
    if !status.success() {
        bail!("the benchmark failed ({status}; see above)");
    }
    Ok(())
}

/// zone-ingress-bench's arguments from `cargo xtask bench [--quick] [--out DIR] [REST...]`. A `--` in
/// REST (the older spelling `cargo xtask bench -- --quick`) is dropped: everything is for the bench.
pub fn bench_args(quick: bool, out: Option<PathBuf>, rest: Vec<String>) -> Vec<String> {
    let mut args = Vec::new();
    if quick {
        args.push("--quick".to_string());
    }
    if let Some(out) = out {
        args.push("--out".to_string());
        args.push(out.display().to_string());
    }
    args.extend(rest.into_iter().filter(|a| a != "--"));
    args
}
