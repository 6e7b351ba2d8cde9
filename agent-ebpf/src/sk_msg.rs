//! `sk_msg`: move each message of a short-circuited socket straight into the
//! peer socket's receive queue (`BPF_F_INGRESS`), found by the reversed tuple.
//!
//! A socket's choice is sticky. If its first message finds no peer (the
//! proxy's end was not in the map yet), that message goes over TCP, and so
//! must every later one: a redirected message lands in the peer's ingress
//! queue, which the reader drains *before* its TCP receive queue, so mixing
//! the two paths would reorder bytes.
//!
//! Backpressure. The kernel bounds that ingress queue by nothing but the
//! host's TCP memory: a fast sender and a slow reader would grow it to
//! gigabytes, then every socket on the host gets ENOMEM. So each sender
//! counts what it redirected (`SockState::sent`) and each reader's reads
//! are counted in `INGRESS_READ` (by the recvmsg fexit where the kernel
//! allows tracing, else by the built-in proxy for its own sockets); a
//! sender more than `SOCKMAP_QUEUE_LIMIT` ahead of its reader switches to
//! TCP for good, where the usual flow control holds it back. A reader
//! nobody counts for thus gets that many bytes short-circuited in all. The
//! switch keeps the byte order: what is still queued is read before
//! anything TCP brings.

use agent_common::{Counter, SockKey, SockState};
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_F_INGRESS,
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_storage_get},
    programs::SkMsgContext,
};

use aya_log_ebpf::debug;

use crate::{INGRESS_READ, SK_PASS, SOCK_STATE, SOCKETS, counters::bump};

#[inline(always)]
pub fn sk_msg(ctx: &SkMsgContext) {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let md = unsafe { &*ctx.msg };
    // SAFETY: `sk` is the sending socket.
    let sk = unsafe { md.__bindgen_anon_3.sk };
    if sk.is_null() {
        bump(Counter::MsgPassed);
        return;
    }
    // SAFETY: BTF sk_storage map pointer and a full socket; no creation here.
    let state = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SOCK_STATE).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockState>();
    if state.is_null() {
        bump(Counter::MsgPassed);
        return;
    }
    // SAFETY: non-null storage of this socket; sendmsg holds the socket lock.
    let state = unsafe { &mut *state };
    if state.verdict == SockState::VERDICT_PASS {
        bump(Counter::MsgPassed);
        return;
    }
    // SAFETY: helper call on our own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // Every address field read, each on its own (see `ctx`).
    let local = crate::ctx::pick(
        md.family,
        md.local_ip4,
        crate::ctx::words(&raw const md.local_ip6),
    );
    let remote = crate::ctx::pick(
        md.family,
        md.remote_ip4,
        crate::ctx::words(&raw const md.remote_ip6),
    );
    let mut peer =
        SockKey::from_sock_ops(netns, local, md.local_port, remote, md.remote_port).reversed();
    // What the reader took out; without an entry the peer is not
    // short-circuited.
    let Some(read) = INGRESS_READ.get_ptr(peer) else {
        state.verdict = SockState::VERDICT_PASS;
        bump(Counter::MsgPassed);
        return;
    };
    let size = u64::from(md.size);
    // SAFETY: a value of our hash map, written concurrently by the reader's
    // side only (an aligned u64: never torn).
    let read = unsafe { core::ptr::read_volatile(read) };
    let queued = state.sent.wrapping_sub(read);
    if queued.saturating_add(size) > queue_limit() {
        // The reader fell behind: TCP from now on, which holds us back.
        debug!(
            ctx,
            "sk_msg: :{} -> :{} spills to TCP: sent {}, read {}, size {}",
            peer.dst_port,
            peer.src_port,
            state.sent,
            read,
            size
        );
        state.verdict = SockState::VERDICT_PASS;
        bump(Counter::MsgSpilled);
        bump(Counter::MsgPassed);
        return;
    }
    // On a miss the helper returns SK_DROP; we return SK_PASS regardless, so
    // the message continues over TCP instead of being lost.
    if SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        state.verdict = SockState::VERDICT_REDIRECT;
        state.sent = state.sent.wrapping_add(size);
        bump(Counter::MsgRedirected);
    } else {
        state.verdict = SockState::VERDICT_PASS;
        bump(Counter::MsgPassed);
    }
}

/// The sockmap queue limit the loader set.
#[inline(always)]
fn queue_limit() -> u64 {
    // SAFETY: a read-only global, set before load.
    unsafe { core::ptr::read_volatile(&raw const crate::SOCKMAP_QUEUE_LIMIT) }
}
