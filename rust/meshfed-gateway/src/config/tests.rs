use std::sync::OnceLock;

use serde_json::{Value, json};

use super::*;
use crate::test_certs::TestDomain;

const SNI: &str = "outbound_.8080_._.web.default.svc.east.mesh";

struct Pki {
    east: TestDomain,
    west: TestDomain,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| Pki {
        east: TestDomain::new("east.mesh"),
        west: TestDomain::new("west.mesh"),
    })
}

/// The example document of the design: all three listener modes.
fn good() -> Value {
    let pki = pki();
    let svid = pki
        .east
        .svid("spiffe://east.mesh/ns/meshfed-system/sa/gateway");
    json!({
        "identity": {"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem},
        "trust_bundles": {"east.mesh": pki.east.bundle_pem(), "west.mesh": pki.west.bundle_pem()},
        "handshake_timeout_ms": 10000,
        "listeners": [
            {"name": "ingress", "address": "127.0.0.1:0", "mode": "passthrough",
             "routes": [{"sni": SNI, "cluster": "web"}, {"sni": "*.svc.east.mesh", "cluster": "web"}]},
            {"name": "ingress-mtls", "address": "127.0.0.1:0", "mode": "terminate",
             "routes": [{"sni": SNI, "cluster": "web",
                         "rules": [{"action": "allow", "id": "spiffe://west.mesh/*"}]}]},
            {"name": "egress-web", "address": "127.0.0.1:0", "mode": "originate",
             "cluster": "east-gateway"}
        ],
        "clusters": [
            {"name": "web", "endpoints": [{"address": "127.0.0.1:8080"}], "connect_timeout_ms": 5000},
            {"name": "east-gateway", "endpoints": [{"address": "127.0.0.1:15443", "weight": 3,
             "tls": {"sni": SNI, "peer_spiffe_id": "spiffe://east.mesh/ns/meshfed-system/sa/gateway"}}]}
        ]
    })
}

fn compile_value(doc: &Value) -> Result<CompiledConfig, ConfigError> {
    CompiledConfig::from_json(doc.to_string().as_bytes())
}

#[test]
fn good_config_compiles() {
    let config = compile_value(&good()).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = config.listener_names().collect();
    assert_eq!(names, ["ingress", "ingress-mtls", "egress-web"]);
    assert_eq!(config.handshake_timeout(), Duration::from_secs(10));
    assert_eq!(
        config.identity().map(SpiffeId::as_str),
        Some("spiffe://east.mesh/ns/meshfed-system/sa/gateway")
    );
    let Some(ListenerMode::Terminate { routes, .. }) =
        config.listener("ingress-mtls").map(|l| &l.mode)
    else {
        panic!("ingress-mtls is not a terminate listener");
    };
    let route = routes.lookup(SNI).unwrap_or_else(|| panic!("no route"));
    let west = SpiffeId::parse("spiffe://west.mesh/ns/default/sa/client").ok();
    let east = SpiffeId::parse("spiffe://east.mesh/ns/default/sa/client").ok();
    assert!(west.is_some_and(|id| route.rules.evaluate(&id).allowed()));
    assert!(!east.is_some_and(|id| route.rules.evaluate(&id).allowed()));
}

#[test]
fn minimal_config_uses_defaults() {
    let doc = json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "mode": "passthrough", "routes": []}],
        "clusters": [{"name": "web", "endpoints": [{"address": "[::1]:80"}]}]
    });
    let config = compile_value(&doc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.handshake_timeout(), Duration::from_millis(10_000));
    assert_eq!(
        config.clusters.get("web").map(|c| c.connect_timeout),
        Some(Duration::from_millis(5_000))
    );
    assert!(validate_config(b"{}").is_ok());
}

