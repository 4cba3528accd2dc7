//! End-to-end tests on loopback: real sockets, real TLS, real gateways.
//!
//! Topology (as in the design): a plain client talks to the west gateway's
//! originate listener, which opens mTLS to the east gateway's terminate
//! listener, which forwards to a plain echo backend.

#[path = "../src/test_certs.rs"]
mod test_certs;
use test_certs::client_hello;

mod common;
use common::{echo_backend, read_head, round_trip};

use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meshfed_gateway::{Gateway, GatewayError, ListenerSnapshot};
use serde_json::{Value, json};
use test_certs::TestDomain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type TestResult = Result<(), Box<dyn Error>>;

const SNI: &str = "outbound_.8080_._.web.default.svc.east.mesh";
const EAST_GW: &str = "spiffe://east.mesh/ns/meshfed-system/sa/gateway";
const WEST_GW: &str = "spiffe://west.mesh/ns/meshfed-system/sa/gateway";
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Spawns a backend that only counts connections and bytes received.
async fn counting_backend()
-> Result<(SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>), Box<dyn Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let connections = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new(AtomicUsize::new(0));
    let (c, b) = (connections.clone(), bytes.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let b = b.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    b.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    Ok((address, connections, bytes))
}

/// A free loopback port with nothing listening on it.
fn dead_address() -> Result<SocketAddr, Box<dyn Error>> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

struct Pki {
    east: TestDomain,
    west: TestDomain,
}

impl Pki {
    fn new() -> Self {
        Self {
            east: TestDomain::new("east.mesh"),
            west: TestDomain::new("west.mesh"),
        }
    }
}

/// The east gateway: mTLS ingress allowing west.mesh, plus a passthrough.
fn east_config(pki: &Pki, backend: SocketAddr) -> Value {
    let svid = pki.east.svid(EAST_GW);
    json!({
        "identity": {"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem},
        "trust_bundles": {"east.mesh": pki.east.bundle_pem(), "west.mesh": pki.west.bundle_pem()},
        "handshake_timeout_ms": 3000,
        "listeners": [
            {"name": "ingress-mtls", "address": "127.0.0.1:0", "mode": "terminate",
             "routes": [{"sni": SNI, "cluster": "web", "rules": [{"action": "allow", "id": "spiffe://west.mesh/*"}]}]},
            {"name": "ingress", "address": "127.0.0.1:0", "mode": "passthrough",
             "routes": [{"sni": SNI, "cluster": "web"}]}
        ],
        "clusters": [{"name": "web", "endpoints": [{"address": backend.to_string()}]}]
    })
}

/// A client-side gateway whose originate listener dials `peers`.
fn egress_config(
    domain: &TestDomain,
    own_id: &str,
    east: &TestDomain,
    peers: &[SocketAddr],
) -> Value {
    let svid = domain.svid(own_id);
    let endpoints: Vec<Value> = peers
        .iter()
        .map(|a| json!({"address": a.to_string()}))
        .collect();
    json!({
        "identity": {"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem},
        "trust_bundles": {"east.mesh": east.bundle_pem()},
        "listeners": [
            {"name": "egress-web", "address": "127.0.0.1:0", "mode": "originate",
             "cluster": "east-gateway"}
        ],
        "clusters": [{"name": "east-gateway", "endpoints": endpoints, "connect_timeout_ms": 1000,
                      "tls": {"sni": SNI, "peer_spiffe_id": EAST_GW}}]
    })
}

fn start(config: &Value) -> Result<Gateway, GatewayError> {
    Gateway::start(config.to_string().as_bytes())
}

fn address(gateway: &Gateway, listener: &str) -> Result<SocketAddr, Box<dyn Error>> {
    gateway
        .addresses()
        .get(listener)
        .copied()
        .ok_or_else(|| format!("no listener {listener:?}").into())
}

fn stats(gateway: &Gateway, listener: &str) -> ListenerSnapshot {
    gateway
        .stats()
        .remove(listener)
        .unwrap_or_else(|| panic!("no stats for {listener}"))
}

/// Waits (bounded) until `check` holds; counters are updated asynchronously.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) -> TestResult {
    for _ in 0..100 {
        if check() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("timed out waiting for: {what}").into())
}

/// Reads until EOF or error and returns what arrived (bounded in time).
async fn read_until_closed(stream: &mut TcpStream) -> Result<Vec<u8>, Box<dyn Error>> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(IO_TIMEOUT, stream.read_to_end(&mut got)).await?;
    Ok(got)
}

