//! The gateway tunnel, `meshfed-tunnel/1`: many client connections between
//! two gateways ride a few long-lived mTLS connections, each client
//! connection one HTTP/2 CONNECT stream, in the manner of Istio's HBONE.
//!
//! Why HTTP/2 CONNECT: it is the standard way to carry many byte streams
//! over one connection with a request that opens each and an answer that
//! accepts it; it has per-stream flow control (a slow stream fills its own
//! window and never blocks the others), `GOAWAY` to drain a connection, and
//! keep-alive pings; h2 implements all of it (driven directly, see
//! `stream`, not through hyper's CONNECT upgrade). A gateway pair pays
//! one mTLS handshake per tunnel connection instead of one per client
//! connection, and the verification is the same as per connection: the
//! ingress's SVID pinned by the egress, the egress's SVID verified against
//! its trust domain and required to be one of the listener's
//! `trusted_gateways` (checked in the handshake and again per stream).
//!
//! A stream opens with `CONNECT <sni>:<port>`: the authority's host names
//! the service as the SNI of a per-connection hop would, and the port is
//! the ingress's. Header `meshfed-caller` carries the SPIFFE ID of the
//! workload the egress vouches for (absent: the egress gateway calls for
//! itself); the ingress believes it only within the gateway's own trust
//! domain, as on `meshfed-caller/1`. The ingress authorizes the caller,
//! connects its upstream and only then answers, as on `meshfed-caller/2`:
//! - `200`: open, the stream carries the client's bytes both ways;
//! - `503` with `meshfed-reason`: unavailable here (no route, no reachable
//!   endpoint, a full circuit breaker); the egress tries its next endpoint
//!   before any client byte moved, and counts a failure of this one;
//! - `403` with `meshfed-reason`: refused for this caller (denied, rate
//!   limited): final, and no failure of the endpoint;
//! - `421`: this tunnel connection is outdated (the listener's TLS settings
//!   changed since its handshake, or the listener is gone); the egress
//!   opens the stream again on a new connection, which meets the current
//!   settings, and the ingress drains the old one with `GOAWAY`;
//! - `400` with `meshfed-reason`: the request is not one a meshfed gateway
//!   sends.
//!
//! A peer that does not negotiate the tunnel is served per connection with
//! the hop protocol it negotiates instead (see `tls::tunnel_protocols`).
//! The egress side is `upstream::tunnel`, the ingress side
//! `connection::tunnel`; this module is what they share.

mod stream;

use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use super::hop::{self, Answer, MAX_REASON_LEN};
use crate::spiffe::SpiffeId;
pub(crate) use stream::StreamIo;

/// The workload the egress vouches for.
pub(crate) const CALLER: HeaderName = HeaderName::from_static("meshfed-caller");
/// Why a stream was not opened, for logs.
pub(crate) const REASON: HeaderName = HeaderName::from_static("meshfed-reason");

/// Streams one tunnel connection carries at once (the ingress's
/// `SETTINGS_MAX_CONCURRENT_STREAMS`); an egress opens another connection
/// beyond it.
pub(crate) const MAX_STREAMS: u32 = 256;
/// Tunnel connections an egress keeps per peer endpoint; beyond them a
/// client connection is dialled on a connection of its own.
pub(crate) const MAX_TUNNELS_PER_ENDPOINT: usize = 4;
/// Receive window per stream: what one stream may have in flight. Bounds
/// the memory a stream that is not read holds, at both ends.
pub(crate) const STREAM_WINDOW: u32 = 256 * 1024;
/// Receive window of a whole tunnel connection: room for every stream's
/// window, so streams that are not read (each holding its window's worth)
/// can never use up the connection's and stall the others. What a
/// connection buffers is bounded by the stream windows all the same.
pub(crate) const CONNECTION_WINDOW: u32 = MAX_STREAMS * STREAM_WINDOW;
/// Largest header block either end reads: an authority of at most 255
/// bytes and a caller of at most 2048, with room to spare.
pub(crate) const MAX_HEADER_LIST: u32 = 8 * 1024;
/// Ping a tunnel connection this often, so one whose peer vanished
/// (a pod killed without a FIN) is found and closed.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is closed.
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest service name (SNI) a stream may name.
const MAX_SNI_LEN: usize = 255;

