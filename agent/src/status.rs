//! `status`: what is attached to a cgroup and what our maps hold, read from
//! the kernel (it works for whichever agent process loaded the programs).

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    admin::report::AgentReport,
    cgroup, handoff,
    inspect::{self, AttachedProgram, Snapshot},
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub cgroup: String,
    pub attached: Vec<AttachedProgram>,
    pub datapath: Option<Snapshot>,
    /// Every pinned datapath on this host.
    pub pinned: Vec<Pinned>,
    /// Every running agent (one per served namespace), as it reports itself
    /// on its control socket.
    pub agents: Vec<RunningAgent>,
}

/// A running agent: its control socket and what it answered there.
#[derive(Debug, Serialize)]
pub struct RunningAgent {
    pub control_socket: String,
    pub report: Option<AgentReport>,
    /// Why there is no report (a stale socket, a garbled answer).
    pub error: Option<String>,
}

/// A pinned datapath: its directory, its links, its numbers.
#[derive(Debug, Serialize)]
pub struct Pinned {
    pub dir: String,
    pub links: Vec<String>,
    pub datapath: Option<Snapshot>,
}

pub fn collect(cgroup_path: Option<&Path>, bpffs: &Path, control_dir: &Path) -> Result<Status> {
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
        agents: agents(control_dir),
    })
}

/// Asks every control socket in `dir` for its agent's numbers.
fn agents(dir: &Path) -> Vec<RunningAgent> {
    let mut sockets: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().is_some_and(|e| e == "sock")
                        && p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("netns-"))
                })
                .collect()
        })
        .unwrap_or_default();
    sockets.sort();
    sockets
        .into_iter()
        .map(|path| {
            let answer = handoff::query_stats(&path)
                .map_err(|e| e.to_string())
                .and_then(|a| {
                    serde_json::from_str::<AgentReport>(&a)
                        .map_err(|e| format!("{}: unreadable answer: {e}", path.display()))
                });
            let (report, error) = match answer {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(e)),
            };
            RunningAgent {
                control_socket: path.display().to_string(),
                report,
                error,
            }
        })
        .collect()
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
        for a in &self.agents {
            render_agent(&mut out, a);
        }
        if let Some(s) = &self.datapath {
            out.push_str("counters\n");
            for &c in agent_common::Counter::ALL {
                let _ = writeln!(out, "  {:<24} {}", c.name(), s.counter(c));
            }
            out.push_str("maps\n");
            for m in &s.maps {
                let _ = writeln!(out, "  {:<24} {:>7} / {}", m.name, m.entries, m.capacity);
            }
        }
        out
    }
}

fn render_agent(out: &mut String, a: &RunningAgent) {
    let Some(r) = &a.report else {
        let _ = writeln!(
            out,
            "agent at {}: no answer ({})",
            a.control_socket,
            a.error.as_deref().unwrap_or("?")
        );
        return;
    };
    let ready = if r.not_ready.is_empty() {
        "ready".to_owned()
    } else {
        format!("not ready: {}", r.not_ready.join(", "))
    };
    let _ = writeln!(
        out,
        "agent pid {} ({}): mode {}, fail {}, {ready}",
        r.pid, a.control_socket, r.mode, r.fail_policy
    );
    let Some(p) = &r.proxy else {
        out.push_str("  external proxy\n");
        return;
    };
    for (dir, total) in &p.connections_total {
        let get =
            |m: &std::collections::BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "  proxy {dir:<9} {} open, {total} total, {} bytes to upstream, {} to client",
            get(&p.connections_open, dir),
            get(&p.bytes, &format!("{dir}/to_upstream")),
            get(&p.bytes, &format!("{dir}/to_client")),
        );
    }
    let errors: Vec<String> = p
        .errors
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let errors = if errors.is_empty() {
        "none".to_owned()
    } else {
        errors.join(", ")
    };
    let _ = writeln!(out, "  proxy errors: {errors}");
}
