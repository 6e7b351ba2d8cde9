//! Another tool's eBPF program: a pass-through program of a given type
//! (`r0 = 1; exit`), loaded and linked to a cgroup with raw bpf(2) calls,
//! so a test can prove ours run beside it and never replace it.

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use aya_obj::generated::{bpf_attach_type, bpf_prog_type};

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: a valid 128-byte bpf_attr whose pointers outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128usize) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, ours.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(ret).expect("an fd")) })
}

fn put(attr: &mut [u8; 128], off: usize, bytes: &[u8]) {
    attr[off..off + bytes.len()].copy_from_slice(bytes);
}

/// A program that lets everything through, of type `prog` for `attach`.
pub fn pass_through(prog: bpf_prog_type, attach: bpf_attach_type) -> io::Result<OwnedFd> {
    // BPF_MOV64_IMM r0, 1; BPF_EXIT
    let insns: [u64; 2] = [0xb7 | (1 << 32), 0x95];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &(prog as u32).to_ne_bytes());
    put(&mut attr, 4, &2u32.to_ne_bytes());
    put(&mut attr, 8, &(insns.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
    // sock_ops programs take no expected attach type.
    if prog != bpf_prog_type::BPF_PROG_TYPE_SOCK_OPS {
        put(&mut attr, 68, &(attach as u32).to_ne_bytes());
    }
    sys_bpf(5, &mut attr) // BPF_PROG_LOAD
}

/// `BPF_LINK_CREATE` of `prog` on `target` (a cgroup).
pub fn link(prog: &impl AsFd, target: &impl AsFd, attach: bpf_attach_type) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    let fd = |f: &dyn AsFd| {
        u32::try_from(f.as_fd().as_raw_fd())
            .expect("an fd")
            .to_ne_bytes()
    };
    put(&mut attr, 0, &fd(prog));
    put(&mut attr, 4, &fd(target));
    put(&mut attr, 8, &(attach as u32).to_ne_bytes());
    sys_bpf(28, &mut attr) // BPF_LINK_CREATE
}
