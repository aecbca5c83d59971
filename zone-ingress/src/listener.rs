//! Accepting connections and routing each by the SNI of its ClientHello.
//!
//! Per connection: read (never peek) the whole ClientHello under a deadline, look the SNI up in the
//! current route table, connect to an endpoint (failover on error), then hand the pair and the
//! consumed bytes to the datapath. A connection that cannot be routed is closed without a byte
//! sent (Envoy's behaviour when no filter chain matches); one whose endpoints are all down is reset.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::datapath::sockmap::{Refusal, Splicer};
use crate::datapath::{self, FlowEnd, FlowSummary};
use crate::routes::RouteStore;
use crate::stats::{DatapathKind, RejectReason, Stats};
use crate::tls::{HelloLimits, read_client_hello};
use crate::upstream;

/// What every connection handler shares.
pub struct Ingress {
    pub routes: Arc<RouteStore>,
    pub stats: Arc<Stats>,
    pub hello_limits: HelloLimits,
    pub connect_timeout: Duration,
    pub flows: Arc<ActiveFlows>,
    /// The kernel splice, when the BPF programs are loaded (`--datapath auto|sockmap`).
    pub splicer: Option<Arc<Splicer>>,
}

/// Counts connections in flight so a drain can wait for them.
#[derive(Debug, Default)]
pub struct ActiveFlows {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

impl ActiveFlows {
    fn enter(self: &Arc<Self>) -> FlowGuard {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        FlowGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once no connection is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct FlowGuard(Arc<ActiveFlows>);

impl Drop for FlowGuard {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

/// Binds the listener (SO_REUSEADDR so a restart does not wait for TIME_WAIT).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until `stop` turns true.
pub async fn serve(listener: TcpListener, ingress: Arc<Ingress>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let ingress = ingress.clone();
                let guard = ingress.flows.enter();
                tokio::spawn(async move {
                    ingress.stats.connection_opened();
                    handle(&ingress, stream, peer).await;
                    ingress.stats.connection_closed();
                    drop(guard);
                });
            }
            Err(e) if is_resource_exhaustion(&e) => {
                // Out of file descriptors or memory: existing flows keep going; accepting again
                // at once would spin. The kernel keeps queueing in the backlog meanwhile.
                tracing::warn!(error = %e, retry_in = ?backoff, "accept failed: out of resources (check `ulimit -n`)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => tracing::debug!(error = %e, "accept failed"),
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

async fn handle(ingress: &Ingress, mut down: TcpStream, peer: SocketAddr) {
    let _ = down.set_nodelay(true);
    let hello = match read_client_hello(&mut down, &ingress.hello_limits).await {
        Ok(h) => h,
        Err(e) => {
            ingress.stats.rejected(RejectReason::from_label(e.reason()));
            tracing::debug!(%peer, reason = e.reason(), error = %e, "closing connection: no routable ClientHello");
            return;
        }
    };
    let table = ingress.routes.load();
    let Some(route) = table.lookup(&hello.sni) else {
        ingress.stats.rejected(RejectReason::UnknownSni);
        tracing::debug!(%peer, sni = %String::from_utf8_lossy(&hello.sni), "closing connection: no route for SNI");
        return;
    };
    drop(table);
    let (up, endpoint) =
        match upstream::connect(&route, ingress.connect_timeout, &ingress.stats).await {
            Ok(c) => c,
            Err(e) => {
                ingress.stats.upstream_unavailable();
                tracing::warn!(%peer, error = %e, "resetting client");
                datapath::reset(&down);
                return;
            }
        };
    let (kind, summary) = move_bytes(ingress, down, up, &hello.consumed).await;
    ingress.stats.copied(kind, summary.copied);
    tracing::debug!(
        %peer,
        sni = %route.sni,
        %endpoint,
        datapath = kind.as_str(),
        bytes_up = summary.bytes_up,
        bytes_down = summary.bytes_down,
        copied = summary.copied,
        duration = ?summary.duration,
        end = if summary.end == FlowEnd::Closed { "closed" } else { "reset" },
        "flow finished"
    );
}

/// Splices the flow in the kernel when possible, else copies it; decided per flow.
async fn move_bytes(
    ingress: &Ingress,
    down: TcpStream,
    up: TcpStream,
    initial: &[u8],
) -> (DatapathKind, FlowSummary) {
    let (down, up, to_up, to_down) = match &ingress.splicer {
        None => (down, up, initial.to_vec(), Vec::new()),
        Some(splicer) => match splicer.handoff(down, up, initial).await {
            Ok(flow) => {
                ingress.stats.flow_started(DatapathKind::Sockmap);
                return (DatapathKind::Sockmap, splicer.run(flow).await);
            }
            Err(Refusal::Fallback {
                down,
                up,
                reason,
                to_up,
                to_down,
            }) => {
                ingress.stats.splice_fallback(reason.label());
                tracing::debug!(%reason, "kernel splice refused; copying this flow in userspace");
                (down, up, to_up, to_down)
            }
            Err(Refusal::Abort { reason }) => {
                ingress.stats.splice_fallback(reason.label());
                tracing::warn!(%reason, "kernel splice failed half way; both sides were reset");
                let summary = FlowSummary {
                    end: FlowEnd::Reset,
                    bytes_up: 0,
                    bytes_down: 0,
                    copied: 0,
                    duration: std::time::Duration::ZERO,
                };
                return (DatapathKind::Sockmap, summary);
            }
        },
    };
    ingress.stats.flow_started(DatapathKind::Userspace);
    (
        DatapathKind::Userspace,
        datapath::userspace::proxy(down, up, &to_up, &to_down).await,
    )
}