#[test]
fn no_rules_deny_everyone() {
    let mut doc = good();
    doc["listeners"][1]["routes"][0]
        .as_object_mut()
        .map(|route| route.remove("rules"));
    let config = compile_value(&doc).unwrap_or_else(|e| panic!("{e}"));
    let Some(ListenerMode::Terminate { routes, .. }) =
        config.listener("ingress-mtls").map(|l| &l.mode)
    else {
        panic!("not terminate");
    };
    let id = SpiffeId::parse("spiffe://west.mesh/ns/default/sa/client");
    let route = routes.lookup(SNI);
    assert!(matches!((route, id), (Some(r), Ok(id)) if !r.rules.evaluate(&id).allowed()));
}

/// Applies `edit` to the good document and expects an error at `path`
/// whose message contains `needle`.
fn rejects(edit: impl FnOnce(&mut Value), path: &str, needle: &str) {
    let mut doc = good();
    edit(&mut doc);
    match compile_value(&doc) {
        Ok(_) => panic!("expected an error at {path}"),
        Err(e) => {
            assert_eq!(e.path(), path, "wrong path in: {e}");
            assert!(e.message().contains(needle), "{e:?} lacks {needle:?}");
            assert_eq!(e.to_string(), format!("{path}: {}", e.message()));
        }
    }
}

/// Listener caps: one default each (the constants), a smaller
/// `max_handshakes` than `max_connections` kept, a larger one clamped, and
/// 0 refused naming the field.
#[test]
fn listener_limits_default_clamp_and_refuse_zero() {
    let config = compile_value(&good()).unwrap_or_else(|e| panic!("{e}"));
    let limits = config.listener("ingress-mtls").map(|l| l.limits);
    assert_eq!(
        limits,
        Some(ListenerLimits {
            max_connections: u64::from(raw::DEFAULT_MAX_CONNECTIONS),
            max_handshakes: u64::from(raw::DEFAULT_MAX_HANDSHAKES),
        })
    );
    let mut doc = good();
    doc["listeners"][1]["limits"] = json!({"max_connections": 50});
    let config = compile_value(&doc).unwrap_or_else(|e| panic!("{e}"));
    let limits = config.listener("ingress-mtls").map(|l| l.limits);
    assert_eq!(
        limits,
        Some(ListenerLimits {
            max_connections: 50,
            max_handshakes: 50,
        })
    );
    for field in ["max_connections", "max_handshakes"] {
        rejects(
            |d| d["listeners"][1]["limits"] = json!({field: 0}),
            &format!("listeners[1].limits.{field}"),
            "at least 1",
        );
    }
    rejects(
        |d| d["listeners"][0]["limits"] = json!({"max_conns": 5}),
        "listeners[0].limits.max_conns",
        "unknown field",
    );
}

