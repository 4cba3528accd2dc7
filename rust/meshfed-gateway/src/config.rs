//! Compiling the JSON config document into a frozen [`CompiledConfig`].
//!
//! Everything is checked here, once: names, addresses, cluster references,
//! PEM material, SPIFFE IDs, and the rustls configurations are built. The
//! data plane only ever reads a compiled config. Errors carry the JSON path
//! of the offending field.

mod patch;
mod raw;
mod routes;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::authz::{Rule, Rules, TrustedGateways};
use crate::spiffe::{SpiffeId, SpiffePattern, TrustDomain};
use crate::tls::{self, Identity, SpiffeClientVerifier};

pub(crate) use patch::Delta;
#[cfg(test)]
pub(crate) use patch::tests as patch_tests;
pub(crate) use routes::SniRouter;

/// A config document that failed to compile: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    path: String,
    message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The JSON path of the offending field, e.g. `listeners[1].routes[0].cluster`
    /// (empty when the problem is the document as a whole).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What is wrong with it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A validated, immutable gateway configuration.
///
/// Clusters, listeners and routes sit behind `Arc`s and the TLS material
/// compiling them needs is kept (`tls`), so that [`CompiledConfig::patch`]
/// builds the next config from this one by copying pointers and compiling
/// only what the patch changes.
#[derive(Debug)]
pub struct CompiledConfig {
    pub(crate) identity: Option<SpiffeId>,
    pub(crate) handshake_timeout: Duration,
    /// In document order (a patch replaces in place and appends).
    pub(crate) listeners: Vec<Arc<ListenerSpec>>,
    /// Positions in `listeners` by name: a connection (and a patch of one
    /// of 10,000 originate listeners) finds its listener without a scan.
    listener_index: HashMap<Arc<str>, usize>,
    pub(crate) clusters: HashMap<Arc<str>, Arc<ClusterSpec>>,
    /// What compiling more clusters and listeners needs; identity and trust
    /// bundles are not patchable, so this is shared from generation to
    /// generation (and with it the TLS session caches).
    tls: Arc<TlsContext>,
    /// Who uses each cluster, so a patch removing or changing one checks
    /// its users without walking every route.
    referrers: patch::Referrers,
}

/// One listener: where it binds and what it does with connections.
#[derive(Debug)]
pub(crate) struct ListenerSpec {
    pub(crate) name: Arc<str>,
    pub(crate) address: SocketAddr,
    pub(crate) mode: ListenerMode,
    pub(crate) limits: ListenerLimits,
}

/// Caps on one listener's connections (see `raw::ListenerLimits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListenerLimits {
    /// Connections open at once.
    pub(crate) max_connections: u64,
    /// Connections open at once that have not finished their handshake;
    /// at most `max_connections`.
    pub(crate) max_handshakes: u64,
}

/// What a listener does with an accepted connection.
#[derive(Debug)]
pub(crate) enum ListenerMode {
    /// Peek the ClientHello, route on SNI, forward the TLS bytes untouched.
    Passthrough { routes: SniRouter<RouteSpec> },
    /// Finish mTLS, authorize the caller, forward plain bytes.
    Terminate {
        routes: SniRouter<TerminateRoute>,
        tls: TerminateTls,
    },
    /// Accept a local workload (plain TCP, or mTLS per `workload_tls`) and
    /// connect to the cluster: mTLS to the endpoints that are peer gateways,
    /// plain to the rest (a failover group).
    Originate {
        cluster: String,
        workload_tls: WorkloadTls,
    },
    /// Read a local workload's `CONNECT host:port` request, connect to the
    /// cluster its authority names (as originate does), answer `200` once
    /// connected (or an error status saying why not), then forward bytes.
    Connect { routes: HashMap<Arc<str>, Arc<str>> },
}

/// The TLS side of a terminate listener.
#[derive(Debug, Clone)]
pub(crate) struct TerminateTls {
    /// For clients not asking for the hop protocol: no ALPN, so clients
    /// offering `h2` or anything else are unaffected.
    pub(crate) plain: Arc<ServerConfig>,
    /// For clients offering the hop protocol: `meshfed-caller/2` if they
    /// offer it, else `/1`. A clone of `plain` (same verifier, certificate
    /// and session cache).
    pub(crate) hop: Arc<ServerConfig>,
    /// Who may vouch for a caller over the hop protocol.
    pub(crate) trusted_gateways: Arc<TrustedGateways>,
}

/// How an originate listener accepts local workloads.
#[derive(Debug, Clone)]
pub(crate) enum WorkloadTls {
    /// Plain TCP; the gateway is the caller.
    Plain,
    /// A TLS record (first byte 0x16) as in `Strict`, anything else as `Plain`.
    Permissive(Arc<ServerConfig>),
    /// mTLS with an SVID of the gateway's own trust domain, or refused.
    Strict(Arc<ServerConfig>),
}

/// Where a route sends its connections.
#[derive(Debug)]
pub(crate) enum RouteTarget {
    /// Everything to one cluster.
    Cluster(String),
    /// Split by weight: `(cluster, weight)`, weights summing to `total`.
    Weighted {
        clusters: Vec<(String, u32)>,
        total: u64,
    },
}

impl RouteTarget {
    /// Every cluster the route may send to (a weighted split may name one twice).
    pub(crate) fn clusters(&self) -> impl Iterator<Item = &str> {
        let (one, split) = match self {
            Self::Cluster(name) => (Some(name.as_str()), &[][..]),
            Self::Weighted { clusters, .. } => (None, clusters.as_slice()),
        };
        one.into_iter()
            .chain(split.iter().map(|(name, _)| name.as_str()))
    }

