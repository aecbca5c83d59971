//! The ADS stream (state of the world): subscribe to clusters, their endpoints and listeners,
//! turn each consistent snapshot into a route table, ACK what was applied and NACK what cannot
//! be, with the reason as `error_detail`.
//!
//! Order and consistency follow Envoy: CDS and LDS are requested at once; EDS is requested for
//! the clusters CDS named, and again whenever that set changes. A response is NACKed when its
//! resources are invalid on their own (a field we do not implement, a bad SNI, a second data
//! listener, a listener address that moved). A snapshot that is valid but not yet complete (a
//! chain names a cluster CDS has not delivered, a cluster waits for its endpoints) is ACKed and
//! applied once the missing part arrives, as Envoy warms clusters before it uses them. Until
//! then the previous table keeps routing.
//!
//! The stream is re-established with exponential backoff (1 s to 30 s) whenever it ends; the
//! token file is re-read each time. A token rejected before any configuration was applied stops
//! the agent with an explanation; after that, traffic keeps flowing on the last table and the
//! session keeps retrying (a revoked token must not take a zone down on its own).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::proto::{self, CLA_TYPE, CLUSTER_TYPE, LISTENER_TYPE};
use super::tls::Connector;
use super::{CpError, CpOptions};
use crate::routes::RouteStore;
use crate::stats::{Stats, XdsKind};
use crate::xds::model::{Cluster, ClusterLoadAssignment, DiscoveryType, Listener, Resources};
use crate::xds::{self, XdsError, XdsRoutes};

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A zone ingress carries every service of every mesh (kumahq/kuma#4360): allow big snapshots.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// gRPC status code of a NACK's error_detail.
const INVALID_ARGUMENT: i32 = 3;

/// One applied snapshot, published to the agent (which binds the listener on the first).
#[derive(Debug, Clone)]
pub struct Applied {
    pub routes: XdsRoutes,
    /// Where Kuma's admin listener (`kuma:envoy:admin`) asks for `/ready` to be served.
    pub admin_listener: Option<SocketAddr>,
    /// `cds/eds/lds` versions of the snapshot.
    pub version: String,
}

/// The last accepted resources of one type and the stream bookkeeping for it.
#[derive(Debug, Clone)]
struct TypeState<T> {
    /// `version_info` of the last accepted response (sent back on reconnect and in NACKs).
    version: String,
    /// `nonce` of the last response received.
    nonce: String,
    resources: Vec<T>,
}

impl<T> Default for TypeState<T> {
    fn default() -> Self {
        Self {
            version: String::new(),
            nonce: String::new(),
            resources: Vec::new(),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    clusters: TypeState<Cluster>,
    endpoints: TypeState<ClusterLoadAssignment>,
    listeners: TypeState<Listener>,
    /// The EDS names last subscribed to.
    eds_names: BTreeSet<String>,
    /// The listener address the first snapshot bound; later snapshots may not move it.
    bound: Option<SocketAddr>,
    applied_once: bool,
}

impl State {
    fn resources(&self) -> Resources {
        Resources {
            listeners: self.listeners.resources.clone(),
            clusters: self.clusters.resources.clone(),
            load_assignments: self.endpoints.resources.clone(),
        }
    }

    fn wanted_eds_names(&self) -> BTreeSet<String> {
        self.clusters
            .resources
            .iter()
            .filter(|c| c.discovery_type == DiscoveryType::Eds)
            .map(|c| c.eds_name().to_owned())
            .collect()
    }
}

/// Why a stream ended.
enum StreamEnd {
    /// Closed or failed; try again after the backoff.
    Retry(String),
    /// The CP said the token is not valid.
    TokenRejected(String),
}

pub struct AdsClient {
    opts: Arc<CpOptions>,
    connector: Connector,
    routes: Arc<RouteStore>,
    stats: Arc<Stats>,
    applied: watch::Sender<Option<Arc<Applied>>>,
}

impl AdsClient {
    pub fn new(
        opts: Arc<CpOptions>,
        connector: Connector,
        routes: Arc<RouteStore>,
        stats: Arc<Stats>,
        applied: watch::Sender<Option<Arc<Applied>>>,
    ) -> Self {
        Self {
            opts,
            connector,
            routes,
            stats,
            applied,
        }
    }

    /// Runs the session until a fatal error (only a token rejected before the first applied
    /// snapshot); otherwise forever.
    pub async fn run(self) -> Result<(), CpError> {
        let mut state = State::default();
        let mut backoff = BACKOFF_MIN;
        loop {
            let (end, progressed) = self.stream_once(&mut state).await;
            self.stats.set_control_plane_connected(false);
            if progressed {
                backoff = BACKOFF_MIN;
            }
            match end {
                StreamEnd::TokenRejected(msg) if !state.applied_once => {
                    return Err(CpError::TokenRejected(msg));
                }
                StreamEnd::TokenRejected(msg) => {
                    tracing::error!(error = %msg, retry_in = ?backoff, "the control plane rejected the dataplane token; routing continues on the last applied table");
                }
                StreamEnd::Retry(reason) => {
                    tracing::warn!(cp = %self.connector.authority(), %reason, retry_in = ?backoff, "ADS stream to the control plane ended; routing continues on the last applied table");
                }
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream; returns how it ended and whether any response arrived.
    async fn stream_once(&self, state: &mut State) -> (StreamEnd, bool) {
        let token = match self.opts.token.read() {
            Ok(t) => t,
            Err(e) => return (StreamEnd::Retry(e.to_string()), false),
        };
        let channel = match self.channel().await {
            Ok(c) => c,
            Err(e) => return (StreamEnd::Retry(e), false),
        };
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
        // The node rides on the first message only (set_node_on_first_message_only).
        let mut first = true;
        let mut initial = vec![
            request(CLUSTER_TYPE, &state.clusters.version, "", Vec::new()),
            request(LISTENER_TYPE, &state.listeners.version, "", Vec::new()),
        ];
        if !state.eds_names.is_empty() {
            initial.push(request(
                CLA_TYPE,
                &state.endpoints.version,
                "",
                state.eds_names.iter().cloned().collect(),
            ));
        }
        for mut r in initial {
            if first {
                r.node = Some(super::node::node(&self.opts));
                first = false;
            }
            // The channel has room for these few; the receiver lives in `request` below.
            let _ = tx.try_send(r);
        }
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            match token.parse() {
                Ok(v) => {
                    req.metadata_mut().insert("authorization", v);
                }
                Err(_) => {
                    return (
                        StreamEnd::Retry(
                            "the dataplane token contains characters not allowed in gRPC \
                             metadata; check the token file"
                                .into(),
                        ),
                        false,
                    );
                }
            }
        }
        // A CP owes the first response within the response timeout (Envoy's
        // initial_fetch_timeout); after that, silence is normal: xDS only pushes changes.
        let limit = self.opts.response_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let stalled = || {
            StreamEnd::Retry(format!(
                "the control plane opened no ADS stream or sent no response within {limit:?} (stalled CP)"
            ))
        };
        let mut stream = match tokio::time::timeout_at(
            deadline,
            client.stream_aggregated_resources(req),
        )
        .await
        {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(status)) => return (classify(&status), false),
            Err(_) => return (stalled(), false),
        };
        tracing::info!(cp = %self.connector.authority(), "ADS stream open");
        self.stats.set_control_plane_connected(true);
        let mut progressed = false;
        loop {
            let next = if progressed {
                stream.message().await
            } else {
                match tokio::time::timeout_at(deadline, stream.message()).await {
                    Ok(m) => m,
                    Err(_) => return (stalled(), false),
                }
            };
            match next {
                Ok(Some(resp)) => {
                    progressed = true;
                    for reply in self.handle(state, resp) {
                        if tx.send(reply).await.is_err() {
                            return (StreamEnd::Retry("request stream closed".into()), true);
                        }
                    }
                }
                Ok(None) => {
                    return (
                        StreamEnd::Retry("the control plane closed the stream".into()),
                        progressed,
                    );
                }
                Err(status) => return (classify(&status), progressed),
            }
        }
    }

    async fn channel(&self) -> Result<tonic::transport::Channel, String> {
        let scheme = if self.connector.is_tls() {
            "https"
        } else {
            "http"
        };
        let authority = self.connector.authority();
        let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{authority}"))
            .map_err(|e| format!("bad xDS address {authority}: {e}"))?
            // Kuma's dp-server keepalive is 15 s; a dead CP is noticed within ~35 s.
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let connector = self.connector.clone();
        endpoint
            .connect_with_connector(tower::service_fn(move |_uri: http::Uri| {
                let c = connector.clone();
                async move { c.connect().await.map(TokioIo::new) }
            }))
            .await
            .map_err(|e| format!("{e}{}", sources(&e)))
    }

    /// Handles one response; returns the requests to send (the ACK or NACK, and an EDS
    /// re-subscription when the cluster set changed).
    fn handle(&self, state: &mut State, resp: DiscoveryResponse) -> Vec<DiscoveryRequest> {
        let ty = resp.type_url.clone();
        let kind = match ty.as_str() {
            CLUSTER_TYPE => XdsKind::Cds,
            CLA_TYPE => XdsKind::Eds,
            LISTENER_TYPE => XdsKind::Lds,
            other => {
                tracing::warn!(
                    type_url = other,
                    "the control plane sent a resource type a zone ingress does not use; NACK"
                );
                let mut r = request(other, "", &resp.nonce, Vec::new());
                r.error_detail = Some(nack_status(format!(
                    "resource type {other} is not supported by a zone ingress"
                )));
                return vec![r];
            }
        };
        let mut candidate = State {
            clusters: state.clusters.clone(),
            endpoints: state.endpoints.clone(),
            listeners: state.listeners.clone(),
            eds_names: state.eds_names.clone(),
            bound: state.bound,
            applied_once: state.applied_once,
        };
        let decoded = decode_into(&mut candidate, kind, &resp);
        let outcome = decoded.and_then(|()| evaluate(&candidate));
        let names_for = |s: &State| match kind {
            XdsKind::Eds => s.eds_names.iter().cloned().collect(),
            _ => Vec::new(),
        };
        match outcome {
            Err(e) => {
                let detail = e.to_string();
                tracing::error!(type_url = %ty, version = %resp.version_info, error = %detail, "rejected a control plane update (NACK); the previous configuration stays");
                self.stats.xds_update(kind, false, &[]);
                state.nonce_mut(kind).clone_from(&resp.nonce);
                let mut r = request(&ty, state.version(kind), &resp.nonce, names_for(state));
                r.error_detail = Some(nack_status(detail));
                vec![r]
            }
            Ok(evaluation) => {
                // Accept: the candidate becomes the state.
                let prev_names = state.eds_names.clone();
                *state = candidate;
                state.set_accepted(kind, &resp.version_info, &resp.nonce);
                let touched: Vec<String> = match kind {
                    XdsKind::Eds => state
                        .endpoints
                        .resources
                        .iter()
                        .map(|a| a.cluster_name.clone())
                        .collect(),
                    XdsKind::Cds => state
                        .clusters
                        .resources
                        .iter()
                        .map(|c| c.name.clone())
                        .collect(),
                    XdsKind::Lds => Vec::new(),
                };
                self.stats.xds_update(kind, true, &touched);
                match evaluation {
                    Evaluation::Complete(routes, admin_listener) => {
                        self.apply(state, routes, admin_listener)
                    }
                    Evaluation::Incomplete(why) => {
                        tracing::debug!(type_url = %ty, reason = %why, "update accepted; waiting for the rest of the snapshot before applying it");
                    }
                }
                let mut out = vec![request(
                    &ty,
                    &resp.version_info,
                    &resp.nonce,
                    names_for(state),
                )];
                let wanted = state.wanted_eds_names();
                if wanted != prev_names {
                    state.eds_names = wanted;
                    out.push(request(
                        CLA_TYPE,
                        &state.endpoints.version,
                        &state.endpoints.nonce,
                        state.eds_names.iter().cloned().collect(),
                    ));
                }
                out
            }
        }
    }

    fn apply(&self, state: &mut State, routes: XdsRoutes, admin_listener: Option<SocketAddr>) {
        let version = format!(
            "cds={} eds={} lds={}",
            state.clusters.version, state.endpoints.version, state.listeners.version
        );
        state.bound.get_or_insert(routes.listener);
        state.applied_once = true;
        let table = routes.to_route_table(format!("control plane ({version})"));
        tracing::info!(routes = table.len(), %version, "route table from the control plane applied");
        self.stats.set_cluster_membership(&table);
        self.routes.replace(table);
        self.applied.send_replace(Some(Arc::new(Applied {
            routes,
            admin_listener,
            version,
        })));
    }
}

impl State {
    fn version(&self, kind: XdsKind) -> &str {
        match kind {
            XdsKind::Cds => &self.clusters.version,
            XdsKind::Eds => &self.endpoints.version,
            XdsKind::Lds => &self.listeners.version,
        }
    }

    fn nonce_mut(&mut self, kind: XdsKind) -> &mut String {
        match kind {
            XdsKind::Cds => &mut self.clusters.nonce,
            XdsKind::Eds => &mut self.endpoints.nonce,
            XdsKind::Lds => &mut self.listeners.nonce,
        }
    }

    fn set_accepted(&mut self, kind: XdsKind, version: &str, nonce: &str) {
        let (v, n) = match kind {
            XdsKind::Cds => (&mut self.clusters.version, &mut self.clusters.nonce),
            XdsKind::Eds => (&mut self.endpoints.version, &mut self.endpoints.nonce),
            XdsKind::Lds => (&mut self.listeners.version, &mut self.listeners.nonce),
        };
        *v = version.to_owned();
        *n = nonce.to_owned();
    }
}

/// Decodes a response's resources into the candidate state (replacing that type: state of the
/// world).
fn decode_into(
    candidate: &mut State,
    kind: XdsKind,
    resp: &DiscoveryResponse,
) -> Result<(), XdsError> {
    let expect = match kind {
        XdsKind::Cds => CLUSTER_TYPE,
        XdsKind::Eds => CLA_TYPE,
        XdsKind::Lds => LISTENER_TYPE,
    };
    let mut clusters = Vec::new();
    let mut cla = Vec::new();
    let mut listeners = Vec::new();
    for (i, any) in resp.resources.iter().enumerate() {
        let path = format!("resources[{i}]");
        if any.type_url != expect {
            return Err(XdsError::decode(
                path,
                format!("has type {} inside a {expect} response", any.type_url),
                "send one resource type per response",
            ));
        }
        match kind {
            XdsKind::Cds => clusters.push(proto::cluster(any, &path)?),
            XdsKind::Eds => cla.push(proto::load_assignment(any, &path)?),
            XdsKind::Lds => listeners.push(proto::listener(any, &path)?),
        }
    }
    match kind {
        XdsKind::Cds => candidate.clusters.resources = clusters,
        XdsKind::Eds => candidate.endpoints.resources = cla,
        XdsKind::Lds => candidate.listeners.resources = listeners,
    }
    Ok(())
}

enum Evaluation {
    Complete(XdsRoutes, Option<SocketAddr>),
    Incomplete(XdsError),
}

/// Whether the candidate state is a table we can apply, one to wait on, or invalid.
fn evaluate(candidate: &State) -> Result<Evaluation, XdsError> {
    match xds::route_table(&candidate.resources()) {
        Ok(routes) => {
            if let Some(bound) = candidate.bound
                && bound != routes.listener
            {
                return Err(XdsError::ListenerAddress {
                    listener: routes.listener_name.clone(),
                    address: routes.listener.to_string(),
                    reason: format!(
                        "the listener is bound to {bound}; zone-ingress does not move a live \
                         listener (restart the agent after changing networking.address/port)"
                    ),
                });
            }
            let admin = candidate
                .listeners
                .resources
                .iter()
                .find(|l| l.name == xds::ADMIN_LISTENER_NAME)
                .and_then(|l| {
                    let ip = l.address.address.parse().ok()?;
                    let port = u16::try_from(l.address.port_value).ok()?;
                    Some(SocketAddr::new(ip, port))
                });
            Ok(Evaluation::Complete(routes, admin))
        }
        Err(e) if e.is_incomplete() => Ok(Evaluation::Incomplete(e)),
        Err(e) => Err(e),
    }
}

fn request(type_url: &str, version: &str, nonce: &str, names: Vec<String>) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.to_owned(),
        resource_names: names,
        type_url: type_url.to_owned(),
        response_nonce: nonce.to_owned(),
        ..Default::default()
    }
}

fn nack_status(message: String) -> RpcStatus {
    RpcStatus {
        code: INVALID_ARGUMENT,
        message,
        details: Vec::new(),
    }
}

/// Kuma's auth callback fails the stream with "authentication failed: …" (gRPC code Unknown,
/// from go-control-plane) ; other CPs use Unauthenticated or PermissionDenied.
fn classify(status: &tonic::Status) -> StreamEnd {
    let msg = status.message().to_owned();
    let lower = msg.to_ascii_lowercase();
    if matches!(
        status.code(),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    ) || lower.contains("authentication failed")
    {
        return StreamEnd::TokenRejected(if msg.is_empty() {
            format!("{:?}", status.code())
        } else {
            msg
        });
    }
    StreamEnd::Retry(format!("{:?}: {msg}{}", status.code(), sources(status)))
}

/// `: source: its source...` of an error (tonic's errors hide the useful part in a source).
fn sources(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// ±20% so that many ingresses do not reconnect in lockstep after a CP restart.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.8 + f64::from(nanos % 1000) / 1000.0 * 0.4;
    d.mul_f64(factor)
}
