//! Zero trust across zones, on loopback with real sockets and real TLS:
//! west's originate egress (workload TLS, `convey_caller`) and east's
//! terminate ingress (ordered `rules`, `trusted_gateways`) in one process,
//! a backend that reads the PROXY v2 header east sends, and workloads and
//! hostile gateways written directly with rustls.
//!
//! No test waits on a clock to see an effect: a refused client reads until
//! the gateway closes its socket, and the gateway counts a refusal before it
//! closes (or, in the handshake, before the alert goes out).

mod zones;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshfed_gateway::proxy_protocol;
use rustls::{ClientConfig, HandshakeKind};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use zones::*;

/// A workload with an SVID calling through west's strict egress reaches
/// east's backend as itself; the intruder is denied by east's deny rule;
/// called directly, east refuses it in the handshake with `access_denied`;
/// workloads without an SVID never leave west.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_crosses_zones_and_east_authorizes_it() -> TestResult {
    let pki = Pki::new();
    let mut backend = Backend::start().await?;
    let east = start(&east_config(&pki, backend.address, 10_000))?;
    let ingress = address(&east, "ingress")?;
    // A dead local endpoint first: the header must go to the endpoint that
    // finally accepts, after the retry.
    let endpoints = json!([
        {"address": dead_address()?.to_string(), "priority": 0},
        {"address": ingress.to_string(), "priority": 1},
    ]);
    let west = start(&west_config(&pki, endpoints))?;
    let egress = address(&west, "egress-strict")?;

    let cart = client(&pki.west, WEST_GW, Some(&pki.west.svid(CART)), &[], false)?;
    let mut stream = connect(&cart, egress, "egress.west.mesh").await?;
    assert_eq!(echo(&mut stream, b"order #1").await?, b"order #1");
    assert_eq!(backend.next_caller().await?, CART);
    drop(stream);
    assert!(
        west.cluster_stats()["east"].connect_failures >= 1,
        "no retry happened"
    );
    let inn = stats(&east, "ingress");
    assert_eq!(inn.peer_identities.get(CART), Some(&1), "{inn:?}");
    assert_eq!(inn.denied, 0);

    // The intruder, through the same egress: west conveys it, east's first
    // rule denies it before the backend.
    let intruder_svid = pki.west.svid(INTRUDER);
    let intruder = client(&pki.west, WEST_GW, Some(&intruder_svid), &[], false)?;
    let mut stream = connect(&intruder, egress, "egress.west.mesh").await?;
    stream.write_all(b"steal").await?;
    refusal(stream).await?;
    let inn = stats(&east, "ingress");
    assert_eq!(inn.denied, 1);
    assert_eq!(inn.denied_by_trust_domain.get("west.mesh"), Some(&1));
    assert!(!inn.peer_identities.contains_key(INTRUDER), "{inn:?}");
    assert!(backend.untouched());

    // The intruder calling east directly with its own SVID: refused in the
    // handshake with the alert access_denied, over TLS 1.3 and 1.2.
    let direct = client(&pki.east, EAST_GW, Some(&intruder_svid), &[], false)?;
    let stream = connect(&direct, ingress, SNI).await?;
    assert_eq!(refusal(stream).await?, access_denied());
    let direct12 = client(&pki.east, EAST_GW, Some(&intruder_svid), &[], true)?;
    let refused = connect(&direct12, ingress, SNI).await.err();
    assert_eq!(refused.as_ref().and_then(rustls_error), access_denied());
    let inn = stats(&east, "ingress");
    assert_eq!(inn.denied, 3);
    assert_eq!(inn.denied_by_trust_domain.get("west.mesh"), Some(&3));
    assert_eq!(
        inn.handshake_failures, 0,
        "a denial is not a handshake failure"
    );
    let json: Value = serde_json::from_str(&east.stats_json())?;
    assert_eq!(
        json["listeners"]["ingress"]["denied_by_trust_domain"],
        json!({"west.mesh": 3})
    );

    // No SVID, no way out: plain TCP and TLS without a client certificate.
    plain_refusal(egress, b"GET / HTTP/1.1\r\n\r\n").await?;
    // (TLS 1.3: the client finishes its side first, then reads the alert.)
    let anonymous = client(&pki.west, WEST_GW, None, &[], false)?;
    let stream = connect(&anonymous, egress, "egress.west.mesh").await?;
    assert!(refusal(stream).await?.is_some(), "expected an alert");
    let out = stats(&west, "egress-strict");
    assert_eq!(
        (reason(&out, "not_tls"), reason(&out, "no_svid")),
        (1, 1),
        "{out:?}"
    );
    assert!(backend.untouched());
    assert_eq!(stats(&east, "ingress").accepted, 4);
    Ok(())
}

