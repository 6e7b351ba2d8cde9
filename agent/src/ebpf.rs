//! Loading the eBPF object, attaching its programs, and talking to its maps.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use agent_common::{NetnsConfig, OrigDst, SockKey, counter, maps, programs};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SkMsg, SockOps},
};

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
}

/// Which hooks a [`Datapath`] attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    SockOps,
    SkMsg,
    GetSockopt,
}

impl Hook {
    pub const ALL: [Self; 4] = [Self::Connect4, Self::SockOps, Self::SkMsg, Self::GetSockopt];

    #[must_use]
    pub const fn program(self) -> &'static str {
        match self {
            Self::Connect4 => programs::CONNECT4,
            Self::SockOps => programs::SOCKOPS,
            Self::SkMsg => programs::SK_MSG,
            Self::GetSockopt => programs::GETSOCKOPT,
        }
    }
}

/// The loaded object. Dropping it detaches every program it attached and
/// frees its maps (nothing is pinned).
pub struct Datapath {
    ebpf: Ebpf,
    /// Taken out of `ebpf` at load: the sk_msg attachment needs its fd.
    sockets: SockHash<MapData, SockKey>,
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

impl Datapath {
    /// Loads the maps and verifies every program. `debug_logs` turns on the
    /// programs' aya-log debug lines (off by default: they cost per event).
    pub fn load(debug_logs: bool) -> Result<Self, EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::NoObject);
        }
        let level: u8 = if debug_logs {
            aya_log::Level::Debug as u8
        } else {
            aya_log::Level::Warn as u8
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, false)
            .load(OBJECT)?;
        let e = &mut ebpf;
        prog_mut::<CgroupSockAddr>(e, programs::CONNECT4)?
            .load()
            .map_err(program_err(programs::CONNECT4))?;
        prog_mut::<SockOps>(e, programs::SOCKOPS)?
            .load()
            .map_err(program_err(programs::SOCKOPS))?;
        prog_mut::<SkMsg>(e, programs::SK_MSG)?
            .load()
            .map_err(program_err(programs::SK_MSG))?;
        prog_mut::<CgroupSockopt>(e, programs::GETSOCKOPT)?
            .load()
            .map_err(program_err(programs::GETSOCKOPT))?;
        let map = ebpf.take_map(maps::SOCKETS).ok_or(EbpfError::Missing {
            kind: "map",
            name: maps::SOCKETS,
        })?;
        let sockets = SockHash::try_from(map).map_err(|source| EbpfError::Map {
            name: maps::SOCKETS,
            source,
        })?;
        Ok(Self { ebpf, sockets })
    }

    /// Starts forwarding the programs' aya-log records to `log` (and so to
    /// tracing). The caller polls the returned logger's fd and flushes it.
    pub fn take_logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, EbpfError> {
        Ok(aya_log::EbpfLogger::init(&mut self.ebpf)?)
    }

    /// Attaches `hook` to the cgroup at `path` (a bpf_link: multi-attach,
    /// never replacing another tool's program). Not for [`Hook::SkMsg`],
    /// which attaches to the socket map: see [`Self::attach_sk_msg`].
    pub fn attach_cgroup(&mut self, hook: Hook, path: &Path) -> Result<(), EbpfError> {
        let cgroup = open_cgroup(path)?;
        // bpf_link attachments are always multi; flags must be 0 (`Single`).
        let mode = CgroupAttachMode::Single;
        let name = hook.program();
        let e = &mut self.ebpf;
        match hook {
            Hook::Connect4 => prog_mut::<CgroupSockAddr>(e, name)?
                .attach(&cgroup, mode)
                .map(drop),
            Hook::SockOps => prog_mut::<SockOps>(e, name)?
                .attach(&cgroup, mode)
                .map(drop),
            Hook::GetSockopt => prog_mut::<CgroupSockopt>(e, name)?
                .attach(&cgroup, mode)
                .map(drop),
            Hook::SkMsg => panic!("sk_msg attaches to the socket map, not to a cgroup"),
        }
        .map_err(program_err(name))
    }

    /// Attaches the sk_msg program to the SOCKHASH.
    pub fn attach_sk_msg(&mut self) -> Result<(), EbpfError> {
        prog_mut::<SkMsg>(&mut self.ebpf, programs::SK_MSG)?
            .attach(self.sockets.fd())
            .map(drop)
            .map_err(program_err(programs::SK_MSG))
    }

    /// The SOCKHASH's fd, to ask the kernel what is attached to it.
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
) -> Result<Vec<MapUsage>, EbpfError> {
    use agent_common::capacity;
    let netns: HashMap<_, u64, NetnsConfig> =
        HashMap::try_from(netns).map_err(map_err(maps::NETNS_CONFIG))?;
    let cookie: HashMap<_, u64, OrigDst> =
        HashMap::try_from(cookie).map_err(map_err(maps::ORIG_DST_BY_COOKIE))?;
    let tuple: HashMap<_, SockKey, OrigDst> =
        HashMap::try_from(tuple).map_err(map_err(maps::ORIG_DST_BY_TUPLE))?;
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
    ])
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
