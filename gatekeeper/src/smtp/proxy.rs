//! The PROXY protocol header (v1 text, v2 binary) a load balancer in
//! `proxy_protocol_from` sends before the SMTP stream, naming the real client.
//!
//! [`parse`] is pure (the `ppp` crate does the parsing); [`read_header`]
//! consumes exactly the header's bytes, so whatever the client sent after it
//! stays buffered for the session, and the pre-greet check still sees it.

use std::net::SocketAddr;

use ppp::{v1, v2, PartialResult};
use tokio::io::AsyncBufReadExt;

use super::io::Conn;

/// The longest v1 header, CRLF included (the spec).
const MAX_V1_HEADER: usize = 107;
/// v2 headers may carry TLVs; a longer one than this is refused.
pub const MAX_V2_HEADER: usize = 4096;
/// The fixed part of a v2 header, before its addresses and TLVs.
const V2_FIXED: usize = 16;
const V1_PREFIX: &[u8] = b"PROXY ";

/// Whom a complete header speaks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    /// A proxied TCP connection from this client.
    Client(SocketAddr),
    /// The balancer's own connection (v2 `LOCAL`, v1 `UNKNOWN`): its health checks.
    Local,
}

/// What the bytes read so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A prefix of a header: read more.
    Incomplete,
    /// A header of `len` bytes; anything after it is SMTP.
    Header { len: usize, source: Source },
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("no PROXY protocol header (the connection did not start with one)")]
    Missing,
    #[error("malformed PROXY v1 header: {0}")]
    V1(v1::BinaryParseError),
    #[error("malformed PROXY v2 header: {0}")]
    V2(v2::ParseError),
    #[error("PROXY v2 header longer than {MAX_V2_HEADER} bytes")]
    TooLong,
    #[error("PROXY v2 header for an unsupported transport or address family ({0})")]
    Unsupported(&'static str),
    #[error("connection closed inside the PROXY header")]
    Closed,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Parses the start of a connection from a trusted balancer.
pub fn parse(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    if bytes.first() == Some(&b'P') {
        parse_v1(bytes)
    } else {
        parse_v2(bytes)
    }
}

/// `ppp` takes some prefixes of a valid v1 line for errors (a port cut
/// short), so it only ever sees whole lines: up to the first LF.
fn parse_v1(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    if !(bytes.starts_with(V1_PREFIX) || V1_PREFIX.starts_with(bytes)) {
        return Err(HeaderError::Missing);
    }
    let line = match bytes.iter().position(|&b| b == b'\n') {
        Some(end) => &bytes[..=end],
        None if bytes.len() < MAX_V1_HEADER => return Ok(Parsed::Incomplete),
        None => bytes,
    };
    let header = v1::Header::try_from(line).map_err(HeaderError::V1)?;
    let source = match header.addresses {
        v1::Addresses::Tcp4(a) => {
            Source::Client(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        v1::Addresses::Tcp6(a) => {
            Source::Client(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        v1::Addresses::Unknown => Source::Local,
    };
    Ok(Parsed::Header {
        len: header.header.len(),
        source,
    })
}

fn parse_v2(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    match v2::Header::try_from(bytes) {
        Ok(header) => Ok(Parsed::Header {
            len: header.len(),
            source: v2_source(&header)?,
        }),
        Err(v2::ParseError::Partial(_, payload)) if V2_FIXED + payload > MAX_V2_HEADER => {
            Err(HeaderError::TooLong)
        }
        Err(e) if e.is_incomplete() => Ok(Parsed::Incomplete),
        Err(v2::ParseError::Prefix) => Err(HeaderError::Missing),
        Err(e) => Err(HeaderError::V2(e)),
    }
}

fn v2_source(header: &v2::Header) -> Result<Source, HeaderError> {
    if header.command == v2::Command::Local {
        return Ok(Source::Local);
    }
    if header.protocol != v2::Protocol::Stream {
        return Err(HeaderError::Unsupported("not TCP"));
    }
    match &header.addresses {
        v2::Addresses::IPv4(a) => Ok(Source::Client(SocketAddr::new(
            a.source_address.into(),
            a.source_port,
        ))),
        v2::Addresses::IPv6(a) => Ok(Source::Client(SocketAddr::new(
            a.source_address.into(),
            a.source_port,
        ))),
        v2::Addresses::Unix(_) => Err(HeaderError::Unsupported("unix socket")),
        v2::Addresses::Unspecified => Err(HeaderError::Unsupported("unspecified")),
    }
}

/// Reads the header, consuming exactly its bytes. The caller bounds the time.
pub async fn read_header(conn: &mut Conn) -> Result<Source, HeaderError> {
    let mut seen = Vec::new();
    loop {
        let chunk = conn.fill_buf().await?;
        if chunk.is_empty() {
            return Err(HeaderError::Closed);
        }
        let before = seen.len();
        let taken = chunk.len().min(MAX_V2_HEADER - before);
        seen.extend_from_slice(&chunk[..taken]);
        match parse(&seen)? {
            Parsed::Header { len, source } => {
                conn.consume(len - before);
                return Ok(source);
            }
            Parsed::Incomplete => conn.consume(taken),
        }
    }
}

/// Whether a client's first bytes look like a PROXY header (from a peer
/// outside `proxy_protocol_from`, which must not get to name its address).
pub fn looks_like_header(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PROXY ") || bytes.starts_with(v2::PROTOCOL_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn v2_header(command: v2::Command, protocol: v2::Protocol, src: &str, dst: &str) -> Vec<u8> {
        v2::Builder::with_addresses(v2::Version::Two | command, protocol, (addr(src), addr(dst)))
            .build()
            .unwrap()
    }

    #[test]
    fn v1_tcp4_and_tcp6_name_the_client() {
        let text = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO x\r\n";
        assert_eq!(
            parse(text).unwrap(),
            Parsed::Header {
                len: 44,
                source: Source::Client(addr("192.0.2.7:40000"))
            }
        );
        let text = b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 25\r\n";
        assert_eq!(
            parse(text).unwrap(),
            Parsed::Header {
                len: text.len(),
                source: Source::Client(addr("[2001:db8::7]:40001"))
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Parsed::Header {
                len: 15,
                source: Source::Local
            }
        );
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n".to_vec();
        let v2 = v2_header(
            v2::Command::Proxy,
            v2::Protocol::Stream,
            "[2001:db8::7]:40000",
            "[2001:db8::1]:25",
        );
        for header in [v1, v2] {
            for end in 0..header.len() {
                assert_eq!(
                    parse(&header[..end]).unwrap(),
                    Parsed::Incomplete,
                    "{:?}",
                    &header[..end]
                );
            }
            assert!(
                matches!(parse(&header), Ok(Parsed::Header { len, .. }) if len == header.len())
            );
        }
    }

    #[test]
    fn v2_proxy_local_and_unsupported() {
        let tcp = v2_header(
            v2::Command::Proxy,
            v2::Protocol::Stream,
            "192.0.2.7:40000",
            "198.51.100.1:25",
        );
        let mut with_smtp = tcp.clone();
        with_smtp.extend_from_slice(b"EHLO x\r\n");
        assert_eq!(
            parse(&with_smtp).unwrap(),
            Parsed::Header {
                len: tcp.len(),
                source: Source::Client(addr("192.0.2.7:40000"))
            }
        );
        let local = v2_header(
            v2::Command::Local,
            v2::Protocol::Stream,
            "198.51.100.1:1",
            "198.51.100.1:25",
        );
        assert!(matches!(
            parse(&local),
            Ok(Parsed::Header {
                source: Source::Local,
                ..
            })
        ));
        let udp = v2_header(
            v2::Command::Proxy,
            v2::Protocol::Datagram,
            "192.0.2.7:40000",
            "198.51.100.1:25",
        );
        assert!(matches!(parse(&udp), Err(HeaderError::Unsupported(_))));
        let mut unspec = v2::PROTOCOL_PREFIX.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0, 0]);
        assert!(matches!(parse(&unspec), Err(HeaderError::Unsupported(_))));
    }

    #[test]
    fn garbage_and_oversize_are_refused() {
        assert!(matches!(
            parse(b"EHLO client\r\n"),
            Err(HeaderError::Missing)
        ));
        assert!(matches!(parse(b"\0"), Err(HeaderError::Missing)));
        assert!(matches!(
            parse(b"PROXY TCP4 192.0.2.999 198.51.100.1 1 25\r\n"),
            Err(HeaderError::V1(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 1 25\n"),
            Err(HeaderError::V1(_))
        ));
        // v1 without its CRLF within 107 bytes.
        let long = format!("PROXY UNKNOWN {}", "x".repeat(200));
        assert!(matches!(parse(long.as_bytes()), Err(HeaderError::V1(_))));
        // v2 announcing more than the bound is refused before it is read.
        let mut huge = v2::PROTOCOL_PREFIX.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&huge), Err(HeaderError::TooLong)));
        let mut bad_version = v2::PROTOCOL_PREFIX.to_vec();
        bad_version.extend_from_slice(&[0x31, 0x11, 0, 12]);
        assert!(matches!(parse(&bad_version), Err(HeaderError::V2(_))));
    }

    #[test]
    fn looks_like_header_spots_both_versions() {
        assert!(looks_like_header(b"PROXY TCP4 192.0.2.7"));
        assert!(looks_like_header(&v2_header(
            v2::Command::Proxy,
            v2::Protocol::Stream,
            "192.0.2.7:1",
            "198.51.100.1:25"
        )));
        assert!(!looks_like_header(b"EHLO proxy.test\r\n"));
    }

    /// The header arrives a byte at a time; the SMTP after it is left unread.
    #[tokio::test]
    async fn read_header_consumes_exactly_the_header() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut conn: Conn = BufReader::new(Box::new(server));
        let reading = tokio::spawn(async move {
            let source = read_header(&mut conn).await.unwrap();
            let mut rest = [0u8; 8];
            conn.read_exact(&mut rest).await.unwrap();
            (source, rest)
        });
        let mut bytes = v2_header(
            v2::Command::Proxy,
            v2::Protocol::Stream,
            "192.0.2.7:40000",
            "198.51.100.1:25",
        );
        bytes.extend_from_slice(b"EHLO x\r\n");
        for byte in &bytes[..bytes.len() - 8] {
            client.write_all(&[*byte]).await.unwrap();
            tokio::task::yield_now().await;
        }
        client.write_all(&bytes[bytes.len() - 8..]).await.unwrap();
        let (source, rest) = reading.await.unwrap();
        assert_eq!(source, Source::Client(addr("192.0.2.7:40000")));
        assert_eq!(&rest, b"EHLO x\r\n");
    }

    #[tokio::test]
    async fn read_header_stops_at_eof() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut conn: Conn = BufReader::new(Box::new(server));
        client.write_all(b"PROXY TCP4 192.0.2.7").await.unwrap();
        drop(client);
        assert!(matches!(
            read_header(&mut conn).await,
            Err(HeaderError::Closed)
        ));
    }
}
