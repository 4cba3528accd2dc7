//! TLS material: PEM loading, SPIFFE IDs of certificates, and the rustls
//! server/client configurations built once at compile time.

mod verified;
mod verifier;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::spiffe::{SpiffeError, SpiffeId};

pub(crate) use verifier::{SpiffeClientVerifier, SpiffePeerVerifier, is_missing_svid};

/// Why a certificate does not carry a usable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The DER could not be parsed as an X.509 certificate.
    #[error("certificate is not valid X.509: {0}")]
    BadCertificate(String),
    /// The certificate has no URI SAN.
    #[error("certificate has no URI SAN (an X.509-SVID carries its SPIFFE ID there)")]
    NoUriSan,
    /// The certificate has more than one URI SAN.
    #[error("certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    MultipleUriSans(usize),
    /// The URI SAN is not a SPIFFE ID.
    #[error("certificate URI SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(#[from] SpiffeError),
}

/// The ALPN protocol of the caller hop: an egress gateway offers it on mTLS
/// to a peer ingress with `convey_caller`; when negotiated, the first bytes
/// inside the tunnel are a PROXY v2 header naming the calling workload.
pub(crate) const HOP_ALPN: &[u8] = b"meshfed-caller/1";

/// Version 2 of the caller hop: the header as in version 1, then the
/// ingress answers once it has connected its upstream (or refuses, saying
/// why), so the egress retries another endpoint before any client byte is
/// sent (see `gateway::hop`). Offered and preferred ahead of version 1;
/// an ingress that knows only version 1 negotiates that.
pub(crate) const OPEN_ALPN: &[u8] = b"meshfed-caller/2";

/// The gateway tunnel: after the handshake the connection speaks HTTP/2,
/// and each client connection is a CONNECT stream whose request says the
/// service and the caller and whose answer comes once the ingress has
/// connected its upstream (see `gateway::tunnel`). Preferred by an ingress
/// over both versions of the caller hop; offered by an egress only to
/// endpoints configured with `tunnel`.
pub(crate) const TUNNEL_ALPN: &[u8] = b"meshfed-tunnel/1";

/// The hop protocols, most preferred first, as an egress without the tunnel offers them.
pub(crate) fn hop_protocols() -> Vec<Vec<u8>> {
    vec![OPEN_ALPN.to_vec(), HOP_ALPN.to_vec()]
}

/// The tunnel, then the hop protocols: what an ingress accepts, and what an
/// egress with `tunnel` offers.
pub(crate) fn tunnel_protocols() -> Vec<Vec<u8>> {
    vec![TUNNEL_ALPN.to_vec(), OPEN_ALPN.to_vec(), HOP_ALPN.to_vec()]
}

/// The gateway's own X.509-SVID: certificate chain, private key and the
/// SPIFFE ID of the leaf.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) spiffe_id: SpiffeId,
}

/// The crypto provider used everywhere (ring).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every `CERTIFICATE` block of a PEM document; at least one is required.
pub(crate) fn load_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot read PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no \"BEGIN CERTIFICATE\" block found".to_owned());
    }
    Ok(certs)
}

/// Reads the private key of a PEM document (PKCS#8, SEC1 or PKCS#1).
pub(crate) fn load_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("cannot read a PEM private key: {e}"))
}

/// Extracts the SPIFFE ID of an X.509-SVID: its one and only URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| SvidError::BadCertificate(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| SvidError::BadCertificate(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan),
        [uri] => Ok(SpiffeId::parse(uri)?),
        many => Err(SvidError::MultipleUriSans(many.len())),
    }
}

/// Builds the root store of one trust domain from its PEM bundle.
pub(crate) fn root_store(pem: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in load_certs(pem)?.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("certificate #{i} is not a usable trust anchor: {e}"))?;
    }
    Ok(roots)
}

/// A server config presenting our SVID, client certificates required and
/// checked per trust domain by `verifier` (terminate listeners; originate
/// listeners with `workload_tls`), with no ALPN protocol.
pub(crate) fn server_config(
    provider: Arc<CryptoProvider>,
    identity: &Identity,
    verifier: Arc<SpiffeClientVerifier>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    Ok(Arc::new(config))
}

/// The client side of an originate listener: our SVID as client
/// certificate, the peer verified against its own trust domain's roots and
/// pinned to `peer`.
pub(crate) fn client_config(
    provider: Arc<CryptoProvider>,
    identity: &Identity,
    roots: Arc<RootCertStore>,
    peer: SpiffeId,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let verifier = SpiffePeerVerifier::new(roots, peer, provider.clone());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    Ok(Arc::new(config))
}
