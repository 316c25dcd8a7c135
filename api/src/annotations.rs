//! Pod annotations through which the operator hands each pod's identity to
//! the node agents. Only the operator writes them (server-side apply, field
//! manager `tessera-operator`).

/// The pod's SPIFFE ID.
pub const SPIFFE_ID: &str = "tessera.dev/spiffe-id";
/// The pod's numeric identity and generation, as `<id>/<generation>`.
pub const IDENTITY: &str = "tessera.dev/identity";
/// The WorkloadIdentity that chose the SPIFFE ID, or `default`.
pub const IDENTITY_SOURCE: &str = "tessera.dev/identity-source";
/// Why the pod has no identity; set instead of the three above.
pub const IDENTITY_ERROR: &str = "tessera.dev/identity-error";
/// The trust domains whose bundles the pod receives through the Workload
/// API (its WorkloadIdentity's `federatesWith`), comma-separated; absent
/// when none.
pub const FEDERATES_WITH: &str = "tessera.dev/federates-with";

/// Parses the [`FEDERATES_WITH`] annotation value into trust domain IDs
/// (`spiffe://b.test`); names that are not trust domains are skipped.
pub fn parse_federates_with(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter_map(|td| td.trim().parse::<crate::spiffe::TrustDomain>().ok())
        .map(|td| td.id().to_string())
        .collect()
}

/// Formats the [`IDENTITY`] annotation value.
pub fn format_identity(id: u32, generation: i64) -> String {
    format!("{id}/{generation}")
}

/// Parses the [`IDENTITY`] annotation value; None when malformed.
pub fn parse_identity(value: &str) -> Option<(u32, i64)> {
    let (id, generation) = value.split_once('/')?;
    Some((id.parse().ok()?, generation.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips() {
        assert_eq!(parse_identity(&format_identity(300, 7)), Some((300, 7)));
        assert_eq!(parse_identity("300"), None);
        assert_eq!(parse_identity("x/1"), None);
        assert_eq!(parse_identity("1/-"), None);
    }

    #[test]
    fn federates_with_parses_to_trust_domain_ids() {
        assert_eq!(
            parse_federates_with("b.test,c.test"),
            ["spiffe://b.test", "spiffe://c.test"]
        );
        assert_eq!(
            parse_federates_with("b.test, Not Valid,"),
            ["spiffe://b.test"]
        );
        assert!(parse_federates_with("").is_empty());
    }
}
