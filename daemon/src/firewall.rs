//! The kill switch: two nftables tables, `inet sessiongate` and `netdev
//! sessiongate`, replaced as a whole in one atomic transaction each time
//! their shape changes.
//!
//! # What this module owns, and what it must never do
//!
//! It owns the tables `inet sessiongate` and `netdev sessiongate` and
//! nothing else. It never touches another table (it only ever names its
//! own, in writes and in reads), and it
//! never removes its table from a `Drop` or a panic path: the table is kernel
//! state that outlives a crashed daemon, which is what keeps the machine
//! closed until `sessionctl stop` ([`remove`] is the only way out). Every
//! change is one nftables transaction (one libnftables call, or one
//! `nft -j -f -` run): either all of it is in the kernel or none of it is.
//!
//! # Shapes
//!
//! Both shapes have `output`, `input` and `forward` base chains (filter,
//! priority 0, policy drop; `forward` stays empty: a session machine forwards
//! nothing), a `postrouting` base chain (filter, priority 0, policy drop)
//! that repeats `output`'s rules where the real output device is known
//! (after any other table's nat or re-mark; refusals drop there), and a
//! regular chain `refuse` that rejects: TCP with a reset,
//! everything else with ICMP(v6) admin-prohibited, so local applications fail
//! at once instead of hanging. Outgoing packets that no rule accepts end in
//! `refuse`; incoming ones are dropped by the policy.
//!
//! *Verify counter*: both shapes hold a named counter, `refused`; the output
//! rule just before the final refusal counts there the packets that carry
//! [`VERIFY_MARK`] (the probes of `sessionctl verify`, nothing else), so
//! [`refused_packets`] can prove that a probe was refused by this table and
//! not by the far end. The rule changes no verdict.
//!
//! *Lockdown* ([`apply`] with `None`), in rule order:
//! - output: `oifname lo`, and loopback by address too (127.0.0.0/8, ::1:
//!   after a nat `redirect` the output interface is still the one routed
//!   before nat ran, so `oifname lo` alone would miss redirected DNS); the
//!   tunnel's own UDP to the endpoint, which must carry the tunnel's fwmark
//!   *and* go to the endpoint's address *and* port; DHCP (68→67) to the
//!   limited broadcast or a directly connected subnet and DHCPv6 (546→547)
//!   to ff02::1:2 or link-local, never through the tunnel interface;
//!   IPv6 neighbour discovery (see below); then TCP/UDP to ports
//!   53 and 853 are refused, before the LAN can accept them; then the LAN
//!   when `allow_lan`; then `refuse`.
//! - input: `iifname lo` (no anti-spoofing rule here: redirected DNS replies
//!   come back on `lo` with a foreign source); the endpoint's UDP replies
//!   (source address and port, conntrack `established`, so an unsolicited
//!   packet claiming to be the peer cannot reach other local ports); DHCP
//!   replies from a directly connected subnet or answering a renewal, DHCPv6
//!   replies from link-local addresses, neither through the tunnel;
//!   neighbour discovery; the LAN when `allow_lan`.
//!
//! *Session* ([`apply`] with `Some`): lockdown plus, through `oifname` of the
//! tunnel only (a name, so the table can go up before the interface exists):
//! - the pinned DNS servers on TCP/UDP 53 (before the 53/853 refusal);
//! - `daddr . l4proto . dport` in four named sets: `allow4_nets`/`allow6_nets`
//!   (flags interval: the profile's literal addresses and CIDRs, fixed at
//!   apply time) and `allow4`/`allow6` (flags timeout: addresses from DNS
//!   answers, added by [`add_addresses`] with a timeout). Two kinds of set
//!   because the kernel refuses an element that overlaps an interval already
//!   in the set (`File exists`), which would fail a whole DNS update whenever
//!   an answer falls inside a literal CIDR;
//! - established flows both ways on the tunnel, but only while the far
//!   end's `address . protocol . port` is in `allow*_nets` or in
//!   `known4`/`known6` (every answer of this session whose name and port
//!   the allowlist still holds, without timeout): no flow outlives the
//!   allowlist that admitted it (a new session starts with empty `known`
//!   sets; an apply that removes a name, host or port cuts its flows at
//!   once), yet an answer's TTL running out cuts nothing; related ICMP
//!   errors in; the pinned resolvers' replies;
//! - IPv6: the `allow6*` and IPv6 DNS rules exist only when the tunnel has
//!   an IPv6 address; otherwise every IPv6 packet except loopback, neighbour
//!   discovery, DHCPv6, an IPv6 endpoint and (with `allow_lan`) the LAN is
//!   refused.
//!
//! *Link level* (`netdev sessiongate`, same transaction, both shapes): an
//! egress chain (policy drop) on every interface of the namespace but `lo`
//! and the tunnel, read from `/proc/net/dev` at every apply; the tamper
//! guard also watches `ip monitor link`, so an interface that appears
//! during a session gets its chain at once. It admits ARP, the tunnel's
//! marked UDP to the endpoint, DHCP/DHCPv6 as above, neighbour discovery
//! and MLD reports, and the LAN under `allow_lan`. It exists for senders
//! that never meet this namespace's `inet` hooks: a macvlan/ipvlan child in
//! another namespace, a bridge port's frames (VMs, containers), ordinary
//! AF_PACKET sockets. It cannot see what bypasses the egress hook
//! (PACKET_QDISC_BYPASS, AF_XDP, XDP redirects) nor an interface in another
//! namespace that has its own physical device.
//!
//! *Neighbour discovery* is allowed in both shapes, in both directions, only
//! with hop limit 255 (RFC 4861: a receiver discards any other), and out
//! only to link-local, link-scope multicast and on-link addresses (a router
//! does forward a hop limit 255 message to anywhere else):
//! an IPv6 endpoint reached over the physical link cannot be resolved
//! without it, the host's IPv6 default route (router advertisements) and
//! DHCPv6 renewals need it, and it carries nothing but link addresses the
//! router already knows. Mullvad allows the same message types.
//!
//! *LAN* (`allow_lan`): the directly connected subnets are read from the
//! routing table (`/proc/net/route`, `/proc/net/ipv6_route`) at every
//! [`apply`], leaving out the tunnel interface, `lo`, gateway routes and any
//! /0, plus link-local (169.254.0.0/16, fe80::/10), link-local multicast
//! (224.0.0.0/24, ff02::/16), SSDP (239.255.255.250) and broadcast. Output
//! may go to those; input is accepted only when source *and* destination are
//! LAN addresses, so a neighbour cannot probe the tunnel's address through
//! the physical interface (CVE-2019-14899). A subnet that appears later is
//! closed until the next [`apply`] (fail closed).
//!
//! # DNS redirect (the stub)
//!
//! With [`Allowlist::dns_redirect`] the session shape also gets a nat chain
//! `dns_redirect` (hook output, priority -100, i.e. before filtering): packets
//! carrying the stub's own mark return untouched (its upstream queries, which
//! the filter then lets through to the pinned servers via the tunnel), every
//! other TCP/UDP packet to port 53 is `redirect`ed to the stub's port on
//! loopback, where the loopback-by-address rule accepts it. The stub's mark
//! must differ from the tunnel's fwmark (that one means "bypass the tunnel").
//!
//! # DNS answers and re-applies
//!
//! [`add_addresses`] remembers what it added (in this process) with the
//! expiry and the name it answered, and every session-shape [`apply`] puts
//! the unexpired ones back with their remaining time, so replacing the
//! table (tamper guard, shape change) does not close a host the stub
//! already answered for; but only those whose name and port the new
//! [`Allowlist::names`] still holds: a reload that narrows closes at once,
//! for new and established flows alike. A lockdown
//! [`apply`] and [`remove`] forget them: a new session never inherits the
//! last one's answers. All writes go through one lock, so an update cannot
//! land in a table that a concurrent apply is about to replace.
//!
//! # Tamper guard
//!
//! [`watch`] runs `nft -j monitor` as a child and wakes on any event about
//! our table except deleted set elements; [`is_present`] then says whether
//! the table still has the chains, rules and sets we last applied (a
//! listing taken right after each apply, without handles and without the
//! elements of the answer sets, is the reference), and whether every
//! element of the answer sets is one of this session's answers (so a host
//! or port someone else adds is taken out by the caller's re-apply).
//!
//! The `nftables` crate builds the batches; they go to the kernel through
//! libnftables in process ([`crate::nft`]; a change is then about 1 ms
//! instead of a 16 ms `nft` spawn), or by running `nft -j -f -` ourselves
//! when the library is missing. Either way nft's own error message reaches
//! the user (the crate's helper drops stderr).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nftables::batch::Batch;
use nftables::expr::{
    Elem, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem, CT,
};
use nftables::schema::{
    Chain, Counter as CounterObject, Element, NfListObject, Rule, Set, SetFlag, SetType, SetTypeValue, Table,
};
use nftables::stmt::{Counter, JumpTarget, Match, Operator, Reject, RejectType, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::nft::Libnftables;

/// Our table's name (family inet).
pub const TABLE: &str = "sessiongate";
/// DNS answers, IPv4 (`ipv4_addr . inet_proto . inet_service`, timeout).
pub const ALLOW4: &str = "allow4";
/// DNS answers, IPv6 (`ipv6_addr . inet_proto . inet_service`, timeout).
pub const ALLOW6: &str = "allow6";
/// The profile's literal IPv4 addresses and CIDRs (interval).
pub const ALLOW4_NETS: &str = "allow4_nets";
/// The profile's literal IPv6 addresses and CIDRs (interval).
pub const ALLOW6_NETS: &str = "allow6_nets";
/// Every DNS answer of this session whose name and port the allowlist still
/// holds, without a timeout (IPv4, same type as `allow4`): established flows
/// are checked against it, so a flow outlives its answer's TTL but not the
/// allowlist entry that admitted it.
pub const KNOWN4: &str = "known4";
/// The same for IPv6.
pub const KNOWN6: &str = "known6";

/// IP protocol numbers for [`LearnedAddress::proto`].
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

const OUTPUT: &str = "output";
const INPUT: &str = "input";
const FORWARD: &str = "forward";
const POSTROUTING: &str = "postrouting";
const REFUSE: &str = "refuse";
const DNS_REDIRECT: &str = "dns_redirect";
/// The named counter of refused verify probes (see [`refused_packets`]).
pub const REFUSED_COUNTER: &str = "refused";
/// SO_MARK of `sessionctl verify`'s blocked-traffic probes ("SI"). Neither
/// the tunnel's nor the DNS stub's mark, so the probes are routed and
/// filtered like any application's packets; only the `refused` counter
/// looks at it.
pub const VERIFY_MARK: u32 = 0x5349;

/// The conntrack mark bit our `postrouting` chain sets on every flow that
/// leaves during a session (tunnel, endpoint, loopback alike), so that
/// [`remove`] and a fresh lockdown can delete exactly the session's flows.
/// One bit, OR-ed in: whatever else another program keeps in the ct mark
/// stays.
pub const SESSION_CT_BIT: u32 = 0x4000_0000;

/// IPv6's fragment header (next header 44).
const IPV6_FRAGMENT_HEADER: u32 = 44;

/// How long one `nft` run may take before we give up on it.
const NFT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds of a DNS answer's timeout in the allow sets.
const MIN_TIMEOUT_SECS: u64 = 1;
const MAX_TIMEOUT_SECS: u64 = 24 * 60 * 60;

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

/// The always-on part of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lockdown {
    /// The WireGuard peer.
    pub endpoint: SocketAddr,
    /// The tunnel's UDP socket carries this mark (SO_MARK).
    pub fwmark: u32,
    /// The tunnel interface's name (matched by name: it may not exist yet).
    pub tunnel_interface: String,
    /// Let the directly connected subnets through (read at apply time).
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
    /// The stub's port on 127.0.0.1 and ::1.
    pub port: u16,
    /// SO_MARK of the stub's upstream sockets; must not be the tunnel's.
    pub stub_mark: u32,
}

