//! The kernel splice: after routing, both sockets go into the SockHash and the `sk_skb` verdict
//! program redirects each one's incoming bytes to the other's egress. The agent only watches.
//!
//! The handoff and the flow control follow DESIGN.md section 3:
//! - both sockets are inserted while their control entries allow no redirect (`redirect_limit`
//!   0), so an insert that fails (peer already closed: `EOPNOTSUPP`; another sockmap owns the
//!   socket: `EBUSY`) leaves a flow the userspace copy can still carry: nothing is removed from a
//!   live flow, nothing queued is dropped;
//! - each socket is read until empty before it is inserted (a partly read skb would later be
//!   handed to the verdict whole, duplicating its prefix), the flow is armed, any skb that arrived
//!   in between is pushed through the verdict (SO_RCVLOWAT fires data-ready), and only then is the
//!   ClientHello written upstream;
//! - bytes the verdict passes instead of redirecting (a flow not armed) are forwarded by the agent
//!   once everything redirected before them has reached the peer's TCP stream;
//! - bounded memory is NOT enforced yet (see [`REDIRECT_LIMIT`]);
//! - FIN is not forwarded by the kernel: on EOF the agent waits until every redirected byte entered
//!   the peer's TCP stream, then shuts the peer's write side; a reset resets the other side.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData, MapError, SockHash};
use tokio::net::TcpStream;
use zone_ingress_common::{FlowCtrl, FlowSide};

use super::{FlowEnd, FlowSummary, reset};
use crate::bpf::BpfPrograms;

/// The redirect limit a flow is armed with: none. The verdict program can pause a flow past a
/// per-flow budget (`SK_PASS` to the socket's own queue, the agent forwards, then resumes), but on
/// 6.18 that path duplicated one skb per direction in a 1 GiB test with many pause cycles, and the
/// kernel warned about receive-memory accounting (`inet_sock_destruct` from `sk_psock_destroy`).
/// Until the budget is enforced another way, spliced flows are unbounded in kernel memory when a
/// receiver is slower than its sender (DESIGN.md section 3.7); bytes are never lost or reordered.
const REDIRECT_LIMIT: u64 = u64::MAX;
/// How long to wait for the verdict program to process the FIN after the agent saw EOF.
const FIN_PROCESSED_WAIT: Duration = Duration::from_secs(2);

/// Why a flow could not be spliced (it then takes the userspace copy).
#[derive(Debug, thiserror::Error)]
pub enum SpliceRefused {
    #[error("the client or endpoint already closed its side (EOPNOTSUPP on insert)")]
    PeerClosed,
    #[error("the socket already belongs to another sockmap user (EBUSY)")]
    Busy,
    #[error("the flow maps are full")]
    MapFull,
    #[error(
        "a peer kept sending before the TLS handshake could progress (more than {0} bytes queued)"
    )]
    EarlyData(usize),
    #[error("{0}")]
    Other(String),
}

impl SpliceRefused {
    pub fn label(&self) -> &'static str {
        match self {
            Self::PeerClosed => "peer_closed",
            Self::Busy => "busy",
            Self::MapFull => "map_full",
            Self::EarlyData(_) => "early_data",
            Self::Other(_) => "other",
        }
    }

    fn from_map_error(e: MapError) -> Self {
        let errno = match &e {
            MapError::SyscallError(s) => s.io_error.raw_os_error(),
            _ => None,
        };
        match errno {
            Some(libc::EOPNOTSUPP) => Self::PeerClosed,
            Some(libc::EBUSY) => Self::Busy,
            Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC) => Self::MapFull,
            _ => Self::Other(e.to_string()),
        }
    }
}

/// A flow the kernel did not take: the caller copies it in userspace, first writing `to_up` to the
/// endpoint and `to_down` to the client (bytes the handoff already read).
pub struct Fallback {
    pub down: TcpStream,
    pub up: TcpStream,
    pub reason: SpliceRefused,
    pub to_up: Vec<u8>,
    pub to_down: Vec<u8>,
}

/// The BPF maps the splice needs, shared by every flow.
pub struct Splicer {
    socks: Mutex<SockHash<MapData, u64>>,
    flows: Mutex<HashMap<MapData, u64, FlowSide>>,
    ctrl: Mutex<HashMap<MapData, u64, FlowCtrl>>,
    /// Keeps the programs attached and the object loaded.
    _ebpf: aya::Ebpf,
}