#[tokio::test]
async fn mtls_round_trip_through_originate_and_terminate() -> TestResult {
    let pki = Pki::new();
    let backend = echo_backend().await?;
    let east = start(&east_config(&pki, backend))?;
    let ingress = address(&east, "ingress-mtls")?;
    let west = start(&egress_config(&pki.west, WEST_GW, &pki.east, &[ingress]))?;

    let mut client = TcpStream::connect(address(&west, "egress-web")?).await?;
    let payload = b"hello across zones".repeat(1000);
    assert_eq!(round_trip(&mut client, &payload).await?, payload);
    drop(client);

    eventually("west egress closes", || {
        stats(&west, "egress-web").closed == 1
    })
    .await?;
    eventually("east ingress closes", || {
        stats(&east, "ingress-mtls").closed == 1
    })
    .await?;
    let out = stats(&west, "egress-web");
    assert_eq!(out.accepted, 1);
    assert_eq!(out.active, 0);
    assert_eq!(out.bytes_client_to_upstream, payload.len() as u64);
    assert_eq!(out.bytes_upstream_to_client, payload.len() as u64);
    assert_eq!(out.peer_identities.get(EAST_GW), Some(&1));
    let inn = stats(&east, "ingress-mtls");
    assert_eq!(inn.peer_identities.get(WEST_GW), Some(&1));
    assert_eq!(
        (inn.handshake_failures, inn.denied, inn.no_route),
        (0, 0, 0)
    );
    let json: Value = serde_json::from_str(&east.stats_json())?;
    assert_eq!(
        json["listeners"]["ingress-mtls"]["peer_identities"][WEST_GW],
        json!(1)
    );
    Ok(())
}

#[tokio::test]
async fn client_from_unknown_trust_domain_is_refused() -> TestResult {
    let pki = Pki::new();
    let north = TestDomain::new("north.mesh");
    let backend = echo_backend().await?;
    let east = start(&east_config(&pki, backend))?;
    let ingress = address(&east, "ingress-mtls")?;
    // north.mesh trusts east, but east has no bundle for north.mesh.
    let intruder = start(&egress_config(
        &north,
        "spiffe://north.mesh/ns/meshfed-system/sa/gateway",
        &pki.east,
        &[ingress],
    ))?;

    let mut client = TcpStream::connect(address(&intruder, "egress-web")?).await?;
    let _ = client.write_all(b"let me in").await;
    assert_eq!(read_until_closed(&mut client).await?, b"");
    eventually("handshake failure counted", || {
        stats(&east, "ingress-mtls").handshake_failures == 1
    })
    .await?;
    let inn = stats(&east, "ingress-mtls");
    assert!(inn.peer_identities.is_empty(), "{inn:?}");
    assert_eq!(inn.bytes_client_to_upstream, 0);
    Ok(())
}

#[tokio::test]
async fn trust_domains_are_never_merged() -> TestResult {
    let pki = Pki::new();
    let backend = echo_backend().await?;
    let east = start(&east_config(&pki, backend))?;
    let ingress = address(&east, "ingress-mtls")?;
    // A west.mesh SPIFFE ID signed by east.mesh's CA: east's root is trusted,
    // but only for east.mesh IDs, so this must be refused.
    let forger = start(&egress_config(
        &pki.east,
        "spiffe://west.mesh/ns/meshfed-system/sa/gateway",
        &pki.east,
        &[ingress],
    ))?;

    let mut client = TcpStream::connect(address(&forger, "egress-web")?).await?;
    let _ = client.write_all(b"forged").await;
    assert_eq!(read_until_closed(&mut client).await?, b"");
    eventually("handshake failure counted", || {
        stats(&east, "ingress-mtls").handshake_failures == 1
    })
    .await?;
    assert!(stats(&east, "ingress-mtls").peer_identities.is_empty());
    Ok(())
}

