//! sessiond under a real systemd: a Debian root booted with
//! `systemd-nspawn --boot` in the lab's client namespace, with this build's
//! binaries, unit, sysusers and tmpfiles snippets installed as a package
//! would. Everything goes through the installed unit: its sandbox, its boot
//! order, its restarts. Run as root after `cargo build --workspace`; the
//! first run builds the cached container root with mmdebstrap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lab::container::Container;
use lab::{addr, wait_until, Lab, Ns};

const USER: &str = "alice";

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

/// A container with sessiongate installed, the lab profile in place, booted.
fn booted(lab: &Lab) -> Container<'_> {
    let files = lab.sessiond_profile().expect("profile");
    let mut container = Container::new(lab).unwrap_or_else(|e| panic!("container: {e:#}"));
    container.install_sessiongate().expect("install sessiongate");
    container.install_profile(&files).expect("install the profile");
    // What DHCP gave the machine: the lab's public resolver.
    container
        .write(
            "/etc/resolv.conf",
            &format!("nameserver {}\n", addr::PUBLIC_DNS_V4),
            0o644,
        )
        .expect("resolv.conf");
    container.boot().unwrap_or_else(|e| panic!("boot: {e:#}"));
    container
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `sessionctl ARGS` as root in the container; panics with the journal.
fn ctl(c: &Container, args: &[&str]) -> String {
    let mut full = vec!["sessionctl"];
    full.extend_from_slice(args);
    c.exec_ok(&full)
        .unwrap_or_else(|e| panic!("{e:#}\njournal:\n{}", c.journal("sessiond")))
}

fn state_of(c: &Container) -> String {
    let out = c.exec(&["sessionctl", "status", "--json"]);
    match out {
        Ok(o) if o.status.success() => serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .map(|v| v["state"].as_str().unwrap_or("?").to_string())
            .unwrap_or_else(|e| format!("status is not JSON: {e}")),
        Ok(o) => format!("status failed: {}", text(&o)),
        Err(e) => format!("status failed: {e:#}"),
    }
}

fn has_lockdown(c: &Container) -> bool {
    c.exec(&["nft", "list", "table", "inet", "sessiongate"])
        .is_ok_and(|o| o.status.success())
}