#[test]
fn rejections_name_the_field() {
    rejects(|d| d["bogus"] = json!(1), "bogus", "unknown field");
    rejects(
        |d| d["listeners"][0]["mode"] = json!("mirror"),
        "listeners[0].mode",
        "unknown variant",
    );
    rejects(
        |d| d["listeners"][0]["routes"][0]["rules"] = json!([{"action": "allow", "id": "*"}]),
        "listeners[0].routes[0].rules",
        "only terminate routes",
    );
    rejects(
        |d| d["listeners"][0]["cluster"] = json!("web"),
        "listeners[0].cluster",
        "only for originate listeners",
    );
    rejects(
        |d| {
            d["listeners"][2]
                .as_object_mut()
                .map(|l| l.remove("cluster"));
        },
        "listeners[2].cluster",
        "required for originate listeners",
    );
    rejects(
        |d| d["listeners"][1]["routes"][0]["bogus"] = json!(true),
        "listeners[1].routes[0].bogus",
        "unknown field",
    );
    rejects(
        |d| d["listeners"][1]["routes"][0]["cluster"] = json!("x"),
        "listeners[1].routes[0].cluster",
        "no cluster named \"x\"",
    );
    rejects(
        |d| d["listeners"][1]["name"] = json!("ingress"),
        "listeners[1].name",
        "duplicate listener name",
    );
    rejects(
        |d| d["listeners"][0]["address"] = json!("localhost:80"),
        "listeners[0].address",
        "not an ip:port",
    );
    rejects(
        |d| {
            d["listeners"][0]["address"] = json!("127.0.0.1:15443");
            d["listeners"][1]["address"] = json!("127.0.0.1:15443");
        },
        "listeners[1].address",
        "already used by listener \"ingress\"",
    );
    rejects(
        |d| d["listeners"][0]["routes"][1]["sni"] = json!("east.*"),
        "listeners[0].routes[1].sni",
        "not a valid SNI",
    );
    rejects(
        |d| {
            d["listeners"][1]["routes"][0]["rules"] = json!([
                {"action": "deny", "id": "*"}, {"action": "allow", "id": "spiffe://West.mesh/*"}
            ])
        },
        "listeners[1].routes[0].rules[1].id",
        "trust domain",
    );
    const PEER_TLS: &str = "clusters[1].endpoints[0].tls";
    rejects(
        |d| {
            d["clusters"][1]["endpoints"][0]["tls"]["peer_spiffe_id"] =
                json!("spiffe://north.mesh/sa/gw")
        },
        &format!("{PEER_TLS}.peer_spiffe_id"),
        "no trust bundle for trust domain \"north.mesh\"",
    );
    rejects(
        |d| d["clusters"][1]["endpoints"][0]["tls"]["peer_spiffe_id"] = json!("east.mesh/gw"),
        &format!("{PEER_TLS}.peer_spiffe_id"),
        "spiffe://",
    );
    rejects(
        |d| d["listeners"][2]["cluster"] = json!("nope"),
        "listeners[2].cluster",
        "no cluster named",
    );
    rejects(
        |d| d["clusters"][1]["endpoints"][0]["tls"]["sni"] = json!("bad sni!"),
        &format!("{PEER_TLS}.sni"),
        "not a valid TLS server name",
    );
    rejects(
        |d| {
            d.as_object_mut().map(|o| o.remove("identity"));
        },
        PEER_TLS,
        "\"identity\" is missing",
    );
    rejects(
        |d| {
            d.as_object_mut().map(|o| o.remove("identity"));
            d["clusters"][1]["endpoints"][0]
                .as_object_mut()
                .map(|e| e.remove("tls"));
        },
        "listeners[1].mode",
        "\"identity\" is missing",
    );
    rejects(
        |d| d["clusters"][0]["endpoints"] = json!([]),
        "clusters[0].endpoints",
        "at least one endpoint",
    );
    rejects(
        |d| d["clusters"][1]["endpoints"][0]["address"] = json!("gw.east:15443"),
        "clusters[1].endpoints[0].address",
        "not an ip:port",
    );
    rejects(
        |d| d["clusters"][1]["endpoints"][0]["weight"] = json!(-1),
        "clusters[1].endpoints[0].weight",
        "invalid value",
    );
    rejects(
        |d| d["clusters"][1]["name"] = json!("web"),
        "clusters[1].name",
        "duplicate cluster name",
    );
    rejects(
        |d| d["handshake_timeout_ms"] = json!(0),
        "handshake_timeout_ms",
        "greater than 0",
    );
    rejects(
        |d| d["trust_bundles"]["east.mesh"] = json!("not pem"),
        "trust_bundles[\"east.mesh\"]",
        "no \"BEGIN CERTIFICATE\"",
    );
    rejects(
        |d| d["trust_bundles"]["East.Mesh"] = json!(pki().east.bundle_pem()),
        "trust_bundles[\"East.Mesh\"]",
        "lowercase",
    );
    rejects(
        |d| {
            d["identity"]["private_key_pem"] =
                json!(pki().west.svid("spiffe://east.mesh/x").key_pem)
        },
        "identity.private_key_pem",
        "does not match",
    );
    rejects(
        |d| d["identity"]["cert_chain_pem"] = json!(""),
        "identity.cert_chain_pem",
        "no \"BEGIN CERTIFICATE\"",
    );
}

