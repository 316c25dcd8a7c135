//! The waypoint's connections to one workload port, shared by all the
//! client connections to it: dialled at the first allowed request that
//! needs one (a client refused throughout never reaches the workload), in
//! the request's protocol. HTTP/2 requests share one multiplexed
//! connection, dialled again when the workload closes it; HTTP/1.1
//! requests take a ready connection from a pool (at most [`MAX_IDLE`]
//! kept) or dial one, and put it back when the response head is in (it is
//! ready again once its body has been read). So an idle client connection
//! holds no connection to the workload.

use std::sync::Mutex;

use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{Dial, ProxyError};

/// Most idle HTTP/1.1 connections kept to one workload port.
pub const MAX_IDLE: usize = 64;

/// The workload's connections for one port.
pub(super) struct Upstream {
    dial: Dial,
    /// Idle HTTP/1.1 connections, ready for a request.
    idle: Mutex<Vec<http1::SendRequest<Incoming>>>,
    /// The shared HTTP/2 connection. An async lock: the first HTTP/2
    /// requests wait for one dial rather than each making its own.
    http2: tokio::sync::Mutex<Option<http2::SendRequest<Incoming>>>,
}

/// The workload's answer, and for an accepted upgrade the workload's side
/// of the upgraded connection.
pub(super) type Answer = (Response<Incoming>, Option<hyper::upgrade::OnUpgrade>);

impl Upstream {
    pub(super) fn new(dial: Dial) -> Upstream {
        Upstream {
            dial,
            idle: Mutex::default(),
            http2: tokio::sync::Mutex::default(),
        }
    }

    /// Sends `req` to the workload and waits for its response head.
    pub(super) async fn send(&self, req: Request<Incoming>) -> Result<Answer, ProxyError> {
        let mut response = if req.version() == Version::HTTP_2 {
            self.http2_sender().await?.send_request(req).await
        } else {
            let mut sender = self.http1_sender().await?;
            let sent = sender.send_request(req).await;
            self.give_back(sender);
            sent
        }
        .map_err(ProxyError::Upstream)?;
        let upgraded = (response.status() == StatusCode::SWITCHING_PROTOCOLS)
            .then(|| hyper::upgrade::on(&mut response));
        Ok((response, upgraded))
    }

    /// The shared HTTP/2 connection, dialled if there is none open.
    async fn http2_sender(&self) -> Result<http2::SendRequest<Incoming>, ProxyError> {
        let mut slot = self.http2.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let io = TokioIo::new(self.connect().await?);
        let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(ProxyError::Handshake)?;
        tokio::spawn(conn);
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// An idle HTTP/1.1 connection from the pool, or a new one. Closed
    /// connections found on the way are dropped; busy ones (a response body
    /// still being read) stay.
    async fn http1_sender(&self) -> Result<http1::SendRequest<Incoming>, ProxyError> {
        let pooled = {
            let mut idle = crate::lock(&self.idle);
            idle.retain(|s| !s.is_closed());
            idle.iter()
                .position(http1::SendRequest::is_ready)
                .map(|i| idle.swap_remove(i))
        };
        if let Some(sender) = pooled {
            return Ok(sender);
        }
        let io = TokioIo::new(self.connect().await?);
        let (sender, conn) = http1::handshake(io).await.map_err(ProxyError::Handshake)?;
        tokio::spawn(conn.with_upgrades());
        Ok(sender)
    }

    /// Puts an HTTP/1.1 connection back in the pool as soon as its response
    /// head is in: it is taken again once its body has been read (ready).
    fn give_back(&self, sender: http1::SendRequest<Incoming>) {
        let mut idle = crate::lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<tokio::net::TcpStream, ProxyError> {
        let tcp = (self.dial)().await.map_err(ProxyError::Dial)?;
        // Requests are small and latency counts more than packet count.
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }
}