/// The lab's TCP probe from inside the container, so names are resolved
/// through the container's own resolver file (the one sessiond rewrites).
fn probe_tcp(c: &Container, host: &str) -> Result<String, String> {
    match c.exec(&["labhost", "probe-tcp", host, "443"]) {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(text(&o)),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// meet.test answers by name, and sees the gateway's address (the
/// tunnel's NAT), over IPv4 or IPv6, whichever the name resolved to first.
fn assert_through_tunnel(c: &Container) {
    let seen = probe_tcp(c, addr::MEET_NAME);
    let through = [addr::GATEWAY_V4, addr::GATEWAY_V6].map(|a| format!("peer={a}"));
    assert!(
        seen.as_ref().is_ok_and(|s| through.contains(s)),
        "meet.test not reached through the tunnel by name: {seen:?}\njournal:\n{}",
        c.journal("sessiond")
    );
}

/// Runs `body` while the client namespace keeps trying to reach the
/// network behind the session's back (another host, the video host
/// directly, a public resolver), so the leak meter sees every moment.
fn with_traffic(lab: &Lab, body: impl FnOnce()) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    std::thread::scope(|scope| {
        let (stop2, rounds2) = (stop.clone(), rounds.clone());
        scope.spawn(move || {
            let short = Duration::from_millis(200);
            while !stop2.load(Ordering::SeqCst) {
                let _ = lab.probe_tcp_timeout(Ns::Client, addr::OTHER_V4, 443, short);
                let _ = lab.probe_udp_timeout(Ns::Client, addr::HOST_V4, 10000, short);
                let _ = lab.dns_query_timeout(Ns::Client, addr::PUBLIC_DNS_V4, addr::OTHER_NAME, "A", short);
                rounds2.fetch_add(1, Ordering::SeqCst);
            }
        });
        let guard = StopOnDrop(stop.clone());
        body();
        // At least one full round after the body, so its end is covered too.
        let seen = rounds.load(Ordering::SeqCst);
        wait_until(Duration::from_secs(10), "one more probe round", || {
            rounds.load(Ordering::SeqCst) > seen
        })
        .expect("the traffic generator runs");
        drop(guard);
    });
    rounds.load(Ordering::SeqCst)
}

/// Stops the traffic generator also when the body panics.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_member_of_the_control_group_runs_a_session_through_the_installed_unit() {
    let lab = lab();
    let c = booted(&lab);
    assert_eq!(
        c.unit_property("sessiond.service", "ActiveState").expect("show"),
        "active",
        "sessiond is not active after boot:\n{}",
        c.journal("sessiond")
    );
    assert!(
        !has_lockdown(&c),
        "a first boot without a session came up locked:\n{}",
        c.journal("sessiongate-early-lockdown")
    );
    let main_pid = c.unit_property("sessiond.service", "MainPID").expect("MainPID");

    // A user who is not (yet) in the control group is refused with the fix.
    c.exec_ok(&["useradd", "--create-home", USER]).expect("useradd");
    let refused = c.exec_as(USER, &["sessionctl", "status"]).expect("runuser");
    assert_eq!(refused.status.code(), Some(4), "{}", text(&refused));
    let said = text(&refused);
    assert!(
        said.contains("sessiongate") && said.contains("usermod -aG sessiongate"),
        "the refusal does not name the group and the fix: {said}"
    );
    // Added while sessiond runs: let in at the next login, no restart.
    c.exec_ok(&["usermod", "-aG", "sessiongate", USER])
        .expect("usermod");
    let status = c.exec_as(USER, &["sessionctl", "status"]).expect("runuser");
    assert!(status.status.success(), "member refused: {}", text(&status));

    lab.reset_leaks().expect("reset leaks");
    let started = c.exec_as(USER, &["sessionctl", "start", "lab"]).expect("runuser");
    assert!(
        started.status.success(),
        "start as {USER} failed: {}\njournal:\n{}",
        text(&started),
        c.journal("sessiond")
    );
    assert_eq!(state_of(&c), "active");

    // The sandbox keeps every feature: the TUN device, the src_valid_mark
    // sysctl, the resolver file pointed at the stub (names resolve through
    // the pinned resolver), libnftables in process.
    c.exec_ok(&["ip", "link", "show", lab::DAEMON_TUN_IF])
        .expect("the TUN device");
    assert_eq!(
        c.exec_ok(&["cat", "/proc/sys/net/ipv4/conf/all/src_valid_mark"])
            .expect("sysctl")
            .trim(),
        "1"
    );
    let resolv = c.exec_ok(&["cat", "/etc/resolv.conf"]).expect("resolv.conf");
    assert!(resolv.contains("127.0.0.1"), "resolver file not pinned: {resolv}");
    assert_through_tunnel(&c);
    assert!(probe_tcp(&c, addr::OTHER_NAME).is_err(), "other.test reachable");

    // sessionctl verify's live probes work from inside the sandbox too.
    let verified = c.exec_as(USER, &["sessionctl", "verify"]).expect("runuser");
    assert!(
        verified.status.success(),
        "verify: {}\njournal:\n{}",
        text(&verified),
        c.journal("sessiond")
    );

    // Firewall changes went through libnftables inside sessiond, not a
    // spawned nft.
    let maps = c
        .exec_ok(&["cat", &format!("/proc/{main_pid}/maps")])
        .expect("sessiond's memory maps");
    assert!(
        maps.contains("libnftables.so"),
        "libnftables is not loaded in sessiond:\n{}",
        c.journal("sessiond")
    );

    // nft monitor sees a flush and the table comes back.
    c.exec_ok(&["nft", "flush", "ruleset"]).expect("flush");
    wait_until(
        Duration::from_secs(10),
        "the firewall restored after a flush",
        || has_lockdown(&c),
    )
    .unwrap_or_else(|e| panic!("{e:#}\njournal:\n{}", c.journal("sessiond")));

    // The watchdog pings reach systemd from inside the sandbox.
    let first_ping = c
        .unit_property("sessiond.service", "WatchdogTimestampMonotonic")
        .expect("watchdog timestamp");
    wait_until(Duration::from_secs(10), "a watchdog ping", || {
        c.unit_property("sessiond.service", "WatchdogTimestampMonotonic")
            .is_ok_and(|t| t != first_ping)
    })
    .unwrap_or_else(|e| panic!("{e:#}\njournal:\n{}", c.journal("sessiond")));

    let stopped = c.exec_as(USER, &["sessionctl", "stop"]).expect("runuser");
    assert!(stopped.status.success(), "stop as {USER}: {}", text(&stopped));

    // Removed from the group, the user is refused at once, even from a
    // login that still carries the group (setpriv keeps it here).
    c.exec_ok(&["gpasswd", "-d", USER, "sessiongate"])
        .expect("gpasswd -d");
    let stale_login = c
        .exec(&[
            "setpriv",
            &format!("--reuid={USER}"),
            &format!("--regid={USER}"),
            "--groups=sessiongate",
            "sessionctl",
            "status",
        ])
        .expect("setpriv");
    assert_eq!(stale_login.status.code(), Some(4), "{}", text(&stale_login));
    assert!(
        text(&stale_login).contains("control group sessiongate"),
        "{}",
        text(&stale_login)
    );
    assert!(!has_lockdown(&c), "the firewall stayed after stop");
    assert_eq!(
        c.unit_property("sessiond.service", "MainPID").expect("MainPID"),
        main_pid,
        "sessiond restarted during the test:\n{}",
        c.journal("sessiond")
    );
    assert_eq!(lab.leaks().expect("leaks"), 0, "{}", lab.leak_report());
}

