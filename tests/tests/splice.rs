//! The kernel splice (`--datapath sockmap`) end to end: flow control bounds what a slow receiver leaves
//! parked in the kernel, closed flows leave no entries in the pinned maps, the agent copies no payload,
//! and two-way bulk pauses clear of the kernel's psock race.
//!
//! The tests run one at a time (a process-wide lock): the first one measures host memory and
//! sender pacing, which the bulk transfers of the others would disturb.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, SockHash};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use zone_ingress_common::{FlowCtrl, FlowInfo, FlowSide, PROG_COUNTER_NAMES, map_names};
use zone_ingress_tests::agent::{Agent, Datapath, Metrics, Options, Route};
use zone_ingress_tests::netns::{Netns, Topology};
use zone_ingress_tests::pki::{SNI_BACKEND, SNI_OTHER};
use zone_ingress_tests::run_test;
use zone_ingress_tests::tls::{self, Backend, Behaviour};

const BACKEND_PORT: u16 = 8443;
const MIB: u64 = 1 << 20;

/// Serialises the tests of this file (see the module doc).
static SERIAL: Mutex<()> = Mutex::const_new(());

fn sockmap(budget: Option<&str>) -> Options {
    let mut opts = Options::new(Datapath::Sockmap);
    if let Some(b) = budget {
        opts.extra_args = vec!["--splice-budget".to_string(), b.to_string()];
    }
    opts
}

fn flows_total(m: &Metrics, datapath: &str) -> f64 {
    m.get("zone_ingress_flows_total", &[("datapath", datapath)])
}

fn cx_active(m: &Metrics) -> f64 {
    m.get("zone_ingress_downstream_cx_active", &[])
}

/// Waits (at most 10 s) until the agent has no downstream connection left; panics otherwise.
async fn wait_no_active_cx(agent: &Agent<'_>) -> Metrics {
    let m = agent
        .metrics_until(Duration::from_secs(10), |m| cx_active(m) == 0.0)
        .await;
    assert_eq!(
        cx_active(&m),
        0.0,
        "downstream_cx_active did not return to 0 within 10 s after every flow ended:\n{}",
        m.dump("zone_ingress")
    );
    m
}

// ---------------------------------------------------------------------------------------------
// Pinned maps

fn open_pinned(pin_dir: &Path, name: &str) -> Map {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("open the pinned map {}: {e}", path.display()));
    Map::from_map_data(data).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn flows_map(pin_dir: &Path) -> BpfHashMap<MapData, u64, FlowSide> {
    BpfHashMap::try_from(open_pinned(pin_dir, map_names::FLOWS))
        .expect("ZI_FLOWS is a hash map of u64 -> FlowSide")
}

/// Every entry of the three per-flow maps, as text for assertion messages.
#[derive(Debug, Default)]
struct MapEntries {
    flows: Vec<(u64, FlowSide)>,
    ctrl: Vec<(u64, FlowCtrl)>,
    socks: Vec<u64>,
    /// `ZI_FLOW_INFO` keys (one per flow, for `maps dump flows`).
    info: Vec<u64>,
}

impl MapEntries {
    fn read(pin_dir: &Path) -> MapEntries {
        let flows = flows_map(pin_dir)
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .expect("iterate ZI_FLOWS");
        let ctrl: BpfHashMap<MapData, u64, FlowCtrl> =
            BpfHashMap::try_from(open_pinned(pin_dir, map_names::CTRL))
                .expect("ZI_CTRL is a hash map of u64 -> FlowCtrl");
        let ctrl = ctrl
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .expect("iterate ZI_CTRL");
        let socks: SockHash<MapData, u64> =
            SockHash::try_from(open_pinned(pin_dir, map_names::SOCKS))
                .expect("ZI_SOCKS is a sock hash keyed by u64");
        let socks = socks
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .expect("iterate ZI_SOCKS");
        let info: BpfHashMap<MapData, u64, FlowInfo> =
            BpfHashMap::try_from(open_pinned(pin_dir, map_names::FLOW_INFO))
                .expect("ZI_FLOW_INFO is a hash map of u64 -> FlowInfo");
        let info = info
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .expect("iterate ZI_FLOW_INFO");
        MapEntries {
            flows,
            ctrl,
            socks,
            info,
        }
    }

    fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.flows.len(),
            self.ctrl.len(),
            self.socks.len(),
            self.info.len(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// 1. A slow receiver: the sender is paced, the kernel holds about the budget.

/// The backend's read rate: about 50 MB/s.
const SLOW_RATE: f64 = 50e6;
/// What the client sends.
const SLOW_BYTES: u64 = 512 * MIB;
/// The default `--splice-budget`.
const BUDGET: u64 = 4 * MIB;
/// Allowed growth of kernel memory while a slow receiver is spliced: the budget plus 64 MiB. The 64 MiB
/// cover what TCP itself may hold on the way (client send buffer and the agent's upstream send buffer,
/// autotuned up to tcp_wmem's 4 MiB each; the backend's receive buffer, autotuned but kept small by a
/// reader that keeps up with its own pace; skb overhead on top of the payload) and background noise of a
/// busy host. An unbounded redirect queue holds hundreds of MiB here (+376 MB measured by hand).
const MEMORY_BOUND: u64 = BUDGET + 64 * MIB;
/// Allowed bytes between what the verdict redirected towards the backend and what the backend's TCP
/// socket handed to its reader: the redirect queue (the budget, plus what arrives during the agent's
/// 1 ms reaction) and the TCP buffers on the way (the upstream send buffer, up to tcp_wmem's 4 MiB; the
/// backend's receive buffer, which autotuning keeps small for a reader at a steady pace: under 1 MB seen).
const BACKLOG_BOUND: u64 = BUDGET + 28 * MIB;

/// An `AsyncRead + AsyncWrite` that counts the bytes read through it (TLS records, before decryption).
struct CountReads<S> {
    inner: S,
    read: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for CountReads<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) {
            let n = (buf.filled().len() - before) as u64;
            self.read.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountReads<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TLS backend for one connection that reads at `rate` bytes/s (until `unpace` is set, then at full
/// speed) to EOF; returns the byte count and SHA-256 of what it read. `raw_read` counts the TCP bytes.
async fn paced_sink(
    listener: TcpListener,
    rate: f64,
    raw_read: Arc<AtomicU64>,
    unpace: Arc<AtomicBool>,
) -> io::Result<(u64, [u8; 32])> {
    let (tcp, _) = listener.accept().await?;
    tcp.set_nodelay(true)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config());
    let tcp = CountReads {
        inner: tcp,
        read: raw_read,
    };
    let mut s = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake in 10 s"))??;
    let mut buf = vec![0u8; 64 * 1024];
    let mut hash = Sha256::new();
    let mut total = 0u64;
    let mut start: Option<Instant> = None;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let start = *start.get_or_insert_with(Instant::now);
        hash.update(&buf[..n]);
        total += n as u64;
        if !unpace.load(Ordering::Relaxed) {
            let due = start + Duration::from_secs_f64(total as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    let _ = s.shutdown().await;
    Ok((total, hash.finalize().into()))
}

/// One `/proc/meminfo` reading, in bytes.
#[derive(Clone, Copy, Debug)]
struct MemSample {
    /// `MemTotal - MemAvailable`: memory the host cannot hand out any more.
    host_used: u64,
    /// `host_used - AnonPages - Shmem`: the same without user-space memory (heaps and tmpfs of every
    /// process). Skbs parked in the kernel are neither, so they count in full; a compiler or test binary
    /// that grows its heap next to this test does not.
    kernel_used: u64,
}

fn mem_sample() -> MemSample {
    let text = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("/proc/meminfo has no {name}"))
            * 1024
    };
    let host_used = field("MemTotal").saturating_sub(field("MemAvailable"));
    MemSample {
        host_used,
        kernel_used: host_used.saturating_sub(field("AnonPages") + field("Shmem")),
    }
}

/// Every `/proc/meminfo` field, in bytes (kB fields converted; counts as they are).
fn meminfo_fields() -> std::collections::BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let mut parts = rest.split_whitespace();
            let n: u64 = parts.next()?.parse().ok()?;
            let scale = if parts.next() == Some("kB") { 1024 } else { 1 };
            Some((name.to_string(), n * scale))
        })
        .collect()
}

