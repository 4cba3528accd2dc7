//! A panic-free parser that pulls the SNI out of a TLS ClientHello.
//!
//! The input is untrusted bytes straight from the network. [`parse`] is a
//! pure function over everything read so far: it reassembles a ClientHello
//! split over several TLS records (and so over any number of TCP reads) and
//! answers [`Parsed::Incomplete`] until the whole handshake message is there.
//! Every length is checked before use; nothing indexes out of bounds.

/// Largest ClientHello handshake message accepted (16 KiB, the TLS record
/// payload limit); a bigger one is refused as [`HelloError::TooLarge`].
pub const MAX_HELLO_LEN: usize = 16 * 1024;

/// Largest amount of raw bytes (record headers included) buffered while
/// waiting for a complete ClientHello: the largest hello plus room for the
/// headers of a hello fragmented into a few hundred records. Bounds memory
/// (and re-parsing work) per connection.
pub const MAX_INPUT_LEN: usize = MAX_HELLO_LEN + 4 + 2048;

const RECORD_HEADER_LEN: usize = 5;
const MAX_RECORD_LEN: usize = 16 * 1024 + 256;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// The outcome of parsing the bytes read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed to see the whole ClientHello.
    Incomplete,
    /// The ClientHello is complete; this is its SNI host name, if it sent one.
    Sni(Option<String>),
}

/// Why the bytes are not an acceptable ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first bytes are not a TLS handshake record (plain text, HTTP, ...).
    #[error("not a TLS handshake record (content type {0}) — is the client speaking TLS?")]
    NotHandshake(u8),
    /// The first handshake message is not a ClientHello.
    #[error("first handshake message is type {0}, not ClientHello")]
    NotClientHello(u8),
    /// The ClientHello, or the bytes needed to reach it, exceed the limits.
    #[error("ClientHello larger than {MAX_HELLO_LEN} bytes")]
    TooLarge,
    /// A length or field is inconsistent.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// Parses the bytes read so far from a client and reports whether they hold
/// a complete ClientHello and, if so, its SNI.
pub fn parse(input: &[u8]) -> Result<Parsed, HelloError> {
    let mut handshake = Vec::new();
    let mut rest = input;
    loop {
        if rest.len() < RECORD_HEADER_LEN {
            return incomplete(input);
        }
        let content_type = rest[0];
        if content_type != CONTENT_TYPE_HANDSHAKE {
            return Err(HelloError::NotHandshake(content_type));
        }
        if rest[1] != 3 {
            return Err(HelloError::Malformed("record version is not TLS"));
        }
        let record_len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if record_len == 0 {
            return Err(HelloError::Malformed("empty handshake record"));
        }
        if record_len > MAX_RECORD_LEN {
            return Err(HelloError::Malformed("record longer than 2^14 bytes"));
        }
        let Some(fragment) = rest.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + record_len) else {
            // Judge the handshake header as soon as it is in, so a hello
            // announcing an oversize length is refused before it is read.
            let partial = rest.get(RECORD_HEADER_LEN..).unwrap_or_default();
            check_handshake_header(&handshake, partial)?;
            return incomplete(input);
        };
        handshake.extend_from_slice(fragment);
        rest = &rest[RECORD_HEADER_LEN + record_len..];

        if handshake.len() >= 4 {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::NotClientHello(handshake[0]));
            }
            let hello_len = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if hello_len > MAX_HELLO_LEN {
                return Err(HelloError::TooLarge);
            }
            if let Some(body) = handshake.get(4..4 + hello_len) {
                return parse_body(body).map(Parsed::Sni);
            }
        }
    }
}

/// Checks the 4-byte handshake header once `done` + `partial` hold it.
fn check_handshake_header(done: &[u8], partial: &[u8]) -> Result<(), HelloError> {
    let mut header = [0u8; 4];
    for (slot, byte) in header.iter_mut().zip(done.iter().chain(partial)) {
        *slot = *byte;
    }
    if done.len() + partial.len() < 4 {
        return Ok(());
    }
    if header[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(HelloError::NotClientHello(header[0]));
    }
    let hello_len =
        usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
    if hello_len > MAX_HELLO_LEN {
        return Err(HelloError::TooLarge);
    }
    Ok(())
}

