//! The local redirect (`--local-redirect`): an endpoint in the agent's own network namespace.
//! Its sends go straight to the client socket (`sk_msg`), so the endpoint -> client bytes of a
//! request/response flow never cross the namespace's loopback device; with `off` they do. A bulk
//! sender that outruns the client falls back, for good and in order, to the plain splice.
//!
//! The tests run one at a time (a process-wide lock): they read the namespace's loopback counters
//! and time transfers, which parallel transfers on two cores would disturb.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use zone_ingress_common::{FlowSide, map_names};
use zone_ingress_tests::agent::{Agent, Datapath, Metrics, Options, Route};
use zone_ingress_tests::netns::{INGRESS_UPSTREAM_V4, Netns, Topology};
use zone_ingress_tests::pki::{SNI_BACKEND, SNI_OTHER};
use zone_ingress_tests::run_test;
use zone_ingress_tests::tls::{self, Backend, Behaviour};

const MIB: u64 = 1 << 20;

static SERIAL: Mutex<()> = Mutex::const_new(());

fn options(local_redirect: &str) -> Options {
    let mut opts = Options::new(Datapath::Sockmap);
    opts.extra_args = vec!["--local-redirect".to_string(), local_redirect.to_string()];
    opts
}

/// The agent options of one compared mode: `auto` or `off` (the splice, with or without the local
/// redirect), or `userspace` (the copy).
fn mode_options(mode: &str) -> Options {
    if mode == "userspace" {
        Options::new(Datapath::Userspace)
    } else {
        options(mode)
    }
}

/// One BPF program counter (`zone-ingress maps dump stats --json`).
fn prog_counter(agent: &Agent<'_>, name: &str) -> u64 {
    let out = std::process::Command::new(zone_ingress_tests::agent::binary())
        .args(["maps", "dump", "stats", "--json", "--pin-dir"])
        .arg(agent.pin_dir())
        .output()
        .expect("run zone-ingress maps dump stats");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "maps dump stats --json: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    find_counter(&json, name).unwrap_or_else(|| panic!("no counter {name} in {json}"))
}

fn find_counter(v: &serde_json::Value, name: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(n) = m.get(name).and_then(|x| x.as_u64()) {
                return Some(n);
            }
            if m.get("name").and_then(|x| x.as_str()) == Some(name) {
                return m.get("value").and_then(|x| x.as_u64());
            }
            m.values().find_map(|x| find_counter(x, name))
        }
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_counter(x, name)),
        _ => None,
    }
}

