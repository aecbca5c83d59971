//! Hot restart (`zone-ingress run --upgrade`): live spliced flows keep moving verified bytes and
//! a client keeps opening connections while the agent is replaced several times in a row.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::path::Path;

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use zone_ingress_common::{FlowCtrl, FlowInfo, FlowSide, map_names};
use zone_ingress_tests::agent::{Agent, Datapath, Detached, Options, Route};
use zone_ingress_tests::netns::Topology;
use zone_ingress_tests::pki::SNI_BACKEND;
use zone_ingress_tests::run_test;
use zone_ingress_tests::tls::{self, Backend, Behaviour};

const BACKEND_PORT: u16 = 8443;
const FLOWS: usize = 100;
const UPGRADES: usize = 10;

/// The keys of a pinned `u64 -> V` hash map.
fn keys<V: aya::Pod>(pin_dir: &Path, name: &str) -> Vec<u64> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let map = Map::from_map_data(data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let h: BpfHashMap<MapData, u64, V> =
        BpfHashMap::try_from(map).unwrap_or_else(|e| panic!("{name}: {e}"));
    h.keys()
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("iterate {name}: {e}"))
}

/// The `adopted=N` of the new agent's takeover log line.
fn adopted(log: &str) -> Option<u64> {
    let line = log
        .lines()
        .find(|l| l.contains("took over the running agent's spliced flows"))?;
    let rest = &line[line.find("adopted=")? + "adopted=".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrades_keep_every_flow_and_refuse_no_connection() {
    run_test(Duration::from_secs(120), async {
        let topo = Topology::new();
        let _backend = Backend::start(
            &topo.backend,
            Topology::backend_addr(BACKEND_PORT),
            Behaviour::Echo,
        )
        .await;
        let mut opts = Options::new(Datapath::Sockmap);
        opts.extra_args = vec!["--drain-time".into(), "5s".into()];
        let first = Agent::start(
            &topo.ingress,
            &[Route::new(
                SNI_BACKEND,
                &[Topology::backend_addr(BACKEND_PORT)],
            )],
            opts,
        )
        .await;
        let addr = first.addr();
        let stop = Arc::new(AtomicBool::new(false));
        let moved = Arc::new(AtomicU64::new(0));

        // Live flows: each echoes numbered 4 KiB messages and checks every byte that comes back.
        let mut flows = JoinSet::new();
        for i in 0..FLOWS {
            let mut s = tls::connect(&topo.client, addr, SNI_BACKEND)
                .await
                .unwrap_or_else(|e| panic!("flow {i}: connect: {e}"));
            let (stop, moved) = (stop.clone(), moved.clone());
            flows.spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let msg: Vec<u8> = (0..4096u64)
                        .map(|k| (k.wrapping_mul(31) ^ n ^ i as u64) as u8)
                        .collect();
                    if let Err(e) = tls::echo_roundtrip(&mut s, &msg).await {
                        return Err(format!("flow {i}, message {n}: {e}"));
                    }
                    moved.fetch_add(msg.len() as u64, Ordering::Relaxed);
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                // A clean end: our FIN reaches the backend, its FIN comes back.
                s.shutdown().await.map_err(|e| format!("flow {i}: shutdown: {e}"))?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest)
                    .await
                    .map_err(|e| format!("flow {i}: reading to EOF: {e}"))?;
                Ok(n)
            });
        }

        // New connections in a loop, each a full TLS echo.
        let attempts = Arc::new(AtomicU64::new(0));
        let client = {
            let (stop, attempts) = (stop.clone(), attempts.clone());
            let ns = &topo.client;
            let connect = move || tls::connect(ns, addr, SNI_BACKEND);
            let mut failures = Vec::new();
            async move {
                while !stop.load(Ordering::Relaxed) && attempts.load(Ordering::Relaxed) < 100_000 {
                    let k = attempts.fetch_add(1, Ordering::Relaxed);
                    let r = async {
                        let mut s = connect().await?;
                        tls::echo_roundtrip(&mut s, format!("attempt {k}").as_bytes()).await?;
                        s.shutdown().await
                    };
                    if let Err(e) = tokio::time::timeout(Duration::from_secs(5), r)
                        .await
                        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
                    {
                        failures.push(format!("attempt {k}: {e}"));
                    }
                }
                failures
            }
        };
        let upgrades = async {
            let mut agents = vec![first];
            let start = Instant::now();
            for u in 0..UPGRADES {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let old_pid = agents.last().expect("an agent").pid();
                let mut new = agents.last_mut().expect("an agent").upgrade();
                let status = agents
                    .last_mut()
                    .expect("an agent")
                    .wait_exit(Duration::from_secs(15))
                    .await;
                assert!(
                    status.success(),
                    "upgrade {u}: the old agent {old_pid} exited with {status}"
                );
                new.wait_ready(Duration::from_secs(10)).await;
                let log = new.stderr();
                let n = adopted(&log).unwrap_or_else(|| {
                    panic!("upgrade {u}: the new agent logged no takeover:\n{log}")
                });
                assert!(
                    n >= FLOWS as u64,
                    "upgrade {u}: the new agent adopted {n} spliced flows, expected at least {FLOWS}"
                );
                agents.push(new);
            }
            (agents, start.elapsed())
        };
        let (client_failures, (mut agents, took)) = tokio::join!(
            client,
            async {
                let r = upgrades.await;
                stop.store(true, Ordering::Relaxed);
                r
            }
        );
        let mut messages = 0;
        while let Some(r) = flows.join_next().await {
            match r.expect("flow task") {
                Ok(n) => messages += n,
                Err(e) => panic!("a live flow broke across the upgrades: {e}"),
            }
        }
        assert!(
            client_failures.is_empty(),
            "{} of {} connection attempts failed during the upgrades: {:?}",
            client_failures.len(),
            attempts.load(Ordering::Relaxed),
            &client_failures[..client_failures.len().min(10)]
        );
        assert!(
            attempts.load(Ordering::Relaxed) > UPGRADES as u64,
            "the client made too few attempts to mean anything"
        );
        let mut last = agents.pop().expect("an agent");
        assert!(last.is_running(), "the last agent exited");
        // New flows on the last agent are spliced (its programs are attached to the reused
        // SockHash) and copy no payload through userspace.
        const AFTER: u64 = 20;
        for k in 0..AFTER {
            let mut s = tls::connect(&topo.client, addr, SNI_BACKEND)
                .await
                .unwrap_or_else(|e| panic!("connection {k} after the upgrades: {e}"));
            tls::echo_roundtrip(&mut s, &[7u8; 32 * 1024])
                .await
                .unwrap_or_else(|e| panic!("connection {k} after the upgrades: {e}"));
            s.shutdown().await.expect("shutdown");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.expect("EOF after shutdown");
        }
        let m = last
            .metrics_until(Duration::from_secs(10), |m| {
                m.get("zone_ingress_downstream_cx_active", &[]) == 0.0
            })
            .await;
        assert_eq!(
            m.get("zone_ingress_downstream_cx_active", &[]),
            0.0,
            "flows still open on the last agent:\n{}",
            m.dump("zone_ingress")
        );
        let spliced = m.get("zone_ingress_flows_total", &[("datapath", "sockmap")]);
        let copied = m.get(
            "zone_ingress_userspace_copied_bytes_total",
            &[("datapath", "sockmap")],
        );
        assert!(
            spliced >= AFTER as f64,
            "the last agent spliced {spliced} flows, expected at least {AFTER}:\n{}",
            m.dump("zone_ingress")
        );
        assert_eq!(
            m.get("zone_ingress_flows_total", &[("datapath", "userspace")]),
            0.0,
            "flows took the userspace copy:\n{}",
            m.dump("zone_ingress")
        );
        assert!(
            copied < spliced * 4096.0,
            "{copied} bytes copied through userspace for {spliced} spliced flows: more than their ClientHellos"
        );
        assert_eq!(
            m.get("zone_ingress_splice_integrity_errors_total", &[]),
            0.0,
            "integrity errors on the last agent"
        );
        // Every flow ended, in whichever agent: no entry is left in the per-flow maps.
        let pins = last.pin_dir().to_path_buf();
        let left = [
            (map_names::FLOWS, keys::<FlowSide>(&pins, map_names::FLOWS)),
            (map_names::CTRL, keys::<FlowCtrl>(&pins, map_names::CTRL)),
            (map_names::FLOW_INFO, keys::<FlowInfo>(&pins, map_names::FLOW_INFO)),
        ];
        for (name, keys) in left {
            assert!(
                keys.is_empty(),
                "{name} still has {} entries after every flow ended: {keys:?}",
                keys.len()
            );
        }
        for (i, a) in agents.iter().chain(std::iter::once(&last)).enumerate() {
            let log = a.stderr();
            for bad in ["integrity check failed", "cannot adopt", "hot restart failed", "hot restart incomplete"] {
                assert!(!log.contains(bad), "agent {i} logged {bad:?}:\n{log}");
            }
        }
        let mut old_running = 0;
        for a in agents.iter_mut() {
            old_running += usize::from(a.is_running());
        }
        assert_eq!(old_running, 0, "old agents still running");
        eprintln!(
            "{UPGRADES} upgrades in {took:?}; {FLOWS} flows echoed {messages} messages ({} bytes), \
             {} new connections, none refused",
            moved.load(Ordering::Relaxed),
            attempts.load(Ordering::Relaxed)
        );
    })
    .await;
}

