//! `guard-drop`: how fast the XDP guard drops a SYN flood, next to nftables drop rules on the same
//! veth.
//!
//! Every run builds fresh namespaces, floods the ingress's `to-client` veth from the client
//! namespace with hand-built SYNs from one source outside the allow-list (a packet socket with
//! sendmmsg, batches of 64, for a fixed time), and counts what the filter dropped:
//! - `xdp-native` / `xdp-generic`: the agent with its guard (`--guard --guard-allow
//!   10.231.1.1/32`, `--xdp-mode native|generic`), counted by the guard's allow-list counter;
//! - `nft-netdev-ingress`: `table netdev` chain on the `ingress` hook of the veth (the earliest
//!   nftables hook), counted by the rule's counter;
//! - `nft-inet-prerouting`: `table inet` chain on `prerouting` at raw priority (what most
//!   firewalls write), counted by the rule's counter;
//! - `none`: no filter, the agent listening; the stack answers each SYN (a reference).
//!
//! On a veth the receive work runs in softirq on the sending CPU, so the sender's rate is bounded
//! by the cost of dropping: a cheaper drop shows as more packets per second.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use zone_ingress_tests::agent::{ADMIN_PORT, INGRESS_PORT, http_get};
use zone_ingress_tests::flood::{self, FrameSender};
use zone_ingress_tests::netns::{CLIENT_V4, INGRESS_V4, Netns, Topology};

use crate::sys;

const FLOOD_SRC: [u8; 4] = [10, 231, 1, 50];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    XdpNative,
    XdpGeneric,
    NftNetdevIngress,
    NftInetPrerouting,
    None,
}

pub const ALL_VARIANTS: [Variant; 5] = [
    Variant::XdpNative,
    Variant::XdpGeneric,
    Variant::NftNetdevIngress,
    Variant::NftInetPrerouting,
    Variant::None,
];

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::XdpNative => "xdp-native",
            Self::XdpGeneric => "xdp-generic",
            Self::NftNetdevIngress => "nft-netdev-ingress",
            Self::NftInetPrerouting => "nft-inet-prerouting",
            Self::None => "none",
        }
    }
}

/// One run of one variant.
#[derive(Clone, Debug, Serialize)]
pub struct DropRun {
    pub variant: Variant,
    pub secs: f64,
    pub sent_pps: f64,
    /// Packets the filter counted as dropped, per second (0 for `none`).
    pub dropped_pps: f64,
    /// Busy CPU-seconds of the whole machine per million packets sent.
    pub machine_cpu_s_per_mpkt: f64,
}

