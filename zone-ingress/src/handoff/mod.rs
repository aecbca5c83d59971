//! Hot restart: a new agent (`zone-ingress run --upgrade`) takes the listening sockets and every
//! spliced flow from the running one over a Unix socket, then tells it to exit.
//!
//! 1. The running agent listens on the handoff socket ([`socket_path`]).
//! 2. The new agent connects, checks the pinned BPF maps against its own object
//!    ([`crate::bpf::check_reusable`]) and loads its programs reusing them.
//! 3. It takes the listening sockets (`SCM_RIGHTS`; the same sockets, so the kernel's accept
//!    queue carries over and no connection attempt is refused), starts accepting, and only then
//!    tells the old agent to stop accepting.
//! 4. It takes the spliced flows: each leaves the old agent's watch at an idle point, keeping its
//!    SockHash and map entries, and arrives with its two descriptors and its state (cookies,
//!    route id, bytes the agent moved, passed bytes it forwarded). The new agent checks the cookies and
//!    watches the flow from there (FIN/RST, flow control, drain, counters).
//! 5. It sends `Exit`: the old agent stops reading the shared event ring and writing the route
//!    entries, finishes the flows it kept (userspace copies: they are not handed over, their
//!    buffers live in that process; spliced flows that started after the takeover), within its
//!    drain time, and exits.
//!
//! When the maps are incompatible (a new map layout) the new agent says so, loads fresh maps and
//! only takes the sockets: the old agent drains all its flows (a drain-based restart). When the
//! handoff fails before the new agent listens, nothing changed; after that but before `Exit`, the
//! old agent resumes accepting. Either way the old agent keeps serving.

pub mod detach;
pub mod proto;
pub mod receiver;
pub mod sender;

use std::path::{Path, PathBuf};

/// The default handoff socket: `/run/zone-ingress/<pin dir name>.sock`, so agents with their own
/// pin dirs (their own maps) have their own socket.
pub fn socket_path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "zone-ingress".into());
    PathBuf::from("/run/zone-ingress").join(format!("{name}.sock"))
}
