//! mTLS between the test client and the test backends (the agent in the middle never decrypts).
//!
//! [`server_config`] requires a client certificate from the test CA; [`client_config`] presents one and
//! verifies the backend against the CA. [`Backend`] runs one [`Behaviour`] per accepted connection and reports
//! an [`Outcome`] for each.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::netns::Netns;
use crate::pki::Pki;
use crate::wire::Prng;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots
        .add(Pki::get().ca_der.clone())
        .expect("add the test CA to the root store");
    roots
}

/// Backend side: requires and verifies a client certificate (mTLS), serves the test server certificate.
pub fn server_config() -> Arc<ServerConfig> {
    static CFG: OnceLock<Arc<ServerConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        let pki = Pki::get();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots()), provider())
            .build()
            .expect("build the client certificate verifier");
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(pki.server_chain.clone(), pki.server_key())
            .expect("server certificate and key match");
        Arc::new(cfg)
    })
    .clone()
}

/// Client side: presents the test client certificate, trusts only the test CA.
pub fn client_config() -> Arc<ClientConfig> {
    static CFG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        let pki = Pki::get();
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots())
            .with_client_auth_cert(pki.client_chain.clone(), pki.client_key())
            .expect("client certificate and key match");
        Arc::new(cfg)
    })
    .clone()
}

/// A DNS-valid SNI as rustls wants it.
pub fn server_name(sni: &str) -> ServerName<'static> {
    ServerName::try_from(sni.to_string())
        .unwrap_or_else(|e| panic!("{sni:?} is not a name rustls can send: {e}"))
}

/// TLS client handshake over any stream (plain TCP or one of the `wire` wrappers), bounded by 10 s.
pub async fn handshake<S>(io: S, sni: &str) -> io::Result<tokio_rustls::client::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connector = tokio_rustls::TlsConnector::from(client_config());
    tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(server_name(sni), io),
    )
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake did not finish within 10 s",
        )
    })?
}

/// Connects from `ns` to `addr` and completes an mTLS handshake with `sni`.
pub async fn connect(
    ns: &Netns,
    addr: SocketAddr,
    sni: &str,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = ns.connect(addr).await?;
    handshake(tcp, sni).await
}

/// Writes `msg`, reads back exactly as many bytes and checks they are equal.
pub async fn echo_roundtrip<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> io::Result<()> {
    s.write_all(msg).await?;
    s.flush().await?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await?;
    if back != msg {
        return Err(io::Error::other("echo returned different bytes"));
    }
    Ok(())
}

/// Writes `n` pseudo-random bytes (seeded) in 64 KiB chunks; returns their SHA-256.
pub async fn send_prng<W: AsyncWrite + Unpin>(
    w: &mut W,
    n: u64,
    seed: u64,
) -> io::Result<[u8; 32]> {
    let mut prng = Prng::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let len = left.min(buf.len() as u64) as usize;
        prng.fill(&mut buf[..len]);
        hash.update(&buf[..len]);
        w.write_all(&buf[..len]).await?;
        left -= len as u64;
    }
    w.flush().await?;
    Ok(hash.finalize().into())
}

/// Reads to EOF; returns the byte count and SHA-256 of everything read.
pub async fn recv_hash<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

/// Both directions at once, the client's side of a bulk flow: sends `n` bytes of the seeded PRNG
/// stream and closes the write side, while reading what the other side sends to a clean EOF.
/// Returns the SHA-256 sent and (bytes received, their SHA-256); panics naming the side that
/// failed.
pub async fn send_and_receive<S: AsyncRead + AsyncWrite>(
    s: S,
    n: u64,
    seed: u64,
) -> ([u8; 32], (u64, [u8; 32])) {
    let (mut r, mut w) = tokio::io::split(s);
    tokio::join!(
        async {
            let sha = send_prng(&mut w, n, seed)
                .await
                .unwrap_or_else(|e| panic!("client: send {n} bytes: {e}"));
            w.shutdown()
                .await
                .unwrap_or_else(|e| panic!("client: close its write side: {e}"));
            sha
        },
        async {
            recv_hash(&mut r)
                .await
                .unwrap_or_else(|e| panic!("client: receive to a clean EOF: {e}"))
        }
    )
}

/// SHA-256 of `n` bytes of the seeded PRNG stream (what [`send_prng`] sends).
pub fn prng_sha(n: u64, seed: u64) -> [u8; 32] {
    let mut prng = Prng::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let len = left.min(buf.len() as u64) as usize;
        prng.fill(&mut buf[..len]);
        hash.update(&buf[..len]);
        left -= len as u64;
    }
    hash.finalize().into()
}

