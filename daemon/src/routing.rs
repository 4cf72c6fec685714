//! Addresses, MTU, link state and the full-tunnel policy routing of the
//! tunnel interface.
//!
//! This module owns, for one session: the tunnel's addresses, its MTU and its
//! "up" flag; a default route through the tunnel in our own table (IPv4
//! always, IPv6 when the tunnel has an IPv6 address); two policy rules per
//! such family, in wg-quick's full-tunnel shape; and
//! `net.ipv4.conf.all.src_valid_mark` of the current network namespace.
//!
//! ```text
//! 5190: from all lookup main suppress_prefixlength 0 proto 83
//! 5191: not from all fwmark M lookup T proto 83
//! table T: default dev IF proto 83 scope link    (and ::/0 dev IF proto 83 metric 1024)
//! ```
//!
//! Unmarked traffic takes the tunnel; the tunnel's own UDP socket carries the
//! fwmark `M` and so skips table `T` and uses the main table; the suppress rule
//! keeps the main table's more specific routes (the LAN, the endpoint's own
//! subnet) ahead of `T`, as wg-quick does. The firewall, not this module,
//! decides what may actually leave.
//!
//! What it must never do: touch any rule, route, address or link setting that
//! it did not add or change itself. [`apply`] records each change as it makes
//! it and undoes exactly those (in reverse order) if a later step fails;
//! [`Routes::remove`] undoes exactly the recorded changes and nothing else.
//! It never creates or deletes links (the tunnel module owns the TUN device),
//! never flushes a table, and never deletes a rule by priority alone:
//! [`remove_stale`] deletes only rules that have our exact priority *and* our
//! exact shape (table, fwmark, inversion, suppress length) and our protocol
//! number [`ROUTE_PROTOCOL`], which every delete request names as well.
//!
//! Every call opens its own rtnetlink connection and closes it when done.
//! All of this is per network namespace: the lab runs it inside namespaces.

use std::fmt;
use std::io;

use crate::io_reason;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::{Stream, StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{AddressMessageBuilder, Handle, IpVersion, LinkUnspec, RouteMessageBuilder};

/// Priority of the `lookup main suppress_prefixlength 0` rule. It must come
/// before the fwmark rule (smaller number), like wg-quick's pair. Chosen below
/// Tailscale's 5210–5270 block and far ahead of the main table's 32766.
pub const SUPPRESS_RULE_PRIORITY: u32 = 5190;
/// Priority of the `not fwmark M lookup T` rule.
pub const MARK_RULE_PRIORITY: u32 = 5191;

/// Protocol number ("S") that our rules and routes carry; `ip rule` and
/// `ip route` show it as `proto 83`. The kernel matches a delete request
/// against the first rule (or route) whose *given* attributes agree and treats
/// the others as wildcards, so every delete names this protocol: without it,
/// deleting our `lookup main suppress_prefixlength 0` could remove someone
/// else's `iif lo lookup main suppress_prefixlength 0` at the same priority.
/// [`remove_stale`] also requires it before it calls a rule ours.
pub const ROUTE_PROTOCOL: u8 = 83;

/// Metric of the IPv6 default route (the kernel's default, made explicit so
/// the delete request names it).
const IPV6_ROUTE_METRIC: u32 = 1024;

/// The sysctl that lets the reverse-path check use the fwmark (wg-quick sets
/// it too); per network namespace.
const SRC_VALID_MARK: &str = "/proc/sys/net/ipv4/conf/all/src_valid_mark";

const RT_TABLE_MAIN: u32 = 254;
/// Tables a session must never use as its own: unspec, compat, default, main,
/// local.
const RESERVED_TABLES: [u32; 5] = [0, 252, 253, 254, 255];

/// What [`apply`] should set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// The tunnel interface; it must already exist.
    pub interface: String,
    /// Tunnel addresses with their prefix lengths, IPv4 and/or IPv6.
    pub addresses: Vec<(IpAddr, u8)>,
    pub mtu: u32,
    /// The mark the tunnel's own UDP socket carries (SO_MARK).
    pub fwmark: u32,
    /// Our routing table; not one of the kernel's (0, 252–255).
    pub table: u32,
    /// The `src_valid_mark` value [`Routes::remove`] gives back, as the
    /// caller remembered it from before the session (after a crash the
    /// kernel holds the crashed run's 1). `None`: the value found now.
    pub src_valid_mark_before: Option<String>,
}

