//! `tessera-agent fetch-x509` and `fetch-jwt`: Workload API clients built on
//! the `spiffe` crate (debugging aids, like `spire-agent api fetch`), which
//! print what the server hands out and fail with its answer.

use futures::StreamExt;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to {endpoint}: {source}; is the agent running and the socket mounted?")]
    Connect {
        /// The endpoint, `unix:` and the path.
        endpoint: String,
        /// What the client said.
        source: spiffe::WorkloadApiError,
    },
    /// A call was refused or failed.
    #[error("{call}: {source}")]
    Call {
        /// The Workload API call.
        call: &'static str,
        /// The server's answer.
        source: spiffe::WorkloadApiError,
    },
    /// A leaf certificate could not be read.
    #[error("update {update}: unreadable leaf: {reason}")]
    Leaf {
        /// The update it came in (1 is the first).
        update: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The stream ended before the updates asked for.
    #[error("the server closed the stream after {0} update(s)")]
    StreamEnded(usize),
    /// The JWT-SVID did not verify offline.
    #[error("offline verification with the spiffe crate: {0}")]
    Offline(#[from] spiffe::JwtSvidError),
}

fn call(name: &'static str) -> impl Fn(spiffe::WorkloadApiError) -> ClientError {
    move |source| ClientError::Call { call: name, source }
}

async fn connect(socket: &str) -> Result<spiffe::WorkloadApiClient, ClientError> {
    let endpoint = if socket.starts_with("unix:") {
        socket.to_owned()
    } else {
        format!("unix:{socket}")
    };
    spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .map_err(|source| ClientError::Connect { endpoint, source })
}

/// A short fingerprint of a certificate, to tell rotations apart in output.
fn fingerprint(der: &[u8]) -> String {
    let digest = der.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{digest:016x}")
}

/// Prints this process's X.509-SVIDs and bundles; with `updates`, the first
/// that many updates of the stream instead.
pub async fn fetch_x509(socket: &str, updates: Option<usize>) -> Result<(), ClientError> {
    let client = connect(socket).await?;
    if let Some(n) = updates {
        return watch_x509(&client, n).await;
    }
    let svids = client
        .fetch_all_x509_svids()
        .await
        .map_err(call("FetchX509SVID"))?;
    for svid in &svids {
        println!(
            "SPIFFE ID: {} (chain of {}, hint {:?})",
            svid.spiffe_id(),
            svid.cert_chain().len(),
            svid.hint().unwrap_or_default()
        );
    }
    let bundles = client
        .fetch_x509_bundles()
        .await
        .map_err(call("FetchX509Bundles"))?;
    for (td, bundle) in bundles.iter() {
        println!("bundle: {td} ({} authorities)", bundle.authorities().len());
    }
    Ok(())
}

async fn watch_x509(client: &spiffe::WorkloadApiClient, updates: usize) -> Result<(), ClientError> {
    let mut stream = client
        .stream_x509_svids()
        .await
        .map_err(call("FetchX509SVID"))?;
    for n in 1..=updates {
        let svid = match stream.next().await {
            Some(svid) => svid.map_err(call("FetchX509SVID"))?,
            None => return Err(ClientError::StreamEnded(n - 1)),
        };
        // Seconds the leaf has left as it arrives: never negative when the
        // agent serves only valid SVIDs.
        let not_after = x509_parser::parse_x509_certificate(svid.leaf().as_ref())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .map_err(|e| ClientError::Leaf {
                update: n,
                reason: e.to_string(),
            })?;
        println!(
            "update {n}: SPIFFE ID: {} leaf {} expires_in {}s",
            svid.spiffe_id(),
            fingerprint(svid.leaf().as_ref()),
            not_after - crate::clock::unix_now()
        );
    }
    Ok(())
}

/// Fetches a JWT-SVID for `audience` and the JWT bundles, has the agent
/// validate the token for the first audience, and verifies it offline.
pub async fn fetch_jwt(socket: &str, audience: &[String]) -> Result<(), ClientError> {
    let client = connect(socket).await?;
    let svid = client
        .fetch_jwt_svid(audience, None)
        .await
        .map_err(call("FetchJWTSVID"))?;
    println!(
        "SPIFFE ID: {} (audience {:?}, hint {:?})",
        svid.spiffe_id(),
        svid.audience(),
        svid.hint().unwrap_or_default()
    );
    println!("token: {}", svid.token());
    let bundles = client
        .fetch_jwt_bundles()
        .await
        .map_err(call("FetchJWTBundles"))?;
    for (td, bundle) in bundles.iter() {
        println!(
            "JWT bundle: {td} (has the token's key: {})",
            bundle.find_jwt_authority(svid.key_id()).is_some()
        );
    }
    let first = audience.first().map(String::as_str).unwrap_or_default();
    let validated = client
        .validate_jwt_token(first, svid.token())
        .await
        .map_err(call("ValidateJWTSVID"))?;
    println!("validated by the agent: {}", validated.spiffe_id());
    let offline = spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &[first])?;
    println!("verified offline: {}", offline.spiffe_id());
    Ok(())
}
