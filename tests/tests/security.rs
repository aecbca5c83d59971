//! Least privilege and exposure, with the real agent in namespaces.
//!
//! - The agent needs CAP_BPF + CAP_NET_ADMIN for the kernel splice: `--datapath sockmap` without one
//!   refuses to start and names it, `auto` falls back to the userspace copy and says which one.
//! - Once its programs are loaded it drops CAP_BPF (and CAP_SYS_ADMIN, CAP_PERFMON) from every
//!   thread, and flows still splice. CAP_NET_ADMIN stays: the splice sets `SO_SNDBUFFORCE` on
//!   its sockets.
//! - The admin API (`/config_dump`, `/stats/prometheus`) answers on 127.0.0.1 of the agent's namespace
//!   only; another namespace dialing `networking.address` on the admin port gets `/ready` and nothing
//!   else.
//!
//! Capability sets are set with `setpriv --bounding-set` (util-linux): as uid 0 the agent then holds
//! exactly that set.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use zone_ingress_tests::agent::{ADMIN_PORT, Agent, Datapath, Metrics, Options, Route, http_get};
use zone_ingress_tests::netns::{INGRESS_V4, Topology};
use zone_ingress_tests::pki::SNI_BACKEND;
use zone_ingress_tests::run_test;
use zone_ingress_tests::tls::{self, Backend, Behaviour};

const BACKEND_PORT: u16 = 8443;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn bpf_family() -> u64 {
    [CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF]
        .iter()
        .map(|c| 1u64 << c)
        .sum()
}

/// `(tid, CapEff | CapPrm)` of every thread of `pid`.
fn thread_caps(pid: u32) -> Vec<(String, u64)> {
    let dir = format!("/proc/{pid}/task");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("list {dir}: {e}"))
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_string_lossy().into_owned();
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let hex = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(|v| u64::from_str_radix(v.trim(), 16).expect("a hex capability mask"))
                    .unwrap_or_else(|| panic!("no {key} in {dir}/{tid}/status"))
            };
            let caps = hex("CapEff:") | hex("CapPrm:");
            Some((tid, caps))
        })
        .collect()
}

/// Moves one spliced-or-copied mTLS flow (256 KiB echoed) and returns the metrics after it.
async fn one_flow(topo: &Topology, agent: &Agent<'_>, backend: &mut Backend) -> Metrics {
    let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("mTLS handshake through the agent");
    let msg: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 + 3) as u8).collect();
    tls::echo_roundtrip(&mut s, &msg)
        .await
        .expect("256 KiB echoed intact through the agent");
    // close_notify, so the backend sees a clean end.
    s.shutdown().await.expect("TLS shutdown");
    drop(s);
    let outcome = backend.outcome(Duration::from_secs(10)).await;
    assert_eq!(outcome.sni.as_deref(), Some(SNI_BACKEND));
    assert!(outcome.error.is_none(), "backend: {:?}", outcome.error);
    agent
        .metrics_until(Duration::from_secs(5), |m| {
            m.get("zone_ingress_downstream_cx_active", &[]) == 0.0
        })
        .await
}

/// `--datapath sockmap` without one of CAP_BPF / CAP_NET_ADMIN: exits non-zero, naming it.
async fn sockmap_refuses_without(set: &'static str, cap: &'static str) {
    let topo = Topology::new();
    let backend = Backend::start(
        &topo.backend,
        Topology::backend_addr(BACKEND_PORT),
        Behaviour::Echo,
    )
    .await;
    let mut agent = Agent::start_no_wait(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[backend.addr])],
        Options::new(Datapath::Sockmap).bounding_set(set),
    );
    let status = agent.wait_exit(Duration::from_secs(15)).await;
    let log = agent.stderr();
    assert!(
        !status.success(),
        "without {cap} `--datapath sockmap` must refuse to start; it exited with {status}:\n{log}"
    );
    assert!(
        log.contains(&format!("missing {cap}")) && log.contains("--datapath userspace"),
        "the refusal must name the missing capability ({cap}) and the way out; log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockmap_refuses_to_start_without_cap_net_admin() {
    run_test(
        Duration::from_secs(60),
        sockmap_refuses_without("-net_admin,-sys_admin", "CAP_NET_ADMIN"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockmap_refuses_to_start_without_cap_bpf() {
    run_test(
        Duration::from_secs(60),
        sockmap_refuses_without("-bpf,-sys_admin", "CAP_BPF"),
    )
    .await
}

/// `--datapath auto` without CAP_NET_ADMIN: starts, says which capability was missing, and copies the
/// flow in userspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_userspace_naming_the_missing_capability() {
    run_test(Duration::from_secs(60), async {
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
            Options::new(Datapath::Auto).bounding_set("-net_admin,-sys_admin"),
        )
        .await;
        let log = agent.stderr();
        assert!(
            log.contains("using the userspace copy") && log.contains("missing CAP_NET_ADMIN"),
            "auto without CAP_NET_ADMIN must say it falls back and why; log:\n{log}"
        );
        let m = one_flow(&topo, &agent, &mut backend).await;
        assert_eq!(
            (
                m.get("zone_ingress_flows_total", &[("datapath", "userspace")]),
                m.get("zone_ingress_flows_total", &[("datapath", "sockmap")])
            ),
            (1.0, 0.0),
            "{}",
            m.dump("zone_ingress_flows")
        );
    })
    .await
}

/// With exactly CAP_BPF + CAP_NET_ADMIN the agent loads, then drops CAP_BPF from every thread, and
/// the next flows are still spliced (map updates and SockHash inserts on the fds it holds do not need
/// it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_cap_bpf_after_loading_and_still_splices() {
    run_test(Duration::from_secs(60), async {
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
            Options::new(Datapath::Sockmap).bounding_set("-all,+bpf,+net_admin"),
        )
        .await;
        let threads = thread_caps(agent.pid());
        assert!(threads.len() > 1, "the agent runs several threads");
        let other: Vec<_> = threads
            .iter()
            .filter(|(_, c)| *c != 1u64 << CAP_NET_ADMIN)
            .collect();
        assert!(
            other.is_empty(),
            "after loading, every thread must hold CAP_NET_ADMIN alone (tid, CapEff|CapPrm): {other:?}\n{}",
            agent.stderr()
        );
        let log = agent.stderr();
        assert!(
            log.contains("dropped capabilities") && log.contains("dropped=CAP_BPF kept=CAP_NET_ADMIN"),
            "the agent must say what it dropped and kept; log:\n{log}"
        );
        for n in 1..=3 {
            let m = one_flow(&topo, &agent, &mut backend).await;
            assert_eq!(
                m.get("zone_ingress_flows_total", &[("datapath", "sockmap")]),
                f64::from(n),
                "flow {n} after the drop was not spliced:\n{}",
                m.dump("zone_ingress_")
            );
            assert_eq!(m.sum("zone_ingress_splice_fallbacks_total"), 0.0);
        }
    })
    .await
}