/// What a reboot does to the client namespace's kernel state: the firewall,
/// policy rules and sysctls are gone; the network interface comes up only
/// when the network manager brings it up.
fn forget_kernel_state(lab: &Lab) {
    lab.exec_ok(Ns::Client, &["nft", "flush", "ruleset"])
        .expect("clear nft");
    for family in ["-4", "-6"] {
        for pref in ["5190", "5191"] {
            let _ = lab.exec(Ns::Client, &["ip", family, "rule", "del", "pref", pref]);
        }
    }
    lab.exec_ok(
        Ns::Client,
        &["sysctl", "-q", "-w", "net.ipv4.conf.all.src_valid_mark=0"],
    )
    .expect("sysctl");
    lab.exec_ok(Ns::Client, &["ip", "link", "set", addr::CLIENT_IF, "down"])
        .expect("link down");
}

/// A stand-in for the machine's network manager: after network-pre.target
/// it records the firewall it finds, then brings the link up with its
/// default routes (what DHCP would give).
fn install_network_manager(c: &Container) {
    let unit = format!(
        "[Unit]\n\
         Description=lab stand-in for a network manager\n\
         DefaultDependencies=no\n\
         After=network-pre.target\n\
         Before=network.target\n\
         Wants=network.target\n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart=/bin/sh -c 'if nft list table inet sessiongate >/dev/null 2>/run/nft.err; \
         then echo locked; else echo \"open (nft exit $$?: $$(cat /run/nft.err))\"; fi > /run/firewall-at-network-up; \
         ip link set {dev} up; ip route replace default via {v4}; ip -6 route replace default via {v6}'\n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        dev = addr::CLIENT_IF,
        v4 = addr::ROUTER_CLIENT_V4,
        v6 = addr::ROUTER_CLIENT_V6,
    );
    c.write("/usr/lib/systemd/system/lab-network.service", &unit, 0o644)
        .expect("write the network unit");
    c.enable("lab-network.service", "multi-user.target")
        .expect("enable the network unit");
}

/// What the stand-in network unit found when it ran: "locked", or "open"
/// with nft's exit status and error (an "open" that is nft failing to list
/// reads differently from one where the table was missing).
fn firewall_at_network_up(c: &Container) -> String {
    c.exec_ok(&["cat", "/run/firewall-at-network-up"])
        .expect("the network unit ran")
        .trim()
        .to_string()
}

/// The journals that tell a boot's order: the early lockdown, the network
/// unit and sessiond.
fn boot_journals(c: &Container) -> String {
    ["sessiongate-early-lockdown", "lab-network", "sessiond"]
        .iter()
        .map(|u| format!("--- {u}:\n{}", c.journal(u)))
        .collect()
}

