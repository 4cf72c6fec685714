//! A network that blocks UDP, and the TCP relay beside the gateway that
//! gets a session through it (issue 17, item 4).
//!
//! Owns: the `tcprelay` process in the gateway namespace (TCP on
//! 198.51.100.2:443, forwarding to wireguard-go's UDP port), the router's
//! `inet labblockudp` table that drops every UDP packet from the client,
//! and the one exception the outside leak meter makes for the relay's TCP
//! flow. Never: change a verdict of sessiond's tables, or exempt anything
//! from the meter but TCP to the relay's address and port.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::lab::{addr, Lab, LabChild, Ns};
use crate::util::{self, wait_until};

/// The relay's port: 443, which networks that block UDP still let out.
pub const RELAY_PORT: u16 = 443;
/// The relay's address and port, as a profile's `tcp_endpoint` gives it.
pub const RELAY_ENDPOINT: &str = "198.51.100.2:443";

const BLOCK_TABLE: &str = "labblockudp";
const BLOCK_COUNTER: &str = "udp_dropped";

impl Lab {
    /// Starts `tcprelay` in the gateway namespace and waits until it
    /// listens; from then on the outside meter counts the client's TCP to
    /// the relay's address and port as the tunnel's own (as it does the
    /// WireGuard messages to 51820), and nothing else more.
    pub fn start_tcp_relay(&self) -> Result<LabChild> {
        let relay = util::find_binary("tcprelay")?;
        let relay = relay.to_string_lossy().into_owned();
        let forward = format!("127.0.0.1:{}", addr::WG_PORT);
        let child = self.spawn_named(Ns::Gateway, "tcprelay", &[&relay, RELAY_ENDPOINT, &forward])?;
        let listening = format!("{RELAY_ENDPOINT} ");
        wait_until(Duration::from_secs(10), "the TCP relay to listen", || {
            self.exec_ok(Ns::Gateway, &["ss", "-Htln"])
                .is_ok_and(|out| out.lines().any(|l| l.contains(&listening)))
        })
        .with_context(|| format!("tcprelay: {}", child.log()))?;
        self.exec_ok(
            Ns::Router,
            &[
                "nft",
                "insert",
                "rule",
                "inet",
                "labmeter",
                "check",
                "ip",
                "daddr",
                addr::GATEWAY_V4,
                "tcp",
                "dport",
                &RELAY_PORT.to_string(),
                "return",
            ],
        )
        .context("exempting the relay's TCP from the outside meter")?;
        Ok(child)
    }

    /// Makes the router drop every UDP packet that comes from the client
    /// (a hotel or company network that lets only TCP out), counting them.
    pub fn block_udp_from_client(&self) -> Result<()> {
        let ruleset = format!(
            "table inet {BLOCK_TABLE} {{\n\
             \tcounter {BLOCK_COUNTER} {{ }}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter - 10; policy accept;\n\
             \t\tiifname \"{client}\" meta l4proto udp counter name {BLOCK_COUNTER} drop\n\
             \t}}\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter - 10; policy accept;\n\
             \t\tiifname \"{client}\" meta l4proto udp counter name {BLOCK_COUNTER} drop\n\
             \t}}\n\
             }}\n",
            client = addr::ROUTER_CLIENT_IF
        );
        self.exec_stdin(Ns::Router, &["nft", "-f", "-"], ruleset.as_bytes())
            .context("blocking UDP from the client on the router")?;
        Ok(())
    }

    /// Lets the client's UDP through the router again (the network stopped
    /// blocking it).
    pub fn unblock_udp_from_client(&self) -> Result<()> {
        self.exec_ok(Ns::Router, &["nft", "delete", "table", "inet", BLOCK_TABLE])
            .context("unblocking UDP from the client on the router")?;
        Ok(())
    }

    /// How many UDP packets from the client the router dropped.
    pub fn udp_dropped(&self) -> Result<u64> {
        let out = self.exec_ok(
            Ns::Router,
            &["nft", "-j", "list", "counter", "inet", BLOCK_TABLE, BLOCK_COUNTER],
        )?;
        let json: serde_json::Value = serde_json::from_str(&out).context("reading the UDP drop counter")?;
        json["nftables"]
            .as_array()
            .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
            .context("no UDP drop counter in the router's ruleset")
    }
}
