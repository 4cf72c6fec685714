//! The kill switch: one nftables table, `inet sessiongate`, replaced as a
//! whole in one atomic transaction each time its shape changes (SPEC §5).
//!
//! This module owns that table and nothing else. It must never touch another
//! table, and never remove ours from a `Drop` or a panic path: the table is
//! kernel state that outlives a crashed daemon, which is what keeps the
//! machine closed until `sessionctl stop`.
//!
//! Two shapes, both with output, input and forward policy drop:
//! - *lockdown*: loopback, the tunnel's own UDP to the endpoint (carrying the
//!   tunnel's fwmark *and* addressed to the endpoint), its replies, DHCP, and
//!   the LAN when `allow_lan` (Mullvad's explicit private-range list);
//! - *session*: lockdown plus, through the tunnel interface only, the pinned
//!   DNS servers on port 53 and the allowlist (address . protocol . port)
//!   from named sets that DNS answers can join with a timeout; replies to
//!   those connections; and, when a DNS stub runs, the redirect of every DNS
//!   packet to it.
//!
//! Everything else is rejected (TCP reset, ICMP admin-prohibited) so that
//! applications fail at once instead of hanging. DNS (53) anywhere but the
//! pinned servers, and DNS-over-TLS (853) anywhere, are rejected before any
//! allowlist rule can accept them.
//!
//! The `nftables` crate builds the batch; we run `nft -j -f -` ourselves so
//! that nft's error message reaches the user (the crate drops stderr).

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nftables::batch::Batch;
use nftables::expr::{Elem, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, CT};
use nftables::schema::{Chain, Element, NfListObject, Rule, Set, SetFlag, SetType, SetTypeValue, Table};
use nftables::stmt::{Match, Operator, Reject, RejectType, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Our table's name (family inet).
pub const TABLE: &str = "sessiongate";
const ALLOW4: &str = "allow4";
const ALLOW6: &str = "allow6";

/// Private and link-local ranges let through with `allow_lan` (the same
/// explicit list as Mullvad's), plus the multicast a LAN needs.
const LAN_V4: &[(&str, u32)] = &[
    ("10.0.0.0", 8),
    ("172.16.0.0", 12),
    ("192.168.0.0", 16),
    ("169.254.0.0", 16),
    ("224.0.0.0", 24),
    ("255.255.255.255", 32),
];
const LAN_V6: &[(&str, u32)] = &[("fe80::", 10), ("fc00::", 7), ("ff02::", 16)];

/// The always-on part of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lockdown {
    /// The WireGuard peer.
    pub endpoint: SocketAddr,
    /// The tunnel's UDP socket carries this mark.
    pub fwmark: u32,
    pub tunnel_interface: String,
    pub allow_lan: bool,
}

/// One literal allowlist entry: a network and its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    pub net: (IpAddr, u8),
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
}

/// Where the DNS stub listens and how its own upstream queries are marked,
/// so that every other DNS packet can be redirected to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsRedirect {
    pub port: u16,
    pub stub_mark: u32,
}

/// The session part, opened once the tunnel has its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    pub rules: Vec<AllowEntry>,
    pub dns_servers: Vec<IpAddr>,
    pub tunnel_has_ipv6: bool,
    pub dns_redirect: Option<DnsRedirect>,
}

/// A learned address (from a DNS answer) for one protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnedAddress {
    pub addr: IpAddr,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    pub port: u16,
    pub timeout: Duration,
}

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("could not run nft (is the nftables package installed?): {0}")]
    Spawn(String),
    #[error("nft refused the {what}: {reason}")]
    Nft { what: &'static str, reason: String },
    #[error("could not encode the ruleset: {0}")]
    Encode(String),
}

/// How many rules the table we applied last has; the tamper guard compares
/// the kernel's table against it.
static APPLIED_RULES: AtomicUsize = AtomicUsize::new(0);

