//! One workload's rules as the waypoint applies them to each request, and
//! the decision. The semantics are the README's L4 rules carried to L7
//! (Istio's): a Deny rule whose peers, port and `http[]` match the request
//! denies it; otherwise, when Allow policies select the workload, some
//! Allow rule must match (a rule without `http[]` matches every request on
//! its ports); otherwise the request is allowed. Peers are matched as the
//! data path matches them: by the source's SPIFFE ID, and a rule requiring
//! mutual authentication matches only a source the agents authenticated.

use http::{HeaderMap, Method};
use regex::Regex;
use tessera_api::crd::auth_policy::{
    Authentication, HeaderMatch, HttpMethod, HttpRule, PathMatch, PathMatchType, PolicyAction,
};
use tessera_api::crd::identity_policy::{CompiledPeer, CompiledRule, IdentityPolicySpec};
use tessera_api::spiffe::SpiffeId;

use super::PolicyError;

/// Largest compiled form of one path regex (bytes): a rule cannot make the
/// waypoint spend much memory or time on one request.
const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// Who sent a request, as the data path knows the connection's source.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Its SPIFFE ID; None for a peer with no identity.
    pub id: Option<SpiffeId>,
    /// Whether the agents authenticated it with the workload.
    pub authenticated: bool,
}

/// What the rules look at in a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path, normalised (see [`super::normalise`]).
    pub path: &'a str,
    /// The headers; `host` also answers for HTTP/2's `:authority`.
    pub headers: &'a HeaderMap,
    /// The authority of the request target, when it has one.
    pub authority: Option<&'a str>,
    /// The destination port.
    pub port: u16,
}

/// The decision on one request, with what decided it (for logs and
/// metrics; never for the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward it.
    Allow,
    /// A Deny rule matched: the index of the rule.
    DeniedByRule(usize),
    /// Allow policies select the workload and none of their rules matched.
    NotAllowed,
}

impl Decision {
    /// The metrics label of a denial (`None` for an allow).
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Decision::Allow => None,
            Decision::DeniedByRule(_) => Some("deny_rule"),
            Decision::NotAllowed => Some("no_allow_rule"),
        }
    }
}

/// One workload's rules, compiled for requests.
#[derive(Debug)]
pub struct Rules {
    default_deny: bool,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    action: PolicyAction,
    from: Vec<CompiledPeer>,
    ports: Vec<(u16, u16)>,
    mutual: bool,
    /// Empty: every request on the rule's ports.
    http: Vec<Http>,
}

#[derive(Debug)]
struct Http {
    methods: Vec<Method>,
    paths: Vec<Path>,
    headers: Vec<Header>,
}

#[derive(Debug)]
enum Path {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
struct Header {
    /// Lower case.
    name: String,
    value: Value,
}

#[derive(Debug)]
enum Value {
    Present,
    Exact(String),
    Prefix(String),
}

impl Rules {
    /// Compiles a workload's compiled policy for requests.
    pub fn compile(policy: &IdentityPolicySpec) -> Result<Rules, PolicyError> {
        let rules = policy
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| compile_rule(i, r))
            .collect::<Result<_, _>>()?;
        Ok(Rules {
            default_deny: policy.default_deny,
            rules,
        })
    }

    /// The decision on `req` from `source`.
    pub fn decide(&self, source: &Source, req: &Request<'_>) -> Decision {
        let applies = |r: &Rule| r.applies_to(source, req.port);
        if let Some(i) = self
            .rules
            .iter()
            .position(|r| r.action == PolicyAction::Deny && applies(r) && r.matches(req))
        {
            return Decision::DeniedByRule(i);
        }
        let allowed = self
            .rules
            .iter()
            .any(|r| r.action == PolicyAction::Allow && applies(r) && r.matches(req));
        if self.default_deny && !allowed {
            return Decision::NotAllowed;
        }
        Decision::Allow
    }
}

