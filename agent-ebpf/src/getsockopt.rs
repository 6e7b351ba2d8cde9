//! `cgroup/getsockopt`: answer the original destination on the proxy's end
//! of a redirected (or steered) connection, as netfilter would, and leave
//! every other option exactly as the kernel answered it:
//!
//! - `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on an `AF_INET` socket, or on a
//!   dual-stack `AF_INET6` one with v4-mapped addresses (Envoy and HAProxy
//!   ask so), for an IPv4 destination: a `sockaddr_in`;
//! - `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` on an `AF_INET6` socket
//!   for a native IPv6 destination: a `sockaddr_in6`.
//!
//! The other combinations fail as netfilter's would (the kernel's own
//! answer stands: there is no conntrack entry to find; where no conntrack
//! is loaded to say so, ENOENT as it would).

use agent_common::{Counter, OrigDst, SockKey, net};
use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sock, helpers::generated::bpf_get_netns_cookie,
    programs::SockoptContext,
};
use aya_log_ebpf::debug;

use crate::{INBOUND_STEERED, ORIG_DST_BY_TUPLE, counters::bump};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` are both 80.
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
const _: () = assert!(core::mem::size_of::<SockaddrIn>() == 16);

/// `struct sockaddr_in6`, as netfilter's `ipv6_getorigdst()` fills it.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    /// Network order.
    port: u16,
    flowinfo: u32,
    /// Network order.
    addr: [u32; 4],
    scope_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockaddrIn6>() == 28);

/// Which option is asked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Asked {
    V4,
    V6,
}

#[inline(always)]
pub fn getsockopt(ctx: &SockoptContext) {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let so = unsafe { &mut *ctx.sockopt };
    let asked = match (so.level, so.optname) {
        (SOL_IP, SO_ORIGINAL_DST) => Some(Asked::V4),
        (SOL_IPV6, SO_ORIGINAL_DST) => Some(Asked::V6),
        _ => None,
    };
    if let Some(asked) = asked
        && answer(ctx, asked)
    {
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
    if so.optlen > PAGE_SIZE || (asked.is_some() && so.retval < 0) {
        clear_optlen(ctx.sockopt);
    }
    // Our option on a socket netfilter does not know: with conntrack loaded
    // (always, under iptables) the kernel says ENOENT; without it, no
    // handler at all, ENOPROTOOPT. Answer as iptables mode would.
    if asked.is_some() && so.retval == -ENOPROTOOPT {
        set_retval(ctx.sockopt, -ENOENT);
    }
}

const ENOENT: i32 = 2;
const ENOPROTOOPT: i32 = 92;

/// `retval = v`, a call for the same reason as [`clear_optlen`].
#[inline(never)]
fn set_retval(sockopt: *mut aya_ebpf::bindings::bpf_sockopt, v: i32) {
    // SAFETY: the program's own context; retval is writable.
    unsafe { core::ptr::write_volatile(&raw mut (*sockopt).retval, v) };
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

/// The socket's own tuple, each field read once, straight off the socket
/// pointer: the verifier refuses arithmetic on it, which LLVM may emit to
/// re-read a field later.
#[inline(always)]
fn own_key(netns: u64, sk: *const bpf_sock, family: u32) -> SockKey {
    // SAFETY: `sk` is a valid socket; plain loads of its fields, every one
    // whatever the family (see `ctx`).
    unsafe {
        let src4 = core::ptr::read_volatile(&raw const (*sk).src_ip4);
        let dst4 = core::ptr::read_volatile(&raw const (*sk).dst_ip4);
        let src6 = crate::ctx::words(&raw const (*sk).src_ip6);
        let dst6 = crate::ctx::words(&raw const (*sk).dst_ip6);
        SockKey::from_bpf_sock(
            netns,
            crate::ctx::pick(family, src4, src6),
            core::ptr::read_volatile(&raw const (*sk).src_port),
            crate::ctx::pick(family, dst4, dst6),
            u32::from(core::ptr::read_volatile(&raw const (*sk).dst_port)),
        )
    }
}

/// Fills in the original destination if this socket is the proxy's end of a
/// redirected or steered connection and `asked` is the option netfilter
/// would answer for it. `false`: not ours, the kernel's answer stands.
#[inline(always)]
fn answer(ctx: &SockoptContext, asked: Asked) -> bool {
    // SAFETY: valid context.
    let so = unsafe { &mut *ctx.sockopt };
    // SAFETY: `sk` is the socket getsockopt was called on.
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: checked non-null; plain loads.
    let (family, protocol) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sk).family),
            core::ptr::read_volatile(&raw const (*sk).protocol),
        )
    };
    if protocol != net::IPPROTO_TCP || (family != net::AF_INET && family != net::AF_INET6) {
        return false;
    }
    // SAFETY: helper call on our own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let own = own_key(netns, sk, family);
    // The app's side of the connection: from the peer (app) to us (proxy).
    let app = own.reversed();
    // SAFETY: copied out at once.
    let orig = if let Some(orig) = unsafe { ORIG_DST_BY_TUPLE.get(app) }.copied() {
        orig
    } else if INBOUND_STEERED.get_ptr(own).is_some() {
        // Steered inbound by sk_lookup, no NAT: the original destination is
        // the socket's own local address.
        OrigDst::new(own.src_ip, own.src_port)
    } else {
        bump(match asked {
            Asked::V4 => Counter::GetsockoptMissed,
            Asked::V6 => Counter::GetsockoptMissed6,
        });
        return false;
    };
    // netfilter answers SOL_IP for IPv4 connections (on either socket
    // family), SOL_IPV6 for IPv6 ones, and fails the others.
    if (asked == Asked::V4) != orig.is_v4() || (asked == Asked::V6 && family != net::AF_INET6) {
        return false;
    }
    // SAFETY: valid context.
    let (start, end) = unsafe { (so.__bindgen_anon_2.optval, so.__bindgen_anon_3.optval_end) };
    let start = start.cast::<u8>();
    let len = match asked {
        Asked::V4 => core::mem::size_of::<SockaddrIn>(),
        Asked::V6 => core::mem::size_of::<SockaddrIn6>(),
    };
    // The caller's buffer is too small: netfilter says EINVAL, the kernel
    // already did; keep its answer.
    // SAFETY: pointer arithmetic only, bounds-checked against optval_end next.
    if unsafe { start.add(len) } > end.cast::<u8>() {
        return false;
    }
    match asked {
        Asked::V4 => {
            let reply = SockaddrIn {
                family: net::SA_FAMILY_INET,
                port: orig.port.to_be(),
                addr: orig.ip[3],
                zero: [0; 8],
            };
            // SAFETY: 16 bytes checked above.
            unsafe { core::ptr::write_unaligned(start.cast::<SockaddrIn>(), reply) };
        }
        Asked::V6 => {
            let reply = SockaddrIn6 {
                family: net::SA_FAMILY_INET6,
                port: orig.port.to_be(),
                flowinfo: 0,
                addr: orig.ip,
                scope_id: 0,
            };
            // SAFETY: 28 bytes checked above.
            unsafe { core::ptr::write_unaligned(start.cast::<SockaddrIn6>(), reply) };
        }
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "16 or 28"
    )]
    let optlen = len as i32;
    // Separate 4-byte stores: the verifier rejects a merged 8-byte write
    // across optlen and retval, which the optimizer would otherwise emit.
    // SAFETY: writable fields of our context.
    unsafe {
        core::ptr::write_volatile(&raw mut so.optlen, optlen);
        core::ptr::write_volatile(&raw mut so.retval, 0);
    }
    bump(match asked {
        Asked::V4 => Counter::GetsockoptAnswered,
        Asked::V6 => Counter::GetsockoptAnswered6,
    });
    debug!(ctx, "getsockopt: original destination :{}", orig.port);
    true
}
