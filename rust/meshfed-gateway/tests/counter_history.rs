//! Counters are cumulative per name across `apply()`: a listener rebuilt
//! under the same name (moved to another address), or removed and re-added
//! by a later apply, goes on counting where it was, as do its routes, its
//! cluster and the cluster's endpoints; gauges stay the live count.

#[path = "../src/test_certs.rs"]
#[allow(dead_code)]
mod test_certs;
use test_certs::client_hello;

mod common;
use common::echo_backend;

use std::error::Error;
use std::net::SocketAddr;
use std::time::Duration;

use meshfed_gateway::Gateway;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type TestResult = Result<(), Box<dyn Error + Send + Sync>>;
type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

const SNI: &str = "outbound_.8080_._.web.default.svc.east.mesh";
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A loopback port free right now.
fn free_port() -> Res<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Listener `in` at `address` routing to cluster `web`, or (`with_in` false)
/// only an unrelated listener and cluster, so `in` and `web` are gone.
fn config(address: &str, with_in: bool, backend: SocketAddr) -> Value {
    let other = json!({"name": "other", "address": "127.0.0.1:0", "mode": "passthrough",
                       "routes": [{"sni": "other.example", "cluster": "other"}]});
    let other_cluster = json!({"name": "other", "endpoints": [{"address": backend.to_string()}]});
    if !with_in {
        return json!({"listeners": [other], "clusters": [other_cluster]});
    }
    json!({
        "listeners": [
            {"name": "in", "address": address, "mode": "passthrough",
             "routes": [{"sni": SNI, "cluster": "web",
                         "rate_limit": {"connections_per_second": 1000, "burst": 1000}}]},
            other
        ],
        "clusters": [
            {"name": "web", "endpoints": [{"address": backend.to_string()}]},
            other_cluster
        ]
    })
}

fn apply(gateway: &Gateway, config: &Value) -> Res<()> {
    Ok(gateway.apply(config.to_string().as_bytes())?)
}

fn address(gateway: &Gateway) -> Res<SocketAddr> {
    Ok(*gateway.addresses().get("in").ok_or("no listener in")?)
}

fn stats(gateway: &Gateway) -> Res<Value> {
    Ok(serde_json::from_str(&gateway.stats_json())?)
}

/// A passthrough connection through `in` that has echoed `payload`; left open.
async fn open(target: SocketAddr, payload: &[u8]) -> Res<TcpStream> {
    let mut stream = TcpStream::connect(target).await?;
    let mut out = client_hello(SNI);
    out.extend_from_slice(payload);
    stream.write_all(&out).await?;
    let mut back = vec![0u8; out.len()];
    tokio::time::timeout(IO_TIMEOUT, stream.read_exact(&mut back)).await??;
    if back != out {
        return Err("echo mismatch".into());
    }
    Ok(stream)
}

/// One connection through `in`, to its close.
async fn round_trip(target: SocketAddr) -> Res<()> {
    let mut stream = open(target, b"ping").await?;
    stream.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, stream.read_to_end(&mut rest)).await??;
    Ok(())
}

