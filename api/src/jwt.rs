//! JWT-SVIDs and JWT bundles, as the SPIFFE JWT-SVID specification
//! (JWT-SVID.md) and the SPIFFE bundle format describe them, restricted to
//! what Tessera issues: ES256 (ECDSA P-256 with SHA-256) signatures and
//! P-256 keys in JWK sets.
//!
//! [`sign`] makes a token, [`verify`] checks one (signature, `exp`, `nbf`,
//! audience, `sub`), and [`JwkSet`] encodes and decodes the bundle. Every
//! input is untrusted: malformed tokens and key sets give a [`JwtError`],
//! never a panic (there is a fuzz target for both parsers).

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::spiffe::{SpiffeId, TrustDomain};

/// Longest token [`verify`] looks at, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// How far in the future a `nbf` may lie and still be accepted (clock skew).
pub const NBF_LEEWAY_SECS: i64 = 30;

/// Why a token or key set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts, or too long.
    #[error("not a JWT in compact form (header.payload.signature): {0}")]
    Malformed(String),
    /// A part is not base64url or not the JSON expected.
    #[error("JWT {part} is invalid: {reason}")]
    BadPart {
        /// `header`, `claims` or `signature`.
        part: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The `alg` header names an algorithm Tessera does not accept.
    #[error("JWT algorithm {0:?} is not accepted; Tessera JWT-SVIDs use ES256")]
    Algorithm(String),
    /// The `typ` header is present but not `JWT` or `JOSE`.
    #[error("JWT typ {0:?} is not JWT or JOSE")]
    Type(String),
    /// A required header or claim is missing or of the wrong type.
    #[error("JWT {0} is missing or has the wrong type")]
    Missing(&'static str),
    /// `sub` is not a SPIFFE ID.
    #[error("JWT sub is not a SPIFFE ID: {0}")]
    Subject(String),
    /// No bundle for the subject's trust domain.
    #[error("no JWT bundle for trust domain {0}; is it this cluster's or a federated one?")]
    UnknownTrustDomain(String),
    /// The bundle has no key with the token's `kid`.
    #[error(
        "no key {kid:?} in the JWT bundle of {trust_domain}; the signing key may have been rotated out"
    )]
    UnknownKey {
        /// The token's key ID.
        kid: String,
        /// The subject's trust domain.
        trust_domain: String,
    },
    /// The signature does not verify.
    #[error("JWT signature does not verify")]
    Signature,
    /// `exp` has passed.
    #[error("JWT expired at {exp} (now {now})")]
    Expired {
        /// The token's `exp`.
        exp: i64,
        /// The time of the check.
        now: i64,
    },
    /// `nbf` lies in the future.
    #[error("JWT is not valid before {0}")]
    NotYetValid(i64),
    /// The expected audience is not among the token's.
    #[error("JWT audience {got:?} does not include {want:?}")]
    Audience {
        /// The token's audiences.
        got: Vec<String>,
        /// The audience asked for.
        want: String,
    },
    /// A JWK set that cannot be read.
    #[error("JWT bundle is invalid: {0}")]
    Bundle(String),
    /// Signing failed.
    #[error("signing the JWT failed: {0}")]
    Signing(String),
}

/// A P-256 public key from a JWT bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Key ID, matched against the token's `kid` header.
    pub kid: String,
    /// Uncompressed SEC1 point: `0x04 || x || y`.
    pub point: Vec<u8>,
}

impl PublicKey {
    /// The key for an uncompressed SEC1 P-256 point, with its key ID derived
    /// from the point (base64url of the first 24 bytes of its SHA-256), so the
    /// same key always gets the same ID.
    pub fn from_point(point: &[u8]) -> Result<PublicKey, JwtError> {
        if point.len() != 65 || point[0] != 4 {
            return Err(JwtError::Bundle(
                "a P-256 public key is a 65-byte uncompressed point".to_owned(),
            ));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, point);
        Ok(PublicKey {
            kid: URL_SAFE_NO_PAD.encode(&digest.as_ref()[..24]),
            point: point.to_vec(),
        })
    }
}

/// One key of a JWK set as serialized. Unknown members are ignored.
#[derive(Debug, Serialize, Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    use_: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct JwkSetDoc {
    keys: Vec<Jwk>,
}

/// The JWT authorities of one trust domain (a JWK set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwkSet {
    /// The keys, in bundle order.
    pub keys: Vec<PublicKey>,
}

