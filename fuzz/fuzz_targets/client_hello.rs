//! The ClientHello/SNI reader on arbitrary bytes: the pure parser, and the async reader fed the
//! same bytes in arbitrary read sizes, must agree; neither may panic, over-read or loop.
//!
//! Checked on every input:
//! - a complete hello lies inside the input, parses the same from its own records alone, and every
//!   strict prefix of those records is "incomplete" (never an error, never a different answer);
//! - the SNI bytes are bytes the client sent;
//! - the reader (bytes delivered in input-derived chunks, then EOF) returns the same hello and SNI
//!   when the parser completes, "closed early" when the parser wants more, and a rejection of the
//!   same kind when the parser rejects (or "closed early": field errors inside a record that never
//!   completed may surface only once the record is whole).
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};
use zone_ingress::tls::{
    HelloError, HelloLimits, ParseError, Progress, parse_client_hello, read_client_hello,
};

/// Delivers the input in chunks whose sizes come from a PRNG seeded by the input itself, then EOF.
struct Chunks<'a> {
    data: &'a [u8],
    pos: usize,
    rng: u64,
}

impl AsyncRead for Chunks<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        // xorshift64: cheap, and any chunking pattern is reachable for some input.
        this.rng ^= this.rng << 13;
        this.rng ^= this.rng >> 7;
        this.rng ^= this.rng << 17;
        let left = this.data.len() - this.pos;
        let want = match this.rng % 4 {
            0 => 1,
            1 => (this.rng >> 8) as usize % 8 + 1,
            2 => (this.rng >> 8) as usize % 300 + 1,
            _ => left,
        };
        let n = want.min(left).min(buf.remaining());
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

fn seed(data: &[u8]) -> u64 {
    // FNV-1a, never 0 (xorshift's fixed point).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h | 1
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
}

fuzz_target!(|data: &[u8]| {
    let whole = parse_client_hello(data);
    if let Ok(Progress::Done(h)) = &whole {
        assert!(h.records_len <= data.len(), "hello extends past the input");
        assert!(h.records_len > 0);
        let records = &data[..h.records_len];
        assert_eq!(
            parse_client_hello(records).as_ref(),
            Ok(&Progress::Done(h.clone()))
        );
        for cut in [
            h.records_len - 1,
            h.records_len / 2,
            5.min(h.records_len - 1),
        ] {
            assert_eq!(
                parse_client_hello(&records[..cut]),
                Ok(Progress::NeedMore),
                "strict prefix of {cut}/{} bytes of a complete hello",
                h.records_len
            );
        }
        if let Some(sni) = &h.sni {
            assert!(contains(records, sni), "SNI bytes not in the input");
        }
    }

    let limits = HelloLimits::default();
    let mut io = Chunks {
        data,
        pos: 0,
        rng: seed(data),
    };
    let read = RT.with(|rt| rt.block_on(read_client_hello(&mut io, &limits)));
    match (&whole, &read) {
        (Ok(Progress::Done(h)), Ok(r)) => {
            assert_eq!(&r.hello, h);
            assert_eq!(Some(&r.sni), h.sni.as_ref());
            assert!(r.consumed.len() >= h.records_len);
            assert_eq!(&r.consumed[..], &data[..r.consumed.len()]);
        }
        (Ok(Progress::Done(h)), Err(HelloError::NoSni)) => {
            assert!(h.sni.as_ref().is_none_or(|s| s.is_empty()));
        }
        (Ok(Progress::NeedMore), Err(HelloError::ClosedEarly { received })) => {
            assert_eq!(*received, data.len());
        }
        (Ok(Progress::NeedMore), Err(HelloError::TooLarge { .. })) => {
            assert!(data.len() >= limits.max_bytes);
        }
        (Err(ParseError::NotTls(_) | ParseError::UnsupportedSslv2), Err(HelloError::NotTls(_)))
        | (Err(ParseError::Malformed(_)), Err(HelloError::Malformed(_)))
        | (Err(ParseError::TooLarge(_)), Err(HelloError::TooLarge { .. }))
        | (Err(ParseError::Malformed(_)), Err(HelloError::ClosedEarly { .. })) => {}
        (whole, read) => panic!("parser and reader disagree: parser {whole:?}, reader {read:?}"),
    }
});
