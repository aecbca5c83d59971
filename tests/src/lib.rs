//! End-to-end test harness for zone-ingress.
//!
//! Every test builds its own three network namespaces (client, ingress, backend), starts the real agent
//! binary in the ingress namespace and moves real mTLS bytes through it. Nothing here sends traffic outside
//! loopback or the namespaces the test created.
//!
//! Modules:
//! - [`netns`]: namespaces, veth links, sockets and processes inside a namespace;
//! - [`pki`]: a test CA, server and client certificates (DER for rustls, PEM files for the openssl CLI);
//! - [`tls`]: rustls configurations and the backend behaviours (echo, sink, server-first, half-close, reset);
//! - [`agent`]: spawn the agent, wait for `/ready`, scrape `/stats/prometheus`, run `check`;
//! - [`probe`]: raw TCP probes that watch how the agent closes a connection;
//! - [`flood`]: hand-built Ethernet frames (SYN, UDP, truncated) sent through a packet socket, for the XDP guard;
//! - [`cp`]: a test Kuma control plane (HTTPS /bootstrap, gRPC ADS over TLS, RS256 zone tokens);
//! - [`xds_build`]: xDS resources as prost messages for it (Kuma's fixtures, re-addressed);
//! - [`wire`]: stream wrappers that dribble or re-frame the ClientHello, raw ClientHello bytes, a fast PRNG.
//!
//! Environment: `ZONE_INGRESS_BIN` (agent binary, default `<workspace>/target/release/zone-ingress`),
//! `ZI_BULK_BYTES` (bulk test size each way, default 1 GiB), `ZI_AGENT_LOG` (the agent's `RUST_LOG`, default
//! `info`). Everything needs root.

pub mod agent;
pub mod cp;
pub mod flood;
pub mod netns;
pub mod pki;
pub mod probe;
pub mod tls;
pub mod wire;
pub mod xds_build;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A name unique to this test process and call: `<pid>-<n>`.
pub fn unique_suffix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Panics unless the process runs as root: these tests create network namespaces and load BPF programs.
/// A test that needs root must fail loudly without it, never pass silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this end-to-end test needs root (network namespaces, veth, BPF); run it as root (euid is {euid})"
    );
}

/// Raises the soft limit of open files to the hard limit, so that 1000 concurrent flows fit (client and
/// backend ends live in this process; the agent inherits the raised limit).
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit/setrlimit to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Runs one test body: checks root, then bounds the body by `limit`. Everything the body owns (namespaces,
/// agent process, pin dir) is dropped, and so cleaned up, when it finishes, panics or times out; on a timeout
/// the panic starts while the body is still alive, so the guards see a failing test and print the agent's log.
pub async fn run_test<F: Future<Output = ()>>(limit: Duration, body: F) {
    require_root();
    raise_nofile_limit();
    let body = std::pin::pin!(body);
    tokio::select! {
        () = body => {}
        () = tokio::time::sleep(limit) => {
            panic!("test body did not finish within {limit:?} (the agent's stderr follows, if one ran)")
        }
    }
}

/// Defines one test per data path (`userspace` and `auto`) in a module named after the case.
/// `$body` is an `async fn(Datapath)` in the calling module, `$secs` bounds each run (seconds).
#[macro_export]
macro_rules! datapath_tests {
    ($name:ident, $body:ident, $secs:expr) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn userspace() {
                $crate::run_test(
                    ::std::time::Duration::from_secs($secs),
                    super::$body($crate::agent::Datapath::Userspace),
                )
                .await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn auto() {
                $crate::run_test(
                    ::std::time::Duration::from_secs($secs),
                    super::$body($crate::agent::Datapath::Auto),
                )
                .await
            }
        }
    };
}