impl JwkSet {
    /// The JWK set document, as the Workload API's `FetchJWTBundles` serves it.
    pub fn to_json(&self) -> Vec<u8> {
        let doc = JwkSetDoc {
            keys: self
                .keys
                .iter()
                .map(|k| Jwk {
                    kty: "EC".to_owned(),
                    crv: Some("P-256".to_owned()),
                    x: Some(URL_SAFE_NO_PAD.encode(&k.point[1..33])),
                    y: Some(URL_SAFE_NO_PAD.encode(&k.point[33..65])),
                    kid: Some(k.kid.clone()),
                    use_: None,
                })
                .collect(),
        };
        // A struct of strings always serializes.
        serde_json::to_vec(&doc).unwrap_or_default()
    }

    /// Reads a JWK set. Keys marked for another use (`use` other than
    /// `jwt-svid`) are skipped, as SPIFFE bundles also carry X.509 authorities;
    /// a JWT key that is not a well-formed P-256 key with a `kid` is an error.
    pub fn from_json(bytes: &[u8]) -> Result<JwkSet, JwtError> {
        let doc: JwkSetDoc =
            serde_json::from_slice(bytes).map_err(|e| JwtError::Bundle(e.to_string()))?;
        let mut keys = Vec::new();
        for (i, jwk) in doc.keys.into_iter().enumerate() {
            if jwk.use_.as_deref().is_some_and(|u| u != "jwt-svid") {
                continue;
            }
            let bad = |what: &str| JwtError::Bundle(format!("key {i}: {what}"));
            if jwk.kty != "EC" || jwk.crv.as_deref() != Some("P-256") {
                return Err(bad(&format!(
                    "kty {} crv {:?} is not supported (EC P-256 only)",
                    jwk.kty, jwk.crv
                )));
            }
            let kid = jwk
                .kid
                .filter(|k| !k.is_empty())
                .ok_or_else(|| bad("no kid"))?;
            let coord = |c: Option<String>, name: &str| -> Result<Vec<u8>, JwtError> {
                let c = c.ok_or_else(|| bad(&format!("no {name}")))?;
                let raw = URL_SAFE_NO_PAD
                    .decode(c.as_bytes())
                    .map_err(|e| bad(&format!("{name}: {e}")))?;
                if raw.len() != 32 {
                    return Err(bad(&format!("{name} is {} bytes, not 32", raw.len())));
                }
                Ok(raw)
            };
            let mut point = vec![4u8];
            point.extend(coord(jwk.x, "x")?);
            point.extend(coord(jwk.y, "y")?);
            keys.push(PublicKey { kid, point });
        }
        Ok(JwkSet { keys })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// The registered claims of a JWT-SVID that Tessera issues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The workload's SPIFFE ID.
    pub sub: SpiffeId,
    /// Audiences; at least one.
    pub aud: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issue time, Unix seconds.
    pub iat: i64,
}

/// A signing key: a P-256 key pair with its key ID.
#[derive(Debug)]
pub struct SigningKey {
    pair: EcdsaKeyPair,
    public: PublicKey,
}

impl SigningKey {
    /// Reads a PKCS#8 DER P-256 private key.
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, JwtError> {
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|e| JwtError::Signing(format!("not a P-256 PKCS#8 key: {e}")))?;
        let public = PublicKey::from_point(pair.public_key().as_ref())?;
        Ok(SigningKey { pair, public })
    }

    /// The public half, as it goes into the bundle.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Signs `claims` into a compact JWS with header
    /// `{"alg":"ES256","kid":...,"typ":"JWT"}`.
    pub fn sign(&self, claims: &Claims) -> Result<String, JwtError> {
        if claims.aud.is_empty() {
            return Err(JwtError::Missing("aud"));
        }
        let header = Header {
            alg: "ES256".to_owned(),
            kid: Some(self.public.kid.clone()),
            typ: Some("JWT".to_owned()),
        };
        let body = serde_json::json!({
            "sub": claims.sub.as_str(),
            "aud": claims.aud,
            "exp": claims.exp,
            "iat": claims.iat,
        });
        let json = |r: serde_json::Result<Vec<u8>>| {
            r.map(|b| URL_SAFE_NO_PAD.encode(b))
                .map_err(|e| JwtError::Signing(e.to_string()))
        };
        let input = format!(
            "{}.{}",
            json(serde_json::to_vec(&header))?,
            json(serde_json::to_vec(&body))?
        );
        let rng = ring::rand::SystemRandom::new();
        let sig = self
            .pair
            .sign(&rng, input.as_bytes())
            .map_err(|e| JwtError::Signing(e.to_string()))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }
}

/// A token that passed [`verify`].
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The `sub` claim.
    pub spiffe_id: SpiffeId,
    /// Every claim of the token.
    pub claims: Map<String, Value>,
}

fn decode_part(part: &'static str, text: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(text.as_bytes())
        .map_err(|e| JwtError::BadPart {
            part,
            reason: e.to_string(),
        })
}

