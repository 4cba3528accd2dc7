//! The certificate chains a verifier has already accepted.
//!
//! A gateway connects to the same few backends (and hears from the same few
//! peers) again and again, each time with a full handshake where the other
//! end does not resume sessions, and each time the other end presents the
//! very same chain. Verifying it again (parsing each certificate, one
//! signature check per link, reading the SPIFFE ID) gives the same answer
//! until a certificate of the chain expires: a verifier's roots and
//! expectations are fixed for its life (new trust bundles make new
//! verifiers). So a verifier remembers the last few chains it accepted,
//! byte for byte, with the window in which every certificate of the chain
//! is valid. The handshake's own signature (`CertificateVerify`), which
//! proves the peer holds the key, is still checked on every handshake.
//!
//! Only chains that passed full verification are remembered, so a peer
//! cannot put anything here it could not have presented anyway; the memo
//! is bounded in entries and in bytes per entry.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use rustls::pki_types::{CertificateDer, UnixTime};

/// Chains one verifier remembers; the oldest is forgotten first.
const REMEMBERED: usize = 32;
/// A chain longer than this (all certificates' DER together) is verified
/// every time instead: an SVID chain is a kilobyte or two.
const MAX_CHAIN_BYTES: usize = 16 * 1024;

/// Accepted chains and what their verification found (`T`).
#[derive(Debug)]
pub(crate) struct VerifiedChains<T> {
    entries: Mutex<VecDeque<Verified<T>>>,
}

#[derive(Debug)]
struct Verified<T> {
    /// The end entity, then the intermediates, as presented.
    certs: Vec<Vec<u8>>,
    /// Seconds since the Unix epoch: every certificate of the chain is
    /// valid from `valid_from` to `valid_until`, both included.
    valid_from: u64,
    valid_until: u64,
    found: T,
}

impl<T> Default for VerifiedChains<T> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
        }
    }
}

impl<T: Clone> VerifiedChains<T> {
    /// What verifying this chain found, if it was accepted before and every
    /// certificate of it is still valid at `now`.
    pub(crate) fn get(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Option<T> {
        let now = now.as_secs();
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .iter()
            .find(|v| v.is(end_entity, intermediates))
            .filter(|v| v.valid_from <= now && now <= v.valid_until)
            .map(|v| v.found.clone())
    }

    /// Remembers a chain that has just passed full verification.
    pub(crate) fn remember(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        found: T,
    ) {
        let certs: Vec<Vec<u8>> = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.as_ref().to_vec())
            .collect();
        if certs.iter().map(Vec::len).sum::<usize>() > MAX_CHAIN_BYTES {
            return;
        }
        let Some((valid_from, valid_until)) = validity(&certs) else {
            return;
        };
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|v| !v.is(end_entity, intermediates));
        if entries.len() >= REMEMBERED {
            entries.pop_back();
        }
        entries.push_front(Verified {
            certs,
            valid_from,
            valid_until,
            found,
        });
    }
}

impl<T> Verified<T> {
    fn is(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> bool {
        self.certs.len() == 1 + intermediates.len()
            && std::iter::once(end_entity)
                .chain(intermediates)
                .zip(&self.certs)
                .all(|(presented, known)| presented.as_ref() == known.as_slice())
    }
}

/// The window in which every certificate is valid, in seconds since the
/// Unix epoch; `None` if one does not parse or the window is empty.
fn validity(certs: &[Vec<u8>]) -> Option<(u64, u64)> {
    let mut from = 0_u64;
    let mut until = u64::MAX;
    for der in certs {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let validity = cert.validity();
        from = from.max(u64::try_from(validity.not_before.timestamp()).unwrap_or(0));
        until = until.min(u64::try_from(validity.not_after.timestamp()).ok()?);
    }
    (from <= until).then_some((from, until))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::test_certs::TestDomain;

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    fn leaf(domain: &TestDomain, id: &str) -> CertificateDer<'static> {
        let pem = domain.svid(id).cert_pem;
        let certs = crate::tls::load_certs(&pem).unwrap_or_else(|e| panic!("{e}"));
        certs
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no certificate"))
    }

    #[test]
    fn a_chain_is_known_byte_for_byte_and_only_while_valid() {
        let east = TestDomain::new("east.mesh");
        let other = leaf(&east, "spiffe://east.mesh/ns/shop/sa/orders");
        let leaf = leaf(&east, "spiffe://east.mesh/ns/shop/sa/orders");
        let window = validity(&[leaf.as_ref().to_vec()]).unwrap_or_else(|| panic!("validity"));
        let now = at(window.0 + 60);
        let chains = VerifiedChains::default();
        assert_eq!(chains.get(&leaf, &[], now), None);
        chains.remember(&leaf, &[], 7);
        assert_eq!(chains.get(&leaf, &[], now), Some(7));
        // Another certificate for the same ID, or the same one with an
        // intermediate it was not verified with: verified afresh.
        assert_eq!(chains.get(&other, &[], now), None);
        assert_eq!(chains.get(&leaf, std::slice::from_ref(&other), now), None);
        // Before it is valid and after it expires: verified afresh, which fails.
        assert_eq!(chains.get(&leaf, &[], at(window.0 - 1)), None);
        assert_eq!(chains.get(&leaf, &[], at(window.1 + 1)), None);
        assert_eq!(chains.get(&leaf, &[], at(window.1)), Some(7));
        let mut flipped = leaf.as_ref().to_vec();
        if let Some(last) = flipped.last_mut() {
            *last ^= 1;
        }
        assert_eq!(chains.get(&CertificateDer::from(flipped), &[], now), None);
    }

    #[test]
    fn the_memo_is_bounded() {
        let east = TestDomain::new("east.mesh");
        let chains = VerifiedChains::default();
        let leaves: Vec<_> = (0..=REMEMBERED)
            .map(|i| leaf(&east, &format!("spiffe://east.mesh/ns/shop/sa/s{i}")))
            .collect();
        for (i, leaf) in leaves.iter().enumerate() {
            chains.remember(leaf, &[], i);
        }
        let window = validity(&[leaves[0].as_ref().to_vec()]).unwrap_or_else(|| panic!("validity"));
        let now = at(window.0 + 60);
        assert_eq!(
            chains.get(&leaves[0], &[], now),
            None,
            "the oldest is forgotten"
        );
        assert_eq!(chains.get(&leaves[REMEMBERED], &[], now), Some(REMEMBERED));
        let huge = CertificateDer::from(vec![0_u8; MAX_CHAIN_BYTES + 1]);
        chains.remember(&huge, &[], 0);
        assert_eq!(chains.get(&huge, &[], now), None);
    }
}