fn pinned(agent: &Agent<'_>, name: &str) -> Map {
    let path = agent.pin_dir().join(name);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    Map::from_map_data(data).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Entries left in ZI_FLOWS (a local flow has three: client, upstream and endpoint sockets).
fn flow_entries(agent: &Agent<'_>) -> usize {
    let flows: BpfHashMap<MapData, u64, FlowSide> =
        BpfHashMap::try_from(pinned(agent, map_names::FLOWS)).expect("ZI_FLOWS layout");
    flows.keys().count()
}

/// An endpoint address of the agent's namespace (its own address on the backend link).
fn local_endpoint(port: u16) -> SocketAddr {
    SocketAddr::new(INGRESS_UPSTREAM_V4.into(), port)
}

fn flows_total(m: &Metrics, datapath: &str) -> f64 {
    m.get("zone_ingress_flows_total", &[("datapath", datapath)])
}

/// Bytes received on the namespace's loopback device (`/proc/net/dev` read inside it).
fn lo_rx_bytes(ns: &Netns) -> u64 {
    let out = ns
        .command("cat")
        .arg("/proc/net/dev")
        .output()
        .expect("run cat /proc/net/dev in the namespace");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let (name, rest) = l.split_once(':')?;
            (name.trim() == "lo").then(|| rest.split_whitespace().next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no lo line in /proc/net/dev:\n{text}"))
}

/// The agent's BPF counters and flows, for failure messages.
fn dump_maps(agent: &Agent<'_>) -> String {
    let mut text = String::new();
    for what in ["stats", "flows"] {
        let out = std::process::Command::new(zone_ingress_tests::agent::binary())
            .args(["maps", "dump", what, "--pin-dir"])
            .arg(agent.pin_dir())
            .output()
            .expect("run zone-ingress maps dump");
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    text
}

/// One bulk flow: the client sends `up` bytes and reads to EOF, the backend sends `down`. Checks
/// both SHA-256s. Returns the seconds it took.
async fn bulk_flow(
    topo: &Topology,
    agent: &Agent<'_>,
    backend: &mut Backend,
    up: u64,
    down: u64,
) -> f64 {
    let start = Instant::now();
    let s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("mTLS handshake through the agent");
    let both = tls::send_and_receive(s, up, 41);
    let (sent_sha, got) = match tokio::time::timeout(Duration::from_secs(30), both).await {
        Ok(r) => r,
        Err(_) => panic!("bulk flow not done in 30 s; maps:\n{}", dump_maps(agent)),
    };
    let secs = start.elapsed().as_secs_f64();
    let out = backend.outcome(Duration::from_secs(20)).await;
    assert!(out.error.is_none(), "backend failed: {:?}", out.error);
    assert_eq!(
        (out.received, out.received_sha),
        (up, sent_sha),
        "client->backend bytes differ"
    );
    assert_eq!(
        got,
        (down, tls::prng_sha(down, 42)),
        "backend->client bytes differ"
    );
    secs
}

/// Request/response through a local endpoint: `rounds` echo round trips of `size` bytes.
/// Returns the seconds taken.
async fn echo_rounds(topo: &Topology, agent: &Agent<'_>, rounds: usize, size: usize) -> f64 {
    let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("handshake");
    let start = Instant::now();
    let mut msg = vec![0u8; size];
    for i in 0..rounds {
        msg.iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = (i * 31 + j) as u8);
        tls::echo_roundtrip(&mut s, &msg)
            .await
            .unwrap_or_else(|e| panic!("round {i}: {e}"));
    }
    let secs = start.elapsed().as_secs_f64();
    s.shutdown().await.expect("client: close");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .await
        .expect("read to the backend's close");
    assert!(
        rest.is_empty(),
        "{} unexpected bytes after the echoes",
        rest.len()
    );
    secs
}

/// The request/response case: the endpoint's replies never touch loopback with `auto`, do with
/// `off`; the flow is shown as `sockmap_local`; nothing falls back. Prints the round-trip times
/// of auto, off and the userspace copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_replies_skip_loopback() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(120), async {
        const ROUNDS: usize = 2000;
        const SIZE: usize = 16 * 1024;
        let up = (ROUNDS * SIZE) as u64;
        let topo = Topology::new();
        let mut backend = Backend::start(&topo.ingress, local_endpoint(9443), Behaviour::Echo).await;
        let routes = [Route::new(SNI_BACKEND, &[backend.addr])];
        let mut report = Vec::new();
        for mode in ["auto", "off", "userspace"] {
            let agent = Agent::start(&topo.ingress, &routes, mode_options(mode)).await;
            let lo0 = lo_rx_bytes(&topo.ingress);
            let secs = echo_rounds(&topo, &agent, ROUNDS, SIZE).await;
            let lo = lo_rx_bytes(&topo.ingress) - lo0;
            let out = backend.outcome(Duration::from_secs(10)).await;
            assert!(out.error.is_none(), "backend failed: {:?}", out.error);
            assert_eq!(out.received, up);
            let m = agent.metrics().await;
            report.push(format!(
                "{mode}: {ROUNDS} x {} KiB round trips in {secs:.3} s ({:.1} us each); loopback {} KiB",
                SIZE / 1024,
                secs * 1e6 / ROUNDS as f64,
                lo / 1024
            ));
            match mode {
                "auto" => {
                    assert_eq!(flows_total(&m, "sockmap_local"), 1.0, "not local:\n{}", m.dump("zone_ingress"));
                    assert_eq!(prog_counter(&agent, "local_fell_back"), 0, "an RPC flow fell back");
                    assert!(prog_counter(&agent, "local_redirected") >= ROUNDS as u64);
                    // Requests cross loopback (plus ACKs and headers); replies must not.
                    assert!(lo < up + up / 3, "loopback carried {lo} bytes for {up} bytes each way: the replies took TCP");
                }
                "off" => {
                    assert_eq!(flows_total(&m, "sockmap_local"), 0.0);
                    assert_eq!(flows_total(&m, "sockmap"), 1.0, "{}", m.dump("zone_ingress"));
                    assert!(lo >= 2 * up, "with off both directions cross loopback, saw {lo} for {up} each way");
                }
                _ => assert_eq!(flows_total(&m, "userspace"), 1.0),
            }
            if mode != "userspace" {
                let left = tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        let n = flow_entries(&agent);
                        if n == 0 {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
                .await;
                assert!(left.is_ok(), "ZI_FLOWS still holds {} entries after the flow ended", flow_entries(&agent));
            }
        }
        eprintln!("local endpoint, request/response:\n  {}", report.join("\n  "));
    })
    .await
}