    /// The cluster for a connection; `roll` is any random number.
    pub(crate) fn pick(&self, roll: u64) -> &str {
        match self {
            Self::Cluster(name) => name,
            Self::Weighted { clusters, total } => {
                let mut point = roll % (*total).max(1);
                for (name, weight) in clusters {
                    let weight = u64::from(*weight);
                    if point < weight {
                        return name;
                    }
                    point -= weight;
                }
                clusters.last().map_or("", |(name, _)| name.as_str())
            }
        }
    }
}

/// A token bucket's parameters: refill per second and capacity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateLimitSpec {
    pub(crate) per_second: f64,
    pub(crate) burst: f64,
}

/// Names one route of one listener: route state (buckets, counters) is
/// kept under it across `apply()`, and stats report it under its parts.
/// Two fields, not a joined string: nothing has to split it again, and no
/// listener name can run into an SNI pattern.
/// Shared strings: the next generation's maps copy keys as pointers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RouteKey {
    listener: Arc<str>,
    /// The SNI pattern, lowercase (SNI matching ignores case).
    sni: Arc<str>,
}

impl RouteKey {
    pub(crate) fn new(listener: &str, sni_pattern: &str) -> Self {
        Self {
            listener: listener.into(),
            sni: sni_pattern.to_ascii_lowercase().into(),
        }
    }

    pub(crate) fn listener(&self) -> &str {
        &self.listener
    }

    pub(crate) fn sni(&self) -> &str {
        &self.sni
    }
}

/// `<listener>/<sni pattern>`, for messages.
impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.listener, self.sni)
    }
}

/// What every passthrough or terminate route has.
#[derive(Debug)]
pub(crate) struct RouteSpec {
    /// The key route state is carried under.
    pub(crate) key: RouteKey,
    pub(crate) target: RouteTarget,
    pub(crate) rate_limit: Option<RateLimitSpec>,
}

/// A terminate route: target, who may use it, and what to tell the endpoint.
#[derive(Debug)]
pub(crate) struct TerminateRoute {
    pub(crate) route: RouteSpec,
    /// Shared with the handshakes that check them (one `Arc` clone each).
    pub(crate) rules: Arc<Rules>,
    pub(crate) proxy_protocol: bool,
    pub(crate) source_rate_limit: Option<RateLimitSpec>,
}

pub(crate) use raw::Lb;

/// One endpoint of a cluster.
#[derive(Debug, Clone)]
pub(crate) struct EndpointSpec {
    pub(crate) address: SocketAddr,
    pub(crate) weight: u32,
    pub(crate) priority: u32,
    /// mTLS to the endpoint (its own setting, else the cluster's); plain when none.
    pub(crate) tls: Option<Arc<UpstreamTlsSpec>>,
}

impl EndpointSpec {
    /// The SPIFFE ID the endpoint must present, if it is dialled with mTLS.
    pub(crate) fn peer(&self) -> Option<&SpiffeId> {
        self.tls.as_ref().map(|tls| &tls.peer)
    }
}

/// Passive outlier detection parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutlierSpec {
    /// 0 disables.
    pub(crate) consecutive_failures: u32,
    pub(crate) base_ejection: Duration,
    pub(crate) max_ejection: Duration,
    pub(crate) max_ejection_percent: u32,
}

/// Active TCP health check parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HealthCheckSpec {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) healthy_threshold: u32,
    pub(crate) unhealthy_threshold: u32,
}

/// mTLS to an endpoint: the server name to send and the SPIFFE ID it must present.
#[derive(Debug)]
pub(crate) struct UpstreamTlsSpec {
    pub(crate) server_name: ServerName<'static>,
    pub(crate) peer: SpiffeId,
    /// Offers the hop protocol when `convey_caller` is set.
    pub(crate) config: Arc<ClientConfig>,
    /// Tell the peer the caller if it negotiates the hop protocol.
    pub(crate) convey_caller: bool,
    /// Open streams over a pooled tunnel if the peer negotiates it (`gateway::tunnel`).
    pub(crate) tunnel: bool,
}

/// An upstream cluster.
#[derive(Debug)]
pub(crate) struct ClusterSpec {
    pub(crate) name: Arc<str>,
    pub(crate) endpoints: Vec<EndpointSpec>,
    pub(crate) connect_timeout: Duration,
    pub(crate) lb: Lb,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) outlier: OutlierSpec,
    pub(crate) health_check: Option<HealthCheckSpec>,
    pub(crate) max_connections: Option<u64>,
    pub(crate) max_pending: Option<u64>,
}

impl ClusterSpec {
    /// Whether some endpoint is reached over mTLS.
    pub(crate) fn encrypts(&self) -> bool {
        self.endpoints.iter().any(|e| e.tls.is_some())
    }
}

