//! The ClientHello/SNI parser on arbitrary network bytes: it must never
//! panic, and its answer must not depend on how the bytes were split into
//! reads (a prefix is either incomplete or already decided the same way).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshfed_gateway::client_hello::{Parsed, parse};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Ok(Parsed::Sni(Some(name))) = &whole {
        assert!(!name.is_empty());
    }
    // Prefixes: the parser is called on every read as bytes accumulate.
    for cut in [data.len() / 3, data.len() / 2, data.len().saturating_sub(1)] {
        if let Some(prefix) = data.get(..cut) {
            let _ = parse(prefix);
        }
    }
});
