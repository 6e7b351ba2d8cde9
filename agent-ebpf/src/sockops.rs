//! `sockops`: when an app↔proxy connection is established, move its original
//! destination from the socket cookie to the connection's tuple (the
//! proxy's end then owns it) and put both sockets into the SOCKHASH; when a
//! socket closes, delete what it owned.
//!
//! Both families: an `AF_INET6` socket (native IPv6, or a dual-stack one
//! with v4-mapped addresses) keys like an `AF_INET` one (see
//! `agent_common::net::IpRaw`), so the two ends of a connection find each
//! other whatever family each was opened with.
//!
//! Order of events on loopback: the app's socket reaches ESTABLISHED (active
//! callback) before the proxy's accepted socket exists (passive callback), so
//! the tuple entry is always in place when the proxy's socket shows up.
//!
//! Where a blocking read of a socket in a sockmap can fail on this kernel
//! (`KernelLayout::GUARD_BLOCKING`), only sockets whose reads do not block
//! join the map: a connecting socket whose file is `O_NONBLOCK`, an
//! accepted one whose listener was (it has no file of its own yet; sk_msg
//! looks again once it has). A member whose file turns blocking is taken
//! out again before its next packet, once nothing is queued for it.

use agent_common::{
    Counter, DestKey, INBOUND_PASSTHROUGH_SRC_RAW, INBOUND_PASSTHROUGH_SRC_V6_RAW, KernelLayout,
    LISTENER_NONBLOCKING, ListenerKey, OrigDst, PortKey, SHORT_CONN_MAX_SENDS, SockKey, SockRef,
    SockState, flags, net,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, BPF_TCP_CLOSE, bpf_sock_ops,
    },
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_delete_elem, bpf_sk_storage_get,
    },
    programs::SockOpsContext,
};
use aya_log_ebpf::debug;

use crate::{
    INBOUND_LISTENER, INBOUND_STEERED, LISTENERS, NETNS_CONFIG, ORIG_DST_BY_COOKIE,
    ORIG_DST_BY_TUPLE, PEERS, SHORT_CONNS, SOCK_STATE, SOCKETS,
    counters::bump,
    kernel::{self, Sock},
};

/// Which end of its connection a socket is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// It connected (it has its own file).
    Active,
    /// It was accepted (no file until the listener's owner accepts it).
    Passive,
}

#[inline(always)]
pub fn sockops(ctx: &SockOpsContext) {
    let family = ctx.family();
    if family != net::AF_INET && family != net::AF_INET6 {
        return;
    }
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(ctx),
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => on_packet(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(ctx),
        _ => {}
    }
}

/// This socket's tuple, from its own point of view.
#[inline(always)]
fn own_key(ctx: &SockOpsContext) -> SockKey {
    // SAFETY: helper call on our own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: valid context; every field read, each on its own (see `ctx`).
    let ops = unsafe { &*ctx.ops };
    let family = ctx.family();
    let (local4, remote4) = (ctx.local_ip4(), ctx.remote_ip4());
    let local6 = crate::ctx::words(&raw const ops.local_ip6);
    let remote6 = crate::ctx::words(&raw const ops.remote_ip6);
    SockKey::from_sock_ops(
        netns,
        crate::ctx::pick(family, local4, local6),
        ctx.local_port(),
        crate::ctx::pick(family, remote4, remote6),
        ctx.remote_port(),
    )
}

/// The proxy's inbound passthrough source, 127.0.0.6 or `::6`.
#[inline(always)]
fn is_passthrough(ip: &net::IpRaw) -> bool {
    *ip == INBOUND_PASSTHROUGH_SRC_RAW || *ip == INBOUND_PASSTHROUGH_SRC_V6_RAW
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: helper call on our own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Ask for state callbacks so the socket's entries go when it closes. A
/// failure here only means the LRU (cookie map) or the next connection on
/// the same tuple (tuple map) reclaims the entry.
#[inline(always)]
fn watch_close(ctx: &SockOpsContext) {
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    // The helper takes the flags as an int; they are small bit flags.
    let _ = ctx.set_cb_flags(flags.cast_signed());
}

/// A redirected connect is about to send its SYN: watch it, so a connect
/// that never completes frees its cookie entry.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    if ORIG_DST_BY_COOKIE.get_ptr(cookie(ctx)).is_some() {
        watch_close(ctx);
    }
}

