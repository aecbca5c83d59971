//! The BPF toolchain: the machine's nightly (never installed or updated here), its `rust-src`, and
//! a bpf-linker built against the nightly's own libLLVM.
//!
//! No system LLVM of the nightly's version exists on these machines, so bpf-linker is built through
//! a fake LLVM prefix whose `llvm-config` reports the nightly's LLVM version and whose `lib/` links
//! to the nightly's `libLLVM.so.*`. The result is cached under `~/.cache/zone-ingress-toolchain/`,
//! keyed by the libLLVM file name, so a new nightly gets its own linker and a rerun costs nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::step;

/// bpf-linker release known to build against LLVM 22 with the recipe below.
const BPF_LINKER_VERSION: &str = "0.13.0";
pub const NIGHTLY: &str = "nightly";

pub struct BpfToolchain {
    /// Directory holding `bpf-linker`, to prepend to PATH for the BPF build.
    pub linker_dir: PathBuf,
}

pub fn ensure_bpf_toolchain() -> Result<BpfToolchain> {
    let sysroot = nightly_sysroot()?;
    ensure_rust_src(&sysroot)?;
    let libllvm = find_libllvm(&sysroot)?;
    let linker_dir = ensure_bpf_linker(&libllvm)?;
    Ok(BpfToolchain { linker_dir })
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args([&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .output()
        .context("running `rustc +nightly --print sysroot` (is rustup installed?)")?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain: the BPF programs build with the machine's nightly (LLVM 22), and xtask \
             never installs or updates toolchains. On a machine without one, run \
             `rustup toolchain install nightly --profile minimal` once.\nrustc said: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn ensure_rust_src(sysroot: &Path) -> Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    step("installing rust-src for the nightly toolchain (needed by -Z build-std)");
    // `component add` only adds the component: it never replaces the installed nightly.
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", NIGHTLY])
        .status()
        .context("running rustup")?;
    if !status.success() {
        bail!(
            "`rustup component add rust-src --toolchain nightly` failed; run it by hand to see why"
        );
    }
    Ok(())
}

fn find_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .collect();
    found.sort();
    found.into_iter().next().with_context(|| {
        format!(
            "the nightly toolchain ships no libLLVM.so.* in {}; bpf-linker cannot be built against it",
            lib.display()
        )
    })
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> ("22.1.0", "22").
fn llvm_version(libllvm_name: &str) -> Result<(String, String)> {
    let rest = libllvm_name
        .strip_prefix("libLLVM.so.")
        .with_context(|| format!("unexpected libLLVM name {libllvm_name}"))?;
    let mut parts = rest.split(['.', '-']);
    let major = parts
        .next()
        .filter(|s| s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty());
    let minor = parts
        .next()
        .filter(|s| s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty());
    match (major, minor) {
        (Some(ma), Some(mi)) => Ok((format!("{ma}.{mi}.0"), ma.to_string())),
        _ => bail!("cannot read an LLVM version from {libllvm_name}"),
    }
}

pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("zone-ingress-toolchain")
}

fn ensure_bpf_linker(libllvm: &Path) -> Result<PathBuf> {
    let name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .context("libLLVM path has no file name")?;
    let prefix = cache_dir().join(name);
    let bin_dir = prefix.join("bpfl/bin");
    let linker = bin_dir.join("bpf-linker");
    if linker_works(&linker) {
        return Ok(bin_dir);
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against {name} (once per nightly, about a minute)"
    ));
    let (version, major) = llvm_version(name)?;
    let llvm = prefix.join("llvm");
    std::fs::create_dir_all(llvm.join("bin"))?;
    std::fs::create_dir_all(llvm.join("lib"))?;
    let config = llvm.join("bin/llvm-config");
    std::fs::write(&config, format!("#!/bin/sh\necho {version}\n"))?;
    set_executable(&config)?;
    // bpf-linker links against lib/libLLVM.so and is given RUNPATH=llvm/lib, but resolves the full
    // soname at run time: both names must exist.
    for link in [llvm.join("lib/libLLVM.so"), llvm.join("lib").join(name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
            "--root",
        ])
        .arg(prefix.join("bpfl"))
        .arg("--target-dir")
        .arg(prefix.join("build"))
        .env("LLVM_PREFIX", &llvm)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() || !linker_works(&linker) {
        bail!(
            "building bpf-linker failed (see the cargo output above). It needs crates.io and a C \
             compiler; the LLVM it links is the nightly's {}",
            libllvm.display()
        );
    }
    Ok(bin_dir)
}

fn linker_works(linker: &Path) -> bool {
    linker.is_file()
        && Command::new(linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut perm = std::fs::metadata(path)?.permissions();
    perm.set_mode(0o755);
    std::fs::set_permissions(path, perm)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llvm_version_from_libllvm_name() {
        let (v, major) = llvm_version("libLLVM.so.22.1-rust-1.97.0-nightly").unwrap();
        assert_eq!(v, "22.1.0");
        assert_eq!(major, "22");
        assert!(llvm_version("libfoo.so").is_err());
        assert!(llvm_version("libLLVM.so.x").is_err());
    }
}
