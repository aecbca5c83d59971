//! `cargo xtask`: build, run and test zone-ingress on a fresh machine.
//!
//! Everything a command needs is installed here, idempotently: the nightly's `rust-src`, a
//! bpf-linker built against the nightly's own libLLVM (cached), and Debian packages. Toolchains are
//! never updated: `rustup update` would replace the nightly and break every bpf-linker built on it.

mod bench;
mod build;
mod debian;
mod fuzz;
mod soak;
mod test;
mod toolchain;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run and test zone-ingress",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the BPF programs (nightly, bpfel-unknown-none) and the agent (release) with them embedded.
    Build,
    /// Build, then run the agent. With no arguments it runs on the embedded default configuration.
    Run {
        /// Arguments for `zone-ingress run` (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, check formatting and lints, then run every test (needs root: tests load BPF and create
    /// network namespaces).
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Skip the fuzz smoke step (each fuzz target for 30 s after the tests).
        #[arg(long)]
        no_fuzz: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter), after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run the side-by-side benchmark (direct, sockmap, userspace, HAProxy, nginx) as root;
    /// writes DIR/results.json, a PNG chart per workload, and BENCHMARKS.md. Any other
    /// zone-ingress-bench option (`--paths`, `--workloads`, `--reps`, ...; see `zone-ingress-bench
    /// --help`) is passed through, with or without a `--` before it.
    Bench {
        /// Small sizes, so the whole run takes minutes instead of most of an hour.
        #[arg(long)]
        quick: bool,
        /// Where results.json and the charts go (default target/bench).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Further zone-ingress-bench options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the cargo-fuzz targets in fuzz/ (stable toolchain, RUSTC_BOOTSTRAP=1), one after the other,
    /// and print executions and coverage. The corpus grows in fuzz/corpus/<target>; crashes land in
    /// fuzz/artifacts/<target>/.
    Fuzz {
        /// Only this target (client_hello, routes_config, zone_ingress_config, xds).
        #[arg(long)]
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// `address` (AddressSanitizer) or `none` (faster, catches panics only).
        #[arg(long, default_value = "address", value_parser = ["address", "none"])]
        sanitizer: String,
    },
    /// Build, then run mixed mTLS traffic (bulk, RPC, connection churn, slow receivers, resets) through
    /// the real agent in network namespaces for N minutes, every byte verified, printing flows, bytes,
    /// errors, agent RSS and kernel memory once per interval. Fails on any lost or corrupted byte, on
    /// sockets left open, or on memory that keeps growing. Needs root.
    Soak {
        /// Minutes of traffic (fractions allowed).
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// The agent's data path: sockmap, auto or userspace.
        #[arg(long, default_value = "sockmap", value_parser = ["sockmap", "auto", "userspace"])]
        datapath: String,
        /// Extra arguments for zone-ingress-soak (e.g. `--interval 5 --bulk 1`), after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install what the other commands need (nightly rust-src, bpf-linker, Debian packages), then exit.
    Setup,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build => build::build_all().map(|_| ()),
        Command::Run { args } => build::build_all().and_then(|bin| build::run_agent(&bin, &args)),
        Command::Test {
            no_lint,
            no_fuzz,
            args,
        } => test::run(no_lint, no_fuzz, &args),
        Command::Fuzz {
            target,
            seconds,
            sanitizer,
        } => fuzz::run(target.as_deref(), seconds, &sanitizer),
        Command::Bench { quick, out, args } => bench::run(&bench::bench_args(quick, out, args)),
        Command::Soak {
            minutes,
            datapath,
            args,
        } => soak::run(minutes, &datapath, &args),
        Command::Setup => toolchain::ensure_bpf_toolchain()
            .map(|_| ())
            .and_then(|_| debian::ensure(debian::TEST_PACKAGES)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Prints a step heading, so long work shows progress.
pub fn step(msg: &str) {
    eprintln!("==> {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench_args(argv: &[&str]) -> Vec<String> {
        let cli = Cli::try_parse_from(std::iter::once("cargo xtask").chain(argv.iter().copied()))
            .expect("the bench command line parses");
        match cli.command {
            Command::Bench { quick, out, args } => bench::bench_args(quick, out, args),
            _ => panic!("not parsed as bench"),
        }
    }

    #[test]
    fn bench_takes_quick_and_out_with_or_without_a_double_dash() {
        assert_eq!(bench_args(&["bench", "--quick"]), ["--quick"]);
        assert_eq!(
            bench_args(&["bench", "--quick", "--out", "/tmp/b"]),
            ["--quick", "--out", "/tmp/b"]
        );
        assert_eq!(bench_args(&["bench", "--", "--quick"]), ["--quick"]);
        assert_eq!(
            bench_args(&["bench", "--out", "x", "--", "--paths", "sockmap"]),
            ["--out", "x", "--paths", "sockmap"]
        );
        assert_eq!(
            bench_args(&["bench", "--quick", "--paths", "sockmap,direct"]),
            ["--quick", "--paths", "sockmap,direct"]
        );
        assert!(bench_args(&["bench"]).is_empty());
    }
}
