//! Operating the agent: the access log, the Envoy-named metrics and the end of a drain.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zone_ingress_tests::agent::{Agent, Datapath, Metrics, Options, Route, http_get};
use zone_ingress_tests::datapath_tests;
use zone_ingress_tests::netns::{CLIENT_V4, Topology};
use zone_ingress_tests::pki::{SNI_BACKEND, SNI_OTHER, SNI_UNKNOWN};
use zone_ingress_tests::probe;
use zone_ingress_tests::tls::{self, Backend, Behaviour};
use zone_ingress_tests::wire::{self, Counting, Prng};

const BACKEND_PORT: u16 = 8443;
/// Nothing listens there: connecting to it fails at once (RST), a connect failure for the metrics.
const DEAD_PORT: u16 = 8999;

/// A JSON value of the access log's flat objects.
#[derive(Clone, Debug, PartialEq)]
enum Json {
    Null,
    Num(f64),
    Str(String),
}

impl Json {
    fn str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    fn num(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }
}

/// Parses one flat JSON object (string, number and null values: what the access log writes),
/// strictly: anything else, trailing bytes included, is an error.
fn parse_json_object(line: &str) -> Result<BTreeMap<String, Json>, String> {
    let mut c = line.trim().chars().peekable();
    let mut out = BTreeMap::new();
    let skip_ws = |c: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while c.peek().is_some_and(|ch| ch.is_whitespace()) {
            c.next();
        }
    };
    let string = |c: &mut std::iter::Peekable<std::str::Chars<'_>>| -> Result<String, String> {
        if c.next() != Some('"') {
            return Err("expected a string".into());
        }
        let mut s = String::new();
        loop {
            match c.next().ok_or("unterminated string")? {
                '"' => return Ok(s),
                '\\' => match c.next().ok_or("bad escape")? {
                    'n' => s.push('\n'),
                    't' => s.push('\t'),
                    'r' => s.push('\r'),
                    'u' => {
                        let hex: String = c.by_ref().take(4).collect();
                        let v = u32::from_str_radix(&hex, 16).map_err(|e| e.to_string())?;
                        s.push(char::from_u32(v).ok_or("bad \\u escape")?);
                    }
                    e @ ('"' | '\\' | '/') => s.push(e),
                    e => return Err(format!("bad escape \\{e}")),
                },
                ch => s.push(ch),
            }
        }
    };
    if c.next() != Some('{') {
        return Err("not an object".into());
    }
    loop {
        skip_ws(&mut c);
        let key = string(&mut c)?;
        skip_ws(&mut c);
        if c.next() != Some(':') {
            return Err(format!("expected ':' after {key:?}"));
        }
        skip_ws(&mut c);
        let value = match c.peek() {
            Some('"') => Json::Str(string(&mut c)?),
            Some('n') => {
                let w: String = c.by_ref().take(4).collect();
                if w != "null" {
                    return Err(format!("bad literal {w:?}"));
                }
                Json::Null
            }
            _ => {
                let mut n = String::new();
                while c
                    .peek()
                    .is_some_and(|ch| ch.is_ascii_digit() || "-+.eE".contains(*ch))
                {
                    n.extend(c.next());
                }
                Json::Num(n.parse().map_err(|_| format!("bad value for {key:?}"))?)
            }
        };
        if out.insert(key.clone(), value).is_some() {
            return Err(format!("duplicate key {key:?}"));
        }
        skip_ws(&mut c);
        match c.next() {
            Some(',') => continue,
            Some('}') => break,
            other => return Err(format!("expected ',' or '}}', got {other:?}")),
        }
    }
    if c.next().is_some() {
        return Err("trailing bytes after the object".into());
    }
    Ok(out)
}

