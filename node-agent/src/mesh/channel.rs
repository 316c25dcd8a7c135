//! Channels between agents: one long-lived TCP connection from an agent to
//! each other agent, over which any number of pair handshakes run at once as
//! streams. Every stream carries a whole TLS 1.3 session of its own (fresh
//! ECDHE, both certificates, both signatures, the hello and the answer), so
//! a channel changes nothing of what authenticates a pair; it saves each
//! pair the TCP set-up and tear-down and lets a burst of handshakes share
//! the connection's reads and writes.
//!
//! The initiator opens a channel with [`PREFACE`]; then both sides send
//! frames: a stream number (u32, chosen by the initiator, never reused on a
//! channel), a kind (data or end), a length (u16) and that many bytes. A
//! responder that reads anything else than the preface first treats the
//! connection as one handshake of its own, as before channels.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::handshake::{self, Credentials, HandshakeError, Initiate};
use crate::datapath::Authenticated;
use crate::sync::lock;

/// What an initiator sends first on a channel.
pub const PREFACE: &[u8; 8] = b"TSRCHAN1";
/// Most streams open on one channel at once: an initiator waits for a
/// stream to end before it opens one more, a responder ends any stream past
/// it at once.
pub const MAX_STREAMS: usize = 256;
/// Largest frame body.
const MAX_FRAME: usize = u16::MAX as usize;
/// An initiator closes a channel idle this long: before its responder does
/// ([`RESPONDER_IDLE`]), so a new stream never meets a channel the other
/// side is closing.
pub const INITIATOR_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
/// A responder closes a channel idle this long.
pub const RESPONDER_IDLE: std::time::Duration = std::time::Duration::from_secs(180);
const DATA: u8 = 0;
const END: u8 = 1;

/// One frame: stream, kind, body.
type Frame = (u32, u8, Vec<u8>);

/// The streams of one channel, each fed the bytes the other side sent on
/// it; dropping a stream's sender ends its incoming direction. A stream that
/// ended stays as None, so bytes still on their way for it are dropped
/// rather than taken for a new stream (forgotten past [`MAX_ENDED`]).
type Streams = Arc<std::sync::Mutex<HashMap<u32, Option<mpsc::UnboundedSender<Vec<u8>>>>>>;

/// Most ended streams remembered per channel.
const MAX_ENDED: usize = 4096;

/// One side of a channel: where its frames go, and its streams.
#[derive(Debug)]
struct Channel {
    out: mpsc::UnboundedSender<Frame>,
    streams: Streams,
    next: AtomicU32,
    closed: Arc<AtomicBool>,
    /// The streams an initiator may still open ([`MAX_STREAMS`] in all).
    slots: Arc<tokio::sync::Semaphore>,
}

impl Channel {
    /// Starts the reader and writer of `tcp`; `accept` is called for every
    /// stream the other side opens (None: this side opens them all). The
    /// reader's task ends when the connection does.
    fn start(
        tcp: TcpStream,
        accept: Option<Box<dyn Fn(Stream) + Send>>,
    ) -> (Channel, tokio::task::JoinHandle<()>) {
        let (read, write) = tcp.into_split();
        let (out, frames) = mpsc::unbounded_channel();
        let streams: Streams = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(write_frames(write, frames, closed.clone()));
        let idle = if accept.is_some() {
            RESPONDER_IDLE
        } else {
            INITIATOR_IDLE
        };
        let reader = Reader {
            streams: streams.clone(),
            out: out.clone(),
            accept,
            closed: closed.clone(),
            idle,
        };
        let reading = tokio::spawn(reader.run(read));
        (
            Channel {
                out,
                streams,
                next: AtomicU32::new(0),
                closed,
                slots: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            },
            reading,
        )
    }

