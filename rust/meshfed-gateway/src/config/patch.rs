//! Compiling a patch document against a compiled config.
//!
//! At 10,000 services a one-endpoint change used to mean compiling a
//! 10,000-cluster document again. A patch names what changed; the next
//! config copies the maps of `Arc`s of this one (pointers, not specs) and
//! compiles only the patched clusters, listeners and routes, with the same
//! checks and the same error paths as the full document would give.
//! Referential integrity is checked against the result through an index of
//! who uses each cluster ([`Referrers`]), kept up to date patch by patch,
//! so removing a cluster does not walk every route.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use super::routes::RouterPatchError;
use super::{
    CompiledConfig, ConfigError, ListenerContext, ListenerMode, ListenerSpec, RouteKey, RouteSpec,
    SniRouter, TlsContext, compile_cluster, listener_address, listener_name, parse_authority,
    passthrough_tls_message, raw, route_keys,
};

/// Something in the config that sends connections to a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Referrer {
    /// A passthrough or terminate route (or one side of its weighted split).
    Route(RouteKey),
    /// An originate listener, by name.
    Originate(Arc<str>),
    /// A connect listener's route for one authority.
    Connect {
        listener: Arc<str>,
        authority: Arc<str>,
    },
}

impl fmt::Display for Referrer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Route(key) => write!(
                f,
                "the route for SNI {:?} of listener {:?}",
                key.sni(),
                key.listener()
            ),
            Self::Originate(listener) => write!(f, "originate listener {listener:?}"),
            Self::Connect {
                listener,
                authority,
            } => write!(
                f,
                "the connect route for {authority:?} of listener {listener:?}"
            ),
        }
    }
}

/// Who uses each cluster, by cluster name. Each set is behind an `Arc`, so
/// the next config copies pointers and clones only the sets it edits.
#[derive(Debug, Default, Clone)]
pub(crate) struct Referrers(HashMap<Arc<str>, Arc<HashSet<Referrer>>>);

impl Referrers {
    /// The users of every cluster of `listeners`.
    pub(super) fn of(listeners: &[Arc<ListenerSpec>]) -> Self {
        let mut referrers = Self::default();
        for listener in listeners {
            referrers.add_listener(listener);
        }
        referrers
    }

    /// Some user of `cluster` (the least, so messages are stable), if any.
    fn first(&self, cluster: &str) -> Option<&Referrer> {
        self.0.get(cluster).and_then(|users| users.iter().min())
    }

    fn users(&self, cluster: &str) -> impl Iterator<Item = &Referrer> {
        self.0
            .get(cluster)
            .into_iter()
            .flat_map(|users| users.iter())
    }

    fn add(&mut self, cluster: &str, who: Referrer) {
        match self.0.get_mut(cluster) {
            Some(users) => {
                Arc::make_mut(users).insert(who);
            }
            None => {
                self.0
                    .insert(Arc::from(cluster), Arc::new(HashSet::from([who])));
            }
        }
    }

    fn remove(&mut self, cluster: &str, who: &Referrer) {
        if let Some(users) = self.0.get_mut(cluster) {
            Arc::make_mut(users).remove(who);
            if users.is_empty() {
                self.0.remove(cluster);
            }
        }
    }

    fn add_listener(&mut self, listener: &ListenerSpec) {
        for (cluster, who) in listener_users(listener) {
            self.add(cluster, who);
        }
    }

    fn remove_listener(&mut self, listener: &ListenerSpec) {
        for (cluster, who) in listener_users(listener) {
            self.remove(cluster, &who);
        }
    }

    fn add_route(&mut self, route: &RouteSpec) {
        for cluster in route.target.clusters() {
            self.add(cluster, Referrer::Route(route.key.clone()));
        }
    }

    fn remove_route(&mut self, route: &RouteSpec) {
        for cluster in route.target.clusters() {
            self.remove(cluster, &Referrer::Route(route.key.clone()));
        }
    }
}

/// `(cluster, user)` for everything of `listener` that names a cluster.
fn listener_users(listener: &ListenerSpec) -> Vec<(&str, Referrer)> {
    match &listener.mode {
        ListenerMode::Passthrough { routes } => routes.values().flat_map(route_users).collect(),
        ListenerMode::Terminate { routes, .. } => routes
            .values()
            .flat_map(|r| route_users(&r.route))
            .collect(),
        ListenerMode::Originate { cluster, .. } => {
            vec![(cluster.as_str(), Referrer::Originate(listener.name.clone()))]
        }
        ListenerMode::Connect { routes } => routes
            .iter()
            .map(|(authority, cluster)| {
                let who = Referrer::Connect {
                    listener: listener.name.clone(),
                    authority: authority.clone(),
                };
                (&**cluster, who)
            })
            .collect(),
    }
}

