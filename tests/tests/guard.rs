//! The XDP guard in front of the listener, with real packets over the client <-> ingress veth:
//! allow-list (IPv4 and IPv6, live reload), per-source SYN rate while another source connects,
//! the global SYN ceiling, malformed headers, traffic the guard must not touch, the dump
//! command, and detach on exit.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use zone_ingress_tests::agent::{self, Agent, Datapath, INGRESS_PORT, Metrics, Options, Route};
use zone_ingress_tests::flood::{self, FrameSender};
use zone_ingress_tests::netns::{
    CLIENT_V4, CLIENT_V6, INGRESS_V4, INGRESS_V6, Netns, Topology, ip,
};
use zone_ingress_tests::pki::SNI_BACKEND;
use zone_ingress_tests::run_test;
use zone_ingress_tests::tls::{self, Backend, Behaviour};

/// A second client address, inside the allow-list of the first test.
const CLIENT2_V4: Ipv4Addr = Ipv4Addr::new(10, 231, 1, 3);
const CLIENT2_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x231, 1, 0, 0, 0, 0, 3);
/// Source of the SYN floods (no host has it: the frames are hand-built).
const FLOOD_V4: Ipv4Addr = Ipv4Addr::new(10, 231, 1, 50);
const FLOOD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x231, 1, 0, 0, 0, 0, 0x50);

/// The agent's configuration file, written next to the test and passed as --agent-config.
struct AgentConfig {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl AgentConfig {
    fn new(yaml: &str) -> AgentConfig {
        let dir = tempfile::Builder::new()
            .prefix("zi-guard-")
            .tempdir()
            .expect("temp dir for the agent config");
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, yaml).expect("write the agent config");
        AgentConfig { _dir: dir, path }
    }

    fn rewrite(&self, yaml: &str) {
        std::fs::write(&self.path, yaml).expect("rewrite the agent config");
    }

    fn options(&self, datapath: Datapath) -> Options {
        let mut o = Options::new(datapath);
        o.extra_args = vec![
            "--agent-config".to_string(),
            self.path.display().to_string(),
        ];
        o
    }
}

fn add_client_addresses(topo: &Topology) {
    let c = topo.client.name();
    ip(&[
        "-n",
        c,
        "addr",
        "add",
        &format!("{CLIENT2_V4}/24"),
        "dev",
        "to-ingress",
    ]);
    ip(&[
        "-n",
        c,
        "addr",
        "add",
        &format!("{CLIENT2_V6}/64"),
        "dev",
        "to-ingress",
        "nodad",
    ]);
}

