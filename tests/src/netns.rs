//! Network namespaces for the tests.
//!
//! A [`Netns`] owns one namespace (`ip netns add`), deleted on Drop. Code runs inside it in two ways:
//! - sockets: [`Netns::exec`] runs a closure on a worker thread that did `setns(CLONE_NEWNET)`; sockets created
//!   there keep that namespace for life, so [`Netns::listen`] / [`Netns::connect`] hand back tokio sockets that
//!   the test drives from its own runtime;
//! - whole futures: [`Netns::spawn`] runs a future on a fresh std thread (setns, then a current-thread runtime);
//! - processes: [`Netns::command`] builds a `Command` that enters the namespace before exec.
//!
//! [`Topology`] wires client <-> ingress <-> backend with veth pairs, IPv4 and IPv6.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Client namespace, on the client <-> ingress link.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 231, 1, 1);
/// The ingress address the client dials (the ZoneIngress `networking.address`).
pub const INGRESS_V4: Ipv4Addr = Ipv4Addr::new(10, 231, 1, 2);
/// The ingress address on the ingress <-> backend link.
pub const INGRESS_UPSTREAM_V4: Ipv4Addr = Ipv4Addr::new(10, 231, 2, 1);
/// Backend namespace, on the ingress <-> backend link.
pub const BACKEND_V4: Ipv4Addr = Ipv4Addr::new(10, 231, 2, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x231, 1, 0, 0, 0, 0, 1);
pub const INGRESS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x231, 1, 0, 0, 0, 0, 2);
pub const INGRESS_UPSTREAM_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x231, 2, 0, 0, 0, 0, 1);
pub const BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x231, 2, 0, 0, 0, 0, 2);

/// Prefix of every namespace this harness creates: `zi-<pid>-<n>-<role>`.
const PREFIX: &str = "zi-";

type Job = Box<dyn FnOnce() + Send>;

/// One network namespace, deleted on Drop.
pub struct Netns {
    name: String,
    fd: File,
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
}

