//! The `inet sessiongate` table's two shapes, lockdown and session, built as
//! one batch that adds, deletes and adds the table (see the parent's top
//! comment for the rules, in order). [`build_table`] reads as the list of
//! rule groups in the order packets meet them; each group is one small
//! function named for what it lets through or refuses, adding its rules to
//! `output`, `input` and `refuse`; `postrouting` repeats `output` at the end.
//! A group that belongs to the session shape only returns at once in the
//! lockdown.
//!
//! It owns the rule order and the validation of what goes into it. It is
//! pure: it never reads the machine (its [`Inputs`] are read by the
//! caller) and never runs nft. A change of any rule shows in the golden
//! batches (`golden.rs`).

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
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
use super::learned::{add_known, by_allow_set, learned_elem, name_ranges, range_set_name};
use super::{
    Allowlist, FirewallError, LearnedAddress, LearnedKey, Lockdown, PortRange, ALLOW4, ALLOW4_NETS, ALLOW6,
    ALLOW6_NETS, DNS_REDIRECT, FORWARD, INPUT, KNOWN4, KNOWN6, OUTPUT, POSTROUTING, REFUSE, REFUSED_COUNTER,
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
    /// The directly connected subnets (see `lan::connected_routes`).
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
/// it whether or not it exists), then its counter and sets, then its
/// chains with their rules, one rule group after the other in the order
/// packets meet them.
pub(super) fn build_table(lockdown: &Lockdown, allow: Option<&Allowlist>, inputs: &Inputs) -> Batch<'static> {
    let shape = Shape::new(lockdown, allow, inputs);
    let mut batch = Batch::new();
    replace_the_table(&mut batch);
    add_the_verify_counter(&mut batch);
    add_the_sets(&mut batch, &shape);
    put_back_remembered_answers(&mut batch, &shape);

    let groups: [RuleGroup; 15] = [
        loopback,
        tunnel_udp,
        tunnel_path_mtu_errors,
        dhcp,
        neighbour_discovery,
        tunnel_mss_clamp,
        pinned_resolvers,
        dns_refused_elsewhere,
        allowlist,
        established_flows_still_allowed,
        gateway_enforces_the_allowlist,
        icmp_errors_about_flows,
        pinned_resolver_answers,
        lan,
        refuse_the_rest,
    ];
    let mut chains = Chains::new();
    for group in groups {
        group(&shape, &mut chains);
    }
    let postrouting = postrouting_repeats_output(&chains.output);

    let mut all = vec![chains.refuse];
    all.extend(dns_redirect_chain(&shape));
    all.extend([chains.output, chains.input, chains.forward, postrouting]);
    add_chains(&mut batch, &all);
    batch
}

/// What every rule group reads: the shape asked for, and what the apply
/// read from the machine and from its books.
struct Shape<'a> {
    lockdown: &'a Lockdown,
    /// `None`: the lockdown shape.
    allow: Option<&'a Allowlist>,
    inputs: &'a Inputs,
    /// The tunnel interface's name.
    tun: &'a str,
    /// The peer, an IPv4-mapped address as IPv4.
    endpoint: SocketAddr,
    /// The session shape with an IPv6 tunnel address.
    v6_tunnel: bool,
    /// The names' port ranges, each with sets of its own (see learned.rs
    /// for why not one interval set).
    ranges: BTreeSet<(u8, PortRange)>,
}

