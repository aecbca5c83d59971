//! Faults: an upstream that blackholes, the agent killed mid-transfer, the agent out of file
//! descriptors. Real mTLS through the real agent in namespaces; every byte checked.
//!
//! Covered elsewhere and not repeated here (tests/tests/data.rs): an endpoint that refuses
//! (`endpoint_refused_next_one_used`, `endpoints_all_down_reset`), an address nobody answers ARP
//! for (`endpoint_silent_connect_timeout`), the backend or the client resetting mid-stream
//! (`reset_from_backend`, `reset_from_client`), and half-close by either side first with the other
//! side still sending (`half_close_client_first`, `half_close_backend_first`); splice.rs checks
//! that reset flows leave no map entries.
//!
//! What a client sees when the agent is SIGKILLed mid-transfer: the kernel closes the agent's
//! sockets with the process. A spliced flow lives in the sockmap only as long as those sockets, so
//! the splice ends with them and no socket stays in the pinned sockhash. Spliced, the agent's
//! sockets hold no unread bytes (the verdict program moves them straight to the other socket), so
//! the client and the backend first read a FIN without TLS close_notify, and their next writes are
//! reset (ECONNRESET or EPIPE). On the userspace copy the client may instead be reset at once, when
//! the agent died with bytes from it still unread. Never a clean TLS close (the agent has no keys
//! to send close_notify), never a hang (both ends fail within milliseconds), and every byte
//! delivered before the kill is intact.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aya::maps::{Map, MapData, SockHash};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use zone_ingress_common::map_names;
use zone_ingress_tests::agent::{Agent, Datapath, Metrics, Options, Route};
use zone_ingress_tests::datapath_tests;
use zone_ingress_tests::netns::{Topology, ip};
use zone_ingress_tests::pki::{SNI_BACKEND, SNI_OTHER};
use zone_ingress_tests::probe::{self, End};
use zone_ingress_tests::run_test;
use zone_ingress_tests::tls::{self, Backend, Behaviour};
use zone_ingress_tests::wire::{self, Prng};

const BACKEND_PORT: u16 = 8443;
const BLACKHOLE_PORT: u16 = 8444;

fn connect_failures(m: &Metrics) -> f64 {
    m.sum("zone_ingress_upstream_connect_failures_total")
}

/// How a read side ended, for assertion messages.
fn describe(r: &io::Result<()>) -> String {
    match r {
        Ok(()) => "a clean TLS close (close_notify + EOF)".to_string(),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            format!("a FIN without close_notify ({e})")
        }
        Err(e) => format!("{:?}: {e}", e.kind()),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Blackhole: the endpoint's host is up and its port open, but its SYN-ACKs go nowhere.

/// Routes every TCP segment the backend namespace sends from `port` into a blackhole route: SYNs
/// arrive and the listener answers, but the SYN-ACK is dropped, so the agent's connect hangs until
/// its timeout. (A route to nowhere rather than a firewall rule: iproute2 is all the tests need.)
fn blackhole_replies_from(topo: &Topology, port: u16) {
    let ns = topo.backend.name();
    let port = port.to_string();
    ip(&[
        "-n", ns, "rule", "add", "ipproto", "tcp", "sport", &port, "lookup", "100", "pref", "100",
    ]);
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "blackhole",
        "default",
        "table",
        "100",
    ]);
}

