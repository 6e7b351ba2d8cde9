//! Bulk transfers with integrity checks.

use std::{
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

use crate::PollStream;

/// Deterministic pseudo-random bytes (xorshift), so a transfer is not a
/// compressible or repeating pattern.
pub fn fill(rng: &mut u64, buf: &mut [u8]) {
    for b in buf {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *b = rng.to_le_bytes()[0];
    }
}

/// Writes `total` bytes in `write_size` writes to an echoing peer while
/// reading the echo back; half-closes after the last write. Asserts the
/// echo is byte-exact, complete, and never stalls for a second or more
/// (times [`crate::time_scale`]).
/// Returns the SHA-256 of what was sent.
pub fn echo_round_trip(conn: &mut PollStream, total: usize, write_size: usize) -> [u8; 32] {
    let mut writer = conn.try_clone().expect("clone stream");
    let sender = std::thread::spawn(move || {
        let mut hash = Sha256::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut chunk = vec![0u8; write_size];
        let mut sent = 0;
        while sent < total {
            let n = write_size.min(total - sent);
            fill(&mut rng, &mut chunk[..n]);
            writer.write_all(&chunk[..n]).expect("write");
            hash.update(&chunk[..n]);
            sent += n;
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        <[u8; 32]>::from(hash.finalize())
    });
    let mut hash = Sha256::new();
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let mut longest_stall = Duration::ZERO;
    let mut last = Instant::now();
    loop {
        let n = conn.read(&mut buf).expect("read echo");
        let now = Instant::now();
        longest_stall = longest_stall.max(now - last);
        last = now;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        got += n;
    }
    let sent_hash = sender.join().expect("sender thread");
    assert_eq!(got, total, "bytes echoed back");
    assert_eq!(
        <[u8; 32]>::from(hash.finalize()),
        sent_hash,
        "echoed bytes differ"
    );
    eprintln!(
        "{total} bytes each way in {write_size}-byte writes: longest stall {longest_stall:?}"
    );
    assert!(
        longest_stall < crate::scaled(Duration::from_secs(1)),
        "a read stalled {longest_stall:?}"
    );
    sent_hash
}
