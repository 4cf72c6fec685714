//! Real networks (issue 17): roaming and sleep mid-session.
//!
//! Roaming: the client moves to another subnet behind another router port
//! (Wi-Fi to Ethernet, a new network); the tunnel must handshake again from
//! the new address at once, leak nothing on the way, and `status` must say
//! what happened.
//!
//! Sleep: sessiond is frozen while the gateway restarts and forgets the
//! session (as after a suspend), then thawed and told by a stand-in logind
//! on a private bus that the machine woke up; traffic must flow again at
//! once. Run as root after `cargo build --workspace`.

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
    let human = daemon.ctl_ok(&["status"]).expect("sessionctl status");
    assert!(human.contains("Lately:   after the network changed"), "{human}");
    println!("status: {}", status_field(&daemon, "last_recovery"));
    lab.assert_no_leaks();
}

/// A stand-in `org.freedesktop.login1` on a private bus (dbus-daemon), able
/// to announce a wake-up the way logind does.
struct StandInLogind {
    runtime: tokio::runtime::Runtime,
    connection: zbus::Connection,
}

impl StandInLogind {
    fn start(address: &str) -> anyhow::Result<StandInLogind> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let connection = runtime.block_on(async {
            zbus::connection::Builder::address(address)
                .name("org.freedesktop.login1")
                .build()
                .await
        })?;
        Ok(StandInLogind { runtime, connection })
    }

    /// `PrepareForSleep(false)`: the machine has just woken up.
    fn announce_wake_up(&self) -> anyhow::Result<()> {
        self.runtime.block_on(self.connection.emit_signal(
            None::<&str>,
            "/org/freedesktop/login1",
            "org.freedesktop.login1.Manager",
            "PrepareForSleep",
            &(false,),
        ))?;
        Ok(())
    }
}