fn json_part<T: serde::de::DeserializeOwned>(
    part: &'static str,
    text: &str,
) -> Result<T, JwtError> {
    serde_json::from_slice(&decode_part(part, text)?).map_err(|e| JwtError::BadPart {
        part,
        reason: e.to_string(),
    })
}

fn audiences(claims: &Map<String, Value>) -> Result<Vec<String>, JwtError> {
    let aud = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or(JwtError::Missing("aud"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(JwtError::Missing("aud")),
    };
    if aud.is_empty() {
        return Err(JwtError::Missing("aud"));
    }
    Ok(aud)
}

fn seconds(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or(JwtError::Missing(name)),
    }
}

/// Checks `token` for `audience` at `now` (Unix seconds), with the keys that
/// `bundle_for` gives for the subject's trust domain. Checks, in order: form,
/// header (`alg` ES256, `kid`, `typ`), `sub`, the key, the signature, `exp`,
/// `nbf`, the audience.
pub fn verify<'a>(
    token: &str,
    audience: &str,
    now: i64,
    bundle_for: impl Fn(&TrustDomain) -> Option<&'a JwkSet>,
) -> Result<Verified, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed(format!(
            "{} bytes, more than {MAX_TOKEN_LEN}",
            token.len()
        )));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("expected three parts".to_owned()));
    };
    let header: Header = json_part("header", h)?;
    if header.alg != "ES256" {
        return Err(JwtError::Algorithm(header.alg));
    }
    if let Some(typ) = header.typ.filter(|t| t != "JWT" && t != "JOSE") {
        return Err(JwtError::Type(typ));
    }
    let kid = header.kid.ok_or(JwtError::Missing("kid"))?;
    let claims: Map<String, Value> = json_part("claims", c)?;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::Missing("sub"))?;
    let spiffe_id: SpiffeId = sub
        .parse()
        .map_err(|e: crate::spiffe::SpiffeIdError| JwtError::Subject(e.to_string()))?;
    let td = spiffe_id.trust_domain();
    let bundle = bundle_for(&td).ok_or_else(|| JwtError::UnknownTrustDomain(td.to_string()))?;
    let key = bundle
        .keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| JwtError::UnknownKey {
            kid: kid.clone(),
            trust_domain: td.to_string(),
        })?;
    let sig = decode_part("signature", s)?;
    let input_len = h.len() + 1 + c.len();
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &key.point)
        .verify(&token.as_bytes()[..input_len], &sig)
        .map_err(|_| JwtError::Signature)?;
    let exp = seconds(&claims, "exp")?.ok_or(JwtError::Missing("exp"))?;
    if now >= exp {
        return Err(JwtError::Expired { exp, now });
    }
    if let Some(nbf) = seconds(&claims, "nbf")?
        && nbf > now + NBF_LEEWAY_SECS
    {
        return Err(JwtError::NotYetValid(nbf));
    }
    let aud = audiences(&claims)?;
    if !aud.iter().any(|a| a == audience) {
        return Err(JwtError::Audience {
            got: aud,
            want: audience.to_owned(),
        });
    }
    Ok(Verified { spiffe_id, claims })
}

