//! Which connections are captured: istio-iptables' include/exclude lists,
//! with its flags and meaning, for both redirect modes.
//!
//! | flag | meaning |
//! |---|---|
//! | `-i` | outbound destinations captured: CIDRs, or `*` for all |
//! | `-x` | outbound destinations never captured |
//! | `-q` | outbound ports captured whatever the destination |
//! | `-o` | outbound ports never captured |
//! | `-b` | inbound ports captured: ports, or `*` for all |
//! | `-d` | inbound ports never captured |
//!
//! In eBPF mode the lists live in maps (bounded by
//! `agent_common::capacity::RULES` entries each) and can be changed while
//! the agent runs (`mesh-redirect rules`); in iptables mode they become
//! istio's rules.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use serde::Serialize;

/// An IPv4 network: address and prefix length (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    /// The network containing `addr` with this prefix.
    #[must_use]
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        };
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        }
    }

    #[must_use]
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        Self::new(ip, self.prefix).addr == self.addr
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = String;

    /// `a.b.c.d/n`, or a bare address (a /32).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => {
                let p: u8 = p
                    .parse()
                    .map_err(|_| format!("bad prefix length in {s:?}"))?;
                if p > 32 {
                    return Err(format!("prefix length above 32 in {s:?}"));
                }
                (a, p)
            }
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 CIDR"))?;
        Ok(Self::new(addr, prefix))
    }
}

/// A list that is either "everything" (`*`) or explicit items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Selection<T> {
    All,
    Some(Vec<T>),
}

impl<T> Selection<T> {
    #[must_use]
    pub fn is_all(&self) -> bool {
        matches!(self, Self::All)
    }

    #[must_use]
    pub fn items(&self) -> &[T] {
        match self {
            Self::All => &[],
            Self::Some(v) => v,
        }
    }
}

impl<T: fmt::Display> fmt::Display for Selection<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::Some(v) => {
                let parts: Vec<String> = v.iter().map(ToString::to_string).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// A bad list, naming the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag}: {reason}")]
pub struct RuleError {
    pub flag: &'static str,
    pub reason: String,
}

/// Parses a comma-separated list; empty string = empty list.
fn parse_list<T: FromStr>(
    flag: &'static str,
    s: &str,
    what: impl Fn(&str) -> String,
) -> Result<Vec<T>, RuleError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse().map_err(|_| RuleError {
                flag,
                reason: what(p),
            })
        })
        .collect()
}

/// CIDRs, or `*`.
pub fn parse_cidrs(flag: &'static str, s: &str) -> Result<Selection<Ipv4Net>, RuleError> {
    if s.trim() == "*" {
        return Ok(Selection::All);
    }
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<Ipv4Net>()
                .map_err(|reason| RuleError { flag, reason })
        })
        .collect::<Result<_, _>>()
        .map(Selection::Some)
}

/// Ports (1..=65535), or `*`.
pub fn parse_ports(flag: &'static str, s: &str) -> Result<Selection<u16>, RuleError> {
    if s.trim() == "*" {
        return Ok(Selection::All);
    }
    let ports: Vec<u32> = parse_list(flag, s, |p| format!("{p:?} is not a port number"))?;
    ports
        .into_iter()
        .map(|p| match u16::try_from(p) {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(RuleError {
                flag,
                reason: format!("port {p} is out of range 1-65535"),
            }),
        })
        .collect::<Result<_, _>>()
        .map(Selection::Some)
}

/// The capture rules of one served namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureRules {
    pub outbound_include_cidrs: Selection<Ipv4Net>,
    pub outbound_exclude_cidrs: Vec<Ipv4Net>,
    pub outbound_include_ports: Vec<u16>,
    pub outbound_exclude_ports: Vec<u16>,
    pub inbound_include_ports: Selection<u16>,
    pub inbound_exclude_ports: Vec<u16>,
}

/// Istio's sidecar defaults: capture every outbound destination and every
/// inbound port, except the proxy's health and admin ports.
pub const DEFAULT_INBOUND_EXCLUDE: &str = "15090,15021,15020";

impl Default for CaptureRules {
    fn default() -> Self {
        Self {
            outbound_include_cidrs: Selection::All,
            outbound_exclude_cidrs: Vec::new(),
            outbound_include_ports: Vec::new(),
            outbound_exclude_ports: Vec::new(),
            inbound_include_ports: Selection::All,
            inbound_exclude_ports: vec![15090, 15021, 15020],
        }
    }
}