/// Permissive egress: plain clients are served as the gateway, TLS clients
/// as their SVID (and TLS clients without one are still refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_egress_serves_plain_as_the_gateway_and_tls_as_the_workload() -> TestResult {
    let pki = Pki::new();
    let mut backend = Backend::start().await?;
    let east = start(&east_config(&pki, backend.address, 10_000))?;
    let ingress = address(&east, "ingress")?;
    let west = start(&west_config(
        &pki,
        json!([{"address": ingress.to_string()}]),
    ))?;
    let egress = address(&west, "egress-permissive")?;

    let mut plain = TcpStream::connect(egress).await?;
    plain.write_all(b"plain").await?;
    let mut back = [0u8; 5];
    timeout(IO_TIMEOUT, plain.read_exact(&mut back)).await??;
    assert_eq!(&back, b"plain");
    assert_eq!(backend.next_caller().await?, WEST_GW);

    let cart = client(&pki.west, WEST_GW, Some(&pki.west.svid(CART)), &[], false)?;
    let mut stream = connect(&cart, egress, "egress.west.mesh").await?;
    assert_eq!(echo(&mut stream, b"tls").await?, b"tls");
    assert_eq!(backend.next_caller().await?, CART);

    let anonymous = client(&pki.west, WEST_GW, None, &[], false)?;
    let stream = connect(&anonymous, egress, "egress.west.mesh").await?;
    assert!(refusal(stream).await?.is_some(), "expected an alert");
    assert_eq!(reason(&stats(&west, "egress-permissive"), "no_svid"), 1);
    let inn = stats(&east, "ingress");
    assert_eq!(inn.peer_identities.get(WEST_GW), Some(&1), "{inn:?}");
    assert_eq!(inn.peer_identities.get(CART), Some(&1), "{inn:?}");
    assert!(backend.untouched());
    Ok(())
}

/// A hostile west gateway (west's real gateway SVID, speaking the hop
/// protocol by hand) may vouch for west.mesh callers only; a peer not in
/// trusted_gateways may not speak it at all, not even by resuming a
/// session it got without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_gateways_cannot_vouch_outside_their_trust_domain() -> TestResult {
    let pki = Pki::new();
    let mut backend = Backend::start().await?;
    // Rules that end by allowing anyone: only the trust-domain check can
    // stop a forged caller.
    let mut config = east_config(&pki, backend.address, 10_000);
    let rules = &mut config["listeners"][0]["routes"][0]["rules"];
    rules
        .as_array_mut()
        .ok_or("rules")?
        .push(json!({"action": "allow", "id": "*"}));
    let east = start(&config)?;
    let ingress = address(&east, "ingress")?;
    let west_gw = pki.west.svid(WEST_GW);
    let hostile = client(&pki.east, EAST_GW, Some(&west_gw), &[HOP_ALPN], false)?;

    for forged in [
        "spiffe://east.mesh/ns/shop/sa/cart",
        "spiffe://third.mesh/ns/shop/sa/cart",
    ] {
        let mut stream = connect(&hostile, ingress, SNI).await?;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(HOP_ALPN));
        stream.write_all(&caller_header(Some(forged))?).await?;
        stream.write_all(b"forged").await?;
        stream.flush().await?;
        assert_eq!(
            refusal(stream).await?,
            None,
            "{forged}: refused after the header, no alert"
        );
    }
    let inn = stats(&east, "ingress");
    // Counted under the vouching gateway's trust domain, not the forged one.
    assert_eq!(
        inn.denied_by_trust_domain,
        [("west.mesh".to_owned(), 2)].into()
    );
    assert!(backend.untouched());

    // The same gateway vouching for a west.mesh caller, and for itself (no TLV).
    let mut stream = connect(&hostile, ingress, SNI).await?;
    stream.write_all(&caller_header(Some(CART))?).await?;
    assert_eq!(echo(&mut stream, b"vouched").await?, b"vouched");
    assert_eq!(backend.next_caller().await?, CART);
    let mut stream = connect(&hostile, ingress, SNI).await?;
    stream.write_all(&caller_header(None)?).await?;
    assert_eq!(echo(&mut stream, b"itself").await?, b"itself");
    assert_eq!(backend.next_caller().await?, WEST_GW);
    // ... but not for a west.mesh caller the rules deny.
    let mut stream = connect(&hostile, ingress, SNI).await?;
    stream.write_all(&caller_header(Some(INTRUDER))?).await?;
    stream.flush().await?;
    refusal(stream).await?;
    assert_eq!(stats(&east, "ingress").denied, 3);

    // A west workload is not a trusted gateway: access_denied in the handshake.
    let cart_svid = pki.west.svid(CART);
    let pretender = client(
        &pki.east,
        EAST_GW,
        Some(&cart_svid),
        &[b"h2", HOP_ALPN],
        false,
    )?;
    let stream = connect(&pretender, ingress, SNI).await?;
    assert_eq!(refusal(stream).await?, access_denied());
    assert_eq!(stats(&east, "ingress").denied, 4);

    // It cannot dodge that check by resuming a session it earned without the
    // hop protocol (resumption skips certificate verification).
    let honest = client(&pki.east, EAST_GW, Some(&cart_svid), &[], false)?;
    let mut stream = connect(&honest, ingress, SNI).await?;
    assert_eq!(echo(&mut stream, b"honest").await?, b"honest");
    assert_eq!(backend.next_caller().await?, CART);
    drop(stream);
    let mut resuming = ClientConfig::clone(&honest);
    resuming.alpn_protocols = vec![HOP_ALPN.to_vec()];
    let stream = connect(&Arc::new(resuming), ingress, SNI).await?;
    assert_eq!(
        stream.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed)
    );
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(HOP_ALPN));
    assert_eq!(refusal(stream).await?, None);
    let inn = stats(&east, "ingress");
    assert_eq!(inn.denied, 5);
    assert_eq!(inn.denied_by_trust_domain.get("west.mesh"), Some(&5));
    assert!(!inn.peer_identities.contains_key(INTRUDER));
    assert!(backend.untouched());
    Ok(())
}

