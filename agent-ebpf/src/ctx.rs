//! Reading an address out of a BPF context or a `bpf_sock`, for a socket of
//! either family.
//!
//! The verifier is strict here: it accepts only 4-byte loads of these
//! fields (copying the array lets LLVM merge them into 8-byte ones), and
//! only at a constant offset from the context or socket pointer. Reading
//! the IPv4 field in one branch and the IPv6 one in another lets LLVM merge
//! the branches into one load at a computed offset, "pointer arithmetic on
//! sock prohibited". So where the family is only known at run time, both
//! fields are read, unconditionally, each word on its own, and the family
//! picks ([`pick`]).

use agent_common::net::IpRaw;

/// The raw address of a socket of family `family` (`AF_INET` or
/// `AF_INET6`), from both of its fields, already read.
#[inline(always)]
pub fn pick(family: u32, ip4: u32, ip6: IpRaw) -> IpRaw {
    if family == agent_common::net::AF_INET {
        agent_common::net::mapped(ip4)
    } else {
        ip6
    }
}

/// The four words at `p`, one 4-byte load each.
#[inline(always)]
pub fn words(p: *const [u32; 4]) -> IpRaw {
    let p = p.cast::<u32>();
    // SAFETY: `p` points to four readable u32 fields of a context the
    // kernel handed us; each is read once, with its own size.
    unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}