/// A running agent whose pinned maps do not match the new version's layout (here: `ZI_CTRL`
/// replaced by a map with another value size, as a changed `FlowCtrl` would look): the new agent
/// says so, takes only the sockets, and the old agent drains its flows (a drain-based restart).
/// No connection attempt is refused, live flows end with a clean FIN after intact bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incompatible_maps_fall_back_to_a_drain() {
    run_test(Duration::from_secs(90), async {
        const LIVE: usize = 10;
        let topo = Topology::new();
        let _backend = Backend::start(
            &topo.backend,
            Topology::backend_addr(BACKEND_PORT),
            Behaviour::Echo,
        )
        .await;
        let mut opts = Options::new(Datapath::Sockmap);
        opts.extra_args = vec!["--drain-time".into(), "2s".into()];
        let mut old = Agent::start(
            &topo.ingress,
            &[Route::new(
                SNI_BACKEND,
                &[Topology::backend_addr(BACKEND_PORT)],
            )],
            opts,
        )
        .await;
        let addr = old.addr();
        let ctrl = old.pin_dir().join(map_names::CTRL);
        std::fs::remove_file(&ctrl).expect("remove the ZI_CTRL pin");
        let out = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(&ctrl)
            .args(["type", "hash", "key", "8", "value", "24", "entries", "64", "name", "ZI_CTRL"])
            .output()
            .expect("run bpftool (cargo xtask test installs it)");
        assert!(
            out.status.success(),
            "bpftool map create: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let stop = Arc::new(AtomicBool::new(false));
        // Set once the new agent took over: the live flows stop writing and wait for the old
        // agent's drain to end them.
        let quiet = Arc::new(AtomicBool::new(false));
        let mut flows = JoinSet::new();
        for i in 0..LIVE {
            let mut s = tls::connect(&topo.client, addr, SNI_BACKEND)
                .await
                .unwrap_or_else(|e| panic!("flow {i}: connect: {e}"));
            let quiet = quiet.clone();
            flows.spawn(async move {
                let mut n = 0u64;
                while !quiet.load(Ordering::Relaxed) {
                    let msg: Vec<u8> = (0..4096u64).map(|k| (k ^ n ^ i as u64) as u8).collect();
                    if let Err(e) = tls::echo_roundtrip(&mut s, &msg).await {
                        return Err(format!("flow {i}, message {n}: {e}"));
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                // The drain ends the flow with a FIN (the TLS layer sees EOF without
                // close_notify), never a reset.
                let mut rest = Vec::new();
                match s.get_mut().0.read_to_end(&mut rest).await {
                    Ok(_) if rest.is_empty() => Ok(n),
                    Ok(_) => Err(format!("flow {i}: {} unexpected bytes before EOF", rest.len())),
                    Err(e) => Err(format!("flow {i}: waiting for the drain's FIN: {e}")),
                }
            });
        }
        let attempts = Arc::new(AtomicU64::new(0));
        let client = {
            let (stop, attempts) = (stop.clone(), attempts.clone());
            let ns = &topo.client;
            async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) && attempts.load(Ordering::Relaxed) < 100_000 {
                    let k = attempts.fetch_add(1, Ordering::Relaxed);
                    let r = async {
                        let mut s = tls::connect(ns, addr, SNI_BACKEND).await?;
                        tls::echo_roundtrip(&mut s, format!("attempt {k}").as_bytes()).await
                    };
                    if let Err(e) = tokio::time::timeout(Duration::from_secs(5), r)
                        .await
                        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
                    {
                        failures.push(format!("attempt {k}: {e}"));
                    }
                }
                failures
            }
        };
        let upgrade = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut new = old.upgrade();
            let start = Instant::now();
            while !new.stderr().contains("hot restart: took over") {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "the new agent did not take over:\n{}",
                    new.stderr()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            quiet.store(true, Ordering::Relaxed);
            let status = old.wait_exit(Duration::from_secs(15)).await;
            assert!(status.success(), "the old agent exited with {status}");
            new.wait_ready(Duration::from_secs(10)).await;
            stop.store(true, Ordering::Relaxed);
            new
        };
        let (failures, new) = tokio::join!(client, upgrade);
        let mut messages = 0;
        while let Some(r) = flows.join_next().await {
            match r.expect("flow task") {
                Ok(n) => messages += n,
                Err(e) => panic!("a live flow broke in the drain-based restart: {e}"),
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} connection attempts failed: {:?}",
            failures.len(),
            attempts.load(Ordering::Relaxed),
            &failures[..failures.len().min(10)]
        );
        let log = new.stderr();
        assert!(
            log.contains("BPF maps differ from this version's") && log.contains(map_names::CTRL),
            "the new agent did not say the maps differ:\n{log}"
        );
        assert!(
            adopted(&log).is_none(),
            "the new agent adopted flows from incompatible maps:\n{log}"
        );
        let old_log = old.stderr();
        assert!(
            old_log.contains("hot restart done"),
            "the old agent did not hand over its sockets:\n{old_log}"
        );
        // The new agent splices on its fresh maps.
        let mut s = tls::connect(&topo.client, addr, SNI_BACKEND)
            .await
            .expect("connect after the restart");
        tls::echo_roundtrip(&mut s, b"after").await.expect("echo after the restart");
        drop(s);
        let m = new
            .metrics_until(Duration::from_secs(5), |m| {
                m.get("zone_ingress_flows_total", &[("datapath", "sockmap")]) >= 1.0
            })
            .await;
        assert!(
            m.get("zone_ingress_flows_total", &[("datapath", "sockmap")]) >= 1.0,
            "the new agent spliced nothing:\n{}",
            m.dump("zone_ingress")
        );
        eprintln!(
            "drain-based restart: {LIVE} flows echoed {messages} messages and ended with a FIN; {} connection attempts, none refused",
            attempts.load(Ordering::Relaxed)
        );
    })
    .await;
}