/// A routing step that failed. Displays as one sentence, for example
/// `could not add IPv4 route default dev sg0 table 21319: File exists`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    #[error("invalid routing configuration: {0}")]
    InvalidConfig(String),
    #[error("could not change routing: no tokio runtime is running")]
    NoRuntime,
    #[error("could not open a netlink route socket: {0}")]
    Socket(String),
    #[error("interface {0} does not exist")]
    NoSuchInterface(String),
    /// The kernel (or the netlink layer) refused `action`; `errno` is the
    /// kernel's error number when there is one.
    #[error("could not {action}: {reason}")]
    Netlink {
        action: String,
        reason: String,
        errno: Option<i32>,
    },
    #[error("could not {action} {path}: {reason}")]
    Sysctl {
        action: String,
        path: String,
        reason: String,
    },
}

impl RoutingError {
    /// The kernel's error number, for a failed netlink request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RoutingError::Netlink { errno, .. } => *errno,
            _ => None,
        }
    }
}

/// What [`apply`] set up; hand it back to [`Routes::remove`] to undo exactly
/// that. Dropping it leaves everything in place (the rules can still be found
/// by [`remove_stale`]).
#[derive(Debug)]
#[must_use = "dropping Routes leaves the routes and rules in place; call remove()"]
pub struct Routes {
    interface: String,
    index: u32,
    /// Changes in the order they were made.
    done: Vec<Change>,
}

impl Routes {
    /// The tunnel interface these routes belong to.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Undoes every recorded change, newest first. Things that are already
    /// gone (the interface deleted with its addresses and routes, a rule
    /// removed by hand) count as removed. Every step is tried even if an
    /// earlier one fails; the first failure is returned.
    pub async fn remove(self) -> Result<(), RoutingError> {
        let Routes {
            interface,
            index,
            done,
        } = self;
        let result = undo(done, None).await;
        match &result {
            Ok(()) => tracing::info!("removed the routes of {interface} (index {index})"),
            Err(e) => tracing::warn!("removing the routes of {interface} was incomplete: {e}"),
        }
        result
    }
}

/// Puts the addresses on the interface, sets its MTU, brings it up, adds the
/// default route(s) to `cfg.table` and the policy rules, and sets
/// `src_valid_mark`. On failure, undoes what it had already done and returns
/// the error of the step that failed.
///
/// Fails with "File exists" if our rules are already there (a crashed run):
/// call [`remove_stale`] first when resuming. An address that is already on
/// the interface is left alone and not removed later.
pub async fn apply(cfg: &RouteConfig) -> Result<Routes, RoutingError> {
    validate(cfg)?;
    let mut nl = Netlink::open()?;
    let mut done = Vec::new();
    match apply_steps(&mut nl, cfg, &mut done).await {
        Ok(index) => {
            tracing::info!(
                "routed everything through {} (table {}, fwmark {:#x}{})",
                cfg.interface,
                cfg.table,
                cfg.fwmark,
                if has_ipv6(cfg) {
                    ", IPv4 and IPv6"
                } else {
                    ", IPv4 only"
                }
            );
            Ok(Routes {
                interface: cfg.interface.clone(),
                index,
                done,
            })
        }
        Err(e) => {
            if !done.is_empty() {
                if let Err(undo_err) = undo(done, Some(nl)).await {
                    tracing::warn!("could not fully undo a failed routing setup: {undo_err}");
                }
            }
            Err(e)
        }
    }
}

