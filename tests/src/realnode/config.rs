//! The node's components' configuration files.

use std::path::Path;

use super::{BRIDGE, CLUSTER_DOMAIN, CNI_NETWORK, GATEWAY, NODE_NAME, POD_SUBNET, TestImages};
use crate::TestBins;

/// The pods' network; host-local keeps its allocations in `ipam_dir`.
pub(super) fn cni_config(ipam_dir: &Path) -> String {
    let ipam_dir = ipam_dir.display();
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "{CNI_NETWORK}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{ipam_dir}",
        "ranges": [[{{"subnet": "{POD_SUBNET}", "gateway": "{GATEWAY}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}]
      }}
    }},
    {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
  ]
}}
"#
    )
}

pub(super) fn containerd_config(dir: &Path, bins: &TestBins, images: &TestImages) -> String {
    format!(
        r#"version = 3
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{pause}'

  [plugins.'io.containerd.cri.v1.runtime']
    # This machine's bounding set lacks CAP_SYS_RESOURCE, so no process
    # may lower its OOM score below containerd's own.
    restrict_oom_score_adj = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '{runc}'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['/usr/lib/cni']
      conf_dir = '{cni}'

  [plugins.'io.containerd.grpc.v1.cri']
    disable_tcp_service = true
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
"#,
        root = dir.join("containerd-root").display(),
        state = dir.join("containerd-state").display(),
        socket = dir.join("containerd.sock").display(),
        pause = images.pause,
        runc = bins.node.runc.display(),
        cni = dir.join("cni").display(),
    )
}

pub(super) fn kube_proxy_config(kubeconfig: &Path, healthz: u16, metrics: u16) -> String {
    // conntrack zeros and no localhost node ports: kube-proxy leaves the
    // host's conntrack limits and route_localnet alone.
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
mode: iptables
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_SUBNET}
healthzBindAddress: 127.0.0.1:{healthz}
metricsBindAddress: 127.0.0.1:{metrics}
iptables:
  localhostNodePorts: false
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kubeconfig = kubeconfig.display()
    )
}

pub(super) fn kubelet_config(socket: &Path, pod_logs: &Path, port: u16, healthz: u16) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://{socket}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
authorization:
  mode: AlwaysAllow
registerNode: true
serializeImagePulls: false
evictionHard: {{}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
resolvConf: /etc/resolv.conf
clusterDNS: [{GATEWAY}]
clusterDomain: {CLUSTER_DOMAIN}
podLogsDir: {pod_logs}
"#,
        socket = socket.display(),
        pod_logs = pod_logs.display()
    )
}
