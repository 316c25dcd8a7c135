//! A real SPIRE server (the Go-built `spire-server` of [`crate::TestBins`])
//! for one trust domain on loopback: sqlite datastore, keys on disk (so a
//! restart keeps its CA), join-token node attestation, and a bundle
//! endpoint (https_spiffe) with a short refresh hint. Its CLI talks to it
//! over its admin socket.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::free_port;
use crate::procs::KillOnDrop;

/// The SPIFFE ID SPIRE's bundle endpoint presents (https_spiffe).
pub fn server_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/spire/server")
}

/// A running (or stopped, see [`SpireServer::stop`]) SPIRE server.
#[derive(Debug)]
pub struct SpireServer {
    bin: PathBuf,
    dir: PathBuf,
    /// Its trust domain.
    pub trust_domain: String,
    /// The admin API socket the CLI uses.
    pub socket: PathBuf,
    /// Port of the server API (agents connect here).
    pub server_port: u16,
    /// Port of the bundle endpoint.
    pub bundle_port: u16,
    proc: Option<KillOnDrop>,
}

impl SpireServer {
    /// Writes the configuration into `dir` and starts the server; returns
    /// once its health check passes.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        trust_domain: &str,
        refresh_hint: &str,
    ) -> Result<SpireServer> {
        std::fs::create_dir_all(dir.join("data"))?;
        let (server_port, bundle_port) = (free_port()?, free_port()?);
        let socket = dir.join("api.sock");
        let config = format!(
            r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{server_port}"
    socket_path = "{socket}"
    trust_domain = "{trust_domain}"
    data_dir = "{data}"
    log_level = "DEBUG"
    ca_ttl = "24h"
    default_x509_svid_ttl = "1h"
    federation {{
        bundle_endpoint {{
            address = "127.0.0.1"
            port = {bundle_port}
            refresh_hint = "{refresh_hint}"
        }}
    }}
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{data}/datastore.sqlite3"
        }}
    }}
    KeyManager "disk" {{
        plugin_data {{
            keys_path = "{data}/keys.json"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
}}
"#,
            socket = socket.display(),
            data = dir.join("data").display(),
        );
        std::fs::write(dir.join("server.conf"), config)?;
        let mut server = SpireServer {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            trust_domain: trust_domain.to_owned(),
            socket,
            server_port,
            bundle_port,
            proc: None,
        };
        server.resume().await?;
        Ok(server)
    }

    /// (Re)starts the server process with the same configuration and
    /// data; returns once it is healthy.
    pub async fn resume(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))?;
        let child = Command::new(&self.bin)
            .arg("run")
            .arg("-config")
            .arg(self.dir.join("server.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.proc = Some(KillOnDrop(child));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(proc) = self.proc.as_mut()
                && let Some(exit) = proc.0.try_wait()?
            {
                bail!(
                    "spire-server exited ({exit}) at start; its log:\n{}",
                    self.log()
                );
            }
            if self.cli(&["healthcheck"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "spire-server did not become healthy within 30 s; its log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the server (SIGKILL); [`Self::resume`] starts it again.
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Runs `spire-server <args> -socketPath <socket>`; its stdout, or an
    /// error with its output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("-socketPath")
            .arg(&self.socket)
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "spire-server {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Federates with a Tessera cluster of `trust_domain` whose operator
    /// serves its bundle endpoint (https_spiffe) on loopback `port`,
    /// bootstrapped with `bundle_pem` (the published trust bundle), and
    /// fetches its bundle once.
    pub fn federate_with_tessera(
        &self,
        trust_domain: &str,
        port: u16,
        bundle_pem: &str,
    ) -> Result<()> {
        let path = self.dir.join(format!("{trust_domain}.pem"));
        std::fs::write(&path, bundle_pem)?;
        let path = path.to_str().context("non-UTF-8 path")?;
        let url = format!("https://127.0.0.1:{port}");
        let id = format!("spiffe://{trust_domain}/tessera/bundle-endpoint");
        self.cli(&[
            "federation",
            "create",
            "-trustDomain",
            trust_domain,
            "-bundleEndpointURL",
            &url,
            "-bundleEndpointProfile",
            "https_spiffe",
            "-endpointSpiffeID",
            &id,
            "-trustDomainBundlePath",
            path,
            "-trustDomainBundleFormat",
            "pem",
        ])?;
        self.cli(&["federation", "refresh", "-id", trust_domain])
            .map(|_| ())
    }

    /// The server's own bundle, SPIFFE format.
    pub fn bundle(&self) -> Result<String> {
        self.cli(&["bundle", "show", "-format", "spiffe"])
    }

    /// A FederatedTrustDomain named `name` for this server's trust domain:
    /// its bundle endpoint with the https_spiffe profile (the server's own
    /// SPIFFE ID), bootstrapped with its current bundle.
    pub fn federated_trust_domain(
        &self,
        name: &str,
    ) -> Result<tessera_api::crd::federated_trust_domain::FederatedTrustDomain> {
        use tessera_api::crd::federated_trust_domain::{
            BundleEndpointProfile, BundleEndpointProfileType, FederatedTrustDomain,
            FederatedTrustDomainSpec,
        };
        Ok(FederatedTrustDomain::new(
            name,
            FederatedTrustDomainSpec {
                trust_domain: self.trust_domain.clone(),
                bundle_endpoint_url: format!("https://127.0.0.1:{}", self.bundle_port),
                bundle_endpoint_profile: BundleEndpointProfile {
                    profile_type: BundleEndpointProfileType::HttpsSpiffe,
                    endpoint_spiffe_id: Some(server_id(&self.trust_domain)),
                    ca_bundle: None,
                },
                trust_domain_bundle: Some(self.bundle()?),
                refresh_interval: None,
                max_bundle_age: None,
            },
        ))
    }

    /// The bundle SPIRE holds for federated trust domain `td`, SPIFFE
    /// format, or None when it holds none.
    pub fn federated_bundle(&self, td: &str) -> Result<Option<String>> {
        let id = format!("spiffe://{td}");
        match self.cli(&["bundle", "list", "-id", &id, "-format", "spiffe"]) {
            Ok(out) => Ok(out.find('{').map(|start| out[start..].to_owned())),
            Err(e) if e.to_string().contains("NotFound") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl SpireServer {
    /// A one-time join token for a node named `spiffe://<td>/<node>`.
    pub fn join_token(&self, node: &str) -> Result<String> {
        let id = format!("spiffe://{}/{node}", self.trust_domain);
        let out = self.cli(&["token", "generate", "-spiffeID", &id])?;
        out.split_whitespace()
            .skip_while(|w| *w != "Token:")
            .nth(1)
            .map(str::to_owned)
            .with_context(|| format!("no token in `spire-server token generate` output: {out}"))
    }

    /// Registers `spiffe_id` for workloads of `parent` (a node's ID) matching
    /// `selectors` (`unix:uid:0`, ...), receiving the bundles of the trust
    /// domain IDs in `federates_with`.
    pub fn create_entry(
        &self,
        parent: &str,
        spiffe_id: &str,
        selectors: &[&str],
        federates_with: &[&str],
    ) -> Result<()> {
        let mut args = vec![
            "entry",
            "create",
            "-parentID",
            parent,
            "-spiffeID",
            spiffe_id,
        ];
        for s in selectors {
            args.extend(["-selector", s]);
        }
        for td in federates_with {
            args.extend(["-federatesWith", td]);
        }
        self.cli(&args).map(|_| ())
    }
}

/// A real SPIRE agent attested to a [`SpireServer`] with a join token,
/// serving the Workload API on its socket (unix workload attestor) and,
/// when it has authorized delegates, the Delegated Identity API on its
/// admin socket.
#[derive(Debug)]
pub struct SpireAgent {
    /// The Workload API socket.
    pub socket: PathBuf,
    /// The admin socket (Delegated Identity API).
    pub admin_socket: PathBuf,
    /// The agent's own SPIFFE ID (`spiffe://<td>/<node>`).
    pub id: String,
    dir: PathBuf,
    _proc: KillOnDrop,
}

impl SpireAgent {
    /// Starts `spire-agent` in `dir` for `server`, known by the alias
    /// `spiffe://<td>/<node>` (the join token is made for it), with
    /// `delegates` (SPIFFE IDs) allowed on the Delegated Identity API;
    /// returns once its Workload API answers health checks.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        server: &SpireServer,
        node: &str,
        delegates: &[&str],
    ) -> Result<SpireAgent> {
        std::fs::create_dir_all(dir.join("data"))?;
        let bootstrap = dir.join("bootstrap.pem");
        std::fs::write(&bootstrap, server.cli(&["bundle", "show"])?)?;
        // SPIRE wants the two sockets in directories apart from each other.
        std::fs::create_dir_all(dir.join("public"))?;
        std::fs::create_dir_all(dir.join("admin"))?;
        let socket = dir.join("public").join("agent.sock");
        let admin_socket = dir.join("admin").join("api.sock");
        let admin = if delegates.is_empty() {
            String::new()
        } else {
            let quoted: Vec<String> = delegates.iter().map(|d| format!("{d:?}")).collect();
            format!(
                "    admin_socket_path = {:?}\n    authorized_delegates = [{}]\n",
                admin_socket.display().to_string(),
                quoted.join(", ")
            )
        };
        let config = format!(
            r#"agent {{
{admin}    data_dir = "{data}"
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{socket}"
    trust_bundle_path = "{bootstrap}"
    trust_domain = "{td}"
}}

plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
"#,
            data = dir.join("data").display(),
            port = server.server_port,
            socket = socket.display(),
            bootstrap = bootstrap.display(),
            td = server.trust_domain,
        );
        std::fs::write(dir.join("agent.conf"), config)?;
        let token = server.join_token(node)?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let mut child = Command::new(bin)
            .arg("run")
            .arg("-config")
            .arg(dir.join("agent.conf"))
            .arg("-joinToken")
            .arg(token)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(exit) = child.try_wait()? {
                bail!(
                    "spire-agent exited ({exit}) at start; its log:\n{}",
                    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
                );
            }
            let health = Command::new(bin)
                .args(["healthcheck", "-socketPath"])
                .arg(&socket)
                .output()?;
            if health.status.success() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "spire-agent did not become healthy within 30 s; its log:\n{}",
                    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(SpireAgent {
            socket,
            admin_socket,
            id: format!("spiffe://{}/{node}", server.trust_domain),
            dir: dir.to_owned(),
            _proc: KillOnDrop(child),
        })
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}
