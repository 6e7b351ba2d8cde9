//! The few raw `bpf(2)` commands aya does not expose publicly: loading a
//! trivial program of a given type (feature probes), creating a link,
//! querying what is attached to a cgroup / netns / map, and naming programs
//! by id. All `unsafe` for these lives here.
//!
//! `bpf_attr` is a union of per-command structs; each command below fills
//! its own struct at the offsets of `include/uapi/linux/bpf.h`.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsFd, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
/// `BPF_EXIST`: update only an entry that is there.
const F_EXIST: u64 = 2;
const BPF_PROG_LOAD: u32 = 5;
const BPF_PROG_ATTACH: u32 = 8;
const BPF_PROG_DETACH: u32 = 9;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_PROG_QUERY: u32 = 16;
const BPF_OBJ_PIN: u32 = 6;
const BPF_OBJ_GET: u32 = 7;
const BPF_LINK_CREATE: u32 = 28;
const BPF_LINK_UPDATE: u32 = 29;

/// Program types (`enum bpf_prog_type`).
pub mod prog_type {
    pub const SOCKET_FILTER: u32 = 1;
    pub const SOCK_OPS: u32 = 13;
    pub const SK_MSG: u32 = 16;
    pub const CGROUP_SOCK_ADDR: u32 = 18;
    pub const CGROUP_SOCKOPT: u32 = 25;
    pub const SK_LOOKUP: u32 = 30;
}

/// Attach types (`enum bpf_attach_type`).
pub mod attach_type {
    pub const CGROUP_SOCK_OPS: u32 = 3;
    pub const SK_MSG_VERDICT: u32 = 7;
    pub const CGROUP_INET4_CONNECT: u32 = 10;
    pub const CGROUP_GETSOCKOPT: u32 = 21;
    pub const CGROUP_INET4_GETPEERNAME: u32 = 29;
    pub const SK_LOOKUP: u32 = 36;
}

/// Map types (`enum bpf_map_type`).
pub mod map_type {
    pub const SOCKHASH: u32 = 18;
}

/// `BPF_F_ALLOW_MULTI`.
pub const F_ALLOW_MULTI: u32 = 1 << 1;

#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

fn sys_bpf(cmd: u32, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, writable 128-byte bpf_attr; the size passed
    // matches it. Pointers stored inside point to live buffers of the caller.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            libc::c_long::from(cmd.cast_signed()),
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn fd_result(ret: i64) -> OwnedFd {
    // SAFETY: the kernel returned a fresh file descriptor that we now own.
    unsafe { OwnedFd::from_raw_fd(RawFd::try_from(ret).expect("fd fits in RawFd")) }
}

/// A verifier rejection or other load failure, with the verifier's words.
#[derive(Debug, thiserror::Error)]
#[error("{source}{}", if log.is_empty() { String::new() } else { format!(": {log}") })]
pub struct LoadError {
    pub source: io::Error,
    pub log: String,
}

/// Loads a minimal program: optionally one helper call (with the context in
/// r1, as every helper we probe takes it), then `r0 = ret; exit`.
pub fn load_probe_program(
    prog_type: u32,
    expected_attach_type: u32,
    helper: Option<i32>,
    ret: i32,
) -> Result<OwnedFd, LoadError> {
    // BPF_CALL imm=helper; BPF_MOV64_IMM r0, ret; BPF_EXIT
    let mut insns: Vec<u64> = Vec::new();
    let insn = |code: u8, regs: u8, off: i16, imm: i32| -> u64 {
        u64::from(code)
            | (u64::from(regs) << 8)
            | (u64::from(off.cast_unsigned()) << 16)
            | (u64::from(imm.cast_unsigned()) << 32)
    };
    if let Some(h) = helper {
        insns.push(insn(0x85, 0, 0, h));
    }
    insns.push(insn(0xb7, 0, 0, ret));
    insns.push(insn(0x95, 0, 0, 0));
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut attr = Attr::new();
    attr.u32(0, prog_type)
        .u32(4, u32::try_from(insns.len()).expect("few insns"))
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, u32::try_from(log.len()).expect("4 KiB"))
        .u64(32, log.as_mut_ptr() as u64)
        .u32(68, expected_attach_type);
    match sys_bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd_result(fd)),
        Err(source) => {
            let log = CStr::from_bytes_until_nul(&log)
                .map(|c| c.to_string_lossy().trim().to_owned())
                .unwrap_or_default();
            Err(LoadError { source, log })
        }
    }
}

