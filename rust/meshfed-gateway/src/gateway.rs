//! The running gateway: its own tokio runtime, listeners, the config
//! snapshot that connections read, and `apply()`, the one writer.

mod accept;
mod balancer;
mod clock;
mod connection;
mod copy;
mod counting;
mod engine;
mod health;
mod hop;
mod limits;
mod retired;
mod snapshot;
mod stats;
mod tunnel;
mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use self::engine::Engine;
use self::health::RunningChecks;
use self::retired::Retired;
use self::snapshot::Snapshot;
use self::stats::ListenerStats;
use crate::config::{CompiledConfig, ConfigError};

pub use self::stats::{HistogramSnapshot, ListenerSnapshot, RouteSnapshot};
pub use self::upstream::{ClusterSnapshot, EndpointSnapshot};

/// Overrides the number of data-plane worker threads.
pub const WORKER_THREADS_ENV: &str = "MESHFED_GATEWAY_WORKER_THREADS";

/// Why the gateway could not start or apply a config.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The config document is invalid; nothing was changed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound; nothing was changed.
    #[error(
        "listener {listener:?}: cannot bind {address}: {source}{}",
        bind_hint(source)
    )]
    Bind {
        /// Name of the listener.
        listener: String,
        /// The configured address.
        address: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The data-plane runtime could not be created.
    #[error("cannot start the gateway runtime: {0}")]
    Runtime(io::Error),
    /// The gateway has been shut down.
    #[error("the gateway is closed")]
    Closed,
}

fn bind_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::AddrInUse => " — is another gateway running on this port?",
        io::ErrorKind::PermissionDenied => {
            " — ports below 1024 need privileges (CAP_NET_BIND_SERVICE)"
        }
        io::ErrorKind::AddrNotAvailable => " — is this IP address assigned to a local interface?",
        _ => "",
    }
}

/// The stats document [`Gateway::stats_json`] writes: listeners (with their
/// routes by SNI) and clusters (with their endpoints by address), by name.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct StatsDocument {
    /// Per listener name.
    pub listeners: BTreeMap<String, ListenerSnapshot>,
    /// Per cluster name.
    pub clusters: BTreeMap<String, ClusterSnapshot>,
}

/// The JSON Schema of the stats document, derived from the types that write
/// it, so the Python side can be checked against the one definition.
pub fn stats_schema_json() -> String {
    // A schemars schema is a JSON value already, so writing it out cannot fail.
    schemars::schema_for!(StatsDocument).as_value().to_string()
}

/// A running east-west gateway.
///
/// Owns a dedicated tokio runtime (threads named `meshfed-gw-N`; see
/// `engine`), independent of any caller's runtime. All methods are
/// synchronous and may be called from any thread, including from inside
/// another tokio runtime.
pub struct Gateway {
    runtime: Mutex<Option<Engine>>,
    handle: Handle,
    snapshot: Arc<ArcSwap<Snapshot>>,
    control: Mutex<Control>,
    /// The running listeners as readers see them, republished after each
    /// change: `addresses()` and `stats()` never wait for an `apply()` that
    /// is binding thousands of sockets under the control lock.
    published: ArcSwap<BTreeMap<Arc<str>, PublishedListener>>,
}

/// A running listener's bound address and counters.
struct PublishedListener {
    local: SocketAddr,
    stats: Arc<ListenerStats>,
}

/// State only `apply()` and `shutdown()` change, under one mutex.
#[derive(Default)]
struct Control {
    listeners: BTreeMap<Arc<str>, RunningListener>,
    /// Active health checks by cluster name.
    health_checks: HashMap<Arc<str>, RunningChecks>,
    /// Counters of listeners, routes, clusters and endpoints that left the
    /// config, for when their names come back.
    retired: Retired,
    closed: bool,
}

/// A listener bound by this apply: its name, configured address, and the
/// socket with the address it is bound to.
type Fresh = (Arc<str>, SocketAddr, (TcpListener, SocketAddr));

struct RunningListener {
    configured: SocketAddr,
    local: SocketAddr,
    stats: Arc<ListenerStats>,
    task: JoinHandle<()>,
}

impl RunningListener {
    /// Whether this socket already serves a listener configured at
    /// `address`: the same configured address, or the exact address it is
    /// bound to (a config re-applied with the port resolved from `:0`).
    fn serves(&self, address: SocketAddr) -> bool {
        self.configured == address || self.local == address
    }
}