/// More bytes are needed, unless the caller has already buffered the most
/// it may: then the hello is refused as too large.
fn incomplete(input: &[u8]) -> Result<Parsed, HelloError> {
    if input.len() >= MAX_INPUT_LEN {
        Err(HelloError::TooLarge)
    } else {
        Ok(Parsed::Incomplete)
    }
}

/// Parses a complete ClientHello body (after the 4-byte handshake header).
fn parse_body(body: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader(body);
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    let session_id_len = usize::from(r.u8("session_id length")?);
    if session_id_len > 32 {
        return Err(HelloError::Malformed("session_id longer than 32 bytes"));
    }
    r.take(session_id_len, "session_id")?;
    let suites_len = usize::from(r.u16("cipher_suites length")?);
    if suites_len < 2 || suites_len % 2 != 0 {
        return Err(HelloError::Malformed("bad cipher_suites length"));
    }
    r.take(suites_len, "cipher_suites")?;
    let compression_len = usize::from(r.u8("compression_methods length")?);
    if compression_len < 1 {
        return Err(HelloError::Malformed("no compression methods"));
    }
    r.take(compression_len, "compression_methods")?;
    if r.0.is_empty() {
        return Ok(None);
    }
    let extensions_len = usize::from(r.u16("extensions length")?);
    let mut extensions = Reader(r.take(extensions_len, "extensions")?);
    if !r.0.is_empty() {
        return Err(HelloError::Malformed("trailing bytes after extensions"));
    }
    let mut sni = None;
    while !extensions.0.is_empty() {
        let kind = extensions.u16("extension type")?;
        let len = usize::from(extensions.u16("extension length")?);
        let data = extensions.take(len, "extension data")?;
        if kind == EXTENSION_SERVER_NAME {
            if sni.is_some() {
                return Err(HelloError::Malformed("duplicate server_name extension"));
            }
            sni = parse_server_name(data)?;
        }
    }
    Ok(sni)
}

/// Parses the `server_name` extension body and returns its host name.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader(data);
    let list_len = usize::from(r.u16("server_name_list length")?);
    let mut list = Reader(r.take(list_len, "server_name_list")?);
    if !r.0.is_empty() {
        return Err(HelloError::Malformed("trailing bytes in server_name"));
    }
    let mut host = None;
    while !list.0.is_empty() {
        let name_type = list.u8("server name type")?;
        let len = usize::from(list.u16("server name length")?);
        let name = list.take(len, "server name")?;
        if name_type == NAME_TYPE_HOST_NAME && host.is_none() {
            let valid = !name.is_empty()
                && name
                    .iter()
                    .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'\\'));
            if !valid {
                return Err(HelloError::Malformed("server name is not a host name"));
            }
            host = Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(host)
}

