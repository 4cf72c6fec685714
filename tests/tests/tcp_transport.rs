//! Real networks (issue 17, item 4): a network that blocks UDP.
//!
//! The router drops every UDP packet from the client (a hotel or company
//! network that lets only TCP out); a relay beside the gateway takes the
//! tunnel's datagrams over TCP port 443 (`tcprelay`, Mullvad's
//! udp-over-tcp). With `[gateway] transport = "auto"` the session starts
//! anyway, over TCP, and `status` says why; with `transport = "tcp"` it
//! never tries UDP; with UDP alone it cannot start. Both leak meters stay
//! at zero: the outside meter counts everything but the WireGuard messages
//! to 51820 and the TCP to the relay. Run as root after `cargo build
//! --workspace`.

use std::time::Duration;

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