/// A TCP connection from `src` (an address of `ns`) to `dst`, bounded by `limit`.
async fn connect_from(
    ns: &Netns,
    src: IpAddr,
    dst: SocketAddr,
    limit: Duration,
) -> io::Result<tokio::net::TcpStream> {
    let sock = ns.sockets(1, dst.is_ipv6()).pop().expect("one socket");
    sock.bind(SocketAddr::new(src, 0))?;
    tokio::time::timeout(limit, sock.connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect {src} -> {dst}")))?
}

/// Asserts that `src` cannot open a connection to `dst` (its SYNs vanish: a timeout, not a reset).
async fn assert_blocked(ns: &Netns, src: IpAddr, dst: SocketAddr) {
    match connect_from(ns, src, dst, Duration::from_millis(1500)).await {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        Err(e) => panic!("{src} -> {dst}: expected the SYNs to be dropped (a timeout), got {e}"),
        Ok(_) => panic!("{src} -> {dst} connected, but the guard should drop it"),
    }
}

async fn assert_connects(ns: &Netns, src: IpAddr, dst: SocketAddr) -> Duration {
    let start = Instant::now();
    if let Err(e) = connect_from(ns, src, dst, Duration::from_secs(3)).await {
        panic!("{src} -> {dst} should connect: {e}");
    }
    start.elapsed()
}

fn guard_dropped(m: &Metrics, reason: &str) -> f64 {
    m.get("zone_ingress_guard_dropped_total", &[("reason", reason)])
}

/// `zone-ingress maps dump guard --json` against the agent's pins.
fn dump_json(pin_dir: &Path) -> serde_json::Value {
    let out = Command::new(agent::binary())
        .args(["maps", "dump", "guard", "--json", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .expect("run zone-ingress maps dump guard");
    assert!(
        out.status.success(),
        "maps dump guard failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "maps dump guard --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn xdp_attached(ns: &Netns, dev: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", ns.name(), "link", "show", "dev", dev])
        .output()
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

/// The allow-list: outsiders (IPv4 and IPv6) cannot connect and the drop counter moves, insiders
/// connect; UDP and other TCP ports are untouched; a reload changes the list live; the dump
/// shows it; the program is gone from the interface after the agent exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_ipv4_ipv6_and_live_reload() {
    run_test(Duration::from_secs(90), async {
        let topo = Topology::new();
        add_client_addresses(&topo);
        let backend =
            Backend::start(&topo.backend, Topology::backend_addr(8443), Behaviour::Echo).await;
        let cfg = AgentConfig::new(&format!(
            "guard:\n  enabled: true\n  allow_cidrs: [\"{CLIENT2_V4}/32\", \"{CLIENT2_V6}/128\"]\n"
        ));
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend.addr])],
            cfg.options(Datapath::Userspace),
        )
        .await;
        assert!(
            xdp_attached(&topo.ingress, "to-client"),
            "the guard did not attach to to-client (auto-detected from networking.address)"
        );
        // The agent listens on IPv4 only; the guard matches the port whatever the address, so a
        // listener of the test on the ingress's IPv6 address, same port, shows the IPv6 path.
        let v6_addr = SocketAddr::new(INGRESS_V6.into(), INGRESS_PORT);
        let _v6_listener = topo.ingress.listen(v6_addr).await;
        let other_port = SocketAddr::new(INGRESS_V4.into(), INGRESS_PORT + 1);
        let _other = topo.ingress.listen(other_port).await;

        assert_blocked(&topo.client, CLIENT_V4.into(), agent.addr()).await;
        assert_blocked(&topo.client, CLIENT_V6.into(), v6_addr).await;
        let m = agent.metrics().await;
        assert!(
            guard_dropped(&m, "allow_list") >= 2.0,
            "two blocked sources, each SYN counted:\n{}",
            m.dump("zone_ingress_guard")
        );
        assert_eq!(m.get("zone_ingress_guard_attached", &[]), 1.0);
        assert_connects(&topo.client, CLIENT2_V4.into(), agent.addr()).await;
        assert_connects(&topo.client, CLIENT2_V6.into(), v6_addr).await;

        // Not the listener's traffic: another TCP port and UDP to the listener's port pass.
        assert_connects(&topo.client, CLIENT_V4.into(), other_port).await;
        let udp_dst = SocketAddr::new(INGRESS_V4.into(), INGRESS_PORT);
        let rx = topo
            .ingress
            .exec(move || std::net::UdpSocket::bind(udp_dst));
        let rx = rx.expect("bind UDP on the listener's port");
        rx.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let tx = topo
            .client
            .exec(|| std::net::UdpSocket::bind(SocketAddr::new(CLIENT_V4.into(), 0)))
            .expect("bind a UDP sender");
        tx.send_to(b"not tcp", udp_dst).expect("send UDP");
        let mut buf = [0u8; 16];
        let (n, from) = rx
            .recv_from(&mut buf)
            .expect("UDP to the listener's port from a blocked source must arrive");
        assert_eq!(
            (&buf[..n], from.ip()),
            (&b"not tcp"[..], IpAddr::from(CLIENT_V4))
        );

        let dump = dump_json(agent.pin_dir());
        let cidrs = dump["allow_cidrs"].as_array().cloned().unwrap_or_default();
        assert_eq!(cidrs.len(), 2, "{dump}");
        assert!(
            dump["counters"]["dropped_allow_list"].as_u64() >= Some(2),
            "{dump}"
        );
        assert_eq!(dump["config"]["port"], INGRESS_PORT, "{dump}");

        // Reload: the IPv4 client network is allowed; the list no longer names IPv6, so IPv6 is
        // now closed (a list is the set of allowed sources, whatever the family).
        cfg.rewrite("guard:\n  enabled: true\n  allow_cidrs: [10.231.1.0/24]\n");
        let start = Instant::now();
        loop {
            match connect_from(
                &topo.client,
                CLIENT_V4.into(),
                agent.addr(),
                Duration::from_millis(500),
            )
            .await
            {
                Ok(tcp) => {
                    let mut s = tls::handshake(tcp, SNI_BACKEND)
                        .await
                        .expect("mTLS handshake through the guard");
                    tls::echo_roundtrip(&mut s, b"through the guard")
                        .await
                        .expect("echo through the guard");
                    break;
                }
                Err(e) if start.elapsed() > Duration::from_secs(6) => {
                    panic!("the reloaded allow-list did not let {CLIENT_V4} in after 6 s: {e}")
                }
                Err(_) => {}
            }
        }
        assert_blocked(&topo.client, CLIENT2_V6.into(), v6_addr).await;
        let dump = dump_json(agent.pin_dir());
        assert_eq!(
            dump["allow_cidrs"],
            serde_json::json!(["10.231.1.0/24"]),
            "{dump}"
        );
        assert!(
            agent.stderr().contains("XDP guard settings reloaded"),
            "no reload log line"
        );

        // An invalid file is rejected with its reason; the guard keeps the last good list.
        cfg.rewrite("guard:\n  enabled: true\n  allow_cidrs: [10.231.1.1/8]\n");
        let start = Instant::now();
        while !agent
            .stderr()
            .contains("rejected agent configuration reload")
        {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "an invalid agent config was not reported"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            agent
                .stderr()
                .contains("guard.allow_cidrs[0]: 10.231.1.1/8 has bits set after its /8 prefix"),
            "{}",
            agent.stderr()
        );
        assert_connects(&topo.client, CLIENT_V4.into(), agent.addr()).await;

        drop(agent);
        assert!(
            !xdp_attached(&topo.ingress, "to-client"),
            "the XDP program is still attached after the agent exited"
        );
    })
    .await
}

/// Sends `total` SYNs from `src` (fresh source port each) to the listener, paced at about
/// 4000/s, on a blocking thread; resolves to the seconds it took.
async fn syn_flood(topo: &Topology, src: IpAddr, dst: IpAddr, total: usize) -> f64 {
    let src_mac = flood::mac_of(&topo.client, "to-ingress");
    let dst_mac = flood::mac_of(&topo.ingress, "to-client");
    let frames: Vec<Vec<u8>> = (0..total)
        .map(|i| {
            flood::syn_frame(
                src_mac,
                dst_mac,
                src,
                20000 + (i % 40000) as u16,
                dst,
                INGRESS_PORT,
            )
        })
        .collect();
    let sender = FrameSender::open(&topo.client, "to-ingress");
    let (sent, took) = tokio::task::spawn_blocking(move || {
        sender.paced(
            &frames,
            total,
            20,
            Duration::from_millis(5),
            Duration::from_secs(20),
        )
    })
    .await
    .expect("the flood thread panicked");
    assert_eq!(sent, total, "the flood could not send every frame");
    took.as_secs_f64()
}

/// Checks that of `total` SYNs sent over `secs`, the guard let through what a bucket of `rate`
/// per second and `burst` allows: at least the burst, at most burst + rate * secs (+ slack for
/// the time between the flood's start and end being measured on two clocks).
fn assert_held(what: &str, dropped: f64, total: usize, secs: f64, rate: f64, burst: f64) {
    let passed = total as f64 - dropped;
    let max = burst + rate * (secs + 0.1) + 2.0;
    eprintln!("{what}: {passed} of {total} SYNs passed in {secs:.2} s (allowed {burst}..{max:.0})");
    assert!(
        passed >= burst && passed <= max,
        "{what}: {passed} of {total} SYNs passed in {secs:.2} s; a bucket of {rate}/s, burst \
         {burst} allows between {burst} and {max:.0}"
    );
}

/// A SYN flood from one source is held to its rate while a second source connects at once; the
/// same for IPv6. Runs next to the kernel splice (--datapath auto): two program sets of one
/// object side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syn_flood_is_held_to_its_rate_while_another_source_connects() {
    run_test(Duration::from_secs(90), async {
        let topo = Topology::new();
        add_client_addresses(&topo);
        let (rate, burst) = (100.0, 20.0);
        let cfg = AgentConfig::new(
            "guard:\n  enabled: true\n  syn_rate: 100\n  syn_burst: 20\n  global_syn_rate: 100000\n",
        );
        let agent = Agent::start(&topo.ingress, &[], cfg.options(Datapath::Auto)).await;
        let v6_addr = SocketAddr::new(INGRESS_V6.into(), INGRESS_PORT);
        let _v6_listener = topo.ingress.listen(v6_addr).await;

        let total = 4000;
        let flood = syn_flood(&topo, FLOOD_V4.into(), INGRESS_V4.into(), total);
        // The second source connects while the flood runs, and at once (no SYN retransmit).
        let second = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_connects(&topo.client, CLIENT2_V4.into(), agent.addr()).await
        };
        let (secs, took) = tokio::join!(flood, second);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            took < Duration::from_millis(500),
            "a second source took {took:?} to connect during the flood (a dropped SYN costs 1 s)"
        );
        let m = agent.metrics().await;
        assert_held("IPv4 flood", guard_dropped(&m, "syn_rate"), total, secs, rate, burst);
        assert_eq!(guard_dropped(&m, "global_syn_rate"), 0.0, "{}", m.dump("zone_ingress_guard"));
        let dump = dump_json(agent.pin_dir());
        assert!(
            dump["tracked_sources"].as_u64() >= Some(2),
            "the flood source and the second client are tracked: {dump}"
        );

        let before = guard_dropped(&m, "syn_rate");
        let total6 = 2000;
        let secs6 = syn_flood(&topo, FLOOD_V6.into(), INGRESS_V6.into(), total6).await;
        let took6 = assert_connects(&topo.client, CLIENT2_V6.into(), v6_addr).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(took6 < Duration::from_millis(500), "IPv6 second source took {took6:?}");
        let m = agent.metrics().await;
        assert_held(
            "IPv6 flood",
            guard_dropped(&m, "syn_rate") - before,
            total6,
            secs6,
            rate,
            burst,
        );
    })
    .await
}

