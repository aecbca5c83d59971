//! The connection to the control plane: TCP, then TLS verified against the CA file (or the
//! system roots), as kuma-dp does for both `/bootstrap` and the ADS stream.
//!
//! One connector serves both: hyper's HTTP/1.1 client for `/bootstrap` and tonic's HTTP/2
//! channel for ADS. Doing the TLS here, rather than through tonic's own TLS feature, keeps one
//! rustls configuration (and one place that decides what is verified) for both calls, and lets
//! `--skip-verify` exist at all (tonic has no switch for it).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::CpError;

/// A byte stream to the control plane, TLS or (with an `http://` address) plain.
pub trait CpIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> CpIo for T {}
pub type BoxedIo = Pin<Box<dyn CpIo>>;

/// How to verify the control plane's certificate.
#[derive(Debug, Clone)]
pub enum Trust {
    /// PEM certificates (`--ca-cert-file`, `KUMA_CONTROL_PLANE_CA_CERT`).
    CaPem(Vec<u8>),
    /// The system's root store.
    SystemRoots,
    /// `--skip-verify`: no verification at all.
    Insecure,
}

/// Where and how to reach the control plane.
#[derive(Clone)]
pub struct Connector {
    pub host: String,
    pub port: u16,
    /// `None` for an `http://` control plane.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The name the certificate must carry: the host, unless the bootstrap named another.
    server_name: ServerName<'static>,
    pub connect_timeout: Duration,
    /// Bounds the TLS handshake: a CP that accepts TCP and never answers must not hang the
    /// session.
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Connector {
    pub fn new(
        host: &str,
        port: u16,
        trust: Option<&Trust>,
        alpn: &[&[u8]],
    ) -> Result<Self, CpError> {
        let tls = trust.map(|t| client_config(t, alpn)).transpose()?;
        let server_name = ServerName::try_from(host.to_owned()).map_err(|_| {
            CpError::Config(format!(
                "control plane host {host:?} is neither a DNS name nor an IP address"
            ))
        })?;
        Ok(Self {
            host: host.to_owned(),
            port,
            tls: tls.map(Arc::new),
            server_name,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: super::RESPONSE_TIMEOUT,
        })
    }

    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Verifies the certificate against `name` instead of the host (the bootstrap's ADS SNI).
    pub fn with_server_name(mut self, name: &str) -> Result<Self, CpError> {
        self.server_name = ServerName::try_from(name.to_owned()).map_err(|_| {
            CpError::Config(format!(
                "the control plane's xDS server name {name:?} is neither a DNS name nor an IP address"
            ))
        })?;
        Ok(self)
    }

    /// `host:port`, with brackets around an IPv6 host.
    pub fn authority(&self) -> String {
        super::CpAddress {
            tls: self.is_tls(),
            host: self.host.clone(),
            port: self.port,
        }
        .authority()
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub async fn connect(&self) -> io::Result<BoxedIo> {
        let addr = format!("{}:{}", self.host, self.port);
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connect to {addr} timed out after {:?}",
                        self.connect_timeout
                    ),
                )
            })??;
        tcp.set_nodelay(true)?;
        let Some(cfg) = &self.tls else {
            return Ok(Box::pin(tcp));
        };
        let handshake =
            tokio_rustls::TlsConnector::from(cfg.clone()).connect(self.server_name.clone(), tcp);
        let tls = tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the control plane at {addr} accepted the connection but did not complete \
                         the TLS handshake within {:?} (overloaded or stalled CP)",
                        self.handshake_timeout
                    ),
                )
            })?
            .map_err(|e| {
                // A certificate that does not verify will not verify on the next attempt either:
                // InvalidData tells the caller not to retry.
                let bad_cert = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
                io::Error::new(
                    if bad_cert {
                        io::ErrorKind::InvalidData
                    } else {
                        e.kind()
                    },
                    format!(
                        "TLS handshake with the control plane at {addr} failed: {e} (check that \
                         --ca-cert-file is the CA that signed the CP's certificate and that the \
                         certificate names {})",
                        self.host
                    ),
                )
            })?;
        Ok(Box::pin(tls))
    }
}

fn client_config(trust: &Trust, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, CpError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| CpError::Config(format!("TLS setup: {e}")))?;
    let mut cfg = match trust {
        Trust::CaPem(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    CpError::Config(format!("the control plane CA is not valid PEM: {e}"))
                })?;
            if certs.is_empty() {
                return Err(CpError::Config(
                    "the control plane CA holds no certificate (expected PEM \
                     -----BEGIN CERTIFICATE----- blocks)"
                        .into(),
                ));
            }
            for c in certs {
                roots.add(c).map_err(|e| {
                    CpError::Config(format!("the control plane CA certificate is unusable: {e}"))
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::SystemRoots => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // A broken system certificate is the system's problem; the others still count.
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(CpError::Config(
                    "no --ca-cert-file given and the system has no usable root certificates; \
                     pass the control plane's CA with --ca-cert-file"
                        .into(),
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// Reads the CA file given with `--ca-cert-file`.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, CpError> {
    std::fs::read(path).map_err(|e| {
        CpError::Config(format!(
            "cannot read the control plane CA file {}: {e}",
            path.display()
        ))
    })
}

/// `--skip-verify`: accepts any certificate, still checks the handshake signatures.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
