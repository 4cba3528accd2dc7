//! The gateway's SPIFFE ID parser against `tests/vectors/spiffe_ids.json`,
//! the cases `tests/test_spiffe_vectors.py` runs against the control plane's
//! parser: both must accept the same IDs and trust domains, split them the
//! same way, and refuse the rest for the same reason.
//!
//! Every case is checked and every disagreement listed before the test fails,
//! so one run shows all of them.

use std::error::Error;
use std::fmt;
use std::path::PathBuf;

use meshfed_gateway::{SpiffeError, SpiffeId, TrustDomain};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

type TestResult = Result<(), Box<dyn Error>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    /// The input as bytes: JSON may hold a lone surrogate (`\ud800`), which
    /// no Rust string can; serde_json gives it here as WTF-8.
    #[serde(deserialize_with = "json_string_bytes")]
    input: Vec<u8>,
    kind: Kind,
    valid: bool,
    trust_domain: Option<String>,
    path: Option<String>,
    reason: Option<String>,
    #[allow(dead_code, reason = "documentation for readers of the vector file")]
    note: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Id,
    TrustDomain,
}

fn json_string_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    struct Bytes;
    impl Visitor<'_> for Bytes {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON string")
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }
    }
    deserializer.deserialize_bytes(Bytes)
}

/// The reason classes of the vector file each error variant stands for.
fn reasons(error: &SpiffeError) -> &'static [&'static str] {
    match error {
        SpiffeError::MissingScheme(_) | SpiffeError::SchemeInTrustDomain(_) => &["scheme"],
        SpiffeError::EmptyTrustDomain(_) => &["empty trust domain"],
        SpiffeError::BadTrustDomain(_) => &["bad character"],
        SpiffeError::Port(_) => &["port"],
        SpiffeError::UserInfo(_) => &["userinfo"],
        SpiffeError::TrustDomainTooLong(_) | SpiffeError::TooLong => &["too long"],
        SpiffeError::QueryOrFragment(_) => &["query", "fragment"],
        SpiffeError::BadPath(_) => &[
            "trailing slash",
            "empty path segment",
            "dot segment",
            "bad character",
        ],
    }
}

fn load() -> Result<Vec<Case>, Box<dyn Error>> {
    let file =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors/spiffe_ids.json");
    let text = std::fs::read_to_string(&file).map_err(|e| {
        format!(
            "{}: {e}; the vector file is shared with the Python tests",
            file.display()
        )
    })?;
    Ok(serde_json::from_str(&text)?)
}

/// What the gateway makes of one case: `Ok((trust domain, path))` or the error.
fn parse(kind: Kind, text: &str) -> Result<(String, Option<String>), SpiffeError> {
    match kind {
        Kind::TrustDomain => TrustDomain::parse(text).map(|td| (td.as_str().to_owned(), None)),
        Kind::Id => SpiffeId::parse(text).map(|id| {
            assert_eq!(id.as_str(), text, "a parsed ID keeps its text");
            (
                id.trust_domain().as_str().to_owned(),
                Some(id.path().to_owned()),
            )
        }),
    }
}

/// The disagreement of one case with the gateway's parser, if any.
fn check(case: &Case) -> Option<String> {
    let Ok(text) = std::str::from_utf8(&case.input) else {
        // Not UTF-8 (a lone surrogate): no &str, so nothing the gateway reads (a certificate's URI SAN,
        // a PROXY header TLV) can reach the parser with it. The case must be invalid; the parser must also
        // refuse what a lossy decoding leaves.
        let lossy = String::from_utf8_lossy(&case.input);
        return match (case.valid, parse(case.kind, &lossy)) {
            (false, Err(_)) => None,
            (true, _) => Some("valid, but it is not UTF-8".to_owned()),
            (false, Ok(_)) => Some(format!("its lossy decoding {lossy:?} parses")),
        };
    };
    match (parse(case.kind, text), case.valid) {
        (Ok((trust_domain, path)), true) => {
            let expected = (case.trust_domain.as_deref(), case.path.as_deref());
            (expected != (Some(trust_domain.as_str()), path.as_deref()))
                .then(|| format!("parsed as ({trust_domain:?}, {path:?}), expected {expected:?}"))
        }
        (Ok(parsed), false) => Some(format!(
            "accepted as {parsed:?}, expected a refusal ({:?})",
            case.reason
        )),
        (Err(error), true) => Some(format!("refused ({error}), expected valid")),
        (Err(error), false) => {
            let reason = case.reason.as_deref().unwrap_or("(none)");
            (!reasons(&error).contains(&reason))
                .then(|| format!("refused as {error:?} ({error}), expected reason {reason:?}"))
        }
    }
}

#[test]
fn gateway_parser_agrees_with_every_shared_vector() -> TestResult {
    let cases = load()?;
    assert!(
        cases.len() >= 60,
        "only {} cases: is the vector file truncated?",
        cases.len()
    );
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            check(case).map(|why| {
                let shown = String::from_utf8_lossy(&case.input);
                let shown: String = shown.chars().take(60).collect();
                format!("{:?} {shown:?}: {why}", case.kind)
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} vectors disagree with the gateway:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn the_lone_surrogate_vector_reaches_this_test_as_wtf8() -> TestResult {
    // Guards the byte decoding above: were the surrogate cases decoded some other way (or dropped), the
    // "not UTF-8" branch would go untested.
    let cases = load()?;
    let surrogates = cases
        .iter()
        .filter(|case| case.input.windows(3).any(|w| w == [0xED, 0xA0, 0x80]))
        .count();
    assert!(
        surrogates >= 2,
        "expected \\ud800 cases for both kinds, found {surrogates}"
    );
    Ok(())
}
