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
    /// `LruHashMap<u64 socket cookie, OrigDst>`: written by connect4/6,
    /// consumed by sockops when the connection is established.
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    /// `HashMap<DnsServerKey, u8>`: the resolvers whose port-53 queries go
    /// to the DNS proxy (`run --redirect-dns`, without `--capture-all-dns`).
    pub const DNS_SERVERS: &str = "DNS_SERVERS";
    /// `LruHashMap<u64 socket cookie, OrigDst>`: the resolver a UDP socket
    /// last sent a captured query to (connect or sendmsg), so its replies
    /// from the DNS proxy look like the resolver's (recvmsg); removed when
    /// the socket is released.
    pub const DNS_ORIG_BY_COOKIE: &str = "DNS_ORIG_BY_COOKIE";
    /// `HashMap<SockKey, OrigDst>`: the app's side of a redirected connection
    /// (app → proxy tuple) to its original destination; read by getsockopt.
    pub const ORIG_DST_BY_TUPLE: &str = "ORIG_DST_BY_TUPLE";
    /// `SockHash<SockKey>`: both ends of every short-circuited connection.
    pub const SOCKETS: &str = "SOCKETS";
    /// `SkStorage<SockState>`: per-socket state of a short-circuited socket.
    pub const SOCK_STATE: &str = "SOCK_STATE";
    /// `HashMap<SockKey, SockRef>`: every short-circuited socket by its own
    /// tuple, with what a sender needs to look at it as a receiver (its
    /// kernel address and cookie).
    pub const PEERS: &str = "PEERS";
    /// `LruHashMap<PortKey, u32>`: listening ports and whether the listener
    /// is non-blocking ([`crate::LISTENER_NONBLOCKING`]), recorded on
    /// listen(2): an accepted socket has no file yet when it is established.
    pub const LISTENERS: &str = "LISTENERS";
    /// `SockHash<u32 local port>`: the socket pair of the start-up probe of
    /// how this kernel treats reads of sockets in a sockmap.
    pub const PROBE_SOCKETS: &str = "PROBE_SOCKETS";
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
    /// `Array<u64>` of one: the cookie of the network namespace this
    /// instance's sk_lookup serves, written by the agent once the object
    /// is loaded. An sk_lookup program cannot read its namespace's cookie,
    /// and it runs only where it is attached: each served namespace gets an
    /// instance of its own (one for a pod's agent, one per pod for a node
    /// agent), sharing every other map. Never pinned: each instance has its
    /// own.
    pub const SK_LOOKUP_NETNS: &str = "SK_LOOKUP_NETNS";
    /// `SockHash<ListenerKey>`: each served namespace's inbound listeners,
    /// one per family.
    pub const INBOUND_LISTENER: &str = "INBOUND_LISTENER";
    /// `LruHashMap<SockKey, u8>`: connections sk_lookup steered to the
    /// inbound listener, by the accepted socket's own tuple; read by getsockopt.
    pub const INBOUND_STEERED: &str = "INBOUND_STEERED";
    /// `LruHashMap<DestKey, u32>`: per destination (an outbound connection's
    /// original destination, an inbound one's app address), how many
    /// connections in a row were short (neither end sent more than
    /// [`crate::SHORT_CONN_MAX_SENDS`] messages); written by sockops when a
    /// socket closes. From [`crate::globals::SHORT_CONN_THRESHOLD`] on, new
    /// connections to it stay on plain TCP: for one exchange, setting up
    /// and tearing down the short-circuit costs more than it saves. The
    /// kernel's business only (what it learned, per destination, bounded
    /// by its capacity); userspace never reads it.
    pub const SHORT_CONNS: &str = "SHORT_CONNS";
}

/// Program names (the entry-point functions in `agent-ebpf`).
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const GETPEERNAME4: &str = "mesh_getpeer4";
    pub const GETPEERNAME6: &str = "mesh_getpeer6";
    /// DNS: unconnected UDP queries to the resolvers.
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    pub const SENDMSG6: &str = "mesh_sendmsg6";
    /// DNS: replies from the DNS proxy shown as the resolver's.
    pub const RECVMSG4: &str = "mesh_recvmsg4";
    pub const RECVMSG6: &str = "mesh_recvmsg6";
    /// DNS: a released UDP socket's resolver entry goes.
    pub const SOCK_RELEASE: &str = "mesh_sock_rel";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const SK_MSG: &str = "mesh_sk_msg";
    pub const GETSOCKOPT: &str = "mesh_getsockopt";
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    /// sk_msg on [`crate::maps::PROBE_SOCKETS`] only: redirects each message
    /// to the other socket of the probe pair.
    pub const PROBE_MSG: &str = "mesh_probe_msg";
}

