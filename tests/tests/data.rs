//! Data-path tests: real mTLS flows through the agent, each run with `--datapath userspace` and `auto`.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, watch};
use zone_ingress_tests::agent::{Agent, Datapath, Options, Route};
use zone_ingress_tests::datapath_tests;
use zone_ingress_tests::netns::Topology;
use zone_ingress_tests::pki::SNI_BACKEND;
use zone_ingress_tests::probe::{self, End};
use zone_ingress_tests::tls::{self, Backend, Behaviour};
use zone_ingress_tests::wire::{self, Dribble, Split, SplitFirstRecord};

const BACKEND_PORT: u16 = 8443;

fn bulk_bytes() -> u64 {
    match std::env::var("ZI_BULK_BYTES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("ZI_BULK_BYTES={v:?} is not a byte count")),
        Err(_) => 1 << 30,
    }
}

/// Describes a read error for assertion messages: reset, or which kind of non-reset end it was.
fn describe_end(r: &io::Result<usize>) -> String {
    match r {
        Ok(n) => format!("a clean TLS close (close_notify + EOF) after {n} bytes"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            format!("a FIN without close_notify ({e})")
        }
        Err(e) => format!("{:?}: {e}", e.kind()),
    }
}

// 1. 1 GiB (ZI_BULK_BYTES) each way concurrently over one flow, SHA-256 equal at both far ends.
async fn bulk_both_ways(dp: Datapath) {
    let n = bulk_bytes();
    let topo = Topology::new();
    let mut backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::Bulk { send: n, seed: 2 },
    )
    .await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[backend.addr])],
        Options::new(dp),
    )
    .await;
    let s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("mTLS handshake through the agent");
    let start = Instant::now();
    let (sent_sha, got) = tls::send_and_receive(s, n, 1).await;
    let secs = start.elapsed().as_secs_f64();
    let out = backend.outcome(Duration::from_secs(30)).await;
    assert!(out.error.is_none(), "backend failed: {:?}", out.error);
    assert_eq!(
        out.received, n,
        "backend received {} of {n} bytes",
        out.received
    );
    assert_eq!(
        out.received_sha, sent_sha,
        "client->backend bytes differ (SHA-256)"
    );
    assert_eq!(got.0, n, "client received {} of {n} bytes", got.0);
    assert_eq!(
        got.1, out.sent_sha,
        "backend->client bytes differ (SHA-256)"
    );
    eprintln!(
        "bulk {}: {} MiB each way in {secs:.2} s ({:.0} MB/s per direction)",
        dp.as_str(),
        n >> 20,
        n as f64 / secs / 1e6
    );
    let m = agent.metrics().await;
    let copied = m.sum("zone_ingress_userspace_copied_bytes_total");
    let spliced = m.get("zone_ingress_flows_total", &[("datapath", "sockmap")]);
    eprintln!(
        "bulk {}: flows_total{{datapath=\"sockmap\"}} {spliced}, userspace_copied_bytes {copied}",
        dp.as_str()
    );
    if dp == Datapath::Userspace {
        assert!(
            copied >= 2.0 * n as f64,
            "userspace_copied_bytes_total is {copied}, expected at least 2 x {n}:\n{}",
            m.dump("zone_ingress")
        );
    }
    // Whether `auto` really spliced is asserted by bpf.rs (auto_splices_flows), so that this test reports
    // only on the integrity of the bytes.
}
datapath_tests!(bulk_1gib_each_way, bulk_both_ways, 240);

// 2. The backend speaks first (right after the handshake); the client only reads.
async fn server_first(dp: Datapath) {
    let n = 1 << 20;
    let topo = Topology::new();
    let mut backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::Bulk { send: n, seed: 3 },
    )
    .await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[backend.addr])],
        Options::new(dp),
    )
    .await;
    let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("mTLS handshake through the agent");
    let got = tls::recv_hash(&mut s)
        .await
        .expect("client: read the server-first bytes to a clean EOF");
    assert_eq!(got, (n, tls::prng_sha(n, 3)), "server-first bytes differ");
    s.shutdown().await.expect("client: close");
    let out = backend.outcome(Duration::from_secs(10)).await;
    assert!(out.error.is_none(), "backend failed: {:?}", out.error);
    assert_eq!(out.received, 0);
}
datapath_tests!(server_first_bytes, server_first, 60);

