//! Types shared by the eBPF programs and the userspace agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a size
//! pinned by a compile-time assertion, so the two sides cannot disagree. The
//! byte order of every field is documented: addresses are kept exactly as the
//! kernel hands them to BPF programs (network order, read as a native `u32`),
//! ports are converted to host order once, by the helpers in [`net`].
#![no_std]

pub mod net;

use core::mem::size_of;

/// Map names: the eBPF statics carry exactly these names (checked by the
/// agent's tests against the built object).
pub mod maps {
    /// `HashMap<u64 netns cookie, NetnsConfig>`: which network namespaces are served.
    pub const NETNS_CONFIG: &str = "NETNS_CONFIG";
    /// `LruHashMap<u64 socket cookie, OrigDst>`: written by connect4, consumed
    /// by sockops when the connection is established.
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    /// `HashMap<SockKey, OrigDst>`: the app's side of a redirected connection
    /// (app → proxy tuple) to its original destination; read by getsockopt.
    pub const ORIG_DST_BY_TUPLE: &str = "ORIG_DST_BY_TUPLE";
    /// `SockHash<SockKey>`: both ends of every short-circuited connection.
    pub const SOCKETS: &str = "SOCKETS";
    /// `SkStorage<SockState>`: per-socket sk_msg verdict, sticky once decided.
    pub const SOCK_STATE: &str = "SOCK_STATE";
    /// `HashMap<SockKey, u64>`: bytes each short-circuited socket's reader
    /// took from its ingress queue, by the socket's own tuple (sk_msg
    /// backpressure). Counted by the recvmsg fexit where the kernel allows
    /// tracing programs, else reported by the built-in proxy for its own
    /// sockets; a reader nobody counts for gets the queue limit in all.
    pub const INGRESS_READ: &str = "INGRESS_READ";
    /// `PerCpuArray<u64>`, indexed by [`crate::counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `LpmTrie<CidrKey, u8>`: outbound destinations never captured (`-x`).
    pub const OUT_CIDR_EXCLUDE: &str = "OUT_CIDR_EXCLUDE";
    /// `LpmTrie<CidrKey, u8>`: outbound destinations captured (`-i`).
    pub const OUT_CIDR_INCLUDE: &str = "OUT_CIDR_INCLUDE";
    /// `HashMap<PortKey, u8>`: outbound ports, a [`PortRule`] each (`-q`/`-o`).
    pub const OUT_PORTS: &str = "OUT_PORTS";
    /// `HashMap<PortKey, u8>`: inbound ports, a [`PortRule`] each (`-b`/`-d`).
    pub const IN_PORTS: &str = "IN_PORTS";
    /// `Array<InboundConfig>` of one: the namespace sk_lookup serves.
    pub const INBOUND_CONFIG: &str = "INBOUND_CONFIG";
    /// `SockMap` of one: the proxy's inbound listener (index 0).
    pub const INBOUND_LISTENER: &str = "INBOUND_LISTENER";
    /// `LruHashMap<SockKey, u8>`: connections sk_lookup steered to the
    /// inbound listener, by the accepted socket's own tuple; read by getsockopt.
    pub const INBOUND_STEERED: &str = "INBOUND_STEERED";
}

/// Program names (the entry-point functions in `agent-ebpf`).
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const GETPEERNAME4: &str = "mesh_getpeer4";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const SK_MSG: &str = "mesh_sk_msg";
    pub const GETSOCKOPT: &str = "mesh_getsockopt";
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    /// fexit on the kernel function that reads a sockmap socket's ingress
    /// queue: counts what each reader consumed (sk_msg backpressure).
    pub const RECVMSG: &str = "mesh_recvmsg";
    /// The kernel function [`RECVMSG`] traces: `recvmsg` of a TCP socket in
    /// a sockmap (`net/ipv4/tcp_bpf.c`, `(sk, msg, len, flags, addr_len)`
    /// since 5.19).
    pub const RECVMSG_TARGET: &str = "tcp_bpf_recvmsg";
}

/// Globals of the eBPF object, set by the loader.
pub mod globals {
    /// `u64`: how many redirected bytes a socket's reader may be behind
    /// before its sender switches to TCP for good.
    pub const SOCKMAP_QUEUE_LIMIT: &str = "SOCKMAP_QUEUE_LIMIT";
    /// Its default: 4 MiB, below TCP's largest default receive buffer.
    pub const SOCKMAP_QUEUE_LIMIT_DEFAULT: u64 = 4 << 20;
}

