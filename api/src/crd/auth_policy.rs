//! `AuthPolicy`: which peers may reach the selected workloads, on which ports,
//! and whether mutual authentication is required.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema;

/// Message of the CEL rule that orders a port range.
pub const MSG_PORT_RANGE: &str = "endPort must be greater than or equal to port";
/// Message of the CEL rule that needs at least one peer criterion.
pub const MSG_EMPTY_PEER: &str = "a from entry needs at least one of spiffeIDs, spiffeIDPrefixes, trustDomains, namespaces, podSelector or namespaceSelector";
/// Message of the CEL rule that limits HTTP rules to TCP ports.
pub const MSG_HTTP_NEEDS_TCP: &str =
    "http rules need a ports list in which every entry has protocol TCP";
/// Message of the CEL rule that needs `/` at the start of exact and prefix paths.
pub const MSG_PATH_SLASH: &str = "Exact and Prefix paths must start with '/'";
/// Message of the CEL rule on header matches.
pub const MSG_HEADER_ONE_OF: &str = "set at most one of exact and prefix";
/// Message of the CEL rule on terminated rules.
pub const MSG_TERMINATE_NEEDS: &str = "externalPeers TerminateTLS needs a ports list in which every entry has protocol TCP, and authentication Mutual";
/// Message of the CEL rule that refuses UDP ports.
pub const MSG_UDP_NOT_ENFORCED: &str = "UDP rules are not enforced yet (the data path checks TCP only) and are refused rather than ignored; use protocol TCP or remove the port";
/// Message of the CEL rule that keeps termination to Allow policies.
pub const MSG_TERMINATE_ALLOW_ONLY: &str = "externalPeers TerminateTLS is for Allow policies only";

/// Protects the pods its selector picks in its namespace. With no policy
/// selecting a workload, traffic to it is allowed; any matching Deny rule
/// denies; otherwise any matching Allow rule allows; otherwise, once any Allow
/// policy selects the workload, traffic is denied.
// Several printcolumn(...) entries each set type_, which clippy reads as a
// repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tessera.dev",
    version = "v1alpha1",
    kind = "AuthPolicy",
    namespaced,
    status = "AuthPolicyStatus",
    shortname = "ap",
    category = "tessera",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Endpoints",
        type_ = "integer",
        json_path = ".status.endpoints",
        description = "pods this policy applies to"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "integer",
        json_path = ".status.nodes",
        description = "nodes enforcing this policy"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = kube::core::Rule::new(
    "self.action == 'Allow' || !has(self.rules) || self.rules.all(r, !has(r.externalPeers) || r.externalPeers == 'Deny')"
).message(MSG_TERMINATE_ALLOW_ONLY))]
#[serde(rename_all = "camelCase")]
pub struct AuthPolicySpec {
    /// The workloads (pods in this namespace) the policy protects; `{}` selects all.
    pub selector: LabelSelector,
    /// Allow or Deny traffic that matches a rule.
    #[serde(default)]
    pub action: PolicyAction,
    /// Rules; traffic matches the policy when it matches any rule.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub rules: Vec<AuthRule>,
}

/// What a matching rule does.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PolicyAction {
    /// Let matching traffic through.
    #[default]
    Allow,
    /// Stop matching traffic.
    Deny,
}

/// One rule: peers, ports, authentication and optional HTTP rules. Empty
/// `from` matches any peer; empty `ports` matches any port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = kube::core::Rule::new(
        "!has(self.http) || size(self.http) == 0 || (has(self.ports) && size(self.ports) > 0 && self.ports.all(p, p.protocol == 'TCP'))"
    ).message(MSG_HTTP_NEEDS_TCP),
    validation = kube::core::Rule::new(
        "!has(self.externalPeers) || self.externalPeers == 'Deny' || (has(self.ports) && size(self.ports) > 0 && self.ports.all(p, p.protocol == 'TCP') && self.authentication == 'Mutual')"
    ).message(MSG_TERMINATE_NEEDS),
)]
#[serde(rename_all = "camelCase")]
pub struct AuthRule {
    /// Peers the rule applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub from: Vec<PeerSelector>,
    /// Destination ports the rule applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ports: Vec<PortRange>,
    /// Whether both workloads must be mutually authenticated first.
    #[serde(default)]
    pub authentication: Authentication,
    /// HTTP rules, for the waypoint proxy. Until a waypoint enforces them,
    /// an Allow rule with HTTP rules allows nothing and a Deny rule with
    /// HTTP rules denies its whole ports; the policy's `HTTPRulesEnforced`
    /// condition says so.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub http: Vec<HttpRule>,
    /// What happens to peers outside the mesh (no Tessera agent, such as
    /// workloads of a federated SPIRE trust domain) that this rule names.
    #[serde(default)]
    pub external_peers: ExternalPeers,
}