/// Replaces our whole table with the lockdown shape (`allow` = None) or the
/// session shape, in one transaction: either the new table is in place or
/// the old one still is.
pub async fn apply(lockdown: &Lockdown, allow: Option<&Allowlist>) -> Result<(), FirewallError> {
    let (batch, rules) = build(lockdown, allow);
    run_batch(batch, "firewall table").await?;
    APPLIED_RULES.store(rules, Ordering::SeqCst);
    Ok(())
}

/// Adds learned addresses to the allow sets, each with its timeout, in one
/// transaction.
pub async fn add_addresses(entries: &[LearnedAddress]) -> Result<(), FirewallError> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut batch = Batch::new();
    for (set, v6) in [(ALLOW4, false), (ALLOW6, true)] {
        let elems: Vec<Expression> = entries
            .iter()
            .filter(|e| e.addr.is_ipv6() == v6)
            .map(|e| {
                Expression::Named(NamedExpression::Elem(Elem {
                    val: Box::new(concat(vec![
                        s(e.addr.to_string()),
                        Expression::Number(u32::from(e.proto)),
                        Expression::Number(u32::from(e.port)),
                    ])),
                    timeout: Some(e.timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32),
                    expires: None,
                    comment: None,
                    counter: None,
                }))
            })
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
    run_batch(batch, "allowlist update").await
}

/// Deletes our table. Already gone is fine.
pub async fn remove() -> Result<(), FirewallError> {
    // Adding the (empty) table first makes the delete succeed whether or
    // not it exists, in one transaction.
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    run_batch(batch, "removal of the firewall table").await?;
    APPLIED_RULES.store(0, Ordering::SeqCst);
    Ok(())
}

/// Whether our table is in the kernel with every rule we put there.
pub async fn is_present() -> Result<bool, FirewallError> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| FirewallError::Spawn(e.to_string()))?;
    if !out.status.success() {
        return Ok(false);
    }
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| FirewallError::Nft {
        what: "listing",
        reason: e.to_string(),
    })?;
    let rules = listed["nftables"]
        .as_array()
        .map(|items| items.iter().filter(|i| i.get("rule").is_some()).count())
        .unwrap_or(0);
    Ok(rules == APPLIED_RULES.load(Ordering::SeqCst))
}

async fn run_batch(batch: Batch<'_>, what: &'static str) -> Result<(), FirewallError> {
    let json = serde_json::to_vec(&batch.to_nftables()).map_err(|e| FirewallError::Encode(e.to_string()))?;
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| FirewallError::Spawn(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&json)
            .await
            .map_err(|e| FirewallError::Spawn(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| FirewallError::Spawn(e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let reason = String::from_utf8_lossy(&out.stderr)
        .lines()
        .find(|l| l.contains("Error"))
        .unwrap_or("nft failed without a message")
        .trim()
        .to_string();
    Err(FirewallError::Nft { what, reason })
}

/// Watches the ruleset for changes that touch our table (another firewall
/// manager, `nft flush ruleset`), through `nft monitor`'s netlink events.
pub struct FirewallWatch {
    events: mpsc::Receiver<()>,
    _monitor: Child,
}

impl FirewallWatch {
    /// Resolves when something changed our table. Events come in bursts;
    /// they are drained so one change gives one wake-up.
    pub async fn changed(&mut self) {
        if self.events.recv().await.is_none() {
            // The monitor died: fall back to a slow poll rather than never
            // waking again.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        while self.events.try_recv().is_ok() {}
    }
}

/// Starts watching. The monitor process is killed when the watch is dropped.
pub fn watch() -> Result<FirewallWatch, FirewallError> {
    let mut child = Command::new("nft")
        .arg("monitor")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| FirewallError::Spawn(e.to_string()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| FirewallError::Spawn("nft monitor has no output".into()))?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let ours = line.contains(&format!("inet {TABLE}"));
            let removal = line.starts_with("delete") || line.starts_with("flush");
            if ours && (removal || !line.starts_with("add element")) && tx.send(()).await.is_err() {
                return;
            }
        }
        tracing::warn!("nft monitor ended; the firewall tamper guard falls back to checking every 500 ms");
    });
    Ok(FirewallWatch {
        events: rx,
        _monitor: child,
    })
}

// ---------------------------------------------------------------------------
// Building the table.

fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    }
}

