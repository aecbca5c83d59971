//! The load generator: a TLS backend (runs on a thread inside the backend namespace) and the workload
//! clients (on a thread inside the client namespace). Both use the test harness's mTLS configuration
//! (rustls, the test CA, SNI [`SNI_BACKEND`]); the proxies in between never decrypt.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;
use zone_ingress_tests::pki::SNI_BACKEND;
use zone_ingress_tests::tls;
use zone_ingress_tests::wire::Prng;

use crate::progress::{Progress, Unit};
use crate::sys;

/// Chunk size of the PRNG streams; must match `tls::prng_sha` (64 KiB) so precomputed hashes match.
const CHUNK: usize = 64 * 1024;
/// Size of one RPC request and of its response.
pub const RPC_SIZE: usize = 1024;
/// Seeds of the PRNG streams.
pub const SEED_UP: u64 = 1;
pub const SEED_DOWN: u64 = 2;
pub const SEED_PACED: u64 = 3;

/// What the backend does with each connection after the handshake.
#[derive(Clone, Copy, Debug)]
pub enum ServerMode {
    /// Read to EOF hashing, and concurrently send `send` PRNG bytes (seed [`SEED_DOWN`]) then close.
    Bulk { send: u64 },
    /// Read to EOF hashing, then close.
    Sink,
    /// Echo until EOF, then close.
    Echo,
}

/// What one backend connection saw (bulk and sink modes report; echo reports only errors).
#[derive(Debug)]
pub struct ConnReport {
    pub received: u64,
    pub sha: [u8; 32],
    pub error: Option<String>,
}

/// A listening socket made inside the backend namespace (call through `Netns::exec`).
pub fn backend_listener(port: u16) -> io::Result<std::net::TcpListener> {
    let addr: SocketAddr = SocketAddr::from(([0, 0, 0, 0], port));
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Serves connections until `stop` fires (or its sender is dropped); then aborts the ones still open.
pub async fn serve(
    listener: std::net::TcpListener,
    mode: ServerMode,
    mut stop: oneshot::Receiver<()>,
    reports: mpsc::UnboundedSender<ConnReport>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            let _ = reports.send(ConnReport {
                received: 0,
                sha: [0; 32],
                error: Some(format!("backend listener: {e}")),
            });
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config());
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    let (acceptor, reports) = (acceptor.clone(), reports.clone());
                    conns.spawn(async move {
                        if let Some(r) = serve_conn(acceptor, tcp, mode).await {
                            let _ = reports.send(r);
                        }
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

async fn serve_conn(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    mode: ServerMode,
) -> Option<ConnReport> {
    let fail = |what: &str, e: io::Error| {
        Some(ConnReport {
            received: 0,
            sha: [0; 32],
            error: Some(format!("backend {what}: {e}")),
        })
    };
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return fail("handshake", e),
        Err(_) => return fail("handshake", io::ErrorKind::TimedOut.into()),
    };
    match mode {
        ServerMode::Bulk { send } => {
            let (mut r, mut w) = tokio::io::split(tls);
            let (rd, wr) = tokio::join!(recv_hash(&mut r, None), async {
                send_stream(&mut w, send, SEED_DOWN, None, None).await?;
                w.shutdown().await
            });
            let (received, sha) = match rd {
                Ok(v) => v,
                Err(e) => return fail("read", e),
            };
            Some(ConnReport {
                received,
                sha,
                error: wr.err().map(|e| format!("backend write: {e}")),
            })
        }
        ServerMode::Sink => {
            let mut tls = tls;
            let (received, sha) = match recv_hash(&mut tls, None).await {
                Ok(v) => v,
                Err(e) => return fail("read", e),
            };
            let error = tls
                .shutdown()
                .await
                .err()
                .map(|e| format!("backend shutdown: {e}"));
            Some(ConnReport {
                received,
                sha,
                error,
            })
        }
        ServerMode::Echo => {
            let mut tls = tls;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match tls.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => return fail("echo read", e),
                };
                if let Err(e) = async {
                    tls.write_all(&buf[..n]).await?;
                    tls.flush().await
                }
                .await
                {
                    return fail("echo write", e);
                }
            }
            match tls.shutdown().await {
                Ok(()) => None,
                Err(e) => fail("echo shutdown", e),
            }
        }
    }
}

