//! The XDP guard in front of the listener: a source allow-list and SYN rate limits applied by
//! `zi_guard` (zone-ingress-ebpf/src/guard.rs) before the kernel's stack sees a packet.
//!
//! - [`settings`]: the `guard` section of `--agent-config` with the `--guard*`/`--xdp-*` flags on
//!   top, and the map entry they turn into;
//! - [`iface`]: which interface carries `networking.address` (where the program attaches);
//! - [`program`]: loading the program from the embedded BPF object, attaching it (native, else
//!   generic), writing its maps;
//! - [`dump`]: `zone-ingress maps dump guard`, from the pinned maps alone.
//!
//! This module wires them for `zone-ingress run`: attach at start when enabled, apply every
//! valid change of the agent configuration live (SIGHUP or file change) without detaching, and
//! detach at exit.

pub mod dump;
pub mod iface;
pub mod program;
pub mod settings;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result, anyhow, bail};

use crate::config::{AgentConfig, GuardSection};
use crate::reload::{self, Trigger};
use crate::stats::Stats;

pub use program::{Guard, GuardError, SharedLink};
pub use settings::GuardArgs;

/// What start and reload need to attach the guard.
#[derive(Clone)]
struct Ctx {
    listen: SocketAddr,
    pin_dir: PathBuf,
    flags: GuardArgs,
}

#[derive(Default)]
struct State {
    guard: Option<Guard>,
    /// Set at shutdown: a late reload must not attach again.
    closed: bool,
}

/// The guard of a running agent (possibly not attached: disabled, or enabled later by a reload).
#[derive(Clone)]
pub struct GuardRuntime {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves the maps as the kernel has them: still usable.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the guard's settings (the agent configuration file, then the flags), attaches the guard
/// when enabled, and watches the file for live changes. An invalid file or a guard that was asked
/// for and cannot attach is an error: the agent must not run unguarded by surprise.
pub fn start(
    agent_config: Option<&Path>,
    flags: &GuardArgs,
    listen: SocketAddr,
    pin_dir: &Path,
    stats: Arc<Stats>,
    inherited: Option<&SharedLink>,
) -> Result<GuardRuntime> {
    let file = match agent_config {
        Some(path) => AgentConfig::load(path)?.guard,
        None => GuardSection::default(),
    };
    let settings = flags.apply_to(&file).map_err(|e| anyhow!(e))?;
    let ctx = Ctx {
        listen,
        pin_dir: pin_dir.to_path_buf(),
        flags: flags.clone(),
    };
    let state = Arc::new(Mutex::new(State::default()));
    if settings.enabled {
        lock(&state).guard = Some(attach(&ctx, &settings, inherited)?);
    } else {
        tracing::debug!("XDP guard off (guard.enabled / --guard)");
    }
    let reader = state.clone();
    stats.set_guard_counters(Box::new(move || {
        let st = lock(&reader);
        st.guard.as_ref()?.counters().ok()
    }));
    if let Some(path) = agent_config {
        let watched = state.clone();
        tokio::spawn(reload::watch_text_file(
            path.to_path_buf(),
            "agent configuration",
            move |text, origin, trigger| reload(&ctx, &watched, text, origin, trigger),
        ));
    }
    Ok(GuardRuntime { state })
}

impl GuardRuntime {
    /// True while the XDP program is attached.
    pub fn attached(&self) -> bool {
        lock(&self.state).guard.is_some()
    }

    /// Detaches the guard (the agent is exiting); later reloads do nothing. A guard whose link a
    /// new agent took stays attached, running the new agent's program.
    pub fn shutdown(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        if let Some(guard) = st.guard.take() {
            let iface = guard.interface.clone();
            let handed_over = guard.handed_over();
            drop(guard);
            if handed_over {
                tracing::info!(interface = %iface, "XDP guard: the new agent guards the interface now");
            } else {
                tracing::info!(interface = %iface, "XDP guard detached");
            }
        }
    }

