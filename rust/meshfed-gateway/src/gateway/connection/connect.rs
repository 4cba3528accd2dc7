//! Connect listeners: one egress socket for many imports.
//!
//! A local workload (or an HTTP client told to use the listener as its
//! proxy) asks for an import by name — `CONNECT web.default.east:8080
//! HTTP/1.1` — and the listener dials the cluster that authority names, as
//! an originate listener of that cluster would, with the gateway as the
//! caller. It answers `200` only once the upstream is connected (including a
//! peer gateway's open answer, see `hop`), so the client sends nothing into
//! a connection that cannot serve; otherwise an error status and a
//! `meshfed-reason` header say why (`404` no such import, `403` the peer
//! refused this caller, `502` no endpoint reachable, `503` the circuit
//! breaker is open). An importer then holds one listening socket however
//! many services it imports, where per-import listeners hold one each.
//!
//! The request head is a local client's input: read within the handshake
//! timeout, at most [`MAX_HEAD_LEN`] bytes and [`MAX_HEADERS`] headers,
//! parsed by `httparse`; anything else is refused with `400`, `405` or
//! `431` and counted as a handshake failure.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{ConnError, count_connect_error, proxy_to, sinks};
use crate::config::parse_authority;
use crate::gateway::counting::Counted;
use crate::gateway::snapshot::Snapshot;
use crate::gateway::stats::{HandshakeFailure, HandshakeSlot, ListenerStats, inc};
use crate::gateway::upstream::{self, ConnectError, Conveyed, Dial, Upstream};

/// Largest request head read; a CONNECT head is a line and a few headers.
pub(crate) const MAX_HEAD_LEN: usize = 8 * 1024;
/// Most headers a request may carry.
const MAX_HEADERS: usize = 32;

/// Why a request head is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeadError {
    #[error("the client closed the connection inside its CONNECT request")]
    Closed,
    #[error("request head not complete within {0:?}")]
    Timeout(std::time::Duration),
    #[error(
        "request head longer than {MAX_HEAD_LEN} bytes or with more than {MAX_HEADERS} headers"
    )]
    TooLarge,
    #[error("not an HTTP request: {0}")]
    Malformed(httparse::Error),
    #[error(
        "method {0} — this listener is a CONNECT proxy: CONNECT <service>.<namespace>.<peer>:<port>"
    )]
    NotConnect(String),
    #[error("cannot read the request: {0}")]
    Io(std::io::Error),
}

impl HeadError {
    fn status(&self) -> Option<&'static str> {
        match self {
            Self::Closed | Self::Io(_) => None,
            Self::Timeout(_) => Some("408 Request Timeout"),
            Self::TooLarge => Some("431 Request Header Fields Too Large"),
            Self::Malformed(_) => Some("400 Bad Request"),
            Self::NotConnect(_) => Some("405 Method Not Allowed"),
        }
    }

    fn failure(&self) -> HandshakeFailure {
        match self {
            Self::Closed | Self::Io(_) => HandshakeFailure::Closed,
            Self::Timeout(_) => HandshakeFailure::Timeout,
            Self::TooLarge => HandshakeFailure::TooLarge,
            Self::Malformed(_) | Self::NotConnect(_) => HandshakeFailure::Malformed,
        }
    }
}

/// The authority of a complete CONNECT head at the start of `buf` and the
/// head's length; `None` while the head is incomplete.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(String, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(length)) => {
            let method = request.method.unwrap_or_default();
            if !method.eq_ignore_ascii_case("CONNECT") {
                return Err(HeadError::NotConnect(method.chars().take(16).collect()));
            }
            Ok(Some((request.path.unwrap_or_default().to_owned(), length)))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_LEN => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::Malformed(e)),
    }
}

/// Reads until `buf` holds a complete head; returns the authority and
/// whatever the client sent after the head (its first bytes for upstream).
async fn read_head(client: &mut TcpStream) -> Result<(String, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(512);
    loop {
        buf.reserve(512);
        let read = client.read_buf(&mut buf).await.map_err(HeadError::Io)?;
        if read == 0 {
            return Err(HeadError::Closed);
        }
        if let Some((authority, length)) = parse_head(&buf)? {
            return Ok((authority, buf.split_off(length)));
        }
    }
}

