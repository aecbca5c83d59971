//! The soak's traffic: a self-describing protocol inside mTLS, a backend that serves and verifies it,
//! and the client workers (bulk, RPC, churn, slow receiver, resets).
//!
//! Every flow starts with a [`Header`] from the client saying what it will send and what it wants back.
//! Payloads are a seeded PRNG stream ([`PrngStream`]): each receiver regenerates the stream and compares
//! every byte as it arrives, so a lost, duplicated or corrupted byte is caught at its offset (and TLS
//! itself rejects a record the proxy damaged). A flow that is reset on purpose must still deliver an
//! intact prefix.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use zone_ingress_tests::pki::SNI_BACKEND;
use zone_ingress_tests::tls;
use zone_ingress_tests::wire::Prng;

/// PRNG chunk: the sender and the verifier must fill in the same steps (a fill consumes whole u64s).
const CHUNK: usize = 64 * 1024;
/// No single flow may take longer than this: a stall is an error, not a hang.
const FLOW_LIMIT: Duration = Duration::from_secs(120);
/// How many error messages are kept for the report.
const KEPT_ERRORS: usize = 20;

/// What one flow does (first byte of the header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Both directions at once: `up` bytes to the backend, `down` bytes back, optionally paced.
    Bulk = 0,
    /// `param` round trips: `up` bytes request, `down` bytes response each.
    Rpc = 1,
    /// The backend sends `down` bytes; the client reads them slowly.
    Slow = 2,
    /// The client sends `param` bytes of an `up`-byte stream, then resets.
    ClientReset = 3,
    /// The backend sends `param` bytes of its stream, then resets.
    ServerReset = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        [
            Kind::Bulk,
            Kind::Rpc,
            Kind::Slow,
            Kind::ClientReset,
            Kind::ServerReset,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

/// The flow's first 37 bytes (client to backend).
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub kind: Kind,
    pub seed: u64,
    pub up: u64,
    pub down: u64,
    pub param: u64,
    /// Pacing of bulk streams in bytes/s (0: unpaced).
    pub rate: u32,
}

impl Header {
    const LEN: usize = 1 + 8 * 4 + 4;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.kind as u8;
        b[1..9].copy_from_slice(&self.seed.to_le_bytes());
        b[9..17].copy_from_slice(&self.up.to_le_bytes());
        b[17..25].copy_from_slice(&self.down.to_le_bytes());
        b[25..33].copy_from_slice(&self.param.to_le_bytes());
        b[33..37].copy_from_slice(&self.rate.to_le_bytes());
        b
    }

    fn decode(b: &[u8; Self::LEN]) -> Option<Header> {
        let u = |r: std::ops::Range<usize>| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[r]);
            u64::from_le_bytes(a)
        };
        Some(Header {
            kind: Kind::from_u8(b[0])?,
            seed: u(1..9),
            up: u(9..17),
            down: u(17..25),
            param: u(25..33),
            rate: u32::from_le_bytes([b[33], b[34], b[35], b[36]]),
        })
    }
}

/// Seeds of the two directions of one flow (distinct, so a reflected stream does not verify).
fn up_seed(seed: u64) -> u64 {
    seed.wrapping_mul(2)
}
fn down_seed(seed: u64) -> u64 {
    seed.wrapping_mul(2) | 1
}

/// A seeded byte stream produced in [`CHUNK`] steps, for sending or for checking what arrived.
pub struct PrngStream {
    prng: Prng,
    buf: Vec<u8>,
    pos: usize,
    left: u64,
}

impl PrngStream {
    pub fn new(seed: u64, len: u64) -> PrngStream {
        PrngStream {
            prng: Prng::new(seed),
            buf: Vec::new(),
            pos: 0,
            left: len,
        }
    }

    /// The next bytes of the stream (at most `max`, empty at its end).
    fn next(&mut self, max: usize) -> &[u8] {
        if self.pos == self.buf.len() {
            let len = self.left.min(CHUNK as u64) as usize;
            self.buf.resize(len, 0);
            self.prng.fill(&mut self.buf);
            self.left -= len as u64;
            self.pos = 0;
        }
        let n = max.min(self.buf.len() - self.pos);
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        out
    }

    fn remaining(&self) -> u64 {
        self.left + (self.buf.len() - self.pos) as u64
    }

