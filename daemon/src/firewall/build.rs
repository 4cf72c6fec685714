//! The `inet sessiongate` table's two shapes, lockdown and session, built as
//! one batch that adds, deletes and adds the table (see the parent's top
//! comment for the rules, in order).
//!
//! It owns the rule order and the validation of what goes into it. It is
//! pure: it never reads the machine (its [`Inputs`] are read by the
//! caller) and never runs nft.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nftables::batch::Batch;
use nftables::expr::{Expression, MetaKey, NamedExpression, CT};
use nftables::schema::{
    Chain, Counter as CounterObject, Element, NfListObject, Rule, Set, SetFlag, SetType, SetTypeValue,
};
use nftables::stmt::{Counter, Match, Operator, Reject, RejectType, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};

use super::expr::{
    accept, canonical, concat, ct_mark, ct_state, eq, established, icmp_errors, icmpv6_types, ip, is_in,
    meta, ne, net, num, on_link, payload, refuse, s, set_of, table, tcp_or_udp, to_the_link_v6,
};
use super::lan::normalize_nets;
use super::learned::{add_known, learned_elem};
use super::{
    Allowlist, FirewallError, LearnedAddress, LearnedKey, Lockdown, ALLOW4, ALLOW4_NETS, ALLOW6, ALLOW6_NETS,
    DNS_REDIRECT, FORWARD, INPUT, KNOWN4, KNOWN6, OUTPUT, POSTROUTING, REFUSE, REFUSED_COUNTER,
    SESSION_CT_BIT, TABLE, TCP, UDP, VERIFY_MARK,
};

pub(super) fn validate(lockdown: &Lockdown, allow: Option<&Allowlist>) -> Result<(), FirewallError> {
    let name = &lockdown.tunnel_interface;
    // The kernel's rules (1-15 bytes, no '/', ':' or whitespace, not . or ..)
    // plus nft's: '*' would make the name a wildcard, quotes and backslashes
    // would change the string.
    let bad_char = |c: char| !c.is_ascii_graphic() || matches!(c, '/' | ':' | '*' | '"' | '\\');
    if name.is_empty() || name.len() > 15 || name == "." || name == ".." || name.chars().any(bad_char) {
        return Err(FirewallError::Invalid(format!(
            "tunnel interface name {name:?} is not a valid Linux interface name"
        )));
    }
    if name == "lo" {
        return Err(FirewallError::Invalid("the tunnel interface cannot be lo".into()));
    }
    if let Some(redirect) = allow.and_then(|a| a.dns_redirect) {
        if redirect.stub_mark == lockdown.fwmark {
            return Err(FirewallError::Invalid(format!(
                "the DNS stub's mark {:#x} is the tunnel's fwmark; its queries would bypass the tunnel",
                redirect.stub_mark
            )));
        }
    }
    Ok(())
}

