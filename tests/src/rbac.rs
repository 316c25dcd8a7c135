//! What a service account may do, as the API server's authorizer answers it
//! (`kubectl auth can-i`), and API tokens to act as one.

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;

use crate::ControlPlane;

/// The user name of service account `name` in `namespace`.
pub fn service_account(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// Whether `user` may `verb` `resource` (`kubectl auth can-i`; `kind/name`
/// for one object, `kind#sub` for a subresource), in `namespace` when
/// given, else in all namespaces.
pub fn can(
    cp: &ControlPlane,
    user: &str,
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    let (resource, subresource) = match resource.split_once('#') {
        Some((r, sub)) => (r, Some(format!("--subresource={sub}"))),
        None => (resource, None),
    };
    let mut args = vec!["auth", "can-i", verb, resource, "--as", user];
    args.extend(subresource.as_deref());
    match namespace {
        Some(ns) => args.extend(["-n", ns]),
        None => args.push("--all-namespaces"),
    }
    // can-i exits 1 for "no": read the answer, not the status.
    cp.kubectl()
        .args(&args)
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "yes")
}

/// One request to authorize: verb, resource and namespace as [`can`] takes
/// them.
pub type Grant = (&'static str, String, Option<&'static str>);

/// Asserts that `user` may do each of `needs` and none of `forbidden`.
pub fn assert_grants(cp: &ControlPlane, user: &str, needs: &[Grant], forbidden: &[Grant]) {
    for (verb, resource, namespace) in needs {
        assert!(
            can(cp, user, verb, resource, *namespace),
            "{user} may not {verb} {resource} ({namespace:?}), which its binary needs"
        );
    }
    for (verb, resource, namespace) in forbidden {
        assert!(
            !can(cp, user, verb, resource, *namespace),
            "{user} may {verb} {resource} ({namespace:?})"
        );
    }
}

/// A one-hour token of service account `name` in `namespace` for the API
/// server itself (its default audience).
pub async fn api_token(client: &kube::Client, namespace: &str, name: &str) -> Result<String> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    accounts
        .create_token_request(name, &Default::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .with_context(|| format!("the API server issued no token for {namespace}/{name}"))
}
