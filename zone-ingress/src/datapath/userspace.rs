//! The userspace copy: both directions of a flow in one task, with adaptive buffers, independent
//! half-close and reset propagation.
//!
//! Each direction waits for readability *before* it holds a buffer, so an idle flow costs no buffer
//! memory; a buffer that keeps filling doubles (up to [`MAX_BUF`]) so bulk transfers move large
//! chunks per syscall.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::net::TcpStream;

use super::{FlowEnd, FlowSummary, reset, write_all};

const MIN_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 256 * 1024;

/// Bytes a live copy has moved so far, each way (replayed bytes included), for the flow map. One
/// relaxed add per write: nothing next to the write syscall.
#[derive(Debug, Default)]
pub struct Progress {
    /// Client -> endpoint.
    pub up: AtomicU64,
    /// Endpoint -> client.
    pub down: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
enum PumpError {
    /// Reading the source failed (reset, timeout).
    #[error("reading: {0}")]
    Read(io::Error),
    /// Writing the destination failed (peer reset or closed).
    #[error("writing: {0}")]
    Write(io::Error),
}

/// Moves bytes between `down` (client) and `up` (endpoint) until both directions have ended or
/// one side breaks. `to_up` (the ClientHello and anything read with it) is written upstream first,
/// `to_down` (bytes already read from the endpoint) to the client. `progress` follows the bytes
/// moved while the flow runs.
pub async fn proxy(
    down: TcpStream,
    up: TcpStream,
    to_up: &[u8],
    to_down: &[u8],
    progress: &Progress,
) -> FlowSummary {
    let start = Instant::now();
    let replayed = match write_all(&up, to_up).await {
        Ok(()) => write_all(&down, to_down).await,
        Err(e) => Err(e),
    };
    if let Err(e) = replayed {
        tracing::debug!(error = %e, "replaying bytes already read failed");
        reset(&down);
        reset(&up);
        return FlowSummary {
            end: FlowEnd::Reset,
            bytes_up: 0,
            bytes_down: 0,
            copied: 0,
            live_counted_up: 0,
            live_counted_down: 0,
            duration: start.elapsed(),
        };
    }
    let mut bytes_up = to_up.len() as u64;
    let mut bytes_down = to_down.len() as u64;
    progress.up.fetch_add(bytes_up, Ordering::Relaxed);
    progress.down.fetch_add(bytes_down, Ordering::Relaxed);
    let to_up = pump(&down, &up, &progress.up);
    let to_down = pump(&up, &down, &progress.down);
    tokio::pin!(to_up, to_down);
    let (mut up_done, mut down_done) = (false, false);
    let mut end = FlowEnd::Closed;
    while !(up_done && down_done) {
        let (result, counter) = tokio::select! {
            r = &mut to_up, if !up_done => { up_done = true; (r, &mut bytes_up) }
            r = &mut to_down, if !down_done => { down_done = true; (r, &mut bytes_down) }
        };
        match result {
            Ok(n) => *counter += n,
            Err((n, e)) => {
                *counter += n;
                tracing::debug!(error = %e, "flow broke; resetting both sides");
                end = FlowEnd::Reset;
                break;
            }
        }
    }
    if end == FlowEnd::Reset {
        reset(&down);
        reset(&up);
    }
    FlowSummary {
        end,
        bytes_up,
        bytes_down,
        copied: bytes_up + bytes_down,
        live_counted_up: 0,
        live_counted_down: 0,
        duration: start.elapsed(),
    }
}

/// Copies `src` to `dst` until `src` ends (then half-closes `dst`) or an error.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    progress: &AtomicU64,
) -> Result<u64, (u64, PumpError)> {
    let mut total = 0u64;
    let mut size = MIN_BUF;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if let Err(e) = src.readable().await {
            return Err((total, PumpError::Read(e)));
        }
        if buf.len() != size {
            buf = vec![0u8; size];
        }
        let n = match src.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Drained: do not hold a buffer while the flow is quiet, unless it is streaming.
                if size == MIN_BUF {
                    buf = Vec::new();
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((total, PumpError::Read(e))),
        };
        if n == 0 {
            // FIN from src: forward it after everything we wrote (write_all completed), and keep the
            // other direction going.
            return match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
                Ok(()) => Ok(total),
                // The destination already went away entirely: nothing left to deliver.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(total),
                Err(e) => Err((total, PumpError::Write(e))),
            };
        }
        if let Err(e) = write_all(dst, &buf[..n]).await {
            return Err((total, PumpError::Write(e)));
        }
        total += n as u64;
        progress.fetch_add(n as u64, Ordering::Relaxed);
        if n == size && size < MAX_BUF {
            size *= 2;
        } else if n < size / 8 && size > MIN_BUF {
            size /= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A client, an upstream server and the proxy between them, on loopback.
    async fn setup() -> (TcpStream, TcpStream, tokio::task::JoinHandle<FlowSummary>) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (down, _) = front.accept().await.unwrap();
        let up = TcpStream::connect(back.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = back.accept().await.unwrap();
        let task = tokio::spawn(async move {
            let progress = Progress::default();
            let summary = proxy(down, up, b"hello", b"", &progress).await;
            assert_eq!(
                (summary.bytes_up, summary.bytes_down),
                (
                    progress.up.load(Ordering::Relaxed),
                    progress.down.load(Ordering::Relaxed)
                ),
                "live progress ends at the summary's counts"
            );
            summary
        });
        (client, server, task)
    }

    #[tokio::test]
    async fn copies_both_ways_and_forwards_half_close_independently() {
        let (mut client, mut server, task) = setup().await;
        let mut hello = [0u8; 5];
        server.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload, "client->server bytes, then EOF");
        // The other direction still works after the client's half-close.
        server.write_all(b"reply after half-close").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after half-close");
        let summary = task.await.unwrap();
        assert_eq!(summary.end, FlowEnd::Closed);
        assert_eq!(summary.bytes_up, 5 + payload.len() as u64);
        assert_eq!(summary.bytes_down, 22);
    }

    #[tokio::test]
    async fn upstream_reset_resets_the_client() {
        let (mut client, mut server, task) = setup().await;
        let mut hello = [0u8; 5];
        server.read_exact(&mut hello).await.unwrap();
        server.write_all(b"partial").await.unwrap();
        reset(&server);
        drop(server);
        let mut buf = vec![0u8; 64];
        let mut got = Vec::new();
        let err = loop {
            match client.read(&mut buf).await {
                Ok(0) => panic!("client saw a clean EOF, expected a reset"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(task.await.unwrap().end, FlowEnd::Reset);
    }
}
