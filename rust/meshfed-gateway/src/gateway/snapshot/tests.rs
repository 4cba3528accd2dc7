//! A patched snapshot carries exactly the state a full build would, and
//! shares (rather than rebuilds) the state of everything the patch did
//! not touch: on the random configs and edits of the config's own test.

use std::sync::Arc;

use proptest::prelude::*;

use super::Snapshot;
use crate::config::patch_tests::{choices, compile, edits, model, patch};
use crate::gateway::retired::Retired;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn a_patched_snapshot_carries_what_a_full_build_carries(model in model(), first in choices()) {
        let doc = model.document();
        let base_config = compile(&doc).unwrap_or_else(|e| panic!("{e}"));
        let base = Snapshot::build(base_config, &Snapshot::empty(), &mut Retired::default());
        let (edited, p) = edits(&model, &first);
        let (Ok(full), Ok((patched, delta))) = (compile(&edited.document()), patch(&base.config, &p)) else {
            // Refused either way: the config test compares the refusals.
            return Ok(());
        };
        let (mut full_retired, mut patch_retired) = (Retired::default(), Retired::default());
        let full = Snapshot::build(full, &base, &mut full_retired);
        let patched = Snapshot::patched(patched, &delta, &base, &mut patch_retired);

        let mut names: Vec<_> = full.clusters.keys().collect();
        let mut patched_names: Vec<_> = patched.clusters.keys().collect();
        names.sort();
        patched_names.sort();
        prop_assert_eq!(names, patched_names);
        for (name, f) in &full.clusters {
            let p = &patched.clusters[name];
            prop_assert_eq!(f.endpoints.len(), p.endpoints.len());
            let Some(old) = base.clusters.get(name) else {
                continue;
            };
            prop_assert!(Arc::ptr_eq(&f.shared, &old.shared) && Arc::ptr_eq(&p.shared, &old.shared));
            for (fe, pe) in f.endpoints.iter().zip(&p.endpoints) {
                prop_assert_eq!(fe.address, pe.address);
                if old.endpoints.iter().any(|o| Arc::ptr_eq(o, fe)) {
                    prop_assert!(Arc::ptr_eq(fe, pe), "endpoint {} not carried", fe.address);
                }
            }
            if !delta.clusters.contains(name) {
                prop_assert!(Arc::ptr_eq(p, old), "untouched cluster {} rebuilt", name);
            }
        }
        let mut keys: Vec<_> = full.routes.keys().collect();
        let mut patched_keys: Vec<_> = patched.routes.keys().collect();
        keys.sort();
        patched_keys.sort();
        prop_assert_eq!(keys, patched_keys);
        for (key, f) in &full.routes {
            if let Some(old) = base.routes.get(key) {
                prop_assert!(Arc::ptr_eq(f, old) && Arc::ptr_eq(&patched.routes[key], old));
            }
        }
        prop_assert_eq!(full_retired.clusters.len(), patch_retired.clusters.len());
        prop_assert_eq!(full_retired.endpoints.len(), patch_retired.endpoints.len());
        prop_assert_eq!(full_retired.routes.len(), patch_retired.routes.len());
    }
}