/// Bundles by trust domain, the shape [`verify`]'s lookup wants.
pub type Bundles = BTreeMap<TrustDomain, JwkSet>;

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        SigningKey::from_pkcs8(doc.as_ref()).unwrap()
    }

    fn claims(aud: &[&str], exp: i64) -> Claims {
        Claims {
            sub: "spiffe://td.test/ns/a/sa/b".parse().unwrap(),
            aud: aud.iter().map(|s| (*s).to_owned()).collect(),
            exp,
            iat: 1000,
        }
    }

    fn bundles(keys: &[&SigningKey]) -> Bundles {
        let set = JwkSet {
            keys: keys.iter().map(|k| k.public().clone()).collect(),
        };
        // Through JSON, as agents receive it.
        let set = JwkSet::from_json(&set.to_json()).unwrap();
        BTreeMap::from([("td.test".parse().unwrap(), set)])
    }

    fn check(token: &str, aud: &str, now: i64, b: &Bundles) -> Result<Verified, JwtError> {
        verify(token, aud, now, |td| b.get(td))
    }

    #[test]
    fn signed_token_verifies_and_keeps_its_claims() {
        let k = key();
        let b = bundles(&[&k]);
        let t = k.sign(&claims(&["db", "web"], 2000)).unwrap();
        let v = check(&t, "web", 1500, &b).unwrap();
        assert_eq!(v.spiffe_id.as_str(), "spiffe://td.test/ns/a/sa/b");
        assert_eq!(v.claims["exp"], 2000);
        assert_eq!(v.claims["aud"], serde_json::json!(["db", "web"]));
    }

    #[test]
    fn refusals() {
        let k = key();
        let other = key();
        let b = bundles(&[&k]);
        let t = k.sign(&claims(&["db"], 2000)).unwrap();
        assert_eq!(
            check(&t, "db", 2000, &b),
            Err(JwtError::Expired {
                exp: 2000,
                now: 2000
            })
        );
        assert!(matches!(
            check(&t, "web", 1500, &b),
            Err(JwtError::Audience { .. })
        ));
        // Signed by a key not in the bundle.
        let t2 = other.sign(&claims(&["db"], 2000)).unwrap();
        assert!(matches!(
            check(&t2, "db", 1500, &b),
            Err(JwtError::UnknownKey { .. })
        ));
        // Same kid, other key: the signature fails.
        let mut forged = bundles(&[&k]);
        if let Some(set) = forged.values_mut().next() {
            set.keys[0].point = other.public().point.clone();
        }
        assert_eq!(check(&t, "db", 1500, &forged), Err(JwtError::Signature));
        // A changed claim breaks the signature.
        let parts: Vec<&str> = t.split('.').collect();
        let body = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&serde_json::json!({
                "sub": "spiffe://td.test/ns/a/sa/admin", "aud": ["db"], "exp": 2000
            }))
            .unwrap(),
        );
        let tampered = format!("{}.{}.{}", parts[0], body, parts[2]);
        assert_eq!(check(&tampered, "db", 1500, &b), Err(JwtError::Signature));
        // Unknown trust domain.
        assert!(matches!(
            check(&t, "db", 1500, &Bundles::new()),
            Err(JwtError::UnknownTrustDomain(_))
        ));
        // alg none / HS256 never reach a key.
        for alg in ["none", "HS256", "RS256"] {
            let h = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","kid":"x"}}"#));
            let t3 = format!("{h}.{}.{}", parts[1], parts[2]);
            assert_eq!(
                check(&t3, "db", 1500, &b),
                Err(JwtError::Algorithm(alg.into()))
            );
        }
        for bad in ["", "a", "a.b", "a.b.c.d", "!!.b.c"] {
            assert!(check(bad, "db", 1500, &b).is_err(), "{bad}");
        }
        assert!(matches!(
            check(&"a".repeat(MAX_TOKEN_LEN + 1), "db", 1, &b),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn nbf_in_the_future_is_refused_beyond_the_leeway() {
        // Hand-made token with nbf, signed properly.
        let k = key();
        let b = bundles(&[&k]);
        let h = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"ES256","kid":"{}"}}"#, k.public().kid));
        let c = URL_SAFE_NO_PAD
            .encode(r#"{"sub":"spiffe://td.test/x","aud":"db","exp":5000,"nbf":2000}"#);
        let input = format!("{h}.{c}");
        let rng = ring::rand::SystemRandom::new();
        let sig = k.pair.sign(&rng, input.as_bytes()).unwrap();
        let t = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
        assert_eq!(check(&t, "db", 1900, &b), Err(JwtError::NotYetValid(2000)));
        // A string audience is accepted, and nbf within the leeway.
        assert!(check(&t, "db", 1975, &b).is_ok());
    }

    #[test]
    fn jwk_set_round_trips_and_skips_x509_authorities() {
        let k = key();
        let set = JwkSet {
            keys: vec![k.public().clone()],
        };
        assert_eq!(JwkSet::from_json(&set.to_json()).unwrap(), set);
        let spire_style = format!(
            r#"{{"keys":[{{"use":"x509-svid","kty":"EC","crv":"P-256","x5c":["AA=="]}},
                {{"use":"jwt-svid","kty":"EC","crv":"P-256","kid":"k1","x":"{x}","y":"{y}"}}],
                "spiffe_refresh_hint":300}}"#,
            x = URL_SAFE_NO_PAD.encode(&k.public().point[1..33]),
            y = URL_SAFE_NO_PAD.encode(&k.public().point[33..65]),
        );
        let parsed = JwkSet::from_json(spire_style.as_bytes()).unwrap();
        assert_eq!(parsed.keys.len(), 1);
        assert_eq!(parsed.keys[0].kid, "k1");
        for bad in [
            r#"{"keys":[{"kty":"RSA","kid":"a","n":"x","e":"y"}]}"#,
            r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA","kid":"a"}]}"#,
            r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#,
            r#"{"nokeys":[]}"#,
            "not json",
        ] {
            assert!(JwkSet::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn kid_is_stable_per_key() {
        let k = key();
        let again = PublicKey::from_point(&k.public().point).unwrap();
        assert_eq!(again.kid, k.public().kid);
        assert_eq!(again.kid.len(), 32);
        assert!(PublicKey::from_point(&[4; 10]).is_err());
    }
}