impl CompiledConfig {
    /// Parses and validates a JSON config document.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let doc: raw::Document = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            ConfigError::new(path, e.into_inner().to_string())
        })?;
        de.end()
            .map_err(|e| ConfigError::new("", format!("trailing data after the document: {e}")))?;
        compile(doc)
    }

    /// A config with no listeners and no clusters.
    pub fn empty() -> Self {
        Self {
            identity: None,
            handshake_timeout: Duration::from_millis(raw::DEFAULT_HANDSHAKE_TIMEOUT_MS),
            listeners: Vec::new(),
            listener_index: HashMap::new(),
            clusters: HashMap::new(),
            tls: Arc::new(TlsContext::new(None, BTreeMap::new())),
            referrers: patch::Referrers::default(),
        }
    }

    /// This config with a patch document applied (see [`Gateway::apply_patch`]
    /// for the document): the same result, and the same checks, as compiling
    /// the full document with those edits, in work proportional to the
    /// patch (plus copying pointers). `self` is unchanged.
    ///
    /// [`Gateway::apply_patch`]: crate::Gateway::apply_patch
    pub fn patch(&self, patch_json: &[u8]) -> Result<Self, ConfigError> {
        self.patch_with_delta(patch_json).map(|(config, _)| config)
    }

    /// [`Self::patch`], also returning the names it touched, so the gateway
    /// rebuilds state for those only.
    pub(crate) fn patch_with_delta(&self, patch_json: &[u8]) -> Result<(Self, Delta), ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(patch_json);
        let doc: raw::Patch = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            ConfigError::new(path, e.into_inner().to_string())
        })?;
        de.end()
            .map_err(|e| ConfigError::new("", format!("trailing data after the patch: {e}")))?;
        patch::apply(self, doc)
    }

    /// Listener names, in document order.
    pub fn listener_names(&self) -> impl Iterator<Item = &str> {
        self.listeners.iter().map(|l| &*l.name)
    }

    /// How long a TLS handshake (or a ClientHello read) may take.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// The SPIFFE ID of the gateway's own identity, if one is configured.
    pub fn identity(&self) -> Option<&SpiffeId> {
        self.identity.as_ref()
    }

    pub(crate) fn listener(&self, name: &str) -> Option<&ListenerSpec> {
        let index = *self.listener_index.get(name)?;
        self.listeners.get(index).map(|l| &**l)
    }

    /// Whether the listener of `key` has a route of exactly its pattern.
    pub(crate) fn has_route(&self, key: &RouteKey) -> bool {
        self.listener(key.listener())
            .is_some_and(|l| match &l.mode {
                ListenerMode::Passthrough { routes } => routes.get_pattern(key.sni()).is_some(),
                ListenerMode::Terminate { routes, .. } => routes.get_pattern(key.sni()).is_some(),
                ListenerMode::Originate { .. } | ListenerMode::Connect { .. } => false,
            })
    }
}

/// The route keys of a listener (none for originate and connect).
pub(crate) fn route_keys(listener: &ListenerSpec) -> Vec<&RouteKey> {
    match &listener.mode {
        ListenerMode::Passthrough { routes } => routes.values().map(|r| &r.key).collect(),
        ListenerMode::Terminate { routes, .. } => routes.values().map(|r| &r.route.key).collect(),
        ListenerMode::Originate { .. } | ListenerMode::Connect { .. } => Vec::new(),
    }
}

/// Checks a config document without starting anything.
pub fn validate_config(bytes: &[u8]) -> Result<(), ConfigError> {
    CompiledConfig::from_json(bytes).map(drop)
}

fn compile(doc: raw::Document) -> Result<CompiledConfig, ConfigError> {
    if doc.handshake_timeout_ms == 0 {
        return Err(ConfigError::new(
            "handshake_timeout_ms",
            "must be greater than 0",
        ));
    }
    let identity = doc.identity.as_ref().map(compile_identity).transpose()?;

    let mut bundles = BTreeMap::new();
    for (domain, pem) in &doc.trust_bundles {
        let path = format!("trust_bundles[{domain:?}]");
        let domain =
            TrustDomain::parse(domain).map_err(|e| ConfigError::new(&path, e.to_string()))?;
        let roots = tls::root_store(pem).map_err(|e| ConfigError::new(&path, e))?;
        bundles.insert(domain, Arc::new(roots));
    }
    let mut tls = TlsContext::new(identity.map(Arc::new), bundles);

    let mut clusters = HashMap::with_capacity(doc.clusters.len());
    for (i, cluster) in doc.clusters.iter().enumerate() {
        let at = format!("clusters[{i}]");
        let spec = compile_cluster(&at, cluster, &mut tls)?;
        if clusters.insert(spec.name.clone(), Arc::new(spec)).is_some() {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("duplicate cluster name {:?}", cluster.name),
            ));
        }
    }

    let mut ctx = ListenerContext {
        tls: &mut tls,
        clusters: &clusters,
    };
    let mut listeners = Vec::with_capacity(doc.listeners.len());
    let mut listener_index = HashMap::with_capacity(doc.listeners.len());
    let mut fixed_addresses = HashMap::new();
    for (i, listener) in doc.listeners.iter().enumerate() {
        let at = format!("listeners[{i}]");
        let name = listener_name(&at, listener)?;
        if listener_index.contains_key(name.as_ref()) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                format!("duplicate listener name {name:?}"),
            ));
        }
        let address = listener_address(&at, listener)?;
        if address.port() != 0 {
            if let Some(other) = fixed_addresses.insert(address, name.clone()) {
                return Err(ConfigError::new(
                    format!("{at}.address"),
                    format!("{address} is already used by listener {other:?}"),
                ));
            }
        }
        let spec = ctx.compile_listener(&at, name.clone(), address, listener)?;
        listener_index.insert(name, listeners.len());
        listeners.push(Arc::new(spec));
    }
    let referrers = patch::Referrers::of(&listeners);

    Ok(CompiledConfig {
        identity: tls.identity.as_ref().map(|i| i.spiffe_id.clone()),
        handshake_timeout: Duration::from_millis(doc.handshake_timeout_ms),
        listeners,
        listener_index,
        clusters,
        tls: Arc::new(tls),
        referrers,
    })
}

/// A listener's name, checked.
fn listener_name(at: &str, listener: &raw::Listener) -> Result<Arc<str>, ConfigError> {
    if listener.name.is_empty() {
        return Err(ConfigError::new(format!("{at}.name"), "must not be empty"));
    }
    Ok(Arc::from(listener.name.as_str()))
}

