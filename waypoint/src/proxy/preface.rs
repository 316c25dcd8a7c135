//! Which HTTP a connection speaks, told from its first bytes without
//! taking them: hyper then reads the whole request into its own buffer,
//! with no layer in front replaying a preface (that layer's short first
//! read made hyper grow its read buffer to 16 KiB on every connection).

use std::io;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// The protocol of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (or anything else: hyper's HTTP/1 parser refuses what is
    /// not HTTP).
    Http1,
    /// HTTP/2 with prior knowledge (h2c): the connection preface came first.
    Http2,
}

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long a connection that began like the preface may take to send the
/// rest of it before it is served as HTTP/1.1 (which then refuses it).
const PATIENCE: Duration = Duration::from_secs(10);
/// The wait between looks at a connection whose preface is incomplete.
const NAP: Duration = Duration::from_millis(1);

/// The protocol `tcp` speaks, once its first bytes tell (or it closes).
pub async fn detect(tcp: &TcpStream) -> io::Result<Protocol> {
    let mut seen = [0u8; PREFACE.len()];
    let give_up = Instant::now() + PATIENCE;
    loop {
        let n = tcp.peek(&mut seen).await?;
        if let Some(protocol) = classify(&seen[..n]) {
            return Ok(protocol);
        }
        if Instant::now() >= give_up {
            return Ok(Protocol::Http1);
        }
        // The bytes stay unread, so the socket stays readable: wait apart.
        tokio::time::sleep(NAP).await;
    }
}

/// The protocol the first bytes `seen` show, or `None` while they are an
/// incomplete HTTP/2 preface. No bytes (the client closed) is HTTP/1.1:
/// hyper ends the connection.
fn classify(seen: &[u8]) -> Option<Protocol> {
    if seen.len() == PREFACE.len() && seen == PREFACE {
        Some(Protocol::Http2)
    } else if !seen.is_empty() && PREFACE.starts_with(seen) {
        None
    } else {
        Some(Protocol::Http1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_tells_http2_and_anything_else_http1() {
        assert_eq!(classify(PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"\x16\x03\x01\x02\x00\x01"), Some(Protocol::Http1));
        assert_eq!(classify(b""), Some(Protocol::Http1));
    }

    #[test]
    fn an_incomplete_preface_waits_for_more() {
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(&PREFACE[..23]), None);
    }
}
