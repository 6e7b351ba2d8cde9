//! `mesh-redirect rules`: show or change the capture rules of a running
//! capture, at once, for new connections, without a restart.
//!
//! `--netns PATH` asks the agent serving that namespace over its control
//! socket (either mode). `--cgroup PATH` changes the eBPF datapath
//! attached to the cgroup through its maps directly, found through the
//! kernel, so it also works while the agent is down (the pinned datapath
//! keeps capturing).

use std::path::Path;

use anyhow::{Context as _, Result, bail};

use crate::{
    cgroup, handoff, inspect,
    netns::Netns,
    rules::{CaptureRules, RuleArgs},
};

/// Applies the lists given in `args` (the others stay as they are) and
/// returns the rules now in force.
pub fn run(
    netns: Option<&Path>,
    cgroup_path: Option<&Path>,
    control_dir: &Path,
    args: &RuleArgs,
) -> Result<CaptureRules> {
    if let Some(path) = netns {
        let cookie = Netns::open(path).context("--netns")?.cookie()?;
        let control = handoff::control_path(control_dir, cookie);
        return handoff::request_rules(&control, args).with_context(|| {
            format!(
                "no agent serving {} answers on {}",
                path.display(),
                control.display()
            )
        });
    }
    let path = match cgroup_path {
        Some(p) => cgroup::validate(p).context("--cgroup")?,
        None => cgroup::validate(&cgroup::cgroup2_root()?)?,
    };
    let Some(mut maps) =
        inspect::datapath(&path).with_context(|| format!("querying {}", path.display()))?
    else {
        bail!(
            "no mesh-redirect datapath is attached to {} (is `run --mode ebpf` serving it? for the iptables mode, pass --netns)",
            path.display()
        );
    };
    let served = maps.netns_configs()?;
    let [(cookie, config)] = served[..] else {
        bail!(
            "expected one served namespace in the datapath, found {}",
            served.len()
        );
    };
    let wanted = args.apply_to(&maps.rules(cookie, &config)?)?;
    maps.set_rules(cookie, &wanted)?;
    Ok(wanted)
}
