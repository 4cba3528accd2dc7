//! A stream wrapper that counts bytes into listener, route and cluster
//! stats as they flow, and stamps the last activity for the idle timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::clock;
use super::limits::RouteState;
use super::stats::ListenerStats;
use super::upstream::ClusterShared;

/// Where a connection's byte counts go.
#[derive(Clone)]
pub(crate) struct Sinks {
    pub(crate) listener: Arc<ListenerStats>,
    pub(crate) route: Option<Arc<RouteState>>,
    pub(crate) cluster: Arc<ClusterShared>,
    /// When the last byte moved either way (`clock` nanoseconds): the
    /// idle timeout counts from it.
    pub(crate) activity: Arc<AtomicU64>,
}

impl Sinks {
    pub(crate) fn up(&self, n: u64) {
        self.listener
            .bytes_client_to_upstream
            .fetch_add(n, Ordering::Relaxed);
        if let Some(route) = &self.route {
            route
                .stats
                .bytes_client_to_upstream
                .fetch_add(n, Ordering::Relaxed);
        }
        self.cluster.bytes_sent.fetch_add(n, Ordering::Relaxed);
        self.activity.store(clock::now_nanos(), Ordering::Relaxed);
    }

    pub(crate) fn down(&self, n: u64) {
        self.listener
            .bytes_upstream_to_client
            .fetch_add(n, Ordering::Relaxed);
        if let Some(route) = &self.route {
            route
                .stats
                .bytes_upstream_to_client
                .fetch_add(n, Ordering::Relaxed);
        }
        self.cluster.bytes_received.fetch_add(n, Ordering::Relaxed);
        self.activity.store(clock::now_nanos(), Ordering::Relaxed);
    }
}

/// Wraps the client side of a proxied connection: bytes read from it are
/// `client_to_upstream`, bytes written to it are `upstream_to_client`.
pub(crate) struct Counted<S> {
    inner: S,
    sinks: Sinks,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, sinks: Sinks) -> Self {
        Self { inner, sinks }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.sinks.up(read as u64);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            if n > 0 {
                self.sinks.down(n as u64);
            }
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
