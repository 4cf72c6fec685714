//! Real networks (issue 17, item 4): a network that blocks UDP.
//!
//! The router drops every UDP packet from the client (a hotel or company
//! network that lets only TCP out); a relay beside the gateway takes the
//! tunnel's datagrams over TCP port 443 (`tcprelay`, Mullvad's
//! udp-over-tcp). With `[gateway] transport = "auto"` the session starts
//! anyway, over TCP, and `status` says why; with `transport = "tcp"` it
//! never tries UDP; with UDP alone it cannot start. Both leak meters stay
//! at zero: the outside meter counts everything but the WireGuard messages
//! to 51820 and the TCP to the relay. An `auto` session over TCP goes
//! back to UDP on a network where UDP works, one over UDP moves to TCP
//! when UDP gets blocked mid-session (or it roams onto a network that
//! blocks it) and comes back to UDP if the relay does not answer either,
//! and one that crashed over TCP resumes over TCP. Run as root after `cargo build --workspace`.

use std::time::{Duration, Instant};

use lab::relay::{RELAY_ENDPOINT, RELAY_PORT};
use lab::{addr, Daemon, Lab, Ns};

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

/// The lab profile with a `[gateway]` section; the tunnel leak meter
/// follows it.
fn profile_with_transport(lab: &Lab, transport: &str) {
    let files = lab
        .write_profile("lab", |t| {
            format!("{t}\n[gateway]\ntransport = \"{transport}\"\ntcp_endpoint = \"{RELAY_ENDPOINT}\"\n")
        })
        .expect("write profile");
    lab.set_tunnel_allowed_profile(&files.toml)
        .expect("tunnel meter follows the profile");
}

fn status(daemon: &Daemon) -> serde_json::Value {
    daemon
        .status()
        .unwrap_or_else(|e| panic!("status failed: {e:#}\n{}", daemon.log()))
}

/// UDP to the video host, inside the tunnel, comes back through the
/// gateway.
fn host_answers(lab: &Lab) -> bool {
    lab.probe_udp_timeout(Ns::Client, addr::HOST_V4, 10000, Duration::from_secs(2))
        == Ok(format!("peer={} probe", addr::GATEWAY_V4))
}

#[test]
fn where_udp_is_blocked_an_auto_session_starts_over_tcp_and_says_why() {
    let lab = lab();
    profile_with_transport(&lab, "auto");
    let _relay = lab.start_tcp_relay().expect("start the TCP relay");
    lab.block_udp_from_client().expect("block UDP");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon
        .ctl_ok(&["start", "lab"])
        .unwrap_or_else(|e| panic!("the session did not start over TCP: {e:#}\n{}", daemon.log()));

    let s = status(&daemon);
    assert_eq!(s["state"], "active", "{s:#}");
    assert_eq!(s["tunnel"]["transport"], "tcp", "{s:#}");
    assert_eq!(s["cause"]["reason"], "udp_unanswered", "{s:#}");
    assert_eq!(
        s["problem"],
        format!("the gateway did not answer over UDP; using TCP port {RELAY_PORT} (slower)"),
        "{s:#}"
    );
    let human = daemon.ctl_ok(&["status"]).expect("sessionctl status");
    assert!(human.contains("using TCP port 443 (slower)"), "{human}");
    // UDP was really tried, and the network really dropped it.
    let dropped = lab.udp_dropped().expect("read the UDP drop counter");
    assert!(
        dropped > 0,
        "the router dropped no UDP: the test did not block anything"
    );

    // The approved host answers, by name (DNS inside the tunnel) and by
    // UDP and TCP inside the tunnel, all carried over the one TCP flow.
    assert!(host_answers(&lab), "no UDP through the tunnel\n{}", daemon.log());
    let tcp = lab.probe_tcp(Ns::Client, addr::MEET_NAME, 443);
    assert!(
        tcp.is_ok(),
        "no TCP to {} through the tunnel: {tcp:?}",
        addr::MEET_NAME
    );
    // What the gateway sees: our handshake came through the relay.
    let ours = lab.client_key().expect("client key").1;
    let endpoints = lab.gateway_wg_show(&["endpoints"]).expect("wg show");
    assert!(
        endpoints
            .lines()
            .any(|l| l.starts_with(&ours) && l.contains("127.0.0.1:")),
        "the gateway does not see us through the relay: {endpoints}"
    );

    // Only the tunnel's own flow to the relay leaves: an application's TCP
    // to the relay's address and port is refused like anything else.
    let direct = lab.probe_tcp_timeout(
        Ns::Client,
        addr::GATEWAY_V4,
        RELAY_PORT,
        Duration::from_millis(500),
    );
    assert!(
        direct.is_err(),
        "an application reached the relay outside the tunnel: {direct:?}"
    );
    lab.assert_no_leaks();

    daemon.ctl_ok(&["stop"]).expect("stop");
    assert_eq!(status(&daemon)["state"], "idle");
    lab.assert_no_leaks();
}

