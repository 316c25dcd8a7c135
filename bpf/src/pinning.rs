//! Where the data path lives between agent runs: maps and program links
//! pinned on bpffs under a directory named after the ABI version, so
//! enforcement goes on while the agent is down and a restarted agent picks up
//! the same maps. aya reuses a pinned map without checking it, so every pinned
//! map's type, key size, value size and capacity is checked against this
//! build's before any is reused; a mismatch is refused, never reinterpreted.

use std::path::{Path, PathBuf};

use aya::maps::{MapInfo, MapType};

use crate::abi::{
    AuthKey, AuthValue, Conn, Endpoint, FlowKey4, FlowKey6, IpKey, PolicyKey, PolicyValue,
    Selected, TermKey, Verdict, VethKey, consts,
};
use crate::maps;

/// Why the pinned state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PinningError {
    /// A pinned map has another layout than this build's.
    #[error(
        "pinned map {path} is {found}, this build needs {expected}; another agent build with the same ABI version left it. Stop that agent or remove {dir} (enforcement on this node pauses until the agent recreates it)"
    )]
    Layout {
        /// The pin.
        path: PathBuf,
        /// What the pin holds.
        found: String,
        /// What this build needs.
        expected: String,
        /// The version directory.
        dir: PathBuf,
    },
    /// A pin exists but cannot be opened.
    #[error(
        "cannot open pinned map {path}: {source}; is {path} on a bpffs, and is the agent root?"
    )]
    Open {
        /// The pin.
        path: PathBuf,
        /// aya's error.
        source: aya::maps::MapError,
    },
    /// bpffs or the pin directory cannot be set up.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A map's shape as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    /// The map type.
    pub map_type: MapType,
    /// Key size in bytes.
    pub key: u32,
    /// Value size in bytes.
    pub value: u32,
    /// Capacity (bytes for the ring buffer).
    pub max_entries: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} key {} B value {} B max {}",
            self.map_type, self.key, self.value, self.max_entries
        )
    }
}

const fn size<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// The layout every map of this build has.
pub fn expected(name: &str) -> Option<Layout> {
    let l = |map_type, key, value, max_entries: u64| {
        Some(Layout {
            map_type,
            key,
            value,
            max_entries: max_entries as u32,
        })
    };
    match name {
        maps::EP_IP => l(
            MapType::Hash,
            size::<IpKey>(),
            size::<Endpoint>(),
            consts::TS_MAX_ENDPOINTS,
        ),
        maps::EP_CGROUP => l(
            MapType::Hash,
            8,
            size::<Endpoint>(),
            consts::TS_MAX_ENDPOINTS,
        ),
        maps::POLICY => l(
            MapType::Hash,
            size::<PolicyKey>(),
            size::<PolicyValue>(),
            consts::TS_MAX_POLICY,
        ),
        maps::SELECTED => l(
            MapType::Hash,
            4,
            size::<Selected>(),
            consts::TS_MAX_SELECTED,
        ),
        maps::AUTH => l(
            MapType::Hash,
            size::<AuthKey>(),
            size::<AuthValue>(),
            consts::TS_MAX_AUTH,
        ),
        maps::EPOCH | maps::VERSION => l(MapType::Array, 4, 8, 1),
        maps::CACHE_KEY => l(MapType::Array, 4, 8, 4),
        maps::VERDICTS4 => l(
            MapType::LruHash,
            size::<FlowKey4>(),
            size::<Verdict>(),
            consts::TS_MAX_FLOWS,
        ),
        maps::VERDICTS6 => l(
            MapType::LruHash,
            size::<FlowKey6>(),
            size::<Verdict>(),
            consts::TS_MAX_FLOWS,
        ),
        maps::EVENTS => l(MapType::RingBuf, 0, 0, consts::TS_EVENTS_BYTES),
        maps::EVENT_LAST => l(
            MapType::LruHash,
            size::<AuthKey>(),
            8,
            consts::TS_MAX_EVENT_PAIRS,
        ),
        maps::COUNTERS => l(MapType::PerCpuArray, 4, 8, consts::TS_REASON_COUNT),
        maps::VETHS => l(MapType::Hash, 4, 4, consts::TS_MAX_VETHS),
        maps::VETH_IPS => l(MapType::Hash, size::<VethKey>(), 4, consts::TS_MAX_VETH_IPS),
        maps::CONNS => l(MapType::SkStorage, 4, size::<Conn>(), 0),
        maps::WAYPOINTED => l(
            MapType::Hash,
            size::<TermKey>(),
            4,
            consts::TS_MAX_WAYPOINTED,
        ),
        _ => None,
    }
}