impl std::fmt::Debug for Splicer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splicer").finish_non_exhaustive()
    }
}

/// A flow that was handed to the kernel; [`Splicer::run`] watches it to its end.
pub struct SplicedFlow {
    down: TcpStream,
    up: TcpStream,
    down_cookie: u64,
    up_cookie: u64,
    /// Bytes the agent itself wrote upstream (the ClientHello and anything read with it).
    initial: u64,
    /// Bytes the agent itself wrote to the client (anything the endpoint sent before the splice).
    initial_down: u64,
    started: Instant,
}

/// The outcome of one direction.
struct DirectionEnd {
    /// Passed bytes the agent read and forwarded (userspace copies within a spliced flow).
    copied: u64,
}

impl Splicer {
    pub fn new(programs: BpfPrograms) -> Self {
        let BpfPrograms {
            ebpf,
            socks,
            flows,
            ctrl,
            ..
        } = programs;
        Self {
            socks: Mutex::new(socks),
            flows: Mutex::new(flows),
            ctrl: Mutex::new(ctrl),
            _ebpf: ebpf,
        }
    }

    /// Hands the pair to the kernel. On `Err`, the streams come back untouched by the maps (or in
    /// a state where every byte is passed to userspace) and the caller copies in userspace.
    pub async fn handoff(
        &self,
        down: TcpStream,
        up: TcpStream,
        initial: &[u8],
    ) -> Result<SplicedFlow, Fallback> {
        // A receive-queue skb that a plain read consumed only in part is later handed to the
        // verdict whole (tcp_read_skb ignores the read offset): its prefix would be sent twice. So
        // read each socket until it is empty before it joins the SockHash. A TLS peer has nothing
        // queued here (the client waits for the ServerHello, the server for the ClientHello).
        let mut to_up = initial.to_vec();
        let mut to_down = Vec::new();
        let drained = drain_queued(&down, &mut to_up).and_then(|_| drain_queued(&up, &mut to_down));
        if let Err(reason) = drained {
            return Err(Fallback {
                down,
                up,
                reason,
                to_up,
                to_down,
            });
        }
        let refuse = |down, up, reason, to_up, to_down| Fallback {
            down,
            up,
            reason,
            to_up,
            to_down,
        };
        let (down_cookie, up_cookie) = match (socket_cookie(&down), socket_cookie(&up)) {
            (Ok(d), Ok(u)) => (d, u),
            (Err(e), _) | (_, Err(e)) => {
                return Err(refuse(
                    down,
                    up,
                    SpliceRefused::Other(format!("SO_COOKIE: {e}")),
                    to_up,
                    to_down,
                ));
            }
        };
        // Control entries first, with no budget: until armed, the verdict passes every byte to the
        // socket's own queue, where the userspace copy can read it.
        if let Err(e) = self
            .arm(down_cookie, 0, 0)
            .and_then(|_| self.arm(up_cookie, 0, 0))
        {
            self.forget(down_cookie, up_cookie);
            return Err(refuse(
                down,
                up,
                SpliceRefused::from_map_error(e),
                to_up,
                to_down,
            ));
        }
        let paused = |peer_cookie| FlowSide {
            peer_cookie,
            paused: 1,
            ..FlowSide::default()
        };
        let inserted = {
            let mut flows = lock(&self.flows);
            flows
                .insert(down_cookie, paused(up_cookie), 0)
                .and_then(|_| flows.insert(up_cookie, paused(down_cookie), 0))
        };
        if let Err(e) = inserted {
            self.forget(down_cookie, up_cookie);
            return Err(refuse(
                down,
                up,
                SpliceRefused::from_map_error(e),
                to_up,
                to_down,
            ));
        }
        {
            let mut socks = lock(&self.socks);
            if let Err(e) = socks.insert(down_cookie, down.as_raw_fd(), 0) {
                drop(socks);
                self.forget(down_cookie, up_cookie);
                return Err(refuse(
                    down,
                    up,
                    SpliceRefused::from_map_error(e),
                    to_up,
                    to_down,
                ));
            }
            if let Err(e) = socks.insert(up_cookie, up.as_raw_fd(), 0) {
                // The client socket is in the SockHash now and must stay there (removing it would
                // drop whatever the kernel queued). Its control entry keeps a zero budget, so all
                // its bytes are passed to userspace, where the fallback copy reads them.
                return Err(refuse(
                    down,
                    up,
                    SpliceRefused::from_map_error(e),
                    to_up,
                    to_down,
                ));
            }
        }
        // Arm before anything is written: the endpoint answers the ClientHello within microseconds,
        // and its answer must be redirected, not passed (see `REDIRECT_LIMIT`).
        let armed = self
            .arm(down_cookie, REDIRECT_LIMIT, 0)
            .and_then(|_| self.arm(up_cookie, REDIRECT_LIMIT, 0));
        if let Err(e) = armed {
            // Both sockets are in the SockHash with a zero limit: every byte is passed to the
            // userspace copy, nothing was written yet.
            return Err(refuse(
                down,
                up,
                SpliceRefused::from_map_error(e),
                to_up,
                to_down,
            ));
        }
        // Bytes that reached a socket before it joined the SockHash sit in its receive queue, and
        // the kernel only runs the verdict over them on its next data-ready event. Reading them
        // directly instead is unsafe: the verdict later re-reads a partially read skb from its
        // start (duplicated bytes). Setting SO_RCVLOWAT fires data-ready now, so they go through
        // the verdict like every later byte.
        for s in [&down, &up] {
            if let Err(e) = set_rcvlowat(s, 1) {
                tracing::debug!(error = %e, "SO_RCVLOWAT failed; queued bytes wait for the next segment");
            }
        }
        let written = match write_all(&up, &to_up).await {
            Ok(()) => write_all(&down, &to_down).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            // A peer broke before the flow started: the fallback copy sees it and resets the other.
            return Err(refuse(
                down,
                up,
                SpliceRefused::Other(format!("writing the replayed bytes: {e}")),
                Vec::new(),
                Vec::new(),
            ));
        }
        Ok(SplicedFlow {
            down,
            up,
            down_cookie,
            up_cookie,
            initial: to_up.len() as u64,
            initial_down: to_down.len() as u64,
            started: Instant::now(),
        })
    }

