//! `POST {cp}/bootstrap`: registers the ingress with the control plane and learns where the ADS
//! stream and the admin API live (PROTOCOL.md §1.3–1.4).
//!
//! Retry rules are kuma-dp's: every 3 s for at most 5 minutes while the CP is unreachable,
//! answers 5xx, or answers 404 with an empty body (the ZoneIngress is not registered yet); any
//! other 4xx is final and its body is shown to the operator (422 is Kuma's validation error).

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::tls::Connector;
use super::{CpError, CpOptions};

pub const RETRY_INTERVAL: Duration = Duration::from_secs(3);
pub const RETRY_FOR: Duration = Duration::from_secs(5 * 60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent takes from the Envoy bootstrap the CP generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapInfo {
    /// `admin.address.socket_address.port_value`.
    pub admin_port: Option<u16>,
    /// The `ads_cluster` endpoint; the CP address when the bootstrap has none.
    pub xds_host: String,
    pub xds_port: u16,
    /// The SNI (and certificate name) the CP expects on the ADS connection.
    pub xds_sni: Option<String>,
}

/// Why one attempt failed, and whether to try again.
enum Attempt {
    Retry(String),
    Final(CpError),
}

/// Posts the bootstrap request until it succeeds, a final error comes back, or the retry window
/// closes. `retry_for` is [`RETRY_FOR`] outside tests.
pub async fn bootstrap(
    opts: &CpOptions,
    connector: &Connector,
    token: Option<&str>,
    retry_for: Duration,
) -> Result<BootstrapInfo, CpError> {
    let body = request_body(opts, token).to_string();
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let reason = match tokio::time::timeout(REQUEST_TIMEOUT, post(opts, connector, &body)).await
        {
            Ok(Ok(info)) => {
                tracing::info!(cp = %opts.address, attempts, xds = %format!("{}:{}", info.xds_host, info.xds_port), "bootstrap received from the control plane");
                return Ok(info);
            }
            Ok(Err(Attempt::Final(e))) => return Err(e),
            Ok(Err(Attempt::Retry(reason))) => reason,
            Err(_) => format!("no answer within {REQUEST_TIMEOUT:?}"),
        };
        if started.elapsed() + RETRY_INTERVAL > retry_for {
            return Err(CpError::BootstrapGaveUp {
                cp: opts.address.to_string(),
                after: started.elapsed(),
                attempts,
                last: reason,
            });
        }
        tracing::warn!(cp = %opts.address, attempt = attempts, %reason, retry_in = ?RETRY_INTERVAL, "bootstrap failed; retrying");
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
}

async fn post(
    opts: &CpOptions,
    connector: &Connector,
    body: &str,
) -> Result<BootstrapInfo, Attempt> {
    let io = connector.connect().await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            // The CP's certificate does not verify: refused, not retried.
            Attempt::Final(CpError::Config(e.to_string()))
        } else {
            Attempt::Retry(format!("cannot connect: {e}"))
        }
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| Attempt::Retry(format!("HTTP handshake: {e}")))?;
    let conn_task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let authority = opts.address.authority();
    let req = http::Request::post(format!("{}/bootstrap", opts.address))
        .header(http::header::HOST, &authority)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .map_err(|e| Attempt::Final(CpError::Config(format!("bootstrap request: {e}"))))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Attempt::Retry(format!("request failed: {e}")))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Attempt::Retry(format!("reading the answer: {e}")))?
        .to_bytes();
    conn_task.abort();
    let text = String::from_utf8_lossy(&bytes).trim().to_owned();
    match status.as_u16() {
        200 => parse_response(&bytes, opts).map_err(Attempt::Final),
        404 if text.is_empty() => Err(Attempt::Retry(
            "the control plane does not know this ZoneIngress yet (404): on Kubernetes the pod \
             is converted shortly after it starts; on universal, check --dataplane-file"
                .into(),
        )),
        404 => Err(Attempt::Final(CpError::BootstrapRejected {
            status: 404,
            body: format!(
                "{text} (a 404 with a body means this is not Kuma's dp-server port; check \
                 --cp-address, usually https://<cp>:5678)"
            ),
        })),
        s if (400..500).contains(&s) => Err(Attempt::Final(CpError::BootstrapRejected {
            status: s,
            body: text,
        })),
        s => Err(Attempt::Retry(format!("HTTP {s}: {text}"))),
    }
}

