//! The caller hop: how an egress gateway tells a peer's ingress gateway
//! which local workload is calling.
//!
//! The egress offers the ALPN protocol `meshfed-caller/1` on its mTLS
//! connection (upstream `tls.convey_caller`). An ingress that negotiates it
//! reads a PROXY v2 header as the first bytes inside the tunnel: source =
//! the workload's address, destination = the egress listener's address,
//! TLV `0x02` = the SNI, TLV `0xE0` = the workload's verified SPIFFE ID,
//! absent when the workload has none (the gateway itself is then the
//! caller). The ingress believes it only from a gateway in its listener's
//! `trusted_gateways`, and only for callers in that gateway's own trust
//! domain: west's gateway may speak for `spiffe://west.mesh/...`, never for
//! east.mesh or a third domain.
//!
//! An ingress that does not negotiate the protocol (an older one) gets no
//! header and sees the egress gateway as the caller, as before.
//!
//! Version 2 (`meshfed-caller/2`, preferred by both ends) adds the **open
//! answer**: after the header, the egress sends nothing more until the
//! ingress has authorized the caller and connected its upstream, and the
//! ingress answers with one byte, `0x00` (open: the client's bytes may
//! flow), or refuses with `0x01` (unavailable here: no route, no reachable
//! endpoint, a full circuit breaker — the egress tries its next endpoint,
//! another zone of a failover group, and counts a failure of this one) or
//! `0x02` (refused for this caller: denied, rate limited — final, and no
//! failure of the endpoint, so one caller's refusals never eject a peer
//! for everyone). A refusal carries a 2-byte big-endian length and a
//! reason of at most [`MAX_REASON_LEN`] bytes of UTF-8, for logs. So a dead
//! backend, a zone that cannot serve, or a full breaker costs the client no
//! failed connection while any source can serve, and what an ingress says
//! about its backends' health it says only to an authenticated gateway.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::stats::HandshakeFailure;
use crate::proxy_protocol::{self, Header, PP2_TYPE_MESHFED_SPIFFE_ID, ProxyHeaderError};
use crate::spiffe::{SpiffeError, SpiffeId};

/// Largest caller header an ingress reads. The real one is well under
/// 2.2 KiB (addresses, an SNI of at most 255 bytes, an ID of at most 2048).
pub(crate) const MAX_HEADER_LEN: usize = 4096;
/// Signature, version/command, family and length: the fixed part.
const FIXED_LEN: usize = 16;

/// Why the caller header could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderError {
    #[error("the peer gateway closed the tunnel inside the caller header")]
    Closed,
    #[error(
        "caller header announces {0} bytes, more than the {MAX_HEADER_LEN} an ingress reads — is the peer a meshfed gateway?"
    )]
    TooLarge(usize),
    #[error(
        "the tunnel does not start with a PROXY v2 caller header ({0}), though the peer negotiated meshfed-caller/1"
    )]
    Malformed(#[from] ProxyHeaderError),
    #[error("cannot read the caller header: {0}")]
    Io(io::Error),
}

impl HeaderError {
    /// How the failure is counted in `handshake_failure_reasons`.
    pub(crate) fn failure(&self) -> HandshakeFailure {
        match self {
            Self::Closed | Self::Io(_) => HandshakeFailure::Closed,
            Self::TooLarge(_) => HandshakeFailure::TooLarge,
            Self::Malformed(_) => HandshakeFailure::Malformed,
        }
    }
}

/// Reads the caller header off the start of `stream`, never a byte past
/// it (what follows is the client's own data). Refuses a header longer than
/// [`MAX_HEADER_LEN`] before reading its body. The caller bounds the time.
pub(crate) async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Header, HeaderError> {
    let eof = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => HeaderError::Closed,
        _ => HeaderError::Io(e),
    };
    // On the heap: a buffer in the future's state would stay with the
    // connection for its whole life.
    let mut buf = vec![0u8; FIXED_LEN];
    stream.read_exact(&mut buf).await.map_err(eof)?;
    if buf.get(..proxy_protocol::SIGNATURE.len()) != Some(&proxy_protocol::SIGNATURE[..]) {
        return Err(ProxyHeaderError::Malformed("bad signature").into());
    }
    let announced = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = FIXED_LEN + announced;
    if total > MAX_HEADER_LEN {
        return Err(HeaderError::TooLarge(total));
    }
    buf.resize(total, 0);
    stream
        .read_exact(&mut buf[FIXED_LEN..])
        .await
        .map_err(eof)?;
    let (header, _) = proxy_protocol::decode_v2(&buf)?;
    Ok(header)
}