    /// Watches a spliced flow until both directions ended (FIN forwarded after the data) or one
    /// side broke (both reset). Removes the flow's map entries at the end.
    pub async fn run(&self, flow: SplicedFlow) -> FlowSummary {
        let SplicedFlow {
            down,
            up,
            down_cookie,
            up_cookie,
            initial,
            initial_down,
            started,
        } = flow;
        let to_up = Direction {
            splicer: self,
            src: &down,
            dst: &up,
            src_cookie: down_cookie,
            agent_written: initial,
        };
        let to_down = Direction {
            splicer: self,
            src: &up,
            dst: &down,
            src_cookie: up_cookie,
            agent_written: initial_down,
        };
        let (r_up, r_down) = tokio::join!(to_up.run(), to_down.run());
        let end = match (&r_up, &r_down) {
            (Ok(_), Ok(_)) => FlowEnd::Closed,
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "spliced flow broke; resetting both sides");
                reset(&down);
                reset(&up);
                FlowEnd::Reset
            }
        };
        let copied = |r: &io::Result<DirectionEnd>| r.as_ref().map(|d| d.copied).unwrap_or(0);
        let side = |cookie| self.side(cookie).unwrap_or_default();
        let (d, u) = (side(down_cookie), side(up_cookie));
        self.forget(down_cookie, up_cookie);
        FlowSummary {
            end,
            bytes_up: initial + d.redirected_bytes + copied(&r_up),
            bytes_down: initial_down + u.redirected_bytes + copied(&r_down),
            copied: initial + initial_down + copied(&r_up) + copied(&r_down),
            duration: started.elapsed(),
        }
    }

    /// Bytes the agent copied in userspace for this flow so far is reported by `run`; this is the
    /// kernel's view of one side.
    fn side(&self, cookie: u64) -> Option<FlowSide> {
        lock(&self.flows).get(&cookie, 0).ok()
    }

    fn arm(&self, cookie: u64, redirect_limit: u64, consumed_bytes: u64) -> Result<(), MapError> {
        lock(&self.ctrl).insert(
            cookie,
            FlowCtrl {
                redirect_limit,
                consumed_bytes,
            },
            0,
        )
    }

    /// Removes a flow's entries (the SockHash entries go with the sockets when they close).
    fn forget(&self, down_cookie: u64, up_cookie: u64) {
        for cookie in [down_cookie, up_cookie] {
            let _ = lock(&self.flows).remove(&cookie);
            let _ = lock(&self.ctrl).remove(&cookie);
        }
    }
}

