//! The Dockerfile builds with `cargo xtask build`, the same command and toolchains as a developer
//! machine, and ships the binary xtask produces. No Docker engine runs on these machines, so the
//! image itself is not built here; these checks tie its stages to the xtask sources they rely on.

use std::process::Command;

use zone_ingress_deploy::dockerfile::{Dockerfile, Stage, run_commands};
use zone_ingress_deploy::repo_root;

/// xtask's sources: what the builder stage must stay in step with.
const XTASK_BUILD: &str = include_str!("../../../xtask/src/build.rs");
const XTASK_TOOLCHAIN: &str = include_str!("../../../xtask/src/toolchain.rs");
const CARGO_CONFIG: &str = include_str!("../../../.cargo/config.toml");
const WORKSPACE: &str = include_str!("../../../Cargo.toml");

fn dockerfile() -> Dockerfile {
    Dockerfile::parse(&std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap())
        .expect("Dockerfile parses")
}

fn commands(stage: &Stage) -> Vec<String> {
    stage.with_keyword("RUN").flat_map(run_commands).collect()
}

fn arg_default(stage: &Stage, name: &str) -> String {
    stage
        .with_keyword("ARG")
        .find_map(|a| a.args.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("ARG {name}=... with a default"))
        .to_owned()
}

/// `pub const NAME: &str = "value";` in an xtask source.
fn rust_str_const(src: &str, name: &str) -> String {
    let line = src
        .lines()
        .find(|l| l.contains(&format!("const {name}: &str")))
        .unwrap_or_else(|| panic!("xtask has no const {name}"));
    line.split('"').nth(1).unwrap().to_owned()
}

#[test]
fn builder_runs_cargo_xtask_build_and_nothing_hand_rolled() {
    let df = dockerfile();
    assert_eq!(df.stages.len(), 2, "builder + runtime");
    let builder = df.stage("builder").expect("a stage named builder");
    let cmds = commands(builder);
    assert!(
        cmds.iter().any(|c| c == "cargo xtask build"),
        "the builder must run `cargo xtask build`; it runs {cmds:?}"
    );
    // Nothing that duplicates (and could drift from) what xtask does.
    for c in &cmds {
        let words: Vec<&str> = c.split_whitespace().collect();
        if words.first() == Some(&"cargo") {
            assert_eq!(
                words.get(1),
                Some(&"xtask"),
                "hand-rolled cargo command: {c}"
            );
        }
        assert!(
            !c.contains("bpf-linker"),
            "xtask builds bpf-linker itself: {c}"
        );
    }
    // `cargo xtask` is the alias in .cargo/config.toml, which the build context must carry.
    assert!(CARGO_CONFIG.contains("xtask = \"run --quiet --package xtask --\""));
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    for line in ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let pattern = line.trim_end_matches('/');
        for needed in [
            ".cargo",
            "Cargo.toml",
            "Cargo.lock",
            "config",
            "xtask",
            "zone-ingress",
            "zone-ingress-common",
            "zone-ingress-ebpf",
            "tests",
            "bench",
            "deploy",
        ] {
            assert_ne!(
                pattern, needed,
                ".dockerignore drops {needed}, the build needs it"
            );
        }
    }
    for out in ["target/", "zone-ingress-ebpf/target/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == out),
            ".dockerignore must drop {out}"
        );
    }
}

#[test]
fn builder_copies_what_xtask_builds_into_the_runtime() {
    let df = dockerfile();
    let builder = df.stage("builder").unwrap();
    // xtask: agent_binary() = target/release/zone-ingress, built with `build --release -p zone-ingress`.
    assert!(XTASK_BUILD.contains("root.join(\"target/release/zone-ingress\")"));
    assert!(XTASK_BUILD.contains("[\"build\", \"--release\", \"-p\", \"zone-ingress\"]"));
    let cmds = commands(builder);
    let strip = cmds
        .iter()
        .find(|c| c.starts_with("strip "))
        .expect("the binary is stripped of debug info into /out");
    assert!(
        strip.ends_with("-o /out/zone-ingress target/release/zone-ingress"),
        "{strip}"
    );
    assert!(cmds.iter().any(|c| c == "/out/zone-ingress --version"));
    // The target directory is a cache mount in the same RUN as the build: the binary must be
    // copied out of it in that RUN (the cache is not part of the image).
    let build_run = builder
        .with_keyword("RUN")
        .find(|r| run_commands(r).iter().any(|c| c == "cargo xtask build"))
        .unwrap();
    assert!(
        build_run
            .args
            .contains("--mount=type=cache,target=/src/target")
    );
    assert!(
        run_commands(build_run)
            .iter()
            .any(|c| c.starts_with("strip "))
    );

    let runtime = df.stages.last().unwrap();
    assert_eq!(runtime.name.as_deref(), Some("runtime"));
    let copy = runtime
        .with_keyword("COPY")
        .next()
        .expect("COPY in runtime");
    assert_eq!(
        copy.args,
        "--from=builder /out/zone-ingress /usr/local/bin/zone-ingress"
    );
    let entry = runtime.with_keyword("ENTRYPOINT").next().unwrap();
    let entry: Vec<String> = serde_json::from_str(&entry.args).expect("ENTRYPOINT in exec form");
    assert_eq!(entry, ["/usr/local/bin/zone-ingress"]);
    // The binary links glibc: same Debian release in both stages.
    assert!(builder.image.ends_with("-bookworm"), "{}", builder.image);
    assert!(runtime.image.contains("debian12"), "{}", runtime.image);
}

#[test]
fn builder_toolchains_are_the_ones_xtask_uses() {
    let df = dockerfile();
    let builder = df.stage("builder").unwrap();
    // Stable: the workspace's rust-version.
    let rust_version = WORKSPACE
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert_eq!(builder.image, format!("rust:{rust_version}-bookworm"));
    // The nightly: installed with rust-src, reachable under the name xtask passes as +toolchain.
    let nightly = rust_str_const(XTASK_TOOLCHAIN, "NIGHTLY");
    let cmds = commands(builder);
    let install = cmds
        .iter()
        .find(|c| c.starts_with("rustup toolchain install"))
        .expect("rustup toolchain install");
    assert!(install.contains("--component rust-src"), "{install}");
    assert!(
        install.contains("\"nightly-${RUST_NIGHTLY_DATE}\""),
        "{install}"
    );
    assert!(
        cmds.iter().any(|c| c.starts_with("ln -s")
            && c.ends_with(&format!(
                "\"${{RUSTUP_HOME}}/toolchains/{nightly}-x86_64-unknown-linux-gnu\""
            ))),
        "the dated nightly must be reachable as +{nightly}: {cmds:?}"
    );
    assert!(
        cmds.iter()
            .any(|c| c == &format!("rustc +{nightly} --version"))
    );
    // And it is the nightly this machine builds and tests the BPF programs with.
    let date = arg_default(builder, "RUST_NIGHTLY_DATE");
    let out = Command::new("rustc")
        .args([&format!("+{nightly}"), "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .expect("rustc +nightly --print sysroot");
    assert!(out.status.success(), "no {nightly} toolchain here");
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let manifest = std::fs::read_to_string(
        std::path::Path::new(&sysroot).join("lib/rustlib/multirust-channel-manifest.toml"),
    )
    .expect("the nightly's channel manifest");
    let installed = manifest
        .lines()
        .find_map(|l| l.strip_prefix("date = "))
        .unwrap()
        .trim_matches('"');
    assert_eq!(
        date, installed,
        "the Dockerfile pins nightly-{date}, the tests here build with nightly-{installed}"
    );
}
