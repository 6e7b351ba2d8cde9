//! `status`: what is attached to a cgroup and what our maps hold, read from
//! the kernel (it works for whichever agent process loaded the programs).

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    cgroup,
    inspect::{self, AttachedProgram, Snapshot},
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub cgroup: String,
    pub attached: Vec<AttachedProgram>,
    pub datapath: Option<Snapshot>,
    /// Every pinned datapath on this host.
    pub pinned: Vec<Pinned>,
}

/// A pinned datapath: its directory, its links, its numbers.
#[derive(Debug, Serialize)]
pub struct Pinned {
    pub dir: String,
    pub links: Vec<String>,
    pub datapath: Option<Snapshot>,
}

pub fn collect(cgroup_path: Option<&Path>, bpffs: &Path) -> Result<Status> {
    let path = match cgroup_path {
        Some(p) => cgroup::validate(p).context("--cgroup")?,
        None => cgroup::validate(&cgroup::cgroup2_root()?)?,
    };
    let attached =
        inspect::attached(&path).with_context(|| format!("querying {}", path.display()))?;
    let datapath = inspect::snapshot(&path)?;
    let pinned = crate::pins::all_instances(bpffs)
        .into_iter()
        .map(|dir| {
            let mut links: Vec<String> = std::fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.starts_with("link-"))
                        .collect()
                })
                .unwrap_or_default();
            links.sort();
            let datapath = inspect::snapshot_from_pins(&dir).ok();
            Pinned {
                dir: dir.display().to_string(),
                links,
                datapath,
            }
        })
        .collect();
    Ok(Status {
        cgroup: path.display().to_string(),
        attached,
        datapath,
        pinned,
    })
}

impl Status {
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "cgroup {}", self.cgroup);
        if self.attached.is_empty() {
            out.push_str("  no programs attached on connect4, sock_ops or getsockopt\n");
        }
        for p in &self.attached {
            let whose = if p.ours { "ours" } else { "not ours" };
            let _ = writeln!(out, "  {:<16} id {:<6} {} ({whose})", p.hook, p.id, p.name);
        }
        for p in &self.pinned {
            let _ = writeln!(out, "pinned {}", p.dir);
            for l in &p.links {
                let _ = writeln!(out, "  {l}");
            }
        }
        if let Some(s) = &self.datapath {
            out.push_str("counters\n");
            for name in agent_common::counter::NAMES {
                let _ = writeln!(
                    out,
                    "  {name:<24} {}",
                    s.counters.get(name).copied().unwrap_or(0)
                );
            }
            out.push_str("maps\n");
            for m in &s.maps {
                let _ = writeln!(out, "  {:<24} {:>7} / {}", m.name, m.entries, m.capacity);
            }
        }
        out
    }
}
