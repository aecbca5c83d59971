//! ClientHello parser: pure, synchronous, bounded, and safe on any input.
//!
//! The ingress only needs the SNI (to route) and must never terminate TLS, so this is a parser,
//! not a TLS stack. It is deliberately lenient about *contents* (any bytes in a host_name: Kuma's
//! legacy SNIs like `backend{mesh=default,version=v2}` are not DNS names) and strict about
//! *framing* (every length must fit its container), because framing is what lets a crafted hello
//! make two parsers disagree about the SNI.
//!
//! The parser is stateless: the caller hands it every byte received so far and it answers from
//! scratch. It answers [`Progress::NeedMore`] only while the bytes are a valid prefix of a
//! ClientHello, so a malformed hello is rejected as soon as the offending byte arrives rather
//! than after a timeout.

/// Largest handshake body (the 24-bit length of the ClientHello message) we accept. Real hellos
/// are well under 2 KiB, even with post-quantum key shares; anything bigger is almost certainly
/// an attack on our memory, so it is refused from the header alone.
pub const MAX_CLIENT_HELLO_LEN: usize = 64 * 1024;

/// Largest TLS record payload accepted. RFC 8446 caps a plaintext record at 2^14 bytes; the
/// extra 256 is the slack the contract allows for lenient clients (it is the TLS 1.3 ciphertext
/// expansion bound), and costs nothing since the whole hello is bounded anyway.
pub const MAX_RECORD_LEN: usize = 16384 + 256;

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// What a complete ClientHello told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// Raw host_name bytes of the server_name extension (first host_name entry).
    pub sni: Option<Vec<u8>>,
    /// ALPN protocol names, if the extension is present.
    pub alpn: Vec<Vec<u8>>,
    /// The client_version field.
    pub legacy_version: u16,
    /// Bytes of TLS records (headers included) up to and including the record that completed
    /// the ClientHello.
    pub records_len: usize,
}

/// Outcome of feeding the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The bytes are a valid, incomplete prefix of a ClientHello.
    NeedMore,
    /// The ClientHello is complete.
    Done(ClientHello),
}

/// Why the bytes cannot be a TLS ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The first bytes are not a TLS handshake record; the payload says what they look like.
    #[error("not TLS: {0}")]
    NotTls(String),
    /// An SSL 2.0-style ClientHello (also sent by some very old clients offering TLS 1.0).
    #[error(
        "SSL 2.0 ClientHello format is not supported: the client must send a TLS ClientHello (TLS 1.2 or 1.3)"
    )]
    UnsupportedSslv2,
    /// A TLS handshake record whose framing or fields are invalid.
    #[error("malformed ClientHello: {0}")]
    Malformed(String),
    /// The handshake header declares a ClientHello longer than [`MAX_CLIENT_HELLO_LEN`].
    #[error(
        "ClientHello declares {0} bytes, over the {MAX_CLIENT_HELLO_LEN}-byte limit (refused before reading it)"
    )]
    TooLarge(usize),
}

/// Parses the bytes received so far, which must start at the first byte of the connection.
///
/// Bytes after the record that completes the ClientHello are ignored (they belong upstream).
pub fn parse_client_hello(buf: &[u8]) -> Result<Progress, ParseError> {
    Ok(match parse_step(buf)? {
        Step::NeedMore { .. } => Progress::NeedMore,
        Step::Done(hello) => Progress::Done(hello),
    })
}

/// [`Progress`] plus a hint for incremental callers.
#[derive(Debug)]
pub(crate) enum Step {
    /// Parsing again before `buf.len() >= at_least` cannot complete the hello and cannot detect a
    /// framing error the last call did not already see: the reader uses this to avoid re-parsing
    /// a growing buffer on every tiny read (quadratic work for a peer that trickles bytes).
    /// Field errors inside a partially received record may then surface only once that record is
    /// complete, which is bounded by [`MAX_RECORD_LEN`].
    NeedMore {
        at_least: usize,
    },
    Done(ClientHello),
}

pub(crate) fn parse_step(buf: &[u8]) -> Result<Step, ParseError> {
    match buf.first() {
        None => return Ok(Step::NeedMore { at_least: 1 }),
        Some(&CONTENT_TYPE_HANDSHAKE) => {}
        Some(_) => return Err(classify_non_tls(buf)),
    }
    let r = reassemble(buf)?;
    let body = r.msg.get(HANDSHAKE_HEADER_LEN..).unwrap_or_default();
    let declared = r.msg_len.map(|total| total - HANDSHAKE_HEADER_LEN);
    match (declared, r.records_len) {
        (Some(declared), Some(records_len)) => {
            let mut hello = parse_body(body, declared).map_err(|f| match f {
                Fail::Bad(e) => e,
                // Every declared byte is present, so this cannot happen; kept total so a bug
                // here is an error, not a panic.
                Fail::Short => malformed("internal: complete ClientHello reported short"),
            })?;
            hello.records_len = records_len;
            Ok(Step::Done(hello))
        }
        (Some(declared), None) => match parse_body(body, declared) {
            // Reject as soon as the offending field is visible, not after a timeout.
            Err(Fail::Bad(e)) => Err(e),
            Err(Fail::Short) | Ok(_) => Ok(Step::NeedMore {
                at_least: r.at_least,
            }),
        },
        (None, _) => Ok(Step::NeedMore {
            at_least: r.at_least,
        }),
    }
}

/// The handshake message gathered from the record payloads received so far.
struct Reassembled {
    /// Handshake header and body, never longer than the declared message.
    msg: Vec<u8>,
    /// Declared message length including the 4-byte header, once the header is in.
    msg_len: Option<usize>,
    /// Set when the message and the record that completes it are both complete.
    records_len: Option<usize>,
    /// When incomplete: the buffer length at which parsing again can make progress.
    at_least: usize,
}