#[tokio::test]
async fn trusted_but_unauthorized_caller_is_denied() -> TestResult {
    let pki = Pki::new();
    let backend = echo_backend().await?;
    let east = start(&east_config(&pki, backend))?;
    let ingress = address(&east, "ingress-mtls")?;
    // east.mesh is trusted by the east gateway, but the route only allows west.mesh.
    let local = start(&egress_config(
        &pki.east,
        "spiffe://east.mesh/ns/default/sa/curious",
        &pki.east,
        &[ingress],
    ))?;

    let mut client = TcpStream::connect(address(&local, "egress-web")?).await?;
    let _ = client.write_all(b"hello?").await;
    assert_eq!(read_until_closed(&mut client).await?, b"");
    eventually("denial counted", || {
        stats(&east, "ingress-mtls").denied == 1
    })
    .await?;
    let inn = stats(&east, "ingress-mtls");
    assert_eq!(inn.bytes_client_to_upstream, 0);
    // Only authorized callers enter the caller table; denials count by trust domain.
    assert!(inn.peer_identities.is_empty(), "{inn:?}");
    assert_eq!(inn.denied_by_trust_domain.get("east.mesh"), Some(&1));
    Ok(())
}

#[tokio::test]
async fn originate_refuses_a_peer_with_the_wrong_spiffe_id() -> TestResult {
    let pki = Pki::new();
    let backend = echo_backend().await?;
    // The "east gateway" presents a workload SVID instead of the gateway's.
    let mut config = east_config(&pki, backend);
    let imposter = pki.east.svid("spiffe://east.mesh/ns/default/sa/web");
    config["identity"] =
        json!({"cert_chain_pem": imposter.cert_pem, "private_key_pem": imposter.key_pem});
    let east = start(&config)?;
    let west = start(&egress_config(
        &pki.west,
        WEST_GW,
        &pki.east,
        &[address(&east, "ingress-mtls")?],
    ))?;

    let mut client = TcpStream::connect(address(&west, "egress-web")?).await?;
    let _ = client.write_all(b"secret").await;
    assert_eq!(read_until_closed(&mut client).await?, b"");
    eventually("handshake failure counted", || {
        stats(&west, "egress-web").handshake_failures == 1
    })
    .await?;
    assert!(stats(&west, "egress-web").peer_identities.is_empty());
    Ok(())
}

