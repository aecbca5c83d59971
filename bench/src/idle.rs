//! `idle`: many established, idle mTLS flows through one path; what each flow costs in the proxy's memory
//! (RSS of the process and its children) and in the kernel's (unreclaimable slab plus TCP buffer pages),
//! then every flow is closed and the proxy's namespace must return to its socket count from before.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use zone_ingress_tests::wire::Prng;

use crate::load::{ClientCtx, Measured, RPC_SIZE, connect_tls};
use crate::procfs::{kib_line, sockstat_field};
use crate::progress::Unit;
use crate::sys;

/// Handshakes in flight while the flows open (the load generator's TLS runs on one thread).
const OPEN_PARALLEL: usize = 64;
/// How long closed flows may take to leave the proxy's namespace.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

/// Memory readings taken while the flows are held, and before they open.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemSample {
    /// `VmRSS` of the proxy and its direct children (nginx workers), KiB; 0 without a proxy.
    pub rss_kib: u64,
    /// `/proc/meminfo` `SUnreclaim`, KiB: socket structures, skb heads and BPF socket state live here.
    pub sunreclaim_kib: u64,
    /// `/proc/net/sockstat` `TCP: ... mem`, pages: TCP buffer memory (global, not per namespace).
    pub tcp_mem_pages: u64,
}

/// Per-flow figures from a baseline and a sample with `flows` more flows open.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerFlow {
    pub rss_kib: f64,
    pub slab_kib: f64,
    pub tcp_mem_kib: f64,
}

impl PerFlow {
    pub fn between(before: MemSample, held: MemSample, flows: usize, page_kib: f64) -> PerFlow {
        let n = flows.max(1) as f64;
        let delta = |a: u64, b: u64| b as f64 - a as f64;
        PerFlow {
            rss_kib: delta(before.rss_kib, held.rss_kib) / n,
            slab_kib: delta(before.sunreclaim_kib, held.sunreclaim_kib) / n,
            tcp_mem_kib: delta(before.tcp_mem_pages, held.tcp_mem_pages) * page_kib / n,
        }
    }

    /// Kernel memory per flow: unreclaimable slab plus TCP buffer pages.
    pub fn kernel_kib(&self) -> f64 {
        self.slab_kib + self.tcp_mem_kib
    }
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {path}"))
}

/// RSS of `pid` and its direct children, KiB.
fn tree_rss_kib(pid: u32) -> Result<u64> {
    let own = kib_line(&read(&format!("/proc/{pid}/status"))?, "VmRSS:")
        .with_context(|| format!("no VmRSS in /proc/{pid}/status (did the proxy exit?)"))?;
    let children: u64 = sys::children(pid)
        .into_iter()
        .filter_map(|c| {
            std::fs::read_to_string(format!("/proc/{c}/status"))
                .ok()
                .and_then(|s| kib_line(&s, "VmRSS:"))
        })
        .sum();
    Ok(own + children)
}

fn sample(proxy: Option<u32>) -> Result<MemSample> {
    let meminfo = read("/proc/meminfo")?;
    let sockstat = read("/proc/net/sockstat")?;
    Ok(MemSample {
        rss_kib: proxy.map(tree_rss_kib).transpose()?.unwrap_or(0),
        sunreclaim_kib: kib_line(&meminfo, "SUnreclaim:")
            .context("no SUnreclaim in /proc/meminfo")?,
        tcp_mem_pages: sockstat_field(&sockstat, "TCP:", "mem")
            .context("no `TCP: ... mem` in /proc/net/sockstat")?,
    })
}

/// Readings per memory sample, and their spacing: the kernel figures are machine-wide, so another
/// process's burst (a test moving bulk data on the same host) moves one reading; the median of several
/// taken over a second does not follow it.
const READINGS: usize = 5;
const READING_EVERY: Duration = Duration::from_millis(250);

/// Field-by-field median of `readings`.
pub fn median_sample(readings: &[MemSample]) -> MemSample {
    let med = |f: fn(&MemSample) -> u64| {
        let mut v: Vec<u64> = readings.iter().map(f).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    MemSample {
        rss_kib: med(|s| s.rss_kib),
        sunreclaim_kib: med(|s| s.sunreclaim_kib),
        tcp_mem_pages: med(|s| s.tcp_mem_pages),
    }
}

/// [`READINGS`] readings [`READING_EVERY`] apart, reduced to their median.
async fn steady_sample(proxy: Option<u32>) -> Result<MemSample> {
    let mut readings = Vec::with_capacity(READINGS);
    for i in 0..READINGS {
        if i > 0 {
            tokio::time::sleep(READING_EVERY).await;
        }
        readings.push(sample(proxy)?);
    }
    Ok(median_sample(&readings))
}

/// TCP sockets in use in the namespace whose sockstat is at `path`.
fn tcp_inuse(path: &str) -> Result<u64> {
    sockstat_field(&read(path)?, "TCP:", "inuse").with_context(|| format!("no TCP inuse in {path}"))
}

fn page_kib() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as f64 / 1024.0 } else { 4.0 }
}

