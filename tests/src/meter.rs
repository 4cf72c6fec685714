//! The lab's two leak meters. Owns the nft tables `inet labmeter` (router)
//! and `inet labtunnelmeter` (gateway) and the list of what the tunnel meter
//! lets pass. Never changes a verdict: both tables only count (policy accept).
//!
//! *Outside the tunnel* (`leaks`): in the router namespace, every packet that
//! arrives from the client's veth, counted in `prerouting`, before the
//! routing decision: the router drops some packets before its forward and
//! input hooks (a multicast group it has not joined, such as mDNS, LLMNR and
//! SSDP; a TTL that ends there; an address it has no route for, which is
//! anything outside the lab's networks), and each of them left the client
//! all the same. Except
//! the tunnel's UDP to 198.51.100.2:51820: a datagram to that address and port
//! counts too unless it starts like a WireGuard message (type 1-4 and three
//! zero bytes), so an application's own UDP to the endpoint is a leak like
//! any other. IPv6 neighbour discovery / router
//! solicitation / MLD are not counted: they are link control (what ARP is for
//! IPv4, which an inet table does not see) and carry nothing of the user's.
//!
//! *Inside the tunnel* (`tunnel_leaks`): in the gateway namespace, every
//! packet that comes out of the gateway's WireGuard interface (decrypted, from
//! any peer, so also a plain wireguard client's) unless its destination
//! address, protocol and port are in the allowed list. Counted in `prerouting`,
//! before the routing decision, so packets for the gateway itself (which go to
//! `input`, e.g. DNS to the pinned resolver) and forwarded ones are both seen,
//! and so are packets the gateway would then drop. The allowed list is derived
//! from a profile's text (`set_tunnel_allowed_profile`): each `[[allow]]`
//! host (a name resolved with the pinned resolver's current answers, or a
//! literal address/CIDR) on its TCP and UDP ports, and the `[dns]` servers on
//! TCP/UDP 53 — so DNS to any other server, and 853 anywhere, counts (also
//! when an `[[allow]]` lists 53 or 853: the product refuses those). At setup
//! it follows the lab's standard profile. Also not counted: link control as
//! above, and ICMP errors that conntrack relates to a flow it has seen (an
//! error about an allowed flow carries nothing new; an error about a
//! forbidden flow follows a packet that was counted already).
//! Ports in the allowed list may be ranges (`udp = ["50000-60000"]`).
//!
//! *After the gateway's filter* (`meter_tunnel_after_gateway_filter`): for
//! the gateway-enforced kind, where the machine sends everything into the
//! tunnel by design and the gateway's own filter (gateway.rs) enforces
//! the allowlist, the inside meter moves from `prerouting` to what the
//! gateway lets through: forwarded packets from the tunnel in
//! `postrouting` (what leaves toward the internet) and packets from the
//! tunnel for the gateway itself in `input`.

use std::net::IpAddr;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::lab::{addr, lock, Lab, Ns};

const TABLE: &str = "labmeter";
const TUNNEL_TABLE: &str = "labtunnelmeter";
const COUNTER: &str = "escaped";
/// DNS and DNS-over-TLS/QUIC: never allowed through an `[[allow]]` rule.
const DNS_PORTS: [u16; 2] = [53, 853];
const DESTINATION_SETS: [&str; 4] = ["ports4", "ports6", "other4", "other6"];

/// IPv6 link control, never counted by either meter.
const LINK_CONTROL_V6: &str = "nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, \
     mld-listener-report, mld-listener-done, mld2-listener-report";

