//! The Kuma control-plane session against a test CP (tests/src/cp.rs): real HTTPS `/bootstrap`,
//! real gRPC ADS over TLS, RS256 zone tokens. Every shared Kuma fixture is served with its
//! endpoints pointed at test backends, and real TLS flows (openssl s_client, since Kuma's legacy
//! SNIs are not DNS names) must reach the right endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::google::protobuf;
use tokio::io::AsyncReadExt;
use zone_ingress_tests::agent::{ADMIN_PORT, Agent, Datapath, INGRESS_PORT, zone_ingress_yaml};
use zone_ingress_tests::cp::{CLA_TYPE, CLUSTER_TYPE, CpPki, LISTENER_TYPE, TestCp, ZoneKeys};
use zone_ingress_tests::netns::{BACKEND_V4, INGRESS_V4, Netns, Topology};
use zone_ingress_tests::tls::{self, OpensslRevServer};
use zone_ingress_tests::{run_test, xds_build};

const ZONE: &str = "zone-b";
const CP_PORT: u16 = 5678;
/// The openssl s_server every tap forwards to.
const REV_PORT: u16 = 8443;

fn cp_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(BACKEND_V4), CP_PORT)
}

fn ingress() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(INGRESS_V4), INGRESS_PORT)
}

fn admin_listener() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(INGRESS_V4), ADMIN_PORT)
}

/// The test CP, its CA and signing key, in the backend namespace.
struct ControlPlane {
    pki: CpPki,
    keys: Arc<ZoneKeys>,
    cp: TestCp,
}

async fn control_plane(topo: &Topology) -> ControlPlane {
    let pki = CpPki::new(IpAddr::V4(BACKEND_V4));
    let keys = Arc::new(ZoneKeys::generate("1"));
    let cp = TestCp::start(
        &topo.backend,
        cp_addr(),
        &pki,
        keys.clone(),
        ZONE,
        ADMIN_PORT,
    )
    .await;
    ControlPlane { pki, keys, cp }
}

/// Writes `token` (mode 600) and the ZoneIngress resource next to each other; returns the
/// agent's control-plane flags.
fn cp_args(
    dir: &std::path::Path,
    cp: &ControlPlane,
    token: Option<&str>,
    ca: &std::path::Path,
) -> Vec<OsString> {
    let zi = dir.join("zone-ingress.yaml");
    std::fs::write(&zi, zone_ingress_yaml()).expect("write the ZoneIngress");
    let mut args: Vec<OsString> = vec![
        "--cp-address".into(),
        cp.cp.url().into(),
        "--ca-cert-file".into(),
        ca.into(),
        "--dataplane-file".into(),
        zi.into(),
    ];
    if let Some(token) = token {
        let path = dir.join("token");
        std::fs::write(&path, token).expect("write the token");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the token");
        args.extend(["--dataplane-token-file".into(), path.into()]);
    }
    args
}

fn valid_token(cp: &ControlPlane) -> String {
    cp.keys.token(ZONE, &["ingress"], Duration::from_secs(3600))
}

/// Starts the agent against the CP; does not wait for readiness.
fn start_agent<'ns>(
    topo: &'ns Topology,
    cp: &ControlPlane,
    token: Option<&str>,
    dp: Datapath,
    scratch: &tempfile::TempDir,
) -> Agent<'ns> {
    let args = cp_args(scratch.path(), cp, token, &cp.pki.ca_pem_path);
    Agent::start_with_args(&topo.ingress, dp, &args)
}

