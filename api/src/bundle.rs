//! SPIFFE bundles in the SPIFFE bundle format (a JWK set with
//! `spiffe_sequence` and `spiffe_refresh_hint`, as bundle endpoints serve
//! them): the X.509 authorities (`use: x509-svid`, the CA certificate in
//! `x5c`) and JWT authorities (`use: jwt-svid`) of one trust domain.
//!
//! Decoding follows the SPIFFE Trust Domain and Bundle specification: keys
//! of an unknown `kty` or `use` are ignored (and listed in
//! [`Decoded::ignored`]); anything else malformed refuses the whole bundle
//! with a [`BundleError`] that says which key and why, so a caller keeps
//! its last good bundle. Every input is untrusted: no panic on any bytes
//! (there is a fuzz target).

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::jwt::{JwkSet, PublicKey};

/// The ConfigMap (in the operator's namespace) where the operator
/// publishes the bundles of federated trust domains for the node agents:
/// one key per trust domain (its name), holding that trust domain's bundle
/// document. Bundles of different trust domains are never merged.
pub use crate::names::FEDERATED_CONFIGMAP;

/// Largest bundle document read, in bytes.
pub const MAX_BUNDLE_LEN: usize = 1024 * 1024;

/// Why a bundle document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Not a JSON object with a `keys` array, or a top-level member of the
    /// wrong type.
    #[error("not a SPIFFE bundle (a JWK set with a keys array): {0}")]
    Document(String),
    /// One key is malformed.
    #[error("SPIFFE bundle key {index}: {source}")]
    Key {
        /// Position in `keys`.
        index: usize,
        /// What is wrong.
        source: KeyError,
    },
}

/// What is wrong with one key of a bundle document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is not a JSON object.
    #[error("not a JSON object")]
    NotObject,
    /// A member the key needs is absent or empty.
    #[error("no {0}")]
    Missing(&'static str),
    /// A member is not a string.
    #[error("{0} is not a string")]
    NotString(String),
    /// A member is not base64 (standard or URL-safe, as it should be).
    #[error("{member} is not {encoding}: {reason}")]
    Encoding {
        /// The member.
        member: String,
        /// `base64` or `base64url`.
        encoding: &'static str,
        /// What the decoder said.
        reason: String,
    },
    /// `x5c` is not one certificate.
    #[error("x5c {0}")]
    X5c(String),
    /// The certificate in `x5c` is unusable.
    #[error("{0}")]
    Certificate(String),
    /// The JWK's own key and the certificate's differ.
    #[error("{0} do not match the key of the certificate in x5c")]
    Mismatch(String),
    /// A JWT key that is not a P-256 point.
    #[error("JWT key {0:?} is not a P-256 point (32-byte x and y)")]
    NotP256(String),
}

/// The authorities of one trust domain, with the publisher's sequence
/// number and refresh hint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpiffeBundle {
    /// CA certificates (DER) for X509-SVIDs, in document order.
    pub x509_authorities: Vec<Vec<u8>>,
    /// Keys for JWT-SVIDs (P-256), in document order.
    pub jwt_authorities: JwkSet,
    /// `spiffe_sequence`: changes whenever the contents change.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`: how often to fetch again, in seconds.
    pub refresh_hint: Option<u64>,
}

/// A decoded bundle and the keys it skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The bundle.
    pub bundle: SpiffeBundle,
    /// Keys ignored as the specification requires (unknown `kty` or `use`,
    /// or a JWT key type Tessera cannot verify), one line each.
    pub ignored: Vec<String>,
}