/// The include/exclude flags, as `run` and `rules` take them (istio's
/// short and long names).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RuleArgs {
    /// Outbound destinations to capture: comma-separated CIDRs, or `*` for all.
    #[arg(short = 'i', long = "outbound-ip-ranges-include")]
    pub include_cidrs: Option<String>,
    /// Outbound destinations never captured: comma-separated CIDRs.
    #[arg(short = 'x', long = "outbound-ip-ranges-exclude")]
    pub exclude_cidrs: Option<String>,
    /// Outbound ports captured whatever the destination.
    #[arg(short = 'q', long = "outbound-ports-include")]
    pub include_outbound_ports: Option<String>,
    /// Outbound ports never captured.
    #[arg(short = 'o', long = "outbound-ports-exclude")]
    pub exclude_outbound_ports: Option<String>,
    /// Inbound ports to capture: comma-separated ports, or `*` for all.
    #[arg(short = 'b', long = "inbound-ports-include")]
    pub include_inbound_ports: Option<String>,
    /// Inbound ports never captured (default: the proxy's health and admin
    /// ports, 15090,15021,15020).
    #[arg(short = 'd', long = "inbound-ports-exclude")]
    pub exclude_inbound_ports: Option<String>,
}

impl RuleArgs {
    /// `base` with every list given here replaced.
    pub fn apply_to(&self, base: &CaptureRules) -> Result<CaptureRules, RuleError> {
        let mut r = base.clone();
        if let Some(s) = &self.include_cidrs {
            r.outbound_include_cidrs = parse_cidrs("-i/--outbound-ip-ranges-include", s)?;
        }
        if let Some(s) = &self.exclude_cidrs {
            r.outbound_exclude_cidrs = explicit(
                "-x/--outbound-ip-ranges-exclude",
                parse_cidrs("-x/--outbound-ip-ranges-exclude", s)?,
            )?;
        }
        if let Some(s) = &self.include_outbound_ports {
            r.outbound_include_ports = explicit(
                "-q/--outbound-ports-include",
                parse_ports("-q/--outbound-ports-include", s)?,
            )?;
        }
        if let Some(s) = &self.exclude_outbound_ports {
            r.outbound_exclude_ports = explicit(
                "-o/--outbound-ports-exclude",
                parse_ports("-o/--outbound-ports-exclude", s)?,
            )?;
        }
        if let Some(s) = &self.include_inbound_ports {
            r.inbound_include_ports = parse_ports("-b/--inbound-ports-include", s)?;
        }
        if let Some(s) = &self.exclude_inbound_ports {
            r.inbound_exclude_ports = explicit(
                "-d/--inbound-ports-exclude",
                parse_ports("-d/--inbound-ports-exclude", s)?,
            )?;
        }
        let cap = agent_common::capacity::RULES as usize;
        for (flag, n) in [
            ("-i", r.outbound_include_cidrs.items().len()),
            ("-x", r.outbound_exclude_cidrs.len()),
            (
                "-q/-o",
                r.outbound_include_ports.len() + r.outbound_exclude_ports.len(),
            ),
            (
                "-b/-d",
                r.inbound_include_ports.items().len() + r.inbound_exclude_ports.len(),
            ),
        ] {
            if n > cap {
                return Err(RuleError {
                    flag,
                    reason: format!("{n} entries, at most {cap} are supported"),
                });
            }
        }
        Ok(r)
    }
}

/// `*` makes no sense for an exclusion list.
fn explicit<T>(flag: &'static str, s: Selection<T>) -> Result<Vec<T>, RuleError> {
    match s {
        Selection::All => Err(RuleError {
            flag,
            reason: "`*` is not allowed here".into(),
        }),
        Selection::Some(v) => Ok(v),
    }
}