#[inline(always)]
fn on_active_established(ctx: &SockOpsContext) {
    // The proxy's inbound passthrough connection to the app.
    let key = own_key(ctx);
    if is_passthrough(&key.src_ip) {
        if sockmap_enabled(key.netns_cookie) {
            watch_close(ctx);
            if !short_run(inbound_dest(&key, End::Active)) {
                insert_socket(ctx, key, End::Active);
            }
        }
        return;
    }
    let cookie = cookie(ctx);
    // SAFETY: copied out before the entry is removed.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
    if ORIG_DST_BY_TUPLE
        .insert(key, orig, u64::from(BPF_ANY))
        .is_err()
    {
        bump(Counter::OrigDstStoreFailed);
        return;
    }
    watch_close(ctx);
    if sockmap_enabled(key.netns_cookie) && !short_run(outbound_dest(&key, &orig)) {
        insert_socket(ctx, key, End::Active);
    }
}

#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    let key = own_key(ctx);
    // SAFETY: copied out at once.
    let Some(cfg) = (unsafe { NETNS_CONFIG.get(key.netns_cookie) }).copied() else {
        return;
    };
    // A connection sk_lookup steered to the inbound listener: its entry
    // goes when it closes.
    if INBOUND_STEERED.get_ptr(key).is_some() {
        watch_close(ctx);
        return;
    }
    // The app's end of the proxy's inbound passthrough connection, or the
    // proxy's end of a connection connect4 redirected.
    let dest = if is_passthrough(&key.dst_ip) {
        inbound_dest(&key, End::Passive)
    } else {
        // The outbound port, or the DNS proxy's (a TCP DNS query).
        let proxy_port = key.src_port == cfg.outbound_port
            || (cfg.has(flags::REDIRECT_DNS) && key.src_port == cfg.dns_port);
        if !proxy_port {
            return;
        }
        let Some(orig) = claim_orig_dst(ctx, key) else {
            return;
        };
        // The entry is ours now: it goes when this socket closes.
        watch_close(ctx);
        outbound_dest(&key, &orig)
    };
    // The connecting end made the same choice from the same count.
    if !cfg.has(flags::SOCKMAP) || short_run(dest) {
        return;
    }
    // (Bytes that came over TCP before it joined, TCP Fast Open data, are
    // kept in order by sk_msg's gate: nothing is redirected until they are
    // read.)
    watch_close(ctx);
    insert_socket(ctx, key, End::Passive);
}

/// The proxy's end of a redirected connection takes over the app's
/// original-destination entry (keyed by the app's tuple): from now on the
/// entry lives as long as this socket, so `SO_ORIGINAL_DST` still answers
/// when the app has already closed. `None`: no entry, not a redirected
/// connection.
#[inline(always)]
fn claim_orig_dst(ctx: &SockOpsContext, key: SockKey) -> Option<OrigDst> {
    let app = key.reversed();
    let entry = ORIG_DST_BY_TUPLE.get_ptr_mut(app)?;
    // SAFETY: a valid value pointer of this map; a plain store, then a copy.
    unsafe {
        (*entry).owner = cookie(ctx);
        Some(*entry)
    }
}

/// Where a redirected outbound connection goes: its original destination,
/// in the namespace of `key` (either end's tuple).
#[inline(always)]
fn outbound_dest(key: &SockKey, orig: &OrigDst) -> DestKey {
    DestKey::new(key.netns_cookie, orig.ip, orig.port)
}

