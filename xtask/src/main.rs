//! `cargo xtask`: the project's tasks. `cargo xtask test` runs every test and
//! `cargo xtask demo` shows Tessera working on this machine; both install what
//! they need first.
//!
//! The xtask binary itself must build on a machine that has only the Rust
//! and Go toolchains, so it depends on no crate whose build needs what it
//! installs (the eBPF programs need clang-16): whatever links them, such as
//! the benchmarks (`tessera-bench`), is a separate binary that the tasks
//! build after installing the packages. `xtask/tests/fresh_machine.rs`
//! holds it to that.
#![forbid(unsafe_code)]

mod demo;
mod deps;
mod images;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tessera_tests::{TestBins, repo_root};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Tessera's build, test, demo and benchmark tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Regenerate crds/ and deploy/ from the Rust code (or, with --check,
    /// fail on drift).
    Generate {
        /// Compare instead of writing; exit non-zero when a file differs
        /// from what the code generates.
        #[arg(long)]
        check: bool,
        /// The directory holding crds/ and deploy/ (default: the repository).
        #[arg(long)]
        root: Option<PathBuf>,
    },
    /// Install the Debian packages and check the Go toolchain the tests need.
    Deps,
    /// Build (once) and cache kube-apiserver, kubectl and etcd from the Go module proxy.
    Testbin,
    /// Install prerequisites, check formatting and CRDs, run every test, then clippy.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (for example a test name filter).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Start a local control plane, install the CRDs and examples, and show them.
    Demo,
    /// Fuzz a parser with cargo-fuzz (installed on first use) for a while.
    Fuzz {
        /// Target: spiffe_id, template, jwt, bundle (api/fuzz); authcache_record,
        /// handshake_frames, pem_bundle (node-agent/fuzz); csr (operator/fuzz);
        /// http_path (waypoint/fuzz).
        target: String,
        /// How long to run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run the data path's randomized churn test (as root) for any number of
    /// events, optionally replaying a seed; optimized build.
    Churn {
        /// How many events.
        #[arg(long, default_value_t = 10_000)]
        events: u64,
        /// The seed of a run to replay (printed by every run).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Build OCI image archives of the operator, agent and waypoint under
    /// target/images/ (no registry or container engine needed).
    Images {
        /// Cargo profile of the binaries.
        #[arg(long, default_value = "release")]
        profile: String,
        /// Where to write the `<binary>.oci.tar` archives.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Repository prefix of the image names.
        #[arg(long, default_value = "localhost/tessera")]
        registry: String,
        /// Package the binaries already built for the profile.
        #[arg(long)]
        no_build: bool,
    },
    /// Run one benchmark family and write target/bench/<name>.json.
    Bench {
        /// Which benchmark: controlplane, identity, auth, auth-cluster, restart or
        /// waypoint.
        name: String,
    },
}

#[cfg(test)]
mod tests {
    use super::Counts;

    #[test]
    fn counts_add_up_cargo_test_summaries() {
        let mut c = Counts::default();
        c.add_line("test result: ok. 41 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.29s");
        c.add_line(
            "test result: FAILED. 1 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        c.add_line("running 2 tests");
        assert_eq!(
            c,
            Counts {
                passed: 42,
                failed: 3,
                ignored: 2
            }
        );
        assert_eq!(c.to_string(), "tests: 42 passed, 3 failed, 2 skipped");
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Generate { check, root } => generate(check, &root.unwrap_or_else(repo_root)),
        Task::Deps => deps::ensure(),
        Task::Testbin => testbin().map(|_| ()),
        Task::Test {
            no_lint,
            cargo_test_args,
        } => test(no_lint, &cargo_test_args),
        Task::Demo => {
            prepare()?;
            runtime()?.block_on(demo::run())
        }
        Task::Fuzz { target, seconds } => fuzz(&target, seconds),
        Task::Churn { events, seed } => churn(events, seed),
        Task::Images {
            profile,
            out,
            registry,
            no_build,
        } => {
            // The agent and operator link the eBPF programs (clang-16).
            deps::ensure()?;
            let out = out.unwrap_or_else(|| repo_root().join("target/images"));
            let opts = images::Options {
                profile,
                out,
                registry,
                no_build,
            };
            images::build(&repo_root(), &opts).map(|_| ())
        }
        Task::Bench { name } => {
            deps::ensure_bench()?;
            testbin()?;
            cargo(
                &["run", "--quiet", "--package", "tessera-bench", "--"],
                &[name],
            )
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Writes (or, with `check`, compares) the generated directories below
/// `root`: `crds/` from the CRD types, `deploy/` from `api/src/install`.
fn generate(check: bool, root: &Path) -> Result<()> {
    let settings = tessera_api::install::Settings::default();
    let generated = [
        ("crds", tessera_api::crd::files()?),
        ("deploy", tessera_api::install::files(&settings)?),
        ("olm/bundle", tessera_api::install::olm::files(&settings)?),
    ];
    for (dir, files) in generated {
        let dir = root.join(dir);
        if check {
            files.check(&dir)?;
            println!("{} matches {}", dir.display(), files.source_code);
        } else {
            for path in files.write(&dir)? {
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

fn testbin() -> Result<TestBins> {
    let bins = TestBins::ensure_built()?;
    println!("test binaries ready:");
    for bin in bins.paths() {
        println!("  {}", bin.display());
    }
    Ok(bins)
}

/// What every task that runs the product needs first.
fn prepare() -> Result<TestBins> {
    deps::ensure()?;
    testbin()
}

fn cargo(args: &[&str], extra: &[String]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("+ cargo {} {}", args.join(" "), extra.join(" "));
    let status = Command::new(cargo)
        .current_dir(repo_root())
        .args(args)
        .args(extra)
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The fuzz crates, each in its own directory, and their targets.
const FUZZ_TARGETS: &[(&str, &[&str])] = &[
    ("api", &["spiffe_id", "template", "jwt", "bundle"]),
    (
        "node-agent",
        &["authcache_record", "handshake_frames", "pem_bundle"],
    ),
    ("operator", &["csr"]),
    ("waypoint", &["http_path"]),
];

fn fuzz(target: &str, seconds: u64) -> Result<()> {
    let Some((crate_dir, _)) = FUZZ_TARGETS.iter().find(|(_, ts)| ts.contains(&target)) else {
        let all: Vec<&str> = FUZZ_TARGETS
            .iter()
            .flat_map(|(_, ts)| ts.iter().copied())
            .collect();
        bail!(
            "unknown fuzz target {target:?}; available: {}",
            all.join(", ")
        );
    };
    if ["node-agent", "operator"].contains(crate_dir) {
        // Their crates link the eBPF programs, which need clang-16.
        deps::ensure()?;
    }
    let has_cargo_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_fuzz {
        cargo(&["install", "cargo-fuzz", "--locked"], &[])?;
    }
    println!("+ cargo fuzz run {target} (for {seconds}s)");
    // cargo-fuzz passes nightly-only sanitizer flags; the stable compiler
    // accepts them when told it is bootstrapping itself.
    let status = Command::new("cargo")
        .current_dir(repo_root().join(crate_dir))
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "run", target, "--"])
        .arg(format!("-max_total_time={seconds}"))
        .status()
        .context("cannot run cargo fuzz")?;
    if !status.success() {
        bail!(
            "cargo fuzz run {target} failed ({status}); the crashing input is under {crate_dir}/fuzz/artifacts/{target}/"
        );
    }
    Ok(())
}

/// Runs `node-agent/tests/churn` for `events` events, in release mode (the
/// model and the decisions it checks are the run time).
fn churn(events: u64, seed: Option<u64>) -> Result<()> {
    deps::ensure()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root())
        .args([
            "test",
            "--release",
            "-p",
            "tessera-agent",
            "--test",
            "churn",
        ])
        .args(["--", "--nocapture"])
        .env("TESSERA_CHURN_EVENTS", events.to_string());
    if let Some(seed) = seed {
        cmd.env("TESSERA_CHURN_SEED", seed.to_string());
    }
    println!("+ cargo test --release -p tessera-agent --test churn ({events} events)");
    let status = cmd.status().context("cannot run cargo test")?;
    if !status.success() {
        bail!(
            "the churn run failed ({status}); its seed and the first wrong decision are printed above"
        );
    }
    Ok(())
}

fn test(no_lint: bool, cargo_test_args: &[String]) -> Result<()> {
    prepare()?;
    generate(true, &repo_root())?;
    if !no_lint {
        cargo(&["fmt", "--all", "--", "--check"], &[])?;
    }
    let mut extra = Vec::new();
    if !cargo_test_args.is_empty() {
        extra.push("--".to_owned());
        extra.extend(cargo_test_args.iter().cloned());
    }
    let counts = cargo_test(&extra)?;
    if !no_lint {
        cargo(
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                // The benchmarks' code too.
                "--features",
                "tessera-agent/bench,tessera-operator/bench",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )?;
    }
    // One closing line for the whole run, after clippy's output.
    println!("{counts}");
    if counts.passed == 0 {
        bail!("no test ran; check the filter given after `--`");
    }
    Ok(())
}

/// Totals over every `test result:` line cargo test printed.
#[derive(Debug, Default, PartialEq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tests: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        )
    }
}

impl Counts {
    /// Adds one `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            let n = |i: usize| {
                words
                    .get(i)
                    .and_then(|w| w.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            match words.as_slice() {
                [_, _, "passed"] => self.passed += n(1),
                [_, "failed"] => self.failed += n(0),
                [_, "ignored"] => self.ignored += n(0),
                _ => {}
            }
        }
    }
}

/// Runs `cargo test --workspace`, echoing its output and counting results.
fn cargo_test(extra: &[String]) -> Result<Counts> {
    use std::io::BufRead as _;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("+ cargo test --workspace {}", extra.join(" "));
    let mut child = Command::new(cargo)
        .current_dir(repo_root())
        .args(["test", "--workspace"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let mut counts = Counts::default();
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            counts.add_line(&line);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("{counts}");
        bail!("cargo test failed ({status}); the failing tests are listed above");
    }
    Ok(counts)
}
