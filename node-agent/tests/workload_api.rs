//! The Workload API server with real callers: client processes placed in a
//! pod's cgroup (cgroup v2, as root) fetch through the `spiffe` crate's
//! client; a process in no pod is refused; a request without the security
//! header is refused; a caller whose SVID is issued while it asks waits for
//! it; a rotation reaches an open stream; a connection handed
//! to another process is refused once the process that opened it has exited,
//! even when its PID now belongs to a process in another pod.
//!
//! Needs root and the cgroup v2 hierarchy at /sys/fs/cgroup/unified (or
//! $TESSERA_CGROUP2_ROOT); fails, never skips, when they are missing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tessera_agent::svid::records::PodUid;
use tessera_agent::svid::store::{Bundles, IdentityStore, PodSvids, X509Svid};
use tessera_agent::workload_api;

mod common;
use common::PodCgroup;

const UID: &str = "6f1c2a9e-0d3b-4c5a-9e8f-7a6b5c4d3e2f";
const ID: &str = "spiffe://cluster.test/ns/shop/sa/web";

struct Material {
    root_der: Vec<u8>,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Material {
    fn new() -> Material {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI("spiffe://cluster.test".try_into().unwrap())];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Material {
            root_der: issuer.der().to_vec(),
            issuer,
        }
    }

    fn svid(&self, id: &str) -> X509Svid {
        // What the X509-SVID specification asks of a leaf.
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        X509Svid {
            spiffe_id: id.into(),
            chain_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            hint: String::new(),
        }
    }
}

async fn start(
    store: &IdentityStore,
) -> (tempfile::TempDir, PathBuf, tokio::sync::oneshot::Sender<()>) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    workload_api::serve(&socket, store.clone(), None, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    (dir, socket, stop)
}