/// `(cluster, user)` for each cluster `route` sends to.
fn route_users(route: &RouteSpec) -> Vec<(&str, Referrer)> {
    route
        .target
        .clusters()
        .map(|c| (c, Referrer::Route(route.key.clone())))
        .collect()
}

/// The names a patch touched: the gateway rebuilds runtime state (cluster
/// states, route states, sockets, health checks) for these only. Each name
/// is either in the patched config (added or replaced) or not (removed).
#[derive(Debug, Default)]
pub(crate) struct Delta {
    /// Clusters added, replaced or removed.
    pub(crate) clusters: Vec<Arc<str>>,
    /// Listeners added, replaced or removed (route edits keep the listener).
    pub(crate) listeners: Vec<Arc<str>>,
    /// Routes added, replaced or removed, including those of the listeners.
    pub(crate) routes: Vec<RouteKey>,
}

/// Refuses a name given twice in one patch (as an upsert and a removal, or
/// twice either way): the control plane diffs exactly, so this is a bug.
fn once<'a>(
    seen: &mut HashSet<&'a str>,
    name: &'a str,
    at: &str,
    kind: &str,
) -> Result<(), ConfigError> {
    if seen.insert(name) {
        Ok(())
    } else {
        Err(ConfigError::new(
            at,
            format!("{kind} {name:?} appears twice in this patch"),
        ))
    }
}

