//! Workload attestation: which pod a calling process belongs to, from the
//! kernel's word (the process at the other end of its Unix socket) and the
//! cgroup the kubelet put it in, never from anything the caller says.
//!
//! A connection is pinned to the process that opened it: the kernel hands
//! the agent a pidfd for that process (`SO_PEERPIDFD`), which names that
//! process and no other, whatever happens to its PID. Each call reads the
//! process's cgroup and then checks the pidfd's process is still alive, so
//! the cgroup read was its own: once it has exited (and its PID may belong to
//! a process in another pod), the connection gets nothing more. A process
//! that changed pods is refused too.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::OnceLock;

use crate::svid::PodUid;

/// Why a caller could not be attested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    /// The socket gave no peer process ID.
    #[error("the connection carries no peer process ID (not a Unix socket?)")]
    NoPeerPid,
    /// /proc/<pid>/cgroup could not be read (the process may have exited).
    #[error("cannot read /proc/{pid}/cgroup: {reason}")]
    Proc {
        /// The caller's process ID.
        pid: i32,
        /// The I/O error.
        reason: String,
    },
    /// The process is in no pod's cgroup.
    #[error("process {pid} is not in a pod's cgroup (its cgroups: {cgroups})")]
    NotInPod {
        /// The caller's process ID.
        pid: i32,
        /// Its cgroup paths, for the log.
        cgroups: String,
    },
    /// The kernel gave no pidfd for the connection's peer.
    #[error(
        "cannot pin the connection to its process (SO_PEERPIDFD: {0}); the agent needs Linux 6.5 or newer"
    )]
    NoPidfd(nix::errno::Errno),
    /// The kernel's description of a pidfd could not be read.
    #[error("cannot read {path} ({problem}); the agent needs Linux 6.5 or newer and /proc mounted")]
    PidfdInfo {
        /// The fdinfo file.
        path: String,
        /// What went wrong.
        problem: String,
    },
    /// The pidfd names another PID than this process's own.
    #[error(
        "the pidfd names PID {pid}, not this process ({own}); is the agent in the host's PID namespace?"
    )]
    PidNamespace {
        /// The PID the pidfd names.
        pid: i32,
        /// This process's PID.
        own: u32,
    },
    /// A socket pair to check the kernel with could not be made.
    #[error("cannot make a socket pair to check SO_PEERPIDFD: {0}")]
    SocketPair(std::io::ErrorKind),
    /// The process that opened the connection has exited.
    #[error(
        "the process that opened this connection has exited; a connection serves only the process that opened it"
    )]
    Exited,
    /// The process is in another pod than at its first call.
    #[error("the process moved from pod {pinned} to pod {now}")]
    Moved {
        /// The pod of its first call.
        pinned: PodUid,
        /// The pod it is in now.
        now: PodUid,
    },
}

/// The process at the other end of a Workload API connection, pinned by a
/// pidfd when the connection was accepted.
#[derive(Debug)]
pub struct Peer {
    pidfd: Result<OwnedFd, nix::errno::Errno>,
    pod: OnceLock<PodUid>,
}

impl Peer {
    /// The peer of the connected Unix socket `socket`.
    pub fn of(socket: &impl AsFd) -> Peer {
        let pidfd = nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::PeerPidfd);
        Peer {
            pidfd,
            pod: OnceLock::new(),
        }
    }

    /// The pod of the process that opened the connection, while it lives
    /// and stays in the pod of its first call.
    pub fn pod(&self) -> Result<PodUid, AttestationError> {
        let pidfd = self
            .pidfd
            .as_ref()
            .map_err(|e| AttestationError::NoPidfd(*e))?;
        let pid = live_pid(pidfd)?;
        let contents = read_cgroup(pid)?;
        // Still alive after the read: the cgroup read was its own, not that
        // of a process that took its PID meanwhile.
        if live_pid(pidfd)? != pid {
            return Err(AttestationError::Exited);
        }
        let uid = pod_uid_from_cgroup(&contents).ok_or_else(|| AttestationError::NotInPod {
            pid,
            cgroups: contents.lines().collect::<Vec<_>>().join(" "),
        })?;
        let pinned = self.pod.get_or_init(|| uid.clone());
        if *pinned != uid {
            return Err(AttestationError::Moved {
                pinned: pinned.clone(),
                now: uid,
            });
        }
        Ok(uid)
    }
}

/// The PID of the process `pidfd` refers to, as this process sees it;
/// [`AttestationError::Exited`] once it has exited.
fn live_pid(pidfd: &OwnedFd) -> Result<i32, AttestationError> {
    let path = format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd());
    let info = std::fs::read_to_string(&path).map_err(|e| AttestationError::PidfdInfo {
        path: path.clone(),
        problem: e.to_string(),
    })?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .ok_or_else(|| AttestationError::PidfdInfo {
            path,
            problem: "it names no Pid".to_owned(),
        })?;
    if pid > 0 {
        Ok(pid)
    } else {
        Err(AttestationError::Exited)
    }
}

