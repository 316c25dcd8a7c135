//! The namespace, the operator's Deployment and Services, and the agent's
//! DaemonSet.

use serde_json::{Value, json};

use super::{
    AGENT, AGENT_METRICS_PORT, BUNDLE_ENDPOINT_PORT, BUNDLE_ENDPOINT_SERVICE, HANDSHAKE_PORT,
    NAMESPACE, OPERATOR, OPERATOR_METRICS_PORT, SIGNER_PORT, SIGNER_SERVICE, Settings, labels,
};

/// Where the agent reads its node-bound token (audience: the signer).
pub const AGENT_TOKEN_DIR: &str = "/var/run/secrets/tessera";
/// Host directory of the Workload API socket; workloads mount it.
pub const SOCKET_DIR: &str = "/run/tessera";
/// Host directory of the agent's auth cache.
pub const STATE_DIR: &str = "/var/lib/tessera";

/// Tessera's namespace. The agent needs host access (host PID and network
/// namespaces, host paths, capabilities), which only the `privileged` Pod
/// Security level admits; the operator's pods would pass `restricted`.
pub fn namespace() -> Value {
    let labels = labels(&[
        ("pod-security.kubernetes.io/enforce", "privileged"),
        ("pod-security.kubernetes.io/warn", "privileged"),
    ]);
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": NAMESPACE, "labels": labels}})
}

fn meta(name: &str, component: &str) -> Value {
    meta_in(NAMESPACE, name, component)
}

fn meta_in(namespace: &str, name: &str, component: &str) -> Value {
    json!({"name": name, "namespace": namespace,
           "labels": labels(&[("app.kubernetes.io/name", name), ("app.kubernetes.io/component", component)])})
}

fn probe(path: &str, port: u16, period: u32) -> Value {
    json!({"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": 3})
}

/// A container of `image` running `args`, with its probes on the
/// `/healthz` and `/readyz` of `metrics_port`, and the requests and limits
/// both binaries share.
fn container(
    name: &str,
    image: String,
    args: Vec<String>,
    env: Value,
    ports: Value,
    metrics_port: u16,
) -> Value {
    json!({
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": env,
        "ports": ports,
        "livenessProbe": probe("/healthz", metrics_port, 10),
        "readinessProbe": probe("/readyz", metrics_port, 5),
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                      "limits": {"memory": "256Mi"}},
    })
}

/// The operator: its Deployment (two replicas, one leads), the Services of
/// the signer and the bundle endpoint (whose endpoints the leader writes:
/// they reach the leader only) and a PodDisruptionBudget.
pub fn operator(settings: &Settings) -> Vec<Value> {
    let selector = json!({"app.kubernetes.io/name": OPERATOR});
    let env = json!([
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "TESSERA_TRUST_DOMAIN", "value": settings.trust_domain},
    ]);
    let mut container = container(
        "operator",
        settings.image(OPERATOR),
        vec![
            "run".to_owned(),
            format!("--metrics-addr=0.0.0.0:{OPERATOR_METRICS_PORT}"),
            format!("--signer-addr=0.0.0.0:{SIGNER_PORT}"),
            format!("--bundle-endpoint-addr=0.0.0.0:{BUNDLE_ENDPOINT_PORT}"),
            format!("--agent-service-account={AGENT}"),
        ],
        env,
        json!([
            {"name": "metrics", "containerPort": OPERATOR_METRICS_PORT},
            {"name": "signer", "containerPort": SIGNER_PORT},
            {"name": "bundle", "containerPort": BUNDLE_ENDPOINT_PORT},
        ]),
        OPERATOR_METRICS_PORT,
    );
    container["securityContext"] = json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    });
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta(OPERATOR, "operator"),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
            "template": {
                "metadata": {"labels": labels(&[("app.kubernetes.io/name", OPERATOR), ("app.kubernetes.io/component", "operator")])},
                "spec": {
                    "serviceAccountName": OPERATOR,
                    "automountServiceAccountToken": true,
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {"labelSelector": {"matchLabels": selector},
                                            "topologyKey": "kubernetes.io/hostname"}}]}},
                    "terminationGracePeriodSeconds": 30,
                },
            },
        },
    });
    vec![
        deployment,
        leader_service(SIGNER_SERVICE, SIGNER_PORT, SIGNER_PORT),
        leader_service(BUNDLE_ENDPOINT_SERVICE, 443, BUNDLE_ENDPOINT_PORT),
        json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": meta(OPERATOR, "operator"),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
        }),
    ]
}

