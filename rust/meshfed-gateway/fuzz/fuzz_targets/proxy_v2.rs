//! The PROXY protocol v2 writer: any addresses and TLVs either encode to
//! a header that decodes back to the same content, or are refused as too
//! long — never a panic. The decoder is also fed the raw input.
#![no_main]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use meshfed_gateway::proxy_protocol::{decode_v2, encode_v2_tlvs};

fn addr(bytes: &[u8], v6: bool) -> SocketAddr {
    let mut octets = [0u8; 16];
    for (slot, b) in octets.iter_mut().zip(bytes) {
        *slot = *b;
    }
    let port = u16::from_be_bytes([octets[14], octets[15]]);
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        IpAddr::from([octets[0], octets[1], octets[2], octets[3]])
    };
    SocketAddr::new(ip, port)
}

fuzz_target!(|data: &[u8]| {
    let _ = decode_v2(data);
    if data.len() < 33 {
        return;
    }
    let (head, rest) = data.split_at(33);
    let src = addr(&head[1..17], head[0] & 1 == 1);
    let dst = addr(&head[17..33], head[0] & 2 == 2);
    // TLVs: [type, len, value...] chunks of the rest, len scaled up to
    // reach the 64 KiB limit sometimes.
    let mut tlvs: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut input = rest;
    while let [kind, len, tail @ ..] = input {
        let want = usize::from(*len) * if head[0] & 4 == 4 { 300 } else { 1 };
        let take = want.min(tail.len());
        let mut value = tail[..take].to_vec();
        value.resize(want, 0xAA);
        tlvs.push((*kind, value));
        input = &tail[take..];
    }
    let refs: Vec<(u8, &[u8])> = tlvs.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    match encode_v2_tlvs(src, dst, &refs) {
        Ok(bytes) => {
            let (header, len) = decode_v2(&bytes).expect("own header must decode");
            assert_eq!(len, bytes.len());
            assert_eq!(header.tlvs, tlvs);
            assert_eq!(header.source.port(), src.port());
            assert_eq!(header.destination.port(), dst.port());
        }
        Err(_) => {
            let total: usize = 36 + tlvs.iter().map(|(_, v)| 3 + v.len()).sum::<usize>();
            assert!(total > usize::from(u16::MAX) - 36 || tlvs.iter().any(|(_, v)| v.len() > 65535));
        }
    }
});
