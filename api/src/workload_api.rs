//! The SPIFFE Workload API's messages, client and server, generated from
//! `proto/workload.proto`.

#![allow(missing_docs, missing_debug_implementations, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/_.rs"));

/// The metadata header every Workload API request must carry, with value "true".
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// JSON claims as a `google.protobuf.Struct`, for `ValidateJWTSVIDResponse`.
#[cfg(feature = "jwt")]
pub fn claims_struct(claims: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .iter()
            .map(|(k, v)| (k.clone(), json_value(v)))
            .collect(),
    }
}

#[cfg(feature = "jwt")]
fn json_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(claims_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "jwt")]
    #[test]
    fn claims_become_a_struct() {
        use prost_types::value::Kind;
        let claims = serde_json::json!({"sub": "spiffe://td/x", "aud": ["a", "b"], "exp": 5, "n": null, "o": {"t": true}});
        let s = claims_struct(claims.as_object().unwrap());
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://td/x".into()))
        );
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        assert_eq!(s.fields["n"].kind, Some(Kind::NullValue(0)));
        let Some(Kind::ListValue(aud)) = &s.fields["aud"].kind else {
            panic!("aud")
        };
        assert_eq!(aud.values.len(), 2);
        let Some(Kind::StructValue(o)) = &s.fields["o"].kind else {
            panic!("o")
        };
        assert_eq!(o.fields["t"].kind, Some(Kind::BoolValue(true)));
    }
    use prost::Message;

    #[test]
    fn messages_use_the_specified_field_numbers() {
        let msg = X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: "spiffe://td/x".into(),
                x509_svid: vec![1],
                x509_svid_key: vec![2],
                bundle: vec![3],
                hint: "internal".into(),
            }],
            crl: vec![],
            federated_bundles: [("spiffe://other".to_owned(), vec![4])].into(),
        };
        let bytes = msg.encode_to_vec();
        // Field 1 (svids), length-delimited: tag byte 0x0a. Field 3 (map): 0x1a.
        assert_eq!(bytes[0], 0x0a);
        assert!(bytes.contains(&0x1a));
        assert_eq!(X509svidResponse::decode(&bytes[..]).unwrap(), msg);
        // hint is field 5 of X509SVID: tag 0x2a, then the 8-byte string.
        let svid = msg.svids[0].encode_to_vec();
        let at = svid.iter().position(|b| *b == 0x2a).unwrap();
        assert_eq!(&svid[at + 2..], b"internal");
    }

    #[test]
    fn service_path_has_no_package() {
        assert_eq!(
            spiffe_workload_api_server::SERVICE_NAME,
            "SpiffeWorkloadAPI"
        );
    }
}
