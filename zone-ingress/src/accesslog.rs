//! The access log: one line per finished connection, routed or rejected.
//!
//! Flow tasks never write: they hand an [`Entry`] to a bounded channel with `try_send` and move
//! on. A single writer task formats and writes the lines, so a slow disk or a blocked stdout pipe
//! costs log lines (counted in `zone_ingress_access_log_dropped_lines_total`), never latency on
//! the data path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::stats::Stats;

/// Lines that may wait for the writer; beyond that they are dropped (and counted).
pub const QUEUE_LINES: usize = 8192;

/// `--access-log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `key=value` pairs, one line per connection.
    Plain,
    /// One JSON object per line, with the stable keys of [`Entry`].
    Json,
}

/// Where the lines go (`--access-log PATH|-`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    /// `-` is stdout, anything else a file path (appended to).
    pub fn parse(s: &str) -> Sink {
        if s == "-" {
            Sink::Stdout
        } else {
            Sink::File(PathBuf::from(s))
        }
    }
}

/// How a connection ended, in the log's `end` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// Both directions finished with a FIN.
    Closed,
    /// One side reset or failed; the other was reset too.
    Reset,
    /// Closed before routing (`reason` says why).
    Rejected,
    /// Routed, but no endpoint could be reached: the client was reset.
    UpstreamUnavailable,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Reset => "reset",
            End::Rejected => "rejected",
            End::UpstreamUnavailable => "upstream_unavailable",
        }
    }
}

/// One access log line. The JSON keys are the field names and are part of the interface.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// When the connection was accepted (RFC 3339, UTC, milliseconds).
    #[serde(serialize_with = "rfc3339")]
    pub start_time: SystemTime,
    pub peer: SocketAddr,
    /// The ClientHello's SNI (lossy UTF-8), when one was read.
    pub sni: Option<String>,
    #[serde(serialize_with = "opt_str")]
    pub cluster: Option<Arc<str>>,
    /// The endpoint the flow was connected to.
    pub upstream: Option<SocketAddr>,
    /// `userspace` or `sockmap`, for routed flows.
    pub datapath: Option<&'static str>,
    /// Bytes client -> endpoint (the ClientHello included).
    pub bytes_up: u64,
    /// Bytes endpoint -> client.
    pub bytes_down: u64,
    #[serde(serialize_with = "millis")]
    pub duration_ms: Duration,
    pub end: End,
    /// Why a connection was rejected (the `zone_ingress_client_hello_rejected_total` reasons).
    pub reason: Option<&'static str>,
}

impl Entry {
    /// An entry for a connection accepted at `start_time` from `peer`, nothing known yet.
    pub fn new(start_time: SystemTime, peer: SocketAddr, end: End) -> Entry {
        Entry {
            start_time,
            peer,
            sni: None,
            cluster: None,
            upstream: None,
            datapath: None,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: Duration::ZERO,
            end,
            reason: None,
        }
    }

    /// The line, without its newline.
    pub fn format(&self, format: Format) -> String {
        match format {
            Format::Json => {
                // Serializing plain strings and numbers into a String cannot fail; an empty
                // object keeps the line count honest if it ever did.
                serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
            }
            Format::Plain => {
                let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
                format!(
                    "{} peer={} sni={} cluster={} upstream={} datapath={} bytes_up={} bytes_down={} duration_ms={} end={} reason={}",
                    humantime::format_rfc3339_millis(self.start_time),
                    self.peer,
                    // Debug quoting escapes spaces and control bytes a client put in its SNI.
                    opt(self.sni.as_ref().map(|s| format!("{s:?}"))),
                    opt(self.cluster.as_ref().map(|c| c.to_string())),
                    opt(self.upstream.map(|u| u.to_string())),
                    self.datapath.unwrap_or("-"),
                    self.bytes_up,
                    self.bytes_down,
                    self.duration_ms.as_millis(),
                    self.end.as_str(),
                    self.reason.unwrap_or("-"),
                )
            }
        }
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn opt_str<S: serde::Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(v),
        None => s.serialize_none(),
    }
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The flow tasks' handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<Entry>>,
    stats: Arc<Stats>,
}

