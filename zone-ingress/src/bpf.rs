//! Loading the BPF programs, pinning their maps, and wiring aya-log to `tracing`.
//!
//! The object is built by `cargo xtask build` and embedded at compile time. Loading needs
//! CAP_BPF + CAP_NET_ADMIN (checked up front, see [`crate::privs`]) and a bpffs; the agent mounts
//! bpffs at `/sys/fs/bpf` when it is missing (that needs CAP_SYS_ADMIN). Any failure is returned as a [`BpfError`] that says what to check: the
//! caller decides whether that is fatal (`--datapath sockmap`) or a fallback (`auto`).

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use zone_ingress_common::{
    FlowCtrl, FlowInfo, FlowSide, RouteBytes, RouteInfo, map_names, prog_names,
};

/// The BPF object built by `cargo xtask build` (empty when built without it).
static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zone-ingress-ebpf.o"));

const BPFFS_MAGIC: i64 = 0xcafe_4a11;

/// A development knob: the number of sockets (two per spliced flow) the SockHash and the flow maps
/// hold, instead of [`zone_ingress_common::MAX_SOCKETS`]. Tests set it small to fill the maps.
pub const MAX_SOCKETS_ENV: &str = "ZONE_INGRESS_MAX_SOCKETS";

/// The size of the per-socket maps: [`MAX_SOCKETS_ENV`] when set, else the built-in one.
fn max_sockets() -> Result<Option<u32>, BpfError> {
    let Ok(value) = std::env::var(MAX_SOCKETS_ENV) else {
        return Ok(None);
    };
    match value.trim().parse::<u32>() {
        Ok(n) if (2..=zone_ingress_common::MAX_SOCKETS).contains(&n) => Ok(Some(n)),
        _ => Err(BpfError::MaxSockets { value }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "this binary was built without its BPF programs (plain `cargo build`); build it with \
         `cargo xtask build`"
    )]
    NotBuilt,
    #[error(
        "loading the BPF programs needs capabilities this process does not have: missing {missing}. \
         Grant them (Kubernetes: securityContext.capabilities.add [BPF, NET_ADMIN, PERFMON]; systemd: \
         AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON) or run with --datapath userspace"
    )]
    MissingCapabilities { missing: String },
    #[error("{0}")]
    Capabilities(#[from] crate::privs::CapsError),
    #[error(
        "bpffs is not mounted at {path} and mounting it failed: {source} (mount it with `mount -t bpf bpf {path}`)"
    )]
    Bpffs { path: String, source: io::Error },
    #[error(
        "the kernel refused the BPF object: {0} (needs Linux 5.10+ with BPF and sockmap support)"
    )]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("BPF map {name} missing or of the wrong type: {detail}")]
    Map { name: &'static str, detail: String },
    #[error("pinning {path}: {detail} (is {dir} on a bpffs, and writable?)", dir = .path.parent().map(|p| p.display().to_string()).unwrap_or_default())]
    Pin { path: PathBuf, detail: String },
    #[error(
        "{MAX_SOCKETS_ENV}={value:?} is not a number of sockets between 2 and {max} (it sizes the \
         splice's SockHash and flow maps; unset it for the default)",
        max = zone_ingress_common::MAX_SOCKETS
    )]
    MaxSockets { value: String },
    #[error("creating the pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
}

/// The loaded programs and their maps. Dropping it detaches nothing that is pinned: the maps stay
/// readable under the pin directory for the ops tooling.
pub struct BpfPrograms {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
    /// The SockHash the verdict program is attached to.
    pub socks: SockHash<MapData, u64>,
    /// Socket cookie -> flow side (verdict-written).
    pub flows: HashMap<MapData, u64, FlowSide>,
    /// Socket cookie -> flow control (agent-written).
    pub ctrl: HashMap<MapData, u64, FlowCtrl>,
    /// Limit events from the verdict program.
    pub events: RingBuf<MapData>,
    /// Route id -> names and agent-side counters (agent-written).
    pub routes: HashMap<MapData, u32, RouteInfo>,
    /// Route id -> bytes the verdict redirected, per CPU.
    pub route_bytes: PerCpuArray<MapData, RouteBytes>,
    /// Downstream cookie -> what the ops tooling shows about a flow (agent-written).
    pub flow_info: HashMap<MapData, u64, FlowInfo>,
    /// The maps were taken over from a running agent's pins (a hot restart), not created.
    pub reused: bool,
}

/// Whether [`BpfPrograms::load`] creates fresh maps or takes the pinned ones over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pins {
    /// Replace pins left by a previous run (a normal start).
    Replace,
    /// Reuse the pinned maps of the agent being upgraded (flows in them live on).
    Reuse,
}