/// The `/proc/meminfo` fields that moved most between `base` and `at`, in MiB (for failure
/// messages: which kind of memory grew).
fn meminfo_moves(
    base: &std::collections::BTreeMap<String, u64>,
    at: &std::collections::BTreeMap<String, u64>,
) -> Vec<(String, i64)> {
    let mut moves: Vec<(String, i64)> = at
        .iter()
        .filter_map(|(name, &v)| {
            let d = (v as i64 - *base.get(name)? as i64) / MIB as i64;
            (d != 0).then(|| (name.clone(), d))
        })
        .collect();
    moves.sort_by_key(|(_, d)| -d.abs());
    moves.truncate(8);
    moves
}

/// What the sampler saw during one transfer (growths are peak minus baseline, in bytes).
#[derive(Debug, Default)]
struct Peaks {
    host_growth: u64,
    kernel_growth: u64,
    /// At the kernel growth's peak, the `/proc/meminfo` fields that moved most since the sampler
    /// started (MiB).
    moved_at_peak: Vec<(String, i64)>,
    /// Largest (redirected towards the backend - TCP bytes the backend read).
    backlog: u64,
    samples: u32,
}

impl Peaks {
    /// The memory growth the assertions use: the smaller of the two measures. What the splice parks in the
    /// kernel shows in both; noise from other processes on this shared host often shows in only one
    /// (a heap that grows moves `host_growth`; socket buffers of another suite's bulk transfer, or a
    /// baseline taken while another process held more anonymous memory, move `kernel_growth`).
    fn memory_growth(&self) -> u64 {
        self.host_growth.min(self.kernel_growth)
    }
}