/// Longest reason a refusal carries; an egress reads no more.
pub(crate) const MAX_REASON_LEN: usize = 512;
const ANSWER_OPEN: u8 = 0x00;
const ANSWER_UNAVAILABLE: u8 = 0x01;
const ANSWER_REFUSED: u8 = 0x02;

/// What an ingress answers on `meshfed-caller/2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer<'a> {
    /// Upstream connected: the client's bytes may flow.
    Open,
    /// This gateway cannot serve the service now; another may.
    Unavailable(&'a str),
    /// This caller may not (denied, rate limited); final.
    Refused(&'a str),
}

impl Answer<'_> {
    /// The answer's bytes; a reason is cut (at a character boundary) to [`MAX_REASON_LEN`].
    pub(crate) fn encode(self) -> Vec<u8> {
        let (kind, reason) = match self {
            Self::Open => return vec![ANSWER_OPEN],
            Self::Unavailable(reason) => (ANSWER_UNAVAILABLE, reason),
            Self::Refused(reason) => (ANSWER_REFUSED, reason),
        };
        let mut end = reason.len().min(MAX_REASON_LEN);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = &reason.as_bytes()[..end];
        let mut bytes = Vec::with_capacity(3 + reason.len());
        bytes.push(kind);
        // At most MAX_REASON_LEN: fits in two bytes.
        bytes.extend_from_slice(
            &u16::try_from(reason.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        bytes.extend_from_slice(reason);
        bytes
    }
}

/// Why no open answer came back (or what refusal did).
#[derive(Debug, thiserror::Error)]
pub(crate) enum AnswerError {
    #[error("the peer gateway cannot serve it now: {0}")]
    Unavailable(String),
    #[error("the peer gateway refused this caller: {0}")]
    Refused(String),
    #[error("the peer gateway closed the connection before answering")]
    Closed,
    #[error(
        "the peer gateway's answer starts with {0:#04x}, not one of meshfed-caller/2's — is it a meshfed gateway?"
    )]
    Malformed(u8),
    #[error("the peer gateway's refusal announces a {0}-byte reason, more than {MAX_REASON_LEN}")]
    TooLarge(usize),
    #[error("cannot read the peer gateway's answer: {0}")]
    Io(io::Error),
}

/// Reads an ingress's open answer off `stream`, never a byte past it. The
/// reason of a refusal is a peer's text: bounded, and anything not
/// printable is replaced before it can reach a log. The caller bounds the time.
pub(crate) async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(), AnswerError> {
    let eof = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => AnswerError::Closed,
        _ => AnswerError::Io(e),
    };
    let kind = stream.read_u8().await.map_err(eof)?;
    if kind == ANSWER_OPEN {
        return Ok(());
    }
    if kind != ANSWER_UNAVAILABLE && kind != ANSWER_REFUSED {
        return Err(AnswerError::Malformed(kind));
    }
    let length = usize::from(stream.read_u16().await.map_err(eof)?);
    if length > MAX_REASON_LEN {
        return Err(AnswerError::TooLarge(length));
    }
    let mut reason = vec![0u8; length];
    stream.read_exact(&mut reason).await.map_err(eof)?;
    let reason = printable(&reason);
    Err(if kind == ANSWER_UNAVAILABLE {
        AnswerError::Unavailable(reason)
    } else {
        AnswerError::Refused(reason)
    })
}