/// The `BootstrapRequest` JSON of PROTOCOL.md §1.3.
pub fn request_body(opts: &CpOptions, token: Option<&str>) -> Json {
    json!({
        "mesh": "",
        "name": opts.name,
        "proxyType": "ingress",
        "dataplaneToken": token.unwrap_or(""),
        "dataplaneTokenPath": opts.token.path_string(),
        "dataplaneResource": opts.dataplane_resource.clone().unwrap_or_default(),
        "caCert": opts.ca_pem_string(),
        "version": super::node::version_json(),
        "dynamicMetadata": {},
        "dnsPort": 0,
        "readinessPort": opts.readiness_port,
        "appProbeProxyDisabled": false,
        "operatingSystem": std::env::consts::OS,
        "features": super::node::FEATURES,
        "resources": {"maxHeapSizeBytes": 0},
        "workdir": "",
        "metricsResources": {"certPath": "", "keyPath": ""},
        "systemCaPath": "",
        "ipv6Enabled": false,
    })
}

#[derive(Deserialize)]
struct Response {
    /// Envoy's bootstrap as YAML, base64 in the JSON (Go's []byte).
    bootstrap: String,
}

fn parse_response(bytes: &[u8], opts: &CpOptions) -> Result<BootstrapInfo, CpError> {
    let bad = |why: String| CpError::BadBootstrap(why);
    let resp: Response = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("the answer is not a BootstrapResponse JSON: {e}")))?;
    use base64::Engine as _;
    let yaml = base64::engine::general_purpose::STANDARD
        .decode(resp.bootstrap.trim())
        .map_err(|e| bad(format!("`bootstrap` is not base64: {e}")))?;
    let doc: Json = serde_norway::from_slice(&yaml)
        .map_err(|e| bad(format!("`bootstrap` is not YAML: {e}")))?;
    Ok(info_from_envoy_bootstrap(&doc, opts))
}

/// Reads a proto3-JSON key in either spelling (Kuma writes camelCase; snake_case is also valid).
fn get<'a>(v: &'a Json, camel: &str) -> Option<&'a Json> {
    v.get(camel).or_else(|| {
        let snake: String = camel
            .chars()
            .flat_map(|c| {
                if c.is_ascii_uppercase() {
                    vec!['_', c.to_ascii_lowercase()]
                } else {
                    vec![c]
                }
            })
            .collect();
        v.get(snake)
    })
}

fn port_of(v: Option<&Json>) -> Option<u16> {
    v.and_then(|p| {
        p.as_u64()
            .or_else(|| p.as_str().and_then(|s| s.parse().ok()))
    })
    .and_then(|p| u16::try_from(p).ok())
}

pub fn info_from_envoy_bootstrap(doc: &Json, opts: &CpOptions) -> BootstrapInfo {
    let admin_port = get(doc, "admin")
        .and_then(|a| get(a, "address"))
        .and_then(|a| get(a, "socketAddress"))
        .and_then(|s| port_of(get(s, "portValue")));
    let ads = get(doc, "staticResources")
        .and_then(|s| get(s, "clusters"))
        .and_then(Json::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("name").and_then(Json::as_str) == Some("ads_cluster"))
        });
    let socket = ads
        .and_then(|c| get(c, "loadAssignment"))
        .and_then(|l| get(l, "endpoints"))
        .and_then(|e| e.get(0))
        .and_then(|e| get(e, "lbEndpoints"))
        .and_then(|e| e.get(0))
        .and_then(|e| get(e, "endpoint"))
        .and_then(|e| get(e, "address"))
        .and_then(|a| get(a, "socketAddress"));
    let xds_host = socket
        .and_then(|s| get(s, "address"))
        .and_then(Json::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| opts.address.host.clone());
    let xds_port = port_of(socket.and_then(|s| get(s, "portValue"))).unwrap_or(opts.address.port);
    let xds_sni = ads
        .and_then(|c| get(c, "transportSocket"))
        .and_then(|t| get(t, "typedConfig"))
        .and_then(|t| get(t, "sni"))
        .and_then(Json::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    BootstrapInfo {
        admin_port,
        xds_host,
        xds_port,
        xds_sni,
    }
}