/// Compiles `doc` against `base`: see [`CompiledConfig::patch`].
pub(super) fn apply(
    base: &CompiledConfig,
    doc: raw::Patch,
) -> Result<(CompiledConfig, Delta), ConfigError> {
    let mut tls = TlsContext::clone(&base.tls);
    let mut referrers = base.referrers.clone();
    let mut delta = Delta::default();

    // Clusters: removals, then upserts (compiled here, and only these).
    let mut clusters = base.clusters.clone();
    let mut cluster_names = HashSet::new();
    for (k, name) in doc.remove_clusters.iter().enumerate() {
        let at = format!("remove_clusters[{k}]");
        once(&mut cluster_names, name, &at, "cluster")?;
        let Some((name, _)) = clusters.remove_entry(name.as_str()) else {
            return Err(ConfigError::new(
                at,
                format!("no cluster named {name:?} to remove"),
            ));
        };
        delta.clusters.push(name);
    }
    let mut encrypting = Vec::new();
    for (i, cluster) in doc.clusters.iter().enumerate() {
        let at = format!("clusters[{i}]");
        let spec = compile_cluster(&at, cluster, &mut tls)?;
        once(
            &mut cluster_names,
            &cluster.name,
            &format!("{at}.name"),
            "cluster",
        )?;
        if spec.encrypts() {
            encrypting.push((at, spec.name.clone()));
        }
        delta.clusters.push(spec.name.clone());
        clusters.insert(spec.name.clone(), Arc::new(spec));
    }

    // Listeners: removals, then upserts, replacing in place.
    let mut listeners = base.listeners.clone();
    let mut index = base.listener_index.clone();
    let mut listener_names = HashSet::new();
    let mut removed = HashSet::new();
    for (k, name) in doc.remove_listeners.iter().enumerate() {
        let at = format!("remove_listeners[{k}]");
        once(&mut listener_names, name, &at, "listener")?;
        let Some(&position) = index.get(name.as_str()) else {
            return Err(ConfigError::new(
                at,
                format!("no listener named {name:?} to remove"),
            ));
        };
        let old = &listeners[position];
        referrers.remove_listener(old);
        delta.routes.extend(route_keys(old).into_iter().cloned());
        delta.listeners.push(old.name.clone());
        removed.insert(position);
    }
    let mut ctx = ListenerContext {
        tls: &mut tls,
        clusters: &clusters,
    };
    let mut upserted_at = HashMap::new();
    for (i, listener) in doc.listeners.iter().enumerate() {
        let at = format!("listeners[{i}]");
        let name = listener_name(&at, listener)?;
        once(
            &mut listener_names,
            &listener.name,
            &format!("{at}.name"),
            "listener",
        )?;
        let address = listener_address(&at, listener)?;
        let spec = Arc::new(ctx.compile_listener(&at, name.clone(), address, listener)?);
        match index.get(&name) {
            Some(&position) => {
                let old = std::mem::replace(&mut listeners[position], spec.clone());
                referrers.remove_listener(&old);
                delta.routes.extend(route_keys(&old).into_iter().cloned());
            }
            None => {
                index.insert(name.clone(), listeners.len());
                listeners.push(spec.clone());
            }
        }
        referrers.add_listener(&spec);
        delta.routes.extend(route_keys(&spec).into_iter().cloned());
        delta.listeners.push(name.clone());
        upserted_at.insert(name, at);
    }
    if !removed.is_empty() {
        listeners = listeners
            .into_iter()
            .enumerate()
            .filter(|(position, _)| !removed.contains(position))
            .map(|(_, listener)| listener)
            .collect();
        index = listeners
            .iter()
            .enumerate()
            .map(|(position, l)| (l.name.clone(), position))
            .collect();
    }
    if !upserted_at.is_empty() {
        // Whole-config check, but only when a listener (hence an address) changed.
        let mut fixed = HashMap::new();
        for listener in &listeners {
            if listener.address.port() == 0 {
                continue;
            }
            if let Some(other) = fixed.insert(listener.address, listener.name.clone()) {
                let (at, other) = match upserted_at.get(&listener.name) {
                    Some(at) => (at, other),
                    None => (&upserted_at[&other], listener.name.clone()),
                };
                return Err(ConfigError::new(
                    format!("{at}.address"),
                    format!("{} is already used by listener {other:?}", listener.address),
                ));
            }
        }
    }

    // Route edits of listeners the patch does not replace.
    let mut route_patched = HashSet::new();
    for (p, edit) in doc.routes.iter().enumerate() {
        let at = format!("routes[{p}]");
        let position = edited_listener(
            &index,
            &listener_names,
            &mut route_patched,
            &at,
            &edit.listener,
        )?;
        let old = listeners[position].clone();
        let mode = match &old.mode {
            ListenerMode::Passthrough { routes } => ListenerMode::Passthrough {
                routes: patch_routes(
                    &at,
                    routes,
                    edit,
                    |path, route| ctx.passthrough_route(path, &old.name, route),
                    |r| r,
                    &mut referrers,
                )?,
            },
            ListenerMode::Terminate { routes, tls } => ListenerMode::Terminate {
                routes: patch_routes(
                    &at,
                    routes,
                    edit,
                    |path, route| ctx.terminate_route(path, &old.name, route),
                    |r| &r.route,
                    &mut referrers,
                )?,
                tls: tls.clone(),
            },
            ListenerMode::Originate { .. } | ListenerMode::Connect { .. } => {
                return Err(ConfigError::new(
                    format!("{at}.listener"),
                    wrong_mode(&old, "routes"),
                ));
            }
        };
        for sni in edit.remove.iter().chain(edit.upsert.iter().map(|r| &r.sni)) {
            delta.routes.push(RouteKey::new(&old.name, sni));
        }
        listeners[position] = Arc::new(ListenerSpec {
            name: old.name.clone(),
            address: old.address,
            mode,
            limits: old.limits,
        });
    }
    let mut connect_patched = HashSet::new();
    for (p, edit) in doc.connect_routes.iter().enumerate() {
        let at = format!("connect_routes[{p}]");
        let position = edited_listener(
            &index,
            &listener_names,
            &mut connect_patched,
            &at,
            &edit.listener,
        )?;
        let old = listeners[position].clone();
        let ListenerMode::Connect { routes } = &old.mode else {
            return Err(ConfigError::new(
                format!("{at}.listener"),
                wrong_mode(&old, "connect_routes"),
            ));
        };
        let mut routes = routes.clone();
        let mut seen = HashSet::new();
        let user = |authority: &Arc<str>| Referrer::Connect {
            listener: old.name.clone(),
            authority: authority.clone(),
        };
        for (k, authority) in edit.remove.iter().enumerate() {
            let path = format!("{at}.remove[{k}]");
            let canonical: Arc<str> = parse_authority(authority)
                .map_err(|why| ConfigError::new(&path, why))?
                .into();
            if !seen.insert(canonical.clone()) {
                return Err(ConfigError::new(
                    path,
                    format!("authority {authority:?} appears twice in this patch"),
                ));
            }
            let Some(cluster) = routes.remove(&canonical) else {
                return Err(ConfigError::new(
                    path,
                    format!(
                        "listener {:?} has no route for {authority:?} to remove",
                        old.name
                    ),
                ));
            };
            referrers.remove(&cluster, &user(&canonical));
        }
        for (j, route) in edit.upsert.iter().enumerate() {
            let path = format!("{at}.upsert[{j}]");
            let (authority, cluster) = ctx.connect_route(&path, route)?;
            if !seen.insert(authority.clone()) {
                return Err(ConfigError::new(
                    format!("{path}.authority"),
                    format!(
                        "authority {:?} appears twice in this patch",
                        route.authority
                    ),
                ));
            }
            if let Some(previous) = routes.insert(authority.clone(), cluster.clone()) {
                referrers.remove(&previous, &user(&authority));
            }
            referrers.add(&cluster, user(&authority));
        }
        listeners[position] = Arc::new(ListenerSpec {
            name: old.name.clone(),
            address: old.address,
            mode: ListenerMode::Connect { routes },
            limits: old.limits,
        });
    }

    // Referential integrity of the result.
    for (k, name) in doc.remove_clusters.iter().enumerate() {
        if let Some(who) = referrers.first(name) {
            return Err(ConfigError::new(
                format!("remove_clusters[{k}]"),
                format!(
                    "cluster {name:?} is still used by {who} — remove or repoint that in the same patch"
                ),
            ));
        }
    }
    for (at, name) in &encrypting {
        let passthrough = referrers.users(name).find(|who| {
            let Referrer::Route(key) = who else {
                return false;
            };
            index
                .get(key.listener())
                .and_then(|&position| listeners.get(position))
                .is_some_and(|l| matches!(l.mode, ListenerMode::Passthrough { .. }))
        });
        if let Some(who) = passthrough {
            return Err(ConfigError::new(
                format!("{at}.tls"),
                format!("{} (it is used by {who})", passthrough_tls_message(name)),
            ));
        }
    }

    let config = CompiledConfig {
        identity: base.identity.clone(),
        handshake_timeout: base.handshake_timeout,
        listeners,
        listener_index: index,
        clusters,
        tls: Arc::new(tls),
        referrers,
    };
    Ok((config, delta))
}

