//! The link-level table, `netdev sessiongate`: an egress chain (policy drop)
//! on every interface of this namespace but `lo` and the tunnel, added to
//! the same transaction as the `inet` table.
//!
//! It owns that table's rules and the list of interfaces from
//! `/proc/net/dev`. It never puts a chain on `lo` or the tunnel, and never
//! runs nft itself.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use nftables::batch::Batch;
use nftables::expr::{Expression, MetaKey};
use nftables::schema::{Chain, NfListObject, Rule, Table};
use nftables::stmt::{Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::build::{dhcp_rules, Inputs};
use super::expr::{
    accept, canonical, eq, icmpv6_types, ip, is_in, meta, ne, net, num, on_link, payload, s, set_of,
    tcp_or_udp, to_the_link_v6,
};
use super::{Lockdown, TABLE};

/// IPv6's fragment header (next header 44).
const IPV6_FRAGMENT_HEADER: u32 = 44;

/// Our second table (family netdev): an egress chain on every interface of
/// this namespace but `lo` and the tunnel. It sees what leaves through the
/// device whoever sent it: this namespace's packets, and those of a
/// macvlan/ipvlan child in another namespace or of a bridge port (VMs,
/// containers), which never meet the `inet` hooks here.
pub(super) fn link_table() -> Table<'static> {
    Table {
        family: NfFamily::NetDev,
        name: TABLE.into(),
        handle: None,
    }
}

/// The interfaces of this namespace that get an egress chain, sorted:
/// every one but `lo` and the tunnel (from `/proc/net/dev`, which lists
/// the reading process's namespace).
pub(super) fn link_devices(tunnel: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    parse_proc_net_dev(&text, tunnel)
}

pub(super) fn parse_proc_net_dev(text: &str, tunnel: &str) -> Vec<String> {
    let mut devices: Vec<String> = text
        .lines()
        .filter_map(|line| line.split_once(':').map(|(name, _)| name.trim()))
        .filter(|name| !name.is_empty() && !name.contains('|') && *name != "lo" && *name != tunnel)
        .map(str::to_string)
        .collect();
    devices.sort();
    devices.dedup();
    devices
}