/// Waits (at most 5 s) until the access log has a line matching `pred`; returns all lines parsed.
async fn log_line(
    path: &Path,
    pred: impl Fn(&BTreeMap<String, Json>) -> bool,
) -> BTreeMap<String, Json> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(5) {
        last = std::fs::read_to_string(path).unwrap_or_default();
        for line in last.lines() {
            let obj = parse_json_object(line)
                .unwrap_or_else(|e| panic!("access log line is not JSON ({e}): {line}"));
            if pred(&obj) {
                return obj;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no matching access log line within 5 s; the log:\n{last}");
}

fn access_log_args(path: &Path) -> Vec<String> {
    vec![
        "--access-log".into(),
        path.display().to_string(),
        "--access-log-format".into(),
        "json".into(),
    ]
}

fn num(obj: &BTreeMap<String, Json>, key: &str) -> f64 {
    obj.get(key)
        .and_then(Json::num)
        .unwrap_or_else(|| panic!("{key} missing or not a number in {obj:?}"))
}

fn text<'a>(obj: &'a BTreeMap<String, Json>, key: &str) -> &'a str {
    obj.get(key)
        .and_then(Json::str)
        .unwrap_or_else(|| panic!("{key} missing or not a string in {obj:?}"))
}

/// One echoed mTLS flow, client side counted on the wire: (bytes sent, bytes received, local port).
async fn counted_echo_flow(topo: &Topology, agent: &Agent<'_>, sni: &str) -> (u64, u64, u16) {
    let tcp = topo
        .client
        .connect(agent.addr())
        .await
        .expect("connect to the agent");
    let port = tcp.local_addr().expect("client local address").port();
    let (read, written) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let counting = Counting {
        inner: tcp,
        read: read.clone(),
        written: written.clone(),
    };
    let mut s = tls::handshake(counting, sni)
        .await
        .expect("mTLS handshake through the agent");
    let msg = vec![0x5au8; 100_000];
    tls::echo_roundtrip(&mut s, &msg)
        .await
        .expect("echo through the agent");
    s.shutdown().await.expect("client close_notify + FIN");
    // To EOF, so every byte the backend sent has crossed the agent and been counted here.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    (
        written.load(Ordering::SeqCst),
        read.load(Ordering::SeqCst),
        port,
    )
}