#[test]
fn with_transport_tcp_the_session_never_sends_udp() {
    let lab = lab();
    profile_with_transport(&lab, "tcp");
    let _relay = lab.start_tcp_relay().expect("start the TCP relay");
    lab.block_udp_from_client().expect("block UDP");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon
        .ctl_ok(&["start", "lab"])
        .unwrap_or_else(|e| panic!("the session did not start over TCP: {e:#}\n{}", daemon.log()));
    let s = status(&daemon);
    assert_eq!(s["state"], "active", "{s:#}");
    assert_eq!(s["tunnel"]["transport"], "tcp", "{s:#}");
    // Asked for outright: nothing to explain.
    assert!(s["cause"].is_null() && s["problem"].is_null(), "{s:#}");
    assert!(host_answers(&lab), "no UDP through the tunnel\n{}", daemon.log());
    assert_eq!(lab.udp_dropped().expect("read the UDP drop counter"), 0);
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
    lab.assert_no_leaks();
}

#[test]
fn without_the_tcp_transport_a_network_that_blocks_udp_gets_no_session() {
    let lab = lab();
    let files = lab
        .write_profile("lab", |t| {
            t.replace("handshake_timeout_secs = 10", "handshake_timeout_secs = 3")
        })
        .expect("write profile");
    lab.set_tunnel_allowed_profile(&files.toml)
        .expect("tunnel meter follows the profile");
    let _relay = lab.start_tcp_relay().expect("start the TCP relay");
    lab.block_udp_from_client().expect("block UDP");
    let daemon = lab.start_sessiond().expect("start sessiond");
    let out = daemon.ctl(&["start", "lab"]).expect("run sessionctl start");
    assert!(
        !out.status.success(),
        "started without a way to the gateway\n{}",
        daemon.log()
    );
    let s = status(&daemon);
    assert_eq!(s["state"], "degraded", "{s:#}");
    assert_eq!(s["cause"]["reason"], "no_handshake", "{s:#}");
    assert_eq!(s["tunnel"]["transport"], "udp", "{s:#}");
    assert!(!host_answers(&lab), "traffic flowed without a handshake");
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
    lab.assert_no_leaks();
}

