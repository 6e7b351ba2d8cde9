//! Loading the eBPF object, attaching its programs, and talking to its maps.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use agent_common::{
    CidrKeyData, InboundConfig, NetnsConfig, OrigDst, PortKey, PortRule, SockKey, counter, flags,
    maps, programs,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, SockHash, SockMap,
        lpm_trie::Key,
    },
    programs::{CgroupSockAddr, CgroupSockopt, FExit, ProgramError, SkLookup, SkMsg, SockOps},
};

use crate::rules::CaptureRules;

/// The eBPF object built by `agent/build.rs` (empty when built without it).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this binary was built without its eBPF object: build it with `cargo xtask build` (plain `cargo build` writes an empty stub)"
    )]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("aya-log: {0}")]
    Log(#[from] aya_log::Error),
    #[error("attaching {hook} to {target}: {source}")]
    Link {
        hook: &'static str,
        target: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pins(#[from] crate::pins::PinError),
}

/// Which hooks a [`Datapath`] attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    GetPeerName4,
    SockOps,
    SkMsg,
    GetSockopt,
    SkLookup,
}

impl Hook {
    pub const ALL: [Self; 6] = [
        Self::Connect4,
        Self::GetPeerName4,
        Self::SockOps,
        Self::SkMsg,
        Self::GetSockopt,
        Self::SkLookup,
    ];

    #[must_use]
    pub const fn program(self) -> &'static str {
        match self {
            Self::Connect4 => programs::CONNECT4,
            Self::GetPeerName4 => programs::GETPEERNAME4,
            Self::SockOps => programs::SOCKOPS,
            Self::SkMsg => programs::SK_MSG,
            Self::GetSockopt => programs::GETSOCKOPT,
            Self::SkLookup => programs::SK_LOOKUP,
        }
    }
}

/// The loaded object and what it attached.
///
/// Unpinned (`pin_dir: None`), dropping it detaches everything and frees
/// the maps. Pinned, maps and links live in the pin directory and outlive
/// the process: dropping it leaves them running (for a successor to
/// adopt); [`Datapath::teardown`] removes them.
pub struct Datapath {
    ebpf: Ebpf,
    /// Taken out of `ebpf` at load: the sk_msg attachment needs its fd.
    sockets: SockHash<MapData, SockKey>,
    /// Every link we created or adopted (closing an unpinned one detaches).
    links: Vec<AttachedLink>,
    pins: Option<Pins>,
    /// Link pin names this datapath created or adopted.
    claimed: Vec<String>,
    sk_msg_attached: bool,
    /// Why the recvmsg fexit (sk_msg backpressure) could not load, if it
    /// could not: the short-circuit must then stay off.
    recvmsg_unavailable: Option<String>,
    /// The recvmsg fexit's link, when we attached it (dropping an unpinned
    /// one detaches it).
    recvmsg_link: Option<RecvmsgLink>,
}

/// How the loader sets the object up.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// The programs' aya-log debug lines (off: they cost per event).
    pub debug_logs: bool,
    /// How far a short-circuited socket's reader may fall behind, in bytes,
    /// before its sender switches to TCP.
    pub sockmap_queue_limit: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            debug_logs: false,
            sockmap_queue_limit: agent_common::globals::SOCKMAP_QUEUE_LIMIT_DEFAULT,
        }
    }
}

