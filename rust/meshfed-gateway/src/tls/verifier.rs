//! Certificate verifiers that understand SPIFFE trust domains.
//!
//! SPIFFE federation keeps one root pool per trust domain and never merges
//! them: a certificate claiming `spiffe://west.mesh/...` is only ever checked
//! against west.mesh's bundle. Names are URI SANs, so no DNS-name check.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};

use super::verified::VerifiedChains;
use super::{SvidError, spiffe_id_of};
use crate::spiffe::{SpiffeId, TrustDomain};

/// Why a peer certificate was refused beyond plain chain validation.
#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("peer certificate is not an X.509-SVID: {0}")]
    NotSvid(#[from] SvidError),
    #[error(
        "no trust bundle for trust domain {0:?} of peer {1} — add it to trust_bundles to accept it"
    )]
    UnknownTrustDomain(TrustDomain, SpiffeId),
    #[error("peer presented SPIFFE ID {got}, expected {expected}")]
    WrongPeer { got: SpiffeId, expected: SpiffeId },
}

fn refuse(err: PeerError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// Whether a failed handshake failed because the client presented no
/// X.509-SVID: no certificate at all, or one without a SPIFFE ID.
pub(crate) fn is_missing_svid(err: &std::io::Error) -> bool {
    match err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(Error::NoCertificatesPresented) => true,
        Some(Error::InvalidCertificate(CertificateError::Other(other))) => {
            matches!(
                other.0.downcast_ref::<PeerError>(),
                Some(PeerError::NotSvid(_))
            )
        }
        _ => false,
    }
}

/// Verifies client X.509-SVIDs: reads the leaf's SPIFFE ID, picks the
/// verifier of that ID's trust domain (built from that domain's bundle
/// only) and delegates chain validation to it. Unknown trust domains are
/// refused.
///
/// An authorizing verifier (terminate listeners) then asks the handshake's
/// authorization ([`crate::authz::in_handshake`]) and refuses with
/// `ApplicationVerificationFailure`, which rustls sends as the alert
/// `access_denied`.
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    by_domain: BTreeMap<TrustDomain, Arc<dyn ClientCertVerifier>>,
    provider: Arc<CryptoProvider>,
    authorize: bool,
    /// Chains accepted before, with the SPIFFE ID each carries.
    verified: VerifiedChains<SpiffeId>,
}

impl SpiffeClientVerifier {
    /// Builds one WebPKI client verifier per trust domain.
    pub(crate) fn new(
        bundles: &BTreeMap<TrustDomain, Arc<RootCertStore>>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, (TrustDomain, String)> {
        let mut by_domain = BTreeMap::new();
        for (domain, roots) in bundles {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| (domain.clone(), e.to_string()))?;
            by_domain.insert(domain.clone(), verifier);
        }
        Ok(Self {
            by_domain,
            provider,
            authorize: false,
            verified: VerifiedChains::default(),
        })
    }

    /// This verifier, also authorizing each verified peer in the handshake.
    pub(crate) fn authorizing(self) -> Self {
        Self {
            authorize: true,
            ..self
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Several independent roots: hint none, clients send their SVID.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let id = match self.verified.get(end_entity, intermediates, now) {
            Some(id) => id,
            None => {
                let id = spiffe_id_of(end_entity).map_err(|e| refuse(e.into()))?;
                let Some(verifier) = self.by_domain.get(id.trust_domain()) else {
                    return Err(refuse(PeerError::UnknownTrustDomain(
                        id.trust_domain().clone(),
                        id,
                    )));
                };
                verifier.verify_client_cert(end_entity, intermediates, now)?;
                self.verified
                    .remember(end_entity, intermediates, id.clone());
                id
            }
        };
        // Authorization is the handshake's, every time: rules change.
        if self.authorize && !crate::authz::in_handshake(id) {
            return Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a peer gateway: its chain must lead to the bundle of the
/// expected peer's trust domain, and its URI SAN must be exactly the
/// expected SPIFFE ID. The TLS server name (SNI) is a routing key, not an
/// identity, so it is not checked against the certificate.
#[derive(Debug)]
pub(crate) struct SpiffePeerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
    /// Chains accepted before (each carries `expected`).
    verified: VerifiedChains<()>,
}

impl SpiffePeerVerifier {
    pub(crate) fn new(
        roots: Arc<RootCertStore>,
        expected: SpiffeId,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            roots,
            expected,
            provider,
            verified: VerifiedChains::default(),
        }
    }
}

impl ServerCertVerifier for SpiffePeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if self.verified.get(end_entity, intermediates, now).is_some() {
            return Ok(ServerCertVerified::assertion());
        }
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let got = spiffe_id_of(end_entity).map_err(|e| refuse(e.into()))?;
        if got != self.expected {
            return Err(refuse(PeerError::WrongPeer {
                got,
                expected: self.expected.clone(),
            }));
        }
        self.verified.remember(end_entity, intermediates, ());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