/// Malformed, oversized and slow caller headers are refused, each counted
/// by reason, while an honest connection on the same ingress is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_caller_headers_are_refused_without_harming_other_connections() -> TestResult {
    let pki = Pki::new();
    let mut backend = Backend::start().await?;
    // A short handshake budget (it covers the caller header): the slow
    // client below is cut by it.
    let east = start(&east_config(&pki, backend.address, 2_000))?;
    let ingress = address(&east, "ingress")?;
    let gateway = client(
        &pki.east,
        EAST_GW,
        Some(&pki.west.svid(WEST_GW)),
        &[HOP_ALPN],
        false,
    )?;

    // Slow: half a header, then silence.
    let mut slow = connect(&gateway, ingress, SNI).await?;
    let slow_since = Instant::now();
    slow.write_all(&caller_header(Some(CART))?[..10]).await?;
    slow.flush().await?;

    let mut garbage = connect(&gateway, ingress, SNI).await?;
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
        .await?;
    garbage.flush().await?;
    refusal(garbage).await?;

    let mut oversized = connect(&gateway, ingress, SNI).await?;
    let mut head = proxy_protocol::SIGNATURE.to_vec();
    head.extend_from_slice(&[0x21, 0x11, 0x13, 0x88]); // announces 5000 bytes
    head.extend_from_slice(&[0u8; 64]);
    oversized.write_all(&head).await?;
    oversized.flush().await?;
    refusal(oversized).await?;

    let mut honest = connect(&gateway, ingress, SNI).await?;
    honest.write_all(&caller_header(Some(CART))?).await?;
    assert_eq!(echo(&mut honest, b"still served").await?, b"still served");
    assert_eq!(backend.next_caller().await?, CART);

    refusal(slow).await?;
    assert!(
        slow_since.elapsed() >= Duration::from_millis(1_000),
        "closed before its deadline"
    );
    let inn = stats(&east, "ingress");
    let reasons = ["malformed", "too_large", "timeout"].map(|r| reason(&inn, r));
    assert_eq!(reasons, [1, 1, 1], "{inn:?}");
    assert_eq!(inn.denied, 0);
    assert!(backend.untouched());
    Ok(())
}

