//! `sk_msg`: move each message of a short-circuited socket straight into the
//! peer socket's ingress queue (`BPF_F_INGRESS`), found by the reversed
//! tuple, whenever that is invisible to both apps; otherwise let it go over
//! TCP, counted. Decided per message:
//!
//! - **Blocking readers.** A *blocking* read of a socket in a sockmap can
//!   return EAGAIN on a wakeup without data (`tcp_bpf_recvmsg` waits once:
//!   a signal, a reset, write space), where TCP would go on waiting or say
//!   ECONNRESET. Where the start-up probe saw this (`GUARD_BLOCKING`), a
//!   message goes to the peer only if the peer's reads never block (its
//!   file is `O_NONBLOCK`, or it is not accepted yet from a non-blocking
//!   listener), and a sender or a reader found blocking is marked to leave
//!   the map (sockops takes it out at its next packet).
//! - **Backpressure.** The ingress queue is charged to the reader's receive
//!   memory but never capped by its buffer: past `SOCKMAP_QUEUE_LIMIT` of
//!   receive memory, messages go over TCP, whose window (shrunk by that
//!   same memory) holds the sender back.
//! - **Byte order.** A reader drains its ingress queue before its TCP
//!   receive queue, so a message may be redirected only when no earlier
//!   byte of the same direction is still in TCP: all the sender wrote to
//!   TCP acknowledged, all the reader received over TCP read. (The other
//!   way, redirect then TCP, is always in order.)

use agent_common::{Counter, KernelLayout, SockKey, SockRef, SockState};
use aya_ebpf::{
    EbpfContext as _, bindings::BPF_F_INGRESS, helpers::generated::bpf_get_netns_cookie,
    programs::SkMsgContext,
};

use crate::{
    PEERS, SK_PASS, SOCKETS,
    counters::{add, bump},
    kernel::{self, Sock},
};

/// Why a message goes over TCP.
#[derive(Clone, Copy)]
enum Pass {
    /// No peer in the map, no state, an unknown kernel layout, a failed
    /// redirect.
    Miss,
    Gated,
    Spilled,
    ReceiverBlocking,
    SenderBlocking,
}

#[inline(always)]
pub fn sk_msg(ctx: &SkMsgContext) {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let size = u64::from(unsafe { (*ctx.msg).size });
    match decide(ctx) {
        Ok(()) => {
            bump(Counter::MsgRedirected);
            add(Counter::BytesRedirected, size);
        }
        Err(why) => {
            bump(Counter::MsgPassed);
            add(Counter::BytesPassed, size);
            match why {
                Pass::Miss => {}
                Pass::Gated => bump(Counter::MsgGated),
                Pass::Spilled => bump(Counter::MsgSpilled),
                Pass::ReceiverBlocking => bump(Counter::MsgReceiverBlocking),
                Pass::SenderBlocking => bump(Counter::MsgSenderBlocking),
            }
        }
    }
}

/// Redirects the message, or says why not.
#[inline(always)]
fn decide(ctx: &SkMsgContext) -> Result<(), Pass> {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let md = unsafe { &*ctx.msg };
    let l = kernel::layout();
    if !l.has(KernelLayout::VALID) {
        return Err(Pass::Miss);
    }
    // SAFETY: `sk` is the sending socket.
    let sk = unsafe { md.__bindgen_anon_3.sk };
    let state = crate::sock_state(sk).ok_or(Pass::Miss)?;
    // SAFETY: storage of this socket; sendmsg holds the socket lock.
    let state = unsafe { &mut *state };
    state.sends = state.sends.saturating_add(1);
    let own = Sock::own(state.addr);
    let guard = l.has(KernelLayout::GUARD_BLOCKING);
    if guard && own.nonblocking(&l) != Some(true) {
        state.flags |= SockState::EVICT;
        return Err(Pass::SenderBlocking);
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
    let mut key =
        SockKey::from_sock_ops(netns, local, md.local_port, remote, md.remote_port).reversed();
    let entry = PEERS.get_ptr_mut(key);
    // SAFETY: a valid value pointer of this map, copied out at once.
    let Some(peer_ref) = entry.map(|p| unsafe { *p }) else {
        // No peer to short-circuit to (it never joined, or left): this
        // socket leaves too, at its next packet.
        state.flags |= SockState::EVICT;
        return Err(Pass::Miss);
    };
    let peer = Sock::checked(&l, peer_ref.addr, peer_ref.cookie).ok_or(Pass::Miss)?;
    if guard {
        let safe = match peer.nonblocking(&l) {
            Some(true) => true,
            Some(false) => {
                // Its own reads must leave tcp_bpf_recvmsg too.
                if let Some(entry) = entry {
                    // SAFETY: a valid value pointer of this map; a plain store.
                    unsafe { (*entry).flags |= SockRef::EVICT };
                }
                false
            }
            None => peer_ref.flags & SockRef::LISTENER_NONBLOCKING != 0,
        };
        if !safe {
            return Err(Pass::ReceiverBlocking);
        }
    }
    let held = u64::from(peer.rmem(&l).ok_or(Pass::Miss)?);
    if held + u64::from(md.size) > queue_limit() {
        return Err(Pass::Spilled);
    }
    if own.tcp_sent_all(&l) != Some(true) || peer.tcp_read_all(&l) != Some(true) {
        return Err(Pass::Gated);
    }
    // On a miss the helper returns SK_DROP; we return SK_PASS regardless, so
    // the message continues over TCP instead of being lost.
    if SOCKETS.redirect_msg(ctx, &mut key, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        if let Some(p) = entry {
            // SAFETY: a valid value pointer of this map (RCU keeps it for
            // the program's run); a plain store, counted by its only sender.
            unsafe { (*p).received = (*p).received.saturating_add(1) };
        }
        Ok(())
    } else {
        Err(Pass::Miss)
    }
}

/// The sockmap queue limit the loader set.
#[inline(always)]
fn queue_limit() -> u64 {
    // SAFETY: a read-only global, set before load.
    unsafe { core::ptr::read_volatile(&raw const crate::SOCKMAP_QUEUE_LIMIT) }
}

/// The start-up probe's program (on `PROBE_SOCKETS` only): each message to
/// the other socket of the pair, keyed by local port.
#[inline(always)]
pub fn probe_msg(ctx: &SkMsgContext) {
    // SAFETY: valid context.
    let md = unsafe { &*ctx.msg };
    let mut peer = u32::from(agent_common::net::port_from_be_upper(md.remote_port));
    let _ = crate::PROBE_SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS));
}
