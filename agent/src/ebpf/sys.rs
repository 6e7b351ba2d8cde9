//! The bpf(2) commands aya 0.14 does not expose, and nothing else:
//!
//! - `BPF_LINK_UPDATE` (an adopting agent swaps the program behind a pinned
//!   link in place, with no moment off the hook), on a link opened from its
//!   pin (`BPF_OBJ_GET`);
//! - `BPF_LINK_CREATE` and `BPF_OBJ_PIN` for the cgroup getsockopt link,
//!   whose aya link type cannot become a pinnable `FdLink`;
//! - `BPF_PROG_QUERY`: what is attached to a cgroup, netns or socket map.
//!
//! Each command fills its own struct of the `bpf_attr` union at the offsets
//! of `include/uapi/linux/bpf.h`. All `unsafe` for these lives here.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const OBJ_PIN: libc::c_long = 6;
const OBJ_GET: libc::c_long = 7;
const PROG_QUERY: libc::c_long = 16;
const LINK_CREATE: libc::c_long = 28;
const LINK_UPDATE: libc::c_long = 29;

/// A `bpf_attr`, filled field by field: `(offset, bytes)`.
fn sys_bpf(cmd: libc::c_long, fields: &[(usize, &[u8])], out: Option<&mut u32>) -> io::Result<i64> {
    #[repr(C, align(8))]
    struct Attr([u8; 128]);
    let mut attr = Attr([0; 128]);
    for (off, bytes) in fields {
        attr.0[*off..*off + bytes.len()].copy_from_slice(bytes);
    }
    // SAFETY: a valid, writable 128-byte bpf_attr; the pointers in it point
    // to buffers the caller keeps alive for the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), 128usize) };
    if let Some(out) = out {
        // PROG_QUERY's prog_cnt (in and out) is at offset 24.
        *out = u32::from_ne_bytes(attr.0[24..28].try_into().expect("4 bytes"));
    }
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn fd_bytes(fd: &impl AsFd) -> [u8; 4] {
    u32::try_from(fd.as_fd().as_raw_fd())
        .expect("fds are non-negative")
        .to_ne_bytes()
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel returned a fresh descriptor that we now own.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("an fd")) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// `BPF_OBJ_GET`: a descriptor of what is pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    sys_bpf(OBJ_GET, &[(0, &(c.as_ptr() as u64).to_ne_bytes())], None).map(owned)
}

/// `BPF_OBJ_PIN`: pins `fd` at `path` on a bpffs.
pub fn obj_pin(fd: &impl AsFd, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let fields: [(usize, &[u8]); 2] = [(0, &(c.as_ptr() as u64).to_ne_bytes()), (8, &fd_bytes(fd))];
    sys_bpf(OBJ_PIN, &fields, None).map(|_| ())
}

/// `BPF_LINK_CREATE` of `prog` on `target` for `attach_type`.
pub fn link_create(prog: &impl AsFd, target: &impl AsFd, attach_type: u32) -> io::Result<OwnedFd> {
    let fields: [(usize, &[u8]); 3] = [
        (0, &fd_bytes(prog)),
        (4, &fd_bytes(target)),
        (8, &attach_type.to_ne_bytes()),
    ];
    sys_bpf(LINK_CREATE, &fields, None).map(owned)
}

/// `BPF_LINK_UPDATE`: atomically replaces the program behind a link.
pub fn link_update(link: &impl AsFd, new_prog: &impl AsFd) -> io::Result<()> {
    let fields: [(usize, &[u8]); 2] = [(0, &fd_bytes(link)), (4, &fd_bytes(new_prog))];
    sys_bpf(LINK_UPDATE, &fields, None).map(|_| ())
}

/// `BPF_PROG_QUERY`: the ids of the programs attached to `target` (a cgroup,
/// netns or socket-map descriptor) for `attach_type`.
pub fn prog_query(target: &impl AsFd, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut count = u32::try_from(ids.len()).expect("small");
        let fields: [(usize, &[u8]); 4] = [
            (0, &fd_bytes(target)),
            (4, &attach_type.to_ne_bytes()),
            (16, &(ids.as_mut_ptr() as u64).to_ne_bytes()),
            (24, &count.to_ne_bytes()),
        ];
        match sys_bpf(PROG_QUERY, &fields, Some(&mut count)) {
            Ok(_) => {
                ids.truncate(count as usize);
                return Ok(ids);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                ids = vec![0; (count as usize).max(ids.len() * 2)];
            }
            Err(e) => return Err(e),
        }
    }
}
