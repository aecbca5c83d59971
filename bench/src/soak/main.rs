//! `zone-ingress-soak`: the soak behind `cargo xtask soak --minutes N`.
//!
//! Builds client, ingress and backend network namespaces, starts the real agent in the ingress one
//! (sockmap data path by default), and runs a mix of mTLS traffic through it for N minutes: bulk
//! transfers both ways, RPC round trips, a churn of short connections, slow receivers, and flows reset
//! on purpose from either end. Every payload byte is checked against a seeded PRNG stream where it
//! arrives. Once per interval it prints one line: flows, bytes, errors, the agent's RSS and the
//! kernel's memory. At the end it fails (exit 1) on any error (a lost, corrupted or stalled byte, a
//! failed handshake, a refused connection), on sockets or flows left open in the agent's namespace
//! once the traffic stopped, on memory that keeps growing (see [`mem::judge`]), or on kernel TCP
//! memory that does not come back once every socket closed.
//!
//! Needs root (namespaces, BPF).

mod mem;
#[path = "../procfs.rs"]
mod procfs;
mod traffic;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::sync::oneshot;
use zone_ingress_tests::agent::{Agent, Datapath, Metrics, Options, Route};
use zone_ingress_tests::netns::Topology;
use zone_ingress_tests::pki::SNI_BACKEND;

use crate::mem::{Sample, Tolerance};
use crate::traffic::{BurstDirection, Counters, Mix};

const BACKEND_PORT: u16 = 18443;

/// One memory series the growth rule judges: name, how to read it from a sample, its tolerance, unit.
type Series = (&'static str, fn(&Sample) -> f64, Tolerance, &'static str);

