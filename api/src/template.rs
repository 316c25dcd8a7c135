//! SPIFFE ID and DNS name templates used by `WorkloadIdentity`.
//!
//! A template is literal text with placeholders in braces:
//! `spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}`.
//! Placeholders: `{trustDomain}`, `{namespace}`, `{serviceAccount}`, `{podName}`,
//! `{nodeName}` and `{podLabel:<key>}`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Regular expression (RE2, anchored) for a SPIFFE ID template, used in the CRD
/// schema. The trust domain is `{trustDomain}` or a literal name; a path
/// segment is literal characters and placeholders with at least one
/// placeholder or non-dot character (or three or more dots), so that it can
/// never be `.`, `..` or empty.
pub const SPIFFE_ID_TEMPLATE_PATTERN: &str = concat!(
    r"^spiffe://(\{trustDomain\}|[a-z0-9._-]+)",
    r"(/(([A-Za-z0-9._-]|\{(trustDomain|namespace|serviceAccount|podName|nodeName|podLabel:[A-Za-z0-9._/-]+)\})*([A-Za-z0-9_-]|\{(trustDomain|namespace|serviceAccount|podName|nodeName|podLabel:[A-Za-z0-9._/-]+)\})([A-Za-z0-9._-]|\{(trustDomain|namespace|serviceAccount|podName|nodeName|podLabel:[A-Za-z0-9._/-]+)\})*|\.\.\.+))*$"
);

/// Regular expression (RE2, anchored) for a DNS name template.
pub const DNS_NAME_TEMPLATE_PATTERN: &str = r"^([a-z0-9.*-]|\{(trustDomain|namespace|serviceAccount|podName|nodeName|podLabel:[A-Za-z0-9._/-]+)\})+$";

/// Why a template is malformed or could not be rendered for a pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` without its closing `}`.
    #[error("template has an unclosed '{{' at byte {0}")]
    Unclosed(usize),
    /// A `}` without an opening `{`.
    #[error("template has a stray '}}' at byte {0}")]
    StrayClose(usize),
    /// A placeholder name that is not one of the known ones.
    #[error(
        "unknown placeholder {{{0}}}; use trustDomain, namespace, serviceAccount, podName, nodeName or podLabel:<key>"
    )]
    UnknownPlaceholder(String),
    /// `{podLabel:}` with no key.
    #[error("placeholder {{podLabel:}} needs a label key")]
    EmptyLabelKey,
    /// The pod lacks a label the template needs.
    #[error("pod has no label {0:?}, which the template needs")]
    MissingLabel(String),
    /// The rendered text is not a valid SPIFFE ID.
    #[error("rendered SPIFFE ID {rendered:?} is invalid: {source}")]
    Invalid {
        /// What the template produced.
        rendered: String,
        /// Why it is not a SPIFFE ID.
        source: SpiffeIdError,
    },
}

/// The facts about a pod that a template can refer to.
#[derive(Debug, Clone)]
pub struct PodFacts<'a> {
    /// The cluster's trust domain.
    pub trust_domain: Option<&'a TrustDomain>,
    /// Pod namespace.
    pub namespace: &'a str,
    /// Pod service account name.
    pub service_account: &'a str,
    /// Pod name.
    pub pod_name: &'a str,
    /// Name of the node the pod is scheduled on.
    pub node_name: &'a str,
    /// Pod labels.
    pub labels: &'a BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    TrustDomain,
    Namespace,
    ServiceAccount,
    PodName,
    NodeName,
    PodLabel(String),
}

/// A parsed template; [`Template::render`] fills it in for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl FromStr for Template {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = s.char_indices();
        while let Some((i, c)) = rest.next() {
            match c {
                '{' => {
                    let close = s[i..].find('}').ok_or(TemplateError::Unclosed(i))?;
                    let name = &s[i + 1..i + close];
                    if name.contains('{') {
                        return Err(TemplateError::Unclosed(i));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(placeholder(name)?);
                    // Skip past the closing brace.
                    for _ in 0..name.chars().count() + 1 {
                        rest.next();
                    }
                }
                '}' => return Err(TemplateError::StrayClose(i)),
                _ => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template {
            source: s.to_owned(),
            parts,
        })
    }
}

fn placeholder(name: &str) -> Result<Part, TemplateError> {
    Ok(match name {
        "trustDomain" => Part::TrustDomain,
        "namespace" => Part::Namespace,
        "serviceAccount" => Part::ServiceAccount,
        "podName" => Part::PodName,
        "nodeName" => Part::NodeName,
        _ => match name.strip_prefix("podLabel:") {
            Some("") => return Err(TemplateError::EmptyLabelKey),
            Some(key) => Part::PodLabel(key.to_owned()),
            None => return Err(TemplateError::UnknownPlaceholder(name.to_owned())),
        },
    })
}

