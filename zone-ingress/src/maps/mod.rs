//! `zone-ingress maps dump routes|flows|stats`: the agent's pinned BPF maps, read directly from
//! the pin directory (while the agent runs, after it crashed, or with no agent at all), as an
//! aligned table or JSON.
//!
//! One file per job: [`pinned`] opens maps and checks their layouts, [`table`] prints, and each
//! dump has its reader ([`routes`], [`flows`], [`stats`]). A new dump (e.g. the XDP guard's
//! counters) is a variant of [`DumpWhat`], a file with `pub fn dump(&PinDir) -> Result<Dump, _>`,
//! and one arm in [`dump`].

mod error;
pub mod flows;
pub mod pinned;
pub mod routes;
pub mod stats;
pub mod table;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};

pub use error::MapsError;
use pinned::PinDir;

/// `zone-ingress maps ...`
#[derive(Args, Debug)]
pub struct MapsArgs {
    #[command(subcommand)]
    command: MapsCommand,
}

#[derive(Subcommand, Debug)]
enum MapsCommand {
    /// Print one of the pinned maps (needs root to read BPF maps).
    Dump(DumpArgs),
}

#[derive(Args, Debug)]
struct DumpArgs {
    /// Which map: `routes` (route id -> SNI, cluster, flows and bytes), `flows` (live flows:
    /// addresses, SNI, bytes, age, datapath) or `stats` (the BPF program's counters).
    #[arg(value_enum)]
    what: DumpWhat,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The agent's pin directory (its `--pin-dir`).
    #[arg(long, value_name = "DIR", default_value = zone_ingress_common::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

/// What `maps dump` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DumpWhat {
    Routes,
    Flows,
    Stats,
    /// The XDP guard: configuration, allow-list, counters, tracked and limited sources.
    Guard,
}

/// One dump, in both forms.
#[derive(Debug)]
pub struct Dump {
    pub json: serde_json::Value,
    pub text: String,
}

/// Reads `what` from the maps pinned under `pin_dir`.
pub fn dump(what: DumpWhat, pin_dir: &Path) -> Result<Dump, MapsError> {
    match what {
        DumpWhat::Routes => routes::dump(&PinDir::open(pin_dir)?),
        DumpWhat::Flows => flows::dump(&PinDir::open(pin_dir)?),
        DumpWhat::Stats => stats::dump(&PinDir::open(pin_dir)?),
        DumpWhat::Guard => guard_dump(pin_dir),
    }
}

/// The guard's maps have their own reader and layout checks (guard/dump.rs).
fn guard_dump(pin_dir: &Path) -> Result<Dump, MapsError> {
    let d = crate::guard::dump::read(pin_dir).map_err(|e| MapsError::Read {
        name: "ZI_GUARD_*",
        detail: e.to_string(),
    })?;
    Ok(Dump {
        json: serde_json::to_value(&d).map_err(|e| MapsError::Read {
            name: "ZI_GUARD_*",
            detail: format!("cannot encode as JSON: {e}"),
        })?,
        text: d.to_text(),
    })
}

/// `zone-ingress maps ...`: prints the dump, or the error and exit status 1.
pub fn main(args: MapsArgs) -> ExitCode {
    let MapsCommand::Dump(args) = args.command;
    match dump(args.what, &args.pin_dir) {
        Ok(d) => {
            if args.json {
                println!("{:#}", d.json);
            } else {
                print!("{}", d.text);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("zone-ingress: error: {e}");
            ExitCode::FAILURE
        }
    }
}
