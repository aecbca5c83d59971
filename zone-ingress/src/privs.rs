//! Linux capabilities: which ones loading the BPF data path needs, and dropping the ones the agent
//! no longer needs once its programs are loaded.
//!
//! The kernel checks (6.x): loading an `sk_skb` or XDP program needs `bpf_capable()` (CAP_BPF, or
//! CAP_SYS_ADMIN) and CAP_NET_ADMIN (or CAP_SYS_ADMIN); creating the SockHash needs the same;
//! mounting bpffs needs CAP_SYS_ADMIN. Map reads and updates on an fd the agent already holds,
//! inserting a socket into the SockHash included, are checked against the fd, not capabilities, on
//! kernels from 6.5; older kernels with `kernel.unprivileged_bpf_disabled` gate every bpf(2) call on
//! CAP_BPF, so the agent probes before it drops (see [`works_without`]).
//!
//! Capabilities belong to threads, not processes: [`drop_everywhere`] applies the new sets to every
//! thread of the agent (the async runtime's workers already run) through a signal each thread
//! handles itself, then checks every thread's `/proc` status until none holds a dropped capability.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_V3: u32 = 0x2008_0522;

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("reading the capability sets (capget): {0}")]
    Get(io::Error),
    #[error("changing the capability sets (capset): {0}")]
    Set(io::Error),
    #[error("installing the handler that drops capabilities in every thread: {0}")]
    Signal(io::Error),
    #[error(
        "thread {tid} still holds {caps} after {tries} attempts to drop it (the agent keeps running with it)"
    )]
    Straggler {
        tid: String,
        caps: String,
        tries: u32,
    },
}

/// The three capability sets of one thread, as bit masks (bit n = capability n).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

pub fn bit(cap: u32) -> u64 {
    1u64 << cap
}

/// The kernel's name of a capability this module deals with.
pub fn name(cap: u32) -> &'static str {
    match cap {
        CAP_NET_ADMIN => "CAP_NET_ADMIN",
        CAP_SYS_ADMIN => "CAP_SYS_ADMIN",
        CAP_PERFMON => "CAP_PERFMON",
        CAP_BPF => "CAP_BPF",
        _ => "another capability",
    }
}

/// Names of the capabilities of [`CAP_NET_ADMIN`], [`CAP_SYS_ADMIN`], [`CAP_PERFMON`], [`CAP_BPF`]
/// set in `mask`, comma-separated ("none" when empty).
pub fn names(mask: u64) -> String {
    let v: Vec<&str> = [CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON]
        .into_iter()
        .filter(|c| mask & bit(*c) != 0)
        .map(name)
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// The calling thread's capability sets.
pub fn current() -> Result<Caps, CapsError> {
    let mut hdr = Header {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two `Data` words for version 3 into the array we own.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(CapsError::Get(io::Error::last_os_error()));
    }
    let join = |f: fn(&Data) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok(Caps {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

fn to_data(c: Caps) -> [Data; 2] {
    let word = |m: u64, hi: bool| if hi { (m >> 32) as u32 } else { m as u32 };
    [false, true].map(|hi| Data {
        effective: word(c.effective, hi),
        permitted: word(c.permitted, hi),
        inheritable: word(c.inheritable, hi),
    })
}

/// Sets the calling thread's capability sets. Async-signal-safe (one syscall).
fn set_raw(data: &[Data; 2]) -> libc::c_long {
    let mut hdr = Header {
        version: CAP_V3,
        pid: 0,
    };
    // SAFETY: capset reads the header and two `Data` words, all valid for the call.
    unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) }
}

fn set(c: Caps) -> Result<(), CapsError> {
    if set_raw(&to_data(c)) != 0 {
        return Err(CapsError::Set(io::Error::last_os_error()));
    }
    Ok(())
}

/// True when the running kernel knows CAP_BPF (5.8+); before it, BPF needs CAP_SYS_ADMIN.
pub fn kernel_has_cap_bpf() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .is_some_and(|last| last >= CAP_BPF)
}

/// The kernel's `perfmon_capable()` for the effective set `eff` (CAP_PERFMON or CAP_SYS_ADMIN):
/// what a BPF program needs to read kernel memory (`bpf_probe_read_kernel`).
pub fn perfmon_capable(eff: u64) -> bool {
    eff & (bit(CAP_PERFMON) | bit(CAP_SYS_ADMIN)) != 0
}

/// What loading the sockmap data path needs and the effective set `eff` lacks, each with why, in
/// the words an operator greps for. Empty when nothing is missing.
pub fn missing_for_bpf(eff: u64, bpffs_mounted: bool) -> Vec<String> {
    let has = |c| eff & bit(c) != 0;
    let mut missing = Vec::new();
    // bpf_capable(): CAP_BPF or CAP_SYS_ADMIN.
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push(if kernel_has_cap_bpf() {
            "CAP_BPF (to load the programs and create their maps)".to_string()
        } else {
            "CAP_SYS_ADMIN (this kernel has no CAP_BPF: it is what loads BPF programs)".to_string()
        });
    }
    // sk_skb and XDP are "net admin" program types; the SockHash a "net" map.
    if !has(CAP_NET_ADMIN) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_NET_ADMIN (to load sk_skb programs and create the SockHash)".to_string());
    }
    if !bpffs_mounted && !has(CAP_SYS_ADMIN) {
        missing.push(
            "CAP_SYS_ADMIN (to mount bpffs at /sys/fs/bpf, which is not mounted; or mount it before \
             starting the agent)"
                .to_string(),
        );
    }
    missing
}