    /// Hot restart, old agent: pins the XDP link for the new agent (`None`: no guard attached).
    /// While pinned, reloads still write this agent's maps; the new agent's program reads its own.
    pub fn share_link(&self) -> Result<Option<SharedLink>, GuardError> {
        let mut st = lock(&self.state);
        match st.guard.as_mut() {
            Some(g) => g.share_link().map(Some),
            None => Ok(None),
        }
    }

    /// Hot restart failed: takes the pinned link back.
    pub fn reclaim_link(&self) {
        if let Some(g) = lock(&self.state).guard.as_mut() {
            g.reclaim_link();
        }
    }
}

/// The interface to attach to: the configured one, else the one that carries the listen address.
fn pick_interface(settings: &GuardSection, listen: SocketAddr) -> Result<String> {
    if let Some(i) = &settings.interface {
        return Ok(i.clone());
    }
    let ip = listen.ip();
    if ip.is_unspecified() {
        bail!(
            "XDP guard: networking.address is {ip} (every address), so there is no one interface \
             to guard; name it with --xdp-iface IFACE or guard.interface"
        );
    }
    let found = iface::interfaces_with(ip)
        .with_context(|| format!("XDP guard: listing interfaces to find the one with {ip}"))?;
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "XDP guard: no interface in this network namespace carries networking.address {ip}; \
             name one with --xdp-iface IFACE or guard.interface"
        ),
        many => bail!(
            "XDP guard: {ip} is on several interfaces ({}); name one with --xdp-iface IFACE or \
             guard.interface",
            many.join(", ")
        ),
    }
}

fn attach(ctx: &Ctx, settings: &GuardSection, inherited: Option<&SharedLink>) -> Result<Guard> {
    let iface = pick_interface(settings, ctx.listen)?;
    let guard = Guard::load(settings, ctx.listen.port(), &iface, &ctx.pin_dir, inherited)?;
    log_settings("XDP guard settings", settings);
    Ok(guard)
}

fn log_settings(what: &str, s: &GuardSection) {
    tracing::info!(
        enabled = s.enabled,
        allow_cidrs = s.allow_cidrs.len(),
        syn_rate = s.syn_rate,
        syn_burst = s.syn_burst.unwrap_or(s.syn_rate),
        global_syn_rate = s.global_syn_rate,
        global_syn_burst = s.global_syn_burst.unwrap_or(s.global_syn_rate),
        "{what}"
    );
}

/// One reload of the agent configuration: parse, put the flags on top, apply live.
fn reload(ctx: &Ctx, state: &Mutex<State>, text: &str, origin: &str, trigger: Trigger) {
    let settings = match AgentConfig::from_yaml_str(text, origin) {
        Ok(c) => match ctx.flags.apply_to(&c.guard) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(
                    trigger = trigger.as_str(),
                    "rejected agent configuration reload, keeping the current guard settings: {e}"
                );
                return;
            }
        },
        Err(e) => {
            tracing::error!(
                trigger = trigger.as_str(),
                "rejected agent configuration reload, keeping the current guard settings: {e}"
            );
            return;
        }
    };
    let mut st = lock(state);
    if st.closed {
        return;
    }
    match st.guard.as_mut() {
        Some(guard) => {
            let old = guard.applied().clone();
            for (field, changed) in [
                (
                    "interface",
                    settings.interface.is_some() && settings.interface != old.interface,
                ),
                ("mode", settings.mode != old.mode),
                ("max_sources", settings.max_sources != old.max_sources),
            ] {
                if changed {
                    tracing::warn!(
                        field,
                        "guard.{field} changed: it takes effect when the agent restarts (the \
                         program stays attached as it is)"
                    );
                }
            }
            match guard.apply(&settings) {
                Ok(()) => log_settings(
                    &format!("XDP guard settings reloaded ({})", trigger.as_str()),
                    &settings,
                ),
                Err(e) => tracing::error!("XDP guard: applying the reloaded settings: {e}"),
            }
        }
        None if settings.enabled => match attach(ctx, &settings, None) {
            Ok(guard) => st.guard = Some(guard),
            Err(e) => tracing::error!("XDP guard enabled by a reload but not attached: {e:#}"),
        },
        None => {}
    }
}