/// A failover group: one originate cluster holding a plain local endpoint
/// (priority 0) and two peer gateways (priorities 1 and 2), each with its
/// own mTLS settings. The local endpoint is down and the first peer
/// presents the wrong identity: both failures happen before any client
/// byte is sent, so the connection lands on the second peer. Once a local
/// endpoint is up, traffic stays local.
#[tokio::test]
async fn failover_group_tries_local_then_peers_in_order() -> TestResult {
    let pki = Pki::new();
    let backend = echo_backend().await?;
    let east = start(&east_config(&pki, backend))?;
    let mut imposter_config = east_config(&pki, backend);
    let imposter_svid = pki.east.svid("spiffe://east.mesh/ns/default/sa/web");
    imposter_config["identity"] =
        json!({"cert_chain_pem": imposter_svid.cert_pem, "private_key_pem": imposter_svid.key_pem});
    let imposter = start(&imposter_config)?;
    let peer_tls = json!({"sni": SNI, "peer_spiffe_id": EAST_GW});
    let group = |local: SocketAddr| -> Result<Value, Box<dyn Error>> {
        let mut config = egress_config(&pki.west, WEST_GW, &pki.east, &[]);
        config["clusters"][0] = json!({
            "name": "east-gateway", "connect_timeout_ms": 1000,
            "endpoints": [
                {"address": local.to_string(), "priority": 0},
                {"address": address(&imposter, "ingress-mtls")?.to_string(), "priority": 1,
                 "tls": peer_tls},
                {"address": address(&east, "ingress-mtls")?.to_string(), "priority": 2,
                 "tls": peer_tls}
            ]
        });
        Ok(config)
    };
    let west = start(&group(dead_address()?)?)?;

    let mut client = TcpStream::connect(address(&west, "egress-web")?).await?;
    assert_eq!(round_trip(&mut client, b"via east").await?, b"via east");
    let egress = stats(&west, "egress-web");
    assert_eq!(egress.upstream_connect_failures, 0);
    assert_eq!(
        egress.handshake_failure_reasons.get("upstream_tls"),
        Some(&1)
    );
    assert_eq!(egress.peer_identities.get(EAST_GW), Some(&1));
    drop(client);

    let local = echo_backend().await?;
    west.apply(group(local)?.to_string().as_bytes())?;
    let mut client = TcpStream::connect(address(&west, "egress-web")?).await?;
    assert_eq!(round_trip(&mut client, b"local").await?, b"local");
    // Served locally: no further peer connection.
    assert_eq!(
        stats(&west, "egress-web").peer_identities.get(EAST_GW),
        Some(&1)
    );
    Ok(())
}

#[tokio::test]
async fn round_robin_fails_over_to_a_live_endpoint() -> TestResult {
    let pki = Pki::new();
    let backend = echo_backend().await?;
    let east = start(&east_config(&pki, backend))?;
    let ingress = address(&east, "ingress-mtls")?;
    let west = start(&egress_config(
        &pki.west,
        WEST_GW,
        &pki.east,
        &[dead_address()?, ingress],
    ))?;

    for i in 0..4 {
        let mut client = TcpStream::connect(address(&west, "egress-web")?).await?;
        let payload = format!("request {i}");
        assert_eq!(
            round_trip(&mut client, payload.as_bytes()).await?,
            payload.as_bytes()
        );
    }
    assert_eq!(stats(&west, "egress-web").upstream_connect_failures, 0);
    Ok(())
}

#[tokio::test]
async fn passthrough_routes_on_sni_and_drops_unknown_sni() -> TestResult {
    let (sink, connections, bytes) = counting_backend().await?;
    let config = json!({
        "handshake_timeout_ms": 2000,
        "listeners": [{"name": "ingress", "address": "127.0.0.1:0", "mode": "passthrough",
                       "routes": [{"sni": "*.svc.east.mesh", "cluster": "sink"}]}],
        "clusters": [{"name": "sink", "endpoints": [{"address": sink.to_string()}]}]
    });
    let gateway = start(&config)?;
    let ingress = address(&gateway, "ingress")?;

    // Unknown SNI: closed, nothing forwarded.
    let mut client = TcpStream::connect(ingress).await?;
    client
        .write_all(&client_hello("web.default.svc.west.mesh"))
        .await?;
    assert_eq!(read_until_closed(&mut client).await?, b"");
    eventually("no_route counted", || {
        stats(&gateway, "ingress").no_route == 1
    })
    .await?;

    // Not TLS at all: closed, nothing forwarded.
    let mut client = TcpStream::connect(ingress).await?;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    assert_eq!(read_until_closed(&mut client).await?, b"");
    eventually("handshake failure counted", || {
        stats(&gateway, "ingress").handshake_failures == 1
    })
    .await?;
    assert_eq!(connections.load(Ordering::SeqCst), 0);
    assert_eq!(bytes.load(Ordering::SeqCst), 0);

    // Known SNI, sent one byte per write: the hello is forwarded untouched.
    let hello = client_hello(SNI);
    let mut client = TcpStream::connect(ingress).await?;
    client.set_nodelay(true)?;
    for byte in &hello {
        client.write_all(std::slice::from_ref(byte)).await?;
    }
    eventually("hello forwarded", || {
        bytes.load(Ordering::SeqCst) == hello.len()
    })
    .await?;
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    assert_eq!(
        stats(&gateway, "ingress").bytes_client_to_upstream,
        hello.len() as u64
    );
    Ok(())
}