impl AccessLog {
    /// No access log (the default): `log` does nothing.
    pub fn disabled(stats: Arc<Stats>) -> AccessLog {
        AccessLog { tx: None, stats }
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a line; drops it (and counts it) when the writer is behind.
    pub fn log(&self, entry: Entry) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(entry).is_err() {
            self.stats.access_log_dropped();
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open the access log {path}: {source}")]
pub struct OpenError {
    path: PathBuf,
    source: std::io::Error,
}

/// The writer task; [`Writer::finish`] writes what is queued and flushes.
pub struct Writer {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Writer {
    /// Asks the writer to write the lines already queued, flush and stop; waits at most `limit`.
    pub async fn finish(self, limit: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(limit, self.task).await.is_err() {
            tracing::warn!("access log: writer did not finish in {limit:?}; lines may be lost");
        }
    }
}

/// Opens the sink and starts the writer task.
pub async fn start(
    sink: &Sink,
    format: Format,
    stats: Arc<Stats>,
) -> Result<(AccessLog, Writer), OpenError> {
    let out: Box<dyn AsyncWrite + Send + Unpin> = match sink {
        Sink::Stdout => Box::new(tokio::io::stdout()),
        Sink::File(path) => Box::new(
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .map_err(|source| OpenError {
                    path: path.clone(),
                    source,
                })?,
        ),
    };
    let (tx, rx) = mpsc::channel(QUEUE_LINES);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(write_lines(rx, stop_rx, out, format));
    Ok((
        AccessLog {
            tx: Some(tx),
            stats,
        },
        Writer { stop, task },
    ))
}

async fn write_lines(
    mut rx: mpsc::Receiver<Entry>,
    mut stop: watch::Receiver<bool>,
    out: Box<dyn AsyncWrite + Send + Unpin>,
    format: Format,
) {
    let mut out = tokio::io::BufWriter::new(out);
    let mut failed = false;
    loop {
        let entry = tokio::select! {
            e = rx.recv() => e,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(entry) = entry else { break };
        write_one(&mut out, &entry, format, &mut failed).await;
        // Batch what is already queued, then flush once: lines reach the file promptly without a
        // syscall per line under load.
        while let Ok(entry) = rx.try_recv() {
            write_one(&mut out, &entry, format, &mut failed).await;
        }
        flush(&mut out, &mut failed).await;
    }
    // Stopping: what flows queued before the stop still gets written.
    while let Ok(entry) = rx.try_recv() {
        write_one(&mut out, &entry, format, &mut failed).await;
    }
    flush(&mut out, &mut failed).await;
}

async fn write_one<W: AsyncWrite + Unpin>(
    out: &mut W,
    entry: &Entry,
    format: Format,
    failed: &mut bool,
) {
    let mut line = entry.format(format);
    line.push('\n');
    if let Err(e) = out.write_all(line.as_bytes()).await {
        report_once(failed, &e);
    }
}

async fn flush<W: AsyncWrite + Unpin>(out: &mut W, failed: &mut bool) {
    if let Err(e) = out.flush().await {
        report_once(failed, &e);
    }
}

/// A full disk would otherwise log one warning per line.
fn report_once(failed: &mut bool, e: &std::io::Error) {
    if !*failed {
        tracing::warn!(error = %e, "access log: write failed (further failures are not reported)");
        *failed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut e = Entry::new(
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            "10.0.0.1:40000".parse().unwrap(),
            End::Closed,
        );
        e.sni = Some("backend{mesh=default}".into());
        e.cluster = Some("default:backend".into());
        e.upstream = Some("10.0.1.2:8443".parse().unwrap());
        e.datapath = Some("userspace");
        e.bytes_up = 517;
        e.bytes_down = 42;
        e.duration_ms = Duration::from_millis(1500);
        e
    }

    #[test]
    fn json_has_stable_keys() {
        let v: serde_json::Value = serde_json::from_str(&entry().format(Format::Json)).unwrap();
        assert_eq!(v["start_time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["peer"], "10.0.0.1:40000");
        assert_eq!(v["sni"], "backend{mesh=default}");
        assert_eq!(v["cluster"], "default:backend");
        assert_eq!(v["upstream"], "10.0.1.2:8443");
        assert_eq!(v["datapath"], "userspace");
        assert_eq!(v["bytes_up"], 517);
        assert_eq!(v["bytes_down"], 42);
        assert_eq!(v["duration_ms"], 1500);
        assert_eq!(v["end"], "closed");
        assert!(v["reason"].is_null());
    }

    #[test]
    fn plain_quotes_sni_and_marks_absent_fields() {
        let mut e = Entry::new(
            SystemTime::UNIX_EPOCH,
            "10.0.0.1:1".parse().unwrap(),
            End::Rejected,
        );
        e.sni = Some("a b".into());
        e.reason = Some("unknown_sni");
        let line = e.format(Format::Plain);
        assert!(line.contains("sni=\"a b\" cluster=- upstream=-"), "{line}");
        assert!(line.ends_with("end=rejected reason=unknown_sni"), "{line}");
    }

    #[test]
    fn dash_is_stdout() {
        assert_eq!(Sink::parse("-"), Sink::Stdout);
        assert_eq!(
            Sink::parse("/var/log/zi.log"),
            Sink::File(PathBuf::from("/var/log/zi.log"))
        );
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts() {
        let stats = Arc::new(Stats::new());
        let (tx, _rx) = mpsc::channel(1);
        let log = AccessLog {
            tx: Some(tx),
            stats: stats.clone(),
        };
        log.log(entry());
        log.log(entry());
        assert!(
            stats
                .encode()
                .contains("zone_ingress_access_log_dropped_lines_total 1")
        );
    }
}
