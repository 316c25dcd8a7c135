//! The loaded eBPF object and typed access to its maps: what the agent, the
//! tests and the decision-cost benchmark write and read. Loading needs root
//! (CAP_BPF).

use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, SockHash};
use aya::programs::links::{CgroupAttachMode, FdLink};
pub use aya::programs::sk_lookup::SkLookupLinkId;
use aya::programs::{
    CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, Iter, SkLookup, SockOps, TestRun,
    TestRunOptions,
};
use aya::{Ebpf, EbpfLoader};

use crate::abi::{
    AuthEvent, AuthFailure, AuthKey, AuthValue, Endpoint, FlowKey4, FlowKey6, IpKey, PolicyKey,
    PolicyValue, Reason, Revoked, Selected, TermKey, Verdict,
};
use crate::kfuncs::{self, KfuncError};
use crate::pinning::{self, PinningError};
use crate::{maps, programs};

/// Why loading the data path or touching its maps failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// Loading the object failed.
    #[error("cannot load the eBPF object: {0}; run as root (CAP_BPF)")]
    Load(#[from] aya::EbpfError),
    /// A program operation failed (the verifier's log is in the message).
    #[error("eBPF program error: {0}; run as root (CAP_BPF)")]
    Program(#[from] aya::programs::ProgramError),
    /// A map operation failed.
    #[error("eBPF map error: {0}")]
    Map(#[from] aya::maps::MapError),
    /// A program or map is missing from the object.
    #[error("{0} is missing from the eBPF object; was it built from another bpf/ tree?")]
    Missing(&'static str),
    /// A program link cannot be pinned.
    #[error("eBPF link error: {0}")]
    Link(#[from] aya::programs::links::LinkError),
    /// The pinned maps cannot be reused.
    #[error(transparent)]
    Pinning(#[from] PinningError),
    /// The object's kfunc calls could not be resolved.
    #[error(transparent)]
    Kfunc(#[from] KfuncError),
    /// Running the revocation iterator failed.
    #[error("cannot run ts_revoke: {0}")]
    Revoke(std::io::Error),
    /// The kernel gave no random bytes.
    #[error(
        "cannot duplicate the event ring buffer's descriptor: {0}; is the process out of file descriptors (ulimit -n)?"
    )]
    EventsFd(std::io::Error),

    #[error("cannot read random bytes for the auth cache key: {0}")]
    Random(std::io::Error),
    /// A cgroup or pin path cannot be used.
    #[error("{what} {path}: {source}")]
    Path {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The data-path object with its programs loaded (attached only by
/// [`Datapath::attach`]).
///
/// Every method that changes a map the ingress decision reads writes a new
/// inputs version afterwards (`ts_version`), which retires every cached
/// verdict: callers cannot forget to. The verdict cache is on where the CPU
/// orders stores and loads as the version protocol needs without barriers
/// (x86-64); elsewhere the version stays 0, which keeps the cache off.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    reused: Vec<&'static str>,
    cache: bool,
    last_version: u64,
    /// `ts_from_pod` links by interface, when they are not pinned.
    veth_links: std::collections::HashMap<u32, FdLink>,
    /// Whether `ts_revoke` is loaded (the kernel has bpf_sock_destroy).
    revoke: bool,
    /// Changes this value made to the decision inputs.
    changes: u64,
    /// Those of them that may take away what an established connection
    /// rests on: a removal, a replaced value, a new epoch, a failed
    /// handshake (see [`Datapath::narrowings`]).
    narrowings: u64,
    /// The event ring buffer, mapped once at its first read (mapping it for
    /// every poll cost the agent about 50 ms of CPU a second: mmap, munmap
    /// and their TLB shootdowns every 2 ms).
    events: Option<RingBuf<MapData>>,
}

mod veths;

/// Whether the verdict cache is used on this architecture (see [`Datapath`]).
pub const VERDICT_CACHE_SUPPORTED: bool = cfg!(target_arch = "x86_64");

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("reused", &self.reused)
            .finish()
    }
}

fn path_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError {
    let path = path.to_owned();
    move |source| DatapathError::Path { what, path, source }
}

impl Datapath {
    /// Loads [`crate::OBJECT`] and its programs into the kernel, with private
    /// maps (for tests and benchmarks).
    pub fn load() -> Result<Datapath, DatapathError> {
        Self::open(None)
    }

    /// Loads the object with its maps pinned in `pin_dir` (a versioned
    /// directory on bpffs, see [`crate::pinning::version_dir`]): maps already
    /// pinned there are checked against this build and reused with their
    /// entries, missing ones are created and pinned.
    pub fn open(pin_dir: Option<&Path>) -> Result<Datapath, DatapathError> {
        let mut loader = EbpfLoader::new();
        let mut reused = Vec::new();
        let mut paths = Vec::new();
        if let Some(dir) = pin_dir {
            std::fs::create_dir_all(dir).map_err(path_err("cannot create", dir))?;
            reused = pinning::check_pinned(dir)?;
            paths = maps::ALL.iter().map(|m| (*m, dir.join(m))).collect();
        }
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let btf = aya::Btf::from_sys_fs().ok();
        let (object, resolved) = kfuncs::resolve(crate::OBJECT, btf.as_ref())?;
        let mut ebpf = loader.load(object.bytes())?;
        let prog: &mut CgroupSkb = ebpf
            .program_mut(programs::INGRESS)
            .ok_or(DatapathError::Missing(programs::INGRESS))?
            .try_into()?;
        prog.load()?;
        for name in [programs::CONNECT4, programs::CONNECT6] {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing(name))?
                .try_into()?;
            prog.load()?;
        }
        let prog: &mut SkLookup = ebpf
            .program_mut(programs::STEER)
            .ok_or(DatapathError::Missing(programs::STEER))?
            .try_into()?;
        prog.load()?;
        let prog: &mut aya::programs::tc::SchedClassifier = ebpf
            .program_mut(programs::FROM_POD)
            .ok_or(DatapathError::Missing(programs::FROM_POD))?
            .try_into()?;
        prog.load()?;
        let prog: &mut SockOps = ebpf
            .program_mut(programs::ESTABLISHED)
            .ok_or(DatapathError::Missing(programs::ESTABLISHED))?
            .try_into()?;
        prog.load()?;
        let revoke = match (&btf, resolved.missing.is_empty()) {
            (Some(btf), true) => {
                let prog: &mut Iter = ebpf
                    .program_mut(programs::REVOKE)
                    .ok_or(DatapathError::Missing(programs::REVOKE))?
                    .try_into()?;
                prog.load("tcp", btf)?;
                true
            }
            _ => false,
        };
        let mut dp = Datapath {
            ebpf,
            pin_dir: pin_dir.map(Path::to_owned),
            reused,
            cache: VERDICT_CACHE_SUPPORTED,
            last_version: 0,
            veth_links: std::collections::HashMap::new(),
            revoke,
            changes: 0,
            narrowings: 0,
            events: None,
        };
        // Whatever a previous agent cached was decided on maps this one has
        // not checked yet.
        dp.new_version()?;
        Ok(dp)
    }

    /// The maps that were found pinned and reused (with their entries).
    pub fn reused_maps(&self) -> &[&'static str] {
        &self.reused
    }

    /// Attaches the ingress check and the connect gates to the cgroup at
    /// `cgroup` (the parent of the pods' cgroups), next to any other programs
    /// there. With a pin directory the links are pinned under `links/`,
    /// replacing (and so detaching) those of a previous agent only once the
    /// new ones are attached: enforcement has no gap. Without one, the links
    /// end with this value.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let fd = std::fs::File::open(cgroup).map_err(path_err("cannot open cgroup", cgroup))?;
        let links_dir = self.pin_dir.as_ref().map(|d| d.join("links"));
        if let Some(dir) = &links_dir {
            std::fs::create_dir_all(dir).map_err(path_err("cannot create", dir))?;
        }
        // With BPF links (kernel >= 5.7, which aya uses when it can) a cgroup
        // takes any number of links, and the kernel wants flags 0 (`Single`).
        let mut fd_links: Vec<(&'static str, FdLink)> = Vec::new();
        {
            let prog: &mut CgroupSkb = self
                .ebpf
                .program_mut(programs::INGRESS)
                .ok_or(DatapathError::Missing(programs::INGRESS))?
                .try_into()?;
            let id = prog.attach(&fd, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)?;
            if links_dir.is_some() {
                fd_links.push((programs::INGRESS, FdLink::try_from(prog.take_link(id)?)?));
            }
        }
        for name in [programs::CONNECT4, programs::CONNECT6] {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing(name))?
                .try_into()?;
            let id = prog.attach(&fd, CgroupAttachMode::Single)?;
            if links_dir.is_some() {
                fd_links.push((name, FdLink::try_from(prog.take_link(id)?)?));
            }
        }
        {
            let prog: &mut SockOps = self
                .ebpf
                .program_mut(programs::ESTABLISHED)
                .ok_or(DatapathError::Missing(programs::ESTABLISHED))?
                .try_into()?;
            let id = prog.attach(&fd, CgroupAttachMode::Single)?;
            if links_dir.is_some() {
                fd_links.push((
                    programs::ESTABLISHED,
                    FdLink::try_from(prog.take_link(id)?)?,
                ));
            }
        }
        let Some(dir) = links_dir else {
            return Ok(());
        };
        for (name, link) in fd_links {
            // bpffs refuses names with dots.
            let fresh = dir.join(format!("{name}_new"));
            let _ = std::fs::remove_file(&fresh);
            link.pin(&fresh).map_err(|e| DatapathError::Path {
                what: "cannot pin link",
                path: fresh.clone(),
                source: std::io::Error::other(format!("{e:?}")),
            })?;
            // The rename drops the old pin: the previous agent's link detaches
            // now, after the new one is in place.
            let path = dir.join(name);
            std::fs::rename(&fresh, &path)
                .map_err(path_err("cannot replace pinned link", &path))?;
        }
        Ok(())
    }

    /// How many changes this value made to the maps a decision reads (every
    /// one counts, whether or not the verdict cache is on): a caller that
    /// noted it can tell whether anything changed since.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// How many of [`Datapath::changes`] may have taken away what an
    /// established connection rests on (a removal, a value replaced by
    /// another, a new epoch, a failed handshake); the others only added
    /// entries, which ends no connection.
    pub fn narrowings(&self) -> u64 {
        self.narrowings
    }

    /// Inserts `value` under `key` in hash map `name`, counting a
    /// narrowing when it replaces another value.
    fn replace<K: aya::Pod, V: aya::Pod + PartialEq>(
        &mut self,
        name: &'static str,
        key: K,
        value: V,
    ) -> Result<(), DatapathError> {
        let mut map = self.hash::<K, V>(name)?;
        let old = get_missing_none(map.get(&key, 0))?;
        map.insert(key, value, 0)?;
        if old.is_some_and(|old| old != value) {
            self.narrowings += 1;
        }
        self.new_version()
    }

    /// Whether this kernel lets the agent reset established connections
    /// (`ts_revoke` needs the kfunc bpf_sock_destroy, Linux 6.5 or later).
    pub fn can_revoke(&self) -> bool {
        self.revoke
    }

    /// Runs `ts_revoke` over the TCP sockets of the calling thread's network
    /// namespace (the namespace is the one current when the run begins):
    /// every connection the data path admitted and no longer allows is reset.
    /// Returns what was reset; nothing when [`Datapath::can_revoke`] is false.
    pub fn revoke_here(&mut self) -> Result<Vec<Revoked>, DatapathError> {
        use std::io::Read;

        if !self.revoke {
            return Ok(Vec::new());
        }
        let prog: &mut Iter = self
            .ebpf
            .program_mut(programs::REVOKE)
            .ok_or(DatapathError::Missing(programs::REVOKE))?
            .try_into()?;
        let id = prog.attach()?;
        let mut run = prog.take_link(id)?.into_file()?;
        let mut out = Vec::new();
        run.read_to_end(&mut out).map_err(DatapathError::Revoke)?;
        Ok(Revoked::parse_all(&out))
    }

    /// Detaches pinned links and removes the pins under the pin directory
    /// (maps included): for uninstalling, never on a restart.
    pub fn remove_pins(dir: &Path) -> Result<(), DatapathError> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(path_err("cannot remove", dir)(e)),
        }
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf.map_mut(name).ok_or(DatapathError::Missing(name))
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, DatapathError> {
        Ok(HashMap::try_from(self.map(name)?)?)
    }

    fn steer_program(&mut self) -> Result<&mut SkLookup, DatapathError> {
        Ok(self
            .ebpf
            .program_mut(programs::STEER)
            .ok_or(DatapathError::Missing(programs::STEER))?
            .try_into()?)
    }

    /// Attaches the steering program (`ts_steer`) to the network namespace
    /// `netns` (an open `/proc/<pid>/ns/net`): its connections from outside
    /// the mesh to terminated ports go to the agent's terminator sockets.
    /// The attachment ends with this value, with [`Datapath::unsteer`], or
    /// when the namespace goes.
    pub fn steer(&mut self, netns: impl AsFd) -> Result<SkLookupLinkId, DatapathError> {
        Ok(self.steer_program()?.attach(netns)?)
    }

    /// Ends a [`Datapath::steer`] attachment.
    pub fn unsteer(&mut self, link: SkLookupLinkId) -> Result<(), DatapathError> {
        Ok(self.steer_program()?.detach(link)?)
    }

    /// Hands connections from outside the mesh to `key` (a local pod's
    /// address and port) to `socket`, a listening TCP socket in that pod's
    /// network namespace, and lets them through the ingress check.
    pub fn set_terminator(
        &mut self,
        key: TermKey,
        socket: &impl AsRawFd,
        cookie: u64,
    ) -> Result<(), DatapathError> {
        // Steering first: until the exemption is in, a steered connection
        // start is refused (fails closed), never let through to anyone else.
        let mut sockets: SockHash<&mut MapData, TermKey> =
            SockHash::try_from(self.map(maps::TERMINATORS)?)?;
        sockets.insert(key, socket.as_raw_fd(), 0)?;
        let exempt = self
            .hash::<u64, u32>(maps::TERMINATOR_SK)
            .and_then(|mut m| Ok(m.insert(cookie, 1, 0)?))
            .and_then(|()| {
                Ok(self
                    .hash::<TermKey, u32>(maps::TERMINATED)?
                    .insert(key, 1, 0)?)
            });
        if let Err(e) = exempt {
            let _ = self.remove_terminator(&key, cookie);
            return Err(e);
        }
        Ok(())
    }

    /// Stops terminating `key`; `cookie` is the socket's that terminated it.
    /// The steering goes first, then the ingress exemption.
    pub fn remove_terminator(&mut self, key: &TermKey, cookie: u64) -> Result<(), DatapathError> {
        let mut sockets: SockHash<&mut MapData, TermKey> =
            SockHash::try_from(self.map(maps::TERMINATORS)?)?;
        remove_missing_ok(sockets.remove(key))?;
        remove_missing_ok(self.hash::<TermKey, u32>(maps::TERMINATED)?.remove(key))?;
        remove_missing_ok(self.hash::<u64, u32>(maps::TERMINATOR_SK)?.remove(&cookie))?;
        Ok(())
    }

    /// Marks `key` (a local pod's address and port) as having HTTP rules:
    /// from now on `ts_ingress` refuses its connection starts unless they
    /// reach one of the agent's sockets (see [`Datapath::set_waypoint`]).
    /// Counted as a narrowing, and verdicts cached before no longer count.
    pub fn mark_waypointed(&mut self, key: TermKey) -> Result<(), DatapathError> {
        self.hash::<TermKey, u32>(maps::WAYPOINTED)?
            .insert(key, 1, 0)?;
        self.narrowings += 1;
        self.new_version()
    }

    /// Ends [`Datapath::mark_waypointed`] for `key`.
    pub fn unmark_waypointed(&mut self, key: &TermKey) -> Result<(), DatapathError> {
        remove_missing_ok(self.hash::<TermKey, u32>(maps::WAYPOINTED)?.remove(key))?;
        self.new_version()
    }

    /// Every key marked by [`Datapath::mark_waypointed`].
    pub fn waypointed(&mut self) -> Result<Vec<TermKey>, DatapathError> {
        Ok(self
            .hash::<TermKey, u32>(maps::WAYPOINTED)?
            .keys()
            .collect::<Result<_, _>>()?)
    }

    /// Hands every connection to `key` (a local pod's address and port with
    /// HTTP rules) to `socket`, the waypoint's listening TCP socket in that
    /// pod's network namespace, and lets them through the ingress check.
    pub fn set_waypoint(
        &mut self,
        key: TermKey,
        socket: &impl AsRawFd,
        cookie: u64,
    ) -> Result<(), DatapathError> {
        // The exemption first: a connection steered before it would be
        // refused (fails closed), never let through to anyone else.
        self.hash::<u64, u32>(maps::TERMINATOR_SK)?
            .insert(cookie, 1, 0)?;
        let steered = SockHash::<&mut MapData, TermKey>::try_from(self.map(maps::WAYPOINTS)?)
            .map_err(DatapathError::from)
            .and_then(|mut m| Ok(m.insert(key, socket.as_raw_fd(), 0)?));
        if let Err(e) = steered {
            let _ = self.remove_waypoint(&key, cookie);
            return Err(e);
        }
        Ok(())
    }

    /// Stops steering `key` to the waypoint socket with `cookie`; the key
    /// stays marked (see [`Datapath::unmark_waypointed`]).
    pub fn remove_waypoint(&mut self, key: &TermKey, cookie: u64) -> Result<(), DatapathError> {
        let mut sockets: SockHash<&mut MapData, TermKey> =
            SockHash::try_from(self.map(maps::WAYPOINTS)?)?;
        remove_missing_ok(sockets.remove(key))?;
        remove_missing_ok(self.hash::<u64, u32>(maps::TERMINATOR_SK)?.remove(&cookie))?;
        Ok(())
    }

    /// Sets who a pod address belongs to.
    pub fn set_endpoint_ip(&mut self, ip: IpAddr, ep: Endpoint) -> Result<(), DatapathError> {
        self.replace(maps::EP_IP, IpKey::from(ip), ep)
    }

    /// Forgets a pod address.
    pub fn remove_endpoint_ip(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        remove_missing_ok(
            self.hash::<IpKey, Endpoint>(maps::EP_IP)?
                .remove(&IpKey::from(ip)),
        )?;
        self.narrowings += 1;
        self.new_version()
    }

    /// Every pod address in the map with its endpoint.
    pub fn endpoint_ips(&mut self) -> Result<Vec<(IpKey, Endpoint)>, DatapathError> {
        Ok(self
            .hash::<IpKey, Endpoint>(maps::EP_IP)?
            .iter()
            .collect::<Result<_, _>>()?)
    }

    /// The endpoint of one pod address, if the map has it.
    pub fn endpoint_ip(&mut self, ip: IpAddr) -> Result<Option<Endpoint>, DatapathError> {
        get_missing_none(
            self.hash::<IpKey, Endpoint>(maps::EP_IP)?
                .get(&IpKey::from(ip), 0),
        )
    }

    /// The endpoint of one pod cgroup, if the map has it.
    pub fn endpoint_cgroup(&mut self, cgroup: u64) -> Result<Option<Endpoint>, DatapathError> {
        get_missing_none(self.hash::<u64, Endpoint>(maps::EP_CGROUP)?.get(&cgroup, 0))
    }

    /// Sets who a pod cgroup (by cgroup id) belongs to.
    pub fn set_endpoint_cgroup(&mut self, cgroup: u64, ep: Endpoint) -> Result<(), DatapathError> {
        self.replace(maps::EP_CGROUP, cgroup, ep)
    }

    /// Forgets a pod cgroup.
    pub fn remove_endpoint_cgroup(&mut self, cgroup: u64) -> Result<(), DatapathError> {
        remove_missing_ok(self.hash::<u64, Endpoint>(maps::EP_CGROUP)?.remove(&cgroup))?;
        self.narrowings += 1;
        self.new_version()
    }

    /// Every pod cgroup in the map with its endpoint.
    pub fn endpoint_cgroups(&mut self) -> Result<Vec<(u64, Endpoint)>, DatapathError> {
        Ok(self
            .hash::<u64, Endpoint>(maps::EP_CGROUP)?
            .iter()
            .collect::<Result<_, _>>()?)
    }

    /// Every identity with policy, with its flags.
    pub fn selected(&mut self) -> Result<Vec<(u32, u32)>, DatapathError> {
        self.hash::<u32, Selected>(maps::SELECTED)?
            .iter()
            .map(|r| r.map(|(k, v)| (k, v.flags)).map_err(Into::into))
            .collect()
    }

    /// Removes an identity's policy flags (it then has no policy).
    pub fn remove_selected(&mut self, local: u32) -> Result<(), DatapathError> {
        remove_missing_ok(self.hash::<u32, Selected>(maps::SELECTED)?.remove(&local))?;
        self.narrowings += 1;
        self.new_version()
    }

    /// Every ingress rule.
    pub fn rules(&mut self) -> Result<Vec<(PolicyKey, PolicyValue)>, DatapathError> {
        Ok(self
            .hash::<PolicyKey, PolicyValue>(maps::POLICY)?
            .iter()
            .collect::<Result<_, _>>()?)
    }

    /// Every recorded authentication.
    pub fn auths(&mut self) -> Result<Vec<(AuthKey, AuthValue)>, DatapathError> {
        Ok(self
            .hash::<AuthKey, AuthValue>(maps::AUTH)?
            .iter()
            .collect::<Result<_, _>>()?)
    }

    /// Removes an authentication.
    pub fn remove_auth(&mut self, key: &AuthKey) -> Result<(), DatapathError> {
        remove_missing_ok(self.hash::<AuthKey, AuthValue>(maps::AUTH)?.remove(key))?;
        self.narrowings += 1;
        self.new_version()
    }

    /// The global epoch.
    pub fn epoch(&mut self) -> Result<u64, DatapathError> {
        let map: Array<&mut MapData, u64> = Array::try_from(self.map(maps::EPOCH)?)?;
        Ok(map.get(&0, 0)?)
    }

    /// The auth cache's MAC key: 32 random bytes made on first use and kept
    /// in a map (pinned with the others), so the key outlives the agent but
    /// never lives in its state directory.
    pub fn cache_key(&mut self) -> Result<[u8; 32], DatapathError> {
        let mut map: Array<&mut MapData, u64> = Array::try_from(self.map(maps::CACHE_KEY)?)?;
        let mut words = [0u64; 4];
        for (i, word) in (0u32..).zip(words.iter_mut()) {
            *word = map.get(&i, 0)?;
        }
        if words.iter().all(|w| *w == 0) {
            let mut fresh = [0u8; 32];
            let mut filled = 0;
            while filled < fresh.len() {
                filled += rustix::rand::getrandom(
                    &mut fresh[filled..],
                    rustix::rand::GetRandomFlags::empty(),
                )
                .map_err(|e| DatapathError::Random(std::io::Error::from(e)))?;
            }
            for ((i, word), chunk) in (0u32..).zip(words.iter_mut()).zip(fresh.chunks_exact(8)) {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(chunk);
                *word = u64::from_le_bytes(bytes);
                map.set(i, *word, 0)?;
            }
        }
        let mut key = [0u8; 32];
        for (chunk, word) in key.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        Ok(key)
    }

    /// Sets which rule kinds exist for `local`, and default deny.
    pub fn set_selected(&mut self, local: u32, flags: u32) -> Result<(), DatapathError> {
        self.replace(maps::SELECTED, local, Selected { flags })
    }

    /// Sets one ingress rule.
    pub fn set_rule(&mut self, key: PolicyKey, value: PolicyValue) -> Result<(), DatapathError> {
        self.replace(maps::POLICY, key, value)
    }

    /// Removes one ingress rule.
    pub fn remove_rule(&mut self, key: &PolicyKey) -> Result<(), DatapathError> {
        remove_missing_ok(
            self.hash::<PolicyKey, PolicyValue>(maps::POLICY)?
                .remove(key),
        )?;
        self.narrowings += 1;
        self.new_version()
    }

    /// Records an authentication.
    pub fn set_auth(&mut self, key: AuthKey, value: AuthValue) -> Result<(), DatapathError> {
        self.replace(maps::AUTH, key, value)
    }

    /// Records that the agent's handshake for the pair failed: until
    /// `value.until_ns` the egress gate refuses its connections, and the
    /// next sweep ends those it holds.
    pub fn set_auth_failed(
        &mut self,
        key: AuthKey,
        value: AuthFailure,
    ) -> Result<(), DatapathError> {
        self.hash(maps::AUTH_FAILED)?.insert(key, value, 0)?;
        self.narrowings += 1;
        self.new_version()
    }

    /// Forgets a failed handshake (the pair authenticated since).
    pub fn remove_auth_failed(&mut self, key: &AuthKey) -> Result<(), DatapathError> {
        remove_missing_ok(
            self.hash::<AuthKey, AuthFailure>(maps::AUTH_FAILED)?
                .remove(key),
        )?;
        self.new_version()
    }

    /// Sets the global epoch (authentications of other epochs stop counting).
    pub fn set_epoch(&mut self, epoch: u64) -> Result<(), DatapathError> {
        let mut map: Array<&mut MapData, u64> = Array::try_from(self.map(maps::EPOCH)?)?;
        map.set(0, epoch, 0)?;
        self.narrowings += 1;
        self.new_version()
    }

    /// Writes a new inputs version (see [`Datapath`]): every cached verdict
    /// stops counting. Versions are CLOCK_MONOTONIC readings, strictly
    /// increasing per writer, so even two agents writing over each other
    /// (a restart overlapping its predecessor) never bring an old version
    /// back.
    fn new_version(&mut self) -> Result<(), DatapathError> {
        let version = if self.cache {
            crate::monotonic_ns().max(self.last_version.saturating_add(1))
        } else {
            0
        };
        let mut map: Array<&mut MapData, u64> = Array::try_from(self.map(maps::VERSION)?)?;
        map.set(0, version, 0)?;
        self.last_version = version;
        self.changes += 1;
        Ok(())
    }

    /// Turns the verdict cache on or off (it starts on where
    /// [`VERDICT_CACHE_SUPPORTED`]); turning it on elsewhere is refused
    /// silently. Off, every connection start gets the full decision (the
    /// decision-cost benchmark measures both).
    pub fn set_verdict_cache(&mut self, on: bool) -> Result<(), DatapathError> {
        self.cache = on && VERDICT_CACHE_SUPPORTED;
        self.new_version()
    }

    /// The inputs version cached verdicts must carry to count (0: the cache
    /// is off).
    pub fn inputs_version(&mut self) -> Result<u64, DatapathError> {
        let map: Array<&mut MapData, u64> = Array::try_from(self.map(maps::VERSION)?)?;
        Ok(map.get(&0, 0)?)
    }

    /// Every cached IPv4 verdict, current or not.
    pub fn cached_verdicts4(&mut self) -> Result<Vec<(FlowKey4, Verdict)>, DatapathError> {
        Ok(self
            .hash::<FlowKey4, Verdict>(maps::VERDICTS4)?
            .iter()
            .collect::<Result<_, _>>()?)
    }

    /// Every cached IPv6 verdict, current or not.
    pub fn cached_verdicts6(&mut self) -> Result<Vec<(FlowKey6, Verdict)>, DatapathError> {
        Ok(self
            .hash::<FlowKey6, Verdict>(maps::VERDICTS6)?
            .iter()
            .collect::<Result<_, _>>()?)
    }

    /// How many decisions had `reason`, summed over CPUs.
    pub fn counter(&mut self, reason: Reason) -> Result<u64, DatapathError> {
        let map: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(self.map(maps::COUNTERS)?)?;
        Ok(map.get(&(reason as u32), 0)?.iter().sum())
    }

    /// The event ring buffer, mapped on first use.
    fn events(&mut self) -> Result<&mut RingBuf<MapData>, DatapathError> {
        if self.events.is_none() {
            let map = self
                .ebpf
                .take_map(maps::EVENTS)
                .ok_or(DatapathError::Missing(maps::EVENTS))?;
            self.events = Some(RingBuf::try_from(map)?);
        }
        self.events
            .as_mut()
            .ok_or(DatapathError::Missing(maps::EVENTS))
    }

    /// A descriptor of the event ring buffer of its own, for epoll: readable
    /// when events wait (the programs wake a waiting reader once the reader
    /// has taken everything before), so a reader that drains with
    /// [`Datapath::take_events`] after each wake-up misses none.
    pub fn events_fd(&mut self) -> Result<OwnedFd, DatapathError> {
        self.events()?
            .as_fd()
            .try_clone_to_owned()
            .map_err(DatapathError::EventsFd)
    }

    /// Takes the events waiting in the ring buffer.
    pub fn take_events(&mut self) -> Result<Vec<AuthEvent>, DatapathError> {
        let ring = self.events()?;
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            out.extend(AuthEvent::parse(&item));
        }
        Ok(out)
    }

    /// Runs the ingress program `repeat` times on `packet` (Ethernet header
    /// first) with BPF_PROG_TEST_RUN: its return value (1 pass, 0 drop) and
    /// the kernel's mean time per run.
    pub fn test_ingress(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration), DatapathError> {
        let prog: &CgroupSkb = self
            .ebpf
            .program(programs::INGRESS)
            .ok_or(DatapathError::Missing(programs::INGRESS))?
            .try_into()?;
        let result = prog.test_run(TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..TestRunOptions::default()
        })?;
        Ok((result.return_value, result.duration))
    }
}

