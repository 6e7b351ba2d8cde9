//! The capture rules of a namespace as datapath map entries: the port
//! lists in `OUT_PORTS`/`IN_PORTS`, the CIDR lists in the LPM tries, the
//! `*` switches as flag bits of the namespace's configuration.

use agent_common::{CidrKeyData, NetnsConfig, PortKey, PortRule, flags};
use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};

use super::{
    EbpfError,
    maps::{DatapathMaps, MapId, same_key},
};
use crate::rules::{CaptureRules, IpNet, Selection};

/// The flag bits that stand for `-i '*'` and `-b '*'`.
pub const RULE_FLAGS: u32 = flags::OUT_ALL_CIDRS | flags::IN_ALL_PORTS;

/// The rule-related flag bits of a namespace's configuration.
#[must_use]
pub fn rule_flags(rules: &CaptureRules) -> u32 {
    let mut f = 0;
    if rules.outbound_include_cidrs.is_all() {
        f |= flags::OUT_ALL_CIDRS;
    }
    if rules.inbound_include_ports.is_all() {
        f |= flags::IN_ALL_PORTS;
    }
    f
}

fn cidr_key(netns: u64, net: IpNet) -> Key<CidrKeyData> {
    let net = net.trunc();
    let data = match net {
        IpNet::V4(n) => CidrKeyData::v4(netns, u32::from_ne_bytes(n.addr().octets())),
        IpNet::V6(n) => CidrKeyData::v6(netns, n.addr().octets()),
    };
    Key::new(CidrKeyData::prefix_len(net.prefix_len()), data)
}

fn cidr_of(key: &Key<CidrKeyData>) -> Option<IpNet> {
    let len = CidrKeyData::cidr_len(key.prefix_len())?;
    let d = key.data();
    let addr: std::net::IpAddr = if d.is_v4() {
        std::net::Ipv4Addr::new(d.addr[0], d.addr[1], d.addr[2], d.addr[3]).into()
    } else {
        std::net::Ipv6Addr::from(d.addr).into()
    };
    IpNet::new(addr, len).ok()
}

/// `*` when the namespace's switch says so, else the entries.
fn all_or<T>(all: bool, items: Vec<T>) -> Selection<T> {
    if all {
        Selection::All
    } else {
        Selection::Only(items)
    }
}

impl DatapathMaps {
    /// Replaces every rule entry of namespace `netns` with `rules` and sets
    /// the `*` bits of its configuration (if it has one yet). Entries are
    /// added before stale ones are removed, so a connect racing the update
    /// sees the old list, the new one, or their union.
    pub fn set_rules(&mut self, netns: u64, rules: &CaptureRules) -> Result<(), EbpfError> {
        let port_rules = |include: &[u16], exclude: &[u16]| -> Vec<(PortKey, u8)> {
            include
                .iter()
                .map(|&p| (PortKey::new(netns, p), PortRule::INCLUDE))
                .chain(
                    exclude
                        .iter()
                        .map(|&p| (PortKey::new(netns, p), PortRule::EXCLUDE)),
                )
                .collect()
        };
        let out = port_rules(&rules.outbound_include_ports, &rules.outbound_exclude_ports);
        self.replace_ports(MapId::OutPorts, netns, &out)?;
        let inbound = port_rules(
            rules.inbound_include_ports.items(),
            &rules.inbound_exclude_ports,
        );
        self.replace_ports(MapId::InPorts, netns, &inbound)?;
        let keys = |nets: &[IpNet]| nets.iter().map(|&n| cidr_key(netns, n)).collect::<Vec<_>>();
        self.replace_cidrs(
            MapId::OutCidrInclude,
            netns,
            &keys(rules.outbound_include_cidrs.items()),
        )?;
        self.replace_cidrs(
            MapId::OutCidrExclude,
            netns,
            &keys(&rules.outbound_exclude_cidrs),
        )?;
        if let Some((_, mut config)) = self
            .netns_configs()?
            .into_iter()
            .find(|(cookie, _)| *cookie == netns)
        {
            config.flags = (config.flags & !RULE_FLAGS) | rule_flags(rules);
            self.set_netns_config(netns, config)?;
        }
        Ok(())
    }

    /// Takes namespace `netns` out of every map: its configuration first
    /// (new connects there, and inbound ones, go direct), then its rules,
    /// resolvers and listeners.
    /// Every step is tried; the first error is returned. Without the
    /// configuration nothing of the namespace is captured any more, so a
    /// failed one stops the rest (its entries must stay consistent).
    pub fn forget_netns(&mut self, netns: u64) -> Result<(), EbpfError> {
        self.remove_netns_config(netns)?;
        [
            self.remove_inbound_listeners(netns),
            self.replace_ports(MapId::OutPorts, netns, &[]),
            self.replace_ports(MapId::InPorts, netns, &[]),
            self.replace_cidrs(MapId::OutCidrInclude, netns, &[]),
            self.replace_cidrs(MapId::OutCidrExclude, netns, &[]),
            self.set_dns_servers(netns, &[]),
            self.remove_listeners(netns),
        ]
        .into_iter()
        .collect()
    }