/// Globals of the eBPF object, set by the loader.
pub mod globals {
    /// `u64`: how much receive memory (queued redirected bytes, charged to
    /// the reader's `sk_rmem_alloc`) a reader may hold before senders to it
    /// use TCP, whose flow control then holds them back.
    pub const SOCKMAP_QUEUE_LIMIT: &str = "SOCKMAP_QUEUE_LIMIT";
    /// [`crate::KernelLayout`]: where the fields the datapath reads are in
    /// the running kernel's structures, and how it must treat readers.
    pub const KERNEL_LAYOUT: &str = "KERNEL_LAYOUT";
    /// Its default, in KiB (`run --sockmap-queue-kib`): 4 MiB, below TCP's
    /// largest default receive buffer.
    pub const SOCKMAP_QUEUE_LIMIT_DEFAULT_KIB: u32 = 4096;
    /// Its default, in bytes.
    pub const SOCKMAP_QUEUE_LIMIT_DEFAULT: u64 = (SOCKMAP_QUEUE_LIMIT_DEFAULT_KIB as u64) << 10;
    /// `u32`: after how many short connections in a row to a destination
    /// ([`crate::maps::SHORT_CONNS`]) the next ones stay on plain TCP; 0:
    /// every connection is short-circuited.
    pub const SHORT_CONN_THRESHOLD: &str = "SHORT_CONN_THRESHOLD";
    /// Its default (`run --short-conn-threshold`).
    pub const SHORT_CONN_THRESHOLD_DEFAULT: u32 = 8;
}

/// A socket that sent more messages than this (sk_msg's count while it was
/// short-circuited, TCP's data segments otherwise) made its connection
/// long: its destination's run of short connections ([`maps::SHORT_CONNS`])
/// starts again. Two allow a request written as headers then body.
pub const SHORT_CONN_MAX_SENDS: u32 = 2;

/// The ports of istio's sidecar conventions, used by both redirect modes.
pub mod ports {
    /// Where the proxy receives captured outbound connections (127.0.0.1).
    pub const OUTBOUND: u16 = 15001;
    /// Where the proxy receives captured inbound connections.
    pub const INBOUND: u16 = 15006;
    /// HBONE (istio's tunnel port): never captured inbound.
    pub const HBONE: u16 = 15008;
    /// The agent's admin server (127.0.0.1, never captured).
    pub const ADMIN: u16 = 15020;
    /// Inbound ports never captured unless told otherwise: the proxy's
    /// Prometheus (15090), health (15021) and admin (15020) ports.
    pub const DEFAULT_INBOUND_EXCLUDE: [u16; 3] = [15090, 15021, ADMIN];
    /// Where the DNS proxy listens (istio-agent's), 127.0.0.1 and `::1`.
    pub const DNS_PROXY: u16 = 15053;
    /// DNS.
    pub const DNS: u16 = 53;
}

