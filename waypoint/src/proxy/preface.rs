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
/// The first wait between looks at a connection whose preface is
/// incomplete; each next one is twice as long, up to [`LONGEST_NAP`] (a
/// client holding half a preface costs a few dozen wake-ups, not one a
/// millisecond).
const FIRST_NAP: Duration = Duration::from_millis(1);
/// The longest wait between two looks.
const LONGEST_NAP: Duration = Duration::from_millis(200);

/// The protocol `tcp` speaks, once its first bytes tell (or it closes).
pub async fn detect(tcp: &TcpStream) -> io::Result<Protocol> {
    let mut seen = [0u8; PREFACE.len()];
    let give_up = Instant::now() + PATIENCE;
    let mut nap = FIRST_NAP;
    loop {
        let n = tcp.peek(&mut seen).await?;
        if let Some(protocol) = classify(&seen[..n]) {
            return Ok(protocol);
        }
        if Instant::now() >= give_up {
            return Ok(Protocol::Http1);
        }
        // The bytes stay unread, so the socket stays readable: wait apart.
        tokio::time::sleep(nap).await;
        nap = (nap * 2).min(LONGEST_NAP);
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

    /// A client whose preface comes in two writes 50 ms apart is told
    /// HTTP/2 once the rest arrives, and its bytes are all still unread.
    #[tokio::test]
    async fn a_preface_split_in_two_writes_is_waited_for() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&PREFACE[..10]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.write_all(&PREFACE[10..]).await.unwrap();
            c
        });
        let (mut server, _) = listener.accept().await.unwrap();
        assert_eq!(detect(&server).await.unwrap(), Protocol::Http2);
        let mut got = [0u8; 24];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, PREFACE);
        drop(client.await.unwrap());
    }
}
