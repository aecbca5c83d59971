//! The new agent's side of a hot restart (`zone-ingress run --upgrade`).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::net::UnixStream;
use tokio::sync::watch;

use super::proto::{self, Conn, Msg, ProtoError};
use crate::datapath::sockmap::Splicer;
use crate::listener::ActiveFlows;
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "cannot reach the running agent at {path}: {source} (is it running with the same \
         --pin-dir / --handoff-socket?)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("the running agent speaks handoff version {theirs}, this one {ours}")]
    Version { theirs: u32, ours: u32 },
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("the running agent sent {fds} descriptors for {expected}")]
    Descriptors { fds: usize, expected: usize },
}

/// A handoff in progress, from the new agent's side.
pub struct Upgrade {
    conn: Conn,
    pub old_pid: u32,
    /// Whether the old agent splices (has flows and maps to take over).
    pub old_spliced: bool,
    /// Listening sockets received and not yet used.
    sockets: Mutex<Vec<(SocketAddr, OwnedFd)>>,
    /// The old agent's XDP guard link, pinned for this agent to take.
    guard_link: Option<crate::guard::SharedLink>,
}

impl Upgrade {
    /// Connects to the running agent and takes its listening sockets (it keeps accepting on them
    /// until [`Upgrade::listening`]).
    pub async fn connect(path: &Path) -> Result<Self, UpgradeError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| UpgradeError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let conn = Conn::new(stream);
        conn.send(
            &Msg::Hello {
                version: proto::VERSION,
            },
            &[],
        )
        .await?;
        let (old_pid, old_spliced) = match conn.recv().await?.0 {
            Msg::Welcome { version, .. } if version != proto::VERSION => {
                return Err(UpgradeError::Version {
                    theirs: version,
                    ours: proto::VERSION,
                });
            }
            Msg::Welcome { pid, spliced, .. } => (pid, spliced),
            other => {
                return Err(ProtoError::Unexpected {
                    expected: "welcome",
                    got: Box::new(other),
                }
                .into());
            }
        };
        conn.send(&Msg::TakeSockets, &[]).await?;
        let (msg, fds) = conn.recv().await?;
        let Msg::Sockets { addrs, guard } = msg else {
            return Err(ProtoError::Unexpected {
                expected: "sockets",
                got: Box::new(msg),
            }
            .into());
        };
        if addrs.len() != fds.len() {
            return Err(UpgradeError::Descriptors {
                fds: fds.len(),
                expected: addrs.len(),
            });
        }
        tracing::info!(old_pid, sockets = ?addrs, "connected to the running agent; took its listening sockets");
        Ok(Self {
            conn,
            old_pid,
            old_spliced,
            sockets: Mutex::new(addrs.into_iter().zip(fds).collect()),
            guard_link: guard,
        })
    }

    /// The old agent's XDP guard link, if it had the guard attached.
    pub fn guard_link(&self) -> Option<&crate::guard::SharedLink> {
        self.guard_link.as_ref()
    }

    /// The old agent's listening socket bound at `addr`, if it had one.
    pub fn take_socket(&self, addr: SocketAddr) -> Option<OwnedFd> {
        let mut s = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        let i = s.iter().position(|(a, _)| *a == addr)?;
        Some(s.swap_remove(i).1)
    }

    /// Tells the old agent this one accepts now.
    pub async fn listening(&self) -> Result<(), UpgradeError> {
        Ok(self.conn.send(&Msg::Listening, &[]).await?)
    }

    /// Takes every spliced flow of the old agent and watches each in its own task. Returns how
    /// many were adopted.
    pub async fn take_flows(&self, ctx: &Adopter) -> Result<usize, UpgradeError> {
        self.conn.send(&Msg::TakeFlows, &[]).await?;
        let mut adopted = 0;
        loop {
            let (msg, fds) = self.conn.recv().await?;
            match msg {
                Msg::Flows { flows } => {
                    if fds.len() != flows.len() * 2 {
                        // The descriptors that did arrive close here; their flows are lost,
                        // which is why this is checked before anything else is adopted.
                        return Err(UpgradeError::Descriptors {
                            fds: fds.len(),
                            expected: flows.len() * 2,
                        });
                    }
                    let mut fds = fds.into_iter();
                    for state in flows {
                        let (Some(down), Some(up)) = (fds.next(), fds.next()) else {
                            break;
                        };
                        match ctx.splicer.adopt(down, up, &state) {
                            Ok(flow) => {
                                adopted += 1;
                                ctx.spawn(flow);
                            }
                            Err(e) => {
                                tracing::error!(cookie = state.down_cookie, error = %e, "cannot adopt a handed-over flow; it is closed");
                            }
                        }
                    }
                }
                Msg::FlowsDone { handed } => {
                    tracing::info!(
                        handed,
                        adopted,
                        "took over the running agent's spliced flows"
                    );
                    return Ok(adopted);
                }
                other => {
                    return Err(ProtoError::Unexpected {
                        expected: "flows or flows_done",
                        got: Box::new(other),
                    }
                    .into());
                }
            }
        }
    }

    /// Tells the old agent to exit once the flows it kept are done. Returns how many it kept.
    pub async fn finish(self) -> Result<usize, UpgradeError> {
        self.conn.send(&Msg::Exit, &[]).await?;
        match self.conn.recv().await?.0 {
            Msg::Bye { kept } => Ok(kept),
            other => Err(ProtoError::Unexpected {
                expected: "bye",
                got: Box::new(other),
            }
            .into()),
        }
    }
}

/// What an adopted flow's task needs.
pub struct Adopter {
    pub splicer: Arc<Splicer>,
    pub stats: Arc<Stats>,
    pub flows: Arc<ActiveFlows>,
    pub drain: watch::Receiver<bool>,
}

impl Adopter {
    fn spawn(&self, flow: crate::datapath::sockmap::SplicedFlow) {
        let guard = self.flows.enter();
        let (splicer, stats, drain) =
            (self.splicer.clone(), self.stats.clone(), self.drain.clone());
        stats.connection_opened();
        tokio::spawn(async move {
            // Redirected bytes are in the kernel's route counters. What the agents moved
            // themselves (the replay, paused directions' bytes) is counted by the agent the flow
            // ends with: one that hands a flow over counts nothing for it.
            let summary = splicer.run(flow, drain).await;
            if summary.end != crate::datapath::FlowEnd::HandedOver {
                stats.copied(crate::stats::DatapathKind::Sockmap, summary.copied);
            }
            tracing::debug!(end = ?summary.end, duration = ?summary.duration, "adopted flow finished");
            stats.connection_closed();
            drop(guard);
        });
    }
}
