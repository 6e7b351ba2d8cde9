//! What is attached where, and what our maps hold, read from the kernel
//! itself (program query on a cgroup, then the maps of the programs found
//! there). Used by `status`, the demo and the tests; works for any running
//! agent, whatever process loaded the programs.

use std::{collections::HashMap as StdHashMap, fs::File, io, path::Path};

use agent_common::{counter, maps};
use aya::{
    maps::{Map, MapData, MapInfo},
    programs::loaded_programs,
};
use serde::Serialize;

use crate::{
    bpf_sys::{self, attach_type},
    ebpf::{self, EbpfError, Hook, MapUsage},
};

/// The cgroup attach types of our hooks (sk_msg attaches to the SOCKHASH).
pub const CGROUP_HOOKS: [(Hook, u32); 4] = [
    (Hook::Connect4, attach_type::CGROUP_INET4_CONNECT),
    (Hook::GetPeerName4, attach_type::CGROUP_INET4_GETPEERNAME),
    (Hook::SockOps, attach_type::CGROUP_SOCK_OPS),
    (Hook::GetSockopt, attach_type::CGROUP_GETSOCKOPT),
];

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AttachedProgram {
    pub hook: &'static str,
    pub id: u32,
    pub name: String,
    /// One of ours (by program name).
    pub ours: bool,
}

/// Every program attached to `cgroup` on the hooks we use (ours and others').
pub fn attached(cgroup: &Path) -> io::Result<Vec<AttachedProgram>> {
    let cg = File::open(cgroup)?;
    let mut out = Vec::new();
    for (hook, at) in CGROUP_HOOKS {
        for id in bpf_sys::prog_query(&cg, at)? {
            let (name, _) = bpf_sys::prog_name_by_id(id)?;
            let ours = name == hook.program();
            out.push(AttachedProgram {
                hook: hook.program(),
                id,
                name,
                ours,
            });
        }
    }
    Ok(out)
}

/// A datapath's numbers, from its maps.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub counters: StdHashMap<&'static str, u64>,
    pub maps: Vec<MapUsage>,
}

impl Snapshot {
    #[must_use]
    pub fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(counter::NAMES[index as usize])
            .copied()
            .unwrap_or(0)
    }
}

/// The maps of the datapath `prog_id` belongs to, by (kernel) name: every
/// map reachable from it through our programs that share maps (each
/// program references only the maps it uses; sk_lookup shares none with
/// connect4, only with sockops).
pub fn datapath_maps(prog_id: u32) -> Result<Vec<(String, Map)>, EbpfError> {
    let not_found = EbpfError::Missing {
        kind: "program id",
        name: "attached program",
    };
    let programs: Vec<_> = loaded_programs().filter_map(Result::ok).collect();
    let ids_of = |p: &aya::programs::ProgramInfo| -> Vec<u32> {
        p.map_ids().ok().flatten().unwrap_or_default()
    };
    let first = programs
        .iter()
        .find(|p| p.id() == prog_id)
        .ok_or(not_found)?;
    let ours: Vec<Vec<u32>> = programs
        .iter()
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("mesh_")))
        .map(ids_of)
        .collect();
    let mut ids = ids_of(first);
    loop {
        let before = ids.len();
        for maps in &ours {
            if maps.iter().any(|m| ids.contains(m)) {
                ids.extend(
                    maps.iter()
                        .filter(|m| !ids.contains(m))
                        .copied()
                        .collect::<Vec<_>>(),
                );
            }
        }
        if ids.len() == before {
            break;
        }
    }
    let name_of = |id: u32| {
        MapInfo::from_id(id)
            .ok()
            .and_then(|i| i.name_as_str().map(str::to_owned))
    };
    let mut out = Vec::new();
    for id in ids {
        let Some(name) = name_of(id) else { continue };
        let data = MapData::from_id(id).map_err(|source| EbpfError::Map {
            name: "by id",
            source,
        })?;
        if let Ok(map) = Map::from_map_data(data) {
            out.push((name, map));
        }
    }
    Ok(out)
}

/// The snapshot of a pinned datapath, from its pin directory.
pub fn snapshot_from_pins(dir: &Path) -> Result<Snapshot, EbpfError> {
    let mut maps = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|source| EbpfError::Cgroup {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("link-") {
            continue;
        }
        let data = MapData::from_pin(entry.path()).map_err(|source| EbpfError::Map {
            name: "pinned",
            source,
        })?;
        if let Ok(map) = Map::from_map_data(data) {
            maps.push((name, map));
        }
    }
    snapshot_of(&maps)
}

/// The snapshot of the datapath whose connect4 program is attached to
/// `cgroup`; `None` if none of ours is.
pub fn snapshot(cgroup: &Path) -> Result<Option<Snapshot>, EbpfError> {
    let programs = attached(cgroup).map_err(|source| EbpfError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    // sock_ops shares the maps and may be the only hook on an ancestor.
    let Some(prog) = programs.iter().find(|p| p.ours) else {
        return Ok(None);
    };
    let maps = datapath_maps(prog.id)?;
    snapshot_of(&maps).map(Some)
}

/// Reads counters and map usage from a set of our maps (kernel names are
/// truncated to 15 characters, so names are matched by prefix).
pub fn snapshot_of(by_name: &[(String, Map)]) -> Result<Snapshot, EbpfError> {
    let find = |name: &'static str| {
        by_name
            .iter()
            .find(|(k, _)| name.starts_with(k.as_str()) && !k.is_empty())
            .map(|(_, v)| v)
            .ok_or(EbpfError::Missing { kind: "map", name })
    };
    let counters = ebpf::read_counters(find(maps::COUNTERS)?)?;
    let usage = ebpf::usage_of(
        find(maps::NETNS_CONFIG)?,
        find(maps::ORIG_DST_BY_COOKIE)?,
        find(maps::ORIG_DST_BY_TUPLE)?,
        ebpf::count_sockets(find(maps::SOCKETS)?)?,
        find(maps::INGRESS_READ)?,
    )?;
    Ok(Snapshot {
        counters: counter::NAMES.iter().copied().zip(counters).collect(),
        maps: usage,
    })
}
