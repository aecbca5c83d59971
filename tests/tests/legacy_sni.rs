//! Case 12: Kuma's legacy SNI `backend{mesh=default}` (not a DNS name) is routed like any other.

use zone_ingress_tests::agent::{Agent, Datapath, Options, Route};
use zone_ingress_tests::datapath_tests;
use zone_ingress_tests::netns::Topology;
use zone_ingress_tests::pki::SNI_LEGACY;
use zone_ingress_tests::tls::{self, OpensslRevServer};

async fn legacy_sni(dp: Datapath) {
    let topo = Topology::new();
    // A rustls server rejects this SNI (illegal_parameter), so the backend is `openssl s_server -rev`.
    let server = OpensslRevServer::start(&topo.backend, 8443).await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_LEGACY, &[Topology::backend_addr(8443)])],
        Options::new(dp),
    )
    .await;
    let got = tls::openssl_echo(
        &topo.client,
        agent.addr(),
        SNI_LEGACY,
        b"hello legacy sni\n",
    )
    .await
    .unwrap_or_else(|e| {
        panic!("openssl s_client -servername '{SNI_LEGACY}' through the agent: {e}")
    });
    assert_eq!(
        String::from_utf8_lossy(&got),
        "ins ycagel olleh\n",
        "s_server -rev answer"
    );
    let m = agent.metrics().await;
    assert_eq!(
        m.sum("zone_ingress_client_hello_rejected_total"),
        0.0,
        "{}",
        m.dump("zone_ingress")
    );
    drop(server);
}
datapath_tests!(legacy_sni_routed, legacy_sni, 60);
