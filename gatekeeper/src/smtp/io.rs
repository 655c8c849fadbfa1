//! Bounded line reading over a (possibly TLS) connection.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};

/// Anything a session can run over: plain TCP, or TLS after STARTTLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub type Conn = BufReader<Box<dyn Stream>>;

/// Read buffer of a client connection: four times the longest command or
/// data line (RFC 5321: 1000 bytes), and half of tokio's default, which
/// every idle connection would otherwise hold.
pub const CLIENT_READ_BUFFER: usize = 4096;

pub fn client_conn(stream: Box<dyn Stream>) -> Conn {
    BufReader::with_capacity(CLIENT_READ_BUFFER, stream)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The line with its terminator (LF, possibly preceded by CR).
    Complete(Vec<u8>),
    /// Longer than allowed; its bytes up to and including the LF were discarded.
    TooLong,
    /// The peer closed the connection (any partial line is dropped).
    Eof,
}

/// Reads one LF-terminated line of at most `max` bytes (terminator included).
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(Line::Eof);
        }
        let (chunk_len, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if !too_long {
            if line.len() + chunk_len > max {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(&available[..chunk_len]);
            }
        }
        reader.consume(chunk_len);
        if done {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete(line)
            });
        }
    }
}

/// Strips the CRLF (or bare LF) of a command line.
pub fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A stream that is never readable or writable; stands in while the real
/// stream is handed to the TLS handshake.
pub struct Detached;

impl AsyncRead for Detached {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()))
    }
}

impl AsyncWrite for Detached {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_bounded_lines() {
        let input: &[u8] = b"EHLO a\r\nbare\nxxxxxxxxxxxxxxxxxxxx\r\npartial";
        let mut reader = BufReader::with_capacity(4, input);
        assert_eq!(
            read_line(&mut reader, 16).await.unwrap(),
            Line::Complete(b"EHLO a\r\n".to_vec())
        );
        assert_eq!(
            read_line(&mut reader, 16).await.unwrap(),
            Line::Complete(b"bare\n".to_vec())
        );
        assert_eq!(read_line(&mut reader, 16).await.unwrap(), Line::TooLong);
        assert_eq!(read_line(&mut reader, 16).await.unwrap(), Line::Eof);
    }
}
