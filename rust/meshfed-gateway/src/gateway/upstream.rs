//! Connecting to a cluster's endpoints: round robin with failover.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;

use crate::config::ClusterSpec;

/// Load-balancing state of a cluster, carried across `apply()` by name.
#[derive(Debug, Default)]
pub(crate) struct ClusterState {
    cursor: AtomicUsize,
}

/// No endpoint of a cluster accepted the connection.
#[derive(Debug, thiserror::Error)]
#[error(
    "cluster {cluster:?}: no endpoint reachable (tried {tried}) — are its endpoints up and listening?"
)]
pub(crate) struct ConnectError {
    cluster: String,
    tried: String,
}

/// Connects to the next endpoint in round-robin order; on refusal or
/// connect timeout tries the following one, up to every endpoint once.
/// Nothing has been sent yet, so retrying is safe.
pub(crate) async fn connect(
    cluster: &ClusterSpec,
    state: &Arc<ClusterState>,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let count = cluster.endpoints.len();
    let start = state.cursor.fetch_add(1, Ordering::Relaxed);
    let mut failures = Vec::new();
    for attempt in 0..count {
        let Some(&address) = cluster.endpoints.get((start + attempt) % count) else {
            continue;
        };
        let result = tokio::time::timeout(cluster.connect_timeout, TcpStream::connect(address))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("timed out after {:?}", cluster.connect_timeout),
                ))
            });
        match result {
            Ok(stream) => {
                // Nagle only delays a proxy's small writes.
                let _ = stream.set_nodelay(true);
                return Ok((stream, address));
            }
            Err(e) => {
                tracing::debug!(cluster = %cluster.name, %address, error = %e, "endpoint connect failed");
                failures.push(format!("{address}: {e}"));
            }
        }
    }
    Err(ConnectError {
        cluster: cluster.name.clone(),
        tried: failures.join("; "),
    })
}