#[test]
fn syntax_errors_are_reported() {
    let err = CompiledConfig::from_json(b"{\"listeners\": [").err();
    assert!(err.is_some_and(|e| e.message().contains("EOF")));
    let err = CompiledConfig::from_json(b"{} {}").err();
    assert!(err.is_some_and(|e| e.message().contains("trailing")));
}

#[test]
fn data_plane_fields_compile() {
    let mut doc = good();
    doc["clusters"][0] = json!({
        "name": "web", "lb": "maglev", "idle_timeout_ms": 0, "connect_timeout_ms": 100,
        "endpoints": [{"address": "127.0.0.1:8080", "weight": 2, "priority": 0},
                      {"address": "127.0.0.1:8081", "priority": 1}],
        "outlier_detection": {"consecutive_failures": 3, "base_ejection_ms": 1000,
                              "max_ejection_ms": 8000, "max_ejection_percent": 30},
        "health_check": {"interval_ms": 1000},
        "circuit_breaker": {"max_connections": 100, "max_pending": 10},
    });
    doc["clusters"][1]["lb"] = json!("least_request");
    doc["clusters"].as_array_mut().unwrap().push(json!({
        "name": "web-canary", "endpoints": [{"address": "127.0.0.1:8082"}]
    }));
    doc["clusters"].as_array_mut().unwrap().push(json!({
        "name": "web-tls", "endpoints": [{"address": "127.0.0.1:9443"}],
        "tls": {"sni": "web.default.svc", "peer_spiffe_id": "spiffe://east.mesh/ns/default/sa/web"}
    }));
    doc["listeners"][0]["routes"][0] = json!({"sni": SNI, "weighted_clusters": [
        {"cluster": "web", "weight": 90}, {"cluster": "web-canary", "weight": 10}],
        "rate_limit": {"connections_per_second": 100.0, "burst": 20}});
    doc["listeners"][1]["routes"][0] = json!({"sni": SNI, "cluster": "web-tls",
        "rules": [{"action": "allow", "id": "spiffe://west.mesh/*"}], "proxy_protocol": true,
        "source_rate_limit": {"connections_per_second": 5, "burst": 5}});
    let config = compile_value(&doc).unwrap_or_else(|e| panic!("{e}"));
    let web = &config.clusters["web"];
    assert_eq!(web.lb, Lb::Maglev);
    assert_eq!(web.idle_timeout, None);
    assert_eq!(web.endpoints[1].priority, 1);
    assert_eq!(web.max_pending, Some(10));
    assert!(config.clusters["web-tls"].encrypts());
    assert!(!config.clusters["web"].encrypts());
}

/// A failover group: plain local endpoints first, then two peer gateways,
/// each reached with its own SNI and pinned SPIFFE ID.
#[test]
fn endpoints_carry_their_own_tls() {
    let mut doc = good();
    let east_gw = "spiffe://east.mesh/ns/meshfed-system/sa/gateway";
    let west_gw = "spiffe://west.mesh/ns/meshfed-system/sa/gateway";
    doc["clusters"][1] = json!({
        "name": "east-gateway",
        "tls": {"sni": "cluster-default.east.mesh", "peer_spiffe_id": east_gw},
        "endpoints": [
            {"address": "127.0.0.1:8080", "priority": 0, "tls": null},
            {"address": "127.0.0.1:15443", "priority": 1},
            {"address": "127.0.0.1:15444", "priority": 1},
            {"address": "127.0.0.1:16443", "priority": 2,
             "tls": {"sni": "web.west.mesh", "peer_spiffe_id": west_gw}}
        ]
    });
    let config = compile_value(&doc).unwrap_or_else(|e| panic!("{e}"));
    let endpoints = &config.clusters["east-gateway"].endpoints;
    let tls: Vec<Option<&UpstreamTlsSpec>> = endpoints.iter().map(|e| e.tls.as_deref()).collect();
    // `"tls": null` is the same as leaving it out: the cluster's setting applies.
    let peers: Vec<Option<&str>> = tls.iter().map(|t| t.map(|t| t.peer.as_str())).collect();
    assert_eq!(
        peers,
        [Some(east_gw), Some(east_gw), Some(east_gw), Some(west_gw)]
    );
    let [Some(a), Some(b), _, Some(west)] = tls.as_slice() else {
        panic!("every endpoint here has tls");
    };
    assert_eq!(west.server_name.to_str(), "web.west.mesh");
    // One client config per peer ID: its session cache serves every endpoint of that peer.
    assert!(Arc::ptr_eq(&a.config, &b.config));
    assert!(!Arc::ptr_eq(&a.config, &west.config));

    // Without cluster-level tls, endpoints without their own are plain.
    doc["clusters"][1].as_object_mut().map(|c| c.remove("tls"));
    let config = compile_value(&doc).unwrap_or_else(|e| panic!("{e}"));
    let plain: Vec<bool> = config.clusters["east-gateway"]
        .endpoints
        .iter()
        .map(|e| e.tls.is_none())
        .collect();
    assert_eq!(plain, [true, true, true, false]);
}