/// Writes `n` PRNG bytes (seed `seed`) in 64 KiB chunks, optionally paced at `rate` bytes/s.
async fn send_stream<W: AsyncWrite + Unpin>(
    w: &mut W,
    n: u64,
    seed: u64,
    rate: Option<f64>,
    progress: Option<&Progress>,
) -> io::Result<()> {
    let mut prng = Prng::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    while sent < n {
        let len = (n - sent).min(CHUNK as u64) as usize;
        prng.fill(&mut buf[..len]);
        w.write_all(&buf[..len]).await?;
        sent += len as u64;
        if let Some(p) = progress {
            p.add(len as u64);
        }
        if let Some(rate) = rate {
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            if due > tokio::time::Instant::now() {
                tokio::time::sleep_until(due).await;
            }
        }
    }
    w.flush().await
}

/// Reads to EOF hashing; on an error, the error says how many bytes had arrived before it.
async fn recv_hash<R: AsyncRead + Unpin>(
    r: &mut R,
    progress: Option<&Progress>,
) -> io::Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return Ok((total, hash.finalize().into())),
            Ok(n) => {
                hash.update(&buf[..n]);
                total += n as u64;
                if let Some(p) = progress {
                    p.add(n as u64);
                }
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("after {total} bytes received: {e}"),
                ));
            }
        }
    }
}

/// SHA-256 of what [`send_stream`] sends (computed once per size, outside the timed runs).
pub fn expected_sha(n: u64, seed: u64) -> [u8; 32] {
    tls::prng_sha(n, seed)
}

pub async fn connect_tls(target: SocketAddr) -> io::Result<TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect to {target}")))??;
    tcp.set_nodelay(true)?;
    tls::handshake(tcp, SNI_BACKEND).await
}

