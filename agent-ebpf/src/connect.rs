//! `cgroup/connect4` and `cgroup/connect6`: rewrite the connects of served
//! namespaces to the proxy, remembering the original destination by socket
//! cookie (sockops moves it to the connection's tuple once established).
//!
//! - TCP to a captured destination goes to the outbound port: 127.0.0.1
//!   for an IPv4 destination, also from an `AF_INET6` socket connecting to
//!   a v4-mapped address (`::ffff:127.0.0.1`, the proxy's IPv4 listener),
//!   and `::1` for a native IPv6 one. The rules (`rules::outbound`) are the
//!   same for both families: IPv4 rules decide a v4-mapped destination.
//! - With DNS capture, UDP and TCP to port 53 of a resolver go to the DNS
//!   proxy on the same loopback address (`rules::dns`); a connected UDP
//!   socket's resolver is remembered for its replies (`dns_reply`).

use agent_common::{Counter, NetnsConfig, OrigDst, flags, net};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock_addr, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release,
    },
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;

use crate::{
    DNS_ORIG_BY_COOKIE, NETNS_CONFIG, ORIG_DST_BY_COOKIE,
    counters::bump,
    rules::{self, Dns, Outbound},
};

/// Which family's fields a `bpf_sock_addr` carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The destination a `sock_addr` context carries (raw, IPv4 v4-mapped).
#[inline(always)]
pub fn destination(sa: &bpf_sock_addr, family: Family) -> (net::IpRaw, u16) {
    let ip = match family {
        Family::V4 => net::mapped(sa.user_ip4),
        Family::V6 => crate::ctx::words(&raw const sa.user_ip6),
    };
    (ip, net::port_from_be_lower(sa.user_port))
}

/// Points a `sock_addr` context at `ip:port` (loopback of the destination's
/// family, in the socket's own form).
#[inline(always)]
pub fn rewrite(sa: &mut bpf_sock_addr, family: Family, ip: net::IpRaw, port: u16) {
    match family {
        Family::V4 => sa.user_ip4 = ip[3],
        Family::V6 => {
            // One 4-byte store per word: what every kernel's verifier
            // accepts for user_ip6.
            sa.user_ip6[0] = ip[0];
            sa.user_ip6[1] = ip[1];
            sa.user_ip6[2] = ip[2];
            sa.user_ip6[3] = ip[3];
        }
    }
    sa.user_port = net::port_to_be_lower(port);
}

/// The loopback address a destination is sent to: 127.0.0.1 (v4-mapped
/// from an IPv6 socket) for IPv4, `::1` for IPv6.
#[inline(always)]
pub const fn loopback_for(dst: &net::IpRaw) -> net::IpRaw {
    if net::is_mapped(dst) {
        net::mapped(net::LOCALHOST)
    } else {
        net::LOCALHOST6
    }
}

#[inline(always)]
pub fn connect(ctx: &SockAddrContext, family: Family) {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    let want = match family {
        Family::V4 => net::AF_INET,
        Family::V6 => net::AF_INET6,
    };
    if sa.user_family != want {
        return;
    }
    let stream = sa.type_ == net::SOCK_STREAM;
    if !stream && sa.type_ != net::SOCK_DGRAM {
        return;
    }
    // SAFETY: helper call on our own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(cfg) = (unsafe { NETNS_CONFIG.get(netns) }).copied() else {
        return;
    };
    let (dst_ip, dst_port) = destination(sa, family);
    match rules::dns(netns, &cfg, &dst_ip, dst_port, || is_proxy(sa, &cfg)) {
        Dns::Capture => return redirect_dns(ctx, sa, family, &cfg, dst_ip, dst_port, stream),
        Dns::Bypass => {
            bump(Counter::DnsBypassed);
            return;
        }
        Dns::Other => {}
    }
    if !stream || !cfg.has(flags::REDIRECT_OUTBOUND) {
        return;
    }
    let v4 = net::is_mapped(&dst_ip);
    match rules::outbound(netns, &cfg, &dst_ip, dst_port, || is_proxy(sa, &cfg)) {
        Outbound::Capture => {}
        Outbound::Ignore => return,
        Outbound::Bypass => {
            bump(if v4 {
                Counter::ConnectBypassed
            } else {
                Counter::ConnectBypassed6
            });
            return;
        }
    }
    let proxy = loopback_for(&dst_ip);
    if cfg.has(flags::FAIL_OPEN) && !listening(ctx, &proxy, cfg.outbound_port) {
        bump(Counter::ConnectFailOpen);
        return;
    }
    // SAFETY: helper call on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_DST_BY_COOKIE
        .insert(cookie, OrigDst::new(dst_ip, dst_port), 0)
        .is_err()
    {
        // Without the original destination the proxy could not forward:
        // leave the connect alone rather than break it.
        bump(Counter::ConnectStoreFailed);
        return;
    }
    rewrite(sa, family, proxy, cfg.outbound_port);
    bump(match (family, v4) {
        (Family::V4, _) => Counter::ConnectRedirected,
        (Family::V6, true) => Counter::ConnectRedirectedMapped,
        (Family::V6, false) => Counter::ConnectRedirected6,
    });
    if v4 {
        debug!(
            ctx,
            "connect4: {:i}:{} redirected to 127.0.0.1:{}",
            u32::from_be(dst_ip[3]),
            dst_port,
            cfg.outbound_port
        );
    } else {
        debug!(
            ctx,
            "connect6: [{:i}]:{} redirected to [::1]:{}",
            net::ip6_octets(&dst_ip),
            dst_port,
            cfg.outbound_port
        );
    }
}