/// The position of the listener a route edit at `at` names, refusing one
/// the patch also replaces or removes, or edits twice.
fn edited_listener(
    index: &HashMap<Arc<str>, usize>,
    replaced: &HashSet<&str>,
    edited: &mut HashSet<String>,
    at: &str,
    name: &str,
) -> Result<usize, ConfigError> {
    let path = format!("{at}.listener");
    if replaced.contains(name) {
        return Err(ConfigError::new(
            path,
            format!(
                "listener {name:?} is also replaced or removed by this patch; give its routes in \"listeners\""
            ),
        ));
    }
    if !edited.insert(name.to_owned()) {
        return Err(ConfigError::new(
            path,
            format!("listener {name:?} appears twice in this patch"),
        ));
    }
    index
        .get(name)
        .copied()
        .ok_or_else(|| ConfigError::new(path, format!("no listener named {name:?}")))
}

/// Why a route edit does not fit `listener`'s mode; `field` is where it was.
fn wrong_mode(listener: &ListenerSpec, field: &str) -> String {
    let (mode, hint) = match &listener.mode {
        ListenerMode::Passthrough { .. } => ("a passthrough", "edit its routes in \"routes\""),
        ListenerMode::Terminate { .. } => ("a terminate", "edit its routes in \"routes\""),
        ListenerMode::Connect { .. } => ("a connect", "edit its routes in \"connect_routes\""),
        ListenerMode::Originate { .. } => (
            "an originate",
            "it has no routes; replace the listener to change its cluster",
        ),
    };
    format!(
        "listener {:?} is {mode} listener, which \"{field}\" cannot edit: {hint}",
        listener.name
    )
}

/// The SNI table of a passthrough or terminate listener with `edit`
/// applied; `compile` builds one route, `spec` reaches its common part.
fn patch_routes<R>(
    at: &str,
    routes: &SniRouter<R>,
    edit: &raw::RoutePatch,
    compile: impl Fn(&str, &raw::Route) -> Result<R, ConfigError>,
    spec: impl Fn(&R) -> &RouteSpec,
    referrers: &mut Referrers,
) -> Result<SniRouter<R>, ConfigError> {
    let mut upserts = Vec::with_capacity(edit.upsert.len());
    for (j, route) in edit.upsert.iter().enumerate() {
        let compiled = compile(&format!("{at}.upsert[{j}]"), route)?;
        upserts.push((route.sni.clone(), Arc::new(compiled)));
    }
    let added: Vec<Arc<R>> = upserts.iter().map(|(_, r)| r.clone()).collect();
    let patched = routes.patched(upserts, &edit.remove).map_err(|e| match e {
        RouterPatchError::Upsert(j, why) => ConfigError::new(format!("{at}.upsert[{j}].sni"), why),
        RouterPatchError::Remove(k, why) => ConfigError::new(format!("{at}.remove[{k}]"), why),
    })?;
    for sni in edit.remove.iter().chain(edit.upsert.iter().map(|r| &r.sni)) {
        if let Some(old) = routes.get_pattern(sni) {
            referrers.remove_route(spec(old));
        }
    }
    for route in &added {
        referrers.add_route(spec(route));
    }
    Ok(patched)
}

/// Shared with the gateway's snapshot tests (the same random configs and edits).
#[cfg(test)]
pub(crate) mod tests;