/// One flow: connect, mTLS handshake, one 1 KiB echo (which also drains the server's session tickets, so
/// nothing waits in a receive queue), report, wait for `close`, then close both ways.
async fn flow(
    ctx_target: std::net::SocketAddr,
    req: Arc<Vec<u8>>,
    open: Arc<Semaphore>,
    opened: mpsc::UnboundedSender<Result<(), String>>,
    mut close: watch::Receiver<bool>,
) -> Result<(), String> {
    let permit = open.acquire_owned().await.map_err(|e| e.to_string())?;
    let opening = async {
        let mut s = connect_tls(ctx_target).await?;
        s.write_all(&req).await?;
        s.flush().await?;
        let mut resp = vec![0u8; req.len()];
        s.read_exact(&mut resp).await?;
        if resp != *req {
            return Err(std::io::Error::other("the echo differs from the request"));
        }
        std::io::Result::Ok(s)
    };
    let res = tokio::time::timeout(Duration::from_secs(20), opening).await;
    drop(permit);
    let mut s = match res {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let e = format!("open: {e}");
            let _ = opened.send(Err(e.clone()));
            return Err(e);
        }
        Err(_) => {
            let e = "open: handshake and echo took over 20 s".to_string();
            let _ = opened.send(Err(e.clone()));
            return Err(e);
        }
    };
    let _ = opened.send(Ok(()));
    // Idle until told to close (or the runner is gone).
    let _ = close.wait_for(|c| *c).await;
    let closing = async {
        s.shutdown().await?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await?;
        std::io::Result::Ok(rest.len())
    };
    match tokio::time::timeout(Duration::from_secs(20), closing).await {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(n)) => Err(format!("close: {n} unexpected bytes before EOF")),
        Ok(Err(e)) => Err(format!("close: {e}")),
        Err(_) => Err("close: no EOF from the far end within 20 s".to_string()),
    }
}

