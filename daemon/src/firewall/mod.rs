//! The kill switch: two nftables tables, `inet sessiongate` and `netdev
//! sessiongate`, replaced as a whole in one atomic transaction each time
//! their shape changes, by one value, [`Firewall`].
//!
//! # What this module owns, and what it must never do
//!
//! It owns the tables `inet sessiongate` and `netdev sessiongate` and
//! nothing else. It never touches another table (it only ever names its
//! own, in writes and in reads), and it
//! never removes its table from a `Drop` or a panic path: the table is kernel
//! state that outlives a crashed daemon, which is what keeps the machine
//! closed until `sessionctl stop` ([`Firewall::remove`] is the only way
//! out). Every change is one nftables transaction (one libnftables call, or
//! one `nft -j -f -` run): either all of it is in the kernel or none of it
//! is. It keeps no process-wide state: what was applied lives in the
//! [`Firewall`] value, which the session creates from the daemon's
//! [`NftRunner`] and owns (through its effects seam), and shares by `Arc`
//! with the DNS answer path, verify and the tamper guard. It decides no
//! order: the session machine says when to apply, add or remove.
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
//! [`Firewall::refused_packets`] can prove that a probe was refused by this
//! table and not by the far end. The rule changes no verdict.
//!
//! *Lockdown* ([`Firewall::apply`] with `None`), in rule order (each group
//! one function of `build`, named after it):
//! - output: `oifname lo`, and loopback by address too (127.0.0.0/8, ::1:
//!   after a nat `redirect` the output interface is still the one routed
//!   before nat ran, so `oifname lo` alone would miss redirected DNS); the
//!   tunnel's own UDP to the endpoint, which must carry the tunnel's fwmark
//!   *and* go to the endpoint's address *and* port (over TCP: its TCP to
//!   the relay instead, and while such a session tries UDP again,
//!   `udp_probe`, the gateway's UDP beside it); DHCP (68→67) to the
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
//! *Session* ([`Firewall::apply`] with `Some`): lockdown plus, through
//! `oifname` of the tunnel only (a name, so the table can go up before the interface exists):
//! - the pinned DNS servers on TCP/UDP 53 (before the 53/853 refusal);
//! - `daddr . l4proto . dport` in four named sets: `allow4_nets`/`allow6_nets`
//!   (flags interval: the profile's literal addresses and CIDRs, fixed at
//!   apply time) and `allow4`/`allow6` (flags timeout: addresses from DNS
//!   answers, added by [`Firewall::add_addresses`] with a timeout). Two kinds of set
//!   because the kernel refuses an element that overlaps an interval already
//!   in the set (`File exists`), which would fail a whole DNS update whenever
//!   an answer falls inside a literal CIDR. A literal entry's port range is
//!   an interval element of `allow*_nets` (overlapping entries are cut
//!   into pieces first, see `build::port_pieces`); a name's port range has
//!   sets of its own holding addresses only (`allow4_udp_50000_60000`,
//!   timeout, and `known4_udp_50000_60000`; see `learned` for why not one
//!   interval set), matched by rules that name the range;
//! - the gateway-enforced kind ([`Allowlist::gateway_enforces`]): any
//!   TCP/UDP out through the tunnel and its established replies in, after
//!   the 53/853 refusal (IPv6 only with an IPv6 tunnel address);
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
//! [`Firewall::apply`], leaving out the tunnel interface, `lo`, gateway routes and any
//! /0, plus link-local (169.254.0.0/16, fe80::/10), link-local multicast
//! (224.0.0.0/24, ff02::/16), SSDP (239.255.255.250) and broadcast. Output
//! may go to those; input is accepted only when source *and* destination are
//! LAN addresses, so a neighbour cannot probe the tunnel's address through
//! the physical interface (CVE-2019-14899). A subnet that appears later is
//! closed until the next [`Firewall::apply`] (fail closed).
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
//! [`Firewall::add_addresses`] remembers what it added (in the value) with
//! the expiry and the name it answered, and every session-shape apply puts
//! the unexpired ones back with their remaining time, so replacing the
//! table (tamper guard, shape change) does not close a host the stub
//! already answered for; but only those whose name and port the new
//! [`Allowlist::names`] still holds: a reload that narrows closes at once,
//! for new and established flows alike. A lockdown
//! apply and [`Firewall::remove`] forget them: a new session never inherits
//! the last one's answers. Every write holds the value's one lock (around
//! what it applied) from start to end, so an update cannot land in a table
//! that a concurrent apply is about to replace.
//!
//! # Tamper guard
//!
//! [`Firewall::watch`] runs `nft -j monitor` as a child and wakes on any
//! event about our table except deleted set elements;
//! [`Firewall::is_present`] then says whether
//! the table still has the chains, rules and sets we last applied (a
//! listing taken right after each apply, without handles and without the
//! elements of the answer sets, is the reference), and whether every
//! element of the answer sets is one of this session's answers (so a host
//! or port someone else adds is taken out by the caller's re-apply).
//!
//! The `nftables` crate builds the batches; they go to the kernel through
//! the value's [`NftRunner`] (the daemon's one way to nft, [`crate::nft`]):
//! libnftables in process (a change is then about 1 ms instead of a 16 ms
//! `nft` spawn), or `nft -j -f -` when the library is missing or
//! `--nft-binary` asks for it. Either way nft's own error message reaches
//! the user (the crate's helper drops stderr).
//!
//! # Modules
//!
//! This module is the policy and the owner: the types that say what a shape
//! allows ([`Lockdown`], [`Allowlist`], ...), and [`Firewall`], the public
//! operations over the one lock and what the value last applied. The parts,
//! each pure or with one job:
//! - `build`: the `inet` table's shapes, one function per rule group, and
//!   `build_table` the list of them in order (pure);
//! - `link`: the `netdev` table's egress chains and their interfaces;
//! - `expr`: the expression and statement helpers both are made of;
//! - `lan`: the directly connected subnets, from `/proc`;
//! - `learned`: DNS answers as set elements, merged and narrowed;
//! - `guard`: the tamper guard's monitor and its comparisons;
//! - `runner`: our batches and listings through the [`NftRunner`], nft's
//!   words in our errors;
//! - `conntrack`: deleting the session's tracked flows;
//! - `tests` and `golden` (unit tests only): the shapes' rules, and every
//!   batch byte for byte against `golden/`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use nftables::batch::Batch;
use nftables::schema::NfListObject;
use serde_json::Value;

