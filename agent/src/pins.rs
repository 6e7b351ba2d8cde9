//! Pins: where a datapath's maps and links live in bpffs, so they outlive
//! the agent process. A restarted (or upgraded) agent adopts them: the maps
//! keep every connection's state, the links keep the hooks attached, and
//! the new programs replace the old ones atomically (`BPF_LINK_UPDATE`).
//!
//! Layout: `<bpffs>/mesh-redirect/layout-<fingerprint>/netns-<cookie>/`, one
//! directory per served network namespace, mode 0700. The fingerprint
//! hashes every map's definition (name, type, key and value size, capacity,
//! flags) as the eBPF object declares it: an agent whose maps differ never
//! reuses old ones, it removes them and starts clean.
//!
//! It covers the maps only, on purpose: they hold the live connections'
//! state (and the SOCKHASH their queued bytes), which an upgrade must keep.
//! The programs are not part of it because they are always replaced: an
//! adopting agent puts its own program behind every pinned link, on the
//! SOCKHASH (`ebpf::attach`), so an upgrade that changes
//! only a program runs the new one at once and leaves no old one loaded.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use crate::mounts;

/// Directory under the bpffs mount that holds everything of ours.
pub const ROOT_NAME: &str = "mesh-redirect";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("bpffs {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("bpffs at {path} is mounted read-only: pins cannot be written")]
    ReadOnly { path: PathBuf },
    #[error("{path} is not a bpffs mount and could not be mounted: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(io::Error),
    #[error("parsing the eBPF object for its map layout: {0}")]
    Layout(String),
}

/// Makes sure a writable bpffs is mounted at `path`, mounting one if
/// nothing is mounted there. Errors name the path.
pub fn ensure_bpffs(path: &Path) -> Result<(), PinError> {
    let mounts = mounts::read_mounts().map_err(PinError::Mountinfo)?;
    match mounts::bpffs_at(&mounts, path) {
        Some(m) if m.read_only => Err(PinError::ReadOnly {
            path: path.to_owned(),
        }),
        Some(_) => Ok(()),
        None => {
            fs::create_dir_all(path).map_err(|source| PinError::Io {
                path: path.to_owned(),
                source,
            })?;
            mount_bpffs(path).map_err(|source| PinError::Mount {
                path: path.to_owned(),
                source,
            })?;
            tracing::info!(path = %path.display(), "mounted bpffs");
            Ok(())
        }
    }
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let target = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A stable hash of every map definition in the eBPF object.
pub fn layout_fingerprint(object: &[u8]) -> Result<String, PinError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| PinError::Layout(e.to_string()))?;
    let mut defs: Vec<String> = obj
        .maps
        .iter()
        // Global data sections (.rodata, .bss, .data) are per load, never pinned.
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, m)| {
            format!(
                "{name}:{}:{}:{}:{}:{}",
                m.map_type(),
                m.key_size(),
                m.value_size(),
                m.max_entries(),
                m.map_flags()
            )
        })
        .collect();
    defs.sort();
    Ok(format!("{:016x}", fnv1a(defs.join(";").as_bytes())))
}

/// The map names of the object that get pinned (every non-global map).
pub fn pinned_map_names(object: &[u8]) -> Result<Vec<String>, PinError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| PinError::Layout(e.to_string()))?;
    let mut names: Vec<String> = obj
        .maps
        .keys()
        // Each instance's own: its sk_lookup's namespace.
        .filter(|n| !n.starts_with('.') && *n != agent_common::maps::SK_LOOKUP_NETNS)
        .cloned()
        .collect();
    names.sort();
    Ok(names)
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `<bpffs>/mesh-redirect`.
#[must_use]
pub fn root(bpffs: &Path) -> PathBuf {
    bpffs.join(ROOT_NAME)
}

/// The pin directory of one served namespace under one layout.
#[must_use]
pub fn instance_dir(bpffs: &Path, fingerprint: &str, netns_cookie: u64) -> PathBuf {
    root(bpffs)
        .join(format!("layout-{fingerprint}"))
        .join(format!("netns-{netns_cookie}"))
}

/// Creates `dir` (and its parents) with mode 0700.
pub fn create_dir(dir: &Path) -> Result<(), PinError> {
    let io_err = |source| PinError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err)?;
    // bpffs honours the mode given at creation, but an existing dir keeps its own.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)
}

/// The namespace's directories under *other* layouts: stale, to remove.
#[must_use]
pub fn stale_instances(bpffs: &Path, fingerprint: &str, netns_cookie: u64) -> Vec<PathBuf> {
    stale(bpffs, fingerprint, &format!("netns-{netns_cookie}"))
}

/// Instance directories called `name` under layouts other than
/// `fingerprint`'s.
fn stale(bpffs: &Path, fingerprint: &str, name: &str) -> Vec<PathBuf> {
    let current = format!("layout-{fingerprint}");
    let Ok(layouts) = fs::read_dir(root(bpffs)) else {
        return Vec::new();
    };
    layouts
        .flatten()
        .filter(|l| l.file_name() != current.as_str())
        .map(|l| l.path().join(name))
        .filter(|p| p.is_dir())
        .collect()
}

/// Every instance directory under the root, whatever its layout.
#[must_use]
pub fn all_instances(bpffs: &Path) -> Vec<PathBuf> {
    let Ok(layouts) = fs::read_dir(root(bpffs)) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = layouts
        .flatten()
        .filter_map(|l| fs::read_dir(l.path()).ok())
        .flat_map(|d| d.flatten().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

/// Removes an instance directory: every pin in it (a link whose last pin
/// goes detaches its program once no process holds it), then the directory,
/// then the layout and root directories if they are left empty.
pub fn remove_instance(dir: &Path) -> Result<(), PinError> {
    let io_err = |source| PinError::Io {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io_err)?.flatten() {
        fs::remove_file(entry.path()).map_err(|source| PinError::Io {
            path: entry.path(),
            source,
        })?;
    }
    fs::remove_dir(dir).map_err(io_err)?;
    for parent in dir.ancestors().skip(1).take(2) {
        // Fails when not empty (another instance lives there): fine.
        if fs::remove_dir(parent).is_err() {
            break;
        }
    }
    Ok(())
}

/// The directory name of a node agent's datapath (one per host, serving
/// every enrolled namespace), next to the per-namespace ones.
pub const NODE_INSTANCE: &str = "node";

/// The pin directory of the node agent's datapath under one layout.
#[must_use]
pub fn node_dir(bpffs: &Path, fingerprint: &str) -> PathBuf {
    root(bpffs)
        .join(format!("layout-{fingerprint}"))
        .join(NODE_INSTANCE)
}

/// Whether an instance directory is a node agent's.
#[must_use]
pub fn is_node_instance(dir: &Path) -> bool {
    dir.file_name().is_some_and(|n| n == NODE_INSTANCE)
}

/// The node agent's directories under *other* layouts: stale, to remove.
#[must_use]
pub fn stale_node_instances(bpffs: &Path, fingerprint: &str) -> Vec<PathBuf> {
    stale(bpffs, fingerprint, NODE_INSTANCE)
}

/// The netns cookie an instance directory is for.
#[must_use]
pub fn instance_cookie(dir: &Path) -> Option<u64> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("netns-")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_paths() {
        let d = instance_dir(Path::new("/sys/fs/bpf"), "00ff", 42);
        assert_eq!(
            d,
            Path::new("/sys/fs/bpf/mesh-redirect/layout-00ff/netns-42")
        );
        assert_eq!(instance_cookie(&d), Some(42));
        assert_eq!(instance_cookie(Path::new("/x/layout-1")), None);
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
