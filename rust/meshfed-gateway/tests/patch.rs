//! `Gateway::apply_patch` end to end: what a patch adds carries bytes,
//! what it leaves alone keeps its sockets, connections and counters, and a
//! refused patch changes nothing.

#[path = "../src/test_certs.rs"]
#[allow(dead_code)]
mod test_certs;

mod common;
use common::{echo_backend, read_head, round_trip};

use std::error::Error;
use std::net::SocketAddr;

use meshfed_gateway::{Gateway, GatewayError};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

type TestResult = Result<(), Box<dyn Error>>;

/// Sends a CONNECT for `authority`; the response head.
async fn connect_to(
    proxy: SocketAddr,
    authority: &str,
) -> Result<(TcpStream, String), Box<dyn Error>> {
    let mut stream = TcpStream::connect(proxy).await?;
    stream
        .write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let head = read_head(&mut stream).await?;
    Ok((stream, String::from_utf8(head)?))
}

fn cluster(name: &str, backend: SocketAddr) -> Value {
    json!({"name": name, "endpoints": [{"address": backend.to_string()}]})
}

fn address(gateway: &Gateway, listener: &str) -> Result<SocketAddr, Box<dyn Error>> {
    gateway
        .addresses()
        .get(listener)
        .copied()
        .ok_or_else(|| format!("no listener {listener:?}").into())
}

fn patch(gateway: &Gateway, patch: &Value) -> Result<(), GatewayError> {
    gateway.apply_patch(patch.to_string().as_bytes())
}

const OK: &str = "HTTP/1.1 200 Connection established\r\n\r\n";
const SNI: &str = "outbound_.8080_._.web.default.svc.east.mesh";
const EAST_GW: &str = "spiffe://east.mesh/ns/meshfed-system/sa/gateway";
const WEST_GW: &str = "spiffe://west.mesh/ns/meshfed-system/sa/gateway";