/// Where an inbound passthrough connection (proxy → app, from 127.0.0.6
/// or `::6`) goes: the app's address, seen from either end.
#[inline(always)]
fn inbound_dest(key: &SockKey, end: End) -> DestKey {
    match end {
        End::Active => DestKey::new(key.netns_cookie, key.dst_ip, key.dst_port),
        End::Passive => DestKey::new(key.netns_cookie, key.src_ip, key.src_port),
    }
}

/// The loader's `SHORT_CONN_THRESHOLD`.
#[inline(always)]
fn short_threshold() -> u32 {
    // SAFETY: a read-only global, set before load.
    unsafe { core::ptr::read_volatile(&raw const crate::SHORT_CONN_THRESHOLD) }
}

/// Whether the last connections to `dest` were all short, so many in a
/// row that this one stays on plain TCP (counted): for one exchange, the
/// short-circuit's set-up and tear-down cost more than it saves. Both ends
/// of a connection ask as they are established, one right after the
/// other, and get the same answer.
#[inline(always)]
fn short_run(dest: DestKey) -> bool {
    let threshold = short_threshold();
    if threshold == 0 {
        return false;
    }
    // SAFETY: a u32 read once.
    let short = unsafe { SHORT_CONNS.get(dest) }.is_some_and(|n| *n >= threshold);
    if short {
        bump(Counter::SockhashSkippedShort);
    }
    short
}

/// The proxy's end of a closing connection counts it for its destination:
/// short (neither end sent more than `SHORT_CONN_MAX_SENDS` messages) makes
/// the run one longer, long ends it. What a socket sent: sk_msg's count
/// while it was short-circuited, TCP's data segments otherwise; what its
/// peer sent: what came over TCP and what the peer's sk_msg redirected.
#[inline(always)]
fn count_connection(ctx: &SockOpsContext, key: SockKey, dest: DestKey) {
    if short_threshold() == 0 || !sockmap_enabled(key.netns_cookie) {
        return;
    }
    // SAFETY: valid context; every field read on its own.
    let ops = unsafe { &*ctx.ops };
    let (segs_in, segs_out) = (ops.data_segs_in, ops.data_segs_out);
    // SAFETY: valid context; `sk` is the full socket of this callback.
    let sk = unsafe { ops.__bindgen_anon_2.sk };
    let (sent, received) = if let Some(state) = crate::sock_state(sk) {
        // SAFETY: copied out at once.
        let redirected = unsafe { PEERS.get(key) }.map_or(0, |p| p.received);
        // SAFETY: storage of this socket, which is locked here.
        let sends = unsafe { (*state).sends };
        // TCP's count too: a socket that left the short-circuit (it turned
        // blocking) sends over TCP, where sk_msg no longer counts.
        (sends.max(segs_out), segs_in.saturating_add(redirected))
    } else {
        (segs_out, segs_in)
    };
    if sent > SHORT_CONN_MAX_SENDS || received > SHORT_CONN_MAX_SENDS {
        let _ = SHORT_CONNS.remove(dest);
    } else if let Some(n) = SHORT_CONNS.get_ptr_mut(dest) {
        // SAFETY: a valid value pointer of this map; a plain store.
        unsafe { *n = (*n).saturating_add(1) };
    } else {
        let _ = SHORT_CONNS.insert(dest, 1, u64::from(BPF_ANY));
    }
}

#[inline(always)]
fn sockmap_enabled(netns: u64) -> bool {
    // SAFETY: read once.
    unsafe { NETNS_CONFIG.get(netns) }.is_some_and(|c| c.has(flags::SOCKMAP))
}

