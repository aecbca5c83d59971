//! ClientHello rejections: the agent closes without sending a byte, and counts the reason.

use std::time::Duration;

use zone_ingress_tests::agent::{Agent, Datapath, Options, Route};
use zone_ingress_tests::datapath_tests;
use zone_ingress_tests::netns::Topology;
use zone_ingress_tests::pki::{SNI_BACKEND, SNI_UNKNOWN};
use zone_ingress_tests::probe;
use zone_ingress_tests::tls::{Backend, Behaviour};
use zone_ingress_tests::wire;

const REJECTED: &str = "zone_ingress_client_hello_rejected_total";

/// Sends `bytes`, expects a silent close well before the ClientHello timeout, and `reason` counted once.
async fn expect_rejected(dp: Datapath, what: &str, bytes: &[u8], reason: &str) {
    let topo = Topology::new();
    let _backend =
        Backend::start(&topo.backend, Topology::backend_addr(8443), Behaviour::Echo).await;
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[Topology::backend_addr(8443)])],
        Options::new(dp).client_hello_timeout("5s"),
    )
    .await;
    let p = probe::send_and_watch(&topo.client, agent.addr(), bytes, Duration::from_secs(8)).await;
    assert!(
        p.closed_silently(),
        "{what}: the agent must close without sending a byte, saw {p:?}"
    );
    assert!(
        p.elapsed < Duration::from_secs(2),
        "{what}: closed only after {:?}; a decided rejection should not wait for the 5 s ClientHello timeout",
        p.elapsed
    );
    let m = agent
        .metrics_until(Duration::from_secs(2), |m| m.rejected(reason) >= 1.0)
        .await;
    assert_eq!(
        m.rejected(reason),
        1.0,
        "{what}: {REJECTED}{{reason=\"{reason}\"}} should be 1:\n{}",
        m.dump(REJECTED)
    );
    assert_eq!(
        m.sum(REJECTED),
        1.0,
        "{what}: only reason {reason:?} should have moved:\n{}",
        m.dump(REJECTED)
    );
    assert!(
        m.get("zone_ingress_downstream_cx_total", &[]) >= 1.0,
        "downstream_cx_total did not count the connection:\n{}",
        m.dump("zone_ingress")
    );
}

// 5a. A well-formed ClientHello for an SNI that no route has.
async fn unknown_sni(dp: Datapath) {
    expect_rejected(
        dp,
        "unknown SNI",
        &wire::client_hello_bytes(SNI_UNKNOWN),
        "unknown_sni",
    )
    .await
}
datapath_tests!(unknown_sni_closed_silently, unknown_sni, 30);

// 5b. Plain HTTP instead of TLS.
async fn not_tls(dp: Datapath) {
    expect_rejected(
        dp,
        "plain HTTP",
        b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n",
        "not_tls",
    )
    .await
}
datapath_tests!(not_tls_closed_silently, not_tls, 30);

// 5c. A ClientHello without the server_name extension (rustls omits SNI when dialing an IP address).
async fn no_sni(dp: Datapath) {
    expect_rejected(
        dp,
        "ClientHello without SNI",
        &wire::client_hello_bytes("10.231.1.2"),
        "no_sni",
    )
    .await
}
datapath_tests!(no_sni_closed_silently, no_sni, 30);

// 7. Slowloris: part of a ClientHello, then silence; closed at --client-hello-timeout 1s.
async fn slowloris(dp: Datapath) {
    let topo = Topology::new();
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(SNI_BACKEND, &[Topology::backend_addr(8443)])],
        Options::new(dp).client_hello_timeout("1s"),
    )
    .await;
    let hello = wire::client_hello_bytes(SNI_BACKEND);
    let p = probe::send_and_watch(
        &topo.client,
        agent.addr(),
        &hello[..20],
        Duration::from_secs(5),
    )
    .await;
    assert!(
        p.closed_silently(),
        "a partial ClientHello must be closed without a byte sent, saw {p:?}"
    );
    assert!(
        p.elapsed >= Duration::from_millis(900) && p.elapsed <= Duration::from_secs(3),
        "with --client-hello-timeout 1s the connection should close between 0.9 s and 3 s, it closed after {:?}",
        p.elapsed
    );
    let m = agent
        .metrics_until(Duration::from_secs(2), |m| m.rejected("timeout") >= 1.0)
        .await;
    assert_eq!(
        m.rejected("timeout"),
        1.0,
        "reason=\"timeout\" should be 1:\n{}",
        m.dump(REJECTED)
    );
}
datapath_tests!(slowloris_closed_at_client_hello_timeout, slowloris, 30);