/// Sets SO_LINGER 0 on a TCP stream and drops it: the kernel sends a RST instead of a FIN.
pub fn reset(tcp: TcpStream) {
    socket2::SockRef::from(&tcp)
        .set_linger(Some(Duration::ZERO))
        .expect("set SO_LINGER 0 before the reset");
    drop(tcp);
}

/// True when the error says the peer reset the TCP connection (as opposed to a clean or unclean EOF).
pub fn is_reset(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::ConnectionReset
}

/// What a backend does with each accepted connection (after the TLS handshake).
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Echo everything back until EOF, then close (close_notify + FIN).
    Echo,
    /// Concurrently: read to EOF hashing, and send `send` PRNG bytes (seed `seed`) right after the handshake,
    /// then close the write side. With `send > 0` and a silent client this is the server-first pattern.
    Bulk { send: u64, seed: u64 },
    /// Read to EOF (the client half-closed), then reply with `reply` and close.
    ReplyAfterEof { reply: Vec<u8> },
    /// Send `first` and close the write side right away (half-close), then read to EOF and report it.
    HalfCloseFirst { first: Vec<u8> },
    /// Read `after` bytes, send `send` bytes, then reset the connection (SO_LINGER 0).
    ResetAfter { after: u64, send: u64 },
}

/// What happened on one backend connection.
#[derive(Debug)]
pub struct Outcome {
    /// The SNI the client sent, as the backend's TLS stack saw it.
    pub sni: Option<String>,
    pub received: u64,
    pub received_sha: [u8; 32],
    /// The bytes received, kept only when small (< 64 KiB) for exact assertions.
    pub received_bytes: Vec<u8>,
    pub sent: u64,
    pub sent_sha: [u8; 32],
    /// Where it went wrong (`"handshake"`, `"read"`, `"write"`, `"shutdown"`) and the error.
    pub error: Option<(&'static str, io::Error)>,
}

impl Outcome {
    fn new() -> Outcome {
        Outcome {
            sni: None,
            received: 0,
            received_sha: Sha256::digest([]).into(),
            received_bytes: Vec::new(),
            sent: 0,
            sent_sha: Sha256::digest([]).into(),
            error: None,
        }
    }
}

/// A TLS backend listening inside a namespace; one task per connection, one [`Outcome`] per connection.
pub struct Backend {
    pub addr: SocketAddr,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    accepts: tokio::task::AbortHandle,
}

impl Backend {
    /// Listens on `addr` inside `ns` and serves every connection with `behaviour`.
    pub async fn start(ns: &Netns, addr: SocketAddr, behaviour: Behaviour) -> Backend {
        let listener = ns.listen(addr).await;
        let (tx, outcomes) = mpsc::unbounded_channel();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let (tcp, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("backend accept on {addr} failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, behaviour, tx) = (acceptor.clone(), behaviour.clone(), tx.clone());
                conns.spawn(async move {
                    let out = serve(acceptor, tcp, behaviour).await;
                    let _ = tx.send(out);
                });
                // Reap finished connections so the set stays small.
                while conns.try_join_next().is_some() {}
            }
        });
        Backend {
            addr,
            outcomes,
            accepts: task.abort_handle(),
        }
    }

    /// The outcome of the next finished connection, waiting at most `limit`.
    pub async fn outcome(&mut self, limit: Duration) -> Outcome {
        tokio::time::timeout(limit, self.outcomes.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "backend {} reported no finished connection within {limit:?}",
                    self.addr
                )
            })
            .expect("backend task ended")
    }

    /// Outcomes already reported, without waiting.
    pub fn drain(&mut self) -> Vec<Outcome> {
        let mut v = Vec::new();
        while let Ok(o) = self.outcomes.try_recv() {
            v.push(o);
        }
        v
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accepts.abort();
    }
}