/// `idle`: opens `flows` flows (mTLS done, one echo each), holds them idle for `hold`, samples memory,
/// closes them all and checks that the proxy's namespace (the client's, for `direct`) is back to the TCP
/// sockets it had before.
pub async fn idle(ctx: ClientCtx, flows: usize, hold: Duration) -> Result<Measured> {
    let started = Instant::now();
    // The proxy's namespace, through its /proc entry; direct: this thread's (the client's) namespace.
    let sockstat = match ctx.proxy_pid {
        Some(p) => format!("/proc/{p}/net/sockstat"),
        None => "/proc/thread-self/net/sockstat".to_string(),
    };
    // Sockets each flow holds in that namespace: the proxy's two, or the client's one.
    let per_flow_sockets = if ctx.proxy_pid.is_some() { 2 } else { 1 };
    let inuse0 = tcp_inuse(&sockstat)?;
    let before = steady_sample(ctx.proxy_pid).await?;

    let mut req = vec![0u8; RPC_SIZE];
    Prng::new(44).fill(&mut req);
    let req = Arc::new(req);
    let open = Arc::new(Semaphore::new(OPEN_PARALLEL));
    let (close_tx, close_rx) = watch::channel(false);
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel();
    let mut set = JoinSet::new();
    ctx.progress
        .phase("opening flows", flows as u64, Unit::Count);
    for _ in 0..flows {
        set.spawn(flow(
            ctx.target,
            req.clone(),
            open.clone(),
            opened_tx.clone(),
            close_rx.clone(),
        ));
    }
    drop(opened_tx);
    let deadline = tokio::time::Instant::now() + ctx.limit;
    let mut open_count = 0usize;
    while open_count < flows {
        match tokio::time::timeout_at(deadline, opened_rx.recv()).await {
            Ok(Some(Ok(()))) => {
                open_count += 1;
                ctx.progress.add(1);
            }
            Ok(Some(Err(e))) => {
                set.abort_all();
                bail!("{open_count} of {flows} flows were open when one failed: {e}");
            }
            Ok(None) => bail!("the flow tasks ended with {open_count} of {flows} open"),
            Err(_) => {
                set.abort_all();
                bail!(
                    "only {open_count} of {flows} flows opened within {:?}",
                    ctx.limit
                );
            }
        }
    }
    let open_secs = started.elapsed().as_secs_f64();

    ctx.progress.phase("holding idle flows", 0, Unit::Count);
    // The readings take the last second or so of the hold.
    tokio::time::sleep(hold.saturating_sub(READING_EVERY * READINGS as u32)).await;
    let held = steady_sample(ctx.proxy_pid).await?;
    let inuse_held = tcp_inuse(&sockstat)?;
    let expect = inuse0 + per_flow_sockets * flows as u64;
    if inuse_held < expect {
        set.abort_all();
        bail!(
            "while holding {flows} flows only {inuse_held} TCP sockets were in use in the {} namespace \
             (expected at least {expect}): flows closed early",
            if ctx.proxy_pid.is_some() {
                "proxy's"
            } else {
                "client's"
            }
        );
    }

    ctx.progress
        .phase("closing flows", flows as u64, Unit::Count);
    let _ = close_tx.send(true);
    let (mut closed, mut first_error, mut errors) = (0usize, None, 0usize);
    let collect = async {
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(())) => {
                    closed += 1;
                    ctx.progress.add(1);
                }
                Ok(Err(e)) => {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(format!("flow task: {e}"));
                }
            }
        }
    };
    if tokio::time::timeout_at(deadline, collect).await.is_err() {
        set.abort_all();
        bail!("only {closed} of {flows} flows closed within the run's bound");
    }
    anyhow::ensure!(
        errors == 0,
        "{errors} of {flows} flows did not close cleanly (first: {})",
        first_error.unwrap_or_default()
    );

    // Every socket of the flows must leave the namespace (TIME_WAIT ones are not "inuse").
    ctx.progress
        .phase("waiting for sockets to go", 0, Unit::Count);
    let t = Instant::now();
    let mut left = tcp_inuse(&sockstat)?;
    while left > inuse0 && t.elapsed() < CLOSE_LIMIT {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = tcp_inuse(&sockstat)?;
    }
    anyhow::ensure!(
        left <= inuse0,
        "{} TCP sockets of closed flows were still open in the {} namespace {CLOSE_LIMIT:?} after every \
         flow closed ({left} in use, {inuse0} before)",
        left - inuse0,
        if ctx.proxy_pid.is_some() {
            "proxy's"
        } else {
            "client's"
        }
    );

    let per = PerFlow::between(before, held, flows, page_kib());
    let mut figures = Vec::new();
    if ctx.proxy_pid.is_some() {
        figures.push(("rss_kib_per_flow", per.rss_kib, "KiB"));
        figures.push(("rss_mib", held.rss_kib as f64 / 1024.0, "MiB"));
    }
    figures.push(("kernel_kib_per_flow", per.kernel_kib(), "KiB"));
    figures.push(("slab_kib_per_flow", per.slab_kib, "KiB"));
    figures.push(("tcp_mem_kib_per_flow", per.tcp_mem_kib, "KiB"));
    figures.push(("open_s", open_secs, "s"));
    Ok(Measured {
        figures,
        notes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_flow_figures_are_deltas_over_flows() {
        let before = MemSample {
            rss_kib: 10_000,
            sunreclaim_kib: 50_000,
            tcp_mem_pages: 10,
        };
        let held = MemSample {
            rss_kib: 30_000,
            sunreclaim_kib: 90_000,
            tcp_mem_pages: 1010,
        };
        let p = PerFlow::between(before, held, 1000, 4.0);
        assert_eq!(p.rss_kib, 20.0);
        assert_eq!(p.slab_kib, 40.0);
        assert_eq!(p.tcp_mem_kib, 4.0);
        assert_eq!(p.kernel_kib(), 44.0);
        // Memory that went down (another process freed some) gives a negative delta, not a wrap-around.
        let shrunk = MemSample {
            sunreclaim_kib: 49_000,
            ..before
        };
        assert_eq!(PerFlow::between(before, shrunk, 1000, 4.0).slab_kib, -1.0);
    }

    #[test]
    fn a_burst_in_one_reading_does_not_move_the_sample() {
        let r = |rss, slab, tcp| MemSample {
            rss_kib: rss,
            sunreclaim_kib: slab,
            tcp_mem_pages: tcp,
        };
        let readings = [
            r(100, 5000, 10),
            r(101, 5002, 900),
            r(100, 5001, 11),
            r(102, 9000, 12),
            r(100, 5001, 10),
        ];
        assert_eq!(median_sample(&readings), r(100, 5001, 11));
    }

    #[test]
    fn samples_this_machine() {
        let s = sample(Some(std::process::id())).expect("procfs is readable");
        assert!(s.rss_kib > 0 && s.sunreclaim_kib > 0);
        assert!(tcp_inuse("/proc/thread-self/net/sockstat").is_ok());
    }
}