/// A peer's reason text made safe for a log: invalid UTF-8 replaced, and
/// control characters (a forged log line) turned into `?`. The caller bounds its length.
pub(crate) fn printable(reason: &[u8]) -> String {
    String::from_utf8_lossy(reason)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Why a gateway's caller TLV is refused.
#[derive(Debug)]
pub(crate) enum AssertionError {
    /// A well-formed ID of another trust domain than the gateway's.
    Foreign(SpiffeId),
    /// Not usable at all.
    Unusable(&'static str),
}

/// The caller `gateway` vouches for in `header`: `None` when the header has
/// no caller TLV (the gateway calls for itself).
pub(crate) fn asserted_caller(
    header: &Header,
    gateway: &SpiffeId,
) -> Result<Option<SpiffeId>, AssertionError> {
    let mut values = header
        .tlvs
        .iter()
        .filter(|(kind, _)| *kind == PP2_TYPE_MESHFED_SPIFFE_ID)
        .map(|(_, value)| value);
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        // Two answers to "who is calling": backends might read either one.
        return Err(AssertionError::Unusable("it appears more than once"));
    }
    vouched(value, gateway).map(Some)
}

/// The caller `gateway` vouches for with `value` (a TLV's or a tunnel
/// header's bytes): a SPIFFE ID of the gateway's own trust domain.
pub(crate) fn vouched(value: &[u8], gateway: &SpiffeId) -> Result<SpiffeId, AssertionError> {
    let text = std::str::from_utf8(value).map_err(|_| AssertionError::Unusable("not UTF-8"))?;
    let caller = SpiffeId::parse(text).map_err(|e| {
        AssertionError::Unusable(match e {
            SpiffeError::TooLong => "longer than 2048 bytes",
            _ => "not a SPIFFE ID",
        })
    })?;
    if caller.trust_domain() != gateway.trust_domain() {
        return Err(AssertionError::Foreign(caller));
    }
    Ok(caller)
}

/// The header an egress writes inside the tunnel.
pub(crate) fn encode_header(
    source: SocketAddr,
    destination: SocketAddr,
    sni: &str,
    caller: Option<&SpiffeId>,
) -> Result<Vec<u8>, ProxyHeaderError> {
    proxy_protocol::encode_v2(source, destination, Some(sni), caller.map(SpiffeId::as_str))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id(text: &str) -> SpiffeId {
        SpiffeId::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn read(bytes: &[u8]) -> (Result<Header, HeaderError>, usize) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut rest = bytes;
        let result = runtime.block_on(read_header(&mut rest));
        (result, rest.len())
    }

    fn answer(bytes: &[u8]) -> (Result<(), AnswerError>, usize) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut rest = bytes;
        let result = runtime.block_on(read_answer(&mut rest));
        (result, rest.len())
    }

    #[test]
    fn open_answers_round_trip_and_read_no_byte_past_themselves() {
        let mut open = Answer::Open.encode();
        open.extend_from_slice(b"client bytes");
        assert!(matches!(answer(&open), (Ok(()), 12)));
        let unavailable = Answer::Unavailable("no endpoint reachable").encode();
        assert!(matches!(
            answer(&unavailable),
            (Err(AnswerError::Unavailable(r)), 0) if r == "no endpoint reachable"
        ));
        let refused = Answer::Refused("caller denied").encode();
        assert!(
            matches!(answer(&refused), (Err(AnswerError::Refused(r)), 0) if r == "caller denied")
        );
    }

    #[test]
    fn hostile_answers_are_refused_or_made_harmless() {
        assert!(matches!(answer(&[]), (Err(AnswerError::Closed), _)));
        assert!(matches!(
            answer(&[0x16, 3, 1]),
            (Err(AnswerError::Malformed(0x16)), _)
        ));
        assert!(matches!(
            answer(&[1, 0xFF, 0xFF]),
            (Err(AnswerError::TooLarge(65535)), _)
        ));
        assert!(matches!(
            answer(&[1, 0, 9, b'x']),
            (Err(AnswerError::Closed), _)
        ));
        // Control characters (a forged log line) and invalid UTF-8 never reach a log as such.
        let (result, _) = answer(&[2, 0, 4, b'a', b'\n', 0xFF, b'b']);
        assert!(matches!(result, Err(AnswerError::Refused(r)) if r == "a?\u{FFFD}b"));
    }

    proptest! {
        #[test]
        fn a_long_reason_is_cut_at_a_character_and_still_reads(reason in "\\PC{0,700}") {
            let bytes = Answer::Unavailable(&reason).encode();
            prop_assert!(bytes.len() <= 3 + MAX_REASON_LEN);
            let (result, rest) = answer(&bytes);
            prop_assert_eq!(rest, 0);
            let read = match result { Err(AnswerError::Unavailable(r)) => r, other => panic!("{other:?}") };
            prop_assert!(reason.starts_with(&read));
        }
    }

    #[test]
    fn asserted_caller_stays_in_the_gateway_trust_domain() {
        let gateway = id("spiffe://west.mesh/ns/meshfed-system/sa/gateway");
        let header = |tlvs: &[(u8, &[u8])]| {
            let bytes =
                proxy_protocol::encode_v2_tlvs(addr("10.0.0.1:1"), addr("10.0.0.2:2"), tlvs)
                    .unwrap_or_else(|e| panic!("{e}"));
            proxy_protocol::decode_v2(&bytes)
                .unwrap_or_else(|e| panic!("{e}"))
                .0
        };
        let cart = b"spiffe://west.mesh/ns/shop/sa/cart";
        assert_eq!(
            asserted_caller(&header(&[(0x02, b"web"), (0xE0, cart)]), &gateway).ok(),
            Some(Some(id("spiffe://west.mesh/ns/shop/sa/cart")))
        );
        assert!(matches!(
            asserted_caller(&header(&[(0x02, b"web")]), &gateway),
            Ok(None)
        ));
        for foreign in [
            &b"spiffe://east.mesh/ns/shop/sa/cart"[..],
            b"spiffe://third.mesh/x",
            b"spiffe://west.mesh.evil/x",
        ] {
            assert!(matches!(
                asserted_caller(&header(&[(0xE0, foreign)]), &gateway),
                Err(AssertionError::Foreign(_))
            ));
        }
        for bad in [
            &[(0xE0, &b"west.mesh/x"[..])][..],
            &[(0xE0, &[0xFF, 0xFE][..])],
            &[(0xE0, cart), (0xE0, cart)],
        ] {
            assert!(matches!(
                asserted_caller(&header(bad), &gateway),
                Err(AssertionError::Unusable(_))
            ));
        }
    }

    #[test]
    fn refuses_oversized_and_foreign_headers_without_reading_on() {
        let mut big = proxy_protocol::SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0x13, 0x88]); // announces 5000 bytes
        big.extend_from_slice(&[0u8; 5000]);
        let (result, left) = read(&big);
        assert!(
            matches!(result, Err(HeaderError::TooLarge(5016))),
            "{result:?}"
        );
        assert_eq!(left, 5000, "the body of a refused header must not be read");

        let (result, _) = read(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            matches!(result, Err(HeaderError::Malformed(_))),
            "{result:?}"
        );
        let (result, _) = read(&proxy_protocol::SIGNATURE[..10]);
        assert!(matches!(result, Err(HeaderError::Closed)), "{result:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// A header followed by client bytes reads back whole and leaves the
        /// client bytes unread; any cut inside it is `Closed`.
        #[test]
        fn reads_exactly_the_header(
            sni in "[a-z.]{0,40}",
            path in prop::collection::vec("[a-z]{1,8}", 0..4),
            trailing in prop::collection::vec(any::<u8>(), 0..64),
            cut in any::<prop::sample::Index>(),
        ) {
            let caller = id(&format!("spiffe://west.mesh{}", path.iter().map(|p| format!("/{p}")).collect::<String>()));
            let mut bytes = encode_header(addr("[::1]:40000"), addr("127.0.0.1:15001"), &sni, Some(&caller))
                .unwrap_or_else(|e| panic!("{e}"));
            let len = bytes.len();
            bytes.extend_from_slice(&trailing);
            let (result, left) = read(&bytes);
            let header = result.unwrap_or_else(|e| panic!("{e}"));
            prop_assert_eq!(left, trailing.len());
            prop_assert_eq!(header.tlvs.len(), 2);
            let (result, _) = read(&bytes[..cut.index(len)]);
            prop_assert!(matches!(result, Err(HeaderError::Closed)));
        }

        /// Arbitrary bytes are refused or read, never a panic, never more
        /// than the limit.
        #[test]
        fn never_reads_past_the_limit(mut bytes in prop::collection::vec(any::<u8>(), 0..200), signed: bool, len: u16) {
            if signed {
                let mut head = proxy_protocol::SIGNATURE.to_vec();
                head.extend_from_slice(&[0x21, 0x11]);
                head.extend_from_slice(&len.to_be_bytes());
                head.extend_from_slice(&bytes);
                bytes = head;
            }
            let (result, left) = read(&bytes);
            prop_assert!(bytes.len() - left <= MAX_HEADER_LEN);
            if let Ok(header) = result {
                prop_assert!(header.tlvs.len() <= MAX_HEADER_LEN / 3);
            }
        }
    }
}
