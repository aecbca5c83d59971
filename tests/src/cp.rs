//! A test Kuma control plane: Kuma's dp-server shape on one TLS port (HTTPS `POST /bootstrap`
//! and gRPC ADS, told apart by the request as Kuma's server does), RS256 zone tokens checked
//! with the claims of PROTOCOL.md §1.6, a state-of-the-world ADS server that pushes snapshots,
//! and a log of every ACK/NACK, node and bootstrap request for the tests to assert on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rcgen::{CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value as Json, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::netns::Netns;
use crate::xds_build::Resources;

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const CLA_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

// ------------------------------------------------------------------ certificates

/// A CA and a server certificate for the CP's address, in PEM files for `--ca-cert-file`.
pub struct CpPki {
    pub ca_pem_path: PathBuf,
    cert_chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl CpPki {
    /// A fresh CA whose server certificate names `ip`.
    pub fn new(ip: std::net::IpAddr) -> CpPki {
        let dir = tempfile::Builder::new()
            .prefix("zi-cp-pki-")
            .tempdir()
            .expect("create the CP PKI dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "test kuma control plane CA");
        ca.distinguished_name = dn;
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign the CA");
        let key = KeyPair::generate().expect("CP key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::IpAddress(ip)];
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        let cert = params.signed_by(&key, &issuer).expect("sign the CP cert");
        let ca_pem_path = dir.path().join("ca.pem");
        std::fs::write(&ca_pem_path, ca_cert.pem()).expect("write the CA PEM");
        CpPki {
            ca_pem_path,
            cert_chain: vec![cert.der().clone()],
            key_der: key.serialize_der(),
            _dir: dir,
        }
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                self.cert_chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .expect("CP server config");
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

// ------------------------------------------------------------------ zone tokens

/// A zone-token signing key (RS256, with a `kid`), as `kumactl generate zone-token` uses.
pub struct ZoneKeys {
    kid: String,
    encoding: jsonwebtoken::EncodingKey,
    decoding: jsonwebtoken::DecodingKey,
}

impl ZoneKeys {
    pub fn generate(kid: &str) -> ZoneKeys {
        use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
        let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA key");
        let public = rsa::RsaPublicKey::from(&private);
        let private_pem = private
            .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
            .expect("private PEM");
        let public_pem = public
            .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
            .expect("public PEM");
        ZoneKeys {
            kid: kid.to_owned(),
            encoding: jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes())
                .expect("encoding key"),
            decoding: jsonwebtoken::DecodingKey::from_rsa_pem(public_pem.as_bytes())
                .expect("decoding key"),
        }
    }

    /// A zone token: `{"Zone", "Scope", "jti", "iat", "nbf", "exp"}`, RS256, header `kid`.
    pub fn token(&self, zone: &str, scope: &[&str], valid_for: Duration) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let claims = json!({
            "Zone": zone,
            "Scope": scope,
            "jti": format!("test-{now}-{}", crate::unique_suffix()),
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + valid_for.as_secs(),
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).expect("sign the token")
    }

    /// Kuma's checks: signature (RS256, known `kid`), expiry, `ingress` in Scope, Zone matches.
    fn validate(&self, token: &str, zone: &str) -> Result<(), String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("bad token: {e}"))?;
        if header.kid.as_deref() != Some(self.kid.as_str()) {
            return Err(format!("unknown signing key {:?}", header.kid));
        }
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        let data = jsonwebtoken::decode::<Json>(token, &self.decoding, &v)
            .map_err(|e| format!("could not parse token: {e}"))?;
        let claims = data.claims;
        let scope_ok = claims["Scope"]
            .as_array()
            .is_some_and(|s| s.iter().any(|v| v == "ingress"));
        if !scope_ok {
            return Err("token does not have the ingress scope".into());
        }
        match claims["Zone"].as_str() {
            Some(z) if z.is_empty() || z == zone => Ok(()),
            other => Err(format!("token is for zone {other:?}, this CP is {zone:?}")),
        }
    }
}

// ------------------------------------------------------------------ the server

/// An ACK or NACK the agent sent.
#[derive(Clone, Debug)]
pub struct Ack {
    pub type_url: String,
    pub version_info: String,
    pub nonce: String,
    /// `Some` for a NACK.
    pub error: Option<String>,
    pub resource_names: Vec<String>,
}

/// The resources the CP serves; `version` changes with every [`TestCp::push`].
#[derive(Clone, Debug, Default)]
struct Snapshot {
    version: u64,
    resources: Resources,
}

struct Shared {
    zone: String,
    keys: Arc<ZoneKeys>,
    /// Answer `/bootstrap` with 404 (empty body) this many times first.
    bootstrap_404s: AtomicU32,
    /// `Some((status, body))`: answer every `/bootstrap` with it.
    bootstrap_error: Mutex<Option<(u16, String)>>,
    bootstrap_requests: Mutex<Vec<Json>>,
    nodes: Mutex<Vec<Node>>,
    acks: Mutex<Vec<Ack>>,
    streams: AtomicU32,
    /// New ADS streams are accepted and then never answered (a stalled CP).
    stall_ads: AtomicBool,
    rejected_tokens: Mutex<Vec<String>>,
    nonce: AtomicU64,
    snapshot: watch::Sender<Snapshot>,
    /// The ADS address the bootstrap announces.
    addr: SocketAddr,
    admin_port: u16,
}

/// A running test control plane in a namespace. Dropping or [`TestCp::stop`] closes the port and
/// every stream, like a killed CP.
pub struct TestCp {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::AbortHandle,
}

impl TestCp {
    /// Serves on `addr` inside `ns` with `pki`'s certificate, accepting tokens from `keys`
    /// for `zone`.
    pub async fn start(
        ns: &Netns,
        addr: SocketAddr,
        pki: &CpPki,
        keys: Arc<ZoneKeys>,
        zone: &str,
        admin_port: u16,
    ) -> TestCp {
        let (snapshot, _) = watch::channel(Snapshot::default());
        let shared = Arc::new(Shared {
            zone: zone.to_owned(),
            keys,
            bootstrap_404s: AtomicU32::new(0),
            bootstrap_error: Mutex::new(None),
            bootstrap_requests: Mutex::new(Vec::new()),
            nodes: Mutex::new(Vec::new()),
            acks: Mutex::new(Vec::new()),
            streams: AtomicU32::new(0),
            stall_ads: AtomicBool::new(false),
            rejected_tokens: Mutex::new(Vec::new()),
            nonce: AtomicU64::new(0),
            snapshot,
            addr,
            admin_port,
        });
        Self::serve(ns, addr, pki, shared).await
    }

    /// Starts a new server on the same address with the same state (a CP that came back).
    pub async fn restart(ns: &Netns, pki: &CpPki, old: &TestCp) -> TestCp {
        Self::serve(ns, old.addr, pki, old.shared.clone()).await
    }

    async fn serve(ns: &Netns, addr: SocketAddr, pki: &CpPki, shared: Arc<Shared>) -> TestCp {
        let listener = ns.listen(addr).await;
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let ads = AggregatedDiscoveryServiceServer::new(Ads(shared.clone()));
        let router = Router::new()
            .route("/bootstrap", post(bootstrap))
            .with_state(shared.clone())
            .route_service(
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/{*method}",
                ads,
            );
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the server drops them all.
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let (acceptor, router) = (acceptor.clone(), router.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(router))
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        TestCp {
            addr,
            shared,
            server: task.abort_handle(),
        }
    }

    /// `https://ip:port` for `--cp-address`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Serves `resources` from now on (a new version of every type).
    pub fn push(&self, resources: Resources) -> String {
        let mut version = String::new();
        self.shared.snapshot.send_modify(|s| {
            s.version += 1;
            s.resources = resources;
            version = format!("v{}", s.version);
        });
        version
    }

    pub fn fail_bootstrap_with_404s(&self, n: u32) {
        self.shared.bootstrap_404s.store(n, Ordering::SeqCst);
    }

    pub fn fail_bootstrap(&self, status: u16, body: &str) {
        *self.shared.bootstrap_error.lock().expect("lock") = Some((status, body.to_owned()));
    }

    pub fn bootstrap_requests(&self) -> Vec<Json> {
        self.shared.bootstrap_requests.lock().expect("lock").clone()
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.shared.nodes.lock().expect("lock").clone()
    }

    pub fn acks(&self) -> Vec<Ack> {
        self.shared.acks.lock().expect("lock").clone()
    }

    pub fn streams_opened(&self) -> u32 {
        self.shared.streams.load(Ordering::SeqCst)
    }

    pub fn rejected_tokens(&self) -> Vec<String> {
        self.shared.rejected_tokens.lock().expect("lock").clone()
    }

    /// Waits (at most `limit`) for the agent's answer to `version` of `type_url`.
    pub async fn wait_answer(&self, type_url: &str, version: &str, limit: Duration) -> Ack {
        let start = Instant::now();
        loop {
            let acks = self.acks();
            // An ACK carries the version it accepts; a NACK the nonce of the rejected
            // response, whose version we remember by nonce prefix.
            if let Some(a) = acks.iter().rev().find(|a| {
                a.type_url == type_url
                    && (a.version_info == version && a.error.is_none()
                        || a.error.is_some() && a.nonce.starts_with(&format!("{version}/")))
            }) {
                return a.clone();
            }
            assert!(
                start.elapsed() < limit,
                "no ACK/NACK for {type_url} {version} within {limit:?}; answers so far: {acks:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// From now on new ADS streams open (response headers sent) and then stay silent; `false`
    /// serves them again.
    pub fn stall_ads(&self, on: bool) {
        self.shared.stall_ads.store(on, Ordering::SeqCst);
    }

    /// Closes the port and every stream.
    pub fn stop(&self) {
        self.server.abort();
    }
}

impl Drop for TestCp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn bootstrap(State(s): State<Arc<Shared>>, body: String) -> impl IntoResponse {
    let req: Json = serde_json::from_str(&body).unwrap_or(Json::Null);
    s.bootstrap_requests.lock().expect("lock").push(req.clone());
    if let Some((status, body)) = s.bootstrap_error.lock().expect("lock").clone() {
        return (StatusCode::from_u16(status).expect("status"), body).into_response();
    }
    if s.bootstrap_404s
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (StatusCode::NOT_FOUND, "").into_response();
    }
    if req["proxyType"] != "ingress" || req["mesh"] != "" {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("bad bootstrap request: {req}"),
        )
            .into_response();
    }
    // The Envoy bootstrap, trimmed to what a zone ingress reads (admin and ads_cluster), in
    // Kuma's camelCase proto3 JSON as YAML.
    let yaml = format!(
        "admin:\n  address:\n    socketAddress:\n      address: 127.0.0.1\n      portValue: {admin}\n\
         node:\n  cluster: ingress\n  id: .{name}\n\
         staticResources:\n  clusters:\n  - name: ads_cluster\n    type: STATIC\n    loadAssignment:\n      clusterName: ads_cluster\n      endpoints:\n      - lbEndpoints:\n        - endpoint:\n            address:\n              socketAddress:\n                address: {ip}\n                portValue: {port}\n    transportSocket:\n      name: envoy.transport_sockets.tls\n      typedConfig:\n        sni: {ip}\n",
        admin = s.admin_port,
        name = req["name"].as_str().unwrap_or(""),
        ip = s.addr.ip(),
        port = s.addr.port(),
    );
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(yaml);
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        json!({"bootstrap": b64, "kumaSidecarConfiguration": {}}).to_string(),
    )
        .into_response()
}

#[derive(Clone)]
struct Ads(Arc<Shared>);

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let s = self.0.clone();
        s.streams.fetch_add(1, Ordering::SeqCst);
        if s.stall_ads.load(Ordering::SeqCst) {
            return Ok(Response::new(Box::pin(tokio_stream::pending())));
        }
        // Kuma: exactly one `authorization` value, the raw token; failures end the stream
        // with "authentication failed" (go-control-plane turns the error into code Unknown).
        let tokens: Vec<String> = request
            .metadata()
            .get_all("authorization")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        let verdict = match tokens.as_slice() {
            [one] => s.keys.validate(one, &s.zone),
            [] => Err("no authorization metadata".into()),
            _ => Err("more than one authorization value".into()),
        };
        if let Err(e) = verdict {
            s.rejected_tokens.lock().expect("lock").push(e.clone());
            return Err(Status::unknown(format!("authentication failed: {e}")));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut snap_rx = s.snapshot.subscribe();
            // Per type: subscribed, the version last sent, and EDS's resource names.
            let mut subscribed: Vec<String> = Vec::new();
            let mut sent: std::collections::HashMap<String, u64> = Default::default();
            let mut eds_names: Vec<String> = Vec::new();
            let mut node_id: Option<String> = None;
            loop {
                let mut changed = false;
                tokio::select! {
                    msg = inbound.message() => {
                        let Ok(Some(req)) = msg else { return };
                        if let Some(node) = &req.node {
                            if node_id.as_ref().is_some_and(|id| !node.id.is_empty() && *id != node.id) {
                                let _ = tx.send(Err(Status::permission_denied("node id changed on the stream"))).await;
                                return;
                            }
                            node_id.get_or_insert(node.id.clone());
                            s.nodes.lock().expect("lock").push(node.clone());
                        }
                        if !req.response_nonce.is_empty() {
                            s.acks.lock().expect("lock").push(Ack {
                                type_url: req.type_url.clone(),
                                version_info: req.version_info.clone(),
                                nonce: req.response_nonce.clone(),
                                error: req.error_detail.as_ref().map(|e| e.message.clone()),
                                resource_names: req.resource_names.clone(),
                            });
                        }
                        if !subscribed.contains(&req.type_url) {
                            subscribed.push(req.type_url.clone());
                            changed = true;
                        }
                        if req.type_url == CLA_TYPE && req.resource_names != eds_names {
                            eds_names = req.resource_names.clone();
                            sent.remove(CLA_TYPE);
                            changed = true;
                        }
                    }
                    r = snap_rx.changed() => {
                        if r.is_err() { return; }
                        changed = true;
                    }
                }
                if !changed {
                    continue;
                }
                let snap = snap_rx.borrow_and_update().clone();
                for ty in [CLUSTER_TYPE, CLA_TYPE, LISTENER_TYPE] {
                    if !subscribed.iter().any(|t| t == ty) || sent.get(ty) == Some(&snap.version) {
                        continue;
                    }
                    let resources = match ty {
                        CLUSTER_TYPE => snap.resources.clusters.clone(),
                        LISTENER_TYPE => snap.resources.listeners.clone(),
                        _ => snap
                            .resources
                            .endpoints
                            .iter()
                            .filter(|a| {
                                use prost::Message;
                                envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(a.value.as_slice())
                                    .map(|cla| eds_names.contains(&cla.cluster_name))
                                    .unwrap_or(true)
                            })
                            .cloned()
                            .collect(),
                    };
                    let version = format!("v{}", snap.version);
                    let nonce = format!("{version}/{}", s.nonce.fetch_add(1, Ordering::SeqCst));
                    sent.insert(ty.to_owned(), snap.version);
                    let resp = DiscoveryResponse {
                        version_info: version,
                        resources,
                        type_url: ty.to_owned(),
                        nonce,
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Err(Status::unimplemented(
            "delta xDS is not served by the test CP",
        ))
    }
}