#[test]
fn a_restart_and_a_reboot_mid_session_stay_locked_down_and_resume() {
    let lab = lab();
    let mut c = booted(&lab);
    ctl(&c, &["start", "lab"]);
    let main_pid = c.unit_property("sessiond.service", "MainPID").expect("MainPID");

    // systemctl restart: the lockdown never goes away and the session
    // comes back by itself.
    lab.reset_leaks().expect("reset leaks");
    let lockdown_gone = AtomicBool::new(false);
    let watching = AtomicBool::new(true);
    with_traffic(&lab, || {
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while watching.load(Ordering::SeqCst) {
                    if !has_lockdown(&c) {
                        lockdown_gone.store(true, Ordering::SeqCst);
                    }
                }
            });
            let restarted = c.exec(&["systemctl", "restart", "sessiond"]).expect("systemctl");
            let settled = wait_until(
                Duration::from_secs(30),
                "the session active after a restart",
                || state_of(&c) == "active",
            );
            watching.store(false, Ordering::SeqCst);
            assert!(restarted.status.success(), "restart: {}", text(&restarted));
            settled.unwrap_or_else(|e| panic!("{e:#}\njournal:\n{}", c.journal("sessiond")));
        });
    });
    assert_ne!(
        c.unit_property("sessiond.service", "MainPID").expect("MainPID"),
        main_pid,
        "sessiond was not restarted"
    );
    assert!(
        !lockdown_gone.load(Ordering::SeqCst),
        "the lockdown table was missing during the restart"
    );
    assert_eq!(lab.leaks().expect("leaks"), 0, "{}", lab.leak_report());

    // A reboot: power off, the kernel forgets, boot again.
    install_network_manager(&c);
    c.poweroff().unwrap_or_else(|e| panic!("poweroff: {e:#}"));
    forget_kernel_state(&lab);
    lab.reset_leaks().expect("reset leaks");
    with_traffic(&lab, || {
        c.boot().unwrap_or_else(|e| panic!("boot: {e:#}"));
        wait_until(
            Duration::from_secs(60),
            "the session active after the reboot",
            || state_of(&c) == "active",
        )
        .unwrap_or_else(|e| panic!("{e:#}\njournal:\n{}", c.journal("sessiond")));
    });
    assert_eq!(
        firewall_at_network_up(&c),
        "locked",
        "the network came up before the lockdown was in place; journals:\n{}",
        boot_journals(&c)
    );
    assert_eq!(lab.leaks().expect("leaks"), 0, "{}", lab.leak_report());
    assert_through_tunnel(&c);
    ctl(&c, &["stop"]);
    assert!(!has_lockdown(&c));
}

/// Boots after `break_it` changed the powered-off machine, with traffic
/// trying to get out throughout, and checks that the machine is closed
/// before the network comes up and stays closed once systemd has given up
/// on sessiond.
fn boot_stays_closed(lab: &Lab, c: &mut Container, case: &str) {
    forget_kernel_state(lab);
    lab.reset_leaks().expect("reset leaks");
    with_traffic(lab, || {
        c.boot().unwrap_or_else(|e| panic!("{case}: boot: {e:#}"));
        wait_until(Duration::from_secs(60), "systemd to give up on sessiond", || {
            c.unit_property("sessiond.service", "ActiveState")
                .is_ok_and(|s| s == "failed")
        })
        .unwrap_or_else(|e| panic!("{case}: {e:#}\njournal:\n{}", c.journal("sessiond")));
    });
    assert_eq!(
        firewall_at_network_up(c),
        "locked",
        "{case}: the network came up open; journals:\n{}",
        boot_journals(c)
    );
    assert!(has_lockdown(c), "{case}: no lockdown once sessiond gave up");
    assert!(
        lab.probe_tcp_timeout(Ns::Client, addr::OTHER_V4, 443, Duration::from_millis(500))
            .is_err(),
        "{case}: another host is reachable"
    );
    assert_eq!(
        lab.leaks().expect("leaks"),
        0,
        "{case}: {}\nearly lockdown:\n{}",
        lab.leak_report(),
        c.journal("sessiongate-early-lockdown")
    );
    c.poweroff().unwrap_or_else(|e| panic!("{case}: poweroff: {e:#}"));
}