/// Bulk both ways (64 MiB each, SHA-256): the endpoint outruns the client, the flow falls back to
/// the plain splice mid-stream, and no byte is lost or reordered. Prints auto/off/userspace times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_falls_back_in_order() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(120), async {
        const EACH_WAY: u64 = 64 * MIB;
        let topo = Topology::new();
        let mut backend = Backend::start(
            &topo.ingress,
            local_endpoint(9444),
            Behaviour::Bulk {
                send: EACH_WAY,
                seed: 42,
            },
        )
        .await;
        let routes = [Route::new(SNI_BACKEND, &[backend.addr])];
        let mut report = Vec::new();
        for mode in ["auto", "off", "userspace"] {
            let agent = Agent::start(&topo.ingress, &routes, mode_options(mode)).await;
            let secs = bulk_flow(&topo, &agent, &mut backend, EACH_WAY, EACH_WAY).await;
            let m = agent.metrics().await;
            let expect = match mode {
                "auto" => "sockmap_local",
                "off" => "sockmap",
                _ => "userspace",
            };
            assert_eq!(
                flows_total(&m, expect),
                1.0,
                "{mode}: {}",
                m.dump("zone_ingress")
            );
            assert_eq!(
                m.get("zone_ingress_splice_integrity_errors_total", &[]),
                0.0
            );
            let extra = if mode == "auto" {
                format!(
                    "; sk_msg redirected {} sends, fell back {} time(s)",
                    prog_counter(&agent, "local_redirected"),
                    prog_counter(&agent, "local_fell_back")
                )
            } else {
                String::new()
            };
            report.push(format!("{mode}: 64 MiB each way in {secs:.2} s{extra}"));
        }
        eprintln!("local endpoint, bulk:\n  {}", report.join("\n  "));
    })
    .await
}

/// A non-blocking endpoint that sends faster than the client reads (about 40 MB/s): the kernel
/// gives it EAGAIN when the client socket is full and nothing wakes it later, so the redirect must
/// fall back before that; the download completes with every byte in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_never_stalls_the_endpoint() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(90), async {
        const DOWN: u64 = 64 * MIB;
        let topo = Topology::new();
        let mut backend = Backend::start(
            &topo.ingress,
            local_endpoint(9445),
            Behaviour::Bulk {
                send: DOWN,
                seed: 42,
            },
        )
        .await;
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend.addr])],
            options("auto"),
        )
        .await;
        let s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
            .await
            .expect("handshake");
        let (mut r, mut w) = tokio::io::split(s);
        w.shutdown().await.expect("client: close its write side");
        let mut hash = sha2::Sha256::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        let start = Instant::now();
        let read_all = async {
            loop {
                let n = r.read(&mut buf).await.expect("client read");
                if n == 0 {
                    break;
                }
                sha2::Digest::update(&mut hash, &buf[..n]);
                total += n as u64;
                let due = Duration::from_secs_f64(total as f64 / 40e6);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), read_all)
            .await
            .is_err()
        {
            panic!("download stalled; maps:\n{}", dump_maps(&agent));
        }
        let sha: [u8; 32] = sha2::Digest::finalize(hash).into();
        assert_eq!(
            (total, sha),
            (DOWN, tls::prng_sha(DOWN, 42)),
            "backend->client bytes differ"
        );
        let out = backend.outcome(Duration::from_secs(20)).await;
        assert!(out.error.is_none(), "backend failed: {:?}", out.error);
        let m = agent.metrics().await;
        assert_eq!(
            flows_total(&m, "sockmap_local"),
            1.0,
            "{}",
            m.dump("zone_ingress")
        );
        assert_eq!(
            prog_counter(&agent, "local_fell_back"),
            1,
            "the flow should have fallen back once"
        );
    })
    .await
}

