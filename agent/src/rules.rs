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

use std::{fmt, net::IpAddr};

use agent_common::{INBOUND_PASSTHROUGH_SRC, ports};

pub use ipnet::IpNet;
use serde::Serialize;

/// Parses `ADDRESS/PREFIX` (IPv4 or IPv6) as istio-iptables does: the
/// address kept as written (host bits too), a decimal prefix length within
/// the family's range, no sign, no leading zero.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a CIDR (ADDRESS/PREFIX)"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} in {s:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match len.parse::<u8>() {
        Ok(n) if n <= max && !(len.len() > 1 && len.starts_with('0')) && !len.starts_with('+') => {
            Ok(IpNet::new(addr, n).expect("prefix length checked"))
        }
        _ => Err(format!("prefix length {len:?} in {s:?} is not 0-{max}")),
    }
}

/// A capture rule's CIDR: [`parse_cidr`], or a bare address for one host
/// (a /32 or /128), with the host bits cleared.
pub fn parse_rule_cidr(s: &str) -> Result<IpNet, String> {
    if s.contains('/') {
        return parse_cidr(s).map(|n| n.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))
}

/// A list that is either "everything" (`*`) or explicit items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection<T> {
    All,
    /// Only these; empty means none.
    Only(Vec<T>),
}

impl<T> Default for Selection<T> {
    fn default() -> Self {
        Self::Only(Vec::new())
    }
}

impl<T> Selection<T> {
    #[must_use]
    pub fn is_all(&self) -> bool {
        matches!(self, Self::All)
    }

    /// The explicit items (none for `*`).
    #[must_use]
    pub fn items(&self) -> &[T] {
        match self {
            Self::All => &[],
            Self::Only(v) => v,
        }
    }
}

impl<T: fmt::Display> fmt::Display for Selection<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::Only(v) => f.write_str(&join(v)),
        }
    }
}

/// A rule list with too many entries, naming the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag}: {reason}")]
pub struct RuleError {
    pub flag: &'static str,
    pub reason: String,
}

/// What a rule list holds: CIDRs or ports.
pub trait ListItem: Sized + fmt::Display {
    /// One item, as written.
    fn parse_item(s: &str) -> Result<Self, String>;
}

impl ListItem for IpNet {
    fn parse_item(s: &str) -> Result<Self, String> {
        parse_rule_cidr(s)
    }
}

impl ListItem for IpAddr {
    fn parse_item(s: &str) -> Result<Self, String> {
        s.parse().map_err(|_| format!("{s:?} is not an IP address"))
    }
}

impl ListItem for u16 {
    fn parse_item(s: &str) -> Result<Self, String> {
        match s.parse::<u32>() {
            Ok(p) => match Self::try_from(p) {
                Ok(p) if p != 0 => Ok(p),
                _ => Err(format!("port {p} is out of range 1-65535")),
            },
            Err(_) => Err(format!("{s:?} is not a port number")),
        }
    }
}

fn parse_items<T: ListItem>(s: &str) -> Result<Vec<T>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(T::parse_item)
        .collect()
}

impl<T: ListItem> Selection<T> {
    /// `*`, or a comma-separated list (empty: none).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim() == "*" {
            Ok(Self::All)
        } else {
            parse_items(s).map(Self::Only)
        }
    }
}

/// An explicit list (`*` makes no sense for an exclusion list): comma
/// separated on the command line, an array (or the same string) in a
/// config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

impl<T: ListItem> List<T> {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim() == "*" {
            return Err("`*` is not allowed here".into());
        }
        parse_items(s).map(Self)
    }
}

/// Both list kinds read a config file's string or array the same way, and
/// write themselves as the command line's comma-separated string.
macro_rules! list_serde {
    ($ty:ident) => {
        impl<T: ListItem> serde::Serialize for $ty<T> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }

        impl<'de, T: ListItem> serde::Deserialize<'de> for $ty<T> {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Self::parse(&list_text(d)?).map_err(serde::de::Error::custom)
            }
        }
    };
}
list_serde!(Selection);
list_serde!(List);

/// A list as a config file writes it (a string, or an array of strings
/// and numbers), as the command line's comma-separated text.
fn list_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Item {
        Text(String),
        Number(i64),
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Items(Vec<Item>),
    }
    Ok(match serde::Deserialize::deserialize(d)? {
        Written::Text(s) => s,
        Written::Items(items) => items
            .into_iter()
            .map(|i| match i {
                Item::Text(s) => s,
                Item::Number(n) => n.to_string(),
            })
            .collect::<Vec<_>>()
            .join(","),
    })
}

impl<T: fmt::Display> fmt::Display for List<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&join(&self.0))
    }
}