/// Identity and trust bundles only: nothing to serve yet.
fn bare(domain: &test_certs::TestDomain, id: &str, bundles: Value) -> Value {
    let svid = domain.svid(id);
    json!({
        "identity": {"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem},
        "trust_bundles": bundles,
    })
}

/// The TLS side compiled from a patch alone: two gateways start with an
/// identity and no listeners or clusters; patches add a terminate listener
/// with its route (east: the server config is built by the patch) and an
/// mTLS cluster with an originate listener (west: the client config for the
/// peer is built by the patch), and bytes cross with mTLS both ways.
#[tokio::test]
async fn patches_alone_build_an_mtls_path_between_two_gateways() -> TestResult {
    let (east_ca, west_ca) = (
        test_certs::TestDomain::new("east.mesh"),
        test_certs::TestDomain::new("west.mesh"),
    );
    let backend = echo_backend().await?;
    let bundles = json!({"east.mesh": east_ca.bundle_pem(), "west.mesh": west_ca.bundle_pem()});
    let east = Gateway::start(
        bare(&east_ca, EAST_GW, bundles.clone())
            .to_string()
            .as_bytes(),
    )?;
    let west = Gateway::start(bare(&west_ca, WEST_GW, bundles).to_string().as_bytes())?;

    patch(
        &east,
        &json!({
            "clusters": [cluster("web", backend)],
            "listeners": [{"name": "ingress", "address": "127.0.0.1:0", "mode": "terminate",
                           "routes": []}]
        }),
    )?;
    patch(
        &east,
        &json!({"routes": [{"listener": "ingress", "upsert": [{"sni": SNI, "cluster": "web",
                 "rules": [{"action": "allow", "id": "spiffe://west.mesh/*"}]}]}]}),
    )?;
    let ingress = address(&east, "ingress")?;
    patch(
        &west,
        &json!({
            "clusters": [{"name": "east-web", "endpoints": [{"address": ingress.to_string()}],
                          "tls": {"sni": SNI, "peer_spiffe_id": EAST_GW}}],
            "listeners": [{"name": "egress", "address": "127.0.0.1:0", "mode": "originate",
                           "cluster": "east-web"}]
        }),
    )?;

    let mut client = TcpStream::connect(address(&west, "egress")?).await?;
    let payload = b"mTLS from patches".repeat(100);
    assert_eq!(round_trip(&mut client, &payload).await?, payload);
    let west_stats = west.stats();
    assert_eq!(west_stats["egress"].peer_identities.get(EAST_GW), Some(&1));
    let east_stats = east.stats();
    assert_eq!(east_stats["ingress"].peer_identities.get(WEST_GW), Some(&1));
    Ok(())
}

/// A patch adds a cluster, a connect route to it and an originate listener;
/// both carry bytes at once, while the untouched listeners keep their
/// sockets, their live connections and their counters, and so does the
/// untouched cluster.
#[tokio::test]
async fn a_patch_adds_routes_that_carry_bytes_and_keeps_what_it_does_not_touch() -> TestResult {
    let (old_backend, new_backend) = (echo_backend().await?, echo_backend().await?);
    let config = json!({
        "listeners": [
            {"name": "keep", "address": "127.0.0.1:0", "mode": "originate", "cluster": "old"},
            {"name": "proxy", "address": "127.0.0.1:0", "mode": "connect",
             "connect_routes": [{"authority": "old.ns.east:80", "cluster": "old"}]}
        ],
        "clusters": [cluster("old", old_backend)]
    });
    let gateway = Gateway::start(config.to_string().as_bytes())?;
    let before = gateway.addresses();
    let mut live = TcpStream::connect(address(&gateway, "keep")?).await?;
    assert_eq!(round_trip(&mut live, b"before").await?, b"before");

    patch(
        &gateway,
        &json!({
            "clusters": [cluster("new", new_backend)],
            "listeners": [{"name": "added", "address": "127.0.0.1:0", "mode": "originate",
                           "cluster": "new"}],
            "connect_routes": [{"listener": "proxy",
                                "upsert": [{"authority": "new.ns.east:80", "cluster": "new"}]}]
        }),
    )?;

    // Untouched listeners: the same sockets, and the live connection goes on.
    let after = gateway.addresses();
    for name in ["keep", "proxy"] {
        assert_eq!(before.get(name), after.get(name), "{name} was rebound");
    }
    assert_eq!(round_trip(&mut live, b"during").await?, b"during");

    // What the patch added carries bytes.
    let (mut via_route, head) = connect_to(address(&gateway, "proxy")?, "new.ns.east:80").await?;
    assert_eq!(head, OK);
    assert_eq!(round_trip(&mut via_route, b"routed").await?, b"routed");
    let mut via_listener = TcpStream::connect(address(&gateway, "added")?).await?;
    assert_eq!(round_trip(&mut via_listener, b"added").await?, b"added");
    // The old route is still there.
    let (mut old_route, head) = connect_to(address(&gateway, "proxy")?, "old.ns.east:80").await?;
    assert_eq!(head, OK);
    assert_eq!(round_trip(&mut old_route, b"old").await?, b"old");

    // Counters went on: "old" saw the live connection and the old route,
    // "keep" accepted one connection before the patch; each is still counted.
    let clusters = gateway.cluster_stats();
    assert_eq!(clusters["old"].connections, 2);
    assert_eq!(clusters["old"].active, 2);
    assert_eq!(clusters["new"].connections, 2);
    let listeners = gateway.stats();
    assert_eq!(listeners["keep"].accepted, 1);
    assert_eq!(listeners["keep"].active, 1);
    assert_eq!(listeners["proxy"].accepted, 2);

    // Removing the route and the listener: the route is gone for new
    // connections, the live ones finish.
    patch(
        &gateway,
        &json!({
            "remove_listeners": ["added"],
            "connect_routes": [{"listener": "proxy", "remove": ["new.ns.east:80"]}]
        }),
    )?;
    let (_, head) = connect_to(address(&gateway, "proxy")?, "new.ns.east:80").await?;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(!gateway.addresses().contains_key("added"));
    assert_eq!(round_trip(&mut via_route, b"still").await?, b"still");
    patch(&gateway, &json!({"remove_clusters": ["new"]}))?;
    assert!(!gateway.cluster_stats().contains_key("new"));
    Ok(())
}

/// Every kind of refused patch leaves the running config as it was: the
/// same listeners on the same sockets, the same clusters, and traffic as
/// before.
#[tokio::test]
async fn a_refused_patch_changes_nothing() -> TestResult {
    let backend = echo_backend().await?;
    let config = json!({
        "listeners": [
            {"name": "keep", "address": "127.0.0.1:0", "mode": "originate", "cluster": "old"},
            {"name": "proxy", "address": "127.0.0.1:0", "mode": "connect",
             "connect_routes": [{"authority": "old.ns.east:80", "cluster": "old"}]}
        ],
        "clusters": [cluster("old", backend), cluster("spare", backend)]
    });
    let gateway = Gateway::start(config.to_string().as_bytes())?;
    let addresses = gateway.addresses();
    let clusters: Vec<String> = gateway.cluster_stats().into_keys().collect();
    // A port certainly taken, for a listener that cannot bind.
    let taken = TcpListener::bind("127.0.0.1:0").await?;
    let taken = taken.local_addr()?;

    let refused = [
        // Each has a valid part first, which must not be applied either.
        json!({"clusters": [cluster("added", backend)], "remove_clusters": ["old"]}),
        json!({"clusters": [cluster("added", backend)], "remove_clusters": ["nope"]}),
        json!({"clusters": [cluster("added", backend)], "remove_listeners": ["nope"]}),
        json!({"remove_clusters": ["spare"],
               "connect_routes": [{"listener": "proxy",
                                   "upsert": [{"authority": "x.ns.east:80", "cluster": "nope"}]}]}),
        json!({"connect_routes": [{"listener": "keep", "remove": ["old.ns.east:80"]}]}),
        json!({"routes": [{"listener": "proxy", "remove": ["old.mesh"]}]}),
        json!({"listeners": [{"name": "added", "address": "127.0.0.1:0", "mode": "originate",
                              "cluster": "spare"}],
               "remove_listeners": ["added"]}),
        json!({"handshake_timeout_ms": 5}),
    ];
    for bad in &refused {
        match patch(&gateway, bad) {
            Err(GatewayError::Config(_)) => {}
            other => panic!("{bad}: {other:?}"),
        }
    }
    // A listener that cannot bind refuses the whole patch too.
    let unbindable = json!({
        "clusters": [cluster("added", backend)],
        "listeners": [{"name": "added", "address": taken.to_string(), "mode": "originate",
                       "cluster": "added"}]
    });
    match patch(&gateway, &unbindable) {
        Err(GatewayError::Bind { listener, .. }) => assert_eq!(listener, "added"),
        other => panic!("{other:?}"),
    }

    assert_eq!(gateway.addresses(), addresses);
    let now: Vec<String> = gateway.cluster_stats().into_keys().collect();
    assert_eq!(now, clusters);
    let (mut stream, head) = connect_to(address(&gateway, "proxy")?, "old.ns.east:80").await?;
    assert_eq!(head, OK);
    assert_eq!(round_trip(&mut stream, b"intact").await?, b"intact");
    Ok(())
}