/// Puts the socket into the SOCKHASH under its own tuple, with a fresh
/// state and its `PEERS` entry, unless its reads may block where that is
/// unsafe. Any failure leaves the connection on plain TCP.
#[inline(always)]
fn insert_socket(ctx: &SockOpsContext, mut key: SockKey, end: End) {
    let l = kernel::layout();
    // SAFETY: valid context; `sk` is the full socket of this callback.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() || !l.has(KernelLayout::VALID) {
        bump(Counter::SockhashInsertFailed);
        return;
    }
    let Some(addr) = kernel::address(sk) else {
        bump(Counter::SockhashInsertFailed);
        return;
    };
    let guard = l.has(KernelLayout::GUARD_BLOCKING);
    let mut peer_flags = 0;
    match end {
        End::Active => {
            if guard && Sock::own(addr).nonblocking(&l) != Some(true) {
                bump(Counter::SockhashRefusedBlocking);
                return;
            }
        }
        End::Passive => {
            let listener = PortKey::new(key.netns_cookie, key.src_port);
            // SAFETY: a u32 value read once.
            let nonblocking = LISTENERS
                .get_ptr(listener)
                .is_some_and(|f| unsafe { *f } & LISTENER_NONBLOCKING != 0);
            if nonblocking {
                peer_flags |= SockRef::LISTENER_NONBLOCKING;
            } else if guard {
                bump(Counter::SockhashRefusedBlocking);
                // The connecting end joined first: without this end it
                // has no one to short-circuit to, so it leaves too.
                if let Some(entry) = PEERS.get_ptr_mut(key.reversed()) {
                    // SAFETY: a valid value pointer of this map; a plain store.
                    unsafe { (*entry).flags |= SockRef::EVICT };
                }
                return;
            }
        }
    }
    // The state must exist before the socket can run sk_msg: sk_msg never
    // creates it, so a socket without state consistently uses TCP.
    let mut fresh = SockState {
        flags: 0,
        sends: 0,
        key,
        addr,
    };
    // SAFETY: map pointer of a BTF sk_storage map, full socket, valid init value.
    let state = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SOCK_STATE).cast_mut().cast(),
            sk.cast(),
            core::ptr::from_mut(&mut fresh).cast(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    };
    if state.is_null() {
        bump(Counter::SockhashInsertFailed);
        return;
    }
    // Without this entry no sender could look at it: it stays out.
    let peer = SockRef {
        addr,
        cookie: cookie(ctx),
        flags: peer_flags,
        received: 0,
    };
    if PEERS.insert(key, peer, u64::from(BPF_ANY)).is_err() {
        bump(Counter::SockhashInsertFailed);
        return;
    }
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: `ops` is this callback's context.
    if SOCKETS
        .update(&mut key, unsafe { &mut *ops }, u64::from(BPF_ANY))
        .is_ok()
    {
        bump(Counter::SockhashInserted);
        if guard {
            // A call before each of its packets, to take it out if it
            // turns blocking.
            let flags = ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
            let _ = ctx.set_cb_flags(flags.cast_signed());
        }
        debug!(
            ctx,
            "sockops: socket :{} -> :{} short-circuited", key.src_port, key.dst_port
        );
    } else {
        let _ = PEERS.remove(key);
        bump(Counter::SockhashInsertFailed);
    }
}

/// Before a packet of a short-circuited socket: one whose file turned
/// blocking (sk_msg marked it) leaves the SOCKHASH once its ingress queue
/// is empty (leaving earlier would drop what is queued), so its next read
/// is plain TCP's. Its peer finds no `PEERS` entry and uses TCP too.
#[inline(always)]
fn on_packet(ctx: &SockOpsContext) {
    // SAFETY: valid context; `sk` is the full socket of this callback.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    let Some(state) = crate::sock_state(sk) else {
        return;
    };
    // SAFETY: storage of this socket, which is locked here.
    let state = unsafe { &mut *state };
    // SAFETY: a u32 read once.
    let marked = PEERS
        .get_ptr(state.key)
        .is_some_and(|p| unsafe { (*p).flags } & SockRef::EVICT != 0);
    if state.flags & SockState::EVICT == 0 && !marked {
        return;
    }
    let l = kernel::layout();
    if Sock::own(state.addr).ingress_empty(&l) != Some(true) {
        return;
    }
    let mut key = state.key;
    let _ = PEERS.remove(key);
    // SAFETY: the SOCKHASH's map pointer and a key on our stack.
    let deleted = unsafe {
        bpf_map_delete_elem(
            core::ptr::from_ref(&SOCKETS).cast_mut().cast(),
            core::ptr::from_mut(&mut key).cast(),
        )
    };
    state.flags &= !SockState::EVICT;
    let flags = ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
    let _ = ctx.set_cb_flags(flags.cast_signed());
    if deleted == 0 {
        bump(Counter::SockhashEvicted);
    }
}

