//! The handoff protocol: length-prefixed JSON messages on a Unix stream socket, descriptors
//! attached with `SCM_RIGHTS` to the message that names them.
//!
//! A message is one `sendmsg`: a 4-byte little-endian length, the JSON body, and its descriptors
//! as ancillary data on the first byte. Linux never merges a read across two sends that carry
//! descriptors, so the receiver reads the length with `recvmsg` (getting the message's
//! descriptors) and then the body.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::datapath::sockmap::FlowState;

/// Bumped whenever a message changes meaning; both agents must speak the same one.
pub const VERSION: u32 = 1;

/// The kernel's limit of descriptors in one message (`SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Largest body accepted (a batch of flow states is a few tens of KiB).
const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// New -> old: first message.
    Hello { version: u32 },
    /// Old -> new: who answers, and whether it splices (has BPF maps to take over).
    Welcome {
        version: u32,
        pid: u32,
        spliced: bool,
    },
    /// New -> old: send the listening sockets (they stay shared: both accept meanwhile).
    TakeSockets,
    /// Old -> new: the listening sockets, one descriptor each, in this order; and the XDP
    /// guard's link, pinned for the new agent to take (absent: no guard attached).
    Sockets {
        addrs: Vec<SocketAddr>,
        #[serde(default)]
        guard: Option<crate::guard::SharedLink>,
    },
    /// New -> old: accepting on them now; stop accepting.
    Listening,
    /// New -> old: hand over every spliced flow.
    TakeFlows,
    /// Old -> new: a batch of flows, two descriptors each (client, endpoint), in this order.
    Flows { flows: Vec<FlowState> },
    /// Old -> new: no more flows; `kept` stay with the old agent (userspace copies, stragglers).
    FlowsDone { handed: usize },
    /// New -> old: finish what you kept, then exit.
    Exit,
    /// Old -> new: exiting once its `kept` flows end (or its drain time is over).
    Bye { kept: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("the other agent closed the handoff connection")]
    Closed,
    #[error("handoff connection: {0}")]
    Io(#[from] io::Error),
    #[error("malformed handoff message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("handoff message of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("descriptors were cut off in transit (MSG_CTRUNC)")]
    Truncated,
    #[error("expected {expected}, got {got:?}")]
    Unexpected {
        expected: &'static str,
        got: Box<Msg>,
    },
}

/// One end of a handoff connection.
pub struct Conn {
    stream: UnixStream,
}

impl Conn {
    pub fn new(stream: UnixStream) -> Self {
        Self { stream }
    }

    /// Sends `msg` with `fds` attached.
    pub async fn send(&self, msg: &Msg, fds: &[BorrowedFd<'_>]) -> Result<(), ProtoError> {
        let body = serde_json::to_vec(msg)?;
        let mut frame = u32::try_from(body.len())
            .map_err(|_| ProtoError::TooLarge(body.len()))?
            .to_le_bytes()
            .to_vec();
        frame.extend_from_slice(&body);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let fd = self.stream.as_raw_fd();
        // The descriptors go with the first sendmsg; whatever it did not take is plain bytes.
        let mut sent = loop {
            self.stream.writable().await?;
            let r = self.stream.try_io(Interest::WRITABLE, || {
                let iov = [io::IoSlice::new(&frame)];
                let cmsg = [ControlMessage::ScmRights(&raw)];
                let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
                sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            });
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        };
        while sent < frame.len() {
            self.stream.writable().await?;
            match self.stream.try_write(&frame[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Receives one message and the descriptors attached to it.
    pub async fn recv(&self) -> Result<(Msg, Vec<OwnedFd>), ProtoError> {
        let fd = self.stream.as_raw_fd();
        let mut header = [0u8; 4];
        let (got, fds) = loop {
            self.stream.readable().await?;
            let r = self.stream.try_io(Interest::READABLE, || {
                let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
                let mut iov = [io::IoSliceMut::new(&mut header)];
                let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these descriptors in this process
                        // for us; nothing else owns them.
                        fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                    }
                }
                let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                Ok((msg.bytes, fds, truncated))
            });
            match r {
                Ok((_, _, true)) => return Err(ProtoError::Truncated),
                Ok((n, fds, false)) => break (n, fds),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if got == 0 {
            return Err(ProtoError::Closed);
        }
        self.read_exact(&mut header[got..]).await?;
        let len = u32::from_le_bytes(header) as usize;
        if len > MAX_BODY {
            return Err(ProtoError::TooLarge(len));
        }
        let mut body = vec![0u8; len];
        self.read_exact(&mut body).await?;
        Ok((serde_json::from_slice(&body)?, fds))
    }

    async fn read_exact(&self, mut buf: &mut [u8]) -> Result<(), ProtoError> {
        while !buf.is_empty() {
            self.stream.readable().await?;
            match self.stream.try_read(buf) {
                Ok(0) => return Err(ProtoError::Closed),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
