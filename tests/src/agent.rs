//! The agent under test: config files, spawning it inside the ingress namespace, `/ready`, metrics, reloads,
//! and the `check` subcommand.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::{INGRESS_V4, Netns};

/// The ingress listener port (`networking.port`).
pub const INGRESS_PORT: u16 = 10001;
/// The admin API port (`networking.admin.port`), on 127.0.0.1 inside the ingress namespace.
pub const ADMIN_PORT: u16 = 9901;

/// `--datapath` of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datapath {
    Userspace,
    Auto,
    Sockmap,
}

impl Datapath {
    pub fn as_str(self) -> &'static str {
        match self {
            Datapath::Userspace => "userspace",
            Datapath::Auto => "auto",
            Datapath::Sockmap => "sockmap",
        }
    }
}

/// The agent binary: `$ZONE_INGRESS_BIN`, else `<workspace>/target/release/zone-ingress`.
pub fn binary() -> PathBuf {
    let path = match std::env::var_os("ZONE_INGRESS_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/zone-ingress"),
    };
    assert!(
        path.is_file(),
        "agent binary {} not found: run `cargo xtask test` (it builds the agent and the BPF programs first), \
         or point ZONE_INGRESS_BIN at a built zone-ingress",
        path.display()
    );
    path
}

/// One route: an SNI and its endpoints (`ip:port` strings, so tests can also write broken ones).
#[derive(Clone, Debug)]
pub struct Route {
    pub sni: String,
    pub endpoints: Vec<String>,
}

