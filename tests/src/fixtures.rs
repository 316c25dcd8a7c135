//! Objects the tests create, built in one place: [`PodBuilder`] makes the
//! pods (no kubelet runs them unless a real node does; their one container
//! names an image that does not exist).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};

/// A pod to create: namespace and name, and what the test sets on it.
#[derive(Debug, Clone, Default)]
pub struct PodBuilder {
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    service_account: Option<String>,
    node: Option<String>,
    host_network: bool,
}

impl PodBuilder {
    /// A pod `namespace/name` with no labels, the default service account,
    /// not scheduled.
    pub fn new(namespace: &str, name: &str) -> PodBuilder {
        PodBuilder {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ..PodBuilder::default()
        }
    }

    /// Adds the label `key=value`.
    pub fn label(mut self, key: &str, value: &str) -> PodBuilder {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Adds every label of `labels`.
    pub fn labels(self, labels: &[(&str, &str)]) -> PodBuilder {
        labels.iter().fold(self, |pod, (k, v)| pod.label(k, v))
    }

    /// Sets the annotations.
    pub fn annotations(mut self, annotations: BTreeMap<String, String>) -> PodBuilder {
        self.annotations = annotations;
        self
    }

    /// Runs the pod as `service_account`.
    pub fn service_account(mut self, service_account: &str) -> PodBuilder {
        self.service_account = Some(service_account.to_owned());
        self
    }

    /// Schedules the pod on `node`.
    pub fn node(mut self, node: &str) -> PodBuilder {
        self.node = Some(node.to_owned());
        self
    }

    /// Puts the pod in the host's network namespace.
    pub fn host_network(mut self, host_network: bool) -> PodBuilder {
        self.host_network = host_network;
        self
    }

    /// The pod object.
    pub fn build(&self) -> Pod {
        let nonempty = |m: &BTreeMap<String, String>| (!m.is_empty()).then(|| m.clone());
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: nonempty(&self.labels),
                annotations: nonempty(&self.annotations),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: self.node.clone(),
                service_account_name: self.service_account.clone(),
                host_network: self.host_network.then_some(true),
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("registry.invalid/c:1".into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    /// Creates the pod; its UID.
    pub async fn create(&self, client: &kube::Client) -> Result<String> {
        let created = self
            .api(client)
            .create(&PostParams::default(), &self.build())
            .await?;
        created
            .metadata
            .uid
            .context("the API server gave the pod no UID")
    }

    /// Marks the created pod Running at `ip` on a node at `host_ip`, as a
    /// kubelet would.
    pub async fn running(&self, client: &kube::Client, ip: &str, host_ip: &str) -> Result<()> {
        let status = serde_json::json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": host_ip
        }});
        self.api(client)
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(status))
            .await?;
        Ok(())
    }

    fn api(&self, client: &kube::Client) -> Api<Pod> {
        Api::namespaced(client.clone(), &self.namespace)
    }
}