async fn serve(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    behaviour: Behaviour,
) -> Outcome {
    let mut out = Outcome::new();
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            out.error = Some(("handshake", e));
            return out;
        }
        Err(_) => {
            out.error = Some((
                "handshake",
                io::Error::new(io::ErrorKind::TimedOut, "no handshake in 10 s"),
            ));
            return out;
        }
    };
    out.sni = tls.get_ref().1.server_name().map(str::to_string);
    match behaviour {
        Behaviour::Echo => echo(tls, &mut out).await,
        Behaviour::Bulk { send, seed } => {
            let (mut r, mut w) = tokio::io::split(tls);
            let reader = async {
                match recv_hash(&mut r).await {
                    Ok((n, sha)) => Ok((n, sha)),
                    Err(e) => Err(("read", e)),
                }
            };
            let writer = async {
                let sha = send_prng(&mut w, send, seed)
                    .await
                    .map_err(|e| ("write", e))?;
                w.shutdown().await.map_err(|e| ("shutdown", e))?;
                Ok(sha)
            };
            let (rd, wr) = tokio::join!(reader, writer);
            match rd {
                Ok((n, sha)) => {
                    out.received = n;
                    out.received_sha = sha;
                }
                Err(e) => out.error = Some(e),
            }
            match wr {
                Ok(sha) => {
                    out.sent = send;
                    out.sent_sha = sha;
                }
                Err(e) => {
                    if out.error.is_none() {
                        out.error = Some(e);
                    }
                }
            }
        }
        Behaviour::ReplyAfterEof { reply } => {
            let mut tls = tls;
            let mut got = Vec::new();
            if let Err(e) = tls.read_to_end(&mut got).await {
                out.error = Some(("read", e));
                return out;
            }
            record(&mut out, &got);
            if let Err(e) = async {
                tls.write_all(&reply).await?;
                tls.flush().await
            }
            .await
            {
                out.error = Some(("write", e));
                return out;
            }
            out.sent = reply.len() as u64;
            if let Err(e) = tls.shutdown().await {
                out.error = Some(("shutdown", e));
            }
        }
        Behaviour::HalfCloseFirst { first } => {
            let mut tls = tls;
            if let Err(e) = async {
                tls.write_all(&first).await?;
                tls.flush().await
            }
            .await
            {
                out.error = Some(("write", e));
                return out;
            }
            out.sent = first.len() as u64;
            if let Err(e) = tls.shutdown().await {
                out.error = Some(("shutdown", e));
                return out;
            }
            let mut got = Vec::new();
            match tls.read_to_end(&mut got).await {
                Ok(_) => record(&mut out, &got),
                Err(e) => {
                    record(&mut out, &got);
                    out.error = Some(("read", e));
                }
            }
        }
        Behaviour::ResetAfter { after, send } => {
            let mut tls = tls;
            let mut got = vec![0u8; after as usize];
            if let Err(e) = tls.read_exact(&mut got).await {
                out.error = Some(("read", e));
                return out;
            }
            record(&mut out, &got);
            match send_prng(&mut tls, send, 7).await {
                Ok(sha) => {
                    out.sent = send;
                    out.sent_sha = sha;
                }
                Err(e) => {
                    out.error = Some(("write", e));
                    return out;
                }
            }
            let (tcp, _) = tls.into_inner();
            reset(tcp);
        }
    }
    out
}

fn record(out: &mut Outcome, got: &[u8]) {
    out.received = got.len() as u64;
    out.received_sha = Sha256::digest(got).into();
    if got.len() < 64 * 1024 {
        out.received_bytes = got.to_vec();
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, out: &mut Outcome) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut hash = Sha256::new();
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                out.error = Some(("read", e));
                out.received_sha = hash.finalize().into();
                return;
            }
        };
        hash.update(&buf[..n]);
        out.received += n as u64;
        if out.received_bytes.len() + n < 64 * 1024 {
            out.received_bytes.extend_from_slice(&buf[..n]);
        }
        if let Err(e) = async {
            s.write_all(&buf[..n]).await?;
            s.flush().await
        }
        .await
        {
            out.error = Some(("write", e));
            out.received_sha = hash.finalize().into();
            return;
        }
        out.sent += n as u64;
    }
    out.received_sha = hash.finalize().into();
    out.sent_sha = out.received_sha;
    if let Err(e) = s.shutdown().await {
        out.error = Some(("shutdown", e));
    }
}