impl<'a> Shape<'a> {
    fn new(lockdown: &'a Lockdown, allow: Option<&'a Allowlist>, inputs: &'a Inputs) -> Shape<'a> {
        Shape {
            lockdown,
            allow,
            inputs,
            tun: lockdown.tunnel_interface.as_str(),
            endpoint: SocketAddr::new(canonical(lockdown.endpoint.ip()), lockdown.endpoint.port()),
            v6_tunnel: allow.is_some_and(|a| a.tunnel_has_ipv6),
            ranges: allow.map(|a| name_ranges(&a.names)).unwrap_or_default(),
        }
    }

    /// The pinned resolvers the tunnel can reach, each once, sorted.
    fn pinned_servers(&self, allow: &Allowlist) -> Vec<IpAddr> {
        let servers: BTreeSet<IpAddr> = allow.dns_servers.iter().map(|&a| canonical(a)).collect();
        servers
            .into_iter()
            .filter(|a| a.is_ipv4() || self.v6_tunnel)
            .collect()
    }
}

/// The filter chains the rule groups add to (`forward` stays empty: a
/// session machine forwards nothing).
struct Chains {
    output: ChainSpec,
    input: ChainSpec,
    forward: ChainSpec,
    refuse: ChainSpec,
}

impl Chains {
    fn new() -> Chains {
        let filter = |hook| Some((hook, NfChainType::Filter, 0));
        Chains {
            output: ChainSpec::new(OUTPUT, filter(NfHook::Output)),
            input: ChainSpec::new(INPUT, filter(NfHook::Input)),
            forward: ChainSpec::new(FORWARD, filter(NfHook::Forward)),
            refuse: ChainSpec::new(REFUSE, None),
        }
    }
}

/// One group of rules, named for what it lets through or refuses.
type RuleGroup = fn(&Shape, &mut Chains);

/// Add, delete, add: the delete is valid whether or not the table exists,
/// and the whole replace is one transaction.
fn replace_the_table(batch: &mut Batch<'static>) {
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    batch.add(NfListObject::Table(table()));
}

/// The named counter of refused verify probes (see [`refuse_the_rest`]).
fn add_the_verify_counter(batch: &mut Batch<'static>) {
    batch.add(NfListObject::Counter(CounterObject {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: REFUSED_COUNTER.into(),
        handle: None,
        packets: None,
        bytes: None,
    }));
}

/// The answer sets (timeout), the `known` sets and the literal sets
/// (interval, filled from the profile in the session shape), all of
/// `address . protocol . port`, in both shapes.
fn add_the_sets(batch: &mut Batch<'static>, shape: &Shape) {
    let allow = shape.allow;
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
    // The answer sets of the names' port ranges: addresses only, the rules
    // match the range (see learned.rs for why not one interval set).
    for &(proto, ports) in &shape.ranges {
        for (v6, known) in [(false, false), (true, false), (false, true), (true, true)] {
            batch.add(NfListObject::Set(Box::new(Set {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: range_set_name(v6, known, proto, ports).into(),
                handle: None,
                set_type: SetTypeValue::Single(if v6 { SetType::Ipv6Addr } else { SetType::Ipv4Addr }),
                policy: None,
                flags: (!known).then(|| HashSet::from([SetFlag::Timeout])),
                elem: None,
                timeout: None,
                gc_interval: None,
                size: None,
                comment: None,
            })));
        }
    }
}

/// DNS answers remembered from before this replace (session shape only).
fn put_back_remembered_answers(batch: &mut Batch<'static>, shape: &Shape) {
    if shape.allow.is_none() {
        return;
    }
    for (set, entries) in by_allow_set(&shape.inputs.learned) {
        let elems: Vec<_> = entries.into_iter().map(learned_elem).collect();
        batch.add(NfListObject::Element(Element {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: set.into(),
            elem: Cow::Owned(elems),
        }));
    }
    add_known(batch, &shape.inputs.known);
}

/// Loopback to 127.0.0.0/8 and ::1, by address: redirected packets keep
/// the output interface routed before nat. These stay out of
/// `postrouting`, where the real device is known: a socket bound to
/// another interface (SO_BINDTODEVICE, unprivileged) sends a loopback
/// destination out of that interface, e.g. through the tunnel.
fn loopback_by_address() -> [Vec<Statement<'static>>; 2] {
    [
        vec![
            eq(
                payload("ip", "daddr"),
                net((Ipv4Addr::new(127, 0, 0, 0).into(), 8)),
            ),
            accept(),
        ],
        vec![eq(payload("ip6", "daddr"), s("::1")), accept()],
    ]
}

/// Loopback, by interface and by address (see [`loopback_by_address`]).
fn loopback(_: &Shape, chains: &mut Chains) {
    chains
        .output
        .push(vec![eq(meta(MetaKey::Oifname), s("lo")), accept()]);
    for rule in loopback_by_address() {
        chains.output.push(rule);
    }
    chains
        .input
        .push(vec![eq(meta(MetaKey::Iifname), s("lo")), accept()]);
}

/// The tunnel's own UDP (or its TCP to the relay): mark and address and
/// port out; the endpoint's replies in (address and port, conntrack
/// `established`).
fn tunnel_udp(shape: &Shape, chains: &mut Chains) {
    let outer = shape.lockdown.endpoint_protocol.nft_name();
    tunnel_flow(shape, chains, shape.endpoint, outer);
    // A session over TCP trying UDP again: the gateway's UDP beside it,
    // for as long as the probe lasts.
    if let Some(probe) = shape.lockdown.udp_probe {
        let probe = SocketAddr::new(canonical(probe.ip()), probe.port());
        tunnel_flow(shape, chains, probe, "udp");
    }
}

/// One flow of the tunnel's own: marked `outer` to `endpoint` out, its
/// replies in.
fn tunnel_flow(shape: &Shape, chains: &mut Chains, endpoint: SocketAddr, outer: &'static str) {
    chains.output.push(vec![
        eq(meta(MetaKey::Mark), num(shape.lockdown.fwmark)),
        eq(payload(ip(&endpoint.ip()), "daddr"), s(endpoint.ip().to_string())),
        eq(payload(outer, "dport"), num(endpoint.port())),
        accept(),
    ]);
    chains.input.push(vec![
        eq(payload(ip(&endpoint.ip()), "saddr"), s(endpoint.ip().to_string())),
        eq(payload(outer, "sport"), num(endpoint.port())),
        is_in(ct_state(), set_of(vec![s("established")])),
        accept(),
    ]);
}

/// Path MTU errors about the tunnel's own UDP (from any router on the
/// path, which conntrack relates to that flow only): without them a link
/// smaller than ours is a black hole for full-sized datagrams. See
/// tunnel.rs for the outer don't-fragment policy that goes with it.
fn tunnel_path_mtu_errors(shape: &Shape, chains: &mut Chains) {
    let endpoint = shape.endpoint;
    let too_big = if endpoint.is_ipv4() {
        vec![
            eq(payload("icmp", "type"), s("destination-unreachable")),
            eq(payload("icmp", "code"), s("frag-needed")),
        ]
    } else {
        vec![eq(payload("icmpv6", "type"), s("packet-too-big"))]
    };
    // From the link only: that path is outside the tunnel, so such an
    // error arriving through it (the gateway's) says nothing about it.
    chains.input.push(
        std::iter::once(ne(meta(MetaKey::Iifname), s(shape.tun)))
            .chain(too_big)
            .chain([
                is_in(ct_state(), set_of(vec![s("related")])),
                eq(flow_original_daddr(endpoint.ip()), s(endpoint.ip().to_string())),
                accept(),
            ])
            .collect(),
    );
}

/// DHCP and DHCPv6 keep the lease: only to the link (broadcast, on-link
/// servers, the DHCPv6 multicast group, link-local), never through the
/// tunnel, and only replies from there (see [`dhcp_rules`]).
fn dhcp(shape: &Shape, chains: &mut Chains) {
    let (dhcp_out, dhcp_in) = dhcp_rules(shape.tun, &shape.inputs.on_link);
    chains.output.rules.extend(dhcp_out);
    chains.input.rules.extend(dhcp_in);
}

/// IPv6 neighbour discovery, on-link only.
fn neighbour_discovery(shape: &Shape, chains: &mut Chains) {
    chains.output.push(vec![
        icmpv6_types(&["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]),
        on_link(),
        to_the_link_v6(&shape.inputs.on_link),
        accept(),
    ]);
    chains.input.push(vec![
        icmpv6_types(&[
            "nd-router-advert",
            "nd-neighbor-solicit",
            "nd-neighbor-advert",
            "nd-redirect",
        ]),
        on_link(),
        accept(),
    ]);
}

/// TCP through the tunnel announces no larger segments than the route
/// there carries (the tunnel's MTU), for both ends of the connection
/// (session shape only).
fn tunnel_mss_clamp(shape: &Shape, chains: &mut Chains) {
    if shape.allow.is_none() {
        return;
    }
    chains.output.push(vec![
        eq(meta(MetaKey::Oifname), s(shape.tun)),
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

/// The pinned resolvers, through the tunnel only, before DNS is refused.
/// With the stub, only its own (marked) packets: the redirect is NAT,
/// decided once per conntrack entry, so a local program that binds the
/// stub's last upstream source port meets the stub's unredirected entry
/// and would otherwise reach the pinned resolver past the stub.
fn pinned_resolvers(shape: &Shape, chains: &mut Chains) {
    let Some(allow) = shape.allow else { return };
    for server in shape.pinned_servers(allow) {
        let mut rule = vec![eq(meta(MetaKey::Oifname), s(shape.tun))];
        if let Some(redirect) = &allow.dns_redirect {
            rule.push(eq(meta(MetaKey::Mark), num(redirect.stub_mark)));
        }
        rule.extend([
            eq(payload(ip(&server), "daddr"), s(server.to_string())),
            tcp_or_udp(),
            eq(payload("th", "dport"), num(53u32)),
            accept(),
        ]);
        chains.output.push(rule);
    }
}

/// DNS anywhere else, and DNS-over-TLS/QUIC anywhere: refused before any
/// allowlist or LAN rule can accept it.
fn dns_refused_elsewhere(_: &Shape, chains: &mut Chains) {
    chains.output.push(vec![
        tcp_or_udp(),
        is_in(payload("th", "dport"), set_of(vec![num(53u32), num(853u32)])),
        refuse(),
    ]);
}

/// (family, answer set, literal set, known set) of the families the
/// session shape opens: IPv4, and IPv6 when the tunnel has an address.
fn allowed_families(allow: &Allowlist) -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    let mut families = vec![("ip", ALLOW4, ALLOW4_NETS, KNOWN4)];
    if allow.tunnel_has_ipv6 {
        families.push(("ip6", ALLOW6, ALLOW6_NETS, KNOWN6));
    }
    families
}

/// New flows through the tunnel to what the allowlist holds: the answer
/// sets, then the literal sets (session shape only).
fn allowlist(shape: &Shape, chains: &mut Chains) {
    let Some(allow) = shape.allow else { return };
    for (family, dynamic, literal, _) in allowed_families(allow) {
        for set in [dynamic, literal] {
            chains.output.push(vec![
                eq(meta(MetaKey::Oifname), s(shape.tun)),
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
        // A name's port range: its answers, on the ports of the range.
        for &(proto, ports) in &shape.ranges {
            chains.output.push(vec![
                eq(meta(MetaKey::Oifname), s(shape.tun)),
                eq(meta(MetaKey::L4proto), num(proto)),
                eq(payload("th", "dport"), port_range(ports)),
                is_in(
                    payload(family, "daddr"),
                    s(format!(
                        "@{}",
                        range_set_name(family == "ip6", false, proto, ports)
                    )),
                ),
                accept(),
            ]);
        }
    }
}

/// Established flows pass only while the allowlist in force still holds
/// what admitted them: the far end's address, protocol and port must be in
/// a literal set or among the still-allowed answers (`known*`, which
/// outlive a TTL but not a narrowing). Only flows we opened get this far
/// (input drops new connections), so on the way out the far end is the
/// destination, on the way in the source. (nft cannot put `ct original
/// proto-dst` in a concatenation.) Session shape only.
fn established_flows_still_allowed(shape: &Shape, chains: &mut Chains) {
    let Some(allow) = shape.allow else { return };
    for (family, _, literal, known) in allowed_families(allow) {
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
            chains.output.push(vec![
                eq(meta(MetaKey::Oifname), s(shape.tun)),
                is_in(ct_state(), set_of(vec![s("established")])),
                far_end("daddr", "dport"),
                accept(),
            ]);
            chains.input.push(vec![
                eq(meta(MetaKey::Iifname), s(shape.tun)),
                is_in(ct_state(), set_of(vec![s("established")])),
                far_end("saddr", "sport"),
                accept(),
            ]);
        }
        for &(proto, ports) in &shape.ranges {
            let known_set = s(format!(
                "@{}",
                range_set_name(family == "ip6", true, proto, ports)
            ));
            chains.output.push(vec![
                eq(meta(MetaKey::Oifname), s(shape.tun)),
                is_in(ct_state(), set_of(vec![s("established")])),
                eq(meta(MetaKey::L4proto), num(proto)),
                eq(payload("th", "dport"), port_range(ports)),
                is_in(payload(family, "daddr"), known_set.clone()),
                accept(),
            ]);
            chains.input.push(vec![
                eq(meta(MetaKey::Iifname), s(shape.tun)),
                is_in(ct_state(), set_of(vec![s("established")])),
                eq(meta(MetaKey::L4proto), num(proto)),
                eq(payload("th", "sport"), port_range(ports)),
                is_in(payload(family, "saddr"), known_set),
                accept(),
            ]);
        }
    }
}

/// The gateway-enforced kind: any TCP/UDP into the tunnel and its replies
/// (the DNS refusal comes first); the gateway enforces the allowlist.
fn gateway_enforces_the_allowlist(shape: &Shape, chains: &mut Chains) {
    let Some(allow) = shape.allow else { return };
    if !allow.gateway_enforces {
        return;
    }
    for (family, ..) in allowed_families(allow) {
        let nfproto = eq(
            meta(MetaKey::Nfproto),
            s(if family == "ip6" { "ipv6" } else { "ipv4" }),
        );
        chains.output.push(vec![
            eq(meta(MetaKey::Oifname), s(shape.tun)),
            nfproto.clone(),
            tcp_or_udp(),
            accept(),
        ]);
        chains.input.push(vec![
            eq(meta(MetaKey::Iifname), s(shape.tun)),
            nfproto,
            tcp_or_udp(),
            is_in(ct_state(), set_of(vec![s("established")])),
            accept(),
        ]);
    }
}

/// ICMP errors about those flows (path MTU, unreachable) come back through
/// the tunnel; conntrack marks them related only when they quote a flow it
/// tracks (session shape only).
fn icmp_errors_about_flows(shape: &Shape, chains: &mut Chains) {
    if shape.allow.is_none() {
        return;
    }
    // Not those about the tunnel's own UDP, whose path is the link's (see
    // tunnel_path_mtu_errors): the endpoint's family's rule leaves out
    // flows to the endpoint's address.
    let endpoint = shape.endpoint;
    for (errors, v6) in icmp_errors().into_iter().zip([false, true]) {
        let mut rule = vec![
            eq(meta(MetaKey::Iifname), s(shape.tun)),
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
        chains.input.push(rule);
    }
}

/// The pinned resolvers' answers, through the tunnel (session shape only).
fn pinned_resolver_answers(shape: &Shape, chains: &mut Chains) {
    let Some(allow) = shape.allow else { return };
    for server in shape.pinned_servers(allow) {
        chains.input.push(vec![
            eq(meta(MetaKey::Iifname), s(shape.tun)),
            eq(payload(ip(&server), "saddr"), s(server.to_string())),
            tcp_or_udp(),
            eq(payload("th", "sport"), num(53u32)),
            established(),
            accept(),
        ]);
    }
}

/// The LAN under `allow_lan`, outside the tunnel only: a LAN range with no
/// route in the main table (link-local, SSDP, or a socket bound to the
/// tunnel) would otherwise go through the tunnel to the gateway. In only
/// when source *and* destination are LAN addresses.
fn lan(shape: &Shape, chains: &mut Chains) {
    if !shape.lockdown.allow_lan {
        return;
    }
    for (family, v6) in [("ip", false), ("ip6", true)] {
        let nets: Vec<Expression<'static>> = shape
            .inputs
            .lan
            .iter()
            .filter(|(a, _)| a.is_ipv6() == v6)
            .map(|&n| net(n))
            .collect();
        if nets.is_empty() {
            continue;
        }
        chains.output.push(vec![
            ne(meta(MetaKey::Oifname), s(shape.tun)),
            is_in(payload(family, "daddr"), set_of(nets.clone())),
            accept(),
        ]);
        chains.input.push(vec![
            ne(meta(MetaKey::Iifname), s(shape.tun)),
            is_in(payload(family, "saddr"), set_of(nets.clone())),
            is_in(payload(family, "daddr"), set_of(nets)),
            accept(),
        ]);
    }
}

/// Whatever is left goes out loudly refused (TCP with a reset, the rest
/// with ICMP admin-prohibited); verify's probes are counted first.
fn refuse_the_rest(_: &Shape, chains: &mut Chains) {
    chains.output.push(vec![
        eq(meta(MetaKey::Mark), num(VERIFY_MARK)),
        Statement::Counter(Counter::Named(REFUSED_COUNTER.into())),
        refuse(),
    ]);
    chains.output.push(vec![refuse()]);
    chains.refuse.push(vec![
        eq(meta(MetaKey::L4proto), s("tcp")),
        Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
    ]);
    chains.refuse.push(vec![Statement::Reject(Some(Reject::new(
        Some(RejectType::ICMPX),
        Some(RejectCode::AdminProhibited),
    )))]);
}

/// The same rules once more where the real output device is known:
/// another table's nat (a `dnat` after our filter, as Docker and
/// kube-proxy do) or route chain (a new mark) can send a packet that
/// `output` saw going to `lo` or the tunnel somewhere else. `reject` is
/// not allowed in postrouting, so refusals drop here; verify's counter
/// stays in `output` alone. First, every flow of the session is tagged
/// (see SESSION_CT_BIT); a packet dropped below leaves no tracked flow
/// behind anyway.
fn postrouting_repeats_output(output: &ChainSpec) -> ChainSpec {
    let mut postrouting = ChainSpec::new(POSTROUTING, Some((NfHook::Postrouting, NfChainType::Filter, 0)));
    postrouting.push(vec![Statement::Mangle(nftables::stmt::Mangle {
        key: ct_mark(),
        value: Expression::BinaryOperation(Box::new(nftables::expr::BinaryOperation::OR(vec![
            ct_mark(),
            num(SESSION_CT_BIT),
        ]))),
    })]);
    let loopback_by_address = loopback_by_address();
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
    postrouting
}

/// Room for the stub: every DNS packet but the stub's own to the stub (a
/// nat chain before filtering; session shape with the stub only).
fn dns_redirect_chain(shape: &Shape) -> Option<ChainSpec> {
    let redirect = shape.allow.and_then(|a| a.dns_redirect)?;
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
    Some(nat)
}

/// Every chain, then every chain's rules (base filter chains drop by
/// policy; the nat chain accepts).
fn add_chains(batch: &mut Batch<'static>, chains: &[ChainSpec]) {
    for chain in chains {
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
    for chain in chains {
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
}

/// A port, or a range of ports, as the right side of a match.
fn port_range(ports: PortRange) -> Expression<'static> {
    if ports.is_single() {
        num(ports.first)
    } else {
        Expression::Range(Box::new(nftables::expr::Range {
            range: [num(ports.first), num(ports.last)],
        }))
    }
}

/// The profile's literal networks as interval-set elements, without
/// overlaps (nft refuses them) for one address family.
///
/// Ports and ranges of several entries can overlap (a /24 on 50000-60000
/// and one address of it on 55000): the ports are cut at every entry's
/// boundaries into pieces no entry splits, each piece gets the networks of
/// the entries holding it (less those inside another), and neighbouring
/// pieces with the same networks are joined again. So no two elements
/// share an address and a port.
fn static_elements(allow: &Allowlist, v6: bool) -> Vec<Expression<'static>> {
    let mut elems = Vec::new();
    for proto in [TCP, UDP] {
        let entries: Vec<((IpAddr, u8), PortRange)> = allow
            .rules
            .iter()
            .filter(|e| e.net.0.is_ipv6() == v6)
            .flat_map(|e| {
                let list = if proto == TCP { &e.tcp } else { &e.udp };
                list.iter().map(move |&r| (e.net, r))
            })
            .collect();
        for (ports, nets) in port_pieces(&entries) {
            for n in nets {
                elems.push(concat(vec![net(n), num(proto), port_range(ports)]));
            }
        }
    }
    elems
}

/// The pieces of the port space `entries` cover, each with its networks
/// (normalized), neighbours with the same networks joined; in port order.
pub(super) fn port_pieces(entries: &[((IpAddr, u8), PortRange)]) -> Vec<(PortRange, Vec<(IpAddr, u8)>)> {
    // Every place a piece may start: an entry's first port, or the port
    // after its last.
    let mut cuts: BTreeSet<u32> = BTreeSet::new();
    for &(_, r) in entries {
        cuts.insert(u32::from(r.first));
        cuts.insert(u32::from(r.last) + 1);
    }
    let cuts: Vec<u32> = cuts.into_iter().collect();
    let mut pieces: Vec<(PortRange, Vec<(IpAddr, u8)>)> = Vec::new();
    for pair in cuts.windows(2) {
        let (first, last) = (pair[0], pair[1] - 1);
        let (Ok(first), Ok(last)) = (u16::try_from(first), u16::try_from(last)) else {
            continue;
        };
        let nets: Vec<(IpAddr, u8)> = entries
            .iter()
            .filter(|(_, r)| r.first <= first && last <= r.last)
            .map(|&(n, _)| n)
            .collect();
        if nets.is_empty() {
            continue;
        }
        let mut nets = normalize_nets(nets);
        nets.sort();
        match pieces.last_mut() {
            Some((prev, prev_nets)) if u32::from(prev.last) + 1 == u32::from(first) && *prev_nets == nets => {
                prev.last = last;
            }
            _ => pieces.push((PortRange { first, last }, nets)),
        }
    }
    pieces
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