fn s(text: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(text.into()))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

fn concat(parts: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts))
}

fn prefix(addr: &str, len: u32) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(addr)),
        len,
    }))
}

fn net(addr: IpAddr, len: u8) -> Expression<'static> {
    let full = if addr.is_ipv4() { 32 } else { 128 };
    if u32::from(len) >= full {
        s(addr.to_string())
    } else {
        prefix(&addr.to_string(), u32::from(len))
    }
}

fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn is_in(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::IN,
    })
}

fn set_of(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(nftables::expr::SetItem::Element).collect(),
    ))
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn family_daddr(addr: &IpAddr) -> Expression<'static> {
    if addr.is_ipv4() {
        payload("ip", "daddr")
    } else {
        payload("ip6", "daddr")
    }
}

fn family_saddr(addr: &IpAddr) -> Expression<'static> {
    if addr.is_ipv4() {
        payload("ip", "saddr")
    } else {
        payload("ip6", "saddr")
    }
}

/// Rules of one chain, collected in order.
struct ChainRules {
    name: &'static str,
    rules: Vec<Vec<Statement<'static>>>,
}

impl ChainRules {
    fn new(name: &'static str) -> ChainRules {
        ChainRules {
            name,
            rules: Vec::new(),
        }
    }

    fn push(&mut self, rule: Vec<Statement<'static>>) {
        self.rules.push(rule);
    }
}

