//! `zone-ingress-bench`: the side-by-side benchmark behind `cargo xtask bench`.
//!
//! Every run builds three fresh network namespaces (client, ingress, backend; plus a client <-> backend veth
//! for the `direct` path), starts one proxy in the ingress namespace, drives one workload with real mTLS
//! (rustls client in the client namespace, rustls backend in the backend namespace: threads of this process
//! after `setns`), then tears everything down. Paths are interleaved in random order for each workload and
//! repetition; each figure is the median of the repetitions, with min and max.
//!
//! Needs root (namespaces, BPF). See `--help`.

mod chart;
mod guard;
mod idle;
mod load;
mod procfs;
mod progress;
mod proxy;
mod report;
mod sys;
mod targets;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::sync::{mpsc, oneshot};
use zone_ingress_tests::agent::{INGRESS_PORT, Metrics};
use zone_ingress_tests::netns::{INGRESS_V4, Topology, ip};
use zone_ingress_tests::pki::Pki;
use zone_ingress_tests::wire::Prng;

use crate::load::{ClientCtx, Measured, ServerMode};
use crate::progress::Progress;
use crate::proxy::{ALL_PATHS, BACKEND_PORT, NGINX_STREAM_MODULE, PathKind, Proxy, ProxySettings};
use crate::report::Samples;

/// The client <-> backend link of the `direct` path.
const DIRECT_CLIENT: &str = "10.231.3.1/24";
const DIRECT_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(10, 231, 3, 2);
/// RLIMIT_NOFILE for this process and the proxies it starts: the idle workload's 10 000 flows are 20 000
/// sockets here (client and backend ends) and 20 000 in the proxy.
const NOFILE: u64 = 1 << 17;
/// Descriptors kept free of the idle flows (listeners, BPF objects, logs, the runtime).
const NOFILE_RESERVE: u64 = 512;

