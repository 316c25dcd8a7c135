//! The node agents, where the operator runs them (OLM installs, which may
//! not ship a DaemonSet): the leader keeps the agent DaemonSet of
//! `deploy/`, with the image it was given (`RELATED_IMAGE_AGENT`), applied
//! in its namespace, and says on the DaemonSet's status whether Pod
//! Security admission lets its pods in (condition `PodSecurityAdmitted`).
//!
//! The DaemonSet is owned by the operator's Deployment (when the operator
//! runs in one named `tessera-operator`), so the garbage collector removes
//! the agents when an uninstall removes the operator.
//!
//! The agent needs the host's network and PID namespaces, host paths and
//! capabilities: only the `privileged` Pod Security level admits its pods.
//! A namespace enforcing `baseline` or `restricted`, or a DaemonSet
//! controller reporting pods refused by PodSecurity, makes the condition
//! False with what to change.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Event, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;
use tessera_api::install::{AGENT, Settings, workloads};
use tessera_api::names::OPERATOR;
use tracing::{info, warn};

use crate::deploy::DeployError;
use tessera_api::names::FIELD_MANAGER;
/// The condition the operator sets on the agent DaemonSet.
pub const CONDITION: &str = "PodSecurityAdmitted";
/// The namespace label Pod Security admission enforces.
pub const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";

/// How the operator runs the agents.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The agent's image.
    pub image: String,
    /// The operator's namespace (the DaemonSet's).
    pub namespace: String,
    /// The nodes' pod cgroup root (`--cgroup-root` of the agents).
    pub cgroup_root: String,
    /// The trust domain.
    pub trust_domain: String,
    /// How often the DaemonSet is applied again and its condition checked.
    pub recheck: Duration,
}

/// The agent DaemonSet as `deploy/` has it, with `cfg`'s image, namespace
/// and cgroup root.
pub fn daemonset(cfg: &AgentConfig) -> Result<DaemonSet, DeployError> {
    let settings = Settings {
        cgroup_root: cfg.cgroup_root.clone(),
        trust_domain: cfg.trust_domain.clone(),
        ..Settings::default()
    };
    let mut value = workloads::agent_daemonset_in(&settings, &cfg.namespace);
    value["spec"]["template"]["spec"]["containers"][0]["image"] = json!(cfg.image);
    Ok(serde_json::from_value(value)?)
}

/// Whether Pod Security admission keeps the agent's pods out, and why:
/// the namespace's enforced level (`enforce`, its label), or a refusal the
/// DaemonSet controller reported (`refusals`, its FailedCreate messages).
pub fn refused(enforce: Option<&str>, refusals: &[String]) -> Option<String> {
    if let Some(level @ ("baseline" | "restricted")) = enforce {
        return Some(format!(
            "the namespace enforces Pod Security level {level:?} ({ENFORCE_LABEL}); the node agent needs host namespaces, host paths and capabilities, which only \"privileged\" admits: label the namespace {ENFORCE_LABEL}=privileged"
        ));
    }
    refusals
        .iter()
        .find(|m| m.contains("violates PodSecurity"))
        .map(|m| format!("Pod Security admission refused the agent's pods: {m}"))
}

/// The condition for `refused`'s answer.
pub fn condition(why: Option<&str>, now: &str) -> serde_json::Value {
    match why {
        Some(message) => json!({"type": CONDITION, "status": "False", "reason": "Forbidden",
                                "message": message, "lastTransitionTime": now}),
        None => json!({"type": CONDITION, "status": "True", "reason": "Admitted",
                       "message": "the namespace's Pod Security level admits the node agent's pods",
                       "lastTransitionTime": now}),
    }
}

/// Keeps the agent DaemonSet applied and its condition current, every
/// `cfg.recheck`, until dropped (the leader runs it). The condition is written
/// when it changes (and once at the start), so its transition time says
/// when it last did.
pub async fn run(client: kube::Client, cfg: AgentConfig) {
    let mut written: Option<Option<String>> = None;
    loop {
        let step = async {
            let why = apply(&client, &cfg).await?;
            if written.as_ref() != Some(&why) {
                write_condition(&client, &cfg, why.as_deref()).await?;
                match &why {
                    Some(w) => warn!(reason = %w, "the node agents cannot run"),
                    None => {
                        info!(image = %cfg.image, "agent DaemonSet applied; Pod Security admits it")
                    }
                }
            }
            Ok::<_, DeployError>(why)
        };
        match step.await {
            Ok(why) => written = Some(why),
            Err(e) => warn!(error = %e, "cannot keep the agent DaemonSet; retrying"),
        }
        tokio::time::sleep(cfg.recheck).await;
    }
}

