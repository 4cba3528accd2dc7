//! Copying both ways between two streams, with buffers that grow under
//! bulk transfer.
//!
//! A direction starts with [`COPY_BUFFER`] (small: idle connections
//! dominate a gateway's memory) and doubles its buffer, up to
//! [`MAX_COPY_BUFFER`], each time a read fills it. Under bulk transfer a
//! TLS stream is then written in full 16 KiB records instead of one record
//! per small read, and each MiB costs fewer reads, writes and records;
//! request/response traffic never fills the first buffer and keeps it.
//! Otherwise as tokio's `copy_bidirectional`: a direction that reaches end
//! of stream flushes and shuts its writer down, and the copy ends when both
//! have.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The buffer each direction starts with.
pub(crate) const COPY_BUFFER: usize = 4 * 1024;
/// The largest a direction's buffer grows to: four full TLS records.
pub(crate) const MAX_COPY_BUFFER: usize = 64 * 1024;

/// One direction of the copy.
struct Direction {
    buf: Vec<u8>,
    /// Bytes `buf[pos..cap]` are read and not yet written.
    pos: usize,
    cap: usize,
    /// The last read filled the buffer: grow it before the next.
    filled: bool,
    /// Bytes were written since the last flush.
    unflushed: bool,
    state: State,
    total: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Copying,
    ShuttingDown,
    Done,
}

impl Direction {
    fn new() -> Self {
        Self {
            buf: vec![0; COPY_BUFFER],
            pos: 0,
            cap: 0,
            filled: false,
            unflushed: false,
            state: State::Copying,
            total: 0,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            match self.state {
                State::Done => return Poll::Ready(Ok(self.total)),
                State::ShuttingDown => {
                    ready!(writer.as_mut().poll_shutdown(cx))?;
                    self.state = State::Done;
                }
                State::Copying => {
                    if self.pos == self.cap {
                        if self.filled && self.buf.len() < MAX_COPY_BUFFER {
                            self.buf = vec![0; self.buf.len() * 2];
                        }
                        let mut read = ReadBuf::new(&mut self.buf);
                        match reader.as_mut().poll_read(cx, &mut read) {
                            Poll::Ready(result) => result?,
                            Poll::Pending => {
                                // Nothing more to read now: what the writer
                                // holds (a TLS record being built) must go out.
                                if self.unflushed {
                                    ready!(writer.as_mut().poll_flush(cx))?;
                                    self.unflushed = false;
                                }
                                return Poll::Pending;
                            }
                        }
                        let n = read.filled().len();
                        if n == 0 {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.unflushed = false;
                            self.state = State::ShuttingDown;
                            continue;
                        }
                        self.filled = n == self.buf.len();
                        (self.pos, self.cap) = (0, n);
                    }
                    while self.pos < self.cap {
                        let n = ready!(
                            writer
                                .as_mut()
                                .poll_write(cx, &self.buf[self.pos..self.cap])
                        )?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        self.pos += n;
                        self.total += n as u64;
                        self.unflushed = true;
                    }
                }
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions reach end of
/// stream; returns the bytes copied each way.
pub(crate) async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Direction::new();
    let mut b_to_a = Direction::new();
    poll_fn(|cx| {
        let there = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let back = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (there, back) {
            (Poll::Ready(there), Poll::Ready(back)) => Poll::Ready(Ok((there, back))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Sends `bytes` and ends its side, while reading what the other end sends.
    async fn exchange(end: tokio::io::DuplexStream, bytes: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut read, mut write) = tokio::io::split(end);
        let (sent, got) = tokio::join!(
            async {
                write.write_all(&bytes).await?;
                write.shutdown().await
            },
            async {
                let mut got = Vec::new();
                read.read_to_end(&mut got).await.map(|_| got)
            }
        );
        sent?;
        got
    }

    /// What each end received, and what the copy counted each way.
    type Received = (Vec<u8>, Vec<u8>, (u64, u64));

    /// Whatever the sizes and the pipe's capacity, every byte arrives in
    /// order both ways, and each side sees the other's end of stream.
    fn copies(up: Vec<u8>, down: Vec<u8>, pipe: usize) -> io::Result<Received> {
        let runtime = tokio::runtime::Builder::new_current_thread().build()?;
        runtime.block_on(async move {
            let (client, mut client_side) = duplex(pipe);
            let (mut server_side, server) = duplex(pipe);
            let copy = tokio::spawn(async move {
                copy_bidirectional(&mut client_side, &mut server_side).await
            });
            // Each end writes and reads at once: the pipes are bounded.
            let client_task = tokio::spawn(exchange(client, up));
            let server_task = tokio::spawn(exchange(server, down));
            let at_client = client_task.await.map_err(io::Error::other)??;
            let at_server = server_task.await.map_err(io::Error::other)??;
            let counts = copy.await.map_err(io::Error::other)??;
            Ok((at_server, at_client, counts))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn every_byte_arrives_in_order_both_ways(
            up in prop::collection::vec(any::<u8>(), 0..200_000),
            down in prop::collection::vec(any::<u8>(), 0..200_000),
            pipe in 64usize..100_000,
        ) {
            let (at_server, at_client, counts) = copies(up.clone(), down.clone(), pipe)
                .unwrap_or_else(|e| panic!("{e}"));
            prop_assert_eq!(counts, (up.len() as u64, down.len() as u64));
            prop_assert!(at_server == up);
            prop_assert!(at_client == down);
        }
    }

    #[test]
    fn a_direction_grows_only_while_reads_fill_it() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut direction = Direction::new();
        let bulk = vec![1u8; 1024 * 1024];
        let mut reader: &[u8] = &bulk;
        let mut sink = Vec::new();
        while direction.state != State::Done {
            let _ = direction.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink));
        }
        assert_eq!(direction.buf.len(), MAX_COPY_BUFFER);
        assert_eq!(sink.len(), bulk.len());

        let mut direction = Direction::new();
        let small = vec![2u8; 100];
        let mut reader: &[u8] = &small;
        let mut sink = Vec::new();
        while direction.state != State::Done {
            let _ = direction.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink));
        }
        assert_eq!(direction.buf.len(), COPY_BUFFER);
    }
}