#[test]
fn a_boot_stays_closed_when_sessiond_cannot_run() {
    let lab = lab();
    let mut c = booted(&lab);
    ctl(&c, &["start", "lab"]);
    install_network_manager(&c);
    c.poweroff().unwrap_or_else(|e| panic!("poweroff: {e:#}"));
    let binary = c.path("/usr/sbin/sessiond");
    let moved = c.path("/usr/sbin/sessiond.away");
    let state_file = c.path("/var/lib/sessiongate/session.json");
    let state = std::fs::read(&state_file).expect("the persisted session");

    // The binary is missing (a broken upgrade).
    std::fs::rename(&binary, &moved).expect("move the binary away");
    boot_stays_closed(&lab, &mut c, "missing binary");
    std::fs::rename(&moved, &binary).expect("put the binary back");

    // The state file is corrupt: sessiond refuses to guess and exits.
    std::fs::write(&state_file, b"{\"profile\": \"lab\", \"endp").expect("corrupt the state");
    boot_stays_closed(&lab, &mut c, "corrupt state file");
    std::fs::write(&state_file, &state).expect("restore the state");

    // sessiond crashes at once, every time.
    std::fs::rename(&binary, &moved).expect("move the binary away");
    c.write("/usr/sbin/sessiond", "#!/bin/sh\nkill -SEGV $$\n", 0o755)
        .expect("a crashing sessiond");
    boot_stays_closed(&lab, &mut c, "crash-looping sessiond");
    std::fs::rename(&moved, &binary).expect("put the binary back");

    // Repaired: sessiond takes over from the early lockdown and resumes.
    forget_kernel_state(&lab);
    c.boot().unwrap_or_else(|e| panic!("boot: {e:#}"));
    wait_until(
        Duration::from_secs(60),
        "the session active after the repair",
        || state_of(&c) == "active",
    )
    .unwrap_or_else(|e| panic!("{e:#}\njournal:\n{}", c.journal("sessiond")));
    assert_through_tunnel(&c);
    ctl(&c, &["stop"]);
    assert!(!has_lockdown(&c), "the lockdown stayed after stop");

    // With no session persisted, a boot leaves the network alone.
    c.poweroff().unwrap_or_else(|e| panic!("poweroff: {e:#}"));
    forget_kernel_state(&lab);
    c.boot().unwrap_or_else(|e| panic!("boot: {e:#}"));
    assert!(!has_lockdown(&c), "a boot without a session locked the machine");
    let seen = firewall_at_network_up(&c);
    assert!(seen.starts_with("open"), "a boot without a session found: {seen}");
}

/// Builds the Debian package from this build's binaries (scripts/package
/// --debug-build) into `dir`, and a copy of it with a higher version (what
/// an upgrade installs). Returns (package, upgrade).
fn build_packages(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let script = lab::util::workspace_root().join("scripts/package");
    let dir_s = dir.to_string_lossy().into_owned();
    lab::util::run(&[&script.to_string_lossy(), "--debug-build", &dir_s])
        .unwrap_or_else(|e| panic!("scripts/package: {e:#}"));
    let deb = std::fs::read_dir(dir)
        .expect("package dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");
    // The same package as version X.1: unpack, bump, repack.
    let tree = dir.join("upgrade-tree");
    let tree_s = tree.to_string_lossy().into_owned();
    lab::util::run(&["dpkg-deb", "-R", &deb.to_string_lossy(), &tree_s]).expect("dpkg-deb -R");
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).expect("control");
    let bumped: String = text
        .lines()
        .map(|l| match l.strip_prefix("Version: ") {
            Some(v) => format!("Version: {v}.1\n"),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&control, bumped).expect("write control");
    let upgrade = dir.join("upgrade.deb");
    lab::util::run(&["dpkg-deb", "-b", "-Zgzip", &tree_s, &upgrade.to_string_lossy()]).expect("dpkg-deb -b");
    (deb, upgrade)
}

/// `apt-get ARGS` in the container, offline (every dependency is in the
/// root already).
fn apt(c: &Container, args: &[&str]) -> std::process::Output {
    let mut full = vec!["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q"];
    full.extend_from_slice(args);
    c.exec(&full).expect("apt-get")
}

fn exists(c: &Container, inside: &str) -> bool {
    c.path(inside).exists()
}

