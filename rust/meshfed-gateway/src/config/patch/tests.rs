//! A patch must give what the full document with the same edits gives:
//! checked on random small configs and edits (proptest), plus the refusals
//! a full document has no equivalent of.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::config::RouteTarget;
use crate::test_certs::TestDomain;

const PEER: &str = "spiffe://east.mesh/ns/meshfed-system/sa/gateway";

/// Identity and bundles, made once (key generation is slow).
fn pki() -> &'static (Value, Value) {
    static PKI: OnceLock<(Value, Value)> = OnceLock::new();
    PKI.get_or_init(|| {
        let east = TestDomain::new("east.mesh");
        let svid = east.svid(PEER);
        (
            json!({"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem}),
            json!({"east.mesh": east.bundle_pem()}),
        )
    })
}

/// A config document as plain parts, edited like the control plane would.
#[derive(Debug, Clone)]
pub(crate) struct Model {
    /// Cluster name -> (endpoint ports, mTLS).
    clusters: BTreeMap<String, (Vec<u16>, bool)>,
    /// Passthrough listener "p": SNI -> cluster.
    passthrough: BTreeMap<String, String>,
    /// Terminate listener "t": SNI -> clusters of a split (one: a plain route).
    terminate: BTreeMap<String, Vec<String>>,
    /// Connect listener "c": authority -> cluster.
    connect: BTreeMap<String, String>,
    /// Originate listeners, in document order: (name, port, cluster).
    originate: Vec<(String, u16, String)>,
}

fn cluster_json(name: &str, ports: &[u16], tls: bool) -> Value {
    let endpoints: Vec<Value> = ports
        .iter()
        .map(|p| json!({"address": format!("127.0.0.1:{p}")}))
        .collect();
    let mut cluster = json!({"name": name, "endpoints": endpoints});
    if tls {
        cluster["tls"] = json!({"sni": "gw.east.mesh", "peer_spiffe_id": PEER});
    }
    cluster
}

fn passthrough_route(sni: &str, cluster: &str) -> Value {
    json!({"sni": sni, "cluster": cluster})
}

fn terminate_route(sni: &str, split: &[String]) -> Value {
    let rules = json!([{"action": "allow", "id": "spiffe://east.mesh/*"}]);
    match split {
        [one] => json!({"sni": sni, "cluster": one, "rules": rules}),
        many => {
            let weighted: Vec<Value> = many
                .iter()
                .map(|c| json!({"cluster": c, "weight": 1}))
                .collect();
            json!({"sni": sni, "weighted_clusters": weighted, "rules": rules})
        }
    }
}

fn originate_json(name: &str, port: u16, cluster: &str) -> Value {
    // Port 0 for most, so fixed-address conflicts come up now and then only.
    json!({"name": name, "address": format!("127.0.0.1:{port}"), "mode": "originate",
           "cluster": cluster})
}

impl Model {
    pub(crate) fn document(&self) -> Value {
        let (identity, bundles) = pki();
        let mut listeners = vec![
            json!({"name": "p", "address": "127.0.0.1:0", "mode": "passthrough",
                   "routes": self.passthrough.iter().map(|(s, c)| passthrough_route(s, c)).collect::<Vec<_>>()}),
            json!({"name": "t", "address": "127.0.0.1:0", "mode": "terminate",
                   "routes": self.terminate.iter().map(|(s, c)| terminate_route(s, c)).collect::<Vec<_>>()}),
            json!({"name": "c", "address": "127.0.0.1:0", "mode": "connect",
                   "connect_routes": self.connect.iter()
                       .map(|(a, c)| json!({"authority": a, "cluster": c})).collect::<Vec<_>>()}),
        ];
        listeners.extend(
            self.originate
                .iter()
                .map(|(n, p, c)| originate_json(n, *p, c)),
        );
        json!({
            "identity": identity,
            "trust_bundles": bundles,
            "listeners": listeners,
            "clusters": self.clusters.iter()
                .map(|(n, (ports, tls))| cluster_json(n, ports, *tls)).collect::<Vec<_>>(),
        })
    }
}

const CLUSTERS: [&str; 5] = ["a", "b", "c", "d", "e"];
const SNIS: [&str; 4] = ["x.mesh", "y.mesh", "*.mesh", "*.east.mesh"];
const AUTHORITIES: [&str; 3] = ["x.ns.east:80", "y.ns.east:80", "z.ns.east:8080"];
const ORIGINATE: [&str; 3] = ["o0", "o1", "o2"];

fn cluster_name() -> impl Strategy<Value = String> {
    prop::sample::select(&CLUSTERS[..]).prop_map(str::to_owned)
}

pub(crate) fn model() -> impl Strategy<Value = Model> {
    // Every cluster exists at first, plain (a passthrough route may use any).
    let ports = || prop::collection::btree_set(1u16..4, 1..3).prop_map(Vec::from_iter);
    (
        prop::collection::vec(ports(), CLUSTERS.len()).prop_map(|all| {
            CLUSTERS
                .iter()
                .zip(all)
                .map(|(name, ports)| ((*name).to_owned(), (ports, false)))
                .collect::<BTreeMap<_, _>>()
        }),
        prop::collection::btree_map(prop::sample::select(&SNIS[..]), cluster_name(), 0..4),
        prop::collection::btree_map(
            prop::sample::select(&SNIS[..]),
            prop::collection::vec(cluster_name(), 1..3),
            0..4,
        ),
        prop::collection::btree_map(prop::sample::select(&AUTHORITIES[..]), cluster_name(), 0..3),
        prop::collection::btree_map(prop::sample::select(&ORIGINATE[..]), cluster_name(), 0..3),
    )
        .prop_map(|(clusters, p, t, c, o)| Model {
            clusters,
            passthrough: p.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            terminate: t.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            connect: c.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            originate: o.into_iter().map(|(n, c)| (n.to_owned(), 0, c)).collect(),
        })
}

/// Raw choices of edits; `edits` turns them into ones that name existing
/// things where a patch must (removals), so both sides may be compared.
#[derive(Debug, Clone)]
pub(crate) struct Choices {
    clusters: Vec<(usize, bool, Vec<u16>, bool)>,
    passthrough: Vec<(usize, bool, usize)>,
    terminate: Vec<(usize, bool, Vec<usize>)>,
    connect: Vec<(usize, bool, usize)>,
    originate: Vec<(usize, bool, u16, usize)>,
}

pub(crate) fn choices() -> impl Strategy<Value = Choices> {
    let pick = || 0usize..5;
    (
        prop::collection::vec(
            (
                pick(),
                prop::bool::weighted(0.3),
                prop::collection::btree_set(1u16..4, 1..3).prop_map(Vec::from_iter),
                prop::bool::weighted(0.2),
            ),
            0..3,
        ),
        prop::collection::vec((0usize..4, prop::bool::ANY, pick()), 0..3),
        prop::collection::vec(
            (
                0usize..4,
                prop::bool::ANY,
                prop::collection::vec(pick(), 1..3),
            ),
            0..3,
        ),
        prop::collection::vec((0usize..3, prop::bool::ANY, pick()), 0..3),
        prop::collection::vec(
            (
                0usize..3,
                prop::bool::weighted(0.3),
                prop::sample::select(&[0u16, 0, 15001][..]),
                pick(),
            ),
            0..3,
        ),
    )
        .prop_map(
            |(clusters, passthrough, terminate, connect, originate)| Choices {
                clusters,
                passthrough,
                terminate,
                connect,
                originate,
            },
        )
}

/// Applies `choices` to `model`: the edited model and the patch saying the same.
pub(crate) fn edits(model: &Model, choices: &Choices) -> (Model, Value) {
    let mut next = model.clone();
    let mut patch = json!({});
    let mut touched = BTreeSet::new();
    let (mut upserts, mut removes) = (Vec::new(), Vec::new());
    for (i, remove, ports, tls) in &choices.clusters {
        let name = CLUSTERS[*i % CLUSTERS.len()];
        if !touched.insert(name) {
            continue;
        }
        if *remove {
            if next.clusters.remove(name).is_some() {
                removes.push(json!(name));
            }
        } else {
            next.clusters.insert(name.to_owned(), (ports.clone(), *tls));
            upserts.push(cluster_json(name, ports, *tls));
        }
    }
    patch["clusters"] = json!(upserts);
    patch["remove_clusters"] = json!(removes);

    // One route edit list per listener, each SNI once.
    fn edit<V: Clone>(
        table: &mut BTreeMap<String, V>,
        keys: &[&str],
        picks: impl Iterator<Item = (usize, bool, V)>,
        route: impl Fn(&str, &V) -> Value,
    ) -> (Vec<Value>, Vec<Value>) {
        let (mut upsert, mut remove) = (Vec::new(), Vec::new());
        let mut seen = BTreeSet::new();
        for (k, removing, value) in picks {
            let key = keys[k % keys.len()];
            if !seen.insert(key) {
                continue;
            }
            if removing {
                if table.remove(key).is_some() {
                    remove.push(json!(key));
                }
            } else {
                upsert.push(route(key, &value));
                table.insert(key.to_owned(), value);
            }
        }
        (upsert, remove)
    }
    let name = |i: usize| CLUSTERS[i % CLUSTERS.len()].to_owned();
    let (up, rm) = edit(
        &mut next.passthrough,
        &SNIS,
        choices
            .passthrough
            .iter()
            .map(|(s, r, c)| (*s, *r, name(*c))),
        |s, c| passthrough_route(s, c),
    );
    let p = json!({"listener": "p", "upsert": up, "remove": rm});
    let (up, rm) = edit(
        &mut next.terminate,
        &SNIS,
        choices
            .terminate
            .iter()
            .map(|(s, r, cs)| (*s, *r, cs.iter().map(|c| name(*c)).collect::<Vec<_>>())),
        |s, cs| terminate_route(s, cs),
    );
    let t = json!({"listener": "t", "upsert": up, "remove": rm});
    patch["routes"] = json!([p, t]);
    let (up, rm) = edit(
        &mut next.connect,
        &AUTHORITIES,
        choices.connect.iter().map(|(a, r, c)| (*a, *r, name(*c))),
        |a, c| json!({"authority": a, "cluster": c}),
    );
    patch["connect_routes"] = json!([{"listener": "c", "upsert": up, "remove": rm}]);

    let (mut upserts, mut removes) = (Vec::new(), Vec::new());
    let mut seen = BTreeSet::new();
    for (i, remove, port, cluster) in &choices.originate {
        let listener = ORIGINATE[*i % ORIGINATE.len()];
        if !seen.insert(listener) {
            continue;
        }
        let position = next.originate.iter().position(|(n, _, _)| n == listener);
        if *remove {
            if let Some(position) = position {
                next.originate.remove(position);
                removes.push(json!(listener));
            }
        } else {
            let entry = (listener.to_owned(), *port, name(*cluster));
            upserts.push(originate_json(&entry.0, entry.1, &entry.2));
            match position {
                Some(position) => next.originate[position] = entry,
                None => next.originate.push(entry),
            }
        }
    }
    patch["listeners"] = json!(upserts);
    patch["remove_listeners"] = json!(removes);
    (next, patch)
}

/// What routing sees of a config, in a comparable form.
fn summary(config: &CompiledConfig) -> Value {
    let target = |t: &RouteTarget| match t {
        RouteTarget::Cluster(c) => json!(c),
        RouteTarget::Weighted { clusters, total } => json!({"split": clusters, "total": total}),
    };
    let routes = |specs: Vec<&RouteSpec>| {
        specs
            .into_iter()
            .map(|r| (r.key.to_string(), target(&r.target)))
            .collect::<BTreeMap<_, _>>()
    };
    let listeners: Vec<Value> = config
        .listeners
        .iter()
        .map(|l| {
            let mode = match &l.mode {
                ListenerMode::Passthrough { routes: r } => {
                    json!({"passthrough": routes(r.values().collect())})
                }
                ListenerMode::Terminate { routes: r, .. } => {
                    json!({"terminate": routes(r.values().map(|r| &r.route).collect())})
                }
                ListenerMode::Originate { cluster, .. } => json!({"originate": cluster}),
                ListenerMode::Connect { routes } => json!({"connect": routes
                    .iter()
                    .map(|(a, c)| (a.to_string(), c.to_string()))
                    .collect::<BTreeMap<_, _>>()}),
            };
            json!({"name": &*l.name, "address": l.address.to_string(), "mode": mode,
                   "limits": [l.limits.max_connections, l.limits.max_handshakes]})
        })
        .collect();
    let clusters: BTreeMap<String, Value> = config
        .clusters
        .iter()
        .map(|(name, c)| {
            assert_eq!(**name, *c.name);
            let endpoints: Vec<Value> = c
                .endpoints
                .iter()
                .map(|e| {
                    json!([
                        e.address.to_string(),
                        e.weight,
                        e.priority,
                        e.peer().map(|p| p.to_string())
                    ])
                })
                .collect();
            (
                name.to_string(),
                json!({"endpoints": endpoints, "lb": format!("{:?}", c.lb),
                                       "timeout": c.connect_timeout.as_millis() as u64}),
            )
        })
        .collect();
    // The index and the users of each cluster are derived data: they must
    // agree with what they index, whatever the history of patches.
    for (name, &position) in &config.listener_index {
        assert_eq!(config.listeners[position].name, *name);
    }
    assert_eq!(config.listener_index.len(), config.listeners.len());
    assert_eq!(
        users(&config.referrers),
        users(&Referrers::of(&config.listeners))
    );
    json!({"listeners": listeners, "clusters": clusters})
}

fn users(referrers: &Referrers) -> BTreeMap<String, BTreeSet<Referrer>> {
    referrers
        .0
        .iter()
        .map(|(c, users)| (c.to_string(), users.iter().cloned().collect()))
        .collect()
}

pub(crate) fn patch(
    base: &CompiledConfig,
    patch: &Value,
) -> Result<(CompiledConfig, Delta), ConfigError> {
    base.patch_with_delta(patch.to_string().as_bytes())
}

pub(crate) fn compile(doc: &Value) -> Result<CompiledConfig, ConfigError> {
    CompiledConfig::from_json(doc.to_string().as_bytes())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A patch is accepted exactly when the edited full document is, and
    /// then routes, clusters and endpoints are the same; a second patch on
    /// the patched config still agrees (the derived indexes stay right).
    #[test]
    fn a_patch_gives_what_the_edited_full_document_gives(
        model in model(),
        first in choices(),
        second in choices(),
    ) {
        let base = compile(&model.document()).unwrap_or_else(|e| panic!("{e}"));
        let (edited, p) = edits(&model, &first);
        let full = compile(&edited.document());
        let patched = patch(&base, &p);
        prop_assert_eq!(
            full.is_ok(), patched.is_ok(),
            "full: {:?}\npatch: {:?}\n{}", full.as_ref().err(), patched.as_ref().err(), p
        );
        let (Ok(full), Ok((patched, _))) = (full, patched) else {
            return Ok(());
        };
        prop_assert_eq!(summary(&full), summary(&patched));

        let (twice, p) = edits(&edited, &second);
        let full = compile(&twice.document());
        let again = patch(&patched, &p);
        prop_assert_eq!(full.is_ok(), again.is_ok(), "{:?} {:?}", full.as_ref().err(), again.as_ref().err());
        if let (Ok(full), Ok((again, _))) = (full, again) {
            prop_assert_eq!(summary(&full), summary(&again));
        }
    }
}

/// A base config for the refusal tests: every kind of user of cluster "a".
fn base() -> CompiledConfig {
    let model = Model {
        clusters: [("a", false), ("b", false), ("gw", true)]
            .into_iter()
            .map(|(n, tls)| (n.to_owned(), (vec![1], tls)))
            .collect(),
        passthrough: BTreeMap::from([("x.mesh".to_owned(), "a".to_owned())]),
        terminate: BTreeMap::from([("x.mesh".to_owned(), vec!["gw".to_owned()])]),
        connect: BTreeMap::from([("x.ns.east:80".to_owned(), "b".to_owned())]),
        originate: vec![("o0".to_owned(), 0, "b".to_owned())],
    };
    compile(&model.document()).unwrap_or_else(|e| panic!("{e}"))
}

fn refused(patch_doc: Value) -> String {
    match patch(&base(), &patch_doc) {
        Ok(_) => panic!("accepted: {patch_doc}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn refusals_name_the_field_and_what_to_check() {
    let cases = [
        (
            json!({"remove_clusters": ["a"]}),
            "remove_clusters[0]: cluster \"a\" is still used by the route for SNI \"x.mesh\" of listener \"p\"",
        ),
        (
            json!({"remove_clusters": ["b"]}),
            "remove_clusters[0]: cluster \"b\" is still used by",
        ),
        (
            json!({"remove_clusters": ["nope"]}),
            "remove_clusters[0]: no cluster named \"nope\" to remove",
        ),
        (
            json!({"remove_listeners": ["nope"]}),
            "remove_listeners[0]: no listener named \"nope\" to remove",
        ),
        (
            json!({"clusters": [cluster_json("a", &[2], false)], "remove_clusters": ["a"]}),
            "clusters[0].name: cluster \"a\" appears twice in this patch",
        ),
        (
            json!({"clusters": [cluster_json("z", &[2], false), cluster_json("z", &[3], false)]}),
            "clusters[1].name: cluster \"z\" appears twice in this patch",
        ),
        (
            json!({"listeners": [originate_json("o0", 0, "a")], "remove_listeners": ["o0"]}),
            "listeners[0].name: listener \"o0\" appears twice in this patch",
        ),
        (
            json!({"routes": [{"listener": "c", "upsert": [passthrough_route("y.mesh", "a")]}]}),
            "routes[0].listener: listener \"c\" is a connect listener",
        ),
        (
            json!({"routes": [{"listener": "o0", "remove": ["x.mesh"]}]}),
            "routes[0].listener: listener \"o0\" is an originate listener",
        ),
        (
            json!({"connect_routes": [{"listener": "p", "remove": ["x.ns.east:80"]}]}),
            "connect_routes[0].listener: listener \"p\" is a passthrough listener",
        ),
        (
            json!({"routes": [{"listener": "nope", "remove": ["x.mesh"]}]}),
            "routes[0].listener: no listener named \"nope\"",
        ),
        (
            json!({"routes": [{"listener": "p", "remove": ["y.mesh"]}]}),
            "routes[0].remove[0]: no route for SNI \"y.mesh\" to remove",
        ),
        (
            json!({"routes": [{"listener": "p", "upsert": [passthrough_route("X.mesh", "b")],
                               "remove": ["x.mesh"]}]}),
            "routes[0].upsert[0].sni: SNI \"X.mesh\" appears twice in this patch",
        ),
        (
            json!({"routes": [{"listener": "p", "remove": ["x.mesh"]},
                              {"listener": "p", "remove": ["x.mesh"]}]}),
            "routes[1].listener: listener \"p\" appears twice in this patch",
        ),
        (
            json!({"routes": [{"listener": "o0", "remove": []}], "remove_listeners": ["o0"]}),
            "routes[0].listener: listener \"o0\" is also replaced or removed by this patch",
        ),
        (
            json!({"routes": [{"listener": "t", "upsert": [terminate_route("y.mesh", &["b".to_owned(), "x".to_owned()])]}]}),
            "routes[0].upsert[0].weighted_clusters[1].cluster: no cluster named \"x\"",
        ),
        (
            json!({"routes": [{"listener": "p", "upsert": [passthrough_route("y.mesh", "gw")]}]}),
            "routes[0].upsert[0]: cluster \"gw\" dials endpoints over mTLS",
        ),
        (
            json!({"clusters": [cluster_json("a", &[1], true)]}),
            "clusters[0].tls: cluster \"a\" dials endpoints over mTLS",
        ),
        (
            json!({"connect_routes": [{"listener": "c", "upsert": [
                {"authority": "y.ns.east:80", "cluster": "a"},
                {"authority": "q.ns.east:80", "cluster": "x"}]}]}),
            "connect_routes[0].upsert[1].cluster: no cluster named \"x\"",
        ),
        (
            json!({"connect_routes": [{"listener": "c", "remove": ["Y.ns.east:80"]}]}),
            "connect_routes[0].remove[0]: listener \"c\" has no route for \"Y.ns.east:80\" to remove",
        ),
        (
            json!({"listeners": [originate_json("o1", 0, "nope")]}),
            "listeners[0].cluster: no cluster named \"nope\"",
        ),
        (
            json!({"listeners": [originate_json("o1", 15001, "a"), originate_json("o2", 15001, "a")]}),
            "listeners[1].address: 127.0.0.1:15001 is already used by listener \"o1\"",
        ),
        (
            json!({"clusters": [{"name": "z", "endpoints": []}]}),
            "clusters[0].endpoints: needs at least one endpoint",
        ),
        (json!({"identity": pki().0}), "unknown field `identity`"),
        (
            json!({"routes": [{"listener": "p", "upsert": [{"sni": "y.mesh", "cluster": "a", "colour": 1}]}]}),
            "routes[0].upsert[0]",
        ),
    ];
    for (patch_doc, expected) in cases {
        let message = refused(patch_doc.clone());
        assert!(
            message.contains(expected),
            "{patch_doc}\n  gave: {message}\n  want: {expected}"
        );
    }
}

#[test]
fn a_removed_cluster_may_go_with_its_last_user() {
    let (patched, delta) = patch(
        &base(),
        &json!({"remove_clusters": ["a"], "routes": [{"listener": "p", "remove": ["x.mesh"]}]}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!patched.clusters.contains_key("a"));
    assert_eq!(&*delta.clusters, [Arc::from("a")]);
    assert_eq!(delta.routes, [RouteKey::new("p", "x.mesh")]);
    assert!(!patched.has_route(&RouteKey::new("p", "x.mesh")));
}

#[test]
fn untouched_items_are_shared_not_rebuilt() {
    let base = base();
    let (patched, delta) = patch(
        &base,
        &json!({"clusters": [cluster_json("b", &[1, 2], false)],
                "routes": [{"listener": "p", "upsert": [passthrough_route("y.mesh", "b")]}]}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(Arc::ptr_eq(&base.clusters["a"], &patched.clusters["a"]));
    assert!(!Arc::ptr_eq(&base.clusters["b"], &patched.clusters["b"]));
    for name in ["t", "c", "o0"] {
        let (before, after) = (base.listener_index[name], patched.listener_index[name]);
        assert!(Arc::ptr_eq(
            &base.listeners[before],
            &patched.listeners[after]
        ));
    }
    let route = |config: &CompiledConfig| match &config.listener("p").map(|l| &l.mode) {
        Some(ListenerMode::Passthrough { routes }) => routes.get_pattern("x.mesh").cloned(),
        _ => None,
    };
    let (Some(before), Some(after)) = (route(&base), route(&patched)) else {
        panic!("route lost");
    };
    assert!(
        Arc::ptr_eq(&before, &after),
        "the untouched route is shared"
    );
    assert!(Arc::ptr_eq(&base.tls, &base.tls));
    assert_eq!(&*delta.clusters, [Arc::from("b")]);
    assert_eq!(delta.routes, [RouteKey::new("p", "y.mesh")]);
    assert!(delta.listeners.is_empty());
}
