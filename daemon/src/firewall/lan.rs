//! The LAN, read from this namespace's routing table (`/proc/net/route`,
//! `/proc/net/ipv6_route`): the directly connected subnets that DHCP and
//! `allow_lan` may reach, and the link-local ranges `allow_lan` adds.
//!
//! It only reads `/proc`; it never writes anything, and never counts the
//! tunnel, `lo`, a gateway route or a /0 as the LAN (a subnet it cannot
//! read stays closed).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What `allow_lan` adds besides the directly connected subnets.
const LAN_V4_EXTRA: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(224, 0, 0, 0), 24),
    (Ipv4Addr::new(239, 255, 255, 250), 32),
    (Ipv4Addr::new(255, 255, 255, 255), 32),
];
const LAN_V6_EXTRA: &[(Ipv6Addr, u8)] = &[
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    (Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0), 16),
];
/// The directly connected subnets of this namespace (IPv4 and IPv6),
/// without the tunnel and loopback: where a DHCP server can be on-link.
pub(super) fn connected_routes(tunnel: &str) -> Vec<(IpAddr, u8)> {
    let mut nets: Vec<(IpAddr, u8)> = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/proc/net/route") {
        nets.extend(parse_route_v4(&text, tunnel));
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/ipv6_route") {
        nets.extend(parse_route_v6(&text, tunnel));
    }
    normalize_nets(nets)
}

/// The directly connected subnets of this network namespace, without the
/// tunnel and loopback, plus the link-local ranges `allow_lan` opens.
pub(super) fn connected_networks(tunnel: &str) -> Vec<(IpAddr, u8)> {
    let mut nets: Vec<(IpAddr, u8)> = Vec::new();
    match std::fs::read_to_string("/proc/net/route") {
        Ok(text) => nets.extend(parse_route_v4(&text, tunnel)),
        Err(e) => tracing::warn!(
            "allow_lan: cannot read /proc/net/route ({e}); only link-local IPv4 is let through"
        ),
    }
    // Absent when IPv6 is disabled: nothing to add then.
    if let Ok(text) = std::fs::read_to_string("/proc/net/ipv6_route") {
        nets.extend(parse_route_v6(&text, tunnel));
    }
    nets.extend(LAN_V4_EXTRA.iter().map(|&(a, l)| (IpAddr::V4(a), l)));
    nets.extend(LAN_V6_EXTRA.iter().map(|&(a, l)| (IpAddr::V6(a), l)));
    normalize_nets(nets)
}

const RTF_UP: u32 = 0x0001;
const RTF_GATEWAY: u32 = 0x0002;
const RTF_REJECT: u32 = 0x0200;
const RTF_ANYCAST: u32 = 0x0010_0000;
const RTF_CACHE: u32 = 0x0100_0000;
const RTF_LOCAL: u32 = 0x8000_0000;

/// Connected routes of `/proc/net/route` (the main table): up, no gateway,
/// not a reject route, not /0, not on `lo` or the tunnel.
pub(super) fn parse_route_v4(text: &str, tunnel: &str) -> Vec<(IpAddr, u8)> {
    let mut nets = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[0] == "lo" || f[0] == tunnel {
            continue;
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dest), Some(gateway), Some(flags), Some(mask)) =
            (hex(f[1]), hex(f[2]), hex(f[3]), hex(f[7]))
        else {
            continue;
        };
        if flags & RTF_UP == 0 || flags & (RTF_GATEWAY | RTF_REJECT) != 0 || gateway != 0 {
            continue;
        }
        // The kernel prints the big-endian words as native integers.
        let len = mask.count_ones() as u8;
        if len == 0 {
            continue;
        }
        nets.push((IpAddr::V4(Ipv4Addr::from(dest.to_ne_bytes())), len));
    }
    nets
}

/// Connected routes of `/proc/net/ipv6_route` (all tables): no gateway or
/// next hop, not local/anycast/cache/reject, not multicast or link-local
/// (those are added as whole ranges), not /0, not on `lo` or the tunnel.
pub(super) fn parse_route_v6(text: &str, tunnel: &str) -> Vec<(IpAddr, u8)> {
    let mut nets = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[9] == "lo" || f[9] == tunnel {
            continue;
        }
        let (Some(dest), Ok(len), Some(next_hop), Ok(flags)) = (
            parse_hex_v6(f[0]),
            u8::from_str_radix(f[1], 16),
            parse_hex_v6(f[4]),
            u32::from_str_radix(f[8], 16),
        ) else {
            continue;
        };
        let skip = RTF_GATEWAY | RTF_REJECT | RTF_ANYCAST | RTF_CACHE | RTF_LOCAL;
        if flags & RTF_UP == 0 || flags & skip != 0 || !next_hop.is_unspecified() || len == 0 {
            continue;
        }
        let first = dest.segments()[0];
        if first & 0xff00 == 0xff00 || first & 0xffc0 == 0xfe80 {
            continue;
        }
        nets.push((IpAddr::V6(dest), len));
    }
    nets
}

fn parse_hex_v6(text: &str) -> Option<Ipv6Addr> {
    (text.len() == 32)
        .then(|| u128::from_str_radix(text, 16).ok())
        .flatten()
        .map(Ipv6Addr::from)
}

/// Masks host bits, drops duplicates and networks inside another one (nft
/// refuses overlapping intervals), and sorts.
pub(super) fn normalize_nets(nets: Vec<(IpAddr, u8)>) -> Vec<(IpAddr, u8)> {
    let masked: BTreeSet<(IpAddr, u8)> = nets.into_iter().map(|(a, l)| mask(a, l)).collect();
    masked
        .iter()
        .filter(|&&(addr, len)| {
            !masked
                .iter()
                .any(|&(other, olen)| olen < len && mask(addr, olen) == (other, olen))
        })
        .copied()
        .collect()
}

pub(super) fn mask(addr: IpAddr, len: u8) -> (IpAddr, u8) {
    match addr {
        IpAddr::V4(a) => {
            let len = len.min(32);
            let bits = u32::from(a) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            (IpAddr::V4(Ipv4Addr::from(bits)), len)
        }
        IpAddr::V6(a) => {
            let len = len.min(128);
            let bits = u128::from(a) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            (IpAddr::V6(Ipv6Addr::from(bits)), len)
        }
    }
}
