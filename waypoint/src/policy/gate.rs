//! What the waypoint does with one request before any byte of it reaches
//! the workload: its path made canonical ([`super::normalise`]), the rules
//! applied with the source the data path names, and then either the
//! request as the workload gets it (the canonical path, the client's
//! `x-forwarded-client-cert` replaced by the waypoint's own) or the answer
//! the client gets instead: 400 for a path no rule can speak for, 403 for
//! a denial (gRPC: a trailers-only answer with status 7,
//! PERMISSION_DENIED). Neither answer names a policy or a rule: those go
//! to the waypoint's log.

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode, Uri};

use super::{Decision, PathError, Rules, Source, normalise};

/// The header carrying the caller's identity to the workload.
pub const XFCC: &str = "x-forwarded-client-cert";

/// What becomes of a request.
#[derive(Debug)]
pub enum Gate<B> {
    /// Forward this request (path canonical, identity header set).
    Forward(Request<B>),
    /// Answer the client with this instead; the workload sees nothing. The
    /// request's body comes back: a client still sending it should be
    /// let finish (some HTTP/2 clients take a reset of the stream after an
    /// early answer as an error).
    Refuse(Refusal, B),
}

/// Why a request was refused, and what the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The path cannot be matched safely (400).
    BadPath {
        /// What is wrong with it.
        error: PathError,
        /// Whether the client speaks gRPC.
        grpc: bool,
    },
    /// The rules deny it (403).
    Denied {
        /// The decision, with the rule that made it.
        decision: Decision,
        /// Whether the client speaks gRPC.
        grpc: bool,
    },
}

impl Refusal {
    /// The answer for the client: a short plain-text body, or for gRPC a
    /// trailers-only answer (HTTP 200, `grpc-status` in the headers, no
    /// body).
    pub fn response(&self) -> Response<&'static str> {
        let (status, grpc_status, text) = match self {
            Refusal::BadPath { .. } => (StatusCode::BAD_REQUEST, "3", "bad request path\n"),
            Refusal::Denied { .. } => (StatusCode::FORBIDDEN, "7", "forbidden\n"),
        };
        let grpc = match self {
            Refusal::BadPath { grpc, .. } | Refusal::Denied { grpc, .. } => *grpc,
        };
        let mut response = Response::new(if grpc { "" } else { text });
        if grpc {
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from_static(grpc_status));
            headers.insert(
                "grpc-message",
                HeaderValue::from_static(if grpc_status == "7" {
                    "PERMISSION_DENIED"
                } else {
                    "INVALID_ARGUMENT"
                }),
            );
        } else {
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        response
    }
}

/// Whether `req` is a gRPC call (its content type says so).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The identity header the workload `workload` (its SPIFFE ID) gets on
/// requests from `source`: `By=<workload>;URI=<source>`; None for a source
/// without an identity. Made once per connection.
pub fn identity_header(workload: &str, source: &Source) -> Option<HeaderValue> {
    let id = source.id.as_ref()?;
    HeaderValue::from_str(&format!("By={workload};URI={id}")).ok()
}

/// Decides `req` from `source` to port `port` under `rules`; `identity` is
/// [`identity_header`]'s value for the workload and `source`.
pub fn gate<B>(
    rules: &Rules,
    source: &Source,
    identity: Option<&HeaderValue>,
    port: u16,
    mut req: Request<B>,
) -> Gate<B> {
    let grpc = is_grpc(&req);
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let (path, query) = match normalise(&target) {
        Ok(normal) => normal,
        Err(error) => return Gate::Refuse(Refusal::BadPath { error, grpc }, req.into_body()),
    };
    let authority = req.uri().authority().map(|a| a.as_str().to_owned());
    let decision = rules.decide(
        source,
        &super::Request {
            method: req.method(),
            path: &path,
            headers: req.headers(),
            authority: authority.as_deref(),
            port,
        },
    );
    if decision != Decision::Allow {
        return Gate::Refuse(Refusal::Denied { decision, grpc }, req.into_body());
    }
    // Already canonical (the usual case): forwarded as it came.
    if path != req.uri().path() {
        let Some(uri) = canonical_uri(req.uri(), &path, query) else {
            return Gate::Refuse(
                Refusal::BadPath {
                    error: PathError::BadEncoding,
                    grpc,
                },
                req.into_body(),
            );
        };
        *req.uri_mut() = uri;
    }
    let headers = req.headers_mut();
    headers.remove(XFCC);
    if let Some(value) = identity {
        headers.insert(XFCC, value.clone());
    }
    Gate::Forward(req)
}