/// Capacities of the maps. Every map is bounded: the tuple and socket maps
/// hold one entry per live short-circuited socket and are cleaned on close;
/// the cookie map is an LRU for connects that never complete.
pub mod capacity {
    pub const NETNS_CONFIG: u32 = 1024;
    pub const ORIG_DST_BY_COOKIE: u32 = 65_536;
    pub const ORIG_DST_BY_TUPLE: u32 = 65_536;
    pub const SOCKETS: u32 = 131_072;
    pub const INGRESS_READ: u32 = SOCKETS;
    /// Each include/exclude list (CIDRs, ports), per map: far above the 20
    /// entries merbridge allowed.
    pub const RULES: u32 = 4096;
    pub const INBOUND_STEERED: u32 = 65_536;
}

/// Flag bits of [`NetnsConfig::flags`].
pub mod flags {
    /// connect4 rewrites outbound TCP connects to the outbound port.
    pub const REDIRECT_OUTBOUND: u32 = 1 << 0;
    /// sockops inserts app↔proxy sockets into the SOCKHASH and sk_msg
    /// short-circuits them. Off: connect4 redirect only (plain loopback TCP).
    pub const SOCKMAP: u32 = 1 << 1;
    /// `proxy_uid` is set: connects by that uid are never redirected.
    pub const PROXY_UID: u32 = 1 << 2;
    /// `proxy_gid` is set: connects by that gid are never redirected.
    pub const PROXY_GID: u32 = 1 << 3;
    /// Capture outbound connects to every destination not excluded
    /// (istio's `-i '*'`); otherwise only [`maps::OUT_CIDR_INCLUDE`] ones.
    pub const OUT_ALL_CIDRS: u32 = 1 << 4;
    /// sk_lookup steers inbound connections to the inbound listener.
    pub const REDIRECT_INBOUND: u32 = 1 << 5;
    /// Steer inbound connections on every port not excluded (istio's
    /// `-b '*'`); otherwise only [`maps::IN_PORTS`] includes.
    pub const IN_ALL_PORTS: u32 = 1 << 6;
    /// Fail open: while no proxy listens, connections go where they were
    /// going instead of being refused.
    pub const FAIL_OPEN: u32 = 1 << 7;
}

/// Source address of the proxy's inbound passthrough connections to the app
/// (Envoy's convention): never captured again, and short-circuited.
pub const INBOUND_PASSTHROUGH_SRC: u32 = net::ip4_raw([127, 0, 0, 6]);

/// What a port list says about a port.
pub struct PortRule;

impl PortRule {
    /// Captured.
    pub const INCLUDE: u8 = 1;
    /// Never captured.
    pub const EXCLUDE: u8 = 2;
}

/// Key of the port maps: a port within one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub netns_cookie: u64,
    /// Host order.
    pub port: u16,
    /// Always zero.
    pub pad: [u8; 6],
}
const _: () = assert!(size_of::<PortKey>() == 16);

impl PortKey {
    #[must_use]
    pub const fn new(netns_cookie: u64, port: u16) -> Self {
        Self {
            netns_cookie,
            port,
            pad: [0; 6],
        }
    }
}

/// Data of an LPM-trie key for the CIDR maps: the namespace cookie (its 64
/// bits always part of the prefix) followed by the IPv4 address, both big
/// endian so the trie's bitwise prefix match works. The prefix length that
/// goes with it is `64 + cidr_len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrKeyData {
    /// Namespace cookie, big-endian bytes.
    pub netns_be: [u8; 8],
    /// Network order.
    pub ip4: [u8; 4],
}
const _: () = assert!(size_of::<CidrKeyData>() == 12);

impl CidrKeyData {
    /// Prefix bits taken by the namespace cookie.
    pub const NETNS_BITS: u32 = 64;

    #[must_use]
    pub const fn new(netns_cookie: u64, ip4_raw: u32) -> Self {
        Self {
            netns_be: netns_cookie.to_be_bytes(),
            ip4: net::ip4_octets(ip4_raw),
        }
    }
}