/// One allowed host name and its ports: the DNS stub's answers for it are
/// let through on these ports only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedEntry {
    pub name: String,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
}

impl NamedEntry {
    fn allows(&self, proto: u8, port: u16) -> bool {
        match proto {
            TCP => self.tcp.contains(&port),
            UDP => self.udp.contains(&port),
            _ => false,
        }
    }
}

/// The session part, opened once the tunnel has its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    pub rules: Vec<AllowEntry>,
    /// Allowed names and their ports. An apply forgets the answers (and
    /// cuts the flows) of names and ports that are no longer here.
    pub names: Vec<NamedEntry>,
    /// Pinned resolvers, reachable on 53 (TCP and UDP) through the tunnel.
    pub dns_servers: Vec<IpAddr>,
    /// Without an IPv6 tunnel address all IPv6 but loopback is refused.
    pub tunnel_has_ipv6: bool,
    pub dns_redirect: Option<DnsRedirect>,
}

/// A learned address (from a DNS answer) for one protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnedAddress {
    pub addr: IpAddr,
    /// [`TCP`] or [`UDP`].
    pub proto: u8,
    pub port: u16,
    /// How long the address stays in the set (clamped to 1 s ..= 1 day).
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("could not run nft (is the nftables package installed?): {0}")]
    Spawn(String),
    #[error("nft did not finish the {0} within 10 seconds and was stopped")]
    Timeout(&'static str),
    #[error("nft refused the {what}: {reason}")]
    Nft { what: &'static str, reason: String },
    #[error("nft's listing of table inet sessiongate could not be read: {0}")]
    Listing(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the firewall ruleset could not be encoded: {0}")]
    Encode(String),
}

// ---------------------------------------------------------------------------
// State shared by the calls of this process.

/// Serialises every write to our table (and the bookkeeping that goes with
/// it), so a DNS update cannot interleave with a replace.
static WRITE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// (address, protocol, port) of a learned address.
type LearnedKey = (IpAddr, u8, u16);

struct Applied {
    /// DNS answers in the allow sets: (address, proto, port) → expiry.
    learned: BTreeMap<LearnedKey, Instant>,
    /// Every answer of this session (expired or not) and the names it was
    /// an answer for: what the `known` sets hold.
    sources: BTreeMap<LearnedKey, BTreeSet<String>>,
    /// The allowed names of the session shape in force (empty in lockdown).
    names: Vec<NamedEntry>,
    /// The tunnel interface of the table in force (the link-level table
    /// is on every other interface but `lo`).
    tunnel: Option<String>,
    /// The interfaces the link-level table's egress chains were put on
    /// (nft 1.0.6 leaves a netdev chain's device out of its JSON listing,
    /// so this is the reference).
    devices: Vec<String>,
    /// The table as listed right after the last apply (see [`fingerprint`]).
    fingerprint: Option<String>,
}

static APPLIED: Mutex<Applied> = Mutex::new(Applied {
    learned: BTreeMap::new(),
    sources: BTreeMap::new(),
    names: Vec::new(),
    tunnel: None,
    devices: Vec::new(),
    fingerprint: None,
});

fn applied() -> std::sync::MutexGuard<'static, Applied> {
    // The data stays consistent whatever panicked while holding it.
    APPLIED.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------
// The public operations.

/// Replaces our whole table with the lockdown shape (`allow` = None) or the
/// session shape, in one transaction: either the new table is in place or
/// the old one still is. Works whether or not the table exists.
pub async fn apply(lockdown: &Lockdown, allow: Option<&Allowlist>) -> Result<(), FirewallError> {
    validate(lockdown, allow)?;
    let lan = if lockdown.allow_lan {
        connected_networks(&lockdown.tunnel_interface)
    } else {
        Vec::new()
    };
    let on_link = connected_routes(&lockdown.tunnel_interface);
    let _write = WRITE_LOCK.lock().await;
    // A lockdown that starts a session (nothing applied by this process
    // since the last removal, or a daemon that resumes after a crash): no
    // flow of an earlier session may go on into this one.
    let fresh_start = allow.is_none() && applied().tunnel.is_none();
    // Narrowing takes effect here, at once: answers for names or ports the
    // new allowlist no longer holds are forgotten, so neither new nor
    // established flows to them pass the new table.
    let (learned, known) = {
        let mut state = applied();
        match allow {
            Some(allow) => {
                state.names = allow.names.clone();
                let Applied {
                    learned,
                    sources,
                    names,
                    ..
                } = &mut *state;
                narrow(learned, sources, names);
            }
            None => {
                state.learned.clear();
                state.sources.clear();
                state.names.clear();
            }
        }
        drop(state);
        (unexpired_learned(Instant::now()), known_keys())
    };
    let inputs = Inputs {
        lan,
        on_link,
        learned,
        known,
    };
    // An interface that goes away between reading the list and the
    // transaction fails the whole transaction (nothing changes): read the
    // list again and retry then.
    let mut attempts = 0;
    loop {
        let devices = link_devices(&lockdown.tunnel_interface);
        let mut batch = build_table(lockdown, allow, &inputs);
        // The link-level table, in the same transaction.
        add_link_table(&mut batch, lockdown, &inputs, &devices);
        // Until the new reference is taken, is_present checks the structure only.
        {
            let mut state = applied();
            state.fingerprint = None;
            state.tunnel = Some(lockdown.tunnel_interface.clone());
            state.devices = devices.clone();
        }
        match run_nft(batch, "firewall table").await {
            Ok(()) => break,
            Err(e) if attempts < 2 && link_devices(&lockdown.tunnel_interface) != devices => {
                tracing::debug!("the interfaces changed during a firewall change ({e}); trying again");
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    }
    let fingerprint = match list_table().await {
        Ok(Some(listing)) => Some(fingerprint(&listing)),
        Ok(None) | Err(_) => None,
    };
    applied().fingerprint = fingerprint;
    if fresh_start {
        forget_session_flows().await;
    }
    Ok(())
}

/// Adds learned addresses (answers for the allowed name `name`) to the
/// allow sets, each with its timeout, in one transaction. An address already
/// there gets the later of its current and its new expiry. Entries whose
/// name and port the allowlist in force does not hold are left out (an
/// answer that arrives after a narrowing must not widen it again).
pub async fn add_addresses(name: &str, entries: &[LearnedAddress]) -> Result<(), FirewallError> {
    for entry in entries {
        if entry.proto != TCP && entry.proto != UDP {
            return Err(FirewallError::Invalid(format!(
                "learned address {}: protocol {} is neither TCP (6) nor UDP (17)",
                entry.addr, entry.proto
            )));
        }
    }
    let _write = WRITE_LOCK.lock().await;
    let now = Instant::now();
    let merged = {
        let state = applied();
        let allowed: Vec<LearnedAddress> = entries
            .iter()
            .filter(|e| {
                state
                    .names
                    .iter()
                    .any(|n| n.name == name && n.allows(e.proto, e.port))
            })
            .copied()
            .collect();
        merge_learned(&state.learned, &allowed, now)
    };
    if merged.is_empty() {
        return Ok(());
    }
    let mut batch = element_batch(&merged);
    let keys: Vec<LearnedKey> = merged.iter().map(|e| (e.addr, e.proto, e.port)).collect();
    add_known(&mut batch, &keys);
    run_nft(batch, "allowlist update").await?;
    let mut state = applied();
    state.learned.retain(|_, expiry| *expiry > now);
    for entry in &merged {
        let key = (entry.addr, entry.proto, entry.port);
        state.learned.insert(key, now + entry.timeout);
        state.sources.entry(key).or_default().insert(name.to_string());
    }
    Ok(())
}

/// Deletes our table. Already gone is fine.
pub async fn remove() -> Result<(), FirewallError> {
    let _write = WRITE_LOCK.lock().await;
    // Adding the (empty) table first makes the delete succeed whether or
    // not it exists, in one transaction.
    let mut batch = Batch::new();
    for table in [table(), link_table()] {
        batch.add(NfListObject::Table(table.clone()));
        batch.delete(NfListObject::Table(table));
    }
    run_nft(batch, "removal of the firewall table").await?;
    {
        let mut state = applied();
        state.learned.clear();
        state.sources.clear();
        state.names.clear();
        state.tunnel = None;
        state.devices.clear();
        state.fingerprint = None;
    }
    // Then no flow of the session outlives it in connection tracking.
    forget_session_flows().await;
    Ok(())
}

/// Deletes every tracked flow that carries [`SESSION_CT_BIT`], IPv4 and
/// IPv6, with the `conntrack` tool (package conntrack). Best effort: while
/// a table of ours is in place its rules already refuse flows the
/// allowlist does not hold; this only keeps a later ruleset (ours or
/// anyone's, with `ct state established`) from meeting them.
async fn forget_session_flows() {
    let mark = format!("{SESSION_CT_BIT:#x}/{SESSION_CT_BIT:#x}");
    for family in ["ipv4", "ipv6"] {
        let run = Command::new("conntrack")
            .args(["-D", "-m", &mark, "-f", family])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(NFT_TIMEOUT, run).await {
            // 1: nothing to delete.
            Ok(Ok(out)) if matches!(out.status.code(), Some(0 | 1)) => {}
            Ok(Ok(out)) => tracing::warn!(
                "could not delete the session's tracked connections: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(
                    "the conntrack tool is not installed: the session's tracked connections are left to time out"
                );
                return;
            }
            Ok(Err(e)) => tracing::warn!("could not run conntrack: {e}"),
            Err(_) => tracing::warn!("conntrack did not finish within 10 seconds"),
        }
    }
}

/// Whether our table is in the kernel with the chains, rules and sets we
/// last applied (or, if this process has not applied it, with its three
/// base chains at policy drop).
///
/// With a reference, also every element of the sets that DNS answers fill
/// must be one of this session's answers: an element someone else added (a
/// host, a port) makes the table "damaged", and the caller's re-apply
/// takes it out. The elements of the literal sets are part of the
/// reference itself.
pub async fn is_present() -> Result<bool, FirewallError> {
    // No write in flight: our own element adds are in the books before we
    // compare against them.
    let _write = WRITE_LOCK.lock().await;
    let Some(listing) = list_table().await? else {
        return Ok(false);
    };
    if !has_base_chains(&listing) {
        return Ok(false);
    }
    let (expected, foreign, tunnel, devices) = {
        let state = applied();
        (
            state.fingerprint.clone(),
            foreign_elements(&listing, &state.sources),
            state.tunnel.clone(),
            state.devices.clone(),
        )
    };
    let Some(expected) = expected else {
        return Ok(true);
    };
    if fingerprint(&listing) != expected {
        return Ok(false);
    }
    if !foreign.is_empty() {
        tracing::warn!(
            "someone else added elements to the sessiongate firewall's sets: {}",
            foreign.join(", ")
        );
        return Ok(false);
    }
    if let Some(tunnel) = tunnel {
        let links = link_devices(&tunnel);
        if devices != links {
            tracing::info!(
                "the network interfaces changed: the link-level table is put on {}",
                links.join(", ")
            );
            return Ok(false);
        }
    }
    Ok(true)
}

/// The sets whose elements come and go with DNS answers and timeouts.
const ANSWER_SETS: [&str; 4] = [ALLOW4, ALLOW6, KNOWN4, KNOWN6];

/// The elements of the answer sets in `listing` that are not answers of
/// this session (`sources`), as text; an element we cannot read counts.
fn foreign_elements(listing: &Value, sources: &BTreeMap<LearnedKey, BTreeSet<String>>) -> Vec<String> {
    let mut foreign = Vec::new();
    for item in listing["nftables"].as_array().into_iter().flatten() {
        let Some(set) = item.get("set") else { continue };
        if set["family"] != "inet"
            || set["table"] != TABLE
            || !ANSWER_SETS.iter().any(|name| set["name"] == *name)
        {
            continue;
        }
        for elem in set["elem"].as_array().into_iter().flatten() {
            // {"concat": [...]}, or {"elem": {"val": {"concat": [...]}, "timeout": ..}}
            let parts = elem.get("concat").or_else(|| {
                elem.get("elem")
                    .and_then(|e| e.get("val"))
                    .and_then(|v| v.get("concat"))
            });
            let key = parts.and_then(|p| learned_key_of(p.as_array()?));
            if !key.is_some_and(|k| sources.contains_key(&k)) {
                foreign.push(format!("{}: {elem}", set["name"].as_str().unwrap_or("?")));
            }
        }
    }
    foreign
}

/// (address, protocol, port) from a listed `addr . proto . port` element.
fn learned_key_of(parts: &[Value]) -> Option<LearnedKey> {
    let [addr, proto, port] = parts else { return None };
    let addr: IpAddr = addr.as_str()?.parse().ok()?;
    let proto = match proto {
        Value::String(name) if name == "tcp" => TCP,
        Value::String(name) if name == "udp" => UDP,
        other => u8::try_from(other.as_u64()?).ok()?,
    };
    let port = u16::try_from(port.as_u64()?).ok()?;
    Some((canonical(addr), proto, port))
}

/// How many packets carrying [`VERIFY_MARK`] our table has refused at the
/// end of its output chain since it was last replaced (the named counter
/// `refused`). `sessionctl verify` reads it before and after a probe.
pub async fn refused_packets() -> Result<u64, FirewallError> {
    let listing = list_table()
        .await?
        .ok_or_else(|| FirewallError::Listing("the table is not in place".into()))?;
    counter_packets(&listing, REFUSED_COUNTER)
        .ok_or_else(|| FirewallError::Listing(format!("it has no counter {REFUSED_COUNTER:?}")))
}

/// The packets of a named counter of our table in a listing.
fn counter_packets(listing: &Value, name: &str) -> Option<u64> {
    listing["nftables"]
        .as_array()?
        .iter()
        .filter_map(|item| item.get("counter"))
        .find(|c| c["family"] == "inet" && c["table"] == TABLE && c["name"] == name)
        .and_then(|c| c["packets"].as_u64())
}

// ---------------------------------------------------------------------------
// Running nft.

async fn run_nft(batch: Batch<'_>, what: &'static str) -> Result<(), FirewallError> {
    let json =
        serde_json::to_string(&batch.to_nftables()).map_err(|e| FirewallError::Encode(e.to_string()))?;
    nft(NftCommand::Batch(&json), what)
        .await?
        .map(drop)
        .map_err(|error| FirewallError::Nft {
            what,
            reason: nft_reason(&error),
        })
}

/// `nft -j list table inet sessiongate` with the objects of `netdev
/// sessiongate` appended; `None` when either table is missing.
async fn list_table() -> Result<Option<Value>, FirewallError> {
    let Some(mut listing) = list_one("inet").await? else {
        return Ok(None);
    };
    let Some(link) = list_one("netdev").await? else {
        return Ok(None);
    };
    if let (Some(all), Some(more)) = (listing["nftables"].as_array_mut(), link["nftables"].as_array()) {
        all.extend(more.iter().filter(|o| o.get("metainfo").is_none()).cloned());
    }
    Ok(Some(listing))
}

/// Whether any table of ours is in the kernel, whatever its shape (the
/// early-boot unit's lockdown has only the `inet` one).
pub async fn any_table_exists() -> Result<bool, FirewallError> {
    let _write = WRITE_LOCK.lock().await;
    Ok(list_one("inet").await?.is_some() || list_one("netdev").await?.is_some())
}

/// `nft -j list table FAMILY sessiongate`; `None` when it is missing.
async fn list_one(family: &str) -> Result<Option<Value>, FirewallError> {
    const WHAT: &str = "listing of the firewall table";
    match nft(NftCommand::Line(&format!("list table {family} {TABLE}")), WHAT).await? {
        Ok(out) => serde_json::from_str(&out)
            .map(Some)
            .map_err(|e| FirewallError::Listing(e.to_string())),
        Err(error) if error.contains("No such file or directory") => Ok(None),
        Err(error) => Err(FirewallError::Nft {
            what: WHAT,
            reason: nft_reason(&error),
        }),
    }
}

/// One nft command, with JSON output.
enum NftCommand<'a> {
    /// A JSON batch, one transaction (what `nft -j -f -` reads).
    Batch(&'a str),
    /// A command line, e.g. `list table inet sessiongate`.
    Line(&'a str),
}

/// Runs `command` through libnftables in process, or through the `nft`
/// binary when the library is missing ([`crate::nft`]). The outer error:
/// nft could not be run at all; the inner one: nft refused, in its words.
async fn nft(command: NftCommand<'_>, what: &'static str) -> Result<Result<String, String>, FirewallError> {
    if let Some(lib) = Libnftables::get() {
        let (NftCommand::Batch(text) | NftCommand::Line(text)) = command;
        return Ok(lib.run(text));
    }
    let mut nft = Command::new("nft");
    nft.arg("-j")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let input = match command {
        NftCommand::Batch(json) => {
            nft.args(["-f", "-"]).stdin(Stdio::piped());
            Some(json)
        }
        NftCommand::Line(line) => {
            nft.args(line.split_whitespace()).stdin(Stdio::null());
            None
        }
    };
    let mut child = nft.spawn().map_err(|e| FirewallError::Spawn(e.to_string()))?;
    let run = async {
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(input.as_bytes())
                .await
                .map_err(|e| FirewallError::Spawn(format!("writing the ruleset to nft failed: {e}")))?;
            // Dropping stdin closes it: nft reads to the end, then commits.
        }
        child
            .wait_with_output()
            .await
            .map_err(|e| FirewallError::Spawn(e.to_string()))
    };
    let out = tokio::time::timeout(NFT_TIMEOUT, run)
        .await
        .map_err(|_| FirewallError::Timeout(what))??;
    if out.status.success() {
        return Ok(Ok(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Ok(Err(if stderr.trim().is_empty() {
        format!("nft exited with {} and no message", out.status)
    } else {
        stderr.into_owned()
    }))
}

/// nft's own words: its `Error:` lines, each once (it repeats one per
/// command of the batch, and echoes the offending JSON and a `^^^` marker,
/// which we leave out), or else its first line.
fn nft_reason(stderr: &str) -> String {
    let mut errors: Vec<&str> = Vec::new();
    // JSON input gives "internal:0:0-0: Error: ...".
    for error in stderr
        .lines()
        .filter_map(|l| l.split_once("Error:").map(|(_, rest)| rest.trim()))
    {
        if !errors.contains(&error) {
            errors.push(error);
        }
    }
    if !errors.is_empty() {
        return errors.join("; ");
    }
    match stderr.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => line.to_string(),
        None => "nft gave no message".to_string(),
    }
}

/// The listed objects of our table that the tamper guard compares: every
/// chain, rule and set, without handles and without set elements (those
/// come and go with DNS answers and timeouts).
fn fingerprint(listing: &Value) -> String {
    let mut parts = Vec::new();
    for item in listing["nftables"].as_array().into_iter().flatten() {
        let Some(obj) = item.as_object() else { continue };
        for (kind, body) in obj {
            if kind == "metainfo" || kind == "table" {
                continue;
            }
            let mut body = body.clone();
            let answers = ANSWER_SETS.iter().any(|name| body["name"] == *name);
            if let Some(fields) = body.as_object_mut() {
                fields.remove("handle");
                // The literal sets' elements are fixed at apply: part of
                // the reference. The answer sets' are checked one by one
                // (see `foreign_elements`).
                if kind == "map" || (kind == "set" && answers) {
                    fields.remove("elem");
                }
                if kind == "counter" {
                    fields.remove("packets");
                    fields.remove("bytes");
                }
            }
            parts.push(format!("{kind}:{body}"));
        }
    }
    parts.join("\n")
}

/// Our three filtering base chains, with their hooks and policy drop (the
/// fingerprint covers `postrouting` and the rest once we applied).
fn has_base_chains(listing: &Value) -> bool {
    let chains: Vec<&Value> = listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("chain"))
        .collect();
    [(OUTPUT, "output"), (INPUT, "input"), (FORWARD, "forward")]
        .iter()
        .all(|(name, hook)| {
            chains.iter().any(|c| {
                c["table"] == TABLE
                    && c["family"] == "inet"
                    && c["name"] == *name
                    && c["hook"] == *hook
                    && c["policy"] == "drop"
            })
        })
}

// ---------------------------------------------------------------------------
// The tamper guard.

/// Watches the ruleset for changes to our table (another firewall manager,
/// `nft flush ruleset`, `nft delete table inet sessiongate`) through
/// `nft -j monitor`. The monitor is killed when the watch is dropped.
pub struct FirewallWatch {
    events: mpsc::Receiver<()>,
    monitor: Option<Child>,
    /// `ip -o monitor link`: an interface that appears needs its egress
    /// chain (see [`is_present`]).
    links: Option<Child>,
    /// An event was taken off the channel but not reported yet (keeps
    /// `changed` cancel-safe).
    pending: bool,
    warned: bool,
}

/// After the first event, wait this long and swallow the rest of the burst
/// (one transaction gives one event per object).
const DEBOUNCE: Duration = Duration::from_millis(20);
/// When the monitor is gone: how often to retry it (and wake the caller).
const RETRY: Duration = Duration::from_millis(500);
/// A table that lives only inside one transaction (added and deleted at
/// once). `nft monitor` subscribes some milliseconds after it was spawned,
/// and a flush in between would never be reported; seeing this table go by
/// proves the monitor listens, and the check it triggers catches anything
/// that happened before.
const SYNC_TABLE: &str = "sessiongate_guard_sync";
/// How often that transaction is repeated until the monitor reports it.
const SYNC_RETRY: Duration = Duration::from_millis(20);
const SYNC_TRIES: u32 = 250;

impl FirewallWatch {
    /// Resolves when something changed our table, or every 500 ms while the
    /// monitor cannot run (events may have been missed, so the caller should
    /// check [`is_present`] whenever this returns). Our own writes wake it
    /// too; [`is_present`] then says all is well. Cancel-safe: dropping the
    /// future (e.g. in `select!`) never loses a change.
    pub async fn changed(&mut self) {
        if !self.pending {
            match self.events.recv().await {
                Some(()) => self.pending = true,
                None => return self.restart().await,
            }
        }
        tokio::time::sleep(DEBOUNCE).await;
        while self.events.try_recv().is_ok() {}
        self.pending = false;
    }

    /// The monitor ended: start it again after a pause (returning counts as
    /// a change, since events may have been missed meanwhile).
    async fn restart(&mut self) {
        self.monitor = None;
        self.links = None;
        tokio::time::sleep(RETRY).await;
        match spawn_monitor() {
            Ok((child, links, events)) => {
                if self.warned {
                    tracing::info!("the firewall tamper guard's nft monitor runs again");
                }
                self.monitor = Some(child);
                self.links = links;
                self.events = events;
                self.warned = false;
            }
            Err(e) => {
                if !self.warned {
                    tracing::warn!("the firewall tamper guard cannot run nft monitor ({e}); checking the table every 500 ms instead");
                    self.warned = true;
                }
            }
        }
    }
}

/// Starts watching our table. Needs a tokio runtime (it spawns a task).
pub fn watch() -> Result<FirewallWatch, FirewallError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(FirewallError::Spawn(
            "the tamper guard needs a tokio runtime".into(),
        ));
    }
    let (child, links, events) = spawn_monitor()?;
    Ok(FirewallWatch {
        events,
        monitor: Some(child),
        links,
        pending: false,
        warned: false,
    })
}

/// `nft -j monitor` (required) and `ip -o monitor link` (best effort: without
/// it a new interface waits for the next check), both waking one channel.
#[allow(clippy::type_complexity)]
fn spawn_monitor() -> Result<(Child, Option<Child>, mpsc::Receiver<()>), FirewallError> {
    let (child, stdout) = spawn_monitor_process("nft", &["-j", "monitor"])?;
    let (tx, rx) = mpsc::channel(64);
    // Weak: when nft monitor ends the channel must close (the watch then
    // restarts both), whatever the link monitor does.
    let link_tx = tx.downgrade();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut sync = Some(tokio::spawn(prove_monitor_listens()));
        while let Ok(Some(line)) = lines.next_line().await {
            if sync.is_some() && line.contains(SYNC_TABLE) {
                if let Some(task) = sync.take() {
                    task.abort();
                }
                // The monitor listens from here on; whatever happened before
                // it did is found by the check this wake-up asks for.
                if tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
                continue;
            }
            // A full channel already holds a wake-up: dropping this is fine.
            let wake = touches_our_table(&line) || adds_elements_to_our_table(&line);
            if wake && tx.try_send(()).is_err() && tx.is_closed() {
                return;
            }
        }
        // Dropping tx tells FirewallWatch::changed that the monitor ended.
    });
    let links = match spawn_link_monitor(link_tx) {
        Ok(links) => Some(links),
        Err(e) => {
            tracing::warn!("the firewall tamper guard cannot watch network interfaces ({e}); a new interface gets its link-level chain at the next check");
            None
        }
    };
    Ok((child, links, rx))
}

