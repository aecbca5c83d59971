//! Loading `zi_guard` from the embedded BPF object, attaching it, and writing its maps.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{Xdp, XdpMode as AyaXdpMode};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use zone_ingress_common::guard::{GUARD_COUNTERS, GuardConfig, GuardCounter, PROG_NAME, map_names};

use crate::bpf::{self, BpfError};
use crate::config::{GuardSection, XdpMode};

use super::settings::map_config;

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("XDP guard: {0}")]
    Bpf(#[from] BpfError),
    #[error(
        "XDP guard: the BPF object has no program {PROG_NAME}: build the agent with `cargo xtask build`"
    )]
    NoProgram,
    #[error("XDP guard: loading {PROG_NAME} into the kernel: {0} (needs Linux 5.18+ with XDP)")]
    Load(aya::programs::ProgramError),
    #[error(
        "XDP guard: attaching to {iface} in {mode} mode: {source} (does the interface exist in \
         this network namespace? is another XDP program attached to it? try --xdp-mode generic)"
    )]
    Attach {
        iface: String,
        mode: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("XDP guard: writing map {map}: {detail}")]
    Map { map: &'static str, detail: String },
    #[error(
        "XDP guard: handing the XDP attachment on {iface} to a new agent: {detail} (the running \
         agent keeps it)"
    )]
    Share { iface: String, detail: String },
    #[error(
        "XDP guard: taking over the running agent's XDP attachment on {iface} ({path}): {detail} \
         (the running agent keeps guarding; retry the upgrade, or restart without --upgrade)"
    )]
    TakeOver {
        iface: String,
        path: String,
        detail: String,
    },
}

/// A running agent's XDP attachment, pinned for the agent that replaces it (hot restart). The
/// new agent opens the pin, removes it and swaps its own program in on the same link
/// (`bpf_link_update`): the interface is never unguarded and never guarded twice.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedLink {
    pub interface: String,
    /// A link keeps the mode it was created with.
    pub mode: Attached,
    pub path: PathBuf,
}

/// How this agent holds its XDP link.
enum LinkHold {
    /// Owned by the loaded program (detached when the program is dropped).
    Program(XdpLinkId),
    /// Pinned for a new agent; our descriptor keeps it attached if the new agent fails.
    Pinned(PinnedLink),
    /// Taken back from a pin (a handoff that failed), or left after the new agent took the pin.
    Fd(FdLink),
    /// Moved between states.
    None,
}

/// The pin of a shared link, in the agent's pin dir.
pub fn shared_link_path(pin_dir: &Path) -> PathBuf {
    pin_dir.join("ZI_GUARD_LINK")
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> GuardError {
    move |e| GuardError::Map {
        map,
        detail: e.to_string(),
    }
}

/// The mode the program ended up attached in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attached {
    Native,
    Generic,
}

impl Attached {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
}

/// The guard program, attached. Dropping it detaches the program (its bpf_link closes); the
/// pinned maps stay readable for `zone-ingress maps dump guard`.
pub struct Guard {
    /// Owns the program (and, while `link` is `Program`, its link).
    ebpf: Ebpf,
    link: LinkHold,
    maps: GuardMaps,
    counters: PerCpuArray<MapData, u64>,
    pub interface: String,
    pub attached: Attached,
    pub pin_dir: PathBuf,
}

/// The maps the agent writes.
struct GuardMaps {
    config: Array<MapData, GuardConfig>,
    allow_v4: LpmTrie<MapData, [u8; 4], u8>,
    allow_v6: LpmTrie<MapData, [u8; 16], u8>,
    port: u16,
    /// The prefixes now in the tries.
    installed: BTreeSet<IpNet>,
    /// The settings last applied.
    applied: GuardSection,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("interface", &self.interface)
            .field("attached", &self.attached)
            .finish()
    }
}