// 3a. The client half-closes; the backend's reply (sent after it saw EOF) still arrives.
async fn half_close_by_client(dp: Datapath) {
    let topo = Topology::new();
    let mut reply = vec![0u8; 256 * 1024];
    wire::Prng::new(9).fill(&mut reply);
    let mut backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::ReplyAfterEof {
            reply: reply.clone(),
        },
    )
    .await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[backend.addr])],
        Options::new(dp),
    )
    .await;
    let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("mTLS handshake through the agent");
    s.write_all(b"the question").await.expect("client: write");
    s.shutdown()
        .await
        .expect("client: half-close (close_notify + FIN)");
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("client: the reply after its half-close did not end within 10 s (was the FIN forwarded?)");
    r.expect("client: read the reply after half-closing");
    assert!(
        got == reply,
        "reply after half-close differs ({} of {} bytes)",
        got.len(),
        reply.len()
    );
    let out = backend.outcome(Duration::from_secs(10)).await;
    assert!(out.error.is_none(), "backend failed: {:?}", out.error);
    assert_eq!(out.received_bytes, b"the question");
}
datapath_tests!(half_close_client_first, half_close_by_client, 60);

// 3b. The backend half-closes first; the client reads to EOF, then still sends its answer.
async fn half_close_by_backend(dp: Datapath) {
    let topo = Topology::new();
    let mut backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::HalfCloseFirst {
            first: b"server speaks and closes".to_vec(),
        },
    )
    .await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[backend.addr])],
        Options::new(dp),
    )
    .await;
    let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("mTLS handshake through the agent");
    let mut first = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut first))
        .await
        .expect("client: no EOF within 10 s after the backend half-closed (was the FIN forwarded?)")
        .expect("client: read until the backend's half-close");
    assert_eq!(first, b"server speaks and closes");
    let mut answer = vec![0u8; 256 * 1024];
    wire::Prng::new(10).fill(&mut answer);
    s.write_all(&answer)
        .await
        .expect("client: write after the backend half-closed");
    s.shutdown().await.expect("client: close");
    let out = backend.outcome(Duration::from_secs(10)).await;
    assert!(out.error.is_none(), "backend failed: {:?}", out.error);
    assert_eq!(
        out.received,
        answer.len() as u64,
        "backend got {} of {} bytes",
        out.received,
        answer.len()
    );
    let want: [u8; 32] = Sha256::digest(&answer).into();
    assert_eq!(
        out.received_sha, want,
        "bytes sent after the backend's half-close differ"
    );
}
datapath_tests!(half_close_backend_first, half_close_by_backend, 60);

// 4a. The backend resets mid-stream: the client must see a reset, not a clean or unclean EOF.
async fn reset_by_backend(dp: Datapath) {
    let topo = Topology::new();
    let _backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::ResetAfter {
            after: 5,
            send: 64 * 1024,
        },
    )
    .await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(
            SNI_BACKEND,
            &[Topology::backend_addr(BACKEND_PORT)],
        )],
        Options::new(dp),
    )
    .await;
    let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("mTLS handshake through the agent");
    s.write_all(b"hello").await.expect("client: write");
    s.flush().await.expect("client: flush");
    let mut sink = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink))
        .await
        .expect("client: connection neither ended nor failed within 10 s of the backend's reset");
    assert!(
        matches!(&r, Err(e) if tls::is_reset(e)),
        "client should see a reset (ECONNRESET) after the backend reset, saw {} ({} bytes read first)",
        describe_end(&r),
        sink.len()
    );
}
datapath_tests!(reset_from_backend, reset_by_backend, 60);

// 4b. The client resets: the backend must see a reset.
async fn reset_by_client(dp: Datapath) {
    let topo = Topology::new();
    let mut backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::Echo,
    )
    .await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[backend.addr])],
        Options::new(dp),
    )
    .await;
    let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("mTLS handshake through the agent");
    tls::echo_roundtrip(&mut s, b"before the reset")
        .await
        .expect("echo before the reset");
    tls::reset(s.into_inner().0);
    let out = backend.outcome(Duration::from_secs(10)).await;
    match &out.error {
        Some((_, e)) if tls::is_reset(e) => {}
        Some((stage, e)) => panic!(
            "backend should see a reset after the client reset; at {stage} it saw {:?}: {e}",
            e.kind()
        ),
        None => panic!(
            "backend saw a clean close (close_notify) after the client reset, expected ECONNRESET"
        ),
    }
}
datapath_tests!(reset_from_client, reset_by_client, 60);