/// Pings the peer every [`KEEPALIVE_INTERVAL`] and returns why the
/// connection should end: a ping unanswered for [`KEEPALIVE_TIMEOUT`], or
/// the connection already gone. Run beside the connection's own future,
/// with its `ping_pong()` (taken once: `None` never pings).
pub(crate) async fn keep_alive(ping: Option<h2::PingPong>) -> &'static str {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "the connection closed",
            Err(_) => return "a keep-alive ping went unanswered",
        }
    }
}

/// The request opening a stream to the service `sni` on the ingress at
/// `port`, for `caller` (`None`: the gateway itself).
pub(crate) fn open_request(
    sni: &str,
    port: u16,
    caller: Option<&SpiffeId>,
) -> Result<Request<()>, http::Error> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{sni}:{port}"));
    if let Some(caller) = caller {
        request = request.header(CALLER, caller.as_str());
    }
    request.body(())
}

/// What an egress reads off the ingress's answer to an open request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    Open,
    /// Unavailable at this ingress; another may serve it.
    Unavailable(String),
    /// Refused for this caller; final.
    Refused(String),
    /// Open it again on a new tunnel connection.
    Reconnect,
}

/// Reads an ingress's answer. The reason is a peer's text: bounded and made
/// printable before it can reach a log. A status meshfed does not send
/// counts as unavailable, so the egress moves on.
pub(crate) fn read_answer<B>(response: &Response<B>) -> Opened {
    let reason = || {
        let bytes = response
            .headers()
            .get(REASON)
            .map_or(&b""[..], HeaderValue::as_bytes);
        hop::printable(&bytes[..bytes.len().min(MAX_REASON_LEN)])
    };
    match response.status() {
        StatusCode::OK => Opened::Open,
        StatusCode::MISDIRECTED_REQUEST => Opened::Reconnect,
        StatusCode::FORBIDDEN => Opened::Refused(reason()),
        StatusCode::SERVICE_UNAVAILABLE => Opened::Unavailable(reason()),
        other => Opened::Unavailable(format!("unexpected answer {other}: {}", reason())),
    }
}

/// The ingress's answer, as `meshfed-caller/2` would give it.
pub(crate) fn answer(answer: Answer<'_>) -> Response<()> {
    match answer {
        Answer::Open => status(StatusCode::OK, None),
        Answer::Unavailable(reason) => status(StatusCode::SERVICE_UNAVAILABLE, Some(reason)),
        Answer::Refused(reason) => status(StatusCode::FORBIDDEN, Some(reason)),
    }
}

/// The answer telling the egress to open the stream on a new connection.
pub(crate) fn reconnect() -> Response<()> {
    status(StatusCode::MISDIRECTED_REQUEST, None)
}

/// The answer to a request no meshfed gateway sends.
pub(crate) fn bad_request(error: &RequestError) -> Response<()> {
    status(StatusCode::BAD_REQUEST, Some(&error.to_string()))
}

fn status(code: StatusCode, reason: Option<&str>) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = code;
    // Fixed words from this gateway, printable ASCII: always a valid value.
    if let Some(value) = reason.and_then(|r| HeaderValue::from_str(r).ok()) {
        response.headers_mut().insert(REASON, value);
    }
    response
}

/// Why an open request is refused before anything is looked up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum RequestError {
    #[error("a tunnel stream opens with CONNECT, not {0}")]
    NotConnect(String),
    #[error("the CONNECT request names no service (no authority)")]
    NoService,
    #[error("the service name is longer than {MAX_SNI_LEN} bytes")]
    LongService,
    #[error("meshfed-caller appears more than once")]
    TwoCallers,
}