pub use crate::profile::PortRange;

mod build;
mod conntrack;
mod expr;
#[cfg(test)]
mod golden;
mod guard;
mod lan;
mod learned;
mod link;
mod runner;
#[cfg(test)]
mod tests;

pub use guard::FirewallWatch;

use build::{build_table, validate, Inputs};
use conntrack::forget_session_flows;
use expr::table;
use guard::{fingerprint, foreign_elements, has_base_chains};
use lan::{connected_networks, connected_routes};
use learned::{add_known, element_batch, known_keys, merge_learned, narrow, unexpired_learned};
pub use link::PortalException;
use link::{add_link_table, add_portal_exception, link_devices, link_table};
use runner::{list_one, list_table, run_nft};

use crate::nft::NftRunner;

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
/// The named counter of refused verify probes (see
/// [`Firewall::refused_packets`]).
pub const REFUSED_COUNTER: &str = "refused";
/// SO_MARK of `sessionctl verify`'s blocked-traffic probes ("SI"). Neither
/// the tunnel's nor the DNS stub's mark, so the probes are routed and
/// filtered like any application's packets; only the `refused` counter
/// looks at it.
pub const VERIFY_MARK: u32 = 0x5349;

/// The conntrack mark bit our `postrouting` chain sets on every flow that
/// leaves during a session (tunnel, endpoint, loopback alike), so that
/// [`Firewall::remove`] and a fresh lockdown can delete exactly the
/// session's flows. One bit, OR-ed in: whatever else another program keeps
/// in the ct mark stays.
pub const SESSION_CT_BIT: u32 = 0x4000_0000;

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
    /// The tunnel's own flow to `endpoint`: UDP to the gateway, or TCP to
    /// a relay beside it where the network blocks UDP (`endpoint` is then
    /// the relay). Only that one flow is let out, never both.
    pub endpoint_protocol: EndpointProtocol,
    /// The gateway's UDP while a session over TCP tries whether UDP gets
    /// through again (`transport = "auto"`): the tunnel's marked UDP to
    /// this address and port, and its replies, beside the flow above. The
    /// session machine sets it only for the length of that probe.
    pub udp_probe: Option<SocketAddr>,
}

/// The protocol of the tunnel's own flow to the endpoint (`status` shows
/// it as `udp` or `tcp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointProtocol {
    #[default]
    Udp,
    Tcp,
}

impl EndpointProtocol {
    /// nftables' name for it.
    pub(crate) fn nft_name(self) -> &'static str {
        match self {
            EndpointProtocol::Udp => "udp",
            EndpointProtocol::Tcp => "tcp",
        }
    }
}

/// One literal allowlist entry: a network and its ports and port ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    pub net: (IpAddr, u8),
    pub tcp: Vec<PortRange>,
    pub udp: Vec<PortRange>,
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
    pub tcp: Vec<PortRange>,
    pub udp: Vec<PortRange>,
}

