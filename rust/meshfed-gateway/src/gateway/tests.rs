//! `apply_patch` from the inside: which state objects a patch reuses, and
//! that a refused one leaves the very same snapshot in place.

use std::sync::Arc;

use serde_json::{Value, json};

use super::Gateway;

fn cluster(name: &str, ports: &[u16], health_check: bool) -> Value {
    let endpoints: Vec<Value> = ports
        .iter()
        .map(|p| json!({"address": format!("127.0.0.1:{p}")}))
        .collect();
    let mut cluster = json!({"name": name, "endpoints": endpoints});
    if health_check {
        cluster["health_check"] = json!({"interval_ms": 60_000});
    }
    cluster
}

fn start() -> Gateway {
    let config = json!({
        "listeners": [
            {"name": "p", "address": "127.0.0.1:0", "mode": "passthrough",
             "routes": [{"sni": "a.mesh", "cluster": "a"}, {"sni": "b.mesh", "cluster": "b"}]},
            {"name": "o", "address": "127.0.0.1:0", "mode": "originate", "cluster": "b"}
        ],
        "clusters": [cluster("a", &[1, 2], true), cluster("b", &[3], true)]
    });
    Gateway::start(config.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

fn patch(gateway: &Gateway, patch: &Value) -> Result<(), super::GatewayError> {
    gateway.apply_patch(patch.to_string().as_bytes())
}

#[test]
fn a_patch_rebuilds_only_what_it_names() {
    let gateway = start();
    let before = gateway.snapshot.load_full();
    let checks_before: Vec<String> = {
        let control = gateway.control();
        let mut names: Vec<String> = control
            .health_checks
            .keys()
            .map(|n| n.to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(checks_before, ["a", "b"]);
    let listener_task = |gateway: &Gateway, name: &str| gateway.control().listeners[name].task.id();
    let task_o = listener_task(&gateway, "o");
    let checks_of_b = gateway.control().health_checks["b"].task_ids();

    // Cluster "a" gains an endpoint and loses its health check; a route is added.
    patch(
        &gateway,
        &json!({"clusters": [cluster("a", &[1, 2, 4], false)],
                "routes": [{"listener": "p", "upsert": [{"sni": "c.mesh", "cluster": "a"}]}]}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let after = gateway.snapshot.load_full();

    // The untouched cluster is the same state object; the patched one is
    // new but carries its counters and the endpoints it kept.
    assert!(Arc::ptr_eq(&before.clusters["b"], &after.clusters["b"]));
    let (old_a, new_a) = (&before.clusters["a"], &after.clusters["a"]);
    assert!(!Arc::ptr_eq(old_a, new_a));
    assert!(Arc::ptr_eq(&old_a.shared, &new_a.shared));
    assert_eq!(new_a.endpoints.len(), 3);
    for (old, new) in old_a.endpoints.iter().zip(&new_a.endpoints) {
        assert!(Arc::ptr_eq(old, new), "endpoint {} rebuilt", old.address);
    }
    // Route states: untouched ones shared, the new one there.
    for sni in ["a.mesh", "b.mesh"] {
        let key = crate::config::RouteKey::new("p", sni);
        assert!(Arc::ptr_eq(&before.routes[&key], &after.routes[&key]));
    }
    assert!(
        after
            .routes
            .contains_key(&crate::config::RouteKey::new("p", "c.mesh"))
    );
    assert_eq!(after.routes.len(), 3);
    // Health checks: "a" stopped, "b" kept; listener "o" kept its task.
    let checks: Vec<String> = gateway
        .control()
        .health_checks
        .keys()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(checks, ["b"]);
    assert_eq!(gateway.control().health_checks["b"].task_ids(), checks_of_b);
    assert_eq!(listener_task(&gateway, "o"), task_o);

    // Removing the listener and its cluster retires both.
    patch(
        &gateway,
        &json!({"remove_listeners": ["o"], "routes": [
        {"listener": "p", "remove": ["b.mesh"]}], "remove_clusters": ["b"]}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let last = gateway.snapshot.load_full();
    assert!(!last.clusters.contains_key("b"));
    assert_eq!(last.routes.len(), 2);
    assert!(gateway.control().health_checks.is_empty());
    assert!(!gateway.addresses().contains_key("o"));
}

#[test]
fn a_refused_patch_keeps_the_very_same_snapshot() {
    let gateway = start();
    let before = gateway.snapshot.load_full();
    for bad in [
        json!({"clusters": [cluster("z", &[9], true)], "remove_clusters": ["a"]}),
        json!({"clusters": [cluster("z", &[9], true)], "remove_listeners": ["q"]}),
        json!({"routes": [{"listener": "o", "remove": ["a.mesh"]}]}),
        json!({"trust_bundles": {}}),
        json!({"clusters": 1}),
    ] {
        assert!(patch(&gateway, &bad).is_err(), "{bad}");
        assert!(Arc::ptr_eq(&before, &gateway.snapshot.load_full()), "{bad}");
    }
    let checks = gateway.control().health_checks.len();
    assert_eq!(checks, 2);
}
