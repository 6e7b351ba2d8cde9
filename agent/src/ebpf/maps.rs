//! [`DatapathMaps`]: the one typed view of the datapath's maps.
//!
//! It opens the maps from wherever they are: a freshly loaded object
//! ([`DatapathMaps::from_loaded`]), a pin directory
//! ([`DatapathMaps::from_pins`]), or the running program attached to a
//! cgroup ([`DatapathMaps::from_program`]: `rules` and `status` in another
//! process), and [`DatapathMaps::reopen`] gives another thread (the admin
//! server) a handle of its own. Everything that reads or writes a map
//! goes through its methods; nothing else names a map or its types.

use std::{os::fd::AsFd as _, path::Path};

use agent_common::{
    Counter, DnsServerKey, ListenerKey, NetnsConfig, OrigDst, PortKey, SockKey, SockRef, capacity,
    maps as names, net,
};
use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, SockHash, lpm_trie::Key},
    programs::loaded_programs,
};
use serde::Serialize;

use super::EbpfError;

/// Our maps (every one userspace touches; `SOCK_STATE`, per-socket
/// storage, is the kernel's business only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapId {
    NetnsConfig,
    OrigDstByCookie,
    OrigDstByTuple,
    Sockets,
    Peers,
    Listeners,
    Counters,
    OutCidrExclude,
    OutCidrInclude,
    OutPorts,
    InPorts,
    InboundListener,
    InboundSteered,
    DnsServers,
    DnsOrigByCookie,
}

impl MapId {
    pub const ALL: [Self; 15] = [
        Self::NetnsConfig,
        Self::OrigDstByCookie,
        Self::OrigDstByTuple,
        Self::Sockets,
        Self::Peers,
        Self::Listeners,
        Self::Counters,
        Self::OutCidrExclude,
        Self::OutCidrInclude,
        Self::OutPorts,
        Self::InPorts,
        Self::InboundListener,
        Self::InboundSteered,
        Self::DnsServers,
        Self::DnsOrigByCookie,
    ];

    /// The map's name in the object (and its pin's file name).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::NetnsConfig => names::NETNS_CONFIG,
            Self::OrigDstByCookie => names::ORIG_DST_BY_COOKIE,
            Self::OrigDstByTuple => names::ORIG_DST_BY_TUPLE,
            Self::Sockets => names::SOCKETS,
            Self::Peers => names::PEERS,
            Self::Listeners => names::LISTENERS,
            Self::Counters => names::COUNTERS,
            Self::OutCidrExclude => names::OUT_CIDR_EXCLUDE,
            Self::OutCidrInclude => names::OUT_CIDR_INCLUDE,
            Self::OutPorts => names::OUT_PORTS,
            Self::InPorts => names::IN_PORTS,
            Self::InboundListener => names::INBOUND_LISTENER,
            Self::InboundSteered => names::INBOUND_STEERED,
            Self::DnsServers => names::DNS_SERVERS,
            Self::DnsOrigByCookie => names::DNS_ORIG_BY_COOKIE,
        }
    }

    /// The capacity of a map whose entries come and go (reported as
    /// `map_entries`/`map_capacity`); `None` for fixed arrays.
    #[must_use]
    pub const fn capacity(self) -> Option<u32> {
        match self {
            Self::NetnsConfig => Some(capacity::NETNS_CONFIG),
            Self::OrigDstByCookie => Some(capacity::ORIG_DST_BY_COOKIE),
            Self::OrigDstByTuple => Some(capacity::ORIG_DST_BY_TUPLE),
            Self::Sockets => Some(capacity::SOCKETS),
            Self::Peers => Some(capacity::PEERS),
            Self::Listeners => Some(capacity::LISTENERS),
            Self::InboundSteered => Some(capacity::INBOUND_STEERED),
            Self::InboundListener => Some(capacity::INBOUND_LISTENERS),
            Self::DnsServers => Some(capacity::DNS_SERVERS),
            Self::DnsOrigByCookie => Some(capacity::DNS_ORIG_BY_COOKIE),
            Self::OutCidrExclude | Self::OutCidrInclude | Self::OutPorts | Self::InPorts => {
                Some(capacity::RULES)
            }
            Self::Counters => None,
        }
    }
}

/// Whether `kernel`, a name as the kernel reports it (cut to 15
/// characters), is the object's `full` name.
#[must_use]
pub fn kernel_name_matches(full: &str, kernel: &str) -> bool {
    const KERNEL_NAME_LEN: usize = 15;
    !kernel.is_empty() && full.get(..full.len().min(KERNEL_NAME_LEN)) == Some(kernel)
}

