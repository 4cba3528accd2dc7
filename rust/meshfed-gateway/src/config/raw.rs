//! The config document as Python sends it: plain serde types that mirror
//! the JSON one to one, with unknown fields refused everywhere.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default for `handshake_timeout_ms`.
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Default for a cluster's `connect_timeout_ms`.
pub(crate) const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Default for a listener's `limits.max_connections`. A bound in the manner
/// of HAProxy's `maxconn` and Envoy's listener connection limit: far above
/// what one zone's east-west traffic holds open, low enough that the fd
/// budget below is one an operator can grant. Each proxied connection holds
/// two file descriptors (client and upstream), so a listener at its cap
/// holds about 20,000: the process's `ulimit -n` must exceed twice the sum
/// of its listeners' caps plus what the control plane needs (API, peering,
/// stores: about 1,024), or the caps are lowered to fit.
pub(crate) const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Default for a listener's `limits.max_handshakes`: a tenth of
/// `max_connections`, so clients that have not authenticated (before or in
/// their handshake, one fd each, for at most `handshake_timeout_ms`) can
/// never hold the places of authenticated traffic. HAProxy bounds the same
/// with `maxsslconn`; 1,000 handshakes in flight is about a second of one
/// core's full mTLS handshakes, room for an honest burst of reconnects.
pub(crate) const DEFAULT_MAX_HANDSHAKES: u32 = 1_000;

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Document {
    #[serde(default)]
    pub(crate) identity: Option<Identity>,
    #[serde(default)]
    pub(crate) trust_bundles: BTreeMap<String, String>,
    #[serde(default = "default_handshake_timeout_ms")]
    pub(crate) handshake_timeout_ms: u64,
    #[serde(default)]
    pub(crate) listeners: Vec<Listener>,
    #[serde(default)]
    pub(crate) clusters: Vec<Cluster>,
}

/// A patch of the running config: clusters and listeners added or replaced
/// whole by name, or removed by name; routes of one listener added,
/// replaced (by SNI / authority) or removed. Identity, trust bundles and
/// the handshake timeout are not patchable: change them with a full
/// document.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Patch {
    /// Added, or replacing the cluster of the same name.
    #[serde(default)]
    pub(crate) clusters: Vec<Cluster>,
    #[serde(default)]
    pub(crate) remove_clusters: Vec<String>,
    /// Added, or replacing the listener of the same name (with its routes).
    #[serde(default)]
    pub(crate) listeners: Vec<Listener>,
    #[serde(default)]
    pub(crate) remove_listeners: Vec<String>,
    /// Route edits of passthrough and terminate listeners.
    #[serde(default)]
    pub(crate) routes: Vec<RoutePatch>,
    /// Route edits of connect listeners.
    #[serde(default)]
    pub(crate) connect_routes: Vec<ConnectRoutePatch>,
}

/// Route edits of one passthrough or terminate listener.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoutePatch {
    pub(crate) listener: String,
    /// Added, or replacing the route of the same SNI pattern.
    #[serde(default)]
    pub(crate) upsert: Vec<Route>,
    /// SNI patterns of routes to remove.
    #[serde(default)]
    pub(crate) remove: Vec<String>,
}

/// Route edits of one connect listener.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConnectRoutePatch {
    pub(crate) listener: String,
    /// Added, or replacing the route of the same authority.
    #[serde(default)]
    pub(crate) upsert: Vec<ConnectRoute>,
    /// Authorities of routes to remove.
    #[serde(default)]
    pub(crate) remove: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Identity {
    pub(crate) cert_chain_pem: String,
    pub(crate) private_key_pem: String,
}

/// A listener. `mode` decides which of the optional fields apply; the
/// compiler rejects fields that do not belong to the mode. (A flat struct
/// rather than a serde-tagged enum, so errors keep their exact JSON path.)
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Listener {
    pub(crate) name: String,
    pub(crate) address: String,
    pub(crate) mode: Mode,
    /// passthrough, terminate
    pub(crate) routes: Option<Vec<Route>>,
    /// originate: the cluster to dial; its endpoints say how (plain or mTLS).
    pub(crate) cluster: Option<String>,
    /// terminate: SPIFFE IDs of the peer gateways that may vouch for the
    /// caller over the hop protocol (ALPN `meshfed-caller/1`), each only for
    /// callers of its own trust domain. Default none. An ID of a trust
    /// domain without a bundle is accepted but can never connect (so a
    /// bundle withdrawn before its peer's exports does not fail the config).
    pub(crate) trusted_gateways: Option<Vec<String>>,
    /// originate: how local workloads connect. Default `plain`.
    pub(crate) workload_tls: Option<WorkloadTls>,
    /// connect: which cluster each CONNECT authority (`host:port`) reaches.
    pub(crate) connect_routes: Option<Vec<ConnectRoute>>,
    /// Caps on the listener's connections, every mode.
    #[serde(default)]
    pub(crate) limits: ListenerLimits,
}

