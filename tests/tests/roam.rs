//! Real networks (issue 17): roaming mid-session. The client moves to
//! another subnet behind another router port (Wi-Fi to Ethernet, a new
//! network); the tunnel must handshake again from the new address at once,
//! leak nothing on the way, and `status` must say what happened.
//! Run as root after `cargo build --workspace`.

use std::time::{Duration, Instant};

use lab::{addr, wait_until, Daemon, Lab, Ns};

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

/// The lab profile with the video host allowed by address; the tunnel
/// leak meter follows it.
fn literal_profile(lab: &Lab, name: &str) {
    let files = lab
        .write_profile(name, |t| {
            t.replace(
                &format!("host = \"{}\"", addr::MEET_NAME),
                &format!("host = \"{}\"", addr::HOST_V4),
            )
        })
        .expect("write profile");
    lab.set_tunnel_allowed_profile(&files.toml)
        .expect("tunnel meter follows the profile");
}

fn status_field(daemon: &Daemon, field: &str) -> String {
    daemon
        .status()
        .map(|s| s[field].as_str().unwrap_or("").to_string())
        .unwrap_or_else(|e| format!("status failed: {e:#}"))
}

/// Traffic to the video host comes back through the gateway.
fn host_answers(lab: &Lab) -> bool {
    lab.probe_udp_timeout(Ns::Client, addr::HOST_V4, 10000, Duration::from_millis(300))
        == Ok(format!("peer={} probe", addr::GATEWAY_V4))
}

#[test]
fn moving_to_another_network_handshakes_again_from_the_new_address() {
    let lab = lab();
    literal_profile(&lab, "lab");
    lab.add_roaming_link().expect("add the roaming link");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start the session");
    assert_eq!(status_field(&daemon, "state"), "active");
    assert!(host_answers(&lab), "no traffic before the move\n{}", daemon.log());
    lab.reset_all_leaks().expect("reset leaks");

    // Move: the default route goes to the other router port, then the old
    // network's addresses go away and its link goes down (the laptop left
    // the Wi-Fi).
    lab.ip_batch(
        Ns::Client,
        &[
            format!(
                "route replace default via {} dev {}",
                addr::ROUTER_ROAM_V4,
                addr::ROAM_CLIENT_IF
            ),
            format!(
                "route replace default via {} dev {}",
                addr::ROUTER_ROAM_V6,
                addr::ROAM_CLIENT_IF
            ),
        ],
    )
    .expect("move the default route");
    let moved = Instant::now();
    lab.ip_batch(
        Ns::Client,
        &[
            format!("addr del {}/26 dev {}", addr::CLIENT_V4, addr::CLIENT_IF),
            format!("addr del {}/64 dev {}", addr::CLIENT_V6, addr::CLIENT_IF),
            format!("link set {} down", addr::CLIENT_IF),
        ],
    )
    .expect("leave the old network");

    // The gateway hears a handshake from the new address without any
    // application sending anything: the tunnel noticed the move itself.
    let ours = lab.client_key().expect("client key").1;
    let new_endpoint = format!("{}:", addr::ROAM_CLIENT_V4);
    wait_until(
        Duration::from_secs(20),
        "the gateway to see us at the new address",
        || {
            lab.gateway_wg_show(&["endpoints"]).is_ok_and(|e| {
                e.lines()
                    .any(|l| l.starts_with(&ours) && l.contains(&new_endpoint))
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let handshake_seen = moved.elapsed();
    wait_until(Duration::from_secs(20), "traffic to the video host again", || {
        host_answers(&lab)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let flowing = moved.elapsed();
    println!(
        "new default route -> gateway saw the new address after {handshake_seen:?}; traffic to the video host again after {flowing:?}"
    );

    // status says what happened.
    wait_until(
        Duration::from_secs(10),
        "status to tell of the network change",
        || status_field(&daemon, "last_recovery").contains("network changed"),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let status = daemon.status().expect("status");
    assert!(
        status["tunnel"]["path_changes"].as_u64().unwrap_or(0) >= 1,
        "{status}"
    );
    wait_until(Duration::from_secs(10), "the session active again", || {
        status_field(&daemon, "state") == "active"
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    println!("status: {}", status_field(&daemon, "last_recovery"));
    lab.assert_no_leaks();
}
