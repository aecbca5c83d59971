//! The local redirect (`--local-redirect`): when a spliced flow's endpoint is a socket of the
//! agent's own network namespace, the endpoint's sends go straight to the client socket's egress
//! (`sk_msg`) instead of through loopback TCP to the agent's upstream socket and the verdict.
//!
//! How a flow gets it:
//! 1. Before connecting, the agent binds its upstream socket to the endpoint's own address (port
//!    0). That succeeds only if the address is local to this namespace (`EADDRNOTAVAIL`
//!    otherwise), and it is the source the kernel would pick for a local destination anyway. It
//!    now knows the connection's 4-tuple and registers it in `ZI_LOCAL_FLOWS`, unarmed, then
//!    connects.
//! 2. The `sock_ops` program (cgroup v2 root, multi-attach, through a BPF link that is closed with
//!    the agent's last file descriptor: a crashed agent leaves nothing attached) sees the
//!    endpoint's socket become established, finds the tuple (seen from the endpoint's side, in
//!    the same namespace) and puts the socket into `ZI_LOCAL_SOCKS` and its cookie in the entry.
//! 3. At the handoff the agent arms the entry (after both spliced sockets are in `ZI_SOCKS`,
//!    before the ClientHello is written): from then on every send of the endpoint is redirected
//!    by `sk_msg` into the client socket's TCP send queue, synchronously inside the endpoint's
//!    `sendmsg`. The endpoint's FIN or reset still reaches the agent's upstream socket over TCP,
//!    after every byte it sent: the agent forwards it as for any spliced flow.
//!
//! A flow whose endpoint socket did not show up in time (not local after all, or another
//! namespace) is spliced as usual; its unarmed entry only makes `sk_msg` pass the sends to TCP.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::error::Error as _;

use aya::Ebpf;
use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use tokio::net::{TcpSocket, TcpStream};
use zone_ingress_common::{LocalFlow, LocalKey, map_names, prog_names};

use super::sockopt;
use crate::bpf::{self, BpfError};

/// What the operator asked for with `--local-redirect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LocalRedirectMode {
    /// Redirect the sends of endpoints on this host when the kernel splice is in use and the
    /// `sock_ops` program could be attached; otherwise the plain splice.
    Auto,
    /// Never: endpoints on this host are spliced like remote ones (through loopback TCP).
    Off,
}

/// How long the handoff waits for the endpoint's socket to appear after the connect completed.
/// On loopback the endpoint's side is established before `connect` returns; this only covers a
/// busy host.
const ENDPOINT_WAIT: Duration = Duration::from_millis(5);

/// How far the bytes the endpoint sends straight to the client may run ahead of what the client
/// acknowledged (at most the splice budget). The client socket's send buffer is forced to four
/// times this (the kernel doubles the value set), so a redirected push always finds room. The
/// agent moves the limit from its 1 ms watch; `sk_msg` asks for a new one when a quarter of the
/// window is used. At 1 MiB the remaining three quarters were about 3 ms of 16 KiB
/// request/response traffic, and a busy host (spinning processes on both CPUs) kept the agent
/// off the CPU that long often enough that rpc flows fell back in 2 of 4 runs.
pub const WINDOW: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "no cgroup v2 hierarchy found in /proc/self/mountinfo (the local redirect attaches a \
         sock_ops program to the cgroup v2 root; mount cgroup2 or use --local-redirect off)"
    )]
    NoCgroup2,
    #[error("opening the cgroup v2 root {path}: {source}")]
    OpenCgroup { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Bpf(#[from] BpfError),
    #[error("reading this namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+): {0}")]
    NetnsCookie(io::Error),
}

impl LocalError {
    /// The message with every underlying cause (aya's syscall errors keep the errno in a source).
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = self.source();
        while let Some(s) = source {
            let next = s.to_string();
            if !text.ends_with(&next) {
                text.push_str(": ");
                text.push_str(&next);
            }
            source = s.source();
        }
        text
    }
}

