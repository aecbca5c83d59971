//! Raw-TCP probes: send some bytes, then watch how (and how fast) the agent ends the connection.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::Netns;

/// How a connection ended from the client's point of view.
#[derive(Debug)]
pub enum End {
    /// Orderly close (FIN).
    Eof,
    /// ECONNRESET.
    Reset,
    /// Another error.
    Error(io::Error),
    /// Still open when the probe gave up.
    StillOpen,
}

/// What a probe saw.
pub struct Probe {
    pub received: Vec<u8>,
    pub end: End,
    /// From the last byte written to the end of the connection.
    pub elapsed: Duration,
}

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Probe {{ received {} bytes {:?}, end {:?}, after {:?} }}",
            self.received.len(),
            &self.received[..self.received.len().min(32)],
            self.end,
            self.elapsed
        )
    }
}

impl Probe {
    /// Closed (FIN or reset) without the agent sending a single byte.
    pub fn closed_silently(&self) -> bool {
        self.received.is_empty() && matches!(self.end, End::Eof | End::Reset)
    }
}

/// Connects from `ns` to `addr`, writes `bytes`, then reads until the connection ends or `limit` passes.
pub async fn send_and_watch(ns: &Netns, addr: SocketAddr, bytes: &[u8], limit: Duration) -> Probe {
    let mut s = ns
        .connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to the agent at {addr}: {e}"));
    s.write_all(bytes)
        .await
        .unwrap_or_else(|e| panic!("write {} probe bytes: {e}", bytes.len()));
    let start = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => break End::StillOpen,
            Ok(Ok(0)) => break End::Eof,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => break End::Reset,
            Ok(Err(e)) => break End::Error(e),
        }
    };
    Probe {
        received,
        end,
        elapsed: start.elapsed(),
    }
}
