//! `zone-ingress run`: wiring configuration, route source, BPF, listener and admin API together,
//! and the shutdown sequence.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::accesslog::{self, AccessLog};
use crate::admin::{self, Readiness};
use crate::bpf::{BpfPrograms, Pins};
use crate::config::{DEFAULT_ROUTES_YAML, DEFAULT_ZONE_INGRESS_YAML, RoutesFile, ZoneIngress};
use crate::cp::tls::Connector;
use crate::cp::{AdsClient, CpOptions};
use crate::datapath::DatapathMode;
use crate::datapath::sockmap::Splicer;
use crate::handoff::{
    self,
    receiver::{Adopter, Upgrade},
};
use crate::listener::{self, ActiveFlows, Ingress};
use crate::reload;
use crate::routes::{RouteStore, RouteTable};
use crate::stats::Stats;
use crate::tls::HelloLimits;

/// Everything `run` needs, already parsed from flags.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The Kuma control-plane session; `None`: routes from files.
    pub cp: Option<CpOptions>,
    pub config: Option<PathBuf>,
    pub routes: Option<PathBuf>,
    /// A file of xDS resources (Kuma's Listener/Cluster/ClusterLoadAssignment) used as a static
    /// route source instead of `routes`.
    pub xds_file: Option<PathBuf>,
    pub datapath: DatapathMode,
    pub client_hello_timeout: Duration,
    pub connect_timeout: Duration,
    pub drain_time: Duration,
    pub pin_dir: PathBuf,
    /// Bytes one direction of a spliced flow may park in the kernel before its sender is slowed.
    pub splice_budget: u64,
    /// `--local-redirect`: the `sk_msg` path for endpoints on this host.
    pub local_redirect: crate::datapath::local::LocalRedirectMode,
    /// `--access-log`: where lines go; `None` is off.
    pub access_log: Option<accesslog::Sink>,
    pub access_log_format: accesslog::Format,
    /// `--agent-config`: the agent's own settings (the XDP guard).
    pub agent_config: Option<PathBuf>,
    pub guard: crate::guard::GuardArgs,
    /// `--keep-capabilities`: do not drop the BPF-related capabilities after loading.
    pub keep_capabilities: bool,
    /// `--upgrade`: take the sockets and spliced flows of the agent running on the same handoff
    /// socket, then make it exit (hot restart).
    pub upgrade: bool,
    /// `--handoff-socket`: where this agent offers, and `--upgrade` looks for, the handoff.
    pub handoff_socket: PathBuf,
}

/// After the drain time, how long flows told to finish get to deliver what they hold.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// The ZoneIngress resource and the route file, from flags or the embedded defaults.
pub fn load_config(opts: &RunOptions) -> Result<(ZoneIngress, RoutesFile, String)> {
    let zi = load_zone_ingress(opts)?;
    let (routes, origin) = match (&opts.routes, &opts.config) {
        (Some(path), _) => (RoutesFile::load(path)?, path.display().to_string()),
        (None, None) => (
            RoutesFile::from_yaml_str(DEFAULT_ROUTES_YAML, "embedded default config/routes.yaml")?,
            "embedded default config/routes.yaml".to_string(),
        ),
        (None, Some(_)) => bail!(
            "no source of routes: pass --routes FILE (a standalone route table) or --xds-file FILE \
             (xDS resources). The embedded default routes are only used when neither --config nor \
             --routes is given"
        ),
    };
    Ok((zi, routes, origin))
}

/// The ZoneIngress resource from `--config`, or the embedded default.
fn load_zone_ingress(opts: &RunOptions) -> Result<ZoneIngress> {
    Ok(match &opts.config {
        Some(path) => ZoneIngress::load(path)?,
        None => ZoneIngress::from_yaml_str(
            DEFAULT_ZONE_INGRESS_YAML,
            "embedded default config/zone-ingress.yaml",
        )?,
    })
}

