//! Unit tests of the firewall's pure parts: the shapes as nft JSON (and a
//! small evaluator that walks the rules with packets), `/proc` parsing,
//! answer bookkeeping, monitor lines and listings.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use nftables::batch::Batch;
use serde_json::Value;

use super::build::{build, build_table, port_pieces, validate, Inputs};
use super::guard::{
    adds_elements_to_our_table, fingerprint, foreign_elements, has_base_chains, joined_ruleset_events,
    touches_our_table,
};
use super::lan::{mask, normalize_nets, parse_route_v4, parse_route_v6};
use super::learned::{clamp_timeout, element_batch, merge_learned, narrow};
use super::link::{add_link_table, parse_proc_net_dev};
use super::runner::nft_reason;

use super::*;

fn lockdown() -> Lockdown {
    Lockdown {
        endpoint: SocketAddr::from(([198, 51, 100, 2], 51820)),
        fwmark: 0x5347,
        tunnel_interface: "sg0".into(),
        allow_lan: false,
        endpoint_protocol: EndpointProtocol::Udp,
        udp_probe: None,
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
                tcp: vec![p(443)],
                udp: vec![p(10000)],
            },
            AllowEntry {
                net: (v4(203, 0, 113, 0), 24),
                tcp: vec![p(443)],
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
        gateway_enforces: false,
    }
}