/// Writes a status line with `reason` in `meshfed-reason`; best effort.
async fn respond(client: &mut TcpStream, status: &str, reason: &str) {
    // One line: a reason never carries CR or LF into the response.
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect();
    let response = format!(
        "HTTP/1.1 {status}\r\nmeshfed-reason: {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    let _ = client.write_all(response.as_bytes()).await;
    let _ = client.shutdown().await;
}

/// Serves one connection of a connect listener (see the module).
pub(super) async fn serve(
    mut client: TcpStream,
    source: SocketAddr,
    routes: &HashMap<Arc<str>, Arc<str>>,
    snapshot: &Snapshot,
    stats: &Arc<ListenerStats>,
    slot: HandshakeSlot,
) -> Result<(u64, u64), ConnError> {
    let limit = snapshot.config.handshake_timeout;
    let local = client.local_addr()?;
    let head = timeout(limit, read_head(&mut client))
        .await
        .unwrap_or(Err(HeadError::Timeout(limit)));
    let (authority, early) = match head {
        Ok(head) => head,
        Err(e) => {
            stats.handshake_failed(e.failure());
            if let Some(status) = e.status() {
                respond(&mut client, status, &e.to_string()).await;
            }
            return Err(e.into());
        }
    };
    drop(slot);
    let cluster = parse_authority(&authority)
        .ok()
        .and_then(|authority| routes.get(authority.as_str()));
    let Some((spec, state)) = cluster.and_then(|name| snapshot.cluster(name)) else {
        inc(&stats.no_route);
        let why = format!(
            "no import named {authority:?} here (`meshfed service list` shows the names: <service>.<namespace>.<peer>:<port>)"
        );
        respond(&mut client, "404 Not Found", &why).await;
        return Err(ConnError::NoRoute(authority));
    };
    let dial = Dial {
        preamble: &[],
        conveyed: Some(Conveyed {
            source,
            destination: local,
            caller: None,
        }),
        handshake_timeout: limit,
        stats,
        tunnels: &snapshot.tunnels,
    };
    let (mut upstream, lease) = match upstream::connect(spec, state, source.ip(), &dial).await {
        Ok(opened) => opened,
        Err(e) => {
            let status = match &e {
                ConnectError::Refused { .. } => "403 Forbidden",
                ConnectError::CircuitOpen { .. } => "503 Service Unavailable",
                ConnectError::Unreachable { .. } => "502 Bad Gateway",
            };
            let e = ConnError::from(e);
            count_connect_error(&e, stats);
            respond(&mut client, status, &e.to_string()).await;
            return Err(e);
        }
    };
    if let Some(tls) = spec.endpoints.get(lease.index).and_then(|e| e.tls.as_ref()) {
        stats.record_peer(tls.peer.as_str());
    }
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    let sinks = sinks(stats, None, &lease);
    if !early.is_empty() {
        // Bytes the client sent right behind its head (a TLS ClientHello, say).
        match &mut upstream {
            Upstream::Plain(stream) => stream.write_all(&early).await?,
            Upstream::Tls(stream) => stream.write_all(&early).await?,
            Upstream::Tunnel(stream) => stream.write_all(&early).await?,
        }
        sinks.up(early.len() as u64);
    }
    let client = Counted::new(client, sinks.clone());
    proxy_to(client, upstream, spec.idle_timeout, &sinks, stats).await
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_connect_head_gives_its_authority_and_length() {
        let head = b"CONNECT web.default.east:8080 HTTP/1.1\r\nHost: web.default.east:8080\r\n\r\n";
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(b"\x16\x03\x01");
        let parsed = parse_head(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            parsed,
            Some(("web.default.east:8080".to_owned(), head.len()))
        );
        assert!(matches!(parse_head(&head[..20]), Ok(None)));
    }

    #[test]
    fn other_requests_are_refused_saying_why() {
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\n\r\n"),
            Err(HeadError::NotConnect(m)) if m == "GET"
        ));
        assert!(matches!(
            parse_head(b"\x16\x03\x01\x02\x00"),
            Err(HeadError::Malformed(_))
        ));
        let many: String = (0..40).map(|i| format!("x{i}: y\r\n")).collect();
        let request = format!("CONNECT a:1 HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(
            parse_head(request.as_bytes()),
            Err(HeadError::TooLarge)
        ));
        let endless = format!("CONNECT a:1 HTTP/1.1\r\nx: {}", "y".repeat(MAX_HEAD_LEN));
        assert!(matches!(
            parse_head(endless.as_bytes()),
            Err(HeadError::TooLarge)
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_are_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_head(&bytes);
        }
    }
}
