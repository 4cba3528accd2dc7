//! One tunnel stream as a byte stream: `AsyncRead` over its received DATA
//! frames and `AsyncWrite` into its send side, with h2's flow control.
//!
//! Why not hyper's CONNECT upgrade: hyper hands every write of an upgraded
//! HTTP/2 stream through a channel to a task of its own (one more task per
//! stream, one more wake-up and a boxed copy per write). Here the stream's
//! own task puts its bytes on the stream, and the connection's task sends
//! them: the least a multiplexed hop can do.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A tunnel stream's two halves, read and written as one connection, and
/// what it holds while it lives (`H`: the egress's place on its tunnel
/// connection, given back when the stream is dropped).
pub(crate) struct StreamIo<H = ()> {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes the reader has not taken yet.
    unread: Bytes,
    /// Our end of the stream has been sent.
    finished: bool,
    _held: H,
}

impl<H> StreamIo<H> {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, held: H) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            finished: false,
            _held: held,
        }
    }
}

impl<H: Unpin> AsyncRead for StreamIo<H> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                // The peer's end of the stream: end of file.
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => this.unread = data,
                Some(Err(e)) => return Poll::Ready(ended(e)),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        // Read bytes give their window back to the peer; unread ones hold it,
        // which is what bounds a stream nobody reads.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl<H: Unpin> AsyncWrite for StreamIo<H> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        // A write is at most the copy loop's buffer (64 KiB): one piece,
        // which the connection's task frames.
        let wanted = buf.len();
        // Capacity is asked for only with bytes to send: a reservation held
        // while idle would pin the connection's window for nothing.
        this.send.reserve_capacity(wanted);
        let capacity = loop {
            let capacity = this.send.capacity();
            if capacity > 0 {
                break capacity;
            }
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(failed(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        };
        let n = wanted.min(capacity);
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(failed)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what the stream holds as soon as it can.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.finished {
            this.finished = true;
            this.send.send_data(Bytes::new(), true).map_err(failed)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// A stream the peer reset: a reset without error (or a cancel) ends it
/// like a close, anything else is an error.
fn ended(e: h2::Error) -> io::Result<()> {
    match e.reason() {
        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(()),
        _ => Err(failed(e)),
    }
}

fn failed(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("tunnel connection failed"))
    } else {
        io::Error::new(io::ErrorKind::BrokenPipe, e)
    }
}