/// Capacities of the maps. Every map is bounded: the tuple and socket maps
/// hold one entry per live short-circuited socket and are cleaned on close;
/// the cookie map is an LRU for connects that never complete.
pub mod capacity {
    pub const NETNS_CONFIG: u32 = 1024;
    pub const ORIG_DST_BY_COOKIE: u32 = 65_536;
    pub const ORIG_DST_BY_TUPLE: u32 = 65_536;
    pub const SOCKETS: u32 = 131_072;
    pub const PEERS: u32 = SOCKETS;
    /// Listening ports over all served namespaces.
    pub const LISTENERS: u32 = 4096;
    /// Each include/exclude list (CIDRs, ports), per map: far above the 20
    /// entries merbridge allowed.
    pub const RULES: u32 = 4096;
    pub const INBOUND_STEERED: u32 = 65_536;
    /// Inbound listeners: two per served namespace.
    pub const INBOUND_LISTENERS: u32 = 2 * NETNS_CONFIG;
    /// Resolvers per namespace, over all namespaces.
    pub const DNS_SERVERS: u32 = 1024;
    /// UDP sockets with a captured DNS query outstanding.
    pub const DNS_ORIG_BY_COOKIE: u32 = 65_536;
    /// Destinations whose run of short connections is remembered.
    pub const SHORT_CONNS: u32 = 16_384;
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
    /// DNS (UDP and TCP port 53) to the resolvers goes to the DNS proxy.
    pub const REDIRECT_DNS: u32 = 1 << 8;
    /// With [`REDIRECT_DNS`]: to every destination, not only the resolvers.
    pub const CAPTURE_ALL_DNS: u32 = 1 << 9;
    /// Native IPv6 is captured (outbound, inbound, DNS), as istio's
    /// ip6tables rules do once IPv6 is on; off, IPv6 goes untouched, as
    /// without those rules. IPv4 through `AF_INET6` is IPv4 either way.
    pub const CAPTURE_IPV6: u32 = 1 << 10;
}

/// Key of [`maps::INBOUND_LISTENER`]: a namespace's inbound listener of one
/// address family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    /// `AF_INET` or `AF_INET6`: the listening socket's family.
    pub family: u32,
    /// Always zero.
    pub pad: u32,
}
const _: () = assert!(size_of::<ListenerKey>() == 16);

impl ListenerKey {
    #[must_use]
    pub const fn new(netns_cookie: u64, family: u32) -> Self {
        Self {
            netns_cookie,
            family,
            pad: 0,
        }
    }
}

/// Source address of the proxy's inbound passthrough connections to the app
/// (Envoy's convention): never captured again, and short-circuited.
pub const INBOUND_PASSTHROUGH_SRC: core::net::Ipv4Addr = core::net::Ipv4Addr::new(127, 0, 0, 6);
/// The IPv6 inbound passthrough source (istio's `::6`).
pub const INBOUND_PASSTHROUGH_SRC_V6: core::net::Ipv6Addr =
    core::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
/// [`INBOUND_PASSTHROUGH_SRC`] as the eBPF contexts carry it (network
/// order), v4-mapped.
pub const INBOUND_PASSTHROUGH_SRC_RAW: net::IpRaw =
    net::mapped(net::ip4_raw(INBOUND_PASSTHROUGH_SRC.octets()));
/// [`INBOUND_PASSTHROUGH_SRC_V6`], raw.
pub const INBOUND_PASSTHROUGH_SRC_V6_RAW: net::IpRaw =
    net::ip6_raw(INBOUND_PASSTHROUGH_SRC_V6.octets());

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

/// Data of an LPM-trie key for the CIDR maps: the namespace cookie and the
/// address family (their bits always part of the prefix, so a rule never
/// matches another namespace or family), then the address, all big endian
/// so the trie's bitwise prefix match works. An IPv4 address takes the
/// first 4 bytes of `addr`. The prefix length that goes with it is
/// [`CidrKeyData::prefix_len`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrKeyData {
    /// Namespace cookie, big-endian bytes.
    pub netns_be: [u8; 8],
    /// `AF_INET` or `AF_INET6`, big-endian bytes.
    pub family_be: [u8; 4],
    /// Network order; an IPv4 address in the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<CidrKeyData>() == 28);

impl CidrKeyData {
    /// Prefix bits always matched: the namespace cookie and the family.
    pub const FIXED_BITS: u32 = 64 + 32;