/// Half-close both ways, server-first, resets from each side, and 20 concurrent flows, all through
/// a local endpoint; every flow local, and nothing left in the maps afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_resets_and_concurrency() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(120), async {
        let topo = Arc::new(Topology::new());
        let reply = b"reply after the client's EOF".to_vec();
        let first = b"the server speaks first and half-closes".to_vec();
        let mut after_eof = Backend::start(
            &topo.ingress,
            local_endpoint(9450),
            Behaviour::ReplyAfterEof {
                reply: reply.clone(),
            },
        )
        .await;
        let mut server_first = Backend::start(
            &topo.ingress,
            local_endpoint(9451),
            Behaviour::HalfCloseFirst {
                first: first.clone(),
            },
        )
        .await;
        let mut resetter = Backend::start(
            &topo.ingress,
            local_endpoint(9452),
            Behaviour::ResetAfter {
                after: 5,
                send: 256 * 1024,
            },
        )
        .await;
        let mut echo = Backend::start(&topo.ingress, local_endpoint(9453), Behaviour::Echo).await;
        // The test certificate has three names: three routes for the first agent.
        let routes = [
            Route::new(SNI_BACKEND, &[after_eof.addr]),
            Route::new(SNI_OTHER, &[server_first.addr]),
            Route::new("localhost", &[resetter.addr]),
        ];
        let agent = Agent::start(&topo.ingress, &routes, options("auto")).await;
        let addr = agent.addr();

        // The client half-closes first; the endpoint replies after its EOF.
        let mut s = tls::connect(&topo.client, addr, SNI_BACKEND)
            .await
            .expect("handshake");
        s.write_all(b"request").await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read reply to EOF");
        assert_eq!(got, reply);
        let out = after_eof.outcome(Duration::from_secs(10)).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(out.received_bytes, b"request");

        // Server-first: the endpoint sends and half-closes before the client says anything.
        let mut s = tls::connect(&topo.client, addr, SNI_OTHER)
            .await
            .expect("handshake");
        let mut got = vec![0u8; first.len()];
        s.read_exact(&mut got)
            .await
            .expect("read the server's first bytes");
        assert_eq!(got, first);
        let mut rest = Vec::new();
        // After the endpoint's half-close the client still sends.
        s.write_all(b"late client bytes")
            .await
            .expect("write after the server's FIN");
        s.shutdown().await.expect("close");
        s.read_to_end(&mut rest)
            .await
            .expect("EOF after the server's half-close");
        assert!(rest.is_empty());
        let out = server_first.outcome(Duration::from_secs(10)).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(out.received_bytes, b"late client bytes");

        // The endpoint resets after sending 256 KiB: the client sees a reset.
        let mut s = tls::connect(&topo.client, addr, "localhost")
            .await
            .expect("handshake");
        s.write_all(b"hello").await.expect("write");
        s.flush().await.expect("flush");
        let mut sink = Vec::new();
        match s.read_to_end(&mut sink).await {
            Err(e) if tls::is_reset(&e) => {}
            other => panic!(
                "expected a reset after the endpoint's reset, got {other:?} ({} bytes)",
                sink.len()
            ),
        }
        let _ = resetter.outcome(Duration::from_secs(10)).await;
        let m = agent
            .metrics_until(Duration::from_secs(10), |m| {
                m.get("zone_ingress_downstream_cx_active", &[]) == 0.0
            })
            .await;
        assert_eq!(
            flows_total(&m, "sockmap_local"),
            3.0,
            "every flow should be local:\n{}",
            m.dump("zone_ingress")
        );
        assert_eq!(
            m.get("zone_ingress_splice_integrity_errors_total", &[]),
            0.0
        );
        assert_eq!(flow_entries(&agent), 0, "ZI_FLOWS still holds entries");
        drop(agent);

        // A second agent for the echo endpoint.
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[echo.addr])],
            options("auto"),
        )
        .await;
        let addr = agent.addr();

        // The client resets: the endpoint sees its connection break, not a clean EOF.
        let mut s = tls::connect(&topo.client, addr, SNI_BACKEND)
            .await
            .expect("handshake");
        tls::echo_roundtrip(&mut s, b"reset follows")
            .await
            .expect("echo");
        tls::reset(s.into_inner().0);
        let out = echo.outcome(Duration::from_secs(10)).await;
        assert!(
            out.error.is_some(),
            "the endpoint should see the client's reset, got a clean end: {out:?}"
        );

        // 20 concurrent echo flows of 1 MiB each in 64 KiB round trips.
        let mut set = JoinSet::new();
        for i in 0..20u64 {
            let topo = topo.clone();
            set.spawn(async move {
                let mut s = tls::connect(&topo.client, addr, SNI_BACKEND)
                    .await
                    .map_err(|e| format!("{i}: {e}"))?;
                for r in 0..16u64 {
                    let msg: Vec<u8> = (0..64 * 1024u64)
                        .map(|j| (i * 7 + r * 3 + j) as u8)
                        .collect();
                    tls::echo_roundtrip(&mut s, &msg)
                        .await
                        .map_err(|e| format!("{i}/{r}: {e}"))?;
                }
                s.shutdown().await.map_err(|e| e.to_string())?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            });
        }
        let mut failures = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Err(e) = r.expect("flow task") {
                failures.push(e);
            }
        }
        assert!(failures.is_empty(), "{failures:?}");
        for _ in 0..20 {
            let out = echo.outcome(Duration::from_secs(10)).await;
            assert!(out.error.is_none(), "{:?}", out.error);
            assert_eq!(out.received, 16 * 64 * 1024);
        }
        let m = agent
            .metrics_until(Duration::from_secs(10), |m| {
                m.get("zone_ingress_downstream_cx_active", &[]) == 0.0
            })
            .await;
        assert_eq!(
            flows_total(&m, "sockmap_local"),
            21.0,
            "every flow should be local:\n{}",
            m.dump("zone_ingress")
        );
        assert_eq!(
            flows_total(&m, "sockmap") + flows_total(&m, "userspace"),
            0.0
        );
        assert_eq!(
            m.get("zone_ingress_splice_integrity_errors_total", &[]),
            0.0
        );
        assert_eq!(flow_entries(&agent), 0, "ZI_FLOWS still holds entries");
    })
    .await
}

