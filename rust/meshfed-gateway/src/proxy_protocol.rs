//! PROXY protocol version 2 headers, as a terminate listener sends them to
//! an endpoint when its route sets `"proxy_protocol": true`.
//!
//! The header carries the client's source and the gateway's destination
//! address (`PROXY` command, TCP over IPv4 or IPv6; mixed families are
//! both written as IPv6, IPv4-mapped) and these TLVs:
//!
//! | type | name | value |
//! |---|---|---|
//! | `0x02` | `PP2_TYPE_AUTHORITY` | the SNI the client asked for (UTF-8) |
//! | `0xE0` | [`PP2_TYPE_MESHFED_SPIFFE_ID`] | the caller's verified SPIFFE ID (UTF-8 URI) |
//!
//! `0xE0` is the first of the custom range `0xE0..=0xEF` the spec reserves
//! for application-specific data; backends read it like any other TLV
//! (e.g. HAProxy: `fc_pp_tlv(0xE0)`).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// TLV type of the SNI (standard).
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
/// TLV type of the caller's SPIFFE ID (meshfed's custom type).
pub const PP2_TYPE_MESHFED_SPIFFE_ID: u8 = 0xE0;

const VERSION_COMMAND_PROXY: u8 = 0x21;
const FAMILY_TCP4: u8 = 0x11;
const FAMILY_TCP6: u8 = 0x21;

/// What a header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The client's address.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
    /// `(type, value)` TLVs in order.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

/// Why a header could not be written or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The addresses and TLVs do not fit the 16-bit length field.
    #[error("PROXY v2 header longer than 65535 bytes")]
    TooLong,
    /// Not a v2 PROXY header, or a malformed one.
    #[error("malformed PROXY v2 header: {0}")]
    Malformed(&'static str),
}

/// Writes a v2 `PROXY` header for a TCP connection from `source` to
/// `destination`, with the optional SNI and caller SPIFFE ID as TLVs.
pub fn encode_v2(
    source: SocketAddr,
    destination: SocketAddr,
    authority: Option<&str>,
    spiffe_id: Option<&str>,
) -> Result<Vec<u8>, ProxyHeaderError> {
    let mut tlvs = Vec::new();
    if let Some(sni) = authority {
        tlvs.push((PP2_TYPE_AUTHORITY, sni.as_bytes()));
    }
    if let Some(id) = spiffe_id {
        tlvs.push((PP2_TYPE_MESHFED_SPIFFE_ID, id.as_bytes()));
    }
    encode_v2_tlvs(source, destination, &tlvs)
}

/// Writes a v2 `PROXY` header with arbitrary TLVs.
pub fn encode_v2_tlvs(
    source: SocketAddr,
    destination: SocketAddr,
    tlvs: &[(u8, &[u8])],
) -> Result<Vec<u8>, ProxyHeaderError> {
    let mut body = Vec::with_capacity(36 + tlvs.iter().map(|(_, v)| 3 + v.len()).sum::<usize>());
    let family = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            FAMILY_TCP4
        }
        (s, d) => {
            body.extend_from_slice(&as_v6(s).octets());
            body.extend_from_slice(&as_v6(d).octets());
            FAMILY_TCP6
        }
    };
    body.extend_from_slice(&source.port().to_be_bytes());
    body.extend_from_slice(&destination.port().to_be_bytes());
    for (kind, value) in tlvs {
        let len = u16::try_from(value.len()).map_err(|_| ProxyHeaderError::TooLong)?;
        body.push(*kind);
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(value);
    }
    let len = u16::try_from(body.len()).map_err(|_| ProxyHeaderError::TooLong)?;
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_COMMAND_PROXY);
    out.push(family);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Reads a v2 `PROXY` header (TCP over IPv4/IPv6) from the start of