/// Adds and deletes [`SYNC_TABLE`] in one transaction until the monitor
/// reports it (the caller aborts this task then). Not under the write lock:
/// it never touches our tables.
async fn prove_monitor_listens() {
    let sync = Table {
        family: NfFamily::INet,
        name: SYNC_TABLE.into(),
        handle: None,
    };
    for _ in 0..SYNC_TRIES {
        let mut batch = Batch::new();
        batch.add(NfListObject::Table(sync.clone()));
        batch.delete(NfListObject::Table(sync.clone()));
        if let Err(e) = run_nft(batch, "the tamper guard's start-up check").await {
            tracing::warn!("{e}");
        }
        tokio::time::sleep(SYNC_RETRY).await;
    }
    tracing::warn!("the firewall tamper guard's nft monitor did not report its start-up check; it relies on its events alone");
}

/// A long-running `program args…` whose output is read line by line; it is
/// killed when its handle is dropped.
fn spawn_monitor_process(
    program: &str,
    args: &[&str],
) -> Result<(Child, tokio::process::ChildStdout), FirewallError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| FirewallError::Spawn(format!("{program}: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| FirewallError::Spawn(format!("{program} monitor has no output")))?;
    Ok((child, stdout))
}

fn spawn_link_monitor(tx: mpsc::WeakSender<()>) -> Result<Child, FirewallError> {
    let (child, stdout) = spawn_monitor_process("ip", &["-o", "monitor", "link"])?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(_)) = lines.next_line().await {
            let Some(tx) = tx.upgrade() else { return };
            // A full channel already holds a wake-up.
            let _ = tx.try_send(());
        }
    });
    Ok(child)
}

