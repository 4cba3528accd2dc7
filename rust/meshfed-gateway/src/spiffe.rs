//! SPIFFE identifiers: trust domains, SPIFFE IDs and the authorization
//! patterns that match them.
//!
//! Everything here is "parse, don't validate": a [`SpiffeId`] or
//! [`TrustDomain`] value can only exist if its text is well formed, so code
//! holding one never re-checks it.

use std::fmt;

/// Longest trust domain name accepted (SPIFFE ID spec §2.1).
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID accepted (SPIFFE ID spec §2.3: URIs of 2048 bytes).
const MAX_SPIFFE_ID_LEN: usize = 2048;
const SCHEME: &str = "spiffe://";

/// Why a string is not a trust domain, SPIFFE ID or SPIFFE ID pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// The string does not start with `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID: it must start with \"spiffe://\"")]
    MissingScheme(String),
    /// The trust domain part is empty.
    #[error("{0:?} has an empty trust domain")]
    EmptyTrustDomain(String),
    /// The trust domain contains a character outside `[a-z0-9._-]`.
    #[error("trust domain {0:?} may only contain lowercase letters, digits, '.', '-' and '_'")]
    BadTrustDomain(String),
    /// A trust domain name was given as a SPIFFE ID (`spiffe://east.mesh`).
    #[error(
        "{0:?} is a SPIFFE ID, not a trust domain name: give the name alone, without \"spiffe://\""
    )]
    SchemeInTrustDomain(String),
    /// The trust domain part carries a port (`east.mesh:443`).
    #[error("trust domain {0:?} must not contain a port")]
    Port(String),
    /// The trust domain part carries user info (`user@east.mesh`).
    #[error("trust domain {0:?} must not contain user info ('@')")]
    UserInfo(String),
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain {0:?} is longer than 255 characters")]
    TrustDomainTooLong(String),
    /// The ID is longer than 2048 bytes.
    #[error("SPIFFE ID is longer than 2048 characters")]
    TooLong,
    /// The ID carries a query or a fragment.
    #[error("SPIFFE ID {0:?} must not have a query or a fragment")]
    QueryOrFragment(String),
    /// The path has an empty, `.` or `..` segment, a trailing slash or a bad character.
    #[error(
        "SPIFFE ID {0:?} has a bad path: segments must be non-empty, not '.' or '..', of [A-Za-z0-9._-], with no trailing '/'"
    )]
    BadPath(String),
}

/// A SPIFFE trust domain, e.g. `east.mesh`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name: lowercase `[a-z0-9._-]`, 1 to 255
    /// characters. `spiffe://east.mesh` is refused: that is a SPIFFE ID, not a
    /// trust domain name (SPIFFE ID spec §2.1), and the control plane refuses
    /// it too. The cases both parsers run are in `tests/vectors/spiffe_ids.json`.
    pub fn parse(name: &str) -> Result<Self, SpiffeError> {
        if name.is_empty() {
            return Err(SpiffeError::EmptyTrustDomain(name.to_owned()));
        }
        if name.starts_with(SCHEME) {
            return Err(SpiffeError::SchemeInTrustDomain(name.to_owned()));
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeError::TrustDomainTooLong(name.to_owned()));
        }
        // A port or user info is refused by the character check below anyway; these name the mistake.
        if name.contains('@') {
            return Err(SpiffeError::UserInfo(name.to_owned()));
        }
        if let Some((_, port)) = name.rsplit_once(':') {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(SpiffeError::Port(name.to_owned()));
            }
        }
        let valid = name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'));
        if !valid {
            return Err(SpiffeError::BadTrustDomain(name.to_owned()));
        }
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE ID, `spiffe://<trust-domain>[/<path>]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    id: String,
    trust_domain: TrustDomain,
}

impl SpiffeId {
    /// Parses a SPIFFE ID per the SPIFFE ID spec: scheme `spiffe`, a
    /// lowercase trust domain without port or userinfo, an optional path of
    /// non-empty segments, no query and no fragment.
    pub fn parse(text: &str) -> Result<Self, SpiffeError> {
        if text.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeError::TooLong);
        }
        let Some(rest) = text.strip_prefix(SCHEME) else {
            return Err(SpiffeError::MissingScheme(text.to_owned()));
        };
        if text.contains(['?', '#']) {
            return Err(SpiffeError::QueryOrFragment(text.to_owned()));
        }
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if domain.is_empty() {
            return Err(SpiffeError::EmptyTrustDomain(text.to_owned()));
        }
        let trust_domain = TrustDomain::parse(domain)?;
        if !path.is_empty() {
            let path_ok = path[1..].split('/').all(|segment| {
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            });
            if !path_ok {
                return Err(SpiffeError::BadPath(text.to_owned()));
            }
        }
        Ok(Self {
            id: text.to_owned(),
            trust_domain,
        })
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The full ID text.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The path: empty for a trust domain's own ID, else `/` and segments.
    pub fn path(&self) -> &str {
        &self.id[SCHEME.len() + self.trust_domain.0.len()..]
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// An authorization pattern over verified SPIFFE IDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpiffePattern {
    /// `*`: any verified identity.
    Any,
    /// An exact SPIFFE ID.
    Exact(SpiffeId),
    /// `spiffe://td/some/prefix/*`: every ID strictly below the prefix.
    Prefix(SpiffeId),
}