impl NamedEntry {
    /// Whether this name lists exactly `ports` (a port, or a range as a
    /// whole) for `proto`: answers are learned per listed entry, and a
    /// range's answers live in that range's own sets.
    fn allows(&self, proto: u8, ports: PortRange) -> bool {
        match proto {
            TCP => self.tcp.contains(&ports),
            UDP => self.udp.contains(&ports),
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
    /// The gateway-enforced kind (`[gateway] enforces_allowlist`): every
    /// TCP and UDP packet may go into the tunnel, to any address and port,
    /// and the practice's gateway enforces the allowlist. DNS stays pinned
    /// (53 and 853 are refused before this rule), nothing leaves off the
    /// tunnel, and IPv6 only with an IPv6 tunnel address.
    pub gateway_enforces: bool,
}

/// A learned address (from a DNS answer) for one protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnedAddress {
    pub addr: IpAddr,
    /// [`TCP`] or [`UDP`].
    pub proto: u8,
    /// One port (the `allow4`/`allow6` sets) or a range as the name lists
    /// it (that range's own sets, see [`range_set_name`]).
    pub ports: PortRange,
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
// The owner.

/// (address, protocol, port or range) of a learned address.
type LearnedKey = (IpAddr, u8, PortRange);

/// The kill switch of this process: our two tables in the kernel, the way
/// to nft, and what this value last applied. The session owns it (through
/// its effects); the DNS answer path, verify and the tamper guard share it
/// by `Arc`. Every method takes `&self`: the writes are serialised inside.
///
/// Make one per process: two values would each believe their own books
/// about the same kernel tables.
pub struct Firewall {
    nft: NftRunner,
    /// What this value last applied. Held for the whole of every write, and
    /// of every read that compares against it, so a DNS update cannot
    /// interleave with a replace (nor land in a table an apply is about to
    /// replace).
    applied: tokio::sync::Mutex<Applied>,
}

#[derive(Default)]
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

impl Firewall {
    /// A firewall that has applied nothing yet and reaches nft through
    /// `nft`. Changes nothing until it is told to.
    pub fn new(nft: NftRunner) -> Firewall {
        Firewall {
            nft,
            applied: tokio::sync::Mutex::new(Applied::default()),
        }
    }

    /// Replaces our whole table with the lockdown shape (`allow` = None) or
    /// the session shape, in one transaction: either the new table is in
    /// place or the old one still is. Works whether or not the table exists.
    pub async fn apply(&self, lockdown: &Lockdown, allow: Option<&Allowlist>) -> Result<(), FirewallError> {
        self.apply_with_portal(lockdown, allow, None).await
    }

    /// [`Firewall::apply`], with the captive-portal namespace's traffic let
    /// through the link-level table as its one named exception (see
    /// [`PortalException`]); the `inet` table is the same either way.
    pub async fn apply_with_portal(
        &self,
        lockdown: &Lockdown,
        allow: Option<&Allowlist>,
        portal: Option<&PortalException>,
    ) -> Result<(), FirewallError> {
        validate(lockdown, allow)?;
        let lan = if lockdown.allow_lan {
            connected_networks(&lockdown.tunnel_interface)
        } else {
            Vec::new()
        };
        let on_link = connected_routes(&lockdown.tunnel_interface);
        let mut state = self.applied.lock().await;
        // A lockdown that starts a session (nothing applied by this process
        // since the last removal, or a daemon that resumes after a crash): no
        // flow of an earlier session may go on into this one.
        let fresh_start = allow.is_none() && state.tunnel.is_none();
        // Narrowing takes effect here, at once: answers for names or ports the
        // new allowlist no longer holds are forgotten, so neither new nor
        // established flows to them pass the new table.
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
        let inputs = Inputs {
            lan,
            on_link,
            learned: unexpired_learned(&mut state.learned, Instant::now()),
            known: known_keys(&state.sources),
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
            if let Some(portal) = portal {
                add_portal_exception(&mut batch, &devices, portal);
            }
            // Until the new reference is taken, is_present checks the structure only.
            state.fingerprint = None;
            state.tunnel = Some(lockdown.tunnel_interface.clone());
            state.devices = devices.clone();
            match run_nft(&self.nft, batch, "firewall table").await {
                Ok(()) => break,
                Err(e) if attempts < 2 && link_devices(&lockdown.tunnel_interface) != devices => {
                    tracing::debug!("the interfaces changed during a firewall change ({e}); trying again");
                    attempts += 1;
                }
                Err(e) => return Err(e),
            }
        }
        state.fingerprint = match list_table(&self.nft).await {
            Ok(Some(listing)) => Some(fingerprint(&listing)),
            Ok(None) | Err(_) => None,
        };
        if fresh_start {
            forget_session_flows().await;
        }
        Ok(())
    }

    /// Adds learned addresses (answers for the allowed name `name`) to the
    /// allow sets, each with its timeout, in one transaction. An address
    /// already there gets the later of its current and its new expiry.
    /// Entries whose name and port the allowlist in force does not hold are
    /// left out (an answer that arrives after a narrowing must not widen it
    /// again).
    pub async fn add_addresses(&self, name: &str, entries: &[LearnedAddress]) -> Result<(), FirewallError> {
        for entry in entries {
            if entry.proto != TCP && entry.proto != UDP {
                return Err(FirewallError::Invalid(format!(
                    "learned address {}: protocol {} is neither TCP (6) nor UDP (17)",
                    entry.addr, entry.proto
                )));
            }
        }
        let mut state = self.applied.lock().await;
        let now = Instant::now();
        let allowed: Vec<LearnedAddress> = entries
            .iter()
            .filter(|e| {
                state
                    .names
                    .iter()
                    .any(|n| n.name == name && n.allows(e.proto, e.ports))
            })
            .copied()
            .collect();
        let merged = merge_learned(&state.learned, &allowed, now);
        if merged.is_empty() {
            return Ok(());
        }
        let mut batch = element_batch(&merged);
        let keys: Vec<LearnedKey> = merged.iter().map(|e| (e.addr, e.proto, e.ports)).collect();
        add_known(&mut batch, &keys);
        run_nft(&self.nft, batch, "allowlist update").await?;
        state.learned.retain(|_, expiry| *expiry > now);
        for entry in &merged {
            let key = (entry.addr, entry.proto, entry.ports);
            state.learned.insert(key, now + entry.timeout);
            state.sources.entry(key).or_default().insert(name.to_string());
        }
        Ok(())
    }

    /// Deletes our table. Already gone is fine.
    pub async fn remove(&self) -> Result<(), FirewallError> {
        let mut state = self.applied.lock().await;
        // Adding the (empty) table first makes the delete succeed whether or
        // not it exists, in one transaction.
        let mut batch = Batch::new();
        for table in [table(), link_table()] {
            batch.add(NfListObject::Table(table.clone()));
            batch.delete(NfListObject::Table(table));
        }
        run_nft(&self.nft, batch, "removal of the firewall table").await?;
        *state = Applied::default();
        // Then no flow of the session outlives it in connection tracking.
        forget_session_flows().await;
        Ok(())
    }

    /// Whether our table is in the kernel with the chains, rules and sets we
    /// last applied (or, if this value has not applied it, with its three
    /// base chains at policy drop).
    ///
    /// With a reference, also every element of the sets that DNS answers fill
    /// must be one of this session's answers: an element someone else added (a
    /// host, a port) makes the table "damaged", and the caller's re-apply
    /// takes it out. The elements of the literal sets are part of the
    /// reference itself.
    pub async fn is_present(&self) -> Result<bool, FirewallError> {
        // No write in flight: our own element adds are in the books before we
        // compare against them.
        let state = self.applied.lock().await;
        let Some(listing) = list_table(&self.nft).await? else {
            return Ok(false);
        };
        if !has_base_chains(&listing) {
            return Ok(false);
        }
        let Some(expected) = &state.fingerprint else {
            return Ok(true);
        };
        if fingerprint(&listing) != *expected {
            return Ok(false);
        }
        let foreign = foreign_elements(&listing, &state.sources);
        if !foreign.is_empty() {
            tracing::warn!(
                "someone else added elements to the sessiongate firewall's sets: {}",
                foreign.join(", ")
            );
            return Ok(false);
        }
        if let Some(tunnel) = &state.tunnel {
            let links = link_devices(tunnel);
            if state.devices != links {
                tracing::info!(
                    "the network interfaces changed: the link-level table is put on {}",
                    links.join(", ")
                );
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// How many packets carrying [`VERIFY_MARK`] our table has refused at the
    /// end of its output chain since it was last replaced (the named counter
    /// `refused`). `sessionctl verify` reads it before and after a probe.
    pub async fn refused_packets(&self) -> Result<u64, FirewallError> {
        let listing = list_table(&self.nft)
            .await?
            .ok_or_else(|| FirewallError::Listing("the table is not in place".into()))?;
        counter_packets(&listing, REFUSED_COUNTER)
            .ok_or_else(|| FirewallError::Listing(format!("it has no counter {REFUSED_COUNTER:?}")))
    }

    /// Whether any table of ours is in the kernel, whatever its shape (the
    /// early-boot unit's lockdown has only the `inet` one).
    pub async fn any_table_exists(&self) -> Result<bool, FirewallError> {
        let _state = self.applied.lock().await;
        Ok(list_one(&self.nft, "inet").await?.is_some() || list_one(&self.nft, "netdev").await?.is_some())
    }

    /// Starts the tamper guard on our tables (see [`FirewallWatch`]); it
    /// reaches nft the way this firewall does. Needs a tokio runtime.
    pub fn watch(&self) -> Result<FirewallWatch, FirewallError> {
        guard::watch(self.nft.clone())
    }
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
