//! The splice's maps fill up: with `ZONE_INGRESS_MAX_SOCKETS=4` (two spliced flows) the agent splices
//! the first two concurrent flows, copies the next ones in userspace (counted as
//! `zone_ingress_splice_fallbacks_total{reason="map_full"}`), every flow's bytes arrive intact, and once
//! the spliced flows close their slots serve new flows again.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use zone_ingress_tests::agent::{Agent, Datapath, Metrics, Options, Route};
use zone_ingress_tests::netns::Topology;
use zone_ingress_tests::pki::SNI_BACKEND;
use zone_ingress_tests::run_test;
use zone_ingress_tests::tls::{self, Backend, Behaviour};

const BACKEND_PORT: u16 = 8443;
/// Concurrent flows opened against a map with room for two.
const FLOWS: usize = 6;

fn flows_total(m: &Metrics, datapath: &str) -> f64 {
    m.get("zone_ingress_flows_total", &[("datapath", datapath)])
}

fn map_full(m: &Metrics) -> f64 {
    m.get(
        "zone_ingress_splice_fallbacks_total",
        &[("reason", "map_full")],
    )
}

/// A message of `len` bytes unique to flow `n`.
fn message(n: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + n * 7 + 1) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flow_map_sends_new_flows_to_userspace_intact() {
    run_test(Duration::from_secs(90), async {
        let topo = Topology::new();
        let mut backend = Backend::start(
            &topo.backend,
            Topology::backend_addr(BACKEND_PORT),
            Behaviour::Echo,
        )
        .await;
        let mut opts = Options::new(Datapath::Sockmap);
        opts.env = vec![("ZONE_INGRESS_MAX_SOCKETS".into(), "4".into())];
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend.addr])],
            opts,
        )
        .await;

        // Open the flows one after the other (so which ones find room is deterministic) and keep
        // them all open: each echoes a first message before the next one starts.
        let mut open = Vec::new();
        for n in 0..FLOWS {
            let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
                .await
                .unwrap_or_else(|e| panic!("flow {n}: mTLS through the agent: {e}"));
            tls::echo_roundtrip(&mut s, &message(n, 4096))
                .await
                .unwrap_or_else(|e| panic!("flow {n}: first echo: {e}"));
            open.push(s);
        }
        let m = agent.metrics().await;
        assert_eq!(
            (flows_total(&m, "sockmap"), map_full(&m)),
            (2.0, (FLOWS - 2) as f64),
            "two flows fit the maps, the other {} must fall back for map_full:\n{}",
            FLOWS - 2,
            m.dump("zone_ingress_")
        );
        // Every flow, spliced or copied, moves a larger message in both directions intact.
        let mut set = JoinSet::new();
        for (n, mut s) in open.into_iter().enumerate() {
            set.spawn(async move {
                tls::echo_roundtrip(&mut s, &message(n, 1 << 20))
                    .await
                    .unwrap_or_else(|e| panic!("flow {n}: 1 MiB echo: {e}"));
                // close_notify, so the backend sees a clean end.
                s.shutdown()
                    .await
                    .unwrap_or_else(|e| panic!("flow {n}: shutdown: {e}"));
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("a flow task panicked");
        }
        for _ in 0..FLOWS {
            let o = backend.outcome(Duration::from_secs(10)).await;
            assert!(o.error.is_none(), "backend saw an error: {:?}", o.error);
        }
        let m = agent
            .metrics_until(Duration::from_secs(5), |m| {
                m.get("zone_ingress_downstream_cx_active", &[]) == 0.0
            })
            .await;
        assert_eq!(m.get("zone_ingress_downstream_cx_active", &[]), 0.0);

        // The closed spliced flows freed their entries: the next flow is spliced again.
        let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
            .await
            .expect("a flow after the others closed");
        tls::echo_roundtrip(&mut s, &message(99, 64 * 1024))
            .await
            .expect("echo after the maps emptied");
        drop(s);
        let m = agent.metrics().await;
        assert_eq!(
            (flows_total(&m, "sockmap"), map_full(&m)),
            (3.0, (FLOWS - 2) as f64),
            "once the maps emptied, the next flow must be spliced:\n{}",
            m.dump("zone_ingress_")
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_max_sockets_is_refused_with_sockmap() {
    run_test(Duration::from_secs(30), async {
        let topo = Topology::new();
        let mut opts = Options::new(Datapath::Sockmap);
        opts.env = vec![("ZONE_INGRESS_MAX_SOCKETS".into(), "lots".into())];
        let mut agent = Agent::start_no_wait(&topo.ingress, &[], opts);
        let status = agent.wait_exit(Duration::from_secs(15)).await;
        let log = agent.stderr();
        assert!(
            !status.success(),
            "a bad ZONE_INGRESS_MAX_SOCKETS must be refused:\n{log}"
        );
        assert!(
            log.contains("ZONE_INGRESS_MAX_SOCKETS=\"lots\""),
            "the refusal names the variable and its value:\n{log}"
        );
    })
    .await
}
