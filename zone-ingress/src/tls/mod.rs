//! TLS ClientHello handling: the ingress reads (never terminates) the client's TLS handshake to
//! learn the SNI, then replays the consumed bytes upstream.

pub mod client_hello;
pub mod reader;

pub use client_hello::{
    ClientHello, MAX_CLIENT_HELLO_LEN, MAX_RECORD_LEN, ParseError, Progress, parse_client_hello,
};
pub use reader::{HelloError, HelloLimits, ReadHello, read_client_hello};