/// Runs `probe` on the calling thread with `mask` lowered from its effective set only (so it can
/// be raised again), and restores the effective set afterwards. Tells whether what `probe` does
/// still works without those capabilities. Must not be called across an `.await`.
pub fn works_without<T>(mask: u64, probe: impl FnOnce() -> T) -> Result<T, CapsError> {
    let before = current()?;
    set(Caps {
        effective: before.effective & !mask,
        ..before
    })?;
    let out = probe();
    set(before)?;
    Ok(out)
}

// The sets every thread switches to, for the signal handler (it cannot take arguments).
static TARGET: [AtomicU32; 6] = [const { AtomicU32::new(0) }; 6];
static HANDLER_FAILURES: AtomicU32 = AtomicU32::new(0);

extern "C" fn apply_target(_sig: libc::c_int) {
    let w = |i: usize| TARGET[i].load(Ordering::SeqCst);
    let data = [
        Data {
            effective: w(0),
            permitted: w(1),
            inheritable: w(2),
        },
        Data {
            effective: w(3),
            permitted: w(4),
            inheritable: w(5),
        },
    ];
    if set_raw(&data) != 0 {
        HANDLER_FAILURES.fetch_add(1, Ordering::SeqCst);
    }
}

fn drop_signal() -> libc::c_int {
    // Real-time signals are queued (not merged) and unused by the runtime and aya.
    libc::SIGRTMAX() - 2
}

/// Capability bits of one thread's effective and permitted sets, from `/proc/self/task/<tid>/status`;
/// `None` when the thread is gone.
fn thread_caps(tid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let hex = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    Some(hex("CapEff:") | hex("CapPrm:"))
}

