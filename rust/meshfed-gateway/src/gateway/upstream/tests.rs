//! Picks, failover, outlier ejection and state carried across generations.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use proptest::prelude::*;

use super::{ClusterState, Previous};
use crate::config::{ClusterSpec, EndpointSpec, Lb, OutlierSpec};
use crate::gateway::clock;
use crate::gateway::retired::Retired;

fn spec(lb: Lb, endpoints: &[(u32, u32)]) -> ClusterSpec {
    ClusterSpec {
        name: "c".into(),
        endpoints: endpoints
            .iter()
            .enumerate()
            .map(|(i, &(weight, priority))| EndpointSpec {
                address: SocketAddr::from(([192, 0, 2, i as u8], 80)),
                weight,
                priority,
                tls: None,
            })
            .collect(),
        connect_timeout: Duration::from_secs(1),
        lb,
        idle_timeout: None,
        outlier: OutlierSpec {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(60),
            max_ejection: Duration::from_secs(600),
            max_ejection_percent: 100,
        },
        health_check: None,
        max_connections: None,
        max_pending: None,
    }
}

fn state(spec: &ClusterSpec) -> ClusterState {
    ClusterState::build(
        spec,
        &mut Previous {
            clusters: &HashMap::new(),
            retired: &mut Retired::new(),
        },
    )
}

const LBS: [Lb; 4] = [
    Lb::RoundRobin,
    Lb::WeightedRoundRobin,
    Lb::LeastRequest,
    Lb::Maglev,
];

#[test]
fn never_ejects_the_last_healthy_endpoint() {
    let spec = spec(Lb::RoundRobin, &[(1, 0), (1, 0)]);
    let state = state(&spec);
    let now = clock::now();
    state.record_failure(&spec, 0, now);
    state.record_failure(&spec, 1, now);
    assert!(!state.endpoints[0].healthy(now));
    assert!(
        state.endpoints[1].healthy(now),
        "last healthy endpoint ejected"
    );
}

/// How long endpoint `i` of `state` stays ejected from now on.
fn ejection_left(state: &ClusterState, i: usize) -> Duration {
    let until = state.endpoints[i].ejected_until.load(Ordering::Relaxed);
    Duration::from_nanos(until.saturating_sub(clock::now_nanos()))
}

/// Whether `pick` returns endpoint `i` within 8 tries (round robin over
/// two endpoints returns each healthy one every other pick).
fn picked(spec: &ClusterSpec, state: &ClusterState, i: usize) -> bool {
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    (0..8).any(|_| state.pick(spec, ip, &[], clock::now()) == Some(i))
}

#[test]
fn ejection_respects_max_percent() {
    let mut spec = spec(Lb::RoundRobin, &[(1, 0), (1, 0), (1, 0), (1, 0)]);
    spec.outlier.max_ejection_percent = 50;
    let state = state(&spec);
    let now = clock::now();
    for i in 0..4 {
        state.record_failure(&spec, i, now);
    }
    let ejected = state.endpoints.iter().filter(|e| e.ejected(now)).count();
    assert_eq!(ejected, 2, "max_ejection_percent 50 of 4");
}

/// On the data plane's (paused) clock: an ejected endpoint is out for
/// exactly its ejection time (base plus under 10 % jitter), back at its
/// end and not a nanosecond before; ejected again, it stays out twice
/// as long; a success after its return halves the next ejection again.
#[tokio::test(start_paused = true)]
async fn ejected_endpoint_returns_exactly_when_its_ejection_ends() {
    let spec = spec(Lb::RoundRobin, &[(1, 0), (1, 0)]);
    let base = spec.outlier.base_ejection;
    let state = state(&spec);
    let eject = |state: &ClusterState| state.record_failure(&spec, 0, clock::now());

    eject(&state);
    let first = ejection_left(&state, 0);
    assert!(first >= base && first < base + base / 10, "{first:?}");
    tokio::time::advance(first - Duration::from_millis(1)).await;
    assert!(!state.endpoints[0].healthy(clock::now()));
    assert!(!picked(&spec, &state, 0), "picked while ejected");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(state.endpoints[0].healthy(clock::now()), "not back on time");
    assert!(picked(&spec, &state, 0), "not picked once back");

    eject(&state);
    let second = ejection_left(&state, 0);
    assert!(
        second >= base * 2 && second < (base * 2) + base / 5,
        "{second:?}"
    );
    tokio::time::advance(second - Duration::from_nanos(1)).await;
    assert!(
        !state.endpoints[0].healthy(clock::now()),
        "back a nanosecond early"
    );
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert!(state.endpoints[0].healthy(clock::now()));

    state.record_success(0, Duration::from_millis(1), clock::now());
    eject(&state);
    let third = ejection_left(&state, 0);
    assert!(
        third >= base * 2 && third < (base * 2) + base / 5,
        "{third:?}"
    );
    let ejections =
        state.snapshot(&spec).endpoints[&spec.endpoints[0].address.to_string()].ejections;
    assert_eq!(ejections, 3);
}

