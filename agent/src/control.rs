//! Changing a running datapath from outside: `mesh-redirect rules`. The
//! datapath is found through the kernel (the programs attached to the
//! served cgroup, then their maps), so it works for whichever agent process
//! loaded it, and changes apply to new connections at once, no restart.

use std::path::Path;

use agent_common::{InboundConfig, NetnsConfig, flags, maps};
use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, Map};

use crate::{
    cgroup,
    ebpf::{self, RuleMaps},
    inspect,
    rules::{CaptureRules, RuleArgs},
};

/// Takes the map called `name` (kernel names are cut to 15 characters).
fn take(maps: &mut Vec<(String, Map)>, name: &'static str) -> Result<Map> {
    let i = maps
        .iter()
        .position(|(k, _)| !k.is_empty() && name.starts_with(k.as_str()))
        .with_context(|| format!("the running datapath has no map {name}"))?;
    Ok(maps.swap_remove(i).1)
}

/// Applies the lists given in `args` to the datapath serving `cgroup`
/// (lists not given stay as they are) and returns the rules now in force.
pub fn update_rules(cgroup_path: Option<&Path>, args: &RuleArgs) -> Result<CaptureRules> {
    let path = match cgroup_path {
        Some(p) => cgroup::validate(p).context("--cgroup")?,
        None => cgroup::validate(&cgroup::cgroup2_root()?)?,
    };
    let attached =
        inspect::attached(&path).with_context(|| format!("querying {}", path.display()))?;
    let Some(prog) = attached.iter().find(|p| p.ours) else {
        bail!(
            "no mesh-redirect datapath is attached to {} (is `run --mode ebpf` serving it?)",
            path.display()
        );
    };
    let mut found = inspect::datapath_maps(prog.id)?;
    let mut netns_map = take(&mut found, maps::NETNS_CONFIG)?;
    let mut inbound_map = take(&mut found, maps::INBOUND_CONFIG)?;
    let (mut a, mut b, mut c, mut d) = (
        take(&mut found, maps::OUT_CIDR_EXCLUDE)?,
        take(&mut found, maps::OUT_CIDR_INCLUDE)?,
        take(&mut found, maps::OUT_PORTS)?,
        take(&mut found, maps::IN_PORTS)?,
    );
    let mut rule_maps = RuleMaps {
        out_cidr_exclude: &mut a,
        out_cidr_include: &mut b,
        out_ports: &mut c,
        in_ports: &mut d,
    };

    let mut netns: HashMap<_, u64, NetnsConfig> = HashMap::try_from(&mut netns_map)?;
    let entries: Vec<(u64, NetnsConfig)> = netns.iter().flatten().collect();
    let [(cookie, mut config)] = entries[..] else {
        bail!(
            "expected one served namespace in the datapath, found {}",
            entries.len()
        );
    };
    let current = ebpf::read_rules(&mut rule_maps, cookie, config.flags)?;
    let wanted = args.apply_to(&current)?;
    ebpf::write_rules(&mut rule_maps, cookie, &wanted)?;
    let rule_bits = flags::OUT_ALL_CIDRS | flags::IN_ALL_PORTS;
    config.flags = (config.flags & !rule_bits) | ebpf::rule_flags(&wanted);
    netns.insert(cookie, config, 0)?;
    let mut inbound: Array<_, InboundConfig> = Array::try_from(&mut inbound_map)?;
    let mut ib = inbound.get(&0, 0)?;
    if ib.netns_cookie == cookie {
        ib.flags = (ib.flags & !rule_bits) | ebpf::rule_flags(&wanted);
        inbound.set(0, ib, 0)?;
    }
    Ok(wanted)
}
