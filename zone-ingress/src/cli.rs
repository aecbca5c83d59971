//! Command line: `zone-ingress run` and `zone-ingress check`.

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
    Run(RunArgs),
    /// Validate configuration files and exit (0 when valid, 1 with the problems otherwise).
    Check(CheckArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The ZoneIngress resource (Kuma universal YAML). Without it (and without --routes) the
    /// embedded default configuration from config/ is used.
    #[arg(long, short = 'c', value_name = "FILE", env = "ZONE_INGRESS_CONFIG")]
    config: Option<PathBuf>,
    /// Standalone route table (YAML: `routes: [{sni, endpoints}]`), reloaded on SIGHUP and on change.
    #[arg(long, value_name = "FILE", env = "ZONE_INGRESS_ROUTES")]
    routes: Option<PathBuf>,
    /// How flows move bytes: `auto` splices in the kernel where it can, `sockmap` requires it,
    /// `userspace` never loads BPF.
    #[arg(long, value_enum, default_value_t = DatapathMode::Auto, env = "ZONE_INGRESS_DATAPATH")]
    datapath: DatapathMode,
    /// How long a client has to send its whole ClientHello (e.g. `5s`, `500ms`).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    client_hello_timeout: Duration,
    /// Timeout of one connection attempt to an endpoint; the next endpoint is tried after it.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// On SIGTERM/SIGINT, how long live flows may take to finish before the agent exits.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, env = "KUMA_DATAPLANE_DRAIN_TIME")]
    drain_time: Duration,
    /// Bytes one direction of a spliced flow may park in the kernel's redirect queue before the
    /// sender is slowed through TCP (e.g. `4MiB`, `512KiB`).
    #[arg(long, value_name = "BYTES", default_value = "4MiB", value_parser = parse_size)]
    splice_budget: u64,
    /// Directory on bpffs where the BPF maps are pinned.
    #[arg(long, value_name = "DIR", default_value = zone_ingress_common::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// The ZoneIngress resource to validate.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// A standalone route table to validate.
    #[arg(long, value_name = "FILE")]
    routes: Option<PathBuf>,
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
        Command::Run(args) => run(args),
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
    println!("{summary}");
    ExitCode::SUCCESS
}

fn run(args: RunArgs) -> ExitCode {
    let opts = RunOptions {
        config: args.config,
        routes: args.routes,
        datapath: args.datapath,
        client_hello_timeout: args.client_hello_timeout,
        connect_timeout: args.connect_timeout,
        drain_time: args.drain_time,
        pin_dir: args.pin_dir,
        splice_budget: args.splice_budget,
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