impl Route {
    pub fn new(sni: &str, endpoints: &[SocketAddr]) -> Route {
        Route {
            sni: sni.to_string(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        }
    }
}

fn yaml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The routes file: `routes: [{sni, endpoints}]`.
pub fn routes_yaml(routes: &[Route]) -> String {
    let mut y = String::from("routes:\n");
    if routes.is_empty() {
        return "routes: []\n".to_string();
    }
    for r in routes {
        y.push_str(&format!("  - sni: {}\n    endpoints:\n", yaml_str(&r.sni)));
        for e in &r.endpoints {
            y.push_str(&format!("      - {}\n", yaml_str(e)));
        }
    }
    y
}

/// A valid ZoneIngress resource listening on [`INGRESS_V4`]:[`INGRESS_PORT`], admin on [`ADMIN_PORT`].
pub fn zone_ingress_yaml() -> String {
    format!(
        "type: ZoneIngress\nname: zi-test\nnetworking:\n  address: {INGRESS_V4}\n  port: {INGRESS_PORT}\n  \
         admin:\n    port: {ADMIN_PORT}\n"
    )
}

/// Flags of `zone-ingress run`.
#[derive(Clone, Debug)]
pub struct Options {
    pub datapath: Datapath,
    pub client_hello_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub extra_args: Vec<String>,
    /// A program (and its arguments) the agent is started under, e.g. `setpriv --bounding-set ...`;
    /// empty: the agent binary itself.
    pub wrapper: Vec<String>,
    /// Extra environment variables of the agent process.
    pub env: Vec<(String, String)>,
}

impl Options {
    pub fn new(datapath: Datapath) -> Options {
        Options {
            datapath,
            client_hello_timeout: None,
            connect_timeout: None,
            extra_args: Vec::new(),
            wrapper: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Starts the agent under `setpriv --bounding-set <set> --` (util-linux): as uid 0 it then holds
    /// exactly the capabilities of `set` (e.g. `-all,+bpf,+net_admin` or `-net_admin`).
    pub fn bounding_set(mut self, set: &str) -> Options {
        self.wrapper = vec![
            "setpriv".into(),
            "--bounding-set".into(),
            set.into(),
            "--".into(),
        ];
        self
    }

    pub fn client_hello_timeout(mut self, t: &str) -> Options {
        self.client_hello_timeout = Some(t.to_string());
        self
    }

    pub fn connect_timeout(mut self, t: &str) -> Options {
        self.connect_timeout = Some(t.to_string());
        self
    }
}

/// Makes sure bpffs is mounted at /sys/fs/bpf (the default place for pins; fresh VMs may lack it).
fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return;
    }
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .output()
        .expect("run `mount -t bpf bpf /sys/fs/bpf`");
    assert!(
        out.status.success(),
        "bpffs is not mounted at /sys/fs/bpf and `mount -t bpf bpf /sys/fs/bpf` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes `/sys/fs/bpf/zi-test-<pid>-<n>` pin dirs of test processes that are gone (killed before their
/// Drop guards ran).
fn sweep_stale_pin_dirs() {
    let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("zi-test-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A running agent inside the ingress namespace. Drop sends SIGTERM (then SIGKILL), removes the pin dir,
/// and prints the agent's stderr when the test is failing.
pub struct Agent<'ns> {
    ns: &'ns Netns,
    child: Child,
    dir: tempfile::TempDir,
    pin_dir: PathBuf,
    routes_path: PathBuf,
    datapath: Datapath,
    args: Vec<std::ffi::OsString>,
    /// False once a newer agent (hot restart) uses the pin dir: then Drop leaves it.
    owns_pins: bool,
}

impl<'ns> Agent<'ns> {
    /// Writes the configs, starts `zone-ingress run` in `ns` and waits (at most 20 s) until `/ready` says READY.
    pub async fn start(ns: &'ns Netns, routes: &[Route], opts: Options) -> Agent<'ns> {
        let mut agent = Agent::start_no_wait(ns, routes, opts);
        agent.wait_ready(Duration::from_secs(20)).await;
        agent
    }

    /// Like [`Agent::start`] but returns at once (for an agent expected to refuse to start).
    pub fn start_no_wait(ns: &'ns Netns, routes: &[Route], opts: Options) -> Agent<'ns> {
        let dir = tempfile::Builder::new()
            .prefix("zi-agent-")
            .tempdir()
            .expect("create the agent's temp dir");
        let config_path = dir.path().join("zone-ingress.yaml");
        let routes_path = dir.path().join("routes.yaml");
        std::fs::write(&config_path, zone_ingress_yaml()).expect("write the ZoneIngress config");
        std::fs::write(&routes_path, routes_yaml(routes)).expect("write the routes file");
        let mut args: Vec<std::ffi::OsString> = vec![
            "--config".into(),
            config_path.into(),
            "--routes".into(),
            routes_path.clone().into(),
        ];
        if let Some(t) = &opts.client_hello_timeout {
            args.extend(["--client-hello-timeout".into(), t.into()]);
        }
        if let Some(t) = &opts.connect_timeout {
            args.extend(["--connect-timeout".into(), t.into()]);
        }
        args.extend(opts.extra_args.iter().map(Into::into));
        Agent::spawn(
            ns,
            dir,
            routes_path,
            opts.datapath,
            (&opts.wrapper, &opts.env),
            &args,
            None,
        )
    }

    /// Starts `zone-ingress run --upgrade` with this agent's flags, config files and pin dir (a
    /// hot restart) and returns it without waiting. From then on the new agent owns the pin dir.
    pub fn upgrade(&mut self) -> Agent<'ns> {
        let dir = tempfile::Builder::new()
            .prefix("zi-agent-")
            .tempdir()
            .expect("create the agent's temp dir");
        let mut args = self.args.clone();
        args.push("--upgrade".into());
        self.owns_pins = false;
        let mut agent = Agent::spawn(
            self.ns,
            dir,
            self.routes_path.clone(),
            self.datapath,
            (&[], &[]),
            &args,
            Some(self.pin_dir.clone()),
        );
        // The flags still name the first agent's config files: the oldest Agent keeps them.
        agent.args = self.args.clone();
        agent
    }

    /// Runs `zone-ingress run --upgrade --detach` with this agent's flags and pin dir (what
    /// systemd's `ExecReload=` runs) to its exit, at most `limit`, with `env` added. Returns its
    /// status and its log, which also holds the new agent's log (the new agent inherits the
    /// launcher's stderr). From then on the new agent owns the pin dir: wrap its pid in
    /// [`Detached`] so it is stopped and the pins removed.
    pub fn run_detached_upgrade(
        &mut self,
        env: &[(String, String)],
        limit: Duration,
    ) -> (ExitStatus, PathBuf) {
        let log = self.dir.path().join("detached-upgrade.log");
        let out = File::create(&log).expect("create the upgrade command's log");
        let err = out.try_clone().expect("dup the upgrade command's log");
        self.owns_pins = false;
        let mut child = self
            .ns
            .command(binary())
            .arg("run")
            .args(["--datapath", self.datapath.as_str()])
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(&self.args)
            .args(["--upgrade", "--detach"])
            .env(
                "RUST_LOG",
                std::env::var("ZI_AGENT_LOG").unwrap_or_else(|_| "info".to_string()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn zone-ingress run --upgrade --detach");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("poll the upgrade command") {
                return (status, log);
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`run --upgrade --detach` still ran after {limit:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `zone-ingress run --datapath D --pin-dir P <args>` in `ns` without writing any
    /// config file and without waiting (e.g. a control-plane session: `--cp-address ...`).
    pub fn start_with_args(
        ns: &'ns Netns,
        datapath: Datapath,
        args: &[std::ffi::OsString],
    ) -> Agent<'ns> {
        Agent::start_with_args_env(ns, datapath, args, &[])
    }

    /// [`Agent::start_with_args`] with extra environment variables.
    pub fn start_with_args_env(
        ns: &'ns Netns,
        datapath: Datapath,
        args: &[std::ffi::OsString],
        env: &[(String, String)],
    ) -> Agent<'ns> {
        let dir = tempfile::Builder::new()
            .prefix("zi-agent-")
            .tempdir()
            .expect("create the agent's temp dir");
        let routes_path = dir.path().join("routes.yaml");
        Agent::spawn(ns, dir, routes_path, datapath, (&[], env), args, None)
    }

    fn spawn(
        ns: &'ns Netns,
        dir: tempfile::TempDir,
        routes_path: PathBuf,
        datapath: Datapath,
        (wrapper, env): (&[String], &[(String, String)]),
        args: &[std::ffi::OsString],
        pin_dir: Option<PathBuf>,
    ) -> Agent<'ns> {
        let bin = binary();
        let pin_dir = pin_dir.unwrap_or_else(|| {
            PathBuf::from(format!("/sys/fs/bpf/zi-test-{}", crate::unique_suffix()))
        });
        if datapath != Datapath::Userspace {
            ensure_bpffs();
            sweep_stale_pin_dirs();
        }
        let stderr_path = dir.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("create the agent's stderr log");
        let stdout = stderr.try_clone().expect("dup the stderr log for stdout");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = ns.command(program);
                c.args(rest).arg(&bin);
                c
            }
            None => ns.command(&bin),
        };
        cmd.arg("run")
            .args(["--datapath", datapath.as_str()])
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("ZI_AGENT_LOG").unwrap_or_else(|_| "info".to_string()),
            )
            // The control-plane variables of the environment running the tests must not leak in.
            .env_remove("KUMA_CONTROL_PLANE_URL")
            .env_remove("KUMA_DATAPLANE_RUNTIME_TOKEN_PATH")
            .env_remove("KUMA_CONTROL_PLANE_CA_CERT_FILE")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} in namespace {}: {e}", bin.display(), ns.name()));
        Agent {
            ns,
            child,
            dir,
            pin_dir,
            routes_path,
            datapath,
            args: args.to_vec(),
            owns_pins: true,
        }
    }

    /// Waits (at most `limit`) for the agent to exit on its own; panics if it is still running.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the agent process") {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "the agent was expected to exit within {limit:?} but still runs; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The agent's temp dir (for extra files such as tokens).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Polls `/ready` until it says READY (at most `limit`); panics if the agent exits first.
    pub async fn wait_ready(&mut self, limit: Duration) {
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("poll the agent process") {
                panic!(
                    "the agent exited ({status}) before it was ready (its stderr is printed below)"
                );
            }
            match self.get("/ready").await {
                Ok((200, body)) if body.contains("READY") => return,
                Ok((code, body)) => last = format!("HTTP {code}: {body}"),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the agent was not ready within {limit:?} (last /ready: {last}; its stderr is printed below)"
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The address the client dials.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(INGRESS_V4.into(), INGRESS_PORT)
    }

    /// Everything the agent wrote to stderr/stdout so far (ANSI colour codes removed).
    pub fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.dir.path().join("stderr.log")) {
            let _ = f.read_to_string(&mut s);
        }
        strip_ansi(&s)
    }