/// Whether one line of `nft -j monitor` adds set elements to our table:
/// ours (DNS answers) or someone else's, which [`is_present`] tells apart.
/// Deleted elements (timeouts, someone else's deletes) only close.
fn adds_elements_to_our_table(line: &str) -> bool {
    let Ok(Value::Object(event)) = serde_json::from_str::<Value>(line.trim()) else {
        return false;
    };
    event.get("add").is_some_and(|added| {
        added
            .get("element")
            .is_some_and(|e| e["family"] == "inet" && e["table"] == TABLE)
    })
}

/// Whether one line of `nft -j monitor` is about our table (set elements
/// excepted). A line we cannot read counts as a change: checking costs one
/// listing, missing a change costs the lockdown.
fn touches_our_table(line: &str) -> bool {
    let ours = |family: &Value| family == "inet" || family == "netdev";
    let line = line.trim();
    if line.is_empty() {
        return false;
    }
    let Ok(Value::Object(event)) = serde_json::from_str::<Value>(line) else {
        return true;
    };
    event.values().any(|command| {
        let Some(objects) = command.as_object() else {
            return false;
        };
        objects.iter().any(|(kind, obj)| match kind.as_str() {
            "element" | "metainfo" => false,
            "table" => ours(&obj["family"]) && obj["name"] == TABLE,
            _ => ours(&obj["family"]) && obj["table"] == TABLE,
        })
    })
}

// ---------------------------------------------------------------------------
// Learned addresses.

/// Forgets the answers whose names (or ports) `names` no longer holds.
fn narrow(
    learned: &mut BTreeMap<LearnedKey, Instant>,
    sources: &mut BTreeMap<LearnedKey, BTreeSet<String>>,
    names: &[NamedEntry],
) {
    sources.retain(|&(_, proto, port), asked_by| {
        asked_by.retain(|name| names.iter().any(|n| &n.name == name && n.allows(proto, port)));
        !asked_by.is_empty()
    });
    learned.retain(|key, _| sources.contains_key(key));
}

/// Every answer the `known` sets hold.
fn known_keys() -> Vec<LearnedKey> {
    applied().sources.keys().copied().collect()
}

fn unexpired_learned(now: Instant) -> Vec<LearnedAddress> {
    let mut state = applied();
    state.learned.retain(|_, expiry| *expiry > now);
    state
        .learned
        .iter()
        .map(|(&(addr, proto, port), expiry)| LearnedAddress {
            addr,
            proto,
            port,
            timeout: expiry.saturating_duration_since(now),
        })
        .collect()
}

/// One element per key, with the later of the remembered and the new
/// expiry, the timeout clamped and rounded up to whole seconds.
fn merge_learned(
    known: &BTreeMap<(IpAddr, u8, u16), Instant>,
    entries: &[LearnedAddress],
    now: Instant,
) -> Vec<LearnedAddress> {
    let mut merged: BTreeMap<(IpAddr, u8, u16), Duration> = BTreeMap::new();
    for entry in entries {
        let key = (canonical(entry.addr), entry.proto, entry.port);
        let mut timeout = clamp_timeout(entry.timeout);
        if let Some(expiry) = known.get(&key) {
            timeout = timeout.max(expiry.saturating_duration_since(now));
        }
        let slot = merged.entry(key).or_insert(timeout);
        *slot = (*slot).max(timeout);
    }
    merged
        .into_iter()
        .map(|((addr, proto, port), timeout)| LearnedAddress {
            addr,
            proto,
            port,
            timeout: clamp_timeout(timeout),
        })
        .collect()
}

fn clamp_timeout(timeout: Duration) -> Duration {
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    Duration::from_secs(secs.clamp(MIN_TIMEOUT_SECS, MAX_TIMEOUT_SECS))
}

fn timeout_secs(timeout: Duration) -> u32 {
    u32::try_from(clamp_timeout(timeout).as_secs()).unwrap_or(u32::MAX)
}

fn learned_key(entry: &LearnedAddress) -> Expression<'static> {
    concat(vec![
        s(entry.addr.to_string()),
        Expression::Number(u32::from(entry.proto)),
        Expression::Number(u32::from(entry.port)),
    ])
}

fn learned_elem(entry: &LearnedAddress) -> Expression<'static> {
    Expression::Named(NamedExpression::Elem(Elem {
        val: Box::new(learned_key(entry)),
        timeout: Some(timeout_secs(entry.timeout)),
        expires: None,
        comment: None,
        counter: None,
    }))
}

/// add + delete + add for each element: the first add makes the delete
/// valid whether or not the element is there, the second add sets its
/// timeout (kernels before 6.10 or so keep the old timeout on a plain
/// re-add). One transaction, so no packet sees the element missing.
fn element_batch(entries: &[LearnedAddress]) -> Batch<'static> {
    let mut batch = Batch::new();
    for (set, v6) in [(ALLOW4, false), (ALLOW6, true)] {
        let mine: Vec<&LearnedAddress> = entries.iter().filter(|e| e.addr.is_ipv6() == v6).collect();
        if mine.is_empty() {
            continue;
        }
        let element = |elem: Vec<Expression<'static>>| {
            NfListObject::Element(Element {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: set.into(),
                elem: Cow::Owned(elem),
            })
        };
        let with_timeouts: Vec<_> = mine.iter().map(|e| learned_elem(e)).collect();
        batch.add(element(with_timeouts.clone()));
        batch.delete(element(mine.iter().map(|e| learned_key(e)).collect()));
        batch.add(element(with_timeouts));
    }
    batch
}