#[test]
fn over_tcp_moving_to_another_network_connects_to_the_relay_again() {
    let lab = lab();
    profile_with_transport(&lab, "tcp");
    let _relay = lab.start_tcp_relay().expect("start the TCP relay");
    lab.add_roaming_link().expect("add the roaming link");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon
        .ctl_ok(&["start", "lab"])
        .unwrap_or_else(|e| panic!("the session did not start over TCP: {e:#}\n{}", daemon.log()));
    assert!(host_answers(&lab), "no traffic before the move\n{}", daemon.log());
    lab.reset_all_leaks().expect("reset leaks");

    // The laptop leaves this network for another: the TCP connection to
    // the relay is bound to an address that is gone.
    lab.ip_batch(
        Ns::Client,
        &[
            format!(
                "route replace default via {} dev {}",
                addr::ROUTER_ROAM_V4,
                addr::ROAM_CLIENT_IF
            ),
            format!("addr del {}/26 dev {}", addr::CLIENT_V4, addr::CLIENT_IF),
            format!("addr del {}/64 dev {}", addr::CLIENT_V6, addr::CLIENT_IF),
            format!("link set {} down", addr::CLIENT_IF),
        ],
    )
    .expect("move to the other network");
    lab::wait_until(Duration::from_secs(20), "traffic to the video host again", || {
        host_answers(&lab)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let s = status(&daemon);
    assert_eq!(s["tunnel"]["transport"], "tcp", "{s:#}");
    assert!(s["tunnel"]["path_changes"].as_u64().unwrap_or(0) >= 1, "{s:#}");
    // The relay saw a connection from the new address.
    let relay_peers = lab
        .exec_ok(
            Ns::Gateway,
            &["ss", "-Htn", "state", "established", "sport", "= :443"],
        )
        .expect("ss");
    assert!(
        relay_peers.contains(&format!("{}:", addr::ROAM_CLIENT_V4)),
        "no connection to the relay from the new address: {relay_peers}"
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
    lab.assert_no_leaks();
}

/// The tunnel's fwmark, which only root can set: what the lockdown lets
/// out to the relay or the gateway.
const TUNNEL_FWMARK: u32 = 0x5347;

/// Whether a TCP connection carrying the tunnel's mark reaches the relay
/// from the client: what the lockdown admits for the tunnel over TCP.
fn marked_tcp_reaches_relay(lab: &Lab) -> bool {
    let script = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, 36, {TUNNEL_FWMARK})\n\
         s.settimeout(1.5)\n\
         try:\n    s.connect(('{}', {RELAY_PORT}))\n    print('connected')\n\
         except OSError as e:\n    print('refused', e)\n",
        addr::GATEWAY_V4
    );
    let out = lab
        .exec_ok(Ns::Client, &["python3", "-c", &script])
        .expect("run the marked TCP probe");
    out.trim() == "connected"
}

/// Sends one datagram that is not WireGuard from a socket bound to the
/// client's physical link (SO_BINDTODEVICE), as a local program could;
/// what the send said.
fn send_udp_off_the_tunnel(lab: &Lab, to: &str, port: u16) -> String {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET, 25, b'{}')\n\
         try:\n    s.sendto(b'off the tunnel', ('{to}', {port}))\n    print('sent')\n\
         except OSError as e:\n    print('refused', e)\n",
        addr::CLIENT_IF
    );
    lab.exec_ok(Ns::Client, &["python3", "-c", &script])
        .expect("run the UDP sender")
        .trim()
        .to_string()
}

/// The client's sessiongate table, as nft lists it.
fn our_table(lab: &Lab) -> String {
    lab.exec_ok(Ns::Client, &["nft", "list", "table", "inet", "sessiongate"])
        .expect("nft list table")
}