/// One port.
fn p(port: u16) -> PortRange {
    PortRange::single(port)
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
    let known = BTreeMap::from([((addr, TCP, p(443)), now + Duration::from_secs(300))]);
    let entries = [
        LearnedAddress {
            addr,
            proto: TCP,
            ports: p(443),
            timeout: Duration::from_secs(60),
        },
        LearnedAddress {
            addr: v4(203, 0, 113, 81),
            proto: UDP,
            ports: p(10000),
            timeout: Duration::from_millis(1500),
        },
        LearnedAddress {
            addr: v4(203, 0, 113, 81),
            proto: UDP,
            ports: p(10000),
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
            ports: p(443),
            timeout: Duration::from_secs(30),
        },
        LearnedAddress {
            addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80)),
            proto: UDP,
            ports: p(10000),
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
fn over_tcp_the_lockdown_lets_out_the_marked_tcp_to_the_relay_and_no_udp_to_it() {
    let relay = Lockdown {
        endpoint: SocketAddr::from(([198, 51, 100, 2], 443)),
        endpoint_protocol: EndpointProtocol::Tcp,
        ..lockdown()
    };
    let out = rules(&objects(&relay, None, &[]), OUTPUT);
    let to_relay: Vec<_> = out.iter().filter(|r| r.contains("198.51.100.2")).collect();
    assert_eq!(to_relay.len(), 1, "{to_relay:#?}");
    let rule = to_relay[0];
    assert!(
        rule.contains(r#"{"field":"dport","protocol":"tcp"}"#)
            && rule.contains("443")
            && rule.contains(&0x5347.to_string()),
        "{rule}"
    );
    assert!(!rule.contains(r#""protocol":"udp""#), "{rule}");
    let input = rules(&objects(&relay, None, &[]), INPUT);
    let back = &input[position(&input, "198.51.100.2")];
    assert!(back.contains(r#"{"field":"sport","protocol":"tcp"}"#), "{back}");
}

/// An `auto` session over TCP trying UDP again: the gateway's marked UDP
/// and its replies join the relay's TCP, in the inet table and in the
/// link-level one; without the probe neither lets any UDP out to it.
#[test]
fn a_udp_probe_lets_out_the_gateways_marked_udp_beside_the_relays_tcp() {
    let over_tcp = Lockdown {
        endpoint: SocketAddr::from(([198, 51, 100, 2], 443)),
        endpoint_protocol: EndpointProtocol::Tcp,
        ..lockdown()
    };
    let probing = Lockdown {
        udp_probe: Some(SocketAddr::from(([198, 51, 100, 2], 51820))),
        ..over_tcp.clone()
    };
    let udp_out = |l: &Lockdown| -> Vec<String> {
        rules(&objects(l, None, &[]), OUTPUT)
            .into_iter()
            .filter(|r| r.contains("198.51.100.2") && r.contains(r#""protocol":"udp""#))
            .collect()
    };
    assert!(udp_out(&over_tcp).is_empty());
    let out = udp_out(&probing);
    assert_eq!(out.len(), 1, "{out:#?}");
    assert!(
        out[0].contains("51820") && out[0].contains(&0x5347.to_string()),
        "{out:#?}"
    );
    let input = rules(&objects(&probing, None, &[]), INPUT);
    assert!(input
        .iter()
        .any(|r| r.contains(r#"{"field":"sport","protocol":"udp"}"#) && r.contains("51820")));
    // The relay's TCP stays.
    assert!(rules(&objects(&probing, None, &[]), OUTPUT)
        .iter()
        .any(|r| r.contains(r#"{"field":"dport","protocol":"tcp"}"#) && r.contains("443")));

    let link_udp = |l: &Lockdown| -> usize {
        let mut batch = Batch::new();
        add_link_table(&mut batch, l, &Inputs::default(), &["eth0".into()]);
        let value = serde_json::to_value(batch.to_nftables()).expect("encode");
        let objs = value["nftables"].as_array().expect("array").clone();
        rules(&objs, "egress0")
            .iter()
            .filter(|r| r.contains("51820"))
            .count()
    };
    assert_eq!(link_udp(&over_tcp), 0);
    assert_eq!(link_udp(&probing), 1);
}

#[test]
fn futures_are_send() {
    fn send<T: Send>(_: T) {}
    fn shared<T: Send + Sync>(_: &T) {}
    let allow = session();
    let firewall = Firewall::new(NftRunner::binary_only());
    shared(&firewall);
    send(firewall.apply(&lockdown(), Some(&allow)));
    send(firewall.add_addresses("meet.test", &[]));
    send(firewall.remove());
    send(firewall.is_present());
    send(firewall.refused_packets());
    send(firewall.any_table_exists());
}

#[test]
fn watch_needs_a_runtime() {
    assert!(Firewall::new(NftRunner::binary_only()).watch().is_err());
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
        tcp: tcp.into_iter().map(p).collect(),
        udp: vec![],
    };
    let now = Instant::now();
    let host = v4(203, 0, 113, 10);
    let mut learned = BTreeMap::from([((host, TCP, p(443)), now + Duration::from_secs(60))]);
    let mut sources = BTreeMap::from([
        ((host, TCP, p(443)), BTreeSet::from(["meet.test".to_string()])),
        // Expired from `learned`, still known: its flows go on.
        ((host, TCP, p(9000)), BTreeSet::from(["meet.test".to_string()])),
    ]);
    narrow(&mut learned, &mut sources, &[meet(vec![443, 9000])]);
    assert_eq!(sources.len(), 2);
    assert_eq!(learned.len(), 1);
    narrow(&mut learned, &mut sources, &[meet(vec![9000])]);
    assert_eq!(sources.keys().collect::<Vec<_>>(), [&(host, TCP, p(9000))]);
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
    // From the link only, never through the tunnel.
    assert!(
        too_big.contains(r#"{"match":{"left":{"meta":{"key":"iifname"}},"op":"!=","right":"sg0"}}"#),
        "{too_big}"
    );
    // ICMP errors through the tunnel: about the tunnel's flows, never about
    // the tunnel's own UDP (the endpoint's flow; its family's rule only).
    let not_the_endpoint = r#"{"match":{"left":{"ct":{"dir":"original","family":"ip","key":"daddr"}},"op":"!=","right":"198.51.100.2"}}"#;
    let tunnel_errors = &input[position(&input, "time-exceeded")];
    assert!(
        tunnel_errors.contains("sg0") && tunnel_errors.contains(not_the_endpoint),
        "{tunnel_errors}"
    );
    let tunnel_errors_v6 = &input[position(&input, "packet-too-big")];
    assert!(!tunnel_errors_v6.contains("198.51.100.2"), "{tunnel_errors_v6}");
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
    let meet = (v4(203, 0, 113, 10), TCP, p(443));
    let meet6 = ("2001:db8::10".parse().expect("v6"), UDP, p(10000));
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

#[test]
fn overlapping_literal_ports_and_ranges_become_pieces_no_entry_splits() {
    let range = PortRange {
        first: 50000,
        last: 60000,
    };
    let net24 = (v4(203, 0, 113, 0), 24);
    let inside = (v4(203, 0, 113, 5), 32);
    let outside = (v4(198, 51, 100, 7), 32);
    let pieces = port_pieces(&[
        (net24, range),
        (inside, p(55000)),
        (outside, p(55000)),
        (inside, p(443)),
    ]);
    let r = |first, last| PortRange { first, last };
    assert_eq!(
        pieces,
        vec![
            (p(443), vec![inside]),
            // The /24 alone; 55000 also has the outside address (the /32
            // inside the /24 goes); then the /24 again.
            (r(50000, 54999), vec![net24]),
            (p(55000), vec![outside, net24]),
            (r(55001, 60000), vec![net24]),
        ]
    );
    // Neighbouring pieces with the same networks are joined.
    let joined = port_pieces(&[(net24, r(100, 199)), (net24, r(200, 300)), (inside, p(150))]);
    assert_eq!(joined, vec![(r(100, 300), vec![net24])]);
    // The top of the port space does not overflow.
    assert_eq!(
        port_pieces(&[(net24, r(65000, 65535))]),
        vec![(r(65000, 65535), vec![net24])]
    );
}

#[test]
fn a_names_port_range_gets_its_own_answer_sets_and_rules() {
    let range = PortRange {
        first: 50000,
        last: 60000,
    };
    let mut allow = session();
    allow.names = vec![NamedEntry {
        name: "meet.test".into(),
        tcp: vec![p(443)],
        udp: vec![p(7882), range],
    }];
    allow.rules[0].udp.push(range);
    let objs = objects(&lockdown(), Some(&allow), &[]);
    let sets: Vec<&Value> = objs.iter().filter_map(|o| o["add"].get("set")).collect();
    for (name, ty, flags) in [
        (
            "allow4_udp_50000_60000",
            "ipv4_addr",
            Some(serde_json::json!(["timeout"])),
        ),
        (
            "allow6_udp_50000_60000",
            "ipv6_addr",
            Some(serde_json::json!(["timeout"])),
        ),
        ("known4_udp_50000_60000", "ipv4_addr", None),
        ("known6_udp_50000_60000", "ipv6_addr", None),
    ] {
        let set = sets
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no set {name}"));
        assert_eq!(set["type"], ty, "{name}");
        assert_eq!(set.get("flags").cloned(), flags, "{name}");
    }
    // Single ports stay in the shared sets: no set of their own.
    assert!(!sets
        .iter()
        .any(|s| s["name"].as_str().is_some_and(|n| n.contains("7882"))));
    let out = rules(&objs, OUTPUT);
    let new = &out[position(&out, "@allow4_udp_50000_60000")];
    assert!(
        new.contains(r#"{"range":[50000,60000]}"#) && new.contains("sg0"),
        "{new}"
    );
    assert!(position(&out, "@allow4_udp_50000_60000") > position(&out, "853"));
    let established_in = rules(&objs, INPUT);
    let back = &established_in[position(&established_in, "@known4_udp_50000_60000")];
    assert!(back.contains("sport") && back.contains("established"), "{back}");
    // The literal range is one interval element.
    let nets4 = sets.iter().find(|s| s["name"] == ALLOW4_NETS).expect("set");
    assert!(
        nets4["elem"].to_string().contains(r#"{"range":[50000,60000]}"#),
        "{}",
        nets4["elem"]
    );

    // Answers for the range go to its set as addresses.
    let batch = element_batch(&[LearnedAddress {
        addr: v4(203, 0, 113, 80),
        proto: UDP,
        ports: range,
        timeout: Duration::from_secs(30),
    }]);
    let value = serde_json::to_value(batch.to_nftables()).expect("encode");
    let first = &value["nftables"][0]["add"]["element"];
    assert_eq!(first["name"], "allow4_udp_50000_60000");
    assert_eq!(first["elem"][0]["elem"]["val"], "203.0.113.80");

    // And the tamper guard reads them back as this session's answers.
    let listing: Value = serde_json::from_str(
        r#"{"nftables": [
            {"set": {"family": "inet", "table": "sessiongate", "name": "allow4_udp_50000_60000", "elem": [
                {"elem": {"val": "203.0.113.80", "timeout": 90, "expires": 89}},
                {"elem": {"val": "203.0.113.81", "timeout": 90, "expires": 89}}]}},
            {"set": {"family": "inet", "table": "sessiongate", "name": "known4_udp_50000_60000", "elem": [
                "203.0.113.80"]}}]}"#,
    )
    .expect("json");
    let ours = BTreeMap::from([(
        (v4(203, 0, 113, 80), UDP, range),
        BTreeSet::from(["meet.test".to_string()]),
    )]);
    let foreign = foreign_elements(&listing, &ours);
    assert_eq!(foreign.len(), 1, "{foreign:?}");
    assert!(foreign[0].contains("203.0.113.81"), "{foreign:?}");
    // Their elements are not part of the fingerprint; the sets are.
    let print = fingerprint(&listing);
    assert!(
        print.contains("allow4_udp_50000_60000") && !print.contains("203.0.113.8"),
        "{print}"
    );
}

#[test]
fn the_gateway_enforced_kind_sends_any_tcp_and_udp_into_the_tunnel_after_the_dns_refusal() {
    let mut allow = session();
    allow.gateway_enforces = true;
    let objs = objects(&lockdown(), Some(&allow), &[]);
    let out = rules(&objs, OUTPUT);
    let any = out
        .iter()
        .position(|r| {
            r.contains("sg0") && r.contains("ipv4") && r.contains(r#"["tcp","udp"]"#) && !r.contains("dport")
        })
        .unwrap_or_else(|| panic!("no rule for any TCP/UDP into the tunnel: {out:#?}"));
    assert!(any > position(&out, "853"), "before the DNS refusal: {out:#?}");
    // Without an IPv6 tunnel address, no IPv6 rule.
    assert!(
        !out.iter()
            .any(|r| r.contains("sg0") && r.contains("ipv6") && r.contains("accept") && !r.contains("dport")),
        "{out:#?}"
    );
    let inp = rules(&objs, INPUT);
    assert!(
        inp.iter().any(|r| r.contains("sg0")
            && r.contains("ipv4")
            && r.contains("established")
            && !r.contains("sport")),
        "{inp:#?}"
    );
    // Not in the ordinary kind.
    let plain = rules(&objects(&lockdown(), Some(&session()), &[]), OUTPUT);
    assert!(
        !plain
            .iter()
            .any(|r| r.contains("sg0") && r.contains("ipv4") && !r.contains("dport") && r.contains("accept")),
        "{plain:#?}"
    );
}

/// `/proc/net/netlink` as it read with `nft -j monitor` (pid 30498) running
/// beside a netfilter socket of another process and a route socket.
#[test]
fn the_monitor_has_joined_when_its_socket_is_in_the_ruleset_group() {
    let header = "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n";
    let joined = format!(
        "{header}0000000063a6cedf 12  30498      00000140 0        0        0     2        0        28031438\n\
         000000005321c689 12  0          00000000 0        0        0     2        0        28031426\n\
         00000000dbd1c8ab 0   30498      00000040 0        0        0     2        0        28010043\n"
    );
    assert!(joined_ruleset_events(&joined, 30498));
    // Another process's socket, or the monitor before it joined (its
    // socket bound, no group yet; a route socket in group 7 is no sign).
    assert!(!joined_ruleset_events(&joined, 30499));
    let not_yet = format!(
        "{header}0000000063a6cedf 12  30498      00000000 0        0        0     2        0        28031438\n\
         00000000dbd1c8ab 0   30498      00000040 0        0        0     2        0        28010043\n"
    );
    assert!(!joined_ruleset_events(&not_yet, 30498));
    // Only the trace group (NFNLGRP_NFTRACE, 9): not the ruleset's events.
    let trace_only = format!(
        "{header}0000000063a6cedf 12  30498      00000100 0        0        0     2        0        28031438\n"
    );
    assert!(!joined_ruleset_events(&trace_only, 30498));
    assert!(!joined_ruleset_events("", 30498));
}