/// Runs `openssl s_client` inside `ns` against `addr` with SNI `sni` (any string, e.g. Kuma's legacy
/// `backend{mesh=default}`), presenting the test client certificate and verifying the server against the test
/// CA. Writes `msg` and returns the first `msg.len()` bytes it prints back (10 s bound). On failure the error
/// carries s_client's stderr.
pub async fn openssl_echo(
    ns: &Netns,
    addr: SocketAddr,
    sni: &str,
    msg: &[u8],
) -> io::Result<Vec<u8>> {
    let pki = Pki::get();
    let mut cmd = ns.command("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-servername")
        .arg(sni)
        .arg("-cert")
        .arg(pki.file("client.pem"))
        .arg("-key")
        .arg(pki.file("client.key"))
        .arg("-CAfile")
        .arg(pki.file("ca.pem"))
        .args(["-verify_return_error", "-quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let exchange = async {
        stdin.write_all(msg).await?;
        stdin.flush().await?;
        let mut got = vec![0u8; msg.len()];
        stdout.read_exact(&mut got).await?;
        io::Result::Ok(got)
    };
    let res = tokio::time::timeout(Duration::from_secs(10), exchange).await;
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let mut err_text = String::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(1), stderr.read_to_string(&mut err_text)).await;
    match res {
        Ok(Ok(got)) => Ok(got),
        Ok(Err(e)) => Err(io::Error::new(
            e.kind(),
            format!("openssl s_client: {e}; stderr: {err_text}"),
        )),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("openssl s_client: no echo within 10 s; stderr: {err_text}"),
        )),
    }
}

/// Polls `/proc/thread-self/net/tcp{,6}` inside `ns` until something listens on `port` (at most `limit`).
pub async fn wait_listening(ns: &Netns, port: u16, limit: Duration) {
    let start = std::time::Instant::now();
    loop {
        let listening = ns.exec(move || {
            ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
                .iter()
                .any(|p| {
                    std::fs::read_to_string(p)
                        .unwrap_or_default()
                        .lines()
                        .skip(1)
                        .any(|l| {
                            let f: Vec<&str> = l.split_whitespace().collect();
                            f.len() > 3
                                && f[3] == "0A"
                                && f[1]
                                    .rsplit(':')
                                    .next()
                                    .and_then(|h| u16::from_str_radix(h, 16).ok())
                                    == Some(port)
                        })
                })
        });
        if listening {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "nothing listened on port {port} in namespace {} within {limit:?}",
            ns.name()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An `openssl s_server -rev` backend (mTLS: `-Verify 1` against the test CA): it answers every line with the
/// line reversed. Used for Kuma's legacy SNI, which a rustls server rejects (`illegal_parameter`).
pub struct OpensslRevServer {
    child: std::process::Child,
    stderr_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl OpensslRevServer {
    pub async fn start(ns: &Netns, port: u16) -> OpensslRevServer {
        let pki = Pki::get();
        let dir = tempfile::Builder::new()
            .prefix("zi-s_server-")
            .tempdir()
            .expect("temp dir for s_server logs");
        let stderr_path = dir.path().join("stderr.log");
        let child = ns
            .command("openssl")
            .arg("s_server")
            .arg("-accept")
            .arg(port.to_string())
            .arg("-cert")
            .arg(pki.file("server.pem"))
            .arg("-key")
            .arg(pki.file("server.key"))
            .arg("-CAfile")
            .arg(pki.file("ca.pem"))
            .args(["-Verify", "1", "-verify_return_error", "-rev", "-quiet"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("create s_server stderr log"))
            .spawn()
            .expect("spawn openssl s_server (is the openssl CLI installed?)");
        let server = OpensslRevServer {
            child,
            stderr_path,
            _dir: dir,
        };
        wait_listening(ns, port, Duration::from_secs(5)).await;
        server
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for OpensslRevServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- openssl s_server stderr ----\n{}\n----", self.stderr());
        }
    }
}

/// A plain TCP backend (no TLS) that records the raw bytes of each connection, to check that the agent
/// forwards exactly what the client sent (the ClientHello replay and whatever followed it).
pub struct RawRecorder {
    pub addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<Vec<u8>>,
    accepts: tokio::task::AbortHandle,
}

impl RawRecorder {
    /// Listens on `addr` in `ns`; each connection is read until it has `want` bytes, EOF, or 5 s passed.
    pub async fn start(ns: &Netns, addr: SocketAddr, want: usize) -> RawRecorder {
        let listener = ns.listen(addr).await;
        let (tx, conns) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut set = JoinSet::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                set.spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = vec![0u8; 16 * 1024];
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    while got.len() < want {
                        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                            _ => break,
                        }
                    }
                    let _ = tx.send(got);
                });
                while set.try_join_next().is_some() {}
            }
        });
        RawRecorder {
            addr,
            conns,
            accepts: task.abort_handle(),
        }
    }

    /// The bytes of the next connection (waits at most `limit`).
    pub async fn next(&mut self, limit: Duration) -> Vec<u8> {
        tokio::time::timeout(limit, self.conns.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no connection reached the raw backend {} within {limit:?}",
                    self.addr
                )
            })
            .expect("raw backend task ended")
    }
}

impl Drop for RawRecorder {
    fn drop(&mut self) {
        self.accepts.abort();
    }
}
