//! The tunnel's own allow filter: which packets from the TUN device the
//! tunnel may encrypt for the peer, decided again in userspace, whatever
//! nftables says.
//!
//! Why a second filter: the firewall's table can be removed by anyone with
//! CAP_NET_ADMIN (`nft flush ruleset`). The tamper guard puts it back within
//! tens of milliseconds, but in that window the full-tunnel route sends
//! every packet into the tunnel and the gateway would forward it. Every
//! packet passes through this module's [`decide`] before it is encrypted,
//! so nothing the allowlist does not admit reaches the gateway, table or no
//! table.
//!
//! What it admits is what the firewall's session shape admits through the
//! tunnel, and no more: TCP/UDP to a literal allow entry's network and
//! ports (single ports and ranges); TCP/UDP to an address the DNS stub
//! answered for an allowed name, on that name's ports and port ranges (kept like the firewall's `known` sets: an answer's
//! TTL running out cuts nothing, a narrowing forgets it at once; whether a
//! *new* flow may still use an expired answer is left to the firewall); the
//! pinned DNS servers on TCP/UDP 53; never any other port 53 or 853; IPv6
//! only when the tunnel has an IPv6 address. In the gateway-enforced kind
//! (the gateway, not this machine, enforces the allowlist) any TCP/UDP but
//! DNS is admitted, as the firewall's session shape then does; DNS and
//! IPv6 keep their rules. The firewall lets no ICMP out
//! through the tunnel, so neither does this. In lockdown (no allowlist in
//! force) nothing is admitted: the tunnel sends only its own handshakes and
//! keepalives, which never pass through here.
//!
//! What it owns: the allow snapshot the packet task reads and the count of
//! refused packets. What it must never do: decide *what* is allowed (the
//! session machine sets it, see `session/`), look past the IP header and
//! the first four bytes of the transport header, or log a destination
//! (counts only).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::firewall::{Allowlist, NamedEntry, PortRange, TCP, UDP};
use crate::profile::ports_contain;

/// An answer as the filter keeps it: (address, protocol, port or range).
pub type AnswerKey = (IpAddr, u8, PortRange);

/// DNS and DNS-over-TLS/QUIC: only the pinned servers, only on 53.
const DNS: u16 = 53;
const DNS_OVER_TLS: u16 = 853;

/// IPv6 extension headers we step over to find the transport header.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTIONS: u8 = 60;
/// At most this many extension headers are stepped over; a packet with more
/// is refused (the kernel never builds such chains for a socket).
const MAX_EXTENSION_HEADERS: usize = 4;

/// Whether a packet may be encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    Refuse,
}

/// One literal allow entry: a network and its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetPorts {
    addr: IpAddr,
    prefix: u8,
    tcp: Vec<PortRange>,
    udp: Vec<PortRange>,
}

impl NetPorts {
    fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let bits = u32::from(self.prefix.min(32));
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let bits = u32::from(self.prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    fn ports(&self, proto: u8) -> &[PortRange] {
        match proto {
            TCP => &self.tcp,
            UDP => &self.udp,
            _ => &[],
        }
    }
}

/// What the tunnel may encrypt while an allowlist is in force; immutable,
/// replaced as a whole (the packet task holds one per batch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admits {
    nets: Vec<NetPorts>,
    /// Answered addresses of allowed names: (address, protocol) → the
    /// ports and ranges they were answered for.
    learned: HashMap<(IpAddr, u8), Vec<PortRange>>,
    dns_servers: Vec<IpAddr>,
    ipv6: bool,
    /// The gateway-enforced kind: any TCP/UDP but DNS goes through.
    everything: bool,
}

impl Admits {
    fn of(allow: &Allowlist) -> Admits {
        Admits {
            nets: allow
                .rules
                .iter()
                .map(|rule| NetPorts {
                    addr: canonical(rule.net.0),
                    prefix: if rule.net.0.is_ipv6() && canonical(rule.net.0).is_ipv4() {
                        rule.net.1.saturating_sub(96)
                    } else {
                        rule.net.1
                    },
                    tcp: rule.tcp.clone(),
                    udp: rule.udp.clone(),
                })
                .collect(),
            learned: HashMap::new(),
            dns_servers: allow.dns_servers.iter().map(|&a| canonical(a)).collect(),
            ipv6: allow.tunnel_has_ipv6,
            everything: allow.gateway_enforces,
        }
    }