/// Walks the records, checking their framing, and concatenates their payloads up to the end of
/// the ClientHello. Linear in `buf`; the message is bounded by [`MAX_CLIENT_HELLO_LEN`] before
/// anything past its 4-byte header is copied.
fn reassemble(buf: &[u8]) -> Result<Reassembled, ParseError> {
    let mut msg: Vec<u8> = Vec::new();
    let mut msg_len: Option<usize> = None;
    let mut pos = 0usize;
    let mut record_no = 1usize;

    loop {
        let header = buf.get(pos..).unwrap_or_default();
        check_record_header(header, record_no)?;
        let Some(payload_len) = header
            .get(3..5)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map(|b| usize::from(u16::from_be_bytes(b)))
        else {
            // The content type (byte 0) and major version (byte 1) are checked one byte at a
            // time, so a non-TLS peer is refused as soon as that byte arrives; after them
            // nothing is checked before the length is complete.
            let at_least = if header.len() < 2 {
                buf.len() + 1
            } else {
                pos + RECORD_HEADER_LEN
            };
            return Ok(Reassembled {
                msg,
                msg_len,
                records_len: None,
                at_least,
            });
        };
        if payload_len == 0 {
            return Err(malformed(format!(
                "TLS record {record_no} at byte {pos} is empty (zero-length handshake records are forbidden)"
            )));
        }
        if payload_len > MAX_RECORD_LEN {
            return Err(malformed(format!(
                "TLS record {record_no} at byte {pos} declares {payload_len} bytes, over the {MAX_RECORD_LEN}-byte record limit"
            )));
        }
        let body_start = pos + RECORD_HEADER_LEN;
        let body_end = body_start + payload_len;
        let mut available = buf
            .get(body_start..body_end.min(buf.len()))
            .unwrap_or_default();
        let record_complete = buf.len() >= body_end;

        // The handshake header may itself be split across records (legal, if perverse).
        let header_missing = HANDSHAKE_HEADER_LEN.saturating_sub(msg.len());
        if msg_len.is_none() {
            let (part, rest) = available.split_at(header_missing.min(available.len()));
            msg.extend_from_slice(part);
            available = rest;
            msg_len = check_handshake_header(&msg)?;
        }
        if let Some(total) = msg_len {
            let (part, _after_hello) = available.split_at((total - msg.len()).min(available.len()));
            msg.extend_from_slice(part);
        }

        let msg_complete = msg_len == Some(msg.len());
        if msg_complete && record_complete {
            return Ok(Reassembled {
                msg,
                msg_len,
                records_len: Some(body_end),
                at_least: body_end,
            });
        }
        if !record_complete {
            let at_least = if msg_len.is_none() {
                // Parse again as soon as the handshake type byte is in (a ServerHello or any
                // other type is refused at once), then once the whole handshake header is in,
                // so an oversized length is refused without waiting for the rest of the record.
                let next_check = if msg.is_empty() { 1 } else { header_missing };
                (body_start + next_check).min(body_end)
            } else {
                body_end
            };
            return Ok(Reassembled {
                msg,
                msg_len,
                records_len: None,
                at_least,
            });
        }
        pos = body_end;
        record_no += 1;
    }
}

/// Validates whatever part of a record header is present.
fn check_record_header(header: &[u8], record_no: usize) -> Result<(), ParseError> {
    if let Some(&content_type) = header.first()
        && content_type != CONTENT_TYPE_HANDSHAKE
    {
        // Record 1 was checked by the caller; a later one means the client moved on (e.g. an
        // alert or application data) before finishing its hello.
        return Err(malformed(format!(
            "TLS record {record_no} has content type {content_type} ({}) before the ClientHello was complete",
            content_type_name(content_type)
        )));
    }
    if let Some(&major) = header.get(1)
        && major != 3
    {
        // The minor byte may not have arrived yet; do not print a guess.
        let minor = header.get(2).map_or_else(|| "?".to_owned(), u8::to_string);
        let msg =
            format!("TLS record {record_no} has version {major}.{minor}, expected 3.x (0x03xx)");
        return Err(if record_no == 1 {
            ParseError::NotTls(format!(
                "first byte is 0x16 (TLS handshake) but the record version is {major}.{minor}, not 3.x"
            ))
        } else {
            malformed(msg)
        });
    }
    Ok(())
}

/// Checks the handshake header once enough of it is present; returns the full message length.
fn check_handshake_header(msg: &[u8]) -> Result<Option<usize>, ParseError> {
    if let Some(&msg_type) = msg.first()
        && msg_type != HANDSHAKE_CLIENT_HELLO
    {
        return Err(malformed(format!(
            "first handshake message has type {msg_type} ({}), expected ClientHello (1)",
            handshake_type_name(msg_type)
        )));
    }
    let Some(&[hi, mid, lo]) = msg.get(1..4) else {
        return Ok(None);
    };
    let len = (usize::from(hi) << 16) | (usize::from(mid) << 8) | usize::from(lo);
    if len > MAX_CLIENT_HELLO_LEN {
        return Err(ParseError::TooLarge(len));
    }
    Ok(Some(HANDSHAKE_HEADER_LEN + len))
}

enum Fail {
    /// The bytes stop inside a field that fits its declared container: need more input.
    Short,
    Bad(ParseError),
}

impl From<ParseError> for Fail {
    fn from(e: ParseError) -> Self {
        Fail::Bad(e)
    }
}

/// Reads fields from a container whose declared length (`limit`) may exceed the bytes received
/// so far (`data`). Exceeding `limit` is malformed; exceeding only `data` is [`Fail::Short`].
/// Checking against the declared length first is what makes errors independent of how the
/// bytes were split across reads.
struct Cursor<'a> {
    data: &'a [u8],
    limit: usize,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8], limit: usize) -> Self {
        let data = data.get(..limit.min(data.len())).unwrap_or_default();
        Cursor {
            data,
            limit,
            pos: 0,
        }
    }

    fn remaining(&self) -> usize {
        self.limit - self.pos
    }

    fn is_at_end(&self) -> bool {
        self.pos == self.limit
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Fail> {
        if n > self.remaining() {
            return Err(malformed(format!(
                "{what} needs {n} bytes but only {} remain in its container",
                self.remaining()
            ))
            .into());
        }
        let bytes = self.data.get(self.pos..self.pos + n).ok_or(Fail::Short)?;
        self.pos += n;
        Ok(bytes)
    }

    fn u8(&mut self, what: &str) -> Result<u8, Fail> {
        Ok(self.take(1, what)?.first().copied().unwrap_or(0))
    }

    fn u16(&mut self, what: &str) -> Result<u16, Fail> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([
            b.first().copied().unwrap_or(0),
            b.get(1).copied().unwrap_or(0),
        ]))
    }

    /// A nested container of `len` declared bytes, which must fit in this one.
    fn sub(&mut self, len: usize, what: &str) -> Result<Cursor<'a>, Fail> {
        if len > self.remaining() {
            return Err(malformed(format!(
                "{what} declares {len} bytes but only {} remain in its container",
                self.remaining()
            ))
            .into());
        }
        let start = self.pos.min(self.data.len());
        let end = (self.pos + len).min(self.data.len());
        let data = self.data.get(start..end).unwrap_or_default();
        self.pos += len;
        Ok(Cursor {
            data,
            limit: len,
            pos: 0,
        })
    }
}