#[test]
fn data_plane_rejections_name_the_field() {
    rejects(
        |d| d["clusters"][0]["lb"] = json!("random"),
        "clusters[0].lb",
        "unknown variant",
    );
    rejects(
        |d| d["clusters"][0]["outlier_detection"] = json!({"max_ejection_percent": 101}),
        "clusters[0].outlier_detection.max_ejection_percent",
        "between 0 and 100",
    );
    rejects(
        |d| {
            d["clusters"][0]["outlier_detection"] =
                json!({"base_ejection_ms": 10, "max_ejection_ms": 5})
        },
        "clusters[0].outlier_detection.max_ejection_ms",
        "at least base_ejection_ms",
    );
    rejects(
        |d| d["clusters"][0]["outlier_detection"] = json!({"consecutive": 1}),
        "clusters[0].outlier_detection.consecutive",
        "unknown field",
    );
    rejects(
        |d| d["clusters"][0]["health_check"] = json!({"interval_ms": 0}),
        "clusters[0].health_check.interval_ms",
        "greater than 0",
    );
    rejects(
        |d| d["clusters"][0]["circuit_breaker"] = json!({"max_connections": 0}),
        "clusters[0].circuit_breaker.max_connections",
        "at least 1",
    );
    rejects(
        |d| d["clusters"][0]["endpoints"][0]["priority"] = json!(-1),
        "clusters[0].endpoints[0].priority",
        "invalid value",
    );
    rejects(
        |d| {
            d["clusters"][0]["endpoints"] =
                json!([{"address": "127.0.0.1:1"}, {"address": "127.0.0.1:1"}])
        },
        "clusters[0].endpoints[1].address",
        "duplicate endpoint",
    );
    rejects(
        |d| {
            d["clusters"][0]["tls"] =
                json!({"sni": "web", "peer_spiffe_id": "spiffe://nowhere.mesh/x"});
        },
        "clusters[0].tls.peer_spiffe_id",
        "no trust bundle",
    );
    rejects(
        |d| {
            d["clusters"][0]["tls"] =
                json!({"sni": "web", "peer_spiffe_id": "spiffe://east.mesh/x"})
        },
        "listeners[0].routes[0]",
        "passthrough forwards the client's TLS untouched",
    );
    rejects(
        |d| d["listeners"][0]["routes"][0]["cluster"] = json!("east-gateway"),
        "listeners[0].routes[0]",
        "passthrough forwards the client's TLS untouched",
    );
    rejects(
        |d| {
            d["listeners"][0]["routes"][0]["weighted_clusters"] =
                json!([{"cluster": "web", "weight": 1}]);
        },
        "listeners[0].routes[0].weighted_clusters",
        "not both",
    );
    rejects(
        |d| {
            d["listeners"][0]["routes"][0] =
                json!({"sni": SNI, "weighted_clusters": [{"cluster": "nope", "weight": 1}]});
        },
        "listeners[0].routes[0].weighted_clusters[0].cluster",
        "no cluster named",
    );
    rejects(
        |d| {
            d["listeners"][0]["routes"][0] =
                json!({"sni": SNI, "weighted_clusters": [{"cluster": "web", "weight": 0}]});
        },
        "listeners[0].routes[0].weighted_clusters",
        "must not all be 0",
    );
    rejects(
        |d| d["listeners"][0]["routes"][0] = json!({"sni": SNI}),
        "listeners[0].routes[0].cluster",
        "required",
    );
    rejects(
        |d| d["listeners"][0]["routes"][0]["proxy_protocol"] = json!(true),
        "listeners[0].routes[0].proxy_protocol",
        "only terminate routes",
    );
    rejects(
        |d| {
            d["listeners"][1]["routes"][0]["rate_limit"] =
                json!({"connections_per_second": 0, "burst": 1});
        },
        "listeners[1].routes[0].rate_limit.connections_per_second",
        "greater than 0",
    );
    rejects(
        |d| {
            d["listeners"][1]["routes"][0]["source_rate_limit"] =
                json!({"connections_per_second": 1, "burst": 0});
        },
        "listeners[1].routes[0].source_rate_limit.burst",
        "at least 1",
    );
}

