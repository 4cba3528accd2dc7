//! The config document as Python sends it: plain serde types that mirror
//! the JSON one to one, with unknown fields refused everywhere.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Default for `handshake_timeout_ms`.
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Default for a cluster's `connect_timeout_ms`.
pub(crate) const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug, Deserialize)]
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Identity {
    pub(crate) cert_chain_pem: String,
    pub(crate) private_key_pem: String,
}

/// A listener. `mode` decides which of the optional fields apply; the
/// compiler rejects fields that do not belong to the mode. (A flat struct
/// rather than a serde-tagged enum, so errors keep their exact JSON path.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Listener {
    pub(crate) name: String,
    pub(crate) address: String,
    pub(crate) mode: Mode,
    /// passthrough, terminate
    pub(crate) routes: Option<Vec<Route>>,
    /// originate
    pub(crate) cluster: Option<String>,
    /// originate
    pub(crate) sni: Option<String>,
    /// originate
    pub(crate) peer_spiffe_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    Passthrough,
    Terminate,
    Originate,
}

impl Mode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Passthrough => "passthrough",
            Self::Terminate => "terminate",
            Self::Originate => "originate",
        }
    }
}

/// An SNI route; `allow` only in terminate mode.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Route {
    pub(crate) sni: String,
    pub(crate) cluster: String,
    pub(crate) allow: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Cluster {
    pub(crate) name: String,
    pub(crate) endpoints: Vec<Endpoint>,
    #[serde(default = "default_connect_timeout_ms")]
    pub(crate) connect_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Endpoint {
    pub(crate) address: String,
    #[serde(default = "default_weight")]
    pub(crate) weight: u32,
}

fn default_handshake_timeout_ms() -> u64 {
    DEFAULT_HANDSHAKE_TIMEOUT_MS
}

fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}

fn default_weight() -> u32 {
    1
}
