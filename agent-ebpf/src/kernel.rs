//! Reading the kernel's own socket structures, at offsets the agent took
//! from the running kernel's BTF (`KERNEL_LAYOUT`): whether a socket's
//! reader can block, how much receive memory it holds, how far its TCP
//! streams are, whether its sockmap ingress queue is empty.
//!
//! Every read goes through `bpf_probe_read_kernel` from an address stored
//! when the socket joined the map, and is believed only after the socket's
//! cookie at that address matched: a freed and reused `struct sock` reads
//! as another socket, and then as "unknown", never as a wrong answer.

use agent_common::{KernelLayout, O_NONBLOCK};
use aya_ebpf::{bindings::bpf_sock, helpers::bpf_probe_read_kernel};

use crate::ADDRESS_SCRATCH;

/// The address of the socket behind a context's socket pointer, as a plain
/// number. The verifier refuses arithmetic on a socket pointer; stored in a
/// map and read back, the value is a scalar (root may see addresses).
#[inline(always)]
pub fn address(sk: *mut bpf_sock) -> Option<u64> {
    let slot = ADDRESS_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of a per-CPU array; written, then read back.
    unsafe {
        core::ptr::write_volatile(slot, sk as u64);
        Some(core::ptr::read_volatile(slot))
    }
}

/// The layout the loader set.
#[inline(always)]
pub fn layout() -> KernelLayout {
    // SAFETY: a read-only global, set before load.
    unsafe { core::ptr::read_volatile(&raw const crate::KERNEL_LAYOUT) }
}

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    // SAFETY: a probe read: a bad address fails, it never faults.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.ok()
}

#[inline(always)]
fn read_u32(addr: u64) -> Option<u32> {
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel(addr as *const u32) }.ok()
}

/// A socket in the map, seen from another program.
#[derive(Clone, Copy)]
pub struct Sock {
    addr: u64,
}

impl Sock {
    /// The socket at `addr`, if it still is the one with `cookie`.
    #[inline(always)]
    pub fn checked(l: &KernelLayout, addr: u64, cookie: u64) -> Option<Self> {
        (read_u64(addr + u64::from(l.sock_cookie))? == cookie).then_some(Self { addr })
    }

    /// The socket a program runs for (its address came with the context).
    #[inline(always)]
    pub const fn own(addr: u64) -> Self {
        Self { addr }
    }

    /// Whether its reads never block: `Some(true)` if its file is
    /// `O_NONBLOCK`, `Some(false)` if blocking, `None` if it has no file
    /// yet (accepted by nobody so far) or it could not be read.
    #[inline(always)]
    pub fn nonblocking(self, l: &KernelLayout) -> Option<bool> {
        let socket = read_u64(self.addr + u64::from(l.sock_socket))?;
        if socket == 0 {
            return None;
        }
        let file = read_u64(socket + u64::from(l.socket_file))?;
        if file == 0 {
            return None;
        }
        let flags = read_u32(file + u64::from(l.file_flags))?;
        Some(flags & O_NONBLOCK != 0)
    }

    /// Receive memory it holds: its TCP receive queue and, since the
    /// kernel charges it there, its sockmap ingress queue.
    #[inline(always)]
    pub fn rmem(self, l: &KernelLayout) -> Option<u32> {
        read_u32(self.addr + u64::from(l.sock_rmem_alloc))
    }

    /// Everything that came in over TCP has been read.
    #[inline(always)]
    pub fn tcp_read_all(self, l: &KernelLayout) -> Option<bool> {
        let copied = read_u32(self.addr + u64::from(l.tcp_copied_seq))?;
        let rcv_nxt = read_u32(self.addr + u64::from(l.tcp_rcv_nxt))?;
        Some(copied == rcv_nxt)
    }

    /// Everything it wrote to TCP has been acknowledged (is with the peer).
    #[inline(always)]
    pub fn tcp_sent_all(self, l: &KernelLayout) -> Option<bool> {
        let write_seq = read_u32(self.addr + u64::from(l.tcp_write_seq))?;
        let snd_una = read_u32(self.addr + u64::from(l.tcp_snd_una))?;
        Some(write_seq == snd_una)
    }

    /// Its sockmap ingress queue is empty (the psock's `ingress_msg` list
    /// points at itself).
    #[inline(always)]
    pub fn ingress_empty(self, l: &KernelLayout) -> Option<bool> {
        // The low bits of `sk_user_data` are flags (NOCOPY, BPF, PSOCK).
        let psock = read_u64(self.addr + u64::from(l.sock_user_data))? & !7;
        if psock == 0 {
            return Some(true);
        }
        let head = psock + u64::from(l.psock_ingress_msg);
        Some(read_u64(head)? == head)
    }
}