/// sk_lookup's view of the namespace it serves, value of
/// [`maps::INBOUND_CONFIG`] (sk_lookup cannot read the netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundConfig {
    pub netns_cookie: u64,
    /// Host order.
    pub inbound_port: u16,
    /// Host order.
    pub outbound_port: u16,
    /// Bits from [`flags`]; sk_lookup acts only with `REDIRECT_INBOUND`.
    pub flags: u32,
}
const _: () = assert!(size_of::<InboundConfig>() == 16);

impl InboundConfig {
    #[must_use]
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// Per-network-namespace configuration, value of [`maps::NETNS_CONFIG`]
/// keyed by the namespace's cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsConfig {
    /// Host order.
    pub outbound_port: u16,
    /// Host order.
    pub inbound_port: u16,
    /// `SO_MARK` the proxy puts on its upstream sockets; 0 = none.
    pub proxy_mark: u32,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// Bits from [`flags`].
    pub flags: u32,
}
const _: () = assert!(size_of::<NetnsConfig>() == 20);

impl NetnsConfig {
    #[must_use]
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// An original destination, as `connect()` was asked for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network order, as in `sockaddr_in.sin_addr`.
    pub ip4: u32,
    /// Host order.
    pub port: u16,
    /// Always zero.
    pub pad: u16,
    /// In [`maps::ORIG_DST_BY_TUPLE`]: the socket cookie of the proxy's end
    /// of the connection once it exists (0 before). That socket owns the
    /// entry from then on, so the proxy can still ask `SO_ORIGINAL_DST`
    /// after the app has closed, as conntrack would answer.
    pub owner: u64,
}
const _: () = assert!(size_of::<OrigDst>() == 16);

impl OrigDst {
    #[must_use]
    pub const fn new(ip4: u32, port: u16) -> Self {
        Self {
            ip4,
            port,
            pad: 0,
            owner: 0,
        }
    }
}

/// A TCP socket's 4-tuple within one network namespace, from that socket's
/// own point of view (`src` is its local end).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    /// Network order.
    pub src_ip4: u32,
    /// Network order.
    pub dst_ip4: u32,
    /// Host order.
    pub src_port: u16,
    /// Host order.
    pub dst_port: u16,
    /// Always zero.
    pub pad: u32,
}
const _: () = assert!(size_of::<SockKey>() == 24);

impl SockKey {
    #[must_use]
    pub const fn new(
        netns_cookie: u64,
        src_ip4: u32,
        src_port: u16,
        dst_ip4: u32,
        dst_port: u16,
    ) -> Self {
        Self {
            netns_cookie,
            src_ip4,
            dst_ip4,
            src_port,
            dst_port,
            pad: 0,
        }
    }

    /// The same connection seen from the peer socket.
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.netns_cookie,
            self.dst_ip4,
            self.dst_port,
            self.src_ip4,
            self.src_port,
        )
    }
}

/// Per-socket sk_msg state, value of [`maps::SOCK_STATE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// One of the `VERDICT_*` constants: how this socket *sends*.
    pub verdict: u32,
    /// Always zero.
    pub pad: u32,
    /// The socket's own tuple: its entry in [`maps::SOCKETS`] and
    /// [`maps::INGRESS_READ`] (the recvmsg fexit only has the socket).
    pub key: SockKey,
    /// Bytes this socket's sk_msg redirected into its peer's ingress queue.
    /// Minus what the peer's reader took out ([`maps::INGRESS_READ`]), the
    /// length of that queue.
    pub sent: u64,
}
const _: () = assert!(size_of::<SockState>() == 40);

impl SockState {
    /// Not decided yet: the first message decides.
    pub const VERDICT_UNDECIDED: u32 = 0;
    /// Every message of this socket goes to the peer's ingress queue.
    pub const VERDICT_REDIRECT: u32 = 1;
    /// Every message of this socket goes over TCP: once one did, switching
    /// to redirect could let later bytes overtake earlier ones at the reader.
    /// (The other way is safe: a reader drains its ingress queue before its
    /// TCP receive queue, so a sender that was redirecting may switch to
    /// TCP, and does when its reader falls behind.)
    pub const VERDICT_PASS: u32 = 2;
}

