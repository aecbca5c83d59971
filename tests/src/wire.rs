//! Byte-level tools: raw ClientHello bytes, stream wrappers that dribble the first bytes one per write or
//! re-frame the first TLS record into three records, and a fast deterministic PRNG for bulk data.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::tls::{client_config, server_name};

/// SplitMix64: fast, deterministic, good enough to make every byte of a bulk transfer matter.
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

/// The first flight of a real rustls client (a ClientHello in one TLS record) for `sni`.
pub fn client_hello_bytes(sni: &str) -> Vec<u8> {
    let mut conn = rustls::ClientConnection::new(client_config(), server_name(sni))
        .expect("create a rustls client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)
            .expect("write the ClientHello into a Vec");
    }
    assert!(
        out.len() > 5 && out[0] == 0x16,
        "rustls produced no handshake record"
    );
    out
}

/// Writes the first `bytes` bytes one byte per write with `delay` between writes (use with TCP_NODELAY so
/// each byte is its own segment), then passes writes through. Reads pass through.
pub struct Dribble<S> {
    inner: S,
    left: usize,
    delay: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> Dribble<S> {
    pub fn new(inner: S, bytes: usize, delay: Duration) -> Dribble<S> {
        Dribble {
            inner,
            left: bytes,
            delay,
            sleep: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Dribble<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Dribble<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.left == 0 || buf.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if let Some(s) = this.sleep.as_mut() {
            ready!(s.as_mut().poll(cx));
            this.sleep = None;
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..1]))?;
        this.left -= n;
        if n > 0 {
            this.sleep = Some(Box::pin(tokio::time::sleep(this.delay)));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where [`SplitFirstRecord`] cuts the first record's payload.
#[derive(Clone, Copy, Debug)]
pub enum Split {
    /// Three records of about a third of the payload each.
    Thirds,
    /// First record holds only 2 bytes, so the 4-byte handshake header spans two records (legal TLS).
    HeaderSpanning,
}

enum SplitState {
    Collecting(Vec<u8>),
    Draining(Vec<u8>, usize),
    Passthrough,
}

/// Re-frames the first TLS record written (the ClientHello) into three TLS records with the same content
/// type and version, then passes everything through. Reads pass through.
pub struct SplitFirstRecord<S> {
    inner: S,
    split: Split,
    state: SplitState,
}

impl<S> SplitFirstRecord<S> {
    pub fn new(inner: S, split: Split) -> SplitFirstRecord<S> {
        SplitFirstRecord {
            inner,
            split,
            state: SplitState::Collecting(Vec::new()),
        }
    }
}

/// Re-frames one complete TLS record into three records, cut according to `split`.
pub fn split_record(record: &[u8], split: Split) -> Vec<u8> {
    assert!(record.len() > 5, "not a TLS record");
    let (hdr, payload) = record.split_at(5);
    let len = payload.len();
    assert_eq!(
        len,
        u16::from_be_bytes([hdr[3], hdr[4]]) as usize,
        "record length mismatch"
    );
    assert!(len >= 6, "record too short to split in three");
    let (a, b) = match split {
        Split::Thirds => (len / 3, 2 * len / 3),
        Split::HeaderSpanning => (2, 2 + (len - 2) / 2),
    };
    let mut out = Vec::with_capacity(len + 15);
    for part in [&payload[..a], &payload[a..b], &payload[b..]] {
        out.extend_from_slice(&hdr[..3]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

impl<S: AsyncWrite + Unpin> SplitFirstRecord<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let SplitState::Draining(out, pos) = &mut self.state {
            while *pos < out.len() {
                let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &out[*pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *pos += n;
            }
            self.state = SplitState::Passthrough;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SplitFirstRecord<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SplitFirstRecord<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        let split = this.split;
        let SplitState::Collecting(acc) = &mut this.state else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        let want = if acc.len() < 5 {
            5
        } else {
            5 + u16::from_be_bytes([acc[3], acc[4]]) as usize
        };
        let take = (want - acc.len()).min(buf.len());
        acc.extend_from_slice(&buf[..take]);
        if acc.len() >= 5 {
            let total = 5 + u16::from_be_bytes([acc[3], acc[4]]) as usize;
            if acc.len() == total {
                let out = split_record(acc, split);
                this.state = SplitState::Draining(out, 0);
            }
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts the bytes that cross a stream, i.e. what the agent sees on the client's wire (TLS
/// records): `read` from it, `written` to it.
pub struct Counting<S> {
    pub inner: S,
    pub read: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub written: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written
                .fetch_add(*n as u64, std::sync::atomic::Ordering::SeqCst);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