/// Sets that record where counted packets went, and the rules that count
/// them (chain `tally`), shared by both meters.
fn tally_parts() -> (String, String) {
    let sets = r#"
	counter escaped {
	}
	set ports4 {
		type ipv4_addr . inet_proto . inet_service
		size 65535
		flags dynamic
	}
	set ports6 {
		type ipv6_addr . inet_proto . inet_service
		size 65535
		flags dynamic
	}
	set other4 {
		type ipv4_addr . inet_proto
		size 65535
		flags dynamic
	}
	set other6 {
		type ipv6_addr . inet_proto
		size 65535
		flags dynamic
	}"#
    .to_string();
    let chain = format!(
        r#"
	chain tally {{
		counter name {COUNTER}
		meta nfproto ipv4 meta l4proto {{ tcp, udp }} add @ports4 {{ ip daddr . meta l4proto . th dport }}
		meta nfproto ipv6 meta l4proto {{ tcp, udp }} add @ports6 {{ ip6 daddr . meta l4proto . th dport }}
		meta nfproto ipv4 meta l4proto != {{ tcp, udp }} add @other4 {{ ip daddr . meta l4proto }}
		meta nfproto ipv6 meta l4proto != {{ tcp, udp }} add @other6 {{ ip6 daddr . meta l4proto }}
	}}"#
    );
    (sets, chain)
}

fn outside_ruleset() -> String {
    let client_if = addr::ROUTER_CLIENT_IF;
    let gw = addr::GATEWAY_V4;
    let port = addr::WG_PORT;
    let (sets, tally) = tally_parts();
    format!(
        r#"table inet {TABLE} {{{sets}{tally}
	chain check {{
		ip daddr {gw} udp dport {port} @th,64,32 {{ 0x01000000, 0x02000000, 0x03000000, 0x04000000 }} return
		icmpv6 type {{ {LINK_CONTROL_V6} }} return
		jump tally
	}}
	chain watch_arrivals {{
		type filter hook prerouting priority filter; policy accept;
		iifname "{client_if}" jump check
	}}
}}
"#
    )
}

fn tunnel_ruleset(wg_if: &str) -> String {
    let (sets, tally) = tally_parts();
    format!(
        r#"table inet {TUNNEL_TABLE} {{{sets}
	set allowed4 {{
		type ipv4_addr . inet_proto . inet_service
		flags interval
	}}
	set allowed6 {{
		type ipv6_addr . inet_proto . inet_service
		flags interval
	}}{tally}
	chain check {{
		icmpv6 type {{ {LINK_CONTROL_V6} }} return
		meta l4proto {{ icmp, ipv6-icmp }} ct state related return
		meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @allowed4 return
		meta l4proto {{ tcp, udp }} ip6 daddr . meta l4proto . th dport @allowed6 return
		jump tally
	}}
	chain watch_tunnel {{
		type filter hook prerouting priority mangle; policy accept;
		iifname "{wg_if}" jump check
	}}
}}
"#
    )
}

/// One destination the inside meter lets pass: an address or network, a
/// protocol and a port or range of ports (`port..=last_port`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TunnelFlow {
    /// Address with prefix length, e.g. `203.0.113.10/32`.
    pub net: String,
    /// "tcp" or "udp".
    pub proto: &'static str,
    /// The first port.
    pub port: u16,
    /// The last port (`port` for a single one).
    pub last_port: u16,
}

impl std::fmt::Display for TunnelFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.net, self.proto, self.ports())
    }
}

impl TunnelFlow {
    /// One port.
    pub fn new(net: &str, proto: &'static str, port: u16) -> TunnelFlow {
        TunnelFlow {
            net: net.to_string(),
            proto,
            port,
            last_port: port,
        }
    }

    fn is_ipv6(&self) -> bool {
        self.net.contains(':')
    }

    /// `PORT` or `FIRST-LAST`, as nft writes them.
    fn ports(&self) -> String {
        if self.port == self.last_port {
            self.port.to_string()
        } else {
            format!("{}-{}", self.port, self.last_port)
        }
    }

    /// Whether `other` adds nothing to this one (the same network and
    /// protocol, its ports inside these).
    fn covers(&self, other: &TunnelFlow) -> bool {
        self.net == other.net
            && self.proto == other.proto
            && self.port <= other.port
            && other.last_port <= self.last_port
    }
}