// 1. Access log lines and Envoy-named metrics for a routed flow, a flow after a failover, an
//    unknown-SNI rejection and a non-TLS rejection; bytes as counted on the client's wire.
async fn access_log_and_envoy_metrics(dp: Datapath) {
    let topo = Topology::new();
    let backend = Topology::backend_addr(BACKEND_PORT);
    let _backend = Backend::start(&topo.backend, backend, Behaviour::Echo).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("access.log");
    let mut opts = Options::new(dp);
    opts.extra_args = access_log_args(&log);
    let agent = Agent::start(
        &topo.ingress,
        &[
            Route::new(SNI_BACKEND, &[backend]),
            // The dead endpoint comes first in round robin: one failed attempt, then failover.
            Route::new(SNI_OTHER, &[Topology::backend_addr(DEAD_PORT), backend]),
        ],
        opts,
    )
    .await;

    let (up, down, port) = counted_echo_flow(&topo, &agent, SNI_BACKEND).await;
    let line = log_line(&log, |o| {
        o.get("sni").and_then(Json::str) == Some(SNI_BACKEND)
    })
    .await;
    assert_eq!(
        text(&line, "peer"),
        format!("{CLIENT_V4}:{port}"),
        "{line:?}"
    );
    assert_eq!(text(&line, "cluster"), SNI_BACKEND, "{line:?}");
    assert_eq!(text(&line, "upstream"), backend.to_string(), "{line:?}");
    let datapath = text(&line, "datapath");
    if dp == Datapath::Userspace {
        assert_eq!(datapath, "userspace", "{line:?}");
    } else {
        assert!(["userspace", "sockmap"].contains(&datapath), "{line:?}");
    }
    assert_eq!(
        num(&line, "bytes_up"),
        up as f64,
        "bytes client->agent on the wire: {line:?}"
    );
    assert_eq!(
        num(&line, "bytes_down"),
        down as f64,
        "bytes agent->client on the wire: {line:?}"
    );
    assert_eq!(text(&line, "end"), "closed", "{line:?}");
    assert_eq!(line.get("reason"), Some(&Json::Null), "{line:?}");
    assert!(num(&line, "duration_ms") >= 0.0);
    assert!(text(&line, "start_time").ends_with('Z'), "{line:?}");

    let (up2, down2, _) = counted_echo_flow(&topo, &agent, SNI_OTHER).await;
    let other = log_line(&log, |o| {
        o.get("sni").and_then(Json::str) == Some(SNI_OTHER)
    })
    .await;
    assert_eq!(text(&other, "upstream"), backend.to_string(), "{other:?}");

    let hello = wire::client_hello_bytes(SNI_UNKNOWN);
    let p = probe::send_and_watch(&topo.client, agent.addr(), &hello, Duration::from_secs(5)).await;
    assert!(p.closed_silently(), "unknown SNI: {p:?}");
    let rejected = log_line(&log, |o| {
        o.get("sni").and_then(Json::str) == Some(SNI_UNKNOWN)
    })
    .await;
    assert_eq!(text(&rejected, "end"), "rejected", "{rejected:?}");
    assert_eq!(text(&rejected, "reason"), "unknown_sni", "{rejected:?}");
    assert_eq!(
        num(&rejected, "bytes_up"),
        hello.len() as f64,
        "{rejected:?}"
    );
    assert_eq!(num(&rejected, "bytes_down"), 0.0, "{rejected:?}");
    for key in ["cluster", "upstream", "datapath"] {
        assert_eq!(rejected.get(key), Some(&Json::Null), "{key}: {rejected:?}");
    }

    let p = probe::send_and_watch(
        &topo.client,
        agent.addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(p.closed_silently(), "not TLS: {p:?}");
    let not_tls = log_line(&log, |o| {
        o.get("reason").and_then(Json::str) == Some("not_tls")
    })
    .await;
    assert_eq!(not_tls.get("sni"), Some(&Json::Null), "{not_tls:?}");
    assert_eq!(text(&not_tls, "end"), "rejected", "{not_tls:?}");

    let m: Metrics = agent
        .metrics_until(Duration::from_secs(2), |m| {
            m.get(
                "envoy_listener_downstream_cx_active",
                &[("envoy_listener_address", "10.231.1.2_10001")],
            ) == 0.0
        })
        .await;
    let listener = [("envoy_listener_address", "10.231.1.2_10001")];
    let dump = m.dump("envoy_");
    assert_eq!(
        m.get("envoy_listener_downstream_cx_total", &listener),
        4.0,
        "{dump}"
    );
    assert_eq!(
        m.get("envoy_listener_downstream_cx_active", &listener),
        0.0,
        "{dump}"
    );
    let tcp = |sni| [("envoy_tcp_prefix", sni)];
    assert_eq!(
        m.get("envoy_tcp_downstream_cx_rx_bytes_total", &tcp(SNI_BACKEND)),
        up as f64,
        "{dump}"
    );
    assert_eq!(
        m.get("envoy_tcp_downstream_cx_tx_bytes_total", &tcp(SNI_BACKEND)),
        down as f64,
        "{dump}"
    );
    assert_eq!(
        m.get("envoy_tcp_downstream_cx_rx_bytes_total", &tcp(SNI_OTHER)),
        up2 as f64,
        "{dump}"
    );
    assert_eq!(
        m.get("envoy_tcp_downstream_cx_tx_bytes_total", &tcp(SNI_OTHER)),
        down2 as f64,
        "{dump}"
    );
    let cluster = |name| [("envoy_cluster_name", name)];
    assert_eq!(
        m.get("envoy_cluster_upstream_cx_total", &cluster(SNI_BACKEND)),
        1.0,
        "{dump}"
    );
    assert_eq!(
        m.get(
            "envoy_cluster_upstream_cx_connect_fail",
            &cluster(SNI_BACKEND)
        ),
        0.0,
        "{dump}"
    );
    assert_eq!(
        m.get("envoy_cluster_upstream_cx_total", &cluster(SNI_OTHER)),
        2.0,
        "{dump}"
    );
    assert_eq!(
        m.get(
            "envoy_cluster_upstream_cx_connect_fail",
            &cluster(SNI_OTHER)
        ),
        1.0,
        "{dump}"
    );
    assert_eq!(
        m.get("envoy_control_plane_connected_state", &[]),
        0.0,
        "{dump}"
    );
    assert!(m.0.contains_key("envoy_server_uptime"), "{dump}");
    assert!(
        m.get("envoy_server_memory_heap_size", &[]) > 1e6,
        "RSS of a running agent: {dump}"
    );
    // The zone_ingress names are unchanged next to them.
    assert_eq!(m.get("zone_ingress_downstream_cx_total", &[]), 4.0);
    assert_eq!(
        m.get("zone_ingress_upstream_connect_failures_total", &[]),
        1.0
    );

    // The same exposition through a real Prometheus text-format parser: every name Kuma's zone
    // ingress dashboard queries is there, with the values the traffic implies.
    let (code, body) = agent.get("/stats/prometheus").await.expect("scrape");
    assert_eq!(code, 200);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("not Prometheus text format: {e}\n{body}"));
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    for name in [
        "envoy_listener_downstream_cx_total",
        "envoy_listener_downstream_cx_active",
        "envoy_tcp_downstream_cx_rx_bytes_total",
        "envoy_tcp_downstream_cx_tx_bytes_total",
        "envoy_cluster_upstream_cx_total",
        "envoy_cluster_upstream_cx_connect_fail",
        "envoy_cluster_membership_healthy",
        "envoy_cluster_update_success",
        "envoy_cluster_update_rejected",
        "envoy_listener_manager_lds_update_success",
        "envoy_listener_manager_lds_update_rejected",
        "envoy_control_plane_connected_state",
        "envoy_server_uptime",
        "envoy_server_memory_heap_size",
    ] {
        assert!(
            scrape.samples.iter().any(|s| s.metric == name),
            "{name} missing from the parsed exposition:\n{body}"
        );
    }
    assert_eq!(
        value("envoy_listener_downstream_cx_total", &listener),
        Some(m.get("envoy_listener_downstream_cx_total", &listener))
    );
    assert_eq!(
        value("envoy_tcp_downstream_cx_rx_bytes_total", &tcp(SNI_BACKEND)),
        Some(m.get("envoy_tcp_downstream_cx_rx_bytes_total", &tcp(SNI_BACKEND)))
    );
    // One endpoint per route in this test's table.
    assert_eq!(
        value("envoy_cluster_membership_healthy", &cluster(SNI_BACKEND)),
        Some(1.0),
        "{body}"
    );
}
datapath_tests!(
    access_log_and_envoy_metrics,
    access_log_and_envoy_metrics,
    60
);