    /// Checks `got` against the stream; `offset` is where `got` starts, for the message.
    fn verify(&mut self, mut got: &[u8], offset: u64) -> Result<(), String> {
        let mut at = offset;
        while !got.is_empty() {
            let want = self.next(got.len());
            if want.is_empty() {
                return Err(format!(
                    "{} bytes more than the {offset}+ expected arrived (duplicated or stray bytes)",
                    got.len()
                ));
            }
            let n = want.len();
            if let Some(i) = want.iter().zip(got).position(|(a, b)| a != b) {
                return Err(format!("corrupted byte at offset {}", at + i as u64));
            }
            got = &got[n..];
            at += n as u64;
        }
        Ok(())
    }
}

/// Counters shared by the client workers, the backend and the reporter.
#[derive(Default)]
pub struct Counters {
    pub flows: AtomicU64,
    pub flows_ok: AtomicU64,
    /// Flows reset on purpose whose delivered prefix verified.
    pub resets_ok: AtomicU64,
    /// Bytes checked against the PRNG stream (both directions, both ends).
    pub bytes_verified: AtomicU64,
    pub errors: AtomicU64,
    kept: Mutex<Vec<String>>,
}

impl Counters {
    pub fn error(&self, who: &str, msg: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut k) = self.kept.lock()
            && k.len() < KEPT_ERRORS
        {
            k.push(format!("{who}: {msg}"));
        }
    }

    pub fn kept_errors(&self) -> Vec<String> {
        self.kept.lock().map(|k| k.clone()).unwrap_or_default()
    }

    fn verified(&self, n: u64) {
        self.bytes_verified.fetch_add(n, Ordering::Relaxed);
    }
}

/// A reset or a cut-short stream (what a reset on purpose may look like to the other side), as opposed
/// to a damaged one.
fn is_cut(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// Sends `stream` (paced at `rate` bytes/s when non-zero).
async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    stream: &mut PrngStream,
    limit: u64,
    rate: u32,
) -> io::Result<()> {
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    while sent < limit {
        let chunk = stream.next((limit - sent).min(CHUNK as u64) as usize);
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        w.write_all(chunk).await?;
        sent += n as u64;
        if rate > 0 {
            let due = start + Duration::from_secs_f64(sent as f64 / f64::from(rate));
            tokio::time::sleep_until(due).await;
        }
    }
    w.flush().await
}

/// How a verified receive ended.
enum Received {
    /// Exactly the expected bytes, then EOF.
    Complete,
    /// The stream was cut (reset, EOF without close_notify) after this many verified bytes.
    Cut(u64, io::Error),
}

/// Reads to EOF, checking every byte against `stream`; `pause` sleeps between reads (slow receiver)
/// and `read_size` bounds each read.
async fn receive<R: AsyncRead + Unpin>(
    r: &mut R,
    stream: &mut PrngStream,
    counters: &Counters,
    read_size: usize,
    pause: Option<Duration>,
) -> Result<Received, String> {
    let mut buf = vec![0u8; read_size];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf).await {
            Ok(0) => {
                if stream.remaining() > 0 {
                    return Ok(Received::Cut(
                        total,
                        io::Error::new(io::ErrorKind::UnexpectedEof, "clean EOF"),
                    ));
                }
                return Ok(Received::Complete);
            }
            Ok(n) => {
                stream.verify(&buf[..n], total)?;
                counters.verified(n as u64);
                total += n as u64;
            }
            Err(e) if is_cut(&e) => return Ok(Received::Cut(total, e)),
            Err(e) => return Err(format!("read after {total} verified bytes: {e}")),
        }
        if let Some(p) = pause {
            tokio::time::sleep(p).await;
        }
    }
}

/// Reads exactly one RPC message of `len` bytes and checks it.
async fn receive_exact<R: AsyncRead + Unpin>(
    r: &mut R,
    seed: u64,
    len: u64,
    counters: &Counters,
) -> Result<(), String> {
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)
        .await
        .map_err(|e| format!("read of a {len}-byte message: {e}"))?;
    PrngStream::new(seed, len).verify(&buf, 0)?;
    counters.verified(len);
    Ok(())
}

