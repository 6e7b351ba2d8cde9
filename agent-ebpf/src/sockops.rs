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

use agent_common::{
    Counter, INBOUND_LISTENER_V4, INBOUND_LISTENER_V6, INBOUND_PASSTHROUGH_SRC_RAW,
    INBOUND_PASSTHROUGH_SRC_V6_RAW, SockKey, SockState, flags, net,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE, bpf_sock_ops,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_storage_get},
    programs::SockOpsContext,
};
use aya_log_ebpf::debug;

use crate::{
    INBOUND_LISTENER, INBOUND_STEERED, INGRESS_READ, NETNS_CONFIG, ORIG_DST_BY_COOKIE,
    ORIG_DST_BY_TUPLE, SOCK_STATE, SOCKETS, counters::bump,
};

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
            insert_socket(ctx, key);
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
    if sockmap_enabled(key.netns_cookie) {
        insert_socket(ctx, key);
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
    let passthrough = is_passthrough(&key.dst_ip);
    if !passthrough {
        // The outbound port, or the DNS proxy's (a TCP DNS query).
        let proxy_port = key.src_port == cfg.outbound_port
            || (cfg.has(flags::REDIRECT_DNS) && key.src_port == cfg.dns_port);
        if !proxy_port || !claim_orig_dst(ctx, key) {
            return;
        }
        // The entry is ours now: it goes when this socket closes.
        watch_close(ctx);
    }
    if !cfg.has(flags::SOCKMAP) {
        return;
    }
    // Bytes that arrived over TCP before the socket joins the map (TCP Fast
    // Open data) would be read after redirected ones: keep plain TCP.
    // SAFETY: valid context.
    if unsafe { (*ctx.ops).bytes_received } != 0 {
        bump(Counter::SockhashInsertFailed);
        return;
    }
    watch_close(ctx);
    insert_socket(ctx, key);
}

/// The proxy's end of a redirected connection takes over the app's
/// original-destination entry (keyed by the app's tuple): from now on the
/// entry lives as long as this socket, so `SO_ORIGINAL_DST` still answers
/// when the app has already closed. `false`: no entry, not a redirected
/// connection.
#[inline(always)]
fn claim_orig_dst(ctx: &SockOpsContext, key: SockKey) -> bool {
    let app = key.reversed();
    let Some(entry) = ORIG_DST_BY_TUPLE.get_ptr_mut(app) else {
        return false;
    };
    // SAFETY: a valid value pointer of this map; a plain store.
    unsafe { (*entry).owner = cookie(ctx) };
    true
}

#[inline(always)]
fn sockmap_enabled(netns: u64) -> bool {
    // SAFETY: read once.
    unsafe { NETNS_CONFIG.get(netns) }.is_some_and(|c| c.has(flags::SOCKMAP))
}

/// Puts the socket into the SOCKHASH under its own tuple, with a fresh
/// sk_msg state. Any failure leaves the connection on plain TCP.
#[inline(always)]
fn insert_socket(ctx: &SockOpsContext, mut key: SockKey) {
    // SAFETY: valid context; `sk` is the full socket of this callback.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        bump(Counter::SockhashInsertFailed);
        return;
    }
    // The state must exist before the socket can run sk_msg: sk_msg never
    // creates it, so a socket without state consistently uses TCP.
    let mut fresh = SockState {
        verdict: SockState::VERDICT_UNDECIDED,
        pad: 0,
        key,
        sent: 0,
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
    // Nothing read from its ingress queue yet: without this entry no sender
    // could tell how far behind this socket's reader is, so the socket
    // stays out of the map.
    if INGRESS_READ.insert(key, 0, u64::from(BPF_ANY)).is_err() {
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
        debug!(
            ctx,
            "sockops: socket :{} -> :{} short-circuited", key.src_port, key.dst_port
        );
    } else {
        let _ = INGRESS_READ.remove(key);
        bump(Counter::SockhashInsertFailed);
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
    if !cfg.has(flags::REDIRECT_INBOUND) || key.src_port != cfg.inbound_port {
        return;
    }
    let slot = if ctx.family() == net::AF_INET {
        INBOUND_LISTENER_V4
    } else {
        INBOUND_LISTENER_V6
    };
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: `ops` is this callback's context, a listening full socket.
    match unsafe { INBOUND_LISTENER.update(slot, ops, u64::from(BPF_ANY)) } {
        Ok(()) => bump(Counter::InboundListenerRegistered),
        Err(_) => bump(Counter::SockhashInsertFailed),
    }
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
    let claimed =
        unsafe { ORIG_DST_BY_TUPLE.get(key.reversed()) }.is_some_and(|o| o.owner == cookie);
    let owned = if own { key } else { key.reversed() };
    if (own || claimed) && ORIG_DST_BY_TUPLE.remove(owned).is_ok() {
        bump(Counter::SocketsClosed);
    }
    let _ = INBOUND_STEERED.remove(key);
    let _ = INGRESS_READ.remove(key);
    // A connect that never reached ESTABLISHED still owns its cookie entry.
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
}
