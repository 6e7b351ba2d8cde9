//! `cleanup`: remove what a crashed agent (or one killed with SIGKILL) left
//! behind, and
//! nothing that is not ours:
//!
//! - pinned datapaths under `<bpffs>/mesh-redirect` (their links detach as
//!   the pins go) — except those whose agent still answers on its control
//!   socket, unless `--force`;
//! - iptables rules installed by `run --mode iptables` in the given
//!   namespaces: only when they carry our tag (the `mesh-redirect` comment on
//!   the exempt-mark rule); chains istio-init installed are left alone;
//! - the IPv6 passthrough source `::6` on those namespaces' `lo`, and on
//!   the pods of a removed node datapath, where an agent that is no longer
//!   running put it (its marker file says so).

use std::{
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    capture::passthrough,
    handoff,
    iptables::{
        apply,
        backend::{Backend, Family},
        istio::EXEMPT_MARK_COMMENT,
    },
    netns::Netns,
    pins,
};

#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Pin directories removed.
    pub removed: Vec<PathBuf>,
    /// Pin directories left: their agent is alive.
    pub live: Vec<PathBuf>,
    /// Namespaces whose iptables rules of ours were removed.
    pub iptables_removed: Vec<PathBuf>,
    /// Namespaces with ISTIO chains that are not ours (left alone).
    pub iptables_not_ours: Vec<PathBuf>,
    /// Namespaces whose `::6` on `lo` (ours) was removed.
    pub passthrough_removed: Vec<PathBuf>,
}

impl Report {
    /// One line per thing removed or left.
    #[must_use]
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for p in &self.removed {
            let _ = writeln!(out, "removed pins {}", p.display());
        }
        for p in &self.live {
            let _ = writeln!(
                out,
                "left pins {} (its agent is running; stop it, or --force)",
                p.display()
            );
        }
        for p in &self.iptables_removed {
            let _ = writeln!(out, "removed our iptables rules in {}", p.display());
        }
        for p in &self.iptables_not_ours {
            let _ = writeln!(
                out,
                "left ISTIO chains in {} (not installed by mesh-redirect)",
                p.display()
            );
        }
        for p in &self.passthrough_removed {
            let _ = writeln!(out, "removed our ::6 from lo in {}", p.display());
        }
        if self.removed.is_empty()
            && self.iptables_removed.is_empty()
            && self.passthrough_removed.is_empty()
        {
            out.push_str("nothing of ours to remove\n");
        }
        out
    }
}

/// Whether an agent answers on the control socket for `cookie`.
fn alive(control_dir: &Path, cookie: u64) -> bool {
    UnixStream::connect(handoff::control_path(control_dir, cookie)).is_ok()
}

/// The namespaces of the pods a node agent's state file lists.
fn served_pods(state: &Path) -> Vec<PathBuf> {
    std::fs::read(state)
        .ok()
        .and_then(|body| serde_json::from_slice::<Vec<crate::node::api::Enrollment>>(&body).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.netns)
        .collect()
}

pub fn run(
    bpffs: &Path,
    control_dir: &Path,
    netns_paths: &[PathBuf],
    force: bool,
) -> Result<Report> {
    let mut report = Report::default();
    for dir in pins::all_instances(bpffs) {
        let live = if pins::is_node_instance(&dir) {
            UnixStream::connect(control_dir.join(crate::node::api::SOCKET_NAME)).is_ok()
        } else {
            pins::instance_cookie(&dir).is_some_and(|c| alive(control_dir, c))
        };
        if live && !force {
            report.live.push(dir);
            continue;
        }
        pins::remove_instance(&dir).with_context(|| format!("removing {}", dir.display()))?;
        if pins::is_node_instance(&dir) {
            // The pods it served are served by nobody now: the `::6` it put
            // on their `lo` goes too.
            let state = control_dir.join(crate::node::api::STATE_NAME);
            for path in served_pods(&state) {
                let Ok(netns) = Netns::open(&path) else {
                    continue;
                };
                if let Ok(cookie) = netns.cookie()
                    && passthrough::remove_v6(&netns, &passthrough::marker(control_dir, cookie))
                {
                    report.passthrough_removed.push(path);
                }
            }
            let _ = std::fs::remove_file(state);
        }
        report.removed.push(dir);
    }
    let own = [PathBuf::from("/proc/thread-self/ns/net")];
    let namespaces = if netns_paths.is_empty() {
        &own[..]
    } else {
        netns_paths
    };
    for path in namespaces {
        let netns = Netns::open(path).context("--netns")?;
        let cookie = netns.cookie().context("--netns")?;
        if (force || !alive(control_dir, cookie))
            && passthrough::remove_v6(&netns, &passthrough::marker(control_dir, cookie))
        {
            report.passthrough_removed.push(path.clone());
        }
        let runner = |p: &str| netns.command(p);
        for backend in [Backend::Legacy, Backend::Nft] {
            let Ok(saved) = apply::save(&runner, backend, Family::Ipv4) else {
                continue;
            };
            if !saved.contains("ISTIO_OUTPUT") {
                continue;
            }
            if saved.contains(&format!("--comment {EXEMPT_MARK_COMMENT}")) {
                apply::cleanup(&runner, backend).with_context(|| {
                    format!("removing our iptables rules in {}", path.display())
                })?;
                report.iptables_removed.push(path.clone());
            } else {
                report.iptables_not_ours.push(path.clone());
            }
        }
    }
    Ok(report)
}
