//! Debian packages the commands need, installed with apt-get when their command is missing.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use crate::step;

/// (command that must exist, Debian package that provides it)
/// `bpftool` reads the agent's pinned maps in tests/tests/maps.rs, as an operator would.
pub const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("openssl", "openssl"),
    ("bpftool", "bpftool"),
];

/// The font the benchmark's charts draw text with (fonts-dejavu-core; bench/src/chart.rs reads it).
pub const CHART_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

pub fn have_command(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

pub fn ensure(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(cmd, _)| !have_command(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    install(&missing)
}

/// Installs `package` when `file` (something the package ships) is missing.
pub fn ensure_file(file: &str, package: &str) -> Result<()> {
    if std::path::Path::new(file).is_file() {
        return Ok(());
    }
    install(&[package])
}

fn install(missing: &[&str]) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {} (run `apt-get install {}` as root)",
            missing.join(", "),
            missing.join(" ")
        );
    }
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        step("apt-get update");
        run_apt(&["update", "-q"])?;
    }
    step(&format!("apt-get install {}", missing.join(" ")));
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    run_apt(&args)
}

fn run_apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("`apt-get {}` failed", args.join(" "));
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