/// TCP forwarders, one per fixture endpoint, in front of one `openssl s_server -rev`: a flow's
/// bytes are real TLS end to end, and the tap it went through says which endpoint was picked.
struct Taps {
    counts: BTreeMap<SocketAddr, Arc<AtomicU32>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Taps {
    async fn start(ns: &Netns, addrs: Vec<SocketAddr>, target: SocketAddr) -> Taps {
        let counts: BTreeMap<SocketAddr, Arc<AtomicU32>> = addrs
            .iter()
            .map(|a| (*a, Arc::new(AtomicU32::new(0))))
            .collect();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let task_counts = counts.clone();
        // The forwarders run on a thread inside the backend namespace, so their outgoing
        // connections to s_server are made there.
        let _thread = ns.spawn(move || async move {
            let mut listeners = Vec::new();
            for (addr, count) in task_counts {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => listeners.push((l, count)),
                    Err(e) => {
                        let _ = bound_tx.send(Err(format!("tap bind {addr}: {e}")));
                        return;
                    }
                }
            }
            let _ = bound_tx.send(Ok(()));
            for (l, count) in listeners {
                tokio::spawn(async move {
                    while let Ok((mut down, _)) = l.accept().await {
                        count.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(async move {
                            if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                            }
                        });
                    }
                });
            }
            let _ = stop_rx.await;
        });
        bound_rx
            .await
            .expect("tap thread")
            .unwrap_or_else(|e| panic!("{e}"));
        Taps {
            counts,
            stop: Some(stop),
        }
    }

    fn snapshot(&self) -> BTreeMap<SocketAddr, u32> {
        self.counts
            .iter()
            .map(|(a, c)| (*a, c.load(Ordering::SeqCst)))
            .collect()
    }
}

