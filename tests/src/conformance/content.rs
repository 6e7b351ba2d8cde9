//! The bytes the scenarios move and what they must hash to, made once per
//! test process and shared by every server and client.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

use sha2::{Digest as _, Sha256};

use super::Scenario;
use crate::servers::{HTTP_BODY, pattern};

/// The data directories: one per test process, `<prefix><pid>`.
const DIR_PREFIX: &str = "mesh-redirect-conformance-";

/// The length of a line of [`Content::text`].
pub const LINE: usize = 64;

pub struct Content {
    /// [`pattern`] of the largest size a scenario downloads.
    pattern: Vec<u8>,
    /// Text lines, for readers of lines.
    text: OnceLock<Vec<u8>>,
    /// SHA-256 (hex) of each prefix of `pattern` asked for.
    sha256: Mutex<HashMap<usize, String>>,
    dir: PathBuf,
    /// The first [`Scenario::Upload`]`.size()` bytes of `pattern`: what
    /// the clients send (uploads, echoes, half-closes send a prefix).
    data_file: PathBuf,
}

impl Content {
    /// Content for downloads of up to `largest` bytes.
    ///
    /// # Panics
    /// When the data file cannot be written.
    #[must_use]
    pub fn new(largest: usize) -> Self {
        let largest = largest.max(Scenario::Upload.size());
        let mut bytes = vec![0u8; largest];
        pattern_into(0, &mut bytes);
        // The fast generator is `servers::pattern`, the tests' common oracle.
        assert_eq!(
            bytes[..1 << 16],
            pattern(1 << 16)[..],
            "pattern_into differs from servers::pattern"
        );
        // The content lives in a static that is never dropped, so this
        // directory outlives the process: the next one removes it.
        let dir = crate::process_dir(DIR_PREFIX);
        let data_file = dir.join("data.bin");
        fs::write(&data_file, &bytes[..Scenario::Upload.size()]).expect("write the data file");
        Self {
            pattern: bytes,
            text: OnceLock::new(),
            sha256: Mutex::new(HashMap::new()),
            dir,
            data_file,
        }
    }

    /// The first `len` bytes of [`pattern`].
    #[must_use]
    pub fn pattern(&self, len: usize) -> &[u8] {
        &self.pattern[..len]
    }

    /// The first `len` bytes of the text: lines of [`LINE`] bytes, line `i`
    /// its number and the alphabet rotated by it.
    #[must_use]
    pub fn text(&self, len: usize) -> &[u8] {
        &self.text.get_or_init(|| {
            let lines = Scenario::Download.size().div_ceil(LINE);
            let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
            let mut text = Vec::with_capacity(lines * LINE);
            for i in 0..lines {
                text.extend_from_slice(format!("{i:010} ").as_bytes());
                let r = i % alphabet.len();
                text.extend_from_slice(&alphabet[r..]);
                text.extend_from_slice(&alphabet[..r]);
                text.push(b'\n');
            }
            text
        })[..len]
    }

    /// Where the clients read what they send.
    #[must_use]
    pub fn data_file(&self) -> &Path {
        &self.data_file
    }

    /// SHA-256 (hex) of the first `len` bytes of [`pattern`].
    ///
    /// # Panics
    /// If a thread computing one panicked.
    #[must_use]
    pub fn pattern_sha256(&self, len: usize) -> String {
        let mut cache = self.sha256.lock().unwrap();
        cache
            .entry(len)
            .or_insert_with(|| sha256_hex(&self.pattern[..len]))
            .clone()
    }

    /// What a complete exchange of `scenario` receives, when the harness
    /// checks it byte for byte (`None`: no content to check).
    #[must_use]
    pub fn expected(&self, scenario: Scenario) -> Option<std::borrow::Cow<'_, [u8]>> {
        use std::borrow::Cow;
        let n = scenario.size();
        match scenario {
            Scenario::Small => Some(Cow::Borrowed(HTTP_BODY)),
            Scenario::Download
            | Scenario::Duplex
            | Scenario::SlowReader
            | Scenario::Download256mLimited => Some(Cow::Borrowed(self.pattern(n))),
            Scenario::Upload | Scenario::HalfClose => Some(Cow::Owned(reply(n).into_bytes())),
            Scenario::RstBlocked | Scenario::RstMid => None,
        }
    }

    /// The SHA-256 (hex) of [`Self::expected`].
    #[must_use]
    pub fn expected_sha256(&self, scenario: Scenario) -> Option<String> {
        match scenario {
            Scenario::Download
            | Scenario::Duplex
            | Scenario::SlowReader
            | Scenario::Download256mLimited => Some(self.pattern_sha256(scenario.size())),
            _ => self.expected(scenario).map(|b| sha256_hex(&b)),
        }
    }
}

impl Drop for Content {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What the server answers an upload or a half-closed stream of `n`
/// bytes that it received intact.
#[must_use]
pub fn reply(n: usize) -> String {
    format!("{n} ok\n")
}

#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// [`pattern`]`(start + buf.len())[start..]`, an order of magnitude
/// faster in a debug build (the tests' profile): the multiplication of
/// `pattern` as an addition per byte.
#[expect(
    clippy::cast_possible_truncation,
    reason = "the byte of `pattern` is bits 8..16 of each value"
)]
pub fn pattern_into(start: u64, buf: &mut [u8]) {
    const K: u64 = 2_654_435_761;
    let mut x = start.wrapping_mul(K);
    for (i, b) in (start..).zip(buf) {
        *b = ((x >> 13) as u8) ^ ((i >> 8) as u8);
        x = x.wrapping_add(K);
    }
}

/// Whether `got` matches `want` from offset `at` on: the absolute offset
/// of the first difference, if any (bytes beyond `want` differ).
#[must_use]
pub fn first_difference(want: &[u8], at: usize, got: &[u8]) -> Option<usize> {
    let end = (at + got.len()).min(want.len());
    let expected = want.get(at..end).unwrap_or(&[]);
    if expected.len() == got.len() && expected == got {
        return None;
    }
    Some(
        at + expected
            .iter()
            .zip(got)
            .position(|(a, b)| a != b)
            .unwrap_or(expected.len()),
    )
}
