//! `zone-ingress run`: wiring configuration, route source, BPF, listener and admin API together,
//! and the shutdown sequence.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::accesslog::{self, AccessLog};
use crate::admin::{self, Readiness};
use crate::bpf::BpfPrograms;
use crate::config::{DEFAULT_ROUTES_YAML, DEFAULT_ZONE_INGRESS_YAML, RoutesFile, ZoneIngress};
use crate::datapath::DatapathMode;
use crate::datapath::sockmap::Splicer;
use crate::listener::{self, ActiveFlows, Ingress};
use crate::reload;
use crate::routes::{RouteStore, RouteTable};
use crate::stats::Stats;
use crate::tls::HelloLimits;

/// Everything `run` needs, already parsed from flags.
#[derive(Debug, Clone)]
pub struct RunOptions {
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
    /// `--access-log`: where lines go; `None` is off.
    pub access_log: Option<accesslog::Sink>,
    pub access_log_format: accesslog::Format,
    /// `--agent-config`: the agent's own settings (the XDP guard).
    pub agent_config: Option<PathBuf>,
    pub guard: crate::guard::GuardArgs,
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

pub async fn run(opts: RunOptions) -> Result<()> {
    let (zi, table) = load_routes(&opts)?;
    if opts.config.is_none() {
        tracing::info!(
            "no --config given: running on the embedded default configuration (config/zone-ingress.yaml, config/routes.yaml)"
        );
    }
    let stats = Arc::new(Stats::new());
    let routes = Arc::new(RouteStore::new(table));
    let readiness = Arc::new(Readiness::default());

    let splicer = load_datapath(&opts)?
        .map(|p| Splicer::new(p, opts.splice_budget, stats.clone(), routes.clone()));

    let listen = zi.listen_addr();
    let listener = listener::bind(listen).with_context(|| {
        format!("cannot listen on {listen} (networking.address/port of ZoneIngress {}): is the address local and the port free?", zi.name)
    })?;
    let admin_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, zi.networking.admin.port));
    let admin_listener = admin::bind(admin_addr).await?;
    tokio::spawn(admin::serve(
        admin_listener,
        admin::AdminState {
            readiness: readiness.clone(),
            stats: stats.clone(),
            routes: routes.clone(),
            zone_ingress: Arc::new(zi.clone()),
            listen,
        },
    ));
    // Kuma's K8s probe hits podIP:<admin port>/ready. A loopback address is already covered by
    // the admin API; a wildcard one would also expose it (and clash with the 127.0.0.1 bind).
    let address = zi.networking.address;
    if address.is_unspecified() {
        tracing::info!(%address, "networking.address is a wildcard: /ready is served on 127.0.0.1 only");
    } else if !address.is_loopback() {
        let ready_addr = SocketAddr::new(address, zi.networking.admin.port);
        let ready_listener = admin::bind(ready_addr).await?;
        tokio::spawn(admin::serve_ready_only(ready_listener, readiness.clone()));
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
        splicer,
        access_log,
        drain: drain_rx,
    });
    let guard = crate::guard::start(
        opts.agent_config.as_deref(),
        &opts.guard,
        listen,
        &opts.pin_dir,
        stats.clone(),
    )?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(listener::serve(listener, ingress, stop_rx));
    readiness.set_ready();
    tracing::info!(
        name = %zi.name,
        %listen,
        admin = %admin_addr,
        routes = routes.load().len(),
        "zone-ingress listening"
    );

    let signal_name = wait_for_shutdown_signal().await?;
    readiness.set_terminating();
    let _ = stop_tx.send(true);
    let _ = server.await;
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

/// Loads the BPF programs when the datapath wants them. `auto` falls back (said once); `sockmap`
/// makes a failure fatal.
fn load_datapath(opts: &RunOptions) -> Result<Option<BpfPrograms>> {
    match opts.datapath {
        DatapathMode::Userspace => {
            tracing::info!("datapath: userspace copy (--datapath userspace)");
            Ok(None)
        }
        DatapathMode::Auto => match BpfPrograms::load(&opts.pin_dir) {
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
            let p = BpfPrograms::load(&opts.pin_dir)
                .context("--datapath sockmap needs the BPF programs")?;
            tracing::info!(
                budget = opts.splice_budget,
                "datapath: kernel splice (userspace copy for flows the kernel refuses)"
            );
            Ok(Some(p))
        }
    }
}

async fn wait_for_shutdown_signal() -> Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
