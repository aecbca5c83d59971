//! Command line: `zone-ingress run`, `zone-ingress check` and `zone-ingress routes`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::agent::{self, RunOptions};
use crate::datapath::DatapathMode;

#[derive(Parser, Debug)]
#[command(
    name = "zone-ingress",
    version,
    about = "eBPF-accelerated ZoneIngress for multi-zone Kuma",
    long_about = "eBPF-accelerated ZoneIngress for multi-zone Kuma.\n\n\
        Routes each incoming mTLS connection by the SNI of its ClientHello to a local endpoint, \
        without terminating TLS, then splices the two TCP streams in the kernel (or copies them \
        in userspace where the kernel path is unavailable)."
)]
struct Cli {
    /// Log format on stderr (the level comes from RUST_LOG, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain, env = "ZONE_INGRESS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the ingress.
    Run(Box<RunArgs>),
    /// Validate configuration files and exit (0 when valid, 1 with the problems otherwise).
    Check(CheckArgs),
    /// Show the route table a file of xDS resources resolves to (SNI → cluster → endpoints).
    Routes(RoutesArgs),
    /// Read the agent's pinned BPF maps: `maps dump routes|flows|stats|guard [--json] [--pin-dir DIR]`.
    Maps(crate::maps::MapsArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The ZoneIngress resource (Kuma universal YAML). With --cp-address it is sent to the
    /// control plane (universal); without a control plane it gives the listen and admin
    /// addresses. Without it (and without --routes) the embedded default configuration from
    /// config/ is used. `--config` and `--dataplane` are aliases.
    #[arg(
        long = "dataplane-file",
        short = 'c',
        visible_alias = "config",
        alias = "dataplane",
        value_name = "FILE",
        env = "ZONE_INGRESS_CONFIG"
    )]
    config: Option<PathBuf>,
    #[command(flatten)]
    cp: CpArgs,
    /// Standalone route table (YAML: `routes: [{sni, endpoints}]`), reloaded on SIGHUP and on change.
    #[arg(long, value_name = "FILE", env = "ZONE_INGRESS_ROUTES")]
    routes: Option<PathBuf>,
    /// xDS resources (Listener, Cluster, ClusterLoadAssignment in Envoy's proto3 JSON mapping, as
    /// JSON or YAML, e.g. Kuma's *.envoy.golden.yaml) as a static route source, reloaded on SIGHUP
    /// and on change. The listen address still comes from --config.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "routes",
        env = "ZONE_INGRESS_XDS_FILE"
    )]
    xds_file: Option<PathBuf>,
    /// How flows move bytes: `auto` splices in the kernel where it can, `sockmap` requires it,
    /// `userspace` never loads BPF.
    #[arg(long, value_enum, default_value_t = DatapathMode::Auto, env = "ZONE_INGRESS_DATAPATH")]
    datapath: DatapathMode,
    /// How long a client has to send its whole ClientHello (e.g. `5s`, `500ms`).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    client_hello_timeout: Duration,
    /// Timeout of one connection attempt to an endpoint; the next endpoint is tried after it.
    /// Routes from xDS use their cluster's connect_timeout instead.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// On SIGTERM/SIGINT, how long live flows may take to finish before the agent exits.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, env = "KUMA_DATAPLANE_DRAIN_TIME")]
    drain_time: Duration,
    /// Bytes one direction of a spliced flow may park in the kernel's redirect queue before the
    /// sender is slowed through TCP (e.g. `4MiB`, `512KiB`).
    #[arg(long, value_name = "BYTES", default_value = "4MiB", value_parser = parse_size, env = "ZONE_INGRESS_SPLICE_BUDGET")]
    splice_budget: u64,
    /// Endpoints on this host (an address of the agent's own network namespace): `auto` sends
    /// their bytes straight to the client socket with an `sk_msg` program instead of through
    /// loopback TCP, when the kernel splice is in use; `off` splices them like remote ones.
    #[arg(long, value_enum, default_value_t = crate::datapath::local::LocalRedirectMode::Auto, env = "ZONE_INGRESS_LOCAL_REDIRECT")]
    local_redirect: crate::datapath::local::LocalRedirectMode,
    /// Write one line per finished connection (routed or rejected) to FILE (appended), or to
    /// stdout with `-`. Off by default.
    #[arg(long, value_name = "FILE|-", env = "ZONE_INGRESS_ACCESS_LOG")]
    access_log: Option<String>,
    /// Access log line format: `plain` (key=value) or `json` (one object per line, stable keys).
    #[arg(long, value_enum, default_value_t = crate::accesslog::Format::Plain, env = "ZONE_INGRESS_ACCESS_LOG_FORMAT")]
    access_log_format: crate::accesslog::Format,
    /// Directory on bpffs where the BPF maps are pinned.
    #[arg(long, value_name = "DIR", default_value = zone_ingress_common::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Keep every capability the agent started with. By default, once the BPF programs are loaded
    /// (and the XDP guard attached), it drops CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and
    /// CAP_PERFMON from all its threads where nothing later needs them.
    #[arg(long)]
    keep_capabilities: bool,
    /// The agent's own configuration (YAML, next to the ZoneIngress resource): the `guard`
    /// section. Reloaded on SIGHUP and on change.
    #[arg(long, value_name = "FILE", env = "ZONE_INGRESS_AGENT_CONFIG")]
    agent_config: Option<PathBuf>,
    #[command(flatten)]
    guard: crate::guard::GuardArgs,
    /// Hot restart: take the listening sockets and the spliced flows of the agent running on the
    /// same handoff socket (and pin dir), then make it exit. It keeps serving if this fails.
    #[arg(long)]
    upgrade: bool,
    /// With --upgrade: start the new agent in the background and return once it took over (exit
    /// 0) or failed (exit 1, with the reason). For a service manager's reload command
    /// (systemd `ExecReload=`).
    #[arg(long, requires = "upgrade")]
    detach: bool,
    /// Unix socket for hot restarts: this agent serves it, `--upgrade` connects to it.
    /// Default: /run/zone-ingress/<pin dir name>.sock.
    #[arg(long, value_name = "PATH", env = "ZONE_INGRESS_HANDOFF_SOCKET")]
    handoff_socket: Option<PathBuf>,
}