/// The directory this build pins under: `<root>/v<ABI version>`.
pub fn version_dir(root: &Path) -> PathBuf {
    root.join(format!("v{}", crate::abi::ABI_VERSION))
}

/// Removes what agents of other map ABI versions pinned under `root`
/// (`<root>/v<N>` for every N but this build's): their links detach, so
/// their programs, which would keep enforcing from maps nobody updates,
/// stop. Call it once this build's programs are attached and in sync.
/// Returns the directories removed.
pub fn remove_other_versions(root: &Path) -> Result<Vec<PathBuf>, std::io::Error> {
    let own = version_dir(root);
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let is_version = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('v'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if is_version && path != own {
            std::fs::remove_dir_all(&path)?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Checks every map already pinned in `dir` against this build; returns the
/// names of those that will be reused.
pub fn check_pinned(dir: &Path) -> Result<Vec<&'static str>, PinningError> {
    let mut reused = Vec::new();
    for name in maps::ALL {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| PinningError::Open {
            path: path.clone(),
            source,
        })?;
        let found = Layout {
            map_type: info.map_type().unwrap_or(MapType::Unspecified),
            key: info.key_size(),
            value: info.value_size(),
            max_entries: info.max_entries(),
        };
        let Some(want) = expected(name) else { continue };
        if found != want {
            return Err(PinningError::Layout {
                path,
                found: found.to_string(),
                expected: want.to_string(),
                dir: dir.to_owned(),
            });
        }
        reused.push(*name);
    }
    Ok(reused)
}

/// True when `path` is a mounted bpffs (per /proc/self/mounts).
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, at, kind) = (fields.next(), fields.next(), fields.next());
        kind == Some("bpf") && at.map(Path::new) == Some(path)
    })
}

/// Mounts bpffs at `mount_point` unless one is there already (many hosts do
/// not mount it by default).
pub fn ensure_bpffs(mount_point: &Path) -> Result<(), PinningError> {
    if is_bpffs(mount_point) {
        return Ok(());
    }
    let io = |what, source| PinningError::Io {
        what,
        path: mount_point.to_owned(),
        source,
    };
    std::fs::create_dir_all(mount_point).map_err(|e| io("cannot create", e))?;
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(mount_point)
        .status()
        .map_err(|e| io("cannot run mount(8) for bpffs at", e))?;
    if !status.success() || !is_bpffs(mount_point) {
        return Err(io(
            "cannot mount bpffs at",
            std::io::Error::other(format!(
                "mount exited with {status}; the agent must run as root"
            )),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_versions_are_removed_and_this_one_and_strangers_kept() {
        let root = tempfile::tempdir().unwrap();
        let own = version_dir(root.path());
        for dir in [
            own.join("links"),
            root.path().join("v1/links"),
            root.path().join("vmine"),
        ] {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let removed = remove_other_versions(root.path()).unwrap();
        assert_eq!(removed, [root.path().join("v1")]);
        assert!(own.join("links").is_dir() && root.path().join("vmine").is_dir());
        assert!(
            remove_other_versions(&root.path().join("absent"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn every_map_has_an_expected_layout_and_the_dir_names_the_version() {
        for name in maps::ALL {
            assert!(expected(name).is_some(), "{name}");
        }
        assert_eq!(
            version_dir(Path::new("/sys/fs/bpf/tessera")),
            PathBuf::from(format!("/sys/fs/bpf/tessera/v{}", crate::abi::ABI_VERSION))
        );
    }
}