#[test]
fn one_address_may_appear_once_per_pinned_peer() {
    // Two peers may advertise one gateway address (one of them is lying): two endpoints, each
    // pinned to its own peer, so the liar cannot replace the real owner's endpoint.
    let endpoint = |peer: &str| json!({"address": "127.0.0.1:15443", "tls": {"sni": SNI, "peer_spiffe_id": peer}});
    let mut doc = good();
    doc["clusters"][1]["endpoints"] = json!([
        endpoint("spiffe://east.mesh/ns/meshfed-system/sa/gateway"),
        endpoint("spiffe://west.mesh/ns/meshfed-system/sa/gateway"),
    ]);
    compile_value(&doc).unwrap_or_else(|e| panic!("{e}"));
    doc["clusters"][1]["endpoints"][1] =
        endpoint("spiffe://east.mesh/ns/meshfed-system/sa/gateway");
    let err = compile_value(&doc)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("duplicate endpoint"), "{err}");
}

/// The zero-trust fields: ordered rules, trusted gateways, workload TLS and
/// convey_caller compile into what the data plane reads.
#[test]
fn zero_trust_fields_compile() {
    let mut doc = good();
    let west_gw = "spiffe://west.mesh/ns/meshfed-system/sa/gateway";
    doc["listeners"][1]["trusted_gateways"] = json!([west_gw]);
    doc["listeners"][1]["routes"][0]["rules"] = json!([
        {"action": "deny", "id": "spiffe://west.mesh/ns/shop/sa/intruder"},
        {"action": "allow", "id": "spiffe://west.mesh/ns/shop/*"},
    ]);
    doc["listeners"][2]["workload_tls"] = json!("strict");
    doc["clusters"][1]["endpoints"][0]["tls"]["convey_caller"] = json!(true);
    let config = compile_value(&doc).unwrap_or_else(|e| panic!("{e}"));
    let Some(ListenerMode::Terminate { routes, tls }) =
        config.listener("ingress-mtls").map(|l| &l.mode)
    else {
        panic!("ingress-mtls is not a terminate listener");
    };
    let id = |text: &str| SpiffeId::parse(text).unwrap_or_else(|e| panic!("{e}"));
    assert!(tls.trusted_gateways.contains(&id(west_gw)));
    assert!(
        !tls.trusted_gateways
            .contains(&id("spiffe://west.mesh/ns/shop/sa/cart"))
    );
    assert_eq!(tls.hop.alpn_protocols, crate::tls::tunnel_protocols());
    assert!(tls.plain.alpn_protocols.is_empty());
    let route = routes.lookup(SNI).unwrap_or_else(|| panic!("no route"));
    assert!(
        !route
            .rules
            .evaluate(&id("spiffe://west.mesh/ns/shop/sa/intruder"))
            .allowed()
    );
    assert!(
        route
            .rules
            .evaluate(&id("spiffe://west.mesh/ns/shop/sa/cart"))
            .allowed()
    );
    assert!(
        !route
            .rules
            .evaluate(&id("spiffe://west.mesh/ns/pay/sa/x"))
            .allowed()
    );
    assert!(matches!(
        config.listener("egress-web").map(|l| &l.mode),
        Some(ListenerMode::Originate {
            workload_tls: WorkloadTls::Strict(_),
            ..
        })
    ));
    let tls = config.clusters["east-gateway"].endpoints[0].tls.as_deref();
    assert!(
        tls.is_some_and(
            |t| t.convey_caller && t.config.alpn_protocols == crate::tls::hop_protocols()
        )
    );

    // The defaults: no trusted gateways, plain workloads, no caller conveyed.
    let config = compile_value(&good()).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        config.listener("egress-web").map(|l| &l.mode),
        Some(ListenerMode::Originate {
            workload_tls: WorkloadTls::Plain,
            ..
        })
    ));
    let tls = config.clusters["east-gateway"].endpoints[0].tls.as_deref();
    assert!(tls.is_some_and(|t| !t.convey_caller && t.config.alpn_protocols.is_empty()));
}