impl Template {
    /// Fills in the placeholders for one pod and returns the text.
    pub fn render_text(&self, pod: &PodFacts<'_>) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(self.source.len() + 32);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::TrustDomain => out.push_str(pod.trust_domain.map_or("", |td| td.as_str())),
                Part::Namespace => out.push_str(pod.namespace),
                Part::ServiceAccount => out.push_str(pod.service_account),
                Part::PodName => out.push_str(pod.pod_name),
                Part::NodeName => out.push_str(pod.node_name),
                Part::PodLabel(key) => match pod.labels.get(key) {
                    Some(v) => out.push_str(v),
                    None => return Err(TemplateError::MissingLabel(key.clone())),
                },
            }
        }
        Ok(out)
    }

    /// Renders the template as a SPIFFE ID for one pod.
    pub fn render(&self, pod: &PodFacts<'_>) -> Result<SpiffeId, TemplateError> {
        let rendered = self.render_text(pod)?;
        rendered
            .parse()
            .map_err(|source| TemplateError::Invalid { rendered, source })
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn facts<'a>(td: &'a TrustDomain, labels: &'a BTreeMap<String, String>) -> PodFacts<'a> {
        PodFacts {
            trust_domain: Some(td),
            namespace: "shop",
            service_account: "web",
            pod_name: "web-7f9c",
            node_name: "node-1",
            labels,
        }
    }

    #[test_case(
        "spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}",
        "spiffe://example.org/ns/shop/sa/web"
    )]
    #[test_case(
        "spiffe://{trustDomain}/node/{nodeName}/pod/{podName}",
        "spiffe://example.org/node/node-1/pod/web-7f9c"
    )]
    #[test_case(
        "spiffe://{trustDomain}/app-{podLabel:app.kubernetes.io/name}",
        "spiffe://example.org/app-shop"
    )]
    #[test_case("spiffe://other.test/fixed", "spiffe://other.test/fixed")]
    fn renders(template: &str, want: &str) {
        let td: TrustDomain = "example.org".parse().unwrap();
        let labels = BTreeMap::from([("app.kubernetes.io/name".to_owned(), "shop".to_owned())]);
        let t: Template = template.parse().unwrap();
        assert_eq!(t.render(&facts(&td, &labels)).unwrap().as_str(), want);
        assert_eq!(t.to_string(), template);
    }

    #[test_case("spiffe://{trustDomain}/{foo}", TemplateError::UnknownPlaceholder("foo".into()))]
    #[test_case("spiffe://{trustDomain}/{podLabel:}", TemplateError::EmptyLabelKey)]
    #[test_case("spiffe://{trustDomain}/{namespace", TemplateError::Unclosed(23))]
    #[test_case("spiffe://{trustDomain}/a}", TemplateError::StrayClose(24))]
    #[test_case("spiffe://{trustDomain}/{a{b}", TemplateError::Unclosed(23))]
    fn rejects_malformed(template: &str, want: TemplateError) {
        assert_eq!(template.parse::<Template>().unwrap_err(), want);
    }

    #[test]
    fn render_errors() {
        let td: TrustDomain = "example.org".parse().unwrap();
        let labels = BTreeMap::new();
        let t: Template = "spiffe://{trustDomain}/{podLabel:app}".parse().unwrap();
        assert_eq!(
            t.render(&facts(&td, &labels)).unwrap_err(),
            TemplateError::MissingLabel("app".into())
        );
        let labels = BTreeMap::from([("app".to_owned(), String::new())]);
        let err = t.render(&facts(&td, &labels)).unwrap_err();
        assert!(matches!(err, TemplateError::Invalid { .. }), "{err}");
    }

    #[test]
    fn schema_pattern_accepts_what_the_parser_accepts() {
        let re = regex::Regex::new(SPIFFE_ID_TEMPLATE_PATTERN).unwrap();
        for ok in [
            "spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}",
            "spiffe://example.org/x-{podLabel:app}",
            "spiffe://{trustDomain}",
            "spiffe://{trustDomain}/.{podName}/..a/.../{namespace}.",
        ] {
            assert!(re.is_match(ok), "{ok}");
            assert!(ok.parse::<Template>().is_ok(), "{ok}");
        }
        for bad in [
            "spiffe://{trustDomain}/{foo}",
            "http://{trustDomain}/a",
            "spiffe://{trustDomain}/a?x",
            "spiffe://{trustDomain}//a",
            "spiffe://{trustDomain}/a/",
            "spiffe://{namespace}/a",
            "spiffe://{trustDomain}/./a",
            "spiffe://{trustDomain}/a/..",
        ] {
            assert!(!re.is_match(bad), "{bad}");
        }
        let dns = regex::Regex::new(DNS_NAME_TEMPLATE_PATTERN).unwrap();
        assert!(dns.is_match("{podName}.{namespace}.svc"));
        assert!(!dns.is_match("Web.example"));
    }
}
