//! Data-plane behaviour on loopback with real sockets: outlier ejection and
//! failover with a killed endpoint, hot reconfiguration under traffic,
//! limits, timeouts, PROXY v2 and re-encryption.

#[path = "../src/test_certs.rs"]
mod test_certs;
use test_certs::client_hello;

use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshfed_gateway::{Gateway, proxy_protocol};
use serde_json::{Value, json};
use test_certs::TestDomain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

type TestResult = Result<(), Box<dyn Error + Send + Sync>>;
type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

const SNI: &str = "outbound_.8080_._.web.default.svc.east.mesh";
const EAST_GW: &str = "spiffe://east.mesh/ns/meshfed-system/sa/gateway";
const WEST_GW: &str = "spiffe://west.mesh/ns/meshfed-system/sa/gateway";
const WEB: &str = "spiffe://east.mesh/ns/default/sa/web";
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// An echo server; aborting the returned task closes its port (later
/// connects are refused) while accepted connections finish.
async fn echo_backend() -> Res<(SocketAddr, JoinHandle<()>, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok((address, task, accepted))
}

fn endpoints(addresses: &[SocketAddr]) -> Vec<Value> {
    addresses
        .iter()
        .map(|a| json!({"address": a.to_string()}))
        .collect()
}

fn passthrough(cluster: Value) -> Value {
    json!({
        "handshake_timeout_ms": 2000,
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "mode": "passthrough",
                       "routes": [{"sni": SNI, "cluster": "web"}]}],
        "clusters": [cluster]
    })
}

fn start(config: &Value) -> Res<Gateway> {
    Ok(Gateway::start(config.to_string().as_bytes())?)
}

fn address(gateway: &Gateway, listener: &str) -> Res<SocketAddr> {
    Ok(*gateway
        .addresses()
        .get(listener)
        .ok_or_else(|| format!("no listener {listener}"))?)
}

fn stats(gateway: &Gateway) -> Res<Value> {
    Ok(serde_json::from_str(&gateway.stats_json())?)
}

/// One passthrough connection: hello + payload out, the same echoed back.
async fn hello_round_trip(target: SocketAddr, hello: &[u8], payload: &[u8]) -> Res<()> {
    let mut stream = TcpStream::connect(target).await?;
    let mut out = hello.to_vec();
    out.extend_from_slice(payload);
    stream.write_all(&out).await?;
    let mut back = vec![0u8; out.len()];
    tokio::time::timeout(IO_TIMEOUT, stream.read_exact(&mut back)).await??;
    if back != out {
        return Err("echo mismatch".into());
    }
    Ok(())
}