#[derive(Deserialize)]
struct Doc {
    keys: Vec<Value>,
    #[serde(default)]
    spiffe_sequence: Option<u64>,
    #[serde(default)]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Serialize)]
struct OutDoc {
    keys: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

/// The public key of a certificate, as JWK members.
enum CertKey {
    /// Curve name and uncompressed point.
    Ec(&'static str, Vec<u8>),
    /// Modulus and exponent, big-endian without leading zeros.
    Rsa(Vec<u8>, Vec<u8>),
}

fn strip_zeros(b: &[u8]) -> Vec<u8> {
    let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    b[first..].to_vec()
}

/// Parses one DER certificate (nothing after it) and returns its key.
fn cert_key(der: &[u8]) -> Result<CertKey, KeyError> {
    use x509_parser::public_key::PublicKey as Spki;
    let bad = |why: String| KeyError::Certificate(why);
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| bad(format!("x5c is not an X.509 certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(KeyError::X5c("has bytes after the certificate".into()));
    }
    match cert.public_key().parsed() {
        Ok(Spki::EC(point)) => {
            let point = point.data().to_vec();
            let crv = match point.len() {
                65 => "P-256",
                97 => "P-384",
                133 => "P-521",
                n => {
                    return Err(bad(format!(
                        "EC key of {n} bytes is not a P-256/384/521 point"
                    )));
                }
            };
            if point.first() != Some(&4) {
                return Err(bad("EC key is not an uncompressed point".into()));
            }
            Ok(CertKey::Ec(crv, point))
        }
        Ok(Spki::RSA(rsa)) => Ok(CertKey::Rsa(
            strip_zeros(rsa.modulus),
            strip_zeros(rsa.exponent),
        )),
        Ok(_) => Err(bad("the certificate's key is neither EC nor RSA".into())),
        Err(e) => Err(bad(format!("the certificate's key is unreadable: {e}"))),
    }
}

fn member<'a>(key: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, KeyError> {
    match key.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(KeyError::NotString(name.to_owned())),
    }
}

fn b64url(key: &Map<String, Value>, name: &'static str) -> Result<Vec<u8>, KeyError> {
    let text = member(key, name)?.ok_or(KeyError::Missing(name))?;
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('=').as_bytes())
        .map_err(|e| KeyError::Encoding {
            member: name.to_owned(),
            encoding: "base64url",
            reason: e.to_string(),
        })
}

/// An x509-svid key: its certificate, checked against the JWK's own key.
fn x509_key(key: &Map<String, Value>, kty: &str) -> Result<Vec<u8>, KeyError> {
    let x5c = match key.get("x5c") {
        Some(Value::Array(certs)) => certs,
        Some(_) => return Err(KeyError::X5c("is not an array".into())),
        None => {
            return Err(KeyError::Missing(
                "x5c (an x509-svid key needs its CA certificate)",
            ));
        }
    };
    let [Value::String(cert)] = x5c.as_slice() else {
        return Err(KeyError::X5c(format!(
            "must hold exactly one certificate (a string), it holds {} element(s)",
            x5c.len()
        )));
    };
    let der = STANDARD
        .decode(cert.as_bytes())
        .map_err(|e| KeyError::Encoding {
            member: "x5c".into(),
            encoding: "base64",
            reason: e.to_string(),
        })?;
    match (cert_key(&der)?, kty) {
        (CertKey::Ec(crv, point), "EC") => {
            let (x, y) = (b64url(key, "x")?, b64url(key, "y")?);
            let jwk_crv = member(key, "crv")?.unwrap_or_default();
            let half = (point.len() - 1) / 2;
            if jwk_crv != crv || x != point[1..1 + half] || y != point[1 + half..] {
                return Err(KeyError::Mismatch(format!(
                    "crv/x/y (the certificate has a {crv} key)"
                )));
            }
        }
        (CertKey::Rsa(n, e), "RSA") => {
            if strip_zeros(&b64url(key, "n")?) != n || strip_zeros(&b64url(key, "e")?) != e {
                return Err(KeyError::Mismatch(
                    "n/e (the certificate has an RSA key)".into(),
                ));
            }
        }
        _ => {
            return Err(KeyError::Mismatch(format!("kty {kty} and the key type")));
        }
    }
    Ok(der)
}

/// What a well-formed jwt-svid key is to Tessera.
enum JwtKey {
    /// A key it verifies with (EC P-256).
    Used(PublicKey),
    /// A key it skips (another key type), with a note saying so.
    Skipped(String),
}

/// A jwt-svid key, or why it is malformed.
fn jwt_key(key: &Map<String, Value>, kty: &str) -> Result<JwtKey, KeyError> {
    let kid = member(key, "kid")?
        .filter(|k| !k.is_empty())
        .ok_or(KeyError::Missing("kid (a jwt-svid key needs one)"))?;
    let crv = member(key, "crv")?;
    if kty != "EC" || crv != Some("P-256") {
        return Ok(JwtKey::Skipped(format!(
            "jwt-svid key {kid:?} ({kty} {}): only EC P-256 JWT keys are verified",
            crv.unwrap_or("-")
        )));
    }
    let (x, y) = (b64url(key, "x")?, b64url(key, "y")?);
    if x.len() != 32 || y.len() != 32 {
        return Err(KeyError::NotP256(kid.to_owned()));
    }
    let mut point = vec![4u8];
    point.extend(x);
    point.extend(y);
    Ok(JwtKey::Used(PublicKey {
        kid: kid.to_owned(),
        point,
    }))
}

impl SpiffeBundle {
    /// Reads a bundle document.
    pub fn from_json(bytes: &[u8]) -> Result<Decoded, BundleError> {
        if bytes.len() > MAX_BUNDLE_LEN {
            return Err(BundleError::Document(format!(
                "{} bytes, more than the {MAX_BUNDLE_LEN} accepted",
                bytes.len()
            )));
        }
        let doc: Doc =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Document(e.to_string()))?;
        let mut decoded = Decoded {
            bundle: SpiffeBundle {
                sequence: doc.spiffe_sequence,
                refresh_hint: doc.spiffe_refresh_hint,
                ..SpiffeBundle::default()
            },
            ignored: Vec::new(),
        };
        for (index, key) in doc.keys.iter().enumerate() {
            let bad = |source: KeyError| BundleError::Key { index, source };
            let Value::Object(key) = key else {
                return Err(bad(KeyError::NotObject));
            };
            let kty = member(key, "kty")
                .map_err(bad)?
                .ok_or(bad(KeyError::Missing("kty")))?;
            let use_ = member(key, "use")
                .map_err(bad)?
                .ok_or(bad(KeyError::Missing("use (x509-svid or jwt-svid)")))?;
            if !matches!(kty, "EC" | "RSA") {
                decoded
                    .ignored
                    .push(format!("key {index}: unknown kty {kty:?}"));
                continue;
            }
            match use_ {
                "x509-svid" => {
                    let der = x509_key(key, kty).map_err(bad)?;
                    decoded.bundle.x509_authorities.push(der);
                }
                "jwt-svid" => match jwt_key(key, kty).map_err(bad)? {
                    JwtKey::Used(public) => decoded.bundle.jwt_authorities.keys.push(public),
                    JwtKey::Skipped(note) => decoded.ignored.push(format!("key {index}: {note}")),
                },
                other => decoded
                    .ignored
                    .push(format!("key {index}: unknown use {other:?}")),
            }
        }
        Ok(decoded)
    }

