//! Endpoint selection, as pure functions over endpoint views: locality
//! priority levels (Envoy's overprovisioning algorithm), smooth weighted
//! round robin, power-of-two-choices over peak-EWMA cost, and Maglev.
//!
//! Nothing here does I/O or reads a clock, so the laws of each policy are
//! property-tested below.

use std::sync::atomic::{AtomicU64, Ordering};

/// Envoy's overprovisioning factor: a level whose healthy share is at least
/// 1/1.4 ≈ 71 % still takes all of its load.
pub(crate) const OVERPROVISIONING: f64 = 1.4;

/// Maglev lookup table size (a prime, as the paper requires).
pub(crate) const MAGLEV_TABLE_SIZE: usize = 65537;

/// A fast, non-cryptographic random number (splitmix64 over a global
/// counter). Good enough to spread load; never used for security.
pub(crate) fn random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let mut z = STATE
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, 64 bit, with a seed: stable across processes and versions, so
/// every gateway replica builds the same Maglev table.
pub(crate) fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche (FNV alone mixes the last bytes poorly).
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

/// Percent of load (summing to 100) each priority level receives, given
/// `(healthy, total)` endpoints per level in priority order.
///
/// Each level's health is `min(100, 1.4 × 100 × healthy / total)`; load
/// fills levels in order up to their health. When the levels together are
/// less than 100 % healthy, load is spread in proportion to health; when
/// nothing is healthy at all, everything goes to the first level (panic).
pub(crate) fn priority_loads(levels: &[(usize, usize)]) -> Vec<u32> {
    let health: Vec<u32> = levels
        .iter()
        .map(|&(healthy, total)| {
            if total == 0 {
                return 0;
            }
            let pct = OVERPROVISIONING * 100.0 * healthy as f64 / total as f64;
            pct.min(100.0) as u32
        })
        .collect();
    let mut loads = vec![0u32; levels.len()];
    let sum: u32 = health.iter().sum();
    if sum == 0 {
        if let Some(first) = loads.first_mut() {
            *first = 100;
        }
        return loads;
    }
    if sum >= 100 {
        let mut remaining = 100u32;
        for (load, h) in loads.iter_mut().zip(&health) {
            *load = remaining.min(*h);
            remaining -= *load;
        }
    } else {
        // Normalize; the rounding remainder goes to the first healthy level.
        let mut given = 0;
        for (load, h) in loads.iter_mut().zip(&health) {
            *load = h * 100 / sum;
            given += *load;
        }
        if let Some(i) = health.iter().position(|h| *h > 0) {
            loads[i] += 100 - given;
        }
    }
    loads
}

/// The level a connection goes to, given the loads and a roll in `0..100`.
pub(crate) fn pick_level(loads: &[u32], roll: u64) -> usize {
    let mut point = (roll % 100) as u32;
    for (i, load) in loads.iter().enumerate() {
        if point < *load {
            return i;
        }
        point -= load;
    }
    0
}

/// Smooth weighted round robin (nginx): every candidate's current weight
/// grows by its weight, the largest is picked and pays back the total.
/// `current[i]` is the running state of `candidates[i]`.
pub(crate) fn smooth_wrr(weights: &[u32], current: &mut [i64]) -> Option<usize> {
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    let mut best: Option<(usize, i64)> = None;
    for (i, (w, c)) in weights.iter().zip(current.iter_mut()).enumerate() {
        *c += i64::from(*w);
        if best.is_none_or(|(_, top)| *c > top) {
            best = Some((i, *c));
        }
    }
    let (best, _) = best?;
    if let Some(c) = current.get_mut(best) {
        *c -= total;
    }
    Some(best)
}

/// Power of two choices: of two distinct random candidates, the one with
/// the lower cost. `costs[i]` is the cost of candidate `i`.
pub(crate) fn p2c(costs: &[f64], roll_a: u64, roll_b: u64) -> Option<usize> {
    let n = costs.len();
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = (roll_a % n as u64) as usize;
            // A second index distinct from the first.
            let b = (a + 1 + (roll_b % (n as u64 - 1)) as usize) % n;
            let (ca, cb) = (costs.get(a)?, costs.get(b)?);
            Some(if cb < ca { b } else { a })
        }
    }
}