#[tokio::test]
async fn apply_rejects_bad_config_and_keeps_serving() -> TestResult {
    let pki = Pki::new();
    let backend = echo_backend().await?;
    let east = start(&east_config(&pki, backend))?;
    let before = east.addresses();
    let west = start(&egress_config(
        &pki.west,
        WEST_GW,
        &pki.east,
        &[address(&east, "ingress-mtls")?],
    ))?;

    let mut bad = east_config(&pki, backend);
    bad["listeners"][0]["routes"][0]["cluster"] = json!("x");
    match east.apply(bad.to_string().as_bytes()) {
        Err(GatewayError::Config(e)) => {
            assert_eq!(
                e.to_string(),
                "listeners[0].routes[0].cluster: no cluster named \"x\""
            );
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    assert!(matches!(
        east.apply(b"{not json"),
        Err(GatewayError::Config(_))
    ));

    // A listener on a port that is taken: a bind error, nothing changed.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken = squatter.local_addr()?;
    let mut clash = east_config(&pki, backend);
    if let Some(listeners) = clash["listeners"].as_array_mut() {
        listeners.push(json!({"name": "extra", "address": taken.to_string(), "mode": "passthrough", "routes": []}));
    }
    let err = east
        .apply(clash.to_string().as_bytes())
        .err()
        .map(|e| e.to_string());
    let err = err.unwrap_or_default();
    assert!(
        err.starts_with(&format!("listener \"extra\": cannot bind {taken}: ")),
        "{err}"
    );
    assert!(
        err.contains("is another gateway running on this port?"),
        "{err}"
    );

    assert_eq!(east.addresses(), before);
    let mut client = TcpStream::connect(address(&west, "egress-web")?).await?;
    assert_eq!(round_trip(&mut client, b"still here").await?, b"still here");
    Ok(())
}

#[tokio::test]
async fn apply_keeps_live_connections_and_unchanged_listeners() -> TestResult {
    let pki = Pki::new();
    let backend = echo_backend().await?;
    let east = start(&east_config(&pki, backend))?;
    let ingress = address(&east, "ingress-mtls")?;
    let passthrough = address(&east, "ingress")?;
    let west = start(&egress_config(&pki.west, WEST_GW, &pki.east, &[ingress]))?;

    let mut live = TcpStream::connect(address(&west, "egress-web")?).await?;
    assert_eq!(round_trip(&mut live, b"before").await?, b"before");

    // New generation: the passthrough listener goes away, a new one
    // appears, and the route now denies everyone (no rules).
    let mut next = east_config(&pki, backend);
    next["listeners"][0]["routes"][0]["rules"] = json!([]);
    next["listeners"][1] =
        json!({"name": "ingress-2", "address": "127.0.0.1:0", "mode": "passthrough", "routes": []});
    east.apply(next.to_string().as_bytes())?;

    // The live connection finishes on the config it started with.
    assert_eq!(round_trip(&mut live, b"after").await?, b"after");
    // Unchanged listener kept its socket; removed one stopped accepting.
    let addresses = east.addresses();
    assert_eq!(addresses.get("ingress-mtls"), Some(&ingress));
    assert!(!addresses.contains_key("ingress"));
    assert!(addresses.contains_key("ingress-2"));
    eventually("removed listener stops accepting", || {
        std::net::TcpStream::connect_timeout(&passthrough, Duration::from_millis(200)).is_err()
    })
    .await?;
    // New connections get the new generation: denied.
    let mut fresh = TcpStream::connect(address(&west, "egress-web")?).await?;
    let _ = fresh.write_all(b"new").await;
    assert_eq!(read_until_closed(&mut fresh).await?, b"");
    eventually("denial counted", || {
        stats(&east, "ingress-mtls").denied == 1
    })
    .await?;
    assert_eq!(round_trip(&mut live, b"still").await?, b"still");
    Ok(())
}

#[test]
fn shutdown_is_idempotent_and_closes_listeners() -> TestResult {
    let config = json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "mode": "passthrough", "routes": []}]
    });
    let gateway = start(&config)?;
    let bound = address(&gateway, "in")?;
    assert!(std::net::TcpStream::connect(bound).is_ok());
    gateway.shutdown();
    gateway.shutdown();
    assert!(gateway.addresses().is_empty());
    assert!(std::net::TcpStream::connect(bound).is_err());
    assert!(matches!(gateway.apply(b"{}"), Err(GatewayError::Closed)));
    Ok(())
}