/// The recvmsg fexit's link, held so it stays attached.
#[derive(Debug)]
enum RecvmsgLink {
    Unpinned(#[allow(dead_code)] aya::programs::links::FdLink),
    Pinned(#[allow(dead_code)] aya::programs::links::PinnedLink),
    /// Pinned by an earlier agent of the same layout: its program uses the
    /// same (pinned) maps, so it stays as it is.
    Adopted,
}

/// One hook's bpf_link.
#[derive(Debug)]
pub struct AttachedLink {
    pub hook: Hook,
    /// Where it is attached, for messages and `status`.
    pub target: PathBuf,
    /// Pinned from an earlier agent and now running our program.
    pub adopted: bool,
    /// Holding it keeps an unpinned link attached.
    _fd: std::os::fd::OwnedFd,
}

#[derive(Debug)]
struct Pins {
    dir: PathBuf,
    /// The directory held a datapath already: its maps are ours now.
    adopted: bool,
}

fn program_err(name: &'static str) -> impl FnOnce(ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, source }
}

fn open_cgroup(path: &Path) -> Result<File, EbpfError> {
    File::open(path).map_err(|source| EbpfError::Cgroup {
        path: path.to_owned(),
        source,
    })
}

impl Hook {
    /// The kernel attach type.
    #[must_use]
    pub const fn attach_type(self) -> u32 {
        use crate::bpf_sys::attach_type as at;
        match self {
            Self::Connect4 => at::CGROUP_INET4_CONNECT,
            Self::GetPeerName4 => at::CGROUP_INET4_GETPEERNAME,
            Self::SockOps => at::CGROUP_SOCK_OPS,
            Self::SkMsg => at::SK_MSG_VERDICT,
            Self::GetSockopt => at::CGROUP_GETSOCKOPT,
            Self::SkLookup => at::SK_LOOKUP,
        }
    }
}

impl Datapath {
    /// Loads the maps and verifies every program. With `pin_dir`, the maps
    /// are pinned there, or, if a datapath of the same layout is pinned
    /// there already, adopted with their contents. The recvmsg fexit may
    /// fail to load (no BTF trampolines): see [`Self::backpressure`].
    pub fn load(opts: &LoadOptions, pin_dir: Option<&Path>) -> Result<Self, EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::NoObject);
        }
        let level: u8 = if opts.debug_logs {
            aya_log::Level::Debug as u8
        } else {
            aya_log::Level::Warn as u8
        };
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &level, false);
        loader.override_global(
            agent_common::globals::SOCKMAP_QUEUE_LIMIT,
            &opts.sockmap_queue_limit,
            true,
        );
        let pins = match pin_dir {
            Some(dir) => {
                let adopted = dir.join(maps::NETNS_CONFIG).exists();
                crate::pins::create_dir(dir)?;
                Some(Pins {
                    dir: dir.to_owned(),
                    adopted,
                })
            }
            None => None,
        };
        let names = match &pins {
            Some(_) => crate::pins::pinned_map_names(OBJECT)?,
            None => Vec::new(),
        };
        let paths: Vec<(String, PathBuf)> = match &pins {
            Some(p) => names.iter().map(|n| (n.clone(), p.dir.join(n))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &paths {
            loader.map_pin_path(name.as_str(), path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;
        let e = &mut ebpf;
        for name in [programs::CONNECT4, programs::GETPEERNAME4] {
            prog_mut::<CgroupSockAddr>(e, name)?
                .load()
                .map_err(program_err(name))?;
        }
        prog_mut::<SockOps>(e, programs::SOCKOPS)?
            .load()
            .map_err(program_err(programs::SOCKOPS))?;
        prog_mut::<SkMsg>(e, programs::SK_MSG)?
            .load()
            .map_err(program_err(programs::SK_MSG))?;
        prog_mut::<CgroupSockopt>(e, programs::GETSOCKOPT)?
            .load()
            .map_err(program_err(programs::GETSOCKOPT))?;
        prog_mut::<SkLookup>(e, programs::SK_LOOKUP)?
            .load()
            .map_err(program_err(programs::SK_LOOKUP))?;
        let recvmsg_unavailable = aya::Btf::from_sys_fs()
            .map_err(|e| format!("kernel BTF: {e}"))
            .and_then(|btf| {
                prog_mut::<FExit>(e, programs::RECVMSG)
                    .map_err(|e| e.to_string())?
                    .load(programs::RECVMSG_TARGET, &btf)
                    .map_err(|e| {
                        format!(
                            "fexit on {}: {}",
                            programs::RECVMSG_TARGET,
                            crate::doctor::verifier_verdict(&e.to_string())
                        )
                    })
            })
            .err();
        let map = ebpf.take_map(maps::SOCKETS).ok_or(EbpfError::Missing {
            kind: "map",
            name: maps::SOCKETS,
        })?;
        let sockets = SockHash::try_from(map).map_err(|source| EbpfError::Map {
            name: maps::SOCKETS,
            source,
        })?;
        Ok(Self {
            ebpf,
            sockets,
            links: Vec::new(),
            pins,
            claimed: Vec::new(),
            sk_msg_attached: false,
            recvmsg_unavailable,
            recvmsg_link: None,
        })
    }

    /// `Err(why)` when the sk_msg backpressure (the recvmsg fexit) cannot
    /// run on this kernel: the short-circuit must stay off then.
    pub fn backpressure(&self) -> Result<(), &str> {
        self.recvmsg_unavailable.as_deref().map_or(Ok(()), Err)
    }

    /// Attaches the recvmsg fexit (global: it counts reads on every socket
    /// that has our state). Pinned: an earlier agent's pinned link of the
    /// same layout already counts into these same maps, and is kept.
    pub fn attach_recvmsg(&mut self) -> Result<(), EbpfError> {
        let pin_name = format!("link-{}", programs::RECVMSG);
        let link_err = |source: std::io::Error| EbpfError::Link {
            hook: programs::RECVMSG,
            target: PathBuf::from(programs::RECVMSG_TARGET),
            source,
        };
        if let Some(why) = &self.recvmsg_unavailable {
            return Err(link_err(std::io::Error::other(why.clone())));
        }
        let pin = self.pins.as_ref().map(|p| p.dir.join(&pin_name));
        self.claimed.push(pin_name);
        if pin.as_ref().is_some_and(|p| p.exists()) {
            self.recvmsg_link = Some(RecvmsgLink::Adopted);
            return Ok(());
        }
        let prog = prog_mut::<FExit>(&mut self.ebpf, programs::RECVMSG)?;
        let id = prog.attach().map_err(program_err(programs::RECVMSG))?;
        let link: aya::programs::links::FdLink = prog
            .take_link(id)
            .map_err(program_err(programs::RECVMSG))?
            .into();
        self.recvmsg_link = Some(match pin {
            Some(path) => RecvmsgLink::Pinned(
                link.pin(&path)
                    .map_err(|e| link_err(std::io::Error::other(e.to_string())))?,
            ),
            None => RecvmsgLink::Unpinned(link),
        });
        Ok(())
    }

    /// Whether the maps (and links) of an earlier agent were adopted.
    #[must_use]
    pub fn adopted(&self) -> bool {
        self.pins.as_ref().is_some_and(|p| p.adopted)
    }

    /// The pin directory, if pinned.
    #[must_use]
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.dir.as_path())
    }

    /// What is attached.
    #[must_use]
    pub fn links(&self) -> &[AttachedLink] {
        &self.links
    }

    /// Starts forwarding the programs' aya-log records to `log` (and so to
    /// tracing). The caller polls the returned logger's fd and flushes it.
    pub fn take_logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, EbpfError> {
        Ok(aya_log::EbpfLogger::init(&mut self.ebpf)?)
    }

    fn program_fd(&self, hook: Hook) -> Result<std::os::fd::BorrowedFd<'_>, EbpfError> {
        use std::os::fd::AsFd as _;
        let name = hook.program();
        let prog = self.ebpf.program(name).ok_or(EbpfError::Missing {
            kind: "program",
            name,
        })?;
        Ok(prog.fd().map_err(program_err(name))?.as_fd())
    }

    /// Attaches `hook` to `target` (a cgroup or netns fd) with a bpf_link,
    /// which multi-attaches and never replaces another tool's program.
    /// Pinned: if an earlier agent's link for the same hook and target is
    /// pinned, our program replaces its program atomically instead (no
    /// moment without the hook, and no second program).
    fn attach_link(
        &mut self,
        hook: Hook,
        target: &File,
        target_path: &Path,
        pin_name: &str,
    ) -> Result<(), EbpfError> {
        let link_err = |source| EbpfError::Link {
            hook: hook.program(),
            target: target_path.to_owned(),
            source,
        };
        let pin = self.pins.as_ref().map(|p| p.dir.join(pin_name));
        self.claimed.push(pin_name.to_owned());
        if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
            let fd = crate::bpf_sys::obj_get(pin).map_err(link_err)?;
            crate::bpf_sys::link_update(&fd, self.program_fd(hook)?).map_err(link_err)?;
            self.links.push(AttachedLink {
                hook,
                target: target_path.to_owned(),
                adopted: true,
                _fd: fd,
            });
            return Ok(());
        }
        let fd = crate::bpf_sys::link_create(self.program_fd(hook)?, target, hook.attach_type())
            .map_err(link_err)?;
        if let Some(pin) = &pin {
            crate::bpf_sys::obj_pin(&fd, pin).map_err(link_err)?;
        }
        self.links.push(AttachedLink {
            hook,
            target: target_path.to_owned(),
            adopted: false,
            _fd: fd,
        });
        Ok(())
    }

    /// Attaches `hook` to the cgroup at `path`. Not for [`Hook::SkMsg`]
    /// (the socket map) or [`Hook::SkLookup`] (a netns).
    pub fn attach_cgroup(&mut self, hook: Hook, path: &Path) -> Result<(), EbpfError> {
        use std::os::unix::fs::MetadataExt as _;
        assert!(
            !matches!(hook, Hook::SkMsg | Hook::SkLookup),
            "{hook:?} does not attach to a cgroup"
        );
        let cgroup = open_cgroup(path)?;
        let ino = cgroup
            .metadata()
            .map_err(|source| EbpfError::Cgroup {
                path: path.to_owned(),
                source,
            })?
            .ino();
        self.attach_link(
            hook,
            &cgroup,
            path,
            &format!("link-{}-cgroup-{ino}", hook.program()),
        )
    }

    /// Attaches the sk_lookup program to a network namespace.
    pub fn attach_sk_lookup(&mut self, netns: &crate::netns::Netns) -> Result<(), EbpfError> {
        let file = File::open(netns.path()).map_err(|source| EbpfError::Link {
            hook: Hook::SkLookup.program(),
            target: netns.path().to_owned(),
            source,
        })?;
        self.attach_link(
            Hook::SkLookup,
            &file,
            netns.path(),
            &format!("link-{}", Hook::SkLookup.program()),
        )
    }

    /// Attaches the sk_msg program to the SOCKHASH (this replaces whatever
    /// program an earlier agent attached there; sockets already in the map
    /// keep the program they were inserted with).
    pub fn attach_sk_msg(&mut self) -> Result<(), EbpfError> {
        use std::os::fd::AsFd as _;
        crate::bpf_sys::prog_attach(
            self.program_fd(Hook::SkMsg)?,
            self.sockets.fd().as_fd(),
            Hook::SkMsg.attach_type(),
            0,
        )
        .map_err(|source| EbpfError::Link {
            hook: Hook::SkMsg.program(),
            target: PathBuf::from(maps::SOCKETS),
            source,
        })?;
        self.sk_msg_attached = true;
        Ok(())
    }

    /// Removes pinned links an earlier agent left that this one did not
    /// claim (a hook it attaches elsewhere now, e.g. because the agent runs
    /// in another cgroup): otherwise both would run. Call after attaching.
    pub fn prune_unclaimed_links(&mut self) -> Result<Vec<PathBuf>, EbpfError> {
        let Some(p) = &self.pins else {
            return Ok(Vec::new());
        };
        let claimed: Vec<String> = self.claimed.clone();
        let mut removed = Vec::new();
        let entries = std::fs::read_dir(&p.dir).map_err(|source| EbpfError::Cgroup {
            path: p.dir.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("link-") && !claimed.contains(&name) {
                std::fs::remove_file(e.path()).map_err(|source| EbpfError::Cgroup {
                    path: e.path(),
                    source,
                })?;
                removed.push(e.path());
            }
        }
        Ok(removed)
    }

    /// Removes everything: links detach, pins go, the maps are freed once
    /// nothing holds them. (Dropping an unpinned datapath does the same.)
    pub fn teardown(mut self) -> Result<(), EbpfError> {
        use std::os::fd::AsFd as _;
        if self.sk_msg_attached {
            // Best effort: the map is about to go anyway.
            let _ = crate::bpf_sys::prog_detach(
                self.program_fd(Hook::SkMsg)?,
                self.sockets.fd().as_fd(),
                Hook::SkMsg.attach_type(),
            );
        }
        if let Some(p) = self.pins.take() {
            crate::pins::remove_instance(&p.dir)?;
        }
        drop(self);
        Ok(())
    }

    /// Tells sk_lookup which namespace it serves and how.
    pub fn set_inbound(&mut self, config: InboundConfig) -> Result<(), EbpfError> {
        let mut a: Array<_, InboundConfig> = self.map_mut(maps::INBOUND_CONFIG)?;
        a.set(0, config, 0).map_err(map_err(maps::INBOUND_CONFIG))
    }

    /// Puts the proxy's inbound listener where sk_lookup steers to.
    pub fn set_inbound_listener(
        &mut self,
        listener: &impl std::os::fd::AsFd,
    ) -> Result<(), EbpfError> {
        use std::os::fd::AsRawFd as _;
        let mut m: SockMap<_> = self.map_mut(maps::INBOUND_LISTENER)?;
        m.set(0, &listener.as_fd().as_raw_fd(), 0)
            .map_err(map_err(maps::INBOUND_LISTENER))
    }

    /// Replaces the capture rules of a namespace.
    pub fn set_rules(&mut self, netns_cookie: u64, rules: &CaptureRules) -> Result<(), EbpfError> {
        write_rules(&mut self.rule_maps()?, netns_cookie, rules)
    }

    fn rule_maps(&mut self) -> Result<RuleMaps<'_>, EbpfError> {
        let [a, b, c, d] = self.ebpf.maps_disjoint_mut([
            maps::OUT_CIDR_EXCLUDE,
            maps::OUT_CIDR_INCLUDE,
            maps::OUT_PORTS,
            maps::IN_PORTS,
        ]);
        let missing = |name| EbpfError::Missing { kind: "map", name };
        Ok(RuleMaps {
            out_cidr_exclude: a.ok_or_else(|| missing(maps::OUT_CIDR_EXCLUDE))?,
            out_cidr_include: b.ok_or_else(|| missing(maps::OUT_CIDR_INCLUDE))?,
            out_ports: c.ok_or_else(|| missing(maps::OUT_PORTS))?,
            in_ports: d.ok_or_else(|| missing(maps::IN_PORTS))?,
        })
    }

    /// The SOCKHASH's fd, to ask the kernel what is attached to it.
    /// A descriptor of its own on the `INGRESS_READ` map, for the proxy to
    /// report its reads on (when no fexit counts them).
    pub fn ingress_read_map(&self) -> Result<std::os::fd::OwnedFd, EbpfError> {
        use std::os::fd::AsFd as _;
        let aya::maps::Map::HashMap(data) = self.map(maps::INGRESS_READ)? else {
            return Err(EbpfError::Missing {
                kind: "hash map",
                name: maps::INGRESS_READ,
            });
        };
        data.fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| EbpfError::Link {
                hook: programs::RECVMSG,
                target: PathBuf::from(maps::INGRESS_READ),
                source,
            })
    }

    #[must_use]
    pub fn sockets_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.sockets.fd().as_fd()
    }

    /// Serves the namespace with this cookie from now on.
    pub fn enroll(&mut self, netns_cookie: u64, config: NetnsConfig) -> Result<(), EbpfError> {
        let mut m: HashMap<_, u64, NetnsConfig> = self.map_mut(maps::NETNS_CONFIG)?;
        m.insert(netns_cookie, config, 0)
            .map_err(|source| EbpfError::Map {
                name: maps::NETNS_CONFIG,
                source,
            })
    }

    /// Stops serving a namespace.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), EbpfError> {
        let mut m: HashMap<_, u64, NetnsConfig> = self.map_mut(maps::NETNS_CONFIG)?;
        match m.remove(&netns_cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(EbpfError::Map {
                name: maps::NETNS_CONFIG,
                source,
            }),
        }
    }

    /// The counters, summed over CPUs, in `agent_common::counter` order.
    pub fn counters(&self) -> Result<[u64; counter::COUNT as usize], EbpfError> {
        read_counters(self.map(maps::COUNTERS)?)
    }

    /// Entries currently held by each bounded map, with its capacity.
    pub fn map_usage(&self) -> Result<Vec<MapUsage>, EbpfError> {
        usage_of(
            self.map(maps::NETNS_CONFIG)?,
            self.map(maps::ORIG_DST_BY_COOKIE)?,
            self.map(maps::ORIG_DST_BY_TUPLE)?,
            self.sockets.keys().flatten().count(),
            self.map(maps::INGRESS_READ)?,
        )
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, EbpfError> {
        self.ebpf
            .map(name)
            .ok_or(EbpfError::Missing { kind: "map", name })
    }

    fn map_mut<'a, M>(&'a mut self, name: &'static str) -> Result<M, EbpfError>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(EbpfError::Missing { kind: "map", name })?;
        M::try_from(map).map_err(|source| EbpfError::Map { name, source })
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

/// Reads the per-CPU counters, summed, in `agent_common::counter` order.
pub fn read_counters(map: &aya::maps::Map) -> Result<[u64; counter::COUNT as usize], EbpfError> {
    let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err(maps::COUNTERS))?;
    let mut out = [0u64; counter::COUNT as usize];
    for (i, slot) in (0u32..).zip(out.iter_mut()) {
        *slot = arr
            .get(&i, 0)
            .map_err(map_err(maps::COUNTERS))?
            .iter()
            .sum();
    }
    Ok(out)
}