/// The sock_ops program is attached through a BPF link that dies with the agent: after a SIGKILL
/// no `zi_local_sockops` is attached to the cgroup root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_agent_leaves_no_cgroup_program() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let backend = Backend::start(&topo.ingress, local_endpoint(9460), Behaviour::Echo).await;
        let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
        let root = info
            .lines()
            .find_map(|l| {
                let (fields, fs) = l.split_once(" - ")?;
                (fs.split_whitespace().next()? == "cgroup2")
                    .then(|| fields.split_whitespace().nth(4).map(str::to_string))?
            })
            .expect("a cgroup2 mount");
        // Program names are cut to 15 characters by the kernel.
        let attached = || {
            let out = std::process::Command::new("bpftool")
                .args(["cgroup", "show", &root])
                .output()
                .expect("run bpftool cgroup show");
            String::from_utf8_lossy(&out.stdout)
                .matches("zi_local_sockop")
                .count()
        };
        let before = attached();
        let mut agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend.addr])],
            options("auto"),
        )
        .await;
        assert_eq!(
            attached(),
            before + 1,
            "the running agent's sock_ops link is not listed by bpftool"
        );
        agent.signal(libc::SIGKILL);
        agent.wait_exit(Duration::from_secs(10)).await;
        let gone = tokio::time::timeout(Duration::from_secs(5), async {
            while attached() > before {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            gone.is_ok(),
            "a SIGKILLed agent left its sock_ops program attached"
        );
    })
    .await
}

