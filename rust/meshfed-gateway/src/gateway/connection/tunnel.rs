//! The ingress side of the gateway tunnel (see `gateway::tunnel`): one
//! tunnel connection's streams, each opened against the gateway's current
//! config as a connection of its own would be.
//!
//! The connection was authenticated in its handshake: a trusted gateway's
//! SVID. Each stream is checked again against what the config says now:
//! the listener still there with the TLS settings the connection was made
//! with (else `421`, and the connection is drained so the egress meets the
//! current settings on a new one), the gateway still trusted (else the
//! same), the caller one it may vouch for, and then the route's rules,
//! rate limits and connection cap as for any connection.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response};
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::server::TlsStream;

use super::{Caller, ConnError, Ingress, RouteOpened, deny_assertion, open_route, refusal};
use crate::config::ListenerMode;
use crate::gateway::hop::{self, Answer};
use crate::gateway::snapshot::Snapshot;
use crate::gateway::stats::{ConnectionGuard, HandshakeFailure, ListenerStats, inc};
use crate::gateway::tunnel::{
    self, CONNECTION_WINDOW, MAX_HEADER_LIST, MAX_STREAMS, STREAM_WINDOW, StreamIo,
};
use crate::spiffe::SpiffeId;

/// What a tunnel connection's streams are served with.
pub(super) struct Served {
    pub(super) listener: Arc<str>,
    pub(super) live: Arc<ArcSwap<Snapshot>>,
    /// The server config of the handshake: a stream is served only while
    /// the listener still has it.
    pub(super) accepted_with: Arc<ServerConfig>,
    /// The peer gateway, verified in the handshake.
    pub(super) gateway: SpiffeId,
    /// The peer gateway's address and the listener's.
    pub(super) peer: SocketAddr,
    pub(super) local: SocketAddr,
    pub(super) stats: Arc<ListenerStats>,
}

/// A tunnel connection's state shared by its streams.
struct Tunnel {
    served: Served,
    /// Notified to drain the connection (`GOAWAY`, then end with the last stream).
    drain: Notify,
}

/// Serves a tunnel connection until the peer closes it, it is drained, or
/// its pings go unanswered. Its streams' bytes are counted per stream.
pub(super) async fn serve(
    stream: TlsStream<TcpStream>,
    served: Served,
) -> Result<(u64, u64), ConnError> {
    inc(&served.stats.tunnels);
    let tunnel = Arc::new(Tunnel {
        served,
        drain: Notify::new(),
    });
    let mut connection = h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(stream)
        .await?;
    let mut keep_alive = std::pin::pin!(tunnel::keep_alive(connection.ping_pong()));
    let mut draining = false;
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, respond))) => {
                    tokio::spawn(tunnel.clone().stream(request, respond));
                }
                Some(Err(e)) => return Err(e.into()),
                // Closed by the peer, or drained and done with its last stream.
                None => break,
            },
            () = tunnel.drain.notified(), if !draining => {
                draining = true;
                connection.graceful_shutdown();
            }
            reason = &mut keep_alive => {
                tracing::debug!(listener = %tunnel.served.listener, gateway = %tunnel.served.gateway, reason, "tunnel connection closed");
                break;
            }
        }
    }
    Ok((0, 0))
}

impl Tunnel {
    /// Serves one stream: answers its open request and, once open, carries
    /// its bytes to and from the upstream.
    async fn stream(
        self: Arc<Self>,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let listener = &self.served.listener;
        let (answer, opened) = self.open(&request).await;
        let Some((opened, guard)) = opened else {
            // Refused: the answer ends the stream.
            let _ = respond.send_response(answer, true);
            return;
        };
        let result = match respond.send_response(answer, false) {
            Ok(send) => {
                let io = StreamIo::new(send, request.into_body(), ());
                opened.carry(io, guard.stats()).await
            }
            Err(e) => Err(ConnError::Tunnel(e)),
        };
        drop(guard);
        match result {
            Ok((up, down)) => {
                tracing::debug!(listener = %listener, up, down, "tunnel stream finished")
            }
            Err(e) => tracing::debug!(listener = %listener, error = %e, "tunnel stream closed"),
        }
    }

    /// The answer to one open request and, on `200`, the route it opened
    /// with the stream's place under the listener's cap.
    async fn open(
        &self,
        request: &Request<RecvStream>,
    ) -> (Response<()>, Option<(RouteOpened, ConnectionGuard)>) {
        let Served {
            listener,
            live,
            stats,
            ..
        } = &self.served;
        let snapshot = live.load_full();
        let spec = snapshot.config.listener(listener);
        let Some(ListenerMode::Terminate { routes, tls }) = spec.map(|l| &l.mode) else {
            return (self.outdated(), None);
        };
        if !Arc::ptr_eq(&tls.hop, &self.served.accepted_with)
            || !tls.trusted_gateways.contains(&self.served.gateway)
        {
            return (self.outdated(), None);
        }
        let ingress = Ingress {
            name: listener,
            snapshot: &snapshot,
            stats,
            live,
        };
        let open = match tunnel::parse_request(request) {
            Ok(open) => open,
            Err(e) => {
                stats.handshake_failed(HandshakeFailure::Malformed);
                tracing::debug!(listener = %listener, gateway = %self.served.gateway, error = %e, "tunnel stream refused");
                return (tunnel::bad_request(&e), None);
            }
        };
        let sni = open.sni;
        let gateway = &self.served.gateway;
        let (caller, via) = match open.caller {
            None => (gateway.clone(), None),
            Some(bytes) => match hop::vouched(bytes, gateway) {
                Ok(caller) => (caller, Some(gateway)),
                Err(refused) => {
                    let e = deny_assertion(&refused, gateway, ingress, Some(sni));
                    return (tunnel::answer(refusal(&e)), None);
                }
            },
        };
        // Each stream is a client connection of the listener, under its cap.
        let limit = spec.map_or(0, |l| l.limits.max_connections);
        if stats.active.load(std::sync::atomic::Ordering::Relaxed) >= limit {
            inc(&stats.connections_refused_over_limit);
            return (tunnel::answer(refusal(&ConnError::OverLimit(limit))), None);
        }
        let guard = ConnectionGuard::open(stats.clone());
        inc(&stats.tunnel_streams);
        let caller = Caller {
            id: &caller,
            via,
            hop: true,
        };
        let addresses = (self.served.peer, self.served.local);
        match open_route(Some(sni), routes, caller, addresses, ingress).await {
            Ok(opened) => (tunnel::answer(Answer::Open), Some((opened, guard))),
            Err(e) => {
                tracing::debug!(listener = %listener, gateway = %gateway, sni = %sni, error = %e, "tunnel stream not opened");
                (tunnel::answer(refusal(&e)), None)
            }
        }
    }

    /// The answer to a stream this connection may no longer carry; the
    /// connection is drained.
    fn outdated(&self) -> Response<()> {
        self.drain.notify_one();
        tunnel::reconnect()
    }
}