/// The Kuma control-plane session: the flags and environment of `kuma-dp run`.
#[derive(Args, Debug)]
#[command(next_help_heading = "Control plane (kuma-dp compatible)")]
struct CpArgs {
    /// The Kuma control plane's dp-server (e.g. https://kuma-control-plane.kuma-system:5678).
    /// Routes then come from its ADS stream; --routes and --xds-file are not allowed.
    #[arg(long, value_name = "URL", env = "KUMA_CONTROL_PLANE_URL")]
    cp_address: Option<String>,
    /// CA certificate (PEM) that signed the control plane's certificate. Without it the
    /// system's roots are used.
    #[arg(long, value_name = "FILE", env = "KUMA_CONTROL_PLANE_CA_CERT_FILE")]
    ca_cert_file: Option<PathBuf>,
    /// The same CA as inline PEM.
    #[arg(
        long,
        value_name = "PEM",
        env = "KUMA_CONTROL_PLANE_CA_CERT",
        hide_env_values = true,
        conflicts_with = "ca_cert_file"
    )]
    ca_cert: Option<String>,
    /// Do not verify the control plane's certificate. Insecure: for tests only.
    #[arg(long)]
    skip_verify: bool,
    /// File holding the dataplane token: a zone token with scope `ingress` (universal) or the
    /// pod's ServiceAccount token (Kubernetes). Re-read at every reconnection.
    #[arg(long, value_name = "FILE", env = "KUMA_DATAPLANE_RUNTIME_TOKEN_PATH")]
    dataplane_token_file: Option<PathBuf>,
    /// The dataplane token itself (prefer --dataplane-token-file: a flag shows in `ps`).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "KUMA_DATAPLANE_RUNTIME_TOKEN",
        hide_env_values = true,
        conflicts_with = "dataplane_token_file"
    )]
    dataplane_token: Option<String>,
    /// The ZoneIngress name. Default: the resource's name, else $POD_NAME.$POD_NAMESPACE
    /// (Kubernetes). Not allowed together with --dataplane-file, which names it.
    #[arg(long, value_name = "NAME", env = "KUMA_DATAPLANE_NAME")]
    name: Option<String>,
    /// The proxy type; only `ingress` is implemented (a ZoneIngress).
    #[arg(long, value_name = "TYPE", env = "KUMA_DATAPLANE_PROXY_TYPE")]
    proxy_type: Option<String>,
    /// Port of kuma-dp's readiness reporter (127.0.0.1), announced to the control plane and
    /// served with /ready.
    #[arg(long, value_name = "PORT", default_value_t = crate::cp::DEFAULT_READINESS_PORT, env = "KUMA_READINESS_PORT")]
    readiness_port: u16,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// The ZoneIngress resource to validate.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// A standalone route table to validate.
    #[arg(long, value_name = "FILE")]
    routes: Option<PathBuf>,
    /// The agent's own configuration file to validate.
    #[arg(long, value_name = "FILE")]
    agent_config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RoutesArgs {
    /// The xDS resources to resolve (proto3 JSON mapping, as JSON or YAML: `resources: [...]`).
    #[arg(long, value_name = "FILE")]
    xds: PathBuf,
    /// Print `{"listener", "direct_response", "routes": [{"sni", "cluster", "endpoints"}]}`.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 5s, 500ms, 1m)"))
}