/// The ZoneIngress and the first route table, from `--xds-file` or the routes file.
fn load_routes(opts: &RunOptions) -> Result<(ZoneIngress, RouteTable)> {
    let Some(path) = &opts.xds_file else {
        let (zi, file, origin) = load_config(opts)?;
        return Ok((zi, reload::table_from_file(&file, &origin)));
    };
    let zi = load_zone_ingress(opts)?;
    let routes = crate::xds::route_table(&crate::xds::load_file(path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if routes.listener != zi.listen_addr() {
        tracing::info!(xds_listener = %routes.listener, listen = %zi.listen_addr(),
            "the xDS listener address differs from the ZoneIngress networking.address/port; listening on the latter");
    }
    Ok((zi, routes.to_route_table(path.display().to_string())))
}

/// Where the listener, the admin API and the first route table come from.
struct Started {
    zone_ingress: Option<ZoneIngress>,
    listen: SocketAddr,
    /// Where `/ready` alone is served beyond localhost (Kuma's probe address), if anywhere.
    ready_addr: Option<SocketAddr>,
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let mut shutdown = Shutdown::install()?;
    let stats = Arc::new(Stats::new());
    let readiness = Arc::new(Readiness::default());
    let routes = Arc::new(RouteStore::new(RouteTable::new("none yet", [])));
    let listen_cell = Arc::new(OnceLock::new());

    // A hot restart takes the running agent's listening sockets first: they stay shared (both
    // accept) until this agent is ready, so no connection attempt is refused meanwhile.
    let upgrade =
        if opts.upgrade {
            Some(Upgrade::connect(&opts.handoff_socket).await.context(
                "--upgrade: the handoff with the running agent failed; it keeps serving",
            )?)
        } else {
            None
        };
    let pins = match &upgrade {
        Some(u) if u.old_spliced => match crate::bpf::check_reusable(&opts.pin_dir) {
            Ok(()) => Pins::Reuse,
            Err(e) => {
                tracing::warn!(error = %e, "the running agent's BPF maps differ from this version's: not taking its flows over; it drains them (drain-based restart)");
                Pins::Replace
            }
        },
        _ => Pins::Replace,
    };
    let splicer = load_datapath(&opts, pins)?.map(|p| {
        Splicer::new(
            p,
            opts.splice_budget,
            stats.clone(),
            routes.clone(),
            opts.local_redirect,
        )
    });
    let adopt_flows = pins == Pins::Reuse && splicer.is_some();
    let mut sockets = Sockets {
        upgrade: upgrade.as_ref(),
        shared: Vec::new(),
        admin_tasks: Vec::new(),
    };

    let admin_state = |zi: Option<&ZoneIngress>| admin::AdminState {
        readiness: readiness.clone(),
        stats: stats.clone(),
        routes: routes.clone(),
        zone_ingress: zi.cloned().map(Arc::new),
        listen: listen_cell.clone(),
        control_plane: opts.cp.as_ref().map(|cp| {
            Arc::new(serde_json::json!({
                "address": cp.address.to_string(),
                "name": cp.name,
                "node_id": format!(".{}", cp.name),
            }))
        }),
    };
    let started = match &opts.cp {
        None => {
            let (zi, table) = load_routes(&opts)?;
            if opts.config.is_none() {
                tracing::info!(
                    "no --config given: running on the embedded default configuration (config/zone-ingress.yaml, config/routes.yaml)"
                );
            }
            stats.set_cluster_membership(&table);
            routes.replace(table);
            let admin_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, zi.networking.admin.port));
            let admin_listener = sockets.bind_admin(admin_addr).await?;
            sockets.admin_tasks.push(tokio::spawn(admin::serve(
                admin_listener,
                admin_state(Some(&zi)),
            )));
            Started {
                listen: zi.listen_addr(),
                ready_addr: Some(SocketAddr::new(
                    zi.networking.address,
                    zi.networking.admin.port,
                )),
                zone_ingress: Some(zi),
            }
        }
        Some(cp) => {
            let zi = opts.config.as_deref().map(ZoneIngress::load).transpose()?;
            match start_control_plane(
                cp,
                zi,
                &routes,
                &stats,
                &readiness,
                &mut shutdown,
                &mut sockets,
                admin_state,
            )
            .await?
            {
                Some(s) => s,
                None => return Ok(()),
            }
        }
    };
    let listen = started.listen;
    let name = started
        .zone_ingress
        .as_ref()
        .map(|zi| zi.name.clone())
        .or_else(|| opts.cp.as_ref().map(|cp| cp.name.clone()))
        .unwrap_or_default();
    let listener = match sockets.upgrade.and_then(|u| u.take_socket(listen)) {
        Some(fd) => tcp_listener(fd)?,
        None => listener::bind(listen).with_context(|| {
            format!("cannot listen on {listen} (networking.address/port of ZoneIngress {name}): is the address local and the port free?")
        })?,
    };
    sockets.share(listen, &listener);
    let _ = listen_cell.set(listen);
    // Kuma's K8s probe hits podIP:<admin port>/ready. A loopback address is already covered by
    // the admin API; a wildcard one would also expose it (and clash with the 127.0.0.1 bind).
    match started.ready_addr {
        Some(addr) if addr.ip().is_unspecified() => {
            tracing::info!(address = %addr.ip(), "networking.address is a wildcard: /ready is served on 127.0.0.1 only");
        }
        Some(addr) if !addr.ip().is_loopback() => {
            let ready_listener = sockets.bind_admin(addr).await?;
            sockets
                .admin_tasks
                .push(tokio::spawn(admin::serve_ready_only(
                    ready_listener,
                    readiness.clone(),
                )));
        }
        _ => {}
    }

    if let Some(path) = opts.routes.clone() {
        tokio::spawn(reload::watch_routes_file(
            path,
            routes.clone(),
            stats.clone(),
        ));
    }
    if let Some(path) = opts.xds_file.clone() {
        tokio::spawn(reload::watch_xds_file(path, routes.clone(), stats.clone()));
    }

    stats.set_listener_address(listen);
    let (access_log, log_writer) = match &opts.access_log {
        Some(sink) => {
            let (log, writer) =
                accesslog::start(sink, opts.access_log_format, stats.clone()).await?;
            (log, Some(writer))
        }
        None => (AccessLog::disabled(stats.clone()), None),
    };
    let (drain_tx, drain_rx) = watch::channel(false);

    let flows = Arc::new(ActiveFlows::default());
    let ingress = Arc::new(Ingress {
        routes: routes.clone(),
        stats: stats.clone(),
        hello_limits: HelloLimits {
            timeout: opts.client_hello_timeout,
            ..HelloLimits::default()
        },
        connect_timeout: opts.connect_timeout,
        flows: flows.clone(),
        splicer: splicer.clone(),
        access_log,
        drain: drain_rx,
    });
    let guard = crate::guard::start(
        opts.agent_config.as_deref(),
        &opts.guard,
        listen,
        &opts.pin_dir,
        stats.clone(),
        upgrade.as_ref().and_then(|u| u.guard_link()),
    )?;
    if opts.keep_capabilities {
        tracing::info!("--keep-capabilities: keeping every capability the agent started with");
    } else {
        // The guard can be attached (or re-attached) by a reload of the agent configuration later.
        let guard_in_play = guard.attached() || opts.agent_config.is_some();
        drop_capabilities(splicer.as_deref(), guard_in_play);
    }
    if let Some(s) = &splicer {
        s.sync_routes(&routes.load());
    }
    let (mut stop_tx, stop_rx) = watch::channel(false);
    let mut server = Some(tokio::spawn(listener::serve(
        listener,
        ingress.clone(),
        stop_rx,
    )));
    readiness.set_ready();
    tracing::info!(
        %name,
        %listen,
        routes = routes.load().len(),
        "zone-ingress listening"
    );
    let Sockets {
        shared,
        admin_tasks,
        ..
    } = sockets;
    if let Some(upgrade) = upgrade {
        let adopter = splicer
            .clone()
            .filter(|_| adopt_flows)
            .map(|splicer| Adopter {
                splicer,
                stats: stats.clone(),
                flows: flows.clone(),
                drain: drain_tx.subscribe(),
            });
        match take_over(upgrade, adopter.as_ref()).await {
            Ok(()) => handoff::detach::report(Ok(())),
            Err(e) => {
                tracing::error!(error = %e, "hot restart incomplete: the running agent resumes accepting and keeps its flows; this agent serves too, without a handoff socket");
                handoff::detach::report(Err(&format!(
                    "hot restart incomplete: {e:#}; both agents serve, the new one without a handoff socket"
                )));
            }
        }
    } else {
        crate::service::ready();
    }
    let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
    // Bound after a takeover completed, so the next `--upgrade` finds this agent.
    let mut handoff_server = match handoff::sender::bind(&opts.handoff_socket) {
        Ok((unix, bound)) => {
            let sender = handoff::sender::Sender {
                sockets: shared
                    .iter()
                    .filter_map(|(a, f)| Some((*a, f.try_clone().ok()?)))
                    .collect(),
                splicer: splicer.clone(),
                events: events_tx,
                flows: flows.clone(),
                handed_over: bound.handed_over(),
                guard: Some(guard.clone()),
            };
            Some((bound, tokio::spawn(sender.serve(unix))))
        }
        Err(e) => {
            tracing::warn!(path = %opts.handoff_socket.display(), error = %e, "cannot offer a hot restart (handoff socket); `run --upgrade` will not find this agent");
            None
        }
    };

    let signal_name = loop {
        tokio::select! {
            sig = shutdown.recv() => break sig,
            Some(event) = events_rx.recv() => match event {
                handoff::sender::Event::StopAccepting => {
                    let _ = stop_tx.send(true);
                    if let Some(s) = server.take() {
                        let _ = s.await;
                    }
                    tracing::info!("the new agent accepts now; stopped accepting");
                }
                handoff::sender::Event::ResumeAccepting => {
                    let Some(fd) = shared
                        .iter()
                        .find(|(a, _)| *a == listen)
                        .and_then(|(_, f)| f.try_clone().ok())
                    else {
                        continue;
                    };
                    let (tx, rx) = watch::channel(false);
                    stop_tx = tx;
                    server = Some(tokio::spawn(listener::serve(tcp_listener(fd)?, ingress.clone(), rx)));
                    tracing::info!("accepting again after the failed handoff");
                }
                handoff::sender::Event::Exit => break "hot restart",
            }
        }
    };
    for task in &admin_tasks {
        task.abort();
    }
    // The dups kept for a next agent would keep the listening sockets open (accepting into the
    // backlog) after the accept loop stops: a stopping agent must refuse new connections.
    drop(shared);
    // Kept until the process ends: its drop removes the handoff socket unless a new agent owns it.
    let _bound = match handoff_server.take() {
        Some((bound, task)) => {
            task.abort();
            let _ = task.await;
            Some(bound)
        }
        None => None,
    };
    readiness.set_terminating();
    let _ = stop_tx.send(true);
    if let Some(s) = server.take() {
        let _ = s.await;
    }
    let active = flows.count();
    tracing::info!(signal = signal_name, active_flows = active, drain_time = ?opts.drain_time, "stopped accepting; draining");
    if tokio::time::timeout(opts.drain_time, flows.wait_idle())
        .await
        .is_err()
    {
        // Flows half-close both sides after the bytes they hold (userspace: see
        // listener::copy_until_drained; spliced: once the redirect queues reached the TCP
        // streams, see Splicer::run) and get DRAIN_GRACE to deliver them.
        tracing::warn!(
            remaining = flows.count(),
            grace = ?DRAIN_GRACE,
            "drain time over; asking the remaining flows to finish"
        );
        let _ = drain_tx.send(true);
        if tokio::time::timeout(DRAIN_GRACE, flows.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = flows.count(),
                "flows still open after the grace; they end with the process"
            );
        }
    }
    if let Some(writer) = log_writer {
        writer.finish(DRAIN_GRACE).await;
    }
    guard.shutdown();
    Ok(())
}