/// West with one connect listener for two imports: `web.default.east:8080`
/// over mTLS to east's ingress, `echo.default.north:7` plain to `north`.
fn connect_config(pki: &Pki, east: SocketAddr, north: SocketAddr) -> Result<Value, Box<dyn Error>> {
    let svid = pki.west.svid(WEST_GW);
    Ok(json!({
        "identity": {"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem},
        "trust_bundles": {"east.mesh": pki.east.bundle_pem()},
        "handshake_timeout_ms": 2000,
        "listeners": [{"name": "egress-connect", "address": "127.0.0.1:0", "mode": "connect",
                       "connect_routes": [
                           {"authority": "web.default.east:8080", "cluster": "east-web"},
                           {"authority": "Echo.Default.North:7", "cluster": "north-echo"},
                           {"authority": "gone.default.east:80", "cluster": "gone"}]}],
        "clusters": [
            {"name": "east-web", "endpoints": [{"address": east.to_string()}], "connect_timeout_ms": 1000,
             "tls": {"sni": SNI, "peer_spiffe_id": EAST_GW}},
            {"name": "north-echo", "endpoints": [{"address": north.to_string()}]},
            {"name": "gone", "endpoints": [{"address": dead_address()?.to_string()}], "connect_timeout_ms": 500}
        ]
    }))
}

/// Sends a request head and reads the response head (up to the blank line).
async fn ask(stream: &mut TcpStream, head: &[u8]) -> Result<String, Box<dyn Error>> {
    stream.write_all(head).await?;
    Ok(String::from_utf8(read_head(stream).await?)?)
}

/// One listening socket serves every import: a client names the import in
/// its CONNECT request and gets `200` only once the upstream is connected;
/// bytes sent right behind the request reach the backend.
#[tokio::test]
async fn a_connect_listener_reaches_each_import_by_name() -> TestResult {
    let pki = Pki::new();
    let east = start(&east_config(&pki, echo_backend().await?))?;
    let north = echo_backend().await?;
    let west = start(&connect_config(
        &pki,
        address(&east, "ingress-mtls")?,
        north,
    )?)?;
    assert_eq!(west.addresses().len(), 1);
    let proxy = address(&west, "egress-connect")?;

    let mut client = TcpStream::connect(proxy).await?;
    let answer = ask(
        &mut client,
        b"CONNECT web.default.east:8080 HTTP/1.1\r\nHost: web.default.east:8080\r\n\r\n",
    )
    .await?;
    assert_eq!(answer, "HTTP/1.1 200 Connection established\r\n\r\n");
    let payload = b"across zones by name".repeat(100);
    assert_eq!(round_trip(&mut client, &payload).await?, payload);
    drop(client);

    // Names are case-insensitive; the first bytes may follow the head at once.
    let mut client = TcpStream::connect(proxy).await?;
    client
        .write_all(b"CONNECT echo.default.north:7 HTTP/1.1\r\n\r\nearly")
        .await?;
    let mut back = vec![0u8; b"HTTP/1.1 200 Connection established\r\n\r\nearly".len()];
    tokio::time::timeout(IO_TIMEOUT, client.read_exact(&mut back)).await??;
    assert_eq!(back, b"HTTP/1.1 200 Connection established\r\n\r\nearly");

    eventually("both connections counted", || {
        stats(&west, "egress-connect").accepted == 2
    })
    .await?;
    let out = stats(&west, "egress-connect");
    assert_eq!(out.peer_identities.get(EAST_GW), Some(&1));
    assert_eq!((out.no_route, out.handshake_failures), (0, 0));
    Ok(())
}

/// What a connect listener cannot do it says in the status and a
/// `meshfed-reason` header, and nothing reaches any backend.
#[tokio::test]
async fn a_connect_listener_refuses_saying_why() -> TestResult {
    let pki = Pki::new();
    let (north, connections, _) = counting_backend().await?;
    let west = start(&connect_config(&pki, dead_address()?, north)?)?;
    let proxy = address(&west, "egress-connect")?;
    let cases: [(&[u8], &str, &str); 5] = [
        (
            b"CONNECT nope.default.east:8080 HTTP/1.1\r\n\r\n",
            "404 Not Found",
            "no import named",
        ),
        (
            b"CONNECT gone.default.east:80 HTTP/1.1\r\n\r\n",
            "502 Bad Gateway",
            "no endpoint reachable",
        ),
        (
            b"CONNECT web.default.east:8080 HTTP/1.1\r\n\r\n",
            "502 Bad Gateway",
            "cluster \"east-web\"",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "405 Method Not Allowed",
            "CONNECT proxy",
        ),
        (
            b"\x16\x03\x01\x00\x05hello\r\n\r\n",
            "400 Bad Request",
            "not an HTTP request",
        ),
    ];
    for (request, status, reason) in cases {
        let mut client = TcpStream::connect(proxy).await?;
        let answer = ask(&mut client, request).await?;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{answer:?}"
        );
        let said = answer
            .lines()
            .find_map(|line| line.strip_prefix("meshfed-reason: "))
            .unwrap_or_default();
        assert!(said.contains(reason), "{status}: {said:?}");
        assert!(read_until_closed(&mut client).await?.is_empty());
    }
    assert_eq!(connections.load(Ordering::SeqCst), 0);
    let out = stats(&west, "egress-connect");
    assert_eq!(out.no_route, 1);
    assert_eq!(out.upstream_connect_failures, 2);
    assert_eq!(out.handshake_failure_reasons.get("malformed"), Some(&2));
    Ok(())
}

