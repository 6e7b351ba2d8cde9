//! The capabilities this process holds (effective set, `/proc/self/status`).

use std::{fs, io};

/// The capabilities the agent may need, with their numbers.
pub const RELEVANT: [(&str, u32); 5] = [
    ("CAP_NET_ADMIN", 12),
    ("CAP_NET_RAW", 13),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
];

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_BPF: u32 = 39;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    #[must_use]
    pub fn has(self, cap: u32) -> bool {
        self.0 & (1u64 << cap) != 0
    }

    /// Names of the relevant capabilities held.
    #[must_use]
    pub fn held(self) -> Vec<&'static str> {
        RELEVANT
            .iter()
            .filter(|(_, n)| self.has(*n))
            .map(|(s, _)| *s)
            .collect()
    }

    /// Loading programs needs `CAP_BPF` (5.8+) or `CAP_SYS_ADMIN`.
    #[must_use]
    pub fn can_bpf(self) -> bool {
        self.has(CAP_BPF) || self.has(CAP_SYS_ADMIN)
    }
}

/// Parses the `CapEff:` line of a status file.
#[must_use]
pub fn parse_cap_eff(status: &str) -> Option<CapSet> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok().map(CapSet)
}

pub fn effective() -> io::Result<CapSet> {
    let status = fs::read_to_string("/proc/self/status")?;
    parse_cap_eff(&status).ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything() {
        let c = parse_cap_eff("Name:\tx\nCapEff:\t000001ffffffffff\n").unwrap();
        assert!(c.can_bpf() && c.has(CAP_NET_ADMIN));
        assert_eq!(c.held().len(), RELEVANT.len());
    }

    #[test]
    fn only_net_admin() {
        let c = parse_cap_eff("CapEff:\t0000000000001000\n").unwrap();
        assert!(c.has(CAP_NET_ADMIN));
        assert!(!c.can_bpf());
        assert_eq!(c.held(), vec!["CAP_NET_ADMIN"]);
    }

    #[test]
    fn missing_line() {
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }
}