/// An IPv6 endpoint of the agent's namespace takes the local redirect too (the key's addresses
/// are the four words of the IPv6 address), and its replies are correct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_endpoint_is_local() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(60), async {
        const ROUNDS: usize = 200;
        let topo = Topology::new();
        let addr = SocketAddr::new(zone_ingress_tests::netns::INGRESS_UPSTREAM_V6.into(), 9470);
        let mut backend = Backend::start(&topo.ingress, addr, Behaviour::Echo).await;
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend.addr])],
            options("auto"),
        )
        .await;
        echo_rounds(&topo, &agent, ROUNDS, 16 * 1024).await;
        let out = backend.outcome(Duration::from_secs(10)).await;
        assert!(out.error.is_none(), "backend failed: {:?}", out.error);
        assert_eq!(out.received, (ROUNDS * 16 * 1024) as u64);
        let m = agent.metrics().await;
        assert_eq!(
            flows_total(&m, "sockmap_local"),
            1.0,
            "the IPv6 flow was not local:\n{}",
            m.dump("zone_ingress")
        );
        assert!(prog_counter(&agent, "local_redirected") >= ROUNDS as u64);
    })
    .await
}

/// A hot restart with local flows: the handoff carries no `sk_msg` state, so they stay with the
/// old agent, keep moving verified bytes there, and the old agent exits once they ended; the new
/// agent takes new flows, locally too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_restart_leaves_local_flows_with_the_old_agent() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(90), async {
        const LIVE: usize = 4;
        let topo = Topology::new();
        let _backend = Backend::start(&topo.ingress, local_endpoint(9443), Behaviour::Echo).await;
        let mut opts = options("auto");
        opts.extra_args
            .extend(["--drain-time".to_string(), "20s".to_string()]);
        let mut old = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[local_endpoint(9443)])],
            opts,
        )
        .await;
        let mut live = Vec::new();
        for i in 0..LIVE {
            let mut s = tls::connect(&topo.client, old.addr(), SNI_BACKEND)
                .await
                .unwrap_or_else(|e| panic!("flow {i}: connect: {e}"));
            tls::echo_roundtrip(&mut s, &[i as u8; 16 * 1024])
                .await
                .unwrap_or_else(|e| panic!("flow {i} before the upgrade: {e}"));
            live.push(s);
        }
        let m = old.metrics().await;
        assert!(
            flows_total(&m, "sockmap_local") >= LIVE as f64,
            "the flows were not local:\n{}",
            m.dump("zone_ingress_flows")
        );

        let mut new = old.upgrade();
        new.wait_ready(Duration::from_secs(20)).await;
        let start = Instant::now();
        while !new.stderr().contains("hot restart: took over") {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "the new agent did not take over:\n{}",
                new.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            old.is_running(),
            "the old agent exited while it held local flows"
        );
        for (i, s) in live.iter_mut().enumerate() {
            tls::echo_roundtrip(s, &[0xa5 ^ i as u8; 64 * 1024])
                .await
                .unwrap_or_else(|e| panic!("local flow {i} after the upgrade: {e}"));
            s.shutdown().await.expect("shutdown");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.expect("EOF after shutdown");
        }
        let status = old.wait_exit(Duration::from_secs(15)).await;
        assert!(status.success(), "the old agent exited with {status}");
        assert!(
            !old.stderr().contains("integrity check failed"),
            "{}",
            old.stderr()
        );

        let mut s = tls::connect(&topo.client, new.addr(), SNI_BACKEND)
            .await
            .expect("a new flow through the new agent");
        tls::echo_roundtrip(&mut s, &[7u8; 16 * 1024])
            .await
            .expect("echo through the new agent");
        let m = new.metrics().await;
        assert!(
            flows_total(&m, "sockmap_local") >= 1.0,
            "the new agent's flow was not local:\n{}",
            m.dump("zone_ingress_flows")
        );
    })
    .await;
}
