//! Life on a real machine (issue: systemd, boot, profile changes, everyday
//! commands): a boot with a persisted session, hot reload of profiles, and
//! an import of a real wg-quick file. Run as root after
//! `cargo build --workspace`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lab::{addr, wait_until, Daemon, Lab, Ns};

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

fn state(daemon: &Daemon) -> String {
    daemon
        .status()
        .map(|s| s["state"].as_str().unwrap_or("?").to_string())
        .unwrap_or_else(|e| format!("status failed: {e:#}"))
}

/// sessiond dies mid-session, then the machine reboots: kernel state is gone
/// (firewall, rules, the tunnel), files stay (the persisted session, the
/// pinned resolver file).
fn crash_and_reboot(lab: &Lab, daemon: &mut Daemon) {
    daemon.kill9().expect("kill -9");
    wait_until(Duration::from_secs(5), "sessiond gone", || !daemon.is_running()).expect("exit");
    for family in ["inet", "netdev"] {
        lab.exec_ok(Ns::Client, &["nft", "delete", "table", family, "sessiongate"])
            .expect("clear nft");
    }
    for family in ["-4", "-6"] {
        for pref in ["5190", "5191"] {
            lab.exec_ok(Ns::Client, &["ip", family, "rule", "del", "pref", pref])
                .expect("clear rules");
        }
    }
}