fn must_complete(what: &str, r: Received, want: u64) -> Result<(), String> {
    match r {
        Received::Complete => Ok(()),
        Received::Cut(n, e) => Err(format!(
            "{what}: {n} of {want} bytes arrived, then the stream ended: {e}"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Backend

/// Serves soak flows on `listener` until the task is aborted.
pub async fn serve(listener: std::net::TcpListener, counters: Arc<Counters>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            counters.error("backend", format!("listener: {e}"));
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config());
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    let (acceptor, counters) = (acceptor.clone(), counters.clone());
                    conns.spawn(async move {
                        match tokio::time::timeout(FLOW_LIMIT, serve_conn(acceptor, tcp, &counters)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => counters.error("backend", e),
                            Err(_) => counters.error("backend", format!("flow did not finish within {FLOW_LIMIT:?}")),
                        }
                    });
                }
                // EMFILE and the like: back off, the clients will see their own errors.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    counters: &Counters,
) -> Result<(), String> {
    let mut tls = acceptor
        .accept(tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut hb = [0u8; Header::LEN];
    tls.read_exact(&mut hb)
        .await
        .map_err(|e| format!("reading the flow header: {e}"))?;
    let h = Header::decode(&hb).ok_or("unknown flow kind in the header")?;
    match h.kind {
        Kind::Bulk => {
            let (mut r, mut w) = tokio::io::split(tls);
            let mut up = PrngStream::new(up_seed(h.seed), h.up);
            let mut down = PrngStream::new(down_seed(h.seed), h.down);
            let (rd, wr) = tokio::join!(receive(&mut r, &mut up, counters, CHUNK, None), async {
                send(&mut w, &mut down, h.down, h.rate).await?;
                w.shutdown().await
            });
            must_complete("bulk upload", rd?, h.up)?;
            wr.map_err(|e| format!("bulk download write: {e}"))
        }
        Kind::Rpc => {
            for i in 0..h.param {
                receive_exact(&mut tls, up_seed(h.seed ^ i), h.up, counters).await?;
                let mut resp = PrngStream::new(down_seed(h.seed ^ i), h.down);
                send(&mut tls, &mut resp, h.down, 0)
                    .await
                    .map_err(|e| format!("rpc response {i}: {e}"))?;
            }
            let mut rest = [0u8; 1];
            match tls.read(&mut rest).await {
                Ok(0) => {}
                Ok(_) => return Err("bytes after the last RPC request".into()),
                Err(e) => return Err(format!("waiting for the client's close: {e}")),
            }
            tls.shutdown()
                .await
                .map_err(|e| format!("rpc shutdown: {e}"))
        }
        Kind::Slow => {
            let mut down = PrngStream::new(down_seed(h.seed), h.down);
            send(&mut tls, &mut down, h.down, 0)
                .await
                .map_err(|e| format!("slow-receiver stream write: {e}"))?;
            tls.shutdown()
                .await
                .map_err(|e| format!("slow-receiver shutdown: {e}"))
        }
        Kind::ClientReset => {
            // The go-ahead: the header has arrived, so what the reset may cut is only the stream
            // (a reset discards what the client's kernel has not sent yet).
            tls.write_all(b"k")
                .await
                .and(tls.flush().await)
                .map_err(|e| format!("client-reset go-ahead: {e}"))?;
            let mut up = PrngStream::new(up_seed(h.seed), h.up);
            match receive(&mut tls, &mut up, counters, CHUNK, None).await? {
                Received::Cut(n, _) if n <= h.param => Ok(()),
                Received::Cut(n, e) => Err(format!(
                    "client reset after {} bytes but {n} arrived ({e})",
                    h.param
                )),
                Received::Complete => Err(format!(
                    "the client meant to reset after {} of {} bytes, yet the stream completed",
                    h.param, h.up
                )),
            }
        }
        Kind::ServerReset => {
            let mut down = PrngStream::new(down_seed(h.seed), h.down);
            send(&mut tls, &mut down, h.param, 0)
                .await
                .map_err(|e| format!("server-reset prefix write: {e}"))?;
            let (tcp, _) = tls.into_inner();
            tls::reset(tcp);
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// The mix of concurrent client workers, and their sizes.
#[derive(Clone, Debug)]
pub struct Mix {
    pub bulk: usize,
    pub bulk_max: u64,
    pub bulk_rate: u32,
    /// Workers of unpaced bulk flows, each followed by [`BURST_GAP`] of rest.
    pub bursts: usize,
    pub burst_direction: BurstDirection,
    pub rpc: usize,
    pub churn: usize,
    pub slow: usize,
    pub resets: usize,
}

/// Which way an unpaced bulk flow (a burst) carries its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BurstDirection {
    Both,
    Up,
    Down,
}

/// One client worker's job.
#[derive(Clone, Copy, Debug)]
enum Job {
    Bulk,
    Burst,
    Rpc,
    Churn,
    Slow,
    Reset,
}

/// Runs every worker of `mix` against `target` until `deadline`; each worker starts its next flow
/// only while the deadline has not passed, so the run ends with every flow finished.
pub async fn run_clients(
    target: SocketAddr,
    mix: Mix,
    deadline: tokio::time::Instant,
    counters: Arc<Counters>,
) {
    let mut workers = JoinSet::new();
    let jobs = [
        (Job::Bulk, mix.bulk),
        (Job::Burst, mix.bursts),
        (Job::Rpc, mix.rpc),
        (Job::Churn, mix.churn),
        (Job::Slow, mix.slow),
        (Job::Reset, mix.resets),
    ];
    let mut worker_id = 0u64;
    for (job, n) in jobs {
        for _ in 0..n {
            worker_id += 1;
            let (mix, counters) = (mix.clone(), counters.clone());
            let mut rng = Prng::new(0x50a4_0000 + worker_id);
            workers.spawn(async move {
                let mut flow_no = 0u64;
                while tokio::time::Instant::now() < deadline {
                    flow_no += 1;
                    let seed = (worker_id << 40) ^ flow_no ^ rng.next_u64();
                    let h = plan(job, &mix, &mut rng, seed);
                    counters.flows.fetch_add(1, Ordering::Relaxed);
                    let outcome =
                        tokio::time::timeout(FLOW_LIMIT, client_flow(target, h, &counters)).await;
                    match outcome {
                        Ok(Ok(true)) => counters.flows_ok.fetch_add(1, Ordering::Relaxed),
                        Ok(Ok(false)) => counters.resets_ok.fetch_add(1, Ordering::Relaxed),
                        Ok(Err(e)) => {
                            counters.error(&format!("client {job:?}"), e);
                            // Do not spin on a broken path.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            0
                        }
                        Err(_) => {
                            counters.error(
                                &format!("client {job:?}"),
                                format!("flow did not finish within {FLOW_LIMIT:?}"),
                            );
                            0
                        }
                    };
                    if matches!(job, Job::Burst) {
                        tokio::time::sleep(BURST_GAP).await;
                    }
                }
            });
        }
    }
    while workers.join_next().await.is_some() {}
}

/// Rest after each unpaced bulk flow, so bursts load the machine only part of the time.
const BURST_GAP: Duration = Duration::from_secs(3);

/// A uniform value in `lo..=hi`.
fn between(rng: &mut Prng, lo: u64, hi: u64) -> u64 {
    lo + rng.next_u64() % (hi - lo + 1)
}

fn plan(job: Job, mix: &Mix, rng: &mut Prng, seed: u64) -> Header {
    let h = |kind, up, down, param| Header {
        kind,
        seed,
        up,
        down,
        param,
        rate: 0,
    };
    match job {
        Job::Bulk => Header {
            rate: mix.bulk_rate,
            ..h(
                Kind::Bulk,
                between(rng, 1, mix.bulk_max),
                between(rng, 1, mix.bulk_max),
                0,
            )
        },
        // Unpaced, as fast as the path goes: veth then drops packets and TCP retransmits, including
        // retransmissions that overlap bytes already received (which the splice must not repeat).
        Job::Burst => {
            let mut burst = h(
                Kind::Bulk,
                between(rng, 8 << 20, mix.bulk_max.max(8 << 20)),
                between(rng, 8 << 20, mix.bulk_max.max(8 << 20)),
                0,
            );
            match mix.burst_direction {
                BurstDirection::Both => {}
                BurstDirection::Up => burst.down = 0,
                BurstDirection::Down => burst.up = 0,
            }
            burst
        }
        Job::Rpc => h(
            Kind::Rpc,
            between(rng, 64, 16 * 1024),
            between(rng, 64, 16 * 1024),
            between(rng, 20, 200),
        ),
        Job::Churn => h(Kind::Rpc, between(rng, 1, 512), between(rng, 1, 512), 1),
        // Past the default 4 MiB splice budget plus the sockets' buffers: the splice pauses and
        // the agent forwards at the reader's pace, then resumes or ends paused.
        Job::Slow => h(Kind::Slow, 0, between(rng, 6 << 20, 16 << 20), 0),
        Job::Reset => {
            let len = between(rng, 64 * 1024, 2 << 20);
            let cut = between(rng, 1, len - 1);
            if rng.next_u64().is_multiple_of(2) {
                h(Kind::ClientReset, len, 0, cut)
            } else {
                h(Kind::ServerReset, 0, len, cut)
            }
        }
    }
}

/// One flow from the client side. `Ok(true)`: completed and verified; `Ok(false)`: reset on purpose
/// and the delivered prefix verified.
async fn client_flow(target: SocketAddr, h: Header, counters: &Counters) -> Result<bool, String> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
        .await
        .map_err(|_| "connect: no answer within 5 s".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut tls = tls::handshake(tcp, SNI_BACKEND)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(&h.encode())
        .await
        .map_err(|e| format!("writing the header: {e}"))?;
    match h.kind {
        Kind::Bulk => {
            let (mut r, mut w) = tokio::io::split(tls);
            let mut up = PrngStream::new(up_seed(h.seed), h.up);
            let mut down = PrngStream::new(down_seed(h.seed), h.down);
            let (rd, wr) = tokio::join!(receive(&mut r, &mut down, counters, CHUNK, None), async {
                send(&mut w, &mut up, h.up, h.rate).await?;
                w.shutdown().await
            });
            wr.map_err(|e| format!("bulk upload write: {e}"))?;
            must_complete("bulk download", rd?, h.down)?;
            Ok(true)
        }
        Kind::Rpc => {
            for i in 0..h.param {
                let mut req = PrngStream::new(up_seed(h.seed ^ i), h.up);
                send(&mut tls, &mut req, h.up, 0)
                    .await
                    .map_err(|e| format!("rpc request {i}: {e}"))?;
                receive_exact(&mut tls, down_seed(h.seed ^ i), h.down, counters)
                    .await
                    .map_err(|e| format!("rpc response {i}: {e}"))?;
            }
            tls.shutdown()
                .await
                .map_err(|e| format!("rpc shutdown: {e}"))?;
            let mut rest = [0u8; 1];
            match tls.read(&mut rest).await {
                Ok(0) => Ok(true),
                Ok(_) => Err("bytes after the last RPC response".into()),
                Err(e) => Err(format!("waiting for the backend's close: {e}")),
            }
        }
        Kind::Slow => {
            let mut down = PrngStream::new(down_seed(h.seed), h.down);
            let r = receive(
                &mut tls,
                &mut down,
                counters,
                16 * 1024,
                Some(Duration::from_millis(10)),
            )
            .await?;
            must_complete("slow-receiver download", r, h.down)?;
            Ok(true)
        }
        Kind::ClientReset => {
            let mut go = [0u8; 1];
            tls.read_exact(&mut go)
                .await
                .map_err(|e| format!("client-reset go-ahead: {e}"))?;
            let mut up = PrngStream::new(up_seed(h.seed), h.up);
            send(&mut tls, &mut up, h.param, 0)
                .await
                .map_err(|e| format!("client-reset prefix write: {e}"))?;
            let (tcp, _) = tls.into_inner();
            tls::reset(tcp);
            Ok(false)
        }
        Kind::ServerReset => {
            let mut down = PrngStream::new(down_seed(h.seed), h.down);
            match receive(&mut tls, &mut down, counters, CHUNK, None).await? {
                Received::Cut(n, _) if n <= h.param => Ok(false),
                Received::Cut(n, e) => Err(format!(
                    "backend reset after {} bytes but {n} arrived ({e})",
                    h.param
                )),
                Received::Complete => Err(format!(
                    "the backend meant to reset after {} of {} bytes, yet the stream completed",
                    h.param, h.down
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            kind: Kind::ServerReset,
            seed: 7,
            up: 1 << 40,
            down: 3,
            param: 9,
            rate: 5,
        };
        let d = Header::decode(&h.encode()).expect("decodes");
        assert_eq!(
            (d.kind, d.seed, d.up, d.down, d.param, d.rate),
            (h.kind, 7, 1 << 40, 3, 9, 5)
        );
    }

    #[test]
    fn stream_verifies_any_split_and_catches_damage() {
        let len = 200_000u64;
        let mut src = PrngStream::new(3, len);
        let mut all = Vec::new();
        loop {
            let c = src.next(7777).to_vec();
            if c.is_empty() {
                break;
            }
            all.extend(c);
        }
        assert_eq!(all.len() as u64, len);
        let mut v = PrngStream::new(3, len);
        for (i, part) in all.chunks(1234).enumerate() {
            v.verify(part, (i * 1234) as u64)
                .expect("intact bytes verify");
        }
        assert_eq!(v.remaining(), 0);
        let mut bad = all.clone();
        bad[100_001] ^= 1;
        let err = PrngStream::new(3, len).verify(&bad, 0).unwrap_err();
        assert!(err.contains("offset 100001"), "{err}");
        let mut extra = all;
        extra.push(0);
        assert!(PrngStream::new(3, len).verify(&extra, 0).is_err());
    }
}