    /// True while the agent process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// A plain HTTP/1.1 GET against the admin API; returns (status, body).
    pub async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(
            self.ns,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), ADMIN_PORT),
            path,
        )
        .await
    }

    /// Scrapes `/stats/prometheus`.
    pub async fn metrics(&self) -> Metrics {
        let (code, body) = self.get("/stats/prometheus").await.unwrap_or_else(|e| {
            panic!("GET /stats/prometheus failed: {e} (agent stderr printed below)")
        });
        assert_eq!(code, 200, "GET /stats/prometheus answered {code}: {body}");
        Metrics::parse(&body)
    }

    /// Polls the metrics until `pred` holds (at most `limit`); returns the last scrape. Counters may be
    /// updated a moment after the client saw the connection close.
    pub async fn metrics_until(&self, limit: Duration, pred: impl Fn(&Metrics) -> bool) -> Metrics {
        let start = Instant::now();
        loop {
            let m = self.metrics().await;
            if pred(&m) || start.elapsed() > limit {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Rewrites the routes file in place (no signal).
    pub fn write_routes_raw(&self, content: &str) {
        std::fs::write(&self.routes_path, content).expect("rewrite the routes file");
    }

    pub fn write_routes(&self, routes: &[Route]) {
        self.write_routes_raw(&routes_yaml(routes));
    }

    pub fn routes_path(&self) -> &Path {
        &self.routes_path
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}) failed: {}",
            self.child.id(),
            std::io::Error::last_os_error()
        );
    }

    pub fn sighup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// The agent's open file descriptor numbers, sorted (from `/proc/<pid>/fd`).
    pub fn open_fds(&self) -> Vec<u32> {
        let dir = format!("/proc/{}/fd", self.child.id());
        let mut fds: Vec<u32> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("list {dir}: {e}"))
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        fds.sort_unstable();
        fds
    }

    /// The descriptor number the agent's next `socket()`/`accept()` gets: the lowest one not open.
    pub fn lowest_free_fd(&self) -> u32 {
        let fds = self.open_fds();
        (0u32..)
            .find(|n| fds.binary_search(n).is_err())
            .expect("some descriptor number is free")
    }

    /// Sets the running agent's soft `RLIMIT_NOFILE` (prlimit(2), as `ulimit -n` would have at start);
    /// returns the previous soft limit. Descriptors already open stay open; a new one numbered at or above
    /// the limit fails with EMFILE.
    pub fn set_nofile_soft_limit(&self, soft: u64) -> u64 {
        let pid = self.child.id() as libc::pid_t;
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a null new limit only reads the current one into `old`, a valid rlimit.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
        assert_eq!(
            rc,
            0,
            "prlimit({pid}) read: {}",
            std::io::Error::last_os_error()
        );
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        // SAFETY: `new` is a valid rlimit; the old value is not requested.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
        assert_eq!(
            rc,
            0,
            "prlimit({pid}, RLIMIT_NOFILE, {soft}): {}",
            std::io::Error::last_os_error()
        );
        old.rlim_cur
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                eprintln!("agent {} ignored SIGTERM for 3 s: SIGKILL", self.child.id());
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if self.owns_pins && self.pin_dir.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
        if self.owns_pins
            && let Some(name) = self.pin_dir.file_name()
        {
            // The agent's default handoff socket; left behind when it was killed.
            let mut sock = name.to_os_string();
            sock.push(".sock");
            let _ = std::fs::remove_file(Path::new("/run/zone-ingress").join(sock));
        }
        if std::thread::panicking() {
            let log = self.stderr();
            let tail: String = if log.len() > 30_000 {
                format!("...{}", &log[log.len() - 30_000..])
            } else {
                log
            };
            eprintln!(
                "---- agent stderr (pid {}) ----\n{tail}\n---- end of agent stderr ----",
                self.child.id()
            );
        }
    }
}