/// Deletes the policy rules a previous run left behind (it crashed, or its
/// [`Routes`] was lost): for IPv4 and IPv6, the rules at
/// [`SUPPRESS_RULE_PRIORITY`] and [`MARK_RULE_PRIORITY`] that have exactly the
/// shape [`apply`] gives them for this `fwmark` and `table`. Nothing else is
/// touched. Routes in `table` went away with the old TUN device;
/// `src_valid_mark` stays as it is: the caller hands the value from before
/// the session to the next [`apply`] (`RouteConfig::src_valid_mark_before`),
/// whose undo gives it back.
pub async fn remove_stale(fwmark: u32, table: u32) -> Result<(), RoutingError> {
    validate_mark_table(fwmark, table)?;
    let mut nl = Netlink::open()?;
    let mut removed = 0usize;
    for family in [Family::V4, Family::V6] {
        let rules: Vec<RuleMessage> = nl
            .handle
            .rule()
            .get(family.ip_version())
            .execute()
            .try_collect()
            .await
            .map_err(|e| netlink_error(format!("list the {} rules", family.name()), e))?;
        for rule in rules.into_iter().filter(|r| is_our_rule(r, fwmark, table)) {
            let action = format!("delete stale {}", describe_rule_message(&rule));
            match nl.send(RouteNetlinkMessage::DelRule(rule), NLM_F_ACK).await {
                Ok(()) => {
                    tracing::info!("{action}");
                    removed += 1;
                }
                Err(e) if gone(&e) => {}
                Err(e) => return Err(netlink_error(action, e)),
            }
        }
    }
    if removed > 0 {
        tracing::warn!("removed {removed} policy rule(s) left behind by an earlier run");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The steps.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
    fn address_family(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }
    fn ip_version(self) -> IpVersion {
        match self {
            Family::V4 => IpVersion::V4,
            Family::V6 => IpVersion::V6,
        }
    }
    fn default_prefix(self) -> &'static str {
        match self {
            Family::V4 => "default",
            Family::V6 => "::/0",
        }
    }
}

/// One change made by [`apply`], with what it takes to undo it.
#[derive(Debug)]
enum Change {
    Address { message: AddressMessage, what: String },
    Mtu { index: u32, old: u32, what: String },
    Up { index: u32, what: String },
    Route { message: RouteMessage, what: String },
    Rule { message: RuleMessage, what: String },
    SrcValidMark { old: String },
}