fn hex8(sha: &[u8; 32]) -> String {
    sha[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything a client workload needs; moved into the client namespace thread.
pub struct ClientCtx {
    pub target: SocketAddr,
    pub reports: mpsc::UnboundedReceiver<ConnReport>,
    /// The proxy's pid, to count its CPU time (paced).
    pub proxy_pid: Option<u32>,
    /// Bound for the whole workload.
    pub limit: Duration,
    /// Where the workload reports how far it is.
    pub progress: Progress,
}

impl ClientCtx {
    async fn report(&mut self) -> anyhow::Result<ConnReport> {
        let r = tokio::time::timeout(Duration::from_secs(60), self.reports.recv())
            .await
            .map_err(|_| {
                anyhow::anyhow!("the backend reported no finished connection within 60 s")
            })?
            .ok_or_else(|| anyhow::anyhow!("the backend stopped"))?;
        if let Some(e) = &r.error {
            anyhow::bail!("{e}");
        }
        Ok(r)
    }
}

/// One measured value: (metric, value, unit).
pub type Figure = (&'static str, f64, &'static str);

/// Result of one workload run: figures, and remarks worth reporting (errors that did not void the run).
pub struct Measured {
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

fn verify(what: &str, got: (u64, [u8; 32]), n: u64, want: &[u8; 32]) -> anyhow::Result<()> {
    anyhow::ensure!(
        got.0 == n,
        "{what}: {} of {n} bytes arrived ({} missing)",
        got.0,
        n as i128 - got.0 as i128
    );
    anyhow::ensure!(
        &got.1 == want,
        "{what}: all {n} bytes arrived but their SHA-256 differs (got {}.., want {}..): corrupted or reordered",
        hex8(&got.1),
        hex8(want)
    );
    Ok(())
}

/// `bulk`: one flow, `n` bytes each way concurrently; MB/s each way; both far ends verified.
pub async fn bulk(
    mut ctx: ClientCtx,
    n: u64,
    sha_up: [u8; 32],
    sha_down: [u8; 32],
) -> anyhow::Result<Measured> {
    let s = connect_tls(ctx.target).await?;
    let (mut r, mut w) = tokio::io::split(s);
    let start = Instant::now();
    let prog = ctx.progress.clone();
    prog.phase("transfer (both ways)", 2 * n, Unit::Bytes);
    let (sent, got) = tokio::time::timeout(ctx.limit, async {
        tokio::join!(
            async {
                send_stream(&mut w, n, SEED_UP, None, Some(&prog)).await?;
                w.shutdown().await
            },
            recv_hash(&mut r, Some(&prog))
        )
    })
    .await
    .map_err(|_| anyhow::anyhow!("bulk did not finish within {:?}", ctx.limit))?;
    let secs = start.elapsed().as_secs_f64();
    if sent.is_err() || got.is_err() {
        // Say what the backend saw too: which side lost what.
        let backend = match tokio::time::timeout(Duration::from_secs(3), ctx.reports.recv()).await {
            Ok(Some(r)) => match r.error {
                Some(e) => e,
                None => format!("backend received {} of {n} bytes", r.received),
            },
            _ => "backend reported nothing within 3 s".to_string(),
        };
        let what = match (&sent, &got) {
            (Err(e), _) => format!("client send: {e}"),
            (_, Err(e)) => format!("client receive (backend -> client, {n} bytes sent): {e}"),
            _ => unreachable!(),
        };
        anyhow::bail!("{what}; {backend}");
    }
    let got = got?;
    verify("backend -> client", got, n, &sha_down)?;
    let rep = ctx.report().await?;
    verify("client -> backend", (rep.received, rep.sha), n, &sha_up)?;
    Ok(Measured {
        figures: vec![("mb_s", n as f64 / secs / 1e6, "MB/s")],
        notes: Vec::new(),
    })
}

/// `paced`: one flow, client to backend at `rate` bytes/s for `n` bytes; machine-wide CPU seconds per GB
/// over the window from the first byte sent to the backend's last byte received (and verified).
pub async fn paced(
    mut ctx: ClientCtx,
    n: u64,
    rate: f64,
    sha: [u8; 32],
) -> anyhow::Result<Measured> {
    let s = connect_tls(ctx.target).await?;
    let (mut r, mut w) = tokio::io::split(s);
    let tck = sys::clk_tck();
    let proxy0 = ctx.proxy_pid.map(sys::tree_ticks);
    let machine0 = sys::machine_busy_ticks();
    let start = Instant::now();
    ctx.progress.phase("paced send", n, Unit::Bytes);
    tokio::time::timeout(ctx.limit, async {
        send_stream(&mut w, n, SEED_PACED, Some(rate), Some(&ctx.progress)).await?;
        w.shutdown().await
    })
    .await
    .map_err(|_| anyhow::anyhow!("paced send did not finish within {:?}", ctx.limit))?
    .map_err(|e| anyhow::anyhow!("client send: {e}"))?;
    let rep = ctx.report().await?;
    let secs = start.elapsed().as_secs_f64();
    let machine1 = sys::machine_busy_ticks();
    let proxy1 = ctx.proxy_pid.map(sys::tree_ticks);
    verify("client -> backend", (rep.received, rep.sha), n, &sha)?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut rest)).await;
    let gb = n as f64 / 1e9;
    let achieved = n as f64 / secs;
    let mut figures = vec![
        (
            "cpu_s_per_gb",
            (machine1 - machine0) as f64 / tck / gb,
            "s/GB",
        ),
        ("rate_mb_s", achieved / 1e6, "MB/s"),
    ];
    if let (Some(a), Some(b)) = (proxy0, proxy1) {
        figures.push((
            "proxy_cpu_s_per_gb",
            b.saturating_sub(a) as f64 / tck / gb,
            "s/GB",
        ));
    }
    let mut notes = Vec::new();
    if achieved < 0.9 * rate {
        notes.push(format!(
            "paced: reached only {:.0} of {:.0} MB/s (the path or the load generator could not keep the pace)",
            achieved / 1e6,
            rate / 1e6
        ));
    }
    Ok(Measured { figures, notes })
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

/// `rpc`: `flows` concurrent flows, each sending a 1 KiB request and waiting for its 1 KiB echo, for
/// `duration`; requests/s and latency percentiles (microseconds).
pub async fn rpc(ctx: ClientCtx, flows: usize, duration: Duration) -> anyhow::Result<Measured> {
    let mut streams = Vec::with_capacity(flows);
    ctx.progress
        .phase("opening flows", flows as u64, Unit::Count);
    for _ in 0..flows {
        streams.push(connect_tls(ctx.target).await?);
        ctx.progress.add(1);
    }
    ctx.progress.phase("requests", 0, Unit::Count);
    let mut req = vec![0u8; RPC_SIZE];
    Prng::new(42).fill(&mut req);
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for mut s in streams {
        let req = req.clone();
        let prog = ctx.progress.clone();
        set.spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut resp = vec![0u8; RPC_SIZE];
            while Instant::now() < deadline {
                let t = Instant::now();
                let step = async {
                    s.write_all(&req).await?;
                    s.flush().await?;
                    s.read_exact(&mut resp).await?;
                    io::Result::Ok(())
                };
                match tokio::time::timeout(Duration::from_secs(10), step).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(format!("rpc: {e}")),
                    Err(_) => return Err("rpc: no response within 10 s".to_string()),
                }
                lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                prog.add(1);
                if resp != req {
                    return Err("rpc: the response differs from the request".to_string());
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), s.shutdown()).await;
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
            Ok(lat)
        });
    }
    let mut all = Vec::new();
    let collect = async {
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(lat)) => all.extend(lat),
                Ok(Err(e)) => return Err(anyhow::anyhow!(e)),
                Err(e) => return Err(anyhow::anyhow!("rpc task: {e}")),
            }
        }
        Ok(())
    };
    tokio::time::timeout(ctx.limit, collect)
        .await
        .map_err(|_| anyhow::anyhow!("rpc did not finish within {:?}", ctx.limit))??;
    let secs = duration.as_secs_f64();
    all.sort_unstable();
    Ok(Measured {
        figures: vec![
            ("req_s", all.len() as f64 / secs, "req/s"),
            ("p50_us", percentile(&all, 0.50), "us"),
            ("p99_us", percentile(&all, 0.99), "us"),
            ("p999_us", percentile(&all, 0.999), "us"),
        ],
        notes: Vec::new(),
    })
}