/// Samples memory and the flow's backlog every 50 ms on its own thread until `stop` is set.
fn spawn_sampler(
    base: MemSample,
    pin_dir: &Path,
    raw_read: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Peaks> {
    let flows = flows_map(pin_dir);
    // ZI_SPLICE_TRACE=1 prints every sample.
    let trace = std::env::var_os("ZI_SPLICE_TRACE").is_some();
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut p = Peaks::default();
        let base_fields = meminfo_fields();
        loop {
            let done = stop.load(Ordering::Relaxed);
            let m = mem_sample();
            p.host_growth = p
                .host_growth
                .max(m.host_used.saturating_sub(base.host_used));
            let kernel_growth = m.kernel_used.saturating_sub(base.kernel_used);
            if kernel_growth > p.kernel_growth {
                p.kernel_growth = kernel_growth;
                p.moved_at_peak = meminfo_moves(&base_fields, &meminfo_fields());
            }
            // Read the backend's count first: the backlog is then never under-estimated by a read that
            // happened between the two loads.
            let backend_read = raw_read.load(Ordering::Relaxed);
            let redirected = flows
                .iter()
                .filter_map(Result::ok)
                .map(|(_, side)| side.redirected_bytes)
                .max()
                .unwrap_or(0);
            let backlog = redirected.saturating_sub(backend_read);
            p.backlog = p.backlog.max(backlog);
            p.samples += 1;
            if trace {
                eprintln!(
                    "  t={:>6.2}s redirected {:>5} MiB, backend read {:>5} MiB, backlog {:>6.1} MiB, \
                     growth host {:>4} MiB kernel {:>4} MiB",
                    started.elapsed().as_secs_f64(),
                    redirected / MIB,
                    backend_read / MIB,
                    backlog as f64 / MIB as f64,
                    m.host_used.saturating_sub(base.host_used) / MIB,
                    m.kernel_used.saturating_sub(base.kernel_used) / MIB,
                );
            }
            if done {
                return p;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

/// Sets the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The outcome of one slow-receiver run.
#[derive(Debug)]
struct SlowRun {
    /// Seconds the client needed to hand all its bytes to its socket.
    send_secs: f64,
    /// Seconds until the backend read the last byte.
    total_secs: f64,
    /// Times the agent's flow control paused a direction (`zone_ingress_splice_pauses_total`).
    pauses: f64,
    peaks: Peaks,
}

/// The client sends [`SLOW_BYTES`] as fast as it can through an agent with `budget`, to a backend that
/// reads at [`SLOW_RATE`]. Checks the bytes; returns the timings and what the kernel held.
async fn slow_receiver_run(budget: &str) -> SlowRun {
    let topo = Topology::new();
    let backend_addr = Topology::backend_addr(BACKEND_PORT);
    let listener = topo.backend.listen(backend_addr).await;
    let raw_read = Arc::new(AtomicU64::new(0));
    let unpace = Arc::new(AtomicBool::new(false));
    let sink = tokio::spawn(paced_sink(
        listener,
        SLOW_RATE,
        raw_read.clone(),
        unpace.clone(),
    ));
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[backend_addr])],
        sockmap(Some(budget)),
    )
    .await;
    let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("mTLS handshake through the agent");
    // Baseline: the lowest of a few readings (after the namespaces, agent and handshake exist).
    let mut base = mem_sample();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let m = mem_sample();
        base.host_used = base.host_used.min(m.host_used);
        base.kernel_used = base.kernel_used.min(m.kernel_used);
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Stops the sampler however this function ends (a failed expect included).
    let _stop_sampler = StopOnDrop(stop.clone());
    let sampler = spawn_sampler(base, agent.pin_dir(), raw_read.clone(), stop.clone());
    let start = Instant::now();
    let sent_sha = tls::send_prng(&mut s, SLOW_BYTES, 21)
        .await
        .expect("client: send the bulk stream");
    let send_secs = start.elapsed().as_secs_f64();
    // The pacing has shown what it had to show; let the backend drain the rest at full speed so an
    // unbounded run does not spend ten more seconds on it.
    unpace.store(true, Ordering::Relaxed);
    s.shutdown()
        .await
        .expect("client: close_notify and FIN after the stream");
    let received = tokio::time::timeout(Duration::from_secs(30), sink)
        .await
        .expect("the backend did not reach EOF within 30 s after the client finished sending")
        .expect("backend task panicked")
        .expect("backend: read the stream to a clean EOF");
    let total_secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let peaks = sampler.join().expect("sampler thread panicked");
    assert_eq!(
        received.0, SLOW_BYTES,
        "budget {budget}: the backend received {} of {SLOW_BYTES} bytes",
        received.0
    );
    assert_eq!(
        received.1, sent_sha,
        "budget {budget}: bytes differ (SHA-256)"
    );
    let m = wait_no_active_cx(&agent).await;
    assert_eq!(
        flows_total(&m, "sockmap"),
        1.0,
        "budget {budget}: the flow should have been spliced:\n{}",
        m.dump("zone_ingress")
    );
    let run = SlowRun {
        send_secs,
        total_secs,
        pauses: m.sum("zone_ingress_splice_pauses_total"),
        peaks,
    };
    eprintln!(
        "slow receiver, --splice-budget {budget}: sender done in {:.2} s, backend done in {:.2} s; \
         peak growth host {} MiB, kernel {} MiB (meminfo moves at the peak, MiB: {:?}); peak \
         backlog {:.1} MiB ({} samples)",
        run.send_secs,
        run.total_secs,
        run.peaks.host_growth / MIB,
        run.peaks.kernel_growth / MIB,
        run.peaks.moved_at_peak,
        run.peaks.backlog as f64 / MIB as f64,
        run.peaks.samples
    );
    run
}

/// The memory bound of issue 3, as the issue states it: a 50 MB/s receiver must hold a fast sender to
/// budget + margin, and the same run without a usable budget must show what the bound prevents.
/// The agent meets it by pausing the direction (its bytes wait on the client's socket, TCP closes
/// the window) and forwarding at the receiver's pace; see ARCHITECTURE.md, "Flow control". (The
/// window clamp it used before could not: over veth, one ~1 KiB window per 15 us round trip is still
/// ~70 MB/s, and the backlog grew to 176 MiB.) `ZI_SPLICE_TRACE=1` prints every sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_receiver_is_bounded() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(75), async {
        // What a receiver at SLOW_RATE needs for SLOW_BYTES: 10.7 s.
        let paced_secs = SLOW_BYTES as f64 / SLOW_RATE;
        let bounded = slow_receiver_run("4MiB").await;
        // The same scenario without a usable budget: the flow control must be what made the difference.
        let unbounded = slow_receiver_run("64GiB").await;
        // Every check is collected first, so one failure message shows the whole picture.
        let mut failed = Vec::new();
        // Host memory is noisy when other suites run on this machine (see Peaks::memory_growth); the
        // backlog check below is immune to them.
        if bounded.peaks.memory_growth() >= MEMORY_BOUND {
            failed.push(format!(
                "with a 4 MiB budget, host memory grew by {} MiB during the transfer (bound {} MiB)",
                bounded.peaks.memory_growth() / MIB,
                MEMORY_BOUND / MIB
            ));
        }
        if bounded.peaks.backlog >= BACKLOG_BOUND {
            failed.push(format!(
                "with a 4 MiB budget, up to {:.1} MiB were redirected towards the backend and not yet read by \
                 it (bound {} MiB)",
                bounded.peaks.backlog as f64 / MIB as f64,
                BACKLOG_BOUND / MIB
            ));
        }
        if bounded.pauses < 1.0 {
            failed.push("with a 4 MiB budget the flow control never paused the flow".to_string());
        }
        if bounded.send_secs < 0.7 * paced_secs {
            failed.push(format!(
                "with a 4 MiB budget the sender should be paced by the 50 MB/s receiver ({paced_secs:.1} s for \
                 {} MiB), but it finished sending in {:.2} s",
                SLOW_BYTES / MIB,
                bounded.send_secs
            ));
        }
        // Without a usable budget the opposite must show, or the numbers above do not prove that the flow
        // control made the difference.
        if unbounded.peaks.memory_growth() < MEMORY_BOUND && unbounded.send_secs >= 0.5 * paced_secs {
            failed.push(format!(
                "with --splice-budget 64GiB the kernel should park the stream (memory growth over {} MiB) or let \
                 the sender finish far sooner than {paced_secs:.1} s; neither happened",
                MEMORY_BOUND / MIB
            ));
        }
        assert!(
            failed.is_empty(),
            "{}\n4MiB: {bounded:?}\n64GiB: {unbounded:?}\n(ZI_SPLICE_TRACE=1 prints every sample)",
            failed.join("\n")
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 2. Closed flows leave no entries behind.

/// How one flow of `closed_flows_leave_no_map_entries` ends.
#[derive(Clone, Copy, Debug)]
enum End {
    /// Echo, close_notify + FIN, the backend closes too.
    Clean,
    /// The backend reads 5 bytes, sends 64 KiB and resets.
    BackendReset,
    /// The client resets after an echo.
    ClientReset,
}

async fn one_flow(topo: &Topology, addr: std::net::SocketAddr, end: End) -> Result<(), String> {
    let sni = match end {
        End::BackendReset => SNI_OTHER,
        End::Clean | End::ClientReset => SNI_BACKEND,
    };
    let mut s = tls::connect(&topo.client, addr, sni)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    match end {
        End::Clean => {
            tls::echo_roundtrip(&mut s, &[0x42; 32 * 1024])
                .await
                .map_err(|e| format!("echo: {e}"))?;
            s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)
                .await
                .map_err(|e| format!("read to the backend's close: {e}"))?;
            Ok(())
        }
        End::BackendReset => {
            s.write_all(b"hello").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            let mut sink = Vec::new();
            match s.read_to_end(&mut sink).await {
                Err(e) if tls::is_reset(&e) => Ok(()),
                other => Err(format!(
                    "expected a reset after the backend reset, got {other:?} ({} bytes read)",
                    sink.len()
                )),
            }
        }
        End::ClientReset => {
            tls::echo_roundtrip(&mut s, b"reset follows")
                .await
                .map_err(|e| format!("echo: {e}"))?;
            tls::reset(s.into_inner().0);
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_flows_leave_no_map_entries() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(45), async {
        const FLOWS: usize = 50;
        let topo = Arc::new(Topology::new());
        let echo = Backend::start(&topo.backend, Topology::backend_addr(BACKEND_PORT), Behaviour::Echo).await;
        let resetter = Backend::start(
            &topo.backend,
            Topology::backend_addr(BACKEND_PORT + 1),
            Behaviour::ResetAfter { after: 5, send: 64 * 1024 },
        )
        .await;
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[echo.addr]), Route::new(SNI_OTHER, &[resetter.addr])],
            sockmap(None),
        )
        .await;
        let pin_dir = agent.pin_dir().to_path_buf();

        // First make sure the maps are read right: one live spliced flow has two entries in each
        // per-socket map and one in the flow map.
        let mut live = tls::connect(&topo.client, agent.addr(), SNI_BACKEND).await.expect("handshake");
        tls::echo_roundtrip(&mut live, b"live").await.expect("echo");
        let during = MapEntries::read(&pin_dir);
        assert_eq!(
            during.counts(),
            (2, 2, 2, 1),
            "one live spliced flow should have 2 entries in ZI_FLOWS, ZI_CTRL and ZI_SOCKS, 1 in ZI_FLOW_INFO: {during:?}"
        );
        live.shutdown().await.expect("close the live flow");
        let mut rest = Vec::new();
        live.read_to_end(&mut rest).await.expect("read the live flow to its close");
        drop(live);

        // Then 50 flows, 10 at a time: clean closes, resets from the backend, resets from the client.
        let ends: Vec<End> = (0..FLOWS)
            .map(|i| match i % 5 {
                0 | 1 => End::Clean,
                2 | 3 => End::BackendReset,
                _ => End::ClientReset,
            })
            .collect();
        let addr = agent.addr();
        let mut failures = Vec::new();
        for batch in ends.chunks(10) {
            let mut set = JoinSet::new();
            for (i, end) in batch.iter().copied().enumerate() {
                let topo = topo.clone();
                set.spawn(async move {
                    let r = tokio::time::timeout(Duration::from_secs(10), one_flow(&topo, addr, end)).await;
                    match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(format!("flow {i} ({end:?}): {e}")),
                        Err(_) => Err(format!("flow {i} ({end:?}): not done within 10 s")),
                    }
                });
            }
            while let Some(r) = set.join_next().await {
                if let Err(e) = r.expect("flow task panicked") {
                    failures.push(e);
                }
            }
        }
        assert!(failures.is_empty(), "{} flows misbehaved:\n{}", failures.len(), failures.join("\n"));

        let m = wait_no_active_cx(&agent).await;
        assert_eq!(
            (flows_total(&m, "sockmap"), flows_total(&m, "userspace")),
            ((FLOWS + 1) as f64, 0.0),
            "every flow should have been spliced, or the empty maps prove nothing:\n{}",
            m.dump("zone_ingress")
        );
        let after = MapEntries::read(&pin_dir);
        assert_eq!(
            after.counts(),
            (0, 0, 0, 0),
            "with no connection left, the pinned maps still hold entries (ZI_FLOWS, ZI_CTRL, ZI_SOCKS, ZI_FLOW_INFO): {after:?}"
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 3. The agent reads the ClientHello and nothing else.

/// `rchar` and `wchar` of `/proc/<pid>/io`: bytes the process passed to read-like and write-like
/// syscalls (sockets included).
fn proc_io(pid: u32) -> (u64, u64) {
    let path = format!("/proc/{pid}/io");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{path} has no {name}:\n{text}"))
    };
    (field("rchar"), field("wchar"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_copies_no_payload() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(45), async {
        const EACH_WAY: u64 = 256 * MIB;
        let topo = Topology::new();
        let mut backend = Backend::start(
            &topo.backend,
            Topology::backend_addr(BACKEND_PORT),
            Behaviour::Bulk { send: EACH_WAY, seed: 32 },
        )
        .await;
        let agent = Agent::start(&topo.ingress, &[Route::new(SNI_BACKEND, &[backend.addr])], sockmap(None)).await;
        let before_flows = flows_total(&agent.metrics().await, "sockmap");
        let (r0, w0) = proc_io(agent.pid());

        let s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND).await.expect("mTLS handshake through the agent");
        let (sent_sha, got) = tls::send_and_receive(s, EACH_WAY, 31).await;
        let out = backend.outcome(Duration::from_secs(20)).await;
        assert!(out.error.is_none(), "backend failed: {:?}", out.error);
        assert_eq!((out.received, out.received_sha), (EACH_WAY, sent_sha), "client->backend bytes differ");
        assert_eq!(got, (EACH_WAY, out.sent_sha), "backend->client bytes differ");

        let m = wait_no_active_cx(&agent).await;
        let (r1, w1) = proc_io(agent.pid());
        let (rchar, wchar) = (r1 - r0, w1 - w0);
        let moved = 2 * EACH_WAY;
        eprintln!(
            "agent I/O while moving {} MiB: rchar +{rchar} B, wchar +{wchar} B; userspace_copied_bytes {}",
            moved / MIB,
            m.sum("zone_ingress_userspace_copied_bytes_total")
        );
        // Besides the ClientHello the agent reads and writes metrics scrapes and a few log lines.
        assert!(
            rchar < moved / 100 && wchar < moved / 100,
            "the agent read {rchar} and wrote {wchar} bytes while a spliced flow moved {moved}: \
             more than 1% went through userspace"
        );
        assert_eq!(
            flows_total(&m, "sockmap") - before_flows,
            1.0,
            "flows_total{{datapath=\"sockmap\"}} should grow by exactly 1:\n{}",
            m.dump("zone_ingress")
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 4. Both directions at once: the kernel's psock race (ARCHITECTURE.md, "The kernel's psock race").

/// The program counters, summed over CPUs, by name.
fn prog_counters(pin_dir: &Path) -> std::collections::BTreeMap<&'static str, u64> {
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(open_pinned(pin_dir, map_names::COUNTERS))
            .expect("ZI_COUNTERS is a per-CPU array of u64");
    PROG_COUNTER_NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let per_cpu = counters
                .get(&(i as u32), 0)
                .unwrap_or_else(|e| panic!("read ZI_COUNTERS[{i}] ({name}): {e}"));
            (*name, per_cpu.iter().sum())
        })
        .collect()
}

/// `tb` (the send buffer) of each established TCP socket in `ns` whose peer is `peer`, from
/// `ss -tmn` (iproute2).
fn send_buffers(ns: &Netns, peer: SocketAddr) -> Vec<u64> {
    let out = ns
        .command("ss")
        .args(["-tamnH"])
        .output()
        .expect("run ss (iproute2) in the ingress namespace");
    assert!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // Per socket: Recv-Q, Send-Q, local address, peer address, then skmem:(r..,rb..,t..,tb<N>,...).
    let mut found = Vec::new();
    let mut last = "";
    for token in text.split_whitespace() {
        if let Some(skmem) = token.strip_prefix("skmem:(") {
            if last == peer.to_string() {
                let tb = skmem
                    .trim_end_matches(')')
                    .split(',')
                    .find_map(|f| f.strip_prefix("tb")?.parse().ok())
                    .unwrap_or_else(|| panic!("no tb in {token}"));
                found.push(tb);
            }
        } else {
            last = token;
        }
    }
    assert!(
        !found.is_empty(),
        "ss shows no established socket with peer {peer}:\n{text}"
    );
    found
}

/// One flow through a fresh agent with `--splice-budget <budget_mib>MiB`: `up` bytes client -> backend and `down` bytes
/// backend -> client at the same time, checked byte for byte, after checking the spliced sockets'
/// send buffers. Returns the program counters.
async fn bulk_flow(
    topo: &Topology,
    round: u16,
    budget_mib: u64,
    (up, down): (u64, u64),
) -> std::collections::BTreeMap<&'static str, u64> {
    let mut backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT + round),
        Behaviour::Bulk {
            send: down,
            seed: 40 + u64::from(round),
        },
    )
    .await;
    let budget = format!("{budget_mib}MiB");
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[backend.addr])],
        sockmap(Some(&budget)),
    )
    .await;
    let s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("mTLS handshake through the agent");
    let client = s.get_ref().0.local_addr().expect("the client's address");
    let buffers = [
        send_buffers(&topo.ingress, client),
        send_buffers(&topo.ingress, backend.addr),
    ];
    assert_eq!(
        buffers,
        [vec![4 * budget_mib * MIB], vec![4 * budget_mib * MIB]],
        "the agent's sockets to the client and to the backend should each have a send buffer of four \
         budgets (SO_SNDBUFFORCE of two, doubled by the kernel)"
    );
    let (sent_sha, got) = tls::send_and_receive(s, up, 30 + u64::from(round)).await;
    let out = backend.outcome(Duration::from_secs(30)).await;
    assert!(out.error.is_none(), "backend failed: {:?}", out.error);
    assert_eq!(
        (out.received, out.received_sha),
        (up, sent_sha),
        "client->backend bytes differ"
    );
    assert_eq!(got, (down, out.sent_sha), "backend->client bytes differ");
    wait_no_active_cx(&agent).await;
    prog_counters(agent.pin_dir())
}

