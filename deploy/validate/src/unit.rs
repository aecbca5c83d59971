//! A systemd unit file reader: sections of `Key=Value` entries, keys repeatable, continuation
//! lines joined. Enough to check the settings a unit file carries; `systemd-analyze verify` does
//! the full check where it is installed.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("line {line}: `{text}` is neither a [Section], a Key=Value nor a comment")]
    Syntax { line: usize, text: String },
    #[error("line {line}: an entry before the first [Section]")]
    NoSection { line: usize },
}

/// section -> key -> values, in file order.
#[derive(Debug, Default, Clone)]
pub struct Unit {
    pub sections: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

impl Unit {
    pub fn parse(text: &str) -> Result<Unit, UnitError> {
        let mut unit = Unit::default();
        let mut section: Option<String> = None;
        let mut pending: Option<(usize, String)> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if pending.is_none() && (line.is_empty() || line.starts_with(['#', ';'])) {
                continue;
            }
            let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
            if let Some(body) = line.strip_suffix('\\') {
                acc.push_str(body.trim_end());
                acc.push(' ');
                pending = Some((start, acc));
                continue;
            }
            acc.push_str(line);
            if let Some(name) = acc.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                section = Some(name.to_owned());
                unit.sections.entry(name.to_owned()).or_default();
                continue;
            }
            let Some((key, value)) = acc.split_once('=') else {
                return Err(UnitError::Syntax {
                    line: start,
                    text: acc,
                });
            };
            let Some(section) = &section else {
                return Err(UnitError::NoSection { line: start });
            };
            unit.sections
                .entry(section.clone())
                .or_default()
                .entry(key.trim().to_owned())
                .or_default()
                .push(value.trim().to_owned());
        }
        Ok(unit)
    }

    /// All values of `key` in `section` (empty when absent).
    pub fn values(&self, section: &str, key: &str) -> &[String] {
        self.sections
            .get(section)
            .and_then(|s| s.get(key))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The last value of `key` in `section` (systemd's rule for single-valued keys).
    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.values(section, key).last().map(String::as_str)
    }
}

/// `KEY=value` lines of an EnvironmentFile (comments and blank lines skipped).
pub fn env_file_keys(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_repeats_and_continuations() {
        let u = Unit::parse(
            "# c\n[Unit]\nDescription=x\n\n[Service]\nExecStart=/bin/a \\\n  --b c\nCapabilityBoundingSet=CAP_BPF\nCapabilityBoundingSet=CAP_NET_ADMIN\n",
        )
        .unwrap();
        assert_eq!(u.get("Unit", "Description"), Some("x"));
        assert_eq!(u.get("Service", "ExecStart"), Some("/bin/a --b c"));
        assert_eq!(
            u.values("Service", "CapabilityBoundingSet"),
            ["CAP_BPF", "CAP_NET_ADMIN"]
        );
        assert!(Unit::parse("Key=1\n").is_err());
        assert!(Unit::parse("[S]\nnot an entry\n").is_err());
        assert_eq!(
            env_file_keys("# x\nA=1\n\nB = two\n"),
            [("A".into(), "1".into()), ("B".into(), "two".into())]
        );
    }
}
