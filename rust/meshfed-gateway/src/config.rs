//! Compiling the JSON config document into a frozen [`CompiledConfig`].
//!
//! Everything is checked here, once: names, addresses, cluster references,
//! PEM material, SPIFFE IDs, and the rustls configurations are built. The
//! data plane only ever reads a compiled config. Errors carry the JSON path
//! of the offending field.

mod raw;
mod routes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::spiffe::{SpiffeId, SpiffePattern, TrustDomain};
use crate::tls::{self, Identity, SpiffeClientVerifier};

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
#[derive(Debug)]
pub struct CompiledConfig {
    pub(crate) identity: Option<SpiffeId>,
    pub(crate) handshake_timeout: Duration,
    pub(crate) listeners: Vec<ListenerSpec>,
    pub(crate) clusters: HashMap<String, Arc<ClusterSpec>>,
}

/// One listener: where it binds and what it does with connections.
#[derive(Debug)]
pub(crate) struct ListenerSpec {
    pub(crate) name: String,
    pub(crate) address: SocketAddr,
    pub(crate) mode: ListenerMode,
}

/// What a listener does with an accepted connection.
#[derive(Debug)]
pub(crate) enum ListenerMode {
    /// Peek the ClientHello, route on SNI, forward the TLS bytes untouched.
    Passthrough { routes: SniRouter<String> },
    /// Finish mTLS, authorize the caller, forward plain bytes.
    Terminate {
        routes: SniRouter<TerminateRoute>,
        tls: Arc<ServerConfig>,
    },
    /// Accept plain TCP, open mTLS to a peer gateway.
    Originate {
        cluster: String,
        server_name: ServerName<'static>,
        peer: SpiffeId,
        tls: Arc<ClientConfig>,
    },
}

/// A terminate route: target cluster and who may use it.
#[derive(Debug)]
pub(crate) struct TerminateRoute {
    pub(crate) cluster: String,
    pub(crate) allow: Vec<SpiffePattern>,
}

impl TerminateRoute {
    /// Default deny: only identities matched by an `allow` pattern pass.
    pub(crate) fn allows(&self, id: &SpiffeId) -> bool {
        self.allow.iter().any(|pattern| pattern.matches(id))
    }
}

/// An upstream cluster.
#[derive(Debug)]
pub(crate) struct ClusterSpec {
    pub(crate) name: String,
    pub(crate) endpoints: Vec<SocketAddr>,
    pub(crate) connect_timeout: Duration,
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
            clusters: HashMap::new(),
        }
    }

    /// Listener names, in document order.
    pub fn listener_names(&self) -> impl Iterator<Item = &str> {
        self.listeners.iter().map(|l| l.name.as_str())
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
        self.listeners.iter().find(|l| l.name == name)
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
    let provider = tls::provider();

    let identity = doc.identity.as_ref().map(compile_identity).transpose()?;

    let mut bundles = BTreeMap::new();
    for (domain, pem) in &doc.trust_bundles {
        let path = format!("trust_bundles[{domain:?}]");
        let domain =
            TrustDomain::parse(domain).map_err(|e| ConfigError::new(&path, e.to_string()))?;
        let roots = tls::root_store(pem).map_err(|e| ConfigError::new(&path, e))?;
        bundles.insert(domain, Arc::new(roots));
    }

    let clusters = compile_clusters(&doc.clusters)?;

    let mut ctx = ListenerContext {
        identity: identity.as_ref(),
        bundles: &bundles,
        clusters: &clusters,
        provider: &provider,
        server_tls: None,
    };
    let mut listeners = Vec::with_capacity(doc.listeners.len());
    let mut names = HashSet::new();
    let mut fixed_addresses = HashMap::new();
    for (i, listener) in doc.listeners.iter().enumerate() {
        let at = |field: &str| format!("listeners[{i}].{field}");
        let name = listener.name.as_str();
        if name.is_empty() {
            return Err(ConfigError::new(at("name"), "must not be empty"));
        }
        if !names.insert(name) {
            return Err(ConfigError::new(
                at("name"),
                format!("duplicate listener name {name:?}"),
            ));
        }
        let address: SocketAddr = listener.address.parse().map_err(|_| {
            ConfigError::new(
                at("address"),
                format!("{:?} is not an ip:port socket address", listener.address),
            )
        })?;
        if address.port() != 0 {
            if let Some(other) = fixed_addresses.insert(address, name) {
                return Err(ConfigError::new(
                    at("address"),
                    format!("{address} is already used by listener {other:?}"),
                ));
            }
        }
        let mode = ctx.compile_mode(i, listener)?;
        listeners.push(ListenerSpec {
            name: name.to_owned(),
            address,
            mode,
        });
    }

    Ok(CompiledConfig {
        identity: identity.map(|i| i.spiffe_id),
        handshake_timeout: Duration::from_millis(doc.handshake_timeout_ms),
        listeners,
        clusters,
    })
}

