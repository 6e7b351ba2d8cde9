//! Where cgroup2 and bpffs are mounted, from `/proc/self/mountinfo`.
//! Never hard-coded: hybrid hosts mount cgroup2 at `/sys/fs/cgroup/unified`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The conventional bpffs mount point, used when none is mounted.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub read_only: bool,
}

/// Parses mountinfo text (see proc(5)): `id parent maj:min root mount-point
/// options [optional...] - fstype source super-options`.
#[must_use]
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let mount_point = unescape(pre.get(4)?);
            let options = pre.get(5)?;
            let fs_type = post.split(' ').next()?.to_owned();
            Some(Mount {
                mount_point: PathBuf::from(mount_point),
                fs_type,
                read_only: options.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..=i + 3]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn read_mounts() -> io::Result<Vec<Mount>> {
    Ok(parse_mountinfo(&fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The first cgroup2 mount.
#[must_use]
pub fn cgroup2(mounts: &[Mount]) -> Option<&Mount> {
    mounts.iter().find(|m| m.fs_type == "cgroup2")
}

/// The bpffs mount at `path`, if there is one.
#[must_use]
pub fn bpffs_at<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts
        .iter()
        .rev()
        .find(|m| m.fs_type == "bpf" && m.mount_point == path)
}

/// Every bpffs mount.
#[must_use]
pub fn bpffs(mounts: &[Mount]) -> Vec<&Mount> {
    mounts.iter().filter(|m| m.fs_type == "bpf").collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
50 23 0:40 / /sys/fs/bpf ro,nosuid,nodev - bpf bpf rw,mode=700
51 23 0:41 / /mnt/with\\040space rw - ext4 /dev/x rw
";

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(
            cgroup2(&m).unwrap().mount_point,
            Path::new("/sys/fs/cgroup/unified")
        );
    }

    #[test]
    fn bpffs_and_read_only() {
        let m = parse_mountinfo(HYBRID);
        let b = bpffs_at(&m, Path::new("/sys/fs/bpf")).unwrap();
        assert!(b.read_only);
        assert_eq!(bpffs(&m).len(), 1);
        assert!(bpffs_at(&m, Path::new("/sys/fs/cgroup")).is_none());
    }

    #[test]
    fn unescapes_mount_points() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m[4].mount_point, Path::new("/mnt/with space"));
    }

    #[test]
    fn skips_garbage() {
        assert!(parse_mountinfo("nonsense\n\n1 2 3\n").is_empty());
    }
}
