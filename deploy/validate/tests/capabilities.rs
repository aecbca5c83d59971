//! The capabilities the DaemonSet and the systemd unit grant are enough to load, attach and pin
//! the BPF programs and to splice a flow, and each one of them is needed.
//!
//! The real agent runs as uid 0 (as in both deployments) under `setpriv` with a bounding set of
//! exactly the deployment's capabilities and no_new_privs (allowPrivilegeEscalation: false /
//! NoNewPrivileges=yes), with `--datapath sockmap` so a refused load is fatal, inside a network
//! namespace of its own with the host's bpffs. Needs root; fails without it.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use zone_ingress_deploy::k8s;
use zone_ingress_deploy::unit::Unit;
use zone_ingress_deploy::{agent_binary, repo_root};
use zone_ingress_tests::agent::{Metrics, http_get};
use zone_ingress_tests::netns::Netns;
use zone_ingress_tests::pki::SNI_BACKEND;
use zone_ingress_tests::tls::{self, Backend, Behaviour};
use zone_ingress_tests::{require_root, run_test, unique_suffix};

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;
const LISTEN: u16 = 10001;
const ADMIN: u16 = 9901;
const BACKEND: u16 = 8443;

/// The capabilities the DaemonSet adds (Kubernetes spelling, e.g. `BPF`).
fn daemonset_caps() -> BTreeSet<String> {
    let report = k8s::validate_file(&repo_root().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    let ds = report
        .objects
        .iter()
        .find(|o| o.kind == "DaemonSet")
        .unwrap();
    ds.value["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect()
}

/// The unit's bounding set, in the same spelling.
fn unit_caps() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(repo_root().join("deploy/systemd/zone-ingress.service")).unwrap();
    Unit::parse(&text)
        .unwrap()
        .values("Service", "CapabilityBoundingSet")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|c| c.strip_prefix("CAP_").unwrap_or(c).to_owned())
        .collect()
}

/// Capability numbers (linux/capability.h) of the ones these deployments may name.
fn cap_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("no bit known for CAP_{other}"),
    }
}

/// The agent under setpriv; Drop kills it and removes its pins.
struct Restricted {
    child: Child,
    pin_dir: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Restricted {
    fn start(ns: &Netns, caps: &BTreeSet<String>) -> Restricted {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("zone-ingress.yaml");
        let routes = dir.path().join("routes.yaml");
        std::fs::write(
            &config,
            format!(
                "type: ZoneIngress\nname: zi-caps\nnetworking:\n  address: {LOCAL}\n  port: {LISTEN}\n  admin:\n    port: {ADMIN}\n"
            ),
        )
        .unwrap();
        std::fs::write(
            &routes,
            format!(
                "routes:\n  - sni: \"{SNI_BACKEND}\"\n    endpoints: [\"{LOCAL}:{BACKEND}\"]\n"
            ),
        )
        .unwrap();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/zi-test-{}", unique_suffix()));
        let log = dir.path().join("agent.log");
        let out = std::fs::File::create(&log).unwrap();
        let bounding: String = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{}", c.to_ascii_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let child = ns
            .command("setpriv")
            .args([
                "--inh-caps=-all",
                "--ambient-caps=-all",
                &format!("--bounding-set={bounding}"),
                "--no-new-privs",
                "--",
            ])
            .arg(agent_binary())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--routes")
            .arg(&routes)
            .args(["--datapath", "sockmap", "--pin-dir"])
            .arg(&pin_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn setpriv (util-linux) with the agent");
        Restricted {
            child,
            pin_dir,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ok once /ready says READY; Err(exit status + log) if the agent exits first.
    async fn ready_or_exit(&mut self, ns: &Netns, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("exited with {status}: {}", self.log()));
            }
            if let Ok((200, body)) = http_get(ns, SocketAddr::from((LOCAL, ADMIN)), "/ready").await
                && body.contains("READY")
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the agent neither became ready nor exited within {limit:?}: {}",
            self.log()
        );
    }

    /// The effective capability mask of the agent process.
    fn cap_eff(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .unwrap()
            .trim();
        u64::from_str_radix(hex, 16).unwrap()
    }
}

impl Drop for Restricted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if std::thread::panicking() {
            eprintln!("agent log:\n{}", self.log());
        }
    }
}