/// An open request as the ingress reads it: the service's SNI and the
/// caller's bytes, still to be vouched for (`hop::vouched`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct OpenRequest<'a> {
    pub(crate) sni: &'a str,
    pub(crate) caller: Option<&'a [u8]>,
}

/// Reads an open request; its size is bounded by the connection's
/// [`MAX_HEADER_LIST`] already.
pub(crate) fn parse_request<B>(request: &Request<B>) -> Result<OpenRequest<'_>, RequestError> {
    if request.method() != Method::CONNECT {
        return Err(RequestError::NotConnect(
            request.method().as_str().chars().take(16).collect(),
        ));
    }
    let sni = request
        .uri()
        .authority()
        .map(http::uri::Authority::host)
        .filter(|host| !host.is_empty())
        .ok_or(RequestError::NoService)?;
    if sni.len() > MAX_SNI_LEN {
        return Err(RequestError::LongService);
    }
    let mut callers = request.headers().get_all(CALLER).iter();
    let caller = callers.next().map(HeaderValue::as_bytes);
    if callers.next().is_some() {
        // Two answers to "who is calling": as for the TLV, refused.
        return Err(RequestError::TwoCallers);
    }
    Ok(OpenRequest { sni, caller })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id(text: &str) -> SpiffeId {
        SpiffeId::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn an_open_request_reads_back_as_sent() {
        let caller = id("spiffe://west.mesh/ns/shop/sa/cart");
        let request = open_request("orders.shop.svc.east.mesh", 15443, Some(&caller))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            parse_request(&request),
            Ok(OpenRequest {
                sni: "orders.shop.svc.east.mesh",
                caller: Some(caller.as_str().as_bytes()),
            })
        );
        let request = open_request("orders", 1, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parse_request(&request).map(|r| r.caller), Ok(None));
    }

    #[test]
    fn requests_no_gateway_sends_are_refused() {
        let get = Request::get("https://x/")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            parse_request(&get),
            Err(RequestError::NotConnect("GET".into()))
        );
        let long = format!("{}:1", "a".repeat(300));
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(long)
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parse_request(&request), Err(RequestError::LongService));
        let two = Request::builder()
            .method(Method::CONNECT)
            .uri("orders:1")
            .header(CALLER, "spiffe://west.mesh/a")
            .header(CALLER, "spiffe://west.mesh/b")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parse_request(&two), Err(RequestError::TwoCallers));
    }

    #[test]
    fn answers_read_back_and_unknown_ones_mean_unavailable() {
        assert_eq!(read_answer(&answer(Answer::Open)), Opened::Open);
        assert_eq!(
            read_answer(&answer(Answer::Unavailable("no endpoint"))),
            Opened::Unavailable("no endpoint".into())
        );
        assert_eq!(
            read_answer(&answer(Answer::Refused("caller denied"))),
            Opened::Refused("caller denied".into())
        );
        assert_eq!(read_answer(&reconnect()), Opened::Reconnect);
        let mut teapot = Response::new(());
        *teapot.status_mut() = StatusCode::IM_A_TEAPOT;
        assert!(matches!(read_answer(&teapot), Opened::Unavailable(r) if r.contains("418")));
    }

    proptest! {
        /// Whatever reason a hostile ingress sends reaches a log bounded and
        /// without control characters.
        #[test]
        fn a_peer_reason_is_bounded_and_printable(reason in prop::collection::vec(any::<u8>(), 0..2000)) {
            let mut response = Response::new(());
            *response.status_mut() = StatusCode::FORBIDDEN;
            if let Ok(value) = HeaderValue::from_bytes(&reason) {
                response.headers_mut().insert(REASON, value);
            }
            let Opened::Refused(read) = read_answer(&response) else { panic!("not refused") };
            prop_assert!(read.chars().count() <= MAX_REASON_LEN);
            prop_assert!(!read.chars().any(char::is_control));
        }
    }
}
