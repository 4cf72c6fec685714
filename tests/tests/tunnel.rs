//! The WireGuard tunnel against Debian's wireguard-go (issue: tunnel).
//! Each test builds its own lab; run as root after `cargo build --workspace`.

use std::time::{Duration, Instant};

use lab::{addr, wait_until, Daemon, Lab, Ns};

/// labhost's echo port: everything sent comes back.
const BULK_PORT: u16 = 9000;

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

/// The lab profile with the video host allowed by address (names are
/// answered by the DNS stub, which these tests do not depend on); the
/// tunnel leak meter follows it.
fn literal_profile(lab: &Lab, name: &str, edit: impl FnOnce(String) -> String) {
    let files = lab
        .write_profile(name, |t| {
            edit(t.replace(
                &format!("host = \"{}\"", addr::MEET_NAME),
                &format!("host = \"{}\"", addr::HOST_V4),
            ))
        })
        .expect("write profile");
    // The tunnel leak meter allows what this profile allows.
    lab.set_tunnel_allowed_profile(&files.toml)
        .expect("tunnel meter follows the profile");
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

fn state(daemon: &Daemon) -> String {
    daemon
        .status()
        .map(|s| s["state"].as_str().unwrap_or("?").to_string())
        .unwrap_or_else(|e| format!("status failed: {e:#}"))
}

/// What a user would compare to see that the session left nothing behind.
fn network_snapshot(lab: &Lab) -> String {
    let mut out = String::new();
    for cmd in [
        &["ip", "-4", "rule"][..],
        &["ip", "-6", "rule"],
        &["ip", "-4", "route", "show", "table", "all"],
        &["ip", "-6", "route", "show", "table", "all"],
        &["ip", "link"],
        &["ip", "addr"],
        &["nft", "list", "ruleset"],
    ] {
        let text = lab.exec_ok(Ns::Client, cmd).expect("snapshot command");
        out.push_str(&format!("$ {}\n{text}\n", cmd.join(" ")));
    }
    // Every interface's IPv4/IPv6 settings (sessiond sets
    // net.ipv4.conf.all.src_valid_mark for its routes).
    let sysctls = lab
        .exec_ok(Ns::Client, &["sysctl", "net.ipv4.conf", "net.ipv6.conf"])
        .expect("sysctl");
    out.push_str(&format!("$ sysctl net.ipv4.conf net.ipv6.conf\n{sysctls}\n"));
    out
}

/// Panics with the lines that differ, when two snapshots differ.
#[track_caller]
fn assert_same(before: &str, after: &str, what: &str) {
    if before == after {
        return;
    }
    let (b, a): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
    let gone: Vec<&&str> = b.iter().filter(|l| !a.contains(l)).collect();
    let new: Vec<&&str> = a.iter().filter(|l| !b.contains(l)).collect();
    panic!("{what}\nonly before: {gone:#?}\nonly after: {new:#?}");
}

/// The connection-tracking table as flows (protocol and original
/// direction's addresses and ports), sorted, without timers and counters,
/// which change by themselves.
fn conntrack_flows(lab: &Lab) -> Vec<String> {
    let out = lab
        .exec(Ns::Client, &["conntrack", "-L"])
        .expect("run conntrack -L");
    assert!(
        out.status.success(),
        "conntrack -L: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut flows: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let mut words = line.split_whitespace();
            let proto = words.next().unwrap_or("?").to_string();
            let mut flow = vec![proto];
            let mut seen = Vec::new();
            for w in words {
                let Some((key, _)) = w.split_once('=') else {
                    continue;
                };
                // The first src/dst/sport/dport/type/code: the original direction.
                if ["src", "dst", "sport", "dport", "type", "code"].contains(&key) && !seen.contains(&key) {
                    seen.push(key);
                    flow.push(w.to_string());
                }
            }
            flow.join(" ")
        })
        .collect();
    flows.sort();
    flows
}