fn mask(caps: &BTreeSet<String>) -> u64 {
    caps.iter().map(|c| 1u64 << cap_bit(c)).sum()
}

fn new_ns() -> Netns {
    Netns::new(&format!("zi-{}-caps", unique_suffix()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_capabilities_load_pin_and_splice() {
    require_root();
    run_test(Duration::from_secs(60), async {
        let caps = daemonset_caps();
        assert_eq!(
            caps,
            unit_caps(),
            "the DaemonSet and the systemd unit grant different capabilities"
        );
        let ns = new_ns();
        let mut backend =
            Backend::start(&ns, SocketAddr::from((LOCAL, BACKEND)), Behaviour::Echo).await;
        let mut agent = Restricted::start(&ns, &caps);
        agent
            .ready_or_exit(&ns, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("with only {caps:?} the agent did not start: {e}"));
        // Once loaded, the agent drops what it no longer needs (zone-ingress/src/agent.rs,
        // drop_capabilities): what is left is a subset of what it was given.
        let eff = agent.cap_eff();
        assert_eq!(
            eff & !mask(&caps),
            0,
            "the agent ran with capabilities beyond {caps:?} (CapEff {eff:#x})"
        );
        // CAP_NET_ADMIN stays for the splice's local redirect (SO_SNDBUFFORCE).
        assert_eq!(
            eff,
            1 << cap_bit("NET_ADMIN"),
            "after loading, the agent should hold CAP_NET_ADMIN alone (no XDP guard in play); CapEff {eff:#x}"
        );
        for map in ["ZI_SOCKS", "ZI_FLOWS", "ZI_CTRL"] {
            assert!(
                Path::new(&agent.pin_dir).join(map).exists(),
                "{map} is not pinned under {}",
                agent.pin_dir.display()
            );
        }
        // One real mTLS flow through the kernel splice.
        let mut s = tls::connect(&ns, SocketAddr::from((LOCAL, LISTEN)), SNI_BACKEND)
            .await
            .expect("mTLS through the agent");
        tls::echo_roundtrip(&mut s, b"spliced with two capabilities")
            .await
            .expect("echo through the splice");
        drop(s);
        let outcome = backend.outcome(Duration::from_secs(10)).await;
        assert_eq!(outcome.sni.as_deref(), Some(SNI_BACKEND));
        let (code, text) = http_get(&ns, SocketAddr::from((LOCAL, ADMIN)), "/stats/prometheus")
            .await
            .expect("metrics");
        assert_eq!(code, 200);
        let m = Metrics::parse(&text);
        // The backend is local to the agent's namespace: with the local redirect (the default)
        // the flow is spliced as `sockmap_local`.
        assert_eq!(
            m.get("zone_ingress_flows_total", &[("datapath", "sockmap")])
                + m.get("zone_ingress_flows_total", &[("datapath", "sockmap_local")]),
            1.0,
            "the flow was not spliced: {}",
            m.dump("zone_ingress_")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_deployment_capability_is_needed() {
    require_root();
    run_test(Duration::from_secs(60), async {
        let caps = daemonset_caps();
        assert!(!caps.is_empty());
        for dropped in &caps {
            let fewer: BTreeSet<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
            let ns = new_ns();
            let mut agent = Restricted::start(&ns, &fewer);
            if dropped == "PERFMON" {
                // Needed for the verdict's retransmission trim, not to splice: the agent starts
                // and says what it cannot do.
                agent
                    .ready_or_exit(&ns, Duration::from_secs(20))
                    .await
                    .unwrap_or_else(|e| panic!("without CAP_PERFMON the agent did not start: {e}"));
                let log = agent.log();
                assert!(
                    log.contains("no CAP_PERFMON") && log.contains("not trimmed"),
                    "without CAP_PERFMON the agent should warn that it cannot trim repeats: {log}"
                );
                continue;
            }
            let err = match agent.ready_or_exit(&ns, Duration::from_secs(20)).await {
                Ok(()) => panic!("without CAP_{dropped} the agent still loaded its programs"),
                Err(e) => e,
            };
            assert!(
                err.contains("--datapath sockmap needs the BPF programs")
                    && err.contains(&format!("missing CAP_{dropped}")),
                "without CAP_{dropped}: expected a refused BPF load naming the capability, got: {err}"
            );
        }
    })
    .await;
}