/// A therapist who started in a hotel that blocks UDP moves to a network
/// where UDP works: the `auto` session, on TCP since the start, tries UDP
/// again after the network change and moves back to it (no more
/// head-of-line blocking on loss), and the firewall lets the relay's TCP
/// out no more.
#[test]
fn an_auto_session_over_tcp_goes_back_to_udp_on_a_network_where_udp_works() {
    let lab = lab();
    profile_with_transport(&lab, "auto");
    let _relay = lab.start_tcp_relay().expect("start the TCP relay");
    lab.block_udp_from_client().expect("block UDP");
    lab.add_roaming_link().expect("add the roaming link");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon
        .ctl_ok(&["start", "lab"])
        .unwrap_or_else(|e| panic!("the session did not start over TCP: {e:#}\n{}", daemon.log()));
    let s = status(&daemon);
    assert_eq!(s["tunnel"]["transport"], "tcp", "{s:#}");
    assert_eq!(s["cause"]["reason"], "udp_unanswered", "{s:#}");
    assert!(host_answers(&lab), "no traffic over TCP\n{}", daemon.log());
    assert!(
        marked_tcp_reaches_relay(&lab),
        "the probe cannot reach the relay even while the tunnel uses it"
    );
    lab.reset_all_leaks().expect("reset leaks");

    // Off the hotel's network, onto one that lets UDP through (the router
    // blocks UDP only on the first link).
    lab.ip_batch(
        Ns::Client,
        &[
            format!(
                "route replace default via {} dev {}",
                addr::ROUTER_ROAM_V4,
                addr::ROAM_CLIENT_IF
            ),
            format!("addr del {}/26 dev {}", addr::CLIENT_V4, addr::CLIENT_IF),
            format!("addr del {}/64 dev {}", addr::CLIENT_V6, addr::CLIENT_IF),
            format!("link set {} down", addr::CLIENT_IF),
        ],
    )
    .expect("move to the other network");
    let moved = Instant::now();
    lab::wait_until(Duration::from_secs(60), "the session back on UDP", || {
        daemon
            .status()
            .is_ok_and(|s| s["tunnel"]["transport"] == "udp" && s["cause"].is_null())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    println!(
        "moved to a network where UDP works -> tunnel back on UDP after {:?}",
        moved.elapsed()
    );
    lab::wait_until(
        Duration::from_secs(20),
        "traffic to the video host over UDP",
        || host_answers(&lab),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    println!("moved -> traffic over UDP after {:?}", moved.elapsed());

    assert_back_on_udp(&lab, &daemon, addr::ROAM_CLIENT_V4);
}

/// `kill -9` while an `auto` session runs over TCP (UDP blocked): the
/// restarted sessiond locks down on the relay's TCP at once, never the
/// gateway's UDP, and the session comes back over TCP without trying UDP
/// first; nothing leaks in between.
#[test]
fn an_auto_session_that_fell_back_to_tcp_resumes_over_tcp_after_a_crash() {
    let lab = lab();
    profile_with_transport(&lab, "auto");
    let _relay = lab.start_tcp_relay().expect("start the TCP relay");
    lab.block_udp_from_client().expect("block UDP");
    let mut daemon = lab.start_sessiond().expect("start sessiond");
    daemon
        .ctl_ok(&["start", "lab"])
        .unwrap_or_else(|e| panic!("the session did not start over TCP: {e:#}\n{}", daemon.log()));
    assert_eq!(status(&daemon)["tunnel"]["transport"], "tcp");
    lab.reset_all_leaks().expect("reset leaks");

    daemon.kill9().expect("kill -9 sessiond");
    lab::wait_until(Duration::from_secs(5), "sessiond gone", || !daemon.is_running())
        .expect("sessiond exits");
    let direct = lab.probe_tcp_timeout(Ns::Client, addr::HOST_V4, 443, Duration::from_millis(700));
    assert!(
        direct.is_err(),
        "reached the host with the daemon dead: {direct:?}"
    );
    lab.assert_no_leaks();
    let dropped = lab.udp_dropped().expect("read the UDP drop counter");

    let restarted = Instant::now();
    daemon.restart().expect("restart sessiond");
    // Locked down on the way out the session was using.
    let table = our_table(&lab);
    assert!(
        table.contains("tcp dport 443") && !table.contains("udp dport 51820"),
        "the resumed lockdown does not admit exactly the relay's TCP:\n{table}"
    );
    lab::wait_until(Duration::from_secs(60), "the resumed session active", || {
        daemon.status().is_ok_and(|s| s["state"] == "active")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    println!(
        "sessiond restarted -> session active again over TCP after {:?}",
        restarted.elapsed()
    );
    let s = status(&daemon);
    assert_eq!(s["tunnel"]["transport"], "tcp", "{s:#}");
    assert_eq!(s["cause"]["reason"], "udp_unanswered", "{s:#}");
    assert!(
        host_answers(&lab),
        "no traffic after the resume\n{}",
        daemon.log()
    );
    assert_eq!(
        lab.udp_dropped().expect("read the UDP drop counter"),
        dropped,
        "the resumed session tried UDP first\n{}",
        daemon.log()
    );
    lab.assert_no_leaks();

    daemon.ctl_ok(&["stop"]).expect("stop");
    lab.assert_no_leaks();
}

/// The session is back on UDP from `client`: active with nothing to
/// explain, the gateway sees our UDP, the relay's TCP is closed and
/// refused, traffic flows and both meters stay at zero; then a clean stop.
fn assert_back_on_udp(lab: &Lab, daemon: &Daemon, client: &str) {
    let s = status(daemon);
    assert_eq!(s["state"], "active", "{s:#}");
    assert!(s["cause"].is_null() && s["problem"].is_null(), "{s:#}");
    let told = s["last_recovery"].as_str().unwrap_or_default();
    assert!(told.contains("back on UDP"), "{s:#}");
    // What the gateway sees: our new address's UDP, not the relay.
    let ours = lab.client_key().expect("client key").1;
    let endpoints = lab.gateway_wg_show(&["endpoints"]).expect("wg show");
    assert!(
        endpoints
            .lines()
            .any(|l| l.starts_with(&ours) && l.contains(&format!("{client}:"))),
        "the gateway does not see us over UDP from {client}: {endpoints}"
    );
    // The TCP flow is refused from now on: the relay holds no connection
    // from the client's address (after a move, the one from the old
    // address never saw its end: that address is gone), the table no rule
    // for it, and a marked connection fails.
    let from_here = format!("{client}:");
    lab::wait_until(
        Duration::from_secs(10),
        "the relay's connection from us closed",
        || {
            lab.exec_ok(
                Ns::Gateway,
                &["ss", "-Htn", "state", "established", "sport", "= :443"],
            )
            .is_ok_and(|out| !out.contains(&from_here))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let table = our_table(lab);
    assert!(!table.contains("tcp dport 443"), "{table}");
    assert!(!marked_tcp_reaches_relay(lab), "the relay's TCP is still let out");
    assert!(host_answers(lab), "no traffic over UDP\n{}", daemon.log());
    lab.assert_no_leaks();

    daemon.ctl_ok(&["stop"]).expect("stop");
    lab.assert_no_leaks();
}

/// The network stops blocking UDP while the session runs, with no change
/// of network to notice: the periodic try finds UDP and the session goes
/// back to it. Before that, a try on the blocked network leaves the call
/// on TCP undisturbed. sessiond tries every 5 s here instead of every 3
/// minutes (SESSIOND_TEST_UDP_RETRY_SECS, tests only).
#[test]
fn an_auto_session_over_tcp_goes_back_to_udp_when_the_network_stops_blocking_it() {
    let lab = lab();
    profile_with_transport(&lab, "auto");
    let _relay = lab.start_tcp_relay().expect("start the TCP relay");
    lab.block_udp_from_client().expect("block UDP");
    let mut daemon = lab.start_sessiond().expect("start sessiond");
    daemon.set_env("SESSIOND_TEST_UDP_RETRY_SECS", "5");
    daemon.restart().expect("restart sessiond with the short retry");
    daemon
        .ctl_ok(&["start", "lab"])
        .unwrap_or_else(|e| panic!("the session did not start over TCP: {e:#}\n{}", daemon.log()));
    assert_eq!(status(&daemon)["tunnel"]["transport"], "tcp");
    lab.reset_all_leaks().expect("reset leaks");

    // A try while UDP is still blocked: the router drops its handshake,
    // and the call goes on over TCP meanwhile.
    let dropped = lab.udp_dropped().expect("read the UDP drop counter");
    lab::wait_until(Duration::from_secs(30), "a try over UDP", || {
        lab.udp_dropped().is_ok_and(|now| now > dropped)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    // While the try lets the gateway's UDP out, it does so for the
    // tunnel's marked socket only: an application's datagram to the same
    // address and port, bound to the physical link (unbound, routing sends
    // it into the tunnel), stays in; the outside meter would count it.
    if our_table(&lab).contains("udp dport 51820") {
        let sent = send_udp_off_the_tunnel(&lab, addr::GATEWAY_V4, addr::WG_PORT);
        println!("an application's UDP to the gateway during the try: {sent}");
        lab.assert_no_leaks();
    } else {
        println!("the try was over before the application's datagram was sent");
    }
    assert!(
        host_answers(&lab),
        "a try over UDP disturbed the tunnel\n{}",
        daemon.log()
    );
    lab::wait_until(Duration::from_secs(20), "the try over", || {
        !our_table(&lab).contains("udp dport 51820")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let s = status(&daemon);
    assert_eq!(s["tunnel"]["transport"], "tcp", "{s:#}");
    assert_eq!(s["cause"]["reason"], "udp_unanswered", "{s:#}");
    assert!(
        host_answers(&lab),
        "no traffic over TCP after the try\n{}",
        daemon.log()
    );
    lab.assert_no_leaks();

    lab.unblock_udp_from_client().expect("unblock UDP");
    let unblocked = Instant::now();
    lab::wait_until(Duration::from_secs(60), "the session back on UDP", || {
        daemon
            .status()
            .is_ok_and(|s| s["tunnel"]["transport"] == "udp" && s["cause"].is_null())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    println!(
        "UDP unblocked -> tunnel back on UDP after {:?} (tries every 5 s here)",
        unblocked.elapsed()
    );
    assert_back_on_udp(&lab, &daemon, addr::CLIENT_V4);
}

/// sessiond comes back after a crash and the relay does not answer (it is
/// gone, or the machine is now on a network that passes UDP): the `auto`
/// session resumed over TCP gives UDP its turn and comes up there, the
/// relay's TCP closed behind it.
#[test]
fn an_auto_session_resumed_over_tcp_goes_to_udp_when_the_relay_does_not_answer() {
    let lab = lab();
    profile_with_transport(&lab, "auto");
    let relay = lab.start_tcp_relay().expect("start the TCP relay");
    lab.block_udp_from_client().expect("block UDP");
    let mut daemon = lab.start_sessiond().expect("start sessiond");
    daemon
        .ctl_ok(&["start", "lab"])
        .unwrap_or_else(|e| panic!("the session did not start over TCP: {e:#}\n{}", daemon.log()));
    assert_eq!(status(&daemon)["tunnel"]["transport"], "tcp");
    lab.reset_all_leaks().expect("reset leaks");

    daemon.kill9().expect("kill -9 sessiond");
    lab::wait_until(Duration::from_secs(5), "sessiond gone", || !daemon.is_running())
        .expect("sessiond exits");
    relay.kill().expect("stop the relay");
    lab.unblock_udp_from_client().expect("unblock UDP");

    let restarted = Instant::now();
    daemon.restart().expect("restart sessiond");
    lab::wait_until(
        Duration::from_secs(60),
        "the resumed session active over UDP",
        || {
            daemon
                .status()
                .is_ok_and(|s| s["state"] == "active" && s["tunnel"]["transport"] == "udp")
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    println!(
        "sessiond restarted without a relay -> session active over UDP after {:?}",
        restarted.elapsed()
    );
    assert!(
        host_answers(&lab),
        "no traffic after the resume\n{}",
        daemon.log()
    );
    let table = our_table(&lab);
    assert!(
        table.contains("udp dport 51820") && !table.contains("tcp dport 443"),
        "the lockdown does not admit exactly the gateway's UDP:\n{table}"
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
    lab.assert_no_leaks();
}

/// A call runs over UDP and the network starts blocking UDP mid-session
/// (a hotel's network changing its rules, or a roam onto one that blocks
/// it): the `auto` session notices the gateway stopped answering and
/// moves to the relay's TCP, as a start on such a network would, instead
/// of staying down. The firewall then lets out the relay's TCP and no
/// more the gateway's UDP, and nothing leaks on the way.
#[test]
fn an_auto_session_over_udp_falls_back_to_tcp_when_the_network_starts_blocking_udp() {
    let lab = lab();
    profile_with_transport(&lab, "auto");
    let _relay = lab.start_tcp_relay().expect("start the TCP relay");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon
        .ctl_ok(&["start", "lab"])
        .unwrap_or_else(|e| panic!("the session did not start: {e:#}\n{}", daemon.log()));
    let s = status(&daemon);
    assert_eq!(s["tunnel"]["transport"], "udp", "{s:#}");
    assert!(s["cause"].is_null(), "{s:#}");
    assert!(host_answers(&lab), "no traffic over UDP\n{}", daemon.log());
    assert!(
        !marked_tcp_reaches_relay(&lab),
        "the relay's TCP is let out while the session is on UDP"
    );
    lab.reset_all_leaks().expect("reset leaks");

    lab.block_udp_from_client().expect("block UDP");
    let blocked = Instant::now();
    lab::wait_until(Duration::from_secs(60), "traffic to the video host again", || {
        host_answers(&lab)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    println!(
        "UDP blocked mid-session -> traffic over TCP after {:?}",
        blocked.elapsed()
    );
    assert_fell_back_to_tcp(&lab, &daemon);
    daemon.ctl_ok(&["stop"]).expect("stop");
    lab.assert_no_leaks();
}

/// After a fall-back mid-session: active over TCP and `status` says why,
/// the gateway hears us through the relay, the firewall lets out the
/// relay's TCP and no more the gateway's UDP, nothing leaked.
fn assert_fell_back_to_tcp(lab: &Lab, daemon: &Daemon) {
    assert!(
        lab.udp_dropped().expect("read the UDP drop counter") > 0,
        "the router dropped no UDP: the test did not block anything"
    );
    lab::wait_until(Duration::from_secs(10), "status saying why", || {
        daemon
            .status()
            .is_ok_and(|s| s["cause"]["reason"] == "udp_unanswered")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let s = status(daemon);
    assert_eq!(s["state"], "active", "{s:#}");
    assert_eq!(s["tunnel"]["transport"], "tcp", "{s:#}");
    assert_eq!(
        s["problem"],
        format!("the gateway did not answer over UDP; using TCP port {RELAY_PORT} (slower)"),
        "{s:#}"
    );
    let told = s["last_recovery"].as_str().unwrap_or_default();
    assert!(told.contains("over TCP"), "{s:#}");
    // What the gateway sees: our handshake came through the relay.
    let ours = lab.client_key().expect("client key").1;
    let endpoints = lab.gateway_wg_show(&["endpoints"]).expect("wg show");
    assert!(
        endpoints
            .lines()
            .any(|l| l.starts_with(&ours) && l.contains("127.0.0.1:")),
        "the gateway does not see us through the relay: {endpoints}"
    );
    // The firewall admits the relay's TCP, no more the gateway's UDP.
    let table = our_table(lab);
    assert!(table.contains("tcp dport 443"), "{table}");
    assert!(!table.contains("udp dport 51820"), "{table}");
    assert!(
        marked_tcp_reaches_relay(lab),
        "the tunnel's TCP to the relay is not let out"
    );
    lab.assert_no_leaks();
}

/// A call over UDP on a network that lets UDP through, and the laptop
/// moves to one that blocks it (the hotel's Wi-Fi): the handshake from
/// the new address goes unanswered, and the `auto` session moves to the
/// relay's TCP instead of staying down.
#[test]
fn an_auto_session_over_udp_that_roams_onto_a_network_blocking_udp_falls_back_to_tcp() {
    let lab = lab();
    profile_with_transport(&lab, "auto");
    let _relay = lab.start_tcp_relay().expect("start the TCP relay");
    let mut daemon = start_over_udp_then_roam_onto_a_network_blocking_it(&lab);
    let moved = Instant::now();
    lab::wait_until(Duration::from_secs(40), "traffic to the video host again", || {
        host_answers(&lab)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    println!(
        "moved onto a network that blocks UDP -> traffic over TCP after {:?}",
        moved.elapsed()
    );
    let s = status(&daemon);
    assert!(s["tunnel"]["path_changes"].as_u64().unwrap_or(0) >= 1, "{s:#}");
    assert_fell_back_to_tcp(&lab, &daemon);

    // The move was persisted before the firewall changed: a crash from
    // here resumes on the relay's TCP at once, never the gateway's UDP.
    daemon.kill9().expect("kill -9 sessiond");
    lab::wait_until(Duration::from_secs(5), "sessiond gone", || !daemon.is_running())
        .expect("sessiond exits");
    daemon.restart().expect("restart sessiond");
    let table = our_table(&lab);
    assert!(
        table.contains("tcp dport 443") && !table.contains("udp dport 51820"),
        "the resumed lockdown does not admit exactly the relay's TCP:\n{table}"
    );
    lab::wait_until(Duration::from_secs(30), "the resumed session active", || {
        daemon
            .status()
            .is_ok_and(|s| s["state"] == "active" && s["tunnel"]["transport"] == "tcp")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    assert!(
        host_answers(&lab),
        "no traffic after the resume\n{}",
        daemon.log()
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
    lab.assert_no_leaks();
}

/// Starts an `auto` session over UDP on the second network (UDP passes
/// there), makes the first network block UDP and moves the client there.
fn start_over_udp_then_roam_onto_a_network_blocking_it(lab: &Lab) -> Daemon<'_> {
    lab.add_roaming_link().expect("add the roaming link");
    // The session starts on the second network (UDP passes there).
    lab.ip_batch(
        Ns::Client,
        &[format!(
            "route replace default via {} dev {}",
            addr::ROUTER_ROAM_V4,
            addr::ROAM_CLIENT_IF
        )],
    )
    .expect("use the second network");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon
        .ctl_ok(&["start", "lab"])
        .unwrap_or_else(|e| panic!("the session did not start: {e:#}\n{}", daemon.log()));
    assert_eq!(status(&daemon)["tunnel"]["transport"], "udp");
    assert!(host_answers(lab), "no traffic over UDP\n{}", daemon.log());
    // The first network blocks UDP; the laptop moves there.
    lab.block_udp_from_client().expect("block UDP");
    lab.reset_all_leaks().expect("reset leaks");
    lab.ip_batch(
        Ns::Client,
        &[
            format!(
                "route replace default via {} dev {}",
                addr::ROUTER_CLIENT_V4,
                addr::CLIENT_IF
            ),
            format!(
                "addr del {}/26 dev {}",
                addr::ROAM_CLIENT_V4,
                addr::ROAM_CLIENT_IF
            ),
            format!("link set {} down", addr::ROAM_CLIENT_IF),
        ],
    )
    .expect("move to the network that blocks UDP");
    daemon
}

/// A block moves the call to TCP, but the relay is down (or this network
/// blocks it too): the session gives UDP its turn every few seconds and
/// comes back on it once UDP passes again, instead of waiting for good on
/// a relay that never answers.
#[test]
fn an_auto_session_moved_to_tcp_whose_relay_is_down_comes_back_on_udp() {
    let lab = lab();
    profile_with_transport(&lab, "auto");
    // Started for the meter's exception for the relay's TCP, then gone.
    let relay = lab.start_tcp_relay().expect("start the TCP relay");
    relay.kill().expect("stop the relay");
    lab::wait_until(Duration::from_secs(10), "the relay gone", || {
        lab.exec_ok(Ns::Gateway, &["ss", "-Htln"])
            .is_ok_and(|out| !out.contains(&format!("{RELAY_ENDPOINT} ")))
    })
    .expect("stop the relay");
    let daemon = start_over_udp_then_roam_onto_a_network_blocking_it(&lab);
    lab::wait_until(Duration::from_secs(30), "the session on TCP", || {
        daemon
            .status()
            .is_ok_and(|s| s["tunnel"]["transport"] == "tcp" && s["cause"]["reason"] == "trying_tcp")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    assert!(!host_answers(&lab), "traffic flowed with neither way open");
    lab.unblock_udp_from_client().expect("unblock UDP");
    let unblocked = Instant::now();
    lab::wait_until(Duration::from_secs(40), "the session back on UDP", || {
        daemon
            .status()
            .is_ok_and(|s| s["tunnel"]["transport"] == "udp" && s["cause"].is_null())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    println!(
        "relay down, UDP unblocked -> tunnel back on UDP after {:?}",
        unblocked.elapsed()
    );
    assert_back_on_udp(&lab, &daemon, addr::CLIENT_V4);
}