/// The whole table as one batch, and how many rules it holds.
fn build(lockdown: &Lockdown, allow: Option<&Allowlist>) -> (Batch<'static>, usize) {
    let tun = lockdown.tunnel_interface.clone();
    let mut batch = Batch::new();
    // add + delete + add: replaces the table whether or not it exists.
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    batch.add(NfListObject::Table(table()));

    for (name, ty) in [(ALLOW4, SetType::Ipv4Addr), (ALLOW6, SetType::Ipv6Addr)] {
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
            flags: Some(HashSet::from([SetFlag::Interval, SetFlag::Timeout])),
            elem: allow
                .and_then(|a| static_elements(a, ty == SetType::Ipv6Addr))
                .map(Cow::Owned),
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        })));
    }

    let mut chains: Vec<(ChainRules, NfHook, NfChainType, i32)> = Vec::new();

    // DNS redirect (nat, before filtering): every DNS packet to the stub,
    // except the stub's own upstream queries.
    if let Some(redirect) = allow.and_then(|a| a.dns_redirect) {
        let mut nat = ChainRules::new("dns_redirect");
        nat.push(vec![
            is(meta(MetaKey::Mark), Expression::Number(redirect.stub_mark)),
            Statement::Return(None),
        ]);
        nat.push(vec![
            is_in(meta(MetaKey::L4proto), set_of(vec![s("tcp"), s("udp")])),
            is(payload("th", "dport"), Expression::Number(53)),
            Statement::Redirect(Some(NAT {
                addr: None,
                family: None,
                port: Some(Expression::Number(u32::from(redirect.port))),
                flags: None,
            })),
        ]);
        chains.push((nat, NfHook::Output, NfChainType::NAT, -100));
    }

    let mut output = ChainRules::new("output");
    output.push(vec![is(meta(MetaKey::Oifname), s("lo")), accept()]);
    // After a redirect to the stub the output interface is still the one
    // routed before nat ran, so loopback is also accepted by address.
    output.push(vec![is(payload("ip", "daddr"), prefix("127.0.0.0", 8)), accept()]);
    output.push(vec![is(payload("ip6", "daddr"), s("::1")), accept()]);
    output.push(vec![
        is(meta(MetaKey::Mark), Expression::Number(lockdown.fwmark)),
        is(
            family_daddr(&lockdown.endpoint.ip()),
            s(lockdown.endpoint.ip().to_string()),
        ),
        is(
            payload("udp", "dport"),
            Expression::Number(u32::from(lockdown.endpoint.port())),
        ),
        accept(),
    ]);
    output.push(vec![
        is(payload("udp", "sport"), Expression::Number(68)),
        is(payload("udp", "dport"), Expression::Number(67)),
        accept(),
    ]);
    output.push(vec![
        is(payload("udp", "sport"), Expression::Number(546)),
        is(payload("udp", "dport"), Expression::Number(547)),
        accept(),
    ]);

    let mut input = ChainRules::new("input");
    input.push(vec![is(meta(MetaKey::Iifname), s("lo")), accept()]);
    input.push(vec![
        is(
            family_saddr(&lockdown.endpoint.ip()),
            s(lockdown.endpoint.ip().to_string()),
        ),
        is(
            payload("udp", "sport"),
            Expression::Number(u32::from(lockdown.endpoint.port())),
        ),
        accept(),
    ]);
    input.push(vec![
        is(payload("udp", "sport"), Expression::Number(67)),
        is(payload("udp", "dport"), Expression::Number(68)),
        accept(),
    ]);
    input.push(vec![
        is(payload("udp", "sport"), Expression::Number(547)),
        is(payload("udp", "dport"), Expression::Number(546)),
        accept(),
    ]);

    if let Some(allow) = allow {
        // DNS goes to the pinned servers through the tunnel, nowhere else;
        // DNS-over-TLS nowhere at all. These come before the allowlist so no
        // allow entry can open them.
        for server in &allow.dns_servers {
            output.push(vec![
                is(meta(MetaKey::Oifname), s(tun.clone())),
                is(family_daddr(server), s(server.to_string())),
                is_in(meta(MetaKey::L4proto), set_of(vec![s("tcp"), s("udp")])),
                is(payload("th", "dport"), Expression::Number(53)),
                accept(),
            ]);
        }
        for port in [53u32, 853] {
            output.push(vec![
                is_in(meta(MetaKey::L4proto), set_of(vec![s("tcp"), s("udp")])),
                is(payload("th", "dport"), Expression::Number(port)),
                Statement::Jump(nftables::stmt::JumpTarget {
                    target: "refuse".into(),
                }),
            ]);
        }
        output.push(vec![
            is(meta(MetaKey::Oifname), s(tun.clone())),
            is_in(
                concat(vec![
                    payload("ip", "daddr"),
                    meta(MetaKey::L4proto),
                    payload("th", "dport"),
                ]),
                s(format!("@{ALLOW4}")),
            ),
            accept(),
        ]);
        if allow.tunnel_has_ipv6 {
            output.push(vec![
                is(meta(MetaKey::Oifname), s(tun.clone())),
                is_in(
                    concat(vec![
                        payload("ip6", "daddr"),
                        meta(MetaKey::L4proto),
                        payload("th", "dport"),
                    ]),
                    s(format!("@{ALLOW6}")),
                ),
                accept(),
            ]);
        }
        output.push(vec![
            is(meta(MetaKey::Oifname), s(tun.clone())),
            is_in(ct("state"), set_of(vec![s("established"), s("related")])),
            accept(),
        ]);
        input.push(vec![
            is(meta(MetaKey::Iifname), s(tun.clone())),
            is_in(ct("state"), set_of(vec![s("established"), s("related")])),
            accept(),
        ]);
    }

    if lockdown.allow_lan {
        for (addr, len) in LAN_V4 {
            output.push(vec![is(payload("ip", "daddr"), prefix(addr, *len)), accept()]);
            input.push(vec![is(payload("ip", "saddr"), prefix(addr, *len)), accept()]);
        }
        for (addr, len) in LAN_V6 {
            output.push(vec![is(payload("ip6", "daddr"), prefix(addr, *len)), accept()]);
            input.push(vec![is(payload("ip6", "saddr"), prefix(addr, *len)), accept()]);
        }
    }

    // Whatever is left is refused loudly.
    output.push(vec![Statement::Jump(nftables::stmt::JumpTarget {
        target: "refuse".into(),
    })]);
    let mut refuse = ChainRules::new("refuse");
    refuse.push(vec![
        is(meta(MetaKey::L4proto), s("tcp")),
        Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
    ]);
    refuse.push(vec![Statement::Reject(Some(Reject::new(
        Some(RejectType::ICMPX),
        Some(nftables::types::RejectCode::AdminProhibited),
    )))]);

    chains.push((output, NfHook::Output, NfChainType::Filter, 0));
    chains.push((input, NfHook::Input, NfChainType::Filter, 0));
    chains.push((
        ChainRules::new("forward"),
        NfHook::Forward,
        NfChainType::Filter,
        0,
    ));

    let mut count = 0;
    // The regular chain first: the base chains jump to it.
    add_chain(&mut batch, &refuse, None);
    count += refuse.rules.len();
    for (chain, hook, ty, prio) in &chains {
        add_chain(&mut batch, chain, Some((*hook, *ty, *prio)));
        count += chain.rules.len();
    }
    (batch, count)
}

