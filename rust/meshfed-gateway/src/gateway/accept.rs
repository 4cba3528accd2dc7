//! Accepting a listener's connections: its caps (`limits`), and accept
//! errors, each counted, and logged at most once per interval.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use super::clock::{self, Instant};
use super::connection;
use super::snapshot::Snapshot;
use super::stats::{ConnectionGuard, HandshakeSlot, ListenerStats, inc};
use crate::config::ListenerLimits;

/// Pause after a failed `accept()` (e.g. out of file descriptors), so a
/// listener that cannot accept does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// At most one warning per this, per listener and kind, for accept errors
/// and refusals over a cap: an fd exhaustion retries 20 times a second and a
/// flood refuses thousands a second, and either would drown the log.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Accepts connections until aborted; each one admitted gets the snapshot
/// current at accept time and its own task.
pub(super) async fn accept_loop(
    listener: TcpListener,
    name: Arc<str>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    stats: Arc<ListenerStats>,
) {
    let mut limits = CurrentLimits::default();
    let mut accept_errors = Throttle::default();
    let mut over_connections = Throttle::default();
    let mut over_handshakes = Throttle::default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let current = snapshot.load_full();
                let caps = limits.of(&current, &name);
                match admit(caps, &stats) {
                    Ok((guard, slot)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(connection::serve(
                            stream,
                            peer,
                            name.clone(),
                            current,
                            snapshot.clone(),
                            guard,
                            slot,
                        ));
                    }
                    // Closed at once (dropping the stream), so the kernel's
                    // backlog keeps draining and the fd comes back now.
                    Err(Refused::Connections(max)) => {
                        if let Some(more) = over_connections.ready(clock::now()) {
                            tracing::warn!(
                                listener = %name, max_connections = max, refused_since_last = more,
                                "connection refused: the listener has limits.max_connections open \
                                 — raise it if this is real traffic, or find the client holding them"
                            );
                        }
                    }
                    Err(Refused::Handshakes(max)) => {
                        if let Some(more) = over_handshakes.ready(clock::now()) {
                            tracing::warn!(
                                listener = %name, max_handshakes = max, refused_since_last = more,
                                "connection refused: the listener has limits.max_handshakes \
                                 unfinished handshakes — clients connecting without completing TLS \
                                 (a scan or a flood), or raise it if honest clients reconnect in bursts"
                            );
                        }
                    }
                }
            }
            Err(e) => {
                inc(&stats.accept_errors);
                if let Some(more) = accept_errors.ready(clock::now()) {
                    tracing::warn!(
                        listener = %name, error = %e, failed_since_last = more,
                        "accept failed{}", accept_hint(&e)
                    );
                }
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// What to check for an `accept()` error.
fn accept_hint(e: &io::Error) -> &'static str {
    // EMFILE (24) and ENFILE (23): the process's or the system's fd table is full.
    match e.raw_os_error() {
        Some(23 | 24) => {
            " — out of file descriptors: raise the process's limit (ulimit -n, LimitNOFILE=) \
             above twice the sum of the listeners' limits.max_connections, or lower those"
        }
        _ => "",
    }
}

/// Why a connection was not admitted, with the cap it hit.
enum Refused {
    Connections(u64),
    Handshakes(u64),
}

/// Admits a connection if the listener is under both caps: counts it open
/// and in its handshake. Only this listener's accept loop admits, so a cap
/// read here cannot be overtaken between the check and the count (closes
/// only lower them).
fn admit(
    limits: Option<ListenerLimits>,
    stats: &Arc<ListenerStats>,
) -> Result<(ConnectionGuard, HandshakeSlot), Refused> {
    // A listener gone from the snapshot is closed by `serve` (and counted there).
    if let Some(limits) = limits {
        if stats.active.load(Ordering::Relaxed) >= limits.max_connections {
            inc(&stats.connections_refused_over_limit);
            return Err(Refused::Connections(limits.max_connections));
        }
        if stats.handshaking.load(Ordering::Relaxed) >= limits.max_handshakes {
            inc(&stats.handshakes_refused_over_limit);
            return Err(Refused::Handshakes(limits.max_handshakes));
        }
    }
    Ok((
        ConnectionGuard::open(stats.clone()),
        HandshakeSlot::take(stats.clone()),
    ))
}

/// The listener's caps in the snapshot last seen, looked up again only
/// when the snapshot changes (a lookup by name, once per generation
/// rather than once per connection).
#[derive(Default)]
struct CurrentLimits {
    seen: Option<Arc<Snapshot>>,
    limits: Option<ListenerLimits>,
}

impl CurrentLimits {
    fn of(&mut self, current: &Arc<Snapshot>, name: &str) -> Option<ListenerLimits> {
        if !self.seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, current)) {
            self.limits = current.config.listener(name).map(|l| l.limits);
            self.seen = Some(current.clone());
        }
        self.limits
    }
}

