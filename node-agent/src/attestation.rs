//! Workload attestation: which pod a calling process belongs to, from the
//! kernel's word (the peer credentials of its Unix socket) and the cgroup the
//! kubelet put it in, never from anything the caller says.

use std::fmt;

/// A pod UID, normalized to the lower-case 8-4-4-4-12 form the API server uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

impl PodUid {
    /// Parses a UID written with `-` (cgroupfs driver) or `_` (systemd driver).
    pub fn parse(text: &str) -> Option<PodUid> {
        let uid: String = text
            .chars()
            .map(|c| {
                if c == '_' {
                    '-'
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect();
        let groups: Vec<&str> = uid.split('-').collect();
        let shape_ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups
                .iter()
                .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()));
        shape_ok.then_some(PodUid(uid))
    }

    /// The UID text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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
    let contents = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|e| {
        AttestationError::Proc {
            pid,
            reason: e.to_string(),
        }
    })?;
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
