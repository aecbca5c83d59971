//! The proxies under test, each started inside the ingress namespace with a generated config and stopped
//! (SIGTERM, then SIGKILL for it and its workers) by a Drop guard that also removes the agent's pin dir.

use std::fmt;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use zone_ingress_tests::agent::{ADMIN_PORT, INGRESS_PORT, Metrics, http_get};
use zone_ingress_tests::netns::{BACKEND_V4, INGRESS_V4, Netns};
use zone_ingress_tests::pki::SNI_BACKEND;

use crate::sys;

/// The port the backend listens on (every interface of the backend namespace).
pub const BACKEND_PORT: u16 = 8443;
/// Client connections each peer proxy accepts at most (the idle workload holds 10 000 flows); lower when
/// the open-file limit would not hold twice as many sockets. The agent has no such setting: it is bound
/// only by the RLIMIT_NOFILE it inherits.
pub const MAX_CONN: u64 = 30_000;
/// Descriptors a peer proxy keeps beyond two per flow (listeners, logs, pollers).
const FD_RESERVE: u64 = 256;
/// HAProxy's splice pipes (two descriptors each). Its default, maxconn/4, would count a quarter of the
/// idle flows' sockets again against the open-file limit, and HAProxy refuses to start when its total
/// exceeds the limit; only flows moving data hold a pipe, and the busiest workload moves 64 at a time.
const HAPROXY_MAXPIPES: u64 = 128;

/// (client connections, descriptors) for HAProxy's `maxconn` and nginx's limits under `nofile`.
fn peer_limits(nofile: u64) -> (u64, u64) {
    let conns = MAX_CONN
        .min(nofile.saturating_sub(FD_RESERVE + 2 * HAPROXY_MAXPIPES) / 2)
        .max(64);
    (conns, nofile.min(2 * MAX_CONN + FD_RESERVE))
}
/// The nginx stream module, from Debian's `libnginx-mod-stream`.
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// One way from the client to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathKind {
    /// Client straight to the backend over its own veth pair: no proxy, the limit.
    Direct,
    /// The agent, `--datapath sockmap` (kernel splice).
    Sockmap,
    /// The agent, `--datapath userspace` (tokio copy).
    Userspace,
    /// HAProxy 2.6, `mode tcp`, SNI routing, forced splice.
    Haproxy,
    /// nginx 1.22 `stream` with `ssl_preread`, 64 KiB buffers.
    Nginx,
}

pub const ALL_PATHS: [PathKind; 5] = [
    PathKind::Direct,
    PathKind::Sockmap,
    PathKind::Userspace,
    PathKind::Haproxy,
    PathKind::Nginx,
];

impl PathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Sockmap => "sockmap",
            PathKind::Userspace => "userspace",
            PathKind::Haproxy => "haproxy",
            PathKind::Nginx => "nginx",
        }
    }

    pub fn parse(s: &str) -> Option<PathKind> {
        ALL_PATHS.into_iter().find(|p| p.as_str() == s)
    }

    pub fn is_agent(self) -> bool {
        matches!(self, PathKind::Sockmap | PathKind::Userspace)
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to start the proxies.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub agent_bin: PathBuf,
    /// The CPU the proxy is pinned to (`taskset -c`), if any.
    pub cpu: Option<usize>,
    /// HAProxy with `option splice-request` + `splice-response` (the best-tuned setting of DESIGN.md).
    pub haproxy_splice: bool,
    /// RLIMIT_NOFILE the proxies inherit; sizes HAProxy's `maxconn` and nginx's connection limits.
    pub nofile: u64,
}

/// A running proxy. Dropping it stops it and cleans up after it.
pub struct Proxy {
    kind: PathKind,
    child: Child,
    dir: tempfile::TempDir,
    pin_dir: Option<PathBuf>,
}

fn ingress_listen() -> SocketAddr {
    SocketAddr::new(INGRESS_V4.into(), INGRESS_PORT)
}

fn backend_target() -> SocketAddr {
    SocketAddr::new(BACKEND_V4.into(), BACKEND_PORT)
}

fn haproxy_config(threads: usize, splice: bool, nofile: u64) -> String {
    let (maxconn, _) = peer_limits(nofile);
    let splice = if splice {
        "option splice-request\n    option splice-response"
    } else {
        "# splice off (--haproxy-no-splice)"
    };
    format!(
        "global\n    nbthread {threads}\n    maxconn {maxconn}\n    maxpipes {HAPROXY_MAXPIPES}\n\n\
         defaults\n    mode tcp\n    maxconn {maxconn}\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n    \
         {splice}\n\n\
         frontend zi_bench\n    bind {listen}\n    tcp-request inspect-delay 5s\n    \
         tcp-request content accept if {{ req.ssl_hello_type 1 }}\n    \
         use_backend mesh_backend if {{ req.ssl_sni -i {SNI_BACKEND} }}\n\n\
         backend mesh_backend\n    server backend1 {target}\n",
        listen = ingress_listen(),
        target = backend_target(),
    )
}