/// Indexes of the per-CPU [`maps::COUNTERS`] array.
pub mod counter {
    /// connect4 rewrote a connect to the outbound port.
    pub const CONNECT_REDIRECTED: u32 = 0;
    /// connect4 left a connect alone because of its mark, uid/gid or destination.
    pub const CONNECT_BYPASSED: u32 = 1;
    /// connect4 could not store the original destination: connect left alone.
    pub const CONNECT_STORE_FAILED: u32 = 2;
    /// sockops put a socket into the SOCKHASH.
    pub const SOCKHASH_INSERTED: u32 = 3;
    /// sockops could not put a socket into the SOCKHASH (plain TCP is used).
    pub const SOCKHASH_INSERT_FAILED: u32 = 4;
    /// sockops could not move an original destination to the tuple map
    /// (map full): the proxy will not learn it and closes the connection.
    pub const ORIG_DST_STORE_FAILED: u32 = 5;
    /// sk_msg redirected a message to the peer socket.
    pub const MSG_REDIRECTED: u32 = 6;
    /// sk_msg let a message continue over TCP (peer missing or sticky pass).
    pub const MSG_PASSED: u32 = 7;
    /// `getsockopt(SO_ORIGINAL_DST)` answered from the tuple map.
    pub const GETSOCKOPT_ANSWERED: u32 = 8;
    /// `getsockopt(SO_ORIGINAL_DST)` on a socket we know nothing about.
    pub const GETSOCKOPT_MISSED: u32 = 9;
    /// sockops removed a closed socket's entries.
    pub const SOCKETS_CLOSED: u32 = 10;
    /// sk_lookup steered a connection to the inbound listener.
    pub const INBOUND_STEERED: u32 = 11;
    /// sk_lookup left a connection alone (excluded port, loopback, passthrough).
    pub const INBOUND_BYPASSED: u32 = 12;
    /// sk_lookup found no inbound listener: refused (fail closed, as iptables
    /// REDIRECT to a closed port would) or passed (fail open).
    pub const INBOUND_NO_LISTENER: u32 = 13;
    /// sk_lookup could not assign the listener: the connection goes on
    /// without the proxy (an internal miss, counted, never dropped).
    pub const INBOUND_ASSIGN_FAILED: u32 = 14;
    /// sockops registered a proxy's inbound listener (on listen(2)).
    pub const INBOUND_LISTENER_REGISTERED: u32 = 15;
    /// Fail open: a connect went direct because no proxy listened.
    pub const CONNECT_FAIL_OPEN: u32 = 16;
    /// Fail open: an inbound connection went to the app because no proxy listened.
    pub const INBOUND_FAIL_OPEN: u32 = 17;
    /// sk_msg switched a socket to TCP for good because its reader fell
    /// more than the sockmap queue limit behind (backpressure).
    pub const MSG_SPILLED: u32 = 18;
    /// Number of counters.
    pub const COUNT: u32 = 19;

    /// Names in index order, for metrics and reports.
    pub const NAMES: [&str; COUNT as usize] = [
        "connect_redirected",
        "connect_bypassed",
        "connect_store_failed",
        "sockhash_inserted",
        "sockhash_insert_failed",
        "orig_dst_store_failed",
        "msg_redirected",
        "msg_passed",
        "getsockopt_answered",
        "getsockopt_missed",
        "sockets_closed",
        "inbound_steered",
        "inbound_bypassed",
        "inbound_no_listener",
        "inbound_assign_failed",
        "inbound_listener_registered",
        "connect_fail_open",
        "inbound_fail_open",
        "msg_spilled",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `repr(C)`, `Copy`, made only of integers, with all
    // padding explicit, so every bit pattern is valid.
    unsafe impl aya::Pod for super::NetnsConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::SockState {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::CidrKeyData {}
    unsafe impl aya::Pod for super::InboundConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversed_swaps_ends_and_keeps_namespace() {
        let k = SockKey::new(7, 1, 1000, 2, 15001);
        let r = k.reversed();
        assert_eq!(r, SockKey::new(7, 2, 15001, 1, 1000));
        assert_eq!(r.reversed(), k);
    }

    #[test]
    fn counter_names_are_unique() {
        for (i, a) in counter::NAMES.iter().enumerate() {
            for b in &counter::NAMES[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