/// Clients that never heard of the hop protocol are unaffected: one
/// offering h2 and http/1.1 connects, negotiates no ALPN, and is
/// authorized as itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_clients_offering_h2_still_connect() -> TestResult {
    let pki = Pki::new();
    let mut backend = Backend::start().await?;
    let east = start(&east_config(&pki, backend.address, 10_000))?;
    let ingress = address(&east, "ingress")?;
    let cart_svid = pki.west.svid(CART);
    for tls12 in [false, true] {
        let h2 = client(
            &pki.east,
            EAST_GW,
            Some(&cart_svid),
            &[b"h2", b"http/1.1"],
            tls12,
        )?;
        let mut stream = connect(&h2, ingress, SNI).await?;
        assert_eq!(stream.get_ref().1.alpn_protocol(), None);
        assert_eq!(
            echo(&mut stream, b"PRI * HTTP/2.0").await?,
            b"PRI * HTTP/2.0"
        );
        assert_eq!(backend.next_caller().await?, CART);
    }
    assert_eq!(stats(&east, "ingress").peer_identities.get(CART), Some(&2));
    Ok(())
}

/// An ingress that does not speak the hop protocol (an older gateway, here
/// a plain rustls server) gets no caller header: its first bytes are the
/// client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convey_caller_to_an_older_ingress_sends_no_header() -> TestResult {
    let pki = Pki::new();
    let (older, mut first_bytes) = older_ingress(&pki).await?;
    let west = start(&west_config(&pki, json!([{"address": older.to_string()}])))?;
    let cart = client(&pki.west, WEST_GW, Some(&pki.west.svid(CART)), &[], false)?;
    let mut stream = connect(&cart, address(&west, "egress-strict")?, "egress").await?;
    assert_eq!(echo(&mut stream, b"hello").await?, b"hello");
    let first = timeout(IO_TIMEOUT, first_bytes.recv()).await?;
    assert_eq!(first.as_deref(), Some(&b"hello"[..]));
    Ok(())
}

const OPEN_ALPN: &[u8] = b"meshfed-caller/2";

/// An east whose backend is `backend`, health-checked every 20 ms when
/// `checked` (so a dead one is known down).
fn east_with(pki: &Pki, backend: SocketAddr, checked: bool) -> Value {
    let mut config = east_config(pki, backend, 10_000);
    if checked {
        config["clusters"][0]["health_check"] = json!({"interval_ms": 20, "timeout_ms": 100,
            "healthy_threshold": 1, "unhealthy_threshold": 1});
    }
    config
}

