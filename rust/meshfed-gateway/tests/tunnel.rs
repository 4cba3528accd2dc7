//! The gateway tunnel (`meshfed-tunnel/1`) on loopback with real sockets
//! and real TLS: west's egress with `tls.tunnel` and east's terminate
//! ingress, a hand-made hostile gateway speaking HTTP/2 directly, and an
//! ingress that does not know the tunnel.
//!
//! Counts are read after the client saw the effect: the gateways count
//! before they answer or close.

mod zones;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use zones::*;

const TUNNEL_ALPN: &[u8] = b"meshfed-tunnel/1";

/// West's egress to `endpoints`, over the tunnel.
fn west_tunnelled(pki: &Pki, endpoints: Value) -> Value {
    let mut config = west_config(pki, endpoints);
    config["clusters"][0]["tls"]["tunnel"] = json!(true);
    config
}

/// A workload's connection through west's strict egress that echoes `payload`.
async fn call(pki: &Pki, egress: std::net::SocketAddr, svid: &str, payload: &[u8]) -> Res<Vec<u8>> {
    let workload = client(&pki.west, WEST_GW, Some(&pki.west.svid(svid)), &[], false)?;
    let mut stream = connect(&workload, egress, "egress").await?;
    echo(&mut stream, payload).await
}

/// Forty client connections, twenty one after another and twenty at once,
/// each with its caller, cost one mTLS handshake between the gateways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_client_connections_ride_one_tunnel_handshake() -> TestResult {
    let pki = Arc::new(Pki::new());
    let mut backend = Backend::start().await?;
    let east = start(&east_config(&pki, backend.address, 10_000))?;
    let endpoints = json!([{"address": address(&east, "ingress")?.to_string()}]);
    let west = start(&west_tunnelled(&pki, endpoints))?;
    let egress = address(&west, "egress-strict")?;
    for i in 0..20 {
        let payload = format!("order #{i}");
        assert_eq!(
            call(&pki, egress, CART, payload.as_bytes()).await?,
            payload.as_bytes()
        );
        assert_eq!(backend.next_caller().await?, CART);
    }
    let mut calls = Vec::new();
    for i in 0..20 {
        let pki = pki.clone();
        calls.push(tokio::spawn(async move {
            let payload = format!("parallel #{i}");
            let back = call(&pki, egress, CART, payload.as_bytes()).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(back == payload.as_bytes())
        }));
    }
    for call in calls {
        assert!(call.await??, "a parallel call got another's bytes");
    }
    for _ in 0..20 {
        assert_eq!(backend.next_caller().await?, CART);
    }
    let inn = stats(&east, "ingress");
    assert_eq!((inn.tunnels, inn.tunnel_streams), (1, 40), "{inn:?}");
    // The tunnel connection and its forty streams.
    assert_eq!(inn.accepted, 41, "{inn:?}");
    assert_eq!(inn.peer_identities.get(CART), Some(&40), "{inn:?}");
    let out = stats(&west, "egress-strict");
    assert_eq!((out.tunnels, out.tunnel_streams), (1, 40), "{out:?}");
    assert!(out.bytes_client_to_upstream > 0 && inn.bytes_client_to_upstream > 0);
    Ok(())
}