/// A listener's address, parsed.
fn listener_address(at: &str, listener: &raw::Listener) -> Result<SocketAddr, ConfigError> {
    listener.address.parse().map_err(|_| {
        ConfigError::new(
            format!("{at}.address"),
            format!("{:?} is not an ip:port socket address", listener.address),
        )
    })
}

/// What compiling clusters and listeners needs from the parts of a document
/// a patch cannot change (identity, trust bundles), and the TLS configs built
/// from them so far, shared by everything that uses them: one client config
/// per peer SPIFFE ID (its verifier pins that ID, and sharing it shares the
/// session cache, so every import from one peer gateway resumes sessions
/// with it; with `convey_caller` a clone offering the hop protocol by ALPN,
/// and with `tunnel` one offering the tunnel first, still sharing the
/// cache), one server config pair for every terminate
/// listener, one for workloads of originate listeners.
#[derive(Clone)]
pub(crate) struct TlsContext {
    identity: Option<Arc<Identity>>,
    bundles: BTreeMap<TrustDomain, Arc<RootCertStore>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// `(plain, hop)`, built on the first terminate listener.
    server_tls: Option<(Arc<ServerConfig>, Arc<ServerConfig>)>,
    /// Built on the first originate listener with `workload_tls`.
    workload_tls: Option<Arc<ServerConfig>>,
    by_peer: HashMap<SpiffeId, Arc<ClientConfig>>,
    /// Keyed by peer and whether the tunnel is offered too.
    hop_by_peer: HashMap<(SpiffeId, bool), Arc<ClientConfig>>,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext")
            .field("identity", &self.identity.as_ref().map(|i| &i.spiffe_id))
            .field("bundles", &self.bundles.keys().collect::<Vec<_>>())
            .field("peers", &self.by_peer.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    fn new(
        identity: Option<Arc<Identity>>,
        bundles: BTreeMap<TrustDomain, Arc<RootCertStore>>,
    ) -> Self {
        Self {
            identity,
            bundles,
            provider: tls::provider(),
            server_tls: None,
            workload_tls: None,
            by_peer: HashMap::new(),
            hop_by_peer: HashMap::new(),
        }
    }
}

/// What compiling a listener's mode needs from the rest of the document.
struct ListenerContext<'a> {
    tls: &'a mut TlsContext,
    /// The clusters of the resulting config, which routes must name.
    clusters: &'a HashMap<Arc<str>, Arc<ClusterSpec>>,
}