/// Entries of a SOCKHASH map.
pub fn count_sockets(map: &aya::maps::Map) -> Result<usize, EbpfError> {
    let s: SockHash<_, SockKey> = SockHash::try_from(map).map_err(map_err(maps::SOCKETS))?;
    Ok(s.keys().flatten().count())
}

/// Usage of every bounded map.
pub fn usage_of(
    netns: &aya::maps::Map,
    cookie: &aya::maps::Map,
    tuple: &aya::maps::Map,
    sockets: usize,
    queues: &aya::maps::Map,
) -> Result<Vec<MapUsage>, EbpfError> {
    use agent_common::capacity;
    let netns: HashMap<_, u64, NetnsConfig> =
        HashMap::try_from(netns).map_err(map_err(maps::NETNS_CONFIG))?;
    let cookie: HashMap<_, u64, OrigDst> =
        HashMap::try_from(cookie).map_err(map_err(maps::ORIG_DST_BY_COOKIE))?;
    let tuple: HashMap<_, SockKey, OrigDst> =
        HashMap::try_from(tuple).map_err(map_err(maps::ORIG_DST_BY_TUPLE))?;
    let queues: HashMap<_, SockKey, u64> =
        HashMap::try_from(queues).map_err(map_err(maps::INGRESS_READ))?;
    Ok(vec![
        MapUsage::new(
            maps::NETNS_CONFIG,
            netns.keys().flatten().count(),
            capacity::NETNS_CONFIG,
        ),
        MapUsage::new(
            maps::ORIG_DST_BY_COOKIE,
            cookie.keys().flatten().count(),
            capacity::ORIG_DST_BY_COOKIE,
        ),
        MapUsage::new(
            maps::ORIG_DST_BY_TUPLE,
            tuple.keys().flatten().count(),
            capacity::ORIG_DST_BY_TUPLE,
        ),
        MapUsage::new(maps::SOCKETS, sockets, capacity::SOCKETS),
        MapUsage::new(
            maps::INGRESS_READ,
            queues.keys().flatten().count(),
            capacity::INGRESS_READ,
        ),
    ])
}