/// Every map the splice pins, and so every map a hot restart takes over: the limit-event ring
/// too, which the verdict attached to already spliced sockets keeps writing to.
pub const PINNED_MAPS: [&str; 8] = [
    map_names::SOCKS,
    map_names::FLOWS,
    map_names::CTRL,
    map_names::COUNTERS,
    map_names::ROUTES,
    map_names::ROUTE_BYTES,
    map_names::FLOW_INFO,
    map_names::EVENTS,
];

/// Why the pinned maps cannot be reused by this binary.
#[derive(Debug, thiserror::Error)]
pub enum Incompatible {
    #[error("{name}: {detail}")]
    Map { name: &'static str, detail: String },
    #[error("the embedded BPF object: {0}")]
    Object(String),
}

/// Checks that every map a hot restart would reuse is pinned under `pin_dir` with the type, key
/// and value sizes, entry count and flags this binary's BPF object declares. A map whose layout
/// changed between versions fails here, before anything is loaded.
pub fn check_reusable(pin_dir: &Path) -> Result<(), Incompatible> {
    let object = embedded_object(pin_dir).map_err(|e| Incompatible::Object(e.to_string()))?;
    let parsed = aya_obj::Object::parse(object).map_err(|e| Incompatible::Object(e.to_string()))?;
    for name in PINNED_MAPS {
        let err = |detail: String| Incompatible::Map { name, detail };
        let declared = parsed
            .maps
            .get(name)
            .ok_or_else(|| err("not in this binary's BPF object".into()))?;
        let path = pin_dir.join(name);
        let pinned = aya::maps::MapData::from_pin(&path)
            .map_err(|e| err(format!("cannot open the pin {}: {e}", path.display())))?;
        let info = pinned
            .info()
            .map_err(|e| err(format!("cannot read the pinned map's info: {e}")))?;
        let pinned_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let have = (
            pinned_type,
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
        );
        let want = (
            declared.map_type(),
            declared.key_size(),
            declared.value_size(),
            declared.max_entries(),
            declared.map_flags(),
        );
        if have != want {
            return Err(err(format!(
                "pinned (type, key size, value size, max entries, flags) = {have:?}, this \
                 version declares {want:?}"
            )));
        }
    }
    Ok(())
}

impl std::fmt::Debug for BpfPrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfPrograms")
            .field("pin_dir", &self.pin_dir)
            .finish()
    }
}

