//! The SPIFFE bundle codec against documents as bundle endpoints serve them.
#![cfg(feature = "bundle")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use serde_json::{Value, json};
use tessera_api::bundle::{BundleError, SpiffeBundle};
use tessera_api::jwt::{JwkSet, PublicKey};

fn ca() -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().der().to_vec()
}

fn jwt_key() -> PublicKey {
    let key = KeyPair::generate().unwrap();
    PublicKey::from_point(key.public_key_raw()).unwrap()
}

fn bundle() -> SpiffeBundle {
    SpiffeBundle {
        x509_authorities: vec![ca(), ca()],
        jwt_authorities: JwkSet {
            keys: vec![jwt_key()],
        },
        sequence: Some(42),
        refresh_hint: Some(300),
    }
}

fn doc(b: &SpiffeBundle) -> Value {
    serde_json::from_slice(&b.to_json().unwrap()).unwrap()
}

fn decode(v: &Value) -> Result<SpiffeBundle, BundleError> {
    SpiffeBundle::from_json(&serde_json::to_vec(v).unwrap()).map(|d| d.bundle)
}

fn key_error(v: &Value) -> (usize, String) {
    match decode(v) {
        Err(BundleError::Key { index, source }) => (index, source.to_string()),
        other => panic!("expected a key error, got {other:?}"),
    }
}

#[test]
fn round_trip_keeps_authorities_sequence_and_hint() {
    let b = bundle();
    let v = doc(&b);
    assert_eq!(v["spiffe_sequence"], 42);
    assert_eq!(v["spiffe_refresh_hint"], 300);
    assert_eq!(v["keys"][0]["use"], "x509-svid");
    assert_eq!(v["keys"][0]["kty"], "EC");
    assert_eq!(v["keys"][0]["crv"], "P-256");
    assert_eq!(
        STANDARD
            .decode(v["keys"][1]["x5c"][0].as_str().unwrap())
            .unwrap(),
        b.x509_authorities[1]
    );
    assert_eq!(v["keys"][2]["use"], "jwt-svid");
    assert_eq!(v["keys"][2]["kid"], b.jwt_authorities.keys[0].kid.as_str());
    let decoded = SpiffeBundle::from_json(&b.to_json().unwrap()).unwrap();
    assert_eq!(decoded.bundle, b);
    assert!(decoded.ignored.is_empty());
}

#[test]
fn unknown_kty_and_use_are_ignored_not_fatal() {
    let b = bundle();
    let mut v = doc(&b);
    let keys = v["keys"].as_array_mut().unwrap();
    keys.push(json!({"kty": "OKP", "use": "x509-svid", "crv": "Ed25519", "x": "AA"}));
    keys.push(json!({"kty": "EC", "use": "wit-svid", "crv": "P-256"}));
    keys.push(json!({"kty": "RSA", "use": "jwt-svid", "kid": "r1", "n": "AQAB", "e": "AQAB"}));
    v["extra_member"] = json!({"anything": true});
    let decoded = SpiffeBundle::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(decoded.bundle, b);
    assert_eq!(decoded.ignored.len(), 3, "{:?}", decoded.ignored);
    assert!(decoded.ignored[0].contains("OKP"));
    assert!(decoded.ignored[1].contains("wit-svid"));
    assert!(decoded.ignored[2].contains("r1"));
}

#[test]
fn sequence_and_hint_are_optional() {
    let mut b = bundle();
    b.sequence = None;
    b.refresh_hint = None;
    let v = doc(&b);
    assert!(v.get("spiffe_sequence").is_none());
    assert_eq!(decode(&v).unwrap(), b);
}

#[test]
fn an_x509_key_needs_exactly_one_matching_certificate() {
    let b = bundle();
    let v = doc(&b);

    let mut two = v.clone();
    let cert = two["keys"][0]["x5c"][0].clone();
    two["keys"][0]["x5c"].as_array_mut().unwrap().push(cert);
    let (index, reason) = key_error(&two);
    assert_eq!(index, 0);
    assert!(reason.contains("exactly one"), "{reason}");

    let mut none = v.clone();
    none["keys"][1].as_object_mut().unwrap().remove("x5c");
    let (index, reason) = key_error(&none);
    assert_eq!(index, 1);
    assert!(reason.contains("x5c"), "{reason}");

    // The JWK's key must be the certificate's.
    let mut swapped = v.clone();
    swapped["keys"][0]["x"] = v["keys"][1]["x"].clone();
    let (_, reason) = key_error(&swapped);
    assert!(reason.contains("do not match"), "{reason}");

    let mut garbage = v.clone();
    garbage["keys"][0]["x5c"][0] = json!(STANDARD.encode(b"not a certificate"));
    let (_, reason) = key_error(&garbage);
    assert!(reason.contains("not an X.509 certificate"), "{reason}");

    let mut not_b64 = v;
    not_b64["keys"][0]["x5c"][0] = json!("%%%");
    let (_, reason) = key_error(&not_b64);
    assert!(reason.contains("not base64"), "{reason}");
}

#[test]
fn jwt_keys_need_a_kid_and_a_p256_point() {
    let v = doc(&bundle());
    let mut no_kid = v.clone();
    no_kid["keys"][2].as_object_mut().unwrap().remove("kid");
    let (index, reason) = key_error(&no_kid);
    assert_eq!(index, 2);
    assert!(reason.contains("kid"), "{reason}");

    let mut short = v;
    short["keys"][2]["x"] = json!("AAAA");
    let (_, reason) = key_error(&short);
    assert!(reason.contains("32-byte"), "{reason}");
}

#[test]
fn malformed_documents_say_what_is_wrong() {
    for (text, needle) in [
        ("", "EOF"),
        ("[]", "JWK set"),
        ("{}", "keys"),
        (r#"{"keys": {}}"#, "sequence"),
        (r#"{"keys": [], "spiffe_refresh_hint": -5}"#, "-5"),
        (r#"{"keys": [], "spiffe_sequence": "1"}"#, "string"),
        (r#"{"keys": [7]}"#, "not a JSON object"),
        (r#"{"keys": [{"use": "x509-svid"}]}"#, "no kty"),
        (r#"{"keys": [{"kty": "EC"}]}"#, "no use"),
        (
            r#"{"keys": [{"kty": 1, "use": "x509-svid"}]}"#,
            "kty is not a string",
        ),
    ] {
        let err = SpiffeBundle::from_json(text.as_bytes()).unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "{text:?}: {err} (wanted {needle:?})"
        );
    }
    let huge = vec![b' '; tessera_api::bundle::MAX_BUNDLE_LEN + 1];
    assert!(SpiffeBundle::from_json(&huge).is_err());
}