/// The global SYN ceiling holds many sources together; truncated headers to the listener are
/// passed and counted as malformed; SYNs to other ports are not counted at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_ceiling_and_malformed_headers() {
    run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let cfg = AgentConfig::new(
            "guard:\n  enabled: true\n  global_syn_rate: 200\n  global_syn_burst: 50\n",
        );
        let agent = Agent::start(&topo.ingress, &[], cfg.options(Datapath::Userspace)).await;
        let src_mac = flood::mac_of(&topo.client, "to-ingress");
        let dst_mac = flood::mac_of(&topo.ingress, "to-client");
        let dst = IpAddr::from(INGRESS_V4);
        // 1000 SYNs from 100 sources: each source stays far under any per-source limit.
        let total = 1000;
        let frames: Vec<Vec<u8>> = (0..total)
            .map(|i| {
                let src = IpAddr::from(Ipv4Addr::new(10, 231, 1, 100 + (i % 100) as u8));
                flood::syn_frame(src_mac, dst_mac, src, 30000 + i as u16, dst, INGRESS_PORT)
            })
            .collect();
        let sender = FrameSender::open(&topo.client, "to-ingress");
        let (sent, took) = tokio::task::block_in_place(|| {
            sender.paced(
                &frames,
                total,
                20,
                Duration::from_millis(5),
                Duration::from_secs(20),
            )
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sent, total);
        let m = agent.metrics().await;
        assert_held(
            "global ceiling",
            guard_dropped(&m, "global_syn_rate"),
            total,
            took.as_secs_f64(),
            200.0,
            50.0,
        );
        assert_eq!(guard_dropped(&m, "syn_rate"), 0.0);

        let passed_before = m.get("zone_ingress_guard_passed_total", &[]);
        for _ in 0..10 {
            sender
                .send(&flood::truncated_tcp_frame(
                    src_mac,
                    dst_mac,
                    CLIENT_V4.into(),
                    dst,
                    INGRESS_PORT,
                ))
                .expect("send a truncated frame");
        }
        // SYNs to another port: not the guard's business, not counted.
        for i in 0..10 {
            sender
                .send(&flood::syn_frame(
                    src_mac,
                    dst_mac,
                    CLIENT_V4.into(),
                    40000 + i,
                    dst,
                    INGRESS_PORT + 7,
                ))
                .expect("send a SYN to another port");
        }
        let m = agent
            .metrics_until(Duration::from_secs(3), |m| {
                m.get("zone_ingress_guard_malformed_total", &[]) >= 10.0
            })
            .await;
        assert_eq!(
            m.get("zone_ingress_guard_malformed_total", &[]),
            10.0,
            "{}",
            m.dump("zone_ingress_guard")
        );
        assert_eq!(
            m.get("zone_ingress_guard_passed_total", &[]),
            passed_before,
            "SYNs to another port were counted as the listener's"
        );
    })
    .await
}