#[test]
fn a_wake_up_after_the_gateway_forgot_the_session_handshakes_again_at_once() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    let lab = lab();
    literal_profile(&lab, "lab");
    let mut daemon = lab.start_sessiond().expect("start sessiond");

    // A private bus standing in for the system bus, only for this test.
    let (_dbus, address) = lab
        .private_bus(Ns::Client, &lab.tmp_dir().join("system_bus"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let logind = StandInLogind::start(&address).unwrap_or_else(|e| panic!("stand-in logind: {e:#}"));
    daemon.set_env(sessiond::sleep::TEST_BUS_ENV, &address);
    daemon.restart().expect("restart sessiond on the private bus");
    wait_until(
        Duration::from_secs(10),
        "sessiond listening for the sleep signal",
        || daemon.log().contains("listening for logind's sleep signal"),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));

    daemon.ctl_ok(&["start", "lab"]).expect("start the session");
    assert!(
        host_answers(&lab),
        "no traffic before the sleep\n{}",
        daemon.log()
    );
    lab.reset_all_leaks().expect("reset leaks");

    // "Suspend": sessiond stands still while the gateway starts over with
    // the same keys and no session.
    let pid = Pid::from_raw(daemon.pid().expect("sessiond pid") as i32);
    kill(pid, Signal::SIGSTOP).expect("freeze sessiond");
    let restarted = lab.restart_gateway();
    kill(pid, Signal::SIGCONT).expect("thaw sessiond");
    let thawed = Instant::now();
    restarted.expect("restart wireguard-go");
    logind.announce_wake_up().expect("announce the wake-up");

    wait_until(Duration::from_secs(30), "traffic to the video host again", || {
        host_answers(&lab)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let flowing = thawed.elapsed();
    println!("thaw -> traffic to the video host again after {flowing:?}");

    wait_until(Duration::from_secs(10), "status to tell of the wake-up", || {
        status_field(&daemon, "last_recovery").contains("woke from sleep")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    println!("status: {}", status_field(&daemon, "last_recovery"));
    lab.assert_no_leaks();
}

/// With `allow_lan`, the local network after a move is the new one: a host
/// on the new subnet answers, and the firewall no longer opens the old
/// subnet (which now could only be reached through the new router).
#[test]
fn with_allow_lan_the_local_network_follows_a_move() {
    let lab = lab();
    let files = lab
        .write_profile("lan", |t| {
            t.replace(
                &format!("host = \"{}\"", addr::MEET_NAME),
                &format!("host = \"{}\"", addr::HOST_V4),
            )
            .replace("[options]", "[options]\nallow_lan = true")
        })
        .expect("write profile");
    lab.set_tunnel_allowed_profile(&files.toml)
        .expect("tunnel meter follows the profile");
    // The other network's link exists (the Wi-Fi card is there) but has no
    // address yet: the session starts on the old network alone.
    lab.add_roaming_link().expect("add the roaming link");
    lab.ip_batch(
        Ns::Client,
        &[
            format!("addr flush dev {}", addr::ROAM_CLIENT_IF),
            format!(
                "addr add {}/64 dev {} nodad",
                addr::ROAM_CLIENT_V6,
                addr::ROAM_CLIENT_IF
            ),
        ],
    )
    .expect("take the new network's IPv4 address away");
    // A host on the new network: its router, serving TCP 8080.
    let _lan_host = lab
        .spawn_named(
            Ns::Router,
            "lan-host",
            &[&lab.labhost_path().to_string_lossy(), "serve", "--tcp", "8080"],
        )
        .expect("lan host");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lan"]).expect("start the session");
    assert!(host_answers(&lab), "no traffic before the move\n{}", daemon.log());
    let old_lan = format!("{}/26", "192.0.2.0");
    let new_lan = format!("{}/26", "192.0.2.192");
    let link_table = || {
        lab.exec_ok(Ns::Client, &["nft", "list", "table", "netdev", "sessiongate"])
            .unwrap_or_else(|e| format!("{e:#}"))
    };
    assert!(link_table().contains(&old_lan), "{}", link_table());
    wait_until(Duration::from_secs(10), "the new network's host in reach", || {
        lab.probe_tcp_timeout(
            Ns::Client,
            addr::ROUTER_CLIENT_V4,
            8080,
            Duration::from_millis(300),
        )
        .is_ok()
    })
    .expect("the old network's host answers before the move");
    lab.reset_all_leaks().expect("reset leaks");

    // Move: the new lease, the default route through it, the old network gone.
    lab.ip_batch(
        Ns::Client,
        &[
            format!(
                "addr add {}/26 dev {}",
                addr::ROAM_CLIENT_V4,
                addr::ROAM_CLIENT_IF
            ),
            format!(
                "route replace default via {} dev {}",
                addr::ROUTER_ROAM_V4,
                addr::ROAM_CLIENT_IF
            ),
            format!("addr del {}/26 dev {}", addr::CLIENT_V4, addr::CLIENT_IF),
            format!("link set {} down", addr::CLIENT_IF),
        ],
    )
    .expect("move to the other network");
    wait_until(Duration::from_secs(20), "traffic to the video host again", || {
        host_answers(&lab)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    lab.assert_no_leaks();

    // The new network's host answers (its subnet is the LAN now)...
    wait_until(
        Duration::from_secs(10),
        "the new network's host to answer",
        || {
            lab.probe_tcp_timeout(Ns::Client, addr::ROUTER_ROAM_V4, 8080, Duration::from_millis(300))
                == Ok(format!("peer={}", addr::ROAM_CLIENT_V4))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", link_table(), daemon.log()));
    // ...the old network's address is refused, and the firewall holds the
    // new subnet, not the old one, at the link level too.
    let old = lab.probe_tcp_timeout(
        Ns::Client,
        addr::ROUTER_CLIENT_V4,
        8080,
        Duration::from_millis(500),
    );
    assert!(old.is_err(), "the old network's host answered: {old:?}");
    let table = link_table();
    assert!(table.contains(&new_lan) && !table.contains(&old_lan), "{table}");
    // Only the LAN probes went out in clear, all to the new network's host.
    let destinations = lab.leak_destinations().expect("leak destinations");
    assert!(
        destinations.iter().all(|d| d.contains(addr::ROUTER_ROAM_V4)),
        "{}",
        lab.leak_report()
    );
    lab.reset_leaks().expect("reset leaks");
    lab.assert_no_leaks();
}