fn finish(child: Child) -> (bool, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn store_with_pod(material: &Material) -> IdentityStore {
    let store = IdentityStore::default();
    store.set_bundles(Bundles {
        trust_domain_id: "spiffe://cluster.test".into(),
        own_der: material.root_der.clone(),
        federated_der: Default::default(),
        ..Bundles::default()
    });
    store.set(
        &PodUid::parse(UID).unwrap(),
        PodSvids {
            svids: vec![material.svid(ID)],
            federates_with: Vec::new(),
            ..PodSvids::default()
        },
    );
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_in_the_pod_cgroup_gets_its_svid_and_others_do_not() {
    let material = Material::new();
    let store = store_with_pod(&material);
    let (_dir, socket, _stop) = start(&store).await;

    let cgroup = PodCgroup::create("fetch", UID);
    let (ok, out, err) = tokio::task::spawn_blocking({
        let child = cgroup.spawn_client(&socket, &[]);
        move || finish(child)
    })
    .await
    .unwrap();
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains(&format!("SPIFFE ID: {ID} (chain of 1")),
        "{out}"
    );
    assert!(
        out.contains("bundle: cluster.test (1 authorities)"),
        "{out}"
    );

    // The same client outside any pod cgroup is refused.
    let outsider = Command::new(env!("CARGO_BIN_EXE_tessera-agent"))
        .args(["fetch-x509", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&outsider.stderr);
    assert!(!outsider.status.success());
    assert!(err.to_lowercase().contains("permission denied"), "{err}");

    // A pod this agent does not know is refused too.
    let stranger = PodCgroup::create("stranger", "11111111-2222-3333-4444-555555555555");
    let (ok, _, err) = finish(stranger.spawn_client(&socket, &[]));
    assert!(!ok);
    assert!(err.to_lowercase().contains("permission denied"), "{err}");
}

/// A container that asks as it starts, before the agent has its pod's SVID,
/// is answered once the SVID is issued rather than refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_whose_identity_is_being_issued_waits_for_it() {
    const NEW_UID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    const NEW_ID: &str = "spiffe://cluster.test/ns/shop/sa/new";
    let material = Material::new();
    let store = store_with_pod(&material);
    let (_dir, socket, _stop) = start(&store).await;
    let cgroup = PodCgroup::create("early", NEW_UID);
    let child = cgroup.spawn_client(&socket, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    store.set(
        &PodUid::parse(NEW_UID).unwrap(),
        PodSvids {
            svids: vec![material.svid(NEW_ID)],
            ..PodSvids::default()
        },
    );
    let (ok, out, err) = tokio::task::spawn_blocking(move || finish(child))
        .await
        .unwrap();
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains(&format!("SPIFFE ID: {NEW_ID} ")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_the_security_header_is_invalid() {
    use tessera_api::workload_api::X509svidRequest;
    use tessera_api::workload_api::spiffe_workload_api_client::SpiffeWorkloadApiClient;

    let material = Material::new();
    let store = store_with_pod(&material);
    let (_dir, socket, _stop) = start(&store).await;
    let channel = common::workload_api_channel(&socket).await;
    let status = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(X509svidRequest {})
        .await
        .expect_err("a request without the header must fail");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(status.message().contains("workload.spiffe.io"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_reaches_an_open_stream() {
    let material = Material::new();
    let store = store_with_pod(&material);
    let (_dir, socket, _stop) = start(&store).await;
    let cgroup = PodCgroup::create("watch", UID);
    let mut child = cgroup.spawn_client(&socket, &["--updates", "2"]);
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        first.starts_with(&format!("update 1: SPIFFE ID: {ID} leaf ")),
        "{first}"
    );

    // Rotate: a new certificate and key for the same identity.
    store.set(
        &PodUid::parse(UID).unwrap(),
        PodSvids {
            svids: vec![material.svid(ID)],
            federates_with: Vec::new(),
            ..PodSvids::default()
        },
    );
    let second = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(second.starts_with("update 2: "), "{second}");
    let leaf = |l: &str| {
        l.split(" leaf ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    assert_ne!(
        leaf(&first),
        leaf(&second),
        "the stream repeated the old certificate"
    );
    let (ok, _, err) = tokio::task::spawn_blocking(move || finish(child))
        .await
        .unwrap();
    assert!(ok, "{err}");
}

/// Connects to `socket` from a process in `cgroup`, hands the connection
/// to this test process over SCM_RIGHTS and exits; returns the connection
/// and the PID of the process that opened it (reaped, so free for reuse).
fn connection_from_an_exited_process(
    socket: &std::path::Path,
    cgroup: &std::path::Path,
) -> (std::os::unix::net::UnixStream, i32) {
    use std::os::fd::AsFd;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let theirs_fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    // The helper inherits its end under the same number.
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty()).unwrap();
    let script = r#"
import os, socket, sys
sock_path, cgroup, channel = sys.argv[1], sys.argv[2], int(sys.argv[3])
pid = os.fork()
if pid == 0:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    socket.send_fds(socket.socket(fileno=channel), [str(os.getpid()).encode()], [s.fileno()])
    os._exit(0)
os.waitpid(pid, 0)
"#;
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(socket)
        .arg(cgroup)
        .arg(theirs_fd.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    drop(theirs);
    let mut pid = [0u8; 16];
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        ours.as_fd(),
        &mut [std::io::IoSliceMut::new(&mut pid)],
        &mut control,
        rustix::net::RecvFlags::empty(),
    )
    .unwrap();
    let fd = control
        .drain()
        .find_map(|m| match m {
            rustix::net::RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .expect("the connection's descriptor");
    let pid: i32 = std::str::from_utf8(&pid[..got.bytes])
        .unwrap()
        .parse()
        .unwrap();
    (std::os::unix::net::UnixStream::from(fd), pid)
}

/// Starts a process in `cgroup` with PID `pid` (through
/// /proc/sys/kernel/ns_last_pid, retrying while other processes take it);
/// it sleeps until the cgroup is removed.
fn recycle_pid(pid: i32, cgroup: &std::path::Path) {
    let script = r#"
import os, sys, time
target, cgroup = int(sys.argv[1]), sys.argv[2]
for attempt in range(500):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(target - 1))
    pid = os.fork()
    if pid == 0:
        if os.getpid() == target:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)
        os._exit(0)
    if pid == target:
        for _ in range(500):
            if cgroup.endswith(open(f"/proc/{pid}/cgroup").read().split("::", 1)[-1].strip()):
                sys.exit(0)
            time.sleep(0.01)
        sys.exit(3)
    os.waitpid(pid, 0)
sys.exit(2)
"#;
    let status = Command::new("python3")
        .args(["-c", script, &pid.to_string()])
        .arg(cgroup)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "could not give PID {pid} to a process in {}",
        cgroup.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_connection_dies_with_the_process_that_opened_it() {
    const OTHER_UID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    const OTHER_ID: &str = "spiffe://cluster.test/ns/payments/sa/ledger";

    let material = Material::new();
    let store = store_with_pod(&material);
    store.set(
        &PodUid::parse(OTHER_UID).unwrap(),
        PodSvids {
            svids: vec![material.svid(OTHER_ID)],
            ..PodSvids::default()
        },
    );
    let (_dir, socket, _stop) = start(&store).await;
    let mine = PodCgroup::create("held", UID);
    let theirs = PodCgroup::create("recycled", OTHER_UID);

    let (held, opener) = connection_from_an_exited_process(&socket, mine.path());
    recycle_pid(opener, theirs.path());
    held.set_nonblocking(true).unwrap();
    let mut held = Some(tokio::net::UnixStream::from_std(held).unwrap());
    let channel = tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let stream = held.take();
            async move {
                stream
                    .map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the held connection is used once"))
            }
        }))
        .await
        .unwrap();
    match common::fetch_x509_once(channel).await {
        Ok(svids) => panic!(
            "PID {opener}, now a process of another pod, got {:?} on a connection its old owner opened",
            svids.svids.iter().map(|s| &s.spiffe_id).collect::<Vec<_>>()
        ),
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
            assert!(status.message().contains("has exited"), "{status}");
        }
    }
}
