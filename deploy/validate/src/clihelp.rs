//! What `zone-ingress run --help` says the agent accepts: its long flags, the environment
//! variable bound to each, and the possible values of enumerated flags.
//!
//! The deployment files pass flags and `KUMA_*` variables to the agent; checking them against the
//! real binary's help (clap's own rendering of its definitions) keeps them from drifting apart.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum HelpError {
    #[error("running `{bin} run --help`: {source}")]
    Spawn { bin: String, source: std::io::Error },
    #[error("`{bin} run --help` exited with {status}: {stderr}")]
    Failed {
        bin: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("`run --help` lists no option at all; is this the zone-ingress binary?")]
    NoOptions,
}

/// One option of `zone-ingress run`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Opt {
    /// Environment variable clap reads for it (`[env: NAME=...]`).
    pub env: Option<String>,
    /// `[possible values: a, b, c]`, empty when the value is free-form.
    pub possible_values: Vec<String>,
    /// Whether it takes a value (`--flag <VALUE>`).
    pub takes_value: bool,
}

/// The options of `zone-ingress run`, keyed by long flag (`--drain-time`).
#[derive(Debug, Clone, Default)]
pub struct RunHelp {
    pub options: BTreeMap<String, Opt>,
}

impl RunHelp {
    /// Runs `<bin> run --help` and parses it.
    pub fn from_binary(bin: &Path) -> Result<RunHelp, HelpError> {
        let name = bin.display().to_string();
        let out = Command::new(bin)
            .args(["run", "--help"])
            // A fixed width: clap wraps long help to the terminal (or this) width.
            .env("COLUMNS", "200")
            .env("NO_COLOR", "1")
            .output()
            .map_err(|source| HelpError::Spawn {
                bin: name.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(HelpError::Failed {
                bin: name,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let help = Self::parse(&String::from_utf8_lossy(&out.stdout));
        if help.options.is_empty() {
            return Err(HelpError::NoOptions);
        }
        Ok(help)
    }

    /// Parses clap's long help: an option starts on a line whose first non-blank text is
    /// `--flag` or `-c, --flag`; the `[env: ...]` and `[possible values: ...]` lines that follow
    /// belong to it until the next option line.
    pub fn parse(text: &str) -> RunHelp {
        let mut options = BTreeMap::new();
        let mut current: Option<(String, Opt)> = None;
        for line in text.lines() {
            let t = line.trim_start();
            // `-c, --config <FILE>` -> `--config <FILE>`
            let flag_part = match (t.get(..1), t.get(1..2), t.get(2..4)) {
                (Some("-"), Some(s), Some(", ")) if s != "-" => &t[4..],
                _ => t,
            };
            if let Some(rest) = flag_part.strip_prefix("--")
                && line.starts_with(' ')
                && rest.starts_with(|c: char| c.is_ascii_lowercase())
            {
                if let Some((flag, opt)) = current.take() {
                    options.insert(flag, opt);
                }
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                let after = &rest[name.len()..];
                let opt = Opt {
                    takes_value: after.trim_start().starts_with('<')
                        || after.starts_with('=')
                        || after.starts_with(" <"),
                    ..Opt::default()
                };
                current = Some((format!("--{name}"), opt));
                // Short help puts [env: ...] on the same line.
                if let Some((_, opt)) = current.as_mut() {
                    read_brackets(after, opt);
                }
                continue;
            }
            if let Some((_, opt)) = current.as_mut() {
                read_brackets(t, opt);
                // Long help lists documented values one per line: `- auto: what it does`.
                if let Some(item) = t.strip_prefix("- ")
                    && let Some((value, _)) = item.split_once(':')
                    && !value.contains(' ')
                {
                    opt.possible_values.push(value.to_owned());
                }
            }
        }
        if let Some((flag, opt)) = current.take() {
            options.insert(flag, opt);
        }
        RunHelp { options }
    }

    /// Every environment variable some option reads.
    pub fn env_vars(&self) -> impl Iterator<Item = &str> {
        self.options.values().filter_map(|o| o.env.as_deref())
    }

    /// The option that reads `env`, if any.
    pub fn flag_for_env(&self, env: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(_, o)| o.env.as_deref() == Some(env))
            .map(|(f, _)| f.as_str())
    }
}

fn read_brackets(text: &str, opt: &mut Opt) {
    if let Some(start) = text.find("[env: ") {
        let rest = &text[start + "[env: ".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            opt.env = Some(name);
        }
    }
    if let Some(start) = text.find("[possible values: ") {
        let rest = &text[start + "[possible values: ".len()..];
        let list = rest.split(']').next().unwrap_or_default();
        opt.possible_values = list.split(',').map(|v| v.trim().to_owned()).collect();
    }
}

/// Splits an argument list into (flag, value) pairs: `--a=b`, `--a b` (when `--a` takes a
/// value), `--switch`; anything else (a subcommand, a stray word) comes back as a flagless item.
pub fn flag_pairs(help: &RunHelp, args: &[String]) -> Vec<(Option<String>, Option<String>)> {
    let mut out = Vec::new();
    let mut it = args.iter().peekable();
    while let Some(arg) = it.next() {
        if let Some(rest) = arg.strip_prefix("--") {
            if let Some((flag, value)) = rest.split_once('=') {
                out.push((Some(format!("--{flag}")), Some(value.to_owned())));
            } else {
                let flag = format!("--{rest}");
                let takes = help.options.get(&flag).is_some_and(|o| o.takes_value);
                let value = if takes { it.next().cloned() } else { None };
                out.push((Some(flag), value));
            }
        } else {
            out.push((None, Some(arg.clone())));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
Run the ingress

Usage: zone-ingress run [OPTIONS]

Options:
  -c, --config <FILE>
          The ZoneIngress resource

          [env: ZONE_INGRESS_CONFIG=]

      --datapath <DATAPATH>
          How flows move bytes

          [env: ZONE_INGRESS_DATAPATH=]
          [default: auto]
          [possible values: auto, sockmap, userspace]

      --drain-time <DURATION>
          On SIGTERM

          [env: KUMA_DATAPLANE_DRAIN_TIME=]
          [default: 30s]

      --log-format <LOG_FORMAT>
          Log format

          Possible values:
          - plain: Text
          - json:  One object per line

  -h, --help
          Print help (see a summary with '-h')
";

    #[test]
    fn parses_flags_env_and_values() {
        let h = RunHelp::parse(SAMPLE);
        assert_eq!(
            h.options.keys().collect::<Vec<_>>(),
            [
                "--config",
                "--datapath",
                "--drain-time",
                "--help",
                "--log-format"
            ]
        );
        assert_eq!(
            h.options["--config"].env.as_deref(),
            Some("ZONE_INGRESS_CONFIG")
        );
        assert_eq!(
            h.options["--datapath"].possible_values,
            ["auto", "sockmap", "userspace"]
        );
        assert!(h.options["--drain-time"].takes_value);
        assert!(!h.options["--help"].takes_value);
        assert_eq!(h.options["--log-format"].env, None);
        assert_eq!(h.options["--log-format"].possible_values, ["plain", "json"]);
        assert_eq!(
            h.flag_for_env("KUMA_DATAPLANE_DRAIN_TIME"),
            Some("--drain-time")
        );
        let args: Vec<String> = ["run", "--datapath=auto", "--config", "/x.yaml", "--help"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            flag_pairs(&h, &args),
            vec![
                (None, Some("run".into())),
                (Some("--datapath".into()), Some("auto".into())),
                (Some("--config".into()), Some("/x.yaml".into())),
                (Some("--help".into()), None),
            ]
        );
    }
}
