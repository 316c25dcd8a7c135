//! The handshake server: answers other agents' handshakes on the
//! handshake port, within the per-peer and total connection caps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use super::{Inner, warn_handshake};
use crate::datapath::{Authenticated, Stats};
use crate::mesh::channel;
use crate::mesh::handshake::{self, Knock, Refusal};
use crate::mesh::limits::{ConnLimits, HANDSHAKES_PER_PEER, HANDSHAKES_TOTAL};
use crate::sync::lock;

/// Accepts handshakes until the task is aborted.
pub(super) async fn serve(inner: Arc<Inner>, listener: TcpListener) {
    let limits = ConnLimits::new(HANDSHAKES_PER_PEER, HANDSHAKES_TOTAL);
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "accepting a handshake failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match limits.admit(from.ip()) {
            Ok(slot) => slot,
            Err(e) => {
                Stats::bump(&inner.plane.stats.connections_capped);
                debug!(%from, reason = %e, "handshake connection closed at once");
                continue;
            }
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if channel::is_channel(&tcp).await {
                channel::serve(tcp, move |stream| {
                    let inner = inner.clone();
                    async move { answer(&inner, stream, from).await }
                })
                .await;
            } else {
                let _ = tcp.set_nodelay(true);
                answer(&inner, tcp, from).await;
            }
        });
    }
}

/// Answers one initiator, on a connection or a channel's stream of its
/// own: admitted when it connects from an address of the node it speaks
/// for; recorded only once this node's data path holds a policy that asks
/// for the pair (the initiator's side then never allows what this side
/// would still drop).
async fn answer<S>(inner: &Inner, stream: S, from: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // The epoch before the credentials (see `initiate`).
    let epoch = inner.plane.epoch();
    let Some(creds) = inner.creds() else { return };
    let view = inner.view();
    let admit = |knock: &Knock<'_>| {
        if view.is_host_of(knock.remote_node, knock.from.ip()) {
            inner.keep_vouched(knock);
            Ok(())
        } else {
            Err(Refusal::NotNodeAddress {
                from: knock.from.ip(),
                node: knock.remote_node.to_owned(),
            })
        }
    };
    let record = |auth: &Authenticated| {
        let applied = lock(&inner.policies).clone();
        crate::datapath::view::pair_needs_authentication(&applied, &auth.local, &auth.remote)
            && inner.record(auth, epoch)
    };
    match handshake::respond_on(&creds, stream, from, admit, record).await {
        Ok(auth) => {
            Stats::bump(&inner.plane.stats.responded_ok);
            info!(local = %auth.local, remote = %auth.remote, node = %auth.remote_node, "authenticated (answered)");
        }
        Err(e) => {
            Stats::bump(&inner.plane.stats.responded_failed);
            warn_handshake(&e, from);
        }
    }
}