fn nginx_config(dir: &Path, nofile: u64) -> String {
    let d = dir.display();
    // worker_connections counts both sockets of a flow.
    let (conns, fds) = peer_limits(nofile);
    format!(
        "load_module {NGINX_STREAM_MODULE};\n\
         daemon off;\nmaster_process on;\nworker_processes 1;\nworker_rlimit_nofile {nofile};\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\n\
         events {{\n    worker_connections {worker_connections};\n}}\n\n\
         stream {{\n    map $ssl_preread_server_name $zi_upstream {{\n        {SNI_BACKEND} {target};\n        \
         default 127.0.0.1:9;\n    }}\n    server {{\n        listen {listen} backlog=4096;\n        \
         ssl_preread on;\n        preread_timeout 5s;\n        proxy_pass $zi_upstream;\n        \
         proxy_half_close on;\n        proxy_buffer_size 64k;\n        proxy_connect_timeout 5s;\n        \
         proxy_timeout 60s;\n    }}\n}}\n",
        listen = ingress_listen(),
        target = backend_target(),
        nofile = fds,
        worker_connections = 2 * conns,
    )
}

fn agent_configs(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let config = dir.join("zone-ingress.yaml");
    let routes = dir.join("routes.yaml");
    std::fs::write(
        &config,
        format!(
            "type: ZoneIngress\nname: zi-bench\nnetworking:\n  address: {INGRESS_V4}\n  port: {INGRESS_PORT}\n  \
             admin:\n    port: {ADMIN_PORT}\n"
        ),
    )?;
    std::fs::write(
        &routes,
        format!(
            "routes:\n  - sni: \"{SNI_BACKEND}\"\n    endpoints:\n      - \"{}\"\n",
            backend_target()
        ),
    )?;
    Ok((config, routes))
}

