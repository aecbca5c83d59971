//! `cargo xtask soak`: build the agent (and its BPF programs), then run `zone-ingress-soak` (release)
//! against it: mixed traffic for N minutes, every byte verified, memory watched.

use anyhow::{Context, Result, bail};

use crate::{build, debian, step, workspace_root};

pub fn run(minutes: f64, datapath: &str, extra: &[String]) -> Result<()> {
    if !debian::is_root() {
        bail!(
            "the soak creates network namespaces and loads BPF programs: run `cargo xtask soak` as root"
        );
    }
    debian::ensure(debian::TEST_PACKAGES)?;
    let agent = build::build_all()?;
    let root = workspace_root();
    step(&format!(
        "zone-ingress-soak --minutes {minutes} --datapath {datapath} {}",
        extra.join(" ")
    ));
    let mut cmd = build::clean_cargo();
    cmd.current_dir(&root)
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "zone-ingress-bench",
            "--bin",
            "zone-ingress-soak",
            "--",
        ])
        .arg("--minutes")
        .arg(minutes.to_string())
        .arg("--datapath")
        .arg(datapath)
        .args(extra)
        .env("ZONE_INGRESS_BIN", &agent);
    // A long run at `info` would log every reset flow; warnings and errors are what a soak wants.
    if std::env::var_os("ZI_AGENT_LOG").is_none() {
        cmd.env("ZI_AGENT_LOG", "warn");
    }
    let status = cmd
        .status()
        .context("running cargo run -p zone-ingress-bench --bin zone-ingress-soak")?;
    if !status.success() {
        bail!("the soak failed ({status}; see above)");
    }
    Ok(())
}