/// `4MiB`, `512KiB`, `1GiB`, `65536` (bytes).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 4MiB, 512KiB, 65536)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB or GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .filter(|v| *v >= 64 * 1024)
        .ok_or_else(|| format!("`{s}` must be at least 64KiB"))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check(args) => check(args),
        Command::Run(args) => run(*args),
        Command::Routes(args) => routes(args),
        Command::Maps(args) => crate::maps::main(args),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, and never with NO_COLOR (no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let zi = match crate::config::ZoneIngress::load(&args.config) {
        Ok(zi) => zi,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut summary = format!(
        "configuration valid: ZoneIngress {} listens on {}, admin port {}",
        zi.name,
        zi.listen_addr(),
        zi.networking.admin.port
    );
    if let Some(path) = &args.routes {
        match crate::config::RoutesFile::load(path) {
            Ok(r) => summary.push_str(&format!(", {} routes", r.routes.len())),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(path) = &args.agent_config {
        match crate::config::AgentConfig::load(path) {
            Ok(a) => summary.push_str(&format!(
                ", guard {}",
                if a.guard.enabled { "on" } else { "off" }
            )),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{summary}");
    ExitCode::SUCCESS
}

/// Checks the control-plane flags against each other and the route sources, and builds the
/// session options (`None` without --cp-address).
fn cp_options(args: &RunArgs) -> Result<Option<crate::cp::CpOptions>, String> {
    use crate::cp::{CpAddress, CpOptions, TokenSource, Trust};
    let cp = &args.cp;
    if let Some(t) = cp.proxy_type.as_deref()
        && t != "ingress"
    {
        return Err(format!(
            "--proxy-type {t:?}: zone-ingress only runs as a zone ingress; use --proxy-type ingress (sidecars and zone egresses need kuma-dp)"
        ));
    }
    let Some(address) = cp.cp_address.as_deref() else {
        let stray = [
            (cp.ca_cert_file.is_some(), "--ca-cert-file"),
            (cp.ca_cert.is_some(), "--ca-cert"),
            (cp.skip_verify, "--skip-verify"),
            (cp.dataplane_token_file.is_some(), "--dataplane-token-file"),
            (cp.dataplane_token.is_some(), "--dataplane-token"),
            (cp.name.is_some(), "--name"),
        ];
        if let Some((_, flag)) = stray.iter().find(|(set, _)| *set) {
            return Err(format!(
                "{flag} only applies to a control-plane session; give --cp-address (or KUMA_CONTROL_PLANE_URL) too, or drop it"
            ));
        }
        return Ok(None);
    };
    if args.routes.is_some() || args.xds_file.is_some() {
        return Err(
            "--cp-address conflicts with --routes/--xds-file: routes come from the control plane or from a file, not both"
                .into(),
        );
    }
    let address = CpAddress::parse(address).map_err(|e| e.to_string())?;
    let trust = if !address.tls {
        if cp.ca_cert_file.is_some() || cp.ca_cert.is_some() || cp.skip_verify {
            return Err(format!(
                "--cp-address {address} is plain http, so --ca-cert-file/--ca-cert/--skip-verify have nothing to verify; use https://"
            ));
        }
        None
    } else if cp.skip_verify {
        if cp.ca_cert_file.is_some() || cp.ca_cert.is_some() {
            return Err("--skip-verify conflicts with --ca-cert-file/--ca-cert".into());
        }
        Some(Trust::Insecure)
    } else if let Some(path) = &cp.ca_cert_file {
        Some(Trust::CaPem(
            crate::cp::tls::read_ca_file(path).map_err(|e| e.to_string())?,
        ))
    } else if let Some(pem) = &cp.ca_cert {
        Some(Trust::CaPem(pem.as_bytes().to_vec()))
    } else {
        Some(Trust::SystemRoots)
    };
    let token = match (&cp.dataplane_token_file, &cp.dataplane_token) {
        (Some(path), _) => TokenSource::File(path.clone()),
        (None, Some(t)) => TokenSource::Inline(t.clone()),
        (None, None) => TokenSource::None,
    };
    let resource = match &args.config {
        Some(path) => Some(crate::config::ZoneIngress::load(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let name = match (&resource, &cp.name) {
        (Some(zi), Some(n)) if *n != zi.name => {
            return Err(format!(
                "--name {n:?} conflicts with --dataplane-file, whose resource is named {:?}; drop --name (kuma-dp takes the name from the resource)",
                zi.name
            ));
        }
        (Some(zi), _) => zi.name.clone(),
        (None, Some(n)) => n.clone(),
        (None, None) => match (
            std::env::var("POD_NAME").ok().filter(|v| !v.is_empty()),
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|v| !v.is_empty()),
        ) {
            (Some(pod), Some(ns)) => format!("{pod}.{ns}"),
            _ => {
                return Err(
                    "the ZoneIngress has no name: give --dataplane-file (universal), --name, or POD_NAME and POD_NAMESPACE (Kubernetes)"
                        .into(),
                );
            }
        },
    };
    if name.is_empty() || name.starts_with('.') {
        return Err(format!("--name {name:?} is not a valid ZoneIngress name"));
    }
    Ok(Some(CpOptions {
        address,
        trust,
        token,
        name,
        dataplane_resource: resource.as_ref().map(|zi| zi.to_json().to_string()),
        admin_port: resource
            .as_ref()
            .map(|zi| zi.networking.admin.port)
            .unwrap_or(crate::config::DEFAULT_ADMIN_PORT),
        readiness_port: cp.readiness_port,
        bootstrap_retry_for: crate::cp::bootstrap::RETRY_FOR,
        response_timeout: match std::env::var(crate::cp::RESPONSE_TIMEOUT_ENV) {
            Err(_) => crate::cp::RESPONSE_TIMEOUT,
            Ok(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0 && *s <= 3600.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| {
                    format!(
                        "{}={v:?} is not a number of seconds in (0, 3600]",
                        crate::cp::RESPONSE_TIMEOUT_ENV
                    )
                })?,
        },
    }))
}

fn run(args: RunArgs) -> ExitCode {
    if args.detach {
        return crate::handoff::detach::launch(std::env::args_os().skip(1).collect());
    }
    let cp = match cp_options(&args) {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("zone-ingress: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = RunOptions {
        cp,
        config: args.config,
        routes: args.routes,
        xds_file: args.xds_file,
        datapath: args.datapath,
        client_hello_timeout: args.client_hello_timeout,
        connect_timeout: args.connect_timeout,
        drain_time: args.drain_time,
        handoff_socket: args
            .handoff_socket
            .unwrap_or_else(|| crate::handoff::socket_path(&args.pin_dir)),
        upgrade: args.upgrade,
        pin_dir: args.pin_dir,
        splice_budget: args.splice_budget,
        local_redirect: args.local_redirect,
        access_log: args
            .access_log
            .as_deref()
            .map(crate::accesslog::Sink::parse),
        access_log_format: args.access_log_format,
        agent_config: args.agent_config,
        guard: args.guard,
        keep_capabilities: args.keep_capabilities,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zone-ingress: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zone-ingress: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn routes(args: RoutesArgs) -> ExitCode {
    let resolved = crate::xds::load_file(&args.xds)
        .map_err(|e| e.to_string())
        .and_then(|r| {
            crate::xds::route_table(&r).map_err(|e| format!("{}: {e}", args.xds.display()))
        });
    let routes = match resolved {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!("{}", routes.to_json());
    } else {
        print!("{}", routes_table_text(&routes));
    }
    ExitCode::SUCCESS
}

/// The human form of `zone-ingress routes`: a header, then one aligned row per SNI.
fn routes_table_text(r: &crate::xds::XdsRoutes) -> String {
    let mut out = format!("listener {} ({})\n", r.listener, r.listener_name);
    match &r.direct_response {
        Some(b) => out.push_str(&format!(
            "unknown SNI: answered with {:?}, then closed\n",
            String::from_utf8_lossy(b)
        )),
        None => out.push_str("unknown SNI: closed without a byte\n"),
    }
    let rows: Vec<[String; 3]> = r
        .routes
        .iter()
        .map(|route| {
            let eps = if route.endpoints.is_empty() {
                "(none: connections are reset)".to_owned()
            } else {
                route
                    .endpoints
                    .iter()
                    .map(|e| e.address.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            [route.sni.clone(), route.cluster.clone(), eps]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("no routes\n");
        return out;
    }
    let header = [
        "SNI".to_owned(),
        "CLUSTER".to_owned(),
        "ENDPOINTS".to_owned(),
    ];
    let w0 = rows
        .iter()
        .chain([&header])
        .map(|r| r[0].chars().count())
        .max()
        .unwrap_or(0);
    let w1 = rows
        .iter()
        .chain([&header])
        .map(|r| r[1].chars().count())
        .max()
        .unwrap_or(0);
    for row in std::iter::once(&header).chain(&rows) {
        out.push_str(&format!("{:<w0$}  {:<w1$}  {}\n", row[0], row[1], row[2]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cp::{TokenSource, Trust};

    fn cp(argv: &[&str]) -> Result<Option<crate::cp::CpOptions>, String> {
        let argv = ["zone-ingress", "run"]
            .into_iter()
            .chain(argv.iter().copied());
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Run(args) => cp_options(&args),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn err(argv: &[&str]) -> String {
        match cp(argv) {
            // One line, single-spaced: what the operator reads.
            Err(e) if e.lines().count() <= 1 && !e.contains("  ") => e,
            Err(e) => panic!("badly formatted error for {argv:?}: {e:?}"),
            Ok(o) => panic!("{argv:?} was accepted: {o:?}"),
        }
    }

    #[test]
    fn conflicting_or_stray_control_plane_flags_are_refused_with_the_reason() {
        let e = err(&[
            "--cp-address",
            "https://cp:5678",
            "--routes",
            "r.yaml",
            "--name",
            "a",
        ]);
        assert!(e.contains("conflicts with --routes/--xds-file"), "{e}");
        let e = err(&["--proxy-type", "sidecar"]);
        assert!(e.contains("only runs as a zone ingress"), "{e}");
        let e = err(&["--name", "zi"]);
        assert!(
            e.contains("--name only applies to a control-plane session"),
            "{e}"
        );
        let e = err(&["--dataplane-token-file", "/t"]);
        assert!(e.contains("--dataplane-token-file only applies"), "{e}");
        let e = err(&[
            "--cp-address",
            "http://cp:5678",
            "--ca-cert-file",
            "/ca",
            "--name",
            "a",
        ]);
        assert!(e.contains("plain http"), "{e}");
        let e = err(&["--cp-address", "ftp://cp:5678", "--name", "a"]);
        assert!(e.contains("scheme must be https or http"), "{e}");
        let e = err(&["--cp-address", "https://cp:5678/x", "--name", "a"]);
        assert!(e.contains("no path"), "{e}");
        let e = err(&[
            "--cp-address",
            "https://cp:5678",
            "--skip-verify",
            "--ca-cert",
            "PEM",
            "--name",
            "a",
        ]);
        assert!(e.contains("--skip-verify conflicts"), "{e}");
        // Both token forms at once: clap says which two.
        let e = cp(&[
            "--cp-address",
            "https://cp",
            "--dataplane-token",
            "t",
            "--dataplane-token-file",
            "/t",
        ])
        .expect_err("two token sources");
        assert!(e.contains("--dataplane-token"), "{e}");
    }

    #[test]
    fn name_comes_from_the_resource_and_may_not_contradict_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("zi.yaml");
        std::fs::write(
            &file,
            "type: ZoneIngress\nname: zi-1\nnetworking: {address: 10.0.0.1, port: 10001}\n",
        )
        .expect("write");
        let f = file.to_str().expect("utf-8 path");
        let o = cp(&["--cp-address", "https://cp:5678", "--dataplane-file", f])
            .expect("valid")
            .expect("a session");
        assert_eq!(o.name, "zi-1");
        let resource: serde_json::Value =
            serde_json::from_str(o.dataplane_resource.as_deref().expect("resource")).expect("JSON");
        assert_eq!(resource["type"], "ZoneIngress");
        let e = err(&[
            "--cp-address",
            "https://cp:5678",
            "--config",
            f,
            "--name",
            "other",
        ]);
        assert!(
            e.contains("--name \"other\" conflicts with --dataplane-file"),
            "{e}"
        );
    }

    #[test]
    fn a_valid_session_is_built_from_flags() {
        let o = cp(&[
            "--cp-address",
            "https://[fd00::1]:5678",
            "--name",
            "zi.ns",
            "--dataplane-token",
            " tok \n",
            "--skip-verify",
        ])
        .expect("valid")
        .expect("a session");
        assert_eq!(o.address.host, "fd00::1");
        assert_eq!(o.address.port, 5678);
        assert_eq!(o.address.authority(), "[fd00::1]:5678");
        assert!(matches!(o.trust, Some(Trust::Insecure)));
        assert!(matches!(&o.token, TokenSource::Inline(_)));
        assert_eq!(o.token.read().expect("token").as_deref(), Some("tok"));
        // The token is never in a Debug print.
        assert!(!format!("{o:?}").contains("tok\""), "{o:?}");
        assert_eq!(o.admin_port, crate::config::DEFAULT_ADMIN_PORT);
        assert_eq!(o.readiness_port, crate::cp::DEFAULT_READINESS_PORT);
        let o = cp(&["--cp-address", "http://cp", "--name", "a"])
            .expect("valid")
            .expect("session");
        assert!(o.trust.is_none());
        assert_eq!(o.address.port, 80);
        assert!(cp(&[]).expect("no CP flags is fine").is_none());
    }
}
