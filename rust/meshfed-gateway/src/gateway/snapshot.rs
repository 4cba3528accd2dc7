//! One generation of configuration with the runtime state of its clusters
//! and routes: what a connection reads for its whole life, and what
//! `apply()` builds from the previous generation.

use std::collections::HashMap;
use std::sync::Arc;

use super::limits::RouteState;
use super::retired::Retired;
use super::upstream::{ClusterState, Previous};
use crate::config::{ClusterSpec, CompiledConfig, ListenerMode, RouteKey};

/// One generation of configuration plus the runtime state of its clusters
/// and routes. A connection loads it once and keeps it for its whole life.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) config: Arc<CompiledConfig>,
    pub(crate) clusters: HashMap<String, Arc<ClusterState>>,
    pub(crate) routes: HashMap<RouteKey, Arc<RouteState>>,
}

impl Snapshot {
    pub(crate) fn empty() -> Self {
        Self {
            config: Arc::new(CompiledConfig::empty()),
            clusters: HashMap::new(),
            routes: HashMap::new(),
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
        let clusters: HashMap<String, Arc<ClusterState>> = config
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
            let keys: Vec<&RouteKey> = match &listener.mode {
                ListenerMode::Passthrough { routes } => routes.values().map(|r| &r.key).collect(),
                ListenerMode::Terminate { routes, .. } => {
                    routes.values().map(|r| &r.route.key).collect()
                }
                ListenerMode::Originate { .. } | ListenerMode::Connect { .. } => Vec::new(),
            };
            for key in keys {
                let state = previous
                    .routes
                    .get(key)
                    .cloned()
                    .or_else(|| retired.routes.revive(key))
                    .unwrap_or_default();
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
        }
    }

    pub(crate) fn cluster(&self, name: &str) -> Option<(&ClusterSpec, &Arc<ClusterState>)> {
        Some((self.config.clusters.get(name)?, self.clusters.get(name)?))
    }
}