/// Creates a map (feature probe for map types).
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, map_type)
        .u32(4, key_size)
        .u32(8, value_size)
        .u32(12, max_entries);
    sys_bpf(BPF_MAP_CREATE, &mut attr).map(fd_result)
}

/// `BPF_MAP_UPDATE_ELEM` with `BPF_EXIST`: sets the value of an entry that
/// is there (`ENOENT` otherwise). `key` and `value` must have the map's
/// sizes.
pub fn map_update_existing(map: impl AsFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, raw(&map))
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_ptr() as u64)
        .u64(24, F_EXIST);
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// `BPF_LINK_CREATE` of `prog` on `target` (a cgroup or netns fd).
pub fn link_create(prog: impl AsFd, target: impl AsFd, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, raw(&prog))
        .u32(4, raw(&target))
        .u32(8, attach_type);
    sys_bpf(BPF_LINK_CREATE, &mut attr).map(fd_result)
}

fn c_path(path: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// `BPF_OBJ_PIN`: pins a map, program or link at `path` on a bpffs.
pub fn obj_pin(fd: impl AsFd, path: &std::path::Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = Attr::new();
    attr.u64(0, c.as_ptr() as u64).u32(8, raw(&fd));
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// `BPF_OBJ_GET`: opens what is pinned at `path`.
pub fn obj_get(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = Attr::new();
    attr.u64(0, c.as_ptr() as u64);
    sys_bpf(BPF_OBJ_GET, &mut attr).map(fd_result)
}

/// `BPF_LINK_UPDATE`: atomically replaces the program behind a link.
pub fn link_update(link: impl AsFd, new_prog: impl AsFd) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, raw(&link)).u32(4, raw(&new_prog));
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Legacy `BPF_PROG_ATTACH` (sk_msg programs attach to a sockmap this way).
pub fn prog_attach(
    prog: impl AsFd,
    target: impl AsFd,
    attach_type: u32,
    flags: u32,
) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, raw(&target))
        .u32(4, raw(&prog))
        .u32(8, attach_type)
        .u32(12, flags);
    sys_bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

/// Legacy `BPF_PROG_DETACH` of one program.
pub fn prog_detach(prog: impl AsFd, target: impl AsFd, attach_type: u32) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, raw(&target))
        .u32(4, raw(&prog))
        .u32(8, attach_type);
    sys_bpf(BPF_PROG_DETACH, &mut attr).map(|_| ())
}

fn raw(fd: &impl AsFd) -> u32 {
    u32::try_from(fd.as_fd().as_raw_fd()).expect("fds are non-negative")
}

/// The ids of the programs attached to `target` (a cgroup, netns or map fd)
/// for `attach_type`, as the kernel reports them (`BPF_PROG_QUERY`).
pub fn prog_query(target: impl AsFd, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = Attr::new();
        attr.u32(0, raw(&target))
            .u32(4, attach_type)
            .u64(16, ids.as_mut_ptr() as u64)
            .u32(24, u32::try_from(ids.len()).expect("small"));
        match sys_bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                let n = attr.get_u32(24) as usize;
                ids.truncate(n);
                return Ok(ids);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                let n = attr.get_u32(24) as usize;
                ids = vec![0; n.max(ids.len() * 2)];
            }
            Err(e) => return Err(e),
        }
    }
}

/// The name and type of a loaded program, by id.
pub fn prog_name_by_id(id: u32) -> io::Result<(String, u32)> {
    let mut attr = Attr::new();
    attr.u32(0, id);
    let fd = fd_result(sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?);
    // bpf_prog_info: type @0, name[16] @64. 240 bytes covers both.
    let mut info = [0u8; 240];
    let mut attr = Attr::new();
    attr.u32(0, raw(&fd))
        .u32(4, u32::try_from(info.len()).expect("small"))
        .u64(8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let prog_type = u32::from_ne_bytes(info[0..4].try_into().expect("4 bytes"));
    let name = CStr::from_bytes_until_nul(&info[64..80])
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((name, prog_type))
}

/// The names of the programs attached to `target` for `attach_type`.
pub fn attached_names(target: impl AsFd, attach_type: u32) -> io::Result<Vec<String>> {
    prog_query(target, attach_type)?
        .into_iter()
        .map(|id| prog_name_by_id(id).map(|(name, _)| name))
        .collect()
}