/// Bulk both ways at once pauses directions whose socket also sends the other direction's
/// redirected bytes: the setting of the kernel's psock race. The splice's defences are visible:
/// both spliced sockets carry a send buffer of four budgets, and the verdict reads its socket's
/// psock queue: one-way bulk never finds it holding anything when it passes bytes, two-way bulk
/// does, and puts pauses off for it (`pause_deferred`). Every byte arrives intact either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_way_bulk_pauses_clear_of_the_redirect_queue() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(120), async {
        const EACH_WAY: u64 = 128 * MIB;
        const ROUNDS: u16 = 10;
        // Fewer than half of the two-way flows defer a pause at the default budget (2 to 4 flows
        // in a row without one were seen): bounded retries, a run of 16 misses is ~1e-4.
        const TWO_WAY_ROUNDS: u16 = 16;
        let topo = Topology::new();

        // One way, at a 1 MiB budget: some flows pause, some do not (the kernel's worker keeps
        // up with the sender more often than not). Until one did, bounded.
        let mut one_way: std::collections::BTreeMap<&str, u64> = Default::default();
        for round in 0..ROUNDS {
            for (name, n) in bulk_flow(&topo, round, 1, (EACH_WAY, 0)).await {
                *one_way.entry(name).or_default() += n;
            }
            if one_way["paused"] > 0 {
                break;
            }
        }
        eprintln!("one-way bulk: {one_way:?}");
        assert!(one_way["paused"] > 0, "one-way bulk never paused, so it tests nothing: {one_way:?}");
        assert_eq!(
            (one_way["passed_behind_queue"], one_way["pause_deferred"]),
            (0, 0),
            "with bytes flowing one way no socket's psock queue holds the other direction's, yet the \
             verdict saw one (are the BTF offsets right?): {one_way:?}"
        );

        let mut total: std::collections::BTreeMap<&str, u64> = Default::default();
        for round in ROUNDS..ROUNDS + TWO_WAY_ROUNDS {
            for (name, n) in bulk_flow(&topo, round, 4, (EACH_WAY, EACH_WAY)).await {
                *total.entry(name).or_default() += n;
            }
            eprintln!("two-way bulk, {} flows: {total:?}", round - ROUNDS + 1);
            if total["pause_deferred"] > 0 {
                break;
            }
        }
        assert!(total["paused"] > 0, "two-way bulk never paused, so it tests nothing: {total:?}");
        assert!(
            total["passed_behind_queue"] > 0 && total["pause_deferred"] > 0,
            "two-way bulk should meet non-empty psock queues (passed_behind_queue) and put pauses off \
             for them (pause_deferred): {total:?}"
        );
    })
    .await
}
