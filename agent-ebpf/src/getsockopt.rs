//! `cgroup/getsockopt`: answer `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on the
//! proxy's end of a redirected connection, as netfilter would, and leave
//! every other option exactly as the kernel answered it.

use agent_common::{SockKey, counter, net};
use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_netns_cookie, programs::SockoptContext,
};
use aya_log_ebpf::debug;

use crate::{ORIG_DST_BY_TUPLE, counters::bump};

const SOL_IP: i32 = 0;
const SO_ORIGINAL_DST: i32 = 80;
const AF_INET: u32 = 2;
const AF_INET_U16: u16 = 2;
const IPPROTO_TCP: u32 = 6;

/// `struct sockaddr_in`, as netfilter's `getorigdst()` fills it.
#[repr(C)]
struct SockaddrIn {
    /// Host order.
    family: u16,
    /// Network order.
    port: u16,
    /// Network order.
    addr: u32,
    zero: [u8; 8],
}
const SOCKADDR_IN_LEN: usize = core::mem::size_of::<SockaddrIn>();
const _: () = assert!(SOCKADDR_IN_LEN == 16);
const SOCKADDR_IN_LEN_I32: i32 = 16;

#[inline(always)]
pub fn getsockopt(ctx: &SockoptContext) {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let so = unsafe { &mut *ctx.sockopt };
    if !(so.level == SOL_IP && so.optname == SO_ORIGINAL_DST && answer(ctx)) {
        // optlen 0: the caller gets the kernel's own buffer and length back,
        // untouched. This is also what keeps options larger than a page
        // (iptables' IPT_SO_GET_ENTRIES) from failing with EFAULT.
        // SAFETY: writable field of our context.
        unsafe { core::ptr::write_volatile(&raw mut so.optlen, 0) };
    }
}

/// Fills in the original destination if this socket is the proxy's end of a
/// redirected connection. `false`: not ours, the kernel's answer stands.
#[inline(always)]
fn answer(ctx: &SockoptContext) -> bool {
    // SAFETY: valid context.
    let so = unsafe { &mut *ctx.sockopt };
    // SAFETY: `sk` is the socket getsockopt was called on.
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: checked non-null.
    let sk = unsafe { &*sk };
    if sk.family != AF_INET || sk.protocol != IPPROTO_TCP {
        return false;
    }
    // SAFETY: helper call on our own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // The app's side of the connection: from the peer (app) to us (proxy).
    let app = SockKey::new(
        netns,
        sk.dst_ip4,
        net::port_from_be_lower(u32::from(sk.dst_port)),
        sk.src_ip4,
        net::port_from_host_u32(sk.src_port),
    );
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { ORIG_DST_BY_TUPLE.get(app) }).copied() else {
        bump(counter::GETSOCKOPT_MISSED);
        return false;
    };
    // SAFETY: valid context.
    let (start, end) = unsafe { (so.__bindgen_anon_2.optval, so.__bindgen_anon_3.optval_end) };
    let start = start.cast::<u8>();
    // The caller's buffer is too small for a sockaddr_in: netfilter says
    // EINVAL, the kernel already did; keep its answer.
    // SAFETY: pointer arithmetic only, bounds-checked against optval_end next.
    if unsafe { start.add(SOCKADDR_IN_LEN) } > end.cast::<u8>() {
        return false;
    }
    let reply = SockaddrIn {
        family: AF_INET_U16,
        port: orig.port.to_be(),
        addr: orig.ip4,
        zero: [0; 8],
    };
    // SAFETY: 16 bytes checked above.
    unsafe { core::ptr::write_unaligned(start.cast::<SockaddrIn>(), reply) };
    // Separate 4-byte stores: the verifier rejects a merged 8-byte write
    // across optlen and retval, which the optimizer would otherwise emit.
    // SAFETY: writable fields of our context.
    unsafe {
        core::ptr::write_volatile(&raw mut so.optlen, SOCKADDR_IN_LEN_I32);
        core::ptr::write_volatile(&raw mut so.retval, 0);
    }
    bump(counter::GETSOCKOPT_ANSWERED);
    debug!(
        ctx,
        "getsockopt: SO_ORIGINAL_DST {:i}:{}",
        u32::from_be(orig.ip4),
        orig.port
    );
    true
}