/// DHCP (68→67) and DHCPv6 (546→547) out, and their replies in, never
/// through the tunnel. DHCPv4 goes to the limited broadcast or to a server
/// on a directly connected subnet (unicast renewals to the lease's server);
/// replies come from such a server, or answer a renewal (conntrack). DHCPv6
/// goes to All_DHCP_Relay_Agents_and_Servers (ff02::1:2) or a link-local
/// address; replies come from a link-local address (RFC 8415 servers and
/// relays on the link answer from theirs). So a process that binds a DHCP
/// client port gets no channel to any host beyond the link.
pub(super) fn dhcp_rules(
    tun: &str,
    on_link: &[(IpAddr, u8)],
) -> (Vec<Vec<Statement<'static>>>, Vec<Vec<Statement<'static>>>) {
    let not_out_tunnel = || {
        Statement::Match(Match {
            left: meta(MetaKey::Oifname),
            right: s(tun),
            op: Operator::NEQ,
        })
    };
    let not_in_tunnel = || {
        Statement::Match(Match {
            left: meta(MetaKey::Iifname),
            right: s(tun),
            op: Operator::NEQ,
        })
    };
    let ports = |sport: u16, dport: u16| {
        vec![
            eq(payload("udp", "sport"), num(sport)),
            eq(payload("udp", "dport"), num(dport)),
        ]
    };
    let rule =
        |first: Statement<'static>, mut parts: Vec<Statement<'static>>, last: Vec<Statement<'static>>| {
            let mut rule = vec![first];
            rule.append(&mut parts);
            rule.extend(last);
            rule
        };
    let links_v4: Vec<Expression<'static>> = on_link
        .iter()
        .filter(|(a, _)| a.is_ipv4())
        .map(|&n| net(n))
        .collect();
    let mut out = Vec::new();
    let mut inp = Vec::new();
    out.push(rule(
        not_out_tunnel(),
        ports(68, 67),
        vec![eq(payload("ip", "daddr"), s("255.255.255.255")), accept()],
    ));
    inp.push(rule(
        not_in_tunnel(),
        ports(67, 68),
        vec![is_in(ct_state(), set_of(vec![s("established")])), accept()],
    ));
    if !links_v4.is_empty() {
        out.push(rule(
            not_out_tunnel(),
            ports(68, 67),
            vec![is_in(payload("ip", "daddr"), set_of(links_v4.clone())), accept()],
        ));
        inp.push(rule(
            not_in_tunnel(),
            ports(67, 68),
            vec![is_in(payload("ip", "saddr"), set_of(links_v4)), accept()],
        ));
    }
    let link_local_v6 = || net((IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10));
    out.push(rule(
        not_out_tunnel(),
        ports(546, 547),
        vec![
            is_in(
                payload("ip6", "daddr"),
                set_of(vec![s("ff02::1:2"), link_local_v6()]),
            ),
            accept(),
        ],
    ));
    inp.push(rule(
        not_in_tunnel(),
        ports(547, 546),
        vec![eq(payload("ip6", "saddr"), link_local_v6()), accept()],
    ));
    (out, inp)
}

struct ChainSpec {
    name: &'static str,
    /// (hook, type, priority) for base chains.
    base: Option<(NfHook, NfChainType, i32)>,
    rules: Vec<Vec<Statement<'static>>>,
}

impl ChainSpec {
    fn new(name: &'static str, base: Option<(NfHook, NfChainType, i32)>) -> ChainSpec {
        ChainSpec {
            name,
            base,
            rules: Vec::new(),
        }
    }

    fn push(&mut self, rule: Vec<Statement<'static>>) {
        self.rules.push(rule);
    }
}

/// What an apply reads from the machine and from this process's memory.
#[derive(Debug, Default)]
pub(super) struct Inputs {
    /// `allow_lan`'s networks (empty without it).
    pub(super) lan: Vec<(IpAddr, u8)>,
    /// The directly connected subnets (see [`connected_routes`]).
    pub(super) on_link: Vec<(IpAddr, u8)>,
    /// Unexpired answers to put back, with their remaining time.
    pub(super) learned: Vec<LearnedAddress>,
    /// Every answer whose name and port are still allowed.
    pub(super) known: Vec<LearnedKey>,
}

/// [`build_table`] with only the LAN and learned addresses (unit tests).
#[cfg(test)]
pub(super) fn build(
    lockdown: &Lockdown,
    allow: Option<&Allowlist>,
    lan: &[(IpAddr, u8)],
    learned: &[LearnedAddress],
) -> Batch<'static> {
    let inputs = Inputs {
        lan: lan.to_vec(),
        learned: learned.to_vec(),
        ..Inputs::default()
    };
    build_table(lockdown, allow, &inputs)
}