/// A socket starts listening: if it is the served namespace's inbound
/// port, it becomes the listener sk_lookup steers to. Any proxy (ours or
/// external) registers this way, as long as it listens after the agent
/// attached; the built-in proxy's listener is also put there directly.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let key = own_key(ctx);
    // SAFETY: copied out at once.
    let Some(cfg) = (unsafe { NETNS_CONFIG.get(key.netns_cookie) }).copied() else {
        return;
    };
    record_listener(ctx, key);
    if !cfg.has(flags::REDIRECT_INBOUND) || key.src_port != cfg.inbound_port {
        return;
    }
    let slot = ListenerKey::new(key.netns_cookie, ctx.family());
    // SAFETY: `ctx.ops` is this callback's context, a listening full socket.
    match INBOUND_LISTENER.update(slot, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY)) {
        Ok(()) => bump(Counter::InboundListenerRegistered),
        Err(_) => bump(Counter::SockhashInsertFailed),
    }
}

/// Whether the listener on this port is non-blocking: the sockets it will
/// accept have no file of their own when they are established.
#[inline(always)]
fn record_listener(ctx: &SockOpsContext, key: SockKey) {
    // SAFETY: valid context; `sk` is the listening full socket.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    let l = kernel::layout();
    if sk.is_null() || !l.has(KernelLayout::VALID) {
        return;
    }
    let Some(addr) = kernel::address(sk) else {
        return;
    };
    let nonblocking = Sock::own(addr).nonblocking(&l) == Some(true);
    let value = if nonblocking { LISTENER_NONBLOCKING } else { 0 };
    let _ = LISTENERS.insert(
        PortKey::new(key.netns_cookie, key.src_port),
        value,
        u64::from(BPF_ANY),
    );
}

/// A socket closes: it drops the original-destination entry it owns. The
/// app's socket owns its entry until the proxy's end claims it; the proxy's
/// end owns it by cookie, so a new connection that reuses the app's tuple
/// (its entry unclaimed, or claimed by another socket) keeps its own.
#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let key = own_key(ctx);
    let cookie = cookie(ctx);
    // SAFETY: copied out at once.
    let own = unsafe { ORIG_DST_BY_TUPLE.get(key) }.is_some_and(|o| o.owner == 0);
    // SAFETY: as above.
    let claimed = unsafe { ORIG_DST_BY_TUPLE.get(key.reversed()) }
        .copied()
        .filter(|o| o.owner == cookie);
    // The proxy's end counts the connection: it owns the outbound entry
    // (the app's end may close after it is gone), it made the inbound one.
    if let Some(orig) = claimed {
        count_connection(ctx, key, outbound_dest(&key, &orig));
    } else if is_passthrough(&key.src_ip) {
        count_connection(ctx, key, inbound_dest(&key, End::Active));
    }
    let claimed = claimed.is_some();
    let owned = if own { key } else { key.reversed() };
    if (own || claimed) && ORIG_DST_BY_TUPLE.remove(owned).is_ok() {
        bump(Counter::SocketsClosed);
    }
    let _ = INBOUND_STEERED.remove(key);
    let _ = PEERS.remove(key);
    // A connect that never reached ESTABLISHED still owns its cookie entry.
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
}