/// Removes `ESC [ ... letter` sequences (colours) from a log.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for n in chars.by_ref() {
                if n.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Minimal HTTP/1.1 GET from inside `ns` (Connection: close, Content-Length or chunked bodies), 5 s bound.
pub async fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut s = ns.connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        parse_http(&raw)
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("GET {path}: no answer in 5 s"),
            )
        })?
}

fn parse_http(raw: &[u8]) -> std::io::Result<(u16, String)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of HTTP headers"))?;
    let status_line = head.lines().next().ok_or_else(|| bad("empty response"))?;
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((code, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size_line, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| bad("truncated chunk"))?;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            return Ok((code, out));
        }
        if after.len() < size {
            return Err(bad("truncated chunk body"));
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

/// A Prometheus text scrape: series (name plus sorted labels) to value.
#[derive(Clone, Debug, Default)]
pub struct Metrics(pub BTreeMap<String, f64>);

fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    l.sort();
    format!("{name}{{{}}}", l.join(","))
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(',') | Some(' ')) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        if chars.next() != Some('"') {
            return out;
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => break,
                c => val.push(c),
            }
        }
        out.push((key.trim().to_string(), val));
    }
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut m = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, rest) = match line.find('{') {
                Some(open) => {
                    let Some(close) = line.rfind('}') else {
                        continue;
                    };
                    let labels = parse_labels(&line[open + 1..close]);
                    let labels: Vec<(&str, &str)> = labels
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    (series_key(&line[..open], &labels), &line[close + 1..])
                }
                None => match line.split_once(' ') {
                    Some((n, r)) => (n.to_string(), r),
                    None => continue,
                },
            };
            let Some(value) = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            else {
                continue;
            };
            m.insert(series, value);
        }
        Metrics(m)
    }

    /// The value of one series (0 when absent: counters not yet incremented are often not exported).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .get(&series_key(name, labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// Sum over every label set of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| *v)
            .sum()
    }

    /// `zone_ingress_client_hello_rejected_total{reason=...}`.
    pub fn rejected(&self, reason: &str) -> f64 {
        self.get(
            "zone_ingress_client_hello_rejected_total",
            &[("reason", reason)],
        )
    }

    /// The lines of every series whose name starts with `prefix`, for failure messages.
    pub fn dump(&self, prefix: &str) -> String {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| format!("{k} {v}\n"))
            .collect()
    }
}

