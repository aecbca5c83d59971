//! `zone-ingress maps dump routes|flows|stats`: real flows through the agent, then the pinned maps
//! as an operator reads them (the agent's own subcommand, and bpftool): live flows with their
//! addresses and exact bytes, route counters that match the traffic, nothing left after the flows
//! close, clear errors for a missing pin directory or a map of another layout, and a dump that
//! still works after the agent was killed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zone_ingress_tests::agent::{self, Agent, Datapath, Options, Route};
use zone_ingress_tests::netns::{CLIENT_V4, INGRESS_UPSTREAM_V4, Topology};
use zone_ingress_tests::pki::{SNI_BACKEND, SNI_OTHER};
use zone_ingress_tests::run_test;
use zone_ingress_tests::tls::{self, Backend, Behaviour};
use zone_ingress_tests::wire::{self, Counting};

const BACKEND_PORT: u16 = 8443;
const RAW_PORT: u16 = 8444;

/// `zone-ingress maps dump WHAT --json --pin-dir DIR` (the agent's binary, outside any namespace:
/// pinned maps are global).
fn dump_raw(pin_dir: &Path, what: &str) -> Output {
    Command::new(agent::binary())
        .args(["maps", "dump", what, "--json", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .expect("run zone-ingress maps dump")
}

fn dump(pin_dir: &Path, what: &str) -> Value {
    let out = dump_raw(pin_dir, what);
    assert!(
        out.status.success(),
        "maps dump {what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "maps dump {what} --json is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn flows(pin_dir: &Path) -> Vec<Value> {
    dump(pin_dir, "flows")["flows"]
        .as_array()
        .expect("flows is an array")
        .clone()
}

fn route(pin_dir: &Path, sni: &str) -> Value {
    let routes = dump(pin_dir, "routes");
    routes["routes"]
        .as_array()
        .expect("routes is an array")
        .iter()
        .find(|r| r["sni"] == sni)
        .unwrap_or_else(|| panic!("no route for {sni} in {routes:#}"))
        .clone()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v:#}"))
}

/// Polls `read` until `pred` holds (at most `limit`), returning the last value.
async fn until<T: std::fmt::Debug>(
    limit: Duration,
    mut read: impl FnMut() -> T,
    pred: impl Fn(&T) -> bool,
) -> T {
    let start = Instant::now();
    loop {
        let v = read();
        if pred(&v) || start.elapsed() > limit {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `bpftool map dump pinned PATH`, which must succeed.
fn bpftool_dump(path: &Path) -> String {
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("run bpftool (`cargo xtask test` installs it: apt-get install bpftool)");
    assert!(
        out.status.success(),
        "bpftool map dump pinned {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

type Client = tokio_rustls::client::TlsStream<Counting<tokio::net::TcpStream>>;

/// An mTLS flow whose client-side wire bytes are counted: (stream, written, read, local port).
async fn counted_flow(
    topo: &Topology,
    agent: &Agent<'_>,
    sni: &str,
) -> (Client, Arc<AtomicU64>, Arc<AtomicU64>, u16) {
    let tcp = topo
        .client
        .connect(agent.addr())
        .await
        .expect("connect to the agent");
    let port = tcp.local_addr().expect("client address").port();
    let (read, written) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let s = tls::handshake(
        Counting {
            inner: tcp,
            read: read.clone(),
            written: written.clone(),
        },
        sni,
    )
    .await
    .expect("mTLS handshake through the agent");
    (s, written, read, port)
}

/// The one live flow, once its entry shows `up`/`down` bytes (at most 3 s: a publish period and
/// then some).
async fn one_live_flow(pins: &Path, up: u64, down: u64) -> Vec<Value> {
    let live = until(
        Duration::from_secs(3),
        || flows(pins),
        |f| f.len() == 1 && u(&f[0], "bytes_up") == up && u(&f[0], "bytes_down") == down,
    )
    .await;
    assert_eq!(live.len(), 1, "one live flow expected: {live:#?}");
    live
}

/// After every flow of `SNI_BACKEND` closed: no entry is left, and its route and the Envoy byte
/// counters hold the clients' wire totals `up`/`down` (each byte once). Returns the route.
async fn ended_counters(agent: &Agent<'_>, pins: &Path, up: u64, down: u64) -> Value {
    let after = until(Duration::from_secs(5), || flows(pins), |f| f.is_empty()).await;
    assert!(
        after.is_empty(),
        "closed flows must leave no entries: {after:#?}"
    );
    let r = until(
        Duration::from_secs(3),
        || route(pins, SNI_BACKEND),
        |r| u(r, "bytes_up") == up && u(r, "bytes_down") == down,
    )
    .await;
    assert_eq!(
        (u(&r, "bytes_up"), u(&r, "bytes_down")),
        (up, down),
        "route bytes after the flows closed (the clients' wire totals): {r:#}"
    );
    let m = agent
        .metrics_until(Duration::from_secs(3), |m| envoy_bytes(m) == (up, down))
        .await;
    assert_eq!(envoy_bytes(&m), (up, down), "{}", m.dump("envoy_tcp"));
    r
}

/// The Envoy byte counters (received from, sent to the client) of `SNI_BACKEND`'s flows.
fn envoy_bytes(m: &zone_ingress_tests::agent::Metrics) -> (u64, u64) {
    let get = |name| m.get(name, &[("envoy_tcp_prefix", SNI_BACKEND)]) as u64;
    (
        get("envoy_tcp_downstream_cx_rx_bytes_total"),
        get("envoy_tcp_downstream_cx_tx_bytes_total"),
    )
}

/// Closes a flow cleanly and reads it to the backend's close.
async fn close(mut s: Client) {
    s.shutdown().await.expect("close_notify + FIN");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
}

// ---------------------------------------------------------------------------------------------
// 1. Spliced flows: live entries with exact bytes, route counters, Prometheus bytes from the
//    kernel, nothing left after close, bpftool reads every map.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spliced_flows_in_the_maps_match_the_traffic() {
    run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let backend_addr = Topology::backend_addr(BACKEND_PORT);
        let _backend = Backend::start(&topo.backend, backend_addr, Behaviour::Echo).await;
        let agent = Agent::start(
            &topo.ingress,
            &[
                Route::new(SNI_BACKEND, &[backend_addr]),
                Route::new(SNI_OTHER, &[backend_addr]),
            ],
            Options::new(Datapath::Sockmap),
        )
        .await;
        let pins = agent.pin_dir().to_path_buf();

        // Both routes are listed before any traffic, with zero counters.
        let idle = route(&pins, SNI_OTHER);
        assert_eq!(idle["active"], true, "{idle:#}");
        assert_eq!(
            (
                u(&idle, "flows_spliced"),
                u(&idle, "bytes_up"),
                u(&idle, "bytes_down")
            ),
            (0, 0, 0),
            "{idle:#}"
        );

        let (mut s, written, read, port) = counted_flow(&topo, &agent, SNI_BACKEND).await;
        tls::echo_roundtrip(&mut s, &vec![0x5a; 300_000])
            .await
            .expect("echo 300 kB");
        let (up, down) = (written.load(Ordering::SeqCst), read.load(Ordering::SeqCst));

        // The live flow, with the bytes the client's wire saw each way.
        let live = one_live_flow(&pins, up, down).await;
        let f = &live[0];
        assert_eq!(f["datapath"], "sockmap", "{f:#}");
        assert_eq!(f["sni"], SNI_BACKEND, "{f:#}");
        assert_eq!(f["cluster"], SNI_BACKEND, "{f:#}");
        assert_eq!(f["client"], format!("{CLIENT_V4}:{port}"), "{f:#}");
        assert_eq!(f["ingress"], agent.addr().to_string(), "{f:#}");
        assert_eq!(f["upstream"], backend_addr.to_string(), "{f:#}");
        let local = f["local"].as_str().expect("local address");
        assert!(
            local.starts_with(&format!("{INGRESS_UPSTREAM_V4}:")),
            "the agent's upstream address: {f:#}"
        );
        assert_eq!(
            (u(f, "bytes_up"), u(f, "bytes_down")),
            (up, down),
            "flow bytes should match the client's wire (sent, received): {f:#}"
        );
        assert!(u(f, "age_ms") < 60_000, "{f:#}");

        // The route's counters, live: the kernel's redirected bytes plus the replayed ClientHello.
        let r = route(&pins, SNI_BACKEND);
        assert_eq!(u(&r, "flows_spliced"), 1, "{r:#}");
        assert_eq!(
            u(&r, "kernel_flows"),
            1,
            "the verdict counted the flow itself: {r:#}"
        );
        assert_eq!(u(&r, "flows_userspace"), 0, "{r:#}");
        assert_eq!(
            (u(&r, "bytes_up"), u(&r, "bytes_down")),
            (up, down),
            "{r:#}"
        );
        assert!(
            u(&r, "kernel_bytes_up") > 300_000 && u(&r, "kernel_bytes_up") < up,
            "the kernel redirected all but the ClientHello: {r:#}"
        );
        // The endpoint's first bytes (its ServerHello) can arrive while the handoff still holds
        // the flow for the replay: the agent forwards those itself, the kernel the rest.
        assert!(
            u(&r, "kernel_bytes_down") > 300_000 && u(&r, "kernel_bytes_down") <= down,
            "the kernel redirected (nearly) everything the endpoint sent: {r:#}"
        );

        // Prometheus sums the kernel counters at scrape time: the live flow is already in.
        let m = agent.metrics().await;
        assert_eq!(
            envoy_bytes(&m),
            (up, down),
            "Envoy byte counters of a live spliced flow:\n{}",
            m.dump("envoy_tcp")
        );

        let stats = dump(&pins, "stats");
        assert!(
            stats["counters"]["redirected"]
                .as_u64()
                .is_some_and(|n| n > 0),
            "{stats:#}"
        );

        // The table form: a header, one row per flow with both address pairs.
        let out = Command::new(agent::binary())
            .args(["maps", "dump", "flows", "--pin-dir"])
            .arg(&pins)
            .output()
            .expect("run maps dump flows");
        let table = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = table.lines().collect();
        assert!(out.status.success() && lines.len() == 2, "{table}");
        for word in [
            "DOWNSTREAM",
            "UPSTREAM",
            "SNI",
            "BYTES_UP",
            "BYTES_DOWN",
            "AGE",
            "DATAPATH",
        ] {
            assert!(lines[0].contains(word), "header misses {word}:\n{table}");
        }
        let row = format!("{CLIENT_V4}:{port} -> {}", agent.addr());
        assert!(
            lines[1].starts_with(&row)
                && lines[1].contains(&format!("-> {backend_addr}"))
                && lines[1].contains(&up.to_string())
                && lines[1].ends_with("sockmap"),
            "{table}"
        );
        // ZI_MAPS_PRINT=1 shows what an operator sees.
        if std::env::var_os("ZI_MAPS_PRINT").is_some() {
            eprintln!("{table}");
            for what in ["routes", "stats"] {
                let out = Command::new(agent::binary())
                    .args(["maps", "dump", what, "--pin-dir"])
                    .arg(&pins)
                    .output()
                    .expect("run maps dump");
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
            eprintln!("{}", bpftool_dump(&pins.join("ZI_FLOW_INFO")));
            eprintln!("{}", bpftool_dump(&pins.join("ZI_ROUTE_BYTES")));
        }

        // bpftool reads every pinned map (8-byte aligned values), and sees the one flow.
        for name in [
            "ZI_FLOW_INFO",
            "ZI_FLOWS",
            "ZI_CTRL",
            "ZI_ROUTES",
            "ZI_ROUTE_BYTES",
            "ZI_COUNTERS",
        ] {
            let text = bpftool_dump(&pins.join(name));
            if name == "ZI_FLOW_INFO" {
                assert!(text.contains("Found 1 element"), "{name}:\n{text}");
            }
        }

        // A second flow on the same route, then both close.
        let (mut s2, written2, read2, _) = counted_flow(&topo, &agent, SNI_BACKEND).await;
        tls::echo_roundtrip(&mut s2, b"second")
            .await
            .expect("echo on the second flow");
        close(s).await;
        close(s2).await;
        // Totals as the clients' wires saw them, close_notify alerts included.
        let (up, down) = (
            written.load(Ordering::SeqCst) + written2.load(Ordering::SeqCst),
            read.load(Ordering::SeqCst) + read2.load(Ordering::SeqCst),
        );
        // Ended flows: kernel counters plus the agent's share (the ClientHellos), no double count.
        let r = ended_counters(&agent, &pins, up, down).await;
        assert_eq!(u(&r, "flows_spliced"), 2, "{r:#}");
        assert_eq!(u(&r, "kernel_flows"), 2, "{r:#}");
        let text = bpftool_dump(&pins.join("ZI_FLOW_INFO"));
        assert!(text.contains("Found 0 elements"), "{text}");
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 1b. A spliced flow the agent partly forwards itself (a slow reader pauses it): the flow map, the
//     route and Prometheus count those bytes while the flow runs, and once more at its end.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_spliced_flows_count_the_agents_bytes_live() {
    run_test(Duration::from_secs(60), async {
        const LEN: usize = 8 << 20;
        const BUDGET: u64 = 64 * 1024;
        let topo = Topology::new();
        let backend_addr = Topology::backend_addr(BACKEND_PORT);
        let _backend = Backend::start(&topo.backend, backend_addr, Behaviour::Echo).await;
        let mut opts = Options::new(Datapath::Sockmap);
        opts.extra_args = vec!["--splice-budget".to_string(), BUDGET.to_string()];
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend_addr])],
            opts,
        )
        .await;
        let pins = agent.pin_dir().to_path_buf();

        let (s, written, read, _) = counted_flow(&topo, &agent, SNI_BACKEND).await;
        let (mut rd, mut wr) = tokio::io::split(s);
        let payload: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&payload).await.expect("send 8 MiB");
            wr.flush().await.expect("flush");
            wr
        });
        // A slow reader: the client's window closes, the echo's bytes queue up in the ingress
        // past the budget, the flow pauses and the agent forwards at the reader's pace.
        let mut back = vec![0u8; LEN];
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < LEN {
            assert!(
                Instant::now() < deadline,
                "echo too slow: {got} of {LEN} bytes"
            );
            let end = (got + 16 * 1024).min(LEN);
            let n = rd.read(&mut back[got..end]).await.expect("read the echo");
            assert!(n > 0, "end of stream after {got} of {LEN} bytes");
            got += n;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(back == expected, "the echo came back different");
        let s = rd.unsplit(writer.await.expect("writer task"));
        let (up, down) = (written.load(Ordering::SeqCst), read.load(Ordering::SeqCst));

        // Live: the agent's share is in, within a publish period.
        let live = one_live_flow(&pins, up, down).await;
        assert_eq!(
            (u(&live[0], "bytes_up"), u(&live[0], "bytes_down")),
            (up, down),
            "a live flow's bytes, the agent's forwarded share included: {:#}",
            live[0]
        );
        let r = route(&pins, SNI_BACKEND);
        assert_eq!(
            (u(&r, "bytes_up"), u(&r, "bytes_down")),
            (up, down),
            "the route's bytes while the flow runs: {r:#}"
        );
        assert!(
            down - u(&r, "kernel_bytes_down") > BUDGET,
            "the slow reader should have paused the flow and had the agent forward part of the \
             echo: {r:#}\n{}",
            agent.stderr()
        );
        let m = agent.metrics().await;
        assert_eq!(
            envoy_bytes(&m),
            (up, down),
            "Prometheus bytes of the live flow:\n{}",
            m.dump("envoy_tcp")
        );

        // Ended: the rest (close_notify both ways) is counted once, nothing twice.
        close(s).await;
        let (up, down) = (written.load(Ordering::SeqCst), read.load(Ordering::SeqCst));
        ended_counters(&agent, &pins, up, down).await;
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 2. A flow the kernel refuses (the client half-closed before the splice) is copied in userspace
//    and shown with datapath `userspace` and bytes published while it runs.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_flows_are_in_the_flow_map() {
    run_test(Duration::from_secs(60), async {
        const PAYLOAD: usize = 10_000;
        const REPLY: usize = 70_000;
        let topo = Topology::new();
        let raw_addr = Topology::backend_addr(RAW_PORT);
        // A plain TCP endpoint: reads to EOF, answers, then holds the connection until released.
        let listener = topo.backend.listen(raw_addr).await;
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got)
                .await
                .expect("read to the client's FIN");
            s.write_all(&vec![7u8; REPLY]).await.expect("reply");
            let _ = released.await;
            got.len()
        });
        // The first endpoint never answers (nobody owns the address): the agent connects to the
        // real one only after the connect timeout, by when the client's FIN is certainly queued.
        let silent =
            std::net::SocketAddr::new(std::net::Ipv4Addr::new(10, 231, 2, 99).into(), RAW_PORT);
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[silent, raw_addr])],
            Options::new(Datapath::Sockmap).connect_timeout("300ms"),
        )
        .await;
        let pins = agent.pin_dir().to_path_buf();

        // ClientHello, payload and FIN: at the handoff the client socket is at end of stream, the
        // kernel refuses it (the splice needs an open socket) and the userspace copy carries it.
        let hello = wire::client_hello_bytes(SNI_BACKEND);
        let mut c = topo.client.connect(agent.addr()).await.expect("connect");
        let port = c.local_addr().expect("client address").port();
        c.write_all(&hello).await.expect("send the ClientHello");
        c.write_all(&[1u8; PAYLOAD])
            .await
            .expect("send the payload");
        c.shutdown().await.expect("half-close");
        let mut reply = vec![0u8; REPLY];
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut reply))
            .await
            .expect("reply within 10 s")
            .expect("read the reply");

        let up = (hello.len() + PAYLOAD) as u64;
        let live = until(
            Duration::from_secs(4),
            || flows(&pins),
            |f| f.len() == 1 && u(&f[0], "bytes_down") == REPLY as u64,
        )
        .await;
        assert_eq!(live.len(), 1, "one live flow expected: {live:#?}");
        let f = &live[0];
        assert_eq!(f["datapath"], "userspace", "{f:#}\n{}", agent.stderr());
        assert_eq!(f["sni"], SNI_BACKEND, "{f:#}");
        assert_eq!(f["client"], format!("{CLIENT_V4}:{port}"), "{f:#}");
        assert_eq!(f["upstream"], raw_addr.to_string(), "{f:#}");
        assert_eq!(
            (u(f, "bytes_up"), u(f, "bytes_down")),
            (up, REPLY as u64),
            "a live userspace flow's bytes (published about once a second): {f:#}"
        );
        let r = route(&pins, SNI_BACKEND);
        assert_eq!(
            (u(&r, "flows_spliced"), u(&r, "flows_userspace")),
            (0, 1),
            "{r:#}"
        );
        // Its bytes are in the route's and Prometheus's counters already, not only at its end.
        assert_eq!(
            (u(&r, "bytes_up"), u(&r, "bytes_down")),
            (up, REPLY as u64),
            "a live userspace flow's bytes in its route: {r:#}"
        );
        let m = agent.metrics().await;
        assert_eq!(
            envoy_bytes(&m),
            (up, REPLY as u64),
            "Prometheus bytes of a live userspace flow:\n{}",
            m.dump("envoy_tcp")
        );

        release.send(()).expect("release the endpoint");
        assert_eq!(server.await.expect("endpoint task"), up as usize);
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
        let after = until(Duration::from_secs(5), || flows(&pins), |f| f.is_empty()).await;
        assert!(
            after.is_empty(),
            "a closed userspace flow must leave no entry: {after:#?}"
        );
        let r = until(
            Duration::from_secs(3),
            || route(&pins, SNI_BACKEND),
            |r| u(r, "bytes_up") == up,
        )
        .await;
        assert_eq!(
            (u(&r, "bytes_up"), u(&r, "bytes_down")),
            (up, REPLY as u64),
            "the route holds the userspace flow's bytes once it ended: {r:#}"
        );
        let m = agent
            .metrics_until(Duration::from_secs(3), |m| {
                envoy_bytes(m) == (up, REPLY as u64)
            })
            .await;
        assert_eq!(
            envoy_bytes(&m),
            (up, REPLY as u64),
            "Prometheus bytes of the ended userspace flow, each counted once:\n{}",
            m.dump("envoy_tcp")
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 3. After the agent is killed, the pinned maps still read: the flow it had, the route counters.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_read_after_the_agent_was_killed() {
    run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let backend_addr = Topology::backend_addr(BACKEND_PORT);
        let _backend = Backend::start(&topo.backend, backend_addr, Behaviour::Echo).await;
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend_addr])],
            Options::new(Datapath::Sockmap),
        )
        .await;
        let pins = agent.pin_dir().to_path_buf();
        let (mut s, written, _read, _) = counted_flow(&topo, &agent, SNI_BACKEND).await;
        tls::echo_roundtrip(&mut s, &[3u8; 50_000])
            .await
            .expect("echo");
        let up = written.load(Ordering::SeqCst);
        let before = until(
            Duration::from_secs(3),
            || route(&pins, SNI_BACKEND),
            |r| u(r, "bytes_up") == up,
        )
        .await;
        agent.signal(libc::SIGKILL);
        let start = Instant::now();
        while Path::new(&format!("/proc/{}/stat", agent.pid())).exists()
            && std::fs::read_to_string(format!("/proc/{}/stat", agent.pid()))
                .is_ok_and(|s| !s.contains(") Z "))
            && start.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = route(&pins, SNI_BACKEND);
        assert_eq!(
            (u(&r, "flows_spliced"), u(&r, "bytes_up")),
            (u(&before, "flows_spliced"), up),
            "route counters after the agent died: {r:#}"
        );
        let f = flows(&pins);
        assert_eq!(f.len(), 1, "the flow the agent had when it died: {f:#?}");
        assert_eq!(f[0]["datapath"], "sockmap");
        let stats = dump(&pins, "stats");
        assert!(
            stats["counters"]["redirected"]
                .as_u64()
                .is_some_and(|n| n > 0)
        );
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// 4. Clear errors: a missing pin directory, a map of another layout. Never a panic.