/// The capture rules of one served namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CaptureRules {
    pub outbound_include_cidrs: Selection<IpNet>,
    pub outbound_exclude_cidrs: Vec<IpNet>,
    pub outbound_include_ports: Vec<u16>,
    pub outbound_exclude_ports: Vec<u16>,
    pub inbound_include_ports: Selection<u16>,
    pub inbound_exclude_ports: Vec<u16>,
}

/// Istio's sidecar defaults: capture every outbound destination and every
/// inbound port, except the proxy's health and admin ports.
impl Default for CaptureRules {
    fn default() -> Self {
        Self {
            outbound_include_cidrs: Selection::All,
            outbound_exclude_cidrs: Vec::new(),
            outbound_include_ports: Vec::new(),
            outbound_exclude_ports: Vec::new(),
            inbound_include_ports: Selection::All,
            inbound_exclude_ports: ports::DEFAULT_INBOUND_EXCLUDE.to_vec(),
        }
    }
}

/// A list flag's parser: its errors name the flag (short and long), on the
/// command line and in a config file alike.
fn named<T: 'static>(
    flag: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |s| parse(s).map_err(|e| format!("{flag}: {e}"))
}

/// The include/exclude flags, as `run` and `rules` take them (istio's
/// short and long names; a config file's keys are the long names).
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RuleArgs {
    /// Outbound destinations to capture: comma-separated CIDRs (IPv4 or
    /// IPv6), or `*` for all.
    #[arg(short = 'i', long = "outbound-ip-ranges-include", value_name = "CIDRS|*", value_parser = named("-i/--outbound-ip-ranges-include", Selection::<IpNet>::parse))]
    #[serde(
        rename = "outbound-ip-ranges-include",
        skip_serializing_if = "Option::is_none"
    )]
    pub include_cidrs: Option<Selection<IpNet>>,
    /// Outbound destinations never captured: comma-separated CIDRs.
    #[arg(short = 'x', long = "outbound-ip-ranges-exclude", value_name = "CIDRS", value_parser = named("-x/--outbound-ip-ranges-exclude", List::<IpNet>::parse))]
    #[serde(
        rename = "outbound-ip-ranges-exclude",
        skip_serializing_if = "Option::is_none"
    )]
    pub exclude_cidrs: Option<List<IpNet>>,
    /// Outbound ports captured whatever the destination.
    #[arg(short = 'q', long = "outbound-ports-include", value_name = "PORTS", value_parser = named("-q/--outbound-ports-include", List::<u16>::parse))]
    #[serde(
        rename = "outbound-ports-include",
        skip_serializing_if = "Option::is_none"
    )]
    pub include_outbound_ports: Option<List<u16>>,
    /// Outbound ports never captured.
    #[arg(short = 'o', long = "outbound-ports-exclude", value_name = "PORTS", value_parser = named("-o/--outbound-ports-exclude", List::<u16>::parse))]
    #[serde(
        rename = "outbound-ports-exclude",
        skip_serializing_if = "Option::is_none"
    )]
    pub exclude_outbound_ports: Option<List<u16>>,
    /// Inbound ports to capture: comma-separated ports, or `*` for all.
    #[arg(short = 'b', long = "inbound-ports-include", value_name = "PORTS|*", value_parser = named("-b/--inbound-ports-include", Selection::<u16>::parse))]
    #[serde(
        rename = "inbound-ports-include",
        skip_serializing_if = "Option::is_none"
    )]
    pub include_inbound_ports: Option<Selection<u16>>,
    /// Inbound ports never captured (default: the proxy's health and admin
    /// ports, 15090,15021,15020).
    #[arg(short = 'd', long = "inbound-ports-exclude", value_name = "PORTS", value_parser = named("-d/--inbound-ports-exclude", List::<u16>::parse))]
    #[serde(
        rename = "inbound-ports-exclude",
        skip_serializing_if = "Option::is_none"
    )]
    pub exclude_inbound_ports: Option<List<u16>>,
}