async fn apply_steps(
    nl: &mut Netlink,
    cfg: &RouteConfig,
    done: &mut Vec<Change>,
) -> Result<u32, RoutingError> {
    let ifname = cfg.interface.as_str();
    let link = nl.link_by_name(ifname).await?;
    let index = link.header.index;
    let old_mtu = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    let was_up = link.header.flags.contains(LinkFlags::Up);

    // MTU first: IPv6 addresses need an MTU of at least 1280.
    if old_mtu != Some(cfg.mtu) {
        let what = format!("the MTU of {ifname}");
        let message = LinkUnspec::new_with_index(index).mtu(cfg.mtu).build();
        nl.send(RouteNetlinkMessage::SetLink(message), NLM_F_ACK)
            .await
            .map_err(|e| netlink_error(format!("set {what} to {}", cfg.mtu), e))?;
        if let Some(old) = old_mtu {
            done.push(Change::Mtu { index, old, what });
        }
    }

    for &(addr, prefix) in &cfg.addresses {
        let message = address_message(index, addr, prefix);
        let what = format!("address {addr}/{prefix} on {ifname}");
        match nl
            .send(
                RouteNetlinkMessage::NewAddress(message.clone()),
                NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
        {
            Ok(()) => done.push(Change::Address { message, what }),
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => {
                tracing::debug!("{what} was already there; leaving it to its owner");
            }
            Err(e) => return Err(netlink_error(format!("add {what}"), e)),
        }
    }

    if !was_up {
        let message = LinkUnspec::new_with_index(index).up().build();
        nl.send(RouteNetlinkMessage::SetLink(message), NLM_F_ACK)
            .await
            .map_err(|e| netlink_error(format!("bring {ifname} up"), e))?;
        done.push(Change::Up {
            index,
            what: ifname.to_string(),
        });
    }

    // Before the rules, so replies to the marked tunnel socket pass the
    // reverse-path check from the first packet on.
    let found = read_sysctl(SRC_VALID_MARK)?;
    if found != "1" {
        write_sysctl(SRC_VALID_MARK, "1")?;
    }
    let old = cfg.src_valid_mark_before.clone().unwrap_or(found);
    if old != "1" {
        done.push(Change::SrcValidMark { old });
    }

    let mut families = vec![Family::V4];
    if has_ipv6(cfg) {
        families.push(Family::V6);
    }
    for family in families {
        // The route first, so the rules never point at an empty table.
        let message = default_route_message(family, index, cfg.table);
        let what = format!(
            "{} route {} dev {ifname} table {}",
            family.name(),
            family.default_prefix(),
            cfg.table
        );
        nl.send(
            RouteNetlinkMessage::NewRoute(message.clone()),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .await
        .map_err(|e| netlink_error(format!("add {what}"), e))?;
        done.push(Change::Route { message, what });

        for message in [
            suppress_rule_message(family),
            mark_rule_message(family, cfg.fwmark, cfg.table),
        ] {
            let what = describe_rule_message(&message);
            nl.send(
                RouteNetlinkMessage::NewRule(message.clone()),
                NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
            .map_err(|e| netlink_error(format!("add {what}"), e))?;
            done.push(Change::Rule { message, what });
        }
    }
    Ok(index)
}

/// Undoes `done` newest first, trying every step; returns the first error.
/// Uses `nl` if given, else opens a connection of its own.
async fn undo(done: Vec<Change>, nl: Option<Netlink>) -> Result<(), RoutingError> {
    let mut nl = match nl {
        Some(nl) => Ok(nl),
        None => Netlink::open(),
    };
    let mut first_error: Option<RoutingError> = None;
    for change in done.into_iter().rev() {
        let result = match change {
            Change::SrcValidMark { old } => write_sysctl(SRC_VALID_MARK, &old),
            change => match &mut nl {
                Ok(nl) => undo_netlink(nl, change).await,
                Err(e) => Err(e.clone()),
            },
        };
        if let Err(e) = result {
            tracing::warn!("{e}");
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn undo_netlink(nl: &mut Netlink, change: Change) -> Result<(), RoutingError> {
    let (request, action) = match change {
        Change::Rule { message, what } => (RouteNetlinkMessage::DelRule(message), format!("delete {what}")),
        Change::Route { message, what } => (RouteNetlinkMessage::DelRoute(message), format!("delete {what}")),
        Change::Up { index, what } => (
            RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(index).down().build()),
            format!("bring {what} down again"),
        ),
        Change::Address { message, what } => {
            (RouteNetlinkMessage::DelAddress(message), format!("remove {what}"))
        }
        Change::Mtu { index, old, what } => (
            RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(index).mtu(old).build()),
            format!("set {what} back to {old}"),
        ),
        Change::SrcValidMark { .. } => return Ok(()),
    };
    match nl.send(request, NLM_F_ACK).await {
        Ok(()) => Ok(()),
        Err(e) if gone(&e) => {
            tracing::debug!("{action}: already gone");
            Ok(())
        }
        Err(e) => Err(netlink_error(action, e)),
    }
}

// ---------------------------------------------------------------------------
// Messages (pure, unit-tested).

fn has_ipv6(cfg: &RouteConfig) -> bool {
    cfg.addresses.iter().any(|(a, _)| a.is_ipv6())
}

fn address_message(index: u32, addr: IpAddr, prefix: u8) -> AddressMessage {
    match addr {
        IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(a, prefix)
            .build(),
        IpAddr::V6(a) => {
            let mut m = AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(a, prefix)
                .build();
            // No duplicate address detection: usable at once, as on any
            // point-to-point tunnel.
            m.header.flags = AddressHeaderFlags::Nodad;
            m.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
            m
        }
    }
}

/// `default dev IF table T proto 83 scope link` (the scope `ip route add`
/// gives a route without gateway), or `::/0 dev IF table T proto 83 metric
/// 1024`.
fn default_route_message(family: Family, index: u32, table: u32) -> RouteMessage {
    let protocol = RouteProtocol::from(ROUTE_PROTOCOL);
    match family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(index)
            .table_id(table)
            .protocol(protocol)
            .scope(RouteScope::Link)
            .build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .output_interface(index)
            .table_id(table)
            .protocol(protocol)
            .priority(IPV6_ROUTE_METRIC)
            .build(),
    }
}

fn rule_base(family: Family, priority: u32, table: u32) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = family.address_family();
    // Without an explicit action the kernel answers EINVAL.
    m.header.action = RuleAction::ToTable;
    m.header.table = u8::try_from(table).unwrap_or(0);
    m.attributes.push(RuleAttribute::Table(table));
    m.attributes.push(RuleAttribute::Priority(priority));
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(ROUTE_PROTOCOL)));
    m
}

/// `SUPPRESS_RULE_PRIORITY: from all lookup main suppress_prefixlength 0`
fn suppress_rule_message(family: Family) -> RuleMessage {
    let mut m = rule_base(family, SUPPRESS_RULE_PRIORITY, RT_TABLE_MAIN);
    m.attributes.push(RuleAttribute::SuppressPrefixLen(0));
    m
}

