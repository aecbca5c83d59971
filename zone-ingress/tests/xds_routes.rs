//! `zone-ingress routes --xds FILE --json` on every Kuma golden file in tests/fixtures/xds
//! (copied from Kuma v2.14.3's pkg/xds/generator/testdata/ingress, Apache-2.0, see NOTICE there).
//! Each expectation was written by reading the YAML, not by running the code.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/xds")
        .join(name)
}

fn zone_ingress(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zone-ingress"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("ZONE_INGRESS_ROUTES")
        .env_remove("ZONE_INGRESS_XDS_FILE")
        .output()
        .expect("run zone-ingress")
}

fn routes_json(name: &str) -> Value {
    let path = fixture(name);
    let out = zone_ingress(&["routes", "--xds", path.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{name}: exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[test]
fn json_keys_are_in_the_documented_order() {
    let path = fixture("01.envoy.golden.yaml");
    let out = zone_ingress(&["routes", "--xds", path.to_str().unwrap(), "--json"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"listener\":\"10.0.0.1:10001\",\"direct_response\":null,\"routes\":[{\"sni\":\"backend{mesh=mesh1}\",\
         \"cluster\":\"mesh1:backend\",\"endpoints\":[\"192.168.0.1:2521\",\"192.168.0.2:2521\"]}]}\n"
    );
}

#[test]
fn fixture_01_one_sni_whole_cluster() {
    assert_eq!(
        routes_json("01.envoy.golden.yaml"),
        json!({"listener": "10.0.0.1:10001", "direct_response": null, "routes": [
            {"sni": "backend{mesh=mesh1}", "cluster": "mesh1:backend",
             "endpoints": ["192.168.0.1:2521", "192.168.0.2:2521"]}
        ]})
    );
}

#[test]
fn fixture_02_no_clusters_direct_response() {
    // inlineBytes eyJwcm94...fQ== is base64 for this JSON.
    assert_eq!(
        routes_json("02.envoy.golden.yaml"),
        json!({"listener": "10.0.0.1:10001",
               "direct_response": "{\"proxy\":\"default.ingress\",\"zone\":\"zone-main\"}",
               "routes": []})
    );
}

#[test]
fn fixture_03_two_single_key_selectors() {
    // Selectors [region] and [version], NO_FALLBACK; eu/v1 is .1, us/v2 is .2. `,` sorts before `}`.
    assert_eq!(
        routes_json("03.envoy.golden.yaml"),
        json!({"listener": "10.0.0.1:10001", "direct_response": null, "routes": [
            {"sni": "backend{mesh=mesh1,region=eu}", "cluster": "mesh1:backend",
             "endpoints": ["192.168.0.1:2521"]},
            {"sni": "backend{mesh=mesh1,version=v2}", "cluster": "mesh1:backend",
             "endpoints": ["192.168.0.2:2521"]},
            {"sni": "backend{mesh=mesh1}", "cluster": "mesh1:backend",
             "endpoints": ["192.168.0.1:2521", "192.168.0.2:2521"]}
        ]})
    );
}

#[test]
fn fixture_05_empty_load_assignment() {
    assert_eq!(
        routes_json("05.envoy.golden.yaml"),
        json!({"listener": "10.0.0.1:10001", "direct_response": null, "routes": [
            {"sni": "backend{mesh=mesh1}", "cluster": "mesh1:backend", "endpoints": []}
        ]})
    );
}

#[test]
fn fixture_mesh_service_hash_snis_empty_clusters() {
    assert_eq!(
        routes_json("mesh-service.envoy.golden.yaml"),
        json!({"listener": "10.0.0.1:10001", "direct_response": null, "routes": [
            {"sni": "a601e0c00295a9fbe.backend.80.default.ms",
             "cluster": "default_backend__east_msvc_80", "endpoints": []},
            {"sni": "aec60634adf0f45d6.backend2.80.default.ms",
             "cluster": "default_backend___msvc_80", "endpoints": []}
        ]})
    );
}

#[test]
fn fixture_meshgateway_two_meshes() {
    assert_eq!(
        routes_json("meshgateway.envoy.golden.yaml"),
        json!({"listener": "10.0.0.1:10001", "direct_response": null, "routes": [
            {"sni": "backend{mesh=mesh1}", "cluster": "mesh1:backend",
             "endpoints": ["192.168.0.1:2521"]},
            {"sni": "mesh-gateway{mesh=mesh2}", "cluster": "mesh2:mesh-gateway",
             "endpoints": ["192.168.0.2:80"]}
        ]})
    );
}

#[test]
fn fixture_with_meshhttproute_subset_two_key_selector() {
    // Selector [region, version]; the SNI's kuma.io/zone tag is not in metadata_match.
    assert_eq!(
        routes_json("with-meshhttproute-subset.envoy.golden.yaml"),
        json!({"listener": "10.0.0.1:10001", "direct_response": null, "routes": [
            {"sni": "backend{kuma.io/zone=zone,mesh=mesh1,region=eu,version=v1}",
             "cluster": "mesh1:backend", "endpoints": ["192.168.0.1:2521"]},
            {"sni": "backend{mesh=mesh1}", "cluster": "mesh1:backend",
             "endpoints": ["192.168.0.1:2521", "192.168.0.2:2521"]}
        ]})
    );
}

#[test]
fn fixture_with_meshhttproute() {
    assert_eq!(
        routes_json("with-meshhttproute.envoy.golden.yaml"),
        json!({"listener": "10.0.0.1:10001", "direct_response": null, "routes": [
            {"sni": "backend{mesh=mesh1,region=eu,version=v1}", "cluster": "mesh1:backend",
             "endpoints": ["192.168.0.1:2521"]},
            {"sni": "backend{mesh=mesh1}", "cluster": "mesh1:backend",
             "endpoints": ["192.168.0.1:2521", "192.168.0.2:2521"]}
        ]})
    );
}

#[test]
fn every_fixture_has_an_expectation() {
    let mut names: Vec<String> = std::fs::read_dir(fixture(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "01.envoy.golden.yaml",
            "02.envoy.golden.yaml",
            "03.envoy.golden.yaml",
            "05.envoy.golden.yaml",
            "mesh-service.envoy.golden.yaml",
            "meshgateway.envoy.golden.yaml",
            "with-meshhttproute-subset.envoy.golden.yaml",
            "with-meshhttproute.envoy.golden.yaml",
        ]
    );
}

#[test]
fn table_output_is_aligned() {
    let path = fixture("03.envoy.golden.yaml");
    let out = zone_ingress(&["routes", "--xds", path.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "listener 10.0.0.1:10001 (inbound:10.0.0.1:10001)\n\
         unknown SNI: closed without a byte\n\
         SNI                             CLUSTER        ENDPOINTS\n\
         backend{mesh=mesh1,region=eu}   mesh1:backend  192.168.0.1:2521\n\
         backend{mesh=mesh1,version=v2}  mesh1:backend  192.168.0.2:2521\n\
         backend{mesh=mesh1}             mesh1:backend  192.168.0.1:2521, 192.168.0.2:2521\n"
    );
}

#[test]
fn invalid_file_exits_1_naming_file_field_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(fixture("01.envoy.golden.yaml"))
        .unwrap()
        .replace("cluster: mesh1:backend", "cluster: mesh1:frontend");
    std::fs::write(&path, text).unwrap();
    let out = zone_ingress(&["routes", "--xds", path.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "{}: listener inbound:10.0.0.1:10001: filter chain 0 (server_names [\"backend{{mesh=mesh1}}\"]): tcp_proxy references cluster \"mesh1:frontend\" that is not in CDS",
            path.display()
        )
    );
    let out = zone_ingress(&["routes", "--xds", "/nonexistent/x.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .starts_with("/nonexistent/x.yaml: cannot read the file")
    );
}

#[test]
fn run_rejects_xds_file_with_routes() {
    let out = zone_ingress(&["run", "--routes", "a.yaml", "--xds-file", "b.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the argument '--routes <FILE>' cannot be used with '--xds-file <FILE>'"),
        "{err}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real ClientHello (rustls) for `sni`.
fn client_hello(sni: &str) -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// Kills the agent when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn run_xds_file_answers_unknown_sni_with_the_direct_response() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let zi = dir.path().join("zi.yaml");
    std::fs::write(
        &zi,
        format!(
            "type: ZoneIngress\nname: t\nnetworking:\n  address: 127.0.0.1\n  port: {port}\n  admin:\n    port: {admin}\n"
        ),
    )
    .unwrap();
    let fixture = fixture("02.envoy.golden.yaml");
    let _agent = Child(
        Command::new(env!("CARGO_BIN_EXE_zone-ingress"))
            .args(["run", "--datapath", "userspace", "--config"])
            .arg(&zi)
            .arg("--xds-file")
            .arg(&fixture)
            .arg("--pin-dir")
            .arg(dir.path().join("pins"))
            .env_remove("ZONE_INGRESS_ROUTES")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the agent"),
    );
    let start = Instant::now();
    let mut stream = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(15) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("the agent did not listen on 127.0.0.1:{port}: {e}"),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&client_hello("unknown.example")).unwrap();
    let mut got = Vec::new();
    stream
        .read_to_end(&mut got)
        .expect("the agent closes after its answer");
    assert_eq!(
        String::from_utf8_lossy(&got),
        r#"{"proxy":"default.ingress","zone":"zone-main"}"#
    );
}