/// A DNS query (TCP, or connected UDP) goes to the DNS proxy. A TCP one is
/// remembered like any captured connect (sockops short-circuits it); a UDP
/// socket's resolver is remembered so its replies look like the resolver's.
#[inline(always)]
fn redirect_dns(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    family: Family,
    cfg: &NetnsConfig,
    dst_ip: net::IpRaw,
    dst_port: u16,
    stream: bool,
) {
    // SAFETY: helper call on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst::new(dst_ip, dst_port);
    let stored = if stream {
        ORIG_DST_BY_COOKIE.insert(cookie, orig, 0)
    } else {
        DNS_ORIG_BY_COOKIE.insert(cookie, orig, 0)
    };
    if stored.is_err() {
        bump(Counter::DnsStoreFailed);
        return;
    }
    rewrite(sa, family, loopback_for(&dst_ip), cfg.dns_port);
    bump(Counter::DnsRedirected);
}

/// The IPv4 and IPv6 parts of `bpf_sock_tuple`.
const TUPLE4_SIZE: u32 = 12;
const TUPLE6_SIZE: u32 = 36;
const _: () = assert!(
    core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() == TUPLE4_SIZE as usize
);
const _: () = assert!(
    core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>() == TUPLE6_SIZE as usize
);

/// Whether a socket listens on `ip:port` (a loopback address) in this
/// namespace.
#[inline(always)]
fn listening(ctx: &SockAddrContext, ip: &net::IpRaw, port: u16) -> bool {
    let v4 = net::is_mapped(ip);
    let mut tuple = if v4 {
        bpf_sock_tuple {
            __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
                ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                    saddr: 0,
                    daddr: ip[3],
                    sport: 0,
                    dport: port.to_be(),
                },
            },
        }
    } else {
        bpf_sock_tuple {
            __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
                ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                    saddr: [0; 4],
                    daddr: *ip,
                    sport: 0,
                    dport: port.to_be(),
                },
            },
        }
    };
    let size = if v4 { TUPLE4_SIZE } else { TUPLE6_SIZE };
    // BPF_F_CURRENT_NETNS is -1 as a u64.
    let current_netns = u64::from_ne_bytes(i64::from(BPF_F_CURRENT_NETNS).to_ne_bytes());
    // SAFETY: a valid tuple of the size given; the socket found, if any, is
    // released at once.
    unsafe {
        let sk = bpf_sk_lookup_tcp(ctx.as_ptr(), &raw mut tuple, size, current_netns, 0);
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

/// The proxy's own connects (by socket mark, uid or gid) go where they asked.
#[inline(always)]
pub fn is_proxy(sa: &bpf_sock_addr, cfg: &NetnsConfig) -> bool {
    if cfg.proxy_mark != 0 {
        // SAFETY: `sk` is the connecting socket, valid for the program's duration.
        let sk = unsafe { sa.__bindgen_anon_1.sk };
        // SAFETY: checked non-null; `mark` is readable on a full socket.
        if !sk.is_null() && unsafe { (*sk).mark } == cfg.proxy_mark {
            return true;
        }
    }
    let uid_gid = aya_ebpf::helpers::bpf_get_current_uid_gid();
    #[expect(clippy::cast_possible_truncation, reason = "the low half is the uid")]
    let uid = uid_gid as u32;
    let gid = (uid_gid >> 32) as u32;
    (cfg.has(flags::PROXY_UID) && uid == cfg.proxy_uid)
        || (cfg.has(flags::PROXY_GID) && gid == cfg.proxy_gid)
}