/// `MARK_RULE_PRIORITY: not from all fwmark M lookup T`
fn mark_rule_message(family: Family, fwmark: u32, table: u32) -> RuleMessage {
    let mut m = rule_base(family, MARK_RULE_PRIORITY, table);
    m.header.flags |= RuleFlags::Invert;
    m.attributes.push(RuleAttribute::FwMark(fwmark));
    m.attributes.push(RuleAttribute::FwMask(u32::MAX));
    m
}

/// The parts of a rule that say what it does, as the kernel reports them.
#[derive(Debug, Default, PartialEq, Eq)]
struct RuleShape {
    priority: Option<u32>,
    table: u32,
    fwmark: Option<u32>,
    fwmask: Option<u32>,
    suppress_prefixlen: Option<u32>,
    protocol: Option<u8>,
    /// Any selector or option other than the ones above.
    other: bool,
}

fn rule_shape(rule: &RuleMessage) -> RuleShape {
    let h = &rule.header;
    let mut shape = RuleShape {
        table: u32::from(h.table),
        other: h.dst_len != 0 || h.src_len != 0 || h.tos != 0,
        ..RuleShape::default()
    };
    for attr in &rule.attributes {
        match attr {
            RuleAttribute::Priority(p) => shape.priority = Some(*p),
            RuleAttribute::Table(t) => shape.table = *t,
            RuleAttribute::FwMark(m) => shape.fwmark = Some(*m),
            RuleAttribute::FwMask(m) => shape.fwmask = Some(*m),
            RuleAttribute::SuppressPrefixLen(n) => shape.suppress_prefixlen = Some(*n),
            RuleAttribute::Protocol(p) => shape.protocol = Some(u8::from(*p)),
            // The kernel reports "no suppression" as u32::MAX (-1) on some
            // versions; only a real value makes a rule different.
            RuleAttribute::SuppressIfGroup(g) if *g == u32::MAX => {}
            _ => shape.other = true,
        }
    }
    shape
}

/// Whether a dumped rule is exactly one that [`apply`] adds for this
/// fwmark and table.
fn is_our_rule(rule: &RuleMessage, fwmark: u32, table: u32) -> bool {
    if rule.header.action != RuleAction::ToTable {
        return false;
    }
    let inverted = rule.header.flags.contains(RuleFlags::Invert);
    let s = rule_shape(rule);
    if s.other || s.protocol != Some(ROUTE_PROTOCOL) {
        return false;
    }
    match s.priority {
        Some(SUPPRESS_RULE_PRIORITY) => {
            !inverted
                && s.table == RT_TABLE_MAIN
                && s.suppress_prefixlen == Some(0)
                && s.fwmark.unwrap_or(0) == 0
                && s.fwmask.unwrap_or(0) == 0
        }
        Some(MARK_RULE_PRIORITY) => {
            inverted
                && s.table == table
                && s.fwmark == Some(fwmark)
                && s.fwmask.unwrap_or(u32::MAX) == u32::MAX
                && s.suppress_prefixlen.is_none_or(|n| n == u32::MAX)
        }
        _ => false,
    }
}

/// `IPv4 rule pref 5191 not fwmark 0x5347 lookup 21319`, in `ip rule add`
/// words.
fn describe_rule_message(rule: &RuleMessage) -> String {
    let family = if rule.header.family == AddressFamily::Inet6 {
        Family::V6
    } else {
        Family::V4
    };
    let s = rule_shape(rule);
    let mut text = format!("{} rule", family.name());
    if let Some(p) = s.priority {
        text.push_str(&format!(" pref {p}"));
    }
    if rule.header.flags.contains(RuleFlags::Invert) {
        text.push_str(" not");
    }
    match (s.fwmark, s.fwmask) {
        (Some(m), None | Some(u32::MAX)) => text.push_str(&format!(" fwmark {m:#x}")),
        (Some(m), Some(mask)) => text.push_str(&format!(" fwmark {m:#x}/{mask:#x}")),
        (None, _) => {}
    }
    if s.fwmark.is_none() && !rule.header.flags.contains(RuleFlags::Invert) {
        text.push_str(" from all");
    }
    if s.table == RT_TABLE_MAIN {
        text.push_str(" lookup main");
    } else {
        text.push_str(&format!(" lookup {}", s.table));
    }
    if let Some(n) = s.suppress_prefixlen.filter(|n| *n != u32::MAX) {
        text.push_str(&format!(" suppress_prefixlength {n}"));
    }
    text
}

