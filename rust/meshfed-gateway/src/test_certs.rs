//! Test PKI: one CA per SPIFFE trust domain issuing X.509-SVIDs, and real
//! ClientHellos. Shared by unit tests and (via `#[path]`) the integration tests.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A trust domain's root CA.
pub struct TestDomain {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// An SVID: leaf certificate and its PKCS#8 key, PEM encoded.
pub struct TestSvid {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestDomain {
    /// Makes a self-signed ECDSA P-256 root for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{trust_domain} root"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("CA key: {e}"));
        let issuer =
            CertifiedIssuer::self_signed(params, key).unwrap_or_else(|e| panic!("CA cert: {e}"));
        Self { issuer }
    }

    /// The root certificate in PEM (the trust bundle).
    pub fn bundle_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues an SVID for `spiffe_id`, usable as TLS client and server cert.
    pub fn svid(&self, spiffe_id: &str) -> TestSvid {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, spiffe_id.to_owned());
        let uri = spiffe_id
            .try_into()
            .unwrap_or_else(|e| panic!("URI SAN: {e}"));
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("leaf key: {e}"));
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("leaf cert: {e}"));
        TestSvid {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A real ClientHello as rustls writes it for `server_name` (an IP address
/// gives a hello without SNI, as rustls sends none for IPs).
pub fn client_hello(server_name: &str) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .unwrap_or_else(|e| panic!("server name {server_name:?}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("client config: {e}"))
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .unwrap_or_else(|e| panic!("client connection: {e}"));
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)
            .unwrap_or_else(|e| panic!("write_tls: {e}"));
    }
    out
}
