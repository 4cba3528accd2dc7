//! What the cross-zone suites share (`zero_trust`, `tunnel`): two zones'
//! PKI, east's terminate ingress and west's originate egress configs, a
//! backend that reads the PROXY v2 header east sends, and workloads and
//! hand-made gateways written directly with rustls.

// Each test crate compiles this module and uses a part of it.
#![allow(dead_code)]

#[path = "../../src/test_certs.rs"]
pub mod test_certs;

use std::error::Error;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshfed_gateway::{Gateway, ListenerSnapshot, proxy_protocol, spiffe_id_of};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use serde_json::{Value, json};
use test_certs::{TestDomain, TestSvid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub type TestResult = Result<(), Box<dyn Error + Send + Sync>>;
pub type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

pub const SNI: &str = "outbound_.8080_._.orders.shop.svc.east.mesh";
pub const EAST_GW: &str = "spiffe://east.mesh/ns/meshfed-system/sa/gateway";
pub const WEST_GW: &str = "spiffe://west.mesh/ns/meshfed-system/sa/gateway";
pub const CART: &str = "spiffe://west.mesh/ns/shop/sa/cart";
pub const INTRUDER: &str = "spiffe://west.mesh/ns/shop/sa/intruder";
pub const HOP_ALPN: &[u8] = b"meshfed-caller/1";
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Pki {
    pub east: TestDomain,
    pub west: TestDomain,
}

impl Pki {
    pub fn new() -> Self {
        Self {
            east: TestDomain::new("east.mesh"),
            west: TestDomain::new("west.mesh"),
        }
    }
}

/// East: a terminate ingress trusting west's gateway to vouch for callers;
/// intruder denied first, then west's shop namespace and west's gateway
/// itself allowed; the backend gets a PROXY v2 header with the caller.
pub fn east_config(pki: &Pki, backend: SocketAddr, handshake_timeout_ms: u64) -> Value {
    let svid = pki.east.svid(EAST_GW);
    json!({
        "identity": {"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem},
        "trust_bundles": {"east.mesh": pki.east.bundle_pem(), "west.mesh": pki.west.bundle_pem()},
        "handshake_timeout_ms": handshake_timeout_ms,
        "listeners": [{
            "name": "ingress", "address": "127.0.0.1:0", "mode": "terminate",
            "trusted_gateways": [WEST_GW],
            "routes": [{"sni": SNI, "cluster": "orders", "proxy_protocol": true, "rules": [
                {"action": "deny", "id": INTRUDER},
                {"action": "allow", "id": "spiffe://west.mesh/ns/shop/*"},
                {"action": "allow", "id": WEST_GW},
            ]}]
        }],
        "clusters": [{"name": "orders", "endpoints": [{"address": backend.to_string()}]}]
    })
}

/// West: a strict and a permissive egress to `endpoints` (mTLS to east's
/// gateway, conveying the caller).
pub fn west_config(pki: &Pki, endpoints: Value) -> Value {
    let svid = pki.west.svid(WEST_GW);
    json!({
        "identity": {"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem},
        "trust_bundles": {"west.mesh": pki.west.bundle_pem(), "east.mesh": pki.east.bundle_pem()},
        "listeners": [
            {"name": "egress-strict", "address": "127.0.0.1:0", "mode": "originate",
             "cluster": "east", "workload_tls": "strict"},
            {"name": "egress-permissive", "address": "127.0.0.1:0", "mode": "originate",
             "cluster": "east", "workload_tls": "permissive"},
        ],
        "clusters": [{"name": "east", "endpoints": endpoints, "connect_timeout_ms": 2000,
                      "tls": {"sni": SNI, "peer_spiffe_id": EAST_GW, "convey_caller": true}}]
    })
}

pub fn start(config: &Value) -> Res<Gateway> {
    Ok(Gateway::start(config.to_string().as_bytes())?)
}

pub fn address(gateway: &Gateway, listener: &str) -> Res<SocketAddr> {
    let address = gateway.addresses().get(listener).copied();
    address.ok_or_else(|| format!("no listener {listener:?}").into())
}

pub fn stats(gateway: &Gateway, listener: &str) -> ListenerSnapshot {
    gateway
        .stats()
        .remove(listener)
        .unwrap_or_else(|| panic!("no stats for {listener}"))
}

pub fn reason(snapshot: &ListenerSnapshot, reason: &str) -> u64 {
    snapshot
        .handshake_failure_reasons
        .get(reason)
        .copied()
        .unwrap_or(0)
}

/// A free loopback port with nothing listening on it.
pub fn dead_address() -> Res<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// East's backend: reads the PROXY v2 header of each connection, hands it
/// to the test, then echoes.
pub struct Backend {
    pub address: SocketAddr,
    headers: mpsc::UnboundedReceiver<proxy_protocol::Header>,
}

impl Backend {
    pub async fn start() -> Res<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (tx, headers) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut header = vec![0u8; 16];
                    if stream.read_exact(&mut header).await.is_err() {
                        return;
                    }
                    let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
                    header.resize(16 + len, 0);
                    if stream.read_exact(&mut header[16..]).await.is_err() {
                        return;
                    }
                    let Ok((parsed, _)) = proxy_protocol::decode_v2(&header) else {
                        return;
                    };
                    let _ = tx.send(parsed);
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Ok(Self { address, headers })
    }

    /// The caller SPIFFE ID (TLV 0xE0) of the next connection that arrived.
    pub async fn next_caller(&mut self) -> Res<String> {
        let header = timeout(IO_TIMEOUT, self.headers.recv())
            .await?
            .ok_or("backend stopped")?;
        let caller = header
            .tlvs
            .iter()
            .find(|(kind, _)| *kind == proxy_protocol::PP2_TYPE_MESHFED_SPIFFE_ID)
            .ok_or("no caller TLV in the backend's PROXY header")?;
        Ok(String::from_utf8(caller.1.clone())?)
    }

    /// Whether no connection reached the backend since the last look.
    pub fn untouched(&mut self) -> bool {
        self.headers.try_recv().is_err()
    }
}

/// Verifies a server's X.509-SVID as a workload does: chain to `roots`,
/// URI SAN exactly `expected`.
#[derive(Debug)]
pub struct PinnedSvid {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedSvid {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match spiffe_id_of(end_entity) {
            Ok(id) if id.as_str() == self.expected => Ok(ServerCertVerified::assertion()),
            other => Err(rustls::Error::General(format!(
                "server is {other:?}, expected {}",
                self.expected
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn roots(domain: &TestDomain) -> Res<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(domain.bundle_pem().as_bytes()) {
        roots.add(cert?)?;
    }
    Ok(Arc::new(roots))
}

pub fn chain_and_key(
    svid: &TestSvid,
) -> Res<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain =
        CertificateDer::pem_slice_iter(svid.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    Ok((
        chain,
        PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes())?,
    ))
}

/// A TLS client (a workload, or a hand-made gateway) that expects the
/// server `server_id` of `server_domain`, presents `svid` if given and
/// offers `alpn`; TLS 1.2 only when `tls12`, else the defaults (1.3 first).
pub fn client(
    server_domain: &TestDomain,
    server_id: &str,
    svid: Option<&TestSvid>,
    alpn: &[&[u8]],
    tls12: bool,
) -> Res<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedSvid {
        roots: roots(server_domain)?,
        expected: server_id.to_owned(),
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider);
    let builder = if tls12 {
        builder.with_protocol_versions(&[&rustls::version::TLS12])?
    } else {
        builder.with_safe_default_protocol_versions()?
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match svid {
        Some(svid) => {
            let (chain, key) = chain_and_key(svid)?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

pub async fn connect(
    config: &Arc<ClientConfig>,
    address: SocketAddr,
    sni: &str,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(address).await?;
    let name = ServerName::try_from(sni.to_owned()).map_err(io::Error::other)?;
    timeout(
        IO_TIMEOUT,
        TlsConnector::from(config.clone()).connect(name, tcp),
    )
    .await?
}

/// Sends `payload` and reads the echo.
pub async fn echo(stream: &mut TlsStream<TcpStream>, payload: &[u8]) -> Res<Vec<u8>> {
    stream.write_all(payload).await?;
    stream.flush().await?;
    let mut back = vec![0u8; payload.len()];
    timeout(IO_TIMEOUT, stream.read_exact(&mut back)).await??;
    Ok(back)
}

pub fn rustls_error(e: &io::Error) -> Option<rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>().cloned()
}

/// Reads until the gateway ends the connection, then until it has closed
/// the socket; returns the TLS error the client saw (an alert), if any.
/// Fails if any byte arrives: a refused client must get none.
pub async fn refusal(mut tls: TlsStream<TcpStream>) -> Res<Option<rustls::Error>> {
    let mut buf = vec![0u8; 1024];
    let error = match timeout(IO_TIMEOUT, tls.read(&mut buf)).await? {
        Ok(0) => None,
        Ok(n) => return Err(format!("expected a refusal, got {:?}", &buf[..n]).into()),
        Err(e) => rustls_error(&e),
    };
    let (mut tcp, _) = tls.into_inner();
    let mut rest = Vec::new();
    // EOF or a reset: either way the gateway has closed (and counted).
    let _ = timeout(IO_TIMEOUT, tcp.read_to_end(&mut rest)).await?;
    Ok(error)
}

/// A plain TCP client refused: the gateway closes without a byte.
pub async fn plain_refusal(address: SocketAddr, payload: &[u8]) -> TestResult {
    let mut tcp = TcpStream::connect(address).await?;
    let _ = tcp.write_all(payload).await;
    let mut got = Vec::new();
    let _ = timeout(IO_TIMEOUT, tcp.read_to_end(&mut got)).await?;
    assert!(got.is_empty(), "refused client got {got:?}");
    Ok(())
}

pub fn access_denied() -> Option<rustls::Error> {
    Some(rustls::Error::AlertReceived(AlertDescription::AccessDenied))
}

/// A PROXY v2 caller header as a gateway writes it inside the tunnel.
pub fn caller_header(caller: Option<&str>) -> Res<Vec<u8>> {
    let (source, destination) = ("10.1.0.7:40000".parse()?, "10.1.0.1:15001".parse()?);
    Ok(proxy_protocol::encode_v2(
        source,
        destination,
        Some(SNI),
        caller,
    )?)
}

/// An ingress that knows no hop protocol (negotiates no ALPN): it
/// terminates mTLS for west's clients, hands the test the first bytes of
/// each connection, and echoes them.
pub async fn older_ingress(pki: &Pki) -> Res<(SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>)> {
    let (chain, key) = chain_and_key(&pki.east.svid(EAST_GW))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(&pki.west)?,
        provider.clone(),
    )
    .build()?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let older = listener.local_addr()?;
    let (tx, first_bytes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut buf = [0u8; 64];
                let Ok(n) = tls.read(&mut buf).await else {
                    return;
                };
                let _ = tx.send(buf[..n].to_vec());
                let _ = tls.write_all(&buf[..n]).await;
                let _ = tls.flush().await;
            });
        }
    });
    Ok((older, first_bytes))
}
