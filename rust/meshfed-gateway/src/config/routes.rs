//! SNI route tables: exact names and `*.suffix` wildcards.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Routes keyed by SNI. An exact name wins over any wildcard; among
/// wildcards the longest suffix wins. `*.east.mesh` matches any name ending
/// in `.east.mesh` (one label or more), not `east.mesh` itself. Matching is
/// ASCII case-insensitive.
///
/// Keys and routes are behind `Arc`s so that a patch of one route copies
/// pointers, not the 10,000 routes of a big listener.
#[derive(Debug)]
pub(crate) struct SniRouter<R> {
    exact: HashMap<Arc<str>, Arc<R>>,
    /// `(suffix with its leading '.', route)`, longest suffix first.
    wildcards: Vec<(Arc<str>, Arc<R>)>,
}

impl<R> Clone for SniRouter<R> {
    fn clone(&self) -> Self {
        Self {
            exact: self.exact.clone(),
            wildcards: self.wildcards.clone(),
        }
    }
}

/// Where a route patch went wrong: the index of the offending upsert or
/// remove entry, and why.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RouterPatchError {
    Upsert(usize, String),
    Remove(usize, String),
}

/// A pattern's table key (the suffix with its '.' for a wildcard, else the
/// lowercase name) and whether it is a wildcard.
fn parse_pattern(pattern: &str) -> Result<(Arc<str>, bool), String> {
    let pattern = pattern.to_ascii_lowercase();
    let (key, is_wildcard) = match pattern.strip_prefix('*') {
        Some(suffix) if suffix.starts_with('.') && suffix.len() > 1 => (suffix.to_owned(), true),
        Some(_) => {
            return Err(format!(
                "{pattern:?}: a wildcard must look like \"*.suffix\""
            ));
        }
        None => (pattern.clone(), false),
    };
    let valid = key
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'*' | b'/' | b'\\'));
    if key.is_empty() || !valid {
        return Err(format!("{pattern:?} is not a valid SNI name or pattern"));
    }
    Ok((Arc::from(key), is_wildcard))
}

impl<R> SniRouter<R> {
    /// Builds a table from `(pattern, route)` pairs; the error names the
    /// index of the offending pattern and why.
    pub(crate) fn new(
        entries: impl IntoIterator<Item = (String, R)>,
    ) -> Result<Self, (usize, String)> {
        let mut table = Self {
            exact: HashMap::new(),
            wildcards: Vec::new(),
        };
        for (i, (pattern, route)) in entries.into_iter().enumerate() {
            let (key, is_wildcard) = parse_pattern(&pattern).map_err(|e| (i, e))?;
            if table.get_key(&key, is_wildcard).is_some() {
                let pattern = pattern.to_ascii_lowercase();
                return Err((i, format!("duplicate route for SNI {pattern:?}")));
            }
            table.insert_key(key, is_wildcard, Arc::new(route));
        }
        table.sort();
        Ok(table)
    }

    /// This table with `upserts` added (or replacing the route of the same
    /// pattern) and the patterns of `removes` taken out: a copy of the
    /// pointers, then work for the changed entries only. A pattern given
    /// twice, or removed while absent, is refused: the control plane diffs
    /// exactly, so either is a bug to surface, not to guess around.
    pub(crate) fn patched(
        &self,
        upserts: impl IntoIterator<Item = (String, Arc<R>)>,
        removes: &[String],
    ) -> Result<Self, RouterPatchError> {
        let mut table = self.clone();
        let mut seen = HashSet::new();
        for (k, pattern) in removes.iter().enumerate() {
            let (key, is_wildcard) =
                parse_pattern(pattern).map_err(|e| RouterPatchError::Remove(k, e))?;
            if !seen.insert((key.clone(), is_wildcard)) {
                return Err(RouterPatchError::Remove(
                    k,
                    format!("SNI {pattern:?} appears twice in this patch"),
                ));
            }
            if !table.remove_key(&key, is_wildcard) {
                return Err(RouterPatchError::Remove(
                    k,
                    format!("no route for SNI {pattern:?} to remove"),
                ));
            }
        }
        for (j, (pattern, route)) in upserts.into_iter().enumerate() {
            let (key, is_wildcard) =
                parse_pattern(&pattern).map_err(|e| RouterPatchError::Upsert(j, e))?;
            if !seen.insert((key.clone(), is_wildcard)) {
                return Err(RouterPatchError::Upsert(
                    j,
                    format!("SNI {pattern:?} appears twice in this patch"),
                ));
            }
            table.remove_key(&key, is_wildcard);
            table.insert_key(key, is_wildcard, route);
        }
        table.sort();
        Ok(table)
    }

