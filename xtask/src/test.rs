//! `cargo xtask test`: lint, build the real programs, then run every test against them.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{build, debian, fuzz, step, workspace_root};

pub fn run(no_lint: bool, no_fuzz: bool, extra: &[String]) -> Result<()> {
    let root = workspace_root();
    if !debian::is_root() {
        bail!(
            "the tests load BPF programs and create network namespaces: run `cargo xtask test` as root \
             (they do not pass without it, and they do not skip)"
        );
    }
    debian::ensure(debian::TEST_PACKAGES)?;
    // The benchmark's chart test draws text with this font.
    debian::ensure_file(debian::CHART_FONT, "fonts-dejavu-core")?;
    if !no_lint {
        step("cargo fmt --check");
        ensure_component("rustfmt")?;
        cargo_ok(
            build::clean_cargo()
                .current_dir(&root)
                .args(["fmt", "--all", "--check"]),
        )
        .context("formatting differs: run `cargo fmt --all`")?;
    }
    let obj = build::build_bpf(&root)?;
    if !no_lint {
        step("cargo clippy -D warnings");
        ensure_component("clippy")?;
        cargo_ok(
            build::clean_cargo()
                .current_dir(&root)
                .env("ZONE_INGRESS_BPF_OBJ", &obj)
                .args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--release",
                    "--",
                    "-D",
                    "warnings",
                ]),
        )
        .context("clippy found problems")?;
    }
    let bin = build::build_agent(&root, &obj)?;
    cleanup_stale_test_state();
    step("cargo test --release --workspace");
    cargo_ok(
        build::clean_cargo()
            .current_dir(&root)
            .env("ZONE_INGRESS_BPF_OBJ", &obj)
            .env("ZONE_INGRESS_BIN", &bin)
            .args(["test", "--release", "--workspace"])
            .args(extra),
    )
    .context("tests failed")?;
    if no_fuzz {
        return Ok(());
    }
    // After the tests, so a parser regression the unit tests already catch fails fast there.
    step(&format!(
        "fuzz smoke: every target for {} s",
        fuzz::SMOKE_SECONDS
    ));
    fuzz::smoke().context("fuzz smoke failed")
}

fn cargo_ok(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().context("running cargo")?;
    if !status.success() {
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        bail!("`cargo {}` exited with {status}", args.join(" "));
    }
    Ok(())
}

fn ensure_component(name: &str) -> Result<()> {
    let present = Command::new("cargo")
        .args([
            if name == "rustfmt" { "fmt" } else { "clippy" },
            "--version",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    step(&format!("rustup component add {name}"));
    let status = Command::new("rustup")
        .args(["component", "add", name])
        .status()
        .context("running rustup")?;
    if !status.success() {
        bail!("`rustup component add {name}` failed");
    }
    Ok(())
}

/// Namespaces and BPF pins left by a test run that was killed (a finished run removes its own).
fn cleanup_stale_test_state() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with("zi-") && !owner_alive(name) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix("zi-test-")
                && !owner_alive(&format!("zi-{rest}"))
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Test state is named `zi-<pid>-...` after the test process that made it; a running test run
/// (another worktree, a developer's shell) keeps its own.
fn owner_alive(name: &str) -> bool {
    name.strip_prefix("zi-")
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
}