/// Sends `n` PRNG bytes in 64 KiB chunks, pausing `pause` between chunks; returns their SHA-256.
async fn send_slowly<W: AsyncWrite + Unpin>(w: &mut W, n: u64, pause: Duration) -> [u8; 32] {
    let mut prng = Prng::new(7);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let len = left.min(buf.len() as u64) as usize;
        prng.fill(&mut buf[..len]);
        hash.update(&buf[..len]);
        w.write_all(&buf[..len])
            .await
            .expect("client: send a chunk");
        left -= len as u64;
        tokio::time::sleep(pause).await;
    }
    hash.finalize().into()
}

/// Reads `s` to its end, at most 4 s: the read result and what was read.
async fn read_to_end_within(
    s: &mut tokio::net::TcpStream,
) -> Result<(io::Result<usize>, Vec<u8>), tokio::time::error::Elapsed> {
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(4), s.read_to_end(&mut rest)).await?;
    Ok((r, rest))
}

async fn wait_exit(agent: &mut Agent<'_>, limit: Duration) -> Duration {
    let start = Instant::now();
    while agent.is_running() {
        assert!(
            start.elapsed() < limit,
            "the agent still runs {limit:?} after the flows ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

// 2. SIGTERM during a long userspace transfer: new connections are refused at once, the transfer
//    completes intact within the drain time, and the agent exits as soon as it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_completes_live_transfer_and_refuses_new() {
    zone_ingress_tests::run_test(Duration::from_secs(60), async {
        let n: u64 = 8 << 20;
        let topo = Topology::new();
        let mut backend = Backend::start(
            &topo.backend,
            Topology::backend_addr(BACKEND_PORT),
            Behaviour::Bulk { send: n, seed: 3 },
        )
        .await;
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("access.log");
        let mut opts = Options::new(Datapath::Userspace);
        opts.extra_args = access_log_args(&log);
        opts.extra_args
            .extend(["--drain-time".into(), "20s".into()]);
        let mut agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend.addr])],
            opts,
        )
        .await;
        let s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
            .await
            .expect("mTLS handshake through the agent");
        let (mut r, mut w) = tokio::io::split(s);
        let transfer = async {
            // 128 chunks, 20 ms apart: about 2.5 s, so SIGTERM lands in the middle.
            let sha = send_slowly(&mut w, n, Duration::from_millis(20)).await;
            w.shutdown().await.expect("client: close its write side");
            sha
        };
        let receive = async {
            tls::recv_hash(&mut r)
                .await
                .expect("client: receive to a clean EOF")
        };
        let sigterm_then_probe = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            agent.signal(libc::SIGTERM);
            let start = Instant::now();
            loop {
                match topo.client.connect(agent.addr()).await {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                    other => assert!(
                        start.elapsed() < Duration::from_secs(1),
                        "a new connection 1 s after SIGTERM was not refused: {other:?}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Instant::now()
        };
        let (sent_sha, got, refused_at) = tokio::join!(transfer, receive, sigterm_then_probe);
        let out = backend.outcome(Duration::from_secs(10)).await;
        assert!(out.error.is_none(), "backend failed: {:?}", out.error);
        assert_eq!(out.received, n, "backend received {} of {n}", out.received);
        assert_eq!(out.received_sha, sent_sha, "client->backend bytes differ");
        assert_eq!(got.0, n, "client received {} of {n}", got.0);
        assert_eq!(got.1, out.sent_sha, "backend->client bytes differ");
        assert!(
            refused_at.elapsed() > Duration::from_millis(500),
            "the transfer should have outlived the refusal (it ended {:?} after it)",
            refused_at.elapsed()
        );
        let took = wait_exit(&mut agent, Duration::from_secs(5)).await;
        eprintln!("agent exited {took:?} after the last flow ended");
        // The writer flushed the drained flow's line before the process exited.
        let line = std::fs::read_to_string(&log).expect("read the access log");
        let flow = line
            .lines()
            .map(|l| parse_json_object(l).expect("JSON line"))
            .find(|o| o.get("sni").and_then(Json::str) == Some(SNI_BACKEND))
            .unwrap_or_else(|| panic!("no line for the drained flow:\n{line}"));
        assert_eq!(text(&flow, "end"), "closed", "{flow:?}");
        assert!(num(&flow, "bytes_up") > n as f64, "{flow:?}");
    })
    .await
}

