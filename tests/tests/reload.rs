//! Route reloads (case 13): SIGHUP and file changes add routes; a broken file keeps the old table.

use std::time::{Duration, Instant};

use zone_ingress_tests::agent::{Agent, Datapath, Options, Route};
use zone_ingress_tests::netns::Topology;
use zone_ingress_tests::pki::{SNI_BACKEND, SNI_OTHER};
use zone_ingress_tests::probe;
use zone_ingress_tests::run_test;
use zone_ingress_tests::tls::{self, Backend, Behaviour};
use zone_ingress_tests::wire;

/// One flow for `sni`: handshake and echo; Err with the reason when it fails.
async fn flow(topo: &Topology, agent: &Agent<'_>, sni: &str) -> Result<(), String> {
    let mut s = tls::connect(&topo.client, agent.addr(), sni)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls::echo_roundtrip(&mut s, sni.as_bytes())
        .await
        .map_err(|e| format!("echo: {e}"))?;
    Ok(())
}

/// Retries a flow for `sni` until it succeeds (at most `limit`): reloads are asynchronous.
async fn flow_eventually(topo: &Topology, agent: &Agent<'_>, sni: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        match flow(topo, agent, sni).await {
            Ok(()) => return,
            Err(e) if start.elapsed() > limit => {
                panic!("a flow for {sni} still fails {limit:?} after the routes change: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn assert_unrouted(topo: &Topology, agent: &Agent<'_>, sni: &str) {
    let p = probe::send_and_watch(
        &topo.client,
        agent.addr(),
        &wire::client_hello_bytes(sni),
        Duration::from_secs(8),
    )
    .await;
    assert!(
        p.closed_silently(),
        "{sni} is not routed yet: expected a silent close, saw {p:?}"
    );
}

struct Backends {
    a: Backend,
    b: Backend,
}

async fn backends(topo: &Topology) -> Backends {
    Backends {
        a: Backend::start(&topo.backend, Topology::backend_addr(8443), Behaviour::Echo).await,
        b: Backend::start(&topo.backend, Topology::backend_addr(8444), Behaviour::Echo).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_route_and_broken_file_keeps_old_table() {
    run_test(Duration::from_secs(90), async {
        let topo = Topology::new();
        let be = backends(&topo).await;
        let only_a = [Route::new(SNI_BACKEND, &[be.a.addr])];
        let both = [Route::new(SNI_BACKEND, &[be.a.addr]), Route::new(SNI_OTHER, &[be.b.addr])];
        let agent = Agent::start(&topo.ingress, &only_a, Options::new(Datapath::Userspace)).await;
        flow(&topo, &agent, SNI_BACKEND).await.expect("initial route works");
        assert_unrouted(&topo, &agent, SNI_OTHER).await;

        agent.write_routes(&both);
        agent.sighup();
        flow_eventually(&topo, &agent, SNI_OTHER, Duration::from_secs(5)).await;
        flow(&topo, &agent, SNI_BACKEND).await.expect("the old route survives the reload");

        // A YAML syntax error: the table loaded before stays.
        agent.write_routes_raw("routes:\n  - sni: \"broken\n    endpoints: [\n");
        agent.sighup();
        tokio::time::sleep(Duration::from_millis(700)).await;
        for sni in [SNI_BACKEND, SNI_OTHER] {
            flow(&topo, &agent, sni)
                .await
                .unwrap_or_else(|e| panic!("after a broken routes file the old route for {sni} must still work: {e}"));
        }
        // A semantically invalid file (duplicate SNI, and one route dropped): still the old table.
        agent.write_routes_raw(&format!(
            "routes:\n  - sni: \"{SNI_BACKEND}\"\n    endpoints: [\"{}\"]\n  - sni: \"{SNI_BACKEND}\"\n    endpoints: [\"{}\"]\n",
            be.a.addr, be.b.addr
        ));
        agent.sighup();
        tokio::time::sleep(Duration::from_millis(700)).await;
        for sni in [SNI_BACKEND, SNI_OTHER] {
            flow(&topo, &agent, sni)
                .await
                .unwrap_or_else(|e| panic!("after an invalid (duplicate SNI) routes file {sni} must still work: {e}"));
        }
        let mut agent = agent;
        assert!(agent.is_running(), "the agent died on a bad reload");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_change_reloads_without_signal() {
    run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let be = backends(&topo).await;
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[be.a.addr])],
            Options::new(Datapath::Userspace),
        )
        .await;
        assert_unrouted(&topo, &agent, SNI_OTHER).await;
        agent.write_routes(&[
            Route::new(SNI_BACKEND, &[be.a.addr]),
            Route::new(SNI_OTHER, &[be.b.addr]),
        ]);
        flow_eventually(&topo, &agent, SNI_OTHER, Duration::from_secs(10)).await;
    })
    .await
}