/// Adds answers to the `known` sets (no timeout: they stay while their
/// name and port are allowed; adding one that is there already is fine).
fn add_known(batch: &mut Batch<'static>, keys: &[LearnedKey]) {
    for (set, v6) in [(KNOWN4, false), (KNOWN6, true)] {
        let elems: Vec<Expression<'static>> = keys
            .iter()
            .filter(|(addr, _, _)| addr.is_ipv6() == v6)
            .map(|&(addr, proto, port)| concat(vec![s(addr.to_string()), num(proto), num(port)]))
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
}

// ---------------------------------------------------------------------------
// The LAN, from the routing table.

/// The directly connected subnets of this namespace (IPv4 and IPv6),
/// without the tunnel and loopback: where a DHCP server can be on-link.
fn connected_routes(tunnel: &str) -> Vec<(IpAddr, u8)> {
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
fn connected_networks(tunnel: &str) -> Vec<(IpAddr, u8)> {
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
fn parse_route_v4(text: &str, tunnel: &str) -> Vec<(IpAddr, u8)> {
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
fn parse_route_v6(text: &str, tunnel: &str) -> Vec<(IpAddr, u8)> {
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
fn normalize_nets(nets: Vec<(IpAddr, u8)>) -> Vec<(IpAddr, u8)> {
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

fn mask(addr: IpAddr, len: u8) -> (IpAddr, u8) {
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

// ---------------------------------------------------------------------------
// Building the table.

fn validate(lockdown: &Lockdown, allow: Option<&Allowlist>) -> Result<(), FirewallError> {
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

/// An IPv4-mapped IPv6 address (::ffff:a.b.c.d) travels as IPv4: match it
/// as such.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

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

fn num(n: impl Into<u32>) -> Expression<'static> {
    Expression::Number(n.into())
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

fn ct_mark() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: "mark".into(),
        family: None,
        dir: None,
    }))
}

fn ct_state() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: "state".into(),
        family: None,
        dir: None,
    }))
}

fn concat(parts: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts))
}

/// An address, or a prefix when shorter than the full length.
fn net((addr, len): (IpAddr, u8)) -> Expression<'static> {
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

fn set_of(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn ne(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

fn is_in(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::IN,
    })
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn refuse() -> Statement<'static> {
    Statement::Jump(JumpTarget {
        target: REFUSE.into(),
    })
}

fn ip(addr: &IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "ip"
    } else {
        "ip6"
    }
}

fn tcp_or_udp() -> Statement<'static> {
    is_in(meta(MetaKey::L4proto), set_of(vec![s("tcp"), s("udp")]))
}

/// ICMP and ICMPv6 error messages (what path MTU discovery and
/// unreachable reports are made of).
fn icmp_errors() -> [Statement<'static>; 2] {
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

fn established() -> Statement<'static> {
    is_in(ct_state(), set_of(vec![s("established"), s("related")]))
}

fn on_link() -> Statement<'static> {
    eq(payload("ip6", "hoplimit"), num(255u32))
}

/// Where neighbour discovery may go: link-local addresses, link-scope
/// multicast and the directly connected subnets. Hop limit 255 alone does
/// not keep a message on the link: a router forwards it like any other
/// packet (only the receiver refuses it as neighbour discovery), so a raw
/// socket could otherwise reach any IPv6 host outside the tunnel with it.
fn to_the_link_v6(on_link: &[(IpAddr, u8)]) -> Statement<'static> {
    let mut nets = vec![
        net((IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10)),
        net((IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0)), 16)),
    ];
    nets.extend(on_link.iter().filter(|(a, _)| a.is_ipv6()).map(|&n| net(n)));
    is_in(payload("ip6", "daddr"), set_of(nets))
}

fn icmpv6_types(types: &[&str]) -> Statement<'static> {
    is_in(
        payload("icmpv6", "type"),
        set_of(types.iter().map(|t| s(*t)).collect()),
    )
}