/// The idle flows that fit `nofile` descriptors: each flow is two sockets in this process (client and
/// backend ends) and two in the proxy, whose limit is the same (inherited, or nginx's and HAProxy's own).
fn idle_flows(wanted: usize, nofile: u64) -> usize {
    let fit = nofile.saturating_sub(NOFILE_RESERVE) / 2;
    wanted.min(usize::try_from(fit).unwrap_or(usize::MAX))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Workload {
    Bulk,
    Paced,
    Rpc,
    Connect,
    Idle,
}

const ALL_WORKLOADS: [Workload; 5] = [
    Workload::Bulk,
    Workload::Paced,
    Workload::Rpc,
    Workload::Connect,
    Workload::Idle,
];

impl Workload {
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Bulk => "bulk",
            Workload::Paced => "paced",
            Workload::Rpc => "rpc",
            Workload::Connect => "connect",
            Workload::Idle => "idle",
        }
    }

    fn parse(s: &str) -> Option<Workload> {
        ALL_WORKLOADS.into_iter().find(|w| w.as_str() == s)
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "zone-ingress-bench",
    about = "Side-by-side benchmark of zone-ingress (sockmap, userspace) against direct, HAProxy and nginx",
    version
)]
struct Args {
    /// Small sizes so the whole run takes a few minutes (bulk and paced 256 MiB, rpc and connect 3 s,
    /// idle 2 000 flows).
    #[arg(long)]
    quick: bool,
    /// Where results.json and the charts (<workload>.png) go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The agent binary (default: <workspace>/target/release/zone-ingress).
    #[arg(long, env = "ZONE_INGRESS_BIN")]
    agent: Option<PathBuf>,
    /// Also write this Markdown report (xtask passes <repo>/BENCHMARKS.md).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Copy the charts here too, for the Markdown report to link (xtask passes <repo>/bench/charts).
    #[arg(long, requires = "markdown")]
    charts_dir: Option<PathBuf>,
    /// The lever log to include in the Markdown report when the file exists (xtask passes
    /// <repo>/bench/levers.md).
    #[arg(long)]
    levers: Option<PathBuf>,
    /// Repetitions of every path x workload (at least 3 for a median with a range).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Paths to run, comma-separated: direct,sockmap,userspace,haproxy,nginx (default: all).
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Workloads to run, comma-separated: bulk,paced,rpc,connect,idle (default: all).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// bulk: bytes each way (default 2 GiB, --quick 256 MiB).
    #[arg(long)]
    bulk_bytes: Option<u64>,
    /// paced: bytes (default 2 GiB, --quick 256 MiB).
    #[arg(long)]
    paced_bytes: Option<u64>,
    /// paced: rate in MB/s (10^6 bytes).
    #[arg(long, default_value_t = 500.0)]
    paced_rate: f64,
    /// rpc and connect: seconds of load (default 10, --quick 3).
    #[arg(long)]
    duration: Option<f64>,
    /// rpc: concurrent flows.
    #[arg(long, default_value_t = 16)]
    rpc_flows: usize,
    /// connect: connections in parallel.
    #[arg(long, default_value_t = 64)]
    connect_parallel: usize,
    /// idle: established idle flows held at once (default 10 000, --quick 2 000).
    #[arg(long)]
    idle_flows: Option<usize>,
    /// idle: seconds the flows are held idle before memory is sampled.
    #[arg(long, default_value_t = 3.0)]
    idle_hold: f64,
    /// Do not pin the load generator and the proxy to different CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Where each namespace's receive processing runs. `hosts` (the default when pinned): every
    /// namespace receives on its own side's CPU (RPS), the ingress on the proxy's CPU and the client and
    /// backend on the load generator's, as if they were separate hosts with their own NIC queues.
    /// `off`: the kernel's default for veth, receive processing on the sending CPU, so much of the
    /// ingress's kernel work (all of the splice's) lands on the load generator's CPU.
    #[arg(long, value_enum, default_value_t = Rps::Hosts)]
    rps: Rps,
    /// Generic receive offload on every veth of the topology (`on`, as real NICs have it by
    /// default; on a veth it also means NAPI receive), or veth's default (`off`).
    #[arg(long, value_enum, default_value_t = Gro::Off)]
    gro: Gro,
    /// Seed of the random path order (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Run HAProxy without `option splice-request` / `splice-response`.
    #[arg(long)]
    haproxy_no_splice: bool,
    /// Never run apt-get (fail if haproxy, nginx or nft is missing).
    #[arg(long)]
    no_install: bool,
    /// guard-drop (the XDP guard's drop rate against nftables drop rules on one veth): `on` runs it
    /// after the proxy paths, `only` runs nothing else (BENCHMARKS.md is left alone), `off` skips it.
    #[arg(long, value_enum, default_value_t = GuardDrop::On)]
    guard_drop: GuardDrop,
    /// guard-drop: seconds of SYN flood per run (default 5, --quick 2).
    #[arg(long)]
    guard_drop_secs: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Rps {
    Hosts,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Gro {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum GuardDrop {
    On,
    Only,
    Off,
}

/// Everything one run needs, shared by all runs.
struct Cfg {
    proxy: ProxySettings,
    loadgen_cpu: Option<usize>,
    /// RPS masks (hex) of the ingress namespace's veths and of the client's and backend's, when set.
    rps: Option<RpsMasks>,
    /// GRO on every veth.
    gro: bool,
    bulk_bytes: u64,
    paced_bytes: u64,
    paced_rate: f64,
    duration: Duration,
    rpc_flows: usize,
    connect_parallel: usize,
    idle_flows: usize,
    /// What was asked for; more than `idle_flows` when the open-file limit capped it.
    idle_flows_wanted: usize,
    /// RLIMIT_NOFILE in force for this process and the proxies.
    nofile: u64,
    idle_hold: Duration,
    sha_up: [u8; 32],
    sha_down: [u8; 32],
    sha_paced: [u8; 32],
}

impl Cfg {
    /// The bound of one run (setup, workload, teardown).
    fn limit(&self, wl: Workload) -> Duration {
        let mb = |b: u64| b as f64 / 1e6;
        Duration::from_secs_f64(
            60.0 + match wl {
                // At worst 10 MB/s each way.
                Workload::Bulk => mb(self.bulk_bytes) / 10.0,
                Workload::Paced => 2.0 * mb(self.paced_bytes) / self.paced_rate.max(1.0),
                Workload::Rpc | Workload::Connect => self.duration.as_secs_f64(),
                // At worst 50 flows/s opened, and as long again to close them.
                Workload::Idle => {
                    2.0 * self.idle_flows as f64 / 50.0 + self.idle_hold.as_secs_f64()
                }
            },
        )
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_list<T: Copy>(
    given: &[String],
    all: &[T],
    parse: impl Fn(&str) -> Option<T>,
    what: &str,
) -> Result<Vec<T>> {
    if given.is_empty() {
        return Ok(all.to_vec());
    }
    given
        .iter()
        .map(|s| parse(s.trim()).with_context(|| format!("unknown {what} {s:?}")))
        .collect()
}

/// Installs haproxy / nginx / the nginx stream module when a selected path needs them and they are missing.
fn ensure_packages(paths: &[PathKind], nft: bool, no_install: bool) -> Result<()> {
    let mut missing = Vec::new();
    if nft && !Path::new("/usr/sbin/nft").is_file() {
        missing.push("nftables");
    }
    if paths.contains(&PathKind::Haproxy) && !Path::new("/usr/sbin/haproxy").is_file() {
        missing.push("haproxy");
    }
    if paths.contains(&PathKind::Nginx) {
        if !Path::new("/usr/sbin/nginx").is_file() {
            missing.push("nginx");
        }
        if !Path::new(NGINX_STREAM_MODULE).is_file() {
            missing.push("libnginx-mod-stream");
        }
    }
    if !Path::new(chart::FONT_FILE).is_file() {
        missing.push("fonts-dejavu-core");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if no_install || !sys::is_root() {
        bail!(
            "missing Debian packages {}: run `apt-get update && apt-get install -y {}` as root, or leave out \
             their paths with --paths",
            missing.join(", "),
            missing.join(" ")
        );
    }
    for args in [
        vec!["update", "-q"],
        [vec!["install", "-y", "-q"], missing.clone()].concat(),
    ] {
        eprintln!("bench: apt-get {}", args.join(" "));
        let st = Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("run apt-get")?;
        anyhow::ensure!(st.success(), "`apt-get {}` failed", args.join(" "));
    }
    Ok(())
}

fn run(args: Args) -> Result<()> {
    if !sys::is_root() {
        bail!(
            "the benchmark creates network namespaces and loads BPF programs: run it as root \
             (`sudo cargo xtask bench`)"
        );
    }
    let paths = parse_list(&args.paths, &ALL_PATHS, PathKind::parse, "path")?;
    let workloads = parse_list(&args.workloads, &ALL_WORKLOADS, Workload::parse, "workload")?;
    anyhow::ensure!(args.reps >= 1, "--reps must be at least 1");
    ensure_packages(&paths, args.guard_drop != GuardDrop::Off, args.no_install)?;
    let agent_bin = args.agent.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/zone-ingress")
    });
    if paths.iter().any(|p| p.is_agent()) {
        anyhow::ensure!(
            agent_bin.is_file(),
            "agent binary {} not found: run `cargo xtask bench` (it builds the agent first) or pass --agent",
            agent_bin.display()
        );
    }

    // CPU placement: this process (load generator: client and backend threads, all TLS) on CPU 0, the proxy
    // on CPU 1. Threads created from here on inherit the mask.
    let (loadgen_cpu, proxy_cpu) =
        if !args.no_pin && sys::nproc() >= 2 && sys::pin_current_thread(0) {
            (Some(0), Some(1))
        } else {
            (None, None)
        };
    sys::sweep_stale();
    // idle: this process holds both TLS ends of every flow, and the proxies inherit the limit.
    let nofile = sys::raise_nofile(NOFILE).context("raise RLIMIT_NOFILE")?;

    let mib = 1u64 << 20;
    let bulk_bytes = args
        .bulk_bytes
        .unwrap_or(if args.quick { 256 * mib } else { 2048 * mib });
    let paced_bytes = args
        .paced_bytes
        .unwrap_or(if args.quick { 256 * mib } else { 2048 * mib });
    let duration =
        Duration::from_secs_f64(args.duration.unwrap_or(if args.quick { 3.0 } else { 10.0 }));
    eprintln!("bench: precomputing the SHA-256 of the PRNG streams");
    let has = |w| workloads.contains(&w);
    let sha_of = |on: bool, n, seed| {
        if on {
            load::expected_sha(n, seed)
        } else {
            [0; 32]
        }
    };
    let cfg = Arc::new(Cfg {
        proxy: ProxySettings {
            agent_bin: agent_bin.clone(),
            cpu: proxy_cpu,
            haproxy_splice: !args.haproxy_no_splice,
            nofile,
        },
        loadgen_cpu,
        rps: match (args.rps, loadgen_cpu, proxy_cpu) {
            (Rps::Hosts, Some(l), Some(p)) => Some(RpsMasks {
                ingress: format!("{:x}", 1u64 << p),
                peers: format!("{:x}", 1u64 << l),
            }),
            _ => None,
        },
        gro: args.gro == Gro::On,
        bulk_bytes,
        paced_bytes,
        paced_rate: args.paced_rate * 1e6,
        duration,
        rpc_flows: args.rpc_flows,
        connect_parallel: args.connect_parallel,
        idle_flows: idle_flows(
            args.idle_flows
                .unwrap_or(if args.quick { 2_000 } else { 10_000 }),
            nofile,
        ),
        idle_flows_wanted: args
            .idle_flows
            .unwrap_or(if args.quick { 2_000 } else { 10_000 }),
        nofile,
        idle_hold: Duration::from_secs_f64(args.idle_hold.max(0.0)),
        sha_up: sha_of(has(Workload::Bulk), bulk_bytes, load::SEED_UP),
        sha_down: sha_of(has(Workload::Bulk), bulk_bytes, load::SEED_DOWN),
        sha_paced: sha_of(has(Workload::Paced), paced_bytes, load::SEED_PACED),
    });
    let _ = Pki::get();
    if cfg.idle_flows < cfg.idle_flows_wanted && workloads.contains(&Workload::Idle) {
        eprintln!(
            "bench: idle holds {} flows, not {}: the open-file limit is {} and cannot be raised here \
             (no CAP_SYS_RESOURCE)",
            cfg.idle_flows, cfg.idle_flows_wanted, cfg.nofile
        );
    }

    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("build the tokio runtime")?;
    let started = Instant::now();
    let guard_secs = args
        .guard_drop_secs
        .unwrap_or(if args.quick { 2.0 } else { 5.0 });
    if args.guard_drop == GuardDrop::Only {
        let (runs, notes) = rt.block_on(guard::run_all(&agent_bin, guard_secs, args.reps));
        drop(rt);
        return report_guard_drop(&args.out, &runs, &notes);
    }
    let (samples, notes, mut failures) =
        rt.block_on(run_all(cfg.clone(), &paths, &workloads, args.reps, seed));
    let (guard_runs, guard_notes) = if args.guard_drop == GuardDrop::On {
        rt.block_on(guard::run_all(&agent_bin, guard_secs, args.reps))
    } else {
        (Vec::new(), Vec::new())
    };
    drop(rt);
    failures.extend(guard_notes);
    let _ = std::fs::remove_dir_all(Pki::get().dir());

    let records = samples.records();
    let rows = report::table(&records, &paths);
    println!();
    println!("{}", report::render_text(&rows));
    println!(
        "cells: median [min-max] of {} repetitions; wall time {:.0} s",
        args.reps,
        started.elapsed().as_secs_f64()
    );
    for n in notes.iter().chain(&failures) {
        println!("note: {n}");
    }
    let outcomes = targets::evaluate(&records);
    println!("\ntargets (sockmap / peer, medians of this run):");
    print!("{}", targets::render_text(&outcomes));

    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let json = args.out.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&records)? + "\n")
        .with_context(|| format!("write {}", json.display()))?;
    eprintln!("bench: wrote {}", json.display());
    let subtitle = format!(
        "{} repetitions{}",
        args.reps,
        if args.quick { ", --quick" } else { "" }
    );
    let charts = chart::write_all(&args.out, &records, &paths, &workloads, &subtitle)?;
    for c in &charts {
        eprintln!("bench: wrote {}", c.display());
    }
    // Copies next to the Markdown report, where a link to them works on GitHub too.
    let mut linked = Vec::new();
    if let Some(dir) = &args.charts_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        for c in &charts {
            let to = dir.join(c.file_name().context("a chart file has a name")?);
            std::fs::copy(c, &to)
                .with_context(|| format!("copy {} to {}", c.display(), to.display()))?;
            linked.push(to);
        }
    } else {
        linked.clone_from(&charts);
    }
    if !guard_runs.is_empty() {
        report_guard_drop(&args.out, &guard_runs, &[])?;
    }
    if let Some(md) = &args.markdown {
        let md_dir = md.parent().unwrap_or(Path::new("."));
        let levers = match &args.levers {
            Some(p) if p.is_file() => {
                Some(std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?)
            }
            _ => None,
        };
        let extra = Extra {
            outcomes: &outcomes,
            charts: &linked
                .iter()
                .map(|c| relative_link(md_dir, c))
                .collect::<Vec<_>>(),
            levers: levers.as_deref(),
        };
        let mut text = markdown(&args, &cfg, &rows, &notes, &failures, seed, &extra);
        if !guard_runs.is_empty() {
            text.push_str(&guard_markdown(&guard_runs, guard_secs));
        }
        if let Some(levers) = extra.levers {
            text.push_str(&levers_markdown(levers));
        }
        std::fs::write(md, text).with_context(|| format!("write {}", md.display()))?;
        eprintln!("bench: wrote {}", md.display());
    }
    // A peer (HAProxy, nginx) that fails a run is a finding about that peer, reported above; the exit
    // status fails only for the agent's paths and the direct baseline.
    let ours = failures
        .iter()
        .filter(|f| !f.contains(" haproxy FAILED") && !f.contains(" nginx FAILED"))
        .count();
    if ours > 0 {
        bail!("{ours} run(s) of direct or the agent failed (see the notes above)");
    }
    Ok(())
}

/// Prints the guard-drop table and writes `guard-drop.json` next to results.json.
fn report_guard_drop(out: &Path, runs: &[guard::DropRun], notes: &[String]) -> Result<()> {
    println!();
    println!("guard-drop: SYN flood from one source outside the allow-list, one veth");
    print!("{}", guard::render_markdown(runs));
    for n in notes {
        println!("note: {n}");
    }
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let json = out.join("guard-drop.json");
    std::fs::write(&json, serde_json::to_string_pretty(runs)? + "\n")
        .with_context(|| format!("write {}", json.display()))?;
    eprintln!("bench: wrote {}", json.display());
    anyhow::ensure!(notes.is_empty(), "{} guard-drop run(s) failed", notes.len());
    Ok(())
}

fn guard_markdown(runs: &[guard::DropRun], secs: f64) -> String {
    format!(
        "\n## XDP guard: drop rate against nftables\n\n\
         A SYN flood from one source outside the allow-list ({secs:.0} s per run, hand-built frames from a \
         packet socket with sendmmsg, batches of 64) into the ingress's veth; each filter drops it. On a veth \
         the receive work runs in softirq on the sending CPU, so a cheaper drop shows as more packets per \
         second. `xdp-*`: the agent's guard (allow-list drop, counted by its counter); `nft-netdev-ingress`: \
         a `netdev` table on the veth's ingress hook; `nft-inet-prerouting`: an `inet` table at raw priority; \
         `none`: no filter (the stack answers every SYN). Median [min-max] over the repetitions; also in \
         `target/bench/guard-drop.json`.\n\n{}",
        guard::render_markdown(runs)
    )
}

fn shuffle<T>(v: &mut [T], rng: &mut Prng) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

async fn run_all(
    cfg: Arc<Cfg>,
    paths: &[PathKind],
    workloads: &[Workload],
    reps: usize,
    seed: u64,
) -> (Samples, Vec<String>, Vec<String>) {
    let mut rng = Prng::new(seed);
    let mut samples = Samples::default();
    let (mut notes, mut failures) = (Vec::new(), Vec::new());
    let progress = Progress::default();
    let (stop_ticker, stop_rx) = oneshot::channel();
    let ticker = tokio::spawn(progress.clone().ticker(stop_rx));
    let total = reps * workloads.len() * paths.len();
    let mut run = 0;
    for rep in 1..=reps {
        for &wl in workloads {
            let mut order = paths.to_vec();
            shuffle(&mut order, &mut rng);
            for path in order {
                run += 1;
                progress.start_run(format!(
                    "[run {run}/{total}, rep {rep}/{reps}] {} {path}",
                    wl.as_str()
                ));
                let t = Instant::now();
                let res = guarded(cfg.clone(), path, wl, progress.clone()).await;
                let secs = t.elapsed().as_secs_f64();
                Progress::clear_line();
                match res {
                    Ok(m) => {
                        let figs: Vec<String> = m
                            .figures
                            .iter()
                            .map(|(k, v, u)| {
                                format!(
                                    "{k}={v:.2}{}",
                                    if u.is_empty() { "" } else { " " }.to_string() + u
                                )
                            })
                            .collect();
                        eprintln!(
                            "[rep {rep}/{reps}] {:<8} {:<10} {}  ({secs:.1} s)",
                            wl.as_str(),
                            path.as_str(),
                            figs.join(", ")
                        );
                        for (k, v, u) in m.figures {
                            samples.add(path, wl, k, v, u);
                        }
                        for n in m.notes {
                            eprintln!("    note: {n}");
                            notes.push(format!("rep {rep} {} {path}: {n}", wl.as_str()));
                        }
                    }
                    Err(e) => {
                        eprintln!(
                            "[rep {rep}/{reps}] {:<8} {:<10} FAILED ({secs:.1} s): {e:#}",
                            wl.as_str(),
                            path.as_str()
                        );
                        failures.push(format!("rep {rep} {} {path} FAILED: {e:#}", wl.as_str()));
                    }
                }
            }
        }
    }
    let _ = stop_ticker.send(());
    let _ = ticker.await;
    (samples, notes, failures)
}

/// Runs one path x workload on its own task, bounded in time; a panic or a time-out is a failed run, and
/// the run's guards (proxy, namespaces, pins) are dropped either way.
async fn guarded(
    cfg: Arc<Cfg>,
    path: PathKind,
    wl: Workload,
    progress: Progress,
) -> Result<Measured> {
    let limit = cfg.limit(wl);
    let mut task = tokio::spawn(run_one(cfg, path, wl, progress));
    match tokio::time::timeout(limit, &mut task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) if e.is_panic() => {
            let p = e.into_panic();
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".to_string());
            bail!("panicked: {msg}")
        }
        Ok(Err(e)) => bail!("run task failed: {e}"),
        Err(_) => {
            task.abort();
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
            bail!("did not finish within {limit:?}")
        }
    }
}