#[test]
fn state_carries_over_by_endpoint_key() {
    let a = spec(Lb::RoundRobin, &[(1, 0), (1, 0)]);
    let old = Arc::new(state(&a));
    old.record_failure(&a, 1, clock::now());
    let clusters = HashMap::from([(Arc::from("c"), old.clone())]);
    let mut b = spec(Lb::LeastRequest, &[(1, 0)]);
    b.endpoints[0].address = a.endpoints[1].address;
    let new = ClusterState::build(
        &b,
        &mut Previous {
            clusters: &clusters,
            retired: &mut Retired::new(),
        },
    );
    assert!(Arc::ptr_eq(&new.endpoints[0], &old.endpoints[1]));
    assert!(Arc::ptr_eq(&new.shared, &old.shared));
}

/// An endpoint dropped by one generation and a cluster dropped by the
/// next come back, later, as the same state: counters and gauges go on.
#[test]
fn removed_endpoints_and_clusters_come_back_with_their_state() {
    let a = spec(Lb::RoundRobin, &[(1, 0), (1, 0)]);
    let mut retired = Retired::new();
    let first = Arc::new(state(&a));
    first.record_failure(&a, 0, clock::now());
    let mut b = spec(Lb::RoundRobin, &[(1, 0)]);
    b.endpoints[0].address = a.endpoints[1].address;
    let clusters = HashMap::from([(Arc::from("c"), first.clone())]);
    let second = Arc::new(ClusterState::build(
        &b,
        &mut Previous {
            clusters: &clusters,
            retired: &mut retired,
        },
    ));
    first.retire_into("c", Some(&second), &mut retired);
    assert_eq!(retired.endpoints.len(), 1);
    // The cluster goes away altogether.
    second.retire_into("c", None, &mut retired);
    let third = ClusterState::build(
        &a,
        &mut Previous {
            clusters: &HashMap::new(),
            retired: &mut retired,
        },
    );
    assert!(Arc::ptr_eq(&third.shared, &first.shared));
    assert!(Arc::ptr_eq(&third.endpoints[0], &first.endpoints[0]));
    assert!(Arc::ptr_eq(&third.endpoints[1], &first.endpoints[1]));
    assert_eq!(third.snapshot(&a).connect_failures, 1);
    assert_eq!(retired.endpoints.len() + retired.clusters.len(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever the policy, an ejected endpoint is never picked while a
    /// healthy one exists, and the pick respects failover order: never a
    /// lower-priority level while the local one is fully healthy.
    #[test]
    fn never_picks_an_ejected_endpoint(
        lb in 0usize..4,
        endpoints in prop::collection::vec((1u32..5, 0u32..3), 2..7),
        dead in prop::collection::vec(any::<bool>(), 7),
        source: u32,
    ) {
        let spec = spec(LBS[lb], &endpoints);
        let state = state(&spec);
        let now = clock::now();
        for (i, e) in state.endpoints.iter().enumerate() {
            if dead[i] {
                let until = clock::to_nanos(now + Duration::from_secs(60));
                e.ejected_until.store(until, Ordering::Relaxed);
            }
        }
        let any_healthy = state.endpoints.iter().any(|e| e.healthy(now));
        let top = endpoints.iter().map(|e| e.1).min().unwrap_or(0);
        let top_all_healthy = endpoints
            .iter()
            .zip(&dead)
            .all(|(e, d)| e.1 != top || !d);
        for _ in 0..20 {
            let ip = IpAddr::V4(Ipv4Addr::from(source));
            let pick = state.pick(&spec, ip, &[], now);
            prop_assert!(pick.is_some());
            let i = pick.unwrap_or(0);
            if any_healthy {
                prop_assert!(state.endpoints[i].healthy(now));
            }
            if top_all_healthy {
                prop_assert_eq!(endpoints[i].1, top);
            }
        }
    }

    /// Weighted round robin converges to the configured shares.
    #[test]
    fn wrr_converges_to_weights(weights in prop::collection::vec(1u32..6, 1..5)) {
        let endpoints: Vec<(u32, u32)> = weights.iter().map(|w| (*w, 0)).collect();
        let spec = spec(Lb::WeightedRoundRobin, &endpoints);
        let state = state(&spec);
        let total: u32 = weights.iter().sum();
        let mut counts = vec![0u32; weights.len()];
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        for _ in 0..total * 4 {
            let i = state.pick(&spec, ip, &[], clock::now()).unwrap_or(usize::MAX);
            prop_assert!(i < weights.len());
            counts[i] += 1;
        }
        for (c, w) in counts.iter().zip(&weights) {
            prop_assert_eq!(*c, w * 4);
        }
    }
}

#[test]
fn maglev_is_sticky_per_source() {
    let spec = spec(Lb::Maglev, &[(1, 0), (1, 0), (1, 0)]);
    let state = state(&spec);
    for source in 0..50u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(source));
        let first = state.pick(&spec, ip, &[], clock::now());
        for _ in 0..5 {
            assert_eq!(state.pick(&spec, ip, &[], clock::now()), first);
        }
    }
}
