//! What a hostile neighbour on the physical link can and cannot do during a
//! session, and what may cross that link besides the tunnel: replies and
//! ICMP errors spoofed onto the session's own flows, ICMPv6 from off the
//! link or that is not neighbour discovery, and neighbour discovery sent
//! past the link. The router namespace plays the neighbour (it is the
//! client's next hop); raw sockets (`labhost icmp6-send`, `icmp6-sink`,
//! `icmp-error`) send and catch the crafted messages. These are the cases `scripts/mutants` found no
//! test for (docs/mutants.md). Run as root after `cargo build --workspace`.

use std::time::Duration;

use lab::{addr, wait_until, Daemon, Lab, LabChild, Ns};

/// How long a wait may take before the test gives up: generous, since the
/// lab shares its machine (a deadline costs nothing when the event comes).
const DEADLINE: Duration = Duration::from_secs(30);

/// How long the application's flows wait for a reply: long enough that
/// the spoofed replies arrive while they still wait, whatever the load.
const APP_WAIT_MS: &str = "12000";

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

fn labhost(lab: &Lab) -> String {
    lab.labhost_path().to_string_lossy().into_owned()
}

fn wait_ready(child: &LabChild, what: &str) {
    wait_until(DEADLINE, what, || child.log().contains("ready"))
        .unwrap_or_else(|e| panic!("{e:#}: {}", child.log()));
}

/// The packets counter of the lab's own nft table `table` in `ns` (the
/// sum over its rules).
fn counted(lab: &Lab, ns: Ns, family: &str, table: &str) -> u64 {
    packets_counted(
        &lab.exec_ok(ns, &["nft", "-j", "list", "table", family, table])
            .expect("list the lab's counting table"),
    )
}

/// The sum of the packet counters in an `nft -j` listing.
fn packets_counted(listing: &str) -> u64 {
    let doc: serde_json::Value = serde_json::from_str(listing).expect("nft -j output");
    doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("rule")?.get("expr")?.as_array())
        .flatten()
        .filter_map(|st| st.get("counter")?.get("packets")?.as_u64())
        .sum()
}

/// Loads `rules` (nft statements, one per line) into a nat table
/// `inet labspoof` in `ns`'s postrouting: how the router or the gateway
/// gives its own datagrams the addresses and ports a test forges.
fn spoofing_table(lab: &Lab, ns: Ns, rules: &str) {
    lab.exec_stdin(
        ns,
        &["nft", "-f", "-"],
        format!(
            "table inet labspoof {{\n chain post {{\n  type nat hook postrouting priority 100; policy accept;\n{rules}\n }}\n}}\n"
        )
        .as_bytes(),
    )
    .expect("the spoofing table");
}

/// The tunnel's fwmark (`ip rule` shows it during a session): it means
/// "bypass the tunnel".
const TUNNEL_FWMARK: &str = "0x5347";

/// The tunnel's address ports the client's flows use (one per far end).
const TO_ALLOWED_NET_V4: u16 = 41301;
const TO_ANSWERED_NAME_V4: u16 = 41302;
const TO_ALLOWED_V6: u16 = 41303;

/// Starts the lab's session (profile `lab`, already written) with both
/// leak meters reset, and turns reverse-path filtering off in the client
/// (all, and on `interface`), as it is by default: so the kill switch
/// alone has to refuse what a test forges.
fn session_with_rp_filter_off<'lab>(lab: &'lab Lab, interface: &str) -> Daemon<'lab> {
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.reset_all_leaks().expect("reset");
    lab.exec_ok(
        Ns::Client,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.conf.all.rp_filter=0",
            &format!("net.ipv4.conf.{interface}.rp_filter=0"),
        ],
    )
    .expect("reverse-path filtering off in the client");
    daemon
}

/// A session whose profile allows UDP to port 51820 of 203.0.113.20 (by
/// address) and of 2001:db8:203::/123 (besides the lab's meet.test), with
/// both leak meters reset, and what the spoof tests need around it:
/// reverse-path filtering off in the client, as it is by default (so the
/// kill switch alone has to refuse what the router forges), and routes in
/// the router to the tunnel's addresses through the client (so what it
/// forges reaches the client's link).
fn session_with_flows_to_spoof(lab: &Lab) -> Daemon<'_> {
    let files = lab
        .write_profile("lab", |t| {
            t.replace("udp = [10000]", "udp = [10000, 51820]").replace(
                "[options]",
                &format!(
                    "[[allow]]\nhost = \"{}\"\nudp = [51820]\n\n\
                     [[allow]]\nhost = \"2001:db8:203::/123\"\nudp = [51820]\n\n[options]",
                    addr::OTHER_V4
                ),
            )
        })
        .expect("write profile");
    lab.set_tunnel_allowed_profile(&files.toml)
        .expect("tunnel meter follows the profile");
    let daemon = session_with_rp_filter_off(lab, addr::CLIENT_IF);
    lab.ip_batch(
        Ns::Router,
        &[
            format!(
                "route add {}/32 via {} dev {}",
                addr::DAEMON_TUN_V4,
                addr::CLIENT_V4,
                addr::ROUTER_CLIENT_IF
            ),
            format!(
                "route add {}/128 via {} dev {}",
                addr::DAEMON_TUN_V6,
                addr::CLIENT_V6,
                addr::ROUTER_CLIENT_IF
            ),
        ],
    )
    .expect("routes to the tunnel's addresses");
    daemon
}