/// The four rule maps, borrowed together.
pub struct RuleMaps<'a> {
    pub out_cidr_exclude: &'a mut Map,
    pub out_cidr_include: &'a mut Map,
    pub out_ports: &'a mut Map,
    pub in_ports: &'a mut Map,
}

/// The rule-related flag bits of a namespace's configuration.
#[must_use]
pub fn rule_flags(rules: &CaptureRules) -> u32 {
    let mut f = 0;
    if rules.outbound_include_cidrs.is_all() {
        f |= flags::OUT_ALL_CIDRS;
    }
    if rules.inbound_include_ports.is_all() {
        f |= flags::IN_ALL_PORTS;
    }
    f
}

fn cidr_key(netns: u64, net: crate::rules::Ipv4Net) -> Key<CidrKeyData> {
    Key::new(
        CidrKeyData::NETNS_BITS + u32::from(net.prefix),
        CidrKeyData::new(netns, u32::from_ne_bytes(net.addr.octets())),
    )
}

/// Replaces every rule entry of namespace `netns` with `rules` (the flag
/// bits that go with them are set by the caller, see [`rule_flags`]).
/// Entries are added before stale ones are removed, so a connect racing
/// the update sees either the old or the new list, or their union.
pub fn write_rules(
    m: &mut RuleMaps<'_>,
    netns: u64,
    rules: &CaptureRules,
) -> Result<(), EbpfError> {
    let mut port_rules: Vec<(PortKey, u8)> = Vec::new();
    port_rules.extend(
        rules
            .outbound_include_ports
            .iter()
            .map(|&p| (PortKey::new(netns, p), PortRule::INCLUDE)),
    );
    port_rules.extend(
        rules
            .outbound_exclude_ports
            .iter()
            .map(|&p| (PortKey::new(netns, p), PortRule::EXCLUDE)),
    );
    replace_ports(m.out_ports, maps::OUT_PORTS, netns, &port_rules)?;
    let mut in_rules: Vec<(PortKey, u8)> = Vec::new();
    in_rules.extend(
        rules
            .inbound_include_ports
            .items()
            .iter()
            .map(|&p| (PortKey::new(netns, p), PortRule::INCLUDE)),
    );
    in_rules.extend(
        rules
            .inbound_exclude_ports
            .iter()
            .map(|&p| (PortKey::new(netns, p), PortRule::EXCLUDE)),
    );
    replace_ports(m.in_ports, maps::IN_PORTS, netns, &in_rules)?;
    let include: Vec<_> = rules
        .outbound_include_cidrs
        .items()
        .iter()
        .map(|&n| cidr_key(netns, n))
        .collect();
    replace_cidrs(m.out_cidr_include, maps::OUT_CIDR_INCLUDE, netns, &include)?;
    let exclude: Vec<_> = rules
        .outbound_exclude_cidrs
        .iter()
        .map(|&n| cidr_key(netns, n))
        .collect();
    replace_cidrs(m.out_cidr_exclude, maps::OUT_CIDR_EXCLUDE, netns, &exclude)
}

