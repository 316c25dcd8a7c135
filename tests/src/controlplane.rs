//! A real Kubernetes control plane on loopback: etcd and kube-apiserver started
//! as child processes on free random ports, with fresh certificates, in a
//! temporary directory. For a real node's pods the API server can listen on
//! another address of the test topology instead ([`ControlPlane::start_at`]). Dropping a [`ControlPlane`] (including during a panic's
//! unwinding) kills both processes and deletes the directory.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::pki::Pki;
use crate::testbin::TestBins;

/// How long etcd or kube-apiserver may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Start attempts; another process may grab a port between choosing and binding it.
const START_ATTEMPTS: usize = 3;
/// Service IPs are only allocated, never routed; they come from the range
/// reserved for network testing, like every address the tests use.
pub const SERVICE_CIDR: &str = "198.18.255.0/24";
/// The `kubernetes` Service's address: the first of [`SERVICE_CIDR`].
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);

/// A running etcd + kube-apiserver pair. See the module docs.
#[derive(Debug)]
pub struct ControlPlane {
    dir: tempfile::TempDir,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    kubeconfig: PathBuf,
    server: String,
    bins: TestBins,
    pki: Option<Pki>,
    ports: (u16, u16),
    address: Ipv4Addr,
}

/// A loopback TCP port free right now, that no other call in this process
/// returned, and below the kernel's ephemeral range: the ports the kernel
/// hands to `bind(0)` and outgoing connections come from that range, so a
/// port given here is not taken by another test's listener or client
/// before its process binds it (seen in CI: an operator's signer port
/// taken by another test's socket).
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral.max(10_001));
    let span = high - low;
    // Processes start at different places, so concurrent test binaries
    // rarely try the same ports.
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + (start + offset) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port between {low} and {high}")
}

/// The last `lines` lines of a log file, for error messages.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let file = std::fs::File::create(log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    Ok(child)
}

/// What went wrong while starting; port clashes are retried.
enum StartError {
    PortInUse(anyhow::Error),
    Other(anyhow::Error),
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver on loopback and waits until the API
    /// server is ready.
    pub async fn start() -> Result<ControlPlane> {
        Self::start_at(Ipv4Addr::LOCALHOST).await
    }