/// Runs `ip ARGS`, panicking with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("could not run `ip` (iproute2): is it installed and on PATH?");
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn enter(fd: &File) -> std::io::Result<()> {
    // SAFETY: `fd` is an open namespace file; setns only changes the calling thread's network namespace.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Deletes namespaces left behind by test processes that died without running their Drop guards
/// (names carry the pid of their creator; only namespaces of dead pids are touched).
pub fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

impl Netns {
    /// Creates the namespace `name` with `lo` up.
    pub fn new(name: &str) -> Netns {
        crate::require_root();
        ip(&["netns", "add", name]);
        // From here on Drop deletes the namespace, even if the rest of the setup panics.
        let path = format!("/var/run/netns/{name}");
        let fd = match File::open(&path) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
                panic!("could not open {path} after `ip netns add`: {e}");
            }
        };
        let worker_fd = fd.try_clone().expect("dup of the namespace fd");
        let (tx, rx) = mpsc::channel::<Job>();
        let worker = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                enter(&worker_fd).expect("setns(CLONE_NEWNET) into the test namespace");
                for job in rx {
                    job();
                }
            })
            .expect("spawn the namespace worker thread");
        let ns = Netns {
            name: name.to_string(),
            fd,
            jobs: Some(tx),
            worker: Some(worker),
        };
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread inside this namespace and returns its result (panics propagate). Use it for short
    /// work such as creating sockets: it blocks the caller until `f` returns.
    pub fn exec<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
        });
        self.jobs
            .as_ref()
            .expect("namespace worker is running")
            .send(job)
            .expect("namespace worker thread is gone (did setns fail? see its panic above)");
        match rx.recv().expect("namespace worker dropped a job") {
            Ok(v) => v,
            Err(panic) => resume_unwind(panic),
        }
    }

    /// Runs a whole future inside the namespace: a fresh std thread enters the namespace and drives the future
    /// on a current-thread tokio runtime. Await the returned future for its output (panics propagate).
    pub fn spawn<F, Fut, T>(&self, f: F) -> impl Future<Output = T> + Send + 'static
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let fd = self.fd.try_clone().expect("dup of the namespace fd");
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("netns-spawn-{}", self.name))
            .spawn(move || {
                let res = catch_unwind(AssertUnwindSafe(|| {
                    enter(&fd).expect("setns(CLONE_NEWNET) into the test namespace");
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("build a current-thread runtime inside the namespace");
                    rt.block_on(f())
                }));
                let _ = tx.send(res);
            })
            .expect("spawn a namespace thread");
        async move {
            match rx.await.expect("namespace thread vanished") {
                Ok(v) => v,
                Err(panic) => resume_unwind(panic),
            }
        }
    }

    /// A `Command` whose process runs inside this namespace. It enters the namespace with `setns` between fork
    /// and exec (instead of `ip netns exec`, which remounts /sys and would hide /sys/fs/bpf pins from the test),
    /// and gets SIGKILL if the thread that spawned it dies.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let fd = self.fd.try_clone().expect("dup of the namespace fd");
        let mut cmd = Command::new(program);
        // SAFETY: the closure only makes async-signal-safe syscalls (setns, prctl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                enter(&fd)?;
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// A listening TCP socket inside the namespace (SO_REUSEADDR, backlog 4096).
    pub async fn listen(&self, addr: SocketAddr) -> tokio::net::TcpListener {
        let std_listener = self.exec(move || -> std::io::Result<std::net::TcpListener> {
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            sock.set_reuse_address(true)?;
            if addr.is_ipv6() {
                sock.set_only_v6(true)?;
            }
            sock.bind(&addr.into())?;
            sock.listen(4096)?;
            sock.set_nonblocking(true)?;
            Ok(sock.into())
        });
        let std_listener = std_listener
            .unwrap_or_else(|e| panic!("listen on {addr} in namespace {}: {e}", self.name));
        tokio::net::TcpListener::from_std(std_listener).expect("register listener with tokio")
    }

    /// `n` unconnected TCP sockets created inside the namespace, for the given address family.
    pub fn sockets(&self, n: usize, v6: bool) -> Vec<tokio::net::TcpSocket> {
        let std_socks = self.exec(move || -> std::io::Result<Vec<std::net::TcpStream>> {
            let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
            (0..n)
                .map(|_| {
                    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
                    s.set_nonblocking(true)?;
                    Ok(s.into())
                })
                .collect()
        });
        std_socks
            .unwrap_or_else(|e| panic!("create {n} sockets in namespace {}: {e}", self.name))
            .into_iter()
            .map(tokio::net::TcpSocket::from_std_stream)
            .collect()
    }

    /// A TCP connection made from inside the namespace (TCP_NODELAY on), bounded by 5 s.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let sock = self.sockets(1, addr.is_ipv6()).pop().expect("one socket");
        let stream = tokio::time::timeout(Duration::from_secs(5), sock.connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect to {addr}"))
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Three namespaces: client <-> ingress <-> backend.
///
/// | namespace | interface | IPv4 | IPv6 |
/// |---|---|---|---|
/// | client | `to-ingress` | 10.231.1.1/24 | fd00:231:1::1/64 |
/// | ingress | `to-client` | 10.231.1.2/24 | fd00:231:1::2/64 |
/// | ingress | `to-backend` | 10.231.2.1/24 | fd00:231:2::1/64 |
/// | backend | `to-ingress` | 10.231.2.2/24 | fd00:231:2::2/64 |
///
/// No routes or forwarding: the client only ever talks to the ingress, the ingress to the backend.
pub struct Topology {
    pub client: Netns,
    pub ingress: Netns,
    pub backend: Netns,
    id: String,
}

impl Topology {
    pub fn new() -> Topology {
        crate::require_root();
        sweep_stale();
        let id = crate::unique_suffix();
        let client = Netns::new(&format!("{PREFIX}{id}-c"));
        let ingress = Netns::new(&format!("{PREFIX}{id}-i"));
        let backend = Netns::new(&format!("{PREFIX}{id}-b"));
        let (c, i, b) = (client.name(), ingress.name(), backend.name());
        ip(&[
            "-n",
            c,
            "link",
            "add",
            "to-ingress",
            "type",
            "veth",
            "peer",
            "name",
            "to-client",
            "netns",
            i,
        ]);
        ip(&[
            "-n",
            i,
            "link",
            "add",
            "to-backend",
            "type",
            "veth",
            "peer",
            "name",
            "to-ingress",
            "netns",
            b,
        ]);
        let addrs: [(&str, &str, String, String); 4] = [
            (
                c,
                "to-ingress",
                format!("{CLIENT_V4}/24"),
                format!("{CLIENT_V6}/64"),
            ),
            (
                i,
                "to-client",
                format!("{INGRESS_V4}/24"),
                format!("{INGRESS_V6}/64"),
            ),
            (
                i,
                "to-backend",
                format!("{INGRESS_UPSTREAM_V4}/24"),
                format!("{INGRESS_UPSTREAM_V6}/64"),
            ),
            (
                b,
                "to-ingress",
                format!("{BACKEND_V4}/24"),
                format!("{BACKEND_V6}/64"),
            ),
        ];
        for (ns, dev, v4, v6) in &addrs {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
            ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        Topology {
            client,
            ingress,
            backend,
            id,
        }
    }

    /// The `<pid>-<n>` part of the namespace names; handy for other unique names (pin dirs).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The backend's address on the ingress <-> backend link.
    pub fn backend_addr(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(BACKEND_V4), port)
    }

    /// The ingress listener as the client dials it.
    pub fn ingress_addr(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(INGRESS_V4), port)
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}