    /// An IPv4 address (raw, network order) in a namespace.
    #[must_use]
    pub const fn v4(netns_cookie: u64, ip4_raw: u32) -> Self {
        let o = net::ip4_octets(ip4_raw);
        Self {
            netns_be: netns_cookie.to_be_bytes(),
            family_be: net::AF_INET.to_be_bytes(),
            addr: [o[0], o[1], o[2], o[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    /// An IPv6 address (its octets) in a namespace.
    #[must_use]
    pub const fn v6(netns_cookie: u64, octets: [u8; 16]) -> Self {
        Self {
            netns_be: netns_cookie.to_be_bytes(),
            family_be: net::AF_INET6.to_be_bytes(),
            addr: octets,
        }
    }

    /// The trie prefix length of a CIDR of `cidr_len` bits.
    #[must_use]
    pub const fn prefix_len(cidr_len: u8) -> u32 {
        Self::FIXED_BITS + cidr_len as u32
    }

    /// The CIDR length of a trie prefix length (`None` below the fixed bits).
    #[must_use]
    pub const fn cidr_len(prefix_len: u32) -> Option<u8> {
        match prefix_len.checked_sub(Self::FIXED_BITS) {
            #[expect(clippy::cast_possible_truncation, reason = "checked: at most 128")]
            Some(n) if n <= 128 => Some(n as u8),
            _ => None,
        }
    }

    /// Whether this is an IPv4 address.
    #[must_use]
    pub const fn is_v4(&self) -> bool {
        u32::from_be_bytes(self.family_be) == net::AF_INET
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
    /// Where the DNS proxy listens (127.0.0.1 and `::1`), host order; used
    /// with [`flags::REDIRECT_DNS`].
    pub dns_port: u16,
    /// Always zero.
    pub pad: u16,
}
const _: () = assert!(size_of::<NetnsConfig>() == 24);

impl NetnsConfig {
    #[must_use]
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// An original destination, as `connect()` (or `sendmsg()`) was asked for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network order; an IPv4 destination v4-mapped (see [`net::IpRaw`]).
    pub ip: net::IpRaw,
    /// Host order.
    pub port: u16,
    /// `AF_INET` for an IPv4 destination (whatever the socket's family),
    /// `AF_INET6` for a native IPv6 one: what `SO_ORIGINAL_DST` or
    /// `IP6T_SO_ORIGINAL_DST` answers.
    pub family: u16,
    /// Always zero.
    pub pad: u32,
    /// In [`maps::ORIG_DST_BY_TUPLE`]: the socket cookie of the proxy's end
    /// of the connection once it exists (0 before). That socket owns the
    /// entry from then on, so the proxy can still ask `SO_ORIGINAL_DST`
    /// after the app has closed, as conntrack would answer.
    pub owner: u64,
}
const _: () = assert!(size_of::<OrigDst>() == 32);

impl OrigDst {
    /// An IPv4 destination (raw address).
    #[must_use]
    pub const fn v4(ip4_raw: u32, port: u16) -> Self {
        Self::new(net::mapped(ip4_raw), port)
    }

    /// A destination of either family (raw; v4-mapped means IPv4).
    #[must_use]
    pub const fn new(ip: net::IpRaw, port: u16) -> Self {
        Self {
            ip,
            port,
            family: if net::is_mapped(&ip) {
                net::SA_FAMILY_INET
            } else {
                net::SA_FAMILY_INET6
            },
            pad: 0,
            owner: 0,
        }
    }

    #[must_use]
    pub const fn is_v4(&self) -> bool {
        self.family == net::SA_FAMILY_INET
    }
}

/// A socket's 4-tuple within one network namespace, from that socket's own
/// point of view (`src` is its local end). Addresses of either family, in
/// the one raw form (IPv4 v4-mapped), so both ends of a connection find
/// each other whatever family each socket was opened with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    /// Network order.
    pub src_ip: net::IpRaw,
    /// Network order.
    pub dst_ip: net::IpRaw,
    /// Host order.
    pub src_port: u16,
    /// Host order.
    pub dst_port: u16,
    /// Always zero.
    pub pad: u32,
}
const _: () = assert!(size_of::<SockKey>() == 48);

impl SockKey {
    #[must_use]
    pub const fn new(
        netns_cookie: u64,
        src_ip: net::IpRaw,
        src_port: u16,
        dst_ip: net::IpRaw,
        dst_port: u16,
    ) -> Self {
        Self {
            netns_cookie,
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            pad: 0,
        }
    }

    /// A socket's own tuple from a `bpf_sock_ops` or `sk_msg_md` context:
    /// `local_port` in host order, `remote_port` in network order in the
    /// upper 16 bits (see [`net`]).
    #[must_use]
    pub const fn from_sock_ops(
        netns_cookie: u64,
        local_ip: net::IpRaw,
        local_port: u32,
        remote_ip: net::IpRaw,
        remote_port: u32,
    ) -> Self {
        Self::new(
            netns_cookie,
            local_ip,
            net::port_from_host_u32(local_port),
            remote_ip,
            net::port_from_be_upper(remote_port),
        )
    }

    /// A socket's own tuple from a `bpf_sock` (getsockopt, getpeername):
    /// `src_port` in host order, `dst_port` in network order in the lower
    /// 16 bits.
    #[must_use]
    pub const fn from_bpf_sock(
        netns_cookie: u64,
        src_ip: net::IpRaw,
        src_port: u32,
        dst_ip: net::IpRaw,
        dst_port: u32,
    ) -> Self {
        Self::new(
            netns_cookie,
            src_ip,
            net::port_from_host_u32(src_port),
            dst_ip,
            net::port_from_be_lower(dst_port),
        )
    }

    /// The accepting socket's tuple from a `bpf_sk_lookup` context:
    /// `local_port` in host order, `remote_port` in network order in the
    /// lower 16 bits.
    #[must_use]
    pub const fn from_sk_lookup(
        netns_cookie: u64,
        local_ip: net::IpRaw,
        local_port: u32,
        remote_ip: net::IpRaw,
        remote_port: u32,
    ) -> Self {
        Self::new(
            netns_cookie,
            local_ip,
            net::port_from_host_u32(local_port),
            remote_ip,
            net::port_from_be_lower(remote_port),
        )
    }

    /// A socket's own tuple from its addresses (userspace).
    #[must_use]
    pub const fn from_addrs(
        netns_cookie: u64,
        local: core::net::SocketAddr,
        peer: core::net::SocketAddr,
    ) -> Self {
        Self::new(
            netns_cookie,
            net::ip_raw(local.ip()),
            local.port(),
            net::ip_raw(peer.ip()),
            peer.port(),
        )
    }

    /// The same connection seen from the peer socket.
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.netns_cookie,
            self.dst_ip,
            self.dst_port,
            self.src_ip,
            self.src_port,
        )
    }
}

/// A DNS resolver the served namespace's apps use, key of
/// [`maps::DNS_SERVERS`]: queries to it on port 53 go to the DNS proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsServerKey {
    pub netns_cookie: u64,
    /// Network order, IPv4 v4-mapped.
    pub ip: net::IpRaw,
}
const _: () = assert!(size_of::<DnsServerKey>() == 24);

/// Where a captured connection goes, key of [`maps::SHORT_CONNS`]: an
/// outbound connection's original destination, an inbound one's app
/// address (the port the peer connected to).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DestKey {
    pub netns_cookie: u64,
    /// Network order, IPv4 v4-mapped.
    pub ip: net::IpRaw,
    /// Host order.
    pub port: u16,
    /// Always zero.
    pub pad: [u8; 6],
}
const _: () = assert!(size_of::<DestKey>() == 32);