impl RuleArgs {
    /// `base` with every list given here replaced; too long a list is
    /// refused, naming its flag.
    pub fn apply_to(&self, base: &CaptureRules) -> Result<CaptureRules, RuleError> {
        let mut r = base.clone();
        let list = |l: &Option<List<u16>>, into: &mut Vec<u16>| {
            if let Some(List(v)) = l {
                into.clone_from(v);
            }
        };
        if let Some(s) = &self.include_cidrs {
            r.outbound_include_cidrs = s.clone();
        }
        if let Some(List(v)) = &self.exclude_cidrs {
            r.outbound_exclude_cidrs.clone_from(v);
        }
        list(&self.include_outbound_ports, &mut r.outbound_include_ports);
        list(&self.exclude_outbound_ports, &mut r.outbound_exclude_ports);
        if let Some(s) = &self.include_inbound_ports {
            r.inbound_include_ports = s.clone();
        }
        list(&self.exclude_inbound_ports, &mut r.inbound_exclude_ports);
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

impl CaptureRules {
    /// The lists in force, one per line, with their flags.
    #[must_use]
    pub fn render(&self) -> String {
        format!(
            "outbound include (-i): {}\noutbound exclude (-x): {}\n\
             outbound ports include (-q): {}\noutbound ports exclude (-o): {}\n\
             inbound ports include (-b): {}\ninbound ports exclude (-d): {}\n",
            self.outbound_include_cidrs,
            join(&self.outbound_exclude_cidrs),
            join(&self.outbound_include_ports),
            join(&self.outbound_exclude_ports),
            self.inbound_include_ports,
            join(&self.inbound_exclude_ports),
        )
    }

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
        let mut inbound = vec![ports::HBONE.to_string()];
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
        out.push(format!(
            "inbound from {INBOUND_PASSTHROUGH_SRC} (the proxy's passthrough source): never captured"
        ));
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
        let s = Selection::<IpNet>::parse("10.0.0.0/8, 192.168.1.7/24,1.2.3.4").unwrap();
        assert_eq!(
            s,
            Selection::Only(vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.168.1.0/24".parse().unwrap(),
                "1.2.3.4/32".parse().unwrap(),
            ])
        );
        assert_eq!(s.to_string(), "10.0.0.0/8,192.168.1.0/24,1.2.3.4/32");
        let v6 = List::<IpNet>::parse("fd00::1/8,::1").unwrap();
        assert_eq!(v6.to_string(), "fd00::/8,::1/128");
        assert_eq!(Selection::<IpNet>::parse("*").unwrap(), Selection::All);
        assert_eq!(
            Selection::<IpNet>::parse("").unwrap(),
            Selection::Only(vec![])
        );
    }

    #[test]
    fn bad_cidrs_are_refused() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "ten/8",
            "10.0.0.0/x",
            "::1/129",
            "fd00::/08",
            "fd00:::1/64",
        ] {
            assert!(List::<IpNet>::parse(bad).is_err(), "{bad}");
        }
        assert!(List::<IpNet>::parse("*").unwrap_err().contains("`*`"));
    }

    #[test]
    fn ports_range_checked() {
        assert_eq!(
            Selection::<u16>::parse("80, 443").unwrap(),
            Selection::Only(vec![80, 443])
        );
        assert_eq!(Selection::<u16>::parse("*").unwrap(), Selection::All);
        for bad in ["0", "65536", "http", "-1", "*"] {
            assert!(List::<u16>::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lists_read_a_config_files_string_or_array() {
        #[derive(serde::Deserialize)]
        struct F {
            a: List<u16>,
            b: List<u16>,
            c: Selection<IpNet>,
        }
        let f: F = toml::from_str("a = [15090, \"15021\"]\nb = \"80,443\"\nc = \"*\"\n").unwrap();
        assert_eq!(
            (f.a.0, f.b.0, f.c),
            (vec![15090, 15021], vec![80, 443], Selection::All)
        );
        assert!(toml::from_str::<F>("a = [0]\nb = \"\"\nc = \"*\"\n").is_err());
    }

    #[test]
    fn istio_cidrs_keep_the_address_as_written() {
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.1.2.3/8");
        assert_eq!(
            parse_cidr("fd00:0:0::1/64").unwrap().to_string(),
            "fd00::1/64"
        );
        for bad in ["10.0.0.0", "10.0.0.0/+8", "10.0.0.0/08", "::/129"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn args_replace_only_the_lists_given() {
        let args = RuleArgs {
            exclude_cidrs: Some(List::parse("10.0.0.0/8").unwrap()),
            include_inbound_ports: Some(Selection::parse("8080").unwrap()),
            ..Default::default()
        };
        let r = args.apply_to(&CaptureRules::default()).unwrap();
        assert_eq!(r.outbound_include_cidrs, Selection::All);
        assert_eq!(
            r.outbound_exclude_cidrs,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert_eq!(r.inbound_include_ports, Selection::Only(vec![8080]));
        assert_eq!(r.inbound_exclude_ports, vec![15090, 15021, 15020]);
        let many = RuleArgs {
            exclude_outbound_ports: Some(List((1..=4097).collect())),
            ..Default::default()
        };
        assert_eq!(
            many.apply_to(&CaptureRules::default()).unwrap_err().flag,
            "-q/-o"
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
