//! What runs where, read from the kernel itself: the programs attached to a
//! cgroup, and the numbers of the datapath they belong to. Used by
//! `status`, `rules`, the demo and the tests; works for any running agent,
//! whatever process loaded the programs, and for a pinned datapath whose
//! agent is down.

use std::{collections::BTreeMap, path::Path};

use agent_common::Counter;
use serde::Serialize;

pub use crate::ebpf::attach::{AttachedProgram, attached_to_cgroup as attached};
use crate::ebpf::{DatapathMaps, EbpfError, MapUsage};

/// A datapath's numbers, from its maps.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Every counter, by name.
    pub counters: BTreeMap<&'static str, u64>,
    pub maps: Vec<MapUsage>,
}

impl Snapshot {
    pub fn of(maps: &DatapathMaps) -> Result<Self, EbpfError> {
        Ok(Self {
            counters: maps
                .counters()?
                .iter()
                .map(|(c, v)| (c.name(), v))
                .collect(),
            maps: maps.usage()?,
        })
    }

    #[must_use]
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters.get(c.name()).copied().unwrap_or(0)
    }
}

fn cgroup_err(path: &Path) -> impl FnOnce(std::io::Error) -> EbpfError + '_ {
    |source| EbpfError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The maps of the datapath attached to `cgroup`; `None` if none of ours is.
pub fn datapath(cgroup: &Path) -> Result<Option<DatapathMaps>, EbpfError> {
    let programs = attached(cgroup).map_err(cgroup_err(cgroup))?;
    // Any of ours will do: they share the maps (sockops may be the only hook
    // on an ancestor).
    programs
        .iter()
        .find(|p| p.ours)
        .map(|p| DatapathMaps::from_program(p.id))
        .transpose()
}

/// The numbers of the datapath attached to `cgroup`; `None` if none of ours is.
pub fn snapshot(cgroup: &Path) -> Result<Option<Snapshot>, EbpfError> {
    datapath(cgroup)?.as_ref().map(Snapshot::of).transpose()
}

/// The numbers of a pinned datapath, from its pin directory.
pub fn snapshot_from_pins(dir: &Path) -> Result<Snapshot, EbpfError> {
    Snapshot::of(&DatapathMaps::from_pins(dir)?)
}