/// Drops the capabilities nothing needs any more, from every thread: CAP_SYS_ADMIN (bpffs is
/// mounted, the programs loaded), CAP_PERFMON, and CAP_BPF once a probe showed the spliced flows'
/// map operations work without it (older kernels gate every bpf(2) call on CAP_BPF). CAP_NET_ADMIN
/// stays with the splice: it forces its sockets' send buffers with `SO_SNDBUFFORCE` (the local
/// redirect's client socket too). With the XDP guard attached or attachable by a reload, CAP_BPF
/// stays too. With the userspace copy and no guard, all four go. Failing to drop is logged, not
/// fatal: the agent then runs as privileged as it started.
fn drop_capabilities(splicer: Option<&Splicer>, guard_in_play: bool) {
    use crate::privs::{self, CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN, bit};
    let eff = match privs::current() {
        Ok(c) => c.effective,
        Err(e) => {
            tracing::warn!("not dropping capabilities: {e}");
            return;
        }
    };
    // Without CAP_BPF (kernels before 5.8) CAP_SYS_ADMIN is what lets the agent use bpf(2).
    let sys_admin_if_bpf = if eff & bit(CAP_BPF) != 0 {
        bit(CAP_SYS_ADMIN)
    } else {
        0
    };
    let all = bit(CAP_BPF) | bit(CAP_NET_ADMIN) | bit(CAP_SYS_ADMIN) | bit(CAP_PERFMON);
    let (mask, why_kept) = if guard_in_play {
        (
            sys_admin_if_bpf | bit(CAP_PERFMON),
            "the XDP guard is attached or may be attached by a reload (it needs them then)",
        )
    } else if let Some(s) = splicer {
        let candidates = bit(CAP_BPF) | bit(CAP_SYS_ADMIN) | bit(CAP_PERFMON);
        match privs::works_without(candidates, || s.probe_map_access()) {
            Ok(Ok(())) => (
                candidates,
                "the splice forces its sockets' send buffers (SO_SNDBUFFORCE)",
            ),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "map access without CAP_BPF failed");
                (
                    sys_admin_if_bpf | bit(CAP_PERFMON),
                    "this kernel refuses bpf(2) map operations without CAP_BPF \
                     (kernel.unprivileged_bpf_disabled before Linux 6.5), and the splice sets \
                     SO_SNDBUFFORCE",
                )
            }
            Err(e) => {
                tracing::warn!("not dropping capabilities: {e}");
                return;
            }
        }
    } else {
        (all, "")
    };
    match privs::drop_everywhere(mask) {
        Ok(0) => tracing::debug!("no capability to drop"),
        Ok(dropped) => {
            let kept = privs::current().map(|c| c.effective).unwrap_or(0);
            tracing::info!(
                dropped = %privs::names(dropped),
                kept = %privs::names(kept),
                "dropped capabilities the agent no longer needs"
            );
        }
        Err(e) => tracing::warn!("dropping capabilities failed: {e}"),
    }
    let kept = privs::current().map(|c| c.effective).unwrap_or(0) & all;
    if !why_kept.is_empty() && kept != 0 {
        tracing::info!(kept = %privs::names(kept), "keeping capabilities: {why_kept}");
    }
}

