//! Expression and statement helpers for the `nftables` crate's JSON
//! schema: small named pieces the builders are made of.
//!
//! Pure functions with no state; they never decide a verdict on their own
//! beyond what their name says.

use std::borrow::Cow;
use std::net::IpAddr;

use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem, CT,
};
use nftables::schema::Table;
use nftables::stmt::{JumpTarget, Match, Operator, Statement};
use nftables::types::NfFamily;

use super::{REFUSE, TABLE};

/// An IPv4-mapped IPv6 address (::ffff:a.b.c.d) travels as IPv4: match it
/// as such.
pub(super) fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

pub(super) fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    }
}

pub(super) fn s(text: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(text.into()))
}

pub(super) fn num(n: impl Into<u32>) -> Expression<'static> {
    Expression::Number(n.into())
}

pub(super) fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

pub(super) fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

pub(super) fn ct_mark() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: "mark".into(),
        family: None,
        dir: None,
    }))
}

pub(super) fn ct_state() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: "state".into(),
        family: None,
        dir: None,
    }))
}

pub(super) fn concat(parts: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts))
}

/// An address, or a prefix when shorter than the full length.
pub(super) fn net((addr, len): (IpAddr, u8)) -> Expression<'static> {
    let full = if addr.is_ipv4() { 32 } else { 128 };
    if len >= full {
        s(addr.to_string())
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(s(addr.to_string())),
            len: u32::from(len),
        }))
    }
}

pub(super) fn set_of(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

pub(super) fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

pub(super) fn ne(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

pub(super) fn is_in(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::IN,
    })
}

pub(super) fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

pub(super) fn refuse() -> Statement<'static> {
    Statement::Jump(JumpTarget {
        target: REFUSE.into(),
    })
}

pub(super) fn ip(addr: &IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "ip"
    } else {
        "ip6"
    }
}

pub(super) fn tcp_or_udp() -> Statement<'static> {
    is_in(meta(MetaKey::L4proto), set_of(vec![s("tcp"), s("udp")]))
}

/// ICMP and ICMPv6 error messages (what path MTU discovery and
/// unreachable reports are made of).
pub(super) fn icmp_errors() -> [Statement<'static>; 2] {
    let types = |protocol: &'static str, names: &[&'static str]| {
        is_in(
            payload(protocol, "type"),
            set_of(names.iter().map(|t| s(*t)).collect()),
        )
    };
    [
        types(
            "icmp",
            &["destination-unreachable", "time-exceeded", "parameter-problem"],
        ),
        types(
            "icmpv6",
            &[
                "destination-unreachable",
                "packet-too-big",
                "time-exceeded",
                "parameter-problem",
            ],
        ),
    ]
}

pub(super) fn established() -> Statement<'static> {
    is_in(ct_state(), set_of(vec![s("established"), s("related")]))
}

pub(super) fn on_link() -> Statement<'static> {
    eq(payload("ip6", "hoplimit"), num(255u32))
}

/// Where neighbour discovery may go: link-local addresses, link-scope
/// multicast and the directly connected subnets. Hop limit 255 alone does
/// not keep a message on the link: a router forwards it like any other
/// packet (only the receiver refuses it as neighbour discovery), so a raw
/// socket could otherwise reach any IPv6 host outside the tunnel with it.
pub(super) fn to_the_link_v6(on_link: &[(IpAddr, u8)]) -> Statement<'static> {
    let mut nets = vec![
        net((
            IpAddr::V6(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)),
            10,
        )),
        net((
            IpAddr::V6(std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0)),
            16,
        )),
    ];
    nets.extend(on_link.iter().filter(|(a, _)| a.is_ipv6()).map(|&n| net(n)));
    is_in(payload("ip6", "daddr"), set_of(nets))
}

pub(super) fn icmpv6_types(types: &[&str]) -> Statement<'static> {
    is_in(
        payload("icmpv6", "type"),
        set_of(types.iter().map(|t| s(*t)).collect()),
    )
}