/// Removes the capabilities in `mask` from the effective, permitted and inheritable sets of every
/// thread of the process (lowering the permitted set also clears them from the ambient set), for
/// good: they cannot be raised again. Returns the capabilities actually removed.
pub fn drop_everywhere(mask: u64) -> Result<u64, CapsError> {
    let cur = current()?;
    let removed = (cur.effective | cur.permitted | cur.inheritable) & mask;
    if removed == 0 {
        return Ok(0);
    }
    let target = Caps {
        effective: cur.effective & !mask,
        permitted: cur.permitted & !mask,
        inheritable: cur.inheritable & !mask,
    };
    let data = to_data(target);
    for (i, d) in data.iter().enumerate() {
        TARGET[i * 3].store(d.effective, Ordering::SeqCst);
        TARGET[i * 3 + 1].store(d.permitted, Ordering::SeqCst);
        TARGET[i * 3 + 2].store(d.inheritable, Ordering::SeqCst);
    }
    // SAFETY: the handler only loads atomics and makes one syscall (async-signal-safe); SA_RESTART
    // keeps interrupted syscalls of the other threads going.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = apply_target as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(drop_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(CapsError::Signal(io::Error::last_os_error()));
        }
    }
    set(target)?;
    // SAFETY: getpid and gettid have no preconditions.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    const TRIES: u32 = 100;
    let mut straggler = None;
    for _ in 0..TRIES {
        straggler = None;
        let tasks = std::fs::read_dir("/proc/self/task").map_err(CapsError::Get)?;
        for t in tasks.flatten() {
            let tid = t.file_name().to_string_lossy().into_owned();
            let Some(held) = thread_caps(&tid) else {
                continue;
            };
            if held & mask == 0 {
                continue;
            }
            straggler = Some((tid.clone(), held & mask));
            if let Ok(n) = tid.parse::<libc::pid_t>()
                && n != me
            {
                // SAFETY: tgkill to a thread of this very process; the handler is installed.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, n, drop_signal()) };
            }
        }
        if straggler.is_none() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if HANDLER_FAILURES.load(Ordering::SeqCst) > 0 {
        return Err(CapsError::Set(io::Error::other(
            "a thread's capset failed in the drop handler",
        )));
    }
    match straggler {
        None => Ok(removed),
        Some((tid, caps)) => Err(CapsError::Straggler {
            tid,
            caps: names(caps),
            tries: TRIES,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        let all = bit(CAP_BPF) | bit(CAP_NET_ADMIN) | bit(CAP_SYS_ADMIN);
        assert!(missing_for_bpf(all, false).is_empty());
        assert!(missing_for_bpf(bit(CAP_BPF) | bit(CAP_NET_ADMIN), true).is_empty());
        // CAP_SYS_ADMIN stands in for both, as in the kernel.
        assert!(missing_for_bpf(bit(CAP_SYS_ADMIN), true).is_empty());
        let m = missing_for_bpf(bit(CAP_BPF), true);
        assert_eq!(m.len(), 1);
        assert!(m[0].starts_with("CAP_NET_ADMIN"), "{m:?}");
        let m = missing_for_bpf(bit(CAP_BPF) | bit(CAP_NET_ADMIN), false);
        assert!(
            m[0].starts_with("CAP_SYS_ADMIN") && m[0].contains("bpffs"),
            "{m:?}"
        );
        assert_eq!(missing_for_bpf(0, true).len(), 2);
    }

    #[test]
    fn perfmon_capable_as_the_kernel_says() {
        assert!(perfmon_capable(bit(CAP_PERFMON)));
        assert!(perfmon_capable(bit(CAP_SYS_ADMIN)));
        assert!(!perfmon_capable(bit(CAP_BPF) | bit(CAP_NET_ADMIN)));
    }

    #[test]
    fn sets_round_trip_through_the_kernel_words() {
        let c = Caps {
            effective: bit(CAP_BPF) | bit(CAP_NET_ADMIN),
            permitted: u64::MAX >> 23,
            inheritable: bit(1),
        };
        let d = to_data(c);
        let join = |f: fn(&Data) -> u32| u64::from(f(&d[0])) | (u64::from(f(&d[1])) << 32);
        assert_eq!(join(|d| d.effective), c.effective);
        assert_eq!(join(|d| d.permitted), c.permitted);
        assert_eq!(join(|d| d.inheritable), c.inheritable);
        assert_eq!(names(c.effective), "CAP_BPF, CAP_NET_ADMIN");
        assert_eq!(names(0), "none");
    }
}