/// Writes a sysctl of the namespace the calling thread is in (used through `Netns::exec`).
fn set_sysctl(key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    if let Err(e) = std::fs::write(&path, value) {
        eprintln!("bench: could not set {key}={value}: {e}");
    }
}

struct RpsMasks {
    ingress: String,
    peers: String,
}

/// Sets the RPS CPU mask of `devs` in namespace `ns` (`ip netns exec` remounts /sys for that namespace).
fn set_rps(ns: &str, devs: &[&str], mask: &str) {
    for dev in devs {
        let script = format!("echo {mask} > /sys/class/net/{dev}/queues/rx-0/rps_cpus");
        let ok = Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", &script])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("bench: could not set rps_cpus={mask} on {dev} in {ns}");
        }
    }
}

async fn run_one(
    cfg: Arc<Cfg>,
    path: PathKind,
    wl: Workload,
    progress: Progress,
) -> Result<Measured> {
    let topo = Topology::new();
    // The direct path's own link: client 10.231.3.1 <-> backend 10.231.3.2.
    let (c, b) = (
        topo.client.name().to_string(),
        topo.backend.name().to_string(),
    );
    ip(&[
        "-n",
        &c,
        "link",
        "add",
        "to-backend",
        "type",
        "veth",
        "peer",
        "name",
        "to-client",
        "netns",
        &b,
    ]);
    ip(&["-n", &c, "addr", "add", DIRECT_CLIENT, "dev", "to-backend"]);
    ip(&[
        "-n",
        &b,
        "addr",
        "add",
        &format!("{DIRECT_BACKEND_V4}/24"),
        "dev",
        "to-client",
    ]);
    ip(&["-n", &c, "link", "set", "to-backend", "up"]);
    ip(&["-n", &b, "link", "set", "to-client", "up"]);
    // Many short connections (connect): a wide port range and TIME_WAIT reuse on the connecting sides.
    for ns in [&topo.client, &topo.ingress] {
        ns.exec(|| {
            set_sysctl("net.ipv4.ip_local_port_range", "10240 65535");
            set_sysctl("net.ipv4.tcp_tw_reuse", "1");
        });
    }

    if let Some(rps) = &cfg.rps {
        set_rps(
            topo.ingress.name(),
            &["to-client", "to-backend"],
            &rps.ingress,
        );
        set_rps(&c, &["to-ingress", "to-backend"], &rps.peers);
        set_rps(&b, &["to-ingress", "to-client"], &rps.peers);
    }
    if cfg.gro {
        let sides = [
            (&topo.ingress, ["to-client", "to-backend"]),
            (&topo.client, ["to-ingress", "to-backend"]),
            (&topo.backend, ["to-ingress", "to-client"]),
        ];
        for (ns, devs) in sides {
            ns.exec(move || {
                for dev in devs {
                    if let Err(e) = sys::set_gro(dev, true) {
                        eprintln!("bench: could not turn GRO on for {dev}: {e}");
                    }
                }
            });
        }
    }

    let listener = topo
        .backend
        .exec(|| load::backend_listener(BACKEND_PORT))
        .context("backend listener")?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (rep_tx, rep_rx) = mpsc::unbounded_channel();
    let mode = match wl {
        Workload::Bulk => ServerMode::Bulk {
            send: cfg.bulk_bytes,
        },
        Workload::Paced => ServerMode::Sink,
        Workload::Rpc | Workload::Connect | Workload::Idle => ServerMode::Echo,
    };
    let backend = topo
        .backend
        .spawn(move || load::serve(listener, mode, stop_rx, rep_tx));

    let mut proxy = match path {
        PathKind::Direct => None,
        p => Some(Proxy::start(&topo.ingress, p, &cfg.proxy).await?),
    };
    let target = match path {
        PathKind::Direct => SocketAddr::new(DIRECT_BACKEND_V4.into(), BACKEND_PORT),
        _ => SocketAddr::new(INGRESS_V4.into(), INGRESS_PORT),
    };
    let ctx = ClientCtx {
        target,
        reports: rep_rx,
        proxy_pid: proxy.as_ref().map(Proxy::pid),
        limit: cfg.limit(wl).saturating_sub(Duration::from_secs(20)),
        progress,
    };
    let c2 = cfg.clone();
    let measured = topo
        .client
        .spawn(move || async move {
            match wl {
                Workload::Bulk => load::bulk(ctx, c2.bulk_bytes, c2.sha_up, c2.sha_down).await,
                Workload::Paced => {
                    load::paced(ctx, c2.paced_bytes, c2.paced_rate, c2.sha_paced).await
                }
                Workload::Rpc => load::rpc(ctx, c2.rpc_flows, c2.duration).await,
                Workload::Connect => load::connect(ctx, c2.connect_parallel, c2.duration).await,
                Workload::Idle => idle::idle(ctx, c2.idle_flows, c2.idle_hold).await,
            }
        })
        .await;

    let mut measured = match (measured, proxy.as_mut()) {
        (Err(e), Some(p)) => {
            let state = if p.is_running() {
                "still running"
            } else {
                "EXITED"
            };
            let log = p.log_tail();
            let log = if log.trim().is_empty() {
                " (its log is empty)".to_string()
            } else {
                format!("; its log:\n{log}")
            };
            bail!("{e:#} [{path} {state}{log}]");
        }
        (r, _) => r?,
    };
    if let Some(p) = proxy.as_mut() {
        anyhow::ensure!(
            p.is_running(),
            "{path} exited during the run ({}); its log:\n{}",
            p.status(),
            p.log_tail()
        );
        if path == PathKind::Sockmap
            && let Some(m) = p.agent_metrics(&topo.ingress).await
        {
            measured.notes.extend(check_spliced(&m));
        }
    }
    drop(stop_tx);
    let _ = tokio::time::timeout(Duration::from_secs(10), backend).await;
    drop(proxy);
    drop(topo);
    Ok(measured)
}