impl ListenerContext<'_> {
    /// Compiles the listener at `at` (e.g. `listeners[3]`), whose name and
    /// address the caller has checked against the other listeners.
    fn compile_listener(
        &mut self,
        at: &str,
        name: Arc<str>,
        address: SocketAddr,
        listener: &raw::Listener,
    ) -> Result<ListenerSpec, ConfigError> {
        let mode = self.compile_mode(at, listener)?;
        let limits = &listener.limits;
        for (field, value) in [
            ("max_connections", limits.max_connections),
            ("max_handshakes", limits.max_handshakes),
        ] {
            if value == 0 {
                return Err(ConfigError::new(
                    format!("{at}.limits.{field}"),
                    "must be at least 1: a listener that admits no connection should be removed",
                ));
            }
        }
        Ok(ListenerSpec {
            name,
            address,
            mode,
            limits: ListenerLimits {
                max_connections: u64::from(limits.max_connections),
                // A handshake holds a connection too: the smaller cap wins.
                max_handshakes: u64::from(limits.max_handshakes.min(limits.max_connections)),
            },
        })
    }

    fn compile_mode(
        &mut self,
        at_listener: &str,
        listener: &raw::Listener,
    ) -> Result<ListenerMode, ConfigError> {
        let at = |field: &str| format!("{at_listener}.{field}");
        let mode = listener.mode;
        if mode != raw::Mode::Terminate && listener.trusted_gateways.is_some() {
            return Err(ConfigError::new(
                at("trusted_gateways"),
                format!(
                    "only for terminate listeners (the peer gateways that may vouch for a caller); {} listeners never authorize callers",
                    mode.as_str()
                ),
            ));
        }
        if mode != raw::Mode::Originate && listener.workload_tls.is_some() {
            return Err(ConfigError::new(
                at("workload_tls"),
                format!(
                    "only for originate listeners (how local workloads connect); not for {} listeners",
                    mode.as_str()
                ),
            ));
        }
        if mode != raw::Mode::Connect && listener.connect_routes.is_some() {
            return Err(ConfigError::new(
                at("connect_routes"),
                format!(
                    "only for connect listeners; {} listeners do not read CONNECT requests",
                    mode.as_str()
                ),
            ));
        }
        if mode == raw::Mode::Connect {
            if listener.routes.is_some() || listener.cluster.is_some() {
                return Err(ConfigError::new(
                    at(if listener.routes.is_some() {
                        "routes"
                    } else {
                        "cluster"
                    }),
                    "connect listeners route by the CONNECT authority: give \"connect_routes\"",
                ));
            }
        } else if mode == raw::Mode::Originate {
            if listener.routes.is_some() {
                return Err(ConfigError::new(
                    at("routes"),
                    "originate listeners have no routes (they dial \"cluster\")",
                ));
            }
        } else if listener.cluster.is_some() {
            return Err(ConfigError::new(
                at("cluster"),
                format!(
                    "only for originate listeners; {} listeners name clusters in their routes",
                    mode.as_str()
                ),
            ));
        }
        match mode {
            raw::Mode::Passthrough => {
                let routes = self.routes(at_listener, listener, |ctx, path, route| {
                    ctx.passthrough_route(path, &listener.name, route)
                })?;
                Ok(ListenerMode::Passthrough { routes })
            }
            raw::Mode::Terminate => {
                let identity = self.tls.require_identity(&at("mode"), mode)?.clone();
                let routes = self.routes(at_listener, listener, |ctx, path, route| {
                    ctx.terminate_route(path, &listener.name, route)
                })?;
                let trusted_gateways = listener
                    .trusted_gateways
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(|(k, id)| {
                        SpiffeId::parse(id).map_err(|e| {
                            ConfigError::new(at(&format!("trusted_gateways[{k}]")), e.to_string())
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let (plain, hop) = self.tls.server_tls(&identity, &at("mode"))?;
                Ok(ListenerMode::Terminate {
                    routes,
                    tls: TerminateTls {
                        plain,
                        hop,
                        trusted_gateways: Arc::new(TrustedGateways::new(trusted_gateways)),
                    },
                })
            }
            raw::Mode::Originate => {
                let cluster = listener.cluster.as_ref().ok_or_else(|| {
                    ConfigError::new(at("cluster"), "required for originate listeners")
                })?;
                let cluster = self.cluster(at("cluster"), cluster)?;
                let mode = listener.workload_tls.unwrap_or(raw::WorkloadTls::Plain);
                let path = at("workload_tls");
                let workload_tls = match mode {
                    raw::WorkloadTls::Plain => WorkloadTls::Plain,
                    raw::WorkloadTls::Permissive => {
                        WorkloadTls::Permissive(self.tls.workload_server_tls(&path, mode)?)
                    }
                    raw::WorkloadTls::Strict => {
                        WorkloadTls::Strict(self.tls.workload_server_tls(&path, mode)?)
                    }
                };
                Ok(ListenerMode::Originate {
                    cluster,
                    workload_tls,
                })
            }
            raw::Mode::Connect => {
                let Some(raw_routes) = &listener.connect_routes else {
                    return Err(ConfigError::new(
                        at("connect_routes"),
                        "required for connect listeners (may be empty)",
                    ));
                };
                let mut routes = HashMap::with_capacity(raw_routes.len());
                for (j, route) in raw_routes.iter().enumerate() {
                    let path = at(&format!("connect_routes[{j}]"));
                    let (authority, cluster) = self.connect_route(&path, route)?;
                    if routes.insert(authority, cluster).is_some() {
                        return Err(ConfigError::new(
                            format!("{path}.authority"),
                            format!(
                                "{:?} is routed twice; each authority names one cluster",
                                route.authority
                            ),
                        ));
                    }
                }
                Ok(ListenerMode::Connect { routes })
            }
        }
    }

    /// Compiles the `routes` of a passthrough or terminate listener.
    fn routes<R>(
        &mut self,
        at_listener: &str,
        listener: &raw::Listener,
        mut route: impl FnMut(&mut Self, &str, &raw::Route) -> Result<R, ConfigError>,
    ) -> Result<SniRouter<R>, ConfigError> {
        let Some(routes) = &listener.routes else {
            return Err(ConfigError::new(
                format!("{at_listener}.routes"),
                format!(
                    "required for {} listeners (may be empty)",
                    listener.mode.as_str()
                ),
            ));
        };
        let mut entries = Vec::with_capacity(routes.len());
        for (j, raw_route) in routes.iter().enumerate() {
            let path = format!("{at_listener}.routes[{j}]");
            entries.push((raw_route.sni.clone(), route(self, &path, raw_route)?));
        }
        SniRouter::new(entries)
            .map_err(|(j, msg)| ConfigError::new(format!("{at_listener}.routes[{j}].sni"), msg))
    }

    /// Compiles a passthrough route of `listener`; `at` is its path.
    fn passthrough_route(
        &self,
        at: &str,
        listener: &str,
        route: &raw::Route,
    ) -> Result<RouteSpec, ConfigError> {
        let terminate_only = [
            ("rules", route.rules.is_some()),
            ("proxy_protocol", route.proxy_protocol),
            ("source_rate_limit", route.source_rate_limit.is_some()),
        ];
        if let Some((field, _)) = terminate_only.iter().find(|(_, set)| *set) {
            return Err(ConfigError::new(
                format!("{at}.{field}"),
                "only terminate routes may set this; passthrough keeps TLS end to end and never sees the caller",
            ));
        }
        let spec = self.route_spec(at, listener, route)?;
        if let Some(name) = self.tls_cluster(&spec.target) {
            return Err(ConfigError::new(at, passthrough_tls_message(name)));
        }
        Ok(spec)
    }

    /// Compiles a terminate route of `listener`; `at` is its path.
    fn terminate_route(
        &self,
        at: &str,
        listener: &str,
        route: &raw::Route,
    ) -> Result<TerminateRoute, ConfigError> {
        let spec = self.route_spec(at, listener, route)?;
        let source_rate_limit = route
            .source_rate_limit
            .as_ref()
            .map(|r| rate_limit(&format!("{at}.source_rate_limit"), r))
            .transpose()?;
        let rules = compile_rules(
            &format!("{at}.rules"),
            route.rules.as_deref().unwrap_or_default(),
        )?;
        Ok(TerminateRoute {
            route: spec,
            rules: Arc::new(rules),
            proxy_protocol: route.proxy_protocol,
            source_rate_limit,
        })
    }

    /// Compiles a connect route: its canonical authority and cluster.
    fn connect_route(
        &self,
        at: &str,
        route: &raw::ConnectRoute,
    ) -> Result<(Arc<str>, Arc<str>), ConfigError> {
        let authority = parse_authority(&route.authority)
            .map_err(|why| ConfigError::new(format!("{at}.authority"), why))?;
        let cluster = self.cluster(format!("{at}.cluster"), &route.cluster)?;
        Ok((Arc::from(authority), Arc::from(cluster)))
    }

    /// Compiles what every route has: its key, target and rate limit.
    fn route_spec(
        &self,
        at: &str,
        listener: &str,
        route: &raw::Route,
    ) -> Result<RouteSpec, ConfigError> {
        let target = match (&route.cluster, &route.weighted_clusters) {
            (Some(cluster), None) => {
                RouteTarget::Cluster(self.cluster(format!("{at}.cluster"), cluster)?)
            }
            (None, Some(split)) => {
                if split.is_empty() {
                    return Err(ConfigError::new(
                        format!("{at}.weighted_clusters"),
                        "needs at least one cluster",
                    ));
                }
                let mut clusters = Vec::with_capacity(split.len());
                let mut total = 0u64;
                for (k, entry) in split.iter().enumerate() {
                    let name = self.cluster(
                        format!("{at}.weighted_clusters[{k}].cluster"),
                        &entry.cluster,
                    )?;
                    total += u64::from(entry.weight);
                    clusters.push((name, entry.weight));
                }
                if total == 0 {
                    return Err(ConfigError::new(
                        format!("{at}.weighted_clusters"),
                        "weights must not all be 0",
                    ));
                }
                RouteTarget::Weighted { clusters, total }
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    format!("{at}.weighted_clusters"),
                    "set either \"cluster\" or \"weighted_clusters\", not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::new(
                    format!("{at}.cluster"),
                    "required (or \"weighted_clusters\" for a split)",
                ));
            }
        };
        let rate_limit = route
            .rate_limit
            .as_ref()
            .map(|r| rate_limit(&format!("{at}.rate_limit"), r))
            .transpose()?;
        Ok(RouteSpec {
            key: RouteKey::new(listener, &route.sni),
            target,
            rate_limit,
        })
    }

    /// The first cluster of `target` that re-encrypts, if any.
    fn tls_cluster<'t>(&self, target: &'t RouteTarget) -> Option<&'t str> {
        let has_tls = |name: &str| self.clusters.get(name).is_some_and(|c| c.encrypts());
        target.clusters().find(|n| has_tls(n))
    }

    fn cluster(&self, path: String, name: &str) -> Result<String, ConfigError> {
        if self.clusters.contains_key(name) {
            Ok(name.to_owned())
        } else {
            Err(ConfigError::new(path, format!("no cluster named {name:?}")))
        }
    }
}