impl Drop for Taps {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// One real TLS exchange with `sni` through the agent; returns the tap (endpoint) it reached.
async fn flow_endpoint(topo: &Topology, taps: &Taps, sni: &str) -> SocketAddr {
    let before = taps.snapshot();
    let msg = format!("hello {sni}\n");
    let got = tls::openssl_echo(&topo.client, ingress(), sni, msg.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("TLS flow with SNI {sni:?} through the agent: {e}"));
    let want: String = msg.trim_end().chars().rev().collect::<String>() + "\n";
    assert_eq!(
        String::from_utf8_lossy(&got),
        want,
        "s_server -rev answer for {sni}"
    );
    let after = taps.snapshot();
    let moved: Vec<SocketAddr> = after
        .iter()
        .filter(|(a, n)| before.get(a) != Some(n))
        .map(|(a, _)| *a)
        .collect();
    assert_eq!(
        moved.len(),
        1,
        "SNI {sni}: exactly one endpoint must see the flow, saw {moved:?}"
    );
    moved[0]
}

/// The agent's applied route table, from `/config_dump`: SNI -> sorted endpoints.
async fn applied_routes(agent: &Agent<'_>) -> Option<BTreeMap<String, Vec<String>>> {
    let (code, body) = agent.get("/config_dump").await.ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let mut out = BTreeMap::new();
    for r in v["route_table"]["routes"].as_array()? {
        let mut eps: Vec<String> = r["endpoints"]
            .as_array()?
            .iter()
            .filter_map(|e| e.as_str().map(str::to_owned))
            .collect();
        eps.sort();
        out.insert(r["sni"].as_str()?.to_owned(), eps);
    }
    Some(out)
}

async fn wait_applied(agent: &Agent<'_>, want: &BTreeMap<String, Vec<String>>, limit: Duration) {
    let start = Instant::now();
    loop {
        let got = applied_routes(agent).await;
        if got.as_ref() == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "the agent did not apply the pushed routes within {limit:?}\nwant {want:#?}\ngot {got:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The route table a fixture resolves to (the resolver itself is checked against hand-written
/// expectations in zone-ingress/tests/xds_routes.rs).
fn expected(
    res: &zone_ingress::xds::model::Resources,
) -> (BTreeMap<String, Vec<String>>, Option<Vec<u8>>) {
    let routes = zone_ingress::xds::route_table(res).expect("fixture resolves");
    let map = routes
        .routes
        .iter()
        .map(|r| {
            let mut eps: Vec<String> = r.endpoints.iter().map(|e| e.address.to_string()).collect();
            eps.sort();
            (r.sni.clone(), eps)
        })
        .collect();
    (map, routes.direct_response)
}

async fn every_fixture_through_the_cp(dp: Datapath) {
    let topo = Topology::new();
    let cp = control_plane(&topo).await;
    let _rev = OpensslRevServer::start(&topo.backend, REV_PORT).await;
    let scratch = tempfile::tempdir().expect("scratch dir");
    let token = valid_token(&cp);
    let mut agent = start_agent(&topo, &cp, Some(&token), dp, &scratch);

    // Bootstrapped but no listener yet: NOT_READY (Kuma's semantics).
    let start = Instant::now();
    loop {
        match agent.get("/ready").await {
            Ok((503, body)) => {
                assert_eq!(body.trim(), "NOT_READY");
                break;
            }
            Ok((code, body)) => panic!("/ready before any listener: HTTP {code} {body}"),
            Err(_) => {
                assert!(agent.is_running(), "agent exited: {}", agent.stderr());
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "admin API never came up"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    // What the agent told the CP.
    let boot = cp.cp.bootstrap_requests();
    let b = boot.first().expect("one bootstrap request");
    assert_eq!(b["name"], "zi-test");
    assert_eq!(b["proxyType"], "ingress");
    assert_eq!(b["mesh"], "");
    assert_eq!(b["dataplaneToken"], token.as_str());
    assert_eq!(b["readinessPort"], 9902);
    let resource: serde_json::Value =
        serde_json::from_str(b["dataplaneResource"].as_str().expect("dataplaneResource"))
            .expect("resource JSON");
    assert_eq!(resource["type"], "ZoneIngress");
    assert_eq!(resource["networking"]["port"], INGRESS_PORT);
    let nodes = cp.cp.nodes();
    let node = nodes
        .first()
        .expect("the node rides on the first ADS request");
    assert_eq!(node.id, ".zi-test");
    assert_eq!(node.cluster, "ingress");
    let md = &node.metadata.as_ref().expect("node metadata").fields;
    let string = |k: &str| match md.get(k).and_then(|v| v.kind.clone()) {
        Some(protobuf::value::Kind::StringValue(s)) => s,
        other => panic!("node metadata {k}: expected a string, got {other:?}"),
    };
    assert_eq!(string("dataplane.proxyType"), "ingress");
    assert_eq!(string("dataplane.admin.port"), ADMIN_PORT.to_string());
    assert_eq!(string("dataplane.readinessReporter.port"), "9902");
    assert!(string("dataplane.resource").contains("\"ZoneIngress\""));

    let mut next_port = 20000u16;
    let mut pushes = 0;
    for path in xds_build::fixture_files() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut ports = std::iter::from_fn(|| {
            next_port += 1;
            Some(SocketAddr::new(IpAddr::V4(BACKEND_V4), next_port))
        });
        let (model, map) = xds_build::fixture(&path, ingress(), &mut ports);
        let taps = Taps::start(
            &topo.backend,
            map.values().copied().collect(),
            SocketAddr::new(IpAddr::V4(BACKEND_V4), REV_PORT),
        )
        .await;
        let (want, direct) = expected(&model);
        let version = cp
            .cp
            .push(xds_build::encode(&model, Some(admin_listener())));
        pushes += 1;
        let lds = cp
            .cp
            .wait_answer(LISTENER_TYPE, &version, Duration::from_secs(10))
            .await;
        assert!(lds.error.is_none(), "{name}: LDS NACKed: {:?}", lds.error);
        let cds = cp
            .cp
            .wait_answer(CLUSTER_TYPE, &version, Duration::from_secs(10))
            .await;
        assert!(cds.error.is_none(), "{name}: CDS NACKed: {:?}", cds.error);
        wait_applied(&agent, &want, Duration::from_secs(10)).await;
        if pushes == 1 {
            agent.wait_ready(Duration::from_secs(10)).await;
        }
        for (sni, eps) in &want {
            if eps.is_empty() {
                // Kuma keeps a MeshService without healthy endpoints: accepted, then reset.
                let r = tls::openssl_echo(&topo.client, ingress(), sni, b"x\n").await;
                assert!(
                    r.is_err(),
                    "{name}: SNI {sni} has no endpoints but got an answer"
                );
                continue;
            }
            // Round robin over equal weights: n flows reach each of the n endpoints once.
            let mut reached = BTreeSet::new();
            for _ in 0..eps.len() {
                reached.insert(flow_endpoint(&topo, &taps, sni).await.to_string());
            }
            let want_set: BTreeSet<String> = eps.iter().cloned().collect();
            assert_eq!(
                reached, want_set,
                "{name}: SNI {sni} reached the wrong endpoints"
            );
        }
        // Kuma's dashboard series for the clusters of this snapshot.
        let routes = zone_ingress::xds::route_table(&model).expect("fixture resolves");
        let mut membership: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
        for r in &routes.routes {
            membership
                .entry(r.cluster.replace(':', "_"))
                .or_default()
                .extend(r.endpoints.iter().map(|e| e.address));
        }
        let m = agent.metrics().await;
        for (cluster, eps) in &membership {
            let label = [("envoy_cluster_name", cluster.as_str())];
            assert_eq!(
                m.get("envoy_cluster_membership_healthy", &label),
                eps.len() as f64,
                "{name}: membership of {cluster}\n{}",
                m.dump("envoy_cluster")
            );
            assert!(
                m.get("envoy_cluster_update_success", &label) >= 1.0,
                "{name}: EDS updates of {cluster}\n{}",
                m.dump("envoy_cluster")
            );
        }
        if let Some(bytes) = direct {
            // The zero-cluster answer: any SNI gets the bytes, then EOF.
            let mut tcp = topo.client.connect(ingress()).await.expect("connect");
            use tokio::io::AsyncWriteExt;
            tcp.write_all(&zone_ingress_tests::wire::client_hello_bytes(
                "whatever.example",
            ))
            .await
            .expect("send a ClientHello");
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got))
                .await
                .expect("direct response within 5 s")
                .expect("read the direct response");
            assert_eq!(got, bytes, "{name}: direct_response bytes");
        }
    }
    let m = agent.metrics().await;
    assert_eq!(
        m.get("envoy_control_plane_connected_state", &[]),
        1.0,
        "{}",
        m.dump("envoy")
    );
    assert!(m.get("envoy_listener_manager_lds_update_success", &[]) >= pushes as f64);
    assert_eq!(
        m.get("envoy_listener_manager_lds_update_rejected", &[]),
        0.0
    );
    assert!(
        cp.cp.acks().iter().all(|a| a.error.is_none()),
        "{:#?}",
        cp.cp.acks()
    );
    assert!(
        cp.cp.acks().iter().any(|a| a.type_url == CLA_TYPE),
        "EDS was never ACKed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_through_the_cp_auto() {
    run_test(
        Duration::from_secs(240),
        every_fixture_through_the_cp(Datapath::Auto),
    )
    .await
}

/// A fixture-like snapshot with one SNI per entry, each to its own tap.
fn simple_snapshot(snis: &[(&str, SocketAddr)]) -> zone_ingress::xds::model::Resources {
    use zone_ingress::xds::model::*;
    let sa = |a: SocketAddr| SocketAddress {
        address: a.ip().to_string(),
        port_value: u32::from(a.port()),
    };
    Resources {
        listeners: vec![Listener {
            name: format!("inbound:{}", ingress()),
            address: sa(ingress()),
            listener_filters: vec!["envoy.filters.listener.tls_inspector".into()],
            filter_chains: snis
                .iter()
                .map(|(sni, _)| FilterChain {
                    server_names: vec![(*sni).to_owned()],
                    transport_protocol: "tls".into(),
                    filters: vec![NetworkFilter::TcpProxy(TcpProxy {
                        cluster: format!("default:{sni}"),
                        metadata_match: Default::default(),
                    })],
                })
                .collect(),
        }],
        clusters: snis
            .iter()
            .map(|(sni, _)| Cluster {
                name: format!("default:{sni}"),
                discovery_type: DiscoveryType::Eds,
                eds_service_name: None,
                connect_timeout: Some(Duration::from_secs(5)),
                lb_subset_config: None,
            })
            .collect(),
        load_assignments: snis
            .iter()
            .map(|(sni, a)| ClusterLoadAssignment {
                cluster_name: format!("default:{sni}"),
                endpoints: vec![LocalityLbEndpoints {
                    zone: String::new(),
                    priority: 0,
                    lb_endpoints: vec![LbEndpoint {
                        address: sa(*a),
                        load_balancing_weight: Some(1),
                        lb_metadata: Default::default(),
                    }],
                }],
            })
            .collect(),
    }
}

const SNI_A: &str = "backend{mesh=default}";
const SNI_B: &str = "web{mesh=default}";

fn tap_a() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(BACKEND_V4), 21001)
}

fn tap_b() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(BACKEND_V4), 21002)
}