fn add_chain(batch: &mut Batch<'static>, chain: &ChainRules, base: Option<(NfHook, NfChainType, i32)>) {
    batch.add(NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: chain.name.into(),
        _type: base.map(|b| b.1),
        hook: base.map(|b| b.0),
        prio: base.map(|b| b.2),
        policy: base.and_then(|b| (b.1 == NfChainType::Filter).then_some(NfChainPolicy::Drop)),
        ..Default::default()
    }));
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

/// The profile's literal networks as set elements (no timeout).
fn static_elements(allow: &Allowlist, v6: bool) -> Option<Vec<Expression<'static>>> {
    let mut elems = Vec::new();
    for entry in allow.rules.iter().filter(|e| e.net.0.is_ipv6() == v6) {
        for (proto, ports) in [(TCP, &entry.tcp), (UDP, &entry.udp)] {
            for port in ports {
                elems.push(concat(vec![
                    net(entry.net.0, entry.net.1),
                    Expression::Number(u32::from(proto)),
                    Expression::Number(u32::from(*port)),
                ]));
            }
        }
    }
    (!elems.is_empty()).then_some(elems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lockdown() -> Lockdown {
        Lockdown {
            endpoint: "198.51.100.2:51820".parse().expect("addr"),
            fwmark: 0x5347,
            tunnel_interface: "sg0".into(),
            allow_lan: false,
        }
    }

    fn session() -> Allowlist {
        Allowlist {
            rules: vec![AllowEntry {
                net: ("203.0.113.10".parse().expect("ip"), 32),
                tcp: vec![443],
                udp: vec![10000],
            }],
            dns_servers: vec!["192.0.2.65".parse().expect("ip")],
            tunnel_has_ipv6: false,
            dns_redirect: None,
        }
    }

    fn json(lockdown: &Lockdown, allow: Option<&Allowlist>) -> String {
        let (batch, _) = build(lockdown, allow);
        serde_json::to_string(&batch.to_nftables()).expect("encode")
    }

    #[test]
    fn lockdown_lets_only_the_marked_endpoint_traffic_out() {
        let text = json(&lockdown(), None);
        assert!(text.contains("\"mark\""), "{text}");
        assert!(text.contains("198.51.100.2"));
        assert!(text.contains("51820"));
        assert!(
            !text.contains("203.0.113.10"),
            "lockdown must not hold the allowlist"
        );
        assert!(
            !text.contains("sg0"),
            "lockdown must not open the tunnel interface"
        );
    }

    #[test]
    fn session_shape_holds_the_allowlist_and_refuses_other_dns() {
        let text = json(&lockdown(), Some(&session()));
        assert!(text.contains("203.0.113.10"), "{text}");
        assert!(text.contains("853"));
        assert!(!text.contains("\"redirect\""));
        let mut with_stub = session();
        with_stub.dns_redirect = Some(DnsRedirect {
            port: 5354,
            stub_mark: 0x5348,
        });
        let text = json(&lockdown(), Some(&with_stub));
        assert!(text.contains("\"redirect\""), "{text}");
    }

    #[test]
    fn allow_lan_adds_private_ranges_only_when_asked() {
        assert!(!json(&lockdown(), None).contains("192.168.0.0"));
        let lan = Lockdown {
            allow_lan: true,
            ..lockdown()
        };
        assert!(json(&lan, None).contains("192.168.0.0"));
    }
}
