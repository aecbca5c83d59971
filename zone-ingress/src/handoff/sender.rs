//! The running (old) agent's side of a hot restart: serves the handoff socket.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::proto::{self, Conn, Msg, ProtoError};
use crate::datapath::sockmap::{DetachedFlow, Splicer};

/// Flows per `Flows` message (two descriptors each, under `SCM_MAX_FD`).
const BATCH: usize = proto::MAX_FDS / 2;
/// How long the takeover waits for flows busy forwarding a FIN to reach an idle point. Flows
/// still busy after it stay with this agent.
const COLLECT_FOR: Duration = Duration::from_secs(5);

/// What the handoff asks of the rest of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The new agent accepts on the shared sockets: stop accepting here.
    StopAccepting,
    /// The handoff broke after `StopAccepting`: accept again.
    ResumeAccepting,
    /// The new agent took over: finish the flows kept here, then exit.
    Exit,
}

/// The old agent's handoff endpoint.
pub struct Sender {
    /// The listening sockets to share (dups of the agent's own), with their addresses.
    pub sockets: Vec<(SocketAddr, OwnedFd)>,
    pub splicer: Option<Arc<Splicer>>,
    pub events: mpsc::UnboundedSender<Event>,
    /// Flows in this agent (what it keeps after the handoff, told to the new agent).
    pub flows: Arc<crate::listener::ActiveFlows>,
    /// Set once a new agent took over (see [`Bound`]).
    pub handed_over: Arc<AtomicBool>,
    /// The XDP guard, whose link the new agent takes over.
    pub guard: Option<crate::guard::GuardRuntime>,
}

/// The handoff socket, removed at drop unless a new agent took over (it rebinds the path, and
/// an inode number alone cannot tell: filesystems reuse them at once).
pub struct Bound {
    path: PathBuf,
    ino: u64,
    handed_over: Arc<AtomicBool>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        if self.handed_over.load(Ordering::SeqCst) {
            return;
        }
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Bound {
    /// Set when a new agent took over: the path is its now.
    pub fn handed_over(&self) -> Arc<AtomicBool> {
        self.handed_over.clone()
    }
}

/// Binds the handoff socket at `path` (replacing a stale one), readable by root only.
pub fn bind(path: &Path) -> std::io::Result<(UnixListener, Bound)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let ino = std::fs::metadata(path)?.ino();
    Ok((
        listener,
        Bound {
            path: path.to_path_buf(),
            ino,
            handed_over: Arc::new(AtomicBool::new(false)),
        },
    ))
}

impl Sender {
    /// Serves upgrade requests one at a time until one completes (`Exit`).
    pub async fn serve(self, listener: UnixListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "handoff socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            tracing::info!("a new agent connected to the handoff socket");
            let mut listening = false;
            match self.handle(Conn::new(stream), &mut listening).await {
                Ok(kept) => {
                    self.handed_over.store(true, Ordering::SeqCst);
                    tracing::info!(
                        kept,
                        "hot restart done: the new agent took over; finishing the flows kept here"
                    );
                    let _ = self.events.send(Event::Exit);
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "hot restart failed; this agent keeps serving");
                    if let Some(g) = &self.guard {
                        g.reclaim_link();
                    }
                    if listening {
                        let _ = self.events.send(Event::ResumeAccepting);
                    }
                }
            }
        }
    }

    async fn handle(&self, conn: Conn, listening: &mut bool) -> Result<usize, ProtoError> {
        match conn.recv().await?.0 {
            Msg::Hello { version } if version == proto::VERSION => {}
            Msg::Hello { version } => {
                tracing::warn!(
                    theirs = version,
                    ours = proto::VERSION,
                    "the new agent speaks another handoff version"
                );
            }
            other => {
                return Err(ProtoError::Unexpected {
                    expected: "hello",
                    got: Box::new(other),
                });
            }
        }
        conn.send(
            &Msg::Welcome {
                version: proto::VERSION,
                pid: std::process::id(),
                spliced: self.splicer.is_some(),
            },
            &[],
        )
        .await?;
        let mut took_flows = false;
        loop {
            let msg = conn.recv().await?.0;
            match msg {
                Msg::TakeSockets => {
                    let addrs = self.sockets.iter().map(|(a, _)| *a).collect();
                    let fds: Vec<_> = self.sockets.iter().map(|(_, f)| f.as_fd()).collect();
                    let guard = match self.guard.as_ref().map(|g| g.share_link()) {
                        Some(Ok(link)) => link,
                        Some(Err(e)) => {
                            // The new agent then fails to attach its own and gives up: this
                            // agent keeps serving, guarded.
                            tracing::error!(error = %e, "cannot hand the XDP guard over");
                            None
                        }
                        None => None,
                    };
                    conn.send(&Msg::Sockets { addrs, guard }, &fds).await?;
                }
                Msg::Listening => {
                    *listening = true;
                    let _ = self.events.send(Event::StopAccepting);
                }
                Msg::TakeFlows => {
                    took_flows = true;
                    let handed = match &self.splicer {
                        Some(s) => hand_flows(&conn, s).await?,
                        None => 0,
                    };
                    conn.send(&Msg::FlowsDone { handed }, &[]).await?;
                }
                Msg::Exit => {
                    // Only a new agent that took the flows shares the maps and the event ring;
                    // after a drain-based restart this agent's maps are its own again.
                    if let Some(s) = self.splicer.as_ref().filter(|_| took_flows) {
                        s.retire();
                    }
                    conn.send(
                        &Msg::Bye {
                            kept: self.flows.count(),
                        },
                        &[],
                    )
                    .await?;
                    return Ok(self.flows.count());
                }
                other => {
                    return Err(ProtoError::Unexpected {
                        expected: "take_sockets, listening, take_flows or exit",
                        got: Box::new(other),
                    });
                }
            }
        }
    }
}

/// Detaches every spliced flow and sends them in batches. Returns how many were sent.
async fn hand_flows(conn: &Conn, splicer: &Splicer) -> Result<usize, ProtoError> {
    let mut rx = splicer.begin_takeover();
    let deadline = Instant::now() + COLLECT_FOR;
    let mut sent = 0;
    let result = async {
        loop {
            let mut batch = Vec::new();
            if let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
                batch.push(f);
            }
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(f) => batch.push(f),
                    Err(_) => break,
                }
            }
            let ended = batch.is_empty() && splicer.end_takeover(Instant::now() >= deadline);
            if !batch.is_empty() {
                sent += send_batch(conn, batch).await?;
                continue;
            }
            if ended {
                // Everything detached before the end is in the channel already.
                let rest: Vec<DetachedFlow> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
                let mut rest = rest;
                while !rest.is_empty() {
                    let tail = rest.split_off(rest.len().min(BATCH));
                    sent += send_batch(conn, rest).await?;
                    rest = tail;
                }
                return Ok(sent);
            }
        }
    }
    .await;
    if result.is_err() {
        splicer.end_takeover(true);
    }
    result
}

async fn send_batch(conn: &Conn, batch: Vec<DetachedFlow>) -> Result<usize, ProtoError> {
    let flows = batch.iter().map(|f| f.state).collect();
    let fds: Vec<_> = batch
        .iter()
        .flat_map(|f| [f.down.as_fd(), f.up.as_fd()])
        .collect();
    let n = batch.len();
    // After this the new agent holds the sockets too; this agent's descriptors close below
    // (the sockets live on), and nothing of the flows' map entries is removed.
    conn.send(&Msg::Flows { flows }, &fds).await?;
    Ok(n)
}