/// Why a passthrough route may not use cluster `name`.
fn passthrough_tls_message(name: &str) -> String {
    format!(
        "cluster {name:?} dials endpoints over mTLS (\"tls\"), but passthrough forwards the client's TLS untouched; use a terminate listener or a cluster without \"tls\""
    )
}

impl TlsContext {
    /// The server config pair of terminate listeners, built on first use.
    fn server_tls(
        &mut self,
        identity: &Identity,
        path: &str,
    ) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>), ConfigError> {
        if let Some(tls) = &self.server_tls {
            return Ok(tls.clone());
        }
        let plain = build_server_tls(&self.bundles, identity, &self.provider, path)?;
        let mut hop = ServerConfig::clone(&plain);
        // The server picks the first of its own protocols the client offers.
        hop.alpn_protocols = tls::tunnel_protocols();
        let tls = (plain, Arc::new(hop));
        self.server_tls = Some(tls.clone());
        Ok(tls)
    }

    /// The server config workloads connect to: the gateway's identity, and
    /// client SVIDs verified against the gateway's own trust domain only (a
    /// local workload is never of another zone).
    fn workload_server_tls(
        &mut self,
        path: &str,
        mode: raw::WorkloadTls,
    ) -> Result<Arc<ServerConfig>, ConfigError> {
        let identity = self.identity.clone().ok_or_else(|| {
            ConfigError::new(
                path,
                format!(
                    "workload_tls {:?} presents the gateway's identity to workloads, but \"identity\" is missing",
                    mode.as_str()
                ),
            )
        })?;
        if let Some(config) = &self.workload_tls {
            return Ok(config.clone());
        }
        let own = identity.spiffe_id.trust_domain();
        let Some(roots) = self.bundles.get(own) else {
            return Err(ConfigError::new(
                path,
                format!(
                    "workload_tls {:?} verifies workloads against the gateway's own trust domain {:?}, but trust_bundles has no bundle for it — add it",
                    mode.as_str(),
                    own.as_str()
                ),
            ));
        };
        let own_only = BTreeMap::from([(own.clone(), roots.clone())]);
        let verifier = SpiffeClientVerifier::new(&own_only, self.provider.clone()).map_err(
            |(domain, e)| ConfigError::new(format!("trust_bundles[{:?}]", domain.as_str()), e),
        )?;
        let config = tls::server_config(self.provider.clone(), &identity, Arc::new(verifier))
            .map_err(|e| ConfigError::new(path, format!("cannot build TLS server: {e}")))?;
        self.workload_tls = Some(config.clone());
        Ok(config)
    }

    fn require_identity(&self, path: &str, mode: raw::Mode) -> Result<&Arc<Identity>, ConfigError> {
        self.identity.as_ref().ok_or_else(|| {
            ConfigError::new(
                path,
                format!(
                    "a {} listener needs the gateway's identity (cert_chain_pem, private_key_pem) but \"identity\" is missing",
                    mode.as_str()
                ),
            )
        })
    }
}