async fn taps(topo: &Topology) -> Taps {
    Taps::start(
        &topo.backend,
        vec![tap_a(), tap_b()],
        SocketAddr::new(IpAddr::V4(BACKEND_V4), REV_PORT),
    )
    .await
}

/// The CP pushes one route (`SNI_A` to tap A) and an agent on `dp` starts against it and routes
/// a first flow there. Returns the s_server, the taps, the agent's scratch dir and the agent.
async fn agent_on_one_route<'ns>(
    topo: &'ns Topology,
    cp: &ControlPlane,
    dp: Datapath,
) -> (OpensslRevServer, Taps, tempfile::TempDir, Agent<'ns>) {
    let rev = OpensslRevServer::start(&topo.backend, REV_PORT).await;
    let taps = taps(topo).await;
    let scratch = tempfile::tempdir().expect("scratch dir");
    cp.cp.push(xds_build::encode(
        &simple_snapshot(&[(SNI_A, tap_a())]),
        None,
    ));
    let mut agent = start_agent(topo, cp, Some(&valid_token(cp)), dp, &scratch);
    agent.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(flow_endpoint(topo, &taps, SNI_A).await, tap_a());
    (rev, taps, scratch, agent)
}

async fn nack_keeps_old_routes_then_update_adds_sni() {
    let topo = Topology::new();
    let cp = control_plane(&topo).await;
    let (_rev, taps, _scratch, agent) = agent_on_one_route(&topo, &cp, Datapath::Userspace).await;

    // A listener with a field the agent does not implement (per_connection_buffer_limit_bytes,
    // #5) that also adds SNI B: NACKed whole, A keeps working, B stays unknown.
    let good = simple_snapshot(&[(SNI_A, tap_a()), (SNI_B, tap_b())]);
    let mut bad = xds_build::encode(&good, None);
    let mut l = xds_build::listener(&good.listeners[0]);
    l.per_connection_buffer_limit_bytes = Some(protobuf::UInt32Value { value: 1024 });
    bad.listeners = vec![xds_build::any(&l)];
    let version = cp.cp.push(bad);
    let nack = cp
        .cp
        .wait_answer(LISTENER_TYPE, &version, Duration::from_secs(10))
        .await;
    let detail = nack.error.expect("the listener must be NACKed");
    assert!(
        detail.contains("#5") && detail.contains("Listener"),
        "NACK detail: {detail}"
    );
    assert_eq!(flow_endpoint(&topo, &taps, SNI_A).await, tap_a());
    assert!(
        tls::openssl_echo(&topo.client, ingress(), SNI_B, b"b\n")
            .await
            .is_err(),
        "SNI B came in with a NACKed listener"
    );
    let m = agent.metrics().await;
    assert_eq!(
        m.get("envoy_listener_manager_lds_update_rejected", &[]),
        1.0,
        "{}",
        m.dump("envoy")
    );
    assert!(agent.stderr().contains("NACK"), "the rejection is logged");

    // The fixed update adds B; the next flow uses it.
    let version = cp.cp.push(xds_build::encode(&good, None));
    let ack = cp
        .cp
        .wait_answer(LISTENER_TYPE, &version, Duration::from_secs(10))
        .await;
    assert!(ack.error.is_none(), "{:?}", ack.error);
    let mut want = BTreeMap::new();
    want.insert(SNI_A.to_owned(), vec![tap_a().to_string()]);
    want.insert(SNI_B.to_owned(), vec![tap_b().to_string()]);
    wait_applied(&agent, &want, Duration::from_secs(10)).await;
    assert_eq!(flow_endpoint(&topo, &taps, SNI_B).await, tap_b());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_keeps_old_routes_then_an_update_adds_an_sni() {
    run_test(
        Duration::from_secs(90),
        nack_keeps_old_routes_then_update_adds_sni(),
    )
    .await
}

async fn cp_outage() {
    let topo = Topology::new();
    let cp = control_plane(&topo).await;
    let (_rev, taps, _scratch, mut agent) = agent_on_one_route(&topo, &cp, Datapath::Auto).await;

    // The CP dies: traffic goes on, the agent says it is disconnected.
    cp.cp.stop();
    let m = agent
        .metrics_until(Duration::from_secs(10), |m| {
            m.get("envoy_control_plane_connected_state", &[]) == 0.0
        })
        .await;
    assert_eq!(m.get("envoy_control_plane_connected_state", &[]), 0.0);
    for _ in 0..3 {
        assert_eq!(flow_endpoint(&topo, &taps, SNI_A).await, tap_a());
    }
    assert!(agent.is_running());
    let streams_before = cp.cp.streams_opened();

    // It comes back with a new SNI: the agent reconnects on its own and applies it.
    cp.cp.push(xds_build::encode(
        &simple_snapshot(&[(SNI_A, tap_a()), (SNI_B, tap_b())]),
        None,
    ));
    let revived = TestCp::restart(&topo.backend, &cp.pki, &cp.cp).await;
    let mut want = BTreeMap::new();
    want.insert(SNI_A.to_owned(), vec![tap_a().to_string()]);
    want.insert(SNI_B.to_owned(), vec![tap_b().to_string()]);
    wait_applied(&agent, &want, Duration::from_secs(40)).await;
    assert!(
        revived.streams_opened() > streams_before,
        "no new ADS stream"
    );
    assert_eq!(flow_endpoint(&topo, &taps, SNI_B).await, tap_b());
    let m = agent.metrics().await;
    assert_eq!(m.get("envoy_control_plane_connected_state", &[]), 1.0);
    assert!(
        agent
            .stderr()
            .contains("ADS stream to the control plane ended"),
        "the outage is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_outage_keeps_traffic_and_reconnects() {
    run_test(Duration::from_secs(120), cp_outage()).await
}

/// A control plane that stalls: first its ADS streams open and never answer, then it accepts TCP
/// and never answers TLS. The agent times out each (`ZONE_INGRESS_CP_RESPONSE_TIMEOUT`, 2 s
/// here), logs it, retries, and keeps routing on the last applied table.
async fn cp_stalls() {
    let topo = Topology::new();
    let cp = control_plane(&topo).await;
    let _rev = OpensslRevServer::start(&topo.backend, REV_PORT).await;
    let taps = taps(&topo).await;
    let scratch = tempfile::tempdir().expect("scratch dir");
    cp.cp.push(xds_build::encode(
        &simple_snapshot(&[(SNI_A, tap_a())]),
        None,
    ));
    let args = cp_args(
        scratch.path(),
        &cp,
        Some(&valid_token(&cp)),
        &cp.pki.ca_pem_path,
    );
    let env = [(
        "ZONE_INGRESS_CP_RESPONSE_TIMEOUT".to_string(),
        "2".to_string(),
    )];
    let mut agent = Agent::start_with_args_env(&topo.ingress, Datapath::Auto, &args, &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(flow_endpoint(&topo, &taps, SNI_A).await, tap_a());

    // 1. ADS streams open but stay silent: each is given up after 2 s and retried.
    cp.cp.stall_ads(true);
    cp.cp.stop();
    // Once the agent saw its stream end, the old server (and its listener) is gone.
    agent
        .metrics_until(Duration::from_secs(10), |m| {
            m.get("envoy_control_plane_connected_state", &[]) == 0.0
        })
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stalled = TestCp::restart(&topo.backend, &cp.pki, &cp.cp).await;
    let before = stalled.streams_opened();
    let start = Instant::now();
    while stalled.streams_opened() < before + 2 && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stalled.streams_opened() >= before + 2,
        "the agent did not give up a silent ADS stream and retry within 20 s ({} streams):\n{}",
        stalled.streams_opened() - before,
        agent.stderr()
    );
    assert!(
        agent
            .stderr()
            .contains("sent no response within 2s (stalled CP)"),
        "the stall is logged:\n{}",
        agent.stderr()
    );
    assert_eq!(flow_endpoint(&topo, &taps, SNI_A).await, tap_a());

    // 2. The CP accepts TCP and never answers the TLS handshake.
    stalled.stop();
    // The aborted server drops its listener when its task is next polled: retry the bind a while.
    let mut bound = None;
    for _ in 0..50 {
        let addr = cp_addr();
        match topo.backend.exec(move || std::net::TcpListener::bind(addr)) {
            Ok(l) => {
                bound = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let std_listener = bound.expect("bind the stalling listener on the CP's address within 5 s");
    std_listener.set_nonblocking(true).expect("non-blocking");
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("register the listener");
    let accepted = Arc::new(AtomicU32::new(0));
    let (hold_stop, hold_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let count = accepted.clone();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        tokio::select! {
            _ = hold_stop_rx => {}
            () = async {
                // Bounded: the agent retries with a backoff, a handful of connections at most.
                while held.len() < 64 {
                    let Ok((tcp, _)) = listener.accept().await else { break };
                    count.fetch_add(1, Ordering::SeqCst);
                    held.push(tcp);
                }
            } => {}
        }
    });
    let start = Instant::now();
    let handshake_timeout = "did not complete the TLS handshake within 2s";
    while !agent.stderr().contains(handshake_timeout) && start.elapsed() < Duration::from_secs(45) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = hold_stop.send(());
    let _ = holder.await;
    assert!(
        accepted.load(Ordering::SeqCst) >= 1 && agent.stderr().contains(handshake_timeout),
        "the agent must give up a TLS handshake the CP never answers, and say so ({} connections):\n{}",
        accepted.load(Ordering::SeqCst),
        agent.stderr()
    );
    assert!(agent.is_running());
    for _ in 0..3 {
        assert_eq!(flow_endpoint(&topo, &taps, SNI_A).await, tap_a());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_stalls_time_out_and_keep_traffic() {
    run_test(Duration::from_secs(120), cp_stalls()).await
}

async fn bad_token(make: impl FnOnce(&ControlPlane) -> Option<String>, expect_in_cp: &str) {
    let topo = Topology::new();
    let cp = control_plane(&topo).await;
    let scratch = tempfile::tempdir().expect("scratch dir");
    cp.cp.push(xds_build::encode(
        &simple_snapshot(&[(SNI_A, tap_a())]),
        None,
    ));
    let token = make(&cp);
    let mut agent = start_agent(&topo, &cp, token.as_deref(), Datapath::Userspace, &scratch);
    let status = agent.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "the agent must fail: {status}");
    let err = agent.stderr();
    assert!(
        err.contains("the control plane rejected the dataplane token"),
        "stderr must say the token was rejected:\n{err}"
    );
    if let Some(t) = &token {
        assert!(!err.contains(t.as_str()), "the token must never be logged");
    }
    let rejected = cp.cp.rejected_tokens();
    assert!(
        rejected.iter().any(|r| r.contains(expect_in_cp)),
        "CP-side reason {expect_in_cp:?} not in {rejected:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_signed_by_another_key_is_rejected() {
    run_test(Duration::from_secs(60), async {
        let other = ZoneKeys::generate("1");
        let token = other.token(ZONE, &["ingress"], Duration::from_secs(600));
        bad_token(|_| Some(token), "could not parse token").await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_ingress_scope_is_rejected() {
    run_test(Duration::from_secs(60), async {
        bad_token(
            |cp| Some(cp.keys.token(ZONE, &["egress"], Duration::from_secs(600))),
            "does not have the ingress scope",
        )
        .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_is_rejected() {
    run_test(Duration::from_secs(60), async {
        bad_token(|_| None, "no authorization metadata").await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_mismatch_is_refused() {
    run_test(Duration::from_secs(60), async {
        let topo = Topology::new();
        let cp = control_plane(&topo).await;
        let other_ca = CpPki::new(IpAddr::V4(BACKEND_V4));
        let scratch = tempfile::tempdir().expect("scratch dir");
        let args = cp_args(
            scratch.path(),
            &cp,
            Some(&valid_token(&cp)),
            &other_ca.ca_pem_path,
        );
        let mut agent = Agent::start_with_args(&topo.ingress, Datapath::Userspace, &args);
        let status = agent.wait_exit(Duration::from_secs(20)).await;
        assert!(!status.success());
        let err = agent.stderr();
        assert!(
            err.contains("certificate") && err.contains("--ca-cert-file"),
            "{err}"
        );
        assert!(
            cp.cp.bootstrap_requests().is_empty(),
            "no request may reach an unverified CP"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_404_is_retried_and_422_is_final() {
    run_test(Duration::from_secs(90), async {
        let topo = Topology::new();
        let cp = control_plane(&topo).await;
        let scratch = tempfile::tempdir().expect("scratch dir");
        cp.cp.push(xds_build::encode(
            &simple_snapshot(&[(SNI_A, tap_a())]),
            None,
        ));
        cp.cp.fail_bootstrap_with_404s(1);
        let started = Instant::now();
        let mut agent = start_agent(
            &topo,
            &cp,
            Some(&valid_token(&cp)),
            Datapath::Userspace,
            &scratch,
        );
        agent.wait_ready(Duration::from_secs(20)).await;
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "kuma-dp waits 3 s between attempts"
        );
        assert_eq!(cp.cp.bootstrap_requests().len(), 2);
        drop(agent);

        cp.cp.fail_bootstrap(
            422,
            "networking.advertisedPort: must be set with advertisedAddress",
        );
        let scratch2 = tempfile::tempdir().expect("scratch dir");
        let mut agent = start_agent(
            &topo,
            &cp,
            Some(&valid_token(&cp)),
            Datapath::Userspace,
            &scratch2,
        );
        let status = agent.wait_exit(Duration::from_secs(20)).await;
        assert!(!status.success());
        let err = agent.stderr();
        assert!(
            err.contains("HTTP 422") && err.contains("advertisedPort: must be set"),
            "the CP's validation error reaches the operator:\n{err}"
        );
    })
    .await
}

/// Hot restart in control-plane mode: the new agent bootstraps and opens its own ADS stream,
/// takes the listener and admin sockets from the running agent once its first snapshot names the
/// listener, and the old agent exits 0; flows keep being routed, spliced, by the new one.
async fn cp_upgrade() {
    let topo = Topology::new();
    let cp = control_plane(&topo).await;
    let (_rev, taps, _scratch, mut old) = agent_on_one_route(&topo, &cp, Datapath::Sockmap).await;
    let streams = cp.cp.streams_opened();

    let mut new = old.upgrade();
    let status = old.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "the old agent exited with {status}:\n{}",
        old.stderr()
    );
    new.wait_ready(Duration::from_secs(20)).await;
    let log = new.stderr();
    assert!(
        log.contains("hot restart: took over"),
        "the new agent logged no takeover:\n{log}"
    );
    assert!(
        cp.cp.streams_opened() > streams,
        "the new agent opened no ADS stream of its own"
    );
    for _ in 0..3 {
        assert_eq!(flow_endpoint(&topo, &taps, SNI_A).await, tap_a());
    }
    let m = new.metrics().await;
    assert_eq!(m.get("envoy_control_plane_connected_state", &[]), 1.0);
    assert!(
        m.get("zone_ingress_flows_total", &[("datapath", "sockmap")]) >= 3.0,
        "the new agent did not splice the flows:\n{}",
        m.dump("zone_ingress")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_mode_hot_restart() {
    run_test(Duration::from_secs(120), cp_upgrade()).await
}