impl BpfPrograms {
    /// Loads the programs, attaches the stream verdict to the SockHash and pins every map under
    /// `pin_dir` (replacing pins left by a previous run).
    ///
    /// With [`Pins::Reuse`] (a hot restart, after [`check_reusable`]) the loader opens the pinned
    /// maps instead of creating them: flows already spliced by the previous agent keep their
    /// entries, and this agent's programs replace the previous ones on the SockHash for new
    /// sockets (sockets already inserted keep the programs they were inserted with, which use the
    /// same maps).
    pub fn load(pin_dir: &Path, pins: Pins) -> Result<Self, BpfError> {
        let object = embedded_object(pin_dir)?;
        if pins == Pins::Replace {
            for name in PINNED_MAPS {
                let path = pin_dir.join(name);
                if path.exists() {
                    tracing::debug!(path = %path.display(), "replacing a pin left by a previous run");
                    std::fs::remove_file(&path).map_err(|e| BpfError::Pin {
                        path: path.clone(),
                        detail: format!("removing the old pin: {e}"),
                    })?;
                }
            }
        }
        let mut loader = EbpfLoader::new();
        if let Some(n) = max_sockets()? {
            tracing::warn!(
                sockets = n,
                "{MAX_SOCKETS_ENV} is set: the splice holds at most {} flows, later ones take the userspace copy",
                n / 2
            );
            for name in [map_names::SOCKS, map_names::FLOWS, map_names::CTRL] {
                loader.map_max_entries(name, n);
            }
            loader.map_max_entries(map_names::FLOW_INFO, (n / 2).max(1));
        }
        // The verdict trims bytes an overlapping retransmission repeats by reading the skb's TCP
        // sequence number from the kernel's sk_buff, which needs CAP_PERFMON (or CAP_SYS_ADMIN)
        // and the field's offset in this kernel (its BTF).
        let perfmon =
            crate::privs::current().is_ok_and(|c| crate::privs::perfmon_capable(c.effective));
        let seq_offset = crate::kernel_btf::tcp_skb_seq_offset();
        let trim = match (&seq_offset, perfmon) {
            (Ok(_), true) => true,
            (_, false) => {
                tracing::warn!(
                    "no CAP_PERFMON: the splice cannot read TCP sequence numbers, so bytes an \
                     overlapping retransmission repeats are not trimmed and the integrity checks \
                     reset such a flow instead; grant CAP_PERFMON (it is dropped after loading) \
                     to avoid it"
                );
                false
            }
            (Err(e), true) => {
                tracing::warn!(
                    "cannot find where this kernel keeps a TCP segment's sequence number ({e}), so \
                     bytes an overlapping retransmission repeats are not trimmed and the integrity \
                     checks reset such a flow instead; check that {} is readable",
                    crate::kernel_btf::VMLINUX_BTF
                );
                false
            }
        };
        let trim = u8::from(trim);
        loader.override_global("TRIM_REPEATS", &trim, true);
        let seq_offset = seq_offset.ok();
        if let Some(offset) = &seq_offset {
            tracing::debug!(
                offset,
                "sk_buff: TCP sequence number offset from the kernel's BTF"
            );
            loader.override_global("SKB_SEQ_OFFSET", offset, true);
        }
        // Before pausing a direction the verdict looks at its socket's redirect queue (passed
        // bytes must not wait behind it: ARCHITECTURE.md, Flow control), through the same
        // CAP_PERFMON reads and three more offsets from the BTF. Without them it pauses at the
        // limit as before, only more often behind a queue.
        let psock_offsets = crate::kernel_btf::psock_queue_offsets();
        match (&psock_offsets, perfmon) {
            (Ok(o), true) => {
                tracing::debug!(?o, "psock redirect queue offsets from the kernel's BTF");
                loader.override_global("PSOCK_READS", &1u8, true);
                loader.override_global("SKB_SK_OFFSET", &o.skb_sk, true);
                loader.override_global("SK_USER_DATA_OFFSET", &o.sk_user_data, true);
                loader.override_global("PSOCK_QUEUE_LEN_OFFSET", &o.psock_queue_len, true);
            }
            // The missing CAP_PERFMON was reported above.
            (Ok(_), false) => {}
            (Err(e), _) => tracing::warn!(
                "cannot find the kernel's psock queue in its BTF ({e}): spliced flows pause \
                 without checking it, which exposes them more often to a kernel race that leaks \
                 TCP memory; check that {} is readable",
                crate::kernel_btf::VMLINUX_BTF
            ),
        }
        // The loader opens a map pinned at its path, or creates and pins it there.
        for name in PINNED_MAPS {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let mut ebpf = loader.load(object)?;
        spawn_bpf_logger(&mut ebpf);

        let socks: SockHash<MapData, u64> =
            take_map(&mut ebpf, map_names::SOCKS, SockHash::try_from)?;
        let flows = take_map(&mut ebpf, map_names::FLOWS, HashMap::try_from)?;
        let ctrl = take_map(&mut ebpf, map_names::CTRL, HashMap::try_from)?;
        let events = take_map(&mut ebpf, map_names::EVENTS, RingBuf::try_from)?;
        let routes = take_map(&mut ebpf, map_names::ROUTES, HashMap::try_from)?;
        let route_bytes = take_map(&mut ebpf, map_names::ROUTE_BYTES, PerCpuArray::try_from)?;
        let flow_info = take_map(&mut ebpf, map_names::FLOW_INFO, HashMap::try_from)?;

        // Verdict only, no stream parser: with a parser, 6.18 loses track of bytes the verdict
        // passes to the socket (each strparser read sets copied_seq as if the previous read's
        // passed bytes had been consumed), copied_seq overtakes rcv_nxt, data-ready stops firing
        // and a paused flow stalls for good (seen in `slow_receiver_is_bounded`). See
        // ARCHITECTURE.md, "Reading path and integrity".
        let names = [prog_names::SK_SKB_VERDICT];
        for name in names {
            let program = |source| BpfError::Program { name, source };
            let prog: &mut SkSkb = ebpf
                .program_mut(name)
                .ok_or(BpfError::Map {
                    name,
                    detail: "program not in the object".into(),
                })?
                .try_into()
                .map_err(program)?;
            prog.load().map_err(program)?;
            prog.attach(socks.fd()).map_err(program)?;
        }
        tracing::info!(pin_dir = %pin_dir.display(), reused = pins == Pins::Reuse, "BPF programs loaded, maps pinned");
        Ok(Self {
            reused: pins == Pins::Reuse,
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            socks,
            flows,
            ctrl,
            events,
            routes,
            route_bytes,
            flow_info,
        })
    }
}

/// The embedded BPF object, once loading it can work: it was built in, we are root, bpffs is
/// mounted and `pin_dir` exists. Other program sets of the object (the XDP guard) load their
/// own instance from it.
pub(crate) fn embedded_object(pin_dir: &Path) -> Result<&'static [u8], BpfError> {
    if BPF_OBJECT.is_empty() {
        return Err(BpfError::NotBuilt);
    }
    // Capabilities, not the uid: a non-root agent with CAP_BPF + CAP_NET_ADMIN loads fine, and a
    // root one in a container without them does not.
    let caps = crate::privs::current()?;
    let missing = crate::privs::missing_for_bpf(caps.effective, is_bpffs(Path::new("/sys/fs/bpf")));
    if !missing.is_empty() {
        return Err(BpfError::MissingCapabilities {
            missing: missing.join("; "),
        });
    }
    ensure_bpffs(Path::new("/sys/fs/bpf"))?;
    std::fs::create_dir_all(pin_dir).map_err(|source| BpfError::PinDir {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    Ok(BPF_OBJECT)
}

pub(crate) fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, BpfError> {
    let map = ebpf.take_map(name).ok_or(BpfError::Map {
        name,
        detail: "not in the object".into(),
    })?;
    convert(map).map_err(|e| BpfError::Map {
        name,
        detail: e.to_string(),
    })
}

pub(crate) fn pin(
    dir: &Path,
    name: &'static str,
    do_pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), BpfError> {
    let path = dir.join(name);
    if path.exists() {
        tracing::debug!(path = %path.display(), "replacing a pin left by a previous run");
        std::fs::remove_file(&path).map_err(|e| BpfError::Pin {
            path: path.clone(),
            detail: format!("removing the old pin: {e}"),
        })?;
    }
    do_pin(&path).map_err(|e| BpfError::Pin {
        path: path.clone(),
        detail: e.to_string(),
    })
}

/// True when `path` is a mounted bpffs.
fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c_path.as_ptr(), &mut st) }) == 0 && st.f_type as i64 == BPFFS_MAGIC
}