#[derive(Parser, Debug)]
#[command(
    name = "zone-ingress-soak",
    about = "Mixed mTLS traffic through the real agent for N minutes; every byte verified; memory watched",
    version
)]
struct Args {
    /// How long the traffic runs (minutes; fractions allowed).
    #[arg(long, default_value_t = 5.0)]
    minutes: f64,
    /// Seconds between progress lines (default: 10, or 30 for runs over 10 minutes).
    #[arg(long)]
    interval: Option<u64>,
    /// Seconds of traffic before memory baselines are taken (default: 20% of the run, at most 60).
    #[arg(long)]
    warmup: Option<u64>,
    /// The agent's data path.
    #[arg(long, default_value = "sockmap", value_parser = ["sockmap", "auto", "userspace"])]
    datapath: String,
    /// Concurrent bulk workers (both directions at once, up to --bulk-max-mib each way).
    #[arg(long, default_value_t = 2)]
    bulk: usize,
    #[arg(long, default_value_t = 64)]
    bulk_max_mib: u64,
    /// Pacing of each bulk direction, MB/s (0: as fast as it goes). Paced by default so the soak
    /// leaves CPU for the rest of the mix on a small machine.
    #[arg(long, default_value_t = 20)]
    bulk_rate_mbs: u32,
    /// Concurrent workers of unpaced bulk flows (8 MiB to --bulk-max-mib each way as fast as the
    /// path goes, then 3 s of rest): the load under which veth drops and TCP retransmits.
    #[arg(long, default_value_t = 1)]
    bursts: usize,
    /// Which way the bursts go: both at once (the default), or one way only (`up`: client to
    /// backend; `down`: backend to client). One-way bursts pause the splice just as often but never
    /// while the same socket also carries the other direction's redirected bytes.
    #[arg(long, value_enum, default_value_t = BurstDirection::Both)]
    burst_direction: BurstDirection,
    /// Concurrent RPC workers (20-200 round trips of 64 B-16 KiB per flow).
    #[arg(long, default_value_t = 4)]
    rpc: usize,
    /// Concurrent churn workers (one short round trip per connection).
    #[arg(long, default_value_t = 4)]
    churn: usize,
    /// Concurrent slow receivers (6-16 MiB read 16 KiB per 10 ms: enough to pause the splice).
    #[arg(long, default_value_t = 2)]
    slow: usize,
    /// Concurrent reset workers (client or backend resets mid-stream; the prefix must verify).
    #[arg(long, default_value_t = 1)]
    resets: usize,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn line(t: Duration, c: &Counters, s: &Sample, m: Option<&Metrics>) -> String {
    let (active, fallbacks) = m.map_or((f64::NAN, f64::NAN), |m| {
        (
            m.get("zone_ingress_downstream_cx_active", &[]),
            // `+ 0.0`: an empty sum is -0.0.
            m.sum("zone_ingress_splice_fallbacks_total") + 0.0,
        )
    });
    format!(
        "soak t={:>5}s flows={} ok={} resets_ok={} errors={} verified={:.1}MiB active={active} fallbacks={fallbacks} \
         agent_rss={:.1}MiB tcp_inuse={} tcp_mem={}pages sunreclaim={:.1}MiB slab={:.1}MiB",
        t.as_secs(),
        c.flows.load(Ordering::Relaxed),
        c.flows_ok.load(Ordering::Relaxed),
        c.resets_ok.load(Ordering::Relaxed),
        c.errors.load(Ordering::Relaxed),
        c.bytes_verified.load(Ordering::Relaxed) as f64 / (1u64 << 20) as f64,
        mib(s.rss_kib),
        s.tcp_inuse,
        s.tcp_mem_pages,
        mib(s.sunreclaim_kib),
        mib(s.slab_kib),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    if !(args.minutes > 0.0 && args.minutes <= 24.0 * 60.0) {
        eprintln!("soak: --minutes must be in (0, 1440]");
        return ExitCode::FAILURE;
    }
    let datapath = match args.datapath.as_str() {
        "sockmap" => Datapath::Sockmap,
        "auto" => Datapath::Auto,
        _ => Datapath::Userspace,
    };
    zone_ingress_tests::require_root();
    zone_ingress_tests::raise_nofile_limit();
    match soak(&args, datapath).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn soak(args: &Args, datapath: Datapath) -> anyhow::Result<bool> {
    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    let interval = Duration::from_secs(
        args.interval
            .unwrap_or(if args.minutes > 10.0 { 30 } else { 10 })
            .max(1),
    );
    let warmup = args
        .warmup
        .map(Duration::from_secs)
        .unwrap_or_else(|| (duration / 5).min(Duration::from_secs(60)));
    let mix = Mix {
        bulk: args.bulk,
        bulk_max: args.bulk_max_mib.max(1) << 20,
        bulk_rate: args.bulk_rate_mbs.saturating_mul(1_000_000),
        bursts: args.bursts,
        burst_direction: args.burst_direction,
        rpc: args.rpc,
        churn: args.churn,
        slow: args.slow,
        resets: args.resets,
    };

    let topo = Topology::new();
    let counters = Arc::new(Counters::default());

    let listener = topo.backend.exec(move || {
        let addr = std::net::SocketAddr::from(([0, 0, 0, 0], BACKEND_PORT));
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(4096)?;
        s.set_nonblocking(true)?;
        std::io::Result::Ok(std::net::TcpListener::from(s))
    })?;
    let (stop_backend, backend_stopped) = oneshot::channel::<()>();
    let backend = {
        let counters = counters.clone();
        topo.backend.spawn(move || async move {
            tokio::select! {
                () = traffic::serve(listener, counters) => {}
                _ = backend_stopped => {}
            }
        })
    };

    let routes = [Route::new(
        SNI_BACKEND,
        &[Topology::backend_addr(BACKEND_PORT)],
    )];
    let agent = Agent::start(&topo.ingress, &routes, Options::new(datapath)).await;
    let pid = agent.pid();
    let before = mem::sample(pid).ok_or_else(|| anyhow::anyhow!("cannot read /proc/{pid}"))?;
    println!(
        "soak: {:.1} min, datapath {}, interval {} s, warm-up {} s, mix {mix:?}; agent pid {pid}",
        args.minutes,
        datapath.as_str(),
        interval.as_secs(),
        warmup.as_secs()
    );
    println!(
        "{}",
        line(
            Duration::ZERO,
            &counters,
            &before,
            Some(&agent.metrics().await)
        )
    );

    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let target = agent.addr();
    let clients = {
        let counters = counters.clone();
        topo.client
            .spawn(move || traffic::run_clients(target, mix, deadline, counters))
    };
    let mut clients = std::pin::pin!(clients);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut after_warmup: Vec<Sample> = Vec::new();
    let mut warm: Option<Sample> = None;
    let mut agent_died = false;
    loop {
        tokio::select! {
            () = &mut clients => break,
            _ = ticker.tick() => {
                let Some(s) = mem::sample(pid) else {
                    agent_died = true;
                    println!("soak: the agent (pid {pid}) is gone");
                    break;
                };
                let m = agent.metrics().await;
                println!("{}", line(start.elapsed(), &counters, &s, Some(&m)));
                if start.elapsed() >= warmup {
                    warm.get_or_insert(s);
                    after_warmup.push(s);
                }
            }
        }
    }
    let traffic_time = start.elapsed();

    // Traffic has stopped: every socket and flow of the run must go away.
    let drain_start = Instant::now();
    let mut drained = None;
    let mut last = before;
    let mut last_metrics = None;
    while !agent_died && drain_start.elapsed() < Duration::from_secs(30) {
        let Some(s) = mem::sample(pid) else {
            agent_died = true;
            break;
        };
        last = s;
        let m = agent.metrics().await;
        let active = m.get("zone_ingress_downstream_cx_active", &[]);
        last_metrics = Some(m);
        if s.tcp_inuse <= before.tcp_inuse && active == 0.0 {
            drained = Some(drain_start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = stop_backend.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), backend).await;
    println!(
        "{}  (after the traffic stopped)",
        line(start.elapsed(), &counters, &last, last_metrics.as_ref())
    );
    // Every socket of the run is closed now (the agent's, the clients', the backend's), so the
    // kernel's TCP memory count should be back where it started.
    let tcp_mem_left = if drained.is_some() {
        Some(tcp_memory_left(before.tcp_mem_pages).await)
    } else {
        None
    };

    // Verdicts.
    let mut failures: Vec<String> = Vec::new();
    let errors = counters.errors.load(Ordering::Relaxed);
    if errors > 0 {
        failures.push(format!("{errors} flow errors (first ones below)"));
    }
    if agent_died {
        failures.push(format!("the agent (pid {pid}) exited during the soak"));
    }
    match drained {
        Some(t) => println!(
            "soak: drained in {:.1} s: tcp_inuse back to {} (before traffic {}), no connection open in the agent",
            t.as_secs_f64(),
            last.tcp_inuse,
            before.tcp_inuse
        ),
        None if !agent_died => failures.push(format!(
            "30 s after the traffic stopped the agent's namespace still has {} TCP sockets (before traffic {}) \
             and downstream_cx_active is {}",
            last.tcp_inuse,
            before.tcp_inuse,
            last_metrics
                .as_ref()
                .map_or(f64::NAN, |m| m.get("zone_ingress_downstream_cx_active", &[]))
        )),
        None => {}
    }
    match tcp_mem_left {
        // Not drained: already a failure above, and sockets still hold memory.
        None => {}
        Some(None) => {
            failures.push("could not read /proc/net/sockstat after the drain".to_string())
        }
        Some(Some((left, allowed))) => {
            println!(
                "soak: kernel TCP memory after the drain: {left:+} pages against before traffic \
                 ({:+.1} MiB; allowed {allowed}, the kernel's per-CPU reserves)",
                left as f64 * 4096.0 / (1u64 << 20) as f64
            );
            if left > allowed as i64 {
                failures.push(format!(
                    "kernel TCP memory stayed {left} pages above its level before traffic with \
                     every socket closed (allowed {allowed}): memory the kernel never got back"
                ));
            }
        }
    }
    if let Some(m) = &last_metrics {
        let integrity = m.sum("zone_ingress_splice_integrity_errors_total");
        if integrity > 0.0 {
            failures.push(format!(
                "zone_ingress_splice_integrity_errors_total is {integrity}"
            ));
        }
    }
    let series: [Series; 3] = [
        (
            "agent RSS",
            |s| mib(s.rss_kib),
            Tolerance {
                abs: 16.0,
                rel: 0.2,
            },
            "MiB",
        ),
        (
            "kernel TCP memory",
            |s| s.tcp_mem_pages as f64,
            Tolerance {
                abs: 4096.0,
                rel: 0.5,
            },
            "pages",
        ),
        (
            "kernel SUnreclaim",
            |s| mib(s.sunreclaim_kib),
            Tolerance {
                abs: 64.0,
                rel: 0.1,
            },
            "MiB",
        ),
    ];
    for (name, get, tol, unit) in series {
        let v: Vec<f64> = after_warmup.iter().map(get).collect();
        match mem::judge(&v, tol) {
            Some(verdict) => {
                println!(
                    "soak: {name}: quarter medians {:.1} / {:.1} / {:.1} / {:.1} {unit}, growth {:+.1} (allowed {:.1}): {}",
                    verdict.quarters[0],
                    verdict.quarters[1],
                    verdict.quarters[2],
                    verdict.quarters[3],
                    verdict.growth,
                    verdict.allowed,
                    if verdict.keeps_growing {
                        "KEEPS GROWING"
                    } else {
                        "stable"
                    }
                );
                if verdict.keeps_growing {
                    failures.push(format!("{name} keeps growing"));
                }
            }
            None => println!(
                "soak: {name}: only {} samples after warm-up, too few to judge a trend (use a longer run or a shorter --interval)",
                v.len()
            ),
        }
    }
    let warm = warm.unwrap_or(before);
    let verified = counters.bytes_verified.load(Ordering::Relaxed);
    println!("---- soak summary ----");
    println!(
        "duration {:.1} min of traffic, datapath {}",
        traffic_time.as_secs_f64() / 60.0,
        datapath.as_str()
    );
    println!(
        "flows {} (completed {}, reset on purpose with intact prefix {}), errors {errors}",
        counters.flows.load(Ordering::Relaxed),
        counters.flows_ok.load(Ordering::Relaxed),
        counters.resets_ok.load(Ordering::Relaxed)
    );
    println!(
        "bytes verified {verified} ({:.2} GiB, {:.1} MB/s average)",
        verified as f64 / (1u64 << 30) as f64,
        verified as f64 / 1e6 / traffic_time.as_secs_f64().max(1e-9)
    );
    println!(
        "agent RSS: before traffic {:.1} MiB, after warm-up {:.1} MiB, end {:.1} MiB",
        mib(before.rss_kib),
        mib(warm.rss_kib),
        mib(last.rss_kib)
    );
    println!(
        "kernel TCP mem: before {} pages, after warm-up {}, end {}; SUnreclaim: {:.1} / {:.1} / {:.1} MiB; \
         Slab: {:.1} / {:.1} / {:.1} MiB (kernel-wide figures include other processes)",
        before.tcp_mem_pages,
        warm.tcp_mem_pages,
        last.tcp_mem_pages,
        mib(before.sunreclaim_kib),
        mib(warm.sunreclaim_kib),
        mib(last.sunreclaim_kib),
        mib(before.slab_kib),
        mib(warm.slab_kib),
        mib(last.slab_kib)
    );
    if let Some(m) = &last_metrics {
        println!(
            "agent: flows {}, splice fallbacks {}, pauses {}, integrity errors {}",
            m.dump("zone_ingress_flows_total")
                .trim()
                .replace('\n', ", "),
            m.sum("zone_ingress_splice_fallbacks_total") + 0.0,
            m.sum("zone_ingress_splice_pauses_total") + 0.0,
            m.sum("zone_ingress_splice_integrity_errors_total") + 0.0
        );
    }
    for e in counters.kept_errors() {
        println!("error: {e}");
    }
    let log = agent.stderr();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
        .take(10)
        .collect();
    if !bad.is_empty() {
        println!("agent log (ERROR lines, first 10):");
        for l in &bad {
            println!("  {l}");
        }
    }
    if failures.is_empty() {
        println!("SOAK PASSED");
        Ok(true)
    } else {
        println!("SOAK FAILED: {}", failures.join("; "));
        Ok(false)
    }
}

/// Kernel TCP memory in pages above `before` once every socket closed, and what is allowed: each
/// CPU may keep up to 1 MiB (256 pages) of socket memory in reserve outside the global count, and
/// the count may still be falling (sockets whose last skb is freed by a deferred kernel worker),
/// so it is read for up to 10 s until it is within that. `None` when it cannot be read.
async fn tcp_memory_left(before: u64) -> Option<(i64, u64)> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let allowed = 256 * cpus;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = mem::tcp_mem_pages()? as i64 - before as i64;
        if left <= allowed as i64 || Instant::now() >= deadline {
            return Some((left, allowed));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