impl DestKey {
    #[must_use]
    pub const fn new(netns_cookie: u64, ip: net::IpRaw, port: u16) -> Self {
        Self {
            netns_cookie,
            ip,
            port,
            pad: [0; 6],
        }
    }
}

/// Per-socket state of a short-circuited socket, value of
/// [`maps::SOCK_STATE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// `SockState::*` bits.
    pub flags: u32,
    /// Messages this socket sent while short-circuited (sk_msg counts
    /// each, redirected or not; saturating): what makes its connection
    /// short or long ([`SHORT_CONN_MAX_SENDS`]).
    pub sends: u32,
    /// The socket's own tuple: its entry in [`maps::SOCKETS`] and
    /// [`maps::PEERS`].
    pub key: SockKey,
    /// The kernel's `struct sock` of this socket (read with
    /// `bpf_probe_read_kernel` at [`KernelLayout`] offsets).
    pub addr: u64,
}
const _: () = assert!(size_of::<SockState>() == 64);

impl SockState {
    /// The socket's own reader blocks (its file lost `O_NONBLOCK`): it
    /// leaves the SOCKHASH at its next packet once its ingress queue is
    /// empty, so its reads are plain TCP's again.
    pub const EVICT: u32 = 1 << 0;
}

/// A short-circuited socket as a sender sees its peer, value of
/// [`maps::PEERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRef {
    /// The kernel's `struct sock`.
    pub addr: u64,
    /// Its cookie: checked against the socket at `addr` before anything
    /// read there is believed (the memory may have been reused).
    pub cookie: u64,
    /// `SockRef::*` bits.
    pub flags: u32,
    /// Messages its peer's sk_msg redirected into it (saturating): with
    /// what came over TCP, what its peer sent, for [`SHORT_CONN_MAX_SENDS`].
    pub received: u32,
}
const _: () = assert!(size_of::<SockRef>() == 24);