/// Parses the ClientHello body (after the 4-byte handshake header). `records_len` is filled in
/// by the caller.
fn parse_body(body: &[u8], declared: usize) -> Result<ClientHello, Fail> {
    let mut c = Cursor::new(body, declared);

    let legacy_version = c.u16("client_version")?;
    if legacy_version >> 8 != 3 {
        return Err(malformed(format!(
            "client_version is 0x{legacy_version:04x}, expected 0x03xx"
        ))
        .into());
    }
    c.take(32, "random")?;

    let sid_len = usize::from(c.u8("session_id length")?);
    if sid_len > 32 {
        return Err(malformed(format!("session_id is {sid_len} bytes, the maximum is 32")).into());
    }
    c.take(sid_len, "session_id")?;

    let cs_len = usize::from(c.u16("cipher_suites length")?);
    if cs_len == 0 || cs_len % 2 != 0 {
        return Err(malformed(format!(
            "cipher_suites length is {cs_len}, must be even and non-zero"
        ))
        .into());
    }
    c.sub(cs_len, "cipher_suites")?;

    let comp_len = usize::from(c.u8("compression_methods length")?);
    if comp_len == 0 {
        return Err(malformed("compression_methods is empty (must list at least null)").into());
    }
    c.sub(comp_len, "compression_methods")?;

    let mut hello = ClientHello {
        sni: None,
        alpn: Vec::new(),
        legacy_version,
        records_len: 0,
    };
    // Extensions are optional (pre-TLS 1.2 clients may end the hello here).
    if c.is_at_end() {
        return Ok(hello);
    }

    let ext_total = usize::from(c.u16("extensions length")?);
    if ext_total != c.remaining() {
        return Err(malformed(format!(
            "extensions block declares {ext_total} bytes but {} remain in the ClientHello",
            c.remaining()
        ))
        .into());
    }
    let mut exts = c.sub(ext_total, "extensions")?;
    let mut seen_sni = false;
    let mut seen_alpn = false;
    while !exts.is_at_end() {
        let ext_type = exts.u16("extension type")?;
        let ext_len = usize::from(exts.u16("extension length")?);
        let what = format!("extension {ext_type}");
        let mut ext = exts.sub(ext_len, &what)?;
        match ext_type {
            // A duplicate SNI or ALPN is exactly what lets a client show one name to us and
            // another to the upstream, so refuse it (RFC 8446 forbids duplicates anyway).
            EXT_SERVER_NAME => {
                if std::mem::replace(&mut seen_sni, true) {
                    return Err(malformed("server_name extension appears twice").into());
                }
                hello.sni = parse_server_name(&mut ext)?;
            }
            EXT_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(malformed("ALPN extension appears twice").into());
                }
                hello.alpn = parse_alpn(&mut ext)?;
            }
            _ => {}
        }
    }
    Ok(hello)
}

/// The first host_name entry; `None` when the list holds only other (unassigned) name types.
fn parse_server_name(ext: &mut Cursor<'_>) -> Result<Option<Vec<u8>>, Fail> {
    let list_len = usize::from(ext.u16("server_name list length")?);
    if list_len == 0 || list_len != ext.remaining() {
        return Err(malformed(format!(
            "server_name list declares {list_len} bytes but the extension holds {}",
            ext.remaining()
        ))
        .into());
    }
    let mut list = ext.sub(list_len, "server_name list")?;
    let mut host: Option<&[u8]> = None;
    while !list.is_at_end() {
        let name_type = list.u8("server_name type")?;
        let len = usize::from(list.u16("server_name length")?);
        let name = list.take(len, "server_name")?;
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        if len == 0 {
            return Err(malformed("server_name host_name is empty").into());
        }
        if host.is_some() {
            return Err(malformed("server_name lists two host_name entries").into());
        }
        host = Some(name);
    }
    Ok(host.map(<[u8]>::to_vec))
}

fn parse_alpn(ext: &mut Cursor<'_>) -> Result<Vec<Vec<u8>>, Fail> {
    let list_len = usize::from(ext.u16("ALPN list length")?);
    if list_len == 0 || list_len != ext.remaining() {
        return Err(malformed(format!(
            "ALPN list declares {list_len} bytes but the extension holds {}",
            ext.remaining()
        ))
        .into());
    }
    let mut list = ext.sub(list_len, "ALPN list")?;
    let mut protocols = Vec::new();
    while !list.is_at_end() {
        let len = usize::from(list.u8("ALPN protocol length")?);
        if len == 0 {
            return Err(malformed("ALPN protocol name is empty").into());
        }
        protocols.push(list.take(len, "ALPN protocol name")?.to_vec());
    }
    Ok(protocols)
}

fn malformed(what: impl Into<String>) -> ParseError {
    ParseError::Malformed(what.into())
}

