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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use proptest::prelude::*;
    use tokio::io::{AsyncWriteExt, ReadBuf};

    use super::super::client_hello::testutil::*;
    use super::*;

    /// What the mock does once its chunks are exhausted.
    #[derive(Clone, Copy)]
    enum End {
        Eof,
        Stall,
        Fail,
    }

    /// Hands out one queued chunk (or as much of it as fits) per read, and records how much the
    /// reader asked for and got.
    struct Chunks {
        chunks: VecDeque<Vec<u8>>,
        end: End,
        delivered: usize,
        largest_request: usize,
    }

    impl Chunks {
        fn new(bytes: &[u8], sizes: impl IntoIterator<Item = usize>, end: End) -> Self {
            let mut chunks = VecDeque::new();
            let mut rest = bytes;
            for size in sizes {
                if rest.is_empty() {
                    break;
                }
                let (head, tail) = rest.split_at(size.clamp(1, rest.len()));
                chunks.push_back(head.to_vec());
                rest = tail;
            }
            if !rest.is_empty() {
                chunks.push_back(rest.to_vec());
            }
            Chunks {
                chunks,
                end,
                delivered: 0,
                largest_request: 0,
            }
        }

        fn bytewise(bytes: &[u8], end: End) -> Self {
            Self::new(bytes, std::iter::repeat(1), end)
        }
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.largest_request = this.largest_request.max(buf.remaining());
            let Some(chunk) = this.chunks.front_mut() else {
                return match this.end {
                    End::Eof => Poll::Ready(Ok(())),
                    // Never woken: only the reader's deadline can end the wait.
                    End::Stall => Poll::Pending,
                    End::Fail => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "connection reset by peer",
                    ))),
                };
            };
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                this.chunks.pop_front();
            }
            this.delivered += n;
            Poll::Ready(Ok(()))
        }
    }

    fn limits(timeout_ms: u64, max_bytes: usize) -> HelloLimits {
        HelloLimits {
            timeout: Duration::from_millis(timeout_ms),
            max_bytes,
        }
    }

    #[tokio::test]
    async fn reads_a_rustls_hello_over_a_duplex() {
        let bytes = rustls_hello(MS_SNI, &[b"kuma"], false);
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&bytes).await.expect("write");
        let got = read_client_hello(&mut server, &HelloLimits::default())
            .await
            .expect("hello");
        assert_eq!(got.sni, MS_SNI.as_bytes());
        assert_eq!(got.hello.alpn, vec![b"kuma".to_vec()]);
        assert_eq!(got.consumed, bytes);
    }

    #[tokio::test]
    async fn one_byte_at_a_time_fragmented_legacy_sni() {
        let msg = HelloBuilder::new()
            .sni(LEGACY_SNI)
            .alpn(&[b"kuma"])
            .message();
        let bytes = records(&msg, &[40, 40]);
        let mut io = Chunks::bytewise(&bytes, End::Stall);
        let got = read_client_hello(&mut io, &limits(5_000, 1 << 16))
            .await
            .expect("hello");
        assert_eq!(got.sni, LEGACY_SNI);
        assert_eq!(got.hello.records_len, bytes.len());
        assert_eq!(got.consumed, bytes);
    }

    #[tokio::test]
    async fn extra_bytes_after_the_hello_are_consumed() {
        let hello = HelloBuilder::new().sni(LEGACY_SNI).bytes();
        let mut bytes = hello.clone();
        bytes.extend_from_slice(&record(20, &[1]));
        bytes.extend_from_slice(&record(23, b"0-rtt data"));
        let mut io = Chunks::new(&bytes, [bytes.len()], End::Stall);
        let got = read_client_hello(&mut io, &HelloLimits::default())
            .await
            .expect("hello");
        assert_eq!(got.hello.records_len, hello.len());
        assert_eq!(
            got.consumed, bytes,
            "everything read must be replayed upstream"
        );
    }

    #[tokio::test]
    async fn stalled_peer_times_out() {
        let bytes = HelloBuilder::new().sni(LEGACY_SNI).bytes();
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&bytes[..20]).await.expect("write");
        let started = Instant::now();
        let err = read_client_hello(&mut server, &limits(100, 1 << 16))
            .await
            .expect_err("must time out");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(err, HelloError::Timeout { received: 20, .. }),
            "{err:?}"
        );
        assert_eq!(err.reason(), "timeout");
        assert!(err.to_string().contains("received 20 bytes"), "{err}");
        drop(client);
    }

    #[tokio::test]
    async fn slowloris_hits_one_deadline_for_the_whole_hello() {
        let bytes = HelloBuilder::new().sni(LEGACY_SNI).bytes();
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let trickle = tokio::spawn(async move {
            for b in bytes {
                if client.write_all(&[b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let started = Instant::now();
        let err = read_client_hello(&mut server, &limits(200, 1 << 16))
            .await
            .expect_err("must time out");
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
        match err {
            HelloError::Timeout { received, .. } => assert!((1..100).contains(&received)),
            e => panic!("{e:?}"),
        }
        trickle.abort();
    }

    #[tokio::test]
    async fn peer_closing_early_is_reported_with_what_it_sent() {
        let bytes = HelloBuilder::new().sni(LEGACY_SNI).bytes();
        let mut io = Chunks::new(&bytes[..3], [3], End::Eof);
        let err = read_client_hello(&mut io, &HelloLimits::default())
            .await
            .expect_err("closed");
        assert!(matches!(err, HelloError::ClosedEarly { received: 3 }));
        assert_eq!(err.reason(), "closed");
        assert_eq!(
            err.to_string(),
            "peer sent 3 bytes then closed before the ClientHello was complete"
        );

        let (client, mut server) = tokio::io::duplex(1024);
        drop(client);
        let err = read_client_hello(&mut server, &HelloLimits::default())
            .await
            .expect_err("closed");
        assert!(matches!(err, HelloError::ClosedEarly { received: 0 }));
        assert!(
            err.to_string().contains("without sending anything"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn max_bytes_is_never_exceeded() {
        // A valid hello bigger than the limit, arriving in large chunks.
        let big = HelloBuilder::new().sni(LEGACY_SNI).ext(21, vec![0; 3000]);
        let bytes = records(&big.message(), &[500, 500, 500, 500]);
        let mut io = Chunks::new(&bytes, [4096], End::Stall);
        let err = read_client_hello(&mut io, &limits(5_000, 1000))
            .await
            .expect_err("too large");
        assert!(
            matches!(err, HelloError::TooLarge { limit: 1000 }),
            "{err:?}"
        );
        assert_eq!(err.reason(), "too_large");
        assert!(io.delivered <= 1000 && io.largest_request <= 1000);

        // A record declaring more than the limit is refused once the record and handshake
        // headers are in, without waiting for its body.
        let bytes = records(&big.message(), &[]);
        let mut io = Chunks::bytewise(&bytes, End::Stall);
        let err = read_client_hello(&mut io, &limits(5_000, 1000))
            .await
            .expect_err("too large");
        assert!(
            matches!(err, HelloError::TooLarge { limit: 1000 }),
            "{err:?}"
        );
        assert_eq!(io.delivered, 5 + 4, "decided from the headers alone");
    }

    #[tokio::test]
    async fn oversize_handshake_length_is_too_large() {
        let hdr = [22, 3, 1, 0x40, 0x00, 1, 0x10, 0x00, 0x00];
        let mut io = Chunks::bytewise(&hdr, End::Stall);
        let err = read_client_hello(&mut io, &HelloLimits::default())
            .await
            .expect_err("too large");
        assert!(
            matches!(err, HelloError::TooLarge { limit } if limit == MAX_CLIENT_HELLO_LEN),
            "{err:?}"
        );
        assert_eq!(io.delivered, hdr.len());
    }

    async fn read_err(bytes: &[u8]) -> HelloError {
        let mut io = Chunks::new(bytes, [bytes.len()], End::Eof);
        read_client_hello(&mut io, &HelloLimits::default())
            .await
            .expect_err("must fail")
    }

    #[tokio::test]
    async fn error_reasons() {
        let http = read_err(b"GET /healthz HTTP/1.1\r\nHost: ingress\r\n\r\n").await;
        assert_eq!(http.reason(), "not_tls");
        assert!(http.to_string().contains("looks like HTTP"), "{http}");

        let sslv2 = read_err(&[0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00]).await;
        assert_eq!(sslv2.reason(), "not_tls");
        assert!(sslv2.to_string().contains("SSL 2.0"), "{sslv2}");

        let mut b = HelloBuilder::new();
        b.extensions = None;
        let no_ext = read_err(&b.bytes()).await;
        assert!(matches!(no_ext, HelloError::NoSni), "{no_ext:?}");
        assert_eq!(no_ext.reason(), "no_sni");
        let alpn_only = read_err(&HelloBuilder::new().alpn(&[b"kuma"]).bytes()).await;
        assert!(matches!(alpn_only, HelloError::NoSni));
        let rustls_no_sni = {
            // rustls omits SNI for IP addresses.
            let bytes = rustls_hello("10.0.0.1", &[b"kuma"], false);
            read_err(&bytes).await
        };
        assert!(
            matches!(rustls_no_sni, HelloError::NoSni),
            "{rustls_no_sni:?}"
        );

        let mut bad = HelloBuilder::new().sni(LEGACY_SNI);
        bad.ciphers = vec![1, 2, 3];
        let malformed = read_err(&bad.bytes()).await;
        assert_eq!(malformed.reason(), "malformed");
        assert!(
            malformed.to_string().contains("cipher_suites"),
            "{malformed}"
        );

        let mut io = Chunks::new(&[22, 3], [2], End::Fail);
        let io_err = read_client_hello(&mut io, &HelloLimits::default())
            .await
            .expect_err("io");
        assert_eq!(io_err.reason(), "io_error");
        assert!(io_err.to_string().contains("connection reset"), "{io_err}");
    }

    #[test]
    fn default_limits_fit_the_largest_accepted_hello() {
        let d = HelloLimits::default();
        assert_eq!(d.timeout, Duration::from_secs(5));
        assert!(d.max_bytes > MAX_CLIENT_HELLO_LEN + 4 + 5 * 5);
    }

    #[tokio::test]
    async fn zero_max_bytes_reads_nothing() {
        let mut io = Chunks::new(b"\x16", [1], End::Stall);
        let err = read_client_hello(&mut io, &limits(1000, 0))
            .await
            .expect_err("too large");
        assert!(matches!(err, HelloError::TooLarge { limit: 0 }));
        assert_eq!(io.delivered, 0);
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    proptest! {
        #[test]
        fn prop_any_read_pattern_gives_the_same_hello(
            padding in 0usize..3000,
            frags in proptest::collection::vec(1usize..700, 0..6),
            reads in proptest::collection::vec(1usize..500, 0..60),
            trailing in proptest::collection::vec(any::<u8>(), 0..50),
        ) {
            let msg = HelloBuilder::new().sni(LEGACY_SNI).ext(21, vec![0; padding]).message();
            let hello_bytes = records(&msg, &frags);
            let mut bytes = hello_bytes.clone();
            bytes.extend_from_slice(&trailing);
            let mut io = Chunks::new(&bytes, reads, End::Stall);
            let got = run(read_client_hello(&mut io, &HelloLimits::default())).expect("hello");
            prop_assert_eq!(&got.sni, LEGACY_SNI);
            prop_assert_eq!(got.hello.records_len, hello_bytes.len());
            // Whatever was read is returned, and the hello is always all of it or a prefix.
            prop_assert_eq!(got.consumed.len(), io.delivered);
            prop_assert!(got.consumed.len() >= hello_bytes.len());
            prop_assert_eq!(&got.consumed[..], &bytes[..got.consumed.len()]);
        }

        /// What rustls, openssl and curl really send, in any read pattern and record
        /// fragmentation, reads to the same SNI; every byte read is handed back for the replay.
        #[test]
        fn prop_captured_hello_any_read_pattern(
            which in 0..CAPTURED.len(),
            frags in proptest::collection::vec(1usize..150, 0..8),
            reads in proptest::collection::vec(1usize..100, 0..40),
        ) {
            let c = &CAPTURED[which];
            let bytes = records(&handshake_message(c.bytes), &frags);
            let mut io = Chunks::new(&bytes, reads, End::Stall);
            let got = run(read_client_hello(&mut io, &HelloLimits::default())).expect("hello");
            prop_assert_eq!(&got.sni[..], c.sni);
            prop_assert_eq!(&got.consumed[..], &bytes[..]);
        }

        /// A peer that closes anywhere inside its hello is "closed early" with exactly what it
        /// sent: never a hello, never a different SNI, never a "malformed".
        #[test]
        fn prop_truncated_hello_is_closed_early(
            which in 0..CAPTURED.len(),
            cut in any::<prop::sample::Index>(),
            frags in proptest::collection::vec(1usize..150, 0..8),
            reads in proptest::collection::vec(1usize..100, 0..40),
        ) {
            let c = &CAPTURED[which];
            let bytes = records(&handshake_message(c.bytes), &frags);
            let n = cut.index(bytes.len());
            let mut io = Chunks::new(&bytes[..n], reads, End::Eof);
            match run(read_client_hello(&mut io, &HelloLimits::default())) {
                Err(HelloError::ClosedEarly { received }) => prop_assert_eq!(received, n),
                other => prop_assert!(false, "{}: {} of {} bytes then EOF gave {:?}", c.name, n, bytes.len(), other),
            }
        }
    }
}