/// Peak-EWMA cost of an endpoint (linkerd2-proxy, Finagle): latency
/// estimate times outstanding work.
pub(crate) fn p2c_cost(ewma_us: f64, active: u64) -> f64 {
    ewma_us.max(1.0) * (active as f64 + 1.0)
}

/// Builds a Maglev lookup table: entry `k` is an index into `names`.
/// Each name's permutation comes from two seeded hashes of it, so the same
/// names build the same table everywhere.
pub(crate) fn maglev_table(names: &[&[u8]], size: usize) -> Vec<u16> {
    let n = names.len();
    if n == 0 || size == 0 {
        return Vec::new();
    }
    let m = size as u64;
    let perms: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = fnv1a(0x6d61_676c_6576_0001, name) % m;
            let skip = fnv1a(0x6d61_676c_6576_0002, name) % (m - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut table = vec![u16::MAX; size];
    let mut filled = 0;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let mut slot = ((offset + next[i] * skip) % m) as usize;
            while table[slot] != u16::MAX {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % m) as usize;
            }
            table[slot] = i as u16;
            next[i] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

/// Looks `key` up in a Maglev table, walking forward past entries that
/// `usable` rejects. `None` only when no entry is usable.
pub(crate) fn maglev_lookup(
    table: &[u16],
    key: u64,
    usable: impl Fn(usize) -> bool,
) -> Option<usize> {
    let size = table.len();
    if size == 0 {
        return None;
    }
    let start = (key % size as u64) as usize;
    (0..size)
        .filter_map(|step| table.get((start + step) % size))
        .map(|&i| usize::from(i))
        .find(|&i| usable(i))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn priority_loads_follow_envoy() {
        // All healthy: everything local.
        assert_eq!(priority_loads(&[(10, 10), (10, 10)]), vec![100, 0]);
        // 80 % healthy × 1.4 ≥ 100: still everything local.
        assert_eq!(priority_loads(&[(8, 10), (10, 10)]), vec![100, 0]);
        // 50 % healthy → 70 % local, 30 % spills.
        assert_eq!(priority_loads(&[(5, 10), (10, 10)]), vec![70, 30]);
        // Local dead: all to the next level.
        assert_eq!(priority_loads(&[(0, 3), (2, 2), (2, 2)]), vec![0, 100, 0]);
        // Nothing healthy anywhere: panic to the first level.
        assert_eq!(priority_loads(&[(0, 3), (0, 2)]), vec![100, 0]);
        // Partly healthy overall: normalized.
        assert_eq!(priority_loads(&[(1, 10), (1, 10)]), vec![50, 50]);
    }

    #[test]
    fn smooth_wrr_interleaves() {
        let mut current = vec![0; 3];
        let picks: Vec<usize> = (0..7)
            .filter_map(|_| smooth_wrr(&[5, 1, 1], &mut current))
            .collect();
        // nginx's documented sequence for weights 5,1,1.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn maglev_table_is_full_and_balanced() {
        let names: Vec<Vec<u8>> = (0..5)
            .map(|i| format!("10.0.0.{i}:80").into_bytes())
            .collect();
        let refs: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
        let table = maglev_table(&refs, MAGLEV_TABLE_SIZE);
        let mut counts = [0usize; 5];
        for e in &table {
            counts[usize::from(*e)] += 1;
        }
        let ideal = MAGLEV_TABLE_SIZE / 5;
        for c in counts {
            assert!(c.abs_diff(ideal) <= ideal / 50, "{counts:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Loads always sum to 100 and never go to a level before a lower
        /// one is full (failover order).
        #[test]
        fn failover_order_holds(levels in prop::collection::vec((0usize..6, 1usize..6), 1..5)) {
            let levels: Vec<(usize, usize)> =
                levels.into_iter().map(|(h, t)| (h.min(t), t)).collect();
            let loads = priority_loads(&levels);
            prop_assert_eq!(loads.iter().sum::<u32>(), 100);
            let health: Vec<u32> = levels
                .iter()
                .map(|&(h, t)| (OVERPROVISIONING * 100.0 * h as f64 / t as f64).min(100.0) as u32)
                .collect();
            if health.iter().sum::<u32>() >= 100 {
                // A level gets load only once every earlier level is at its health.
                for i in 0..levels.len() {
                    if loads[i] > 0 {
                        for j in 0..i {
                            prop_assert_eq!(loads[j], health[j]);
                        }
                    }
                }
            }
            // A fully healthy first level takes everything.
            if levels[0].0 == levels[0].1 {
                prop_assert_eq!(loads[0], 100);
            }
        }

        /// Smooth WRR gives each candidate exactly its share over a cycle.
        #[test]
        fn weights_converge_to_shares(weights in prop::collection::vec(1u32..10, 1..6)) {
            let total: u32 = weights.iter().sum();
            let mut current = vec![0; weights.len()];
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..total * 3 {
                let i = smooth_wrr(&weights, &mut current).unwrap_or(usize::MAX);
                prop_assert!(i < weights.len());
                counts[i] += 1;
            }
            for (c, w) in counts.iter().zip(&weights) {
                prop_assert_eq!(*c, w * 3);
            }
        }

        /// P2C never returns the worse of its two choices, and never an
        /// index outside the candidates.
        #[test]
        fn p2c_picks_the_cheaper_of_two(costs in prop::collection::vec(0.0f64..1e6, 1..8), a: u64, b: u64) {
            let i = p2c(&costs, a, b).unwrap_or(usize::MAX);
            prop_assert!(i < costs.len());
            if costs.len() >= 2 {
                let n = costs.len() as u64;
                let first = (a % n) as usize;
                let second = (first + 1 + (b % (n - 1)) as usize) % costs.len();
                prop_assert!(costs[i] <= costs[first].min(costs[second]) + f64::EPSILON);
            }
        }

        /// Maglev lookups skip unusable entries: an ejected endpoint is
        /// never picked while a usable one exists.
        #[test]
        fn maglev_never_picks_an_unusable_endpoint(n in 2usize..8, dead in 0usize..8, key: u64) {
            let dead = dead % n;
            let names: Vec<Vec<u8>> = (0..n).map(|i| format!("e{i}").into_bytes()).collect();
            let refs: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
            let table = maglev_table(&refs, 257);
            let pick = maglev_lookup(&table, key, |i| i != dead);
            prop_assert!(pick.is_some_and(|i| i != dead && i < n));
        }
    }

    /// Removing one of N endpoints moves about 1/N of the keys (plus a
    /// little Maglev churn), not a full reshuffle.
    #[test]
    fn maglev_moves_about_one_nth_when_an_endpoint_leaves() {
        for n in [3usize, 5, 10] {
            let names: Vec<Vec<u8>> = (0..n)
                .map(|i| format!("10.1.0.{i}:8443").into_bytes())
                .collect();
            let all: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
            let before = maglev_table(&all, MAGLEV_TABLE_SIZE);
            let gone = n / 2;
            let rest: Vec<&[u8]> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != gone)
                .map(|(_, name)| *name)
                .collect();
            let after = maglev_table(&rest, MAGLEV_TABLE_SIZE);
            let name_before = |k: usize| all[usize::from(before[k])];
            let name_after = |k: usize| rest[usize::from(after[k])];
            let moved = (0..MAGLEV_TABLE_SIZE)
                .filter(|&k| name_before(k) != name_after(k))
                .count();
            let share = moved as f64 / MAGLEV_TABLE_SIZE as f64;
            let ideal = 1.0 / n as f64;
            assert!(
                share >= ideal * 0.95 && share <= ideal * 1.6,
                "n={n}: moved {share:.3}, ideal {ideal:.3}"
            );
        }
    }
}