/// A bounds-checked cursor over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        self.take(1, what).map(|b| b[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        self.take(2, what).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_certs::client_hello;

    const SNI: &str = "outbound_.8080_._.web.default.svc.east.mesh";

    fn hello_with_sni() -> Vec<u8> {
        client_hello(SNI)
    }

    /// Re-frames a single-record hello into records of `chunk` payload bytes.
    fn refragment(hello: &[u8], chunk: usize) -> Vec<u8> {
        let payload = &hello[5..];
        let mut out = Vec::new();
        for piece in payload.chunks(chunk) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    #[test]
    fn extracts_sni_from_rustls_hello() {
        let hello = hello_with_sni();
        assert_eq!(parse(&hello), Ok(Parsed::Sni(Some(SNI.to_owned()))));
    }

    #[test]
    fn every_prefix_is_incomplete_until_the_end() {
        // Models a ClientHello arriving one byte per TCP read.
        let hello = hello_with_sni();
        for end in 0..hello.len() {
            assert_eq!(parse(&hello[..end]), Ok(Parsed::Incomplete), "prefix {end}");
        }
        assert_eq!(parse(&hello), Ok(Parsed::Sni(Some(SNI.to_owned()))));
    }

    #[test]
    fn reassembles_hello_split_into_one_byte_records() {
        let split = refragment(&hello_with_sni(), 1);
        for end in 0..split.len() {
            assert_eq!(parse(&split[..end]), Ok(Parsed::Incomplete), "prefix {end}");
        }
        assert_eq!(parse(&split), Ok(Parsed::Sni(Some(SNI.to_owned()))));
        let split = refragment(&hello_with_sni(), 7);
        assert_eq!(parse(&split), Ok(Parsed::Sni(Some(SNI.to_owned()))));
    }

    #[test]
    fn hello_without_sni() {
        // rustls sends no SNI when connecting to an IP address.
        assert_eq!(parse(&client_hello("127.0.0.1")), Ok(Parsed::Sni(None)));
    }

    #[test]
    fn trailing_bytes_after_hello_are_ignored() {
        let mut hello = hello_with_sni();
        hello.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(parse(&hello), Ok(Parsed::Sni(Some(SNI.to_owned()))));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Err(HelloError::NotHandshake(b'G'))
        );
        assert!(matches!(
            parse(&[22, 9, 1, 0, 4, 1, 0, 0, 0]),
            Err(HelloError::Malformed(_))
        ));
        assert!(matches!(
            parse(&[22, 3, 1, 0, 0]),
            Err(HelloError::Malformed(_))
        ));
        // A ServerHello (type 2) where a ClientHello belongs.
        assert_eq!(
            parse(&[22, 3, 3, 0, 4, 2, 0, 0, 0]),
            Err(HelloError::NotClientHello(2))
        );
        // A complete but empty ClientHello body.
        assert!(matches!(
            parse(&[22, 3, 1, 0, 4, 1, 0, 0, 0]),
            Err(HelloError::Malformed(_))
        ));
    }

    #[test]
    fn rejects_corrupted_lengths_without_panicking() {
        let hello = hello_with_sni();
        // Flip every byte after the record header in turn: any answer is
        // fine as long as nothing panics.
        for i in 5..hello.len() {
            for value in [0x00, 0x7f, 0xff] {
                let mut corrupt = hello.clone();
                corrupt[i] = value;
                let _ = parse(&corrupt);
                let _ = parse(&corrupt[..i]);
            }
        }
    }

    #[test]
    fn truncated_hello_with_inconsistent_inner_length_is_an_error() {
        // Record says 40 bytes, handshake header says 36 bytes of body, but
        // the body is cut short inside the session id.
        let mut bytes = vec![22, 3, 1, 0, 40, 1, 0, 0, 36, 3, 3];
        bytes.extend_from_slice(&[0; 32]);
        bytes.push(32); // session id length 32, but only 1 byte left
        bytes.push(0);
        assert_eq!(bytes.len(), 5 + 40);
        assert!(matches!(parse(&bytes), Err(HelloError::Malformed(_))));
    }

    #[test]
    fn rejects_oversize() {
        // Handshake header announcing a 64 KiB ClientHello.
        assert_eq!(
            parse(&[22, 3, 1, 0, 4, 1, 1, 0, 0]),
            Err(HelloError::TooLarge)
        );
        // Endless tiny records that never complete the hello.
        let mut bytes = vec![22, 3, 1, 0, 4, 1, 0, 0x3f, 0xff];
        while bytes.len() < MAX_INPUT_LEN {
            bytes.extend_from_slice(&[22, 3, 1, 0, 1, 0]);
        }
        assert_eq!(parse(&bytes), Err(HelloError::TooLarge));
    }

    mod randomized {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            /// Arbitrary bytes, raw or behind a plausible record header,
            /// never panic the parser.
            #[test]
            fn arbitrary_input_never_panics(
                body in prop::collection::vec(any::<u8>(), 0..600),
                len: u16,
            ) {
                let _ = parse(&body);
                let mut framed = vec![22, 3, 1];
                framed.extend_from_slice(&len.to_be_bytes());
                framed.extend_from_slice(&body);
                let _ = parse(&framed);
            }

            /// Any valid SNI survives any record fragmentation, and every
            /// proper prefix is incomplete rather than an error.
            #[test]
            fn sni_survives_fragmentation(
                labels in prop::collection::vec("[a-z][a-z0-9-]{0,10}[a-z0-9]", 1..5),
                chunk in 1usize..300,
            ) {
                let name = labels.join(".");
                let hello = refragment(&client_hello(&name), chunk);
                prop_assert_eq!(parse(&hello), Ok(Parsed::Sni(Some(name))));
                let cut = hello.len() / 2;
                prop_assert_eq!(parse(&hello[..cut]), Ok(Parsed::Incomplete));
            }

            /// Random corruption of a real hello never panics.
            #[test]
            fn corrupted_hello_never_panics(
                flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            ) {
                let mut hello = hello_with_sni();
                for (at, value) in flips {
                    let i = at.index(hello.len());
                    hello[i] = value;
                }
                let _ = parse(&hello);
            }
        }
    }
}