/// A port list's entries as (first, last) without 53 and 853 (the
/// product refuses those whatever the list says), so a range that holds
/// them comes out in pieces.
fn without_dns_ports(ranges: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for &(first, last) in ranges {
        let mut start = u32::from(first);
        let end = u32::from(last);
        for dns in DNS_PORTS.map(u32::from) {
            if (start..=end).contains(&dns) {
                if dns > start {
                    out.push((start, dns - 1));
                }
                start = dns + 1;
            }
        }
        if start <= end {
            out.push((start, end));
        }
    }
    out.into_iter()
        .filter_map(|(a, b)| Some((u16::try_from(a).ok()?, u16::try_from(b).ok()?)))
        .collect()
}

/// A host of a profile's `[[allow]]` as the meter sees it.
#[derive(Debug, Clone)]
enum AllowedHost {
    Name(String),
    Net(String),
}

/// A port list as (first, last) pairs.
type PortList = Vec<(u16, u16)>;

/// What the tunnel meter follows: a profile's allow rules and DNS servers.
#[derive(Debug, Clone, Default)]
pub(crate) struct FollowedProfile {
    /// Each `[[allow]]`: its host, TCP and UDP ports as (first, last).
    rules: Vec<(AllowedHost, PortList, PortList)>,
    dns_servers: Vec<String>,
}

/// `ADDR` or `ADDR/PREFIX` as `ADDR/PREFIX`; None if not an address.
fn as_net(text: &str) -> Option<String> {
    let (a, p) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let ip: IpAddr = a.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match p {
        Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
        None => max,
    };
    Some(format!("{ip}/{prefix}"))
}

pub(crate) fn parse_profile(toml_text: &str) -> Result<FollowedProfile> {
    let doc: toml::Table = toml_text.parse().context("the profile is not valid TOML")?;
    // A port (a number or its text) or a range "FIRST-LAST".
    let port_of = |p: &toml::Value| -> Option<(u16, u16)> {
        if let Some(n) = p.as_integer() {
            let n = u16::try_from(n).ok()?;
            return Some((n, n));
        }
        let text = p.as_str()?;
        let (a, b) = text.split_once('-').unwrap_or((text, text));
        Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
    };
    let ports = |v: Option<&toml::Value>| -> Result<PortList> {
        v.and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| port_of(p).with_context(|| format!("{p} is not a port or a range of ports")))
            .collect()
    };
    let mut rules = Vec::new();
    for rule in doc
        .get("allow")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
    {
        let host = rule
            .get("host")
            .and_then(toml::Value::as_str)
            .context("an [[allow]] without host")?;
        let host = match as_net(host) {
            Some(net) => AllowedHost::Net(net),
            None => AllowedHost::Name(host.trim_end_matches('.').to_ascii_lowercase()),
        };
        rules.push((host, ports(rule.get("tcp"))?, ports(rule.get("udp"))?));
    }
    let mut dns_servers = Vec::new();
    for s in doc
        .get("dns")
        .and_then(|d| d.get("servers"))
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
    {
        let text = s.as_str().context("a DNS server that is not a string")?;
        dns_servers.push(as_net(text).with_context(|| format!("DNS server {text} is not an address"))?);
    }
    Ok(FollowedProfile { rules, dns_servers })
}

impl Lab {
    pub(crate) fn install_meter(&self) -> Result<()> {
        self.exec_stdin(Ns::Router, &["nft", "-f", "-"], outside_ruleset().as_bytes())
            .context("installing the leak meter")?;
        let wg_if = self.gateway_ifname();
        self.exec_stdin(
            Ns::Gateway,
            &["nft", "-f", "-"],
            tunnel_ruleset(&wg_if).as_bytes(),
        )
        .context("installing the tunnel leak meter")?;
        Ok(())
    }