/// Says what a connection that does not start with a TLS handshake record looks like, so an
/// operator can tell a misrouted HTTP client from a health check from a PROXY-protocol LB.
fn classify_non_tls(buf: &[u8]) -> ParseError {
    const HTTP_METHODS: &[&[u8]] = &[
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    const PROXY_V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    // `buf` may hold only the first byte or two, so match on prefixes in both directions.
    let matches = |pattern: &[u8]| {
        let n = pattern.len().min(buf.len());
        buf.get(..n) == pattern.get(..n)
    };
    let shown = describe_bytes(buf);

    if let Some(&b0) = buf.first()
        && b0 & 0x80 != 0
    {
        // SSLv2 record: 2-byte length with the high bit set, then msg type 1 (CLIENT-HELLO).
        return match buf.get(2) {
            Some(1) => ParseError::UnsupportedSslv2,
            Some(_) => ParseError::NotTls(format!("unknown binary protocol, first bytes {shown}")),
            None => ParseError::NotTls(format!(
                "first bytes {shown} are not a TLS record (possibly an SSL 2.0 hello)"
            )),
        };
    }
    let looks_like = if matches(b"PRI * HTTP/2") {
        "looks like HTTP/2 with prior knowledge (cleartext h2c); the ingress only accepts mTLS"
    } else if HTTP_METHODS.iter().any(|m| matches(m)) {
        "looks like HTTP; the ingress only accepts TLS from mesh sidecars"
    } else if matches(b"PROXY ") || matches(PROXY_V2_SIG) {
        "looks like a PROXY protocol header; is a load balancer in front configured to send it?"
    } else if matches(b"SSH-") {
        "looks like SSH"
    } else if let Some(&ct @ 20..=24) = buf.first()
        && buf.get(1).is_none_or(|&major| major == 3)
    {
        return ParseError::NotTls(format!(
            "TLS record of content type {ct} ({}) where a handshake record was expected, first bytes {shown}",
            content_type_name(ct)
        ));
    } else if buf
        .iter()
        .take(16)
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        "looks like plain text"
    } else {
        "not a TLS handshake record"
    };
    ParseError::NotTls(format!("{looks_like}, first bytes {shown}"))
}

/// Up to 16 bytes, as an escaped string when printable, hex otherwise.
fn describe_bytes(buf: &[u8]) -> String {
    let head = buf.get(..buf.len().min(16)).unwrap_or_default();
    let printable = head
        .iter()
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .count();
    let ellipsis = if buf.len() > head.len() { "..." } else { "" };
    if printable * 4 >= head.len() * 3 {
        format!("\"{}{ellipsis}\"", head.escape_ascii())
    } else {
        let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        format!("[{}{ellipsis}]", hex.join(" "))
    }
}

fn content_type_name(ct: u8) -> &'static str {
    match ct {
        20 => "change_cipher_spec",
        21 => "alert",
        22 => "handshake",
        23 => "application_data",
        24 => "heartbeat",
        _ => "unknown",
    }
}

fn handshake_type_name(t: u8) -> &'static str {
    match t {
        0 => "hello_request",
        1 => "client_hello",
        2 => "server_hello",
        4 => "new_session_ticket",
        11 => "certificate",
        _ => "not a ClientHello",
    }
}

/// Builders for test ClientHellos, shared with the reader tests.
#[cfg(test)]
pub(crate) mod testutil {
    use std::sync::Arc;

    pub(crate) const MS_SNI: &str = "a601e0c00295a9fbe.backend.80.default.ms";
    pub(crate) const LEGACY_SNI: &[u8] = b"backend{mesh=default,version=v2}";