#[test]
fn the_debian_package_installs_upgrades_and_removes_without_opening_a_session() {
    let lab = lab();
    let files = lab.sessiond_profile().expect("profile");
    let packages = lab.tmp_dir().join("packages");
    let (deb, upgrade) = build_packages(&packages);
    let mut c = Container::new(&lab).unwrap_or_else(|e| panic!("container: {e:#}"));
    c.write(
        "/etc/resolv.conf",
        &format!("nameserver {}\n", addr::PUBLIC_DNS_V4),
        0o644,
    )
    .expect("resolv.conf");
    c.install(&deb, "/root/sessiongate.deb", 0o644)
        .expect("copy the package");
    let labhost = lab::util::find_binary("labhost").expect("labhost");
    c.install(&labhost, "/usr/local/bin/labhost", 0o755)
        .expect("copy labhost");
    c.install(&upgrade, "/root/sessiongate-upgrade.deb", 0o644)
        .expect("copy the upgrade");
    c.boot().unwrap_or_else(|e| panic!("boot: {e:#}"));

    // Install: the group, the directories, the units enabled (the portal
    // helper's socket listening), sessiond running.
    let out = apt(&c, &["install", "/root/sessiongate.deb"]);
    assert!(out.status.success(), "apt install: {}", text(&out));
    assert_eq!(
        c.unit_property("sessiond.service", "ActiveState").expect("show"),
        "active"
    );
    for unit in [
        "sessiond.service",
        "sessiongate-early-lockdown.service",
        "sessiongate-portal.socket",
    ] {
        assert_eq!(
            c.unit_property(unit, "UnitFileState").expect("show"),
            "enabled",
            "{unit}"
        );
    }
    assert_eq!(
        c.unit_property("sessiongate-portal.socket", "ActiveState")
            .expect("show"),
        "active",
        "the portal helper's socket is not listening"
    );
    c.exec_ok(&["getent", "group", "sessiongate"])
        .expect("the control group");
    for path in [
        "/usr/sbin/sessiond",
        "/usr/bin/sessionctl",
        "/usr/lib/sessiongate/sessiongate-portal",
        "/usr/lib/systemd/system/sessiongate-portal@.service",
        "/etc/netns",
        "/usr/share/man/man1/sessionctl.1.gz",
        "/usr/share/bash-completion/completions/sessionctl",
        "/usr/share/doc/sessiongate/examples/jitsi-practice.toml",
        "/etc/sessiongate/profiles/keys",
        "/var/lib/sessiongate",
    ] {
        assert!(exists(&c, path), "{path} is missing after install");
    }

    // A session, then an upgrade and a refused removal in the middle of it.
    c.install_profile(&files).expect("install the profile");
    lab.reset_leaks().expect("reset leaks");
    ctl(&c, &["start", "lab"]);
    let main_pid = c.unit_property("sessiond.service", "MainPID").expect("MainPID");
    let lockdown_gone = AtomicBool::new(false);
    let watching = AtomicBool::new(true);
    with_traffic(&lab, || {
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while watching.load(Ordering::SeqCst) {
                    if !has_lockdown(&c) {
                        lockdown_gone.store(true, Ordering::SeqCst);
                    }
                }
            });
            let upgraded = apt(&c, &["install", "/root/sessiongate-upgrade.deb"]);
            let removal = apt(&c, &["remove", "sessiongate"]);
            let settled = wait_until(
                Duration::from_secs(30),
                "the session active after the upgrade",
                || state_of(&c) == "active",
            );
            watching.store(false, Ordering::SeqCst);
            assert!(upgraded.status.success(), "upgrade: {}", text(&upgraded));
            assert!(!removal.status.success(), "removal mid-session went through");
            assert!(
                text(&removal).contains("sessionctl stop"),
                "the refusal does not say what to do: {}",
                text(&removal)
            );
            settled.unwrap_or_else(|e| panic!("{e:#}\njournal:\n{}", c.journal("sessiond")));
        });
    });
    assert!(
        !lockdown_gone.load(Ordering::SeqCst),
        "the lockdown was missing during the upgrade or the removal"
    );
    assert_ne!(
        c.unit_property("sessiond.service", "MainPID").expect("MainPID"),
        main_pid,
        "the upgrade did not restart sessiond"
    );
    assert!(
        exists(&c, "/usr/sbin/sessiond"),
        "the refused removal removed the binary"
    );
    assert_eq!(lab.leaks().expect("leaks"), 0, "{}", lab.leak_report());
    assert_through_tunnel(&c);

    // Removal after stop: sessiond gone, the configuration kept.
    ctl(&c, &["stop"]);
    let out = apt(&c, &["remove", "sessiongate"]);
    assert!(out.status.success(), "apt remove: {}", text(&out));
    assert!(!exists(&c, "/usr/sbin/sessiond"));
    assert_ne!(
        c.unit_property("sessiond.service", "ActiveState").expect("show"),
        "active"
    );
    assert!(!has_lockdown(&c), "a removal left the firewall behind");
    assert!(
        exists(&c, "/etc/sessiongate/profiles/lab.toml"),
        "remove must keep /etc/sessiongate"
    );

    // Purge: configuration, keys and state go.
    let out = apt(&c, &["purge", "sessiongate"]);
    assert!(out.status.success(), "apt purge: {}", text(&out));
    assert!(!exists(&c, "/etc/sessiongate"), "purge kept /etc/sessiongate");
    assert!(
        !exists(&c, "/var/lib/sessiongate"),
        "purge kept /var/lib/sessiongate"
    );

    // Reinstall: running again.
    let out = apt(&c, &["install", "/root/sessiongate.deb"]);
    assert!(out.status.success(), "reinstall: {}", text(&out));
    assert_eq!(
        c.unit_property("sessiond.service", "ActiveState").expect("show"),
        "active"
    );
    c.exec_ok(&["sessionctl", "status"])
        .expect("status after reinstall");
    c.poweroff().unwrap_or_else(|e| panic!("poweroff: {e:#}"));
}