    /// Moves the inside meter after the gateway's filter (see the module
    /// comment): it then counts what the gateway lets out of the tunnel,
    /// not what the machine sends into it.
    pub fn meter_tunnel_after_gateway_filter(&self) -> Result<()> {
        let wg_if = self.gateway_ifname();
        let script = format!(
            "flush chain inet {TUNNEL_TABLE} watch_tunnel\n\
             delete chain inet {TUNNEL_TABLE} watch_tunnel\n\
             add chain inet {TUNNEL_TABLE} watch_leaving {{ type filter hook postrouting priority filter; policy accept; }}\n\
             add rule inet {TUNNEL_TABLE} watch_leaving iifname \"{wg_if}\" jump check\n\
             add chain inet {TUNNEL_TABLE} watch_local {{ type filter hook input priority filter; policy accept; }}\n\
             add rule inet {TUNNEL_TABLE} watch_local iifname \"{wg_if}\" jump check\n"
        );
        self.exec_stdin(Ns::Gateway, &["nft", "-f", "-"], script.as_bytes())
            .context("moving the tunnel leak meter after the gateway's filter")?;
        Ok(())
    }

    /// Makes the outside meter count what arrives from the second client's
    /// link as well (`Lab::add_second_client`).
    pub(crate) fn watch_second_client_link(&self) -> Result<()> {
        self.watch_router_link(addr::ROUTER_SECOND_CLIENT_IF)
            .context("making the leak meter watch the second client")
    }

    /// Makes the outside meter watch another of the router's links to a
    /// client (the second client's, the roaming link).
    pub(crate) fn watch_router_link(&self, link: &str) -> Result<()> {
        let script = format!("add rule inet {TABLE} watch_arrivals iifname \"{link}\" jump check\n");
        self.exec_stdin(Ns::Router, &["nft", "-f", "-"], script.as_bytes())
            .with_context(|| format!("making the leak meter watch {link}"))?;
        Ok(())
    }

    /// Packets that left the client other than the tunnel's own UDP to the
    /// gateway endpoint, since setup or the last `reset_leaks`.
    pub fn leaks(&self) -> Result<u64> {
        read_counter(self, Ns::Router, TABLE)
    }

    /// Zeroes the outside meter and forgets its recorded destinations.
    pub fn reset_leaks(&self) -> Result<()> {
        reset_meter(self, Ns::Router, TABLE)
    }

    /// Where leaked packets went, e.g. `["203.0.113.53 udp/53",
    /// "203.0.113.10 icmp"]` (since setup or the last `reset_leaks`).
    pub fn leak_destinations(&self) -> Result<Vec<String>> {
        read_destinations(self, Ns::Router, TABLE)
    }

    /// `leaks()` and `leak_destinations()` as one line for assertion messages.
    pub fn leak_report(&self) -> String {
        match (self.leaks(), self.leak_destinations()) {
            (Ok(n), Ok(d)) => format!("{n} packets leaked outside the tunnel, to: [{}]", d.join(", ")),
            (Err(e), _) | (_, Err(e)) => format!("leak meter unreadable: {e:#}"),
        }
    }

    /// Packets that came out of the tunnel at the gateway to something the
    /// allowed list does not hold, since setup or the last
    /// `reset_tunnel_leaks` (see the module comment for what is allowed).
    pub fn tunnel_leaks(&self) -> Result<u64> {
        read_counter(self, Ns::Gateway, TUNNEL_TABLE)
    }

    /// Zeroes the inside meter and forgets its recorded destinations (the
    /// allowed list stays).
    pub fn reset_tunnel_leaks(&self) -> Result<()> {
        reset_meter(self, Ns::Gateway, TUNNEL_TABLE)
    }

    /// Where the packets `tunnel_leaks` counted went, in the same form as
    /// `leak_destinations`.
    pub fn tunnel_leak_destinations(&self) -> Result<Vec<String>> {
        read_destinations(self, Ns::Gateway, TUNNEL_TABLE)
    }