// 3. Drain time over with a flow still open (both datapaths: the peers behave like TLS peers, so
//    `sockmap` splices the flow): the agent half-closes both sides after the bytes already
//    forwarded, so both peers see a FIN (not a reset), then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_half_closes_userspace_flows() {
    drain_deadline_half_closes(Datapath::Userspace).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_half_closes_spliced_flows() {
    drain_deadline_half_closes(Datapath::Sockmap).await
}

async fn drain_deadline_half_closes(dp: Datapath) {
    zone_ingress_tests::run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let backend = Topology::backend_addr(BACKEND_PORT);
        // A raw TCP endpoint: the agent does not terminate TLS, so a ClientHello then raw bytes is
        // a flow it routes, and the endpoint's view of the FIN is exact.
        let listener = topo.backend.listen(backend).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("access.log");
        let mut opts = Options::new(dp);
        opts.extra_args = access_log_args(&log);
        opts.extra_args.extend(["--drain-time".into(), "1s".into()]);
        let mut agent =
            Agent::start(&topo.ingress, &[Route::new(SNI_BACKEND, &[backend])], opts).await;
        let mut client = topo.client.connect(agent.addr()).await.expect("connect");
        let hello = wire::client_hello_bytes(SNI_BACKEND);
        client
            .write_all(&hello)
            .await
            .expect("send the ClientHello");
        let (mut server, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("the agent connected upstream")
            .expect("accept");
        let mut got = vec![0u8; hello.len()];
        server
            .read_exact(&mut got)
            .await
            .expect("the ClientHello upstream");
        server
            .write_all(b"from-backend")
            .await
            .expect("backend writes");
        let mut buf = [0u8; 12];
        client.read_exact(&mut buf).await.expect("client reads");
        assert_eq!(&buf, b"from-backend");

        let sigterm = Instant::now();
        agent.signal(libc::SIGTERM);
        // Bytes sent during the drain still get through.
        client
            .write_all(b"late")
            .await
            .expect("client writes during the drain");
        let mut late = [0u8; 4];
        server
            .read_exact(&mut late)
            .await
            .expect("backend reads during the drain");
        assert_eq!(&late, b"late");

        let (c, s) = tokio::join!(
            read_to_end_within(&mut client),
            read_to_end_within(&mut server)
        );
        let ended = sigterm.elapsed();
        let (c, c_rest) = c.expect("client saw no end within 4 s of SIGTERM");
        let (s, s_rest) = s.expect("backend saw no end within 4 s of SIGTERM");
        assert!(c.is_ok(), "client: expected a FIN, got {c:?}");
        assert!(s.is_ok(), "backend: expected a FIN, got {s:?}");
        assert!(c_rest.is_empty() && s_rest.is_empty(), "no stray bytes");
        assert!(
            ended >= Duration::from_millis(900),
            "the flow ended {ended:?} after SIGTERM, before the 1 s drain time"
        );
        wait_exit(&mut agent, Duration::from_secs(3)).await;
        assert!(
            agent
                .stderr()
                .contains("asking the remaining flows to finish"),
            "{}",
            agent.stderr()
        );
        // The flow finished inside the agent (a flow killed with the process leaves no line).
        let lines = std::fs::read_to_string(&log).expect("read the access log");
        let flow = lines
            .lines()
            .map(|l| parse_json_object(l).expect("JSON line"))
            .find(|o| o.get("sni").and_then(Json::str) == Some(SNI_BACKEND))
            .unwrap_or_else(|| panic!("no line for the drained flow:\n{lines}"));
        assert_eq!(text(&flow, "end"), "closed", "{flow:?}");
        let datapath = if dp == Datapath::Sockmap {
            "sockmap"
        } else {
            "userspace"
        };
        assert_eq!(text(&flow, "datapath"), datapath, "{flow:?}");
        assert_eq!(num(&flow, "bytes_up"), (hello.len() + 4) as f64, "{flow:?}");
        assert_eq!(num(&flow, "bytes_down"), 12.0, "{flow:?}");
    })
    .await
}

