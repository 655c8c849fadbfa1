//! Bounded line framing for the control socket: a line has a size cap and
//! the peer an idle limit, so one client cannot pin unbounded memory or a
//! connection slot forever.

use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// What the next read produced.
#[derive(Debug)]
pub enum Frame {
    /// One request line, without its newline (the last line may lack one).
    Line(Vec<u8>),
    /// The peer closed the connection between requests.
    Closed,
    /// The line grew past the cap before its newline arrived.
    TooLong,
    /// No byte arrived for the idle limit.
    Idle,
    Failed(std::io::Error),
}

/// Reads one line of at most `max_bytes`; `idle` bounds every wait for more bytes.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max_bytes: usize,
    idle: Duration,
) -> Frame {
    let mut line = Vec::new();
    loop {
        let available = match tokio::time::timeout(idle, reader.fill_buf()).await {
            Err(_) => return Frame::Idle,
            Ok(Err(e)) => return Frame::Failed(e),
            Ok(Ok(available)) => available,
        };
        if available.is_empty() {
            return if line.is_empty() {
                Frame::Closed
            } else {
                Frame::Line(line)
            };
        }
        let (body, used, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..end], end + 1, true),
            None => (available, available.len(), false),
        };
        if line.len() + body.len() > max_bytes {
            return Frame::TooLong;
        }
        line.extend_from_slice(body);
        reader.consume(used);
        if complete {
            return Frame::Line(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, BufReader};

    const IDLE: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn splits_lines_and_keeps_an_unterminated_last_one() {
        let mut reader = BufReader::with_capacity(4, &b"ab\ncdefgh\n\nlast"[..]);
        let mut lines = Vec::new();
        loop {
            match read_line(&mut reader, 16, IDLE).await {
                Frame::Line(line) => lines.push(String::from_utf8(line).unwrap()),
                Frame::Closed => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(lines, ["ab", "cdefgh", "", "last"]);
    }

    #[tokio::test]
    async fn the_cap_counts_the_line_not_the_connection() {
        let input = b"12345678\n123456789\n";
        let mut reader = BufReader::with_capacity(3, &input[..]);
        assert!(matches!(read_line(&mut reader, 8, IDLE).await, Frame::Line(l) if l.len() == 8));
        assert!(matches!(
            read_line(&mut reader, 8, IDLE).await,
            Frame::TooLong
        ));
    }

    #[tokio::test]
    async fn silence_is_idle_not_a_hang() {
        let (client, server) = tokio::io::duplex(64);
        let mut reader = BufReader::new(server);
        let mut client = client;
        client.write_all(b"partial").await.unwrap();
        assert!(matches!(
            read_line(&mut reader, 64, Duration::from_millis(50)).await,
            Frame::Idle
        ));
        drop(client);
    }
}
