//! The agent's eBPF programs: maps and thin entry points. Each hook's logic
//! lives in its own module; every entry point turns an internal error into
//! "let the traffic through", never into a drop or a refused syscall.
//!
//! # Life of a connection
//!
//! Outbound, an app in a served namespace connects to 10.0.0.2:80:
//!
//! 1. `connect4` (cgroup, the app's connect): reads `NETNS_CONFIG` and the
//!    rule maps (`OUT_PORTS`, `OUT_CIDR_EXCLUDE`, `OUT_CIDR_INCLUDE`);
//!    captured, it writes `ORIG_DST_BY_COOKIE[socket cookie] = 10.0.0.2:80`
//!    and rewrites the address to 127.0.0.1:15001.
//! 2. `sockops`, active ESTABLISHED (the app's socket): moves the entry
//!    from `ORIG_DST_BY_COOKIE` to `ORIG_DST_BY_TUPLE[app→proxy tuple]`;
//!    unless its reads may block (`KERNEL_LAYOUT`) or the last
//!    connections to 10.0.0.2:80 were all short (`SHORT_CONNS`), creates the socket's
//!    `SOCK_STATE`, a `PEERS` entry (its kernel address and cookie), and
//!    puts it into `SOCKETS` (the SOCKHASH) under its own tuple.
//! 3. `sockops`, passive ESTABLISHED (the proxy's accepted socket): claims
//!    the `ORIG_DST_BY_TUPLE` entry (`owner` = its cookie) and, if its
//!    listener was non-blocking (`LISTENERS`, written on listen(2)) and
//!    the destination's connections were not all short, joins `SOCKETS`
//!    and `PEERS` the same way.
//! 4. `sk_msg` (every send of a socket in `SOCKETS`): reads its
//!    `SOCK_STATE` and the peer's `PEERS` entry, looks at both sockets in
//!    the kernel (blocking, receive memory, TCP sequence numbers), then
//!    redirects the message into the peer's ingress queue (found in
//!    `SOCKETS` by the reversed tuple) or passes it to TCP; writes
//!    `COUNTERS`, the messages each end sent and received (`SOCK_STATE`,
//!    `PEERS`), and `SOCK_STATE` when the sender turned blocking.
//! 5. `sockops`, before each packet of a socket that turned blocking:
//!    once its ingress queue is empty, takes it out of `SOCKETS` and
//!    `PEERS`.
//! 6. `getsockopt` (the proxy asks `SO_ORIGINAL_DST`): reads
//!    `ORIG_DST_BY_TUPLE` by the reversed tuple of the proxy's socket and
//!    answers 10.0.0.2:80, as conntrack would.
//! 7. `getpeername4` (the app asks who its peer is): reads
//!    `ORIG_DST_BY_TUPLE` and answers 10.0.0.2:80, not the proxy.
//! 8. `sockops`, state CLOSE (each socket): the proxy's end counts the
//!    connection in `SHORT_CONNS` (short: one more in a row; long: the
//!    run is over), from what each end sent; each socket deletes the
//!    `ORIG_DST_BY_TUPLE` entry it owns, its `PEERS` and
//!    `INBOUND_STEERED` entries and any left `ORIG_DST_BY_COOKIE` entry;
//!    the kernel removes it from `SOCKETS` and frees its `SOCK_STATE`.
//!
//! Inbound, a peer connects to the pod's 10.0.0.1:8080:
//!
//! 1. `sk_lookup` (the served namespace's lookup, an instance per served
//!    namespace): reads its namespace's `NETNS_CONFIG` and `IN_PORTS`,
//!    assigns the namespace's listener from `INBOUND_LISTENER`
//!    (put there by `sockops` on listen(2), or by the agent) and records
//!    the accepted tuple in `INBOUND_STEERED`.
//! 2. `getsockopt` answers `SO_ORIGINAL_DST` with the socket's own local
//!    address (no NAT happened), found through `INBOUND_STEERED`.
//! 3. The proxy connects to the app from 127.0.0.6: `sockops` puts both
//!    ends into `SOCKETS` (steps 2-4 and 8 above, without an original
//!    destination).
// On the host (clippy, check) this builds as an ordinary std binary so the
// programs get linted; only the BPF target is no_std/no_main.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// Each program should stay one function for the verifier (bpf-to-bpf calls
// cost stack and complicate older verifiers).
#![allow(clippy::inline_always)]
// The aya program macros hand each entry point its context by value.
#![allow(clippy::needless_pass_by_value)]

mod connect;
mod counters;
mod ctx;
mod dns_reply;
mod getpeername;
mod getsockopt;
mod kernel;
mod rules;
mod sendmsg;
mod sk_lookup;
mod sk_msg;
mod sock_release;
mod sockops;

use agent_common::{
    CidrKeyData, Counter, DestKey, DnsServerKey, KernelLayout, ListenerKey, NetnsConfig, OrigDst,
    PortKey, SockKey, SockRef, SockState, capacity,
};
use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{
        btf_map, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sk_msg, sock_ops,
    },
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
    programs::{
        SkLookupContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext,
    },
};

use crate::connect::Family;

/// Verdict of the cgroup programs (`sock_addr`, `sockopt`, `sock`): the syscall
/// proceeds.
pub const ALLOW: i32 = 1;
/// sk_msg / sk_lookup verdict: continue (with the redirect or the socket
/// selected, if any).
pub const SK_PASS: u32 = 1;
/// sk_lookup verdict: refuse the connection.
pub const SK_DROP: u32 = 0;
/// sock_ops return value (ignored by the kernel for the callbacks we use).
pub const SOCKOPS_OK: u32 = 1;