/// One direction of a spliced flow: bytes arriving on `src` go to `dst`.
struct Direction<'a> {
    splicer: &'a Splicer,
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_cookie: u64,
    /// Bytes the agent wrote to `dst` itself (ClientHello, forwarded passed bytes).
    agent_written: u64,
}

impl Direction<'_> {
    async fn run(mut self) -> io::Result<DirectionEnd> {
        let mut copied = 0u64;
        let mut buf: Vec<u8> = Vec::new();
        loop {
            // Read interest only: a spliced socket becomes readable on EOF, on an error, or when
            // the verdict passed bytes to it (a flow that was never armed).
            self.src.readable().await?;
            if buf.is_empty() {
                buf = vec![0u8; 64 * 1024];
            }
            loop {
                match self.src.try_read(&mut buf) {
                    Ok(0) => {
                        self.finish().await?;
                        return Ok(DirectionEnd { copied });
                    }
                    Ok(n) => {
                        // Passed bytes come after everything redirected so far, so they go out
                        // only once the redirect queue drained into the peer's TCP stream.
                        self.wait_redirects_in_tcp().await?;
                        write_all(self.dst, &buf[..n]).await?;
                        self.agent_written += n as u64;
                        copied += n as u64;
                        self.splicer
                            .arm(self.src_cookie, REDIRECT_LIMIT, copied)
                            .map_err(io::Error::other)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Resolves once every byte redirected from `src` has entered `dst`'s TCP stream (so a write
    /// by the agent, or a FIN, cannot overtake it).
    async fn wait_redirects_in_tcp(&self) -> io::Result<()> {
        let mut delay = Duration::from_micros(50);
        loop {
            let side = self.splicer.side(self.src_cookie).unwrap_or_default();
            let in_tcp = tcp_stream_bytes(self.dst)?;
            if in_tcp >= side.redirected_bytes + self.agent_written {
                return Ok(());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(5));
        }
    }

    /// EOF on `src`: forward the FIN once every byte before it reached `dst`'s TCP stream.
    async fn finish(&self) -> io::Result<()> {
        // The FIN is processed by the verdict (and dropped) after every skb before it; once it has
        // been, `redirected_bytes` is final.
        let deadline = Instant::now() + FIN_PROCESSED_WAIT;
        while self
            .splicer
            .side(self.src_cookie)
            .unwrap_or_default()
            .dropped_empty
            == 0
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        self.wait_redirects_in_tcp().await?;
        match socket2::SockRef::from(self.dst).shutdown(Shutdown::Write) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Most bytes the handoff reads off a socket before giving up on splicing it.
const MAX_EARLY_BYTES: usize = 256 * 1024;

/// Reads everything queued on `stream` into `out`, until the queue is empty.
fn drain_queued(stream: &TcpStream, out: &mut Vec<u8>) -> Result<(), SpliceRefused> {
    let mut buf = [0u8; 16 * 1024];
    let start = out.len();
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return Err(SpliceRefused::PeerClosed),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() - start > MAX_EARLY_BYTES {
                    return Err(SpliceRefused::EarlyData(MAX_EARLY_BYTES));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SpliceRefused::Other(format!("reading queued bytes: {e}"))),
        }
    }
}

/// `TCP_CLOSE` from the kernel's tcp_states.h (not exported by libc).
const TCP_CLOSE: u8 = 7;

/// Bytes that entered a socket's TCP send stream: acknowledged plus still queued (SIOCOUTQ). The
/// redirect queue sits in front of it, outside TCP's accounting.
fn tcp_stream_bytes(stream: &TcpStream) -> io::Result<u64> {
    let fd = stream.as_raw_fd();
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if info.tcpi_state == TCP_CLOSE {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "peer socket closed while spliced bytes were in flight",
        ));
    }
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + outq.max(0) as u64)
}

fn set_rcvlowat(stream: &TcpStream, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: SO_RCVLOWAT reads one int.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn socket_cookie(stream: &TcpStream) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_COOKIE writes one u64.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a map handle cannot leave the handle inconsistent (it is an fd).
    m.lock().unwrap_or_else(|p| p.into_inner())
}