#[test]
fn the_tunnel_is_offered_first_and_needs_the_caller_conveyed() {
    let mut doc = good();
    doc["clusters"][1]["endpoints"][0]["tls"]["convey_caller"] = json!(true);
    doc["clusters"][1]["endpoints"][0]["tls"]["tunnel"] = json!(true);
    let config = compile_value(&doc).unwrap_or_else(|e| panic!("{e}"));
    let tls = config.clusters["east-gateway"].endpoints[0].tls.as_deref();
    assert!(
        tls.is_some_and(|t| t.tunnel && t.config.alpn_protocols == crate::tls::tunnel_protocols())
    );
    rejects(
        |d| d["clusters"][1]["endpoints"][0]["tls"]["tunnel"] = json!(true),
        "clusters[1].endpoints[0].tls.tunnel",
        "needs convey_caller",
    );
}

#[test]
fn zero_trust_rejections_name_the_field() {
    rejects(
        |d| {
            d["listeners"][1]["routes"][0]["rules"] = json!([
                {"action": "allow", "id": "*"}, {"action": "allow", "id": "spiffe://west.mesh/ns/*/sa/x"}
            ])
        },
        "listeners[1].routes[0].rules[1].id",
        "bad path",
    );
    rejects(
        |d| d["listeners"][1]["routes"][0]["rules"] = json!([{"action": "permit", "id": "*"}]),
        "listeners[1].routes[0].rules[0].action",
        "unknown variant",
    );
    rejects(
        |d| d["listeners"][1]["routes"][0]["rules"] = json!([{"id": "*"}]),
        "listeners[1].routes[0].rules[0]",
        "missing field `action`",
    );
    rejects(
        |d| d["listeners"][1]["routes"][0]["allow"] = json!(["*"]),
        "listeners[1].routes[0].allow",
        "unknown field `allow`",
    );
    rejects(
        |d| {
            d["listeners"][1]["trusted_gateways"] = json!(["spiffe://west.mesh/gw", "west.mesh/gw"])
        },
        "listeners[1].trusted_gateways[1]",
        "spiffe://",
    );
    rejects(
        |d| d["listeners"][2]["trusted_gateways"] = json!([]),
        "listeners[2].trusted_gateways",
        "only for terminate listeners",
    );
    rejects(
        |d| d["listeners"][1]["workload_tls"] = json!("strict"),
        "listeners[1].workload_tls",
        "only for originate listeners",
    );
    rejects(
        |d| d["listeners"][2]["workload_tls"] = json!("mandatory"),
        "listeners[2].workload_tls",
        "unknown variant",
    );
    // A north.mesh gateway: strict workload TLS needs north.mesh's own bundle.
    rejects(
        |d| {
            let svid = TestDomain::new("north.mesh").svid("spiffe://north.mesh/ns/gw/sa/gateway");
            d["identity"] =
                json!({"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem});
            d["listeners"][2]["workload_tls"] = json!("strict");
        },
        "listeners[2].workload_tls",
        "no bundle for it",
    );
    rejects(
        |d| {
            d.as_object_mut().map(|o| o.remove("identity"));
            d["clusters"][1]["endpoints"][0]
                .as_object_mut()
                .map(|e| e.remove("tls"));
            d["listeners"].as_array_mut().map(|l| l.remove(1));
            d["listeners"][1]["workload_tls"] = json!("permissive");
        },
        "listeners[1].workload_tls",
        "\"identity\" is missing",
    );
    rejects(
        |d| d["clusters"][1]["endpoints"][0]["tls"]["convey_caller"] = json!("yes"),
        "clusters[1].endpoints[0].tls.convey_caller",
        "invalid type",
    );
}

/// A connect listener: authorities canonical (host lowercased), each once,
/// naming existing clusters; its fields belong to it alone.
#[test]
fn connect_listeners_route_canonical_authorities_and_refuse_what_is_not_theirs() {
    let connect = |routes: Value| {
        move |d: &mut Value| {
            d["listeners"][2] = json!({"name": "egress-connect", "address": "127.0.0.1:0",
                                       "mode": "connect", "connect_routes": routes});
        }
    };
    let mut doc = good();
    connect(json!([{"authority": "Web.Default.East:8080", "cluster": "east-gateway"}]))(&mut doc);
    let config = compile_value(&doc).unwrap_or_else(|e| panic!("{e}"));
    let Some(ListenerMode::Connect { routes }) = config.listener("egress-connect").map(|l| &l.mode)
    else {
        panic!("not connect");
    };
    assert_eq!(
        routes.get("web.default.east:8080").map(|c| &**c),
        Some("east-gateway")
    );

    for (authority, needle) in [
        ("web.default.east", "not host:port"),
        ("web.default.east:0", "1-65535"),
        ("web.default.east:99999", "1-65535"),
        ("web_x.default.east:80", "DNS labels"),
        (":80", "DNS labels"),
    ] {
        rejects(
            connect(json!([{"authority": authority, "cluster": "web"}])),
            "listeners[2].connect_routes[0].authority",
            needle,
        );
    }
    rejects(
        connect(
            json!([{"authority": "a:1", "cluster": "web"}, {"authority": "A:1", "cluster": "web"}]),
        ),
        "listeners[2].connect_routes[1].authority",
        "routed twice",
    );
    rejects(
        connect(json!([{"authority": "a:1", "cluster": "nope"}])),
        "listeners[2].connect_routes[0].cluster",
        "no cluster named",
    );
    rejects(
        |d| d["listeners"][0]["connect_routes"] = json!([]),
        "listeners[0].connect_routes",
        "only for connect listeners",
    );
    rejects(
        |d| {
            connect(json!([]))(d);
            d["listeners"][2]["cluster"] = json!("web");
        },
        "listeners[2].cluster",
        "connect_routes",
    );
    rejects(
        |d| {
            connect(json!([]))(d);
            d["listeners"][2]
                .as_object_mut()
                .map(|l| l.remove("connect_routes"));
        },
        "listeners[2].connect_routes",
        "required for connect listeners",
    );
}

#[test]
fn the_schema_has_the_document_at_its_root_and_the_patch_types_in_defs() {
    let schema: Value =
        serde_json::from_str(&config_schema_json()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(schema["title"], "Document");
    for name in [
        "Patch",
        "RoutePatch",
        "ConnectRoutePatch",
        "Cluster",
        "Listener",
    ] {
        assert!(schema["$defs"][name]["properties"].is_object(), "{name}");
    }
}
