//! A terminate listener's connection caps on loopback, with real sockets and
//! real mTLS: idle unauthenticated connections hold at most `max_handshakes`
//! slots, and only until the handshake deadline; `max_connections` bounds
//! them all; a connection over a cap is closed at once and counted, and
//! authenticated traffic already through is untouched.
//!
//! Topology as in `e2e.rs`: a plain client talks to the west gateway's
//! originate listener, which opens mTLS to the east gateway's terminate
//! listener (the one under test), which forwards to an echo backend.
//!
//! The gateway runs on its own runtime, whose clock a test cannot pause:
//! the deadline here is real (and short), and each wait polls for the state
//! it needs with a bound, never for a duration. The same deadline on a
//! paused clock is `gateway::accept`'s unit test.

// Shared with the other suites; this one needs only `TestDomain`.
#[allow(dead_code)]
#[path = "../src/test_certs.rs"]
mod test_certs;

mod common;
use common::echo_backend;

use std::error::Error;
use std::net::SocketAddr;
use std::time::Duration;

use meshfed_gateway::{Gateway, ListenerSnapshot};
use serde_json::{Value, json};
use test_certs::TestDomain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type TestResult = Result<(), Box<dyn Error>>;
type Res<T> = Result<T, Box<dyn Error>>;

const SNI: &str = "outbound_.8080_._.web.default.svc.east.mesh";
const EAST_GW: &str = "spiffe://east.mesh/ns/meshfed-system/sa/gateway";
const WEST_GW: &str = "spiffe://west.mesh/ns/meshfed-system/sa/gateway";
/// Bound on every wait; far beyond what loopback needs.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// East: one terminate listener `in` with `limits`, allowing west.mesh.
fn east_config(
    east: &TestDomain,
    west: &TestDomain,
    backend: SocketAddr,
    limits: Value,
    handshake_timeout_ms: u64,
) -> Value {
    let svid = east.svid(EAST_GW);
    json!({
        "identity": {"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem},
        "trust_bundles": {"east.mesh": east.bundle_pem(), "west.mesh": west.bundle_pem()},
        "handshake_timeout_ms": handshake_timeout_ms,
        "listeners": [
            {"name": "in", "address": "127.0.0.1:0", "mode": "terminate", "limits": limits,
             "routes": [{"sni": SNI, "cluster": "web", "rules": [{"action": "allow", "id": "spiffe://west.mesh/*"}]}]}
        ],
        "clusters": [{"name": "web", "endpoints": [{"address": backend.to_string()}]}]
    })
}

/// West: an originate listener `out` dialling east's `in` over mTLS.
fn west_config(west: &TestDomain, east: &TestDomain, ingress: SocketAddr) -> Value {
    let svid = west.svid(WEST_GW);
    json!({
        "identity": {"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem},
        "trust_bundles": {"east.mesh": east.bundle_pem()},
        "listeners": [{"name": "out", "address": "127.0.0.1:0", "mode": "originate", "cluster": "east"}],
        "clusters": [{"name": "east", "endpoints": [{"address": ingress.to_string()}],
                      "outlier_detection": {"consecutive_failures": 0},
                      "tls": {"sni": SNI, "peer_spiffe_id": EAST_GW}}]
    })
}

struct Zones {
    east: Gateway,
    west: Gateway,
}

impl Zones {
    async fn start(limits: Value, handshake_timeout_ms: u64) -> Res<Self> {
        let (east_pki, west_pki) = (TestDomain::new("east.mesh"), TestDomain::new("west.mesh"));
        let backend = echo_backend().await?;
        let config = east_config(&east_pki, &west_pki, backend, limits, handshake_timeout_ms);
        let east = Gateway::start(config.to_string().as_bytes())?;
        let ingress = address(&east, "in")?;
        let config = west_config(&west_pki, &east_pki, ingress);
        let west = Gateway::start(config.to_string().as_bytes())?;
        Ok(Self { east, west })
    }

    fn ingress(&self) -> ListenerSnapshot {
        self.east
            .stats()
            .remove("in")
            .unwrap_or_else(|| panic!("no listener in"))
    }

    /// An idle TCP connection to east's ingress: no ClientHello, ever.
    async fn idle(&self) -> Res<TcpStream> {
        Ok(TcpStream::connect(address(&self.east, "in")?).await?)
    }

    /// A connection authenticated by mTLS (west's SVID) that has echoed once.
    async fn authenticated(&self) -> Res<TcpStream> {
        let mut client = TcpStream::connect(address(&self.west, "out")?).await?;
        round_trip(&mut client, b"authenticated").await?;
        Ok(client)
    }

    /// Waits (bounded) until east's ingress counters satisfy `check`.
    async fn until(
        &self,
        what: &str,
        check: impl Fn(&ListenerSnapshot) -> bool,
    ) -> Res<ListenerSnapshot> {
        let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
        loop {
            let now = self.ingress();
            if check(&now) {
                return Ok(now);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("timed out waiting for: {what}; ingress is {now:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn address(gateway: &Gateway, listener: &str) -> Res<SocketAddr> {
    Ok(*gateway
        .addresses()
        .get(listener)
        .ok_or_else(|| format!("no listener {listener}"))?)
}

async fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> Res<()> {
    stream.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(IO_TIMEOUT, stream.read_exact(&mut back)).await??;
    if back != payload {
        return Err("echo mismatch".into());
    }
    Ok(())
}

/// Whether the gateway closes `stream` (end of stream or reset) within the bound.
async fn closed_by_gateway(stream: &mut TcpStream) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, stream.read_to_end(&mut sink))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_unauthenticated_connections_hold_at_most_max_handshakes_until_the_deadline()
-> TestResult {
    let zones = Zones::start(json!({"max_connections": 10, "max_handshakes": 2}), 1_000).await?;
    let mut idle = vec![zones.idle().await?, zones.idle().await?];
    zones
        .until("both idle connections admitted", |s| s.handshaking == 2)
        .await?;

    // (a) The next unauthenticated connection is closed at once and counted,
    // and it is not counted as accepted.
    let mut refused = zones.idle().await?;
    assert!(
        closed_by_gateway(&mut refused).await,
        "a connection over max_handshakes stayed open"
    );
    let now = zones
        .until("the refusal counted", |s| {
            s.handshakes_refused_over_limit == 1
        })
        .await?;
    assert_eq!((now.accepted, now.connections_refused_over_limit), (2, 0));
    // An honest client needs a handshake slot too: while they are all held, it is refused.
    assert!(
        zones.authenticated().await.is_err(),
        "a handshake got past a full max_handshakes"
    );
    let refusals = zones
        .until("the honest client refused too", |s| {
            s.handshakes_refused_over_limit >= 2
        })
        .await?
        .handshakes_refused_over_limit;

    // (b) The handshake deadline closes the idle ones and frees their slots.
    for stream in &mut idle {
        assert!(
            closed_by_gateway(stream).await,
            "an idle connection outlived handshake_timeout_ms"
        );
    }
    let now = zones
        .until("the slots freed", |s| s.handshaking == 0 && s.active == 0)
        .await?;
    assert_eq!(now.handshake_failure_reasons.get("timeout"), Some(&2));
    let mut client = zones.authenticated().await?;
    round_trip(&mut client, b"after the deadline").await?;
    let now = zones
        .until("the authenticated connection is past its handshake", |s| {
            s.handshaking == 0
        })
        .await?;
    assert_eq!(now.peer_identities.get(WEST_GW), Some(&1));
    assert_eq!(
        now.handshakes_refused_over_limit, refusals,
        "refused after the slots freed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_new_connections_and_keeps_the_authenticated_ones() -> TestResult {
    // A long deadline: nothing here waits for it.
    let zones = Zones::start(json!({"max_connections": 3, "max_handshakes": 2}), 60_000).await?;
    let mut client = zones.authenticated().await?;
    zones
        .until("the authenticated connection past its handshake", |s| {
            s.active == 1 && s.handshaking == 0
        })
        .await?;
    let mut idle = vec![zones.idle().await?, zones.idle().await?];
    zones
        .until("3 connections open, 2 in their handshake", |s| {
            s.active == 3 && s.handshaking == 2
        })
        .await?;

    // (c) The fourth connection is over max_connections: closed at once, counted.
    let mut refused = zones.idle().await?;
    assert!(
        closed_by_gateway(&mut refused).await,
        "a connection over max_connections stayed open"
    );
    let now = zones
        .until("the refusal counted", |s| {
            s.connections_refused_over_limit == 1
        })
        .await?;
    assert_eq!((now.accepted, now.handshakes_refused_over_limit), (3, 0));
    // The authenticated connection is untouched.
    round_trip(&mut client, b"still served").await?;

    // A connection that closes gives its place back.
    drop(idle.pop());
    zones
        .until("one idle connection gone", |s| s.active == 2)
        .await?;
    let _admitted = zones.idle().await?;
    let now = zones
        .until("a new connection admitted", |s| s.accepted == 4)
        .await?;
    assert_eq!(now.connections_refused_over_limit, 1);
    round_trip(&mut client, b"still served").await?;
    Ok(())
}