    /// Whether TCP/UDP (`proto`) to `addr` port `port` may go through.
    fn admits(&self, addr: IpAddr, proto: u8, port: u16) -> bool {
        if addr.is_ipv6() && !self.ipv6 {
            return false;
        }
        if port == DNS || port == DNS_OVER_TLS {
            return port == DNS && self.dns_servers.contains(&addr);
        }
        self.everything
            || self
                .learned
                .get(&(addr, proto))
                .is_some_and(|ranges| ports_contain(ranges, port))
            || self
                .nets
                .iter()
                .any(|n| n.contains(addr) && ports_contain(n.ports(proto), port))
    }

    /// For a fragment without its transport header: whether `addr` is
    /// admitted on any port of `proto` (the first fragment, which carries
    /// the port, was decided on its own; without it the rest cannot be put
    /// together at the far end, and it only ever goes to an allowed host).
    fn admits_any_port(&self, addr: IpAddr, proto: u8) -> bool {
        if addr.is_ipv6() && !self.ipv6 {
            return false;
        }
        let beyond_dns = |ranges: &[PortRange]| {
            ranges
                .iter()
                .any(|r| !(r.first == r.last && (r.first == DNS || r.first == DNS_OVER_TLS)))
        };
        self.everything
            || self
                .learned
                .get(&(addr, proto))
                .is_some_and(|ranges| beyond_dns(ranges))
            || self
                .nets
                .iter()
                .any(|n| n.contains(addr) && beyond_dns(n.ports(proto)))
            || (matches!(proto, TCP | UDP) && self.dns_servers.contains(&addr))
    }
}

/// Decides one IP packet read from the TUN device against `admits`
/// (`None`: lockdown, nothing passes). Reads the IP header (and IPv6
/// extension headers) and the destination port only; anything it cannot
/// read is refused.
pub fn decide(packet: &[u8], admits: Option<&Admits>) -> Verdict {
    let Some(admits) = admits else {
        return Verdict::Refuse;
    };
    let Some(target) = target_of(packet) else {
        return Verdict::Refuse;
    };
    let admitted = match target {
        Target::Port { addr, proto, port } => admits.admits(canonical(addr), proto, port),
        Target::LaterFragment { addr, proto } => admits.admits_any_port(canonical(addr), proto),
    };
    if admitted {
        Verdict::Admit
    } else {
        Verdict::Refuse
    }
}

/// Where a packet goes, as far as the filter looks.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// TCP or UDP with its destination port.
    Port { addr: IpAddr, proto: u8, port: u16 },
    /// A fragment after the first one of a TCP or UDP packet.
    LaterFragment { addr: IpAddr, proto: u8 },
}

/// The destination of a TCP or UDP packet; `None` for anything else or
/// anything malformed.
fn target_of(packet: &[u8]) -> Option<Target> {
    match packet.first()? >> 4 {
        4 => {
            let header_len = usize::from(packet.first()? & 0x0f) * 4;
            if header_len < 20 || packet.len() < header_len {
                return None;
            }
            let proto = packet[9];
            let addr = IpAddr::V4(Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]));
            let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
            transport(packet, header_len, addr, proto, fragment_offset != 0)
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&packet[24..40]);
            let addr = IpAddr::V6(Ipv6Addr::from(octets));
            let mut next = packet[6];
            let mut offset = 40;
            let mut later_fragment = false;
            for _ in 0..=MAX_EXTENSION_HEADERS {
                match next {
                    HOP_BY_HOP | DEST_OPTIONS => {
                        let len = usize::from(*packet.get(offset + 1)?) * 8 + 8;
                        next = *packet.get(offset)?;
                        offset += len;
                    }
                    FRAGMENT => {
                        let field = packet.get(offset + 2..offset + 4)?;
                        later_fragment |= u16::from_be_bytes([field[0], field[1]]) & 0xfff8 != 0;
                        next = *packet.get(offset)?;
                        offset += 8;
                    }
                    // A routing header sends the packet on past its IPv6
                    // destination: never through here.
                    ROUTING => return None,
                    proto => return transport(packet, offset, addr, proto, later_fragment),
                }
            }
            None
        }
        _ => None,
    }
}