/// What compiling a listener's mode needs from the rest of the document.
struct ListenerContext<'a> {
    identity: Option<&'a Identity>,
    bundles: &'a BTreeMap<TrustDomain, Arc<RootCertStore>>,
    clusters: &'a HashMap<String, Arc<ClusterSpec>>,
    provider: &'a Arc<rustls::crypto::CryptoProvider>,
    /// Built on the first terminate listener, shared by all of them.
    server_tls: Option<Arc<ServerConfig>>,
}

impl ListenerContext<'_> {
    fn compile_mode(
        &mut self,
        i: usize,
        listener: &raw::Listener,
    ) -> Result<ListenerMode, ConfigError> {
        let at = |field: &str| format!("listeners[{i}].{field}");
        let mode = listener.mode;
        let originate_only = [
            ("cluster", listener.cluster.is_some()),
            ("sni", listener.sni.is_some()),
            ("peer_spiffe_id", listener.peer_spiffe_id.is_some()),
        ];
        if mode == raw::Mode::Originate {
            if listener.routes.is_some() {
                return Err(ConfigError::new(
                    at("routes"),
                    "originate listeners have no routes (they use \"cluster\" and \"sni\")",
                ));
            }
        } else if let Some((field, _)) = originate_only.iter().find(|(_, present)| *present) {
            return Err(ConfigError::new(
                at(field),
                format!("only for originate listeners, not {}", mode.as_str()),
            ));
        }
        match mode {
            raw::Mode::Passthrough => {
                let routes = self.routes(i, listener, |j, route| {
                    if route.allow.is_some() {
                        return Err(ConfigError::new(
                            at(&format!("routes[{j}].allow")),
                            "only terminate routes authorize callers; passthrough keeps TLS end to end",
                        ));
                    }
                    self.cluster(at(&format!("routes[{j}].cluster")), &route.cluster)
                })?;
                Ok(ListenerMode::Passthrough { routes })
            }
            raw::Mode::Terminate => {
                let identity = self.require_identity(&at("mode"), mode)?;
                let routes = self.routes(i, listener, |j, route| {
                    let cluster =
                        self.cluster(at(&format!("routes[{j}].cluster")), &route.cluster)?;
                    let allow = route
                        .allow
                        .iter()
                        .flatten()
                        .enumerate()
                        .map(|(k, pattern)| {
                            SpiffePattern::parse(pattern).map_err(|e| {
                                ConfigError::new(
                                    at(&format!("routes[{j}].allow[{k}]")),
                                    e.to_string(),
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(TerminateRoute { cluster, allow })
                })?;
                let tls = match &self.server_tls {
                    Some(tls) => tls.clone(),
                    None => {
                        let tls =
                            build_server_tls(self.bundles, identity, self.provider, &at("mode"))?;
                        self.server_tls = Some(tls.clone());
                        tls
                    }
                };
                Ok(ListenerMode::Terminate { routes, tls })
            }
            raw::Mode::Originate => {
                let identity = self.require_identity(&at("mode"), mode)?;
                let required = |field: &str, value: &Option<String>| {
                    value.clone().ok_or_else(|| {
                        ConfigError::new(at(field), "required for originate listeners")
                    })
                };
                let cluster = required("cluster", &listener.cluster)?;
                let sni = required("sni", &listener.sni)?;
                let peer_spiffe_id = required("peer_spiffe_id", &listener.peer_spiffe_id)?;
                let cluster = self.cluster(at("cluster"), &cluster)?;
                let server_name = ServerName::try_from(sni.clone()).map_err(|_| {
                    ConfigError::new(at("sni"), format!("{sni:?} is not a valid TLS server name"))
                })?;
                let peer = SpiffeId::parse(&peer_spiffe_id)
                    .map_err(|e| ConfigError::new(at("peer_spiffe_id"), e.to_string()))?;
                let Some(roots) = self.bundles.get(peer.trust_domain()) else {
                    return Err(ConfigError::new(
                        at("peer_spiffe_id"),
                        format!(
                            "no trust bundle for trust domain {:?} — add it to trust_bundles",
                            peer.trust_domain().as_str()
                        ),
                    ));
                };
                let tls = tls::client_config(
                    self.provider.clone(),
                    identity,
                    roots.clone(),
                    peer.clone(),
                )
                .map_err(|e| {
                    ConfigError::new(at("mode"), format!("cannot build TLS client: {e}"))
                })?;
                Ok(ListenerMode::Originate {
                    cluster,
                    server_name,
                    peer,
                    tls,
                })
            }
        }
    }

    /// Compiles the `routes` of a passthrough or terminate listener.
    fn routes<R>(
        &self,
        i: usize,
        listener: &raw::Listener,
        mut route: impl FnMut(usize, &raw::Route) -> Result<R, ConfigError>,
    ) -> Result<SniRouter<R>, ConfigError> {
        let Some(routes) = &listener.routes else {
            return Err(ConfigError::new(
                format!("listeners[{i}].routes"),
                format!(
                    "required for {} listeners (may be empty)",
                    listener.mode.as_str()
                ),
            ));
        };
        let mut entries = Vec::with_capacity(routes.len());
        for (j, raw_route) in routes.iter().enumerate() {
            entries.push((raw_route.sni.clone(), route(j, raw_route)?));
        }
        SniRouter::new(entries)
            .map_err(|(j, msg)| ConfigError::new(format!("listeners[{i}].routes[{j}].sni"), msg))
    }

    fn cluster(&self, path: String, name: &str) -> Result<String, ConfigError> {
        if self.clusters.contains_key(name) {
            Ok(name.to_owned())
        } else {
            Err(ConfigError::new(path, format!("no cluster named {name:?}")))
        }
    }

    fn require_identity(&self, path: &str, mode: raw::Mode) -> Result<&Identity, ConfigError> {
        self.identity.ok_or_else(|| {
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

fn compile_clusters(
    clusters: &[raw::Cluster],
) -> Result<HashMap<String, Arc<ClusterSpec>>, ConfigError> {
    let mut out = HashMap::with_capacity(clusters.len());
    for (i, cluster) in clusters.iter().enumerate() {
        let at = |field: &str| format!("clusters[{i}].{field}");
        if cluster.name.is_empty() {
            return Err(ConfigError::new(at("name"), "must not be empty"));
        }
        if cluster.endpoints.is_empty() {
            return Err(ConfigError::new(
                at("endpoints"),
                "needs at least one endpoint",
            ));
        }
        if cluster.connect_timeout_ms == 0 {
            return Err(ConfigError::new(
                at("connect_timeout_ms"),
                "must be greater than 0",
            ));
        }
        let mut endpoints = Vec::with_capacity(cluster.endpoints.len());
        for (j, endpoint) in cluster.endpoints.iter().enumerate() {
            let address = endpoint.address.parse().map_err(|_| {
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
            endpoints.push(address);
        }
        let spec = ClusterSpec {
            name: cluster.name.clone(),
            endpoints,
            connect_timeout: Duration::from_millis(cluster.connect_timeout_ms),
        };
        if out.insert(cluster.name.clone(), Arc::new(spec)).is_some() {
            return Err(ConfigError::new(
                at("name"),
                format!("duplicate cluster name {:?}", cluster.name),
            ));
        }
    }
    Ok(out)
}

fn build_server_tls(
    bundles: &BTreeMap<TrustDomain, Arc<RootCertStore>>,
    identity: &Identity,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    path: &str,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let verifier =
        SpiffeClientVerifier::new(bundles, provider.clone()).map_err(|(domain, e)| {
            ConfigError::new(format!("trust_bundles[{:?}]", domain.as_str()), e)
        })?;
    tls::server_config(provider.clone(), identity, Arc::new(verifier))
        .map_err(|e| ConfigError::new(path, format!("cannot build TLS server: {e}")))
}

#[cfg(test)]
mod tests;
