//! Captures the first flight (the ClientHello records) of real TLS clients, as fuzzing seeds.
//!
//! `cargo run -p zone-ingress-tests --example capture_hellos -- fuzz/seeds/client_hello`
//!
//! A listener on 127.0.0.1 accepts one connection per client, reads TLS records until the
//! handshake message they carry is complete, writes those bytes verbatim to `<dir>/<name>.bin` and
//! closes the connection (the client then fails its handshake, which is expected). Clients: rustls
//! (the harness's mTLS config, and a TLS 1.2-only one with ALPN `kuma`), `openssl s_client` (TLS 1.3
//! and 1.2, with Kuma's legacy non-DNS SNI) and `curl` (HTTP/2 ALPN, TLS 1.3 and 1.2). Everything
//! stays on loopback and every wait is bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use zone_ingress_tests::pki::{SNI_BACKEND, SNI_LEGACY};

const LIMIT: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: capture_hellos <output dir>")?,
    );
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let port = addr.port().to_string();
    let connect = format!("127.0.0.1:{port}");
    let resolve = format!("{SNI_BACKEND}:{port}:127.0.0.1");
    let url = format!("https://{SNI_BACKEND}:{port}/");

    capture(&listener, &dir, "rustls-tls13-mtls", || {
        rustls_client(addr, zone_ingress_tests::tls::client_config())
    })?;
    capture(&listener, &dir, "rustls-tls12-alpn-kuma", || {
        rustls_client(addr, rustls_tls12_kuma())
    })?;
    let openssl = |extra: &[&str]| {
        let mut args = vec!["s_client", "-connect", &connect, "-quiet"];
        args.extend_from_slice(extra);
        spawn("openssl", &args)
    };
    capture(&listener, &dir, "openssl-tls13-legacy-sni", || {
        openssl(&["-servername", SNI_LEGACY, "-alpn", "kuma"])
    })?;
    capture(&listener, &dir, "openssl-tls12-mesh-service-sni", || {
        openssl(&["-tls1_2", "-servername", SNI_BACKEND])
    })?;
    let curl = |extra: &[&str]| {
        let mut args = vec!["-sk", "--max-time", "5", "--resolve", &resolve];
        args.extend_from_slice(extra);
        args.push(&url);
        spawn("curl", &args)
    };
    capture(&listener, &dir, "curl-tls13-h2", || curl(&[]))?;
    capture(&listener, &dir, "curl-tls12", || {
        curl(&["--tlsv1.2", "--tls-max", "1.2", "--http1.1"])
    })?;
    Ok(())
}

/// A client process or thread to reap once its hello is captured.
enum Client {
    Process(Child),
    Thread(std::thread::JoinHandle<()>),
}

fn spawn(program: &str, args: &[&str]) -> Result<Client> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {program} (is it installed?)"))?;
    Ok(Client::Process(child))
}

fn rustls_tls12_kuma() -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .expect("ring supports TLS 1.2")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"kuma".to_vec()];
    Arc::new(cfg)
}

/// A rustls client over a real socket: it writes its hello, then fails when we close.
fn rustls_client(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Result<Client> {
    let name = zone_ingress_tests::tls::server_name(SNI_BACKEND);
    let mut conn = rustls::ClientConnection::new(cfg, name).context("rustls client")?;
    let mut tcp = TcpStream::connect_timeout(&addr, LIMIT).context("connect")?;
    tcp.set_read_timeout(Some(LIMIT))?;
    Ok(Client::Thread(std::thread::spawn(move || {
        let _ = conn.complete_io(&mut tcp);
    })))
}

fn capture(
    listener: &TcpListener,
    dir: &Path,
    name: &str,
    start: impl FnOnce() -> Result<Client>,
) -> Result<()> {
    let client = start()?;
    let result = accept(listener).and_then(read_first_flight);
    match client {
        Client::Process(mut c) => {
            let _ = c.kill();
            let _ = c.wait();
        }
        Client::Thread(t) => {
            let _ = t.join();
        }
    }
    let bytes = result.with_context(|| format!("capturing {name}"))?;
    let path = dir.join(format!("{name}.bin"));
    std::fs::write(&path, &bytes).with_context(|| format!("write {}", path.display()))?;
    eprintln!("{name}: {} bytes -> {}", bytes.len(), path.display());
    Ok(())
}

fn accept(listener: &TcpListener) -> Result<TcpStream> {
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(LIMIT))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > LIMIT {
                    bail!("no client connected within {LIMIT:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
}

/// Reads whole handshake records until the handshake message in them is complete; returns the
/// records verbatim.
fn read_first_flight(mut s: TcpStream) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut handshake = Vec::new();
    loop {
        let mut header = [0u8; 5];
        s.read_exact(&mut header).context("read a record header")?;
        if header[0] != 22 {
            bail!("record of content type {} is not a handshake", header[0]);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload)
            .context("read a record payload")?;
        out.extend_from_slice(&header);
        out.extend_from_slice(&payload);
        handshake.extend_from_slice(&payload);
        if handshake.len() >= 4 {
            let msg_len = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]);
            if handshake.len() >= 4 + msg_len as usize {
                // Tell the client to stop: a fatal handshake_failure alert, then close.
                let _ = s.write_all(&[21, 3, 3, 0, 2, 2, 40]);
                return Ok(out);
            }
        }
    }
}
