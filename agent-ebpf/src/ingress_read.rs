//! `fexit/tcp_bpf_recvmsg`: a reader of a short-circuited socket took bytes
//! from its ingress queue. Counts them in its `INGRESS_READ` entry, so the
//! sender's sk_msg knows how far behind the reader is (backpressure; see
//! `sk_msg`).
//!
//! Every bytes-read result of a socket we track counts: until its sender
//! switches to TCP, its ingress queue is the only place bytes come from (a
//! socket that received TCP bytes first never has a redirecting sender).

use agent_common::SockState;
use aya_ebpf::{helpers::generated::bpf_sk_storage_get, programs::FExitContext};

use crate::{INGRESS_READ, SOCK_STATE};

/// `tcp_bpf_recvmsg(sk, msg, len, flags, addr_len)`: argument positions, and
/// the return value right after them.
const ARG_SK: usize = 0;
const ARG_FLAGS: usize = 3;
const RET: usize = 5;
const MSG_PEEK: i32 = 2;

#[inline(always)]
pub fn ingress_read(ctx: &FExitContext) {
    // An `int`: its slot's upper half is whatever the function left in the
    // register (6.1 leaves -EAGAIN as 0x00000000_fffffff5), so read 32 bits.
    let read_now: i32 = ctx.arg(RET);
    let flags: i32 = ctx.arg(ARG_FLAGS);
    if read_now <= 0 || flags & MSG_PEEK != 0 {
        return;
    }
    let sk: *mut core::ffi::c_void = ctx.arg(ARG_SK);
    // SAFETY: BTF sk_storage map pointer and the traced function's socket
    // argument; no creation: only sockets we put in the SOCKHASH have state.
    let state = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SOCK_STATE).cast_mut().cast(),
            sk,
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockState>();
    if state.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket; its key never changes.
    let key = unsafe { (*state).key };
    let Some(read) = INGRESS_READ.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a value of our hash map; recvmsg holds the socket lock, so
    // reads of one socket are serialised and this is its only writer.
    unsafe { *read = (*read).wrapping_add(u64::from(read_now.cast_unsigned())) };
}
