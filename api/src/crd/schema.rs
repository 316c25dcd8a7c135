//! Hand-written OpenAPI schemas for the string kinds that recur across the CRDs
//! (SPIFFE IDs, trust domains, templates, durations, URLs), each with the bounds
//! and CEL rules the API server enforces. Used through `#[schemars(schema_with)]`.
//!
//! Every CEL rule carries a message that names what to fix; the integration
//! tests match on these messages, so changing one means changing its test.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{Schema, SchemaGenerator, json_schema};

use crate::spiffe::{
    MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN, SPIFFE_ID_PATTERN, TRUST_DOMAIN_PATTERN,
};
use crate::template::{DNS_NAME_TEMPLATE_PATTERN, SPIFFE_ID_TEMPLATE_PATTERN};

/// Message of the CEL rule that requires the `spiffe://` scheme on templates.
pub const MSG_TEMPLATE_SCHEME: &str = "spiffeIDTemplate must start with spiffe://";
/// Message of the CEL rule that requires https bundle endpoints.
pub const MSG_HTTPS_ONLY: &str = "bundleEndpointURL must be an https:// URL";
/// Message of the CEL rule that forbids user info in bundle endpoint URLs.
pub const MSG_NO_USERINFO: &str = "bundleEndpointURL must not contain user info (user:password@)";
/// Message of the CEL rule that forbids fragments in bundle endpoint URLs.
pub const MSG_NO_FRAGMENT: &str = "bundleEndpointURL must not contain a fragment (#...)";

/// Most entries any list of identities, trust domains or names may hold; it
/// also bounds the CEL cost estimate.
pub const MAX_LIST_ITEMS: u64 = 64;

/// Pattern for a Go-style duration made of whole units, as `duration()` in CEL reads it.
pub const DURATION_PATTERN: &str = crate::duration::PATTERN;

/// A SPIFFE ID string.
pub fn spiffe_id(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": MAX_SPIFFE_ID_LEN,
        "pattern": SPIFFE_ID_PATTERN,
    })
}

fn set_of(items: Schema) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_LIST_ITEMS,
        "x-kubernetes-list-type": "set",
        "items": items,
    })
}

/// A non-empty set of SPIFFE IDs.
pub fn spiffe_id_set(g: &mut SchemaGenerator) -> Schema {
    set_of(spiffe_id(g))
}

/// A trust domain name.
pub fn trust_domain(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_TRUST_DOMAIN_LEN,
        "pattern": TRUST_DOMAIN_PATTERN,
    })
}

/// A non-empty set of trust domain names.
pub fn trust_domain_set(g: &mut SchemaGenerator) -> Schema {
    set_of(trust_domain(g))
}

/// A non-empty set of namespace names (DNS labels).
pub fn namespace_set(_: &mut SchemaGenerator) -> Schema {
    set_of(json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 63,
        "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
    }))
}

/// A SPIFFE ID template (see [`crate::template`]).
pub fn spiffe_id_template(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_SPIFFE_ID_LEN,
        "pattern": SPIFFE_ID_TEMPLATE_PATTERN,
        "x-kubernetes-validations": [
            {"rule": "self.startsWith('spiffe://')", "message": MSG_TEMPLATE_SCHEME},
        ],
    })
}

/// A list of DNS SAN templates.
pub fn dns_name_templates(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": 16,
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": 253,
            "pattern": DNS_NAME_TEMPLATE_PATTERN,
        },
    })
}

fn bounded_duration(min: &str, max: &str, field: &str) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 32,
        "pattern": DURATION_PATTERN,
        "x-kubernetes-validations": [{
            "rule": format!("duration(self) >= duration('{min}') && duration(self) <= duration('{max}')"),
            "message": format!("{field} must be between {min} and {max}"),
        }],
    })
}

/// X.509-SVID lifetime: 10 minutes to 30 days.
pub fn svid_ttl(_: &mut SchemaGenerator) -> Schema {
    bounded_duration("10m", "720h", "ttl")
}

/// JWT-SVID lifetime: 1 minute to 24 hours.
pub fn jwt_ttl(_: &mut SchemaGenerator) -> Schema {
    bounded_duration("1m", "24h", "jwtTTL")
}

/// Federation refresh interval: 30 seconds to 24 hours.
pub fn refresh_interval(_: &mut SchemaGenerator) -> Schema {
    bounded_duration("30s", "24h", "refreshInterval")
}

/// How long a federated bundle is trusted without a refresh: 10 seconds to 24 hours.
pub fn max_bundle_age(_: &mut SchemaGenerator) -> Schema {
    bounded_duration("10s", "24h", "maxBundleAge")
}

/// An https URL without user info or fragment.
pub fn bundle_endpoint_url(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 2048,
        "x-kubernetes-validations": [
            {"rule": "isURL(self) && url(self).getScheme() == 'https'", "message": MSG_HTTPS_ONLY},
            {"rule": "!self.matches('^[^/]*//[^/?#]*@')", "message": MSG_NO_USERINFO},
            {"rule": "!self.contains('#')", "message": MSG_NO_FRAGMENT},
        ],
    })
}

/// Status conditions as a list map keyed by `type`, so that server-side apply
/// merges one condition without replacing the others.
pub fn conditions(g: &mut SchemaGenerator) -> Schema {
    let mut schema = g.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}
