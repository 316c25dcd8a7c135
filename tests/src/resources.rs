//! Installing CRDs and applying manifests against a control plane.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, ApiResource, Scope, pinned_kind};
use serde::Deserialize;

/// A two-node cluster's objects for identity tests (no kubelet or
/// controller-manager runs, so tests create them by hand): namespaces
/// `tessera-system` and `shop`, the agent's service account
/// `tessera-system/tessera-agent`, `shop/default`, and Nodes `node-a`, `node-b`.
pub const TWO_NODES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: tessera-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: tessera-agent, namespace: tessera-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: default, namespace: shop}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
"#;

/// Field manager name for everything the harness writes.
pub const FIELD_MANAGER: &str = "tessera-tests";

/// A fresh control plane with every Tessera CRD installed and Established,
/// and an admin client for it.
pub async fn control_plane_with_crds() -> Result<(crate::ControlPlane, kube::Client)> {
    let cp = crate::ControlPlane::start().await?;
    let client = cp.client().await?;
    install_crds(&client, &tessera_api::crd::all()).await?;
    Ok((cp, client))
}

/// Creates or updates each CRD, then waits until every one is Established.
pub async fn install_crds(client: &kube::Client, crds: &[CustomResourceDefinition]) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for crd in crds {
        let name = crd.metadata.name.as_deref().context("CRD without a name")?;
        api.patch(name, &params, &Patch::Apply(crd))
            .await
            .with_context(|| format!("applying CRD {name}"))?;
    }
    for crd in crds {
        let name = crd.metadata.name.as_deref().unwrap_or_default();
        wait_established(&api, name, Duration::from_secs(30)).await?;
    }
    Ok(())
}

async fn wait_established(
    api: &Api<CustomResourceDefinition>,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let crd = api.get(name).await?;
        if tessera_api::crd::installed::is_established(&crd) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "CRD {name} was not Established within {timeout:?}; status: {:?}",
                crd.status
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Splits a multi-document YAML manifest into objects.
pub fn parse_manifest(yaml: &str) -> Result<Vec<DynamicObject>> {
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        objects.push(
            serde_json::from_value(value)
                .context("manifest document is not a Kubernetes object")?,
        );
    }
    Ok(objects)
}

/// The API for an object's kind (found through discovery), in its namespace.
pub async fn dynamic_api(
    client: &kube::Client,
    obj: &DynamicObject,
) -> Result<(Api<DynamicObject>, ApiResource)> {
    let types = obj
        .types
        .as_ref()
        .context("object has no apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(types)?;
    let (resource, caps): (ApiResource, ApiCapabilities) =
        pinned_kind(client, &gvk).await.with_context(|| {
            format!("the API server does not serve {gvk:?}; are the CRDs installed?")
        })?;
    let api = match caps.scope {
        Scope::Cluster => Api::all_with(client.clone(), &resource),
        Scope::Namespaced => {
            let ns = obj.metadata.namespace.as_deref().unwrap_or("default");
            Api::namespaced_with(client.clone(), ns, &resource)
        }
    };
    Ok((api, resource))
}

/// Creates one object; `dry_run` asks the server to validate without storing.
pub async fn create(
    client: &kube::Client,
    obj: &DynamicObject,
    dry_run: bool,
) -> Result<DynamicObject, kube::Error> {
    let (api, _) = dynamic_api(client, obj)
        .await
        .map_err(|e| kube::Error::Service(e.into()))?;
    let params = PostParams {
        dry_run,
        field_manager: Some(FIELD_MANAGER.to_owned()),
    };
    api.create(&params, obj).await
}

/// Creates every object of a manifest, in order.
pub async fn apply_manifest(client: &kube::Client, yaml: &str) -> Result<Vec<DynamicObject>> {
    let mut created = Vec::new();
    for obj in parse_manifest(yaml)? {
        let name = obj.metadata.name.clone().unwrap_or_default();
        created.push(
            create(client, &obj, false)
                .await
                .with_context(|| format!("creating {name}"))?,
        );
    }
    Ok(created)
}

/// Server-side applies every object of a manifest, in order: creates the
/// missing ones and updates the others (as `kubectl apply --server-side`).
pub async fn server_side_apply(client: &kube::Client, yaml: &str) -> Result<()> {
    for obj in parse_manifest(yaml)? {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let (api, _) = dynamic_api(client, &obj).await?;
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .with_context(|| format!("applying {name}"))?;
    }
    Ok(())
}

/// The message of an API error (what kubectl prints after "Error from server").
pub fn api_message(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

/// A service-account token from the TokenRequest API for `sa` in `ns` with
/// `audience`, bound to the Node `node` when given (as node agents get them).
pub async fn service_account_token(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    node: Option<&str>,
    audience: &str,
) -> Result<String> {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    use k8s_openapi::api::core::v1::{Node, ServiceAccount};
    let bound_object_ref = match node {
        Some(name) => Some(BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(name.into()),
            uid: Api::<Node>::all(client.clone())
                .get(name)
                .await?
                .metadata
                .uid,
        }),
        None => None,
    };
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.into()]),
            expiration_seconds: Some(3600),
            bound_object_ref,
        }),
        ..TokenRequest::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .context("the API server issued no token")
}