impl Datapath {
    /// Runs `ts_from_pod` once on `packet` (Ethernet header first) with
    /// BPF_PROG_TEST_RUN, as received on the loopback interface (index 1):
    /// its return value (0 pass, 2 drop).
    pub fn test_from_pod(&self, packet: &[u8]) -> Result<u32, DatapathError> {
        let prog: &aya::programs::tc::SchedClassifier = self
            .ebpf
            .program(programs::FROM_POD)
            .ok_or(DatapathError::Missing(programs::FROM_POD))?
            .try_into()?;
        let result = prog.test_run(TestRunOptions {
            data_in: Some(packet),
            ..TestRunOptions::default()
        })?;
        Ok(result.return_value)
    }
}

/// The id the kernel gives the cgroup at `path` (cgroup v2: its inode
/// number), as `bpf_get_current_cgroup_id` reports it.
pub fn cgroup_id(path: &Path) -> Result<u64, DatapathError> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .map_err(path_err("cannot stat cgroup", path))?
        .ino())
}

/// A removal of an entry that is already gone is not an error.
fn remove_missing_ok(result: Result<(), aya::maps::MapError>) -> Result<(), DatapathError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        // aya reports a hash map removal of a missing key as the syscall's
        // ENOENT.
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) =>
        {
            Ok(())
        }
        other => Ok(other?),
    }
}

fn get_missing_none<V>(result: Result<V, aya::maps::MapError>) -> Result<Option<V>, DatapathError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        other => Ok(Some(other?)),
    }
}