/// The loaded local-redirect programs and the map of registered connections.
pub struct LocalRedirect {
    flows: Mutex<HashMap<MapData, LocalKey, LocalFlow>>,
    netns: u64,
}

impl std::fmt::Debug for LocalRedirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRedirect")
            .field("netns", &self.netns)
            .finish()
    }
}

/// A connection registered for the local redirect; [`LocalRedirect::forget`] removes it.
#[derive(Debug, Clone, Copy)]
pub struct Registration {
    key: LocalKey,
    down_cookie: u64,
}

impl LocalRedirect {
    /// Attaches `sk_msg` to `ZI_LOCAL_SOCKS` and `sock_ops` to the cgroup v2 root, from the
    /// splice's own object instance (they share its maps). The links live as long as `ebpf`.
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, LocalError> {
        let cgroup = cgroup2_root()?;
        let cgroup_dir = File::open(&cgroup).map_err(|source| LocalError::OpenCgroup {
            path: cgroup.clone(),
            source,
        })?;
        let socks: SockHash<MapData, u64> =
            bpf::take_map(ebpf, map_names::LOCAL_SOCKS, SockHash::try_from)?;
        let flows = bpf::take_map(ebpf, map_names::LOCAL_FLOWS, HashMap::try_from)?;
        let program = |name, source| BpfError::Program { name, source };
        let missing = |name| BpfError::Map {
            name,
            detail: "program not in the object".into(),
        };
        let name = prog_names::LOCAL_SK_MSG;
        let msg: &mut SkMsg = ebpf
            .program_mut(name)
            .ok_or_else(|| missing(name))?
            .try_into()
            .map_err(|e| program(name, e))?;
        msg.load().map_err(|e| program(name, e))?;
        msg.attach(socks.fd()).map_err(|e| program(name, e))?;
        let name = prog_names::LOCAL_SOCK_OPS;
        let ops: &mut SockOps = ebpf
            .program_mut(name)
            .ok_or_else(|| missing(name))?
            .try_into()
            .map_err(|e| program(name, e))?;
        ops.load().map_err(|e| program(name, e))?;
        // A BPF link (kernel 5.7+): detached when its fd closes, i.e. when the agent exits. Links
        // on a cgroup always coexist with other links and multi-attached programs (several
        // agents, other tools); the kernel refuses attach flags on them, hence `Single` (no flag).
        ops.attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(|e| program(name, e))?;
        let netns = netns_cookie().map_err(LocalError::NetnsCookie)?;
        tracing::info!(cgroup = %cgroup.display(), "local redirect: sock_ops attached, sk_msg on endpoint sockets");
        // The SockHash handle may go: the map lives while the sk_msg program is attached to it.
        drop(socks);
        Ok(Self {
            flows: Mutex::new(flows),
            netns,
        })
    }