// 4. `/ready` also answers on networking.address:<admin port> (Kuma's K8s probe), nothing else of
//    the admin API does; `/config_dump` and `/clusters` on 127.0.0.1 show the routes in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_ready_on_pod_address_config_dump_and_clusters() {
    zone_ingress_tests::run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let backend = Topology::backend_addr(BACKEND_PORT);
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend])],
            Options::new(Datapath::Userspace),
        )
        .await;
        let public = std::net::SocketAddr::new(
            zone_ingress_tests::netns::INGRESS_V4.into(),
            zone_ingress_tests::agent::ADMIN_PORT,
        );
        let (code, body) = http_get(&topo.client, public, "/ready")
            .await
            .expect("GET /ready on the pod address");
        assert_eq!((code, body.trim()), (200, "READY"));
        for path in ["/stats/prometheus", "/config_dump", "/clusters"] {
            let (code, _) = http_get(&topo.client, public, path)
                .await
                .expect("GET on the pod address");
            assert_eq!(code, 404, "{path} must not be served on the pod address");
        }

        let (code, dump) = agent.get("/config_dump").await.expect("GET /config_dump");
        assert_eq!(code, 200, "{dump}");
        for needle in [
            "\"zone_ingress\"".to_string(),
            "\"name\": \"zi-test\"".to_string(),
            format!("\"listener\": \"{}\"", agent.addr()),
            format!("\"sni\": \"{SNI_BACKEND}\""),
            format!("\"{backend}\""),
        ] {
            assert!(
                dump.contains(&needle),
                "{needle} missing from /config_dump:\n{dump}"
            );
        }
        assert!(!dump.to_lowercase().contains("token"), "{dump}");

        let (code, clusters) = agent.get("/clusters").await.expect("GET /clusters");
        assert_eq!(code, 200);
        assert!(
            clusters.contains(&format!("{SNI_BACKEND}::{backend}::health_flags::healthy")),
            "{clusters}"
        );
        let (code, json) = agent
            .get("/clusters?format=json")
            .await
            .expect("GET /clusters?format=json");
        assert_eq!(code, 200);
        assert!(json.contains("\"cluster_statuses\""), "{json}");
        assert!(
            json.contains(&format!("\"port_value\": {BACKEND_PORT}")),
            "{json}"
        );
    })
    .await
}
