//! Builds the BPF object with the nightly toolchain, then the agent (release) with it embedded.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{step, toolchain, workspace_root};

pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// Path of the built BPF object.
pub fn bpf_object(root: &Path) -> PathBuf {
    root.join("target/ebpf")
        .join(BPF_TARGET)
        .join("release/zone-ingress-ebpf")
}

/// Path of the built agent.
pub fn agent_binary(root: &Path) -> PathBuf {
    root.join("target/release/zone-ingress")
}

/// A `cargo` command with the outer cargo's environment removed: `cargo xtask` runs under the
/// stable toolchain, and its CARGO_*/RUSTC*/RUSTUP_TOOLCHAIN variables would otherwise leak into
/// the nested build (wrong toolchain, wrong target dir, wrong flags).
pub fn clean_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let outer = (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS";
        if outer {
            cmd.env_remove(key);
        }
    }
    cmd
}

pub fn build_bpf(root: &Path) -> Result<PathBuf> {
    let tc = toolchain::ensure_bpf_toolchain()?;
    step("building BPF programs (nightly, bpfel-unknown-none)");
    let path = format!(
        "{}:{}",
        tc.linker_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let status = clean_cargo()
        .current_dir(root.join("zone-ingress-ebpf"))
        .args([
            &format!("+{}", toolchain::NIGHTLY),
            "build",
            "--quiet",
            "--release",
            "--target",
            BPF_TARGET,
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(root.join("target/ebpf"))
        .env("PATH", path)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        )
        .status()
        .context("running cargo +nightly build for the BPF programs")?;
    if !status.success() {
        bail!("building the BPF programs failed (see above)");
    }
    let obj = bpf_object(root);
    if !obj.is_file() {
        bail!("the BPF build succeeded but {} is missing", obj.display());
    }
    Ok(obj)
}

pub fn build_agent(root: &Path, bpf_obj: &Path) -> Result<PathBuf> {
    step("building the agent (release)");
    let status = clean_cargo()
        .current_dir(root)
        .args(["build", "--release", "-p", "zone-ingress"])
        .env("ZONE_INGRESS_BPF_OBJ", bpf_obj)
        .status()
        .context("running cargo build for the agent")?;
    if !status.success() {
        bail!("building the agent failed (see above)");
    }
    Ok(agent_binary(root))
}

/// Builds everything; returns the agent binary.
pub fn build_all() -> Result<PathBuf> {
    let root = workspace_root();
    let obj = build_bpf(&root)?;
    build_agent(&root, &obj)
}

pub fn run_agent(bin: &Path, args: &[String]) -> Result<()> {
    let mut cmd = Command::new(bin);
    cmd.arg("run").args(args);
    step(&format!("{} run {}", bin.display(), args.join(" ")));
    // Replace xtask with the agent so signals (Ctrl-C, SIGTERM) reach it directly.
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(err).with_context(|| format!("starting {}", bin.display()))
}