/// Caps on one listener's connections. A connection over a cap is accepted
/// and closed at once (so the kernel's backlog never fills) and counted in
/// `connections_refused_over_limit` or `handshakes_refused_over_limit`.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListenerLimits {
    /// Connections open at once, in any phase.
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: u32,
    /// Connections open at once that have not finished their handshake
    /// (the ClientHello of passthrough, mTLS and the caller header of
    /// terminate, a workload's TLS on originate); each holds its slot at
    /// most `handshake_timeout_ms`. Never more than `max_connections`.
    #[serde(default = "default_max_handshakes")]
    pub(crate) max_handshakes: u32,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_handshakes: default_max_handshakes(),
        }
    }
}

/// How an originate listener accepts local workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WorkloadTls {
    /// Plain TCP; the gateway is the caller.
    Plain,
    /// TLS (a first byte of 0x16) as in `strict`, anything else as `plain`.
    Permissive,
    /// mTLS with an X.509-SVID of the gateway's own trust domain, which
    /// becomes the caller; anything else is refused.
    Strict,
}

impl WorkloadTls {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Permissive => "permissive",
            Self::Strict => "strict",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    Passthrough,
    Terminate,
    Originate,
    /// An HTTP CONNECT proxy for local workloads: the authority a client
    /// asks for picks the cluster (one listener for many imports).
    Connect,
}

impl Mode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Passthrough => "passthrough",
            Self::Terminate => "terminate",
            Self::Originate => "originate",
            Self::Connect => "connect",
        }
    }
}

/// A route of a connect listener: a client's `CONNECT authority` reaches
/// `cluster`, as an originate listener of that cluster would.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConnectRoute {
    /// `host:port`, the host lowercase DNS labels (meshfed names imports
    /// `<service>.<namespace>.<peer>:<port>`).
    pub(crate) authority: String,
    pub(crate) cluster: String,
}

/// An SNI route. Exactly one of `cluster` / `weighted_clusters`;
/// `rules`, `proxy_protocol` and `source_rate_limit` only in terminate mode.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Route {
    pub(crate) sni: String,
    /// All traffic of the route goes to this cluster.
    pub(crate) cluster: Option<String>,
    /// Traffic split across clusters by weight (A/B, canary).
    pub(crate) weighted_clusters: Option<Vec<WeightedCluster>>,
    /// Who may use the route, in order: the first rule whose `id` pattern
    /// matches the caller decides; no match (or no rules) denies.
    pub(crate) rules: Option<Vec<AuthzRule>>,
    /// Send a PROXY protocol v2 header (source, destination, caller SPIFFE ID)
    /// to the endpoint before any byte of the client.
    #[serde(default)]
    pub(crate) proxy_protocol: bool,
    /// Token bucket on new connections of the route, all callers together.
    pub(crate) rate_limit: Option<RateLimit>,
    /// Token bucket on new connections of the route, one per caller SPIFFE ID.
    pub(crate) source_rate_limit: Option<RateLimit>,
}

/// One authorization rule: `action` for the callers `id` matches (`*`, an
/// exact SPIFFE ID, or `spiffe://td/prefix/*`).
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthzRule {
    pub(crate) action: crate::authz::Action,
    pub(crate) id: String,
}

/// One cluster of a weighted split.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct WeightedCluster {
    pub(crate) cluster: String,
    pub(crate) weight: u32,
}

/// A token bucket: `connections_per_second` refill, `burst` capacity.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateLimit {
    pub(crate) connections_per_second: f64,
    pub(crate) burst: u32,
}