impl Guard {
    /// Loads the program, pins its maps under `pin_dir`, writes `settings` and attaches to
    /// `iface`, or, with `inherited` on that interface (a hot restart), replaces the running
    /// agent's program on its link. The program guards TCP to `port`.
    pub fn load(
        settings: &GuardSection,
        port: u16,
        iface: &str,
        pin_dir: &Path,
        inherited: Option<&SharedLink>,
    ) -> Result<Self, GuardError> {
        let object = bpf::embedded_object(pin_dir)?;
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(map_names::SOURCES, settings.max_sources);
        // This instance only runs the guard: the splice maps it also declares are created at
        // their smallest instead of at the size the splice needs (megabytes, preallocated).
        for name in [
            zone_ingress_common::map_names::SOCKS,
            zone_ingress_common::map_names::FLOWS,
            zone_ingress_common::map_names::CTRL,
            zone_ingress_common::map_names::LOCAL_SOCKS,
            zone_ingress_common::map_names::LOCAL_FLOWS,
        ] {
            loader.map_max_entries(name, 1);
        }
        loader.map_max_entries(zone_ingress_common::map_names::EVENTS, page_size());
        let mut ebpf = loader.load(object).map_err(BpfError::from)?;
        for name in map_names::ALL {
            let map = ebpf.map(name).ok_or(BpfError::Map {
                name,
                detail: "not in the object".into(),
            })?;
            bpf::pin(pin_dir, name, |p| map.pin(p))?;
        }
        let mut maps = GuardMaps {
            config: bpf::take_map(&mut ebpf, map_names::CONFIG, Array::try_from)?,
            allow_v4: bpf::take_map(&mut ebpf, map_names::ALLOW_V4, LpmTrie::try_from)?,
            allow_v6: bpf::take_map(&mut ebpf, map_names::ALLOW_V6, LpmTrie::try_from)?,
            port,
            installed: BTreeSet::new(),
            applied: settings.clone(),
        };
        let counters = bpf::take_map(&mut ebpf, map_names::COUNTERS, PerCpuArray::try_from)?;
        // The maps hold the settings before the first packet meets the program.
        maps.apply(settings)?;

        let prog = xdp_program(&mut ebpf)?;
        prog.load().map_err(GuardError::Load)?;
        let inherited = inherited.filter(|l| {
            let same = l.interface == iface;
            if !same {
                tracing::warn!(
                    old = %l.interface,
                    new = iface,
                    "XDP guard: the running agent guards another interface; attaching anew (its \
                     attachment ends when it exits)"
                );
            }
            same
        });
        let (link, attached, how) = match inherited {
            Some(shared) => (
                take_over_link(prog, shared)?,
                shared.mode,
                "XDP guard: took over the running agent's XDP attachment (program replaced on its link)",
            ),
            None => {
                let (link, attached) = attach_fresh(prog, settings.mode, iface, pin_dir)?;
                (link, attached, "XDP guard attached")
            }
        };
        tracing::info!(
            interface = iface,
            mode = attached.as_str(),
            port,
            pin_dir = %pin_dir.display(),
            "{how}"
        );
        Ok(Self {
            ebpf,
            link: LinkHold::Program(link),
            maps,
            counters,
            interface: iface.to_owned(),
            attached,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// Pins this agent's XDP link for a new agent (hot restart). Our descriptor stays open, so
    /// the interface stays guarded whatever the new agent does; [`Guard::reclaim_link`] undoes
    /// the pin when the handoff fails.
    pub fn share_link(&mut self) -> Result<SharedLink, GuardError> {
        let path = shared_link_path(&self.pin_dir);
        let iface = self.interface.clone();
        let share_err = |detail: String| GuardError::Share {
            iface: iface.clone(),
            detail,
        };
        let fd_link = match std::mem::replace(&mut self.link, LinkHold::None) {
            LinkHold::Program(id) => {
                let prog = match xdp_program(&mut self.ebpf) {
                    Ok(p) => p,
                    Err(e) => {
                        self.link = LinkHold::Program(id);
                        return Err(e);
                    }
                };
                // On failure the program keeps the link (detached with it at exit).
                let xdp = prog
                    .take_link(id)
                    .map_err(|e| share_err(format!("taking the link from the program: {e}")))?;
                // A netlink attachment (kernels without XDP links) has no descriptor to hand.
                match FdLink::try_from(xdp) {
                    Ok(l) => l,
                    Err(e) => {
                        return Err(share_err(format!(
                            "the program is attached without a BPF link ({e}); this kernel \
                             needs a drain-based restart"
                        )));
                    }
                }
            }
            LinkHold::Fd(l) => l,
            LinkHold::Pinned(p) => {
                // Still pinned from an earlier attempt: share the same pin.
                self.link = LinkHold::Pinned(p);
                return Ok(self.shared(path));
            }
            LinkHold::None => {
                return Err(share_err("the link was lost in a failed handoff".into()));
            }
        };
        let _ = std::fs::remove_file(&path);
        match fd_link.pin(&path) {
            Ok(pinned) => {
                self.link = LinkHold::Pinned(pinned);
                Ok(self.shared(path))
            }
            Err(e) => Err(share_err(format!("pinning it at {}: {e}", path.display()))),
        }
    }

    fn shared(&self, path: PathBuf) -> SharedLink {
        SharedLink {
            interface: self.interface.clone(),
            mode: self.attached,
            path,
        }
    }

    /// After a failed handoff: removes the pin [`Guard::share_link`] made (if the new agent did
    /// not already) and keeps guarding through our own descriptor.
    pub fn reclaim_link(&mut self) {
        if let LinkHold::Pinned(p) = std::mem::replace(&mut self.link, LinkHold::None) {
            let path = shared_link_path(&self.pin_dir);
            if path.exists() {
                match p.unpin() {
                    Ok(fd) => self.link = LinkHold::Fd(fd),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "XDP guard: could not remove the link pin of a failed handoff; remove it by hand once this agent exits");
                    }
                }
            } else {
                // The new agent took the pin: the link runs its program now, or ours if it
                // failed before swapping. Either way our descriptor keeps it attached.
                self.link = LinkHold::Pinned(p);
            }
        }
    }

    /// Whether a new agent took this agent's link (then dropping this guard does not detach it).
    pub fn handed_over(&self) -> bool {
        matches!(self.link, LinkHold::Pinned(_)) && !shared_link_path(&self.pin_dir).exists()
    }

    /// Writes `settings` into the maps, live (the program stays attached).
    pub fn apply(&mut self, settings: &GuardSection) -> Result<(), GuardError> {
        self.maps.apply(settings)
    }

    /// The settings last applied.
    pub fn applied(&self) -> &GuardSection {
        &self.maps.applied
    }

    /// The counters, summed over CPUs, in [`GuardCounter::ALL`] order.
    pub fn counters(&self) -> Result<[u64; GUARD_COUNTERS as usize], GuardError> {
        read_counters(&self.counters)
    }
}

impl GuardMaps {
    /// Writes `settings`. The allow-list changes without a window where a
    /// source allowed before and after is dropped: new prefixes go in first, then the
    /// configuration, then stale prefixes go out.
    pub fn apply(&mut self, settings: &GuardSection) -> Result<(), GuardError> {
        let wanted: BTreeSet<IpNet> = settings.allow_cidrs.iter().copied().collect();
        for net in wanted.difference(&self.installed) {
            match net {
                IpNet::V4(n) => self
                    .allow_v4
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.network().octets()),
                        1,
                        0,
                    )
                    .map_err(map_err(map_names::ALLOW_V4))?,
                IpNet::V6(n) => self
                    .allow_v6
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.network().octets()),
                        1,
                        0,
                    )
                    .map_err(map_err(map_names::ALLOW_V6))?,
            }
        }
        self.config
            .set(0, map_config(settings, self.port), 0)
            .map_err(map_err(map_names::CONFIG))?;
        for net in self.installed.difference(&wanted) {
            let removed = match net {
                IpNet::V4(n) => self
                    .allow_v4
                    .remove(&Key::new(u32::from(n.prefix_len()), n.network().octets()))
                    .map_err(map_err(map_names::ALLOW_V4)),
                IpNet::V6(n) => self
                    .allow_v6
                    .remove(&Key::new(u32::from(n.prefix_len()), n.network().octets()))
                    .map_err(map_err(map_names::ALLOW_V6)),
            };
            // A prefix left behind is harmless while the list is off, and is retried next time.
            if let Err(e) = removed {
                tracing::warn!(prefix = %net, error = %e, "XDP guard: could not remove a stale allow-list prefix");
            }
        }
        self.installed = wanted;
        self.applied = settings.clone();
        Ok(())
    }
}

