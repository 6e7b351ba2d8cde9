//! cgroup2 directories: validating the one we serve, finding our own, and
//! telling whether one contains another (a program attached to an ancestor
//! also runs for every descendant).

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::mounts;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cgroup {path}: not a directory")]
    NotDirectory { path: PathBuf },
    #[error("cgroup {path}: not on a cgroup2 filesystem (cgroup2 is mounted at {mount})")]
    NotCgroup2 { path: PathBuf, mount: String },
    #[error("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Mountinfo(io::Error),
    #[error("cannot tell this process's cgroup from /proc/self/cgroup: {0}")]
    OwnCgroup(String),
}

/// Where cgroup2 is mounted.
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    let mounts = mounts::read_mounts().map_err(CgroupError::Mountinfo)?;
    mounts::cgroup2(&mounts)
        .map(|m| m.mount_point.clone())
        .ok_or(CgroupError::NoCgroup2)
}

/// Checks that `path` is a directory on a cgroup2 filesystem and returns it
/// canonicalized. The error names `path`.
pub fn validate(path: &Path) -> Result<PathBuf, CgroupError> {
    let io_err = |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(io_err)?;
    if !meta.is_dir() {
        return Err(CgroupError::NotDirectory {
            path: path.to_owned(),
        });
    }
    let statfs = nix_statfs(path).map_err(io_err)?;
    if statfs != CGROUP2_SUPER_MAGIC {
        let mount =
            cgroup2_root().map_or_else(|_| "nowhere".to_owned(), |p| p.display().to_string());
        return Err(CgroupError::NotCgroup2 {
            path: path.to_owned(),
            mount,
        });
    }
    fs::canonicalize(path).map_err(io_err)
}

fn nix_statfs(path: &Path) -> io::Result<i64> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _};
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path; `buf` is written by the kernel.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf.f_type)
}

/// The cgroup2 directory this process is in (`0::/path` in /proc/self/cgroup).
pub fn own() -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| CgroupError::OwnCgroup(e.to_string()))?;
    let rel = parse_unified_path(&text)
        .ok_or_else(|| CgroupError::OwnCgroup("no `0::` line".to_owned()))?;
    let root = cgroup2_root()?;
    Ok(root.join(rel.trim_start_matches('/')))
}

fn parse_unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Whether `ancestor` is `descendant` or contains it. Both canonical.
#[must_use]
pub fn contains(ancestor: &Path, descendant: &Path) -> bool {
    descendant.starts_with(ancestor)
}

/// The cgroups a socket-level hook must be attached to so it runs for the
/// sockets of `served` and of `proxy`: one if either contains the other
/// (attaching to both would run the program twice for the inner one), both
/// otherwise.
#[must_use]
pub fn covering_set(served: &Path, proxy: &Path) -> Vec<PathBuf> {
    if contains(served, proxy) {
        vec![served.to_owned()]
    } else if contains(proxy, served) {
        vec![proxy.to_owned()]
    } else {
        vec![served.to_owned(), proxy.to_owned()]
    }
}

/// The device and inode of a directory: identifies a cgroup across paths.
pub fn identity(path: &Path) -> io::Result<(u64, u64)> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_line() {
        let t = "9:name=systemd:/\n4:memory:/x\n0::/pods/a\n";
        assert_eq!(parse_unified_path(t), Some("/pods/a"));
        assert_eq!(parse_unified_path("1:cpu:/\n"), None);
    }

    #[test]
    fn covering() {
        let r = Path::new("/cg");
        let pod = Path::new("/cg/pods/a");
        let agent = Path::new("/cg/system/agent");
        assert_eq!(
            covering_set(pod, agent),
            vec![pod.to_owned(), agent.to_owned()]
        );
        assert_eq!(covering_set(pod, r), vec![r.to_owned()]);
        assert_eq!(covering_set(r, agent), vec![r.to_owned()]);
        assert_eq!(covering_set(pod, pod), vec![pod.to_owned()]);
        // A sibling whose name extends the other's is not a descendant.
        assert_eq!(
            covering_set(Path::new("/cg/a"), Path::new("/cg/ab")).len(),
            2
        );
    }
}