fn transport(packet: &[u8], offset: usize, addr: IpAddr, proto: u8, later_fragment: bool) -> Option<Target> {
    if proto != TCP && proto != UDP {
        return None;
    }
    if later_fragment {
        return Some(Target::LaterFragment { addr, proto });
    }
    let ports = packet.get(offset..offset + 4)?;
    Some(Target::Port {
        addr,
        proto,
        port: u16::from_be_bytes([ports[2], ports[3]]),
    })
}

/// An IPv4-mapped IPv6 address (::ffff:a.b.c.d) travels as IPv4.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// The writer's side: what the snapshot is built from.
#[derive(Default)]
struct Book {
    /// The allowlist in force (`None`: lockdown).
    base: Option<Admits>,
    names: Vec<NamedEntry>,
    /// Every answer of this allowlist and the names it answered, as the
    /// firewall's `known` sets keep them.
    sources: BTreeMap<AnswerKey, BTreeSet<String>>,
}

impl Book {
    fn snapshot(&self) -> Option<Arc<Admits>> {
        self.base.as_ref().map(|base| {
            let mut admits = base.clone();
            admits.learned = HashMap::new();
            for &(addr, proto, ports) in self.sources.keys() {
                admits.learned.entry((addr, proto)).or_default().push(ports);
            }
            Arc::new(admits)
        })
    }
}

struct Shared {
    /// What the packet task reads, once per batch of packets.
    current: RwLock<Option<Arc<Admits>>>,
    /// Serialises the writers (the session machine and the DNS answers).
    book: Mutex<Book>,
    refused: AtomicU64,
}

/// A handle on one tunnel's allow filter; clones share it. Starts in
/// lockdown: nothing is admitted until the session machine sets an
/// allowlist.
#[derive(Clone)]
pub struct AllowFilter {
    shared: Arc<Shared>,
}

impl Default for AllowFilter {
    fn default() -> Self {
        AllowFilter::new()
    }
}