/// How full a map is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

/// The counters, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters([u64; Counter::COUNT as usize]);

impl Counters {
    #[must_use]
    pub const fn get(&self, c: Counter) -> u64 {
        self.0[c.index() as usize]
    }

    /// Every counter with its value, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Counter, u64)> + '_ {
        Counter::ALL.iter().map(|&c| (c, self.get(c)))
    }
}

/// The datapath's maps, one handle each.
#[derive(Debug)]
pub struct DatapathMaps {
    /// In [`MapId::ALL`] order.
    maps: Vec<Map>,
}

fn map_err(id: MapId) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map {
        name: id.name(),
        source,
    }
}

/// What a `Map` of one of the types we use holds.
fn data(map: &Map) -> Option<&MapData> {
    match map {
        Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::LpmTrie(d)
        | Map::SockHash(d)
        | Map::SockMap(d) => Some(d),
        _ => None,
    }
}

impl DatapathMaps {
    fn open(mut source: impl FnMut(MapId) -> Result<Map, EbpfError>) -> Result<Self, EbpfError> {
        let maps = MapId::ALL
            .iter()
            .map(|&id| source(id))
            .collect::<Result<_, _>>()?;
        Ok(Self { maps })
    }

    /// Takes the maps out of a loaded object (its programs keep using them).
    pub fn from_loaded(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        Self::open(|id| {
            ebpf.take_map(id.name()).ok_or(EbpfError::Missing {
                kind: "map",
                name: id.name(),
            })
        })
    }

