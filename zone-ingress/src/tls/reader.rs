//! Reads a whole ClientHello off a socket, under one deadline and with a bounded buffer.
//!
//! It *reads* rather than peeks: bytes still queued on a socket when it is inserted into the
//! sockmap are never spliced, so a peeked hello would sit there while the client waits for a
//! ServerHello (DESIGN.md §3.1). Everything read is returned in [`ReadHello::consumed`] for the
//! caller to replay upstream verbatim.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use super::client_hello::{self, ClientHello, MAX_CLIENT_HELLO_LEN, ParseError, Step};

/// First buffer allocation: a typical hello (even with post-quantum key shares) fits, and an
/// idle or hostile connection does not cost the full limit up front.
const INITIAL_BUFFER: usize = 2048;

/// How long and how much we are willing to wait for a ClientHello.
#[derive(Debug, Clone)]
pub struct HelloLimits {
    /// One deadline for the whole ClientHello, not per read, so a peer trickling bytes (slowloris)
    /// cannot hold a connection open indefinitely.
    pub timeout: Duration,
    /// The receive buffer never grows past this many bytes.
    pub max_bytes: usize,
}

impl Default for HelloLimits {
    fn default() -> Self {
        HelloLimits {
            timeout: Duration::from_secs(5),
            // The largest accepted hello plus its handshake header, plus room for the 5-byte
            // record headers of a heavily fragmented hello and a few bytes the client may send
            // right behind it.
            max_bytes: MAX_CLIENT_HELLO_LEN + 4096,
        }
    }
}

/// A complete ClientHello with a non-empty SNI, and the bytes to replay upstream.
#[derive(Debug, Clone)]
pub struct ReadHello {
    pub hello: ClientHello,
    /// The SNI to route on (same bytes as `hello.sni`), never empty.
    pub sni: Vec<u8>,
    /// Every byte read from the socket, in order; may extend past the hello's records.
    pub consumed: Vec<u8>,
}

/// Why no routable ClientHello was read. See [`HelloError::reason`] for metric labels.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The peer does not speak TLS (or speaks SSL 2.0); the message says what it looks like.
    #[error("{0}")]
    NotTls(String),
    /// TLS handshake framing or a ClientHello field is invalid.
    #[error("{0}")]
    Malformed(String),
    #[error(
        "ClientHello has no server_name (SNI) extension: the ingress routes on SNI alone, so the client must set it (Kuma sidecars always do)"
    )]
    NoSni,
    #[error(
        "ClientHello exceeds the {limit}-byte limit; the client is not a mesh sidecar or is sending a hostile hello"
    )]
    TooLarge { limit: usize },
    #[error(
        "no complete ClientHello within {after:?}: received {received} bytes (a stalled or slow peer)"
    )]
    Timeout { after: Duration, received: usize },
    #[error("{}", closed_message(*received))]
    ClosedEarly { received: usize },
    #[error("reading the ClientHello failed: {0}")]
    Io(#[from] std::io::Error),
}

fn closed_message(received: usize) -> String {
    if received == 0 {
        // Typical of TCP health checks and port scanners, worth telling apart from broken clients.
        "peer closed the connection without sending anything".to_owned()
    } else {
        format!("peer sent {received} bytes then closed before the ClientHello was complete")
    }
}

impl HelloError {
    /// Stable label for metrics; do not rename, dashboards depend on these.
    pub fn reason(&self) -> &'static str {
        match self {
            HelloError::NotTls(_) => "not_tls",
            HelloError::Malformed(_) => "malformed",
            HelloError::NoSni => "no_sni",
            HelloError::TooLarge { .. } => "too_large",
            HelloError::Timeout { .. } => "timeout",
            HelloError::ClosedEarly { .. } => "closed",
            HelloError::Io(_) => "io_error",
        }
    }
}

impl From<ParseError> for HelloError {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::NotTls(_) | ParseError::UnsupportedSslv2 => {
                HelloError::NotTls(e.to_string())
            }
            ParseError::Malformed(_) => HelloError::Malformed(e.to_string()),
            ParseError::TooLarge(_) => HelloError::TooLarge {
                limit: MAX_CLIENT_HELLO_LEN,
            },
        }
    }
}

/// Reads from `io` until a complete ClientHello is in, and returns it with every byte read.
///
/// Fails with [`HelloError::NoSni`] when the hello carries no host_name: without one there is
/// nothing to route on.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    io: &mut R,
    limits: &HelloLimits,
) -> Result<ReadHello, HelloError> {
    let deadline = Instant::now() + limits.timeout;
    let max = limits.max_bytes;
    // `buf[..filled]` holds received bytes; the rest is zeroed space for the next read, grown
    // geometrically so a trickling peer does not cost a memset per read.
    let mut buf = vec![0u8; INITIAL_BUFFER.min(max)];
    let mut filled = 0usize;
    // The parser re-reads the whole buffer, so only call it once enough bytes are in for it to
    // make progress: keeps the work linear when the peer sends one byte at a time.
    let mut parse_at = 1usize;

    loop {
        if filled >= parse_at {
            match client_hello::parse_step(buf.get(..filled).unwrap_or_default())? {
                Step::Done(hello) => {
                    buf.truncate(filled);
                    return finish(hello, buf);
                }
                Step::NeedMore { at_least } => parse_at = at_least,
            }
        }
        if parse_at > max || filled >= max {
            return Err(HelloError::TooLarge { limit: max });
        }
        if filled == buf.len() {
            let grown = buf.len().saturating_mul(2).max(parse_at).min(max);
            buf.resize(grown, 0);
        }
        let spare = buf.get_mut(filled..).unwrap_or_default();
        let n = match tokio::time::timeout_at(deadline, io.read(spare)).await {
            Err(_elapsed) => {
                return Err(HelloError::Timeout {
                    after: limits.timeout,
                    received: filled,
                });
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(0)) => return Err(HelloError::ClosedEarly { received: filled }),
            Ok(Ok(n)) => n,
        };
        filled += n;
    }
}

fn finish(hello: ClientHello, consumed: Vec<u8>) -> Result<ReadHello, HelloError> {
    match hello.sni.clone() {
        Some(sni) if !sni.is_empty() => Ok(ReadHello {
            hello,
            sni,
            consumed,
        }),
        _ => Err(HelloError::NoSni),
    }
}