/// A guard that cannot find its interface stops the agent with a clear error, and an invalid
/// agent configuration is refused with `FILE: FIELD: problem; fix` lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_errors_are_clear() {
    run_test(Duration::from_secs(30), async {
        let topo = Topology::new();
        let cfg = AgentConfig::new("guard:\n  enabled: true\n  interface: zi-nope0\n");
        let config = tempfile::Builder::new()
            .prefix("zi-guard-")
            .tempdir()
            .unwrap();
        let zi = config.path().join("zi.yaml");
        std::fs::write(&zi, agent::zone_ingress_yaml()).unwrap();
        let routes = config.path().join("routes.yaml");
        std::fs::write(&routes, "routes: []\n").unwrap();
        let pin_dir = format!(
            "/sys/fs/bpf/zi-test-{}-guard",
            zone_ingress_tests::unique_suffix()
        );
        let run = |agent_config: &Path| {
            topo.ingress
                .command(agent::binary())
                .args(["run", "--datapath", "userspace", "--config"])
                .arg(&zi)
                .arg("--routes")
                .arg(&routes)
                .args(["--pin-dir", &pin_dir, "--agent-config"])
                .arg(agent_config)
                .output()
                .expect("run the agent")
        };
        let out = run(&cfg.path);
        let _ = std::fs::remove_dir_all(&pin_dir);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "the agent ran without its guard: {err}"
        );
        assert!(err.contains("zi-nope0"), "{err}");

        cfg.rewrite("guard:\n  enabled: maybe\n  syn_burst: 3\n");
        let out = run(&cfg.path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        let file = cfg.path.display().to_string();
        for line in [
            format!("{file}: guard.enabled: expected true or false"),
            format!("{file}: guard.syn_burst: has no effect without syn_rate; set syn_rate"),
        ] {
            assert!(err.contains(&line), "missing {line:?} in:\n{err}");
        }

        let out = Command::new(agent::binary())
            .args([
                "maps",
                "dump",
                "guard",
                "--pin-dir",
                "/sys/fs/bpf/zi-test-no-such-dir",
            ])
            .output()
            .expect("run maps dump guard");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("zi-test-no-such-dir: no such directory"),
            "{err}"
        );
    })
    .await
}

