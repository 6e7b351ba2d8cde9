//! `cgroup/getsockopt`: answer `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on the
//! proxy's end of a redirected connection, as netfilter would, and leave
//! every other option exactly as the kernel answered it.

use agent_common::{Counter, OrigDst, SockKey, net};
use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_netns_cookie, programs::SockoptContext,
};
use aya_log_ebpf::debug;

use crate::{INBOUND_STEERED, ORIG_DST_BY_TUPLE, counters::bump};

const SOL_IP: i32 = 0;
const SO_ORIGINAL_DST: i32 = 80;

/// The most of a reply the kernel hands a getsockopt program (x86-64).
const PAGE_SIZE: i32 = 4096;

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
    let ours = so.level == SOL_IP && so.optname == SO_ORIGINAL_DST;
    if ours && answer(ctx) {
        return;
    }
    // Pass through without clobbering anything another program attached to
    // the same hook may have answered before us (multi-attach): touch
    // optlen only where we must.
    // - More than a page: the kernel only gave us the first page; optlen 0
    //   hands the caller the kernel's own full reply (else EFAULT on older
    //   kernels; iptables' IPT_SO_GET_ENTRIES is the classic case).
    // - Our option, unanswered (retval < 0): optlen 0 keeps the caller's
    //   buffer untouched, as netfilter leaves it when it fails.
    if so.optlen > PAGE_SIZE || (ours && so.retval < 0) {
        clear_optlen(ctx.sockopt);
    }
}

/// `optlen = 0`, in a function of its own: inlined, the optimizer derives
/// the store's address from a pointer it already moved to the field for the
/// load above, and the verifier refuses stores through a modified context
/// pointer ("dereference of modified ctx ptr"). As a call, the context
/// arrives in r1 and the store is always `*(r1 + offset)`.
#[inline(never)]
fn clear_optlen(sockopt: *mut aya_ebpf::bindings::bpf_sockopt) {
    // SAFETY: the program's own context; optlen is writable.
    unsafe { core::ptr::write_volatile(&raw mut (*sockopt).optlen, 0) };
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
    if sk.family != net::AF_INET || sk.protocol != net::IPPROTO_TCP {
        return false;
    }
    // Each field read once, straight off the socket pointer: the verifier
    // refuses arithmetic on it, which LLVM may emit to re-read a field later.
    // SAFETY: `sk` is a valid socket; plain loads of its fields.
    let (src_ip4, src_port, dst_ip4, dst_port) = unsafe {
        (
            core::ptr::read_volatile(&raw const sk.src_ip4),
            core::ptr::read_volatile(&raw const sk.src_port),
            core::ptr::read_volatile(&raw const sk.dst_ip4),
            core::ptr::read_volatile(&raw const sk.dst_port),
        )
    };
    // SAFETY: helper call on our own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // The app's side of the connection: from the peer (app) to us (proxy).
    let app =
        SockKey::from_bpf_sock(netns, src_ip4, src_port, dst_ip4, u32::from(dst_port)).reversed();
    // SAFETY: copied out at once.
    let orig = if let Some(orig) = unsafe { ORIG_DST_BY_TUPLE.get(app) }.copied() {
        orig
    } else if INBOUND_STEERED.get_ptr(app.reversed()).is_some() {
        // Steered inbound by sk_lookup, no NAT: the original destination is
        // the socket's own local address.
        OrigDst::new(src_ip4, net::port_from_host_u32(src_port))
    } else {
        bump(Counter::GetsockoptMissed);
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
        family: net::SA_FAMILY_INET,
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
    bump(Counter::GetsockoptAnswered);
    debug!(
        ctx,
        "getsockopt: SO_ORIGINAL_DST {:i}:{}",
        u32::from_be(orig.ip4),
        orig.port
    );
    true
}
