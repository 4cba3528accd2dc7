//! SNI route tables: exact names and `*.suffix` wildcards.

use std::collections::HashMap;

/// Routes keyed by SNI. An exact name wins over any wildcard; among
/// wildcards the longest suffix wins. `*.east.mesh` matches any name ending
/// in `.east.mesh` (one label or more), not `east.mesh` itself. Matching is
/// ASCII case-insensitive.
#[derive(Debug)]
pub(crate) struct SniRouter<R> {
    exact: HashMap<String, R>,
    /// `(suffix with its leading '.', route)`, longest suffix first.
    wildcards: Vec<(String, R)>,
}

impl<R> SniRouter<R> {
    /// Builds a table from `(pattern, route)` pairs; the error names the
    /// index of the offending pattern and why.
    pub(crate) fn new(
        entries: impl IntoIterator<Item = (String, R)>,
    ) -> Result<Self, (usize, String)> {
        let mut exact = HashMap::new();
        let mut wildcards: Vec<(String, R)> = Vec::new();
        for (i, (pattern, route)) in entries.into_iter().enumerate() {
            let pattern = pattern.to_ascii_lowercase();
            let (key, is_wildcard) = match pattern.strip_prefix('*') {
                Some(suffix) if suffix.starts_with('.') && suffix.len() > 1 => {
                    (suffix.to_owned(), true)
                }
                Some(_) => {
                    return Err((
                        i,
                        format!("{pattern:?}: a wildcard must look like \"*.suffix\""),
                    ));
                }
                None => (pattern.clone(), false),
            };
            let valid = key
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'*' | b'/' | b'\\'));
            if key.is_empty() || !valid {
                return Err((i, format!("{pattern:?} is not a valid SNI name or pattern")));
            }
            let duplicate = if is_wildcard {
                wildcards.iter().any(|(k, _)| *k == key)
            } else {
                exact.contains_key(&key)
            };
            if duplicate {
                return Err((i, format!("duplicate route for SNI {pattern:?}")));
            }
            if is_wildcard {
                wildcards.push((key, route));
            } else {
                exact.insert(key, route);
            }
        }
        wildcards.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        Ok(Self { exact, wildcards })
    }

    /// Every route, in no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &R> {
        self.exact
            .values()
            .chain(self.wildcards.iter().map(|(_, route)| route))
    }

    /// The route for `sni`, if any.
    pub(crate) fn lookup(&self, sni: &str) -> Option<&R> {
        let sni = sni.to_ascii_lowercase();
        if let Some(route) = self.exact.get(&sni) {
            return Some(route);
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| sni.len() > suffix.len() && sni.ends_with(suffix.as_str()))
            .map(|(_, route)| route)
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