fn compile_rule(index: usize, rule: &CompiledRule) -> Result<Rule, PolicyError> {
    let ports = rule
        .ports
        .iter()
        .map(|p| {
            let port = |n: i32| {
                u16::try_from(n).map_err(|_| PolicyError::Port {
                    rule: index,
                    port: n,
                })
            };
            Ok((port(p.port)?, port(p.end_port.unwrap_or(p.port))?))
        })
        .collect::<Result<_, PolicyError>>()?;
    let http = rule
        .http
        .iter()
        .map(|h| compile_http(index, h))
        .collect::<Result<_, _>>()?;
    Ok(Rule {
        action: rule.action,
        from: rule.from.clone(),
        ports,
        mutual: rule.authentication == Authentication::Mutual && rule.action == PolicyAction::Allow,
        http,
    })
}

fn compile_http(index: usize, rule: &HttpRule) -> Result<Http, PolicyError> {
    let paths = rule
        .paths
        .iter()
        .map(|p| compile_path(index, p))
        .collect::<Result<_, _>>()?;
    Ok(Http {
        methods: rule.methods.iter().map(|m| method(*m)).collect(),
        paths,
        headers: rule.headers.iter().map(compile_header).collect(),
    })
}

fn method(m: HttpMethod) -> Method {
    match m {
        HttpMethod::Get => Method::GET,
        HttpMethod::Head => Method::HEAD,
        HttpMethod::Post => Method::POST,
        HttpMethod::Put => Method::PUT,
        HttpMethod::Delete => Method::DELETE,
        HttpMethod::Patch => Method::PATCH,
        HttpMethod::Options => Method::OPTIONS,
        HttpMethod::Connect => Method::CONNECT,
        HttpMethod::Trace => Method::TRACE,
    }
}

fn compile_path(index: usize, p: &PathMatch) -> Result<Path, PolicyError> {
    Ok(match p.match_type {
        PathMatchType::Exact => Path::Exact(p.value.clone()),
        PathMatchType::Prefix => Path::Prefix(p.value.clone()),
        PathMatchType::Regex => Path::Regex(
            regex::RegexBuilder::new(&format!("^(?:{})$", p.value))
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| PolicyError::Regex {
                    rule: index,
                    pattern: p.value.clone(),
                    reason: e.to_string(),
                })?,
        ),
    })
}

fn compile_header(h: &HeaderMatch) -> Header {
    let value = match (&h.exact, &h.prefix) {
        (Some(exact), _) => Value::Exact(exact.clone()),
        (None, Some(prefix)) => Value::Prefix(prefix.clone()),
        (None, None) => Value::Present,
    };
    Header {
        name: h.name.to_ascii_lowercase(),
        value,
    }
}

impl Rule {
    /// Whether the rule names this source (and, for one requiring mutual
    /// authentication, the agents authenticated it) on this port.
    fn applies_to(&self, source: &Source, port: u16) -> bool {
        let port_ok =
            self.ports.is_empty() || self.ports.iter().any(|(a, b)| (*a..=*b).contains(&port));
        let peer_ok = self.from.is_empty()
            || source
                .id
                .as_ref()
                .is_some_and(|id| self.from.iter().any(|p| p.matches(id)));
        port_ok && peer_ok && (!self.mutual || source.authenticated)
    }

    fn matches(&self, req: &Request<'_>) -> bool {
        self.http.is_empty() || self.http.iter().any(|h| h.matches(req))
    }
}

impl Http {
    fn matches(&self, req: &Request<'_>) -> bool {
        (self.methods.is_empty() || self.methods.contains(req.method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(req.path)))
            && self.headers.iter().all(|h| h.matches(req))
    }
}

impl Path {
    fn matches(&self, path: &str) -> bool {
        match self {
            Path::Exact(p) => path == p,
            Path::Prefix(p) => prefix_at_segment(p, path),
            Path::Regex(r) => r.is_match(path),
        }
    }
}