async fn blackholed_endpoint(dp: Datapath) {
    let topo = Topology::new();
    let good = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::Echo,
    )
    .await;
    let hole = Topology::backend_addr(BLACKHOLE_PORT);
    let _listener = topo.backend.listen(hole).await;
    blackhole_replies_from(&topo, BLACKHOLE_PORT);
    let agent = Agent::start(
        &topo.ingress,
        &[
            Route::new(SNI_BACKEND, &[hole, good.addr]),
            Route::new(SNI_OTHER, &[hole]),
        ],
        Options::new(dp).connect_timeout("300ms"),
    )
    .await;

    // Round robin over [hole, good]: flows 0 and 2 try the hole first and fail over after 300 ms.
    let mut slowest = Duration::ZERO;
    for i in 0..3u64 {
        let start = Instant::now();
        let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
            .await
            .unwrap_or_else(|e| {
                panic!("flow {i}: handshake with a blackholed first endpoint: {e}")
            });
        let mut msg = vec![0u8; 64 * 1024];
        Prng::new(100 + i).fill(&mut msg);
        tls::echo_roundtrip(&mut s, &msg)
            .await
            .unwrap_or_else(|e| panic!("flow {i}: 64 KiB echo after failover: {e}"));
        s.shutdown().await.expect("close");
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "flow {i} took {took:?} with --connect-timeout 300ms"
        );
        slowest = slowest.max(took);
    }
    assert!(
        slowest >= Duration::from_millis(250),
        "no flow waited for the blackholed endpoint's connect timeout (slowest {slowest:?}): is the \
         blackhole in place?"
    );

    // The only endpoint blackholed: the client is reset, without a byte, once the timeout expires.
    let hello = wire::client_hello_bytes(SNI_OTHER);
    let p =
        probe::send_and_watch(&topo.client, agent.addr(), &hello, Duration::from_secs(10)).await;
    assert!(
        p.received.is_empty() && matches!(p.end, End::Reset),
        "with its only endpoint blackholed the client should be reset without a byte: {p:?}"
    );
    assert!(
        p.elapsed >= Duration::from_millis(250) && p.elapsed < Duration::from_secs(3),
        "the reset should come after the 300 ms connect timeout, came after {:?}",
        p.elapsed
    );
    let m = agent
        .metrics_until(Duration::from_secs(2), |m| connect_failures(m) >= 3.0)
        .await;
    assert!(
        connect_failures(&m) >= 3.0,
        "2 failovers and 1 unavailable route should count at least 3 connect failures:\n{}",
        m.dump("zone_ingress")
    );
    assert!(
        m.get("zone_ingress_upstream_unavailable_total", &[]) >= 1.0,
        "the reset flow should count as upstream unavailable:\n{}",
        m.dump("zone_ingress")
    );
}
datapath_tests!(
    blackholed_endpoint_fails_over_or_resets,
    blackholed_endpoint,
    60
);

// ---------------------------------------------------------------------------------------------
// 2. SIGKILL mid-transfer.

/// Reads to the end, checking every byte against what [`tls::send_prng`] sends with `seed` (the PRNG
/// filled 64 KiB at a time); publishes the count of verified bytes.
async fn read_verified<R: AsyncRead + Unpin>(
    r: &mut R,
    seed: u64,
    progress: &watch::Sender<u64>,
) -> io::Result<()> {
    const CHUNK: usize = 64 * 1024;
    let mut prng = Prng::new(seed);
    let mut expect = vec![0u8; CHUNK];
    let mut at = CHUNK;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            if at == CHUNK {
                prng.fill(&mut expect);
                at = 0;
            }
            assert_eq!(
                b,
                expect[at],
                "byte {} of the stream differs",
                total + i as u64
            );
            at += 1;
        }
        total += n as u64;
        progress.send_replace(total);
    }
}

fn socks_in_map(agent: &Agent<'_>) -> usize {
    let path = agent.pin_dir().join(map_names::SOCKS);
    let data = MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("open the pinned sockhash {}: {e}", path.display()));
    let map = Map::from_map_data(data).expect("pinned map");
    let socks: SockHash<MapData, u64> = SockHash::try_from(map).expect("ZI_SOCKS is a sock hash");
    socks.keys().filter(|k| k.is_ok()).count()
}