#[test]
fn a_boot_with_a_persisted_session_leaks_nothing_from_the_first_moment() {
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let mut daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    crash_and_reboot(&lab, &mut daemon);
    // The network interface is down until systemd has started sessiond.
    lab.exec_ok(Ns::Client, &["ip", "link", "set", addr::CLIENT_IF, "down"])
        .expect("link down");
    assert!(
        daemon.state_dir().join("session.json").exists(),
        "no persisted session"
    );

    // Applications keep trying to talk the whole time.
    lab.reset_leaks().expect("reset");
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    std::thread::scope(|scope| {
        let (stop2, rounds2, lab2) = (stop.clone(), rounds.clone(), &lab);
        scope.spawn(move || {
            let short = Duration::from_millis(200);
            while !stop2.load(Ordering::SeqCst) {
                let _ = lab2.probe_tcp_timeout(Ns::Client, addr::OTHER_V4, 443, short);
                let _ = lab2.probe_udp_timeout(Ns::Client, addr::HOST_V4, 10000, short);
                let _ = lab2.dns_query_timeout(Ns::Client, addr::PUBLIC_DNS_V4, addr::OTHER_NAME, "A", short);
                rounds2.fetch_add(1, Ordering::SeqCst);
            }
        });

        let booted = Instant::now();
        daemon.restart().expect("sessiond starts at boot");
        // Ready means locked down: only now does the network come up.
        assert!(
            lab.exec_ok(Ns::Client, &["nft", "list", "tables"])
                .expect("nft")
                .contains("sessiongate"),
            "sessiond opened its socket before the lockdown was in place"
        );
        lab.exec_ok(Ns::Client, &["ip", "link", "set", addr::CLIENT_IF, "up"])
            .expect("link up");
        lab.exec_ok(
            Ns::Client,
            &["ip", "route", "replace", "default", "via", addr::ROUTER_CLIENT_V4],
        )
        .expect("default route back");
        wait_until(Duration::from_secs(60), "the resumed session active", || {
            state(&daemon) == "active"
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
        println!("boot -> session active after {:?}", booted.elapsed());
        // Let the generator run a few rounds against the active session too.
        let seen = rounds.load(Ordering::SeqCst);
        wait_until(Duration::from_secs(10), "more probe rounds", || {
            rounds.load(Ordering::SeqCst) >= seen + 3
        })
        .expect("the generator is running");
        stop.store(true, Ordering::SeqCst);
    });
    println!("{} probe rounds during the boot", rounds.load(Ordering::SeqCst));
    assert_eq!(lab.leaks().expect("leaks"), 0, "{}", lab.leak_report());
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// After a reboot, sessiond's startup trust check refuses to run (here the
/// profiles directory became group-writable). Refusing must not leave the
/// persisted session open: the lockdown is back before the process exits,
/// and once the directory is fixed the session resumes and stops normally.
#[test]
fn a_refused_start_after_a_reboot_still_locks_the_persisted_session_down() {
    use std::os::unix::fs::PermissionsExt;
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let mut daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    crash_and_reboot(&lab, &mut daemon);
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443),
        Ok(format!("peer={}", addr::CLIENT_V4)),
        "after the simulated reboot the network should be open, as it would be"
    );
    let profiles = daemon.profiles_dir().to_path_buf();
    std::fs::set_permissions(&profiles, std::fs::Permissions::from_mode(0o775)).expect("chmod 775");

    lab.reset_leaks().expect("reset");
    let refused = daemon
        .restart()
        .expect_err("sessiond should refuse a group-writable profiles dir");
    let refused = format!("{refused:#}");
    assert!(refused.contains("writable by group or others"), "{refused}");
    assert!(refused.contains("stays locked down"), "{refused}");
    assert!(
        lab.exec_ok(Ns::Client, &["nft", "list", "tables"])
            .expect("nft")
            .contains("inet sessiongate"),
        "the refusing sessiond left the persisted session open"
    );
    let short = Duration::from_millis(300);
    assert!(lab
        .probe_tcp_timeout(Ns::Client, addr::OTHER_V4, 443, short)
        .is_err());
    assert!(lab
        .probe_udp_timeout(Ns::Client, addr::HOST_V4, 10000, short)
        .is_err());
    assert_eq!(lab.leaks().expect("leaks"), 0, "{}", lab.leak_report());

    std::fs::set_permissions(&profiles, std::fs::Permissions::from_mode(0o755)).expect("chmod 755");
    daemon
        .restart()
        .expect("sessiond starts once the directory is fixed");
    wait_until(Duration::from_secs(30), "the resumed session active", || {
        state(&daemon) == "active"
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    daemon.ctl_ok(&["stop"]).expect("stop");
    assert!(!lab
        .exec_ok(Ns::Client, &["nft", "list", "tables"])
        .expect("nft")
        .contains("sessiongate"));
    assert_eq!(lab.leaks().expect("leaks"), 0, "{}", lab.leak_report());
}

#[test]
fn profile_edits_are_picked_up_live_and_bad_ones_never_disturb_the_session() {
    let lab = lab();
    let files = lab.sessiond_profile().expect("profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    assert!(
        lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443).is_err(),
        "other host open before the edit"
    );

    // A broken edit: reported, and the session carries on.
    std::fs::write(&files.path, files.toml.replace("udp = [10000]", "udp = [70000]")).expect("edit");
    wait_until(
        Duration::from_secs(10),
        "the invalid edit reported in the log",
        || daemon.log().contains("allow[0].udp: port 70000 is out of range"),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let profiles = daemon.ctl_ok(&["profiles", "--json"]).expect("profiles");
    assert!(profiles.contains("port 70000 is out of range"), "{profiles}");
    assert_eq!(state(&daemon), "active");
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );

    // A valid edit of the allow list takes effect at once.
    let widened = format!(
        "{}\n[[allow]]\nhost = \"{}\"\ntcp = [443]\n",
        files.toml,
        addr::OTHER_NAME
    );
    std::fs::write(&files.path, &widened).expect("edit");
    wait_until(
        Duration::from_secs(10),
        "other.test allowed after the edit",
        || {
            lab.probe_tcp_timeout(Ns::Client, addr::OTHER_V4, 443, Duration::from_millis(500))
                == Ok(format!("peer={}", addr::GATEWAY_V4))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let status = daemon.status().expect("status");
    assert_eq!(status["state"], "active");
    assert!(
        status["allowed"].as_array().is_some_and(|a| a.len() == 2),
        "{status}"
    );
    assert_eq!(status["pending"], serde_json::Value::Null);

    // A tunnel change waits for the next start, and status says so.
    std::fs::write(
        &files.path,
        widened.replace("persistent_keepalive = 5", "persistent_keepalive = 7"),
    )
    .expect("edit");
    wait_until(
        Duration::from_secs(10),
        "status notes the pending tunnel change",
        || {
            daemon.status().is_ok_and(|s| {
                s["pending"]
                    .as_str()
                    .unwrap_or("")
                    .contains("next `sessionctl start`")
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    assert_eq!(state(&daemon), "active");

    // A new profile appears without a restart.
    lab.write_profile("second", |t| t).expect("second profile");
    let listed = daemon.ctl_ok(&["profiles", "--json"]).expect("profiles");
    assert!(listed.contains("\"second\""), "{listed}");
    daemon.ctl_ok(&["stop"]).expect("stop");
}

#[test]
fn a_real_wg_quick_file_imports_into_a_working_profile() {
    let lab = lab();
    let (key_file, _) = lab.client_key().expect("client key");
    let private = std::fs::read_to_string(&key_file).expect("read key");
    let conf = lab.tmp_dir().join("practice.conf");
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = {}/32, {}/128\nDNS = {}\nMTU = 1380\n\n[Peer]\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 25\n",
            private.trim(),
            addr::DAEMON_TUN_V4,
            addr::DAEMON_TUN_V6,
            addr::GATEWAY_TUN_V4,
            lab.gateway_public_key(),
            addr::GATEWAY_ENDPOINT
        ),
    )
    .expect("write wg-quick file");
    let daemon = lab.start_sessiond().expect("start sessiond");
    let dir = daemon.profiles_dir().to_string_lossy().into_owned();
    let conf_path = conf.to_string_lossy().into_owned();
    let out = daemon
        .ctl_ok(&[
            "import",
            &conf_path,
            "--name",
            "imported",
            "--allow",
            "meet.test:443/tcp",
            "--allow",
            "meet.test:10000/udp",
            "--dir",
            &dir,
        ])
        .expect("import");
    assert!(out.contains("imported.toml"), "{out}");
    let key = daemon.profiles_dir().join("keys").join("imported.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).expect("key").permissions());
    assert_eq!(mode & 0o777, 0o600);
    daemon.ctl_ok(&["check", "imported"]).expect("check");

    daemon
        .ctl_ok(&["start", "imported"])
        .expect("start the imported profile");
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::MEET_NAME, 443),
        Ok(format!("peer={}", addr::GATEWAY_V6))
    );
    assert!(lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443).is_err());
    daemon.ctl_ok(&["stop"]).expect("stop");

    // Importing again never overwrites.
    let again = daemon
        .ctl(&[
            "import",
            &conf_path,
            "--name",
            "imported",
            "--allow",
            "meet.test:443/tcp",
            "--dir",
            &dir,
        ])
        .expect("import again");
    assert_eq!(again.status.code(), Some(1), "{again:?}");
}
