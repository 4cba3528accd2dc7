//! One generation of configuration with the runtime state of its clusters
//! and routes: what a connection reads for its whole life, and what
//! `apply()` builds from the previous generation.

use std::collections::HashMap;
use std::sync::Arc;

use super::limits::RouteState;
use super::retired::Retired;
use super::upstream::{ClusterState, Previous, Tunnels};
use crate::config::{ClusterSpec, CompiledConfig, Delta, RouteKey, route_keys};

/// One generation of configuration plus the runtime state of its clusters
/// and routes. A connection loads it once and keeps it for its whole life.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) config: Arc<CompiledConfig>,
    /// Keyed by shared names, so the next generation copies pointers.
    pub(crate) clusters: HashMap<Arc<str>, Arc<ClusterState>>,
    pub(crate) routes: HashMap<RouteKey, Arc<RouteState>>,
    /// The gateway's tunnel connections to peer gateways: one pool for
    /// every generation, carried by pointer.
    pub(crate) tunnels: Arc<Tunnels>,
}

impl Snapshot {
    pub(crate) fn empty() -> Self {
        Self {
            config: Arc::new(CompiledConfig::empty()),
            clusters: HashMap::new(),
            routes: HashMap::new(),
            tunnels: Arc::default(),
        }
    }

    /// The snapshot for `config`, carrying state over from `previous`:
    /// clusters by name, endpoints by endpoint key, routes by key; names
    /// not in `previous` get back what `retired` kept of them, and what
    /// `previous` had that `config` dropped goes to `retired`.
    pub(crate) fn build(
        config: CompiledConfig,
        previous: &Snapshot,
        retired: &mut Retired,
    ) -> Self {
        let mut carried = Previous {
            clusters: &previous.clusters,
            retired,
        };
        let clusters: HashMap<Arc<str>, Arc<ClusterState>> = config
            .clusters
            .iter()
            .map(|(name, spec)| {
                let state = ClusterState::build(spec, &mut carried);
                (name.clone(), Arc::new(state))
            })
            .collect();
        let retired = carried.retired;
        for (name, old) in &previous.clusters {
            old.retire_into(name, clusters.get(name).map(|c| &**c), retired);
        }
        let mut routes = HashMap::new();
        for listener in &config.listeners {
            for key in route_keys(listener) {
                let state = carry_route(key, previous, retired);
                routes.insert(key.clone(), state);
            }
        }
        for (key, state) in &previous.routes {
            if !routes.contains_key(key) {
                state.forget_buckets();
                retired.routes.retire(key.clone(), state.clone());
            }
        }
        Self {
            config: Arc::new(config),
            clusters,
            routes,
            tunnels: previous.tunnels.clone(),
        }
    }

    /// [`Self::build`] for a patched config, whose changes from
    /// `previous.config` are all named in `delta`: the state of every other
    /// cluster and route is `previous`'s own `Arc` (pointer copies, no
    /// rebuild), and only the touched names are built, carried or retired,
    /// exactly as a full build would do for them.
    pub(crate) fn patched(
        config: CompiledConfig,
        delta: &Delta,
        previous: &Snapshot,
        retired: &mut Retired,
    ) -> Self {
        let mut clusters = previous.clusters.clone();
        for name in &delta.clusters {
            let next = config.clusters.get(name).map(|spec| {
                let mut carried = Previous {
                    clusters: &previous.clusters,
                    retired,
                };
                Arc::new(ClusterState::build(spec, &mut carried))
            });
            if let Some(old) = previous.clusters.get(name) {
                old.retire_into(name, next.as_deref(), retired);
            }
            match next {
                Some(state) => clusters.insert(name.clone(), state),
                None => clusters.remove(name),
            };
        }
        let mut routes = previous.routes.clone();
        for key in &delta.routes {
            if config.has_route(key) {
                if !routes.contains_key(key) {
                    let state = carry_route(key, previous, retired);
                    routes.insert(key.clone(), state);
                }
            } else if let Some(state) = routes.remove(key) {
                state.forget_buckets();
                retired.routes.retire(key.clone(), state);
            }
        }
        Self {
            config: Arc::new(config),
            clusters,
            routes,
            tunnels: previous.tunnels.clone(),
        }
    }

    pub(crate) fn cluster(&self, name: &str) -> Option<(&ClusterSpec, &Arc<ClusterState>)> {
        Some((self.config.clusters.get(name)?, self.clusters.get(name)?))
    }
}

/// The state of route `key`: `previous`'s, else what `retired` kept, else new.
fn carry_route(key: &RouteKey, previous: &Snapshot, retired: &mut Retired) -> Arc<RouteState> {
    previous
        .routes
        .get(key)
        .cloned()
        .or_else(|| retired.routes.revive(key))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