/// Over the tunnel as per connection: a zone whose backend is dead answers
/// that it cannot open the service and west opens the next zone before any
/// client byte moved; a caller the peer's rules deny is refused once,
/// finally, ejecting no one; refusals leave the tunnel up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_streams_cost_no_client_connection_and_keep_the_tunnel() -> TestResult {
    let pki = Pki::new();
    let down = start(&east_config(&pki, dead_address()?, 10_000))?;
    let mut backend = Backend::start().await?;
    let up = start(&east_config(&pki, backend.address, 10_000))?;
    let endpoints = json!([
        {"address": address(&down, "ingress")?.to_string(), "priority": 0},
        {"address": address(&up, "ingress")?.to_string(), "priority": 1},
    ]);
    let mut config = west_tunnelled(&pki, endpoints);
    config["clusters"][0]["outlier_detection"] = json!({"consecutive_failures": 0});
    let west = start(&config)?;
    let egress = address(&west, "egress-strict")?;
    for i in 0..5 {
        let payload = format!("order #{i}");
        assert_eq!(
            call(&pki, egress, CART, payload.as_bytes()).await?,
            payload.as_bytes()
        );
        assert_eq!(backend.next_caller().await?, CART);
    }
    assert_eq!(west.cluster_stats()["east"].connect_failures, 5);
    let refused = stats(&down, "ingress");
    assert_eq!(
        (
            refused.tunnels,
            refused.tunnel_streams,
            refused.upstream_connect_failures
        ),
        (1, 5, 5),
        "{refused:?}"
    );
    assert_eq!(stats(&west, "egress-strict").upstream_connect_failures, 0);

    // The intruder: east's first rule denies it; not retried at the next zone.
    let intruder = client(
        &pki.west,
        WEST_GW,
        Some(&pki.west.svid(INTRUDER)),
        &[],
        false,
    )?;
    let mut stream = connect(&intruder, egress, "egress").await?;
    stream.write_all(b"steal").await?;
    refusal(stream).await?;
    assert_eq!(stats(&down, "ingress").denied, 1);
    assert_eq!(
        stats(&up, "ingress").denied,
        0,
        "a refused caller was retried"
    );
    assert_eq!(stats(&west, "egress-strict").denied, 1);
    assert!(backend.untouched());
    // Still one tunnel to each zone.
    assert_eq!(
        (
            stats(&down, "ingress").tunnels,
            stats(&up, "ingress").tunnels
        ),
        (1, 1)
    );
    Ok(())
}

/// A stream whose client reads nothing fills its own window; the others on
/// the same tunnel connection go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_does_not_block_the_others() -> TestResult {
    let pki = Pki::new();
    let mut backend = Backend::start().await?;
    let east = start(&east_config(&pki, backend.address, 10_000))?;
    let endpoints = json!([{"address": address(&east, "ingress")?.to_string()}]);
    let west = start(&west_tunnelled(&pki, endpoints))?;
    let egress = address(&west, "egress-strict")?;
    let workload = client(&pki.west, WEST_GW, Some(&pki.west.svid(CART)), &[], false)?;
    let mut stalled = connect(&workload, egress, "egress").await?;
    // 64 MiB echoed back at a client that never reads. Loopback sockets
    // autotune to several MiB each, and the stalled stream crosses four of
    // them each way besides its windows: 8 MiB once fitted in them all.
    let bulk = vec![7u8; 64 * 1024 * 1024];
    let writer = tokio::spawn(async move {
        let _ = stalled.write_all(&bulk).await;
        stalled
    });
    assert_eq!(backend.next_caller().await?, CART);
    for i in 0..3 {
        let payload = format!("order #{i}");
        assert_eq!(
            call(&pki, egress, CART, payload.as_bytes()).await?,
            payload.as_bytes()
        );
        assert_eq!(backend.next_caller().await?, CART);
    }
    assert!(
        !writer.is_finished(),
        "the stalled client could write everything"
    );
    assert_eq!(stats(&east, "ingress").tunnels, 1);
    writer.abort();
    Ok(())
}

/// An apply that changes the ingress's TLS settings: the tunnel made with
/// the old ones carries its open stream on, the next stream is sent to a new
/// tunnel connection (no failure of the endpoint); once west's gateway is no
/// longer trusted, no stream opens at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outdated_tunnel_is_drained_and_the_next_stream_meets_the_new_settings() -> TestResult {
    let pki = Pki::new();
    let mut backend = Backend::start().await?;
    let mut config = east_config(&pki, backend.address, 10_000);
    let east = start(&config)?;
    let endpoints = json!([{"address": address(&east, "ingress")?.to_string()}]);
    let west = start(&west_tunnelled(&pki, endpoints))?;
    let egress = address(&west, "egress-strict")?;
    let workload = client(&pki.west, WEST_GW, Some(&pki.west.svid(CART)), &[], false)?;
    let mut open = connect(&workload, egress, "egress").await?;
    assert_eq!(echo(&mut open, b"before").await?, b"before");
    assert_eq!(backend.next_caller().await?, CART);

    // A third trust domain: new server configs on every terminate listener.
    let third = zones::test_certs::TestDomain::new("third.mesh");
    config["trust_bundles"]["third.mesh"] = json!(third.bundle_pem());
    east.apply(config.to_string().as_bytes())?;
    assert_eq!(call(&pki, egress, CART, b"after").await?, b"after");
    assert_eq!(backend.next_caller().await?, CART);
    assert_eq!(echo(&mut open, b"still open").await?, b"still open");
    assert_eq!(stats(&east, "ingress").tunnels, 2);
    assert_eq!(west.cluster_stats()["east"].connect_failures, 0);

    config["listeners"][0]["trusted_gateways"] = json!([]);
    east.apply(config.to_string().as_bytes())?;
    let mut refused = connect(&workload, egress, "egress").await?;
    refused.write_all(b"order").await?;
    refusal(refused).await?;
    assert!(backend.untouched());
    Ok(())
}