fn api_err(cfg: &AgentConfig, what: &'static str) -> impl FnOnce(kube::Error) -> DeployError {
    let namespace = cfg.namespace.clone();
    move |source| DeployError::Api {
        what,
        namespace,
        source,
    }
}

/// The operator's Deployment as the DaemonSet's owner; none when the
/// operator runs outside a Deployment of that name.
async fn owner(
    client: &kube::Client,
    cfg: &AgentConfig,
) -> Result<Option<OwnerReference>, DeployError> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &cfg.namespace);
    let deployment = deployments
        .get_opt(OPERATOR)
        .await
        .map_err(api_err(cfg, "read the operator's Deployment"))?;
    Ok(deployment.and_then(|d| {
        Some(OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: d.metadata.name?,
            uid: d.metadata.uid?,
            ..OwnerReference::default()
        })
    }))
}

/// Applies the DaemonSet; whether Pod Security keeps its pods out, and why.
#[tracing::instrument(name = "reconcile", skip_all, fields(daemonset = "tessera-agent"))]
async fn apply(client: &kube::Client, cfg: &AgentConfig) -> Result<Option<String>, DeployError> {
    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), &cfg.namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut daemonset = daemonset(cfg)?;
    daemonset.metadata.owner_references = owner(client, cfg).await?.map(|o| vec![o]);
    sets.patch(AGENT, &params, &Patch::Apply(daemonset))
        .await
        .map_err(api_err(cfg, "apply the agent DaemonSet"))?;
    let namespace = Api::<Namespace>::all(client.clone())
        .get(&cfg.namespace)
        .await
        .map_err(api_err(cfg, "read the namespace"))?;
    let enforce = namespace
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ENFORCE_LABEL))
        .cloned();
    let events: Api<Event> = Api::namespaced(client.clone(), &cfg.namespace);
    let selector =
        format!("involvedObject.kind=DaemonSet,involvedObject.name={AGENT},reason=FailedCreate");
    let refusals: Vec<String> = events
        .list(&ListParams::default().fields(&selector))
        .await
        .map_err(api_err(cfg, "list the agent DaemonSet's events"))?
        .items
        .into_iter()
        .filter_map(|e| e.message)
        .collect();
    Ok(refused(enforce.as_deref(), &refusals))
}

/// Writes the condition for `why` on the DaemonSet's status.
async fn write_condition(
    client: &kube::Client,
    cfg: &AgentConfig,
    why: Option<&str>,
) -> Result<(), DeployError> {
    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), &cfg.namespace);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": AGENT, "namespace": cfg.namespace},
        "status": {"conditions": [condition(why, &now)]},
    });
    sets.patch_status(
        AGENT,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(status),
    )
    .await
    .map_err(api_err(cfg, "write the agent DaemonSet's condition"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn only_privileged_or_unrefused_namespaces_admit_the_agents() {
        assert!(refused(Some("privileged"), &[]).is_none());
        assert!(refused(None, &["other trouble".into()]).is_none());
        let why = refused(Some("baseline"), &[]).unwrap();
        assert!(
            why.contains("privileged") && why.contains(ENFORCE_LABEL),
            "{why}"
        );
        assert!(refused(Some("restricted"), &[]).is_some());
        let from_events = refused(
            None,
            &["pods \"tessera-agent-x\" is forbidden: violates PodSecurity \"baseline:latest\": host namespaces".into()],
        )
        .unwrap();
        assert!(from_events.contains("host namespaces"), "{from_events}");
    }

    #[test]
    fn the_daemonset_carries_the_given_image_and_namespace() {
        let ds = daemonset(&AgentConfig {
            image: "registry.example/tessera-agent@sha256:abc".into(),
            namespace: "operators".into(),
            cgroup_root: "/sys/fs/cgroup/kubepods".into(),
            trust_domain: "td.test".into(),
            recheck: Duration::from_secs(30),
        })
        .unwrap();
        assert_eq!(ds.metadata.namespace.as_deref(), Some("operators"));
        let container = &ds.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some("registry.example/tessera-agent@sha256:abc")
        );
        let args = container.args.clone().unwrap();
        assert!(
            args.contains(&"--namespace=operators".to_owned()),
            "{args:?}"
        );
        assert!(
            args.iter()
                .any(|a| a.contains("tessera-signer.operators.svc")),
            "{args:?}"
        );
        assert!(
            args.contains(&"--cgroup-root=/sys/fs/cgroup/kubepods".to_owned()),
            "{args:?}"
        );
    }
}
