//! Services that reach the leader only. Only the leading replica serves
//! the signing service and the bundle endpoint, so their Services have no
//! selector: the leader writes each one's EndpointSlice (named like the
//! Service) with its own address when it is elected. A standby that takes
//! over overwrites them; a leader that dies leaves them pointing at its
//! address until then (the lease's duration), when callers retry.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label that says who manages an EndpointSlice (not the endpoint
/// slice controller, which leaves it alone).
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
use crate::deploy::DeployError;
use tessera_api::names::FIELD_MANAGER;

/// This replica, as its EndpointSlices name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Its pod's name (from the downward API).
    pub pod_name: String,
    /// Its pod's address.
    pub pod_ip: IpAddr,
}

/// One Service the leader backs, and the port it listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderService {
    /// The Service's (and the EndpointSlice's) name.
    pub name: &'static str,
    /// The port this replica serves it on.
    pub port: u16,
}

/// The EndpointSlice that points `service` at `replica`.
pub fn slice(namespace: &str, service: LeaderService, replica: &Replica) -> EndpointSlice {
    let address_type = if replica.pod_ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    };
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(service.name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(
                [
                    (SERVICE_NAME_LABEL.to_owned(), service.name.to_owned()),
                    (MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        address_type: address_type.to_owned(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![replica.pod_ip.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                ..EndpointConditions::default()
            }),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".to_owned()),
                namespace: Some(namespace.to_owned()),
                name: Some(replica.pod_name.clone()),
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        }]),
        ports: Some(vec![EndpointPort {
            name: Some("https".to_owned()),
            protocol: Some("TCP".to_owned()),
            port: Some(i32::from(service.port)),
            ..EndpointPort::default()
        }]),
    }
}

/// Points every one of `services` at `replica` (server-side apply, taking
/// the fields over from the previous leader).
pub async fn publish(
    client: &kube::Client,
    namespace: &str,
    services: &[LeaderService],
    replica: &Replica,
) -> Result<(), DeployError> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for service in services {
        api.patch(
            service.name,
            &params,
            &Patch::Apply(slice(namespace, *service, replica)),
        )
        .await
        .map_err(|source| DeployError::EndpointSlice {
            namespace: namespace.to_owned(),
            name: service.name.to_owned(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slice_names_its_service_and_the_replica() {
        let replica = Replica {
            pod_name: "tessera-operator-abc".into(),
            pod_ip: "10.0.0.7".parse().unwrap(),
        };
        let s = slice(
            "tessera-system",
            LeaderService {
                name: "tessera-signer",
                port: 8443,
            },
            &replica,
        );
        assert_eq!(s.metadata.name.as_deref(), Some("tessera-signer"));
        assert_eq!(s.address_type, "IPv4");
        let labels = s.metadata.labels.unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "tessera-signer");
        assert_eq!(labels[MANAGED_BY_LABEL], "tessera-operator");
        let endpoints = s.endpoints.unwrap();
        assert_eq!(endpoints[0].addresses, ["10.0.0.7"]);
        assert_eq!(
            endpoints[0].target_ref.as_ref().unwrap().name.as_deref(),
            Some("tessera-operator-abc")
        );
        assert_eq!(s.ports.unwrap()[0].port, Some(8443));
        let v6 = Replica {
            pod_ip: "fd00::7".parse().unwrap(),
            ..replica
        };
        let s = slice("tessera-system", LeaderService { name: "x", port: 1 }, &v6);
        assert_eq!(s.address_type, "IPv6");
    }
}