/// How a rule treats peers outside the mesh, which have no node agent to
/// authenticate them.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExternalPeers {
    /// Refused: the data path admits only peers whose agent authenticated
    /// them.
    #[default]
    Deny,
    /// The node agent terminates their TLS on the rule's ports: it presents
    /// the workload's X509-SVID, requires the peer's X509-SVID (verified
    /// against the bundle of the peer's trust domain: the own or a
    /// federated one), admits the peer only if the workload's rules do, and
    /// forwards the plaintext to the workload on the same port over its
    /// loopback interface. The workload serves plain TCP there. On a port
    /// with HTTP rules each decrypted request is checked against them (as
    /// the waypoint checks mesh peers', with the peer's verified SPIFFE ID)
    /// and forwarded in plain HTTP. Peers in the mesh still connect
    /// directly.
    #[serde(rename = "TerminateTLS")]
    TerminateTls,
}

/// Whether a rule requires mutual authentication.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Authentication {
    /// Both workloads' SPIFFE identities must be authenticated by the node agents.
    #[default]
    Mutual,
    /// Policy only; no authentication handshake.
    None,
}

/// Which peers a rule matches; a peer must satisfy every field that is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.spiffeIDs) || has(self.spiffeIDPrefixes) || has(self.trustDomains) || has(self.namespaces) || has(self.podSelector) || has(self.namespaceSelector)"
).message(MSG_EMPTY_PEER))]
#[serde(rename_all = "camelCase")]
pub struct PeerSelector {
    /// Exact SPIFFE IDs.
    #[serde(rename = "spiffeIDs", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::spiffe_id_set")]
    pub spiffe_ids: Vec<String>,
    /// SPIFFE ID prefixes, matched segment by segment (`spiffe://td/ns/a`
    /// matches `spiffe://td/ns/a/sa/b`, not `spiffe://td/ns/ab`).
    #[serde(
        rename = "spiffeIDPrefixes",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(schema_with = "schema::spiffe_id_set")]
    pub spiffe_id_prefixes: Vec<String>,
    /// Any workload of these trust domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::trust_domain_set")]
    pub trust_domains: Vec<String>,
    /// Any workload in these namespaces of this cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::namespace_set")]
    pub namespaces: Vec<String>,
    /// Pods with these labels (in the namespaces `namespaceSelector` picks, or
    /// the policy's own namespace when it is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// A destination port or inclusive port range.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = kube::core::Rule::new("!has(self.endPort) || self.endPort >= self.port").message(MSG_PORT_RANGE),
    validation = kube::core::Rule::new("!has(self.protocol) || self.protocol == 'TCP'").message(MSG_UDP_NOT_ENFORCED),
)]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    /// The port, or the first port of the range.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The last port of the range, inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
    /// Transport protocol. Only TCP is enforced today; the API server
    /// refuses UDP.
    #[serde(default)]
    pub protocol: Protocol,
}

impl PortRange {
    /// TCP `port`, or TCP `port..=end_port`.
    pub fn tcp(port: i32, end_port: Option<i32>) -> PortRange {
        PortRange {
            port,
            end_port,
            protocol: Protocol::Tcp,
        }
    }
}

/// Transport protocol of a port rule.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
}

/// HTTP conditions; a request matches when it matches every list that is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRule {
    /// Request methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 9))]
    pub methods: Vec<HttpMethod>,
    /// Request paths; any may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub paths: Vec<PathMatch>,
    /// Request headers; all must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HeaderMatch>,
}

/// An HTTP request method.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
#[allow(missing_docs)]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Connect,
    Trace,
}

/// A path condition.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = kube::core::Rule::new("self.type == 'Regex' || self.value.startsWith('/')").message(MSG_PATH_SLASH))]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    /// How `value` is compared with the request path.
    #[serde(rename = "type", default)]
    pub match_type: PathMatchType,
    /// The path, prefix or RE2 regular expression.
    #[schemars(length(min = 1, max = 1024))]
    pub value: String,
}

/// How a path is compared.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathMatchType {
    /// The whole path equals the value.
    Exact,
    /// The path starts with the value, at a segment boundary.
    #[default]
    Prefix,
    /// The whole path matches the RE2 expression.
    Regex,
}

/// A header condition: presence only, an exact value, or a value prefix.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = kube::core::Rule::new("!(has(self.exact) && has(self.prefix))").message(MSG_HEADER_ONE_OF))]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name (an HTTP token).
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    )]
    pub name: String,
    /// The header must equal this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub exact: Option<String>,
    /// The header must start with this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub prefix: Option<String>,
}

/// Observed state of an AuthPolicy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthPolicyStatus {
    /// Standard conditions; `Ready` says whether the policy is compiled and enforced.
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many pods the policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<i64>,
    /// On how many nodes it is enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<i64>,
}