/// A hot restart with the guard on: the new agent takes the running agent's XDP attachment over
/// (its own program replaces the old one on the interface, with no moment unguarded), the old
/// agent exits, and the allow-list still holds, now enforced and counted by the new agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_survives_a_hot_restart() {
    run_test(Duration::from_secs(90), async {
        let topo = Topology::new();
        add_client_addresses(&topo);
        let backend =
            Backend::start(&topo.backend, Topology::backend_addr(8443), Behaviour::Echo).await;
        let cfg = AgentConfig::new(&format!(
            "guard:\n  enabled: true\n  allow_cidrs: [\"{CLIENT2_V4}/32\"]\n"
        ));
        let mut old = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend.addr])],
            cfg.options(Datapath::Sockmap),
        )
        .await;
        assert!(xdp_attached(&topo.ingress, "to-client"));
        assert_blocked(&topo.client, CLIENT_V4.into(), old.addr()).await;

        let mut new = old.upgrade();
        let status = old.wait_exit(Duration::from_secs(20)).await;
        assert!(status.success(), "the old agent exited with {status}");
        new.wait_ready(Duration::from_secs(10)).await;
        let log = new.stderr();
        assert!(
            log.contains("hot restart: took over"),
            "the new agent did not take over:\n{log}"
        );
        assert!(
            log.contains("took over the running agent's XDP attachment"),
            "the new agent attached its guard another way:\n{log}"
        );
        assert!(
            xdp_attached(&topo.ingress, "to-client"),
            "no XDP program on to-client after the old agent exited"
        );
        assert_blocked(&topo.client, CLIENT_V4.into(), new.addr()).await;
        assert_connects(&topo.client, CLIENT2_V4.into(), new.addr()).await;
        let m = new.metrics().await;
        assert_eq!(m.get("zone_ingress_guard_attached", &[]), 1.0);
        assert!(
            guard_dropped(&m, "allow_list") >= 1.0,
            "the new agent's program did not count the drop:\n{}",
            m.dump("zone_ingress_guard")
        );
        drop(new);
        let start = Instant::now();
        while xdp_attached(&topo.ingress, "to-client") && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !xdp_attached(&topo.ingress, "to-client"),
            "the XDP program stayed on to-client after the last agent exited"
        );
    })
    .await;
}