/// On the sockmap path every flow must have been spliced; says so when some fell back to the copy.
fn check_spliced(m: &Metrics) -> Vec<String> {
    let spliced = m.get("zone_ingress_flows_total", &[("datapath", "sockmap")]);
    let copied_flows = m.get("zone_ingress_flows_total", &[("datapath", "userspace")]);
    let copied = m.sum("zone_ingress_userspace_copied_bytes_total");
    if std::env::var_os("ZI_BENCH_SPLICE_STATS").is_some() {
        // Flow-control diagnostics for tuning runs (bench/levers.md), not part of the report.
        eprintln!(
            "  splice: {} pauses, {:.1} MiB forwarded by the agent, redirect queue peak {:.1} MiB, \
             {} integrity errors",
            m.sum("zone_ingress_splice_pauses_total"),
            copied / 1048576.0,
            m.sum("zone_ingress_splice_redirect_queue_peak_bytes") / 1048576.0,
            m.sum("zone_ingress_splice_integrity_errors_total"),
        );
    }
    let mut notes = Vec::new();
    if spliced == 0.0 || copied_flows > 0.0 {
        notes.push(format!(
            "sockmap path: {spliced} flows spliced, {copied_flows} fell back to the userspace copy \
             ({copied} bytes copied): the figure is not a pure kernel-splice figure"
        ));
    }
    notes
}