/// A dead backend behind the first zone of a failover group costs the
/// client nothing: that zone's ingress answers (meshfed-caller/2) that it
/// cannot open the service, and west's egress opens the next zone before
/// any client byte moved — whether the backend is known down (health
/// checks) or found dead by the connect itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_that_cannot_open_the_service_says_so_and_the_caller_is_served_by_the_next()
-> TestResult {
    for checked in [false, true] {
        let pki = Pki::new();
        let down = start(&east_with(&pki, dead_address()?, checked))?;
        if checked {
            let gone = || down.unhealthy_endpoints().contains_key("orders");
            let started = Instant::now();
            while !gone() {
                assert!(
                    started.elapsed() < IO_TIMEOUT,
                    "dead backend never marked unhealthy"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let mut backend = Backend::start().await?;
        let up = start(&east_with(&pki, backend.address, false))?;
        let endpoints = json!([
            {"address": address(&down, "ingress")?.to_string(), "priority": 0},
            {"address": address(&up, "ingress")?.to_string(), "priority": 1},
        ]);
        let mut config = west_config(&pki, endpoints);
        // No ejection: every request tries the first zone again.
        config["clusters"][0]["outlier_detection"] = json!({"consecutive_failures": 0});
        let west = start(&config)?;
        let cart = client(&pki.west, WEST_GW, Some(&pki.west.svid(CART)), &[], false)?;
        for i in 0..5 {
            let mut stream = connect(&cart, address(&west, "egress-strict")?, "egress").await?;
            let payload = format!("order #{i}");
            assert_eq!(
                echo(&mut stream, payload.as_bytes()).await?,
                payload.as_bytes()
            );
            assert_eq!(backend.next_caller().await?, CART);
        }
        let out = stats(&west, "egress-strict");
        assert_eq!(out.upstream_connect_failures, 0, "{out:?}");
        assert_eq!(out.handshake_failures, 0, "{out:?}");
        assert_eq!(west.cluster_stats()["east"].connect_failures, 5);
        let refused = stats(&down, "ingress");
        assert_eq!(refused.upstream_connect_failures, 5, "{refused:?}");
        assert_eq!(refused.handshake_failures, 0, "{refused:?}");
        assert_eq!(refused.peer_identities.get(CART), Some(&5), "{refused:?}");
    }
    Ok(())
}

/// A caller the peer's rules deny is refused once, finally: west does not
/// try the next zone with it, and does not count the refusal against the
/// peer — one intruder's calls never eject a zone for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_the_peer_refuses_is_not_retried_and_ejects_no_one() -> TestResult {
    let pki = Pki::new();
    let mut first = Backend::start().await?;
    let mut second = Backend::start().await?;
    let east = start(&east_config(&pki, first.address, 10_000))?;
    let other = start(&east_config(&pki, second.address, 10_000))?;
    let endpoints = json!([
        {"address": address(&east, "ingress")?.to_string(), "priority": 0},
        {"address": address(&other, "ingress")?.to_string(), "priority": 1},
    ]);
    let mut config = west_config(&pki, endpoints);
    config["clusters"][0]["outlier_detection"] = json!({"consecutive_failures": 1});
    let west = start(&config)?;
    let egress = address(&west, "egress-strict")?;

    let intruder = client(
        &pki.west,
        WEST_GW,
        Some(&pki.west.svid(INTRUDER)),
        &[],
        false,
    )?;
    for _ in 0..3 {
        let mut stream = connect(&intruder, egress, "egress").await?;
        stream.write_all(b"steal").await?;
        refusal(stream).await?;
    }
    assert_eq!(stats(&east, "ingress").denied, 3);
    assert_eq!(
        stats(&other, "ingress").accepted,
        0,
        "a refused caller was retried elsewhere"
    );
    assert_eq!(stats(&west, "egress-strict").denied, 3);
    assert!(
        west.unhealthy_endpoints()
            .get("east")
            .is_none_or(Vec::is_empty)
    );
    // The zone still serves the callers it allows, first in line.
    let cart = client(&pki.west, WEST_GW, Some(&pki.west.svid(CART)), &[], false)?;
    let mut stream = connect(&cart, egress, "egress").await?;
    assert_eq!(echo(&mut stream, b"order").await?, b"order");
    assert_eq!(first.next_caller().await?, CART);
    assert!(second.untouched());
    assert!(first.untouched());
    Ok(())
}

/// What an ingress knows of its backends' health it tells only an
/// authenticated gateway: an anonymous client gets the same refusal
/// whether the service's only backend is down or up; a trusted gateway
/// speaking meshfed-caller/2 finishes the handshake and then reads that the
/// service is unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_about_backend_health_is_said_before_authentication() -> TestResult {
    let pki = Pki::new();
    let down = start(&east_with(&pki, dead_address()?, true))?;
    let started = Instant::now();
    while !down.unhealthy_endpoints().contains_key("orders") {
        assert!(
            started.elapsed() < IO_TIMEOUT,
            "dead backend never marked unhealthy"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let backend = Backend::start().await?;
    let up = start(&east_with(&pki, backend.address, false))?;

    let mut seen = Vec::new();
    for gateway in [&down, &up] {
        let anonymous = client(&pki.east, EAST_GW, None, &[OPEN_ALPN, HOP_ALPN], false)?;
        let stream = connect(&anonymous, address(gateway, "ingress")?, SNI).await?;
        seen.push(refusal(stream).await?);
    }
    assert!(seen[0].is_some(), "expected an alert");
    assert_eq!(
        seen[0], seen[1],
        "the refusal tells a down backend from an up one"
    );

    let gateway = client(
        &pki.east,
        EAST_GW,
        Some(&pki.west.svid(WEST_GW)),
        &[OPEN_ALPN],
        false,
    )?;
    let mut stream = connect(&gateway, address(&down, "ingress")?, SNI).await?;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(OPEN_ALPN));
    stream.write_all(&caller_header(Some(CART))?).await?;
    stream.flush().await?;
    let mut answer = Vec::new();
    timeout(IO_TIMEOUT, stream.read_to_end(&mut answer)).await??;
    assert_eq!(answer.first(), Some(&0x01), "{answer:?}");
    let reason = String::from_utf8_lossy(&answer[3..]);
    assert_eq!(reason, "no endpoint of the service is reachable");
    Ok(())
}