impl CaptureRules {
    /// The identities and destinations that bypass capture, one line each,
    /// for the startup log.
    #[must_use]
    pub fn describe_bypass(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.outbound_exclude_ports.is_empty() {
            out.push(format!(
                "outbound ports never captured: {}",
                join(&self.outbound_exclude_ports)
            ));
        }
        out.push("outbound to 127.0.0.0/8: never captured".to_owned());
        if !self.outbound_exclude_cidrs.is_empty() {
            out.push(format!(
                "outbound destinations never captured: {}",
                join(&self.outbound_exclude_cidrs)
            ));
        }
        if !self.outbound_include_cidrs.is_all() {
            out.push(format!(
                "outbound captured only to: {} (and ports {})",
                self.outbound_include_cidrs,
                if self.outbound_include_ports.is_empty() {
                    "none".into()
                } else {
                    join(&self.outbound_include_ports)
                }
            ));
        }
        let mut inbound = vec!["15008".to_owned()];
        inbound.extend(self.inbound_exclude_ports.iter().map(ToString::to_string));
        out.push(format!(
            "inbound ports never captured: {}",
            inbound.join(",")
        ));
        if !self.inbound_include_ports.is_all() {
            out.push(format!(
                "inbound captured only on ports: {}",
                self.inbound_include_ports
            ));
        }
        out.push(
            "inbound from 127.0.0.6 (the proxy's passthrough source): never captured".to_owned(),
        );
        out
    }
}

fn join<T: fmt::Display>(v: &[T]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_normalize() {
        let s = parse_cidrs("-i", "10.0.0.0/8, 192.168.1.7/24,1.2.3.4").unwrap();
        assert_eq!(
            s,
            Selection::Some(vec![
                Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8),
                Ipv4Net::new(Ipv4Addr::new(192, 168, 1, 0), 24),
                Ipv4Net::new(Ipv4Addr::new(1, 2, 3, 4), 32),
            ])
        );
        assert_eq!(s.to_string(), "10.0.0.0/8,192.168.1.0/24,1.2.3.4/32");
        assert_eq!(parse_cidrs("-i", "*").unwrap(), Selection::All);
        assert_eq!(parse_cidrs("-i", "").unwrap(), Selection::Some(vec![]));
    }

    #[test]
    fn bad_cidrs_name_the_flag() {
        for bad in ["10.0.0.0/33", "10.0.0/8", "ten/8", "10.0.0.0/x", "::1/128"] {
            let e = parse_cidrs("-x", bad).unwrap_err();
            assert_eq!(e.flag, "-x", "{bad}");
            assert!(e.to_string().starts_with("-x: "), "{e}");
        }
    }

    #[test]
    fn ports_range_checked() {
        assert_eq!(
            parse_ports("-b", "80, 443").unwrap(),
            Selection::Some(vec![80, 443])
        );
        assert_eq!(parse_ports("-b", "*").unwrap(), Selection::All);
        for bad in ["0", "65536", "http", "-1"] {
            let e = parse_ports("-d", bad).unwrap_err();
            assert_eq!(e.flag, "-d", "{bad}");
        }
    }

    #[test]
    fn contains() {
        let n: Ipv4Net = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains(Ipv4Addr::new(10, 1, 200, 3)));
        assert!(!n.contains(Ipv4Addr::new(10, 2, 0, 1)));
        let all: Ipv4Net = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
    }

    #[test]
    fn args_replace_only_the_lists_given() {
        let args = RuleArgs {
            exclude_cidrs: Some("10.0.0.0/8".into()),
            include_inbound_ports: Some("8080".into()),
            ..Default::default()
        };
        let r = args.apply_to(&CaptureRules::default()).unwrap();
        assert_eq!(r.outbound_include_cidrs, Selection::All);
        assert_eq!(
            r.outbound_exclude_cidrs,
            vec!["10.0.0.0/8".parse().unwrap()]
        );
        assert_eq!(r.inbound_include_ports, Selection::Some(vec![8080]));
        assert_eq!(r.inbound_exclude_ports, vec![15090, 15021, 15020]);
        let star = RuleArgs {
            exclude_outbound_ports: Some("*".into()),
            ..Default::default()
        };
        assert_eq!(
            star.apply_to(&CaptureRules::default()).unwrap_err().flag,
            "-o/--outbound-ports-exclude"
        );
    }

    #[test]
    fn bypass_description_lists_defaults() {
        let lines = CaptureRules::default().describe_bypass();
        assert!(
            lines
                .iter()
                .any(|l| l == "inbound ports never captured: 15008,15090,15021,15020"),
            "{lines:?}"
        );
    }
}