/// Reads back the rules of namespace `netns` (`netns_flags`: its
/// `NetnsConfig::flags`, which hold the "all" switches).
pub fn read_rules(
    m: &mut RuleMaps<'_>,
    netns: u64,
    netns_flags: u32,
) -> Result<CaptureRules, EbpfError> {
    use crate::rules::{Ipv4Net, Selection};
    let ports = |map: &mut Map, name: &'static str| -> Result<(Vec<u16>, Vec<u16>), EbpfError> {
        let h: HashMap<_, PortKey, u8> = HashMap::try_from(map).map_err(map_err(name))?;
        let (mut inc, mut exc) = (Vec::new(), Vec::new());
        for (k, v) in h.iter().flatten().filter(|(k, _)| k.netns_cookie == netns) {
            if v == PortRule::EXCLUDE {
                exc.push(k.port);
            } else {
                inc.push(k.port);
            }
        }
        inc.sort_unstable();
        exc.sort_unstable();
        Ok((inc, exc))
    };
    let cidrs = |map: &mut Map, name: &'static str| -> Result<Vec<Ipv4Net>, EbpfError> {
        let t: LpmTrie<_, CidrKeyData, u8> = LpmTrie::try_from(map).map_err(map_err(name))?;
        let mut v: Vec<Ipv4Net> = t
            .keys()
            .flatten()
            .filter(|k| k.data().netns_be == netns.to_be_bytes())
            .filter_map(|k| {
                let prefix =
                    u8::try_from(k.prefix_len().checked_sub(CidrKeyData::NETNS_BITS)?).ok()?;
                Some(Ipv4Net::new(std::net::Ipv4Addr::from(k.data().ip4), prefix))
            })
            .collect();
        v.sort_by_key(|n| (u32::from(n.addr), n.prefix));
        Ok(v)
    };
    let (out_inc, out_exc) = ports(m.out_ports, maps::OUT_PORTS)?;
    let (in_inc, in_exc) = ports(m.in_ports, maps::IN_PORTS)?;
    let include = cidrs(m.out_cidr_include, maps::OUT_CIDR_INCLUDE)?;
    Ok(CaptureRules {
        outbound_include_cidrs: if netns_flags & flags::OUT_ALL_CIDRS != 0 {
            Selection::All
        } else {
            Selection::Some(include)
        },
        outbound_exclude_cidrs: cidrs(m.out_cidr_exclude, maps::OUT_CIDR_EXCLUDE)?,
        outbound_include_ports: out_inc,
        outbound_exclude_ports: out_exc,
        inbound_include_ports: if netns_flags & flags::IN_ALL_PORTS != 0 {
            Selection::All
        } else {
            Selection::Some(in_inc)
        },
        inbound_exclude_ports: in_exc,
    })
}