/// `uri` with the canonical `path` and the original `query`. The canonical
/// target is made of what the original held (decoded unreserved
/// characters are ASCII), so it parses again; if it ever did not, the
/// request is refused (None) rather than forwarded as the client spelled
/// it.
fn canonical_uri(uri: &Uri, path: &str, query: Option<&str>) -> Option<Uri> {
    let target = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(target.parse().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_api::crd::IdentityPolicySpec;
    use tessera_api::crd::auth_policy::{
        HttpMethod, HttpRule, PathMatch, PathMatchType, PolicyAction, PortRange,
    };
    use tessera_api::crd::identity_policy::{CompiledPeer, CompiledRule};

    const DB: &str = "spiffe://td/ns/shop/sa/db";
    const WEB: &str = "spiffe://td/ns/shop/sa/web";

    /// web may GET /api/* on 8080.
    fn rules() -> Rules {
        Rules::compile(&IdentityPolicySpec {
            spiffe_id: DB.into(),
            default_deny: true,
            rules: vec![CompiledRule {
                action: PolicyAction::Allow,
                from: vec![CompiledPeer {
                    spiffe_ids: Some(vec![WEB.into()]),
                    ..Default::default()
                }],
                ports: vec![PortRange::tcp(8080, None)],
                http: vec![HttpRule {
                    methods: vec![HttpMethod::Get],
                    paths: vec![PathMatch {
                        match_type: PathMatchType::Prefix,
                        value: "/api".into(),
                    }],
                    headers: Vec::new(),
                }],
                ..Default::default()
            }],
            sources: Vec::new(),
        })
        .unwrap()
    }

    fn source(id: &str) -> Source {
        Source {
            id: Some(id.parse().unwrap()),
            authenticated: true,
        }
    }

    fn request(method: &str, target: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(target)
            .header(XFCC, "By=spiffe://evil;URI=spiffe://td/ns/shop/sa/admin")
            .body(())
            .unwrap()
    }

    fn forwarded(g: Gate<()>) -> Request<()> {
        match g {
            Gate::Forward(r) => r,
            Gate::Refuse(r, _) => panic!("refused: {r:?}"),
        }
    }

    /// The gate as the proxy calls it, with the identity header made for
    /// `workload` and `source`.
    fn gate<B>(
        rules: &Rules,
        workload: &str,
        source: &Source,
        port: u16,
        req: Request<B>,
    ) -> Gate<B> {
        super::gate(
            rules,
            source,
            identity_header(workload, source).as_ref(),
            port,
            req,
        )
    }

    fn refused(g: Gate<()>) -> Refusal {
        match g {
            Gate::Forward(r) => panic!("forwarded: {r:?}"),
            Gate::Refuse(r, _) => r,
        }
    }

    #[test]
    fn an_allowed_request_goes_on_with_its_canonical_path_and_the_callers_identity() {
        let req = forwarded(gate(
            &rules(),
            DB,
            &source(WEB),
            8080,
            request("GET", "/api//v1/./orders?id=1"),
        ));
        assert_eq!(req.uri().path(), "/api/v1/orders");
        assert_eq!(req.uri().query(), Some("id=1"));
        let xfcc: Vec<_> = req.headers().get_all(XFCC).iter().collect();
        assert_eq!(
            xfcc,
            [&format!("By={DB};URI={WEB}")],
            "the client's header is gone"
        );
    }

    #[test]
    fn spellings_of_a_forbidden_path_are_refused_before_the_workload() {
        let rules = rules();
        for target in ["/api/../admin", "/public/../admin", "//admin", "/%61dmin"] {
            assert!(
                matches!(
                    refused(gate(&rules, DB, &source(WEB), 8080, request("GET", target))),
                    Refusal::Denied { .. }
                ),
                "{target}"
            );
        }
        let bad = refused(gate(
            &rules,
            DB,
            &source(WEB),
            8080,
            request("GET", "/api/%2Fadmin"),
        ));
        assert_eq!(bad.response().status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_denial_is_a_403_naming_no_policy() {
        let no = refused(gate(
            &rules(),
            DB,
            &source(WEB),
            8080,
            request("POST", "/api/orders"),
        ));
        let response = no.response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(*response.body(), "forbidden\n");
        let other = refused(gate(
            &rules(),
            DB,
            &source("spiffe://td/ns/shop/sa/other"),
            8080,
            request("GET", "/api/orders"),
        ));
        assert_eq!(
            other,
            Refusal::Denied {
                decision: Decision::NotAllowed,
                grpc: false
            }
        );
    }

    #[test]
    fn a_grpc_denial_is_trailers_only_with_permission_denied() {
        let mut req = request("POST", "/shop.Orders/Delete");
        req.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        let response = refused(gate(&rules(), DB, &source(WEB), 8080, req)).response();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "7");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/grpc");
        assert!(response.body().is_empty());
    }

    #[test]
    fn a_source_without_identity_gets_no_identity_header() {
        let open = Rules::compile(&IdentityPolicySpec {
            spiffe_id: DB.into(),
            default_deny: false,
            rules: Vec::new(),
            sources: Vec::new(),
        })
        .unwrap();
        let anonymous = Source {
            id: None,
            authenticated: false,
        };
        let req = forwarded(gate(&open, DB, &anonymous, 8080, request("GET", "/x")));
        assert!(req.headers().get(XFCC).is_none());
    }
}