/// Reads until EOF, error or timeout; true when the peer closed.
async fn closed_by_peer(stream: &mut TcpStream, within: Duration) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut sink))
        .await
        .is_ok()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) -> TestResult {
    for _ in 0..100 {
        if check() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("timed out waiting for: {what}").into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_endpoint_is_ejected_and_traffic_fails_over() -> TestResult {
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(echo_backend().await?);
    }
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.0).collect();
    let gateway = start(&passthrough(json!({
        "name": "web", "endpoints": endpoints(&addresses),
        "outlier_detection": {"consecutive_failures": 2, "base_ejection_ms": 60000,
                              "max_ejection_percent": 50}
    })))?;
    let target = address(&gateway, "in")?;
    let hello = Arc::new(client_hello(SNI));

    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (hello, failures, done) = (hello.clone(), failures.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            for i in 0..40 {
                let payload = format!("client {c} request {i}");
                if hello_round_trip(target, &hello, payload.as_bytes())
                    .await
                    .is_err()
                {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // Kill endpoint 1 mid-traffic.
    eventually("some traffic", || done.load(Ordering::SeqCst) >= 30).await?;
    backends[1].1.abort();
    for client in clients {
        client.await?;
    }
    // Connect retry hides the dead endpoint even before it is ejected: a
    // refused connect is retried elsewhere. Only a connection the endpoint's
    // kernel had already queued when it died is lost (it is reset after the
    // ClientHello went out, so no proxy may retry it): at most one per client.
    let failed = failures.load(Ordering::SeqCst);
    assert!(failed <= 4, "{failed} failed client connections");

    let doc = stats(&gateway)?;
    let dead = &doc["clusters"]["web"]["endpoints"][addresses[1].to_string()];
    assert_eq!(dead["ejected"], true, "{dead}");
    assert_eq!(dead["ejections"], 1);
    // Ejected after 2 failures: no connect attempt after that (a few may
    // have been in flight concurrently).
    let attempts = dead["connect_failures"].as_u64().unwrap_or(u64::MAX);
    assert!(
        (2..=5).contains(&attempts),
        "{attempts} attempts on a dead endpoint"
    );
    assert_eq!(doc["clusters"]["web"]["ejections"], 1);
    assert_eq!(doc["listeners"]["in"]["upstream_connect_failures"], 0);
    // After ejection, traffic keeps flowing to the live endpoints only.
    let before = backends[0].2.load(Ordering::SeqCst) + backends[2].2.load(Ordering::SeqCst);
    for i in 0..10 {
        hello_round_trip(target, &hello, format!("after {i}").as_bytes()).await?;
    }
    let after = backends[0].2.load(Ordering::SeqCst) + backends[2].2.load(Ordering::SeqCst);
    assert_eq!(after - before, 10);
    let doc = stats(&gateway)?;
    let dead = &doc["clusters"]["web"]["endpoints"][addresses[1].to_string()];
    assert_eq!(dead["connect_failures"].as_u64(), Some(attempts));
    Ok(())
}

/// Configs alternate between policies, weights, endpoint sets and an extra
/// listener; the main listener is the same in all of them.
fn churn_config(generation: usize, backends: &[SocketAddr], extra: bool) -> Value {
    let lbs = [
        "round_robin",
        "weighted_round_robin",
        "least_request",
        "maglev",
    ];
    let mut eps: Vec<Value> = backends
        .iter()
        .enumerate()
        .map(|(i, a)| {
            json!({"address": a.to_string(), "weight": 1 + (generation + i) % 3,
                             "priority": (generation + i) % 2})
        })
        .collect();
    if generation % 5 == 4 {
        eps.truncate(1);
    }
    let mut listeners = vec![
        json!({"name": "in", "address": "127.0.0.1:0", "mode": "passthrough",
        "routes": [{"sni": SNI, "cluster": "web"}]}),
    ];
    if extra {
        listeners.push(
            json!({"name": "extra", "address": "127.0.0.1:0", "mode": "passthrough",
            "routes": [{"sni": SNI, "cluster": "web"}]}),
        );
    }
    json!({
        "listeners": listeners,
        "clusters": [{"name": "web", "lb": lbs[generation % lbs.len()], "endpoints": eps}]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reconfiguration_every_10ms_drops_nothing() -> TestResult {
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(echo_backend().await?.0);
    }
    let gateway = Arc::new(start(&churn_config(0, &backends, true))?);
    let target = address(&gateway, "in")?;
    let hello = Arc::new(client_hello(SNI));

    // A connection on the extra listener, open before it is removed.
    let mut draining = TcpStream::connect(address(&gateway, "extra")?).await?;
    draining.write_all(&hello).await?;
    let mut back = vec![0u8; hello.len()];
    tokio::time::timeout(IO_TIMEOUT, draining.read_exact(&mut back)).await??;

    let stop = Arc::new(AtomicBool::new(false));
    let applier = {
        let (gateway, stop, backends) = (gateway.clone(), stop.clone(), backends.clone());
        tokio::task::spawn_blocking(move || -> Res<usize> {
            // About 80 generations, 10 ms apart, while the clients run.
            for generation in 1..=80 {
                let config = churn_config(generation, &backends, false);
                gateway.apply(config.to_string().as_bytes())?;
                #[allow(clippy::disallowed_methods)] // a plain thread, not a tokio worker
                std::thread::sleep(Duration::from_millis(10));
            }
            stop.store(true, Ordering::SeqCst);
            Ok(80)
        })
    };

    let failures = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (hello, failures, total, stop) =
            (hello.clone(), failures.clone(), total.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let payload = format!("client {c} request {i}");
                if let Err(e) = hello_round_trip(target, &hello, payload.as_bytes()).await {
                    eprintln!("client {c} request {i}: {e}");
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                total.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        }));
    }
    let applied = applier.await??;
    for client in clients {
        client.await?;
    }
    let total = total.load(Ordering::SeqCst);
    eprintln!(
        "hot reconfiguration: {total} connections over {applied} configs applied 10 ms apart"
    );
    assert!(total >= 100, "only {total} connections during the churn");
    assert_eq!(failures.load(Ordering::SeqCst), 0, "failed connections");

    // The removed listener drained: its live connection still works...
    draining.write_all(b"still here").await?;
    let mut back = [0u8; 10];
    tokio::time::timeout(IO_TIMEOUT, draining.read_exact(&mut back)).await??;
    assert_eq!(&back, b"still here");
    // ...but it accepts nothing new.
    assert!(!gateway.addresses().contains_key("extra"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_at_a_time_hello_is_cut_by_the_handshake_timeout() -> TestResult {
    let (backend, _task, _) = echo_backend().await?;
    let mut config = passthrough(json!({"name": "web", "endpoints": endpoints(&[backend])}));
    config["handshake_timeout_ms"] = json!(300);
    let gateway = start(&config)?;
    let hello = client_hello(SNI);
    let mut stream = TcpStream::connect(address(&gateway, "in")?).await?;
    let started = Instant::now();
    let mut cut = false;
    for byte in &hello {
        if stream.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        let mut probe = [0u8; 1];
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(20), stream.read(&mut probe)).await
        {
            // EOF or reset: the gateway hung up.
            cut = !matches!(read, Ok(n) if n > 0);
            break;
        }
    }
    assert!(cut, "slow ClientHello was never cut");
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "cut after {elapsed:?}");
    let doc = stats(&gateway)?;
    assert_eq!(
        doc["listeners"]["in"]["handshake_failure_reasons"]["timeout"],
        1
    );
    Ok(())
}

#[tokio::test]
async fn oversize_client_hello_is_refused() -> TestResult {
    let (backend, _task, accepted) = echo_backend().await?;
    let gateway = start(&passthrough(
        json!({"name": "web", "endpoints": endpoints(&[backend])}),
    ))?;
    let mut stream = TcpStream::connect(address(&gateway, "in")?).await?;
    // A record announcing a 20,000-byte ClientHello (limit: 16 KiB).
    let mut bytes = vec![22, 3, 1, 0x40, 0x00, 1, 0x00, 0x4e, 0x20];
    bytes.resize(1024, 0);
    stream.write_all(&bytes).await?;
    assert!(closed_by_peer(&mut stream, IO_TIMEOUT).await);
    let doc = stats(&gateway)?;
    assert_eq!(
        doc["listeners"]["in"]["handshake_failure_reasons"]["too_large"],
        1
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    Ok(())
}

#[tokio::test]
async fn route_rate_limit_refuses_beyond_the_burst() -> TestResult {
    let (backend, _task, _) = echo_backend().await?;
    let mut config = passthrough(json!({"name": "web", "endpoints": endpoints(&[backend])}));
    config["listeners"][0]["routes"][0]["rate_limit"] =
        json!({"connections_per_second": 0.01, "burst": 2});
    let gateway = start(&config)?;
    let target = address(&gateway, "in")?;
    let hello = client_hello(SNI);
    hello_round_trip(target, &hello, b"one").await?;
    hello_round_trip(target, &hello, b"two").await?;
    assert!(hello_round_trip(target, &hello, b"three").await.is_err());
    let doc = stats(&gateway)?;
    assert_eq!(doc["listeners"]["in"]["rate_limited"], 1);
    assert_eq!(doc["listeners"]["in"]["routes"][SNI]["rate_limited"], 1);
    assert_eq!(doc["listeners"]["in"]["routes"][SNI]["connections"], 3);
    Ok(())
}

#[tokio::test]
async fn circuit_breaker_refuses_fast_beyond_max_connections() -> TestResult {
    let (backend, _task, _) = echo_backend().await?;
    let gateway = start(&passthrough(json!({
        "name": "web", "endpoints": endpoints(&[backend]),
        "circuit_breaker": {"max_connections": 1}
    })))?;
    let target = address(&gateway, "in")?;
    let hello = client_hello(SNI);
    let mut held = TcpStream::connect(target).await?;
    held.write_all(&hello).await?;
    let mut back = vec![0u8; hello.len()];
    tokio::time::timeout(IO_TIMEOUT, held.read_exact(&mut back)).await??;
    assert!(hello_round_trip(target, &hello, b"second").await.is_err());
    let doc = stats(&gateway)?;
    assert_eq!(doc["clusters"]["web"]["circuit_open"], 1);
    assert_eq!(doc["listeners"]["in"]["circuit_open"], 1);
    assert_eq!(doc["clusters"]["web"]["active"], 1);
    drop(held);
    eventually("connection released", || {
        stats(&gateway).is_ok_and(|d| d["clusters"]["web"]["active"] == 0)
    })
    .await?;
    hello_round_trip(target, &hello, b"third").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_clusters_split_traffic() -> TestResult {
    let (a, _ta, count_a) = echo_backend().await?;
    let (b, _tb, count_b) = echo_backend().await?;
    let gateway = start(&json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "mode": "passthrough",
            "routes": [{"sni": SNI, "weighted_clusters": [
                {"cluster": "stable", "weight": 90}, {"cluster": "canary", "weight": 10}]}]}],
        "clusters": [
            {"name": "stable", "endpoints": endpoints(&[a])},
            {"name": "canary", "endpoints": endpoints(&[b])}
        ]
    }))?;
    let target = address(&gateway, "in")?;
    let hello = client_hello(SNI);
    for i in 0..100 {
        hello_round_trip(target, &hello, format!("{i}").as_bytes()).await?;
    }
    let (na, nb) = (
        count_a.load(Ordering::SeqCst),
        count_b.load(Ordering::SeqCst),
    );
    assert_eq!(na + nb, 100);
    assert!((75..=99).contains(&na), "stable {na}, canary {nb}");
    Ok(())
}

#[tokio::test]
async fn idle_connections_are_closed() -> TestResult {
    let (backend, _task, _) = echo_backend().await?;
    let gateway = start(&passthrough(json!({
        "name": "web", "endpoints": endpoints(&[backend]), "idle_timeout_ms": 150
    })))?;
    let hello = client_hello(SNI);
    let mut stream = TcpStream::connect(address(&gateway, "in")?).await?;
    stream.write_all(&hello).await?;
    let mut back = vec![0u8; hello.len()];
    tokio::time::timeout(IO_TIMEOUT, stream.read_exact(&mut back)).await??;
    let started = Instant::now();
    assert!(closed_by_peer(&mut stream, IO_TIMEOUT).await);
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(stats(&gateway)?["listeners"]["in"]["idle_timeouts"], 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_check_takes_a_dead_endpoint_out() -> TestResult {
    let (live, _task, _) = echo_backend().await?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let gateway = start(&passthrough(json!({
        "name": "web", "endpoints": endpoints(&[live, dead]),
        "outlier_detection": {"consecutive_failures": 0},
        "health_check": {"interval_ms": 20, "timeout_ms": 100,
                         "healthy_threshold": 1, "unhealthy_threshold": 1}
    })))?;
    let key = dead.to_string();
    eventually("dead endpoint marked unhealthy", || {
        stats(&gateway).is_ok_and(|d| d["clusters"]["web"]["endpoints"][&key]["healthy"] == false)
    })
    .await?;
    let hello = client_hello(SNI);
    for i in 0..6 {
        hello_round_trip(address(&gateway, "in")?, &hello, format!("{i}").as_bytes()).await?;
    }
    let doc = stats(&gateway)?;
    assert_eq!(
        doc["clusters"]["web"]["endpoints"][&key]["connect_failures"],
        0
    );
    assert_eq!(
        doc["clusters"]["web"]["endpoints"][live.to_string()]["healthy"],
        true
    );
    // The cheap view the control plane polls says the same.
    let unhealthy = gateway.unhealthy_endpoints();
    assert_eq!(unhealthy.get("web"), Some(&vec![dead]));
    assert_eq!(unhealthy.len(), 1);
    Ok(())
}

/// A TLS backend that first reads a PROXY v2 header in the clear, then
/// finishes mTLS requiring a client certificate from `client_domain`,
/// then echoes. Sends the header and the client's SPIFFE ID back.
async fn proxy_tls_backend(
    server: &TestDomain,
    client_domain: &TestDomain,
) -> Res<(
    SocketAddr,
    tokio::sync::oneshot::Receiver<(proxy_protocol::Header, String)>,
)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let svid = server.svid(WEB);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(client_domain.bundle_pem().as_bytes()) {
        roots.add(cert?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let chain =
        CertificateDer::pem_slice_iter(svid.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes())?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        // The header is 16 bytes plus its announced length.
        let mut fixed = [0u8; 16];
        if stream.read_exact(&mut fixed).await.is_err() {
            return;
        }
        let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let mut header = fixed.to_vec();
        header.resize(16 + len, 0);
        if stream.read_exact(&mut header[16..]).await.is_err() {
            return;
        }
        let Ok((parsed, _)) = proxy_protocol::decode_v2(&header) else {
            return;
        };
        let Ok(mut tls) = acceptor.accept(stream).await else {
            return;
        };
        let client_id = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| meshfed_gateway::spiffe_id_of(c).ok())
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default();
        let _ = tx.send((parsed, client_id));
        let mut buf = [0u8; 1024];
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                break;
            }
            let _ = tls.flush().await;
        }
    });
    Ok((address, rx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_sends_proxy_v2_with_caller_identity_and_reencrypts() -> TestResult {
    let (east, west) = (TestDomain::new("east.mesh"), TestDomain::new("west.mesh"));
    let (backend, identity_rx) = proxy_tls_backend(&east, &east).await?;
    let east_svid = east.svid(EAST_GW);
    let east_gw = start(&json!({
        "identity": {"cert_chain_pem": east_svid.cert_pem, "private_key_pem": east_svid.key_pem},
        "trust_bundles": {"east.mesh": east.bundle_pem(), "west.mesh": west.bundle_pem()},
        "listeners": [{"name": "ingress", "address": "127.0.0.1:0", "mode": "terminate",
            "routes": [{"sni": SNI, "cluster": "web", "rules": [{"action": "allow", "id": "spiffe://west.mesh/*"}],
                        "proxy_protocol": true}]}],
        "clusters": [{"name": "web", "endpoints": endpoints(&[backend]),
                      "tls": {"sni": "web.default.svc", "peer_spiffe_id": WEB}}]
    }))?;
    let ingress = address(&east_gw, "ingress")?;
    let west_svid = west.svid(WEST_GW);
    let west_gw = start(&json!({
        "identity": {"cert_chain_pem": west_svid.cert_pem, "private_key_pem": west_svid.key_pem},
        "trust_bundles": {"east.mesh": east.bundle_pem()},
        "listeners": [{"name": "egress", "address": "127.0.0.1:0", "mode": "originate",
                       "cluster": "east"}],
        "clusters": [{"name": "east", "endpoints": endpoints(&[ingress]),
                      "tls": {"sni": SNI, "peer_spiffe_id": EAST_GW}}]
    }))?;
    let mut client = TcpStream::connect(address(&west_gw, "egress")?).await?;
    client.write_all(b"hello web").await?;
    let mut back = [0u8; 9];
    tokio::time::timeout(IO_TIMEOUT, client.read_exact(&mut back)).await??;
    assert_eq!(&back, b"hello web");

    let (header, upstream_client_id) = tokio::time::timeout(IO_TIMEOUT, identity_rx).await??;
    // The caller's SPIFFE ID rides in TLV 0xE0, the SNI in PP2_TYPE_AUTHORITY.
    assert!(header.tlvs.contains(&(
        proxy_protocol::PP2_TYPE_MESHFED_SPIFFE_ID,
        WEST_GW.as_bytes().to_vec()
    )));
    assert!(
        header
            .tlvs
            .contains(&(proxy_protocol::PP2_TYPE_AUTHORITY, SNI.as_bytes().to_vec()))
    );
    assert_eq!(header.destination, ingress);
    assert!(header.source.ip().is_loopback());
    // Re-encrypted with the east gateway's own identity.
    assert_eq!(upstream_client_id, EAST_GW);
    Ok(())
}

#[tokio::test]
async fn reencrypt_refuses_an_endpoint_with_the_wrong_identity() -> TestResult {
    let (east, west) = (TestDomain::new("east.mesh"), TestDomain::new("west.mesh"));
    // The backend presents WEB, but the cluster pins another identity.
    let (backend, _rx) = proxy_tls_backend(&east, &east).await?;
    let east_svid = east.svid(EAST_GW);
    let east_gw = start(&json!({
        "identity": {"cert_chain_pem": east_svid.cert_pem, "private_key_pem": east_svid.key_pem},
        "trust_bundles": {"east.mesh": east.bundle_pem(), "west.mesh": west.bundle_pem()},
        "listeners": [{"name": "ingress", "address": "127.0.0.1:0", "mode": "terminate",
            "routes": [{"sni": SNI, "cluster": "web", "rules": [{"action": "allow", "id": "spiffe://west.mesh/*"}],
                        "proxy_protocol": true}]}],
        "clusters": [{"name": "web", "endpoints": endpoints(&[backend]),
                      "tls": {"sni": "web.default.svc",
                              "peer_spiffe_id": "spiffe://east.mesh/ns/default/sa/other"}}]
    }))?;
    let west_svid = west.svid(WEST_GW);
    let west_gw = start(&json!({
        "identity": {"cert_chain_pem": west_svid.cert_pem, "private_key_pem": west_svid.key_pem},
        "trust_bundles": {"east.mesh": east.bundle_pem()},
        "listeners": [{"name": "egress", "address": "127.0.0.1:0", "mode": "originate",
                       "cluster": "east"}],
        "clusters": [{"name": "east", "endpoints": endpoints(&[address(&east_gw, "ingress")?]),
                      "tls": {"sni": SNI, "peer_spiffe_id": EAST_GW}}]
    }))?;
    let mut client = TcpStream::connect(address(&west_gw, "egress")?).await?;
    client.write_all(b"hello").await?;
    assert!(closed_by_peer(&mut client, IO_TIMEOUT).await);
    eventually("upstream TLS failure counted", || {
        stats(&east_gw).is_ok_and(|d| {
            d["listeners"]["ingress"]["handshake_failure_reasons"]["upstream_tls"] == 1
        })
    })
    .await?;
    Ok(())
}

/// Memory per idle passthrough connection through the gateway, measured
/// as RSS growth with N connections open, minus the same clients and
/// backend without the gateway. Run by hand:
/// `cargo test --release -p meshfed-gateway --test data_plane -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check; run by hand in release"]
async fn rss_per_idle_passthrough_connection() -> TestResult {
    const N: usize = 2000;
    fn rss_kb() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }
    let (backend, _task, _) = echo_backend().await?;
    let hello = client_hello(SNI);
    async fn open(target: SocketAddr, hello: &[u8], n: usize) -> Res<Vec<TcpStream>> {
        let mut streams = Vec::with_capacity(n);
        for _ in 0..n {
            let mut s = TcpStream::connect(target).await?;
            s.write_all(hello).await?;
            let mut back = vec![0u8; hello.len()];
            s.read_exact(&mut back).await?;
            streams.push(s);
        }
        Ok(streams)
    }
    // Warm up allocator and runtime, then measure direct connections.
    drop(open(backend, &hello, N).await?);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let base = rss_kb();
    let direct = open(backend, &hello, N).await?;
    let direct_kb = rss_kb().saturating_sub(base);
    drop(direct);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gateway = start(&passthrough(
        json!({"name": "web", "endpoints": endpoints(&[backend])}),
    ))?;
    let target = address(&gateway, "in")?;
    drop(open(target, &hello, N).await?);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let base = rss_kb();
    let through = open(target, &hello, N).await?;
    let through_kb = rss_kb().saturating_sub(base);
    let per_conn = through_kb.saturating_sub(direct_kb) as f64 / N as f64;
    eprintln!(
        "{N} idle connections: direct +{direct_kb} KiB, through gateway +{through_kb} KiB => gateway {per_conn:.1} KiB per idle connection"
    );
    drop(through);
    Ok(())
}

#[tokio::test]
async fn reapplying_with_the_resolved_port_keeps_the_socket() -> TestResult {
    let (backend, _task, _) = echo_backend().await?;
    let mut config = passthrough(json!({"name": "web", "endpoints": endpoints(&[backend])}));
    let gateway = start(&config)?;
    let bound = address(&gateway, "in")?;
    config["listeners"][0]["address"] = json!(bound.to_string());
    gateway.apply(config.to_string().as_bytes())?;
    assert_eq!(address(&gateway, "in")?, bound);
    hello_round_trip(bound, &client_hello(SNI), b"same socket").await?;
    Ok(())
}

/// Passthrough splices with buffers that grow under bulk load: 4 MiB each
/// way arrive intact, a half-close travels through (the client stops
/// sending and still reads the whole answer), and every byte is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_bulk_and_half_close_travel_through_the_splice() -> TestResult {
    let (backend, _task, _) = echo_backend().await?;
    let gateway = start(&passthrough(
        json!({"name": "web", "endpoints": endpoints(&[backend])}),
    ))?;
    let hello = client_hello(SNI);
    let payload: Vec<u8> = (0..4 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let stream = TcpStream::connect(address(&gateway, "in")?).await?;
    let (mut read, mut write) = stream.into_split();
    let mut sent = hello.clone();
    sent.extend_from_slice(&payload);
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await?;
        write.shutdown().await?;
        Ok::<_, std::io::Error>(sent.len())
    });
    let mut back = Vec::new();
    tokio::time::timeout(IO_TIMEOUT * 4, read.read_to_end(&mut back)).await??;
    let total = writer.await??;
    assert_eq!(back.len(), total);
    assert_eq!(back.get(hello.len()..), Some(payload.as_slice()));
    let listener = &stats(&gateway)?["listeners"]["in"];
    assert_eq!(listener["bytes_client_to_upstream"], total);
    assert_eq!(listener["bytes_upstream_to_client"], total);
    Ok(())
}