    /// The rules of namespace `netns` (its configuration holds the `*`
    /// switches).
    pub fn rules(&self, netns: u64, config: &NetnsConfig) -> Result<CaptureRules, EbpfError> {
        let (out_inc, out_exc) = self.ports(MapId::OutPorts, netns)?;
        let (in_inc, in_exc) = self.ports(MapId::InPorts, netns)?;
        Ok(CaptureRules {
            outbound_include_cidrs: all_or(
                config.has(flags::OUT_ALL_CIDRS),
                self.cidrs(MapId::OutCidrInclude, netns)?,
            ),
            outbound_exclude_cidrs: self.cidrs(MapId::OutCidrExclude, netns)?,
            outbound_include_ports: out_inc,
            outbound_exclude_ports: out_exc,
            inbound_include_ports: all_or(config.has(flags::IN_ALL_PORTS), in_inc),
            inbound_exclude_ports: in_exc,
        })
    }

    /// (included, excluded) ports of `netns`, sorted.
    fn ports(&self, id: MapId, netns: u64) -> Result<(Vec<u16>, Vec<u16>), EbpfError> {
        let h: HashMap<&MapData, PortKey, u8> = self.view(id)?;
        let (mut inc, mut exc) = (Vec::new(), Vec::new());
        for (k, v) in h.iter().flatten().filter(|(k, _)| k.netns_cookie == netns) {
            if v == PortRule::EXCLUDE {
                exc.push(k.port);
            } else {
                inc.push(k.port);
            }
        }
        inc.sort_unstable();
        exc.sort_unstable();
        Ok((inc, exc))
    }

    fn cidrs(&self, id: MapId, netns: u64) -> Result<Vec<IpNet>, EbpfError> {
        let t: LpmTrie<&MapData, CidrKeyData, u8> = self.view(id)?;
        let mut v: Vec<IpNet> = t
            .keys()
            .flatten()
            .filter(|k| k.data().netns_be == netns.to_be_bytes())
            .filter_map(|k| cidr_of(&k))
            .collect();
        v.sort();
        Ok(v)
    }

    fn replace_ports(
        &mut self,
        id: MapId,
        netns: u64,
        wanted: &[(PortKey, u8)],
    ) -> Result<(), EbpfError> {
        let map_err = |source| EbpfError::Map {
            name: id.name(),
            source,
        };
        let mut h: HashMap<&mut MapData, PortKey, u8> = self.view_mut(id)?;
        // Excludes win over includes for the same port, as in istio (they come first).
        for (k, v) in wanted
            .iter()
            .filter(|(_, v)| *v == PortRule::INCLUDE)
            .chain(wanted.iter().filter(|(_, v)| *v == PortRule::EXCLUDE))
        {
            h.insert(k, v, 0).map_err(map_err)?;
        }
        let stale: Vec<PortKey> = h
            .keys()
            .flatten()
            .filter(|k| k.netns_cookie == netns && !wanted.iter().any(|(w, _)| w == k))
            .collect();
        for k in stale {
            h.remove(&k).map_err(map_err)?;
        }
        Ok(())
    }

    fn replace_cidrs(
        &mut self,
        id: MapId,
        netns: u64,
        wanted: &[Key<CidrKeyData>],
    ) -> Result<(), EbpfError> {
        let map_err = |source| EbpfError::Map {
            name: id.name(),
            source,
        };
        let mut t: LpmTrie<&mut MapData, CidrKeyData, u8> = self.view_mut(id)?;
        for k in wanted {
            t.insert(k, 1, 0).map_err(map_err)?;
        }
        let stale: Vec<Key<CidrKeyData>> = t
            .keys()
            .flatten()
            .filter(|k| {
                k.data().netns_be == netns.to_be_bytes() && !wanted.iter().any(|w| same_key(w, k))
            })
            .collect();
        for k in stale {
            t.remove(&k).map_err(map_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_keys_round_trip_both_families() {
        for s in [
            "10.1.0.0/16",
            "0.0.0.0/0",
            "1.2.3.4/32",
            "fd00::/8",
            "::1/128",
            "::/0",
        ] {
            let net: IpNet = s.parse().unwrap();
            assert_eq!(cidr_of(&cidr_key(7, net)), Some(net), "{s}");
        }
        // Host bits are cleared: the trie matches by prefix.
        let k = cidr_key(7, "10.1.2.3/16".parse().unwrap());
        assert_eq!(cidr_of(&k).unwrap().to_string(), "10.1.0.0/16");
        // The families never share a prefix, even ::/0 and 0.0.0.0/0.
        let (v4, v6) = (
            cidr_key(7, "0.0.0.0/0".parse().unwrap()),
            cidr_key(7, "::/0".parse().unwrap()),
        );
        assert_ne!(v4.data().family_be, v6.data().family_be);
        assert_eq!(v4.prefix_len(), CidrKeyData::FIXED_BITS);
    }
}
