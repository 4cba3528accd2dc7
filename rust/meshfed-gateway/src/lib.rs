//! meshfed-gateway: the data plane of the meshfed east-west gateway.
//!
//! Python (or any caller) hands a JSON config document to [`Gateway::start`]
//! / [`Gateway::apply`]; it is compiled once into a [`CompiledConfig`] and
//! served by listeners in three modes:
//!
//! - `passthrough`: route on the ClientHello's SNI, forward TLS untouched;
//! - `terminate`: finish mTLS, verify the caller's X.509-SVID against the
//!   bundle of its own trust domain, authorize it by the route's ordered
//!   rules (in the handshake where possible: `access_denied`), forward plain
//!   TCP; a trusted peer gateway may vouch for the calling workload over the
//!   hop protocol (ALPN `meshfed-caller/1`, then a PROXY v2 header);
//! - `originate`: accept plain TCP (or the workload's own mTLS, with
//!   `workload_tls`), open mTLS to a peer gateway pinned to a SPIFFE ID and,
//!   with `convey_caller`, tell it which workload is calling.
//!
//! This crate has no Python dependency; the binding lives in `meshfed-py`.
#![forbid(unsafe_code)]

mod authz;
pub mod client_hello;
pub mod config;
mod gateway;
pub mod proxy_protocol;
pub mod spiffe;
mod tls;

pub use config::{CompiledConfig, ConfigError, config_schema_json, validate_config};
pub use gateway::{
    ClusterSnapshot, EndpointSnapshot, Gateway, GatewayError, HistogramSnapshot, ListenerSnapshot,
    RouteSnapshot, StatsDocument, WORKER_THREADS_ENV, stats_schema_json,
};
pub use spiffe::{SpiffeError, SpiffeId, SpiffePattern, TrustDomain};
pub use tls::{SvidError, spiffe_id_of};

/// The crate version, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
pub(crate) mod test_certs;