async fn agent_killed_mid_transfer(dp: Datapath) {
    const SEED_DOWN: u64 = 21;
    const SEED_UP: u64 = 22;
    const BEFORE_KILL: u64 = 4 << 20;
    let topo = Topology::new();
    let mut backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::Bulk {
            send: 1 << 40,
            seed: SEED_DOWN,
        },
    )
    .await;
    let mut agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[backend.addr])],
        Options::new(dp),
    )
    .await;
    let s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("mTLS handshake through the agent");
    let (mut r, mut w) = tokio::io::split(s);
    let (progress, mut seen) = watch::channel(0u64);
    let reader = tokio::spawn(async move {
        let end = read_verified(&mut r, SEED_DOWN, &progress).await;
        (end, *progress.borrow())
    });
    let writer = tokio::spawn(async move { tls::send_prng(&mut w, 1 << 40, SEED_UP).await });

    tokio::time::timeout(
        Duration::from_secs(20),
        seen.wait_for(|n| *n >= BEFORE_KILL),
    )
    .await
    .expect("the client did not receive 4 MiB within 20 s")
    .expect("reader alive");
    let m = agent.metrics().await;
    let spliced = m.get("zone_ingress_flows_total", &[("datapath", "sockmap")]);
    if dp == Datapath::Sockmap {
        assert_eq!(
            spliced,
            1.0,
            "the flow is not spliced:\n{}",
            m.dump("zone_ingress")
        );
        assert_eq!(
            socks_in_map(&agent),
            2,
            "both sockets of the flow are in the sockhash"
        );
    }

    agent.signal(libc::SIGKILL);
    let killed = Instant::now();
    let (end, received) = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect(
            "the client's read side neither ended nor failed within 10 s of the agent's SIGKILL",
        )
        .expect("reader task");
    let written = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the client's writes did not fail within 10 s of the agent's SIGKILL")
        .expect("writer task");
    let out = backend.outcome(Duration::from_secs(10)).await;
    eprintln!(
        "{}: after SIGKILL the client read {} after {received} verified bytes ({:?} after the kill); its \
         writes ended with {:?}; the backend saw {:?}",
        dp.as_str(),
        describe(&end),
        killed.elapsed(),
        written.as_ref().map(|_| ()).map_err(|e| e.kind()),
        out.error.as_ref().map(|(at, e)| (at, e.kind())),
    );
    assert!(
        received >= BEFORE_KILL,
        "{received} bytes verified before the end"
    );
    assert!(
        matches!(&end, Err(e) if tls::is_reset(e) || e.kind() == io::ErrorKind::UnexpectedEof),
        "the client should see its connection reset or cut (FIN without close_notify), saw {}",
        describe(&end)
    );
    assert!(
        written.is_err(),
        "the client's endless write cannot succeed once the agent is gone"
    );
    assert!(
        out.error.is_some(),
        "the backend should see its connection fail, it saw a clean close"
    );
    // Nothing the dead agent spliced stays in the kernel: the sockets left the sockhash with it.
    if dp == Datapath::Sockmap {
        assert_eq!(
            socks_in_map(&agent),
            0,
            "sockets of the killed agent are still in the pinned sockhash"
        );
    }
    // The kernel closes a killed process's sockets while it exits, so the client can see the end
    // a moment before the process can be reaped.
    let status = agent.wait_exit(Duration::from_secs(5)).await;
    assert!(
        !status.success(),
        "the agent survived SIGKILL (exited with {status})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_mid_transfer_spliced() {
    run_test(
        Duration::from_secs(60),
        agent_killed_mid_transfer(Datapath::Sockmap),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_mid_transfer_userspace() {
    run_test(
        Duration::from_secs(60),
        agent_killed_mid_transfer(Datapath::Userspace),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// 3. Out of file descriptors.

const ACCEPT_BACKOFF_LOG: &str = "accept failed: out of resources";

fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

async fn open_echo_flow(
    topo: &Topology,
    addr: SocketAddr,
    i: u64,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut s = tls::connect(&topo.client, addr, SNI_BACKEND)
        .await
        .unwrap_or_else(|e| panic!("flow {i}: handshake: {e}"));
    echo_check(&mut s, i, "opening").await;
    s
}

async fn echo_check<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    i: u64,
    when: &str,
) {
    let mut msg = vec![0u8; 32 * 1024];
    Prng::new(1000 + i).fill(&mut msg);
    tokio::time::timeout(Duration::from_secs(5), tls::echo_roundtrip(s, &msg))
        .await
        .unwrap_or_else(|_| panic!("flow {i}: 32 KiB echo {when} did not finish within 5 s"))
        .unwrap_or_else(|e| panic!("flow {i}: 32 KiB echo {when}: {e}"));
}

async fn out_of_fds(dp: Datapath) {
    let topo = Topology::new();
    let _backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::Echo,
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
    let mut flows = Vec::new();
    for i in 0..3 {
        flows.push(open_echo_flow(&topo, agent.addr(), i).await);
    }

    // a) Room for one descriptor: the connection is accepted but no upstream socket can be made.
    //    The client is reset; the log says why, and no endpoint is blamed for it.
    let free = agent.lowest_free_fd();
    let original = agent.set_nofile_soft_limit(u64::from(free) + 1);
    let hello = wire::client_hello_bytes(SNI_BACKEND);
    let p =
        probe::send_and_watch(&topo.client, agent.addr(), &hello, Duration::from_secs(10)).await;
    assert!(
        p.received.is_empty() && matches!(p.end, End::Reset),
        "accepted without a descriptor left for the upstream: the client should be reset: {p:?}"
    );
    let log = agent.stderr();
    assert!(
        log.lines().any(|l| l.contains("resetting client")
            && l.contains("Too many open files")
            && l.contains("out of file descriptors")),
        "no log line says the client was reset because the agent ran out of file descriptors:\n{log}"
    );
    for (i, s) in flows.iter_mut().enumerate() {
        echo_check(s, i as u64, "while out of descriptors").await;
    }

    // b) No descriptor at all: accept fails with EMFILE. The agent backs off (a bounded number of
    //    log lines, not a busy loop), the connection waits in the backlog, existing flows go on.
    let free = agent.lowest_free_fd();
    agent.set_nofile_soft_limit(u64::from(free));
    let before = count_lines(&agent.stderr(), ACCEPT_BACKOFF_LOG);
    let client_ns = &topo.client;
    let addr = agent.addr();
    let pending = async move {
        let start = Instant::now();
        let mut s = tls::connect(client_ns, addr, SNI_BACKEND).await?;
        let mut msg = vec![0u8; 32 * 1024];
        Prng::new(77).fill(&mut msg);
        tls::echo_roundtrip(&mut s, &msg).await?;
        s.shutdown().await?;
        io::Result::Ok(start.elapsed())
    };
    tokio::pin!(pending);
    let waited = Duration::from_secs(3);
    tokio::select! {
        r = &mut pending => panic!("a flow completed while the agent had no descriptor to accept it: {r:?}"),
        () = tokio::time::sleep(waited) => {}
    }
    for (i, s) in flows.iter_mut().enumerate() {
        echo_check(s, i as u64, "while accept fails").await;
    }
    let log = agent.stderr();
    let backoffs = count_lines(&log, ACCEPT_BACKOFF_LOG) - before;
    // 10 ms doubling to 1 s: about 8 attempts in 3 s. A busy loop would log thousands.
    assert!(
        (1..=20).contains(&backoffs),
        "expected a few '{ACCEPT_BACKOFF_LOG}' lines while out of descriptors for {waited:?}, got \
         {backoffs}:\n{log}"
    );
    assert!(
        log.contains("ulimit -n"),
        "the accept failure should point at `ulimit -n`"
    );

    // c) A flow ends and frees two descriptors: the waiting connection is accepted and served.
    let mut first = flows.remove(0);
    first.shutdown().await.expect("close flow 0");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut rest)).await;
    drop(first);
    let took = tokio::time::timeout(Duration::from_secs(8), &mut pending)
        .await
        .expect("the waiting connection was not served within 8 s of descriptors freeing up")
        .expect("the waiting connection: handshake and 32 KiB echo after recovery");
    eprintln!(
        "{}: the connection made while out of descriptors was served after {took:?}",
        dp.as_str()
    );

    // d) The limit back to normal: new flows and the admin API work, the old flows still do.
    agent.set_nofile_soft_limit(original);
    for i in 10..12 {
        let mut s = open_echo_flow(&topo, agent.addr(), i).await;
        s.shutdown().await.expect("close");
    }
    for (i, s) in flows.iter_mut().enumerate() {
        echo_check(s, i as u64 + 1, "after recovery").await;
    }
    let m = agent.metrics().await;
    assert!(
        m.get("zone_ingress_downstream_cx_total", &[]) >= 7.0,
        "3 + 1 reset + 1 delayed + 2 new connections:\n{}",
        m.dump("zone_ingress")
    );
    assert_eq!(
        (
            connect_failures(&m),
            m.get("zone_ingress_upstream_unavailable_total", &[])
        ),
        (0.0, 0.0),
        "the endpoint never failed: running out of descriptors must not count against it:\n{}",
        m.dump("zone_ingress")
    );
}
datapath_tests!(out_of_file_descriptors, out_of_fds, 90);