/// The new agent's part of a hot restart once it accepts: the old agent stops accepting, hands
/// over its spliced flows (when the maps were reused) and exits after the flows it kept.
async fn take_over(upgrade: Upgrade, adopter: Option<&Adopter>) -> Result<()> {
    let old_pid = upgrade.old_pid;
    upgrade.listening().await?;
    let adopted = match adopter {
        Some(a) => upgrade.take_flows(a).await?,
        None => 0,
    };
    // Before the old agent is told to exit: a service manager must not see its main process
    // end without a successor.
    crate::service::took_over();
    let kept = upgrade.finish().await?;
    tracing::info!(
        old_pid,
        adopted,
        kept_by_old = kept,
        "hot restart: took over; the old agent exits once the flows it kept end"
    );
    Ok(())
}

/// A listening socket received from the old agent.
fn tcp_listener(fd: OwnedFd) -> Result<tokio::net::TcpListener> {
    let std = std::net::TcpListener::from(fd);
    std.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(std)?)
}

/// The agent's listening sockets: taken from the agent being upgraded when it had them, and kept
/// (dups) for the next upgrade.
struct Sockets<'a> {
    upgrade: Option<&'a Upgrade>,
    shared: Vec<(SocketAddr, OwnedFd)>,
    /// The admin servers, stopped once a next agent took over.
    admin_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Sockets<'_> {
    /// An admin/readiness listener: the old agent's socket for `addr`, or a new one.
    async fn bind_admin(&mut self, addr: SocketAddr) -> Result<tokio::net::TcpListener> {
        let l = match self.upgrade.and_then(|u| u.take_socket(addr)) {
            Some(fd) => tcp_listener(fd)?,
            None => admin::bind(addr).await?,
        };
        self.share(addr, &l);
        Ok(l)
    }

    /// Keeps a dup of a listening socket to hand to the next agent.
    fn share(&mut self, addr: SocketAddr, l: &tokio::net::TcpListener) {
        match l.as_fd().try_clone_to_owned() {
            Ok(fd) => self.shared.push((addr, fd)),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot keep the socket for a hot restart");
            }
        }
    }
}