/// Sums the per-CPU guard counters.
pub fn read_counters(
    map: &PerCpuArray<MapData, u64>,
) -> Result<[u64; GUARD_COUNTERS as usize], GuardError> {
    let mut out = [0u64; GUARD_COUNTERS as usize];
    for c in GuardCounter::ALL {
        let values = map
            .get(&(c as u32), 0)
            .map_err(map_err(map_names::COUNTERS))?;
        out[c as usize] = values.iter().sum();
    }
    Ok(out)
}

fn page_size() -> u32 {
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(page).unwrap_or(4096)
}

/// Opens the running agent's pinned XDP link, removes the pin (the link lives on through the
/// descriptors) and swaps `prog` in on it.
fn take_over_link(prog: &mut Xdp, shared: &SharedLink) -> Result<XdpLinkId, GuardError> {
    let err = |detail: String| GuardError::TakeOver {
        iface: shared.interface.clone(),
        path: shared.path.display().to_string(),
        detail,
    };
    let pinned =
        PinnedLink::from_pin(&shared.path).map_err(|e| err(format!("opening the pin: {e}")))?;
    let fd_link = pinned
        .unpin()
        .map_err(|e| err(format!("removing the pin: {e}")))?;
    let link = XdpLink::try_from(fd_link).map_err(|e| err(format!("not an XDP link: {e}")))?;
    prog.attach_to_link(link)
        .map_err(|e| err(format!("replacing the program on the link: {e}")))
}