/// The whole table as one batch: add, delete and add the table (replaces
/// it whether or not it exists), then its sets, chains and rules.
pub(super) fn build_table(lockdown: &Lockdown, allow: Option<&Allowlist>, inputs: &Inputs) -> Batch<'static> {
    let lan = inputs.lan.as_slice();
    let connected = inputs.on_link.as_slice();
    let learned = inputs.learned.as_slice();
    let tun = lockdown.tunnel_interface.as_str();
    let endpoint = SocketAddr::new(canonical(lockdown.endpoint.ip()), lockdown.endpoint.port());
    let v6_tunnel = allow.is_some_and(|a| a.tunnel_has_ipv6);

    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    batch.add(NfListObject::Table(table()));
    batch.add(NfListObject::Counter(CounterObject {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: REFUSED_COUNTER.into(),
        handle: None,
        packets: None,
        bytes: None,
    }));

    for (name, ty, flag, elems) in [
        (ALLOW4, SetType::Ipv4Addr, Some(SetFlag::Timeout), None),
        (ALLOW6, SetType::Ipv6Addr, Some(SetFlag::Timeout), None),
        (KNOWN4, SetType::Ipv4Addr, None, None),
        (KNOWN6, SetType::Ipv6Addr, None, None),
        (
            ALLOW4_NETS,
            SetType::Ipv4Addr,
            Some(SetFlag::Interval),
            allow.map(|a| static_elements(a, false)),
        ),
        (
            ALLOW6_NETS,
            SetType::Ipv6Addr,
            Some(SetFlag::Interval),
            allow.map(|a| static_elements(a, true)),
        ),
    ] {
        batch.add(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.into(),
            handle: None,
            set_type: SetTypeValue::Concatenated(Cow::Owned(vec![
                ty,
                SetType::InetProto,
                SetType::InetService,
            ])),
            policy: None,
            flags: flag.map(|flag| HashSet::from([flag])),
            elem: elems.filter(|e| !e.is_empty()).map(Cow::Owned),
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        })));
    }
    // DNS answers remembered from before this replace (session shape only).
    if allow.is_some() {
        for (set, v6) in [(ALLOW4, false), (ALLOW6, true)] {
            let elems: Vec<_> = learned
                .iter()
                .filter(|e| e.addr.is_ipv6() == v6)
                .map(learned_elem)
                .collect();
            if !elems.is_empty() {
                batch.add(NfListObject::Element(Element {
                    family: NfFamily::INet,
                    table: TABLE.into(),
                    name: set.into(),
                    elem: Cow::Owned(elems),
                }));
            }
        }
        add_known(&mut batch, &inputs.known);
    }

    let filter = |hook| Some((hook, NfChainType::Filter, 0));
    let mut output = ChainSpec::new(OUTPUT, filter(NfHook::Output));
    let mut input = ChainSpec::new(INPUT, filter(NfHook::Input));
    let forward = ChainSpec::new(FORWARD, filter(NfHook::Forward));
    let mut refuse_chain = ChainSpec::new(REFUSE, None);

    // Loopback, by interface and by address (redirected packets keep the
    // output interface routed before nat). The address rules stay out of
    // `postrouting`, where the real device is known: a socket bound to
    // another interface (SO_BINDTODEVICE, unprivileged) sends a loopback
    // destination out of that interface, e.g. through the tunnel.
    let loopback_by_address = [
        vec![
            eq(
                payload("ip", "daddr"),
                net((Ipv4Addr::new(127, 0, 0, 0).into(), 8)),
            ),
            accept(),
        ],
        vec![eq(payload("ip6", "daddr"), s("::1")), accept()],
    ];
    output.push(vec![eq(meta(MetaKey::Oifname), s("lo")), accept()]);
    for rule in &loopback_by_address {
        output.push(rule.clone());
    }
    input.push(vec![eq(meta(MetaKey::Iifname), s("lo")), accept()]);

    // The tunnel's own UDP: mark and address and port.
    output.push(vec![
        eq(meta(MetaKey::Mark), num(lockdown.fwmark)),
        eq(payload(ip(&endpoint.ip()), "daddr"), s(endpoint.ip().to_string())),
        eq(payload("udp", "dport"), num(endpoint.port())),
        accept(),
    ]);
    input.push(vec![
        eq(payload(ip(&endpoint.ip()), "saddr"), s(endpoint.ip().to_string())),
        eq(payload("udp", "sport"), num(endpoint.port())),
        is_in(ct_state(), set_of(vec![s("established")])),
        accept(),
    ]);
    // Path MTU errors about the tunnel's own UDP (from any router on the
    // path, which conntrack relates to that flow only): without them a link
    // smaller than ours is a black hole for full-sized datagrams. See
    // tunnel.rs for the outer don't-fragment policy that goes with it.
    // From the link only: that path is outside the tunnel, so such an
    // error arriving through it (the gateway's) says nothing about it.
    let too_big = if endpoint.is_ipv4() {
        vec![
            eq(payload("icmp", "type"), s("destination-unreachable")),
            eq(payload("icmp", "code"), s("frag-needed")),
        ]
    } else {
        vec![eq(payload("icmpv6", "type"), s("packet-too-big"))]
    };
    input.push(
        std::iter::once(ne(meta(MetaKey::Iifname), s(tun)))
            .chain(too_big)
            .chain([
                is_in(ct_state(), set_of(vec![s("related")])),
                eq(flow_original_daddr(endpoint.ip()), s(endpoint.ip().to_string())),
                accept(),
            ])
            .collect(),
    );

    // DHCP and DHCPv6 keep the lease: only to the link (broadcast, on-link
    // servers, the DHCPv6 multicast group, link-local), never through the
    // tunnel, and only replies from there (see [`dhcp_rules`]).
    let (dhcp_out, dhcp_in) = dhcp_rules(tun, connected);
    output.rules.extend(dhcp_out);
    input.rules.extend(dhcp_in);

    // IPv6 neighbour discovery, on-link only.
    output.push(vec![
        icmpv6_types(&["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]),
        on_link(),
        to_the_link_v6(connected),
        accept(),
    ]);
    input.push(vec![
        icmpv6_types(&[
            "nd-router-advert",
            "nd-neighbor-solicit",
            "nd-neighbor-advert",
            "nd-redirect",
        ]),
        on_link(),
        accept(),
    ]);

    // TCP through the tunnel announces no larger segments than the route
    // there carries (the tunnel's MTU), for both ends of the connection.
    if allow.is_some() {
        output.push(vec![
            eq(meta(MetaKey::Oifname), s(tun)),
            is_in(payload("tcp", "flags"), s("syn")),
            Statement::Mangle(nftables::stmt::Mangle {
                key: Expression::Named(NamedExpression::TcpOption(nftables::expr::TcpOption {
                    name: "maxseg".into(),
                    field: Some("size".into()),
                })),
                value: Expression::Named(NamedExpression::RT(nftables::expr::RT {
                    key: nftables::expr::RTKey::MTU,
                    family: None,
                })),
            }),
        ]);
    }

    // The pinned resolvers, through the tunnel only, before DNS is refused.
    // With the stub, only its own (marked) packets: the redirect is NAT,
    // decided once per conntrack entry, so a local program that binds the
    // stub's last upstream source port meets the stub's unredirected entry
    // and would otherwise reach the pinned resolver past the stub.
    if let Some(allow) = allow {
        let servers: BTreeSet<IpAddr> = allow.dns_servers.iter().map(|&a| canonical(a)).collect();
        for server in servers.iter().filter(|a| a.is_ipv4() || v6_tunnel) {
            let mut rule = vec![eq(meta(MetaKey::Oifname), s(tun))];
            if let Some(redirect) = &allow.dns_redirect {
                rule.push(eq(meta(MetaKey::Mark), num(redirect.stub_mark)));
            }
            rule.extend([
                eq(payload(ip(server), "daddr"), s(server.to_string())),
                tcp_or_udp(),
                eq(payload("th", "dport"), num(53u32)),
                accept(),
            ]);
            output.push(rule);
        }
    }

    // DNS anywhere else, and DNS-over-TLS/QUIC anywhere: refused before any
    // allowlist or LAN rule can accept it.
    output.push(vec![
        tcp_or_udp(),
        is_in(payload("th", "dport"), set_of(vec![num(53u32), num(853u32)])),
        refuse(),
    ]);

    if let Some(allow) = allow {
        let mut families = vec![("ip", ALLOW4, ALLOW4_NETS, KNOWN4)];
        if allow.tunnel_has_ipv6 {
            families.push(("ip6", ALLOW6, ALLOW6_NETS, KNOWN6));
        }
        for &(family, dynamic, literal, _) in &families {
            for set in [dynamic, literal] {
                output.push(vec![
                    eq(meta(MetaKey::Oifname), s(tun)),
                    is_in(
                        concat(vec![
                            payload(family, "daddr"),
                            meta(MetaKey::L4proto),
                            payload("th", "dport"),
                        ]),
                        s(format!("@{set}")),
                    ),
                    accept(),
                ]);
            }
        }
        // Established flows pass only while the allowlist in force still
        // holds what admitted them: the far end's address, protocol and
        // port must be in a literal set or among the still-allowed answers
        // (`known*`, which outlive a TTL but not a narrowing). Only flows
        // we opened get this far (input drops new connections), so on the
        // way out the far end is the destination, on the way in the source.
        // (nft cannot put `ct original proto-dst` in a concatenation.)
        for &(family, _, literal, known) in &families {
            for set in [known, literal] {
                let far_end = |addr: &'static str, port: &'static str| {
                    is_in(
                        concat(vec![
                            payload(family, addr),
                            meta(MetaKey::L4proto),
                            payload("th", port),
                        ]),
                        s(format!("@{set}")),
                    )
                };
                output.push(vec![
                    eq(meta(MetaKey::Oifname), s(tun)),
                    is_in(ct_state(), set_of(vec![s("established")])),
                    far_end("daddr", "dport"),
                    accept(),
                ]);
                input.push(vec![
                    eq(meta(MetaKey::Iifname), s(tun)),
                    is_in(ct_state(), set_of(vec![s("established")])),
                    far_end("saddr", "sport"),
                    accept(),
                ]);
            }
        }
        // ICMP errors about those flows (path MTU, unreachable) come back
        // through the tunnel; conntrack marks them related only when they
        // quote a flow it tracks. Not those about the tunnel's own UDP,
        // whose path is the link's (see above): the endpoint's family's
        // rule leaves out flows to the endpoint's address.
        for (errors, v6) in icmp_errors().into_iter().zip([false, true]) {
            let mut rule = vec![
                eq(meta(MetaKey::Iifname), s(tun)),
                is_in(ct_state(), set_of(vec![s("related")])),
                errors,
            ];
            if endpoint.is_ipv6() == v6 {
                rule.push(ne(
                    flow_original_daddr(endpoint.ip()),
                    s(endpoint.ip().to_string()),
                ));
            }
            rule.push(accept());
            input.push(rule);
        }
        // The pinned resolvers' answers.
        let servers: BTreeSet<IpAddr> = allow.dns_servers.iter().map(|&a| canonical(a)).collect();
        for server in servers.iter().filter(|a| a.is_ipv4() || v6_tunnel) {
            input.push(vec![
                eq(meta(MetaKey::Iifname), s(tun)),
                eq(payload(ip(server), "saddr"), s(server.to_string())),
                tcp_or_udp(),
                eq(payload("th", "sport"), num(53u32)),
                established(),
                accept(),
            ]);
        }
    }

    if lockdown.allow_lan {
        for (family, v6) in [("ip", false), ("ip6", true)] {
            let nets: Vec<Expression<'static>> = lan
                .iter()
                .filter(|(a, _)| a.is_ipv6() == v6)
                .map(|&n| net(n))
                .collect();
            if nets.is_empty() {
                continue;
            }
            // Outside the tunnel only: a LAN range with no route in the
            // main table (link-local, SSDP, or a socket bound to the
            // tunnel) would otherwise go through the tunnel to the gateway.
            output.push(vec![
                ne(meta(MetaKey::Oifname), s(tun)),
                is_in(payload(family, "daddr"), set_of(nets.clone())),
                accept(),
            ]);
            input.push(vec![
                ne(meta(MetaKey::Iifname), s(tun)),
                is_in(payload(family, "saddr"), set_of(nets.clone())),
                is_in(payload(family, "daddr"), set_of(nets)),
                accept(),
            ]);
        }
    }

    // Whatever is left goes out loudly refused; verify's probes are counted.
    output.push(vec![
        eq(meta(MetaKey::Mark), num(VERIFY_MARK)),
        Statement::Counter(Counter::Named(REFUSED_COUNTER.into())),
        refuse(),
    ]);
    output.push(vec![refuse()]);
    refuse_chain.push(vec![
        eq(meta(MetaKey::L4proto), s("tcp")),
        Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
    ]);
    refuse_chain.push(vec![Statement::Reject(Some(Reject::new(
        Some(RejectType::ICMPX),
        Some(RejectCode::AdminProhibited),
    )))]);

    // The same rules once more where the real output device is known:
    // another table's nat (a `dnat` after our filter, as Docker and
    // kube-proxy do) or route chain (a new mark) can send a packet that
    // `output` saw going to `lo` or the tunnel somewhere else. `reject` is
    // not allowed in postrouting, so refusals drop here; verify's counter
    // stays in `output` alone.
    let mut postrouting = ChainSpec::new(POSTROUTING, filter(NfHook::Postrouting));
    // Tag every flow of the session (see SESSION_CT_BIT); a packet dropped
    // below leaves no tracked flow behind anyway.
    postrouting.push(vec![Statement::Mangle(nftables::stmt::Mangle {
        key: ct_mark(),
        value: Expression::BinaryOperation(Box::new(nftables::expr::BinaryOperation::OR(vec![
            ct_mark(),
            num(SESSION_CT_BIT),
        ]))),
    })]);
    for rule in &output.rules {
        if rule.iter().any(|st| matches!(st, Statement::Counter(_))) || loopback_by_address.contains(rule) {
            continue;
        }
        postrouting.push(
            rule.iter()
                .map(|st| match st {
                    Statement::Jump(jump) if jump.target == REFUSE => Statement::Drop(None),
                    other => other.clone(),
                })
                .collect(),
        );
    }

    // Room for the stub: every DNS packet but the stub's own to the stub.
    let mut chains = vec![refuse_chain];
    if let Some(redirect) = allow.and_then(|a| a.dns_redirect) {
        let mut nat = ChainSpec::new(DNS_REDIRECT, Some((NfHook::Output, NfChainType::NAT, -100)));
        nat.push(vec![
            eq(meta(MetaKey::Mark), num(redirect.stub_mark)),
            Statement::Return(None),
        ]);
        nat.push(vec![
            tcp_or_udp(),
            eq(payload("th", "dport"), num(53u32)),
            Statement::Redirect(Some(NAT {
                addr: None,
                family: None,
                port: Some(num(redirect.port)),
                flags: None,
            })),
        ]);
        chains.push(nat);
    }
    chains.extend([output, input, forward, postrouting]);

    for chain in &chains {
        batch.add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: chain.name.into(),
            _type: chain.base.map(|b| b.1),
            hook: chain.base.map(|b| b.0),
            prio: chain.base.map(|b| b.2),
            policy: chain.base.map(|b| match b.1 {
                NfChainType::Filter => NfChainPolicy::Drop,
                _ => NfChainPolicy::Accept,
            }),
            ..Default::default()
        }));
    }
    for chain in &chains {
        for rule in &chain.rules {
            batch.add(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: TABLE.into(),
                chain: chain.name.into(),
                expr: Cow::Owned(rule.clone()),
                ..Default::default()
            }));
        }
    }
    batch
}