/// Whether `prefix` is `path` or a prefix of it ending at a segment
/// boundary (`/api` matches `/api` and `/api/x`, not `/apix`).
fn prefix_at_segment(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

impl Header {
    /// Whether any value of the header matches (`host` also answers with
    /// the request target's authority, which HTTP/2 sends as `:authority`).
    fn matches(&self, req: &Request<'_>) -> bool {
        let mut values: Vec<&[u8]> = req
            .headers
            .get_all(self.name.as_str())
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if self.name == "host"
            && let Some(authority) = req.authority
        {
            values.push(authority.as_bytes());
        }
        values.iter().any(|v| match &self.value {
            Value::Present => true,
            Value::Exact(want) => *v == want.as_bytes(),
            Value::Prefix(want) => v.starts_with(want.as_bytes()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_api::crd::auth_policy::PortRange;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn web() -> Source {
        Source {
            id: Some(id("spiffe://td/ns/shop/sa/web")),
            authenticated: true,
        }
    }

    fn peer(ids: &[&str]) -> CompiledPeer {
        CompiledPeer {
            spiffe_ids: Some(ids.iter().map(|s| (*s).to_owned()).collect()),
            ..Default::default()
        }
    }

    /// A workload's rules: each compiled rule with its HTTP conditions.
    fn rules(
        default_deny: bool,
        rules: Vec<(CompiledRule, Vec<HttpRule>)>,
    ) -> Result<Rules, PolicyError> {
        Rules::compile(&IdentityPolicySpec {
            spiffe_id: "spiffe://td/ns/shop/sa/db".into(),
            default_deny,
            rules: rules
                .into_iter()
                .map(|(r, http)| CompiledRule { http, ..r })
                .collect(),
            sources: Vec::new(),
        })
    }

    fn rule(action: PolicyAction, from: &[&str]) -> CompiledRule {
        CompiledRule {
            action,
            from: if from.is_empty() {
                Vec::new()
            } else {
                vec![peer(from)]
            },
            ports: vec![PortRange::tcp(8080, None)],
            ..Default::default()
        }
    }

    fn http(methods: &[HttpMethod], paths: &[(PathMatchType, &str)]) -> HttpRule {
        HttpRule {
            methods: methods.to_vec(),
            paths: paths
                .iter()
                .map(|(t, v)| PathMatch {
                    match_type: *t,
                    value: (*v).to_owned(),
                })
                .collect(),
            headers: Vec::new(),
        }
    }

    fn decide(
        rules: &Rules,
        source: &Source,
        method: Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Decision {
        rules.decide(
            source,
            &Request {
                method: &method,
                path,
                headers,
                authority: None,
                port: 8080,
            },
        )
    }

    /// web may GET /api/*; nobody else may do anything.
    fn api_reader() -> Rules {
        rules(
            true,
            vec![(
                rule(PolicyAction::Allow, &["spiffe://td/ns/shop/sa/web"]),
                vec![http(&[HttpMethod::Get], &[(PathMatchType::Prefix, "/api")])],
            )],
        )
        .unwrap()
    }

    #[test]
    fn an_allow_rule_allows_what_it_names_and_nothing_else() {
        let rules = api_reader();
        let h = HeaderMap::new();
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/api/orders", &h),
            Decision::Allow
        );
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/api", &h),
            Decision::Allow
        );
        assert_eq!(
            decide(&rules, &web(), Method::POST, "/api/orders", &h),
            Decision::NotAllowed
        );
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/apix", &h),
            Decision::NotAllowed
        );
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/admin", &h),
            Decision::NotAllowed
        );
        let other = Source {
            id: Some(id("spiffe://td/ns/shop/sa/other")),
            authenticated: true,
        };
        assert_eq!(
            decide(&rules, &other, Method::GET, "/api/orders", &h),
            Decision::NotAllowed
        );
        let anonymous = Source {
            id: None,
            authenticated: false,
        };
        assert_eq!(
            decide(&rules, &anonymous, Method::GET, "/api/orders", &h),
            Decision::NotAllowed
        );
    }

    #[test]
    fn a_rule_requiring_authentication_does_not_match_an_unauthenticated_source() {
        let rules = api_reader();
        let unauthenticated = Source {
            authenticated: false,
            ..web()
        };
        let h = HeaderMap::new();
        assert_eq!(
            decide(&rules, &unauthenticated, Method::GET, "/api/orders", &h),
            Decision::NotAllowed
        );
    }

    #[test]
    fn a_deny_rule_wins_over_an_allow_rule() {
        let rules = rules(
            true,
            vec![
                (rule(PolicyAction::Allow, &[]), Vec::new()),
                (
                    rule(PolicyAction::Deny, &[]),
                    vec![http(&[], &[(PathMatchType::Exact, "/admin")])],
                ),
            ],
        )
        .unwrap();
        let h = HeaderMap::new();
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/admin", &h),
            Decision::DeniedByRule(1)
        );
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/admin/x", &h),
            Decision::Allow
        );
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/", &h),
            Decision::Allow
        );
    }

    #[test]
    fn without_allow_policies_only_deny_rules_refuse() {
        let rules = rules(
            false,
            vec![(
                rule(PolicyAction::Deny, &[]),
                vec![http(&[HttpMethod::Delete], &[])],
            )],
        )
        .unwrap();
        let h = HeaderMap::new();
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/x", &h),
            Decision::Allow
        );
        assert_eq!(
            decide(&rules, &web(), Method::DELETE, "/x", &h),
            Decision::DeniedByRule(0)
        );
    }

    #[test]
    fn a_rule_applies_on_its_ports_only() {
        let rules = rules(
            false,
            vec![(rule(PolicyAction::Deny, &[]), vec![http(&[], &[])])],
        )
        .unwrap();
        let h = HeaderMap::new();
        let on = |port| {
            rules.decide(
                &web(),
                &Request {
                    method: &Method::GET,
                    path: "/",
                    headers: &h,
                    authority: None,
                    port,
                },
            )
        };
        assert_eq!(on(8080), Decision::DeniedByRule(0));
        assert_eq!(on(8081), Decision::Allow);
    }

    #[test]
    fn regexes_match_the_whole_path() {
        let rules = rules(
            true,
            vec![(
                rule(PolicyAction::Allow, &[]),
                vec![http(&[], &[(PathMatchType::Regex, "/v[0-9]+/items")])],
            )],
        )
        .unwrap();
        let h = HeaderMap::new();
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/v2/items", &h),
            Decision::Allow
        );
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/v2/items/x", &h),
            Decision::NotAllowed
        );
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/x/v2/items", &h),
            Decision::NotAllowed
        );
    }

    #[test]
    fn headers_match_by_name_in_any_case_and_host_answers_for_the_authority() {
        let with = |name: &str, exact: Option<&str>, prefix: Option<&str>| HttpRule {
            headers: vec![HeaderMatch {
                name: name.to_owned(),
                exact: exact.map(str::to_owned),
                prefix: prefix.map(str::to_owned),
            }],
            ..Default::default()
        };
        let rules = rules(
            true,
            vec![(
                rule(PolicyAction::Allow, &[]),
                vec![
                    with("X-Tenant", Some("acme"), None),
                    with("Host", None, Some("db.")),
                ],
            )],
        )
        .unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/", &h),
            Decision::NotAllowed
        );
        h.insert("x-tenant", "acme".parse().unwrap());
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/", &h),
            Decision::Allow
        );
        h.insert("x-tenant", "acme2".parse().unwrap());
        assert_eq!(
            decide(&rules, &web(), Method::GET, "/", &h),
            Decision::NotAllowed
        );
        let empty = HeaderMap::new();
        let by_authority = rules.decide(
            &web(),
            &Request {
                method: &Method::GET,
                path: "/",
                headers: &empty,
                authority: Some("db.shop:8080"),
                port: 8080,
            },
        );
        assert_eq!(by_authority, Decision::Allow);
    }

    #[test]
    fn a_bad_regex_is_an_error_naming_the_rule_and_pattern() {
        let err = rules(
            true,
            vec![(
                rule(PolicyAction::Allow, &[]),
                vec![http(&[], &[(PathMatchType::Regex, "/(")])],
            )],
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("rule 0") && text.contains("/("), "{text}");
    }

    #[test]
    fn an_oversized_regex_is_refused() {
        let huge = format!("/{}", "(a|b|c|d|e)".repeat(2000));
        assert!(
            rules(
                true,
                vec![(
                    rule(PolicyAction::Allow, &[]),
                    vec![http(&[], &[(PathMatchType::Regex, &huge)])]
                )]
            )
            .is_err()
        );
    }
}
