//! Host facts and process plumbing: /proc/stat CPU counters, CPU affinity, process trees, and the sweep
//! of state left by a benchmark process that died before its Drop guards ran.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Prefix of every pin dir and temp dir the benchmark creates: `zi-bench-<pid>...`.
pub const PREFIX: &str = "zi-bench-";

/// Clock ticks per second of /proc/stat and /proc/<pid>/stat (USER_HZ).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Machine-wide busy ticks from the `cpu` line of /proc/stat: user + nice + system + irq + softirq
/// (kernel workers and softirq included; idle, iowait and steal excluded; guest is already inside user).
pub fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    get(0) + get(1) + get(2) + get(5) + get(6)
}

/// (ppid, utime + stime) of one process (all its threads), from /proc/<pid>/stat.
fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// The pids of `root`'s direct children (nginx workers, for example).
pub fn children(root: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(ppid, _)| ppid == root))
        .collect()
}

/// CPU ticks used so far by `root` and its direct children (a proxy and its workers).
pub fn tree_ticks(root: u32) -> u64 {
    let own = proc_stat(root).map_or(0, |(_, t)| t);
    own + children(root)
        .into_iter()
        .filter_map(proc_stat)
        .map(|(_, t)| t)
        .sum::<u64>()
}

/// Pins the calling thread (and every thread it creates later) to `cpu`. Returns false if that failed.
pub fn pin_current_thread(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it; sched_setaffinity(0) only
    // changes the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// CPUs online on the machine (not the affinity mask of this process, which is pinned).
pub fn nproc() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 { n as usize } else { 1 }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Sends `sig` to `pid` (errors ignored: the process may be gone already).
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid the caller owns.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a `zi-bench-<pid>[-...]` name.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes what a dead benchmark process left behind: its proxies (found by pid through their command line,
/// which names the dead process's `zi-bench-<pid>` temp or pin dir), then its temp dirs and BPF pin dirs.
/// Namespaces are named `zi-<pid>-<n>-<role>` by the test harness, whose `Topology::new` sweeps dead ones.
pub fn sweep_stale() {
    let mut dead: Vec<(u32, std::path::PathBuf)> = Vec::new();
    for base in [std::env::temp_dir(), "/sys/fs/bpf".into()] {
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = owner_pid(&name)
                    && !alive(pid)
                {
                    dead.push((pid, e.path()));
                }
            }
        }
    }
    if dead.is_empty() {
        return;
    }
    // Processes whose command line names a dead owner's dir (agent, haproxy, nginx and its workers).
    let mut victims = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if dead
                .iter()
                .any(|(_, p)| cmdline.contains(&*p.to_string_lossy()))
            {
                victims.push(pid);
                victims.extend(children(pid));
            }
        }
    }
    for &pid in &victims {
        eprintln!("bench: killing stale process {pid} left by a dead benchmark run");
        signal(pid, libc::SIGKILL);
    }
    let start = Instant::now();
    while victims.iter().any(|&p| alive(p)) && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (_, path) in dead {
        eprintln!("bench: removing stale {}", path.display());
        let _ = std::fs::remove_dir_all(&path);
    }
}

/// Makes sure bpffs is mounted at /sys/fs/bpf (where the agent pins its maps).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "bpffs is not mounted and `mount -t bpf bpf /sys/fs/bpf` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// First line of a command's stdout, or "?".
pub fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "?".to_string())
}

/// `MemTotal` in GiB, from /proc/meminfo.
pub fn mem_total_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0)
}

/// The CPU model name from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".to_string())
}

/// Raises RLIMIT_NOFILE (soft and hard) to `n` when allowed; children inherit it. Raising the hard limit
/// needs CAP_SYS_RESOURCE, which a container's root may lack: then the soft limit goes up to the hard one.
/// Returns the soft limit now in force.
pub fn raise_nofile(n: u64) -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit/setrlimit to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur >= n {
            return Ok(lim.rlim_cur);
        }
        let want = libc::rlimit {
            rlim_cur: n,
            rlim_max: lim.rlim_max.max(n),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return Ok(n);
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(lim.rlim_cur)
    }
}

/// Turns generic receive offload on or off for `dev` in the calling thread's network namespace
/// (`SIOCETHTOOL`, `ETHTOOL_SGRO`: what `ethtool -K DEV gro on` does, without the package). On a
/// veth, GRO on also switches its receive path to NAPI.
pub fn set_gro(dev: &str, on: bool) -> std::io::Result<()> {
    /// `struct ethtool_value` of `<linux/ethtool.h>`.
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_SGRO: u32 = 0x2c;
    let name = dev.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!(
            "interface name {dev} is too long"
        )));
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_SGRO,
        data: u32::from(on),
    };
    // SAFETY: a plain socket call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: `req` names the interface and points at `value`, which outlives the call.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: `fd` is ours and open.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
}
