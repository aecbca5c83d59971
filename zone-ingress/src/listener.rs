//! Accepting connections and routing each by the SNI of its ClientHello.
//!
//! Per connection: read (never peek) the whole ClientHello under a deadline, look the SNI up in the
//! current route table, connect to an endpoint (failover on error), then hand the pair and the
//! consumed bytes to the datapath. A connection that cannot be routed is closed without a byte
//! sent (Envoy's behaviour when no filter chain matches), except that an unknown SNI gets the
//! table's direct response first when it has one (Kuma's zero-cluster catch-all chain); one whose
//! endpoints are all down is reset.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::accesslog::{self, AccessLog};

use crate::datapath::sockmap::{Refusal, Splicer};
use crate::datapath::{self, FlowEnd, FlowSummary};
use crate::routes::{Route, RouteStore};
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
    pub access_log: AccessLog,
    /// Turns true when the drain time is over: live flows should end cleanly now (half-close
    /// both sides after the bytes already delivered) rather than die with the process.
    pub drain: watch::Receiver<bool>,
}

/// Counts connections in flight so a drain can wait for them.
#[derive(Debug, Default)]
pub struct ActiveFlows {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

impl ActiveFlows {
    pub(crate) fn enter(self: &Arc<Self>) -> FlowGuard {
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

pub(crate) struct FlowGuard(Arc<ActiveFlows>);

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

/// Errors that mean the agent itself is out of descriptors or memory (accept, socket, connect).
pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

async fn handle(ingress: &Ingress, mut down: TcpStream, peer: SocketAddr) {
    let (start, started_at) = (Instant::now(), SystemTime::now());
    let _ = down.set_nodelay(true);
    let hello = match read_client_hello(&mut down, &ingress.hello_limits).await {
        Ok(h) => h,
        Err(e) => {
            let reason = RejectReason::from_label(e.reason());
            ingress.stats.rejected(reason);
            tracing::debug!(%peer, reason = e.reason(), error = %e, "closing connection: no routable ClientHello");
            let mut entry = accesslog::Entry::new(started_at, peer, accesslog::End::Rejected);
            entry.reason = Some(reason.as_str());
            entry.duration_ms = start.elapsed();
            ingress.access_log.log(entry);
            return;
        }
    };
    let table = ingress.routes.load();
    let Some(route) = table.lookup(&hello.sni) else {
        ingress.stats.rejected(RejectReason::UnknownSni);
        tracing::debug!(%peer, sni = %String::from_utf8_lossy(&hello.sni), "closing connection: no route for SNI");
        let mut entry = accesslog::Entry::new(started_at, peer, accesslog::End::Rejected);
        entry.sni = Some(String::from_utf8_lossy(&hello.sni).into_owned());
        entry.reason = Some(RejectReason::UnknownSni.as_str());
        entry.bytes_up = hello.consumed.len() as u64;
        if let Some(bytes) = table.direct_response().cloned() {
            drop(table);
            send_direct_response(&mut down, &bytes, ingress.hello_limits.timeout).await;
            entry.bytes_down = bytes.len() as u64;
        }
        entry.duration_ms = start.elapsed();
        ingress.access_log.log(entry);
        return;
    };
    drop(table);
    let local = ingress
        .splicer
        .as_deref()
        .and_then(|s| s.local_redirect_for(&down));
    let connected = upstream::connect(
        &route,
        route.connect_timeout.unwrap_or(ingress.connect_timeout),
        &ingress.stats,
        local,
    )
    .await;
    let (up, endpoint, local) = match connected {
        Ok(c) => (c.stream, c.endpoint, c.local),
        Err(e) => {
            // Out of descriptors is the agent's problem, not the route's: the log says so, and
            // the endpoint counters stay clean.
            if !e.is_local() {
                ingress.stats.upstream_unavailable();
            }
            tracing::warn!(%peer, error = %e, "resetting client");
            datapath::reset(&down);
            let mut entry =
                accesslog::Entry::new(started_at, peer, accesslog::End::UpstreamUnavailable);
            entry.sni = Some(route.sni.to_string());
            entry.cluster = Some(route.cluster.clone());
            entry.reason = Some(if e.is_local() {
                "local_resources"
            } else {
                "no_healthy_upstream"
            });
            entry.duration_ms = start.elapsed();
            ingress.access_log.log(entry);
            return;
        }
    };
    ingress.stats.upstream_connected(&route.cluster);
    let (kind, summary) = move_bytes(ingress, down, up, &hello.consumed, &route, local).await;
    if summary.end == FlowEnd::HandedOver {
        // The next agent watches, counts and logs this flow from here on.
        tracing::debug!(%peer, sni = %route.sni, "flow handed over to the next agent");
        return;
    }
    ingress.stats.copied(kind, summary.copied);
    // A spliced flow's bytes were counted while it ran (kernel route counters, read at scrape).
    let (rx, tx) = summary.uncounted();
    ingress.stats.flow_bytes(&route.cluster, rx, tx);
    let end = if summary.end == FlowEnd::Closed {
        accesslog::End::Closed
    } else {
        accesslog::End::Reset
    };
    tracing::debug!(
        %peer,
        sni = %route.sni,
        %endpoint,
        datapath = kind.as_str(),
        bytes_up = summary.bytes_up,
        bytes_down = summary.bytes_down,
        copied = summary.copied,
        duration = ?summary.duration,
        end = end.as_str(),
        "flow finished"
    );
    if ingress.access_log.is_enabled() {
        let mut entry = accesslog::Entry::new(started_at, peer, end);
        entry.sni = Some(route.sni.to_string());
        entry.cluster = Some(route.cluster.clone());
        entry.upstream = Some(endpoint);
        entry.datapath = Some(kind.as_str());
        entry.bytes_up = summary.bytes_up;
        entry.bytes_down = summary.bytes_down;
        entry.duration_ms = start.elapsed();
        ingress.access_log.log(entry);
    }
}

/// The catch-all direct_response (Kuma's zero-cluster answer): the bytes, then a clean close.
/// Bounded by `timeout` so a client that never reads cannot hold the task.
async fn send_direct_response(down: &mut TcpStream, bytes: &[u8], timeout: Duration) {
    use tokio::io::AsyncWriteExt;
    let write = async {
        down.write_all(bytes).await?;
        down.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(timeout, write)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    {
        tracing::debug!(error = %e, "direct response not delivered");
    }
}

/// Splices the flow in the kernel when possible, else copies it; decided per flow.
async fn move_bytes(
    ingress: &Ingress,
    down: TcpStream,
    up: TcpStream,
    initial: &[u8],
    route: &Route,
    local: Option<crate::datapath::local::Registration>,
) -> (DatapathKind, FlowSummary) {
    let (down, up, to_up, to_down) = match &ingress.splicer {
        None => (down, up, initial.to_vec(), Vec::new()),
        Some(splicer) => match splicer.handoff(down, up, initial, route, local).await {
            Ok(flow) => {
                let kind = if flow.is_local() {
                    DatapathKind::SockmapLocal
                } else {
                    DatapathKind::Sockmap
                };
                ingress.stats.flow_started(kind);
                return (kind, splicer.run(flow, ingress.drain.clone()).await);
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
                    live_counted_up: 0,
                    live_counted_down: 0,
                    duration: std::time::Duration::ZERO,
                };
                return (DatapathKind::Sockmap, summary);
            }
        },
    };
    ingress.stats.flow_started(DatapathKind::Userspace);
    // With the BPF maps loaded, the flow is shown in the flow map while it runs.
    let tracked = ingress
        .splicer
        .as_ref()
        .and_then(|s| Some((s, s.track_userspace(&down, &up, route)?)));
    let progress = tracked
        .as_ref()
        .map_or_else(Default::default, |(_, t)| t.progress.clone());
    let mut summary =
        copy_until_drained(ingress.drain.clone(), down, up, &to_up, &to_down, &progress).await;
    if let Some((splicer, flow)) = tracked {
        splicer.end_userspace(flow, &mut summary);
    }
    (DatapathKind::Userspace, summary)
}

/// The userspace copy, ended cleanly when the drain time is over: both sockets stop reading
/// (`shutdown(SHUT_RD)`), so each direction sees end-of-stream, writes what it already read and
/// half-closes its destination, as if both peers had sent FIN. Bytes the peers send after that are
/// not forwarded; everything forwarded before is delivered, followed by a FIN instead of a reset.
async fn copy_until_drained(
    mut drain: watch::Receiver<bool>,
    down: TcpStream,
    up: TcpStream,
    to_up: &[u8],
    to_down: &[u8],
    progress: &datapath::userspace::Progress,
) -> FlowSummary {
    use std::os::fd::AsRawFd;
    let fds = [down.as_raw_fd(), up.as_raw_fd()];
    let copy = datapath::userspace::proxy(down, up, to_up, to_down, progress);
    tokio::pin!(copy);
    let drained = async {
        // A dropped sender means the agent is not draining through this channel: never fire.
        if drain.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        summary = &mut copy => return summary,
        () = drained => {}
    }
    for fd in fds {
        // SAFETY: `copy` owns both streams and has not completed, so neither is closed and the
        // descriptors still name these sockets; shutdown does not touch memory.
        if unsafe { libc::shutdown(fd, libc::SHUT_RD) } != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "drain: shutdown(SHUT_RD) failed");
        }
    }
    copy.await
}