impl SockRef {
    /// Not accepted yet (no file to look at), from a non-blocking listener:
    /// trusted to read without blocking until it has a file of its own.
    pub const LISTENER_NONBLOCKING: u32 = 1 << 0;
    /// A sender found this socket's reads blocking: it leaves the map at its
    /// next packet (as [`SockState::EVICT`] does for a blocking sender).
    pub const EVICT: u32 = 1 << 1;
}

/// Bit of a [`maps::LISTENERS`] value: the listener's file is `O_NONBLOCK`.
pub const LISTENER_NONBLOCKING: u32 = 1 << 0;

/// `O_NONBLOCK` of a file's `f_flags` (x86-64, arm64).
pub const O_NONBLOCK: u32 = 0o4000;

/// Byte offsets of the kernel fields the datapath reads, from the running
/// kernel's BTF, and how it must treat readers. Zero-initialized (no
/// [`KernelLayout::VALID`]) means unknown: nothing is short-circuited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `KernelLayout::*` bits.
    pub flags: u32,
    /// `struct sock`: `__sk_common.skc_cookie` (`atomic64_t`).
    pub sock_cookie: u32,
    /// `struct sock`: `sk_socket` (`struct socket *`; NULL until accepted).
    pub sock_socket: u32,
    /// `struct sock`: `sk_backlog.rmem_alloc` (`atomic_t`, `sk_rmem_alloc`).
    pub sock_rmem_alloc: u32,
    /// `struct sock`: `sk_user_data` (the psock, with flag bits).
    pub sock_user_data: u32,
    /// `struct socket`: `file`.
    pub socket_file: u32,
    /// `struct file`: `f_flags`.
    pub file_flags: u32,
    /// `struct tcp_sock`: `copied_seq`, `rcv_nxt`, `write_seq`, `snd_una`.
    pub tcp_copied_seq: u32,
    pub tcp_rcv_nxt: u32,
    pub tcp_write_seq: u32,
    pub tcp_snd_una: u32,
    /// `struct sk_psock`: `ingress_msg` (`struct list_head`).
    pub psock_ingress_msg: u32,
}
const _: () = assert!(size_of::<KernelLayout>() == 48);

impl KernelLayout {
    /// The offsets are known.
    pub const VALID: u32 = 1 << 0;
    /// A blocking reader of a socket in a sockmap can get `EAGAIN` (the
    /// start-up probe saw it): only sockets whose reads never block are
    /// short-circuited, and one whose file turns blocking leaves the map.
    pub const GUARD_BLOCKING: u32 = 1 << 1;