/// One worker per CPU this process may run on (its affinity mask and cgroup
/// quota, as HAProxy and Envoy size themselves), unless
/// [`WORKER_THREADS_ENV`] says otherwise. More workers than CPUs only adds
/// cross-thread wake-ups to every message.
fn worker_threads() -> usize {
    std::env::var(WORKER_THREADS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
}

impl Gateway {
    /// Compiles `config_json`, starts the runtime and binds every listener.
    pub fn start(config_json: &[u8]) -> Result<Self, GatewayError> {
        Self::start_compiled(CompiledConfig::from_json(config_json)?)
    }

    /// Starts the gateway with an already compiled config.
    pub fn start_compiled(config: CompiledConfig) -> Result<Self, GatewayError> {
        let (runtime, handle) = Engine::start(worker_threads())?;
        let gateway = Self {
            handle,
            runtime: Mutex::new(Some(runtime)),
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::empty())),
            control: Mutex::new(Control::default()),
            published: ArcSwap::from_pointee(BTreeMap::new()),
        };
        gateway.install(config)?;
        Ok(gateway)
    }

    /// Compiles `config_json` and, if it is valid and every new listener
    /// binds, makes it the running config. On error nothing changes.
    ///
    /// Listeners are matched by name and configured address: unchanged ones
    /// keep their socket, new ones bind, removed ones stop accepting while
    /// their connections finish. Live connections keep the config they
    /// started with; new connections see the new one.
    ///
    /// Counters are cumulative per name: a listener, route, cluster or
    /// endpoint rebuilt under its name, or removed and re-added by a later
    /// apply, goes on from where it was (a bounded number of removed names
    /// are remembered; see `retired`), and its gauges count its live
    /// connections, old and new.
    pub fn apply(&self, config_json: &[u8]) -> Result<(), GatewayError> {
        self.install(CompiledConfig::from_json(config_json)?)
    }

    /// Makes an already compiled config the running one (see [`Gateway::apply`]).
    pub fn apply_compiled(&self, config: CompiledConfig) -> Result<(), GatewayError> {
        self.install(config)
    }

    /// Applies a patch document to the running config: the result is what
    /// [`Gateway::apply`] of the full document with those edits would give
    /// (same checks, same carried state), in work proportional to the patch.
    /// On error nothing changes.
    ///
    /// The document (every field optional, unknown fields refused):
    /// `clusters` and `listeners` add or replace whole by name,
    /// `remove_clusters` and `remove_listeners` remove by name, `routes`
    /// (`[{"listener", "upsert": [route], "remove": [sni]}]`) edits the
    /// routes of passthrough and terminate listeners and `connect_routes`
    /// (`[{"listener", "upsert": [connect route], "remove": [authority]}]`)
    /// those of connect listeners. Removing a name that is not there, naming
    /// one twice, or removing a cluster something still uses is refused: the
    /// control plane diffs exactly, so each is a bug to surface. Identity,
    /// trust bundles and the handshake timeout take a full document.
    ///
    /// Untouched clusters keep their state objects (no rebuild), untouched
    /// listeners their sockets and tasks; health checks restart only for
    /// the clusters the patch touches. One new generation is swapped in
    /// whole: a connection sees the config before the patch or after it.
    pub fn apply_patch(&self, patch_json: &[u8]) -> Result<(), GatewayError> {
        let mut control = self.control();
        if control.closed {
            return Err(GatewayError::Closed);
        }
        // Compiled under the lock: the base must be the config it replaces.
        let previous = self.snapshot.load_full();
        let (config, delta) = previous.config.patch_with_delta(patch_json)?;
        let fresh = self.bind_new(&control, &config, delta.listeners.iter())?;
        let next = Snapshot::patched(config, &delta, &previous, &mut control.retired);
        let next = Arc::new(next);
        self.snapshot.store(next.clone());
        for name in &delta.clusters {
            self.sync_health_check(&mut control, &next, name);
        }
        self.swap_listeners(&mut control, &next.config, fresh, delta.listeners);
        Ok(())
    }

    /// The address each listener is actually bound to, by listener name.
    pub fn addresses(&self) -> BTreeMap<String, SocketAddr> {
        self.published
            .load()
            .iter()
            .map(|(name, l)| (name.to_string(), l.local))
            .collect()
    }

    /// A copy of every listener's counters, by listener name.
    pub fn stats(&self) -> BTreeMap<String, ListenerSnapshot> {
        self.published
            .load()
            .iter()
            .map(|(name, l)| (name.to_string(), l.stats.snapshot()))
            .collect()
    }

    /// Makes the listeners of `control` what readers see.
    fn publish(&self, control: &Control) {
        let view = control
            .listeners
            .iter()
            .map(|(name, l)| {
                let published = PublishedListener {
                    local: l.local,
                    stats: l.stats.clone(),
                };
                (name.clone(), published)
            })
            .collect();
        self.published.store(Arc::new(view));
    }

    /// Counters, gauges and latency histograms of every cluster of the
    /// running config, by cluster name (endpoints by address inside).
    pub fn cluster_stats(&self) -> BTreeMap<String, ClusterSnapshot> {
        let snapshot = self.snapshot.load();
        snapshot
            .clusters
            .iter()
            .filter_map(|(name, state)| {
                let spec = snapshot.config.clusters.get(name)?;
                Some((name.to_string(), state.snapshot(spec)))
            })
            .collect()
    }

    /// The endpoints that are unhealthy now (ejected by outlier detection or
    /// failing active health checks), by cluster name; clusters with none
    /// are left out. Cheap enough to poll often, unlike [`Self::stats_json`]
    /// on a gateway with thousands of clusters.
    pub fn unhealthy_endpoints(&self) -> BTreeMap<String, Vec<SocketAddr>> {
        let snapshot = self.snapshot.load();
        let now = clock::now();
        snapshot
            .clusters
            .iter()
            .filter_map(|(name, state)| {
                let down: Vec<SocketAddr> = state
                    .endpoints
                    .iter()
                    .filter(|e| !e.healthy(now))
                    .map(|e| e.address)
                    .collect();
                (!down.is_empty()).then(|| (name.to_string(), down))
            })
            .collect()
    }

    /// The counters as JSON: `{"listeners": {"<name>": {..., "routes":
    /// {"<sni>": {...}}}}, "clusters": {"<name>": {..., "endpoints":
    /// {"<ip:port>": {...}}}}}`. Reads atomics only: never waits on the
    /// data plane.
    pub fn stats_json(&self) -> String {
        let mut listeners = self.stats();
        let snapshot = self.snapshot.load();
        for (key, route) in &snapshot.routes {
            if let Some(l) = listeners.get_mut(key.listener()) {
                l.routes
                    .insert(key.sni().to_owned(), route.stats.snapshot());
            }
        }
        serde_json::to_string(&StatsDocument {
            listeners,
            clusters: self.cluster_stats(),
        })
        .unwrap_or_else(|_| r#"{"listeners":{},"clusters":{}}"#.to_owned())
    }

    /// Stops every listener and the runtime. Idempotent; also run on drop.
    pub fn shutdown(&self) {
        {
            let mut control = self.control();
            control.closed = true;
            for (_, listener) in std::mem::take(&mut control.listeners) {
                listener.task.abort();
            }
            for (_, checks) in std::mem::take(&mut control.health_checks) {
                checks.stop();
            }
            self.publish(&control);
        }
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(runtime) = runtime {
            runtime.stop();
        }
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The one writer of full configs: binds what is new, swaps the
    /// snapshot, then stops what was removed and starts what was added.
    fn install(&self, config: CompiledConfig) -> Result<(), GatewayError> {
        let mut control = self.control();
        if control.closed {
            return Err(GatewayError::Closed);
        }

        // 1. Bind every new listener first; an error drops them all.
        let fresh = self.bind_new(&control, &config, config.listeners.iter().map(|l| &l.name))?;

        // 2. Swap the snapshot, carrying cluster, endpoint and route state
        //    over by name, endpoint key and route key.
        let previous = self.snapshot.load_full();
        let next = Arc::new(Snapshot::build(config, &previous, &mut control.retired));
        self.snapshot.store(next.clone());
        self.sync_health_checks(&mut control, &next);

        // 3-5. Every running listener may be gone or moved.
        let running = control.listeners.keys().cloned().collect();
        self.swap_listeners(&mut control, &next.config, fresh, running);
        Ok(())
    }

    /// Binds the listeners among `names` of `config` that no running socket
    /// serves yet; an error drops every socket bound so far.
    fn bind_new<'a>(
        &self,
        control: &Control,
        config: &CompiledConfig,
        names: impl Iterator<Item = &'a Arc<str>>,
    ) -> Result<Vec<Fresh>, GatewayError> {
        let mut fresh = Vec::new();
        for name in names {
            let Some(spec) = config.listener(name) else {
                continue;
            };
            let kept = control
                .listeners
                .get(name)
                .is_some_and(|running| running.serves(spec.address));
            if !kept {
                let listener = self.bind(name, spec.address)?;
                fresh.push((name.clone(), spec.address, listener));
            }
        }
        Ok(fresh)
    }

    /// After the snapshot swap: stops accepting on the running listeners
    /// among `candidates` that `config` dropped or moved, starts `fresh`
    /// ones with the counters their name had, and publishes the result.
    fn swap_listeners(
        &self,
        control: &mut Control,
        config: &CompiledConfig,
        fresh: Vec<Fresh>,
        candidates: Vec<Arc<str>>,
    ) {
        // 3. Stop accepting on listeners that are gone or moved (a moved
        //    one keeps its counters below, under its name).
        let mut carried_stats = HashMap::new();
        for name in candidates {
            let keep = match (control.listeners.get(&name), config.listener(&name)) {
                (None, _) => continue,
                (Some(running), Some(spec)) => running.serves(spec.address),
                (Some(_), None) => false,
            };
            if !keep {
                if let Some(running) = control.listeners.remove(&name) {
                    running.task.abort();
                    carried_stats.insert(name, running.stats);
                }
            }
        }

        // 4. Start accepting on the new ones, with the counters their name
        //    had, if it had any.
        for (name, configured, (listener, local)) in fresh {
            let stats = carried_stats
                .remove(&name)
                .or_else(|| control.retired.listeners.revive(&*name))
                .unwrap_or_else(ListenerStats::new);
            let task = self.handle.spawn(accept::accept_loop(
                listener,
                name.clone(),
                self.snapshot.clone(),
                stats.clone(),
            ));
            control.listeners.insert(
                name,
                RunningListener {
                    configured,
                    local,
                    stats,
                    task,
                },
            );
        }
        // 5. Keep the counters of the listeners that are gone.
        for (name, stats) in carried_stats {
            control.retired.listeners.retire(name.to_string(), stats);
        }
        self.publish(control);
    }

    /// Starts, keeps or stops active health checks to match `snapshot`.
    fn sync_health_checks(&self, control: &mut Control, snapshot: &Snapshot) {
        let mut names: Vec<Arc<str>> = control.health_checks.keys().cloned().collect();
        names.extend(snapshot.config.clusters.keys().cloned());
        for name in names {
            self.sync_health_check(control, snapshot, &name);
        }
    }

    /// Starts, keeps or stops the health checks of cluster `name` to match
    /// `snapshot` (kept while the check settings and endpoints are the same).
    fn sync_health_check(&self, control: &mut Control, snapshot: &Snapshot, name: &Arc<str>) {
        let old = control.health_checks.remove(name);
        let wanted = snapshot
            .cluster(name)
            .and_then(|(spec, state)| Some((spec, spec.health_check?, state)));
        let Some((spec, check, state)) = wanted else {
            if let Some(stale) = old {
                stale.stop();
            }
            return;
        };
        let running = match old {
            Some(running) if running.matches(&check, state) => running,
            other => {
                if let Some(stale) = other {
                    stale.stop();
                }
                RunningChecks::start(&self.handle, spec, check, state)
            }
        };
        control.health_checks.insert(name.clone(), running);
    }

    fn bind(
        &self,
        name: &str,
        address: SocketAddr,
    ) -> Result<(TcpListener, SocketAddr), GatewayError> {
        let error = |source| GatewayError::Bind {
            listener: name.to_owned(),
            address,
            source,
        };
        // std binds synchronously (with SO_REUSEADDR on Unix); tokio adopts it.
        let listener = std::net::TcpListener::bind(address).map_err(error)?;
        listener.set_nonblocking(true).map_err(error)?;
        let local = listener.local_addr().map_err(error)?;
        let _guard = self.handle.enter();
        let listener = TcpListener::from_std(listener).map_err(error)?;
        Ok((listener, local))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addresses", &self.addresses())
            .finish_non_exhaustive()
    }
}