impl AllowFilter {
    pub fn new() -> AllowFilter {
        AllowFilter {
            shared: Arc::new(Shared {
                current: RwLock::new(None),
                book: Mutex::new(Book::default()),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// Puts `allow` in force, or the lockdown (`None`). Answers already
    /// learned stay for the names and ports `allow` still holds, like the
    /// firewall's: a narrowing forgets the others at once; a lockdown
    /// forgets all.
    pub fn set(&self, allow: Option<&Allowlist>) {
        let mut book = self.book();
        match allow {
            Some(allow) => {
                book.base = Some(Admits::of(allow));
                book.names = allow.names.clone();
                let names = book.names.clone();
                book.sources.retain(|&(_, proto, port), asked_by| {
                    asked_by.retain(|name| names.iter().any(|n| &n.name == name && allows(n, proto, port)));
                    !asked_by.is_empty()
                });
            }
            None => *book = Book::default(),
        }
        self.publish(&book);
    }

    /// Adds answered addresses of the allowed name `name` as (address,
    /// protocol, port or range as the name lists it); those whose name and port the allowlist in force
    /// does not hold are left out (an answer that arrives after a narrowing
    /// must not widen it again), and so is everything in lockdown.
    pub fn learn(&self, name: &str, answers: &[AnswerKey]) {
        let mut book = self.book();
        if book.base.is_none() {
            return;
        }
        let mut changed = false;
        for &(addr, proto, port) in answers {
            if !book
                .names
                .iter()
                .any(|n| n.name == name && allows(n, proto, port))
            {
                continue;
            }
            changed |= book
                .sources
                .entry((canonical(addr), proto, port))
                .or_default()
                .insert(name.to_string());
        }
        if changed {
            self.publish(&book);
        }
    }

    /// The allowlist in force, for one batch of packets.
    pub fn current(&self) -> Option<Arc<Admits>> {
        self.shared
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Counts `n` refused packets.
    pub fn count_refused(&self, n: u64) {
        self.shared.refused.fetch_add(n, Ordering::Relaxed);
    }

    /// Packets refused since the tunnel started.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        // The book stays consistent whatever panicked while holding it.
        self.shared
            .book
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, book: &Book) {
        let snapshot = book.snapshot();
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = snapshot;
    }
}

/// Whether `name` lists exactly `port` (a port or a range) for `proto`.
fn allows(name: &NamedEntry, proto: u8, port: PortRange) -> bool {
    match proto {
        TCP => name.tcp.contains(&port),
        UDP => name.udp.contains(&port),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::AllowEntry;

    const ICMP: u8 = 1;
    const ICMPV6: u8 = 58;

    fn allowlist() -> Allowlist {
        Allowlist {
            rules: vec![
                AllowEntry {
                    net: ("203.0.113.10".parse().expect("address"), 32),
                    tcp: ports(&[443]),
                    udp: ports(&[10000, 53]),
                },
                AllowEntry {
                    net: ("203.0.113.96".parse().expect("address"), 27),
                    tcp: ports(&[443]),
                    udp: vec![],
                },
                AllowEntry {
                    net: ("2001:db8:203::100".parse().expect("address"), 120),
                    tcp: ports(&[443]),
                    udp: vec![],
                },
            ],
            names: vec![NamedEntry {
                name: "meet.test".into(),
                tcp: ports(&[443]),
                udp: ports(&[3478]),
            }],
            dns_servers: vec!["192.0.2.65".parse().expect("address")],
            tunnel_has_ipv6: true,
            dns_redirect: None,
            gateway_enforces: false,
        }
    }

    fn ports(list: &[u16]) -> Vec<PortRange> {
        list.iter().map(|&p| PortRange::single(p)).collect()
    }

    #[test]
    fn port_ranges_admit_their_ends_and_inside_and_nothing_outside() {
        let range = PortRange {
            first: 50000,
            last: 60000,
        };
        let mut allow = allowlist();
        allow.rules[0].udp.push(range);
        allow.names[0].udp.push(range);
        let filter = AllowFilter::new();
        filter.set(Some(&allow));
        let host: IpAddr = "198.51.100.77".parse().expect("address");
        filter.learn("meet.test", &[(host, UDP, range)]);
        for dst in ["203.0.113.10", "198.51.100.77"] {
            for port in [50000, 50001, 55555, 59999, 60000] {
                assert_eq!(verdict(&filter, &v4(dst, UDP, port)), Admit, "{dst} {port}");
            }
            for port in [49999, 60001] {
                assert_eq!(verdict(&filter, &v4(dst, UDP, port)), Refuse, "{dst} {port}");
            }
            // UDP's range says nothing about TCP.
            assert_eq!(verdict(&filter, &v4(dst, TCP, 55555)), Refuse, "{dst}");
        }
        // An answer for a range the name does not list is not learned.
        let other: IpAddr = "198.51.100.79".parse().expect("address");
        filter.learn(
            "meet.test",
            &[(
                other,
                UDP,
                PortRange {
                    first: 1,
                    last: 65535,
                },
            )],
        );
        assert_eq!(verdict(&filter, &v4("198.51.100.79", UDP, 55555)), Refuse);
        // A narrowing that drops the range closes it.
        filter.set(Some(&allowlist()));
        assert_eq!(verdict(&filter, &v4("198.51.100.77", UDP, 55555)), Refuse);
        assert_eq!(verdict(&filter, &v4("203.0.113.10", UDP, 55555)), Refuse);
    }

    #[test]
    fn the_gateway_enforced_kind_admits_any_tcp_and_udp_but_not_dns() {
        let mut allow = allowlist();
        allow.gateway_enforces = true;
        let filter = AllowFilter::new();
        filter.set(Some(&allow));
        for (dst, proto, port) in [
            ("198.51.100.99", UDP, 3478),
            ("192.0.2.200", TCP, 443),
            ("203.0.113.5", UDP, 61000),
        ] {
            assert_eq!(verdict(&filter, &v4(dst, proto, port)), Admit, "{dst} {port}");
        }
        // DNS still only to the pinned server; DNS-over-TLS nowhere.
        assert_eq!(verdict(&filter, &v4("198.51.100.53", UDP, 53)), Refuse);
        assert_eq!(verdict(&filter, &v4("192.0.2.65", UDP, 53)), Admit);
        assert_eq!(verdict(&filter, &v4("198.51.100.53", TCP, 853)), Refuse);
        // No ICMP, and nothing in lockdown.
        assert_eq!(verdict(&filter, &v4("198.51.100.99", ICMP, 0)), Refuse);
        filter.set(None);
        assert_eq!(verdict(&filter, &v4("198.51.100.99", UDP, 3478)), Refuse);
    }

    fn v4(dst: &str, proto: u8, port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&[192, 0, 2, 66]);
        let dst: Ipv4Addr = dst.parse().expect("address");
        p[16..20].copy_from_slice(&dst.octets());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&port.to_be_bytes());
        p
    }

    fn v6_with(dst: &str, extensions: &[(u8, Vec<u8>)], proto: u8, port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        let dst: Ipv6Addr = dst.parse().expect("address");
        p[24..40].copy_from_slice(&dst.octets());
        // Each extension header names the next.
        let mut kinds: Vec<u8> = extensions.iter().map(|(kind, _)| *kind).collect();
        kinds.push(proto);
        p[6] = kinds[0];
        for (i, (_, body)) in extensions.iter().enumerate() {
            let mut header = body.clone();
            header[0] = kinds[i + 1];
            p.extend(header);
        }
        p.extend(40000u16.to_be_bytes());
        p.extend(port.to_be_bytes());
        p.extend([0u8; 4]);
        p
    }

    fn v6(dst: &str, proto: u8, port: u16) -> Vec<u8> {
        v6_with(dst, &[], proto, port)
    }

    fn open() -> AllowFilter {
        let filter = AllowFilter::new();
        filter.set(Some(&allowlist()));
        filter
    }

    fn verdict(filter: &AllowFilter, packet: &[u8]) -> Verdict {
        decide(packet, filter.current().as_deref())
    }

    use Verdict::{Admit, Refuse};

    #[test]
    fn lockdown_admits_nothing() {
        let filter = AllowFilter::new();
        assert_eq!(verdict(&filter, &v4("203.0.113.10", TCP, 443)), Refuse);
        filter.set(Some(&allowlist()));
        assert_eq!(verdict(&filter, &v4("203.0.113.10", TCP, 443)), Admit);
        filter.set(None);
        assert_eq!(verdict(&filter, &v4("203.0.113.10", TCP, 443)), Refuse);
        assert_eq!(verdict(&filter, &v4("192.0.2.65", UDP, 53)), Refuse);
    }

    #[test]
    fn literal_entries_admit_their_networks_on_their_ports_only() {
        let filter = open();
        for (packet, expected) in [
            (v4("203.0.113.10", TCP, 443), Admit),
            (v4("203.0.113.10", UDP, 10000), Admit),
            (v4("203.0.113.10", TCP, 8443), Refuse),
            (v4("203.0.113.10", UDP, 443), Refuse),
            (v4("203.0.113.10", TCP, 10000), Refuse),
            (v4("203.0.113.127", TCP, 443), Admit),
            (v4("203.0.113.95", TCP, 443), Refuse),
            (v4("203.0.113.128", TCP, 443), Refuse),
            (v4("203.0.113.20", UDP, 10000), Refuse),
            (v6("2001:db8:203::1ff", TCP, 443), Admit),
            (v6("2001:db8:203::10", UDP, 10000), Refuse),
            (v6("2001:db8:203::200", TCP, 443), Refuse),
        ] {
            assert_eq!(verdict(&filter, &packet), expected, "{packet:?}");
        }
    }

    #[test]
    fn dns_only_to_the_pinned_servers_on_53() {
        let filter = open();
        assert_eq!(verdict(&filter, &v4("192.0.2.65", UDP, 53)), Admit);
        assert_eq!(verdict(&filter, &v4("192.0.2.65", TCP, 53)), Admit);
        assert_eq!(verdict(&filter, &v4("192.0.2.65", TCP, 853)), Refuse);
        assert_eq!(verdict(&filter, &v4("192.0.2.65", UDP, 443)), Refuse);
        assert_eq!(verdict(&filter, &v4("203.0.113.53", UDP, 53)), Refuse);
        // An allow entry that lists 53 does not open DNS (the firewall
        // refuses it before the allowlist too).
        assert_eq!(verdict(&filter, &v4("203.0.113.10", UDP, 53)), Refuse);
    }

    #[test]
    fn no_icmp_and_nothing_malformed_goes_through() {
        let filter = open();
        assert_eq!(verdict(&filter, &v4("203.0.113.10", ICMP, 0)), Refuse);
        assert_eq!(verdict(&filter, &v6("2001:db8:203::100", ICMPV6, 0)), Refuse);
        let mut short = v4("203.0.113.10", TCP, 443);
        short.truncate(22);
        assert_eq!(verdict(&filter, &short), Refuse);
        let mut bad_ihl = v4("203.0.113.10", TCP, 443);
        bad_ihl[0] = 0x44;
        assert_eq!(verdict(&filter, &bad_ihl), Refuse);
        assert_eq!(verdict(&filter, &[]), Refuse);
        assert_eq!(verdict(&filter, &[0x50; 60]), Refuse);
        // The header length is honoured: options push the ports back.
        let mut options = v4("203.0.113.10", TCP, 443);
        options[0] = 0x46;
        options.splice(20..20, [1u8, 1, 1, 1]);
        assert_eq!(verdict(&filter, &options), Admit);
    }

    #[test]
    fn ipv6_only_when_the_tunnel_has_ipv6() {
        let mut allow = allowlist();
        allow.tunnel_has_ipv6 = false;
        let filter = AllowFilter::new();
        filter.set(Some(&allow));
        assert_eq!(verdict(&filter, &v6("2001:db8:203::100", TCP, 443)), Refuse);
        assert_eq!(verdict(&filter, &v4("203.0.113.10", TCP, 443)), Admit);
    }

    #[test]
    fn ipv6_extension_headers_are_stepped_over_and_routing_headers_refused() {
        let filter = open();
        let options = vec![0u8; 8];
        let fragment = |offset: u16| {
            let mut h = vec![0u8; 8];
            h[2..4].copy_from_slice(&(offset << 3).to_be_bytes());
            h
        };
        let allowed = "2001:db8:203::100";
        assert_eq!(
            verdict(
                &filter,
                &v6_with(allowed, &[(HOP_BY_HOP, options.clone())], TCP, 443)
            ),
            Admit
        );
        assert_eq!(
            verdict(
                &filter,
                &v6_with(allowed, &[(DEST_OPTIONS, options.clone())], TCP, 8443)
            ),
            Refuse
        );
        assert_eq!(
            verdict(&filter, &v6_with(allowed, &[(FRAGMENT, fragment(0))], TCP, 443)),
            Admit
        );
        assert_eq!(
            verdict(
                &filter,
                &v6_with(allowed, &[(ROUTING, options.clone())], TCP, 443)
            ),
            Refuse
        );
        // A later fragment has no ports: it goes only to an allowed host.
        assert_eq!(
            verdict(&filter, &v6_with(allowed, &[(FRAGMENT, fragment(100))], TCP, 1)),
            Admit
        );
        assert_eq!(
            verdict(
                &filter,
                &v6_with("2001:db8:203::10", &[(FRAGMENT, fragment(100))], UDP, 1)
            ),
            Refuse
        );
        let too_many: Vec<_> = (0..6).map(|_| (DEST_OPTIONS, options.clone())).collect();
        assert_eq!(verdict(&filter, &v6_with(allowed, &too_many, TCP, 443)), Refuse);
    }

    #[test]
    fn ipv4_later_fragments_go_only_to_allowed_hosts() {
        let filter = open();
        let later = |dst: &str| {
            let mut p = v4(dst, UDP, 1);
            p[6..8].copy_from_slice(&185u16.to_be_bytes());
            p
        };
        assert_eq!(verdict(&filter, &later("203.0.113.10")), Admit);
        assert_eq!(verdict(&filter, &later("203.0.113.20")), Refuse);
        // The first fragment (more-fragments set, offset 0) has its ports.
        let mut first = v4("203.0.113.10", UDP, 8443);
        first[6] = 0x20;
        assert_eq!(verdict(&filter, &first), Refuse);
    }

    #[test]
    fn answers_admit_their_names_ports_until_a_narrowing_not_a_ttl() {
        let filter = open();
        let host: IpAddr = "198.51.100.77".parse().expect("address");
        assert_eq!(verdict(&filter, &v4("198.51.100.77", TCP, 443)), Refuse);
        filter.learn(
            "meet.test",
            &[
                (host, TCP, PortRange::single(443)),
                (host, UDP, PortRange::single(3478)),
                (host, TCP, PortRange::single(22)),
            ],
        );
        assert_eq!(verdict(&filter, &v4("198.51.100.77", TCP, 443)), Admit);
        assert_eq!(verdict(&filter, &v4("198.51.100.77", UDP, 3478)), Admit);
        // Not a port of the name.
        assert_eq!(verdict(&filter, &v4("198.51.100.77", TCP, 22)), Refuse);
        // Not an allowed name.
        filter.learn(
            "other.test",
            &[(
                "198.51.100.78".parse().expect("address"),
                TCP,
                PortRange::single(443),
            )],
        );
        assert_eq!(verdict(&filter, &v4("198.51.100.78", TCP, 443)), Refuse);

        // A reload that keeps the name and drops a port: the port closes,
        // the rest stays.
        let mut narrower = allowlist();
        narrower.names[0].udp.clear();
        filter.set(Some(&narrower));
        assert_eq!(verdict(&filter, &v4("198.51.100.77", TCP, 443)), Admit);
        assert_eq!(verdict(&filter, &v4("198.51.100.77", UDP, 3478)), Refuse);
        // An answer that comes after the narrowing does not reopen it.
        filter.learn("meet.test", &[(host, UDP, PortRange::single(3478))]);
        assert_eq!(verdict(&filter, &v4("198.51.100.77", UDP, 3478)), Refuse);

        // Removing the name closes its addresses at once.
        let mut without = allowlist();
        without.names.clear();
        filter.set(Some(&without));
        assert_eq!(verdict(&filter, &v4("198.51.100.77", TCP, 443)), Refuse);
        // And a lockdown forgets every answer, so reopening starts empty.
        filter.set(Some(&allowlist()));
        filter.learn("meet.test", &[(host, TCP, PortRange::single(443))]);
        filter.set(None);
        filter.learn("meet.test", &[(host, TCP, PortRange::single(443))]);
        filter.set(Some(&allowlist()));
        assert_eq!(verdict(&filter, &v4("198.51.100.77", TCP, 443)), Refuse);
    }

    #[test]
    fn mapped_addresses_are_matched_as_ipv4() {
        let filter = open();
        let mapped: IpAddr = "::ffff:198.51.100.77".parse().expect("address");
        filter.learn("meet.test", &[(mapped, TCP, PortRange::single(443))]);
        assert_eq!(verdict(&filter, &v4("198.51.100.77", TCP, 443)), Admit);
    }

    #[test]
    fn refused_packets_are_counted() {
        let filter = AllowFilter::new();
        filter.count_refused(3);
        filter.clone().count_refused(2);
        assert_eq!(filter.refused(), 5);
    }
}
