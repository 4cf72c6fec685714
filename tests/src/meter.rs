//! The leak meter: nft table `inet labmeter` in the router namespace. It
//! counts every packet that arrives from the client's veth (forwarded or for
//! the router itself) except the tunnel's UDP to 198.51.100.2:51820, and
//! records where such packets went. IPv6 neighbour discovery / router
//! solicitation / MLD are not counted: they are link control (what ARP is for
//! IPv4, which an inet table does not see) and carry nothing of the user's.
//! Owns that table.

use anyhow::{Context, Result};
use serde_json::Value;

use crate::lab::{addr, Lab, Ns};

const TABLE: &str = "labmeter";
const COUNTER: &str = "escaped";

fn ruleset() -> String {
    let client_if = addr::ROUTER_CLIENT_IF;
    let gw = addr::GATEWAY_V4;
    let port = addr::WG_PORT;
    format!(
        r#"table inet {TABLE} {{
	counter {COUNTER} {{
	}}
	set ports4 {{
		type ipv4_addr . inet_proto . inet_service
		size 65535
		flags dynamic
	}}
	set ports6 {{
		type ipv6_addr . inet_proto . inet_service
		size 65535
		flags dynamic
	}}
	set other4 {{
		type ipv4_addr . inet_proto
		size 65535
		flags dynamic
	}}
	set other6 {{
		type ipv6_addr . inet_proto
		size 65535
		flags dynamic
	}}
	chain tally {{
		ip daddr {gw} udp dport {port} return
		icmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld-listener-done, mld2-listener-report }} return
		counter name {COUNTER}
		meta nfproto ipv4 meta l4proto {{ tcp, udp }} add @ports4 {{ ip daddr . meta l4proto . th dport }}
		meta nfproto ipv6 meta l4proto {{ tcp, udp }} add @ports6 {{ ip6 daddr . meta l4proto . th dport }}
		meta nfproto ipv4 meta l4proto != {{ tcp, udp }} add @other4 {{ ip daddr . meta l4proto }}
		meta nfproto ipv6 meta l4proto != {{ tcp, udp }} add @other6 {{ ip6 daddr . meta l4proto }}
	}}
	chain watch_input {{
		type filter hook input priority filter; policy accept;
		iifname "{client_if}" jump tally
	}}
	chain watch_forward {{
		type filter hook forward priority filter; policy accept;
		iifname "{client_if}" jump tally
	}}
}}
"#
    )
}

impl Lab {
    pub(crate) fn install_meter(&self) -> Result<()> {
        self.exec_stdin(Ns::Router, &["nft", "-f", "-"], ruleset().as_bytes())
            .context("installing the leak meter")?;
        Ok(())
    }

    /// Packets that left the client other than the tunnel's own UDP to the
    /// gateway endpoint, since setup or the last `reset_leaks`.
    pub fn leaks(&self) -> Result<u64> {
        let out = self.exec_ok(
            Ns::Router,
            &["nft", "-j", "list", "counter", "inet", TABLE, COUNTER],
        )?;
        let v: Value = serde_json::from_str(&out).context("parsing nft -j output")?;
        v.get("nftables")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find_map(|item| item.get("counter")?.get("packets")?.as_u64())
            .with_context(|| format!("no counter in nft output: {out}"))
    }

    /// Zeroes the leak counter and forgets the recorded destinations.
    pub fn reset_leaks(&self) -> Result<()> {
        self.exec_ok(Ns::Router, &["nft", "reset", "counter", "inet", TABLE, COUNTER])?;
        let flush: String = ["ports4", "ports6", "other4", "other6"]
            .iter()
            .map(|s| format!("flush set inet {TABLE} {s}\n"))
            .collect();
        self.exec_stdin(Ns::Router, &["nft", "-f", "-"], flush.as_bytes())?;
        Ok(())
    }

    /// Where leaked packets went, e.g. `["203.0.113.53 udp/53",
    /// "203.0.113.10 icmp"]` (since setup or the last `reset_leaks`).
    pub fn leak_destinations(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for set in ["ports4", "ports6", "other4", "other6"] {
            let out = self.exec_ok(Ns::Router, &["nft", "-j", "list", "set", "inet", TABLE, set])?;
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

    /// `leaks()` and `leak_destinations()` as one line for assertion messages.
    pub fn leak_report(&self) -> String {
        match (self.leaks(), self.leak_destinations()) {
            (Ok(n), Ok(d)) => format!("{n} packets leaked, to: [{}]", d.join(", ")),
            (Err(e), _) | (_, Err(e)) => format!("leak meter unreadable: {e:#}"),
        }
    }
}