fn validate_mark_table(fwmark: u32, table: u32) -> Result<(), RoutingError> {
    if fwmark == 0 {
        return Err(RoutingError::InvalidConfig(
            "fwmark 0 would match every unmarked packet; use a non-zero mark".into(),
        ));
    }
    if RESERVED_TABLES.contains(&table) {
        return Err(RoutingError::InvalidConfig(format!(
            "table {table} belongs to the kernel; use a table of our own"
        )));
    }
    Ok(())
}

fn validate(cfg: &RouteConfig) -> Result<(), RoutingError> {
    let bad = |m: String| Err(RoutingError::InvalidConfig(m));
    let name = &cfg.interface;
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return bad(format!("{name:?} is not a valid interface name"));
    }
    if cfg.addresses.is_empty() {
        return bad(format!("the tunnel {name} has no address"));
    }
    for (i, &(addr, prefix)) in cfg.addresses.iter().enumerate() {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return bad(format!("{addr}/{prefix}: the prefix length is larger than {max}"));
        }
        if addr.is_unspecified() || addr.is_multicast() {
            return bad(format!("{addr} cannot be a tunnel address"));
        }
        if cfg.addresses[..i].iter().any(|(a, _)| *a == addr) {
            return bad(format!("{addr} is listed twice"));
        }
    }
    let min_mtu = if has_ipv6(cfg) { 1280 } else { 576 };
    if cfg.mtu < min_mtu || cfg.mtu > 65535 {
        return bad(format!(
            "MTU {} is out of range {min_mtu}-65535{}",
            cfg.mtu,
            if has_ipv6(cfg) {
                " (IPv6 needs at least 1280)"
            } else {
                ""
            }
        ));
    }
    validate_mark_table(cfg.fwmark, cfg.table)
}

// ---------------------------------------------------------------------------
// Netlink and sysctl plumbing.

/// One rtnetlink connection; its task ends when this is dropped.
struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Netlink {
    fn open() -> Result<Netlink, RoutingError> {
        // new_connection() registers with the tokio reactor: check first
        // rather than panic.
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| RoutingError::NoRuntime)?;
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| RoutingError::Socket(io_reason(&e)))?;
        let task = runtime.spawn(connection);
        Ok(Netlink { handle, task })
    }

    /// Sends one request and waits for the kernel's acknowledgement.
    async fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<(), rtnetlink::Error> {
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | flags;
        let mut response = self.handle.request(request)?;
        expect_ack(&mut response).await
    }

    async fn link_by_name(&mut self, name: &str) -> Result<LinkMessage, RoutingError> {
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link),
            Ok(None) => Err(RoutingError::NoSuchInterface(name.to_string())),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => {
                Err(RoutingError::NoSuchInterface(name.to_string()))
            }
            Err(e) => Err(netlink_error(format!("look up interface {name}"), e)),
        }
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Netlink")
    }
}

async fn expect_ack<S>(response: &mut S) -> Result<(), rtnetlink::Error>
where
    S: Stream<Item = NetlinkMessage<RouteNetlinkMessage>> + Unpin,
{
    while let Some(message) = response.next().await {
        if let NetlinkPayload::Error(e) = message.payload {
            if e.code.is_some() {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
    }
    Ok(())
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().abs()),
        _ => None,
    }
}

/// Errors that mean "what we wanted to remove is not there any more".
fn gone(e: &rtnetlink::Error) -> bool {
    matches!(
        errno_of(e),
        Some(libc::ENOENT | libc::ESRCH | libc::ENODEV | libc::EADDRNOTAVAIL)
    )
}

fn netlink_error(action: String, e: rtnetlink::Error) -> RoutingError {
    let errno = errno_of(&e);
    let reason = match errno {
        Some(code) => io_reason(&io::Error::from_raw_os_error(code)),
        None => e.to_string(),
    };
    RoutingError::Netlink {
        action,
        reason,
        errno,
    }
}

/// The current `net.ipv4.conf.all.src_valid_mark`, for the caller to
/// remember before a session changes it. Reads only.
pub fn read_src_valid_mark() -> Result<String, RoutingError> {
    read_sysctl(SRC_VALID_MARK)
}

fn read_sysctl(path: &str) -> Result<String, RoutingError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| RoutingError::Sysctl {
            action: "read".into(),
            path: path.into(),
            reason: io_reason(&e),
        })
}

