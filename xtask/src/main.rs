//! `cargo xtask`: the project's tasks. `cargo xtask test` runs every test and
//! `cargo xtask demo` shows Tessera working on this machine; both install what
//! they need first.
#![forbid(unsafe_code)]

mod bench;
mod demo;
mod deps;

use std::path::PathBuf;
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
    /// Regenerate crds/*.yaml from the Rust types (or, with --check, fail on drift).
    Crds {
        /// Compare instead of writing; exit non-zero when crds/ differs from the types.
        #[arg(long)]
        check: bool,
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
    /// Run one benchmark family and write target/bench/<name>.json.
    Bench {
        /// Which benchmark: controlplane.
        name: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Crds { check } => crds(check),
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
        Task::Bench { name } => {
            prepare()?;
            runtime()?.block_on(bench::run(&name))
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn crds_dir() -> PathBuf {
    repo_root().join("crds")
}

fn crds(check: bool) -> Result<()> {
    let dir = crds_dir();
    if check {
        tessera_api::crd::check_dir(&dir)?;
        println!("crds/ matches the Rust types");
    } else {
        for path in tessera_api::crd::write_dir(&dir)? {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn testbin() -> Result<TestBins> {
    let bins = TestBins::ensure_built()?;
    println!(
        "test binaries ready:\n  {}\n  {}\n  {}",
        bins.kube_apiserver.display(),
        bins.kubectl.display(),
        bins.etcd.display()
    );
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

fn test(no_lint: bool, cargo_test_args: &[String]) -> Result<()> {
    prepare()?;
    crds(true)?;
    if !no_lint {
        cargo(&["fmt", "--all", "--", "--check"], &[])?;
    }
    let mut extra = Vec::new();
    if !cargo_test_args.is_empty() {
        extra.push("--".to_owned());
        extra.extend(cargo_test_args.iter().cloned());
    }
    cargo(&["test", "--workspace"], &extra)?;
    if !no_lint {
        cargo(
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )?;
    }
    println!("all tests passed");
    Ok(())
}