/// Loads the BPF programs when the datapath wants them. `auto` falls back (said once); `sockmap`
/// makes a failure fatal.
fn load_datapath(opts: &RunOptions, pins: Pins) -> Result<Option<BpfPrograms>> {
    match opts.datapath {
        DatapathMode::Userspace => {
            tracing::info!("datapath: userspace copy (--datapath userspace)");
            Ok(None)
        }
        DatapathMode::Auto => match BpfPrograms::load(&opts.pin_dir, pins) {
            Ok(p) => {
                tracing::info!(
                    budget = opts.splice_budget,
                    "datapath: kernel splice (userspace copy for flows the kernel refuses)"
                );
                Ok(Some(p))
            }
            Err(e) => {
                tracing::warn!(
                    "datapath: BPF unavailable, using the userspace copy for every flow: {e}"
                );
                Ok(None)
            }
        },
        DatapathMode::Sockmap => {
            let p = BpfPrograms::load(&opts.pin_dir, pins)
                .context("--datapath sockmap needs the BPF programs")?;
            tracing::info!(
                budget = opts.splice_budget,
                "datapath: kernel splice (userspace copy for flows the kernel refuses)"
            );
            Ok(Some(p))
        }
    }
}

/// SIGTERM and SIGINT, installed once at start so a signal during startup (a bootstrap that is
/// still retrying) is not lost.
struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn install() -> Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// The control-plane start: bootstrap, admin API (NOT_READY), ADS, and the wait for the first
/// applied snapshot, which gives the listen address. `None`: a signal came first.
// The start-up state it fills in is spread over the caller's locals; a struct bundling them
// would exist for this call only.
#[allow(clippy::too_many_arguments)]
async fn start_control_plane(
    cp: &CpOptions,
    zi: Option<ZoneIngress>,
    routes: &Arc<RouteStore>,
    stats: &Arc<Stats>,
    readiness: &Arc<Readiness>,
    shutdown: &mut Shutdown,
    sockets: &mut Sockets<'_>,
    admin_state: impl Fn(Option<&ZoneIngress>) -> admin::AdminState,
) -> Result<Option<Started>> {
    cp.token.warn_if_exposed();
    let token = cp.token.read()?;
    if token.is_none() {
        tracing::warn!(
            "no dataplane token given (--dataplane-token-file); only a control plane with zone proxy authentication `none` accepts this"
        );
    }
    if matches!(cp.trust, Some(crate::cp::Trust::Insecure)) {
        tracing::warn!(
            "--skip-verify: the control plane's certificate is NOT verified; anyone on the path can impersonate it"
        );
    }
    let connector = Connector::new(
        &cp.address.host,
        cp.address.port,
        cp.trust.as_ref(),
        &[b"http/1.1"],
    )?
    .with_handshake_timeout(cp.response_timeout);
    tracing::info!(cp = %cp.address, name = %cp.name, "requesting the bootstrap from the control plane");
    let info = tokio::select! {
        r = crate::cp::bootstrap::bootstrap(cp, &connector, token.as_deref(), cp.bootstrap_retry_for) => r?,
        sig = shutdown.recv() => {
            tracing::info!(signal = sig, "stopped before the control plane answered the bootstrap");
            return Ok(None);
        }
    };
    let admin_port = info.admin_port.unwrap_or(cp.admin_port);
    let admin_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, admin_port));
    let admin_listener = sockets.bind_admin(admin_addr).await?;
    sockets.admin_tasks.push(tokio::spawn(admin::serve(
        admin_listener,
        admin_state(zi.as_ref()),
    )));
    // kuma-dp's readiness reporter; Kuma's admin listener routes /ready there.
    if cp.readiness_port != admin_port {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, cp.readiness_port));
        let l = sockets.bind_admin(addr).await?;
        sockets
            .admin_tasks
            .push(tokio::spawn(admin::serve_ready_only(l, readiness.clone())));
    }

    let mut ads_connector =
        Connector::new(&info.xds_host, info.xds_port, cp.trust.as_ref(), &[b"h2"])?
            .with_handshake_timeout(cp.response_timeout);
    if let Some(sni) = &info.xds_sni {
        ads_connector = ads_connector.with_server_name(sni)?;
    }
    let (applied_tx, mut applied_rx) = watch::channel(None);
    let mut ads = tokio::spawn(
        AdsClient::new(
            Arc::new(cp.clone()),
            ads_connector,
            routes.clone(),
            stats.clone(),
            applied_tx,
        )
        .run(),
    );
    tracing::info!(admin = %admin_addr, "waiting for the first configuration from the control plane (/ready says NOT_READY until then)");
    let first = loop {
        tokio::select! {
            changed = applied_rx.changed() => {
                if changed.is_err() {
                    // The session ended; its result says why (below, on the next turn).
                    continue;
                }
                if let Some(a) = applied_rx.borrow_and_update().clone() {
                    break a;
                }
            }
            res = &mut ads => {
                return match res {
                    Ok(Ok(())) => Err(anyhow::anyhow!("the control-plane session ended before any configuration arrived")),
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(anyhow::anyhow!("the control-plane session failed: {e}")),
                };
            }
            sig = shutdown.recv() => {
                tracing::info!(signal = sig, "stopped before the first configuration arrived");
                ads.abort();
                return Ok(None);
            }
        }
    };
    tokio::spawn(async move {
        match ads.await {
            Ok(Err(e)) => {
                tracing::error!(error = %e, "control-plane session stopped; routing continues on the last applied table")
            }
            Err(e) if e.is_panic() => {
                tracing::error!(error = %e, "control-plane session panicked; routing continues on the last applied table")
            }
            _ => {}
        }
    });
    let listen = first.routes.listener;
    if let Some(zi) = &zi
        && zi.listen_addr() != listen
    {
        tracing::info!(resource = %zi.listen_addr(), xds = %listen, "the control plane's listener address differs from the ZoneIngress file; listening where the control plane says, as Envoy does");
    }
    let ready_addr = first
        .admin_listener
        .unwrap_or(SocketAddr::new(listen.ip(), admin_port));
    Ok(Some(Started {
        zone_ingress: zi,
        listen,
        ready_addr: Some(ready_addr),
    }))
}
