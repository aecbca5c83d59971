//! BPF (case 11): with `--datapath auto` as root the agent pins its maps under `--pin-dir`; with `userspace` it
//! loads nothing.

use std::time::Duration;

use zone_ingress_tests::agent::{Agent, Datapath, Options, Route};
use zone_ingress_tests::netns::Topology;
use zone_ingress_tests::pki::SNI_BACKEND;
use zone_ingress_tests::run_test;
use zone_ingress_tests::tls::{self, Backend, Behaviour};

const MAPS: [&str; 3] = ["ZI_SOCKS", "ZI_FLOWS", "ZI_COUNTERS"];

fn listing(dir: &std::path::Path) -> String {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("<{e}>"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_pins_maps_while_running() {
    run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let backend =
            Backend::start(&topo.backend, Topology::backend_addr(8443), Behaviour::Echo).await;
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend.addr])],
            Options::new(Datapath::Auto),
        )
        .await;
        let dir = agent.pin_dir().to_path_buf();
        for map in MAPS {
            assert!(
                dir.join(map).exists(),
                "{map} is not pinned under {} while the agent runs (found: {})",
                dir.display(),
                listing(&dir)
            );
        }
        let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
            .await
            .expect("handshake through the agent");
        tls::echo_roundtrip(&mut s, b"with pins")
            .await
            .expect("echo");
        for map in MAPS {
            assert!(
                dir.join(map).exists(),
                "{map} vanished from {} while the agent runs",
                dir.display()
            );
        }
    })
    .await
}

/// With `--datapath auto` as root, a plain flow takes the kernel path (`flows_total{datapath="sockmap"}`),
/// and its bytes are not copied in userspace beyond the handoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_splices_flows() {
    run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let backend = Backend::start(&topo.backend, Topology::backend_addr(8443), Behaviour::Echo).await;
        let agent = Agent::start(&topo.ingress, &[Route::new(SNI_BACKEND, &[backend.addr])], Options::new(Datapath::Auto)).await;
        let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND).await.expect("handshake through the agent");
        let big = vec![0x5au8; 4 << 20];
        tls::echo_roundtrip(&mut s, &big).await.expect("echo 4 MiB");
        let m = agent
            .metrics_until(Duration::from_secs(2), |m| m.get("zone_ingress_flows_total", &[("datapath", "sockmap")]) >= 1.0)
            .await;
        assert!(
            m.get("zone_ingress_flows_total", &[("datapath", "sockmap")]) >= 1.0,
            "with --datapath auto as root a flow should take the sockmap path:\n{}",
            m.dump("zone_ingress")
        );
        let copied = m.sum("zone_ingress_userspace_copied_bytes_total");
        assert!(
            copied < (4 << 20) as f64,
            "a spliced flow should not copy its 8 MiB through userspace (userspace_copied_bytes_total {copied})"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_loads_no_bpf() {
    run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let backend =
            Backend::start(&topo.backend, Topology::backend_addr(8443), Behaviour::Echo).await;
        let agent = Agent::start(
            &topo.ingress,
            &[Route::new(SNI_BACKEND, &[backend.addr])],
            Options::new(Datapath::Userspace),
        )
        .await;
        let mut s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
            .await
            .expect("handshake through the agent");
        tls::echo_roundtrip(&mut s, b"copied").await.expect("echo");
        let dir = agent.pin_dir();
        assert!(
            MAPS.iter().all(|m| !dir.join(m).exists()),
            "--datapath userspace must not load or pin BPF maps, found under {}: {}",
            dir.display(),
            listing(dir)
        );
        let m = agent.metrics().await;
        assert!(
            m.get("zone_ingress_flows_total", &[("datapath", "userspace")]) >= 1.0,
            "{}",
            m.dump("zone_ingress_flows")
        );
        assert_eq!(
            m.get("zone_ingress_flows_total", &[("datapath", "sockmap")]),
            0.0,
            "{}",
            m.dump("zone_ingress_flows")
        );
    })
    .await
}
