//! On a fresh machine the README's two commands first build the xtask
//! binary, before anything is installed: that build must not need what
//! xtask installs. This builds the xtask package in a fresh target directory
//! with a PATH from which clang and bpftool are absent (every other program
//! on this machine's PATH stays reachable), and checks that the same
//! environment cannot build the eBPF programs, so the PATH really hides
//! what it claims to.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] functions

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Programs a fresh machine of this kind lacks until `cargo xtask deps` runs:
/// clang-16 and what comes with it, and bpftool.
fn installed_by_xtask(name: &str) -> bool {
    name.starts_with("clang")
        || name.starts_with("llvm")
        || name.starts_with("llc")
        || name.starts_with("ld.lld")
        || name == "lld"
        || name.starts_with("bpftool")
}

/// A directory of links to every program on `path` (the first of each name,
/// as a PATH lookup finds it) except those xtask installs.
fn shadow_path(path: &OsString, into: &Path) -> usize {
    let mut seen = HashSet::new();
    let mut hidden = 0;
    for dir in std::env::split_paths(path) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !seen.insert(name.clone()) {
                continue;
            }
            if installed_by_xtask(&name.to_string_lossy()) {
                hidden += 1;
                continue;
            }
            std::os::unix::fs::symlink(entry.path(), into.join(&name)).unwrap();
        }
    }
    hidden
}

/// `cargo <args>` in the repository with only `bin` on PATH and a minimal
/// environment (what a new shell on a fresh machine has, plus where rustup
/// keeps its toolchains).
fn cargo(bin: &Path, target: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin.join("cargo"));
    cmd.env_clear()
        .env("PATH", bin)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .arg("--target-dir")
        .arg(target);
    for keep in [
        "HOME",
        "RUSTUP_HOME",
        "CARGO_HOME",
        "RUSTUP_TOOLCHAIN",
        "LANG",
    ] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    cmd.output().expect("cargo runs")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn finds(bin: &Path, program: &str) -> Option<PathBuf> {
    let p = bin.join(program);
    p.exists().then_some(p)
}

#[test]
fn xtask_builds_without_clang_or_bpftool() {
    let path = std::env::var_os("PATH").expect("PATH is set");
    let bin = tempfile::tempdir().unwrap();
    let hidden = shadow_path(&path, bin.path());
    assert!(
        finds(bin.path(), "cargo").is_some() && finds(bin.path(), "cc").is_some(),
        "the shadow PATH lost cargo or cc"
    );
    for absent in ["clang", "clang-16", "bpftool"] {
        assert_eq!(finds(bin.path(), absent), None, "{absent} is still on PATH");
    }
    println!("hid {hidden} programs from PATH");

    let target = tempfile::tempdir().unwrap();
    let build = cargo(
        bin.path(),
        target.path(),
        &["build", "--locked", "--offline", "--package", "xtask"],
    );
    assert!(
        build.status.success(),
        "xtask does not build without clang and bpftool; it must depend on no crate \
         whose build needs what it installs:\n{}",
        text(&build)
    );
    assert!(target.path().join("debug/xtask").exists());

    // The control: in the same environment the eBPF programs cannot build.
    let bpf = cargo(
        bin.path(),
        target.path(),
        &["build", "--locked", "--offline", "--package", "tessera-bpf"],
    );
    let out = text(&bpf);
    assert!(
        !bpf.status.success() && out.contains("cannot run clang-16"),
        "tessera-bpf built without clang on PATH, so this test hides nothing:\n{out}"
    );
}