// 6a. The ClientHello arrives one byte per TCP segment.
async fn dribbled_client_hello(dp: Datapath) {
    let topo = Topology::new();
    let mut backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::Echo,
    )
    .await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[backend.addr])],
        Options::new(dp),
    )
    .await;
    let tcp = topo
        .client
        .connect(agent.addr())
        .await
        .expect("connect to the agent");
    let hello_len = wire::client_hello_bytes(SNI_BACKEND).len();
    let mut s = tls::handshake(
        Dribble::new(tcp, hello_len, Duration::from_millis(2)),
        SNI_BACKEND,
    )
    .await
    .expect("handshake with a ClientHello dribbled one byte per write");
    tls::echo_roundtrip(&mut s, b"dribbled")
        .await
        .expect("echo after the dribbled handshake");
    s.shutdown().await.expect("close");
    let out = backend.outcome(Duration::from_secs(10)).await;
    assert!(out.error.is_none(), "backend failed: {:?}", out.error);
    assert_eq!(out.sni.as_deref(), Some(SNI_BACKEND));
}
datapath_tests!(client_hello_dribbled, dribbled_client_hello, 60);

// 6b. The ClientHello is re-framed into 3 TLS records (thirds, and a handshake header spanning records).
async fn split_client_hello(dp: Datapath) {
    let topo = Topology::new();
    let mut backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::Echo,
    )
    .await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[backend.addr])],
        Options::new(dp),
    )
    .await;
    for split in [Split::Thirds, Split::HeaderSpanning] {
        let tcp = topo
            .client
            .connect(agent.addr())
            .await
            .expect("connect to the agent");
        let mut s = tls::handshake(SplitFirstRecord::new(tcp, split), SNI_BACKEND)
            .await
            .unwrap_or_else(|e| {
                panic!("handshake with the ClientHello split into 3 records ({split:?}): {e}")
            });
        tls::echo_roundtrip(&mut s, b"split")
            .await
            .expect("echo after the split handshake");
        s.shutdown().await.expect("close");
        let out = backend.outcome(Duration::from_secs(10)).await;
        assert!(
            out.error.is_none(),
            "backend failed ({split:?}): {:?}",
            out.error
        );
    }
}
datapath_tests!(client_hello_three_records, split_client_hello, 60);