/// How much receive memory (bytes) a short-circuited socket's reader may
/// hold before senders to it use TCP; set by the loader
/// (`agent_common::globals::SOCKMAP_QUEUE_LIMIT`).
#[unsafe(no_mangle)]
static SOCKMAP_QUEUE_LIMIT: u64 = agent_common::globals::SOCKMAP_QUEUE_LIMIT_DEFAULT;

/// After how many short connections in a row to a destination new ones
/// stay on TCP (0: never); set by the loader
/// (`agent_common::globals::SHORT_CONN_THRESHOLD`).
#[unsafe(no_mangle)]
static SHORT_CONN_THRESHOLD: u32 = agent_common::globals::SHORT_CONN_THRESHOLD_DEFAULT;

/// Where the kernel keeps what the datapath reads, and how it treats
/// blocking readers; set by the loader (`globals::KERNEL_LAYOUT`). Unset,
/// nothing is short-circuited.
#[unsafe(no_mangle)]
static KERNEL_LAYOUT: KernelLayout = KernelLayout {
    flags: 0,
    sock_cookie: 0,
    sock_socket: 0,
    sock_rmem_alloc: 0,
    sock_user_data: 0,
    socket_file: 0,
    file_flags: 0,
    tcp_copied_seq: 0,
    tcp_rcv_nxt: 0,
    tcp_write_seq: 0,
    tcp_snd_una: 0,
    psock_ingress_msg: 0,
};

#[map]
static NETNS_CONFIG: HashMap<u64, NetnsConfig> =
    HashMap::with_max_entries(capacity::NETNS_CONFIG, 0);

#[map]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(capacity::ORIG_DST_BY_COOKIE, 0);

#[map]
static ORIG_DST_BY_TUPLE: HashMap<SockKey, OrigDst> =
    HashMap::with_max_entries(capacity::ORIG_DST_BY_TUPLE, 0);

#[map]
static SOCKETS: SockHash<SockKey> = SockHash::with_max_entries(capacity::SOCKETS, 0);

#[map]
static PEERS: HashMap<SockKey, SockRef> = HashMap::with_max_entries(capacity::PEERS, 0);

#[map]
static LISTENERS: LruHashMap<PortKey, u32> = LruHashMap::with_max_entries(capacity::LISTENERS, 0);

#[map]
static PROBE_SOCKETS: SockHash<u32> = SockHash::with_max_entries(2, 0);

/// One slot per CPU to turn a socket pointer into a number (see
/// `kernel::address`).
#[map]
static ADDRESS_SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[btf_map]
static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

/// A socket's `SOCK_STATE`, if it has one (only sockets that joined the
/// short-circuit do; never created here). `sk` may be null.
#[inline(always)]
fn sock_state(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<*mut SockState> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: BTF sk_storage map pointer and a full socket; no creation.
    let state = unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(
            core::ptr::from_ref(&SOCK_STATE).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockState>();
    (!state.is_null()).then_some(state)
}

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map]
static OUT_CIDR_EXCLUDE: LpmTrie<CidrKeyData, u8> = LpmTrie::with_max_entries(capacity::RULES, 0);

#[map]
static OUT_CIDR_INCLUDE: LpmTrie<CidrKeyData, u8> = LpmTrie::with_max_entries(capacity::RULES, 0);

#[map]
static OUT_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(capacity::RULES, 0);

#[map]
static IN_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(capacity::RULES, 0);

#[map]
static SK_LOOKUP_NETNS: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static INBOUND_LISTENER: SockHash<ListenerKey> =
    SockHash::with_max_entries(capacity::INBOUND_LISTENERS, 0);

#[map]
static DNS_SERVERS: HashMap<DnsServerKey, u8> = HashMap::with_max_entries(capacity::DNS_SERVERS, 0);

#[map]
static DNS_ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(capacity::DNS_ORIG_BY_COOKIE, 0);

#[map]
static INBOUND_STEERED: LruHashMap<SockKey, u8> =
    LruHashMap::with_max_entries(capacity::INBOUND_STEERED, 0);

#[map]
static SHORT_CONNS: LruHashMap<DestKey, u32> =
    LruHashMap::with_max_entries(capacity::SHORT_CONNS, 0);

// The hooks, in the order a connection meets them.

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    connect::connect(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    connect::connect(&ctx, Family::V6);
    ALLOW
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    sockops::sockops(&ctx);
    SOCKOPS_OK
}

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    sk_msg::sk_msg(&ctx);
    SK_PASS
}

#[cgroup_sockopt(getsockopt)]
pub fn mesh_getsockopt(ctx: SockoptContext) -> i32 {
    getsockopt::getsockopt(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeer4(ctx: SockAddrContext) -> i32 {
    getpeername::getpeername(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeer6(ctx: SockAddrContext) -> i32 {
    getpeername::getpeername(&ctx, Family::V6);
    ALLOW
}

// Inbound.

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    sk_lookup::sk_lookup(&ctx)
}

// DNS over unconnected UDP, and the end of every UDP socket's entry.

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg::sendmsg(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg::sendmsg(&ctx, Family::V6);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    dns_reply::recvmsg(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    dns_reply::recvmsg(&ctx, Family::V6);
    ALLOW
}

#[cgroup_sock(sock_release)]
pub fn mesh_sock_rel(ctx: SockContext) -> i32 {
    sock_release::sock_release(&ctx);
    ALLOW
}

// The start-up probe of how the kernel treats sockmap readers.

#[sk_msg]
pub fn mesh_probe_msg(ctx: SkMsgContext) -> u32 {
    sk_msg::probe_msg(&ctx);
    SK_PASS
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