/// An ingress that does not negotiate the tunnel (an older one) is served
/// per connection with what it does negotiate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_without_the_tunnel_is_served_per_connection() -> TestResult {
    let pki = Pki::new();
    let (older, mut first_bytes) = older_ingress(&pki).await?;
    let west = start(&west_tunnelled(
        &pki,
        json!([{"address": older.to_string()}]),
    ))?;
    let egress = address(&west, "egress-strict")?;
    for payload in [&b"hello"[..], b"again"] {
        assert_eq!(call(&pki, egress, CART, payload).await?, payload);
        let first = timeout(IO_TIMEOUT, first_bytes.recv()).await?;
        assert_eq!(
            first.as_deref(),
            Some(payload),
            "the older ingress got no plain bytes"
        );
    }
    let out = stats(&west, "egress-strict");
    assert_eq!((out.tunnels, out.tunnel_streams), (0, 0), "{out:?}");
    Ok(())
}

/// A trusted gateway's tunnel carrying requests no meshfed gateway sends:
/// each is refused on its own stream with a reason, counted, and the
/// connection goes on serving honest streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_streams_are_refused_one_by_one_and_the_tunnel_lives_on() -> TestResult {
    let pki = Pki::new();
    let mut backend = Backend::start().await?;
    let east = start(&east_config(&pki, backend.address, 10_000))?;
    let ingress = address(&east, "ingress")?;
    let gateway = client(
        &pki.east,
        EAST_GW,
        Some(&pki.west.svid(WEST_GW)),
        &[TUNNEL_ALPN],
        false,
    )?;
    let tls = connect(&gateway, ingress, "anything").await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(TUNNEL_ALPN));
    let (mut send, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = |method: Method, uri: &str, callers: &[&str]| {
        let mut request = Request::builder().method(method).uri(uri);
        for caller in callers {
            request = request.header("meshfed-caller", *caller);
        }
        request.body(Empty::<Bytes>::new())
    };
    let long = format!("{}:1", "a".repeat(300));
    let cases = [
        (
            request(Method::GET, "https://x/", &[])?,
            StatusCode::BAD_REQUEST,
            "not GET",
        ),
        (
            request(Method::CONNECT, &long, &[])?,
            StatusCode::BAD_REQUEST,
            "longer than 255",
        ),
        (
            request(Method::CONNECT, &format!("{SNI}:1"), &[CART, CART])?,
            StatusCode::BAD_REQUEST,
            "more than once",
        ),
        (
            request(
                Method::CONNECT,
                &format!("{SNI}:1"),
                &["spiffe://east.mesh/ns/shop/sa/cart"],
            )?,
            StatusCode::FORBIDDEN,
            "denied",
        ),
        (
            request(Method::CONNECT, &format!("{SNI}:1"), &["not an id"])?,
            StatusCode::FORBIDDEN,
            "denied",
        ),
        (
            request(Method::CONNECT, &format!("{SNI}:1"), &[INTRUDER])?,
            StatusCode::FORBIDDEN,
            "denied",
        ),
        (
            request(Method::CONNECT, "elsewhere.east.mesh:1", &[CART])?,
            StatusCode::SERVICE_UNAVAILABLE,
            "no route",
        ),
    ];
    for (request, status, reason) in cases {
        let response = timeout(IO_TIMEOUT, send.send_request(request)).await??;
        assert_eq!(response.status(), status);
        let said = response
            .headers()
            .get("meshfed-reason")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        assert!(said.contains(reason), "{said:?} lacks {reason:?}");
    }
    let inn = stats(&east, "ingress");
    assert_eq!(inn.denied, 3, "{inn:?}");
    assert_eq!(
        inn.denied_by_trust_domain.get("west.mesh"),
        Some(&3),
        "{inn:?}"
    );
    assert_eq!(reason(&inn, "malformed"), 3, "{inn:?}");
    assert!(backend.untouched());

    // The same connection still opens an honest stream, end to end.
    let response = send
        .send_request(request(Method::CONNECT, &format!("{SNI}:1"), &[CART])?)
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = TokioIo::new(hyper::upgrade::on(response).await?);
    stream.write_all(b"order").await?;
    let mut back = [0u8; 5];
    timeout(IO_TIMEOUT, stream.read_exact(&mut back)).await??;
    assert_eq!(&back, b"order");
    assert_eq!(backend.next_caller().await?, CART);
    assert_eq!(stats(&east, "ingress").tunnels, 1);
    Ok(())
}