fn write_sysctl(path: &str, value: &str) -> Result<(), RoutingError> {
    std::fs::write(path, format!("{value}\n")).map_err(|e| RoutingError::Sysctl {
        action: format!("write {value} to"),
        path: path.into(),
        reason: io_reason(&e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RouteConfig {
        RouteConfig {
            interface: "sg0".into(),
            addresses: vec![
                ("10.66.0.2".parse().unwrap(), 32),
                ("fd00:66::2".parse().unwrap(), 128),
            ],
            mtu: 1420,
            fwmark: 0x5347,
            table: 0x5347,
            src_valid_mark_before: None,
        }
    }

    #[test]
    fn valid_config_passes() {
        assert!(validate(&cfg()).is_ok());
        let mut v4only = cfg();
        v4only.addresses.truncate(1);
        v4only.mtu = 1000;
        assert!(validate(&v4only).is_ok());
    }

    #[test]
    fn invalid_configs_are_refused_with_a_sentence() {
        type Edit = fn(&mut RouteConfig);
        let cases: Vec<(Edit, &str)> = vec![
            (|c| c.interface = "".into(), "is not a valid interface name"),
            (
                |c| c.interface = "a-very-long-name0".into(),
                "is not a valid interface name",
            ),
            (|c| c.interface = "sg 0".into(), "is not a valid interface name"),
            (|c| c.addresses.clear(), "the tunnel sg0 has no address"),
            (
                |c| c.addresses[0].1 = 33,
                "10.66.0.2/33: the prefix length is larger than 32",
            ),
            (|c| c.addresses[1].1 = 129, "larger than 128"),
            (|c| c.addresses.push(c.addresses[0]), "10.66.0.2 is listed twice"),
            (
                |c| c.addresses[0].0 = "0.0.0.0".parse().unwrap(),
                "cannot be a tunnel address",
            ),
            (
                |c| c.mtu = 1200,
                "MTU 1200 is out of range 1280-65535 (IPv6 needs at least 1280)",
            ),
            (|c| c.mtu = 70000, "out of range"),
            (|c| c.fwmark = 0, "fwmark 0"),
            (|c| c.table = 254, "table 254 belongs to the kernel"),
            (|c| c.table = 0, "table 0 belongs to the kernel"),
        ];
        for (change, expected) in cases {
            let mut c = cfg();
            change(&mut c);
            let err = validate(&c).expect_err(expected).to_string();
            assert!(err.starts_with("invalid routing configuration: "), "{err}");
            assert!(err.contains(expected), "{err:?} should contain {expected:?}");
        }
    }

    #[test]
    fn rules_carry_an_action_and_our_shape() {
        for family in [Family::V4, Family::V6] {
            let s = suppress_rule_message(family);
            let m = mark_rule_message(family, 0x5347, 0x5347);
            assert_eq!(s.header.action, RuleAction::ToTable);
            assert_eq!(m.header.action, RuleAction::ToTable);
            assert!(m.header.flags.contains(RuleFlags::Invert));
            assert!(!s.header.flags.contains(RuleFlags::Invert));
            assert_eq!(s.header.family, family.address_family());
            assert!(is_our_rule(&s, 0x5347, 0x5347));
            assert!(is_our_rule(&m, 0x5347, 0x5347));
            // Another fwmark or table is not ours.
            assert!(!is_our_rule(&m, 0x5348, 0x5347));
            assert!(!is_our_rule(&m, 0x5347, 51820));
        }
        assert_eq!(
            describe_rule_message(&mark_rule_message(Family::V4, 0x5347, 21319)),
            "IPv4 rule pref 5191 not fwmark 0x5347 lookup 21319"
        );
        assert_eq!(
            describe_rule_message(&suppress_rule_message(Family::V6)),
            "IPv6 rule pref 5190 from all lookup main suppress_prefixlength 0"
        );
        // Small tables go in the header too, large ones only in the attribute.
        assert_eq!(mark_rule_message(Family::V4, 1, 100).header.table, 100);
        assert_eq!(mark_rule_message(Family::V4, 1, 21319).header.table, 0);
    }

    #[test]
    fn foreign_rules_are_not_ours() {
        // wg-quick's pair at the kernel-chosen priorities.
        let mut wg = mark_rule_message(Family::V4, 51820, 51820);
        wg.attributes.retain(|a| !matches!(a, RuleAttribute::Priority(_)));
        wg.attributes.push(RuleAttribute::Priority(32765));
        assert!(!is_our_rule(&wg, 51820, 51820));
        // Same priority, different shape.
        let mut other = suppress_rule_message(Family::V4);
        other.attributes.push(RuleAttribute::Iifname("eth0".into()));
        assert!(!is_our_rule(&other, 0x5347, 0x5347));
        let mut from = mark_rule_message(Family::V4, 0x5347, 0x5347);
        from.header.src_len = 24;
        assert!(!is_our_rule(&from, 0x5347, 0x5347));
        let mut masked = mark_rule_message(Family::V4, 0x5347, 0x5347);
        masked
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::FwMask(_)));
        masked.attributes.push(RuleAttribute::FwMask(0xffff));
        assert!(!is_our_rule(&masked, 0x5347, 0x5347));
        // Our exact shape added by someone else (another protocol).
        let mut by_hand = mark_rule_message(Family::V4, 0x5347, 0x5347);
        by_hand
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::Protocol(_)));
        assert!(!is_our_rule(&by_hand, 0x5347, 0x5347));
        by_hand
            .attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Boot));
        assert!(!is_our_rule(&by_hand, 0x5347, 0x5347));
        let mut blackhole = mark_rule_message(Family::V4, 0x5347, 0x5347);
        blackhole.header.action = RuleAction::Blackhole;
        assert!(!is_our_rule(&blackhole, 0x5347, 0x5347));
    }

    #[test]
    fn ipv6_addresses_skip_dad() {
        let m = address_message(7, "fd00::2".parse().unwrap(), 128);
        assert!(m.header.flags.contains(AddressHeaderFlags::Nodad));
        assert!(m
            .attributes
            .contains(&AddressAttribute::Flags(AddressFlags::Nodad)));
        assert_eq!(m.header.index, 7);
        let m4 = address_message(7, "10.0.0.2".parse().unwrap(), 32);
        assert!(!m4
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Flags(_))));
    }

    #[test]
    fn default_routes_go_to_our_table() {
        let r = default_route_message(Family::V4, 3, 21319);
        assert_eq!(r.header.destination_prefix_length, 0);
        assert_eq!(r.header.scope, RouteScope::Link);
        assert!(r
            .attributes
            .contains(&rtnetlink::packet_route::route::RouteAttribute::Table(21319)));
        assert!(r
            .attributes
            .contains(&rtnetlink::packet_route::route::RouteAttribute::Oif(3)));
        assert_eq!(u8::from(r.header.protocol), ROUTE_PROTOCOL);
        let r6 = default_route_message(Family::V6, 3, 21319);
        assert_eq!(r6.header.address_family, AddressFamily::Inet6);
        assert_eq!(u8::from(r6.header.protocol), ROUTE_PROTOCOL);
        assert!(r6
            .attributes
            .contains(&rtnetlink::packet_route::route::RouteAttribute::Priority(1024)));
    }

    #[test]
    fn errors_read_as_one_sentence() {
        let e = RoutingError::Netlink {
            action: "add IPv4 route default dev sg0 table 21319".into(),
            reason: io_reason(&io::Error::from_raw_os_error(libc::EEXIST)),
            errno: Some(libc::EEXIST),
        };
        assert_eq!(
            e.to_string(),
            "could not add IPv4 route default dev sg0 table 21319: File exists"
        );
        assert_eq!(e.errno(), Some(libc::EEXIST));
        assert_eq!(
            RoutingError::NoSuchInterface("sg9".into()).to_string(),
            "interface sg9 does not exist"
        );
    }

    #[test]
    fn sysctl_errors_name_the_file() {
        let err = read_sysctl("/nonexistent/src_valid_mark")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "could not read /nonexistent/src_valid_mark: No such file or directory"
        );
    }

    #[test]
    fn futures_and_routes_are_send() {
        fn send<T: Send>(_: &T) {}
        let c = cfg();
        send(&apply(&c));
        send(&remove_stale(1, 100));
        let routes = Routes {
            interface: "sg0".into(),
            index: 1,
            done: Vec::new(),
        };
        send(&routes);
        send(&routes.remove());
    }

    #[tokio::test]
    async fn apply_refuses_bad_config_before_touching_anything() {
        let mut c = cfg();
        c.table = 254;
        assert!(matches!(apply(&c).await, Err(RoutingError::InvalidConfig(_))));
        assert!(matches!(
            remove_stale(0, 100).await,
            Err(RoutingError::InvalidConfig(_))
        ));
    }
}