    /// A ClientHello captured off a socket from a real client, with what it must parse to.
    pub(crate) struct Captured {
        pub name: &'static str,
        pub bytes: &'static [u8],
        pub sni: &'static [u8],
        pub alpn: &'static [&'static [u8]],
    }

    /// The fuzzing seeds under `fuzz/seeds/client_hello/`, captured by
    /// `tests/examples/capture_hellos.rs` (see fuzz/README.md); shared with these tests so the
    /// properties below run on what rustls, openssl and curl really send.
    pub(crate) const CAPTURED: &[Captured] = &[
        Captured {
            name: "rustls-tls13-mtls",
            bytes: include_bytes!("../../../fuzz/seeds/client_hello/rustls-tls13-mtls.bin"),
            sni: MS_SNI.as_bytes(),
            alpn: &[],
        },
        Captured {
            name: "rustls-tls12-alpn-kuma",
            bytes: include_bytes!("../../../fuzz/seeds/client_hello/rustls-tls12-alpn-kuma.bin"),
            sni: MS_SNI.as_bytes(),
            alpn: &[b"kuma"],
        },
        Captured {
            name: "openssl-tls13-legacy-sni",
            bytes: include_bytes!("../../../fuzz/seeds/client_hello/openssl-tls13-legacy-sni.bin"),
            sni: b"backend{mesh=default}",
            alpn: &[b"kuma"],
        },
        Captured {
            name: "openssl-tls13-legacy-sni-4-records",
            bytes: include_bytes!(
                "../../../fuzz/seeds/client_hello/openssl-tls13-legacy-sni-4-records.bin"
            ),
            sni: b"backend{mesh=default}",
            alpn: &[b"kuma"],
        },
        Captured {
            name: "openssl-tls12-mesh-service-sni",
            bytes: include_bytes!(
                "../../../fuzz/seeds/client_hello/openssl-tls12-mesh-service-sni.bin"
            ),
            sni: MS_SNI.as_bytes(),
            alpn: &[],
        },
        Captured {
            name: "curl-tls13-h2",
            bytes: include_bytes!("../../../fuzz/seeds/client_hello/curl-tls13-h2.bin"),
            sni: MS_SNI.as_bytes(),
            alpn: &[b"h2", b"http/1.1"],
        },
        Captured {
            name: "curl-tls12",
            bytes: include_bytes!("../../../fuzz/seeds/client_hello/curl-tls12.bin"),
            sni: MS_SNI.as_bytes(),
            alpn: &[b"http/1.1"],
        },
    ];

    /// The handshake message carried by the records of `bytes` (record headers removed), so it
    /// can be re-fragmented into other record sizes.
    pub(crate) fn handshake_message(bytes: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        let mut rest = bytes;
        while rest.len() >= 5 {
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            msg.extend_from_slice(&rest[5..5 + len]);
            rest = &rest[5 + len..];
        }
        msg
    }

    /// A real ClientHello as rustls sends it (first flight, one or more records).
    pub(crate) fn rustls_hello(sni: &str, alpn: &[&[u8]], tls12_only: bool) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider);
        let builder = if tls12_only {
            builder.with_protocol_versions(&[&rustls::version::TLS12])
        } else {
            builder.with_safe_default_protocol_versions()
        }
        .expect("ring supports the protocol versions");
        let mut config = builder
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).expect("DNS name");
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("write to Vec");
        }
        out
    }

    /// Hand-built ClientHello, for what rustls will not send (non-DNS SNIs, broken fields).
    #[derive(Clone)]
    pub(crate) struct HelloBuilder {
        pub version: u16,
        pub session_id: Vec<u8>,
        pub ciphers: Vec<u8>,
        pub compression: Vec<u8>,
        /// `None` ends the hello after compression_methods (no extensions block at all).
        pub extensions: Option<Vec<(u16, Vec<u8>)>>,
    }

    impl HelloBuilder {
        pub(crate) fn new() -> Self {
            HelloBuilder {
                version: 0x0303,
                session_id: vec![7; 32],
                ciphers: vec![0x13, 0x01, 0xc0, 0x2f],
                compression: vec![0],
                extensions: Some(Vec::new()),
            }
        }

        pub(crate) fn ext(mut self, ext_type: u16, body: Vec<u8>) -> Self {
            self.extensions
                .get_or_insert_with(Vec::new)
                .push((ext_type, body));
            self
        }

        pub(crate) fn sni(self, name: &[u8]) -> Self {
            self.ext(0, server_name_ext(&[(0, name)]))
        }

        pub(crate) fn alpn(self, protocols: &[&[u8]]) -> Self {
            let mut list = Vec::new();
            for p in protocols {
                list.push(u8::try_from(p.len()).expect("short protocol"));
                list.extend_from_slice(p);
            }
            self.ext(16, with_u16_len(&list))
        }

        /// The handshake message: 4-byte header and body.
        pub(crate) fn message(&self) -> Vec<u8> {
            let mut b = Vec::new();
            b.extend_from_slice(&self.version.to_be_bytes());
            b.extend_from_slice(&[0x42; 32]);
            b.push(u8::try_from(self.session_id.len()).expect("short session id"));
            b.extend_from_slice(&self.session_id);
            b.extend_from_slice(&with_u16_len(&self.ciphers));
            b.push(u8::try_from(self.compression.len()).expect("short list"));
            b.extend_from_slice(&self.compression);
            if let Some(exts) = &self.extensions {
                let mut block = Vec::new();
                for (t, body) in exts {
                    block.extend_from_slice(&t.to_be_bytes());
                    block.extend_from_slice(&with_u16_len(body));
                }
                b.extend_from_slice(&with_u16_len(&block));
            }
            handshake(1, &b)
        }

        /// The message in a single TLS record.
        pub(crate) fn bytes(&self) -> Vec<u8> {
            records(&self.message(), &[])
        }
    }

    pub(crate) fn handshake(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).expect("short body").to_be_bytes();
        let mut m = vec![msg_type, len[1], len[2], len[3]];
        m.extend_from_slice(body);
        m
    }

    pub(crate) fn with_u16_len(bytes: &[u8]) -> Vec<u8> {
        let mut v = u16::try_from(bytes.len())
            .expect("fits u16")
            .to_be_bytes()
            .to_vec();
        v.extend_from_slice(bytes);
        v
    }

    pub(crate) fn server_name_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend_from_slice(&with_u16_len(name));
        }
        with_u16_len(&list)
    }

    pub(crate) fn record(content_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut r = vec![content_type, 3, 1];
        r.extend_from_slice(&with_u16_len(payload));
        r
    }

    /// Splits `msg` into handshake records of the given payload sizes; whatever remains goes
    /// into one last record. Zero sizes are skipped (empty handshake records are illegal).
    pub(crate) fn records(msg: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = msg;
        for &size in sizes {
            if rest.is_empty() {
                break;
            }
            if size == 0 {
                continue;
            }
            let (head, tail) = rest.split_at(size.min(rest.len()));
            out.extend_from_slice(&record(22, head));
            rest = tail;
        }
        if !rest.is_empty() {
            out.extend_from_slice(&record(22, rest));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use proptest::prelude::*;

    fn done(buf: &[u8]) -> ClientHello {
        match parse_client_hello(buf) {
            Ok(Progress::Done(h)) => h,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn err(buf: &[u8]) -> ParseError {
        match parse_client_hello(buf) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn assert_malformed(buf: &[u8], needle: &str) {
        match err(buf) {
            ParseError::Malformed(m) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
            e => panic!("expected Malformed({needle}), got {e:?}"),
        }
    }

    fn assert_prefixes_need_more(buf: &[u8]) {
        for n in 0..buf.len() {
            assert_eq!(
                parse_client_hello(&buf[..n]),
                Ok(Progress::NeedMore),
                "prefix of {n}/{} bytes",
                buf.len()
            );
        }
    }

    #[test]
    fn rustls_tls13_hello_with_mesh_service_sni() {
        let bytes = rustls_hello(MS_SNI, &[b"kuma"], false);
        let hello = done(&bytes);
        assert_eq!(hello.sni.as_deref(), Some(MS_SNI.as_bytes()));
        assert_eq!(hello.alpn, vec![b"kuma".to_vec()]);
        assert_eq!(hello.legacy_version, 0x0303);
        assert_eq!(hello.records_len, bytes.len());
        assert_prefixes_need_more(&bytes);
    }

    #[test]
    fn rustls_tls12_only_hello() {
        let bytes = rustls_hello(MS_SNI, &[b"kuma", b"h2"], true);
        let hello = done(&bytes);
        assert_eq!(hello.sni.as_deref(), Some(MS_SNI.as_bytes()));
        assert_eq!(hello.alpn, vec![b"kuma".to_vec(), b"h2".to_vec()]);
        assert_eq!(hello.records_len, bytes.len());
    }

    #[test]
    fn legacy_tag_sni_is_accepted_verbatim() {
        let bytes = HelloBuilder::new().sni(LEGACY_SNI).alpn(&[b"kuma"]).bytes();
        let hello = done(&bytes);
        assert_eq!(hello.sni.as_deref(), Some(LEGACY_SNI));
        assert_eq!(hello.alpn, vec![b"kuma".to_vec()]);
        assert_eq!(hello.records_len, bytes.len());
    }

    #[test]
    fn legacy_sni_fragmented_across_three_records() {
        let msg = HelloBuilder::new()
            .sni(LEGACY_SNI)
            .alpn(&[b"kuma"])
            .message();
        let third = msg.len() / 3;
        let bytes = records(&msg, &[third, third]);
        assert_eq!(bytes.len(), msg.len() + 3 * 5, "three records");
        let hello = done(&bytes);
        assert_eq!(hello.sni.as_deref(), Some(LEGACY_SNI));
        assert_eq!(hello.records_len, bytes.len());
        assert_prefixes_need_more(&bytes);
    }

    #[test]
    fn handshake_header_split_across_records() {
        let msg = HelloBuilder::new().sni(LEGACY_SNI).message();
        let bytes = records(&msg, &[1, 2, 1, 10]);
        assert_eq!(done(&bytes).sni.as_deref(), Some(LEGACY_SNI));
        assert_prefixes_need_more(&bytes);
    }

    #[test]
    fn any_bytes_in_host_name() {
        let name: &[u8] = b"\x00\xff{a=b,c=d} \r\n\xc3\xa9";
        assert_eq!(
            done(&HelloBuilder::new().sni(name).bytes()).sni.as_deref(),
            Some(name)
        );
    }

    #[test]
    fn bytes_after_the_hello_are_not_part_of_it() {
        let hello = HelloBuilder::new().sni(LEGACY_SNI).bytes();
        let mut bytes = hello.clone();
        bytes.extend_from_slice(&record(20, &[1])); // TLS 1.3 compat change_cipher_spec
        bytes.extend_from_slice(b"early data");
        assert_eq!(done(&bytes).records_len, hello.len());
    }

    #[test]
    fn no_extensions_means_no_sni() {
        let mut b = HelloBuilder::new();
        b.extensions = None;
        let hello = done(&b.bytes());
        assert_eq!((hello.sni, hello.alpn), (None, vec![]));
        let hello = done(&HelloBuilder::new().ext(0xff01, vec![0]).bytes());
        assert_eq!(hello.sni, None);
    }

    #[test]
    fn server_name_without_host_name_entry_means_no_sni() {
        let ext = server_name_ext(&[(7, b"opaque")]);
        assert_eq!(done(&HelloBuilder::new().ext(0, ext).bytes()).sni, None);
    }

    #[test]
    fn first_host_name_after_unknown_entries() {
        let ext = server_name_ext(&[(7, b"x"), (0, LEGACY_SNI)]);
        let hello = done(&HelloBuilder::new().ext(0, ext).bytes());
        assert_eq!(hello.sni.as_deref(), Some(LEGACY_SNI));
    }

    #[test]
    fn http_request_is_not_tls() {
        for input in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"G",
            b"POS",
            b"CONNECT x:443",
        ] {
            match err(input) {
                ParseError::NotTls(m) => assert!(m.contains("looks like HTTP"), "{m}"),
                e => panic!("{input:?}: {e:?}"),
            }
        }
        match err(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") {
            ParseError::NotTls(m) => assert!(m.contains("HTTP/2"), "{m}"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn other_protocols_are_described() {
        let cases: [(&[u8], &str); 5] = [
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "PROXY protocol"),
            (b"\r\n\r\n\0\r\nQUIT\n\x21\x11", "PROXY protocol"),
            (b"SSH-2.0-OpenSSH_9.6\r\n", "SSH"),
            (&[21, 3, 3, 0, 2, 2, 40], "alert"),
            (&[0, 1, 2, 3], "[00 01 02 03]"),
        ];
        for (input, needle) in cases {
            match err(input) {
                ParseError::NotTls(m) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
                e => panic!("{input:?}: {e:?}"),
            }
        }
        assert!(matches!(err(&[22, 4, 0, 0, 1]), ParseError::NotTls(_)));
    }

    #[test]
    fn sslv2_hello_is_unsupported() {
        // 2-byte SSLv2 header (high bit set), CLIENT-HELLO, version 3.1, then lengths.
        let v2 = [
            0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
        ];
        assert_eq!(err(&v2), ParseError::UnsupportedSslv2);
        assert!(matches!(err(&v2[..2]), ParseError::NotTls(_)));
    }

    #[test]
    fn oversize_length_is_refused_from_the_header_alone() {
        let len = MAX_CLIENT_HELLO_LEN + 1;
        let hdr = [
            22,
            3,
            1,
            0x40,
            0x00,
            1,
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
        ];
        assert_eq!(err(&hdr), ParseError::TooLarge(len));
        assert_eq!(
            err(&[22, 3, 1, 0x40, 0, 1, 0xff, 0xff, 0xff]),
            ParseError::TooLarge(0xff_ffff)
        );
        // Exactly at the limit is still a valid prefix.
        let ok = [22, 3, 1, 0x40, 0x00, 1, 0x01, 0x00, 0x00];
        assert_eq!(parse_client_hello(&ok), Ok(Progress::NeedMore));
    }

    #[test]
    fn record_framing_errors_are_malformed() {
        assert_malformed(&[22, 3, 1, 0, 0], "empty");
        assert_malformed(&[22, 3, 1, 0x41, 0x01], "record limit");
        let msg = HelloBuilder::new().sni(LEGACY_SNI).message();
        let mut two = records(&msg[..10], &[]);
        two.extend_from_slice(&record(23, &msg[10..]));
        assert_malformed(&two, "content type 23 (application_data)");
        let mut bad_version = records(&msg[..10], &[]);
        bad_version.extend_from_slice(&[22, 2, 0]);
        assert_malformed(&bad_version, "version 2.0");
        assert_malformed(
            &record(22, &handshake(2, &[0; 40])),
            "type 2 (server_hello)",
        );
    }

    #[test]
    fn field_errors_are_malformed() {
        let base = HelloBuilder::new().sni(LEGACY_SNI);
        let with = |f: &dyn Fn(&mut HelloBuilder)| {
            let mut b = base.clone();
            f(&mut b);
            b.bytes()
        };
        assert_malformed(&with(&|b| b.session_id = vec![0; 33]), "session_id is 33");
        assert_malformed(
            &with(&|b| b.ciphers = vec![0x13, 0x01, 0xc0]),
            "cipher_suites length is 3",
        );
        assert_malformed(&with(&|b| b.ciphers = vec![]), "cipher_suites length is 0");
        assert_malformed(
            &with(&|b| b.compression = vec![]),
            "compression_methods is empty",
        );
        assert_malformed(&with(&|b| b.version = 0x0200), "client_version");

        let dup = base.clone().sni(b"other").bytes();
        assert_malformed(&dup, "server_name extension appears twice");
        let two_hosts = HelloBuilder::new()
            .ext(0, server_name_ext(&[(0, b"a"), (0, b"b")]))
            .bytes();
        assert_malformed(&two_hosts, "two host_name");
        assert_malformed(&HelloBuilder::new().sni(b"").bytes(), "host_name is empty");
        assert_malformed(
            &HelloBuilder::new().ext(0, vec![0, 0]).bytes(),
            "server_name list",
        );
        assert_malformed(
            &HelloBuilder::new()
                .ext(0, vec![0, 9, 0, 0, 1, b'a'])
                .bytes(),
            "server_name list",
        );
        assert_malformed(
            &HelloBuilder::new().alpn(&[b""]).bytes(),
            "ALPN protocol name is empty",
        );
        assert_malformed(
            &HelloBuilder::new().alpn(&[b"kuma"]).alpn(&[b"h2"]).bytes(),
            "ALPN extension appears twice",
        );
    }

    #[test]
    fn length_fields_that_overrun_are_malformed() {
        let msg = HelloBuilder::new().sni(LEGACY_SNI).message();
        // Offsets in the message: 4 header, 2 version, 32 random, 1+32 session id, 2+4 ciphers,
        // 1+1 compression, then the 2-byte extensions length.
        let ext_len_at = 4 + 2 + 32 + 33 + 6 + 2;
        let mut longer = msg.clone();
        longer[ext_len_at + 1] += 1;
        assert_malformed(&records(&longer, &[]), "extensions block declares");
        // An extension whose length runs past the extensions block.
        let mut ext_overrun = msg.clone();
        ext_overrun[ext_len_at + 2 + 3] += 1;
        assert_malformed(&records(&ext_overrun, &[]), "extension 0 declares");
        // Handshake length shorter than its fields.
        let mut short = msg.clone();
        short[3] = 20;
        assert_malformed(&records(&short[..24], &[]), "random needs 32 bytes");
        // Trailing garbage after the extensions, inside the declared message.
        let mut b = HelloBuilder::new().sni(LEGACY_SNI).message();
        b.push(0);
        b[3] += 1;
        assert_malformed(&records(&b, &[]), "extensions block declares");
    }

    #[test]
    fn errors_surface_before_the_record_is_complete() {
        let mut b = HelloBuilder::new().sni(LEGACY_SNI);
        b.session_id = vec![0; 33];
        let bytes = b.bytes();
        // Session id length sits at byte 5 + 4 + 2 + 32.
        assert_malformed(&bytes[..5 + 4 + 2 + 32 + 1], "session_id is 33");
    }

    #[test]
    fn need_more_hint_never_skips_a_decision() {
        let msg = HelloBuilder::new()
            .sni(LEGACY_SNI)
            .alpn(&[b"kuma"])
            .message();
        let bytes = records(&msg, &[1, 3, 50]);
        let mut n = 0;
        loop {
            match parse_step(&bytes[..n]) {
                Ok(Step::NeedMore { at_least }) => {
                    assert!(at_least > n && at_least <= bytes.len(), "{at_least} at {n}");
                    n = at_least;
                }
                Ok(Step::Done(h)) => {
                    assert_eq!(h.records_len, bytes.len());
                    assert_eq!(n, bytes.len());
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Parses the way the reader does: only again once the buffer reaches the last hint.
    fn parse_at_hints(bytes: &[u8]) -> Result<Progress, ParseError> {
        let mut n = 0;
        loop {
            match parse_step(&bytes[..n])? {
                Step::Done(h) => return Ok(Progress::Done(h)),
                Step::NeedMore { at_least } if at_least > bytes.len() => {
                    return Ok(Progress::NeedMore);
                }
                Step::NeedMore { at_least } => n = at_least,
            }
        }
    }

    /// Found by the `client_hello` fuzz target: after the first byte the hint jumped to the
    /// end of the record header, so a peer sending `16 00 16` then EOF was "closed early"
    /// (and one that stalled, a timeout) rather than refused as not TLS at its second byte.
    /// The same held for a bad content type of a later record and for the handshake type.
    #[test]
    fn need_more_hint_never_skips_a_header_check() {
        let second = {
            let mut b = records(&HelloBuilder::new().sni(LEGACY_SNI).message()[..10], &[]);
            b.push(23);
            b
        };
        let cases: [&[u8]; 5] = [
            &[22, 0, 22],
            &[22, 4],
            &second,
            &[22, 3, 1, 0, 64, 2],
            &[22, 3, 1, 0, 64, 2, 0],
        ];
        for bytes in cases {
            // The message may know less (a minor version not yet in), not the kind of error.
            let (whole, hinted) = (parse_client_hello(bytes), parse_at_hints(bytes));
            match (&whole, &hinted) {
                (Err(a), Err(b)) => assert_eq!(
                    std::mem::discriminant(a),
                    std::mem::discriminant(b),
                    "{bytes:?}: {a:?} vs {b:?}"
                ),
                _ => panic!("{bytes:?}: whole {whole:?}, at the hints {hinted:?}"),
            }
        }
    }

    /// A valid hand-built hello with arbitrary SNI bytes, ALPN, padding and fragmentation.
    fn arb_hello() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (
            proptest::collection::vec(any::<u8>(), 1..300),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..20), 0..4),
            0usize..600,
            proptest::collection::vec(0usize..400, 0..6),
            any::<bool>(),
        )
            .prop_map(|(sni, alpn, padding, frags, sni_last)| {
                let alpn: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
                let mut b = HelloBuilder::new();
                if !sni_last {
                    b = b.sni(&sni);
                }
                if !alpn.is_empty() {
                    b = b.alpn(&alpn);
                }
                b = b.ext(21, vec![0; padding]);
                if sni_last {
                    b = b.sni(&sni);
                }
                (records(&b.message(), &frags), sni)
            })
    }

    /// Rustls hellos are costly to build; one per protocol setting is enough.
    fn rustls_hellos() -> &'static [Vec<u8>; 2] {
        static HELLOS: std::sync::OnceLock<[Vec<u8>; 2]> = std::sync::OnceLock::new();
        HELLOS.get_or_init(|| {
            [
                rustls_hello(MS_SNI, &[b"kuma"], false),
                rustls_hello(MS_SNI, &[b"kuma"], true),
            ]
        })
    }

    /// Feeds `bytes` in chunks of the given sizes, as a reader would, checking every
    /// intermediate answer is NeedMore; returns the final answer.
    fn feed(bytes: &[u8], chunks: &[usize]) -> Result<Progress, ParseError> {
        let mut end = 0;
        for &c in chunks {
            end = (end + c).min(bytes.len());
            if end == bytes.len() {
                break;
            }
            assert_eq!(parse_client_hello(&bytes[..end]), Ok(Progress::NeedMore));
        }
        parse_client_hello(bytes)
    }

    #[test]
    fn captured_hellos_of_real_clients_parse() {
        for c in CAPTURED {
            let hello = done(c.bytes);
            assert_eq!(hello.sni.as_deref(), Some(c.sni), "{}", c.name);
            let alpn: Vec<Vec<u8>> = c.alpn.iter().map(|p| p.to_vec()).collect();
            assert_eq!(hello.alpn, alpn, "{}", c.name);
            assert_eq!(hello.records_len, c.bytes.len(), "{}", c.name);
        }
    }

    #[test]
    fn every_truncation_of_a_captured_hello_is_incomplete() {
        for c in CAPTURED {
            for n in 0..c.bytes.len() {
                assert_eq!(
                    parse_client_hello(&c.bytes[..n]),
                    Ok(Progress::NeedMore),
                    "{}: prefix of {n}/{} bytes",
                    c.name,
                    c.bytes.len()
                );
            }
        }
    }

    proptest! {
        /// TCP segmentation: whatever the segment sizes, every intermediate answer is NeedMore
        /// and the last is the same hello.
        #[test]
        fn prop_captured_hello_any_segmentation(
            which in 0..CAPTURED.len(),
            segments in proptest::collection::vec(1usize..64, 0..80),
        ) {
            let c = &CAPTURED[which];
            let whole = parse_client_hello(c.bytes);
            prop_assert_eq!(feed(c.bytes, &segments), whole);
        }

        /// TLS record fragmentation: the same handshake message cut into any record sizes gives
        /// the same SNI and ALPN, and every truncation of the result is NeedMore, never an error
        /// or a different SNI.
        #[test]
        fn prop_captured_hello_any_record_fragmentation(
            which in 0..CAPTURED.len(),
            frags in proptest::collection::vec(1usize..120, 0..12),
            segments in proptest::collection::vec(1usize..200, 0..20),
        ) {
            let c = &CAPTURED[which];
            let bytes = records(&handshake_message(c.bytes), &frags);
            let Ok(Progress::Done(hello)) = feed(&bytes, &segments) else {
                panic!("{}: re-fragmented hello did not parse", c.name)
            };
            prop_assert_eq!(hello.sni.as_deref(), Some(c.sni));
            prop_assert_eq!(hello.alpn.len(), c.alpn.len());
            prop_assert_eq!(hello.records_len, bytes.len());
            for n in 0..bytes.len() {
                prop_assert_eq!(parse_client_hello(&bytes[..n]), Ok(Progress::NeedMore), "prefix {}", n);
            }
        }
    }

    proptest! {
        #[test]
        fn prop_any_split_gives_the_same_result(
            (bytes, sni) in arb_hello(),
            chunks in proptest::collection::vec(1usize..200, 0..40),
        ) {
            let whole = parse_client_hello(&bytes);
            let Ok(Progress::Done(hello)) = &whole else { panic!("{whole:?}") };
            prop_assert_eq!(hello.sni.as_deref(), Some(sni.as_slice()));
            prop_assert_eq!(hello.records_len, bytes.len());
            prop_assert_eq!(feed(&bytes, &chunks), whole);
        }

        #[test]
        fn prop_rustls_hello_any_split(which in 0usize..2, chunks in proptest::collection::vec(1usize..300, 0..20)) {
            let bytes = &rustls_hellos()[which];
            let whole = parse_client_hello(bytes);
            prop_assert!(matches!(&whole, Ok(Progress::Done(h)) if h.sni.as_deref() == Some(MS_SNI.as_bytes())));
            prop_assert_eq!(feed(bytes, &chunks), whole);
        }

        #[test]
        fn prop_every_strict_prefix_needs_more((bytes, _) in arb_hello()) {
            for n in 0..bytes.len() {
                prop_assert_eq!(parse_client_hello(&bytes[..n]), Ok(Progress::NeedMore), "prefix {}", n);
            }
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_client_hello(&bytes);
        }

        #[test]
        fn prop_tls_looking_bytes_never_panic(
            minor in any::<u8>(),
            len in any::<u16>(),
            hs_type in prop_oneof![Just(1u8), any::<u8>()],
            rest in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut bytes = vec![22, 3, minor];
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.push(hs_type);
            bytes.extend_from_slice(&rest);
            let _ = parse_client_hello(&bytes);
        }

        #[test]
        fn prop_corrupted_hello_never_panics_or_overreads(
            (mut bytes, _) in arb_hello(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Ok(Progress::Done(h)) = parse_client_hello(&bytes) {
                prop_assert!(h.records_len <= bytes.len());
            }
        }
    }
}