/// Opens a stream on a hand-driven h2 connection as a west gateway would.
async fn open_h2(
    send: &h2::client::SendRequest<Bytes>,
) -> Res<(h2::SendStream<Bytes>, h2::RecvStream)> {
    let mut send = send.clone().ready().await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{SNI}:1"))
        .header("meshfed-caller", CART)
        .body(())?;
    let (response, stream) = send.send_request(request, false)?;
    let response = timeout(IO_TIMEOUT, response).await??;
    assert_eq!(response.status(), StatusCode::OK);
    Ok((stream, response.into_body()))
}

/// Sends `payload` on a stream and reads the backend's echo of it.
async fn echo_h2(
    stream: &mut (h2::SendStream<Bytes>, h2::RecvStream),
    payload: &'static [u8],
) -> Res<Vec<u8>> {
    stream.0.send_data(Bytes::from_static(payload), false)?;
    let mut got = Vec::new();
    while got.len() < payload.len() {
        let data = timeout(IO_TIMEOUT, stream.1.data())
            .await?
            .ok_or("the stream ended")??;
        stream.1.flow_control().release_capacity(data.len())?;
        got.extend_from_slice(&data);
    }
    Ok(got)
}

/// A trusted gateway that misuses its tunnel harms only itself: a stream
/// it resets mid-flight with an error has its upstream closed and its place
/// under the listener's cap given back while a stream beside it is served
/// on; a flood of empty DATA frames (h2's budget for them) ends that
/// gateway's connection, and a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_resets_or_floods_streams_harms_only_itself() -> TestResult {
    let pki = Pki::new();
    let backend = Backend::start().await?;
    let east = start(&east_config(&pki, backend.address, 10_000))?;
    let ingress = address(&east, "ingress")?;
    let gateway = client(
        &pki.east,
        EAST_GW,
        Some(&pki.west.svid(WEST_GW)),
        &[TUNNEL_ALPN],
        false,
    )?;
    let tunnel = || async {
        let tls = connect(&gateway, ingress, "anything").await?;
        let (send, connection) = h2::client::handshake(tls).await?;
        tokio::spawn(connection);
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(send)
    };
    let send = tunnel().await?;

    let mut beside = open_h2(&send).await?;
    assert_eq!(
        echo_h2(&mut beside, b"beside, first").await?,
        b"beside, first"
    );
    let mut reset = open_h2(&send).await?;
    assert_eq!(echo_h2(&mut reset, b"doomed").await?, b"doomed");
    reset.0.send_reset(h2::Reason::PROTOCOL_ERROR);
    assert_eq!(
        echo_h2(&mut beside, b"beside, second").await?,
        b"beside, second"
    );
    // The reset stream's connection to the backend is closed and counted;
    // open are the tunnel connection and the stream beside.
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    loop {
        let inn = stats(&east, "ingress");
        if inn.active == 2 && inn.closed == 1 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("the reset stream is still open: {inn:?}").into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let mut flooded = open_h2(&send).await?;
    for _ in 0..1_000 {
        if flooded.0.send_data(Bytes::new(), false).is_err() {
            break;
        }
    }
    assert!(
        echo_h2(&mut flooded, b"after the flood").await.is_err(),
        "an empty-frame flood must end the flooding connection"
    );
    let mut again = open_h2(&tunnel().await?).await?;
    assert_eq!(
        echo_h2(&mut again, b"a new connection").await?,
        b"a new connection"
    );
    assert_eq!(stats(&east, "ingress").tunnels, 2);
    Ok(())
}