/// Reads `$NOTIFY_SOCKET` datagrams until one contains `want`, at most `limit`; returns it.
fn notification(sock: &std::os::unix::net::UnixDatagram, want: &str, limit: Duration) -> String {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < limit {
        let mut buf = [0u8; 1024];
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.contains(want) {
                    return msg;
                }
                seen.push(msg);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading the notify socket: {e}"),
        }
    }
    panic!("no {want:?} notification within {limit:?}; got {seen:?}");
}

/// systemd's reload path (`ExecReload=zone-ingress run --upgrade --detach ...`, `Type=notify`,
/// `NotifyAccess=all`): the first agent says READY=1; the upgrade command returns 0 once the new
/// agent took over; the new agent says MAINPID=<its pid> before the old one exits; spliced flows
/// keep moving verified bytes across it and new connections reach the new agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn detached_upgrade_tells_the_service_manager() {
    run_test(Duration::from_secs(90), async {
        const LIVE: usize = 8;
        let topo = Topology::new();
        let _backend = Backend::start(
            &topo.backend,
            Topology::backend_addr(BACKEND_PORT),
            Behaviour::Echo,
        )
        .await;
        let notify_dir = tempfile::tempdir().expect("temp dir");
        let notify_path = notify_dir.path().join("notify.sock");
        let notify =
            std::os::unix::net::UnixDatagram::bind(&notify_path).expect("bind the notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("notify socket timeout");
        let env = vec![(
            "NOTIFY_SOCKET".to_string(),
            notify_path.to_string_lossy().into_owned(),
        )];
        let mut opts = Options::new(Datapath::Sockmap);
        opts.extra_args = vec!["--drain-time".into(), "5s".into()];
        opts.env = env.clone();
        let mut first = Agent::start(
            &topo.ingress,
            &[Route::new(
                SNI_BACKEND,
                &[Topology::backend_addr(BACKEND_PORT)],
            )],
            opts,
        )
        .await;
        let ready = notification(&notify, "READY=1", Duration::from_secs(10));
        assert!(
            !ready.contains("MAINPID"),
            "a first start must not claim a main pid: {ready:?}"
        );
        let addr = first.addr();
        let mut live = Vec::new();
        for i in 0..LIVE {
            let mut s = tls::connect(&topo.client, addr, SNI_BACKEND)
                .await
                .unwrap_or_else(|e| panic!("flow {i}: connect: {e}"));
            tls::echo_roundtrip(&mut s, &[i as u8; 16 * 1024])
                .await
                .unwrap_or_else(|e| panic!("flow {i} before the upgrade: {e}"));
            live.push(s);
        }

        let old_pid = first.pid();
        let (status, log_path) = first.run_detached_upgrade(&env, Duration::from_secs(60));
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        assert!(
            status.success(),
            "`run --upgrade --detach` exited with {status}:\n{log}"
        );
        let msg = notification(&notify, "MAINPID=", Duration::from_secs(5));
        let new_pid: u32 = msg
            .lines()
            .find_map(|l| l.strip_prefix("MAINPID="))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("unparsable MAINPID notification {msg:?}"));
        let new = Detached {
            pid: new_pid,
            pin_dir: first.pin_dir().to_path_buf(),
        };
        assert!(msg.contains("READY=1"), "MAINPID without READY=1: {msg:?}");
        assert_ne!(new_pid, old_pid, "MAINPID names the old agent");
        assert!(
            new.is_running(),
            "the new agent {new_pid} is not running:\n{log}"
        );
        assert!(
            log.contains(&format!("the new agent (pid {new_pid}) took over")),
            "the upgrade command did not report the new agent {new_pid}:\n{log}"
        );
        let status = first.wait_exit(Duration::from_secs(15)).await;
        assert!(status.success(), "the old agent exited with {status}");
        assert_eq!(
            adopted(&log),
            Some(LIVE as u64),
            "the new agent did not adopt every spliced flow:\n{log}"
        );

        // The flows it adopted still move verified bytes, and end cleanly.
        for (i, s) in live.iter_mut().enumerate() {
            tls::echo_roundtrip(s, &[0x5a ^ i as u8; 64 * 1024])
                .await
                .unwrap_or_else(|e| panic!("flow {i} after the upgrade: {e}"));
            s.shutdown().await.expect("shutdown");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.expect("EOF after shutdown");
        }
        // New connections reach the new agent (the old one exited).
        let mut s = tls::connect(&topo.client, addr, SNI_BACKEND)
            .await
            .expect("a new connection after the upgrade");
        tls::echo_roundtrip(&mut s, b"after the upgrade")
            .await
            .expect("echo through the new agent");
        drop(s);
        drop(new);
    })
    .await;
}

/// A reload with no agent to take over fails fast with the reason, and starts nothing that stays.
#[tokio::test]
async fn detached_upgrade_without_a_running_agent_fails() {
    run_test(Duration::from_secs(30), async {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = std::process::Command::new(zone_ingress_tests::agent::binary())
            .args([
                "run",
                "--datapath",
                "userspace",
                "--upgrade",
                "--detach",
                "--handoff-socket",
            ])
            .arg(dir.path().join("nobody.sock"))
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run zone-ingress");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
        assert!(
            stderr.contains("upgrade failed: the new agent")
                && stderr.contains("ended before taking over (exit code 1)")
                && stderr.contains("the running agent keeps serving"),
            "unexpected message:\n{stderr}"
        );
        assert!(
            stderr.contains("--upgrade: the handoff with the running agent failed"),
            "the new agent's own reason is missing:\n{stderr}"
        );
    })
    .await;
}
