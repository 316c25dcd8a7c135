//! The test control plane itself: a real kube-apiserver and etcd that start on
//! free ports, run side by side, and vanish when dropped, panics included.

use std::path::PathBuf;

use anyhow::Result;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use tessera_tests::{ControlPlane, testbin};

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn serves_the_expected_kubernetes_release() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    let version = client.apiserver_version().await?;
    assert_eq!(
        version.git_version,
        format!("v{}", testbin::KUBERNETES_VERSION)
    );
    let namespaces: Api<Namespace> = Api::all(client);
    assert!(namespaces.get_opt("default").await?.is_some());
    // kubectl of the same release talks to it through the written kubeconfig.
    let out = cp.kubectl_output(&["get", "namespace", "default", "-o", "name"])?;
    assert_eq!(out.trim(), "namespace/default");
    Ok(())
}

#[tokio::test]
async fn two_control_planes_run_side_by_side_independently() -> Result<()> {
    let (a, b) = tokio::join!(ControlPlane::start(), ControlPlane::start());
    let (a, b) = (a?, b?);
    assert_ne!(a.server(), b.server());
    assert_ne!(a.dir(), b.dir());
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some("only-in-a".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(a.client().await?)
        .create(&PostParams::default(), &ns)
        .await?;
    let in_b = Api::<Namespace>::all(b.client().await?)
        .get_opt("only-in-a")
        .await?;
    assert!(
        in_b.is_none(),
        "a namespace created in one control plane showed up in the other"
    );
    Ok(())
}

#[test]
fn a_panicking_test_still_stops_processes_and_deletes_files() {
    let (tx, rx) = std::sync::mpsc::channel::<(Vec<u32>, PathBuf)>();
    let outcome = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let cp = rt.block_on(ControlPlane::start()).unwrap();
        tx.send((cp.pids(), cp.dir().to_path_buf())).unwrap();
        panic!("a test failing while its control plane runs");
    })
    .join();
    assert!(outcome.is_err(), "the thread was meant to panic");
    let (pids, dir) = rx.recv().expect("the control plane never started");
    assert_eq!(pids.len(), 2);
    for pid in pids {
        assert!(
            !process_exists(pid),
            "process {pid} outlived the panicking test"
        );
    }
    assert!(
        !dir.exists(),
        "{} outlived the panicking test",
        dir.display()
    );
}