/// Lets a repeating warning out at most once per [`WARN_INTERVAL`],
/// counting the ones held back so the next says how many there were.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    /// `Some(held back since the last one)` when this one should be logged.
    fn ready(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < WARN_INTERVAL => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tokio::net::TcpStream;

    use super::*;
    use crate::config::CompiledConfig;
    use crate::gateway::retired::Retired;
    use crate::test_certs::TestDomain;

    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    const STEP: Duration = Duration::from_millis(1);

    /// Keeps the paused clock from jumping ahead while the runtime waits on
    /// sockets: tokio does not auto-advance while a blocking task runs. Time
    /// moves only by `advance`. Dropping the sender ends the task.
    fn hold_clock() -> std::sync::mpsc::Sender<()> {
        let (hold, held) = std::sync::mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            let _ = held.recv();
        });
        hold
    }

    /// Moves the paused clock one `STEP` at a time, letting every task and
    /// socket event run between steps, until `done` holds; false if it did
    /// not within `limit` of paused time.
    async fn within(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let mut waited = Duration::ZERO;
        while !done() {
            if waited >= limit {
                return false;
            }
            tokio::time::advance(STEP).await;
            waited += STEP;
        }
        true
    }

    /// Whether the gateway has closed `stream` (without waiting).
    fn closed(stream: &TcpStream) -> bool {
        let mut byte = [0u8; 1];
        match stream.try_read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        }
    }

    /// A terminate listener `in` with room for one unfinished handshake,
    /// served by the real accept loop on this (paused) runtime.
    async fn terminate_listener() -> (std::net::SocketAddr, Arc<ListenerStats>) {
        let east = TestDomain::new("east.mesh");
        let svid = east.svid("spiffe://east.mesh/ns/meshfed-system/sa/gateway");
        let document = json!({
            "identity": {"cert_chain_pem": svid.cert_pem, "private_key_pem": svid.key_pem},
            "trust_bundles": {"east.mesh": east.bundle_pem()},
            "handshake_timeout_ms": HANDSHAKE_TIMEOUT.as_millis() as u64,
            "listeners": [{"name": "in", "address": "127.0.0.1:0", "mode": "terminate",
                           "limits": {"max_connections": 10, "max_handshakes": 1},
                           "routes": [{"sni": "web", "cluster": "web",
                                       "rules": [{"action": "allow", "id": "*"}]}]}],
            "clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1:9"}]}]
        });
        let config = CompiledConfig::from_json(document.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let snapshot = Snapshot::build(config, &Snapshot::empty(), &mut Retired::default());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let stats = ListenerStats::new();
        tokio::spawn(accept_loop(
            listener,
            Arc::from("in"),
            Arc::new(ArcSwap::from_pointee(snapshot)),
            stats.clone(),
        ));
        (address, stats)
    }

    async fn connect(address: std::net::SocketAddr) -> TcpStream {
        TcpStream::connect(address)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"))
    }

    /// On the paused clock: an idle unauthenticated connection holds its
    /// handshake slot (a second one is refused at once) until its handshake
    /// deadline and no longer; then it is closed and the slot is free.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_holds_its_handshake_slot_until_the_deadline() {
        let _hold = hold_clock();
        let (address, stats) = terminate_listener().await;
        let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);

        let idle = connect(address).await;
        assert!(
            within(STEP * 100, || get(&stats.handshaking) == 1).await,
            "never admitted"
        );
        let started = clock::now();

        let refused = connect(address).await;
        assert!(
            within(STEP * 100, || closed(&refused)).await,
            "not closed at once"
        );
        assert_eq!(get(&stats.handshakes_refused_over_limit), 1);
        assert_eq!(
            get(&stats.accepted),
            1,
            "a refused connection is not accepted"
        );

        // Up to just before the deadline the slot stays taken.
        let before = HANDSHAKE_TIMEOUT - STEP * 200 - clock::now().duration_since(started);
        tokio::time::advance(before).await;
        assert!(!closed(&idle), "closed before its handshake deadline");
        assert_eq!(get(&stats.handshaking), 1);

        // Past it, the connection is closed, counted, and its slot free.
        assert!(
            within(STEP * 400, || closed(&idle)).await,
            "outlived its deadline"
        );
        assert!(clock::now().duration_since(started) >= HANDSHAKE_TIMEOUT - STEP * 2);
        assert!(within(STEP * 100, || get(&stats.handshaking) == 0).await);
        assert_eq!(
            stats.snapshot().handshake_failure_reasons.get("timeout"),
            Some(&1)
        );
        let _next = connect(address).await;
        assert!(
            within(STEP * 100, || get(&stats.accepted) == 2).await,
            "slot not freed"
        );
        assert_eq!(get(&stats.handshakes_refused_over_limit), 1);
    }

    #[test]
    fn throttle_lets_one_out_per_interval_and_counts_the_rest() {
        let mut throttle = Throttle::default();
        let start = Instant::now();
        assert_eq!(throttle.ready(start), Some(0));
        assert_eq!(throttle.ready(start + Duration::from_secs(1)), None);
        assert_eq!(throttle.ready(start + WARN_INTERVAL / 2), None);
        assert_eq!(throttle.ready(start + WARN_INTERVAL), Some(2));
        assert_eq!(throttle.ready(start + WARN_INTERVAL * 3), Some(0));
    }
}