/// A Service without a selector: the leading operator writes its
/// EndpointSlice (named like the Service) with its own address, so the
/// Service reaches the leader and never a standby.
fn leader_service(name: &str, port: u16, target: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(name, "operator"),
        "spec": {"type": "ClusterIP",
                 "ports": [{"name": "https", "protocol": "TCP", "port": port, "targetPort": target}]},
    })
}

/// The agent's DaemonSet: on the node's network (peers dial the agent at
/// its node's address) and PID namespace (it reads pods' network namespaces
/// through /proc), with the host paths it needs and only the capabilities
/// it uses instead of a privileged container.
pub fn agent_daemonset(settings: &Settings) -> Value {
    agent_daemonset_in(settings, NAMESPACE)
}

/// [`agent_daemonset`] for an installation in `namespace` (an OLM install
/// namespace other than the suggested one).
pub fn agent_daemonset_in(settings: &Settings, namespace: &str) -> Value {
    let host = |name: &str, path: &str, kind: &str| json!({"name": name, "hostPath": {"path": path, "type": kind}});
    let volumes = json!([
        host("bpffs", "/sys/fs/bpf", "DirectoryOrCreate"),
        host("cgroup", "/sys/fs/cgroup", "Directory"),
        host("socket-dir", SOCKET_DIR, "DirectoryOrCreate"),
        host("state", STATE_DIR, "DirectoryOrCreate"),
        {"name": "tessera-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": crate::names::TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}},
    ]);
    let mounts = json!([
        {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
        {"name": "cgroup", "mountPath": "/sys/fs/cgroup", "mountPropagation": "HostToContainer"},
        {"name": "socket-dir", "mountPath": SOCKET_DIR},
        {"name": "state", "mountPath": STATE_DIR},
        {"name": "tessera-token", "mountPath": AGENT_TOKEN_DIR, "readOnly": true},
    ]);
    let env = json!([
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        // Two allocator arenas (the agent sets this itself when it is
        // missing, by starting again; see tessera_agent::arenas).
        {"name": "GLIBC_TUNABLES", "value": "glibc.malloc.arena_max=2"},
    ]);
    let mut container = container(
        "agent",
        settings.image(AGENT),
        vec![
            "run".to_owned(),
            format!("--namespace={namespace}"),
            format!("--signer=https://{SIGNER_SERVICE}.{namespace}.svc:{SIGNER_PORT}"),
            format!("--signer-name={SIGNER_SERVICE}.{namespace}.svc"),
            format!("--token-file={AGENT_TOKEN_DIR}/token"),
            format!("--socket={SOCKET_DIR}/agent.sock"),
            format!("--cgroup-root={}", settings.cgroup_root),
            format!("--handshake-addr=0.0.0.0:{HANDSHAKE_PORT}"),
            format!("--metrics-addr=0.0.0.0:{AGENT_METRICS_PORT}"),
            format!("--state-dir={STATE_DIR}"),
        ],
        env,
        json!([
            {"name": "handshake", "containerPort": HANDSHAKE_PORT},
            {"name": "metrics", "containerPort": AGENT_METRICS_PORT},
        ]),
        AGENT_METRICS_PORT,
    );
    container["volumeMounts"] = mounts;
    container["securityContext"] = json!({
        "privileged": false,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsUser": 0,
        "capabilities": {
            "drop": ["ALL"],
            // BPF, PERFMON: load programs and maps; NET_ADMIN: attach to
            // cgroups and tc, rtnetlink; SYS_ADMIN: setns into pod
            // network namespaces, mount bpffs; SYS_PTRACE: open other
            // processes' /proc/<pid>/ns. No SYS_RESOURCE: the agent needs
            // Linux 6.5 or later (SO_PEERPIDFD), whose BPF maps are charged
            // to the memory cgroup, not to the memlock limit.
            "add": ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"],
        },
        "seccompProfile": {"type": "RuntimeDefault"},
    });
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": meta_in(namespace, AGENT, "agent"),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": AGENT}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels(&[("app.kubernetes.io/name", AGENT), ("app.kubernetes.io/component", "agent")])},
                "spec": {
                    "serviceAccountName": AGENT,
                    "automountServiceAccountToken": true,
                    "hostNetwork": true,
                    "hostPID": true,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [container],
                    "volumes": volumes,
                    "terminationGracePeriodSeconds": 30,
                },
            },
        },
    })
}