/// The result of running the agent once to completion (`check`, or a `run` expected to fail).
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    pub stderr: String,
    pub config_path: PathBuf,
    pub routes_path: Option<PathBuf>,
}

/// Writes `config` (and `routes`) to a temp dir and runs `zone-ingress check`. The temp dir lives as long as
/// the returned guard.
pub fn check(config: &str, routes: Option<&str>) -> (Exit, tempfile::TempDir) {
    let (dir, config_path, routes_path) = write_configs(config, routes);
    let mut cmd = Command::new(binary());
    cmd.arg("check").arg("--config").arg(&config_path);
    if let Some(r) = &routes_path {
        cmd.arg("--routes").arg(r);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run zone-ingress check");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (
        Exit {
            status: out.status,
            stderr,
            config_path,
            routes_path,
        },
        dir,
    )
}

/// Runs `zone-ingress run --datapath userspace` with the given configs inside `ns`, expecting it to exit on its
/// own within 5 s (a bad config). Panics if it is still running then.
pub fn run_to_exit(ns: &Netns, config: &str, routes: &str) -> (Exit, tempfile::TempDir) {
    let (dir, config_path, routes_path) = write_configs(config, Some(routes));
    let routes_path = routes_path.expect("routes path");
    let stderr_path = dir.path().join("stderr.log");
    let mut child = ns
        .command(binary())
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .arg("--routes")
        .arg(&routes_path)
        .args(["--datapath", "userspace"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr_path).expect("create stderr log"))
        .spawn()
        .expect("spawn zone-ingress run");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("poll zone-ingress run") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            panic!(
                "`zone-ingress run` with a bad config was still running after 5 s (it must exit non-zero); \
                 config:\n{config}\nroutes:\n{routes}\nstderr:\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    (
        Exit {
            status,
            stderr,
            config_path,
            routes_path: Some(routes_path),
        },
        dir,
    )
}

fn write_configs(
    config: &str,
    routes: Option<&str>,
) -> (tempfile::TempDir, PathBuf, Option<PathBuf>) {
    let dir = tempfile::Builder::new()
        .prefix("zi-check-")
        .tempdir()
        .expect("create a temp dir for configs");
    let config_path = dir.path().join("zone-ingress.yaml");
    std::fs::write(&config_path, config).expect("write the config");
    let routes_path = routes.map(|r| {
        let p = dir.path().join("routes.yaml");
        std::fs::write(&p, r).expect("write the routes");
        p
    });
    (dir, config_path, routes_path)
}

/// An agent that is not a child of the test (started detached by `run --upgrade --detach`):
/// Drop sends SIGTERM (SIGKILL after 5 s) and removes its pin dir and handoff socket.
pub struct Detached {
    pub pid: u32,
    pub pin_dir: PathBuf,
}

impl Detached {
    /// Whether the process still runs (a zombie left to an init that does not reap counts as gone).
    pub fn is_running(&self) -> bool {
        pid_running(self.pid)
    }
}

/// Whether `pid` is a live process (not a zombie).
pub fn pid_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        let pid = self.pid as libc::pid_t;
        if pid_running(self.pid) {
            // SAFETY: kill(2) with a pid this test started (through the upgrade command).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let start = Instant::now();
            while pid_running(self.pid) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if pid_running(self.pid) {
                eprintln!("detached agent {pid} ignored SIGTERM for 5 s: SIGKILL");
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Some(name) = self.pin_dir.file_name() {
            let mut sock = name.to_os_string();
            sock.push(".sock");
            let _ = std::fs::remove_file(Path::new("/run/zone-ingress").join(sock));
        }
    }
}