/// Checks that this kernel pins connections to processes as [`Peer`]
/// needs; the agent refuses to start without it.
pub fn check_kernel() -> Result<(), AttestationError> {
    let (a, _b) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| AttestationError::SocketPair(e.kind()))?;
    let peer = Peer::of(&a);
    let pidfd = peer
        .pidfd
        .as_ref()
        .map_err(|e| AttestationError::NoPidfd(*e))?;
    let pid = live_pid(pidfd)?;
    if u32::try_from(pid).ok() != Some(std::process::id()) {
        return Err(AttestationError::PidNamespace {
            pid,
            own: std::process::id(),
        });
    }
    Ok(())
}

fn read_cgroup(pid: i32) -> Result<String, AttestationError> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|e| AttestationError::Proc {
        pid,
        reason: e.to_string(),
    })
}

/// The pod UID named in a `/proc/<pid>/cgroup` file, if any. Looks in every
/// hierarchy (cgroup v1 and v2) for a path segment `pod<uid>` (cgroupfs
/// driver) or `...-pod<uid>.slice` (systemd driver). A file naming two
/// different pods is ambiguous and yields None.
pub fn pod_uid_from_cgroup(contents: &str) -> Option<PodUid> {
    let mut found: Option<PodUid> = None;
    for line in contents.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or_default();
        for segment in path.split('/') {
            let segment = segment.strip_suffix(".slice").unwrap_or(segment);
            let candidate = match segment.rfind("pod") {
                Some(i) if i == 0 || segment[..i].ends_with('-') => &segment[i + 3..],
                _ => continue,
            };
            if let Some(uid) = PodUid::parse(candidate) {
                match &found {
                    Some(f) if *f != uid => return None,
                    _ => found = Some(uid),
                }
            }
        }
    }
    found
}

/// The pod of process `pid`, from `/proc/<pid>/cgroup`.
pub fn pod_of_pid(pid: i32) -> Result<PodUid, AttestationError> {
    let contents = read_cgroup(pid)?;
    pod_uid_from_cgroup(&contents).ok_or_else(|| AttestationError::NotInPod {
        pid,
        cgroups: contents.lines().collect::<Vec<_>>().join(" "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    const UID: &str = "0f2d3c4b-5a69-4788-99aa-bbccddeeff00";

    #[test_case("0::/kubepods/burstable/pod0f2d3c4b-5a69-4788-99aa-bbccddeeff00/abc123" ; "cgroupfs v2")]
    #[test_case("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f2d3c4b_5a69_4788_99aa_bbccddeeff00.slice/cri-containerd-abc.scope" ; "systemd v2")]
    #[test_case("4:memory:/kubepods/pod0f2d3c4b-5a69-4788-99aa-bbccddeeff00/abc\n0::/" ; "cgroup v1 memory")]
    #[test_case("0::/tessera-test-1/kubepods/pod0F2D3C4B-5A69-4788-99AA-BBCCDDEEFF00" ; "upper case")]
    fn finds_the_pod(contents: &str) {
        assert_eq!(pod_uid_from_cgroup(contents).unwrap().as_str(), UID);
    }

    #[test_case("0::/" ; "root")]
    #[test_case("0::/system.slice/sshd.service" ; "host service")]
    #[test_case("0::/kubepods/burstable/podnot-a-uid" ; "malformed uid")]
    #[test_case("0::/kubepods/burstable/mypod0f2d3c4b-5a69-4788-99aa-bbccddeeff00" ; "pod inside a word")]
    #[test_case("4:memory:/kubepods/pod0f2d3c4b-5a69-4788-99aa-bbccddeeff00\n0::/kubepods/pod11111111-2222-3333-4444-555555555555" ; "two pods")]
    #[test_case("garbage without colons" ; "garbage")]
    fn finds_no_pod(contents: &str) {
        assert_eq!(pod_uid_from_cgroup(contents), None);
    }

    #[test]
    fn this_kernel_pins_connections_to_processes() {
        check_kernel().unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = Peer::of(&a);
        match peer.pod() {
            Err(AttestationError::NotInPod { pid, .. }) => {
                assert_eq!(pid, std::process::id() as i32)
            }
            other => panic!("expected NotInPod, got {other:?}"),
        }
        drop(b);
    }

    #[test]
    fn own_process_is_not_a_pod() {
        let pid = std::process::id() as i32;
        match pod_of_pid(pid) {
            Err(AttestationError::NotInPod { pid: p, .. }) => assert_eq!(p, pid),
            other => panic!("expected NotInPod, got {other:?}"),
        }
        assert!(matches!(
            pod_of_pid(i32::MAX),
            Err(AttestationError::Proc { .. })
        ));
    }
}