// 8. 1000 flows open at once, each a handshake and a verified echo (twice: before and after all are open).
async fn thousand_concurrent(dp: Datapath) {
    const FLOWS: usize = 1000;
    let topo = Topology::new();
    let mut backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::Echo,
    )
    .await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[backend.addr])],
        Options::new(dp),
    )
    .await;
    let sockets = topo.client.sockets(FLOWS, false);
    let connecting = Arc::new(Semaphore::new(200));
    let (up_tx, mut up_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let (release_tx, release_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let addr = agent.addr();
    for (i, sock) in sockets.into_iter().enumerate() {
        let (connecting, up_tx, done_tx, mut release_rx) = (
            connecting.clone(),
            up_tx.clone(),
            done_tx.clone(),
            release_rx.clone(),
        );
        tokio::spawn(async move {
            let msg = format!("flow {i} says hello");
            let opened = async {
                let _permit = connecting.acquire().await.map_err(|e| e.to_string())?;
                let tcp = sock
                    .connect(addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                tcp.set_nodelay(true).map_err(|e| e.to_string())?;
                let mut s = tls::handshake(tcp, SNI_BACKEND)
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                tls::echo_roundtrip(&mut s, msg.as_bytes())
                    .await
                    .map_err(|e| format!("first echo: {e}"))?;
                Ok::<_, String>(s)
            }
            .await;
            let mut s = match opened {
                Ok(s) => {
                    let _ = up_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = up_tx.send(Err(format!("flow {i}: {e}")));
                    return;
                }
            };
            let _ = release_rx.wait_for(|r| *r).await;
            let res = async {
                tls::echo_roundtrip(&mut s, msg.as_bytes())
                    .await
                    .map_err(|e| format!("second echo: {e}"))?;
                s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
                Ok::<_, String>(())
            }
            .await;
            let _ = done_tx.send(res.map_err(|e| format!("flow {i}: {e}")));
        });
    }
    drop((up_tx, done_tx));
    let mut failures = Vec::new();
    let mut up = 0;
    for _ in 0..FLOWS {
        match up_rx.recv().await.expect("flow task vanished") {
            Ok(()) => up += 1,
            Err(e) => failures.push(e),
        }
    }
    let m = agent.metrics().await;
    let cx = m.get("zone_ingress_downstream_cx_total", &[]);
    release_tx.send(true).expect("release the flows");
    let mut done = 0;
    while let Some(r) = done_rx.recv().await {
        match r {
            Ok(()) => done += 1,
            Err(e) => failures.push(e),
        }
    }
    let outcomes = backend.drain().len();
    assert!(
        failures.is_empty(),
        "{} of {FLOWS} flows failed ({up} opened, {done} finished); first failures:\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(done, FLOWS);
    assert!(
        cx >= FLOWS as f64,
        "downstream_cx_total is {cx} with {FLOWS} flows open"
    );
    eprintln!("{FLOWS} concurrent flows ok ({outcomes} backend outcomes reported so far)");
}
datapath_tests!(thousand_concurrent_flows, thousand_concurrent, 120);

// 9a. First endpoint refuses (nothing listens): every flow still succeeds through the second.
async fn endpoint_refused_failover(dp: Datapath) {
    let topo = Topology::new();
    let backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::Echo,
    )
    .await;
    let dead = Topology::backend_addr(1);
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[dead, backend.addr])],
        Options::new(dp),
    )
    .await;
    for i in 0..4 {
        let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
            .await
            .unwrap_or_else(|e| {
                panic!("flow {i}: handshake through the agent with one endpoint down: {e}")
            });
        tls::echo_roundtrip(&mut s, b"failover")
            .await
            .unwrap_or_else(|e| panic!("flow {i}: echo: {e}"));
        s.shutdown().await.expect("close");
    }
    let m = agent
        .metrics_until(Duration::from_secs(2), |m| {
            m.get("zone_ingress_upstream_connect_failures_total", &[]) >= 1.0
        })
        .await;
    assert!(
        m.get("zone_ingress_upstream_connect_failures_total", &[]) >= 1.0,
        "4 round-robin flows over [refusing, good] endpoints should have hit the refusing one at least once:\n{}",
        m.dump("zone_ingress")
    );
}
datapath_tests!(
    endpoint_refused_next_one_used,
    endpoint_refused_failover,
    60
);

// 9b. First endpoint does not answer at all (no such host on the link): --connect-timeout moves on.
async fn endpoint_timeout_failover(dp: Datapath) {
    let topo = Topology::new();
    let backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::Echo,
    )
    .await;
    // An address on the ingress <-> backend link that nobody owns: ARP gets no answer, the SYN never leaves.
    let silent =
        std::net::SocketAddr::new(std::net::Ipv4Addr::new(10, 231, 2, 99).into(), BACKEND_PORT);
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[silent, backend.addr])],
        Options::new(dp).connect_timeout("500ms"),
    )
    .await;
    for i in 0..2 {
        let start = Instant::now();
        let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
            .await
            .unwrap_or_else(|e| panic!("flow {i}: handshake with a silent first endpoint: {e}"));
        tls::echo_roundtrip(&mut s, b"timeout failover")
            .await
            .unwrap_or_else(|e| panic!("flow {i}: echo: {e}"));
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "flow {i} took {:?} with --connect-timeout 500ms",
            start.elapsed()
        );
    }
    let m = agent.metrics().await;
    assert!(
        m.get("zone_ingress_upstream_connect_failures_total", &[]) >= 1.0,
        "a connect timeout should count as an upstream connect failure:\n{}",
        m.dump("zone_ingress")
    );
}
datapath_tests!(
    endpoint_silent_connect_timeout,
    endpoint_timeout_failover,
    60
);