/// A command that runs `program` inside `ns`, pinned to `cpu` when one is given.
fn pinned(ns: &Netns, cpu: Option<usize>, program: &Path) -> Command {
    match cpu {
        Some(cpu) => {
            let mut c = ns.command("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        }
        None => ns.command(program),
    }
}

fn find_program(name: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} is not installed (apt-get install -y haproxy nginx libnginx-mod-stream)")
}

impl Proxy {
    /// Starts the proxy for `kind` (not `Direct`) in `ns` and waits until it accepts connections.
    pub async fn start(ns: &Netns, kind: PathKind, settings: &ProxySettings) -> Result<Proxy> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}{}-{}-", sys::PREFIX, std::process::id(), kind))
            .tempdir()
            .context("create the proxy's temp dir")?;
        let log = dir.path().join("proxy.log");
        let log_file = File::create(&log)?;
        let mut pin_dir = None;
        let mut cmd = match kind {
            PathKind::Direct => bail!("the direct path has no proxy"),
            PathKind::Sockmap | PathKind::Userspace => {
                let (config, routes) = agent_configs(dir.path())?;
                let pins =
                    PathBuf::from(format!("/sys/fs/bpf/{}{}", sys::PREFIX, std::process::id()));
                if kind == PathKind::Sockmap {
                    sys::ensure_bpffs()?;
                }
                let _ = std::fs::remove_dir_all(&pins);
                let mut c = pinned(ns, settings.cpu, &settings.agent_bin);
                c.arg("run")
                    .arg("--config")
                    .arg(&config)
                    .arg("--routes")
                    .arg(&routes)
                    .args(["--datapath", kind.as_str()])
                    .arg("--pin-dir")
                    .arg(&pins)
                    .env("RUST_LOG", "warn");
                pin_dir = Some(pins);
                c
            }
            PathKind::Haproxy => {
                let cfg = dir.path().join("haproxy.cfg");
                let threads = if settings.cpu.is_some() {
                    1
                } else {
                    sys::nproc()
                };
                std::fs::write(
                    &cfg,
                    haproxy_config(threads, settings.haproxy_splice, settings.nofile),
                )?;
                let mut c = pinned(ns, settings.cpu, &find_program("haproxy")?);
                c.arg("-f").arg(&cfg).arg("-db");
                c
            }
            PathKind::Nginx => {
                anyhow::ensure!(
                    Path::new(NGINX_STREAM_MODULE).is_file(),
                    "{NGINX_STREAM_MODULE} is missing (apt-get install -y libnginx-mod-stream)"
                );
                let cfg = dir.path().join("nginx.conf");
                std::fs::write(&cfg, nginx_config(dir.path(), settings.nofile))?;
                let mut c = pinned(ns, settings.cpu, &find_program("nginx")?);
                c.arg("-p")
                    .arg(dir.path())
                    .arg("-c")
                    .arg(&cfg)
                    .arg("-e")
                    .arg(dir.path().join("error.log"));
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("spawn {kind} in namespace {}", ns.name()))?;
        let mut proxy = Proxy {
            kind,
            child,
            dir,
            pin_dir,
        };
        proxy.wait_ready(ns).await?;
        Ok(proxy)
    }

    async fn wait_ready(&mut self, ns: &Netns) -> Result<()> {
        let start = Instant::now();
        let limit = Duration::from_secs(20);
        let mut last = String::from("no answer yet");
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before it was ready; its log:\n{}",
                    self.kind,
                    self.log_tail()
                );
            }
            if self.kind.is_agent() {
                match self.admin_get(ns, "/ready").await {
                    Ok((200, body)) if body.contains("READY") => return Ok(()),
                    Ok((code, body)) => last = format!("HTTP {code}: {}", body.trim()),
                    Err(e) => last = e.to_string(),
                }
            } else if listening(ns, INGRESS_PORT) {
                // The listener exists; give the worker (nginx) a moment to start accepting.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "{} was not ready within {limit:?} (last: {last}); its log:\n{}",
            self.kind,
            self.log_tail()
        )
    }

    async fn admin_get(&self, ns: &Netns, path: &str) -> std::io::Result<(u16, String)> {
        http_get(
            ns,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), ADMIN_PORT),
            path,
        )
        .await
    }

    /// The agent's metrics (None for other proxies or when the scrape failed).
    pub async fn agent_metrics(&self, ns: &Netns) -> Option<Metrics> {
        if !self.kind.is_agent() {
            return None;
        }
        match self.admin_get(ns, "/stats/prometheus").await {
            Ok((200, body)) => Some(Metrics::parse(&body)),
            _ => None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the proxy process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the proxy ended ("running" while it runs), e.g. "exit status: 1" or "signal: 11 (SIGSEGV)".
    pub fn status(&mut self) -> String {
        match self.child.try_wait() {
            Ok(None) => "running".to_string(),
            Ok(Some(st)) => st.to_string(),
            Err(e) => format!("unknown ({e})"),
        }
    }

    /// The last 4 KiB of the proxy's stdout/stderr (and nginx's error log).
    pub fn log_tail(&self) -> String {
        let mut s = std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default();
        if let Ok(e) = std::fs::read_to_string(self.dir.path().join("error.log")) {
            s.push_str(&e);
        }
        let s = zone_ingress_tests::agent::strip_ansi(&s);
        match s.char_indices().rev().nth(4096) {
            Some((i, _)) => format!("...{}", &s[i..]),
            None => s,
        }
    }
}

/// True when something listens on `port` in `ns` (from /proc/thread-self/net/tcp inside the namespace).
fn listening(ns: &Netns, port: u16) -> bool {
    ns.exec(move || {
        std::fs::read_to_string("/proc/thread-self/net/tcp")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3
                    && f[3] == "0A"
                    && f[1]
                        .rsplit(':')
                        .next()
                        .and_then(|h| u16::from_str_radix(h, 16).ok())
                        == Some(port)
            })
    })
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let pid = self.child.id();
        // Workers (nginx) are collected before the master goes, so none is left orphaned.
        let comm = |p: u32| std::fs::read_to_string(format!("/proc/{p}/comm")).ok();
        let workers: Vec<(u32, Option<String>)> = sys::children(pid)
            .into_iter()
            .map(|w| (w, comm(w)))
            .collect();
        if matches!(self.child.try_wait(), Ok(None)) {
            sys::signal(pid, libc::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3)
                && matches!(self.child.try_wait(), Ok(None))
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                eprintln!(
                    "bench: {} (pid {pid}) ignored SIGTERM for 3 s: SIGKILL",
                    self.kind
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for (w, name) in workers {
            // Only the same process (same name), not a pid reused since.
            if name.is_some() && comm(w) == name {
                sys::signal(w, libc::SIGKILL);
            }
        }
        if let Some(p) = &self.pin_dir {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_limits_fit_the_open_file_limit() {
        assert_eq!(peer_limits(1 << 17), (30_000, 60_256));
        // A container without CAP_SYS_RESOURCE: hard limit 20 000. HAProxy needs 2 x maxconn + 2 x maxpipes
        // and a few more; the idle workload's flows (main.rs: idle_flows) must fit maxconn.
        let (conns, fds) = peer_limits(20_000);
        assert_eq!((conns, fds), (9_744, 20_000));
        assert!(2 * conns + 2 * HAPROXY_MAXPIPES + FD_RESERVE / 2 <= 20_000);
        let cfg = haproxy_config(1, true, 20_000);
        assert!(cfg.contains("maxconn 9744\n    maxpipes 128\n"), "{cfg}");
        let cfg = nginx_config(Path::new("/tmp/x"), 20_000);
        assert!(cfg.contains("worker_connections 19488;"), "{cfg}");
        assert!(cfg.contains("worker_rlimit_nofile 20000;"), "{cfg}");
    }
}