/// DHCP (68→67) and DHCPv6 (546→547) out, and their replies in, never
/// through the tunnel. DHCPv4 goes to the limited broadcast or to a server
/// on a directly connected subnet (unicast renewals to the lease's server);
/// replies come from such a server, or answer a renewal (conntrack). DHCPv6
/// goes to All_DHCP_Relay_Agents_and_Servers (ff02::1:2) or a link-local
/// address; replies come from a link-local address (RFC 8415 servers and
/// relays on the link answer from theirs). So a process that binds a DHCP
/// client port gets no channel to any host beyond the link.
fn dhcp_rules(
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
struct Inputs {
    /// `allow_lan`'s networks (empty without it).
    lan: Vec<(IpAddr, u8)>,
    /// The directly connected subnets (see [`connected_routes`]).
    on_link: Vec<(IpAddr, u8)>,
    /// Unexpired answers to put back, with their remaining time.
    learned: Vec<LearnedAddress>,
    /// Every answer whose name and port are still allowed.
    known: Vec<LearnedKey>,
}

/// [`build_table`] with only the LAN and learned addresses (unit tests).
#[cfg(test)]
fn build(
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
fn build_table(lockdown: &Lockdown, allow: Option<&Allowlist>, inputs: &Inputs) -> Batch<'static> {
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
    let too_big = if endpoint.is_ipv4() {
        vec![
            eq(payload("icmp", "type"), s("destination-unreachable")),
            eq(payload("icmp", "code"), s("frag-needed")),
        ]
    } else {
        vec![eq(payload("icmpv6", "type"), s("packet-too-big"))]
    };
    input.push(
        too_big
            .into_iter()
            .chain([
                is_in(ct_state(), set_of(vec![s("related")])),
                eq(
                    Expression::Named(NamedExpression::CT(CT {
                        key: "daddr".into(),
                        family: Some(if endpoint.is_ipv4() {
                            nftables::expr::CTFamily::IP
                        } else {
                            nftables::expr::CTFamily::IP6
                        }),
                        dir: Some(nftables::expr::CTDir::Original),
                    })),
                    s(endpoint.ip().to_string()),
                ),
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
        // quote a flow it tracks.
        for errors in icmp_errors() {
            input.push(vec![
                eq(meta(MetaKey::Iifname), s(tun)),
                is_in(ct_state(), set_of(vec![s("related")])),
                errors,
                accept(),
            ]);
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

// ---------------------------------------------------------------------------
// The link-level table.

/// Our second table (family netdev): an egress chain on every interface of
/// this namespace but `lo` and the tunnel. It sees what leaves through the
/// device whoever sent it: this namespace's packets, and those of a
/// macvlan/ipvlan child in another namespace or of a bridge port (VMs,
/// containers), which never meet the `inet` hooks here.
fn link_table() -> Table<'static> {
    Table {
        family: NfFamily::NetDev,
        name: TABLE.into(),
        handle: None,
    }
}

/// The interfaces of this namespace that get an egress chain, sorted:
/// every one but `lo` and the tunnel (from `/proc/net/dev`, which lists
/// the reading process's namespace).
fn link_devices(tunnel: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    parse_proc_net_dev(&text, tunnel)
}

fn parse_proc_net_dev(text: &str, tunnel: &str) -> Vec<String> {
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
/// tunnel's UDP to the endpoint (mark, address and port); DHCP and DHCPv6
/// as in the `inet` table; IPv6 neighbour discovery (hop limit 255) and
/// MLD reports (hop limit 1); the LAN under `allow_lan`.
fn add_link_table(batch: &mut Batch<'static>, lockdown: &Lockdown, inputs: &Inputs, devices: &[String]) {
    let endpoint = SocketAddr::new(canonical(lockdown.endpoint.ip()), lockdown.endpoint.port());
    batch.add(NfListObject::Table(link_table()));
    batch.delete(NfListObject::Table(link_table()));
    batch.add(NfListObject::Table(link_table()));

    let mut rules: Vec<Vec<Statement<'static>>> = Vec::new();
    rules.push(vec![eq(meta(MetaKey::Protocol), s("arp")), accept()]);
    rules.push(vec![
        eq(meta(MetaKey::Mark), num(lockdown.fwmark)),
        eq(payload(ip(&endpoint.ip()), "daddr"), s(endpoint.ip().to_string())),
        eq(payload("udp", "dport"), num(endpoint.port())),
        accept(),
    ]);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lockdown() -> Lockdown {
        Lockdown {
            endpoint: SocketAddr::from(([198, 51, 100, 2], 51820)),
            fwmark: 0x5347,
            tunnel_interface: "sg0".into(),
            allow_lan: false,
        }
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn session() -> Allowlist {
        Allowlist {
            rules: vec![
                AllowEntry {
                    net: (v4(203, 0, 113, 10), 32),
                    tcp: vec![443],
                    udp: vec![10000],
                },
                AllowEntry {
                    net: (v4(203, 0, 113, 0), 24),
                    tcp: vec![443],
                    udp: vec![],
                },
            ],
            names: vec![],
            dns_servers: vec![
                v4(192, 0, 2, 65),
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53)),
            ],
            tunnel_has_ipv6: false,
            dns_redirect: None,
        }
    }

    /// The batch as JSON values.
    fn objects(lockdown: &Lockdown, allow: Option<&Allowlist>, lan: &[(IpAddr, u8)]) -> Vec<Value> {
        let batch = build(lockdown, allow, lan, &[]);
        let value = serde_json::to_value(batch.to_nftables()).expect("encode");
        value["nftables"].as_array().expect("array").clone()
    }

    /// Each rule of a chain as compact JSON text, in order.
    fn rules(objects: &[Value], chain: &str) -> Vec<String> {
        objects
            .iter()
            .filter_map(|o| o.get("add").and_then(|a| a.get("rule")))
            .filter(|r| r["chain"] == chain)
            .map(|r| r["expr"].to_string())
            .collect()
    }

    fn position(rules: &[String], needle: &str) -> usize {
        rules
            .iter()
            .position(|r| r.contains(needle))
            .unwrap_or_else(|| panic!("no rule contains {needle}: {rules:#?}"))
    }

    #[test]
    fn replace_is_add_delete_add_of_our_table_only() {
        let objs = objects(&lockdown(), None, &[]);
        let cmds: Vec<String> = objs
            .iter()
            .take(3)
            .map(|o| o.as_object().expect("obj").keys().next().expect("cmd").clone())
            .collect();
        assert_eq!(cmds, ["add", "delete", "add"]);
        for o in &objs {
            let text = o.to_string();
            assert!(
                text.contains("\"sessiongate\""),
                "an object outside our table: {text}"
            );
            assert!(text.contains("\"inet\""), "{text}");
        }
    }

    #[test]
    fn base_chains_drop_and_output_ends_in_refusal() {
        let objs = objects(&lockdown(), None, &[]);
        let chains: Vec<&Value> = objs.iter().filter_map(|o| o["add"].get("chain")).collect();
        for name in [OUTPUT, INPUT, FORWARD] {
            let chain = chains.iter().find(|c| c["name"] == name).expect("chain");
            assert_eq!(chain["policy"], "drop", "{chain}");
            assert_eq!(chain["hook"], name);
        }
        let refuse = chains.iter().find(|c| c["name"] == REFUSE).expect("refuse");
        assert!(refuse.get("hook").is_none());
        let out = rules(&objs, OUTPUT);
        assert_eq!(out.last().expect("rules"), r#"[{"jump":{"target":"refuse"}}]"#);
        assert!(rules(&objs, FORWARD).is_empty());
        let refusals = rules(&objs, REFUSE);
        assert!(refusals[0].contains("tcp reset"), "{refusals:?}");
        assert!(refusals[1].contains("admin-prohibited"), "{refusals:?}");
    }

    #[test]
    fn lockdown_lets_only_marked_endpoint_traffic_out() {
        let objs = objects(&lockdown(), None, &[]);
        let out = rules(&objs, OUTPUT);
        let endpoint = &out[position(&out, "198.51.100.2")];
        assert!(
            endpoint.contains(r#""mark""#) && endpoint.contains("21319"),
            "{endpoint}"
        );
        assert!(endpoint.contains("51820"), "{endpoint}");
        let text = serde_json::to_string(&objs).expect("text");
        assert!(
            !text.contains(r#""op":"==","right":"sg0""#),
            "lockdown must not open the tunnel interface"
        );
        assert!(
            !text.contains("203.0.113"),
            "lockdown must not hold the allowlist"
        );
        assert!(!text.contains(DNS_REDIRECT));
        // Loopback first, DNS refused even in lockdown.
        assert!(out[0].contains(r#""right":"lo""#));
        position(&out, "853");
        let input = rules(&objs, INPUT);
        let reply = &input[position(&input, "198.51.100.2")];
        assert!(
            reply.contains("established") && reply.contains("sport"),
            "{reply}"
        );

        // "Only": run the output chain over a grid of packets and compare
        // every verdict with what lockdown promises (loopback, the marked
        // tunnel UDP to the endpoint's address and port, DHCP, on-link
        // neighbour discovery; nothing else).
        let endpoint = lockdown().endpoint;
        let fwmark = lockdown().fwmark;
        let mut wrong = Vec::new();
        let mut accepted = 0;
        for packet in packet_grid() {
            let promised = packet.oif == "lo"
                || packet.daddr.is_loopback()
                || (packet.mark == fwmark
                    && packet.proto == "udp"
                    && SocketAddr::new(packet.daddr, packet.dport) == endpoint)
                // DHCP only to the link (the unit test has no connected
                // subnets: the limited broadcast), never through the tunnel.
                || (packet.proto == "udp"
                    && packet.oif != "sg0"
                    && packet.sport == 68
                    && packet.dport == 67
                    && packet.daddr == IpAddr::V4(Ipv4Addr::BROADCAST))
                || (packet.proto == "udp"
                    && packet.oif != "sg0"
                    && packet.sport == 546
                    && packet.dport == 547
                    && (packet.daddr == "ff02::1:2".parse::<IpAddr>().expect("address")
                        || mask(packet.daddr, 10) == mask("fe80::".parse().expect("address"), 10)))
                // Neighbour discovery only to the link: link-local and
                // link-scope multicast here (no connected subnets).
                || (packet.proto == "ipv6-icmp"
                    && packet.hoplimit == 255
                    && ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]
                        .contains(&packet.icmp_type)
                    && (mask(packet.daddr, 10) == mask("fe80::".parse().expect("address"), 10)
                        || mask(packet.daddr, 16) == mask("ff02::".parse().expect("address"), 16)));
            let verdict = evaluate(&objs, OUTPUT, &packet);
            accepted += usize::from(verdict == Verdict::Accept);
            if (verdict == Verdict::Accept) != promised {
                wrong.push(format!("{packet:?}: {verdict:?}"));
            }
        }
        assert!(accepted > 0, "nothing accepted at all: the evaluator is broken");
        assert!(
            wrong.is_empty(),
            "verdicts differ from the lockdown's promise:\n{}",
            wrong.join("\n")
        );
    }

    /// One outgoing packet, as far as our rules look at it.
    #[derive(Debug, Clone)]
    struct Packet {
        oif: &'static str,
        mark: u32,
        daddr: IpAddr,
        /// "tcp", "udp", "icmp", "ipv6-icmp".
        proto: &'static str,
        sport: u16,
        dport: u16,
        icmp_type: &'static str,
        hoplimit: u8,
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Verdict {
        Accept,
        Refuse,
        Drop,
    }

    /// Every combination of a few values of each field that lockdown or a
    /// session rule looks at (and some they must not accept).
    fn packet_grid() -> Vec<Packet> {
        let marks = [0, 0x5347, 0x5348, VERIFY_MARK];
        let daddrs = [
            "198.51.100.2",
            "198.51.100.3",
            "203.0.113.10",
            "192.0.2.65",
            "127.0.0.1",
            "255.255.255.255",
            "2001:db8::1",
            "::1",
            "ff02::1:2",
            "fe80::1",
        ];
        let ports = [
            (40000u16, 51820u16),
            (51820, 40000),
            (40000, 51821),
            (68, 67),
            (40000, 67),
            (68, 40000),
            (546, 547),
            (40000, 547),
            (546, 40000),
            (68, 53),
            (40000, 53),
            (40000, 853),
            (40000, 443),
        ];
        let mut grid = Vec::new();
        for oif in ["eth0", "sg0", "lo"] {
            for mark in marks {
                for daddr in daddrs {
                    let daddr: IpAddr = daddr.parse().expect("address");
                    for proto in ["tcp", "udp"] {
                        for (sport, dport) in ports {
                            grid.push(Packet {
                                oif,
                                mark,
                                daddr,
                                proto,
                                sport,
                                dport,
                                icmp_type: "",
                                hoplimit: 64,
                            });
                        }
                    }
                    let icmp = if daddr.is_ipv6() { "ipv6-icmp" } else { "icmp" };
                    for icmp_type in [
                        "echo-request",
                        "nd-router-solicit",
                        "nd-neighbor-solicit",
                        "nd-neighbor-advert",
                        "nd-redirect",
                    ] {
                        for hoplimit in [255, 64] {
                            grid.push(Packet {
                                oif,
                                mark,
                                daddr,
                                proto: icmp,
                                sport: 0,
                                dport: 0,
                                icmp_type,
                                hoplimit,
                            });
                        }
                    }
                }
            }
        }
        grid
    }

    /// What `chain` of the built batch does with `packet`: the first rule
    /// whose matches all hold decides (a `jump refuse` is a refusal); the
    /// chain's policy when none does. Panics on a match it does not know, so
    /// a new kind of rule cannot slip past this model unnoticed.
    fn evaluate(objects: &[Value], chain: &str, packet: &Packet) -> Verdict {
        let v6 = packet.daddr.is_ipv6();
        let field = |left: &Value| -> Option<Value> {
            if let Some(key) = left.get("meta").and_then(|m| m["key"].as_str()) {
                return Some(match key {
                    "oifname" => Value::from(packet.oif),
                    "mark" => Value::from(packet.mark),
                    "l4proto" => Value::from(packet.proto),
                    "nfproto" => Value::from(if v6 { "ipv6" } else { "ipv4" }),
                    other => panic!("the model does not know meta {other}"),
                });
            }
            let payload = left
                .get("payload")
                .unwrap_or_else(|| panic!("the model does not know {left}"));
            let (proto, name) = (
                payload["protocol"].as_str().unwrap_or(""),
                payload["field"].as_str().unwrap_or(""),
            );
            let ports = ["tcp", "udp"].contains(&packet.proto);
            match (proto, name) {
                ("ip", "daddr") => (!v6).then(|| Value::from(packet.daddr.to_string())),
                ("ip6", "daddr") => v6.then(|| Value::from(packet.daddr.to_string())),
                ("ip6", "hoplimit") => v6.then(|| Value::from(packet.hoplimit)),
                ("th", "dport") => ports.then(|| Value::from(packet.dport)),
                ("th", "sport") => ports.then(|| Value::from(packet.sport)),
                ("tcp" | "udp", "dport") => (packet.proto == proto).then(|| Value::from(packet.dport)),
                ("tcp" | "udp", "sport") => (packet.proto == proto).then(|| Value::from(packet.sport)),
                ("icmpv6", "type") => (packet.proto == "ipv6-icmp").then(|| Value::from(packet.icmp_type)),
                other => panic!("the model does not know payload {other:?}"),
            }
        };
        let equals = |have: &Value, want: &Value| -> bool {
            if let Some(prefix) = want.get("prefix") {
                let (Some(addr), Some(len)) = (prefix["addr"].as_str(), prefix["len"].as_u64()) else {
                    panic!("odd prefix {want}")
                };
                let (Ok(net), Some(ip)) = (
                    addr.parse::<IpAddr>(),
                    have.as_str().and_then(|h| h.parse::<IpAddr>().ok()),
                ) else {
                    return false;
                };
                return match (net, ip) {
                    (IpAddr::V4(n), IpAddr::V4(i)) => {
                        len == 0 || (u32::from(n) >> (32 - len)) == (u32::from(i) >> (32 - len))
                    }
                    (IpAddr::V6(n), IpAddr::V6(i)) => {
                        len == 0 || (u128::from(n) >> (128 - len)) == (u128::from(i) >> (128 - len))
                    }
                    _ => false,
                };
            }
            have == want
        };
        let holds = |m: &Value| -> bool {
            let Some(have) = field(&m["left"]) else {
                return false;
            };
            let right = &m["right"];
            match m["op"].as_str() {
                Some("==") => equals(&have, right),
                Some("!=") => !equals(&have, right),
                Some("in") => right["set"]
                    .as_array()
                    .unwrap_or_else(|| panic!("odd set {right}"))
                    .iter()
                    .any(|w| equals(&have, w)),
                other => panic!("the model does not know op {other:?}"),
            }
        };
        for rule in objects
            .iter()
            .filter_map(|o| o.get("add").and_then(|a| a.get("rule")))
            .filter(|r| r["chain"] == chain)
        {
            let stmts = rule["expr"].as_array().expect("statements");
            if !stmts.iter().filter_map(|s| s.get("match")).all(holds) {
                continue;
            }
            for stmt in stmts {
                if stmt.get("accept").is_some() {
                    return Verdict::Accept;
                }
                if stmt.get("drop").is_some() {
                    return Verdict::Drop;
                }
                if stmt.get("jump").is_some_and(|j| j["target"] == REFUSE) || stmt.get("reject").is_some() {
                    return Verdict::Refuse;
                }
                if let Some(other) = stmt.get("jump").or_else(|| stmt.get("goto")) {
                    panic!("the model does not follow {other}");
                }
            }
        }
        Verdict::Drop
    }

    #[test]
    fn session_orders_pinned_dns_then_refusal_then_allowlist() {
        let objs = objects(&lockdown(), Some(&session()), &[]);
        let out = rules(&objs, OUTPUT);
        let pinned = position(&out, "192.0.2.65");
        let refused = position(&out, "853");
        let allow4 = position(&out, "@allow4\"");
        let nets4 = position(&out, "@allow4_nets");
        assert!(pinned < refused && refused < allow4 && allow4 < nets4, "{out:#?}");
        assert!(out[allow4].contains(r#""right":"sg0""#));
        assert!(out[pinned].contains(r#""right":"sg0""#));
        // No IPv6 tunnel: no IPv6 allow rules and no IPv6 resolver.
        assert!(!out.iter().any(|r| r.contains("@allow6")), "{out:#?}");
        assert!(!out.iter().any(|r| r.contains("2001:db8::53")));
        let input = rules(&objs, INPUT);
        position(&input, "established");

        let mut with_v6 = session();
        with_v6.tunnel_has_ipv6 = true;
        let out = rules(&objects(&lockdown(), Some(&with_v6), &[]), OUTPUT);
        position(&out, "@allow6\"");
        position(&out, "@allow6_nets");
        position(&out, "2001:db8::53");
    }

    #[test]
    fn literal_networks_go_to_interval_sets_without_overlaps() {
        let objs = objects(&lockdown(), Some(&session()), &[]);
        let sets: Vec<&Value> = objs.iter().filter_map(|o| o["add"].get("set")).collect();
        let nets4 = sets.iter().find(|s| s["name"] == ALLOW4_NETS).expect("set");
        assert_eq!(nets4["flags"], serde_json::json!(["interval"]));
        let elems = nets4["elem"].to_string();
        // 203.0.113.10/32 tcp 443 lies inside 203.0.113.0/24 tcp 443.
        assert_eq!(elems.matches("203.0.113.10").count(), 1, "{elems}");
        assert!(
            elems.contains(r#"{"prefix":{"addr":"203.0.113.0","len":24}}"#),
            "{elems}"
        );
        assert!(elems.contains("10000"));
        let dynamic = sets.iter().find(|s| s["name"] == ALLOW4).expect("set");
        assert_eq!(dynamic["flags"], serde_json::json!(["timeout"]));
        assert!(dynamic.get("elem").is_none());
    }

    #[test]
    fn dns_redirect_chain_only_when_asked() {
        let mut allow = session();
        assert!(!serde_json::to_string(&objects(&lockdown(), Some(&allow), &[]))
            .expect("text")
            .contains("\"redirect\":"));
        allow.dns_redirect = Some(DnsRedirect {
            port: 5354,
            stub_mark: 0x5348,
        });
        let objs = objects(&lockdown(), Some(&allow), &[]);
        let nat = rules(&objs, DNS_REDIRECT);
        assert!(nat[0].contains("21320") && nat[0].contains("return"), "{nat:?}");
        assert!(nat[1].contains("redirect") && nat[1].contains("5354"), "{nat:?}");
        let chain = objs
            .iter()
            .filter_map(|o| o["add"].get("chain"))
            .find(|c| c["name"] == DNS_REDIRECT)
            .expect("chain");
        assert_eq!(chain["prio"], -100);
        assert_eq!(chain["type"], "nat");
        assert_eq!(chain["policy"], "accept");
        allow.dns_redirect = Some(DnsRedirect {
            port: 5354,
            stub_mark: 0x5347,
        });
        assert!(validate(&lockdown(), Some(&allow)).is_err());
    }

    #[test]
    fn lan_rules_only_with_allow_lan_and_after_dns_refusal() {
        let lan = normalize_nets(vec![(v4(192, 168, 1, 0), 24), (v4(169, 254, 0, 0), 16)]);
        assert!(rules(&objects(&lockdown(), None, &lan), OUTPUT)
            .iter()
            .all(|r| !r.contains("192.168.1.0")));
        let with_lan = Lockdown {
            allow_lan: true,
            ..lockdown()
        };
        let objs = objects(&with_lan, None, &lan);
        let out = rules(&objs, OUTPUT);
        assert!(position(&out, "853") < position(&out, "192.168.1.0"));
        let input = rules(&objs, INPUT);
        let rule = &input[position(&input, "192.168.1.0")];
        assert!(rule.contains("saddr") && rule.contains("daddr"), "{rule}");
    }

    #[test]
    fn normalize_masks_dedupes_and_drops_covered_networks() {
        let nets = normalize_nets(vec![
            (v4(192, 0, 2, 7), 24),
            (v4(192, 0, 2, 0), 24),
            (v4(192, 0, 2, 66), 32),
            (v4(10, 1, 2, 3), 8),
            (v4(10, 9, 0, 0), 16),
            (v4(198, 51, 100, 1), 40),
        ]);
        assert_eq!(
            nets,
            vec![
                (v4(10, 0, 0, 0), 8),
                (v4(192, 0, 2, 0), 24),
                (v4(198, 51, 100, 1), 32)
            ]
        );
    }

    #[test]
    fn connected_routes_from_proc() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            veth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            veth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            sg0\t007100CB\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n\
            veth0\t006433C6\t010200C0\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(parse_route_v4(route, "sg0"), vec![(v4(192, 0, 2, 0), 24)]);
        let route6 = "20010db8000100000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     veth0\n\
            fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     veth0\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010db8000100000000000000000001 00000400 00000001 00000000 00000003     veth0\n\
            20010db8000200000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001      sg0\n\
            20010db8000100000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo\n\
            ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     veth0\n";
        assert_eq!(
            parse_route_v6(route6, "sg0"),
            vec![(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0)), 64)]
        );
    }

    #[test]
    fn learned_addresses_keep_the_later_expiry() {
        let now = Instant::now();
        let addr = v4(203, 0, 113, 80);
        let known = BTreeMap::from([((addr, TCP, 443), now + Duration::from_secs(300))]);
        let entries = [
            LearnedAddress {
                addr,
                proto: TCP,
                port: 443,
                timeout: Duration::from_secs(60),
            },
            LearnedAddress {
                addr: v4(203, 0, 113, 81),
                proto: UDP,
                port: 10000,
                timeout: Duration::from_millis(1500),
            },
            LearnedAddress {
                addr: v4(203, 0, 113, 81),
                proto: UDP,
                port: 10000,
                timeout: Duration::ZERO,
            },
        ];
        let merged = merge_learned(&known, &entries, now);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].timeout, Duration::from_secs(300));
        assert_eq!(merged[1].timeout, Duration::from_secs(2));
        assert_eq!(
            clamp_timeout(Duration::from_secs(10 * 86400)),
            Duration::from_secs(86400)
        );
        assert_eq!(clamp_timeout(Duration::ZERO), Duration::from_secs(1));
    }

    #[test]
    fn element_batch_adds_deletes_and_adds_per_family() {
        let batch = element_batch(&[
            LearnedAddress {
                addr: v4(203, 0, 113, 80),
                proto: TCP,
                port: 443,
                timeout: Duration::from_secs(30),
            },
            LearnedAddress {
                addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80)),
                proto: UDP,
                port: 10000,
                timeout: Duration::from_secs(30),
            },
        ]);
        let value = serde_json::to_value(batch.to_nftables()).expect("encode");
        let cmds: Vec<String> = value["nftables"]
            .as_array()
            .expect("array")
            .iter()
            .map(|o| {
                let (cmd, body) = o.as_object().expect("obj").iter().next().expect("cmd");
                format!("{cmd} {}", body["element"]["name"].as_str().expect("name"))
            })
            .collect();
        assert_eq!(
            cmds,
            [
                "add allow4",
                "delete allow4",
                "add allow4",
                "add allow6",
                "delete allow6",
                "add allow6"
            ]
        );
        let text = value.to_string();
        assert!(text.contains(r#""timeout":30"#), "{text}");
    }

    #[test]
    fn monitor_lines_about_our_table() {
        assert!(touches_our_table(
            r#"{"delete": {"table": {"family": "inet", "name": "sessiongate", "handle": 1}}}"#
        ));
        assert!(touches_our_table(
            r#"{"delete": {"rule": {"family": "inet", "table": "sessiongate", "chain": "output", "handle": 4}}}"#
        ));
        assert!(touches_our_table(
            r#"{"add": {"chain": {"family": "inet", "table": "sessiongate", "name": "output", "policy": "accept"}}}"#
        ));
        assert!(!touches_our_table(
            r#"{"add": {"element": {"family": "inet", "table": "sessiongate", "name": "allow4", "elem": {"set": []}}}}"#
        ));
        assert!(!touches_our_table(
            r#"{"delete": {"table": {"family": "ip", "name": "sessiongate", "handle": 1}}}"#
        ));
        assert!(!touches_our_table(
            r#"{"add": {"rule": {"family": "inet", "table": "firewalld", "chain": "x"}}}"#
        ));
        assert!(touches_our_table("not json"));
        assert!(!touches_our_table(""));
    }

    #[test]
    fn fingerprint_ignores_handles_and_elements() {
        let a: Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
                {"table": {"family": "inet", "name": "sessiongate", "handle": 5}},
                {"set": {"family": "inet", "table": "sessiongate", "name": "allow4", "handle": 2, "elem": ["x"]}},
                {"chain": {"family": "inet", "table": "sessiongate", "name": "output", "handle": 3,
                           "hook": "output", "policy": "drop"}},
                {"rule": {"family": "inet", "table": "sessiongate", "chain": "output", "handle": 9, "expr": []}}]}"#,
        )
        .expect("json");
        let mut b = a.clone();
        b["nftables"][1]["table"]["handle"] = 7.into();
        b["nftables"][2]["set"]["handle"] = 8.into();
        b["nftables"][2]["set"]["elem"] = serde_json::json!(["y", "z"]);
        b["nftables"][4]["rule"]["handle"] = 10.into();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert!(!has_base_chains(&a), "input and forward are missing");
        let mut full = a.clone();
        let list = full["nftables"].as_array_mut().expect("array");
        for name in [INPUT, FORWARD] {
            list.push(
                serde_json::json!({"chain": {"family": "inet", "table": "sessiongate",
                "name": name, "hook": name, "policy": "drop"}}),
            );
        }
        assert!(has_base_chains(&full));
        b["nftables"][3]["chain"]["policy"] = "accept".into();
        assert_ne!(fingerprint(&a), fingerprint(&b));
    }

    #[test]
    fn mapped_endpoint_is_matched_as_ipv4() {
        let mapped = Lockdown {
            endpoint: "[::ffff:198.51.100.2]:51820".parse().expect("addr"),
            ..lockdown()
        };
        let out = rules(&objects(&mapped, None, &[]), OUTPUT);
        let rule = &out[position(&out, "198.51.100.2")];
        assert!(rule.contains(r#"{"field":"daddr","protocol":"ip"}"#), "{rule}");
    }

    #[test]
    fn futures_are_send() {
        fn send<T: Send>(_: T) {}
        let allow = session();
        send(apply(&lockdown(), Some(&allow)));
        send(add_addresses("meet.test", &[]));
        send(remove());
        send(is_present());
    }

    #[test]
    fn watch_needs_a_runtime() {
        assert!(watch().is_err());
    }

    #[test]
    fn verify_probes_are_counted_just_before_the_final_refusal() {
        for allow in [None, Some(session())] {
            let objs = objects(&lockdown(), allow.as_ref(), &[]);
            let counter = objs
                .iter()
                .filter_map(|o| o["add"].get("counter"))
                .find(|c| c["name"] == REFUSED_COUNTER)
                .expect("the refused counter");
            assert_eq!(counter["table"], TABLE);
            let out = rules(&objs, OUTPUT);
            let counted = &out[out.len() - 2];
            assert!(
                counted.contains("21321") && counted.contains(r#"{"counter":"refused"}"#),
                "{counted}"
            );
            assert!(counted.ends_with(r#"{"jump":{"target":"refuse"}}]"#), "{counted}");
        }
        let listing: Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
                {"counter": {"family": "inet", "name": "refused", "table": "other", "packets": 9, "bytes": 1}},
                {"counter": {"family": "inet", "name": "refused", "table": "sessiongate", "handle": 3,
                             "packets": 2, "bytes": 120}}]}"#,
        )
        .expect("json");
        assert_eq!(counter_packets(&listing, REFUSED_COUNTER), Some(2));
        assert_eq!(counter_packets(&listing, "nope"), None);
        let mut later = listing.clone();
        later["nftables"][2]["counter"]["packets"] = 5.into();
        assert_eq!(
            fingerprint(&listing),
            fingerprint(&later),
            "counting is not tampering"
        );
    }

    #[test]
    fn nft_errors_keep_nft_words() {
        let stderr = "Error: Could not process rule: No such file or directory\n{\"nftables\": []}\n^^^^\n";
        assert_eq!(
            nft_reason(stderr),
            "Could not process rule: No such file or directory"
        );
        assert_eq!(
            nft_reason(
                "internal:0:0-0: Error: No such file or directory\n\
                 internal:0:0-0: Error: No such file or directory\n"
            ),
            "No such file or directory"
        );
        assert!(nft_reason("").contains("no message"));
    }

    #[test]
    fn interface_names_are_checked() {
        for bad in [
            "",
            "lo",
            "a-very-long-interface-name",
            "sg 0",
            "sg\"0",
            "sg*",
            "..",
            "sg:0",
        ] {
            let l = Lockdown {
                tunnel_interface: bad.into(),
                ..lockdown()
            };
            assert!(validate(&l, None).is_err(), "{bad:?}");
        }
        assert!(validate(&lockdown(), None).is_ok());
    }

    #[test]
    fn narrowing_forgets_answers_of_removed_names_and_ports_but_not_expired_ones() {
        let meet = |tcp: Vec<u16>| NamedEntry {
            name: "meet.test".into(),
            tcp,
            udp: vec![],
        };
        let now = Instant::now();
        let host = v4(203, 0, 113, 10);
        let mut learned = BTreeMap::from([((host, TCP, 443), now + Duration::from_secs(60))]);
        let mut sources = BTreeMap::from([
            ((host, TCP, 443), BTreeSet::from(["meet.test".to_string()])),
            // Expired from `learned`, still known: its flows go on.
            ((host, TCP, 9000), BTreeSet::from(["meet.test".to_string()])),
        ]);
        narrow(&mut learned, &mut sources, &[meet(vec![443, 9000])]);
        assert_eq!(sources.len(), 2);
        assert_eq!(learned.len(), 1);
        narrow(&mut learned, &mut sources, &[meet(vec![9000])]);
        assert_eq!(sources.keys().collect::<Vec<_>>(), [&(host, TCP, 9000)]);
        assert!(learned.is_empty());
        narrow(&mut learned, &mut sources, &[]);
        assert!(sources.is_empty());
    }

    #[test]
    fn dhcp_only_to_the_link_and_never_through_the_tunnel() {
        let inputs = Inputs {
            on_link: vec![(v4(192, 0, 2, 0), 26)],
            ..Inputs::default()
        };
        let batch = build_table(&lockdown(), None, &inputs);
        let value = serde_json::to_value(batch.to_nftables()).expect("encode");
        let objs = value["nftables"].as_array().expect("array").clone();
        for (chain, port) in [(OUTPUT, "68"), (INPUT, "67")] {
            let dhcp: Vec<String> = rules(&objs, chain)
                .into_iter()
                .filter(|r| {
                    r.contains(&format!(r#""right":{port}"#))
                        || r.contains(r#""right":546"#)
                        || r.contains(r#""right":547"#)
                })
                .collect();
            assert_eq!(dhcp.len(), 3, "{chain}: {dhcp:#?}");
            for rule in &dhcp {
                assert!(rule.contains(r#""op":"!=""#) && rule.contains("sg0"), "{rule}");
                assert!(
                    [
                        "255.255.255.255",
                        "192.0.2.0",
                        "ff02::1:2",
                        "fe80::",
                        "established"
                    ]
                    .iter()
                    .any(|only| rule.contains(only)),
                    "a DHCP rule open to any address: {rule}"
                );
            }
        }
    }

    #[test]
    fn postrouting_repeats_output_with_drops_and_without_the_verify_counter() {
        let objs = objects(&lockdown(), Some(&session()), &[]);
        let out = rules(&objs, OUTPUT);
        let post = rules(&objs, POSTROUTING);
        // The session's ct mark first, then output's rules but the counter.
        assert!(
            post[0].contains("mangle") && post[0].contains(&SESSION_CT_BIT.to_string()),
            "{post:#?}"
        );
        let post = &post[1..];
        // Neither the counter nor loopback by address (only `oifname lo`).
        assert_eq!(post.len(), out.len() - 3, "{post:#?}");
        assert!(post
            .iter()
            .all(|r| !r.contains("127.0.0.0") && !r.contains(r#""::1""#)));
        assert!(post
            .iter()
            .all(|r| !r.contains("refuse") && !r.contains(REFUSED_COUNTER)));
        assert_eq!(post.last().expect("rules"), r#"[{"drop":null}]"#);
        let chain = objs
            .iter()
            .filter_map(|o| o["add"].get("chain"))
            .find(|c| c["name"] == POSTROUTING)
            .expect("postrouting chain");
        assert_eq!(chain["hook"], "postrouting");
        assert_eq!(chain["policy"], "drop");
    }

    #[test]
    fn path_mtu_errors_for_the_tunnels_own_flow_and_mss_clamped_in_the_tunnel() {
        let objs = objects(&lockdown(), Some(&session()), &[]);
        let input = rules(&objs, INPUT);
        let too_big = &input[position(&input, "frag-needed")];
        assert!(
            too_big.contains("related") && too_big.contains("198.51.100.2") && too_big.contains("original"),
            "{too_big}"
        );
        let out = rules(&objs, OUTPUT);
        let clamp = &out[position(&out, "maxseg")];
        assert!(clamp.contains("sg0") && clamp.contains("mtu"), "{clamp}");
        let locked = rules(&objects(&lockdown(), None, &[]), OUTPUT);
        assert!(!locked.iter().any(|r| r.contains("maxseg")));
    }

    #[test]
    fn elements_that_are_not_our_answers_are_foreign() {
        let listing: Value = serde_json::from_str(
            r#"{"nftables": [
                {"set": {"family": "inet", "table": "sessiongate", "name": "allow4", "elem": [
                    {"elem": {"val": {"concat": ["203.0.113.10", "tcp", 443]}, "timeout": 90, "expires": 89}},
                    {"elem": {"val": {"concat": ["203.0.113.20", "tcp", 443]}, "timeout": 90}}]}},
                {"set": {"family": "inet", "table": "sessiongate", "name": "known6", "elem": [
                    {"concat": ["2001:db8::10", "udp", 10000]}]}},
                {"set": {"family": "inet", "table": "sessiongate", "name": "allow4_nets", "elem": [
                    {"concat": [{"prefix": {"addr": "203.0.113.0", "len": 24}}, "tcp", 443]}]}}]}"#,
        )
        .expect("json");
        let ours = |keys: &[LearnedKey]| -> BTreeMap<LearnedKey, BTreeSet<String>> {
            keys.iter()
                .map(|k| (*k, BTreeSet::from(["meet.test".to_string()])))
                .collect()
        };
        let meet = (v4(203, 0, 113, 10), TCP, 443);
        let meet6 = ("2001:db8::10".parse().expect("v6"), UDP, 10000);
        let foreign = foreign_elements(&listing, &ours(&[meet, meet6]));
        assert_eq!(foreign.len(), 1, "{foreign:?}");
        assert!(foreign[0].contains("203.0.113.20"), "{foreign:?}");
        assert_eq!(foreign_elements(&listing, &ours(&[meet])).len(), 2);

        assert!(adds_elements_to_our_table(
            r#"{"add": {"element": {"family": "inet", "table": "sessiongate", "name": "allow4", "elem": {"set": []}}}}"#
        ));
        assert!(!adds_elements_to_our_table(
            r#"{"delete": {"element": {"family": "inet", "table": "sessiongate", "name": "allow4", "elem": {"set": []}}}}"#
        ));
        assert!(!adds_elements_to_our_table(
            r#"{"add": {"element": {"family": "inet", "table": "other", "name": "allow4", "elem": {"set": []}}}}"#
        ));
    }

    #[test]
    fn link_table_closes_every_interface_but_lo_and_the_tunnel() {
        let dev = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
  sg0:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
 wlan0:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
  eth0:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
";
        assert_eq!(parse_proc_net_dev(dev, "sg0"), ["eth0", "wlan0"]);

        let mut batch = Batch::new();
        let inputs = Inputs {
            on_link: vec![(v4(192, 0, 2, 0), 26)],
            ..Inputs::default()
        };
        add_link_table(&mut batch, &lockdown(), &inputs, &["eth0".into(), "wlan0".into()]);
        let value = serde_json::to_value(batch.to_nftables()).expect("encode");
        let objs = value["nftables"].as_array().expect("array").clone();
        let chains: Vec<&Value> = objs.iter().filter_map(|o| o["add"].get("chain")).collect();
        assert_eq!(chains.len(), 2);
        for chain in &chains {
            assert_eq!(chain["family"], "netdev");
            assert_eq!(chain["hook"], "egress");
            assert_eq!(chain["policy"], "drop");
        }
        let egress = rules(&objs, "egress0");
        let endpoint = &egress[position(&egress, "198.51.100.2")];
        assert!(
            endpoint.contains("21319") && endpoint.contains("51820"),
            "{endpoint}"
        );
        assert!(egress.iter().all(|r| !r.contains("sg0")), "{egress:#?}");
        assert!(!egress
            .iter()
            .any(|r| r.contains("192.0.2.0") && !r.contains("67")));
        for rule in &egress {
            assert!(rule.ends_with(r#"{"accept":null}]"#), "{rule}");
        }
        assert!(touches_our_table(
            r#"{"delete": {"chain": {"family": "netdev", "table": "sessiongate", "name": "egress0"}}}"#
        ));
    }
}
