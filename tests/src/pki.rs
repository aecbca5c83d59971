//! Test PKI: one CA, a backend server certificate and a client certificate (mTLS between "sidecars";
//! the ingress never sees the keys). Also written as PEM files for the openssl CLI.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A MeshService-style SNI (DNS-valid, so rustls clients can send it).
pub const SNI_BACKEND: &str = "a601e0c00295a9fbe.backend.80.default.ms";
/// A second DNS-valid SNI (added by route reloads, served by a second backend).
pub const SNI_OTHER: &str = "b712f1d11306bacf0.other.80.default.ms";
/// A DNS-valid SNI that no route table of the tests contains.
pub const SNI_UNKNOWN: &str = "c823a2e22417cbd01.nowhere.80.default.ms";
/// Kuma's legacy SNI: not a valid DNS name (`{ } =`), so only the openssl CLI sends it.
pub const SNI_LEGACY: &str = "backend{mesh=default}";

/// DER and PEM material of the test PKI, plus the PEM files on disk.
pub struct Pki {
    pub ca_der: CertificateDer<'static>,
    pub server_chain: Vec<CertificateDer<'static>>,
    server_key_der: Vec<u8>,
    pub client_chain: Vec<CertificateDer<'static>>,
    client_key_der: Vec<u8>,
    dir: PathBuf,
}

/// The PKI lives for the whole test process (a static is never dropped), in `zi-pki-<pid>`; directories
/// of test processes that are gone are removed here.
fn sweep_stale_dirs() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("zi-pki-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Pki {
    /// The process-wide test PKI (generated once; key generation is the slow part).
    pub fn get() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(Pki::generate)
    }

    fn generate() -> Pki {
        let ca_key = KeyPair::generate().expect("generate the CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "zone-ingress test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = Issuer::new(ca_params, &ca_key);

        let server_key = KeyPair::generate().expect("generate the server key");
        let mut server_params = CertificateParams::new(vec![
            SNI_BACKEND.to_string(),
            SNI_OTHER.to_string(),
            "localhost".to_string(),
        ])
        .expect("server params (SANs must be valid DNS names)");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "backend");
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("sign the server cert");

        let client_key = KeyPair::generate().expect("generate the client key");
        let mut client_params =
            CertificateParams::new(vec!["client.default.mesh".to_string()]).expect("client params");
        client_params
            .distinguished_name
            .push(DnType::CommonName, "client");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params
            .signed_by(&client_key, &issuer)
            .expect("sign the client cert");

        sweep_stale_dirs();
        let dir = std::env::temp_dir().join(format!("zi-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("create the PKI dir {}: {e}", dir.display()));
        let files = [
            ("ca.pem", ca_cert.pem()),
            ("server.pem", server_cert.pem()),
            ("server.key", server_key.serialize_pem()),
            ("client.pem", client_cert.pem()),
            ("client.key", client_key.serialize_pem()),
        ];
        for (name, pem) in files {
            std::fs::write(dir.join(name), pem).expect("write PKI PEM file");
        }

        Pki {
            ca_der: ca_cert.der().clone(),
            server_chain: vec![server_cert.der().clone()],
            server_key_der: server_key.serialize_der(),
            client_chain: vec![client_cert.der().clone()],
            client_key_der: client_key.serialize_der(),
            dir,
        }
    }

    pub fn server_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()))
    }

    pub fn client_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.client_key_der.clone()))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// PEM files: `ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}