/// Adds `netdev sessiongate` (replaced as a whole, like ours in `inet`) to
/// `batch`. Each egress chain (policy drop) lets out only: ARP; the
/// tunnel's UDP to the endpoint (mark, address and port; over TCP the
/// relay's TCP, and while it probes, the gateway's UDP beside it); DHCP and DHCPv6
/// as in the `inet` table; IPv6 neighbour discovery (hop limit 255) and
/// MLD reports (hop limit 1); the LAN under `allow_lan`.
pub(super) fn add_link_table(
    batch: &mut Batch<'static>,
    lockdown: &Lockdown,
    inputs: &Inputs,
    devices: &[String],
) {
    let endpoint = SocketAddr::new(canonical(lockdown.endpoint.ip()), lockdown.endpoint.port());
    batch.add(NfListObject::Table(link_table()));
    batch.delete(NfListObject::Table(link_table()));
    batch.add(NfListObject::Table(link_table()));

    let mut rules: Vec<Vec<Statement<'static>>> = Vec::new();
    rules.push(vec![eq(meta(MetaKey::Protocol), s("arp")), accept()]);
    rules.push(vec![
        eq(meta(MetaKey::Mark), num(lockdown.fwmark)),
        eq(payload(ip(&endpoint.ip()), "daddr"), s(endpoint.ip().to_string())),
        eq(
            payload(lockdown.endpoint_protocol.nft_name(), "dport"),
            num(endpoint.port()),
        ),
        accept(),
    ]);
    if let Some(probe) = lockdown.udp_probe {
        let probe = SocketAddr::new(canonical(probe.ip()), probe.port());
        rules.push(vec![
            eq(meta(MetaKey::Mark), num(lockdown.fwmark)),
            eq(payload(ip(&probe.ip()), "daddr"), s(probe.ip().to_string())),
            eq(payload("udp", "dport"), num(probe.port())),
            accept(),
        ]);
    }
    // The rest of a tunnel datagram that this machine fragmented (its own
    // link is smaller than the tunnel's MTU plus WireGuard's overhead, as
    // on LTE or DS-Lite): fragments carry the mark but no UDP header, so
    // the rule above misses them and the call froze on large packets.
    let later_fragment = if endpoint.is_ipv4() {
        ne(
            Expression::BinaryOperation(Box::new(nftables::expr::BinaryOperation::AND(
                payload("ip", "frag-off"),
                num(0x1fffu32),
            ))),
            num(0u32),
        )
    } else {
        eq(payload("ip6", "nexthdr"), num(IPV6_FRAGMENT_HEADER))
    };
    rules.push(vec![
        eq(meta(MetaKey::Mark), num(lockdown.fwmark)),
        eq(payload(ip(&endpoint.ip()), "daddr"), s(endpoint.ip().to_string())),
        later_fragment,
        accept(),
    ]);
    // DHCP: the same rules as the inet table's, without the tunnel test
    // (the tunnel has no chain here).
    let (dhcp_out, _) = dhcp_rules(&lockdown.tunnel_interface, &inputs.on_link);
    for rule in dhcp_out {
        rules.push(
            rule.into_iter()
                .filter(|st| !matches!(st, Statement::Match(m) if m.op == Operator::NEQ))
                .collect(),
        );
    }
    rules.push(vec![
        icmpv6_types(&["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]),
        on_link(),
        to_the_link_v6(&inputs.on_link),
        accept(),
    ]);
    rules.push(vec![
        icmpv6_types(&["mld-listener-report", "mld-listener-done", "mld2-listener-report"]),
        eq(payload("ip6", "hoplimit"), num(1u32)),
        accept(),
    ]);
    if lockdown.allow_lan {
        for (family, v6) in [("ip", false), ("ip6", true)] {
            let nets: Vec<Expression<'static>> = inputs
                .lan
                .iter()
                .filter(|(a, _)| a.is_ipv6() == v6)
                .map(|&n| net(n))
                .collect();
            if !nets.is_empty() {
                rules.push(vec![is_in(payload(family, "daddr"), set_of(nets)), accept()]);
            }
        }
    }

    for (index, device) in devices.iter().enumerate() {
        let name = format!("egress{index}");
        batch.add(NfListObject::Chain(Chain {
            family: NfFamily::NetDev,
            table: TABLE.into(),
            name: name.clone().into(),
            _type: Some(NfChainType::Filter),
            hook: Some(NfHook::Egress),
            prio: Some(0),
            dev: Some(device.clone().into()),
            policy: Some(NfChainPolicy::Drop),
            ..Default::default()
        }));
        for rule in &rules {
            batch.add(NfListObject::Rule(Rule {
                family: NfFamily::NetDev,
                table: TABLE.into(),
                chain: name.clone().into(),
                expr: Cow::Owned(rule.clone()),
                ..Default::default()
            }));
        }
    }
}

/// The one named exception of the link-level table: the captive-portal
/// namespace's own traffic (an ipvlan child of a physical interface, which
/// shares its MAC; so its IPv4 source address and the random mark its own
/// table sets tell it apart, the address alone being forgeable by any
/// other namespace on the link), to the local network's web and DNS
/// servers and to the DNS server the network gave. Nothing of this namespace's own matches it: its packets met the
/// `inet` table first, which lets none of them out in clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalException {
    /// The portal namespace's address.
    pub source: std::net::Ipv4Addr,
    /// The local network's subnet (address, prefix length).
    pub lan: (std::net::Ipv4Addr, u8),
    /// The DNS server the network gave (maybe outside the subnet).
    pub dns: std::net::Ipv4Addr,
    /// The mark the namespace's own table sets on what it lets out: the
    /// source address alone can be forged by another namespace on the
    /// link (a container with a raw socket), the mark cannot without
    /// `CAP_NET_ADMIN` and a guess of 32 random bits.
    pub mark: u32,
}

/// TCP ports the portal namespace may use on the local network: DNS, HTTP
/// and HTTPS (a login page).
pub const PORTAL_TCP_PORTS: [u16; 3] = [53, 80, 443];

/// Appends the portal exception to each egress chain of the link-level
/// table that [`add_link_table`] put in `batch` (after its rules: every
/// rule there accepts, and the policy drops what none accepted).
pub(super) fn add_portal_exception(batch: &mut Batch<'static>, devices: &[String], portal: &PortalException) {
    let from_portal = || {
        [
            eq(meta(MetaKey::Mark), num(portal.mark)),
            eq(payload("ip", "saddr"), s(portal.source.to_string())),
        ]
    };
    let lan = net((IpAddr::V4(portal.lan.0), portal.lan.1));
    let tcp_ports = set_of(PORTAL_TCP_PORTS.iter().map(|&p| num(p)).collect());
    let rules: Vec<Vec<Statement<'static>>> = vec![
        [
            from_portal().to_vec(),
            vec![
                eq(payload("ip", "daddr"), lan.clone()),
                is_in(payload("tcp", "dport"), tcp_ports),
                accept(),
            ],
        ]
        .concat(),
        [
            from_portal().to_vec(),
            vec![
                eq(payload("ip", "daddr"), lan),
                eq(payload("udp", "dport"), num(53u32)),
                accept(),
            ],
        ]
        .concat(),
        [
            from_portal().to_vec(),
            vec![
                eq(payload("ip", "daddr"), s(portal.dns.to_string())),
                tcp_or_udp(),
                eq(payload("th", "dport"), num(53u32)),
                accept(),
            ],
        ]
        .concat(),
    ];
    for index in 0..devices.len() {
        for rule in &rules {
            batch.add(NfListObject::Rule(Rule {
                family: NfFamily::NetDev,
                table: TABLE.into(),
                chain: format!("egress{index}").into(),
                expr: Cow::Owned(rule.clone()),
                ..Default::default()
            }));
        }
    }
}