    /// The route configured for `pattern` exactly (not a lookup by SNI).
    pub(crate) fn get_pattern(&self, pattern: &str) -> Option<&Arc<R>> {
        let (key, is_wildcard) = parse_pattern(pattern).ok()?;
        self.get_key(&key, is_wildcard)
    }

    fn get_key(&self, key: &str, is_wildcard: bool) -> Option<&Arc<R>> {
        if is_wildcard {
            self.wildcards
                .iter()
                .find(|(k, _)| &**k == key)
                .map(|(_, r)| r)
        } else {
            self.exact.get(key)
        }
    }

    fn insert_key(&mut self, key: Arc<str>, is_wildcard: bool, route: Arc<R>) {
        if is_wildcard {
            self.wildcards.push((key, route));
        } else {
            self.exact.insert(key, route);
        }
    }

    /// Whether there was a route to remove.
    fn remove_key(&mut self, key: &str, is_wildcard: bool) -> bool {
        if is_wildcard {
            let before = self.wildcards.len();
            self.wildcards.retain(|(k, _)| &**k != key);
            self.wildcards.len() != before
        } else {
            self.exact.remove(key).is_some()
        }
    }

    fn sort(&mut self) {
        // Stable, and two distinct suffixes of one length never match the
        // same name, so the order among equals does not matter.
        self.wildcards
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
    }

    /// Every route, in no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &R> {
        self.exact
            .values()
            .chain(self.wildcards.iter().map(|(_, route)| route))
            .map(|route| &**route)
    }

    /// The route for `sni`, if any.
    pub(crate) fn lookup(&self, sni: &str) -> Option<&R> {
        let sni = sni.to_ascii_lowercase();
        if let Some(route) = self.exact.get(sni.as_str()) {
            return Some(route);
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| sni.len() > suffix.len() && sni.ends_with(&**suffix))
            .map(|(_, route)| &**route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(patterns: &[&str]) -> SniRouter<usize> {
        let entries = patterns
            .iter()
            .enumerate()
            .map(|(i, p)| ((*p).to_owned(), i));
        SniRouter::new(entries).unwrap_or_else(|e| panic!("{e:?}"))
    }

    #[test]
    fn exact_beats_wildcard_and_longest_suffix_wins() {
        let r = router(&["*.mesh", "*.east.mesh", "web.east.mesh", "*.svc.east.mesh"]);
        assert_eq!(r.lookup("web.east.mesh"), Some(&2));
        assert_eq!(r.lookup("WEB.East.Mesh"), Some(&2));
        assert_eq!(r.lookup("api.east.mesh"), Some(&1));
        assert_eq!(r.lookup("a.default.svc.east.mesh"), Some(&3));
        assert_eq!(r.lookup("x.west.mesh"), Some(&0));
        assert_eq!(r.lookup("mesh"), None);
        assert_eq!(r.lookup("east.mesh"), Some(&0));
        assert_eq!(r.lookup("other.org"), None);
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in ["", "*", "*.", "a*.b", "*east.mesh", "a.*.b", "a b"] {
            let res = SniRouter::new([(bad.to_owned(), 0)]);
            assert!(res.is_err(), "{bad:?} accepted");
        }
        let dup = SniRouter::new([("a.b".to_owned(), 0), ("A.b".to_owned(), 1)]);
        assert_eq!(dup.err().map(|e| e.0), Some(1));
    }
}