/// A root agent with every capability keeps them with `--keep-capabilities`, and drops CAP_BPF,
/// CAP_SYS_ADMIN and CAP_PERFMON without it (not the others: it may still need e.g. CAP_DAC_OVERRIDE to re-read a token file) without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_agent_drops_only_the_bpf_capabilities_unless_told_to_keep() {
    run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let backend = Backend::start(
            &topo.backend,
            Topology::backend_addr(BACKEND_PORT),
            Behaviour::Echo,
        )
        .await;
        let routes = [Route::new(SNI_BACKEND, &[backend.addr])];
        let agent = Agent::start(&topo.ingress, &routes, Options::new(Datapath::Sockmap)).await;
        for (tid, caps) in thread_caps(agent.pid()) {
            assert_eq!(
                caps & bpf_family(),
                1u64 << CAP_NET_ADMIN,
                "thread {tid}: CAP_NET_ADMIN (the local redirect's) must stay, the other BPF ones go"
            );
            assert_ne!(
                caps, 0,
                "thread {tid} dropped more than the BPF capabilities"
            );
        }
        drop(agent);
        let mut opts = Options::new(Datapath::Sockmap);
        opts.extra_args = vec!["--keep-capabilities".into()];
        let agent = Agent::start(&topo.ingress, &routes, opts).await;
        for (tid, caps) in thread_caps(agent.pid()) {
            assert_eq!(
                caps & bpf_family(),
                bpf_family(),
                "with --keep-capabilities thread {tid} lost a capability"
            );
        }
    })
    .await
}

/// The admin API listens on 127.0.0.1 inside the agent's namespace; on `networking.address` it serves
/// `/ready` alone. From the client namespace: `/ready` answers, `/config_dump` and
/// `/stats/prometheus` do not (404, or the connection is refused), while they do from inside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_beyond_localhost_serves_only_ready() {
    run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let backend = Backend::start(
            &topo.backend,
            Topology::backend_addr(BACKEND_PORT),
            Behaviour::Echo,
        )
        .await;
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend.addr])],
            Options::new(Datapath::Userspace),
        )
        .await;
        let remote = SocketAddr::new(INGRESS_V4.into(), ADMIN_PORT);
        let (code, body) = http_get(&topo.client, remote, "/ready")
            .await
            .unwrap_or_else(|e| panic!("/ready from another namespace ({remote}): {e}"));
        assert_eq!(
            (code, body.trim()),
            (200, "READY"),
            "/ready from another namespace"
        );
        for path in ["/config_dump", "/stats/prometheus", "/stats", "/clusters"] {
            match http_get(&topo.client, remote, path).await {
                Ok((code, body)) => assert_eq!(
                    code, 404,
                    "{path} from another namespace answered {code}: {body}"
                ),
                Err(e) => assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused,
                    "{path} from another namespace: expected 404 or a refused connection, got {e}"
                ),
            }
            // The paths the agent has answer on 127.0.0.1 inside the namespace (so the 404 above is
            // the exposure rule, not a missing endpoint).
            if path == "/config_dump" || path == "/stats/prometheus" {
                let (code, _) = agent.get(path).await.expect("admin API on 127.0.0.1");
                assert_eq!(code, 200, "{path} on 127.0.0.1 inside the namespace");
            }
        }
    })
    .await
}
