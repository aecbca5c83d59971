//! Bulk both ways over one spliced flow without TLS after the ClientHello: every byte is checked at
//! its offset, so a splice that loses, repeats or reorders bytes is reported with where and how
//! (TLS would only say "decrypt error"). The client sends its stream right after the hello,
//! without waiting for the endpoint, so bytes arrive while the agent hands the flow to the kernel.
//!
//! It caught two faults: bytes sent right after the hello redirected into the middle of the
//! replayed hello (the handoff now holds the verdict until the replay is written), and repeats from
//! overlapping retransmissions (the verdict now trims them). `ZI_AGENT_LOG=zone_ingress=debug`
//! gives the agent's flow log in a failure's output. `ZI_BULK_BYTES` sets the size (1 GiB).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zone_ingress_tests::agent::{Agent, Datapath, Options, Route};
use zone_ingress_tests::netns::Topology;
use zone_ingress_tests::pki::SNI_BACKEND;
use zone_ingress_tests::wire::{self, Prng};

const BACKEND_PORT: u16 = 8443;
const BLOCK: usize = 64 * 1024;

fn bytes() -> usize {
    std::env::var("ZI_BULK_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30)
}

/// The PRNG stream of `seed`, `n` bytes, generated in whole 64 KiB blocks (so any reader can
/// index it).
fn stream(n: usize, seed: u64) -> Arc<Vec<u8>> {
    let mut v = vec![0u8; n.div_ceil(BLOCK) * BLOCK];
    let mut prng = Prng::new(seed);
    for block in v.chunks_mut(BLOCK) {
        prng.fill(block);
    }
    v.truncate(n);
    Arc::new(v)
}

/// Writes `data` in 64 KiB chunks, then closes the write side.
async fn send(w: &mut (impl AsyncWriteExt + Unpin), data: &[u8], who: &str) -> Result<(), String> {
    for c in data.chunks(BLOCK) {
        w.write_all(c)
            .await
            .map_err(|e| format!("{who} write: {e}"))?;
    }
    w.shutdown()
        .await
        .map_err(|e| format!("{who} shutdown: {e}"))
}

/// Reads to EOF, comparing with `want`; on the first difference describes it.
async fn check(r: &mut (impl AsyncReadExt + Unpin), want: &[u8], who: &str) -> Result<(), String> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut at = 0usize;
    loop {
        let n = r
            .read(&mut buf)
            .await
            .map_err(|e| format!("{who}: read after {at} bytes: {e}"))?;
        if n == 0 {
            return if at == want.len() {
                Ok(())
            } else {
                Err(format!("{who}: EOF after {at} of {} bytes", want.len()))
            };
        }
        let got = &buf[..n];
        let end = (at + n).min(want.len());
        if let Some(i) = (0..n).find(|&i| at + i >= want.len() || got[i] != want[at + i]) {
            let off = at + i;
            // Where did the bytes from here come from? Search the next 64 bytes in the stream.
            let probe = &got[i..(i + 64).min(n)];
            let from = want
                .windows(probe.len())
                .position(|w| w == probe)
                .map_or("nowhere in the stream".to_string(), |p| {
                    format!("offset {p} (delta {})", p as i64 - off as i64)
                });
            return Err(format!(
                "{who}: first wrong byte at offset {off} (read of {n} bytes at {at}); the bytes there \
                 come from {from}; expected up to {end}"
            ));
        }
        at += n;
    }
}

async fn raw_bulk(dp: Datapath) {
    let n = bytes();
    let up_data = stream(n, 1);
    let down_data = stream(n, 2);
    let hello = wire::client_hello_bytes(SNI_BACKEND);
    let topo = Topology::new();
    let listener = topo
        .backend
        .listen(Topology::backend_addr(BACKEND_PORT))
        .await;
    let backend = {
        let (up_data, down_data, hello) = (up_data.clone(), down_data.clone(), hello.clone());
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let (mut r, mut w) = s.into_split();
            let mut h = vec![0u8; hello.len()];
            r.read_exact(&mut h).await.map_err(|e| e.to_string())?;
            if h != hello {
                return Err("the endpoint's first bytes are not the replayed ClientHello".into());
            }
            let (a, b) = tokio::join!(
                send(&mut w, &down_data, "backend"),
                check(&mut r, &up_data, "backend (client->backend)")
            );
            a.and(b)
        })
    };
    let agent = Agent::start(
        &topo.ingress,
        &[Route::new(
            SNI_BACKEND,
            &[Topology::backend_addr(BACKEND_PORT)],
        )],
        {
            let mut o = Options::new(dp);
            if let Ok(level) = std::env::var("ZI_AGENT_LOG") {
                o.env.push(("RUST_LOG".into(), level));
            }
            o
        },
    )
    .await;
    let s: TcpStream = topo.client.connect(agent.addr()).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    w.write_all(&hello).await.expect("hello");
    let (a, b) = tokio::join!(
        send(&mut w, &up_data, "client"),
        check(&mut r, &down_data, "client (backend->client)")
    );
    let back = tokio::time::timeout(Duration::from_secs(60), backend)
        .await
        .expect("backend done")
        .expect("backend task");
    let errors: Vec<String> = [a, b, back].into_iter().filter_map(Result::err).collect();
    assert!(errors.is_empty(), "{errors:#?}\n{}", agent.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_bulk_both_ways_sockmap() {
    zone_ingress_tests::run_test(Duration::from_secs(120), raw_bulk(Datapath::Sockmap)).await
}