fn no_panic(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "maps dump panicked: {stderr}");
    assert_eq!(out.status.code(), Some(1), "exit status: {stderr}");
    stderr
}

/// A bpffs directory removed on drop.
struct PinDirGuard(PathBuf);

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_pin_dir_and_foreign_layout_are_clear_errors() {
    run_test(Duration::from_secs(30), async {
        let missing = PathBuf::from(format!(
            "/sys/fs/bpf/zi-test-{}-missing",
            zone_ingress_tests::unique_suffix()
        ));
        for what in ["routes", "flows", "stats"] {
            let err = no_panic(&dump_raw(&missing, what));
            assert!(
                err.contains("does not exist") && err.contains(&missing.display().to_string()),
                "maps dump {what} with a missing pin dir: {err}"
            );
        }

        // A pin dir whose ZI_FLOW_INFO has 16-byte values (another layout).
        let dir = PinDirGuard(PathBuf::from(format!(
            "/sys/fs/bpf/zi-test-{}-foreign",
            zone_ingress_tests::unique_suffix()
        )));
        std::fs::create_dir_all(&dir.0).expect("create a pin dir on bpffs");
        let out = Command::new("bpftool")
            .args(["map", "create"])
            .arg(dir.0.join("ZI_FLOW_INFO"))
            .args([
                "type",
                "hash",
                "key",
                "8",
                "value",
                "16",
                "entries",
                "4",
                "name",
                "ZI_FLOW_INFO",
            ])
            .output()
            .expect("run bpftool map create");
        assert!(
            out.status.success(),
            "bpftool map create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = no_panic(&dump_raw(&dir.0, "flows"));
        assert!(
            err.contains("unexpected layout")
                && err.contains("value size")
                && err.contains("16 bytes")
                && err.contains("136 bytes"),
            "a flow map of another layout: {err}"
        );
        // Routes are not pinned there at all.
        let err = no_panic(&dump_raw(&dir.0, "routes"));
        assert!(
            err.contains("ZI_ROUTES") && err.contains("missing"),
            "{err}"
        );
    })
    .await
}