    /// A new stream, once fewer than [`MAX_STREAMS`] are open: the end
    /// given back reads what the other side sends on it, and what is
    /// written to it is sent.
    async fn open(&self) -> std::io::Result<Stream> {
        let closed =
            || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the channel is closed");
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        if self.closed.load(Ordering::Relaxed) {
            return Err(closed());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut stream = attach(id, &self.streams, &self.out);
        stream.slot = Some(slot);
        Ok(stream)
    }
}

/// Registers stream `id` and returns it.
fn attach(id: u32, streams: &Streams, out: &mpsc::UnboundedSender<Frame>) -> Stream {
    let (tx, incoming) = mpsc::unbounded_channel();
    let mut all = lock(streams);
    if all.len() >= MAX_STREAMS + MAX_ENDED {
        all.retain(|_, s| s.is_some());
    }
    all.insert(id, Some(tx));
    Stream {
        id,
        out: out.clone(),
        incoming,
        unread: Vec::new(),
        read_at: 0,
        ended: false,
        streams: streams.clone(),
        slot: None,
    }
}

/// One stream of a channel, a full-duplex byte stream for TLS: what is
/// written goes out in data frames, what the other side sends is read, and
/// shutting it down (or dropping it) ends it.
#[derive(Debug)]
pub struct Stream {
    id: u32,
    out: mpsc::UnboundedSender<Frame>,
    incoming: mpsc::UnboundedReceiver<Vec<u8>>,
    /// The rest of the last bytes received, from `read_at` on.
    unread: Vec<u8>,
    read_at: usize,
    /// Whether the end frame was sent.
    ended: bool,
    streams: Streams,
    /// An initiator's place among the channel's open streams.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Stream {
    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            let _ = self.out.send((self.id, END, Vec::new()));
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        if self.read_at == self.unread.len() {
            match self.incoming.poll_recv(cx) {
                Poll::Ready(Some(bytes)) => {
                    self.unread = bytes;
                    self.read_at = 0;
                }
                // The other side ended the stream, or the channel closed.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = buf.remaining().min(self.unread.len() - self.read_at);
        let at = self.read_at;
        buf.put_slice(&self.unread[at..at + n]);
        self.read_at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let broken = || {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the channel or the stream is closed",
            )
        };
        if self.ended {
            return std::task::Poll::Ready(Err(broken()));
        }
        let n = buf.len().min(MAX_FRAME);
        let sent = self.out.send((self.id, DATA, buf[..n].to_vec()));
        std::task::Poll::Ready(sent.map(|()| n).map_err(|_| broken()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.end();
        std::task::Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.end();
        lock(&self.streams).insert(self.id, None);
    }
}

/// Writes frames to the connection, as many as are queued in one write.
async fn write_frames(
    mut tcp: tokio::net::tcp::OwnedWriteHalf,
    mut frames: mpsc::UnboundedReceiver<Frame>,
    closed: Arc<AtomicBool>,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(frame) = frames.recv().await {
        buf.clear();
        encode(&mut buf, &frame);
        while buf.len() < 64 * 1024 {
            match frames.try_recv() {
                Ok(frame) => encode(&mut buf, &frame),
                Err(_) => break,
            }
        }
        if tcp.write_all(&buf).await.is_err() {
            break;
        }
    }
    closed.store(true, Ordering::Relaxed);
}

fn encode(buf: &mut Vec<u8>, (id, kind, body): &Frame) {
    buf.extend_from_slice(&id.to_be_bytes());
    buf.push(*kind);
    buf.extend_from_slice(&(body.len() as u16).to_be_bytes());
    buf.extend_from_slice(body);
}

/// Reads frames from the connection and hands each to its stream.
struct Reader {
    streams: Streams,
    out: mpsc::UnboundedSender<Frame>,
    accept: Option<Box<dyn Fn(Stream) + Send>>,
    closed: Arc<AtomicBool>,
    /// How long the connection may carry nothing before it is closed.
    idle: std::time::Duration,
}

impl Reader {
    async fn run(self, mut tcp: tokio::net::tcp::OwnedReadHalf) {
        let mut head = [0u8; 7];
        loop {
            // Waiting for readability (not inside a read) can time out
            // without losing a byte.
            match tokio::time::timeout(self.idle, tcp.readable()).await {
                Ok(Ok(())) => {}
                Err(_) if lock(&self.streams).values().any(Option::is_some) => continue,
                // Idle with no stream open, or the connection failed.
                _ => break,
            }
            if tcp.read_exact(&mut head).await.is_err() {
                break;
            }
            let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            let mut body = vec![0u8; usize::from(u16::from_be_bytes([head[5], head[6]]))];
            if tcp.read_exact(&mut body).await.is_err() {
                break;
            }
            match head[4] {
                DATA => self.deliver(id, body),
                END => drop(lock(&self.streams).get_mut(&id).map(Option::take)),
                _ => break,
            }
        }
        // Every stream ends with the connection.
        self.closed.store(true, Ordering::Relaxed);
        lock(&self.streams).clear();
    }

    /// Gives `body` to stream `id`, opening it first when the other side
    /// opens streams; past [`MAX_STREAMS`] the stream is ended at once.
    fn deliver(&self, id: u32, body: Vec<u8>) {
        let known = lock(&self.streams).get(&id).cloned();
        let sender = match (known, &self.accept) {
            (Some(Some(sender)), _) => sender,
            // A stream that ended, or one this side never opened.
            (Some(None), _) | (None, None) => return,
            (None, Some(accept)) => {
                let full = {
                    let all = lock(&self.streams);
                    // Fewer entries than the cap: fewer open streams too.
                    all.len() >= MAX_STREAMS
                        && all.values().filter(|s| s.is_some()).count() >= MAX_STREAMS
                };
                if full {
                    let _ = self.out.send((id, END, Vec::new()));
                    return;
                }
                let stream = attach(id, &self.streams, &self.out);
                let sender = lock(&self.streams).get(&id).cloned().flatten();
                accept(stream);
                match sender {
                    Some(sender) => sender,
                    None => return,
                }
            }
        };
        let _ = sender.send(body);
    }
}

/// A channel's key: the responder's address and the source address.
type Key = (SocketAddr, Option<IpAddr>);

/// The channels this agent opened, one per responder address and source.
#[derive(Debug, Default)]
pub struct Channels {
    open: std::sync::Mutex<HashMap<Key, Arc<Channel>>>,
    /// One lock per key, so a burst of handshakes to a new peer makes one
    /// channel, not one each, and a slow peer holds up no other.
    dialling: std::sync::Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

impl Channels {
    /// A new stream on the channel to `addr` from `source`, dialling the
    /// channel first when there is none (or it closed).
    pub async fn open(&self, addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<Stream> {
        if let Some(channel) = self.existing(addr, source) {
            return channel.open().await;
        }
        let gate = lock(&self.dialling)
            .entry((addr, source))
            .or_default()
            .clone();
        let dialling = gate.lock().await;
        if let Some(channel) = self.existing(addr, source) {
            drop(dialling);
            return channel.open().await;
        }
        let mut tcp = handshake::connect(addr, source)
            .await
            .map_err(std::io::Error::other)?;
        tcp.write_all(PREFACE).await?;
        let (channel, _reading) = Channel::start(tcp, None);
        let channel = Arc::new(channel);
        lock(&self.open).insert((addr, source), channel.clone());
        drop(dialling);
        channel.open().await
    }

    /// Authenticates `ask.local` to `ask.remote` over a new stream of the
    /// channel to the responder at `addr` (dialled now if there is none):
    /// the same TLS 1.3 handshake as [`handshake::initiate`], without a TCP
    /// connection of its own.
    pub async fn authenticate(
        &self,
        creds: &Credentials,
        addr: SocketAddr,
        ask: &Initiate<'_>,
    ) -> Result<Authenticated, HandshakeError> {
        let peer = addr.to_string();
        creds.require(ask.local)?;
        let run = async {
            let stream =
                self.open(addr, ask.source)
                    .await
                    .map_err(|source| HandshakeError::Io {
                        what: "opening a channel stream",
                        peer: peer.clone(),
                        source,
                    })?;
            handshake::initiate_on(creds, stream, &peer, ask).await
        };
        tokio::time::timeout(handshake::HANDSHAKE_TIMEOUT, run)
            .await
            .map_err(|_| HandshakeError::Timeout { peer: peer.clone() })?
    }

    /// The open channel to `addr` from `source`, if any.
    fn existing(&self, addr: SocketAddr, source: Option<IpAddr>) -> Option<Arc<Channel>> {
        let mut open = lock(&self.open);
        let channel = open.get(&(addr, source))?.clone();
        if channel.closed.load(Ordering::Relaxed) {
            open.remove(&(addr, source));
            return None;
        }
        Some(channel)
    }
}

/// Whether `tcp` starts with [`PREFACE`] (consumed then); false for a
/// connection that is one handshake of its own (nothing consumed).
pub async fn is_channel(tcp: &TcpStream) -> bool {
    let mut head = [0u8; PREFACE.len()];
    let peek = async {
        loop {
            match tcp.peek(&mut head).await {
                Ok(n) if n >= PREFACE.len() => return head == *PREFACE,
                Ok(n) if n > 0 && head[..n] != PREFACE[..n] => return false,
                Ok(0) | Err(_) => return false,
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
            }
        }
    };
    // A peer that sends part of the preface and stalls holds nothing long.
    tokio::time::timeout(handshake::HANDSHAKE_TIMEOUT, peek)
        .await
        .unwrap_or(false)
}

/// Serves the streams of a channel `tcp` (its preface already read):
/// `handle` runs for each stream the initiator opens, on a task of its own.
pub async fn serve<H, F>(mut tcp: TcpStream, handle: H)
where
    H: Fn(Stream) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let mut preface = [0u8; PREFACE.len()];
    if tcp.read_exact(&mut preface).await.is_err() {
        return;
    }
    let _ = tcp.set_nodelay(true);
    let accept = move |stream: Stream| {
        tokio::spawn(handle(stream));
    };
    let (_channel, reading) = Channel::start(tcp, Some(Box::new(accept)));
    // The channel lives as long as its connection.
    let _ = reading.await;
}