#[test]
fn a_session_carries_traffic_both_ways_through_wireguard_go() {
    let lab = lab();
    literal_profile(&lab, "lab", |t| t);
    let daemon = lab.start_sessiond().expect("start sessiond");
    lab.reset_all_leaks().expect("reset leaks");

    let started = daemon.ctl(&["start", "lab"]).expect("run sessionctl start");
    assert_eq!(
        started.status.code(),
        Some(0),
        "start failed: {}\n{}",
        stderr(&started),
        daemon.log()
    );

    let status = daemon.status().expect("status");
    assert_eq!(status["state"], "active", "{status}");
    assert_eq!(status["profile"], "lab");
    assert_eq!(status["tunnel"]["interface"], lab::DAEMON_TUN_IF);
    assert_eq!(status["tunnel"]["endpoint"], addr::GATEWAY_ENDPOINT);
    assert!(
        status["tunnel"]["last_handshake_secs"].as_u64().is_some(),
        "{status}"
    );

    // The host sees the gateway's address: the connection went through the tunnel.
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
    assert_eq!(
        lab.probe_udp(Ns::Client, addr::HOST_V4, 10000),
        Ok(format!("peer={} probe", addr::GATEWAY_V4))
    );
    // wireguard-go knows our key and has a handshake with it.
    let handshakes = lab.gateway_wg_show(&["latest-handshakes"]).expect("wg show");
    let ours = lab.client_key().expect("client key").1;
    assert!(
        handshakes
            .lines()
            .any(|l| l.starts_with(&ours) && !l.trim_end().ends_with("\t0")),
        "the gateway has no handshake with our key:\n{handshakes}"
    );
    let status = daemon.status().expect("status");
    assert!(status["tunnel"]["rx_bytes"].as_u64().unwrap_or(0) > 0, "{status}");
    assert!(status["tunnel"]["tx_bytes"].as_u64().unwrap_or(0) > 0, "{status}");
    lab.assert_no_leaks();

    // A second start while the session runs is refused and changes nothing.
    let again = daemon.ctl(&["start", "lab"]).expect("run sessionctl start");
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(stderr(&again).contains("already running"), "{}", stderr(&again));
    assert_eq!(state(&daemon), "active");
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );

    let human = daemon.ctl_ok(&["status"]).expect("status");
    assert!(
        human.starts_with(&format!(
            "Protected: only {} through {}, handshake",
            addr::HOST_V4,
            addr::GATEWAY_ENDPOINT
        )),
        "{human}"
    );
    assert!(human.contains("handshake"), "{human}");
    println!("{human}");
}

/// The batched data path (TUN offload, UDP GSO and GRO) against a peer that
/// has none of it: 32 MiB each way through the tunnel, every byte checked,
/// over IPv4 and IPv6, with nothing outside the tunnel.
#[test]
fn bulk_transfers_arrive_intact_both_ways_over_ipv4_and_ipv6() {
    const BYTES: &str = "33554432";
    let lab = lab();
    literal_profile(&lab, "lab", |t| {
        let t = t.replace("tcp = [443]", &format!("tcp = [443, {BULK_PORT}]"));
        format!(
            "{t}\n[[allow]]\nhost = \"{}\"\ntcp = [{BULK_PORT}]\n",
            addr::HOST_V6
        )
    });
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start the session");
    lab.reset_all_leaks().expect("reset leaks");

    let labhost = lab.labhost_path().to_string_lossy().to_string();
    for (host, gateway) in [
        (addr::HOST_V4, addr::GATEWAY_V4),
        (addr::HOST_V6, addr::GATEWAY_V6),
    ] {
        let clock = Instant::now();
        let out = lab
            .exec(
                Ns::Client,
                &[
                    &labhost,
                    "bulk",
                    host,
                    &BULK_PORT.to_string(),
                    BYTES,
                    "--timeout-ms",
                    "20000",
                ],
            )
            .expect("run labhost bulk");
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(
            said,
            format!("peer={gateway} bytes={BYTES}"),
            "bulk transfer to {host}: {said}\n{}",
            daemon.log()
        );
        println!(
            "32 MiB each way to {host} intact in {:.2} s",
            clock.elapsed().as_secs_f64()
        );
    }
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

#[test]
fn stop_leaves_rules_routes_and_links_exactly_as_before() {
    let lab = lab();
    literal_profile(&lab, "lab", |t| t);
    let daemon = lab.start_sessiond().expect("start sessiond");
    let before = network_snapshot(&lab);
    lab.reset_all_leaks().expect("reset leaks");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    let during = network_snapshot(&lab);
    assert_ne!(before, during, "the session changed nothing?");
    assert!(
        during.contains("fwmark 0x5347"),
        "no policy rule during the session:\n{during}"
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
    assert_eq!(state(&daemon), "idle");
    let after = network_snapshot(&lab);
    assert_same(&before, &after, "stop did not restore the network exactly");
    // And the network works as before: direct, from the client's own address.
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::CLIENT_V4))
    );
}