/// Load-balancing policy of a cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Lb {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastRequest,
    Maglev,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Cluster {
    pub(crate) name: String,
    pub(crate) endpoints: Vec<Endpoint>,
    #[serde(default = "default_connect_timeout_ms")]
    pub(crate) connect_timeout_ms: u64,
    #[serde(default)]
    pub(crate) lb: Lb,
    /// Close a proxied connection after this long without a byte either
    /// way; 0 disables.
    #[serde(default = "default_idle_timeout_ms")]
    pub(crate) idle_timeout_ms: u64,
    #[serde(default)]
    pub(crate) outlier_detection: OutlierDetection,
    pub(crate) health_check: Option<HealthCheck>,
    #[serde(default)]
    pub(crate) circuit_breaker: CircuitBreaker,
    /// Connect to the endpoints over mTLS (terminate and originate only);
    /// an endpoint's own `tls` takes precedence.
    pub(crate) tls: Option<UpstreamTls>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Endpoint {
    pub(crate) address: String,
    #[serde(default = "default_weight")]
    pub(crate) weight: u32,
    /// Locality priority: 0 = local, then 1, 2, ... in failover order.
    #[serde(default)]
    pub(crate) priority: u32,
    /// mTLS to this endpoint (a peer gateway), overriding the cluster's:
    /// one failover cluster mixes plain local endpoints and the gateways of
    /// several peers, each with its own SNI and SPIFFE ID.
    pub(crate) tls: Option<UpstreamTls>,
}

/// Passive health: eject an endpoint after consecutive connect failures.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutlierDetection {
    /// Connect failures in a row that eject an endpoint; 0 disables.
    #[serde(default = "default_consecutive_failures")]
    pub(crate) consecutive_failures: u32,
    /// First ejection time; doubles with each ejection in a row.
    #[serde(default = "default_base_ejection_ms")]
    pub(crate) base_ejection_ms: u64,
    /// Ceiling of the ejection time (before jitter).
    #[serde(default = "default_max_ejection_ms")]
    pub(crate) max_ejection_ms: u64,
    /// At most this share of the cluster's endpoints is ejected at once.
    #[serde(default = "default_max_ejection_percent")]
    pub(crate) max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_ms: default_base_ejection_ms(),
            max_ejection_ms: default_max_ejection_ms(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

/// Active TCP health checks, run on the data-plane runtime.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthCheck {
    #[serde(default = "default_hc_interval_ms")]
    pub(crate) interval_ms: u64,
    #[serde(default = "default_hc_timeout_ms")]
    pub(crate) timeout_ms: u64,
    #[serde(default = "default_hc_threshold")]
    pub(crate) healthy_threshold: u32,
    #[serde(default = "default_hc_threshold")]
    pub(crate) unhealthy_threshold: u32,
}

/// Per-cluster circuit breaker; absent limits are unlimited.
#[derive(Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CircuitBreaker {
    pub(crate) max_connections: Option<u32>,
    pub(crate) max_pending: Option<u32>,
}

/// mTLS to an endpoint with the gateway's identity.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamTls {
    pub(crate) sni: String,
    pub(crate) peer_spiffe_id: String,
    /// Offer the hop protocol (ALPN `meshfed-caller/1`) and, when the peer
    /// negotiates it, tell it the caller in a PROXY v2 header inside the tunnel.
    #[serde(default)]
    pub(crate) convey_caller: bool,
    /// Also offer the gateway tunnel (ALPN `meshfed-tunnel/1`, which needs
    /// `convey_caller`): client connections to this endpoint ride pooled
    /// mTLS connections as HTTP/2 CONNECT streams. A peer that does not
    /// negotiate it is dialled per connection, as without it.
    #[serde(default)]
    pub(crate) tunnel: bool,
}

fn default_handshake_timeout_ms() -> u64 {
    DEFAULT_HANDSHAKE_TIMEOUT_MS
}

fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}

fn default_max_connections() -> u32 {
    DEFAULT_MAX_CONNECTIONS
}

fn default_max_handshakes() -> u32 {
    DEFAULT_MAX_HANDSHAKES
}

fn default_weight() -> u32 {
    1
}

fn default_idle_timeout_ms() -> u64 {
    3_600_000
}

fn default_consecutive_failures() -> u32 {
    5
}

fn default_base_ejection_ms() -> u64 {
    30_000
}

fn default_max_ejection_ms() -> u64 {
    300_000
}

fn default_max_ejection_percent() -> u32 {
    50
}

fn default_hc_interval_ms() -> u64 {
    5_000
}

fn default_hc_timeout_ms() -> u64 {
    1_000
}

fn default_hc_threshold() -> u32 {
    2
}