    /// Connects to `endpoint` the way the local redirect needs when the endpoint's address is
    /// local: bound first, registered, then connected. `Ok(None)`: the address is not local, the
    /// caller connects as usual.
    pub async fn connect(
        &self,
        endpoint: SocketAddr,
        down_cookie: u64,
    ) -> io::Result<Option<(TcpStream, Registration)>> {
        let socket = match endpoint {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        match socket.bind(SocketAddr::new(endpoint.ip(), 0)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => return Ok(None),
            Err(e) => return Err(e),
        }
        let local = socket.local_addr()?;
        let key = self.key(endpoint, local);
        let registration = Registration { key, down_cookie };
        let entry = LocalFlow {
            down_cookie,
            endpoint_cookie: 0,
            armed: 0,
            window: 0,
        };
        if let Err(e) = lock(&self.flows).insert(key, entry, 0) {
            // Map full or similar: this flow simply takes the plain splice.
            tracing::debug!(error = %e, "local redirect: cannot register the connection");
            return Ok(None);
        }
        // Removes the entry if the connect fails or is cancelled (connect timeout).
        struct Unregister<'a>(&'a LocalRedirect, Option<Registration>);
        impl Drop for Unregister<'_> {
            fn drop(&mut self) {
                if let Some(r) = self.1.take() {
                    self.0.forget(&r);
                }
            }
        }
        let mut pending = Unregister(self, Some(registration));
        let stream = socket.connect(endpoint).await?;
        pending.1 = None;
        Ok(Some((stream, registration)))
    }

    /// The endpoint socket's cookie once `sock_ops` put it into `ZI_LOCAL_SOCKS` (waiting at most
    /// [`ENDPOINT_WAIT`]), or `None`: the flow takes the plain splice.
    pub async fn endpoint_cookie(&self, registration: &Registration) -> Option<u64> {
        let deadline = Instant::now() + ENDPOINT_WAIT;
        loop {
            let cookie = lock(&self.flows)
                .get(&registration.key, 0)
                .map(|f| f.endpoint_cookie)
                .unwrap_or(0);
            if cookie != 0 {
                return Some(cookie);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    /// Lets `sk_msg` redirect the endpoint's sends, at most `window` bytes ahead of what the
    /// client acknowledged. The endpoint socket's `FlowSide` and `FlowCtrl` must exist.
    pub fn arm(
        &self,
        registration: &Registration,
        endpoint_cookie: u64,
        window: u64,
    ) -> io::Result<()> {
        let entry = LocalFlow {
            down_cookie: registration.down_cookie,
            endpoint_cookie,
            armed: 1,
            window,
        };
        lock(&self.flows)
            .insert(registration.key, entry, 0)
            .map_err(io::Error::other)
    }

    /// Removes the registration (the endpoint socket leaves `ZI_LOCAL_SOCKS` when it closes).
    pub fn forget(&self, registration: &Registration) {
        let _ = lock(&self.flows).remove(&registration.key);
    }

    /// The key `sock_ops` and `sk_msg` compute for this connection on the endpoint's side.
    fn key(&self, endpoint: SocketAddr, agent: SocketAddr) -> LocalKey {
        let (family, local_ip, remote_ip) = match (endpoint.ip(), agent.ip()) {
            (IpAddr::V4(e), IpAddr::V4(a)) => (
                libc::AF_INET as u32,
                [u32::from_ne_bytes(e.octets()), 0, 0, 0],
                [u32::from_ne_bytes(a.octets()), 0, 0, 0],
            ),
            (e, a) => (libc::AF_INET6 as u32, words(e), words(a)),
        };
        LocalKey {
            netns: self.netns,
            family,
            local_port: u32::from(endpoint.port()),
            remote_port: u32::from(agent.port()),
            _pad: 0,
            local_ip,
            remote_ip,
        }
    }
}

/// An address as four u32 words in network byte order (IPv4 mapped into IPv6).
fn words(ip: IpAddr) -> [u32; 4] {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let mut w = [0u32; 4];
    for (i, chunk) in octets.chunks_exact(4).enumerate() {
        w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    w
}

/// `SO_NETNS_COOKIE` (not in every libc release).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the agent's network namespace, as `bpf_get_netns_cookie` reports it.
fn netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    sockopt::get(&socket, libc::SOL_SOCKET, SO_NETNS_COOKIE)
}

/// Where the cgroup v2 hierarchy is mounted (its root as this process sees it).
fn cgroup2_root() -> Result<PathBuf, LocalError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
        LocalError::OpenCgroup {
            path: PathBuf::from("/proc/self/mountinfo"),
            source,
        }
    })?;
    cgroup2_from_mountinfo(&info).ok_or(LocalError::NoCgroup2)
}

/// The mount point of the first `cgroup2` line of a mountinfo text.
fn cgroup2_from_mountinfo(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ..."
        let (fields, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(Path::new(fields.split_whitespace().nth(4)?).to_path_buf())
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let info = "24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw\n\
                    35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_from_mountinfo(info),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_from_mountinfo("24 30 0:22 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }

    #[test]
    fn ipv4_words_are_network_order_bytes() {
        let w = words("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(w[3].to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(w[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
    }
}
