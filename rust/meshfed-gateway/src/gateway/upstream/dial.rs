//! One connection attempt to one endpoint: TCP, the preamble, and for an
//! endpoint with `tls` the mTLS handshake pinned to its SPIFFE ID, the
//! caller header of the hop protocol and, on its version 2, the ingress's
//! open answer; or, for an endpoint with `tls.tunnel`, a stream on a
//! tunnel connection to it (`tunnel`).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::tunnel::{self, TunnelStream, Tunnels};
use crate::config::{ClusterSpec, EndpointSpec, UpstreamTlsSpec};
use crate::gateway::hop::{self, AnswerError};
use crate::gateway::stats::{HandshakeFailure, ListenerStats};
use crate::spiffe::SpiffeId;
use crate::tls::{HOP_ALPN, OPEN_ALPN};

/// An established upstream connection: plain TCP, mTLS to a peer gateway,
/// or a stream in a tunnel to one.
pub(crate) enum Upstream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Tunnel(Box<TunnelStream>),
}

/// How to open a connection beyond TCP.
pub(crate) struct Dial<'a> {
    /// Bytes written before anything else (a PROXY protocol header), ahead
    /// of the TLS handshake when the endpoint is reached over mTLS.
    pub(crate) preamble: &'a [u8],
    /// What to tell a peer gateway that negotiates the hop protocol (see
    /// `hop`); `None` only where no mTLS endpoint can be reached.
    pub(crate) conveyed: Option<Conveyed<'a>>,
    /// Limit on an upstream TLS handshake.
    pub(crate) handshake_timeout: Duration,
    /// Where upstream handshake failures are counted.
    pub(crate) stats: &'a ListenerStats,
    /// The gateway's tunnel connections, for endpoints with `tls.tunnel`.
    pub(crate) tunnels: &'a Tunnels,
}

/// The connection as the hop protocol describes it to a peer gateway.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conveyed<'a> {
    /// The client's address.
    pub(crate) source: SocketAddr,
    /// The listener address the client connected to.
    pub(crate) destination: SocketAddr,
    /// The client's verified SPIFFE ID; `None`: the gateway is the caller.
    /// From a terminate listener, its effective caller, which the next
    /// ingress accepts only if it is of this gateway's own trust domain.
    pub(crate) caller: Option<&'a SpiffeId>,
}

/// One attempt on one endpoint: TCP connect, the preamble, and the mTLS
/// handshake if the endpoint has `tls`; a tunnel stream if it has
/// `tls.tunnel` and the connection has a caller and no preamble to send
/// (a preamble goes ahead of a connection's own handshake).
pub(super) async fn establish(
    spec: &ClusterSpec,
    endpoint: &EndpointSpec,
    dial: &Dial<'_>,
) -> io::Result<Upstream> {
    if let (Some(tls), Some(conveyed), true) = (
        endpoint.tls.as_deref(),
        dial.conveyed,
        dial.preamble.is_empty(),
    ) {
        if tls.tunnel {
            // Boxed like the handshake below.
            return Box::pin(tunnel::open(spec, endpoint.address, tls, conveyed, dial)).await;
        }
    }
    let mut stream = tcp(spec, endpoint.address).await?;
    if !dial.preamble.is_empty() {
        stream.write_all(dial.preamble).await?;
    }
    match &endpoint.tls {
        None => Ok(Upstream::Plain(stream)),
        // Boxed: the handshake state is kilobytes that plain connections must not carry.
        Some(tls) => Box::pin(secure(stream, tls, dial))
            .await
            .map(|s| Upstream::Tls(Box::new(s))),
    }
}

/// A TCP connection to `address` within the cluster's connect timeout.
pub(super) async fn tcp(spec: &ClusterSpec, address: SocketAddr) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(spec.connect_timeout, TcpStream::connect(address))
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out after {:?}", spec.connect_timeout),
            ))
        })?;
    // Nagle only delays a proxy's small writes.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The mTLS handshake with an endpoint that must present `tls.peer`'s SVID,
/// then the caller header if both sides speak the hop protocol.
async fn secure(
    stream: TcpStream,
    tls: &UpstreamTlsSpec,
    dial: &Dial<'_>,
) -> io::Result<TlsStream<TcpStream>> {
    let mut stream = handshake(stream, tls, dial).await?;
    if tls.convey_caller {
        convey(&mut stream, tls, dial).await?;
    }
    Ok(stream)
}

/// The mTLS handshake alone, its failures counted.
pub(super) async fn handshake(
    stream: TcpStream,
    tls: &UpstreamTlsSpec,
    dial: &Dial<'_>,
) -> io::Result<TlsStream<TcpStream>> {
    let connect = TlsConnector::from(tls.config.clone()).connect(tls.server_name.clone(), stream);
    match tokio::time::timeout(dial.handshake_timeout, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => {
            dial.stats.handshake_failed(HandshakeFailure::UpstreamTls);
            Err(io::Error::new(
                e.kind(),
                format!(
                    "mTLS handshake failed: {e} — does it present {} signed by its trust bundle?",
                    tls.peer
                ),
            ))
        }
        Err(_) => {
            dial.stats.handshake_failed(HandshakeFailure::Timeout);
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "mTLS handshake not finished within {:?} — raise handshake_timeout_ms if peers are slow",
                    dial.handshake_timeout
                ),
            ))
        }
    }
}

/// Writes the caller header as the first bytes inside the tunnel, if the
/// peer negotiated the hop protocol, and on its version 2 waits for the
/// open answer. Part of the connect attempt: a failure here moves on to the
/// next endpoint like a failed handshake, so the header always goes to the
/// endpoint that finally accepted. A refusal for this caller comes back as
/// `PermissionDenied`: final, and no failure of the endpoint.
pub(super) async fn convey(
    stream: &mut TlsStream<TcpStream>,
    tls: &UpstreamTlsSpec,
    dial: &Dial<'_>,
) -> io::Result<()> {
    let negotiated = stream.get_ref().1.alpn_protocol();
    let answers = negotiated == Some(OPEN_ALPN);
    if !answers && negotiated != Some(HOP_ALPN) {
        tracing::debug!(
            peer = %tls.peer,
            "peer gateway did not negotiate meshfed-caller/1 (an older ingress?): no caller header, it sees this gateway as the caller"
        );
        return Ok(());
    }
    let Some(conveyed) = dial.conveyed else {
        return Err(io::Error::other(
            "the peer expects a caller header, but this connection has no caller to convey",
        ));
    };
    let header = hop::encode_header(
        conveyed.source,
        conveyed.destination,
        &tls.server_name.to_str(),
        conveyed.caller,
    )
    .map_err(io::Error::other)?;
    stream.write_all(&header).await?;
    // The ingress waits for the header before it dials its backend: a client
    // that waits for the server to speak first must not stall it.
    stream.flush().await?;
    if !answers {
        return Ok(());
    }
    // The ingress answers once its own upstream connect is done: its connect
    // timeout and retries, bounded here by our handshake limit.
    match tokio::time::timeout(dial.handshake_timeout, hop::read_answer(stream)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(AnswerError::Refused(reason))) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} refused this caller: {reason}", tls.peer),
        )),
        Ok(Err(e)) => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("{}: {e}", tls.peer),
        )),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{} did not answer within {:?} whether it could open the service — raise handshake_timeout_ms if its backends are slow to connect",
                tls.peer, dial.handshake_timeout
            ),
        )),
    }
}