impl SpiffePattern {
    /// Parses `*`, an exact SPIFFE ID, or a SPIFFE ID followed by `/*`.
    pub fn parse(text: &str) -> Result<Self, SpiffeError> {
        if text == "*" {
            return Ok(Self::Any);
        }
        match text.strip_suffix("/*") {
            Some(prefix) => SpiffeId::parse(prefix).map(Self::Prefix),
            None => SpiffeId::parse(text).map(Self::Exact),
        }
    }

    /// Whether `id` is allowed by this pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(exact) => exact == id,
            Self::Prefix(prefix) => id
                .as_str()
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.starts_with('/')),
        }
    }
}

impl fmt::Display for SpiffePattern {
    /// The pattern as written in a config: `*`, an ID, or an ID followed by `/*`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(id) => f.write_str(id.as_str()),
            Self::Prefix(prefix) => write!(f, "{prefix}/*"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_ids() {
        for text in [
            "spiffe://east.mesh",
            "spiffe://east.mesh/ns/default/sa/web",
            "spiffe://a-b_c.0/x.y/z-1",
        ] {
            let id = SpiffeId::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(id.as_str(), text);
        }
        let id = SpiffeId::parse("spiffe://west.mesh/ns/a/sa/b").ok();
        assert_eq!(
            id.map(|i| i.trust_domain().as_str().to_owned()),
            Some("west.mesh".to_owned())
        );
    }

    #[test]
    fn rejects_bad_ids() {
        type Check = fn(&SpiffeError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("https://east.mesh/x", |e| {
                matches!(e, SpiffeError::MissingScheme(_))
            }),
            ("spiffe://", |e| {
                matches!(e, SpiffeError::EmptyTrustDomain(_))
            }),
            ("spiffe:///ns/x", |e| {
                matches!(e, SpiffeError::EmptyTrustDomain(_))
            }),
            ("spiffe://East.mesh/x", |e| {
                matches!(e, SpiffeError::BadTrustDomain(_))
            }),
            ("spiffe://east.mesh:443/x", |e| {
                matches!(e, SpiffeError::Port(_))
            }),
            ("spiffe://user@east.mesh/x", |e| {
                matches!(e, SpiffeError::UserInfo(_))
            }),
            ("spiffe://east.mesh/x?y=1", |e| {
                matches!(e, SpiffeError::QueryOrFragment(_))
            }),
            ("spiffe://east.mesh/x#f", |e| {
                matches!(e, SpiffeError::QueryOrFragment(_))
            }),
            ("spiffe://east.mesh/", |e| {
                matches!(e, SpiffeError::BadPath(_))
            }),
            ("spiffe://east.mesh//x", |e| {
                matches!(e, SpiffeError::BadPath(_))
            }),
            ("spiffe://east.mesh/a/../b", |e| {
                matches!(e, SpiffeError::BadPath(_))
            }),
            ("spiffe://east.mesh/a/./b", |e| {
                matches!(e, SpiffeError::BadPath(_))
            }),
            ("spiffe://east.mesh/a b", |e| {
                matches!(e, SpiffeError::BadPath(_))
            }),
        ];
        for (text, check) in cases {
            match SpiffeId::parse(text) {
                Ok(id) => panic!("{text} parsed as {id}"),
                Err(e) => assert!(check(&e), "{text}: unexpected error {e:?}"),
            }
        }
        let long = format!("spiffe://east.mesh/{}", "a".repeat(2100));
        assert_eq!(SpiffeId::parse(&long), Err(SpiffeError::TooLong));
        let long_td = format!("spiffe://{}", "a".repeat(256));
        assert!(matches!(
            SpiffeId::parse(&long_td),
            Err(SpiffeError::TrustDomainTooLong(_))
        ));
    }

    #[test]
    fn trust_domain_parse() {
        assert!(TrustDomain::parse("east.mesh").is_ok());
        assert!(TrustDomain::parse("").is_err());
        assert!(TrustDomain::parse("East").is_err());
        assert!(TrustDomain::parse("spiffe://east").is_err());
    }

    #[test]
    fn patterns_match() -> Result<(), SpiffeError> {
        let web = SpiffeId::parse("spiffe://west.mesh/ns/default/sa/web")?;
        let other = SpiffeId::parse("spiffe://west.mesh.evil/ns/default/sa/web")?;
        let root = SpiffeId::parse("spiffe://west.mesh")?;
        let any = SpiffePattern::parse("*")?;
        let td = SpiffePattern::parse("spiffe://west.mesh/*")?;
        let ns = SpiffePattern::parse("spiffe://west.mesh/ns/default/*")?;
        let exact = SpiffePattern::parse("spiffe://west.mesh/ns/default/sa/web")?;
        let nsx = SpiffePattern::parse("spiffe://west.mesh/ns/def/*")?;
        assert!(any.matches(&web) && any.matches(&other));
        assert!(td.matches(&web) && !td.matches(&other) && !td.matches(&root));
        assert!(ns.matches(&web));
        assert!(!nsx.matches(&web), "prefix must match whole segments");
        assert!(exact.matches(&web) && !exact.matches(&other));
        for text in [
            "*",
            "spiffe://west.mesh/ns/default/*",
            "spiffe://west.mesh/x",
        ] {
            assert_eq!(SpiffePattern::parse(text)?.to_string(), text);
        }
        assert!(SpiffePattern::parse("spiffe://west.mesh/ns/*/sa/x").is_err());
        assert!(SpiffePattern::parse("west.mesh/*").is_err());
        Ok(())
    }
}
