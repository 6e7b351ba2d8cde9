//! Facts about the host xtask runs on.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result};

/// Where cgroup2 is mounted, from `/proc/self/mountinfo` (never assumed:
/// hybrid layouts mount it under `/sys/fs/cgroup/unified`).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            (post.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup2 mount in /proc/self/mountinfo")
}
