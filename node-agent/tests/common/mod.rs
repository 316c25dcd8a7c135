//! Helpers shared by the agent's root-only tests: pod cgroups (cgroup v2)
//! with a real client process inside.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn cgroup2_root() -> PathBuf {
    std::env::var_os("TESSERA_CGROUP2_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/unified"))
}

/// A pod cgroup `<root>/tessera-test-<pid>-<tag>/kubepods/pod<uid>`, removed on drop.
pub struct PodCgroup {
    top: PathBuf,
    leaf: PathBuf,
}

impl PodCgroup {
    pub fn create(tag: &str, uid: &str) -> PodCgroup {
        let root = cgroup2_root();
        assert!(
            root.join("cgroup.procs").exists(),
            "no cgroup v2 hierarchy at {}; mount one or set TESSERA_CGROUP2_ROOT (this test needs root)",
            root.display()
        );
        let top = root.join(format!("tessera-test-{}-{tag}", std::process::id()));
        let leaf = top.join("kubepods").join(format!("pod{uid}"));
        std::fs::create_dir_all(&leaf)
            .unwrap_or_else(|e| panic!("cannot create {} (run as root): {e}", leaf.display()));
        PodCgroup { top, leaf }
    }

    /// Starts the agent's fetch client inside this cgroup.
    pub fn spawn_client(&self, socket: &Path, extra: &[&str]) -> Child {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\" fetch-x509 --socket \"$1\" {}",
            self.leaf.display(),
            extra.join(" ")
        );
        Command::new("sh")
            .args(["-c", &script, env!("CARGO_BIN_EXE_tessera-agent")])
            .arg(socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl PodCgroup {
    /// Starts `program args...` inside this cgroup.
    pub fn spawn(&self, program: &Path, args: &[&str]) -> Child {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
            self.leaf.display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .arg(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Kill whatever a failed test left inside, then remove leaf first.
        let _ = std::fs::write(self.leaf.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.leaf).is_ok() || !self.leaf.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(self.leaf.parent().unwrap());
        let _ = std::fs::remove_dir(&self.top);
    }
}
