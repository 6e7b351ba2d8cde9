//! Byte order of addresses and ports in BPF contexts: one helper per field
//! layout, so no call site converts by hand.
//!
//! The kernel's context fields disagree with each other:
//!
//! | field | layout of the `u32` as a BPF program reads it |
//! |---|---|
//! | `bpf_sock_ops.local_port`, `sk_msg_md.local_port`, `bpf_sock.src_port`, `bpf_sk_lookup.local_port` | host order |
//! | `bpf_sock_ops.remote_port`, `sk_msg_md.remote_port` | network-order `u16` in the **upper** 16 bits |
//! | `bpf_sock_addr.user_port`, `bpf_sock.dst_port`, `bpf_sk_lookup.remote_port` | network-order `u16` in the **lower** 16 bits |
//!
//! IPv4 addresses are network order everywhere: the bytes `a.b.c.d` in
//! memory, read as a native `u32`; IPv6 addresses are four such words. We
//! keep them that way ("raw") in maps, and key sockets of both families
//! alike: an IPv4 address as its v4-mapped IPv6 form (`::ffff:a.b.c.d`), so
//! an `AF_INET` socket and a dual-stack `AF_INET6` socket with a v4-mapped
//! address produce the same key ([`IpRaw`]).

/// `AF_INET`, as the contexts' `family` fields carry it.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;
/// `sa_family` of a `sockaddr_in` / `sockaddr_in6` (a `u16`).
#[expect(clippy::cast_possible_truncation, reason = "small constants")]
pub const SA_FAMILY_INET: u16 = AF_INET as u16;
#[expect(clippy::cast_possible_truncation, reason = "small constants")]
pub const SA_FAMILY_INET6: u16 = AF_INET6 as u16;
/// `SOCK_STREAM`, as `bpf_sock_addr.type` carries it.
pub const SOCK_STREAM: u32 = 1;
/// `SOCK_DGRAM`.
pub const SOCK_DGRAM: u32 = 2;
/// `IPPROTO_TCP`, as the `protocol` fields carry it.
pub const IPPROTO_TCP: u32 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u32 = 17;

/// Network order as a native `u32`: `ip4_raw([127, 0, 0, 1])`.
#[must_use]
pub const fn ip4_raw(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The octets of a raw (network order) IPv4 address.
#[must_use]
pub const fn ip4_octets(raw: u32) -> [u8; 4] {
    raw.to_ne_bytes()
}

/// 127.0.0.1, raw.
pub const LOCALHOST: u32 = ip4_raw([127, 0, 0, 1]);

/// An address of either family as the datapath keys it: four network-order
/// words, an IPv4 address v4-mapped.
pub type IpRaw = [u32; 4];

/// The third word of a v4-mapped address (`::ffff:0:0/96`).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `::1`, raw.
pub const LOCALHOST6: IpRaw = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// A raw IPv4 address, v4-mapped.
#[must_use]
pub const fn mapped(ip4_raw: u32) -> IpRaw {
    [0, 0, V4_MAPPED_WORD, ip4_raw]
}

/// Whether a raw address is v4-mapped (an IPv4 address).
#[must_use]
pub const fn is_mapped(ip: &IpRaw) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD
}

/// Whether a raw address of either family is a loopback one (`::1`, or
/// 127.0.0.0/8 v4-mapped).
#[must_use]
pub const fn is_loopback_raw(ip: &IpRaw) -> bool {
    (is_mapped(ip) && is_loopback(ip[3]))
        || (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == LOCALHOST6[3])
}