    /// As [`ControlPlane::start`], with the API server listening on and
    /// advertising `address` (a host address pods can reach; the
    /// `kubernetes` Service then points at it). etcd stays on loopback.
    pub async fn start_at(address: Ipv4Addr) -> Result<ControlPlane> {
        let bins = TestBins::locate()?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(bins.clone(), address).await {
                Ok(cp) => return Ok(cp),
                Err(StartError::PortInUse(e)) => last = Some(e),
                Err(StartError::Other(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("control plane did not start")))
    }

    async fn start_once(
        bins: TestBins,
        address: Ipv4Addr,
    ) -> std::result::Result<ControlPlane, StartError> {
        let other = StartError::Other;
        let dir = tempfile::Builder::new()
            .prefix("tessera-cp-")
            .tempdir()
            .map_err(|e| other(e.into()))?;
        let serving_ips = [address.into(), KUBERNETES_SERVICE_IP.into()];
        let pki = Pki::create(dir.path(), &serving_ips).map_err(other)?;
        let mut cp = ControlPlane {
            kubeconfig: dir.path().join("kubeconfig"),
            dir,
            etcd: None,
            apiserver: None,
            server: String::new(),
            bins,
            pki: None,
            ports: (0, 0),
            address,
        };
        let (client_port, peer_port) = (free_port().map_err(other)?, free_port().map_err(other)?);
        cp.start_etcd(client_port, peer_port)?;
        let secure_port = free_port().map_err(other)?;
        cp.start_apiserver(&pki, client_port, secure_port, address)?;
        cp.server = format!("https://{address}:{secure_port}");
        cp.write_kubeconfig(&pki).map_err(other)?;
        cp.pki = Some(pki);
        cp.ports = (client_port, secure_port);
        cp.wait_apiserver_ready().await?;
        Ok(cp)
    }

    fn start_etcd(
        &mut self,
        client_port: u16,
        peer_port: u16,
    ) -> std::result::Result<(), StartError> {
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log = self.dir.path().join("etcd.log");
        let child = spawn_logged(
            Command::new(&self.bins.etcd)
                .arg("--name=default")
                .arg(format!(
                    "--data-dir={}",
                    self.dir.path().join("etcd").display()
                ))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=default={peer_url}"))
                .arg("--unsafe-no-fsync=true")
                .arg("--log-level=warn"),
            &log,
        )
        .map_err(StartError::Other)?;
        self.etcd = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, client_port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            self.check_alive("etcd", &log)?;
            if Instant::now() > deadline {
                return Err(StartError::Other(anyhow::anyhow!(
                    "etcd did not listen on {addr} within {READY_TIMEOUT:?}; its log ends:\n{}",
                    log_tail(&log, 20)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_apiserver(
        &mut self,
        pki: &Pki,
        etcd_port: u16,
        secure_port: u16,
        address: Ipv4Addr,
    ) -> std::result::Result<(), StartError> {
        let log = self.dir.path().join("kube-apiserver.log");
        // On loopback nothing outside this host could use the `kubernetes`
        // Service's endpoints (and loopback may not be advertised).
        let reconciler = if address.is_loopback() {
            "none"
        } else {
            "lease"
        };
        let child = spawn_logged(
            Command::new(&self.bins.kube_apiserver)
                .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
                .arg(format!("--secure-port={secure_port}"))
                .arg(format!("--bind-address={address}"))
                .arg(format!("--advertise-address={address}"))
                .arg(format!("--cert-dir={}", self.dir.path().display()))
                .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
                .arg(format!(
                    "--tls-private-key-file={}",
                    pki.serving_key.display()
                ))
                .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
                .arg(format!(
                    "--service-account-key-file={}",
                    pki.sa_pub.display()
                ))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    pki.sa_key.display()
                ))
                .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
                .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
                .arg("--authorization-mode=RBAC")
                .arg(format!("--endpoint-reconciler-type={reconciler}"))
                .arg("--allow-privileged=true")
                .arg("--profiling=false")
                .arg("--v=1"),
            &log,
        )
        .map_err(StartError::Other)?;
        self.apiserver = Some(child);
        Ok(())
    }

    /// Fails (with the log's end) if the named process has exited.
    fn check_alive(&mut self, which: &str, log: &Path) -> std::result::Result<(), StartError> {
        let child = if which == "etcd" {
            &mut self.etcd
        } else {
            &mut self.apiserver
        };
        let Some(child) = child.as_mut() else {
            return Ok(());
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                let tail = log_tail(log, 30);
                let err = anyhow::anyhow!(
                    "{which} exited ({status}) while starting; its log ends:\n{tail}"
                );
                if tail.contains("address already in use") {
                    Err(StartError::PortInUse(err))
                } else {
                    Err(StartError::Other(err))
                }
            }
            Err(e) => Err(StartError::Other(e.into())),
        }
    }

    fn write_kubeconfig(&self, pki: &Pki) -> Result<()> {
        let mut text = String::new();
        writeln!(
            text,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: tessera-test\n  cluster:"
        )?;
        writeln!(text, "    server: {}", self.server)?;
        writeln!(
            text,
            "    certificate-authority-data: {}",
            B64.encode(&pki.ca_pem)
        )?;
        writeln!(text, "users:\n- name: admin\n  user:")?;
        writeln!(
            text,
            "    client-certificate-data: {}",
            B64.encode(&pki.admin_cert_pem)
        )?;
        writeln!(
            text,
            "    client-key-data: {}",
            B64.encode(&pki.admin_key_pem)
        )?;
        writeln!(
            text,
            "contexts:\n- name: tessera-test\n  context:\n    cluster: tessera-test\n    user: admin\ncurrent-context: tessera-test"
        )?;
        std::fs::write(&self.kubeconfig, text)?;
        Ok(())
    }

    async fn wait_apiserver_ready(&mut self) -> std::result::Result<(), StartError> {
        let log = self.dir.path().join("kube-apiserver.log");
        let client = self.client().await.map_err(StartError::Other)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| StartError::Other(e.into()))?;
            let last_error = match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(e) => e.to_string(),
            };
            self.check_alive("kube-apiserver", &log)?;
            if Instant::now() > deadline {
                return Err(StartError::Other(anyhow::anyhow!(
                    "kube-apiserver was not ready within {READY_TIMEOUT:?} (last answer: {last_error}); its log ends:\n{}",
                    log_tail(&log, 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new client for the admin identity, bound to the calling tokio runtime.
    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .context("cannot load the test kubeconfig")?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A client acting as `user` (impersonated by the admin identity), for
    /// tests of what an unprivileged user may do.
    pub async fn client_as(&self, user: &str) -> Result<kube::Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .context("cannot load the test kubeconfig")?;
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups = Some(vec!["system:authenticated".to_owned()]);
        Ok(kube::Client::try_from(config)?)
    }

    /// Writes a kubeconfig that authenticates with bearer `token` (a
    /// service account's, say) to `<dir>/kubeconfig-<name>`; its path.
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> Result<PathBuf> {
        let admin = std::fs::read_to_string(&self.kubeconfig)?;
        let users_at = admin
            .find("users:\n")
            .context("the admin kubeconfig has no users")?;
        let contexts_at = admin
            .find("contexts:\n")
            .context("the admin kubeconfig has no contexts")?;
        let text = format!(
            "{}users:\n- name: admin\n  user:\n    token: {token}\n{}",
            &admin[..users_at],
            &admin[contexts_at..]
        );
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Path of a kubeconfig for the admin identity.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server URL (`https://127.0.0.1:<port>`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The certificates and keys (the CA, the service-account key).
    pub fn pki(&self) -> Option<&Pki> {
        self.pki.as_ref()
    }

    /// The temporary directory holding certificates, data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process IDs of etcd and kube-apiserver.
    pub fn pids(&self) -> Vec<u32> {
        [&self.etcd, &self.apiserver]
            .into_iter()
            .flatten()
            .map(Child::id)
            .collect()
    }

    /// A `kubectl` command of the matching release, pointed at this control plane.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.bins.kubectl);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        cmd
    }

    /// Runs kubectl with `args` and returns its stdout; fails with stderr otherwise.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl().args(args).output()?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `token` (one the API server issued) with its claims changed by `edit`
    /// and signed again with this control plane's service-account key: how a
    /// test makes an expired token, which TokenRequest cannot (its minimum
    /// lifetime is ten minutes). Re-signing without an edit gives a token the
    /// API server accepts, which shows the re-signing itself is sound.
    pub fn resign_service_account_token(
        &self,
        token: &str,
        edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) -> Result<String> {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let mut parts = token.split('.');
        let (Some(header), Some(claims)) = (parts.next(), parts.next()) else {
            anyhow::bail!("not a JWT");
        };
        let mut claims: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims)?)?;
        edit(&mut claims);
        let input = format!(
            "{header}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?)
        );
        let pem = std::fs::read_to_string(self.dir.path().join(crate::pki::SA_KEY_FILE))?;
        let der = rcgen::KeyPair::from_pem(&pem)?.serialize_der();
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
            .map_err(|e| anyhow::anyhow!("service-account key: {e}"))?;
        let sig = key
            .sign(&rng, input.as_bytes())
            .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }

    /// Kills the API server (SIGKILL, no graceful shutdown), keeps it down for
    /// `down_for`, starts it again on the same port with the same etcd, and
    /// waits until it is ready: what clients see when the API server restarts.
    pub async fn restart_apiserver(&mut self, down_for: Duration) -> Result<()> {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        tokio::time::sleep(down_for).await;
        let pki = self.pki.clone().context("the control plane has no PKI")?;
        let (etcd_port, secure_port) = self.ports;
        let unwrap = |e: StartError| match e {
            StartError::PortInUse(e) | StartError::Other(e) => e,
        };
        self.start_apiserver(&pki, etcd_port, secure_port, self.address)
            .map_err(unwrap)?;
        self.wait_apiserver_ready().await.map_err(unwrap)
    }

    /// Stops both processes and deletes the directory (what dropping does).
    pub fn stop(self) {}
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The API server first, so it does not log etcd errors while going down.
        for child in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