/// The profile's literal networks as interval-set elements, without
/// overlaps (nft refuses them) for one address family.
fn static_elements(allow: &Allowlist, v6: bool) -> Vec<Expression<'static>> {
    let mut by_port: BTreeMap<(u8, u16), Vec<(IpAddr, u8)>> = BTreeMap::new();
    for entry in allow.rules.iter().filter(|e| e.net.0.is_ipv6() == v6) {
        for (proto, ports) in [(TCP, &entry.tcp), (UDP, &entry.udp)] {
            for &port in ports {
                by_port.entry((proto, port)).or_default().push(entry.net);
            }
        }
    }
    let mut elems = Vec::new();
    for ((proto, port), nets) in by_port {
        for n in normalize_nets(nets) {
            elems.push(concat(vec![net(n), num(proto), num(port)]));
        }
    }
    elems
}

/// The original destination of a packet's flow (for an ICMP error, of the
/// flow it quotes), compared as an address of `family_of`'s family.
fn flow_original_daddr(family_of: IpAddr) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: "daddr".into(),
        family: Some(if family_of.is_ipv4() {
            nftables::expr::CTFamily::IP
        } else {
            nftables::expr::CTFamily::IP6
        }),
        dir: Some(nftables::expr::CTDir::Original),
    }))
}