/// Waits (bounded) until the connections the gateway saw closed are counted.
async fn settled(gateway: &Gateway, closed: u64) -> Res<Value> {
    for _ in 0..250 {
        let doc = stats(gateway)?;
        if doc["listeners"]["in"]["closed"] == closed {
            return Ok(doc);
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("never saw {closed} closed: {}", stats(gateway)?).into())
}

/// The cumulative counters the test follows, by path in the stats document.
const COUNTERS: [&[&str]; 8] = [
    &["listeners", "in", "accepted"],
    &["listeners", "in", "closed"],
    &["listeners", "in", "bytes_client_to_upstream"],
    &["listeners", "in", "bytes_upstream_to_client"],
    &["listeners", "in", "routes", SNI, "connections"],
    &["listeners", "in", "routes", SNI, "bytes_upstream_to_client"],
    &["clusters", "web", "connections"],
    &["clusters", "web", "bytes_sent"],
];

fn counter(doc: &Value, path: &[&str]) -> Res<u64> {
    let value = path.iter().fold(doc, |v, key| &v[*key]);
    value
        .as_u64()
        .ok_or_else(|| format!("no counter {path:?} in {doc}").into())
}

/// Every followed counter of `after` is at least what it was in `before`,
/// and the listener's `accepted` grew by exactly `more`.
fn continued(before: &Value, after: &Value, more: u64) -> TestResult {
    for path in COUNTERS {
        let (was, is) = (counter(before, path)?, counter(after, path)?);
        assert!(is >= was, "{path:?} went back from {was} to {is}");
    }
    let accepted = COUNTERS[0];
    assert_eq!(counter(after, accepted)?, counter(before, accepted)? + more);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_keep_their_history_when_a_listener_is_rebuilt() -> TestResult {
    let backend = echo_backend().await?;
    let gateway = Gateway::start(config("127.0.0.1:0", true, backend).to_string().as_bytes())?;
    let first = address(&gateway)?;
    // One connection stays open through every apply: `active` must count it.
    let held = open(first, b"held").await?;
    for _ in 0..3 {
        round_trip(first).await?;
    }
    let gen1 = settled(&gateway, 3).await?;
    assert_eq!(gen1["listeners"]["in"]["active"], 1);
    assert_eq!(counter(&gen1, COUNTERS[0])?, 4);

    // Rebuilt: the same name on another socket.
    let moved = free_port()?;
    apply(&gateway, &config(&moved.to_string(), true, backend))?;
    assert_eq!(address(&gateway)?, moved);
    round_trip(moved).await?;
    let gen2 = settled(&gateway, 4).await?;
    continued(&gen1, &gen2, 1)?;
    assert_eq!(gen2["listeners"]["in"]["active"], 1);
    assert_eq!(counter(&gen2, &["clusters", "web", "connections"])?, 5);

    // Removed: gone from the stats while the held connection drains.
    apply(&gateway, &config("", false, backend))?;
    let gone = stats(&gateway)?;
    assert!(gone["listeners"].get("in").is_none(), "{gone}");
    assert!(gone["clusters"].get("web").is_none(), "{gone}");

    // Re-added by a later apply: the history goes on, and `active` still
    // counts the connection accepted two generations ago.
    apply(&gateway, &config("127.0.0.1:0", true, backend))?;
    let back = address(&gateway)?;
    let gen3 = stats(&gateway)?;
    continued(&gen2, &gen3, 0)?;
    assert_eq!(gen3["listeners"]["in"]["active"], 1);
    round_trip(back).await?;
    let gen3 = settled(&gateway, 5).await?;
    continued(&gen2, &gen3, 1)?;
    let endpoint = &gen3["clusters"]["web"]["endpoints"][backend.to_string()];
    assert_eq!(endpoint["connections"], 6, "{gen3}");
    assert_eq!(
        counter(&gen3, &["listeners", "in", "routes", SNI, "connections"])?,
        6
    );

    // The held connection ends: counted once, where it was accepted.
    drop(held);
    let end = settled(&gateway, 6).await?;
    assert_eq!(end["listeners"]["in"]["active"], 0);
    assert_eq!(end["clusters"]["web"]["active"], 0);
    continued(&gen3, &end, 0)?;
    Ok(())
}

/// Route counters are reported under their own listener, whatever its name:
/// a listener named like another plus a slash does not lend its routes to
/// that other one.
#[tokio::test]
async fn route_counters_stay_with_their_listener_whatever_its_name() -> TestResult {
    let backend = echo_backend().await?;
    let listener = |name: &str| {
        json!({"name": name, "address": "127.0.0.1:0", "mode": "passthrough",
               "routes": [{"sni": SNI, "cluster": "web"}]})
    };
    let gateway = Gateway::start(
        json!({
            "listeners": [listener("edge"), listener("edge/in")],
            "clusters": [{"name": "web", "endpoints": [{"address": backend.to_string()}]}]
        })
        .to_string()
        .as_bytes(),
    )?;
    let slashed = *gateway.addresses().get("edge/in").ok_or("no listener")?;
    round_trip(slashed).await?;
    let doc = stats(&gateway)?;
    let routes = |name: &str| doc["listeners"][name]["routes"].clone();
    assert_eq!(routes("edge/in")[SNI]["connections"], 1, "{doc}");
    assert_eq!(routes("edge")[SNI]["connections"], 0, "{doc}");
    assert_eq!(
        routes("edge").as_object().map(|r| r.len()),
        Some(1),
        "{doc}"
    );
    Ok(())
}