    /// `tunnel_leaks()`, where they went and what was allowed, as one line.
    pub fn tunnel_leak_report(&self) -> String {
        let allowed: Vec<String> = self.tunnel_allowed().iter().map(ToString::to_string).collect();
        match (self.tunnel_leaks(), self.tunnel_leak_destinations()) {
            (Ok(n), Ok(d)) => format!(
                "{n} packets leaked inside the tunnel, to: [{}] (allowed: [{}])",
                d.join(", "),
                allowed.join(", ")
            ),
            (Err(e), _) | (_, Err(e)) => format!("tunnel leak meter unreadable: {e:#}"),
        }
    }

    /// Zeroes both meters.
    pub fn reset_all_leaks(&self) -> Result<()> {
        self.reset_leaks()?;
        self.reset_tunnel_leaks()
    }

    /// Panics unless both meters read zero, with both reports.
    #[track_caller]
    pub fn assert_no_leaks(&self) {
        let outside = self.leaks();
        let inside = self.tunnel_leaks();
        if !matches!((&outside, &inside), (Ok(0), Ok(0))) {
            panic!(
                "leak meters not at zero:\n  {}\n  {}",
                self.leak_report(),
                self.tunnel_leak_report()
            );
        }
    }

    /// What the inside meter lets pass now, sorted.
    pub fn tunnel_allowed(&self) -> Vec<TunnelFlow> {
        lock(&self.tunnel_meter).allowed.clone()
    }

    /// Makes the inside meter let exactly `flows` pass (replaces the list and
    /// stops following a profile: later pinned-answer changes add nothing).
    pub fn set_tunnel_allowed(&self, flows: &[TunnelFlow]) -> Result<()> {
        let mut meter = lock(&self.tunnel_meter);
        meter.followed = None;
        write_allowed(self, flows)?;
        meter.allowed = sorted(flows.to_vec());
        Ok(())
    }

    /// Makes the inside meter follow a profile (its TOML text, e.g.
    /// `ProfileFiles::toml`): its allowed hosts on their ports, names resolved
    /// with the pinned resolver's current answers, and its DNS servers on
    /// TCP/UDP 53. Replaces the list (narrowing included). While it follows a
    /// profile, `set_pinned_answers` adds a name's new addresses (and keeps
    /// the old ones: the product may keep using an answer until it expires).
    pub fn set_tunnel_allowed_profile(&self, toml_text: &str) -> Result<()> {
        let followed = parse_profile(toml_text)?;
        let mut meter = lock(&self.tunnel_meter);
        let flows = self.flows_of(&followed);
        write_allowed(self, &flows)?;
        meter.allowed = sorted(flows);
        meter.followed = Some(followed);
        Ok(())
    }

    /// Called after the pinned resolver's answers changed: the followed
    /// profile's names may resolve to new addresses.
    pub(crate) fn tunnel_meter_answers_changed(&self) -> Result<()> {
        let mut meter = lock(&self.tunnel_meter);
        let Some(followed) = meter.followed.clone() else {
            return Ok(());
        };
        let mut flows = meter.allowed.clone();
        flows.extend(self.flows_of(&followed));
        let flows = sorted(flows);
        write_allowed(self, &flows)?;
        meter.allowed = flows;
        Ok(())
    }

    pub(crate) fn flows_of(&self, profile: &FollowedProfile) -> Vec<TunnelFlow> {
        let mut flows = Vec::new();
        for (host, tcp, udp) in &profile.rules {
            let nets: Vec<String> = match host {
                AllowedHost::Net(n) => vec![n.clone()],
                AllowedHost::Name(name) => self
                    .pinned_answers(name)
                    .iter()
                    .filter_map(|a| as_net(a))
                    .collect(),
            };
            for net in nets {
                for (proto, ports) in [("tcp", tcp), ("udp", udp)] {
                    // DNS and DNS-over-TLS only to the pinned servers on 53,
                    // whatever the allow list says (as the product does).
                    for (port, last_port) in without_dns_ports(ports) {
                        flows.push(TunnelFlow {
                            net: net.clone(),
                            proto,
                            port,
                            last_port,
                        });
                    }
                }
            }
        }
        for server in &profile.dns_servers {
            for proto in ["tcp", "udp"] {
                flows.push(TunnelFlow::new(server, proto, 53));
            }
        }
        flows
    }
}

