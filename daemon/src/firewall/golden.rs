//! Golden tests of the batches an apply sends: the `inet` table (lockdown
//! and session shapes) and the `netdev` table, for a few inputs that
//! between them take every branch of the builders, compared byte for byte
//! with the JSON under `golden/`.
//!
//! Why: a restructuring of the builders must not change one rule, and
//! scripts/mutants names each mutation by a hash of its rule's expression,
//! so identical JSON also keeps every mutant's name. A rule change that is
//! meant fails here too: look at the diff, then write the files anew with
//! `SG_GOLDEN_UPDATE=1 cargo test -p sessiond golden` and commit them with
//! the change.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::build::{build_table, Inputs};
use super::link::add_link_table;
use super::*;

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(segments: [u16; 8]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(segments))
}

fn lockdown(endpoint: &str, allow_lan: bool) -> Lockdown {
    Lockdown {
        endpoint: endpoint.parse::<SocketAddr>().expect("endpoint"),
        fwmark: 0x5347,
        tunnel_interface: "sg0".into(),
        allow_lan,
        endpoint_protocol: super::EndpointProtocol::Udp,
        udp_probe: None,
    }
}

fn allowlist(tunnel_has_ipv6: bool, dns_redirect: Option<DnsRedirect>) -> Allowlist {
    Allowlist {
        rules: vec![
            AllowEntry {
                net: (v4(203, 0, 113, 10), 32),
                tcp: vec![PortRange::single(443)],
                udp: vec![PortRange::single(10000)],
            },
            AllowEntry {
                net: (v4(203, 0, 113, 0), 24),
                tcp: vec![PortRange::single(443), PortRange::single(8443)],
                udp: vec![],
            },
            AllowEntry {
                net: (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10]), 128),
                tcp: vec![PortRange::single(443)],
                udp: vec![PortRange::single(3478)],
            },
        ],
        names: vec![NamedEntry {
            name: "meet.test".into(),
            tcp: vec![PortRange::single(443)],
            udp: vec![PortRange::single(10000)],
        }],
        dns_servers: vec![
            v4(192, 0, 2, 53),
            v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53]),
            v4(192, 0, 2, 53),
        ],
        tunnel_has_ipv6,
        dns_redirect,
        gateway_enforces: false,
    }
}

/// What the machine and this process would have supplied.
fn inputs(lan: bool, learned: bool) -> Inputs {
    let on_link = vec![
        (v4(192, 0, 2, 0), 26),
        (v6([0x2001, 0xdb8, 0x1, 0, 0, 0, 0, 0]), 64),
    ];
    let mut lan_nets = on_link.clone();
    lan_nets.extend([
        (v4(169, 254, 0, 0), 16),
        (v4(224, 0, 0, 0), 24),
        (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10),
    ]);
    let answers = [
        (v4(198, 51, 100, 7), TCP, 443),
        (v4(198, 51, 100, 7), UDP, 10000),
        (v6([0x2001, 0xdb8, 0x2, 0, 0, 0, 0, 0x7]), TCP, 443),
    ];
    Inputs {
        lan: if lan { lan_nets } else { Vec::new() },
        on_link,
        learned: if learned {
            answers
                .iter()
                .map(|&(addr, proto, port)| LearnedAddress {
                    addr,
                    proto,
                    ports: PortRange::single(port),
                    timeout: Duration::from_millis(299_500),
                })
                .collect()
        } else {
            Vec::new()
        },
        known: if learned {
            answers
                .iter()
                .map(|&(a, p, port)| (a, p, PortRange::single(port)))
                .collect()
        } else {
            Vec::new()
        },
    }
}

/// The batch `apply` sends for these inputs, as the JSON nft gets, one
/// command of the batch a line (so a diff names the rule).
fn batch_json(lockdown: &Lockdown, allow: Option<&Allowlist>, inputs: &Inputs, devices: &[&str]) -> String {
    let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
    let mut batch = build_table(lockdown, allow, inputs);
    add_link_table(&mut batch, lockdown, inputs, &devices);
    let whole = batch.to_nftables();
    let mut text = String::new();
    for command in whole.objects.iter() {
        text.push_str(&serde_json::to_string(command).expect("encode"));
        text.push('\n');
    }
    // The lines joined are the batch nft gets, byte for byte.
    assert_eq!(
        format!("{{\"nftables\":[{}]}}", text.trim_end().replace('\n', ",")),
        serde_json::to_string(&whole).expect("encode")
    );
    text
}

fn check(name: &str, actual: &str) {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "src", "firewall", "golden", name]
        .iter()
        .collect();
    if std::env::var_os("SG_GOLDEN_UPDATE").is_some() {
        std::fs::write(&path, actual).expect("write the golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (SG_GOLDEN_UPDATE=1 writes it)", path.display()));
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
        panic!(
            "{name} differs from the batch built now, first at line {}:\n  golden: {:?}\n  now:    {:?}",
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line)
        );
    }
}

#[test]
fn golden_lockdown_ipv4_endpoint() {
    let json = batch_json(
        &lockdown("198.51.100.2:51820", false),
        None,
        &inputs(false, false),
        &["eth0"],
    );
    check("lockdown_v4.json", &json);
}

#[test]
fn golden_lockdown_ipv6_endpoint_with_lan() {
    // Learned answers are ignored by the lockdown: it must not carry any.
    let json = batch_json(
        &lockdown("[2001:db8:ffff::2]:51820", true),
        None,
        &inputs(true, true),
        &["eth0", "wlan0"],
    );
    check("lockdown_v6_lan.json", &json);
}

#[test]
fn golden_session_ipv4_tunnel() {
    let allow = allowlist(false, None);
    let json = batch_json(
        &lockdown("198.51.100.2:51820", false),
        Some(&allow),
        &inputs(false, true),
        &["eth0"],
    );
    check("session_v4.json", &json);
}

#[test]
fn golden_session_ipv6_tunnel_stub_and_lan() {
    let allow = allowlist(
        true,
        Some(DnsRedirect {
            port: 5353,
            stub_mark: 0x5348,
        }),
    );
    let json = batch_json(
        &lockdown("[::ffff:198.51.100.2]:51820", true),
        Some(&allow),
        &inputs(true, true),
        &["eth0", "wlan0"],
    );
    check("session_v6_stub_lan.json", &json);
}

#[test]
fn golden_session_without_learned_answers_or_devices() {
    let allow = allowlist(true, None);
    let json = batch_json(
        &lockdown("198.51.100.2:51820", false),
        Some(&allow),
        &inputs(false, false),
        &[],
    );
    check("session_fresh.json", &json);
}