    /// Opens the maps pinned in `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self, EbpfError> {
        Self::open(|id| {
            let data = MapData::from_pin(dir.join(id.name())).map_err(map_err(id))?;
            Map::from_map_data(data).map_err(map_err(id))
        })
    }

    /// Opens the maps of the datapath whose program has id `prog_id`:
    /// every map our programs that share maps with it reference (each
    /// program names only the maps it uses: sk_lookup shares none with
    /// connect4, some with sockops).
    pub fn from_program(prog_id: u32) -> Result<Self, EbpfError> {
        let programs: Vec<_> = loaded_programs().filter_map(Result::ok).collect();
        let map_ids =
            |p: &aya::programs::ProgramInfo| p.map_ids().ok().flatten().unwrap_or_default();
        let first = programs
            .iter()
            .find(|p| p.id() == prog_id)
            .ok_or(EbpfError::Missing {
                kind: "program id",
                name: "attached program",
            })?;
        let ours: Vec<Vec<u32>> = programs
            .iter()
            .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("mesh_")))
            .map(map_ids)
            .collect();
        let mut ids = map_ids(first);
        loop {
            let before = ids.len();
            for maps in &ours {
                if maps.iter().any(|m| ids.contains(m)) {
                    let new: Vec<u32> = maps.iter().filter(|m| !ids.contains(m)).copied().collect();
                    ids.extend(new);
                }
            }
            if ids.len() == before {
                break;
            }
        }
        let named: Vec<(String, u32)> = ids
            .into_iter()
            .filter_map(|id| {
                let info = aya::maps::MapInfo::from_id(id).ok()?;
                Some((info.name_as_str()?.to_owned(), id))
            })
            .collect();
        Self::open(|id| {
            let (_, map_id) = named
                .iter()
                .find(|(kernel, _)| kernel_name_matches(id.name(), kernel))
                .ok_or(EbpfError::Missing {
                    kind: "map of the running datapath",
                    name: id.name(),
                })?;
            let data = MapData::from_id(*map_id).map_err(map_err(id))?;
            Map::from_map_data(data).map_err(map_err(id))
        })
    }

    /// Another handle on the same maps (for another thread).
    pub fn reopen(&self) -> Result<Self, EbpfError> {
        let mut current = self.maps.iter();
        Self::open(|id| {
            let data = current.next().and_then(data).ok_or(EbpfError::Missing {
                kind: "map",
                name: id.name(),
            })?;
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| EbpfError::Io {
                    path: id.name().into(),
                    source,
                })?;
            Map::from_map_data(MapData::from_fd(fd).map_err(map_err(id))?).map_err(map_err(id))
        })
    }

    fn map(&self, id: MapId) -> &Map {
        &self.maps[id as usize]
    }

    fn map_mut(&mut self, id: MapId) -> &mut Map {
        &mut self.maps[id as usize]
    }

    pub(super) fn view<'a, T>(&'a self, id: MapId) -> Result<T, EbpfError>
    where
        T: TryFrom<&'a Map, Error = MapError>,
    {
        T::try_from(self.map(id)).map_err(map_err(id))
    }

    pub(super) fn view_mut<'a, T>(&'a mut self, id: MapId) -> Result<T, EbpfError>
    where
        T: TryFrom<&'a mut Map, Error = MapError>,
    {
        T::try_from(self.map_mut(id)).map_err(map_err(id))
    }

    /// Every served namespace's configuration, by netns cookie.
    pub fn netns_configs(&self) -> Result<Vec<(u64, NetnsConfig)>, EbpfError> {
        let m: HashMap<&MapData, u64, NetnsConfig> = self.view(MapId::NetnsConfig)?;
        m.iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(MapId::NetnsConfig))
    }

    /// Serves the namespace with this cookie with `config` from now on.
    pub fn set_netns_config(&mut self, cookie: u64, config: NetnsConfig) -> Result<(), EbpfError> {
        let mut m: HashMap<&mut MapData, u64, NetnsConfig> = self.view_mut(MapId::NetnsConfig)?;
        m.insert(cookie, config, 0)
            .map_err(map_err(MapId::NetnsConfig))
    }

    /// Stops serving a namespace (nothing to do if it was not served).
    pub fn remove_netns_config(&mut self, cookie: u64) -> Result<(), EbpfError> {
        let mut m: HashMap<&mut MapData, u64, NetnsConfig> = self.view_mut(MapId::NetnsConfig)?;
        match m.remove(&cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(MapId::NetnsConfig)(e)),
        }
    }

    /// Puts a proxy's inbound listener where sk_lookup steers namespace
    /// `netns`'s connections of its family to.
    pub fn set_inbound_listener(
        &mut self,
        netns: u64,
        listener: &std::net::TcpListener,
    ) -> Result<(), EbpfError> {
        use std::os::fd::AsRawFd as _;
        let family = match listener.local_addr() {
            Ok(std::net::SocketAddr::V6(_)) => net::AF_INET6,
            _ => net::AF_INET,
        };
        let mut m: SockHash<&mut MapData, ListenerKey> = self.view_mut(MapId::InboundListener)?;
        m.insert(ListenerKey::new(netns, family), listener.as_raw_fd(), 0)
            .map_err(map_err(MapId::InboundListener))
    }

    /// Takes namespace `netns`'s inbound listeners out of the map.
    pub fn remove_inbound_listeners(&mut self, netns: u64) -> Result<(), EbpfError> {
        let mut m: SockHash<&mut MapData, ListenerKey> = self.view_mut(MapId::InboundListener)?;
        for family in [net::AF_INET, net::AF_INET6] {
            match m.remove(&ListenerKey::new(netns, family)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MapId::InboundListener)(e)),
            }
        }
        Ok(())
    }

    /// The resolvers of namespace `netns` whose port-53 queries go to the
    /// DNS proxy: exactly `servers` from now on.
    pub fn set_dns_servers(
        &mut self,
        netns: u64,
        servers: &[std::net::IpAddr],
    ) -> Result<(), EbpfError> {
        let id = MapId::DnsServers;
        let mut m: HashMap<&mut MapData, DnsServerKey, u8> = self.view_mut(id)?;
        let wanted: Vec<DnsServerKey> = servers
            .iter()
            .map(|ip| DnsServerKey {
                netns_cookie: netns,
                ip: net::ip_raw(*ip),
            })
            .collect();
        for k in &wanted {
            m.insert(k, 1, 0).map_err(map_err(id))?;
        }
        let stale: Vec<DnsServerKey> = m
            .keys()
            .flatten()
            .filter(|k| k.netns_cookie == netns && !wanted.contains(k))
            .collect();
        for k in stale {
            m.remove(&k).map_err(map_err(id))?;
        }
        Ok(())
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, EbpfError> {
        let arr: PerCpuArray<&MapData, u64> = self.view(MapId::Counters)?;
        let mut out = [0u64; Counter::COUNT as usize];
        for (c, slot) in Counter::ALL.iter().zip(out.iter_mut()) {
            *slot = arr
                .get(&c.index(), 0)
                .map_err(map_err(MapId::Counters))?
                .iter()
                .sum();
        }
        Ok(Counters(out))
    }

    /// Entries held by each map whose entries come and go, with its capacity.
    pub fn usage(&self) -> Result<Vec<MapUsage>, EbpfError> {
        MapId::ALL
            .iter()
            .filter_map(|&id| id.capacity().map(|cap| (id, cap)))
            .map(|(id, capacity)| {
                Ok(MapUsage {
                    name: id.name(),
                    entries: self.entries(id)?,
                    capacity,
                })
            })
            .collect()
    }

    fn entries(&self, id: MapId) -> Result<usize, EbpfError> {
        fn hash<K: aya::Pod, V: aya::Pod>(m: &DatapathMaps, id: MapId) -> Result<usize, EbpfError> {
            let h: HashMap<&MapData, K, V> = m.view(id)?;
            Ok(h.keys().flatten().count())
        }
        match id {
            MapId::NetnsConfig => hash::<u64, NetnsConfig>(self, id),
            MapId::OrigDstByCookie | MapId::DnsOrigByCookie => hash::<u64, OrigDst>(self, id),
            MapId::OrigDstByTuple => hash::<SockKey, OrigDst>(self, id),
            MapId::Peers => hash::<SockKey, SockRef>(self, id),
            MapId::Listeners => hash::<PortKey, u32>(self, id),
            MapId::InboundSteered => hash::<SockKey, u8>(self, id),
            MapId::DnsServers => hash::<DnsServerKey, u8>(self, id),
            MapId::OutPorts | MapId::InPorts => hash::<PortKey, u8>(self, id),
            MapId::Sockets => {
                let s: SockHash<&MapData, SockKey> = self.view(id)?;
                Ok(s.keys().flatten().count())
            }
            MapId::InboundListener => {
                let s: SockHash<&MapData, ListenerKey> = self.view(id)?;
                Ok(s.keys().flatten().count())
            }
            MapId::OutCidrExclude | MapId::OutCidrInclude => {
                let t: LpmTrie<&MapData, agent_common::CidrKeyData, u8> = self.view(id)?;
                Ok(t.keys().flatten().count())
            }
            MapId::Counters => Ok(0),
        }
    }

    /// The SOCKHASH, for the sk_msg program's attachment.
    pub(super) fn sockets(&self) -> Result<SockHash<&MapData, SockKey>, EbpfError> {
        self.view(MapId::Sockets)
    }

    /// Records that the listener on `port` in namespace `netns` does not
    /// block (the built-in proxy's, opened before sockops could see it):
    /// the sockets it accepts may join the SOCKHASH.
    pub fn set_listener_nonblocking(&mut self, netns: u64, port: u16) -> Result<(), EbpfError> {
        let id = MapId::Listeners;
        let mut m: HashMap<&mut MapData, PortKey, u32> = self.view_mut(id)?;
        m.insert(
            PortKey::new(netns, port),
            agent_common::LISTENER_NONBLOCKING,
            0,
        )
        .map_err(map_err(id))
    }

    /// Forgets every listener recorded for namespace `netns`.
    pub fn remove_listeners(&mut self, netns: u64) -> Result<(), EbpfError> {
        let id = MapId::Listeners;
        let mut m: HashMap<&mut MapData, PortKey, u32> = self.view_mut(id)?;
        let stale: Vec<PortKey> = m
            .keys()
            .flatten()
            .filter(|k| k.netns_cookie == netns)
            .collect();
        for k in stale {
            match m.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(id)(e)),
            }
        }
        Ok(())
    }
}

/// `Key<CidrKeyData>` equality (aya's `Key` has no `PartialEq`).
pub(super) fn same_key(
    a: &Key<agent_common::CidrKeyData>,
    b: &Key<agent_common::CidrKeyData>,
) -> bool {
    a.prefix_len() == b.prefix_len() && a.data() == b.data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_are_matched_by_their_first_fifteen_characters() {
        assert!(kernel_name_matches("ORIG_DST_BY_COOKIE", "ORIG_DST_BY_COO"));
        assert!(kernel_name_matches("SOCKETS", "SOCKETS"));
        assert!(!kernel_name_matches("SOCKETS", "SOCK"));
        assert!(!kernel_name_matches(
            "ORIG_DST_BY_COOKIE",
            "ORIG_DST_BY_TUP"
        ));
        assert!(!kernel_name_matches("SOCKETS", ""));
    }

    #[test]
    fn map_ids_are_in_slot_order_and_named_once() {
        for (i, id) in MapId::ALL.iter().enumerate() {
            assert_eq!(*id as usize, i);
            assert!(
                MapId::ALL[i + 1..].iter().all(|o| o.name() != id.name()),
                "{id:?}"
            );
        }
    }
}
