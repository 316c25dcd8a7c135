//! The waypoint's connection to the workload for one client connection:
//! dialled at the first allowed request (a client refused throughout never
//! reaches the workload), in the client's protocol, and dialled again if
//! the workload closed it.

use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Mutex;

use super::{Dial, ProxyError};

enum Sender {
    Http1(http1::SendRequest<Incoming>),
    Http2(http2::SendRequest<Incoming>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }
}

/// The workload's side of one client connection.
pub(super) struct Upstream {
    dial: Dial,
    sender: Mutex<Option<Sender>>,
}

/// The workload's answer, and for an accepted upgrade the workload's side
/// of the upgraded connection.
pub(super) type Answer = (Response<Incoming>, Option<hyper::upgrade::OnUpgrade>);

impl Upstream {
    pub(super) fn new(dial: Dial) -> Upstream {
        Upstream {
            dial,
            sender: Mutex::new(None),
        }
    }

    /// Sends `req` to the workload and waits for its response head.
    pub(super) async fn send(&self, req: Request<Incoming>) -> Result<Answer, ProxyError> {
        let http2 = req.version() == Version::HTTP_2;
        let mut slot = self.sender.lock().await;
        let sender = match slot.take().filter(|s| !s.is_closed()) {
            Some(s) => s,
            None => self.connect(http2).await?,
        };
        let mut response = match sender {
            Sender::Http2(s) => {
                // Streams go side by side: the lock is not held.
                let mut stream = s.clone();
                *slot = Some(Sender::Http2(s));
                drop(slot);
                stream.send_request(req).await
            }
            // One request at a time, as on the client's HTTP/1.1 connection.
            Sender::Http1(mut s) => {
                let sent = match s.ready().await {
                    Ok(()) => s.send_request(req).await,
                    Err(e) => Err(e),
                };
                *slot = Some(Sender::Http1(s));
                sent
            }
        }
        .map_err(ProxyError::Upstream)?;
        let upgraded = (response.status() == StatusCode::SWITCHING_PROTOCOLS)
            .then(|| hyper::upgrade::on(&mut response));
        Ok((response, upgraded))
    }

    async fn connect(&self, http2: bool) -> Result<Sender, ProxyError> {
        let tcp = (self.dial)().await.map_err(ProxyError::Dial)?;
        // Requests are small and latency counts more than packet count.
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(tcp);
        if http2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(ProxyError::Handshake)?;
            tokio::spawn(conn);
            Ok(Sender::Http2(sender))
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(ProxyError::Handshake)?;
            tokio::spawn(conn.with_upgrades());
            Ok(Sender::Http1(sender))
        }
    }
}
