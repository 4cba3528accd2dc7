//! What the gateway's integration tests share: a loopback echo backend and
//! a bounded round trip through it.

// Each test crate compiles this module and uses a part of it.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on every wait; far beyond what loopback needs.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A plain TCP echo server on the test runtime.
pub async fn echo_backend() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(address)
}

/// Writes `payload` and reads the same number of bytes back, within [`IO_TIMEOUT`].
pub async fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(IO_TIMEOUT, stream.read_exact(&mut back))
        .await
        .map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, "no answer within the test's bound")
        })??;
    Ok(back)
}

/// Reads an HTTP head up to and including its blank line (or to EOF), a byte at a time so that
/// nothing after it is consumed, within [`IO_TIMEOUT`] per byte.
pub async fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut byte))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "no answer within the test's bound")
            })??;
        if read == 0 {
            break;
        }
        head.push(byte[0]);
    }
    Ok(head)
}