/// A connection closed before its first byte (an importing peer's TCP
/// health check, a load balancer's, a scan) is a probe, not a handshake
/// failure; plain bytes where TLS must start are `not_tls`, not `tls`.
#[tokio::test]
async fn probes_and_plain_bytes_are_told_apart_from_tls_failures() -> TestResult {
    let pki = Pki::new();
    let east = start(&east_config(&pki, echo_backend().await?))?;
    for listener in ["ingress-mtls", "ingress"] {
        let address = address(&east, listener)?;
        for _ in 0..3 {
            drop(TcpStream::connect(address).await?);
        }
        let mut plain = TcpStream::connect(address).await?;
        plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
        assert!(read_until_closed(&mut plain).await?.is_empty());
        let mut partial = TcpStream::connect(address).await?;
        partial.write_all(&client_hello(SNI)[..20]).await?;
        partial.shutdown().await?;
        assert!(read_until_closed(&mut partial).await?.is_empty());
        eventually("every connection closed", || {
            stats(&east, listener).closed == 5
        })
        .await?;
        let seen = stats(&east, listener);
        assert_eq!(seen.probes, 3, "{listener}: {seen:?}");
        assert_eq!(seen.handshake_failures, 2, "{listener}: {seen:?}");
        let reason = |name: &str| {
            seen.handshake_failure_reasons
                .get(name)
                .copied()
                .unwrap_or(0)
        };
        assert_eq!(
            (reason("not_tls"), reason("closed"), reason("tls")),
            (1, 1, 0),
            "{listener}: {seen:?}"
        );
    }
    Ok(())
}