/// `input`; returns it and its length. For tests, fuzzing and backends
/// written in Rust; the gateway itself only writes headers.
pub fn decode_v2(input: &[u8]) -> Result<(Header, usize), ProxyHeaderError> {
    let malformed = ProxyHeaderError::Malformed;
    if input.get(..12) != Some(&SIGNATURE[..]) {
        return Err(malformed("bad signature"));
    }
    let (Some(&vc), Some(&family)) = (input.get(12), input.get(13)) else {
        return Err(malformed("truncated"));
    };
    if vc != VERSION_COMMAND_PROXY {
        return Err(malformed("not version 2 PROXY"));
    }
    let len = input
        .get(14..16)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or(malformed("truncated"))?;
    let body = input.get(16..16 + len).ok_or(malformed("truncated"))?;
    let (addr_len, source, destination) = match family {
        FAMILY_TCP4 => {
            let a = body.get(..12).ok_or(malformed("short IPv4 addresses"))?;
            let ip = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                12,
                SocketAddr::new(ip(&a[0..4]), port(&a[8..10])),
                SocketAddr::new(ip(&a[4..8]), port(&a[10..12])),
            )
        }
        FAMILY_TCP6 => {
            let a = body.get(..36).ok_or(malformed("short IPv6 addresses"))?;
            let ip = |b: &[u8]| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(b);
                IpAddr::from(octets)
            };
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                36,
                SocketAddr::new(ip(&a[0..16]), port(&a[32..34])),
                SocketAddr::new(ip(&a[16..32]), port(&a[34..36])),
            )
        }
        _ => return Err(malformed("unsupported address family")),
    };
    let mut rest = body.get(addr_len..).unwrap_or_default();
    let mut tlvs = Vec::new();
    while !rest.is_empty() {
        let header = rest.get(..3).ok_or(malformed("truncated TLV"))?;
        let tlv_len = usize::from(u16::from_be_bytes([header[1], header[2]]));
        let value = rest
            .get(3..3 + tlv_len)
            .ok_or(malformed("TLV overruns header"))?;
        tlvs.push((header[0], value.to_vec()));
        rest = rest.get(3 + tlv_len..).unwrap_or_default();
    }
    Ok((
        Header {
            source,
            destination,
            tlvs,
        },
        16 + len,
    ))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn writes_the_spec_layout() {
        let src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:15443".parse().unwrap();
        let id = "spiffe://west.mesh/ns/default/sa/web";
        let bytes = encode_v2(src, dst, Some("web.east.mesh"), Some(id)).unwrap();
        assert_eq!(&bytes[..12], &SIGNATURE);
        assert_eq!(bytes[12], 0x21);
        assert_eq!(bytes[13], 0x11);
        assert_eq!(&bytes[16..20], &[10, 0, 0, 1]);
        assert_eq!(&bytes[24..26], &40000u16.to_be_bytes());
        let (header, len) = decode_v2(&bytes).unwrap();
        assert_eq!(len, bytes.len());
        assert_eq!(header.source, src);
        assert_eq!(header.destination, dst);
        assert_eq!(
            header.tlvs,
            vec![
                (PP2_TYPE_AUTHORITY, b"web.east.mesh".to_vec()),
                (PP2_TYPE_MESHFED_SPIFFE_ID, id.as_bytes().to_vec()),
            ]
        );
    }

    #[test]
    fn refuses_oversize() {
        let a: SocketAddr = "[::1]:1".parse().unwrap();
        let big = "x".repeat(70_000);
        assert_eq!(
            encode_v2(a, a, None, Some(&big)),
            Err(ProxyHeaderError::TooLong)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Whatever the addresses and TLVs, the header reads back the same
        /// (mixed families as IPv4-mapped IPv6).
        #[test]
        fn round_trips(
            src_ip: IpAddr, dst_ip: IpAddr, sp: u16, dp: u16,
            tlvs in prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..64)), 0..4),
        ) {
            let (src, dst) = (SocketAddr::new(src_ip, sp), SocketAddr::new(dst_ip, dp));
            let refs: Vec<(u8, &[u8])> = tlvs.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            let bytes = encode_v2_tlvs(src, dst, &refs).unwrap();
            let (header, len) = decode_v2(&bytes).unwrap();
            prop_assert_eq!(len, bytes.len());
            let same_family = src_ip.is_ipv4() == dst_ip.is_ipv4();
            let expect = |a: SocketAddr| if same_family { a } else { SocketAddr::new(IpAddr::V6(as_v6(a.ip())), a.port()) };
            prop_assert_eq!(header.source, expect(src));
            prop_assert_eq!(header.destination, expect(dst));
            prop_assert_eq!(header.tlvs, tlvs);
        }

        /// Decoding arbitrary bytes never panics.
        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
            let mut input = SIGNATURE.to_vec();
            input.extend_from_slice(&bytes);
            let _ = decode_v2(&input);
            let _ = decode_v2(&bytes);
        }
    }
}
