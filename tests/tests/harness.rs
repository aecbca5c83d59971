//! Self-tests of the harness, with no agent: the ingress namespace talks to the backend directly.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zone_ingress_tests::agent::Metrics;
use zone_ingress_tests::netns::{BACKEND_V6, Topology};
use zone_ingress_tests::pki::{SNI_BACKEND, SNI_LEGACY};
use zone_ingress_tests::run_test;
use zone_ingress_tests::tls::{self, Backend, Behaviour, OpensslRevServer};
use zone_ingress_tests::wire::{self, Dribble, Split, SplitFirstRecord};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_bulk_both_ways_v4_and_v6() {
    run_test(LIMIT, async {
        let topo = Topology::new();
        let n = 32 << 20;
        for addr in [
            Topology::backend_addr(8443),
            SocketAddr::new(IpAddr::V6(BACKEND_V6), 8443),
        ] {
            let mut backend =
                Backend::start(&topo.backend, addr, Behaviour::Bulk { send: n, seed: 2 }).await;
            let s = tls::connect(&topo.ingress, addr, SNI_BACKEND)
                .await
                .expect("direct TLS to backend");
            let (sent, got) = tls::send_and_receive(s, n, 1).await;
            let out = backend.outcome(Duration::from_secs(10)).await;
            assert!(out.error.is_none(), "{:?}", out.error);
            assert_eq!(out.sni.as_deref(), Some(SNI_BACKEND));
            assert_eq!((out.received, out.received_sha), (n, sent));
            assert_eq!(got, (n, tls::prng_sha(n, 2)));
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_dribble_and_split_handshakes() {
    run_test(LIMIT, async {
        let topo = Topology::new();
        let addr = Topology::backend_addr(8443);
        let _backend = Backend::start(&topo.backend, addr, Behaviour::Echo).await;
        let tcp = topo.ingress.connect(addr).await.expect("connect");
        let started = Instant::now();
        let mut s = tls::handshake(
            Dribble::new(tcp, 400, Duration::from_millis(1)),
            SNI_BACKEND,
        )
        .await
        .expect("dribbled handshake");
        assert!(
            started.elapsed() > Duration::from_millis(300),
            "dribble was not slow"
        );
        tls::echo_roundtrip(&mut s, b"dribbled")
            .await
            .expect("echo after dribble");
        for split in [Split::Thirds, Split::HeaderSpanning] {
            let tcp = topo.ingress.connect(addr).await.expect("connect");
            let mut s = tls::handshake(SplitFirstRecord::new(tcp, split), SNI_BACKEND)
                .await
                .expect("split handshake");
            tls::echo_roundtrip(&mut s, b"split")
                .await
                .expect("echo after split");
        }
    })
    .await
}

#[test]
fn split_record_reframes() {
    let hello = wire::client_hello_bytes(SNI_BACKEND);
    let len = u16::from_be_bytes([hello[3], hello[4]]) as usize;
    assert_eq!(hello.len(), 5 + len, "one record");
    for split in [Split::Thirds, Split::HeaderSpanning] {
        let out = wire::split_record(&hello, split);
        assert_eq!(out.len(), hello.len() + 10);
        let mut payload = Vec::new();
        let mut rest = &out[..];
        let mut records = 0;
        while !rest.is_empty() {
            let l = u16::from_be_bytes([rest[3], rest[4]]) as usize;
            assert_eq!(rest[0], 0x16);
            payload.extend_from_slice(&rest[5..5 + l]);
            rest = &rest[5 + l..];
            records += 1;
        }
        assert_eq!(records, 3);
        assert_eq!(payload, hello[5..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reset_is_seen_as_reset() {
    run_test(LIMIT, async {
        let topo = Topology::new();
        let addr = Topology::backend_addr(8443);
        let _backend = Backend::start(
            &topo.backend,
            addr,
            Behaviour::ResetAfter {
                after: 5,
                send: 1000,
            },
        )
        .await;
        let mut s = tls::connect(&topo.ingress, addr, SNI_BACKEND)
            .await
            .expect("connect");
        s.write_all(b"hello").await.expect("write");
        s.flush().await.expect("flush");
        let mut sink = Vec::new();
        let err = s
            .read_to_end(&mut sink)
            .await
            .expect_err("a reset, not EOF");
        assert!(tls::is_reset(&err), "expected a reset, got {err:?}");

        let mut backend =
            Backend::start(&topo.backend, Topology::backend_addr(8444), Behaviour::Echo).await;
        let mut s = tls::connect(&topo.ingress, backend.addr, SNI_BACKEND)
            .await
            .expect("connect");
        tls::echo_roundtrip(&mut s, b"x").await.expect("echo");
        tls::reset(s.into_inner().0);
        let out = backend.outcome(Duration::from_secs(5)).await;
        let (stage, err) = out.error.expect("backend saw an error");
        assert!(
            tls::is_reset(&err),
            "backend expected a reset at {stage}, got {err:?}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_half_close_both_ways() {
    run_test(LIMIT, async {
        let topo = Topology::new();
        let mut b1 = Backend::start(
            &topo.backend,
            Topology::backend_addr(8443),
            Behaviour::ReplyAfterEof {
                reply: b"r".to_vec(),
            },
        )
        .await;
        let mut s = tls::connect(&topo.ingress, b1.addr, SNI_BACKEND)
            .await
            .expect("connect");
        s.write_all(b"question").await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)
            .await
            .expect("reply after half-close");
        assert_eq!(reply, b"r");
        assert_eq!(
            b1.outcome(Duration::from_secs(5)).await.received_bytes,
            b"question"
        );

        let mut b2 = Backend::start(
            &topo.backend,
            Topology::backend_addr(8444),
            Behaviour::HalfCloseFirst {
                first: b"first".to_vec(),
            },
        )
        .await;
        let mut s = tls::connect(&topo.ingress, b2.addr, SNI_BACKEND)
            .await
            .expect("connect");
        let mut first = Vec::new();
        s.read_to_end(&mut first)
            .await
            .expect("read until the backend half-closes");
        assert_eq!(first, b"first");
        s.write_all(b"answer")
            .await
            .expect("write after peer half-close");
        s.shutdown().await.expect("close");
        let out = b2.outcome(Duration::from_secs(5)).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(out.received_bytes, b"answer");
    })
    .await
}

/// A rustls server rejects Kuma's legacy SNI `backend{mesh=default}` (alert illegal_parameter), so the
/// legacy-SNI test uses `openssl s_server -rev`; check that pairing works directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_openssl_legacy_sni() {
    run_test(LIMIT, async {
        let topo = Topology::new();
        let addr = Topology::backend_addr(8443);
        let _server = OpensslRevServer::start(&topo.backend, 8443).await;
        let line = tls::openssl_echo(&topo.ingress, addr, SNI_LEGACY, b"legacy-hello\n")
            .await
            .expect("openssl s_client to s_server -rev");
        assert_eq!(line, b"olleh-ycagel\n");

        let rustls_backend =
            Backend::start(&topo.backend, Topology::backend_addr(8444), Behaviour::Echo).await;
        let err = tls::openssl_echo(&topo.ingress, rustls_backend.addr, SNI_LEGACY, b"x\n")
            .await
            .expect_err("rustls servers reject SNIs that are not DNS names");
        assert!(err.to_string().contains("illegal parameter"), "{err}");
    })
    .await
}

#[test]
fn metrics_parser() {
    let m = Metrics::parse(
        "# HELP x\n# TYPE zone_ingress_client_hello_rejected_total counter\n\
         zone_ingress_client_hello_rejected_total{reason=\"timeout\"} 2\n\
         zone_ingress_flows_total{datapath=\"userspace\",a=\"b\"} 3\n\
         zone_ingress_downstream_cx_total 7\n",
    );
    assert_eq!(m.rejected("timeout"), 2.0);
    assert_eq!(m.rejected("closed"), 0.0);
    assert_eq!(
        m.get(
            "zone_ingress_flows_total",
            &[("datapath", "userspace"), ("a", "b")]
        ),
        3.0
    );
    assert_eq!(m.sum("zone_ingress_flows_total"), 3.0);
    assert_eq!(m.get("zone_ingress_downstream_cx_total", &[]), 7.0);
}