fn compile_identity(identity: &raw::Identity) -> Result<Identity, ConfigError> {
    let chain = tls::load_certs(&identity.cert_chain_pem)
        .map_err(|e| ConfigError::new("identity.cert_chain_pem", e))?;
    let key = tls::load_key(&identity.private_key_pem)
        .map_err(|e| ConfigError::new("identity.private_key_pem", e))?;
    let spiffe_id = chain
        .first()
        .ok_or_else(|| ConfigError::new("identity.cert_chain_pem", "empty chain"))
        .and_then(|leaf| {
            tls::spiffe_id_of(leaf)
                .map_err(|e| ConfigError::new("identity.cert_chain_pem", format!("leaf: {e}")))
        })?;
    CertifiedKey::from_der(chain.clone(), key.clone_key(), &tls::provider()).map_err(|e| {
        ConfigError::new(
            "identity.private_key_pem",
            format!("does not match the leaf certificate of cert_chain_pem (or is unusable): {e}"),
        )
    })?;
    Ok(Identity {
        chain,
        key,
        spiffe_id,
    })
}

/// Compiles a route's `rules`; `at` is their path.
fn compile_rules(at: &str, rules: &[raw::AuthzRule]) -> Result<Rules, ConfigError> {
    rules
        .iter()
        .enumerate()
        .map(|(k, rule)| {
            let pattern = SpiffePattern::parse(&rule.id)
                .map_err(|e| ConfigError::new(format!("{at}[{k}].id"), e.to_string()))?;
            Ok(Rule {
                action: rule.action,
                pattern,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Rules::new)
}

fn rate_limit(at: &str, raw: &raw::RateLimit) -> Result<RateLimitSpec, ConfigError> {
    if !(raw.connections_per_second.is_finite() && raw.connections_per_second > 0.0) {
        return Err(ConfigError::new(
            format!("{at}.connections_per_second"),
            "must be a number greater than 0",
        ));
    }
    if raw.burst == 0 {
        return Err(ConfigError::new(
            format!("{at}.burst"),
            "must be at least 1",
        ));
    }
    Ok(RateLimitSpec {
        per_second: raw.connections_per_second,
        burst: f64::from(raw.burst),
    })
}

/// Compiles the cluster at `at` (e.g. `clusters[3]`); its name is checked
/// against the other clusters by the caller.
fn compile_cluster(
    at_cluster: &str,
    cluster: &raw::Cluster,
    upstream_tls: &mut TlsContext,
) -> Result<ClusterSpec, ConfigError> {
    let at = |field: &str| format!("{at_cluster}.{field}");
    if cluster.name.is_empty() {
        return Err(ConfigError::new(at("name"), "must not be empty"));
    }
    if cluster.endpoints.is_empty() {
        return Err(ConfigError::new(
            at("endpoints"),
            "needs at least one endpoint",
        ));
    }
    if cluster.endpoints.len() > usize::from(u16::MAX) {
        return Err(ConfigError::new(
            at("endpoints"),
            format!("at most {} endpoints per cluster", u16::MAX),
        ));
    }
    if cluster.connect_timeout_ms == 0 {
        return Err(ConfigError::new(
            at("connect_timeout_ms"),
            "must be greater than 0",
        ));
    }
    let cluster_tls = cluster
        .tls
        .as_ref()
        .map(|t| upstream_tls.compile(&at("tls"), t))
        .transpose()?;
    let mut endpoints: Vec<EndpointSpec> = Vec::with_capacity(cluster.endpoints.len());
    for (j, endpoint) in cluster.endpoints.iter().enumerate() {
        let address: SocketAddr = endpoint.address.parse().map_err(|_| {
            ConfigError::new(
                at(&format!("endpoints[{j}].address")),
                format!("{:?} is not an ip:port socket address", endpoint.address),
            )
        })?;
        if endpoint.weight == 0 {
            return Err(ConfigError::new(
                at(&format!("endpoints[{j}].weight")),
                "must be at least 1",
            ));
        }
        let tls = match &endpoint.tls {
            Some(t) => Some(upstream_tls.compile(&at(&format!("endpoints[{j}].tls")), t)?),
            None => cluster_tls.clone(),
        };
        // One address may appear once per pinned identity: two peers advertising the same
        // gateway address are two endpoints, and only the real owner's handshake succeeds.
        let peer = tls.as_ref().map(|t| &t.peer);
        if endpoints
            .iter()
            .any(|e| e.address == address && e.peer() == peer)
        {
            return Err(ConfigError::new(
                at(&format!("endpoints[{j}].address")),
                format!("duplicate endpoint {address} (raise its weight instead)"),
            ));
        }
        endpoints.push(EndpointSpec {
            address,
            weight: endpoint.weight,
            priority: endpoint.priority,
            tls,
        });
    }
    let od = &cluster.outlier_detection;
    if od.base_ejection_ms == 0 {
        return Err(ConfigError::new(
            at("outlier_detection.base_ejection_ms"),
            "must be greater than 0",
        ));
    }
    if od.max_ejection_ms < od.base_ejection_ms {
        return Err(ConfigError::new(
            at("outlier_detection.max_ejection_ms"),
            "must be at least base_ejection_ms",
        ));
    }
    if od.max_ejection_percent > 100 {
        return Err(ConfigError::new(
            at("outlier_detection.max_ejection_percent"),
            "must be between 0 and 100",
        ));
    }
    let health_check = cluster
        .health_check
        .as_ref()
        .map(|hc| {
            let positive = [
                ("interval_ms", hc.interval_ms),
                ("timeout_ms", hc.timeout_ms),
                ("healthy_threshold", u64::from(hc.healthy_threshold)),
                ("unhealthy_threshold", u64::from(hc.unhealthy_threshold)),
            ];
            if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
                return Err(ConfigError::new(
                    at(&format!("health_check.{field}")),
                    "must be greater than 0",
                ));
            }
            Ok(HealthCheckSpec {
                interval: Duration::from_millis(hc.interval_ms),
                timeout: Duration::from_millis(hc.timeout_ms),
                healthy_threshold: hc.healthy_threshold,
                unhealthy_threshold: hc.unhealthy_threshold,
            })
        })
        .transpose()?;
    let breaker = &cluster.circuit_breaker;
    for (field, value) in [
        ("max_connections", breaker.max_connections),
        ("max_pending", breaker.max_pending),
    ] {
        if value == Some(0) {
            return Err(ConfigError::new(
                at(&format!("circuit_breaker.{field}")),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
    }
    Ok(ClusterSpec {
        name: Arc::from(cluster.name.as_str()),
        endpoints,
        connect_timeout: Duration::from_millis(cluster.connect_timeout_ms),
        lb: cluster.lb,
        idle_timeout: Some(Duration::from_millis(cluster.idle_timeout_ms)).filter(|d| !d.is_zero()),
        outlier: OutlierSpec {
            consecutive_failures: od.consecutive_failures,
            base_ejection: Duration::from_millis(od.base_ejection_ms),
            max_ejection: Duration::from_millis(od.max_ejection_ms),
            max_ejection_percent: od.max_ejection_percent,
        },
        health_check,
        max_connections: breaker.max_connections.map(u64::from),
        max_pending: breaker.max_pending.map(u64::from),
    })
}

impl TlsContext {
    /// Compiles `tls` settings of a cluster or endpoint, sharing the client
    /// config of its peer SPIFFE ID (see [`TlsContext`]).
    fn compile(
        &mut self,
        at: &str,
        raw: &raw::UpstreamTls,
    ) -> Result<Arc<UpstreamTlsSpec>, ConfigError> {
        let identity = self.identity.clone().ok_or_else(|| {
            ConfigError::new(
                at,
                "mTLS to an endpoint presents the gateway's identity, but \"identity\" is missing",
            )
        })?;
        let server_name = ServerName::try_from(raw.sni.clone()).map_err(|_| {
            ConfigError::new(
                format!("{at}.sni"),
                format!("{:?} is not a valid TLS server name", raw.sni),
            )
        })?;
        let peer = SpiffeId::parse(&raw.peer_spiffe_id)
            .map_err(|e| ConfigError::new(format!("{at}.peer_spiffe_id"), e.to_string()))?;
        let config = match self.by_peer.get(&peer) {
            Some(config) => config.clone(),
            None => {
                let Some(roots) = self.bundles.get(peer.trust_domain()) else {
                    return Err(ConfigError::new(
                        format!("{at}.peer_spiffe_id"),
                        format!(
                            "no trust bundle for trust domain {:?} — add it to trust_bundles",
                            peer.trust_domain().as_str()
                        ),
                    ));
                };
                let config = tls::client_config(
                    self.provider.clone(),
                    &identity,
                    roots.clone(),
                    peer.clone(),
                )
                .map_err(|e| ConfigError::new(at, format!("cannot build TLS client: {e}")))?;
                self.by_peer.insert(peer.clone(), config.clone());
                config
            }
        };
        if raw.tunnel && !raw.convey_caller {
            return Err(ConfigError::new(
                format!("{at}.tunnel"),
                "the tunnel carries the caller: it needs convey_caller: true",
            ));
        }
        let config = if raw.convey_caller {
            self.hop_by_peer
                .entry((peer.clone(), raw.tunnel))
                .or_insert_with(|| {
                    let mut hop = ClientConfig::clone(&config);
                    hop.alpn_protocols = if raw.tunnel {
                        tls::tunnel_protocols()
                    } else {
                        tls::hop_protocols()
                    };
                    Arc::new(hop)
                })
                .clone()
        } else {
            config
        };
        Ok(Arc::new(UpstreamTlsSpec {
            server_name,
            peer,
            config,
            convey_caller: raw.convey_caller,
            tunnel: raw.tunnel,
        }))
    }
}

fn build_server_tls(
    bundles: &BTreeMap<TrustDomain, Arc<RootCertStore>>,
    identity: &Identity,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    path: &str,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let verifier = SpiffeClientVerifier::new(bundles, provider.clone())
        .map_err(|(domain, e)| {
            ConfigError::new(format!("trust_bundles[{:?}]", domain.as_str()), e)
        })?
        .authorizing();
    tls::server_config(provider.clone(), identity, Arc::new(verifier))
        .map_err(|e| ConfigError::new(path, format!("cannot build TLS server: {e}")))
}

#[cfg(test)]
mod tests;

/// The JSON Schema of the config document, derived from the serde types that
/// parse it, so the Python models can be checked against the one definition.
/// The patch document's types (`Patch`, `RoutePatch`, `ConnectRoutePatch`)
/// are in its `$defs` too: one schema for everything the gateway reads.
pub fn config_schema_json() -> String {
    let mut generator = schemars::generate::SchemaSettings::default().into_generator();
    generator.subschema_for::<raw::Patch>();
    // A schemars schema is a JSON value already, so writing it out cannot fail.
    generator
        .into_root_schema_for::<raw::Document>()
        .as_value()
        .to_string()
}

/// The canonical form of a CONNECT authority (`host:port`, host lowercased),
/// or why it is not one: the host is DNS labels of letters, digits and `-`
/// (at most 253 bytes), the port 1-65535.
pub(crate) fn parse_authority(text: &str) -> Result<String, String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not host:port"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !port.starts_with('0') => {}
        _ => return Err(format!("{text:?}: the port must be 1-65535")),
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!(
            "{text:?}: the host must be DNS labels (letters, digits, '-'), at most 253 bytes"
        ));
    }
    Ok(format!("{}:{port}", host.to_ascii_lowercase()))
}
