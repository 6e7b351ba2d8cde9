//! Which iptables binaries write the rules: the legacy or nft backend (both
//! can hold rules in a namespace at once, and neither sees the other's),
//! for IPv4 or IPv6.

use std::fmt;

/// How long legacy iptables waits for the xtables lock (istio's `--wait=30`).
const LEGACY_WAIT: &str = "--wait=30";

/// Which iptables binaries to run. Both backends can hold rules at once in
/// a namespace; they do not see each other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `iptables-legacy`, `iptables-legacy-save`, `iptables-legacy-restore`.
    Legacy,
    /// `iptables-nft` and friends.
    Nft,
    /// The unsuffixed `iptables` binaries, whatever they point to.
    Plain,
}

/// An IP family: iptables or ip6tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        })
    }
}

pub(super) const FAMILIES: [Family; 2] = [Family::Ipv4, Family::Ipv6];

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Legacy => "legacy",
            Self::Nft => "nft",
            Self::Plain => "plain",
        })
    }
}

impl Backend {
    fn binary(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::Ipv4 => "iptables",
            Family::Ipv6 => "ip6tables",
        };
        let suffix = match self {
            Self::Legacy => "-legacy",
            Self::Nft => "-nft",
            Self::Plain => "",
        };
        format!("{base}{suffix}{tool}")
    }

    /// `iptables-legacy`, `ip6tables-nft`, ...
    #[must_use]
    pub fn iptables(self, family: Family) -> String {
        self.binary(family, "")
    }

    /// `iptables-legacy-save`, ...
    #[must_use]
    pub fn save(self, family: Family) -> String {
        self.binary(family, "-save")
    }

    /// `iptables-legacy-restore`, ...
    #[must_use]
    pub fn restore(self, family: Family) -> String {
        self.binary(family, "-restore")
    }

    /// Extra arguments of commands that write (legacy takes a lock).
    pub(super) fn wait(self) -> &'static [&'static str] {
        match self {
            Self::Legacy => &[LEGACY_WAIT],
            Self::Nft | Self::Plain => &[],
        }
    }
}