    #[must_use]
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// Declares [`Counter`]: each variant with its index, its metric name and
/// its meaning, on one line, so a name can never drift from its slot.
macro_rules! counters {
    ($($(#[doc = $doc:literal])* $variant:ident = $index:literal => $name:literal,)*) => {
        /// The slots of the per-CPU [`maps::COUNTERS`] array.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Counter {
            $($(#[doc = $doc])* $variant = $index,)*
        }

        impl Counter {
            /// Every counter, in slot order.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)*];

            /// The name in metrics (`mesh_redirect_datapath_events_total{event}`),
            /// `status` and reports.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }
    };
}

counters! {
    /// connect4 rewrote a connect to an IPv4 destination to the outbound port.
    ConnectRedirected = 0 => "connect_redirected",
    /// A connect was left alone because of its mark, uid/gid or destination
    /// (an IPv4 one).
    ConnectBypassed = 1 => "connect_bypassed",
    /// connect4 could not store the original destination: connect left alone.
    ConnectStoreFailed = 2 => "connect_store_failed",
    /// sockops put a socket into the SOCKHASH.
    SockhashInserted = 3 => "sockhash_inserted",
    /// sockops could not put a socket into the SOCKHASH (plain TCP is used).
    SockhashInsertFailed = 4 => "sockhash_insert_failed",
    /// sockops could not move an original destination to the tuple map
    /// (map full): the proxy will not learn it and closes the connection.
    OrigDstStoreFailed = 5 => "orig_dst_store_failed",
    /// sk_msg redirected a message to the peer socket.
    MsgRedirected = 6 => "msg_redirected",
    /// sk_msg let a message continue over TCP (for any of the reasons
    /// counted on their own below, or no peer in the map).
    MsgPassed = 7 => "msg_passed",
    /// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` answered.
    GetsockoptAnswered = 8 => "getsockopt_answered",
    /// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on a socket we know nothing about.
    GetsockoptMissed = 9 => "getsockopt_missed",
    /// sockops removed a closed socket's entries.
    SocketsClosed = 10 => "sockets_closed",
    /// sk_lookup steered an IPv4 connection to the inbound listener.
    InboundSteered = 11 => "inbound_steered",
    /// sk_lookup left an IPv4 connection alone (excluded port, loopback,
    /// passthrough).
    InboundBypassed = 12 => "inbound_bypassed",
    /// sk_lookup found no inbound listener: refused (fail closed, as iptables
    /// REDIRECT to a closed port would) or passed (fail open).
    InboundNoListener = 13 => "inbound_no_listener",
    /// sk_lookup could not assign the listener: the connection goes on
    /// without the proxy (an internal miss, counted, never dropped).
    InboundAssignFailed = 14 => "inbound_assign_failed",
    /// sockops registered a proxy's inbound listener (on listen(2)).
    InboundListenerRegistered = 15 => "inbound_listener_registered",
    /// Fail open: a connect went direct because no proxy listened.
    ConnectFailOpen = 16 => "connect_fail_open",
    /// Fail open: an inbound connection went to the app because no proxy listened.
    InboundFailOpen = 17 => "inbound_fail_open",
    /// sk_msg sent a message over TCP because its reader holds more than
    /// the sockmap queue limit (backpressure: TCP's flow control holds the
    /// sender back; redirecting resumes once the reader caught up).
    MsgSpilled = 18 => "msg_spilled",
    /// connect6 rewrote a connect to a native IPv6 destination.
    ConnectRedirected6 = 19 => "connect_redirected6",
    /// connect6 rewrote a connect of an `AF_INET6` socket to an IPv4
    /// (v4-mapped) destination: the JDK's and other dual-stack runtimes' way.
    ConnectRedirectedMapped = 20 => "connect_redirected_mapped",
    /// A connect to a native IPv6 destination was left alone (mark, uid/gid,
    /// an exclusion).
    ConnectBypassed6 = 21 => "connect_bypassed6",
    /// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` answered.
    GetsockoptAnswered6 = 22 => "getsockopt_answered6",
    /// sk_lookup steered an IPv6 connection to the inbound listener.
    InboundSteered6 = 23 => "inbound_steered6",
    /// A DNS query (UDP or TCP, port 53) went to the DNS proxy.
    DnsRedirected = 24 => "dns_redirected",
    /// A reply from the DNS proxy was shown as the resolver's.
    DnsReplyRestored = 25 => "dns_reply_restored",
    /// The DNS proxy's own query (mark, uid/gid) was left alone.
    DnsBypassed = 26 => "dns_bypassed",
    /// A DNS query could not be recorded (map full): it went to the
    /// resolver directly.
    DnsStoreFailed = 27 => "dns_store_failed",
    /// sk_lookup left an IPv6 connection alone (excluded port, loopback,
    /// passthrough).
    InboundBypassed6 = 28 => "inbound_bypassed6",
    /// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` on a socket we know
    /// nothing about.
    GetsockoptMissed6 = 29 => "getsockopt_missed6",
    /// sk_msg sent a message over TCP to keep the byte order: earlier bytes
    /// of this direction are still in TCP (in flight or unread).
    MsgGated = 30 => "msg_gated",
    /// sk_msg sent a message over TCP because the receiving socket's reader
    /// may block (its file is blocking, or it is not accepted yet from a
    /// blocking listener): a blocking read of a socket in a sockmap can fail
    /// with EAGAIN on this kernel.
    MsgReceiverBlocking = 31 => "msg_receiver_blocking",
    /// sk_msg sent a message over TCP because the sending socket itself
    /// turned blocking; it leaves the map.
    MsgSenderBlocking = 32 => "msg_sender_blocking",
    /// sockops left a socket out of the SOCKHASH because its reads may
    /// block (a blocking socket, or accepted from a blocking or unknown
    /// listener): plain TCP, which blocking reads need on this kernel.
    SockhashRefusedBlocking = 33 => "sockhash_refused_blocking",
    /// sockops took a socket that turned blocking out of the SOCKHASH.
    SockhashEvicted = 34 => "sockhash_evicted",
    /// Bytes sk_msg redirected to a peer.
    BytesRedirected = 35 => "bytes_redirected",
    /// Bytes sk_msg let continue over TCP.
    BytesPassed = 36 => "bytes_passed",
    /// sockops left a socket of a new connection out of the SOCKHASH
    /// because the connections to its destination were short
    /// (`--short-conn-threshold` in a row): plain TCP, cheaper for one
    /// exchange than the short-circuit's set-up and tear-down.
    SockhashSkippedShort = 37 => "sockhash_skipped_short",
}

impl Counter {
    /// Number of slots.
    #[expect(clippy::cast_possible_truncation, reason = "a handful of counters")]
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The slot in [`maps::COUNTERS`].
    #[must_use]
    pub const fn index(self) -> u32 {
        self as u32
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `repr(C)`, `Copy`, made only of integers, with all
    // padding explicit, so every bit pattern is valid.
    unsafe impl aya::Pod for super::NetnsConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::SockState {}
    unsafe impl aya::Pod for super::SockRef {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::CidrKeyData {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::DnsServerKey {}
    unsafe impl aya::Pod for super::DestKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_context_layout_gives_the_same_key() {
        use core::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
        let (a, b) = (
            net::mapped(net::ip4_raw([10, 0, 0, 1])),
            net::mapped(net::LOCALHOST),
        );
        let want = SockKey::new(9, a, 40000, b, 15001);
        let be = |p: u16| u32::from(u16::from_ne_bytes(p.to_be_bytes()));
        assert_eq!(
            SockKey::from_sock_ops(9, a, 40000, b, be(15001) << 16),
            want
        );
        assert_eq!(SockKey::from_bpf_sock(9, a, 40000, b, be(15001)), want);
        assert_eq!(SockKey::from_sk_lookup(9, a, 40000, b, be(15001)), want);
        let v4 = |ip, port| SocketAddr::V4(SocketAddrV4::new(ip, port));
        assert_eq!(
            SockKey::from_addrs(
                9,
                v4(Ipv4Addr::new(10, 0, 0, 1), 40000),
                v4(Ipv4Addr::LOCALHOST, 15001)
            ),
            want
        );
        // A dual-stack socket's v4-mapped addresses key the same.
        assert_eq!(
            SockKey::from_addrs(
                9,
                "[::ffff:10.0.0.1]:40000".parse().unwrap(),
                "[::ffff:127.0.0.1]:15001".parse().unwrap()
            ),
            want
        );
    }

    #[test]
    fn reversed_swaps_ends_and_keeps_namespace() {
        let (one, two) = (net::mapped(1), net::mapped(2));
        let k = SockKey::new(7, one, 1000, two, 15001);
        let r = k.reversed();
        assert_eq!(r, SockKey::new(7, two, 15001, one, 1000));
        assert_eq!(r.reversed(), k);
    }

    /// Each counter sits in its own slot, in order, and its name is its
    /// variant's, in snake case: a name cannot label another slot.
    #[test]
    fn counters_are_in_slot_order_and_named_after_their_variant() {
        extern crate std;
        use std::{format, string::String};
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i, "{c:?}");
            let mut snake = String::new();
            for ch in format!("{c:?}").chars() {
                if ch.is_ascii_uppercase() && !snake.is_empty() {
                    snake.push('_');
                }
                snake.push(ch.to_ascii_lowercase());
            }
            assert_eq!(c.name(), snake, "{c:?}");
        }
    }
}