fn replace_ports(
    map: &mut Map,
    name: &'static str,
    netns: u64,
    wanted: &[(PortKey, u8)],
) -> Result<(), EbpfError> {
    let mut h: HashMap<_, PortKey, u8> = HashMap::try_from(map).map_err(map_err(name))?;
    // Excludes win over includes for the same port, as in istio (they come first).
    for (k, v) in wanted
        .iter()
        .filter(|(_, v)| *v == PortRule::INCLUDE)
        .chain(wanted.iter().filter(|(_, v)| *v == PortRule::EXCLUDE))
    {
        h.insert(k, v, 0).map_err(map_err(name))?;
    }
    let stale: Vec<PortKey> = h
        .keys()
        .flatten()
        .filter(|k| k.netns_cookie == netns && !wanted.iter().any(|(w, _)| w == k))
        .collect();
    for k in stale {
        h.remove(&k).map_err(map_err(name))?;
    }
    Ok(())
}

fn replace_cidrs(
    map: &mut Map,
    name: &'static str,
    netns: u64,
    wanted: &[Key<CidrKeyData>],
) -> Result<(), EbpfError> {
    let mut t: LpmTrie<_, CidrKeyData, u8> = LpmTrie::try_from(map).map_err(map_err(name))?;
    for k in wanted {
        t.insert(k, 1, 0).map_err(map_err(name))?;
    }
    let same = |a: &Key<CidrKeyData>, b: &Key<CidrKeyData>| {
        a.prefix_len() == b.prefix_len() && a.data() == b.data()
    };
    let stale: Vec<Key<CidrKeyData>> = t
        .keys()
        .flatten()
        .filter(|k| k.data().netns_be == netns.to_be_bytes() && !wanted.iter().any(|w| same(w, k)))
        .collect();
    for k in stale {
        t.remove(&k).map_err(map_err(name))?;
    }
    Ok(())
}

/// How full a map is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

impl MapUsage {
    fn new(name: &'static str, entries: usize, capacity: u32) -> Self {
        Self {
            name,
            entries,
            capacity,
        }
    }
}

fn prog_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into().map_err(program_err(name))
}