/// The guard's program in the loaded object.
fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, GuardError> {
    ebpf.program_mut(PROG_NAME)
        .ok_or(GuardError::NoProgram)?
        .try_into()
        .map_err(GuardError::Load)
}

/// Attaches `prog` to `iface` with a new XDP link in `mode` (auto: native, else generic), after
/// removing a link pin an interrupted hot restart may have left in `pin_dir`.
fn attach_fresh(
    prog: &mut Xdp,
    mode: XdpMode,
    iface: &str,
    pin_dir: &Path,
) -> Result<(XdpLinkId, Attached), GuardError> {
    // A pin left by an agent that died during a handoff would keep its program attached.
    let stale = shared_link_path(pin_dir);
    if stale.exists() {
        tracing::warn!(path = %stale.display(), "XDP guard: removing an XDP link pin left by an interrupted hot restart");
        let _ = std::fs::remove_file(&stale);
    }
    let attach = |prog: &mut Xdp, mode: AyaXdpMode, name: &'static str| {
        prog.attach(iface, mode)
            .map_err(|source| GuardError::Attach {
                iface: iface.to_owned(),
                mode: name,
                source,
            })
    };
    Ok(match mode {
        XdpMode::Native => (
            attach(prog, AyaXdpMode::Driver, "native")?,
            Attached::Native,
        ),
        XdpMode::Generic => (attach(prog, AyaXdpMode::Skb, "generic")?, Attached::Generic),
        XdpMode::Auto => match attach(prog, AyaXdpMode::Driver, "native") {
            Ok(link) => (link, Attached::Native),
            Err(e) => {
                tracing::warn!(interface = iface, error = %e,
                    "XDP guard: native mode unavailable, falling back to generic (SKB) mode: \
                     packets are inspected after the kernel built an skb, which costs more per packet");
                (attach(prog, AyaXdpMode::Skb, "generic")?, Attached::Generic)
            }
        },
    })
}