/// One connect cycle: TCP connect, mTLS handshake, one 1 KiB request/response, close both ways.
async fn connect_once(target: SocketAddr, req: &[u8]) -> io::Result<()> {
    let mut s = connect_tls(target).await?;
    let step = async {
        s.write_all(req).await?;
        s.flush().await?;
        let mut resp = vec![0u8; req.len()];
        s.read_exact(&mut resp).await?;
        if resp != req {
            return Err(io::Error::other("the response differs from the request"));
        }
        s.shutdown().await?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await?;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), step)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "exchange or close took over 10 s"))?
}

/// `connect`: `parallel` loops of [`connect_once`] for `duration`; connections/s.
pub async fn connect(
    ctx: ClientCtx,
    parallel: usize,
    duration: Duration,
) -> anyhow::Result<Measured> {
    let mut req = vec![0u8; RPC_SIZE];
    Prng::new(43).fill(&mut req);
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    ctx.progress.phase("connections", 0, Unit::Count);
    for _ in 0..parallel {
        let req = req.clone();
        let target = ctx.target;
        let prog = ctx.progress.clone();
        set.spawn(async move {
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            while Instant::now() < deadline {
                match connect_once(target, &req).await {
                    Ok(()) => {
                        ok += 1;
                        prog.add(1);
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (ok, errors, first_error)
        });
    }
    let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
    let collect = async {
        while let Some(r) = set.join_next().await {
            let (o, e, f) = r.map_err(|e| anyhow::anyhow!("connect task: {e}"))?;
            ok += o;
            errors += e;
            if first_error.is_none() {
                first_error = f;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(ctx.limit, collect)
        .await
        .map_err(|_| anyhow::anyhow!("connect did not finish within {:?}", ctx.limit))??;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        ok > 0,
        "no connection completed ({errors} failed; first: {})",
        first_error.unwrap_or_default()
    );
    let mut notes = Vec::new();
    if errors > 0 {
        notes.push(format!(
            "connect: {errors} of {} cycles failed (first: {})",
            ok + errors,
            first_error.unwrap_or_default()
        ));
    }
    Ok(Measured {
        figures: vec![("conn_s", ok as f64 / secs, "conn/s")],
        notes,
    })
}