/// After stop, the connection-tracking table holds no flow the session
/// made (the tunnel's UDP to the endpoint, the probes' flows through the
/// tunnel): a stale entry would let a later ruleset's `ct state
/// established` admit what no allowlist admitted.
#[test]
fn stop_leaves_no_connection_tracking_entries_behind() {
    let lab = lab();
    literal_profile(&lab, "lab", |t| t);
    let daemon = lab.start_sessiond().expect("start sessiond");
    let before = conntrack_flows(&lab);
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    assert_eq!(
        lab.probe_udp(Ns::Client, addr::HOST_V4, 10000),
        Ok(format!("peer={} probe", addr::GATEWAY_V4))
    );
    let during = conntrack_flows(&lab);
    assert_ne!(before, during, "the session made no flow at all?");
    daemon.ctl_ok(&["stop"]).expect("stop");
    assert_eq!(state(&daemon), "idle");
    assert_eq!(conntrack_flows(&lab), before, "flows of the session outlive it");
}

#[test]
fn a_wrong_peer_key_fails_clearly_within_the_timeout() {
    let lab = lab();
    let private = lab.exec_ok(Ns::Client, &["wg", "genkey"]).expect("wg genkey");
    let wrong = lab::gateway::public_key_of(private.trim()).expect("derive a public key");
    let gateway_key = lab.gateway_public_key().to_string();
    literal_profile(&lab, "wrongkey", |t| {
        t.replace(&gateway_key, &wrong)
            .replace("handshake_timeout_secs = 10", "handshake_timeout_secs = 3")
    });
    let daemon = lab.start_sessiond().expect("start sessiond");
    let before = network_snapshot(&lab);
    lab.reset_all_leaks().expect("reset leaks");
    let clock = Instant::now();
    let out = daemon.ctl(&["start", "wrongkey"]).expect("run sessionctl start");
    let took = clock.elapsed();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).starts_with(&format!(
            "sessionctl: no handshake from {} within 3 s: check the peer's public key and that UDP {} reaches it",
            addr::GATEWAY_ENDPOINT,
            addr::WG_PORT
        )),
        "{}",
        stderr(&out)
    );
    assert!(
        took < Duration::from_secs(8),
        "start took {took:?} with a 3 s handshake timeout"
    );
    println!("wrong key reported after {took:?}");
    // Not active, and stop brings everything back.
    assert_eq!(state(&daemon), "degraded");
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
    assert_same(
        &before,
        &network_snapshot(&lab),
        "stop did not restore the network",
    );
}

#[test]
fn a_dead_gateway_degrades_the_session_and_its_return_recovers_it() {
    let lab = lab();
    literal_profile(&lab, "lab", |t| t);
    let daemon = lab.start_sessiond().expect("start sessiond");
    lab.reset_all_leaks().expect("reset leaks");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    assert_eq!(state(&daemon), "active");

    lab.kill_gateway().expect("kill wireguard-go");
    let killed = Instant::now();
    wait_until(Duration::from_secs(90), "status degraded", || {
        state(&daemon) == "degraded"
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let detect = killed.elapsed();
    let status = daemon.status().expect("status");
    assert!(
        status["problem"]
            .as_str()
            .unwrap_or("")
            .contains("stopped answering"),
        "{status}"
    );

    lab.restart_gateway().expect("restart wireguard-go");
    let restarted = Instant::now();
    wait_until(Duration::from_secs(90), "status active again", || {
        state(&daemon) == "active"
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let recover = restarted.elapsed();
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
    println!("gateway killed -> degraded after {detect:?}; restarted -> active after {recover:?}");
    lab.assert_no_leaks();
}