/// Mounts bpffs at `path` unless it is already one.
fn ensure_bpffs(path: &Path) -> Result<(), BpfError> {
    let err = |source| BpfError::Bpffs {
        path: path.display().to_string(),
        source,
    };
    if is_bpffs(path) {
        return Ok(());
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    std::fs::create_dir_all(path).map_err(err)?;
    tracing::info!(path = %path.display(), "mounting bpffs");
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            c_path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Forwards aya-log records from the BPF programs to `tracing` (through the `log` bridge). The
/// programs only log on cold paths; an object without the log map simply has nothing to forward.
fn spawn_bpf_logger(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "no BPF log map; BPF programs do not log");
            return;
        }
    };
    spawn_ring_reader(
        logger,
        |logger| logger.flush(),
        |e| tracing::warn!(error = %e, "cannot poll the BPF log ring buffer"),
    );
}

/// Spawns a task that calls `on_ready` each time the BPF ring buffer owned by `source` has
/// records. `on_error` reports why it could not be polled (no runtime, registration failed).
pub(crate) fn spawn_ring_reader<T>(
    source: T,
    mut on_ready: impl FnMut(&mut T) + Send + 'static,
    on_error: impl FnOnce(io::Error) + Send + 'static,
) where
    T: std::os::fd::AsRawFd + Send + 'static,
{
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        on_error(io::Error::other("no async runtime"));
        return;
    };
    handle.spawn(async move {
        // SAFETY: `source` owns its ring buffer fd, which stays open and unchanged for as long as
        // the AsyncFd owns `source`.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(source, tokio::io::Interest::READABLE)
        };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => return on_error(e.into()),
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            on_ready(guard.get_inner_mut());
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads the real programs into this kernel. Needs root and an agent built with its BPF object
    /// (`cargo xtask test` does both); it fails, never skips, without them.
    #[tokio::test]
    async fn loads_programs_attaches_verdict_and_pins_maps() {
        let dir = PathBuf::from(format!("/sys/fs/bpf/zi-test-{}-unit", std::process::id()));
        struct Cleanup(PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = Cleanup(dir.clone());
        let programs = BpfPrograms::load(&dir, Pins::Replace).unwrap_or_else(|e| {
            panic!("BPF programs must load in the test environment (run `cargo xtask test` as root): {e}")
        });
        for name in PINNED_MAPS {
            assert!(
                dir.join(name).exists(),
                "{name} is not pinned under {}",
                dir.display()
            );
        }
        // A pinned map can be opened again from its pin, as the ops tooling will.
        aya::maps::MapData::from_pin(dir.join(map_names::FLOWS)).expect("reopen pinned flow map");
        // Loading twice over the same pins replaces them (a restart after a crash).
        drop(programs);
        let programs = BpfPrograms::load(&dir, Pins::Replace).expect("reload over existing pins");
        // The pins just made are what this binary declares, so a hot restart may reuse them.
        check_reusable(&dir).expect("own pins are reusable");
        drop(programs);
        BpfPrograms::load(&dir, Pins::Reuse).expect("load reusing the pins");
    }
}
