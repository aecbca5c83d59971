//! `cargo xtask bench`: build the agent (and its BPF programs), then run the side-by-side benchmark
//! (`zone-ingress-bench`, release) against it. The benchmark writes `target/bench/results.json` and
//! regenerates `BENCHMARKS.md` at the repository root.

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
            "--",
        ])
        .arg("--agent")
        .arg(&agent)
        .arg("--markdown")
        .arg(root.join("BENCHMARKS.md"))
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