fn version_of(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("?").trim().to_string()
        })
        .unwrap_or_else(|| "not installed".to_string())
}

/// What the Markdown report has beyond the table: the targets, the charts (links relative to the report)
/// and the lever log.
struct Extra<'a> {
    outcomes: &'a [targets::Outcome],
    charts: &'a [String],
    levers: Option<&'a str>,
}

/// `to` as a link from a file in `from_dir`: relative when `to` is below `from_dir`, else absolute.
fn relative_link(from_dir: &Path, to: &Path) -> String {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (from, to) = (abs(from_dir), abs(to));
    to.strip_prefix(&from)
        .unwrap_or(&to)
        .to_string_lossy()
        .into_owned()
}

/// The lever log (bench/levers.md), verbatim under its own heading.
fn levers_markdown(levers: &str) -> String {
    format!(
        "\n## Levers tried on the kernel path\n\nThe lever log, `bench/levers.md`, as it was when this report was \
         generated:\n\n{}\n",
        levers.trim_end()
    )
}

fn markdown(
    args: &Args,
    cfg: &Cfg,
    rows: &[Vec<String>],
    notes: &[String],
    failures: &[String],
    seed: u64,
    extra: &Extra<'_>,
) -> String {
    let command = std::env::var("ZI_BENCH_COMMAND")
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    let date = sys::command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let commit = sys::command_line("git", &["rev-parse", "--short", "HEAD"]);
    let mib = |b: u64| b >> 20;
    let secs = cfg.duration.as_secs_f64();
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `{command}` on {date} (commit `{commit}`). Regenerate with `cargo xtask bench` (full sizes) \
         or `cargo xtask bench --quick`; every record is also in `target/bench/results.json`.\n"
    );
    let _ = writeln!(
        s,
        "- Machine: {} CPUs ({}), {:.1} GiB memory",
        sys::nproc(),
        sys::cpu_model(),
        sys::mem_total_gib()
    );
    let _ = writeln!(s, "- Kernel: `{}`", sys::command_line("uname", &["-r"]));
    let _ = writeln!(
        s,
        "- Peers: {}; {}",
        version_of("haproxy", "-v"),
        version_of("nginx", "-v")
    );
    let _ = writeln!(
        s,
        "- Sizes: bulk {} MiB each way; paced {} MiB at {:.0} MB/s; rpc {} flows x 1 KiB request/response for {secs:.0} s; \
         connect {} in parallel for {secs:.0} s; idle {} flows{} held {:.0} s; {} repetitions, paths in random \
         order (seed {seed}) for every workload and repetition",
        mib(cfg.bulk_bytes),
        mib(cfg.paced_bytes),
        cfg.paced_rate / 1e6,
        cfg.rpc_flows,
        cfg.connect_parallel,
        cfg.idle_flows,
        if cfg.idle_flows < cfg.idle_flows_wanted {
            format!(
                " (capped from {} by the open-file limit of {}: no CAP_SYS_RESOURCE to raise it)",
                cfg.idle_flows_wanted, cfg.nofile
            )
        } else if cfg.idle_flows < 10_000 {
            " (fewer than the 10 000 of a full run)".to_string()
        } else {
            String::new()
        },
        cfg.idle_hold.as_secs_f64(),
        args.reps
    );
    let placement = match (cfg.loadgen_cpu, cfg.proxy.cpu) {
        (Some(l), Some(p)) => format!(
            "load generator (client and backend threads, all the TLS) pinned to CPU {l}; the proxy pinned to CPU {p} \
             (`taskset`); {}",
            if cfg.rps.is_some() {
                format!(
                    "receive processing as on separate hosts (`--rps hosts`, RPS on every veth): the ingress \
                     namespace's on CPU {p}, the client's and backend's on CPU {l}, so the softirq and \
                     kernel workers a proxy causes run on the proxy's CPU"
                )
            } else {
                "receive processing on the sending CPU (`--rps off`, veth's default)".to_string()
            }
        ),
        _ => "nothing pinned; receive processing on the sending CPU (veth's default)".to_string(),
    };
    let _ = writeln!(s, "- CPU placement: {placement}\n");
    let _ = writeln!(s, "{}", report::render_markdown(rows));
    let _ = writeln!(s, "Cells: median [min-max] over the repetitions.\n");
    let _ = writeln!(s, "## Targets\n");
    let _ = writeln!(
        s,
        "The benchmark issue's targets for the kernel splice, as ratios of this run's medians \
         (`sockmap` over the peer named):\n"
    );
    let _ = writeln!(s, "{}", targets::render_markdown(extra.outcomes));
    if !extra.charts.is_empty() {
        let _ = writeln!(s, "## Charts\n");
        let _ = writeln!(
            s,
            "Bars: medians; whiskers: min to max over the repetitions.\n"
        );
        for c in extra.charts {
            let name = Path::new(c)
                .file_stem()
                .map_or_else(|| c.clone(), |n| n.to_string_lossy().into_owned());
            let _ = writeln!(s, "![{name}]({c})\n");
        }
    }
    let _ = writeln!(s, "## How it is measured\n");
    for line in [
        "Every run: three fresh network namespaces (client, ingress, backend) joined by veth pairs, plus a \
         client-backend veth for `direct`; the proxy runs in the ingress namespace and never decrypts. Client and \
         backend are rustls (mTLS, test CA, SNI `a601e0c00295a9fbe.backend.80.default.ms`) on threads of the bench \
         process inside their namespaces.",
        "Paths: `direct` (no proxy), `sockmap` and `userspace` (the agent's `--datapath`), `haproxy` (`mode tcp`, \
         `tcp-request inspect-delay` + `req.ssl_sni`, `option splice-request` + `splice-response`, 1 thread when \
         pinned), `nginx` (`stream`, `ssl_preread`, `proxy_half_close on`, `proxy_buffer_size 64k`, 1 worker).",
        "bulk: one flow, N bytes each way at once; MB/s each way = N / time until both directions are done; byte \
         counts and SHA-256 checked at both far ends.",
        "paced: one flow, client to backend at a fixed rate; machine CPU = busy CPU-seconds of the whole machine \
         from /proc/stat (user+nice+system+irq+softirq, so softirq and kernel workers count) between the first byte \
         sent and the backend's verified last byte, per 10^9 bytes; proxy CPU = utime+stime of the proxy process and \
         its children. The load generator's TLS is inside the machine figure (the same for every path).",
        "rpc: 1 KiB request, 1 KiB echoed response, over 16 concurrent flows for a fixed time; latency per request \
         at the client.",
        "connect: 64 loops of new TCP connection + full mTLS handshake (rustls may resume sessions) + one 1 KiB \
         RPC + close both ways; connections/s.",
        "Receive placement (`--rps hosts`, the default when pinned): a veth runs its receiver's softirq on the \
         sending CPU, so without RPS most of the ingress's kernel work (all of the splice's: the verdict and \
         the redirect worker) would run on the load generator's CPU, and the proxy's own CPU would be idle \
         for the splice and busy for the copies. RPS on every veth puts each namespace's receive processing \
         on its own side's CPU, as separate hosts with their own NIC queues would. The cross-CPU hand-off \
         costs every proxied path IPIs (machine CPU per GB and rpc latency are higher than with \
         `--rps off` for all of them); `--rps off` reproduces the old placement (bench/levers.md, section 12).",
        "Machine CPU floor: the client's and backend's TLS and TCP are in every path's machine CPU, so \
         `direct` is the floor no proxy can go below; the paced target of 0.6x HAProxy's machine CPU lies \
         below that floor whenever HAProxy adds less than two thirds to it, and leaves a path little \
         more than what `direct` costs when HAProxy adds a little more.",
        "HAProxy's forced splice lost the tail of a half-closed flow in some bulk runs here (see the notes when \
         it happens); `--haproxy-no-splice` runs it without splice.",
        "Machine-wide CPU counts everything on the host, including other work running at the same time: on a \
         shared 2-CPU VM the ranges are wide; compare paths within one run, not across runs.",
        "idle: N flows opened (64 handshakes at a time), each with its mTLS handshake and one 1 KiB echo (which \
         also drains the server's session tickets), then held idle; after the hold, proxy RSS per flow = growth \
         of VmRSS of the proxy and its children (nginx's workers) since before the first flow, over N; kernel \
         memory per flow = growth of `SUnreclaim` (/proc/meminfo: sockets, skbs, BPF socket state) plus `TCP mem` \
         pages (/proc/net/sockstat), over N; each memory figure is the median of 5 readings over about \
         a second, before the first flow and at the end of the hold. The kernel figure is machine-wide, so it holds the client's and the \
         backend's sockets too: `direct` (two sockets per flow) is that floor, a proxy adds two more sockets and \
         its own state. Then every flow closes (EOF both ways) and the proxy's namespace must be back to its TCP \
         socket count within 30 s. The benchmark raises RLIMIT_NOFILE (inherited by the agent) to 131072 when it \
         may, else to the hard limit, and holds fewer flows if they would not fit; HAProxy's `maxconn` (with \
         `maxpipes 128`) and nginx's `worker_connections` are sized to that limit (30 000 flows at most).",
    ] {
        let _ = writeln!(s, "- {line}");
    }
    if !notes.is_empty() || !failures.is_empty() {
        let _ = writeln!(s, "\n## Notes from this run\n");
        for n in failures.iter().chain(notes) {
            let _ = writeln!(s, "- {}", n.replace('\n', " "));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_flows_fit_the_open_file_limit() {
        assert_eq!(idle_flows(10_000, NOFILE), 10_000);
        assert_eq!(idle_flows(10_000, 20_000), 9_744);
        assert_eq!(idle_flows(2_000, 20_000), 2_000);
        assert_eq!(idle_flows(10_000, 100), 0);
    }

    #[test]
    fn lever_log_is_included_verbatim_and_links_are_relative() {
        let log = "| lever | effect |\n|---|---|\n| SO_RCVBUF | none |\n";
        let md = levers_markdown(log);
        assert!(
            md.starts_with("\n## Levers tried on the kernel path\n"),
            "{md}"
        );
        assert!(md.contains(log.trim_end()), "{md}");
        let dir = tempfile::tempdir().expect("temp dir");
        let charts = dir.path().join("bench/charts");
        std::fs::create_dir_all(&charts).expect("mkdir");
        let png = charts.join("bulk.png");
        std::fs::write(&png, b"x").expect("write");
        assert_eq!(relative_link(dir.path(), &png), "bench/charts/bulk.png");
        assert_eq!(
            relative_link(&charts.join("elsewhere"), &png),
            std::fs::canonicalize(&png).unwrap().display().to_string()
        );
    }
}