/// Replies spoofed onto the session's own flows, arriving on the physical
/// interface, must not reach the application: a neighbour (or anyone who
/// can put packets on the link) that guesses a flow of the call must not
/// be able to inject into it. The client has UDP flows through the tunnel
/// to far ends on port 51820 (the tunnel endpoint's port) that never
/// answer: one to an allowed network (203.0.113.20, by address), one to an
/// answered name (meet.test, 203.0.113.10), one over IPv6 (2001:db8:203::10,
/// by address and by name). The router then sends each flow a reply from
/// its far end's address and port, straight to the tunnel's address on the
/// client's link. A lab table in the client counts their arrival on the
/// link, so each was really tried; reverse-path filtering is off in the
/// client, as it is by default, so the kill switch alone has to refuse
/// them.
#[test]
fn replies_spoofed_onto_the_sessions_flows_do_not_get_in_on_the_link() {
    let lab = lab();
    let daemon = session_with_flows_to_spoof(&lab);
    // Counts the spoofed replies where they reach the client (before any
    // filter): proof that each was tried.
    let ports = format!("{TO_ALLOWED_NET_V4}, {TO_ANSWERED_NAME_V4}, {TO_ALLOWED_V6}");
    lab.exec_stdin(
        Ns::Client,
        &["nft", "-f", "-"],
        format!(
            "table inet labspoofseen {{\n chain seen {{\n  type filter hook prerouting priority -400; policy accept;\n  \
             iifname \"{}\" udp sport 51820 udp dport {{ {ports} }} counter\n }}\n}}\n",
            addr::CLIENT_IF
        )
        .as_bytes(),
    )
    .expect("count the spoofed replies in the client");
    // The router gives its own datagrams the far ends' addresses.
    spoofing_table(
        &lab,
        Ns::Router,
        &format!(
            "  ip daddr {tun4} udp dport {TO_ALLOWED_NET_V4} snat ip to {other4}\n  \
             ip daddr {tun4} udp dport {TO_ANSWERED_NAME_V4} snat ip to {host4}\n  \
             ip6 daddr {tun6} udp dport {TO_ALLOWED_V6} snat ip6 to {host6}",
            tun4 = addr::DAEMON_TUN_V4,
            tun6 = addr::DAEMON_TUN_V6,
            other4 = addr::OTHER_V4,
            host4 = addr::HOST_V4,
            host6 = addr::HOST_V6,
        ),
    );

    // meet.test answered through the session's DNS: its addresses join the
    // answered sets.
    for qtype in ["A", "AAAA"] {
        lab.dns_query(Ns::Client, addr::GATEWAY_TUN_V4, addr::MEET_NAME, qtype)
            .unwrap_or_else(|e| panic!("{} {qtype}: {e}", addr::MEET_NAME));
    }
    let flows = [
        (addr::OTHER_V4, TO_ALLOWED_NET_V4, addr::DAEMON_TUN_V4),
        (addr::HOST_V4, TO_ANSWERED_NAME_V4, addr::DAEMON_TUN_V4),
        (addr::HOST_V6, TO_ALLOWED_V6, addr::DAEMON_TUN_V6),
    ];
    let (_far_ends, apps) = flows_waiting_for_a_reply(&lab, &flows);

    for (_, sport, tunnel_address) in flows {
        // Sent from the far end's port; the router's table puts the far
        // end's address on it. Nothing answers it.
        let _ = lab.probe_udp_crafted(
            Ns::Router,
            tunnel_address,
            sport,
            addr::WG_PORT,
            None,
            Duration::from_millis(100),
        );
    }
    wait_until(DEADLINE, "the spoofed replies at the client's link", || {
        counted(&lab, Ns::Client, "inet", "labspoofseen") >= flows.len() as u64
    })
    .expect("the router's spoofed replies reach the client");
    assert_nothing_reached(&apps, &flows, "a reply spoofed as");
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// The stub's mark (the DNS stub's own queries to the pinned resolvers
/// carry it): what lets a datagram to a pinned resolver's port 53 out.
const STUB_MARK: &str = "0x5348";

/// The client's ports for its flows to the pinned resolvers.
const TO_RESOLVER_V4: u16 = 41304;
const TO_RESOLVER_V6: u16 = 41305;

/// Answers spoofed as the pinned resolver, arriving on the physical
/// interface, must not get in: the resolver is reached only through the
/// tunnel, so a neighbour that sends "answers" from its address to the
/// stub's query port (guessing port and ID is cheap on a LAN) must be
/// refused before any socket sees them, or it could forge the names the
/// session allows. The client sends datagrams with the stub's mark to the
/// pinned resolvers (v4 and v6; a payload too short for dnsmasq to answer)
/// from known ports and waits for a reply, as the stub does for its
/// queries; the router then sends each flow a datagram from the
/// resolver's address and port 53, straight to the tunnel's address on
/// the client's link. Conntrack calls it the reply of that flow; the kill
/// switch must still refuse it, because it did not come through the
/// tunnel. A lab table counts their arrival on the link.
#[test]
fn answers_spoofed_as_the_pinned_resolver_do_not_get_in_on_the_link() {
    let lab = lab();
    let daemon = session_with_flows_to_spoof(&lab);
    let ports = format!("{TO_RESOLVER_V4}, {TO_RESOLVER_V6}");
    lab.exec_stdin(
        Ns::Client,
        &["nft", "-f", "-"],
        format!(
            "table inet labspoofseen {{\n chain seen {{\n  type filter hook prerouting priority -400; policy accept;\n  \
             iifname \"{}\" udp sport 53 udp dport {{ {ports} }} counter\n }}\n}}\n",
            addr::CLIENT_IF
        )
        .as_bytes(),
    )
    .expect("count the spoofed answers in the client");
    spoofing_table(
        &lab,
        Ns::Router,
        &format!(
            "  ip daddr {tun4} udp dport {TO_RESOLVER_V4} snat ip to {resolver4}\n  \
             ip6 daddr {tun6} udp dport {TO_RESOLVER_V6} snat ip6 to {resolver6}",
            tun4 = addr::DAEMON_TUN_V4,
            tun6 = addr::DAEMON_TUN_V6,
            resolver4 = addr::GATEWAY_TUN_V4,
            resolver6 = addr::GATEWAY_TUN_V6,
        ),
    );

    let host = labhost(&lab);
    let flows = [(addr::GATEWAY_TUN_V4, TO_RESOLVER_V4, addr::DAEMON_TUN_V4)];
    let apps: Vec<LabChild> = flows
        .iter()
        .map(|(resolver, sport, _)| {
            lab.spawn(
                Ns::Client,
                &[
                    &host,
                    "probe-udp",
                    resolver,
                    "53",
                    "--sport",
                    &sport.to_string(),
                    "--mark",
                    STUB_MARK,
                    "--payload",
                    "call",
                    "--timeout-ms",
                    APP_WAIT_MS,
                ],
            )
            .expect("start the flow to the pinned resolver")
        })
        .collect();
    // Each flow's datagram has left through the tunnel: conntrack knows it.
    for (resolver, sport, _) in flows {
        wait_until(DEADLINE, "the flow to the pinned resolver in conntrack", || {
            lab.exec_ok(
                Ns::Client,
                &[
                    "conntrack",
                    "-L",
                    "-p",
                    "udp",
                    "--dport",
                    "53",
                    "--sport",
                    &sport.to_string(),
                ],
            )
            .is_ok_and(|listing| listing.contains(&format!("dst={resolver}")))
        })
        .unwrap_or_else(|e| {
            let listing = lab.exec_ok(Ns::Client, &["conntrack", "-L"]);
            panic!(
                "{e:#}: {}; conntrack: {listing:?}",
                apps.iter().map(LabChild::log).collect::<String>()
            )
        });
    }
    for (_, sport, tunnel_address) in flows {
        let _ = lab.probe_udp_crafted(
            Ns::Router,
            tunnel_address,
            sport,
            53,
            None,
            Duration::from_millis(100),
        );
    }
    wait_until(DEADLINE, "the spoofed answers at the client's link", || {
        counted(&lab, Ns::Client, "inet", "labspoofseen") >= flows.len() as u64
    })
    .expect("the router's spoofed answers reach the client");
    assert_nothing_reached(&apps, &flows, "an answer spoofed as");
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// Counts, in the client, the packets that `matches` (an nft match, e.g.
/// `iifname "sgtun0" udp dport 40010`) where they arrive (`seen`: before
/// any filter) and where they got past the kill switch's input chain
/// (`got_in`: an input chain after the kill switch's, which sees only what
/// it accepted). Table `inet labin`.
fn count_arrivals(lab: &Lab, matches: &str) {
    lab.exec_stdin(
        Ns::Client,
        &["nft", "-f", "-"],
        format!(
            "table inet labin {{\n\
             chain seen {{ type filter hook prerouting priority -400; policy accept; {matches} counter; }}\n\
             chain got_in {{ type filter hook input priority 100; policy accept; {matches} counter; }}\n}}\n"
        )
        .as_bytes(),
    )
    .expect("count arrivals in the client");
}

/// The packets `count_arrivals` counted in `chain` (`seen` or `got_in`).
fn arrivals(lab: &Lab, chain: &str) -> u64 {
    packets_counted(
        &lab.exec_ok(
            Ns::Client,
            &["nft", "-j", "list", "chain", "inet", "labin", chain],
        )
        .expect("list the arrivals"),
    )
}

/// Nothing the session's allowed far ends send gets in unless a flow of
/// the client asked for it: a datagram through the tunnel from the
/// answered name's address and allowed port (v4 and v6), from an allowed
/// network's address and port (v4 and v6), and from the pinned resolver's
/// port 53, to client ports no flow uses. The allowlist says where the
/// client may go, not who may start a conversation with it: otherwise
/// anyone who can reach the gateway with those source addresses (the
/// gateway does not check them) could reach the therapist's machine. The
/// gateway's own nat table puts the far ends' addresses and ports on its
/// datagrams; the client counts their arrival on the tunnel (so each was
/// really sent) and what got past the kill switch.
#[test]
fn allowed_far_ends_get_in_only_on_the_clients_own_flows() {
    let lab = lab();
    let daemon = session_with_flows_to_spoof(&lab);
    // meet.test answered: its addresses join the answered sets.
    for qtype in ["A", "AAAA"] {
        lab.dns_query(Ns::Client, addr::GATEWAY_TUN_V4, addr::MEET_NAME, qtype)
            .unwrap_or_else(|e| panic!("{} {qtype}: {e}", addr::MEET_NAME));
    }
    let tries = [
        (
            addr::DAEMON_TUN_V4,
            40010,
            format!("ip to {}:10000", addr::HOST_V4),
        ),
        (
            addr::DAEMON_TUN_V6,
            40011,
            format!("ip6 to [{}]:10000", addr::HOST_V6),
        ),
        (
            addr::DAEMON_TUN_V4,
            40012,
            format!("ip to {}:51820", addr::OTHER_V4),
        ),
        (
            addr::DAEMON_TUN_V6,
            40013,
            "ip6 to [2001:db8:203::11]:51820".to_string(),
        ),
        (
            addr::DAEMON_TUN_V4,
            40014,
            format!("ip to {}:53", addr::GATEWAY_TUN_V4),
        ),
    ];
    let rules: String = tries
        .iter()
        .map(|(to, port, from)| {
            let family = if to.contains(':') { "ip6" } else { "ip" };
            format!("  {family} daddr {to} udp dport {port} snat {from}\n")
        })
        .collect();
    spoofing_table(&lab, Ns::Gateway, &rules);
    count_arrivals(
        &lab,
        &format!("iifname \"{}\" udp dport 40010-40014", lab::DAEMON_TUN_IF),
    );
    for (to, port, _) in &tries {
        let _ = lab.probe_udp_crafted(Ns::Gateway, to, *port, 0, None, Duration::from_millis(100));
    }
    wait_until(DEADLINE, "the far ends' datagrams at the client's tunnel", || {
        arrivals(&lab, "seen") >= tries.len() as u64
    })
    .expect("the gateway's datagrams reach the client");
    assert_eq!(
        arrivals(&lab, "got_in"),
        0,
        "a datagram from an allowed far end that no flow asked for got in"
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// ICMP errors through the tunnel get in only about the client's own
/// flows: errors from the far side (port unreachable, too big), quoting a
/// datagram the client never sent, must not reach the client's stack,
/// where they could end a connection or shrink its packets. The gateway
/// sends them (v4 and v6) to the tunnel's addresses, quoting flows from
/// unused client ports to the video host; the client counts their arrival
/// on the tunnel and what got past the kill switch.
#[test]
fn icmp_errors_through_the_tunnel_get_in_only_about_the_clients_own_flows() {
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.reset_all_leaks().expect("reset");
    count_arrivals(
        &lab,
        &format!(
            "iifname \"{}\" meta l4proto {{ icmp, ipv6-icmp }}",
            lab::DAEMON_TUN_IF
        ),
    );
    let host = labhost(&lab);
    let mut sent = 0;
    for (to, far_end) in [
        (addr::DAEMON_TUN_V4, addr::HOST_V4),
        (addr::DAEMON_TUN_V6, addr::HOST_V6),
    ] {
        for kind in ["port-unreachable", "too-big"] {
            lab.exec_ok(
                Ns::Gateway,
                &[&host, "icmp-error", to, "41320", far_end, "10000", "--kind", kind],
            )
            .unwrap_or_else(|e| panic!("icmp-error {kind} to {to}: {e:#}"));
            sent += 1;
        }
    }
    wait_until(
        DEADLINE,
        "the gateway's ICMP errors at the client's tunnel",
        || arrivals(&lab, "seen") >= sent,
    )
    .expect("the gateway's ICMP errors reach the client");
    assert_eq!(
        arrivals(&lab, "got_in"),
        0,
        "an ICMP error about no flow of the client got in through the tunnel"
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// DHCP-shaped datagrams get in only as a DHCP server's answers on the
/// link: from port 67 to 68 from an address of the link's subnet
/// (DHCPv4), from port 547 to 546 from a link-local address (DHCPv6),
/// never through the tunnel. Each try from the router misses one of those
/// by one thing (the port it is sent to, the port it comes from, the
/// address it comes from), so a rule that forgot that one match would let
/// a neighbour reach any port of the client, or an off-link host reach the
/// DHCP client; the gateway's tries are perfect answers, but through the
/// tunnel, where no DHCP server is. The router's and the gateway's nat
/// tables give their datagrams the addresses and ports; the client counts
/// their arrival and what got past the kill switch.
#[test]
fn dhcp_shaped_datagrams_get_in_only_as_a_servers_answers_on_the_link() {
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let daemon = session_with_rp_filter_off(&lab, addr::CLIENT_IF);
    // (who sends, client address, client port, the datagram's source).
    let tries = [
        (
            Ns::Router,
            addr::CLIENT_V4,
            40030,
            format!("ip to {}:67", addr::ROUTER_CLIENT_V4),
        ),
        (
            Ns::Router,
            addr::CLIENT_V4,
            68,
            format!("ip to {}:40031", addr::ROUTER_CLIENT_V4),
        ),
        (
            Ns::Router,
            addr::CLIENT_V4,
            68,
            format!("ip to {}:67", addr::OTHER_V4),
        ),
        (
            Ns::Router,
            addr::CLIENT_V6,
            40033,
            "ip6 to [fe80::5347]:547".to_string(),
        ),
        (
            Ns::Router,
            addr::CLIENT_V6,
            546,
            "ip6 to [fe80::5347]:40034".to_string(),
        ),
        (
            Ns::Router,
            addr::CLIENT_V6,
            546,
            format!("ip6 to [{}]:547", addr::ROUTER_CLIENT_V6),
        ),
        (
            Ns::Gateway,
            addr::DAEMON_TUN_V4,
            68,
            format!("ip to {}:67", addr::ROUTER_CLIENT_V4),
        ),
        (
            Ns::Gateway,
            addr::DAEMON_TUN_V6,
            546,
            "ip6 to [fe80::5347]:547".to_string(),
        ),
    ];
    // Each datagram goes out from a port of its own (the nat rules tell
    // them apart by it) and leaves with the try's source.
    for ns in [Ns::Router, Ns::Gateway] {
        let rules: String = tries
            .iter()
            .enumerate()
            .filter(|(_, (from_ns, ..))| *from_ns == ns)
            .map(|(i, (_, to, _, from))| {
                let family = if to.contains(':') { "ip6" } else { "ip" };
                format!("  {family} daddr {to} udp sport {} snat {from}\n", 41330 + i)
            })
            .collect();
        spoofing_table(&lab, ns, &rules);
    }
    count_arrivals(
        &lab,
        &format!(
            "iifname {{ \"{}\", \"{}\" }} udp dport {{ 68, 546, 40030, 40033 }}",
            addr::CLIENT_IF,
            lab::DAEMON_TUN_IF
        ),
    );
    for (i, (ns, to, port, _)) in tries.iter().enumerate() {
        let sport = 41330 + i as u16;
        let _ = lab.probe_udp_crafted(*ns, to, *port, sport, None, Duration::from_millis(100));
    }
    wait_until(DEADLINE, "the datagrams at the client", || {
        arrivals(&lab, "seen") >= tries.len() as u64
    })
    .expect("the router's and the gateway's datagrams reach the client");
    assert_eq!(
        arrivals(&lab, "got_in"),
        0,
        "a DHCP-shaped datagram that no DHCP server on the link would send got in"
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// Starts one application flow per `(far end, source port, tunnel
/// address)`: a UDP datagram through the tunnel to the far end's port
/// 51820, where a sink listens and never answers (no ICMP error either),
/// after which the application waits for a reply. Returns once every
/// datagram is at its far end: the sink and the waiting applications.
fn flows_waiting_for_a_reply(lab: &Lab, flows: &[(&str, u16, &str)]) -> (LabChild, Vec<LabChild>) {
    let host = labhost(lab);
    let far_ends = lab
        .spawn(Ns::Host, &[&host, "sink", "--udp", "51820"])
        .expect("start the far ends' sink");
    wait_ready(&far_ends, "the far ends' sink ready");
    let apps: Vec<LabChild> = flows
        .iter()
        .map(|(far_end, sport, _)| {
            lab.spawn(
                Ns::Client,
                &[
                    &host,
                    "probe-udp",
                    far_end,
                    "51820",
                    "--sport",
                    &sport.to_string(),
                    "--payload",
                    "call",
                    "--timeout-ms",
                    APP_WAIT_MS,
                ],
            )
            .expect("start the application's flow")
        })
        .collect();
    wait_until(DEADLINE, "every flow at its far end, through the tunnel", || {
        far_ends.log().lines().filter(|l| l.ends_with("-> 51820")).count() >= flows.len()
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", far_ends.log()));
    (far_ends, apps)
}

/// Asserts that nothing `what` (the forged packets, as the failure will
/// say) reached the applications of `flows_waiting_for_a_reply`: each was
/// still waiting when the forged packets came, and then gave up with "no
/// reply" (not with a reply, nor with an error a forged ICMP message
/// reported to its socket).
fn assert_nothing_reached(apps: &[LabChild], flows: &[(&str, u16, &str)], what: &str) {
    for (app, (far_end, sport, _)) in apps.iter().zip(flows) {
        // Had it given up before the forged packet came, this test would
        // prove nothing.
        assert!(
            app.is_running() || !app.log().contains("no reply"),
            "the application on port {sport} stopped waiting before {what} {far_end} came: {}",
            app.log()
        );
    }
    for (app, (far_end, sport, _)) in apps.iter().zip(flows) {
        app.wait_exit(DEADLINE).expect("the application's probe ends");
        assert!(
            app.log().contains("no reply"),
            "{what} {far_end} reached the application on port {sport}: {}",
            app.log()
        );
    }
}

/// ICMP errors forged onto the session's own flows, arriving on the
/// physical interface, must not reach the application: a neighbour that
/// guesses a flow of the call must not be able to end it (a port
/// unreachable makes a connected socket fail) or shrink its packets (a
/// "fragmentation needed" or "packet too big" lowers the path MTU). Such
/// errors belong to the tunnel: a router on a tunnel flow's path sends
/// them into the gateway, which sends them back through the tunnel. The
/// client has UDP flows through the tunnel to far ends that never answer,
/// one over IPv4 (203.0.113.20) and one over IPv6 (2001:db8:203::10); the
/// router sends each a port unreachable and a "too big" quoting the flow's
/// datagram (which conntrack then calls related to that flow), straight
/// to the tunnel's address on the client's link. A lab table in the client
/// counts their arrival on the link, so each was really tried.
#[test]
fn icmp_errors_forged_onto_the_sessions_flows_do_not_get_in_on_the_link() {
    let lab = lab();
    let daemon = session_with_flows_to_spoof(&lab);
    lab.exec_stdin(
        Ns::Client,
        &["nft", "-f", "-"],
        format!(
            "table inet labicmpseen {{\n chain seen {{\n  type filter hook prerouting priority -400; policy accept;\n  \
             iifname \"{link}\" ip daddr {tun4} icmp type destination-unreachable counter\n  \
             iifname \"{link}\" ip6 daddr {tun6} icmpv6 type {{ destination-unreachable, packet-too-big }} counter\n \
             }}\n}}\n",
            link = addr::CLIENT_IF,
            tun4 = addr::DAEMON_TUN_V4,
            tun6 = addr::DAEMON_TUN_V6,
        )
        .as_bytes(),
    )
    .expect("count the forged errors in the client");
    let flows = [
        (addr::OTHER_V4, TO_ALLOWED_NET_V4, addr::DAEMON_TUN_V4),
        (addr::HOST_V6, TO_ALLOWED_V6, addr::DAEMON_TUN_V6),
    ];
    let (_far_ends, apps) = flows_waiting_for_a_reply(&lab, &flows);

    let host = labhost(&lab);
    for (far_end, sport, tunnel_address) in flows {
        for kind in ["port-unreachable", "too-big"] {
            lab.exec_ok(
                Ns::Router,
                &[
                    &host,
                    "icmp-error",
                    tunnel_address,
                    &sport.to_string(),
                    far_end,
                    "51820",
                    "--kind",
                    kind,
                ],
            )
            .unwrap_or_else(|e| panic!("forge a {kind} about {far_end}: {e:#}"));
        }
    }
    wait_until(DEADLINE, "the forged errors at the client's link", || {
        counted(&lab, Ns::Client, "inet", "labicmpseen") >= 2 * flows.len() as u64
    })
    .expect("the router's forged errors reach the client");
    assert_nothing_reached(&apps, &flows, "an ICMP error forged about");
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// ICMPv6 gets in during a session only as neighbour discovery from the
/// link itself (hop limit 255: a router never forwards that unchanged):
/// a neighbour solicitation from the router arrives (without it the
/// client's IPv6 neighbours go stale); the same message from the internet
/// host (forwarded, so hop limit 254 on arrival) and an echo request from
/// the router with hop limit 255 do not. A raw ICMPv6 socket in the client
/// sees whatever arrives. After stop the refused ones arrive: the tries
/// were real, and along the same path, so they show when they would have.
#[test]
fn icmpv6_gets_in_only_as_neighbour_discovery_from_the_link() {
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.reset_all_leaks().expect("reset");
    let host = labhost(&lab);
    let sink = lab
        .spawn(Ns::Client, &[&host, "icmp6-sink"])
        .expect("start the ICMPv6 sink");
    wait_ready(&sink, "the ICMPv6 sink ready");
    let send = |ns: Ns, kind: &str| {
        lab.exec_ok(
            ns,
            &[&host, "icmp6-send", addr::CLIENT_V6, kind, "--hop-limit", "255"],
        )
        .unwrap_or_else(|e| panic!("icmp6-send {kind} from {ns:?}: {e:#}"));
    };
    let arrived = |line: &str| sink.log().lines().filter(|l| *l == line).count();
    let off_link_solicitation = format!("icmp6 type=135 from {}", addr::HOST_V6);
    let on_link_echo = format!("icmp6 type=128 from {}", addr::ROUTER_CLIENT_V6);
    let on_link_solicitation = format!("icmp6 type=135 from {}", addr::ROUTER_CLIENT_V6);

    send(Ns::Host, "135");
    send(Ns::Router, "128");
    send(Ns::Router, "135");
    wait_until(
        DEADLINE,
        "the router's neighbour solicitation in the client",
        || arrived(&on_link_solicitation) == 1,
    )
    .unwrap_or_else(|e| panic!("{e:#}: {}", sink.log()));
    lab.assert_no_leaks();

    // (After stop the client answers the echo request, which the meter
    // counts: no longer a leak, so it is not asked again.)
    daemon.ctl_ok(&["stop"]).expect("stop");
    let during = sink.log();
    send(Ns::Host, "135");
    send(Ns::Router, "128");
    wait_until(DEADLINE, "both refused messages in the client after stop", || {
        arrived(&off_link_solicitation) >= 1 && arrived(&on_link_echo) >= 1
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", sink.log()));
    let got_in: Vec<&str> = during
        .lines()
        .filter(|l| *l != "ready" && *l != on_link_solicitation)
        .collect();
    assert_eq!(
        got_in,
        Vec::<&str>::new(),
        "ICMPv6 from off the link, or not neighbour discovery, got in during the session"
    );
}

/// Neighbour discovery goes out during a session only to the link: a
/// neighbour solicitation to the router arrives, one to the internet host
/// does not, whatever its hop limit (a router forwards a hop limit 255
/// message like any other, so a process with a raw socket could otherwise
/// reach any IPv6 host outside the tunnel, and the leak meters do not count
/// neighbour discovery). After stop the same messages arrive, along the
/// same path.
#[test]
fn neighbour_discovery_goes_out_only_to_the_link() {
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.reset_all_leaks().expect("reset");
    let host = labhost(&lab);
    let sinks: Vec<LabChild> = [Ns::Router, Ns::Host]
        .into_iter()
        .map(|ns| {
            let sink = lab
                .spawn(ns, &[&host, "icmp6-sink"])
                .expect("start an ICMPv6 sink");
            wait_ready(&sink, "an ICMPv6 sink ready");
            sink
        })
        .collect();
    let (router, internet) = (&sinks[0], &sinks[1]);
    // With the tunnel's fwmark (what root may set) the message is routed
    // out of the physical link, not into the tunnel.
    let send_type = |to: &str, kind: &str, hop_limit: &str| {
        // Refused at the client or not: the sinks tell.
        let _ = lab.exec(
            Ns::Client,
            &[
                &host,
                "icmp6-send",
                to,
                kind,
                "--hop-limit",
                hop_limit,
                "--mark",
                TUNNEL_FWMARK,
            ],
        );
    };
    let send = |to: &str, hop_limit: &str| send_type(to, "135", hop_limit);
    let from_client = format!("icmp6 type=135 from {}", addr::CLIENT_V6);
    let arrived = |sink: &LabChild| sink.log().lines().filter(|l| *l == from_client).count();

    send(addr::HOST_V6, "255");
    send(addr::HOST_V6, "64");
    // On the link, but not neighbour discovery: a solicitation with a hop
    // limit the router must discard, an echo request with hop limit 255.
    // Sent before the one that must arrive, on the same link, so they
    // would be at the router before it.
    send(addr::ROUTER_CLIENT_V6, "64");
    send_type(addr::ROUTER_CLIENT_V6, "128", "255");
    send(addr::ROUTER_CLIENT_V6, "255");
    wait_until(
        DEADLINE,
        "the client's neighbour solicitation at the router",
        || arrived(router) >= 1,
    )
    .unwrap_or_else(|e| panic!("{e:#}: {}", router.log()));
    let echo = format!("icmp6 type=128 from {}", addr::CLIENT_V6);
    assert!(
        arrived(router) == 1 && !router.log().lines().any(|l| l == echo),
        "ICMPv6 that is not neighbour discovery with hop limit 255 reached the router: {}",
        router.log()
    );

    daemon.ctl_ok(&["stop"]).expect("stop");
    let during = arrived(internet);
    send(addr::HOST_V6, "255");
    wait_until(
        DEADLINE,
        "the same solicitation at the internet host after stop",
        || arrived(internet) > during,
    )
    .unwrap_or_else(|e| panic!("{e:#}: {}", internet.log()));
    assert_eq!(
        during,
        0,
        "neighbour solicitations reached the internet host during the session: {}",
        internet.log()
    );
    lab.assert_no_leaks();
}

/// A DHCP server on the link still answers during a session: a machine
/// must keep or get its lease while the kill switch is on (a lease that
/// cannot be renewed takes the whole network away, call included). A real
/// dnsmasq serves DHCP on the router's side of the link; the client sends
/// what a DHCP client sends first, a broadcast DHCPDISCOVER out of its
/// physical interface, and gets the server's DHCPOFFER back.
#[test]
fn a_dhcp_server_on_the_link_still_answers_during_a_session() {
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let leases = lab.tmp_dir().join("dhcp.leases");
    let server = lab
        .spawn_named(
            Ns::Router,
            "dnsmasq-dhcp",
            &[
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--port=0",
                &format!("--interface={}", addr::ROUTER_CLIENT_IF),
                "--bind-interfaces",
                "--dhcp-range=192.0.2.40,192.0.2.50,255.255.255.192,2m",
                &format!("--dhcp-leasefile={}", leases.display()),
                "--pid-file=",
                "--user=root",
                "--group=root",
                "--log-dhcp",
            ],
        )
        .expect("start dnsmasq as the link's DHCP server");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.reset_all_leaks().expect("reset");
    lab.assert_no_leaks();

    let host = labhost(&lab);
    // The server may still be starting: ask until it answers (each ask
    // waits a second for its offer).
    let mut last = String::new();
    let offer = wait_until(DEADLINE, "a DHCP offer during the session", || {
        let out = lab
            .exec(
                Ns::Client,
                &[&host, "dhcp-discover", addr::CLIENT_IF, "--timeout-ms", "1000"],
            )
            .expect("run dhcp-discover");
        last = String::from_utf8_lossy(&out.stdout).trim().to_string();
        out.status.success() || !server.is_running()
    });
    // `offer ADDRESS from SERVER`, the address from the server's range.
    let offered: Option<std::net::Ipv4Addr> = last.split_whitespace().nth(1).and_then(|a| a.parse().ok());
    assert!(
        offer.is_ok()
            && offered.is_some_and(|a| (40..=50).contains(&a.octets()[3]))
            && last.ends_with(&format!("from {}", addr::ROUTER_CLIENT_V4)),
        "no DHCP offer from the link's server during the session: {last}\n{}",
        server.log()
    );
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// "Fragmentation needed" about the tunnel's own UDP (its datagrams to the
/// gateway's endpoint) gets in from the link only: a router on the path to
/// the endpoint is on the physical link's side, and its error sets the
/// path MTU the tunnel's datagrams use (`ip route get` shows it); the same
/// error arriving through the tunnel (the gateway's, or anything the
/// gateway forwards) has no business with the link's path MTU. The
/// router sends one with MTU 1400, and the client's route to the endpoint
/// shows it; then the gateway sends one with MTU 1300 through the tunnel
/// to the client's physical address (allowed for this test in the
/// gateway's WireGuard peer), a counter in the client proves it arrived on
/// the tunnel interface, and the route must still say 1400.
#[test]
fn path_mtu_errors_about_the_tunnels_own_datagrams_get_in_only_from_the_link() {
    let lab = lab();
    lab.write_profile("lab", |t| t).expect("write profile");
    let daemon = session_with_rp_filter_off(&lab, lab::DAEMON_TUN_IF);
    lab.exec_stdin(
        Ns::Client,
        &["nft", "-f", "-"],
        format!(
            "table inet labmtuseen {{\n chain seen {{\n  type filter hook prerouting priority -400; policy accept;\n  \
             iifname \"{}\" ip daddr {} icmp type destination-unreachable counter\n }}\n}}\n",
            lab::DAEMON_TUN_IF,
            addr::CLIENT_V4,
        )
        .as_bytes(),
    )
    .expect("count the errors through the tunnel in the client");

    // The tunnel's source port, as the gateway sees it.
    let client_endpoint = format!("{}:", addr::CLIENT_V4);
    let mut tunnel_port = String::new();
    wait_until(DEADLINE, "the client's endpoint at the gateway", || {
        let endpoints = lab.gateway_wg_show(&["endpoints"]).unwrap_or_default();
        match endpoints
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&client_endpoint))
        {
            Some(port) => {
                tunnel_port = port.to_string();
                true
            }
            None => false,
        }
    })
    .expect("the gateway knows the client's endpoint");
    let host = labhost(&lab);
    let too_big = |ns: Ns, mtu: &str, device: Option<&str>| {
        let wg_port = addr::WG_PORT.to_string();
        let mut args = vec![
            host.as_str(),
            "icmp-error",
            addr::CLIENT_V4,
            tunnel_port.as_str(),
            addr::GATEWAY_V4,
            &wg_port,
            "--kind",
            "too-big",
            "--mtu",
            mtu,
        ];
        if let Some(device) = device {
            args.extend(["--device", device]);
        }
        lab.exec_ok(ns, &args)
            .unwrap_or_else(|e| panic!("send a fragmentation needed with MTU {mtu}: {e:#}"));
    };
    let route_mtu = || {
        lab.exec_ok(
            Ns::Client,
            &["ip", "route", "get", addr::GATEWAY_V4, "mark", TUNNEL_FWMARK],
        )
        .expect("ip route get")
    };

    // From the link: a router on the path.
    too_big(Ns::Router, "1400", None);
    wait_until(
        DEADLINE,
        "the link's path MTU (1400) on the route to the endpoint",
        || route_mtu().contains("mtu 1400"),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {}", route_mtu()));

    // Only "fragmentation needed" about them: a port unreachable from the
    // link (which would fail the tunnel's socket) does not get in.
    count_arrivals(
        &lab,
        &format!(
            "iifname \"{}\" icmp type destination-unreachable icmp code port-unreachable",
            addr::CLIENT_IF
        ),
    );
    let wg_port = addr::WG_PORT.to_string();
    lab.exec_ok(
        Ns::Router,
        &[
            host.as_str(),
            "icmp-error",
            addr::CLIENT_V4,
            tunnel_port.as_str(),
            addr::GATEWAY_V4,
            &wg_port,
            "--kind",
            "port-unreachable",
        ],
    )
    .unwrap_or_else(|e| panic!("send a port unreachable: {e:#}"));
    wait_until(DEADLINE, "the port unreachable at the client's link", || {
        arrivals(&lab, "seen") >= 1
    })
    .expect("the router's port unreachable reaches the client");
    assert_eq!(
        arrivals(&lab, "got_in"),
        0,
        "a port unreachable about the tunnel's own datagrams got in from the link"
    );

    // Through the tunnel: the gateway's WireGuard sends to the client's
    // physical address only if that is among the peer's allowed IPs.
    let (_, client_key) = lab.client_key().expect("the client key");
    lab.add_gateway_peer(
        &client_key,
        &[
            &format!("{}/32", addr::DAEMON_TUN_V4),
            &format!("{}/128", addr::DAEMON_TUN_V6),
            &format!("{}/32", addr::CLIENT_V4),
        ],
    )
    .expect("the gateway may send to the client's physical address");
    too_big(Ns::Gateway, "1300", Some(&lab.gateway_ifname()));
    wait_until(
        DEADLINE,
        "the gateway's error at the client's tunnel interface",
        || counted(&lab, Ns::Client, "inet", "labmtuseen") >= 1,
    )
    .expect("the gateway's error reaches the client through the tunnel");
    let route = route_mtu();
    assert!(
        route.contains("mtu 1400"),
        "a fragmentation needed about the tunnel's datagrams got in through the tunnel: {route}"
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}
