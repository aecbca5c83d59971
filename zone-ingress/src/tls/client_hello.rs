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
            return Ok(Reassembled {
                msg,
                msg_len,
                records_len: None,
                at_least: pos + RECORD_HEADER_LEN,
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
                // Parse again as soon as the handshake header is in, so an oversized length is
                // refused without waiting for the rest of the record.
                (body_start + header_missing).min(body_end)
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
        let minor = header.get(2).copied().unwrap_or(0);
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
