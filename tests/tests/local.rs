//! The local redirect (`--local-redirect`): an endpoint in the agent's own network namespace.
//! Its sends go straight to the client socket (`sk_msg`), so the endpoint -> client bytes never
//! cross the namespace's loopback device; with `off` they do.
//!
//! The tests run one at a time (a process-wide lock): they compare loopback byte counters, which
//! another test's traffic in the same namespace would not disturb, but bulk transfers in parallel
//! would slow each other on two cores.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use zone_ingress_tests::agent::{Agent, Datapath, Metrics, Options, Route};
use zone_ingress_tests::netns::{INGRESS_UPSTREAM_V4, Netns, Topology};
use zone_ingress_tests::pki::SNI_BACKEND;
use zone_ingress_tests::run_test;
use zone_ingress_tests::tls::{self, Backend, Behaviour};

const MIB: u64 = 1 << 20;

static SERIAL: Mutex<()> = Mutex::const_new(());

fn options(local_redirect: &str) -> Options {
    let mut opts = Options::new(Datapath::Sockmap);
    opts.extra_args = vec!["--local-redirect".to_string(), local_redirect.to_string()];
    opts
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
async fn bulk_flow(topo: &Topology, agent: &Agent<'_>, backend: &mut Backend, up: u64, down: u64) -> f64 {
    let start = Instant::now();
    let s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND)
        .await
        .expect("mTLS handshake through the agent");
    let (mut r, mut w) = tokio::io::split(s);
    let both = async {
        tokio::join!(
            async {
                let sha = tls::send_prng(&mut w, up, 41).await.expect("client: send");
                w.shutdown().await.expect("client: close its write side");
                sha
            },
            async { tls::recv_hash(&mut r).await.expect("client: receive to a clean EOF") }
        )
    };
    let (sent_sha, got) = match tokio::time::timeout(Duration::from_secs(30), both).await {
        Ok(r) => r,
        Err(_) => panic!("bulk flow not done in 30 s; maps:\n{}", dump_maps(agent)),
    };
    let secs = start.elapsed().as_secs_f64();
    let out = backend.outcome(Duration::from_secs(20)).await;
    assert!(out.error.is_none(), "backend failed: {:?}", out.error);
    assert_eq!((out.received, out.received_sha), (up, sent_sha), "client->backend bytes differ");
    assert_eq!(got, (down, tls::prng_sha(down, 42)), "backend->client bytes differ");
    secs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_skips_loopback() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(90), async {
        const EACH_WAY: u64 = 64 * MIB;
        let topo = Topology::new();
        for mode in ["auto", "off"] {
            let mut backend = Backend::start(
                &topo.ingress,
                local_endpoint(9443),
                Behaviour::Bulk { send: EACH_WAY, seed: 42 },
            )
            .await;
            let agent = Agent::start(&topo.ingress, &[Route::new(SNI_BACKEND, &[backend.addr])], options(mode)).await;
            let lo0 = lo_rx_bytes(&topo.ingress);
            let secs = bulk_flow(&topo, &agent, &mut backend, EACH_WAY, EACH_WAY).await;
            let lo = lo_rx_bytes(&topo.ingress) - lo0;
            let m = agent.metrics().await;
            eprintln!(
                "--local-redirect {mode}: {} MiB each way in {secs:.2} s; loopback carried {} MiB",
                EACH_WAY / MIB,
                lo / MIB
            );
            if mode == "auto" {
                assert_eq!(flows_total(&m, "sockmap_local"), 1.0, "the flow did not take the local redirect:\n{}", m.dump("zone_ingress"));
                // Client -> endpoint still crosses loopback; endpoint -> client must not.
                assert!(
                    lo < EACH_WAY + EACH_WAY / 4,
                    "loopback carried {lo} bytes: the endpoint's {EACH_WAY} bytes went through TCP"
                );
            } else {
                assert_eq!(flows_total(&m, "sockmap"), 1.0, "{}", m.dump("zone_ingress"));
                assert_eq!(flows_total(&m, "sockmap_local"), 0.0);
                assert!(lo >= 2 * EACH_WAY, "with off both directions cross loopback, saw {lo}");
            }
            drop(agent);
            drop(backend);
        }
    })
    .await
}

/// The endpoint sends faster than the client reads: the endpoint's sends must wait for the
/// client socket's send buffer, not stall or lose bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_paces_the_endpoint() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(90), async {
        const DOWN: u64 = 64 * MIB;
        let topo = Topology::new();
        let mut backend = Backend::start(
            &topo.ingress,
            local_endpoint(9444),
            Behaviour::Bulk { send: DOWN, seed: 42 },
        )
        .await;
        let agent = Agent::start(&topo.ingress, &[Route::new(SNI_BACKEND, &[backend.addr])], options("auto")).await;
        let s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND).await.expect("handshake");
        let (mut r, mut w) = tokio::io::split(s);
        w.shutdown().await.expect("client: close its write side");
        // About 40 MB/s: 64 KiB every 1.6 ms.
        let mut hash = sha2::Sha256::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        let start = Instant::now();
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
        let sha: [u8; 32] = sha2::Digest::finalize(hash).into();
        assert_eq!((total, sha), (DOWN, tls::prng_sha(DOWN, 42)), "backend->client bytes differ");
        let out = backend.outcome(Duration::from_secs(20)).await;
        assert!(out.error.is_none(), "backend failed: {:?}", out.error);
        let m = agent.metrics().await;
        assert_eq!(flows_total(&m, "sockmap_local"), 1.0, "{}", m.dump("zone_ingress"));
        let _ = (Arc::new(()), JoinSet::<()>::new());
    })
    .await
}

/// TEMP experiment: the client keeps sending a small message every 20 ms while it downloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiment_pings_unstick() {
    let _serial = SERIAL.lock().await;
    run_test(Duration::from_secs(90), async {
        const DOWN: u64 = 64 * MIB;
        let topo = Topology::new();
        let mut backend = Backend::start(&topo.ingress, local_endpoint(9445), Behaviour::Bulk { send: DOWN, seed: 42 }).await;
        let agent = Agent::start(&topo.ingress, &[Route::new(SNI_BACKEND, &[backend.addr])], options("auto")).await;
        let s = tls::connect(&topo.client, agent.addr(), SNI_BACKEND).await.expect("handshake");
        let (mut r, mut w) = tokio::io::split(s);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = done.clone();
        let pinger = tokio::spawn(async move {
            let mut n = 0u64;
            while !d2.load(std::sync::atomic::Ordering::Relaxed) && n < 3000 {
                w.write_all(&[7u8; 1024]).await.expect("ping");
                w.flush().await.expect("flush");
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            w.shutdown().await.expect("shutdown");
            n
        });
        let start = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(40), tls::recv_hash(&mut r)).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let pings = pinger.await.expect("pinger");
        eprintln!("with pings every 20 ms: {:?} after {:.2}s, {pings} pings", got.as_ref().map(|g| g.as_ref().map(|x| x.0)), start.elapsed().as_secs_f64());
        eprintln!("{}", dump_maps(&agent));
        let got = got.expect("download finished").expect("download ok");
        assert_eq!(got, (DOWN, tls::prng_sha(DOWN, 42)));
    })
    .await
}
