//! Moving a routed flow's bytes: the userspace copy (always available, the fallback and the
//! benchmark baseline) and the kernel splice (BPF SockHash + sk_skb verdict).

pub mod flowinfo;
pub mod local;
pub mod routemap;
pub mod sockmap;
mod sockopt;
pub mod userspace;

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

/// What the operator asked for with `--datapath`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DatapathMode {
    /// The kernel splice where it can be used, the userspace copy where it cannot (decided per flow).
    Auto,
    /// The kernel splice; the agent refuses to start if the BPF programs cannot be loaded.
    Sockmap,
    /// Copy every byte through the agent (no BPF at all).
    Userspace,
}

/// How a flow ended, for logs and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEnd {
    /// Both directions finished with a FIN after all their data.
    Closed,
    /// One side reset (or failed); the other side was reset too.
    Reset,
    /// A spliced flow still running, handed to the next agent of a hot restart (`handoff/`).
    HandedOver,
}

#[derive(Debug, Clone, Copy)]
pub struct FlowSummary {
    pub end: FlowEnd,
    /// Bytes client -> upstream (including the replayed ClientHello).
    pub bytes_up: u64,
    /// Bytes upstream -> client.
    pub bytes_down: u64,
    /// Of those, bytes the agent copied through userspace (all of them on the userspace path; the
    /// ClientHello and any bytes passed while paused on the kernel path).
    pub copied: u64,
    /// Of `bytes_up`/`bytes_down`, bytes already in the Prometheus byte counters while the flow
    /// ran: for a spliced flow, the replayed bytes (added at the handoff) and what the kernel
    /// counted for its route (`ZI_ROUTE_BYTES`, summed at scrape time). The rest is added when
    /// the flow ends.
    pub live_counted_up: u64,
    pub live_counted_down: u64,
    pub duration: Duration,
}

impl FlowSummary {
    /// Bytes (up, down) not yet in the Prometheus byte counters: to add when the flow ends.
    pub fn uncounted(&self) -> (u64, u64) {
        (
            self.bytes_up.saturating_sub(self.live_counted_up),
            self.bytes_down.saturating_sub(self.live_counted_down),
        )
    }
}

/// Resets a connection: SO_LINGER 0 makes the close send RST, so the peer learns the stream broke
/// instead of seeing a clean end of stream.
pub fn reset(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    if let Err(e) = sock.set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER 0 failed; the close will send FIN, not RST");
    }
}

/// Writes all of `data`, waiting for the socket to be writable as often as needed.
pub(crate) async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
