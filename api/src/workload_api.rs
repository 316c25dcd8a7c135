//! The SPIFFE Workload API's messages, client and server, generated from
//! `proto/workload.proto`.

#![allow(missing_docs, missing_debug_implementations, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/_.rs"));

/// The metadata header every Workload API request must carry, with value "true".
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

#[cfg(test)]
mod tests {
    use super::*;
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