/// A hotel's login page on the router's LAN side: every page is the login
/// form; it logs who asked.
const FAKE_PORTAL: &str = r#"
import http.server, sys
class Portal(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        data = b"hotel login page: room number?"
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, fmt, *args):
        sys.stdout.write("from %s %s\n" % (self.client_address[0], fmt % args))
        sys.stdout.flush()
server = http.server.ThreadingHTTPServer((sys.argv[1], 80), Portal)
print("ready", flush=True)
server.serve_forever()
"#;

/// The stand-in browser (the container has bash, not curl or python):
/// fetches the page it is given, says as whom and with which addresses it
/// ran, and tries another host on the internet; all into ~/portal-seen.
fn stand_in_browser() -> String {
    format!(
        r#"#!/bin/bash
url="${{@: -1}}"
host="${{url#http://}}"; host="${{host%%/*}}"
out="$HOME/portal-seen"
{{
  echo "uid $(id -u)"
  echo "addresses $(ip -4 -brief addr show | tr -s ' ' | tr '\n' ';')"
  page=$(timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/80" && printf "GET / HTTP/1.0\r\nHost: %s\r\n\r\n" "$0" >&3 && cat <&3' "$host" | tr -d '\r' | tail -n 1)
  echo "page $page"
  if timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/443"' {other} 2>/dev/null; then echo "internet reached"; else echo "internet refused"; fi
}} > "$out.tmp" 2>&1
mv "$out.tmp" "$out"
"#,
        other = addr::OTHER_V4
    )
}

/// The active instances of the portal helper's unit.
fn portal_helpers(c: &Container) -> String {
    c.exec_ok(&[
        "systemctl",
        "list-units",
        "--no-legend",
        "--plain",
        "--state=active",
        "sessiongate-portal@*.service",
    ])
    .unwrap_or_else(|e| format!("{e:#}"))
    .trim()
    .to_string()
}

/// `sessionctl portal` under the installed units: sessiond (whose sandbox
/// has none of the capabilities a network namespace needs) asks the
/// socket-activated helper unit, the namespace comes up, the stand-in
/// browser in it reaches the LAN's login page as the calling user while
/// the machine itself reaches nothing else, and the helper's unit goes on
/// `--close` and when sessiond stops.
#[test]
fn the_captive_portal_opens_through_its_own_unit_while_sessiond_stays_sandboxed() {
    let lab = lab();
    let portal_script = lab.tmp_dir().join("portal.py");
    std::fs::write(&portal_script, FAKE_PORTAL).expect("write the portal");
    let portal_server = lab
        .spawn_named(
            Ns::Router,
            "fake-portal",
            &[
                "python3",
                &portal_script.to_string_lossy(),
                addr::ROUTER_CLIENT_V4,
            ],
        )
        .expect("fake portal");
    wait_until(Duration::from_secs(10), "the fake portal to listen", || {
        portal_server.log().contains("ready")
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", portal_server.log()));
    let c = booted(&lab);
    c.write("/usr/local/bin/portal-browser", &stand_in_browser(), 0o755)
        .expect("the stand-in browser");
    c.exec_ok(&["useradd", "--create-home", USER]).expect("useradd");
    c.exec_ok(&["usermod", "-aG", "sessiongate", USER])
        .expect("usermod");
    let uid = c.exec_ok(&["id", "-u", USER]).expect("id").trim().to_string();
    // sessiond's sandbox is as tight as ever.
    let caps = c
        .unit_property("sessiond.service", "CapabilityBoundingSet")
        .expect("show");
    assert_eq!(
        caps, "cap_chown cap_net_admin cap_sys_nice",
        "sessiond's capabilities"
    );

    ctl(&c, &["start", "lab"]);
    lab.reset_all_leaks().expect("reset leaks");
    let opened = c
        .exec_as(
            USER,
            &[
                "sessionctl",
                "portal",
                "--during-session",
                "--seconds",
                "120",
                "--json",
                "--browser",
                "/usr/local/bin/portal-browser",
            ],
        )
        .expect("runuser");
    let journals = || {
        format!(
            "--- sessiond:\n{}\n--- portal helper:\n{}",
            c.journal("sessiond"),
            c.journal("sessiongate-portal@*")
        )
    };
    assert!(opened.status.success(), "{}\n{}", text(&opened), journals());
    let report: serde_json::Value =
        serde_json::from_slice(&opened.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&opened)));
    let address = report["address"].as_str().unwrap_or_default().to_string();
    assert!(address.starts_with("192.0.2."), "{report}");
    assert!(
        !portal_helpers(&c).is_empty(),
        "no helper unit runs:\n{}",
        journals()
    );

    let seen_path = c.path(&format!("/home/{USER}/portal-seen"));
    let seen = lab::wait_for(Duration::from_secs(30), "the stand-in browser's report", || {
        Ok(std::fs::read_to_string(&seen_path)?)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", portal_server.log(), journals()));
    println!("the stand-in browser saw:\n{seen}");
    assert!(
        seen.contains(&format!("uid {uid}\n")),
        "not run as {USER}: {seen}"
    );
    assert!(
        seen.contains("sgportal0") && seen.contains(&format!("{address}/")),
        "not run in the portal namespace: {seen}"
    );
    assert!(
        seen.contains("page hotel login page"),
        "the login page was not reached: {seen}\n{}",
        portal_server.log()
    );
    assert!(seen.contains("internet refused"), "{seen}");
    assert!(
        portal_server.log().contains(&format!("from {address} ")),
        "the portal did not see the namespace's address: {}",
        portal_server.log()
    );
    // The machine itself still reaches neither the portal nor another host.
    for (host, port) in [(addr::ROUTER_CLIENT_V4, "80"), (addr::OTHER_V4, "443")] {
        let out = c.exec(&["labhost", "probe-tcp", host, port]).expect("labhost");
        assert!(
            !out.status.success(),
            "the machine reached {host}:{port}: {}",
            text(&out)
        );
    }
    let destinations = lab.leak_destinations().expect("leak destinations");
    let portal_flow = format!("{} tcp/80", addr::ROUTER_CLIENT_V4);
    assert!(
        destinations.iter().all(|d| *d == portal_flow),
        "{}",
        lab.leak_report()
    );
    assert_eq!(
        lab.tunnel_leaks().expect("tunnel meter"),
        0,
        "{}",
        lab.tunnel_leak_report()
    );

    // --close: the helper's unit goes, and the firewall's exception with it.
    let closed = c
        .exec_as(USER, &["sessionctl", "portal", "--close"])
        .expect("runuser");
    assert!(closed.status.success(), "{}", text(&closed));
    wait_until(Duration::from_secs(15), "the helper unit to stop", || {
        portal_helpers(&c).is_empty()
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}\n{}", portal_helpers(&c), journals()));
    let link_table = c
        .exec_ok(&["nft", "list", "table", "netdev", "sessiongate"])
        .unwrap_or_default();
    assert!(
        !link_table.contains(&format!("ip saddr {address} ")),
        "{link_table}"
    );
    assert_eq!(state_of(&c), "active", "the session stays as it was");
    ctl(&c, &["stop"]);

    // A restart of sessiond with a portal open ends that portal's helper
    // cleanly (no failed unit left behind), and the next portal opens.
    let open_portal = |what: &str| {
        let opened = c
            .exec_as(USER, &["sessionctl", "portal", "--seconds", "120"])
            .expect("runuser");
        assert!(
            opened.status.success(),
            "{what}: {}\n{}",
            text(&opened),
            journals()
        );
        assert!(
            !portal_helpers(&c).is_empty(),
            "{what}: no helper unit runs:\n{}",
            journals()
        );
    };
    open_portal("before the restart");
    c.exec_ok(&["systemctl", "restart", "sessiond.service"])
        .expect("restart sessiond");
    open_portal("after the restart");
    let failed = c
        .exec_ok(&[
            "systemctl",
            "list-units",
            "--failed",
            "--no-legend",
            "--plain",
            "sessiongate-portal@*.service",
        ])
        .expect("list failed units");
    assert!(failed.trim().is_empty(), "{failed}\n{}", journals());

    // Stopping sessiond stops an open portal's helper unit too.
    c.exec_ok(&["systemctl", "stop", "sessiond.service"])
        .expect("stop sessiond");
    wait_until(
        Duration::from_secs(15),
        "the helper unit to stop with sessiond",
        || portal_helpers(&c).is_empty(),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {}\n{}", portal_helpers(&c), journals()));
}