/// The agent with its guard, killed on drop.
struct GuardAgent {
    child: Child,
    pin_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for GuardAgent {
    fn drop(&mut self) {
        sys::signal(self.child.id(), libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) && matches!(self.child.try_wait(), Ok(None))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

async fn start_agent(ns: &Netns, agent: &Path, guard_mode: Option<&str>) -> Result<GuardAgent> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}{}-guard-", sys::PREFIX, std::process::id()))
        .tempdir()?;
    let config = dir.path().join("zi.yaml");
    std::fs::write(
        &config,
        format!(
            "type: ZoneIngress\nname: zi-bench\nnetworking:\n  address: {INGRESS_V4}\n  port: {INGRESS_PORT}\n  \
             admin:\n    port: {ADMIN_PORT}\n"
        ),
    )?;
    let routes = dir.path().join("routes.yaml");
    std::fs::write(&routes, "routes: []\n")?;
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/{}{}-guard",
        sys::PREFIX,
        std::process::id()
    ));
    sys::ensure_bpffs()?;
    let _ = std::fs::remove_dir_all(&pin_dir);
    let log = std::fs::File::create(dir.path().join("agent.log"))?;
    let mut cmd = ns.command(agent);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--routes")
        .arg(&routes)
        .args(["--datapath", "userspace", "--pin-dir"])
        .arg(&pin_dir)
        .env("RUST_LOG", "warn");
    if let Some(mode) = guard_mode {
        cmd.args(["--guard", "--guard-allow", &format!("{CLIENT_V4}/32")])
            .args(["--xdp-mode", mode]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawn the agent")?;
    let mut a = GuardAgent {
        child,
        pin_dir,
        _dir: dir,
    };
    let admin = std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), ADMIN_PORT);
    let start = Instant::now();
    loop {
        if let Some(st) = a.child.try_wait()? {
            let log = std::fs::read_to_string(a._dir.path().join("agent.log")).unwrap_or_default();
            bail!("the agent exited ({st}) before it was ready: {log}");
        }
        if let Ok((200, body)) = http_get(ns, admin, "/ready").await
            && body.contains("READY")
        {
            return Ok(a);
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("the agent was not ready within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The guard's allow-list drop counter, from `maps dump guard --json`.
fn xdp_dropped(agent: &Path, pin_dir: &Path) -> Result<u64> {
    let out = Command::new(agent)
        .args(["maps", "dump", "guard", "--json", "--pin-dir"])
        .arg(pin_dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "maps dump guard: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["counters"]["dropped_allow_list"]
        .as_u64()
        .context("no counters.dropped_allow_list in the dump")
}

fn nft(ns: &Netns, script: &str) -> Result<String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run nft (apt-get install nftables)")?;
    use std::io::Write as _;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft -f - failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft_counter(ns: &Netns, family: &str) -> Result<u64> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "nft",
            "list",
            "table",
            family,
            "zi_bench",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no rule counter in `nft list table {family} zi_bench`: {text}"))
}

/// Floods for `secs` from the client namespace; returns frames sent.
async fn flood(topo: &Topology, secs: f64) -> Result<u64> {
    let src_mac = flood::mac_of(&topo.client, "to-ingress");
    let dst_mac = flood::mac_of(&topo.ingress, "to-client");
    let frames: Vec<Vec<u8>> = (0..256u16)
        .map(|i| {
            flood::syn_frame(
                src_mac,
                dst_mac,
                IpAddr::from(FLOOD_SRC),
                20000 + i,
                INGRESS_V4.into(),
                INGRESS_PORT,
            )
        })
        .collect();
    let sender = FrameSender::open(&topo.client, "to-ingress");
    tokio::task::spawn_blocking(move || {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut sent = 0u64;
        let mut i = 0;
        while Instant::now() < end {
            let batch = &frames[i..i + 64];
            i = (i + 64) % frames.len();
            match sender.send_batch(batch) {
                Ok(n) => sent += n as u64,
                // The device queue is full: the receiver is behind; try again.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => std::thread::yield_now(),
                Err(e) => return Err(anyhow::anyhow!("sendmmsg: {e}")),
            }
        }
        Ok(sent)
    })
    .await?
}

/// One run of `variant` for `secs`.
pub async fn run_one(agent: &Path, variant: Variant, secs: f64) -> Result<DropRun> {
    let topo = Topology::new();
    let ns = &topo.ingress;
    let (guard_agent, family) = match variant {
        Variant::XdpNative => (Some(start_agent(ns, agent, Some("native")).await?), None),
        Variant::XdpGeneric => (Some(start_agent(ns, agent, Some("generic")).await?), None),
        Variant::None => (Some(start_agent(ns, agent, None).await?), None),
        Variant::NftNetdevIngress => {
            nft(
                ns,
                "table netdev zi_bench {\n  chain ingress {\n    type filter hook ingress device \"to-client\" priority -500; policy accept;\n    ip saddr 10.231.1.50 tcp dport 10001 counter drop\n  }\n}\n",
            )?;
            (None, Some("netdev"))
        }
        Variant::NftInetPrerouting => {
            nft(
                ns,
                "table inet zi_bench {\n  chain pre {\n    type filter hook prerouting priority -300; policy accept;\n    ip saddr 10.231.1.50 tcp dport 10001 counter drop\n  }\n}\n",
            )?;
            (None, Some("inet"))
        }
    };
    let dropped = |a: &Option<GuardAgent>| -> Result<u64> {
        match (variant, a, family) {
            (Variant::None, _, _) => Ok(0),
            (_, Some(a), _) => xdp_dropped(agent, &a.pin_dir),
            (_, None, Some(f)) => nft_counter(ns, f),
            _ => Ok(0),
        }
    };
    let d0 = dropped(&guard_agent)?;
    let cpu0 = sys::machine_busy_ticks();
    let t0 = Instant::now();
    let sent = flood(&topo, secs).await?;
    let took = t0.elapsed().as_secs_f64();
    let cpu = (sys::machine_busy_ticks() - cpu0) as f64 / sys::clk_tck();
    // Let the last batch drain through softirq before reading the counter.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let d1 = dropped(&guard_agent)?;
    drop(guard_agent);
    Ok(DropRun {
        variant,
        secs: took,
        sent_pps: sent as f64 / took,
        dropped_pps: (d1 - d0) as f64 / took,
        machine_cpu_s_per_mpkt: cpu / (sent as f64 / 1e6),
    })
}

/// Every variant `reps` times, interleaved; the failures are notes.
pub async fn run_all(agent: &Path, secs: f64, reps: usize) -> (Vec<DropRun>, Vec<String>) {
    let mut runs = Vec::new();
    let mut notes = Vec::new();
    for rep in 0..reps {
        for v in ALL_VARIANTS {
            eprintln!("bench: guard-drop {} (rep {}/{reps})", v.as_str(), rep + 1);
            match tokio::time::timeout(
                Duration::from_secs_f64(secs + 60.0),
                run_one(agent, v, secs),
            )
            .await
            {
                Ok(Ok(r)) => runs.push(r),
                Ok(Err(e)) => notes.push(format!("guard-drop {} FAILED: {e:#}", v.as_str())),
                Err(_) => notes.push(format!("guard-drop {} timed out", v.as_str())),
            }
        }
    }
    (runs, notes)
}

fn median_range(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some((v[v.len() / 2], v[0], v[v.len() - 1]))
}

/// A Markdown table: variant, dropped Mpps, sent Mpps, machine CPU per Mpkt (median [min-max]).
pub fn render_markdown(runs: &[DropRun]) -> String {
    let mut s = String::from(
        "| filter | dropped (Mpps) | sent (Mpps) | machine CPU-s per Mpkt |\n|---|---|---|---|\n",
    );
    let cell = |v: Vec<f64>, scale: f64| match median_range(v) {
        Some((m, lo, hi)) => format!("{:.2} [{:.2}-{:.2}]", m / scale, lo / scale, hi / scale),
        None => "-".to_owned(),
    };
    for variant in ALL_VARIANTS {
        let of: Vec<&DropRun> = runs.iter().filter(|r| r.variant == variant).collect();
        if of.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            variant.as_str(),
            if variant == Variant::None {
                "- (the stack answers)".to_owned()
            } else {
                cell(of.iter().map(|r| r.dropped_pps).collect(), 1e6)
            },
            cell(of.iter().map(|r| r.sent_pps).collect(), 1e6),
            cell(of.iter().map(|r| r.machine_cpu_s_per_mpkt).collect(), 1.0),
        );
    }
    s
}
