//! Parsing the /proc files the bench and the soak read memory from (`/proc/net/sockstat`,
//! `/proc/meminfo`, `/proc/<pid>/status`). Shared by both binaries.

/// The value after `key` on the line starting with `line_prefix` (`TCP: inuse 7 ... mem 42`).
pub fn sockstat_field(text: &str, line_prefix: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(line_prefix))?;
    let mut words = line[line_prefix.len()..].split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// A `Key:   123 kB` line of /proc/meminfo or /proc/<pid>/status, in KiB.
pub fn kib_line(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockstat_meminfo_and_status() {
        let s =
            "sockets: used 120\nTCP: inuse 7 orphan 0 tw 3 alloc 9 mem 42\nUDP: inuse 0 mem 0\n";
        assert_eq!(sockstat_field(s, "TCP:", "inuse"), Some(7));
        assert_eq!(sockstat_field(s, "TCP:", "mem"), Some(42));
        assert_eq!(sockstat_field(s, "TCP:", "missing"), None);
        let m = "Slab:             123 kB\nSUnreclaim:        45 kB\n";
        assert_eq!(kib_line(m, "SUnreclaim:"), Some(45));
        let st = "Name:\tzone-ingress\nVmRSS:\t   20480 kB\n";
        assert_eq!(kib_line(st, "VmRSS:"), Some(20480));
    }
}