/// The Node-bound token a node agent for `node` gets: service account
/// `tessera-agent` in `tessera-system`, for `audience`.
pub async fn agent_token(client: &kube::Client, node: &str, audience: &str) -> Result<String> {
    service_account_token(
        client,
        "tessera-system",
        "tessera-agent",
        Some(node),
        audience,
    )
    .await
}

/// [`agent_token`], written to `<dir>/<node>.token`; that path.
pub async fn agent_token_file(
    client: &kube::Client,
    node: &str,
    audience: &str,
    dir: &std::path::Path,
) -> Result<std::path::PathBuf> {
    let token = agent_token(client, node, audience).await?;
    let path = dir.join(format!("{node}.token"));
    std::fs::write(&path, token).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Waits until the operator has published the trust bundle ConfigMap
/// `tessera-trust-bundle` in `tessera-system` (agents need it to trust the
/// signer); returns its PEM bundle.
pub async fn wait_for_trust_bundle(
    client: &kube::Client,
    timeout: std::time::Duration,
) -> Result<String> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), crate::procs::NAMESPACE);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(pem) = maps
            .get_opt("tessera-trust-bundle")
            .await?
            .and_then(|cm| cm.data)
            .and_then(|mut d| d.remove("bundle.pem"))
        {
            return Ok(pem);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "the operator published no trust bundle within {timeout:?}; is it running?"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The identity the operator recorded for pod `namespace/name` (its
/// PodIdentity, found by the pod's UID), if it has one.
pub async fn pod_identity(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<tessera_api::crd::PodIdentitySpec>> {
    use k8s_openapi::api::core::v1::Pod;
    let Some(pod) = kube::Api::<Pod>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await?
    else {
        return Ok(None);
    };
    let uid = pod.metadata.uid.unwrap_or_default();
    let record = kube::Api::<tessera_api::crd::PodIdentity>::all(client.clone())
        .get_opt(&uid)
        .await?;
    Ok(record.and_then(|r| r.for_pod(&uid).cloned()))
}

/// Waits (20 s at most) until pod `namespace/name` has an identity record,
/// and returns it.
pub async fn wait_for_pod_identity(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<tessera_api::crd::PodIdentitySpec> {
    crate::eventually(
        &format!("an identity for pod {namespace}/{name}"),
        std::time::Duration::from_secs(20),
        || pod_identity(client, namespace, name),
    )
    .await
}

/// How many requests for `resource` (for example `tokenreviews`) the API
/// server has answered since it started, from its own `/metrics`.
pub async fn apiserver_request_count(client: &kube::Client, resource: &str) -> Result<f64> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let wanted = format!("resource=\"{resource}\"");
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains(&wanted))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum())
}