// 9c. All endpoints down: the client is reset (without a byte), and the failure counter moves.
async fn all_endpoints_down(dp: Datapath) {
    let topo = Topology::new();
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(
            SNI_BACKEND,
            &[Topology::backend_addr(1), Topology::backend_addr(2)],
        )],
        Options::new(dp),
    )
    .await;
    let hello = wire::client_hello_bytes(SNI_BACKEND);
    let p =
        probe::send_and_watch(&topo.client, agent.addr(), &hello, Duration::from_secs(10)).await;
    assert!(
        p.received.is_empty(),
        "the agent sent bytes to the client with no endpoint up: {p:?}"
    );
    assert!(
        matches!(p.end, End::Reset),
        "with every endpoint down the client should be reset, saw {p:?}"
    );
    let m = agent
        .metrics_until(Duration::from_secs(2), |m| {
            m.get("zone_ingress_upstream_connect_failures_total", &[]) >= 1.0
        })
        .await;
    assert!(
        m.get("zone_ingress_upstream_connect_failures_total", &[]) >= 1.0,
        "upstream_connect_failures_total did not move:\n{}",
        m.dump("zone_ingress")
    );
}
datapath_tests!(endpoints_all_down_reset, all_endpoints_down, 60);

// IPv6 endpoint: the agent dials the backend over IPv6 on the ingress <-> backend link.
async fn ipv6_endpoint(dp: Datapath) {
    let topo = Topology::new();
    let addr =
        std::net::SocketAddr::new(zone_ingress_tests::netns::BACKEND_V6.into(), BACKEND_PORT);
    let mut backend = Backend::start(&topo.backend, addr, Behaviour::Echo).await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[addr])],
        Options::new(dp),
    )
    .await;
    let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .unwrap_or_else(|e| panic!("handshake through the agent to the IPv6 endpoint {addr}: {e}"));
    tls::echo_roundtrip(&mut s, b"over ipv6")
        .await
        .expect("echo over the IPv6 upstream");
    s.shutdown().await.expect("close");
    let out = backend.outcome(Duration::from_secs(10)).await;
    assert!(out.error.is_none(), "backend failed: {:?}", out.error);
}
datapath_tests!(ipv6_endpoint_routed, ipv6_endpoint, 60);

// The agent forwards the client's bytes verbatim: the ClientHello as sent (one record, or three records)
// and whatever the client wrote right behind it in the same segment.
async fn bytes_forwarded_verbatim(dp: Datapath) {
    let topo = Topology::new();
    let hello = wire::client_hello_bytes(SNI_BACKEND);
    // Both cases send the same total (the split adds two 5-byte record headers), so the recorder knows
    // when a connection is complete.
    let mut trailing = vec![0u8; 3010];
    wire::Prng::new(11).fill(&mut trailing);
    let cases: [(&str, Vec<u8>); 2] = [
        (
            "one-record ClientHello + 3010 bytes in one write",
            [hello.clone(), trailing.clone()].concat(),
        ),
        (
            "three-record ClientHello + 3000 bytes in one write",
            [
                wire::split_record(&hello, Split::HeaderSpanning),
                trailing[..3000].to_vec(),
            ]
            .concat(),
        ),
    ];
    let want = cases[0].1.len();
    assert_eq!(want, cases[1].1.len());
    let mut raw =
        tls::RawRecorder::start(&topo.backend, Topology::backend_addr(BACKEND_PORT), want).await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[raw.addr])],
        Options::new(dp),
    )
    .await;
    for (what, bytes) in cases {
        let mut s = topo
            .client
            .connect(agent.addr())
            .await
            .expect("connect to the agent");
        s.write_all(&bytes)
            .await
            .expect("write ClientHello and trailing bytes");
        let got = raw.next(Duration::from_secs(10)).await;
        let first_diff = got.iter().zip(&bytes).position(|(a, b)| a != b);
        assert!(
            got == bytes,
            "{what}: the backend got {} bytes, the client sent {} (first difference at {first_diff:?})",
            got.len(),
            bytes.len()
        );
    }
}
datapath_tests!(
    client_bytes_forwarded_verbatim,
    bytes_forwarded_verbatim,
    60
);