    /// The bundle document. A certificate whose key cannot be read fails
    /// the whole encoding (the error names it): a bundle is only served
    /// whole.
    pub fn to_json(&self) -> Result<Vec<u8>, BundleError> {
        let mut keys = Vec::new();
        for (index, der) in self.x509_authorities.iter().enumerate() {
            let mut key = Map::new();
            key.insert("use".into(), "x509-svid".into());
            match cert_key(der).map_err(|source| BundleError::Key { index, source })? {
                CertKey::Ec(crv, point) => {
                    let half = (point.len() - 1) / 2;
                    key.insert("kty".into(), "EC".into());
                    key.insert("crv".into(), crv.into());
                    key.insert(
                        "x".into(),
                        URL_SAFE_NO_PAD.encode(&point[1..1 + half]).into(),
                    );
                    key.insert(
                        "y".into(),
                        URL_SAFE_NO_PAD.encode(&point[1 + half..]).into(),
                    );
                }
                CertKey::Rsa(n, e) => {
                    key.insert("kty".into(), "RSA".into());
                    key.insert("n".into(), URL_SAFE_NO_PAD.encode(n).into());
                    key.insert("e".into(), URL_SAFE_NO_PAD.encode(e).into());
                }
            }
            key.insert(
                "x5c".into(),
                Value::Array(vec![STANDARD.encode(der).into()]),
            );
            keys.push(Value::Object(key));
        }
        for (i, k) in self.jwt_authorities.keys.iter().enumerate() {
            let (Some(x), Some(y)) = (k.point.get(1..33), k.point.get(33..65)) else {
                return Err(BundleError::Key {
                    index: self.x509_authorities.len() + i,
                    source: KeyError::NotP256(k.kid.clone()),
                });
            };
            let mut key = Map::new();
            key.insert("use".into(), "jwt-svid".into());
            key.insert("kty".into(), "EC".into());
            key.insert("crv".into(), "P-256".into());
            key.insert("kid".into(), k.kid.clone().into());
            key.insert("x".into(), URL_SAFE_NO_PAD.encode(x).into());
            key.insert("y".into(), URL_SAFE_NO_PAD.encode(y).into());
            keys.push(Value::Object(key));
        }
        let doc = OutDoc {
            keys,
            spiffe_sequence: self.sequence,
            spiffe_refresh_hint: self.refresh_hint,
        };
        serde_json::to_vec(&doc).map_err(|e| BundleError::Document(e.to_string()))
    }
}
