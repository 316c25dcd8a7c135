//! Pods' network namespaces as the agent reaches them: through a process of
//! the pod (its cgroup's), and on a thread that entered the namespace; and
//! what rtnetlink says inside one (see [`rtnetlink`]).

pub mod rtnetlink;

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Why a pod's network namespace could not be had.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// No process of the pod was found to enter its network namespace.
    #[error("no process found in the pod's cgroup {0} (is the pod running?)")]
    NoProcess(PathBuf),
    /// The pod shares the host's network namespace.
    #[error("the pod runs in the host's network namespace")]
    HostNetwork,
    /// Opening or reading the namespace failed.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A pod's network namespace, held open.
#[derive(Debug)]
pub struct PodNetns {
    /// The namespace file (`/proc/<pid>/ns/net` of a pod process).
    pub file: File,
    /// Its inode: a recreated sandbox has another.
    pub inode: u64,
}

/// The inode of a network namespace file.
pub fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// The inode of the agent's own network namespace.
pub fn own_inode() -> Option<u64> {
    inode(Path::new("/proc/self/ns/net"))
}

/// A process of the pod (in its cgroup or one below, at most 3 levels).
pub fn pod_process(cgroup: &Path) -> Option<u32> {
    let mut level = vec![cgroup.to_owned()];
    for _ in 0..4 {
        let mut next = Vec::new();
        for dir in level {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs"))
                && let Some(pid) = procs.lines().find_map(|l| l.trim().parse::<u32>().ok())
            {
                return Some(pid);
            }
            if let Ok(read) = std::fs::read_dir(&dir) {
                next.extend(
                    read.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        level = next;
    }
    None
}

/// The inode of the network namespace of the pod in `cgroup`, now.
pub fn pod_inode(cgroup: &Path) -> Option<u64> {
    let pid = pod_process(cgroup)?;
    inode(Path::new(&format!("/proc/{pid}/ns/net")))
}

/// Opens the network namespace of the pod whose cgroup is `cgroup`; refuses
/// the host's own.
pub fn open_pod(cgroup: &Path) -> Result<PodNetns, NetnsError> {
    let pid = pod_process(cgroup).ok_or_else(|| NetnsError::NoProcess(cgroup.to_owned()))?;
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let open = |source| NetnsError::Open {
        path: path.clone(),
        source,
    };
    let file = File::open(&path).map_err(open)?;
    let inode = {
        use std::os::unix::fs::MetadataExt;
        file.metadata().map_err(open)?.ino()
    };
    if Some(inode) == own_inode() {
        return Err(NetnsError::HostNetwork);
    }
    Ok(PodNetns { file, inode })
}

/// Runs `f(i)` in each network namespace `namespaces[i]` in turn, on one
/// thread that enters them one after the other (a thread per namespace
/// would cost a thread, and with glibc often a malloc arena, each time):
/// each call's result, or the error entering its namespace.
pub fn run_in_each<T: Send>(
    namespaces: &[&File],
    f: impl Fn(usize) -> std::io::Result<T> + Sync,
) -> Vec<std::io::Result<T>> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                namespaces
                    .iter()
                    .enumerate()
                    .map(|(i, netns)| {
                        rustix::thread::move_into_link_name_space(
                            netns.as_fd(),
                            Some(rustix::thread::LinkNameSpaceType::Network),
                        )?;
                        f(i)
                    })
                    .collect()
            })
            .join()
            .unwrap_or_else(|_| {
                namespaces
                    .iter()
                    .map(|_| Err(std::io::Error::other("the namespace thread panicked")))
                    .collect()
            })
    })
}

/// Runs `f` on a thread that has entered the network namespace `netns`:
/// sockets it creates belong to that namespace.
pub fn run_in<T: Send>(
    netns: &File,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                rustix::thread::move_into_link_name_space(
                    netns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    })
}

/// A TCP connection to `addr` made in the network namespace `netns` (the
/// dial on a thread of its own; the stream registered with the calling
/// runtime), failing after `timeout`.
pub async fn connect_in(
    netns: std::sync::Arc<File>,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let stream = tokio::task::spawn_blocking(move || {
        run_in(&netns, || {
            let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
    })
    .await
    .map_err(std::io::Error::other)??;
    tokio::net::TcpStream::from_std(stream)
}
