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

/// A reboot with a persisted session: the link is up and applications send
/// from the first moment (a UDP spray every half millisecond, and TCP,
/// UDP and DNS probes in a loop). What leaves before sessiond runs at all is
/// systemd's to prevent (the unit orders the network after sessiond's
/// READY; see the systemd test); from the moment sessiond tells systemd it
/// is ready (READY=1 on NOTIFY_SOCKET, as under `Type=notify`) through the
/// resume to an active session, nothing may leave outside the tunnel or to
/// a forbidden host inside it. The zero is the product's: the harness no
/// longer holds the link down.
#[test]
fn a_boot_with_a_persisted_session_leaks_nothing_once_sessiond_is_ready() {
    use std::os::unix::net::UnixDatagram;
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let mut daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    crash_and_reboot(&lab, &mut daemon);
    assert!(
        daemon.state_dir().join("session.json").exists(),
        "no persisted session"
    );
    let notify_path = lab.tmp_dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind NOTIFY_SOCKET");
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    daemon.set_env("NOTIFY_SOCKET", &notify_path.to_string_lossy());

    // Applications keep trying the whole time, from before sessiond runs.
    lab.reset_all_leaks().expect("reset");
    let labhost = lab.labhost_path().to_string_lossy().into_owned();
    let targets = [
        format!("{}:10000", addr::OTHER_V4),
        format!("{}:10000", addr::HOST_V4),
        format!("{}:53", addr::PUBLIC_DNS_V4),
        format!("[{}]:10000", addr::HOST_V6),
    ];
    let mut spray_args = vec![labhost.as_str(), "spray"];
    spray_args.extend(targets.iter().map(String::as_str));
    let spray = lab.spawn(Ns::Client, &spray_args).expect("start the spray");
    wait_until(Duration::from_secs(5), "the spray leaving in clear", || {
        lab.leaks().is_ok_and(|n| n > 0)
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", spray.log()));
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

        // READY is watched on its own thread, so the meters are zeroed the
        // moment it arrives, not after the harness saw the control socket.
        let booted = Instant::now();
        let watcher = scope.spawn(|| -> Result<(String, String), String> {
            let mut message = [0u8; 512];
            loop {
                let n = notify
                    .recv(&mut message)
                    .map_err(|e| format!("no READY=1 from sessiond: {e}"))?;
                let text = String::from_utf8_lossy(&message[..n]).into_owned();
                if text.lines().any(|l| l == "READY=1") {
                    let before = lab.leak_report();
                    lab.reset_all_leaks().map_err(|e| format!("{e:#}"))?;
                    return Ok((text, before));
                }
            }
        });
        daemon.restart().expect("sessiond starts at boot");
        let (ready, before_ready) = watcher
            .join()
            .expect("READY watcher")
            .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
        println!(
            "READY ({}) within {:?} of boot; before it: {before_ready}",
            ready.trim(),
            booted.elapsed()
        );
        wait_until(Duration::from_secs(60), "the resumed session active", || {
            state(&daemon) == "active"
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
        println!("boot -> session active after {:?}", booted.elapsed());
        // Let the generators run a few rounds against the active session too.
        let seen = rounds.load(Ordering::SeqCst);
        wait_until(Duration::from_secs(10), "more probe rounds", || {
            rounds.load(Ordering::SeqCst) >= seen + 3
        })
        .expect("the generator is running");
        stop.store(true, Ordering::SeqCst);
    });
    assert!(spray.is_running(), "the spray stopped: {}", spray.log());
    spray.kill().expect("stop the spray");
    println!("{} probe rounds during the boot", rounds.load(Ordering::SeqCst));
    lab.assert_no_leaks();
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

    lab.reset_all_leaks().expect("reset");
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
    lab.assert_no_leaks();

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
    lab.assert_no_leaks();
}

#[test]
fn profile_edits_are_picked_up_live_and_bad_ones_never_disturb_the_session() {
    let lab = lab();
    let files = lab.sessiond_profile().expect("profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    lab.reset_all_leaks().expect("reset");
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
    lab.set_tunnel_allowed_profile(&widened)
        .expect("tunnel meter follows the edit");
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
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// The other half of a live edit: narrowing. Once `status` shows the
/// narrowed allow list, a removed host (learned from a DNS answer, so it
/// sits in the allow set with a timeout) and a removed port must be closed
/// (a short grace for the firewall write, no more), and what is still
/// allowed stays open. Both leak meters stay at zero.
#[test]
fn a_narrowing_edit_closes_removed_hosts_and_ports_at_once() {
    let lab = lab();
    let files = lab
        .write_profile("lab", |t| {
            format!("{t}\n[[allow]]\nhost = \"{}\"\ntcp = [443]\n", addr::OTHER_NAME)
        })
        .expect("profile");
    lab.set_tunnel_allowed_profile(&files.toml)
        .expect("tunnel meter follows the profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    lab.reset_all_leaks().expect("reset");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    let through = |what: Result<String, String>| what.is_ok_and(|w| w.contains(addr::GATEWAY_V4));
    assert!(
        through(lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443)),
        "other.test before the edit"
    );
    assert!(
        through(lab.probe_udp(Ns::Client, addr::HOST_V4, 10000)),
        "udp before the edit"
    );

    let narrowed = lab.default_profile_toml().replace("udp = [10000]", "");
    std::fs::write(&files.path, &narrowed).expect("edit");
    wait_until(
        Duration::from_secs(10),
        "status shows the narrowed allow list",
        || {
            daemon
                .status()
                .is_ok_and(|s| s["allowed"].as_array().is_some_and(|a| a.len() == 1))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    lab.set_tunnel_allowed_profile(&narrowed)
        .expect("tunnel meter follows the narrowing");
    let still_open = |what: &str, probe: &dyn Fn() -> bool| {
        wait_until(Duration::from_secs(1), what, || !probe())
            .err()
            .map(|_| what.to_string())
    };
    let short = Duration::from_millis(300);
    let open: Vec<String> = [
        still_open("tcp other.test:443", &|| {
            lab.probe_tcp_timeout(Ns::Client, addr::OTHER_V4, 443, short)
                .is_ok()
        }),
        still_open("udp meet.test:10000", &|| {
            lab.probe_udp_timeout(Ns::Client, addr::HOST_V4, 10000, short)
                .is_ok()
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(
        open.is_empty(),
        "still open after status showed the narrowing: {open:?}\n{}",
        lab.tunnel_leak_report()
    );
    assert!(
        through(lab.probe_tcp(Ns::Client, addr::HOST_V4, 443)),
        "what is still allowed must stay open"
    );
    lab.assert_no_leaks();
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
    let imported = std::fs::read_to_string(daemon.profiles_dir().join("imported.toml"))
        .expect("read the imported profile");
    lab.set_tunnel_allowed_profile(&imported)
        .expect("tunnel meter follows the imported profile");
    lab.reset_all_leaks().expect("reset");

    daemon
        .ctl_ok(&["start", "imported"])
        .expect("start the imported profile");
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::MEET_NAME, 443),
        Ok(format!("peer={}", addr::GATEWAY_V6))
    );
    assert!(lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443).is_err());
    lab.assert_no_leaks();
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

/// A group and users made for one test in the host's /etc/group and
/// /etc/passwd (not network state: the lab's namespaces share them), removed
/// again on drop, also after a failed assertion.
struct LocalAccounts {
    group: String,
    users: Vec<String>,
}

impl LocalAccounts {
    fn new(group: &str) -> LocalAccounts {
        lab::util::run(&["groupadd", "--system", group]).expect("groupadd");
        LocalAccounts {
            group: group.to_string(),
            users: Vec::new(),
        }
    }

    /// A system user with its own primary group and no home, optionally
    /// also a member of the test's group.
    fn add_user(&mut self, name: &str, member: bool) {
        let mut args = vec![
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ];
        if member {
            args.extend(["--groups", self.group.as_str()]);
        }
        args.push(name);
        lab::util::run(&args).expect("useradd");
        self.users.push(name.to_string());
    }
}

impl Drop for LocalAccounts {
    fn drop(&mut self) {
        for user in &self.users {
            if let Err(e) = lab::util::run(&["userdel", user]) {
                eprintln!("removing user {user}: {e:#}");
            }
        }
        if let Err(e) = lab::util::run(&["groupdel", &self.group]) {
            eprintln!("removing group {}: {e:#}", self.group);
        }
    }
}

/// The control group, for real: a group that exists and a non-root member
/// runs `sessionctl` against sessiond (status, start, stop), while a
/// non-root user outside the group is turned away.
#[test]
fn a_member_of_the_control_group_runs_sessionctl_and_others_cannot() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let lab = lab();
    let id = lab.id().to_string();
    let mut accounts = LocalAccounts::new(&format!("sgctl{id}"));
    let (member, outsider) = (format!("sgmem{id}"), format!("sgout{id}"));
    accounts.add_user(&member, true);
    accounts.add_user(&outsider, false);
    // Others may pass through the lab's private dir to reach the socket
    // (not list it; the profiles dir inside stays 0700).
    std::fs::set_permissions(lab.tmp_dir(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod the lab dir");
    lab.sessiond_profile().expect("profile");
    let daemon = lab
        .start_sessiond_for_group(&accounts.group)
        .expect("start sessiond");
    let gid = nix::unistd::Group::from_name(&accounts.group)
        .expect("group lookup")
        .expect("the group exists")
        .gid
        .as_raw();
    let meta = std::fs::metadata(daemon.socket()).expect("socket");
    assert_eq!(meta.gid(), gid, "the socket does not belong to the control group");
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");

    let text = |out: &std::process::Output| {
        format!(
            "exit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    };
    let status = daemon
        .ctl_as(&member, &["status", "--json"])
        .expect("run sessionctl");
    assert!(
        status.status.success(),
        "member: {}\n{}",
        text(&status),
        daemon.log()
    );
    let refused = daemon
        .ctl_as(&outsider, &["status", "--json"])
        .expect("run sessionctl");
    assert!(
        !refused.status.success(),
        "an outsider used the socket: {}",
        text(&refused)
    );

    lab.reset_all_leaks().expect("reset");
    let started = daemon.ctl_as(&member, &["start", "lab"]).expect("run sessionctl");
    assert!(
        started.status.success(),
        "member start: {}\n{}",
        text(&started),
        daemon.log()
    );
    assert_eq!(state(&daemon), "active");
    let refused = daemon.ctl_as(&outsider, &["stop"]).expect("run sessionctl");
    assert!(
        !refused.status.success(),
        "an outsider stopped the session: {}",
        text(&refused)
    );
    assert_eq!(state(&daemon), "active");
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
    lab.assert_no_leaks();
    let stopped = daemon.ctl_as(&member, &["stop"]).expect("run sessionctl");
    assert!(
        stopped.status.success(),
        "member stop: {}\n{}",
        text(&stopped),
        daemon.log()
    );
    assert_eq!(state(&daemon), "idle");
}

/// A lockdown that no session owns (the early-boot unit's, after the state
/// file it kept the machine closed for was removed by hand) is opened by an
/// explicit `sessionctl stop`, and by nothing else: sessiond starting idle
/// leaves it in place.
#[test]
fn stop_with_no_session_removes_the_early_boot_lockdown() {
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/early-lockdown.nft");
    lab.exec_ok(Ns::Client, &["nft", "-f", rules])
        .expect("load the early lockdown");
    let daemon = lab.start_sessiond().expect("start sessiond");
    assert_eq!(state(&daemon), "idle");
    let blocked = lab.probe_tcp(Ns::Client, addr::HOST_V4, 443);
    assert!(blocked.is_err(), "the early lockdown let TCP out: {blocked:?}");
    assert!(
        lab.exec(Ns::Client, &["nft", "list", "table", "inet", "sessiongate"])
            .expect("nft")
            .status
            .success(),
        "sessiond starting idle removed the early lockdown"
    );

    let out = daemon.ctl_ok(&["stop"]).expect("stop");
    assert!(out.contains("lockdown was left"), "stop said: {out}");
    assert!(
        !lab.exec(Ns::Client, &["nft", "list", "table", "inet", "sessiongate"])
            .expect("nft")
            .status
            .success(),
        "the early lockdown is still there after stop"
    );
    lab.probe_tcp(Ns::Client, addr::HOST_V4, 443)
        .expect("meet.test reachable after stop");
}

/// sessiond is killed mid-session (kill -9) and started again without a
/// reboot, so the kernel still holds `src_valid_mark` = 1 from the crashed
/// run; the resumed session's stop must still give back the value from
/// before the session started (the lab client starts with 0), not the 1
/// the resume found.
#[test]
fn stop_after_a_crash_and_resume_restores_src_valid_mark() {
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let read_mark = || {
        lab.exec_ok(Ns::Client, &["sysctl", "-n", "net.ipv4.conf.all.src_valid_mark"])
            .expect("sysctl")
            .trim()
            .to_string()
    };
    let before = read_mark();
    let mut daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    assert_eq!(read_mark(), "1", "a session sets src_valid_mark");

    daemon.kill9().expect("kill -9");
    wait_until(Duration::from_secs(5), "sessiond gone", || !daemon.is_running()).expect("exit");
    daemon.restart().expect("sessiond starts again");
    wait_until(Duration::from_secs(30), "the resumed session active", || {
        state(&daemon) == "active"
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));

    daemon.ctl_ok(&["stop"]).expect("stop");
    assert_eq!(
        read_mark(),
        before,
        "stop after a resume left net.ipv4.conf.all.src_valid_mark changed"
    );
}
