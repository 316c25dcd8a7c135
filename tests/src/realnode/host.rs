//! What the node changes on the host and how it is put back: mount
//! propagation, the kubelet's mounts, the `kubepods` cgroups and the
//! kubelet's and kube-proxy's iptables chains; and the logs kept.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

/// The mount points of `mountinfo` (`/proc/<pid>/mountinfo`) at or below
/// one of `roots` that are not shared (no `shared:` optional field),
/// parents first.
pub(super) fn private_mounts_below(mountinfo: &str, roots: &[&str]) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let point = Path::new(fields.get(4)?);
            let optional = fields.iter().skip(6).take_while(|f| **f != "-");
            let shared = optional.clone().any(|f| f.starts_with("shared:"));
            let wanted = roots.iter().any(|r| point.starts_with(r));
            (wanted && !shared).then(|| point.to_path_buf())
        })
        .collect()
}

/// Copies the regular files below `from` to the same places below `to`
/// (best effort: logs kept for a failure).
pub(super) fn copy_tree(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    let _ = std::fs::create_dir_all(to);
    for entry in entries.flatten() {
        let (path, target) = (entry.path(), to.join(entry.file_name()));
        match entry.file_type() {
            Ok(t) if t.is_dir() => copy_tree(&path, &target),
            Ok(t) if t.is_file() => {
                let _ = std::fs::copy(&path, &target);
            }
            _ => {}
        }
    }
}

/// Unmounts (lazily) every mount at or below `dir`, deepest first: the
/// kubelet bind-mounts its root directory onto itself, and volumes below.
pub(super) fn unmount_below(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
}

/// Removes the kubelet's `kubepods` cgroups, empty once its pods are gone,
/// from every hierarchy (deepest first: a cgroup goes only when empty).
pub(super) fn remove_pod_cgroups() {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for hierarchy in hierarchies.flatten() {
        let mut dirs = Vec::new();
        collect_dirs(&hierarchy.path().join("kubepods"), &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    out.push(dir.to_path_buf());
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), out);
        }
    }
}

/// Removes the iptables chains the kubelet made (`KUBE-*`: its firewall
/// for 127.0.0.0/8 and its canaries), in both families and every table,
/// with the jumps to them.
pub(super) fn remove_kube_chains() {
    for tool in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle"] {
            let Ok(out) = Command::new(tool).args(["-t", table, "-S"]).output() else {
                continue;
            };
            let rules = String::from_utf8_lossy(&out.stdout).into_owned();
            for rule in rules
                .lines()
                .filter(|r| r.starts_with("-A ") && r.contains(" -j KUBE-"))
            {
                let mut args = vec!["-t".to_owned(), table.to_owned(), "-D".to_owned()];
                args.extend(words(rule).into_iter().skip(1));
                let _ = Command::new(tool).args(&args).output();
            }
            for chain in rules.lines().filter_map(|r| r.strip_prefix("-N KUBE-")) {
                let chain = format!("KUBE-{chain}");
                let _ = Command::new(tool)
                    .args(["-t", table, "-F", &chain])
                    .output();
                let _ = Command::new(tool)
                    .args(["-t", table, "-X", &chain])
                    .output();
            }
        }
    }
}

/// The IPv4 rules of `table` as `iptables -S` prints them (kube-proxy's
/// Services among them).
pub fn iptables_rules(table: &str) -> Result<String> {
    let out = Command::new("iptables")
        .args(["-t", table, "-S"])
        .output()
        .context("running iptables -S (Debian package iptables)")?;
    anyhow::ensure!(
        out.status.success(),
        "iptables -t {table} -S: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The words of an `iptables -S` line, double-quoted ones (comments) whole.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::realnode::SHARED_MOUNTS;

    #[test]
    fn private_mounts_below_skips_shared_ones_and_other_roots() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:7 - cgroup2 cgroup2 rw
45 23 0:40 / /sys/fs/bpf rw,relatime master:3 - bpf bpf rw
46 23 0:41 / /sys/fs/bpfother rw - bpf bpf rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
";
        assert_eq!(
            private_mounts_below(mountinfo, &SHARED_MOUNTS),
            [
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/sys/fs/bpf")
            ]
        );
    }
}