/// The raw form of IPv6 octets.
#[must_use]
pub const fn ip6_raw(o: [u8; 16]) -> IpRaw {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The octets of a raw address (IPv4 ones v4-mapped).
#[must_use]
pub const fn ip6_octets(ip: &IpRaw) -> [u8; 16] {
    let (a, b, c, d) = (
        ip[0].to_ne_bytes(),
        ip[1].to_ne_bytes(),
        ip[2].to_ne_bytes(),
        ip[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The raw form of a socket address's IP, IPv4 v4-mapped.
#[must_use]
pub const fn ip_raw(ip: core::net::IpAddr) -> IpRaw {
    match ip {
        core::net::IpAddr::V4(v4) => mapped(ip4_raw(v4.octets())),
        core::net::IpAddr::V6(v6) => ip6_raw(v6.octets()),
    }
}

/// The address a raw one stands for: IPv4 when v4-mapped.
#[must_use]
pub fn ip_addr(ip: &IpRaw) -> core::net::IpAddr {
    if is_mapped(ip) {
        let o = ip4_octets(ip[3]);
        core::net::IpAddr::V4(core::net::Ipv4Addr::new(o[0], o[1], o[2], o[3]))
    } else {
        core::net::IpAddr::V6(core::net::Ipv6Addr::from(ip6_octets(ip)))
    }
}

/// Whether a raw address is in 127.0.0.0/8.
#[must_use]
pub const fn is_loopback(raw: u32) -> bool {
    ip4_octets(raw)[0] == 127
}

/// A host-order port field (`local_port`, `src_port`).
#[must_use]
#[expect(
    clippy::cast_possible_truncation,
    reason = "ports are 16-bit; the upper half is zero"
)]
pub const fn port_from_host_u32(field: u32) -> u16 {
    field as u16
}

/// A network-order port in the upper 16 bits (`bpf_sock_ops.remote_port`,
/// `sk_msg_md.remote_port`).
#[must_use]
pub const fn port_from_be_upper(field: u32) -> u16 {
    u16::from_be((field >> 16) as u16)
}

/// A network-order port in the lower 16 bits (`bpf_sock_addr.user_port`,
/// `bpf_sock.dst_port`, `bpf_sk_lookup.remote_port`).
#[must_use]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the port is the low 16 bits"
)]
pub const fn port_from_be_lower(field: u32) -> u16 {
    u16::from_be(field as u16)
}

/// The value to store in `bpf_sock_addr.user_port` for a host-order port.
#[must_use]
pub const fn port_to_be_lower(port: u16) -> u32 {
    port.to_be() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel stores for port 15001 (0x3a99): `skc_dport` holds the
    /// bytes `3a 99`; loaded as a little-endian `u16` that is 0x993a.
    const PORT: u16 = 15001;

    fn be16_as_loaded() -> u16 {
        u16::from_ne_bytes(PORT.to_be_bytes())
    }

    #[test]
    fn host_order_field() {
        assert_eq!(port_from_host_u32(u32::from(PORT)), PORT);
    }

    #[test]
    fn network_order_upper_half() {
        // sock_ops/sk_msg: the loaded be16 shifted left by 16.
        let field = u32::from(be16_as_loaded()) << 16;
        assert_eq!(port_from_be_upper(field), PORT);
    }

    #[test]
    fn network_order_lower_half_round_trips() {
        let field = u32::from(be16_as_loaded());
        assert_eq!(port_from_be_lower(field), PORT);
        assert_eq!(port_to_be_lower(PORT), field);
        assert_eq!(port_from_be_lower(port_to_be_lower(443)), 443);
    }

    #[test]
    fn both_families_share_one_raw_form() {
        use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v4: IpAddr = Ipv4Addr::new(10, 1, 2, 3).into();
        let mapped_v6: IpAddr = "::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap().into();
        assert_eq!(ip_raw(v4), ip_raw(mapped_v6), "v4 and v4-mapped key alike");
        assert!(is_mapped(&ip_raw(v4)));
        assert_eq!(ip_addr(&ip_raw(v4)), v4);
        let v6: IpAddr = "fd77::2".parse::<Ipv6Addr>().unwrap().into();
        assert!(!is_mapped(&ip_raw(v6)));
        assert_eq!(ip_addr(&ip_raw(v6)), v6);
        assert!(is_loopback_raw(&LOCALHOST6));
        assert!(is_loopback_raw(&mapped(ip4_raw([127, 0, 0, 6]))));
        assert!(!is_loopback_raw(&ip_raw(v6)));
        assert_eq!(
            ip6_octets(&ip_raw(v6)),
            "fd77::2".parse::<Ipv6Addr>().unwrap().octets()
        );
    }

    #[test]
    fn addresses_keep_memory_order() {
        assert_eq!(ip4_octets(LOCALHOST), [127, 0, 0, 1]);
        assert!(is_loopback(ip4_raw([127, 0, 0, 6])));
        assert!(is_loopback(ip4_raw([127, 255, 1, 1])));
        assert!(!is_loopback(ip4_raw([10, 0, 0, 1])));
        assert!(!is_loopback(ip4_raw([128, 0, 0, 1])));
        // The same bytes sockaddr_in.sin_addr carries.
        assert_eq!(ip4_raw([10, 1, 2, 3]).to_ne_bytes(), [10, 1, 2, 3]);
    }
}