/// State of the inside meter kept by the lab.
#[derive(Default)]
pub(crate) struct TunnelMeterState {
    allowed: Vec<TunnelFlow>,
    followed: Option<FollowedProfile>,
}

/// Sorted, without flows another one covers (an interval set refuses
/// overlapping elements).
fn sorted(mut flows: Vec<TunnelFlow>) -> Vec<TunnelFlow> {
    flows.sort();
    flows.dedup();
    let all = flows.clone();
    flows.retain(|f| !all.iter().any(|o| o != f && o.covers(f)));
    flows
}

/// Replaces the allowed sets in one nft transaction.
fn write_allowed(lab: &Lab, flows: &[TunnelFlow]) -> Result<()> {
    let mut script =
        format!("flush set inet {TUNNEL_TABLE} allowed4\nflush set inet {TUNNEL_TABLE} allowed6\n");
    for (set, v6) in [("allowed4", false), ("allowed6", true)] {
        let elems: Vec<String> = flows
            .iter()
            .filter(|f| f.is_ipv6() == v6)
            .map(|f| format!("{} . {} . {}", f.net, f.proto, f.ports()))
            .collect();
        if !elems.is_empty() {
            script.push_str(&format!(
                "add element inet {TUNNEL_TABLE} {set} {{ {} }}\n",
                elems.join(", ")
            ));
        }
    }
    lab.exec_stdin(Ns::Gateway, &["nft", "-f", "-"], script.as_bytes())
        .context("setting what the tunnel leak meter allows")?;
    Ok(())
}

fn read_counter(lab: &Lab, ns: Ns, table: &str) -> Result<u64> {
    let out = lab.exec_ok(ns, &["nft", "-j", "list", "counter", "inet", table, COUNTER])?;
    let v: Value = serde_json::from_str(&out).context("parsing nft -j output")?;
    v.get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find_map(|item| item.get("counter")?.get("packets")?.as_u64())
        .with_context(|| format!("no counter in nft output: {out}"))
}

fn reset_meter(lab: &Lab, ns: Ns, table: &str) -> Result<()> {
    let mut script = format!("reset counter inet {table} {COUNTER}\n");
    for s in DESTINATION_SETS {
        script.push_str(&format!("flush set inet {table} {s}\n"));
    }
    lab.exec_stdin(ns, &["nft", "-f", "-"], script.as_bytes())?;
    Ok(())
}

fn read_destinations(lab: &Lab, ns: Ns, table: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for set in DESTINATION_SETS {
        let out = lab.exec_ok(ns, &["nft", "-j", "list", "set", "inet", table, set])?;
        let v: Value = serde_json::from_str(&out).context("parsing nft -j output")?;
        let elems = v
            .get("nftables")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|item| item.get("set")?.get("elem")?.as_array())
            .flatten();
        for e in elems {
            // An element is {"concat": [...]} or {"elem": {"val": {"concat": ...}}}.
            let concat = e
                .get("concat")
                .or_else(|| e.get("elem")?.get("val")?.get("concat"));
            let Some(parts) = concat.and_then(Value::as_array) else {
                continue;
            };
            let text: Vec<String> = parts
                .iter()
                .map(|p| match p {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            found.push(match text.as_slice() {
                [a, proto, port] => format!("{a} {proto}/{port}"),
                other => other.join(" "),
            });
        }
    }
    found.sort();
    Ok(found)
}
