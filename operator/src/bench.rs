//! The signing benchmark behind `tessera-operator bench-sign` (run by
//! `cargo xtask bench identity`): X.509-SVIDs (CSR parsed, leaf built and
//! signed) and JWT-SVIDs signed on one thread with an in-memory root.

use std::time::{Duration, Instant};

use tessera_api::spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;

use crate::ca::{CaError, TrustDomainCa};

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Making keys or CSRs failed.
    #[error("cannot make a CSR: {0}")]
    Csr(#[from] rcgen::Error),
    /// The in-memory CA failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Signing an X.509-SVID was refused.
    #[error("signing refused: {0}")]
    Sign(#[from] tonic::Status),
    /// Signing a JWT-SVID failed.
    #[error(transparent)]
    Jwt(#[from] tessera_api::jwt::JwtError),
    /// A name did not parse (a bug in the benchmark).
    #[error(transparent)]
    Name(#[from] tessera_api::spiffe::SpiffeIdError),
}

/// Signs for `seconds` per kind; the rates as JSON
/// (`{"x509_per_sec":..,"jwt_per_sec":..}`).
pub fn sign(seconds: f64) -> Result<String, BenchError> {
    let td: TrustDomain = "bench.test".parse()?;
    let now = OffsetDateTime::now_utc();
    let root = crate::ca::authority::new_root(&td, now, Duration::from_secs(86400))?;
    let ca = TrustDomainCa::in_memory(vec![root]);
    let id: SpiffeId = "spiffe://bench.test/ns/shop/sa/web".parse()?;
    // Requests as agents send them: a CSR over a fresh key each.
    let csrs = (0..64)
        .map(|_| -> Result<Vec<u8>, rcgen::Error> {
            let key = rcgen::KeyPair::generate()?;
            Ok(rcgen::CertificateParams::default()
                .serialize_request(&key)?
                .der()
                .to_vec())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let budget = Duration::from_secs_f64(seconds);
    let x509_rate = rate(budget, |n| {
        let csr = &csrs[n % csrs.len()];
        crate::ca::signer::sign_x509_svid(&ca, &id, csr, Duration::from_secs(3600), now)?;
        Ok(())
    })?;
    let (_, key) = ca.active_jwt(now)?;
    let jwt_rate = rate(budget, |_| {
        key.sign(&tessera_api::jwt::Claims {
            sub: id.clone(),
            aud: vec!["db".to_owned()],
            exp: now.unix_timestamp() + 300,
            iat: now.unix_timestamp(),
        })?;
        Ok(())
    })?;
    Ok(format!(
        "{{\"x509_per_sec\":{x509_rate:.1},\"jwt_per_sec\":{jwt_rate:.1}}}"
    ))
}

/// Runs `once` for `budget`; how many times per second it ran.
fn rate(
    budget: Duration,
    mut once: impl FnMut(usize) -> Result<(), BenchError>,
) -> Result<f64, BenchError> {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < budget {
        once(n)?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}
