//! The tamper guard in every state of a session (leak issue, item 1), and
//! the commands while a start waits for its handshake: the session machine
//! must not sleep while `start` waits, so the guard puts the lockdown back
//! at once, `stop` cancels the waiting start and `status` answers. The
//! other states (degraded, resuming, reloading) each get their tables
//! flushed and deleted while forbidden traffic is sent, and must get back
//! the shape of *that* state. The active state is `killswitch.rs`'s.
//! Run as root after `cargo build --workspace`.

use std::process::Output;
use std::time::{Duration, Instant};

use lab::{addr, wait_until, Daemon, Lab, LabChild, Ns};

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

/// The lab profile with a handshake timeout longer than any test here
/// waits, so the start is still waiting when the test acts.
fn waiting_profile(lab: &Lab) {
    lab.write_profile("lab", |t| {
        t.replace("handshake_timeout_secs = 10", "handshake_timeout_secs = 120")
    })
    .expect("write profile");
}

fn nft_tables(lab: &Lab) -> String {
    lab.exec_ok(Ns::Client, &["nft", "list", "tables"])
        .unwrap_or_default()
}

fn state(daemon: &Daemon) -> String {
    daemon
        .status()
        .map(|s| s["state"].as_str().unwrap_or("?").to_string())
        .unwrap_or_else(|e| format!("status failed: {e:#}"))
}

/// Kills the gateway, then runs `f` while `sessionctl start lab` runs in
/// another thread and waits for the handshake with the lockdown in place.
/// Returns what `f` returned and the start's output.
fn during_a_waiting_start<T>(lab: &Lab, daemon: &Daemon, f: impl FnOnce() -> T) -> (T, Output) {
    lab.kill_gateway().expect("kill wireguard-go");
    std::thread::scope(|scope| {
        let start = scope.spawn(|| daemon.ctl(&["start", "lab"]).expect("run sessionctl start"));
        wait_until(
            Duration::from_secs(10),
            "a start waiting with the lockdown up",
            || state(daemon) == "starting" && nft_tables(lab).contains("table inet sessiongate"),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
        let result = f();
        let output = start.join().expect("the start thread");
        (result, output)
    })
}

/// Probes that must be refused while locked down: IPv6 to an internet-side
/// host, DNS to the public resolver, TCP to a host outside the profile.
/// Returns the ones that got an answer.
fn probes_that_passed(lab: &Lab) -> Vec<String> {
    let short = Duration::from_millis(700);
    let mut passed = Vec::new();
    if let Ok(reply) = lab.probe_tcp_timeout(Ns::Client, addr::HOST_V6, 443, short) {
        passed.push(format!("tcp [{}]:443 -> {reply}", addr::HOST_V6));
    }
    if let Ok(reply) = lab.dns_query_timeout(Ns::Client, addr::PUBLIC_DNS_V4, addr::OTHER_NAME, "A", short) {
        passed.push(format!("dns {} -> {reply:?}", addr::PUBLIC_DNS_V4));
    }
    if let Ok(reply) = lab.probe_tcp_timeout(Ns::Client, addr::OTHER_V4, 443, short) {
        passed.push(format!("tcp {}:443 -> {reply}", addr::OTHER_V4));
    }
    passed
}

#[test]
fn a_flushed_ruleset_is_put_back_while_a_start_waits_for_its_handshake() {
    let lab = lab();
    waiting_profile(&lab);
    let daemon = lab.start_sessiond().expect("start sessiond");
    let ((), start) = during_a_waiting_start(&lab, &daemon, || {
        let shape = lab
            .exec_ok(Ns::Client, &["nft", "list", "table", "inet", "sessiongate"])
            .expect("list our table");
        lab.exec_ok(Ns::Client, &["nft", "flush", "ruleset"])
            .expect("nft flush ruleset");
        lab.reset_all_leaks().expect("reset leaks");
        let flushed = std::time::Instant::now();
        wait_until(
            lab::RESTORE_DEADLINE,
            "our table back after a flush during a start",
            || nft_tables(&lab).contains("table inet sessiongate"),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
        println!(
            "table restored {:?} after a flush during a start",
            flushed.elapsed()
        );
        let restored = lab
            .exec_ok(Ns::Client, &["nft", "list", "table", "inet", "sessiongate"])
            .expect("list our table");
        assert_eq!(
            restored, shape,
            "the restored table is not the lockdown it replaced"
        );
        // Still waiting: the window the start leaves is closed.
        assert_eq!(state(&daemon), "starting");
        assert_eq!(probes_that_passed(&lab), Vec::<String>::new());
        lab.assert_no_leaks();
        daemon.ctl_ok(&["stop"]).expect("stop");
    });
    assert!(!start.status.success(), "the start succeeded with a dead gateway");
    assert!(!nft_tables(&lab).contains("sessiongate"), "{}", nft_tables(&lab));
}

#[test]
fn stop_cancels_a_start_that_waits_and_gives_the_network_back() {
    let lab = lab();
    waiting_profile(&lab);
    let before = lab.exec_ok(Ns::Client, &["ip", "rule"]).expect("ip rule");
    let daemon = lab.start_sessiond().expect("start sessiond");
    let (stopped, start) = during_a_waiting_start(&lab, &daemon, || {
        lab.reset_all_leaks().expect("reset leaks");
        daemon.ctl(&["stop"]).expect("run sessionctl stop")
    });
    // Nothing left while the start waited or while it was cancelled.
    lab.assert_no_leaks();
    assert!(
        stopped.status.success(),
        "stop during a waiting start failed: {}{}",
        String::from_utf8_lossy(&stopped.stderr),
        String::from_utf8_lossy(&stopped.stdout)
    );
    let said = String::from_utf8_lossy(&start.stderr);
    assert!(!start.status.success(), "the cancelled start says it succeeded");
    assert!(
        said.contains("cancelled"),
        "the start does not say it was cancelled: {said}"
    );
    assert_eq!(state(&daemon), "idle");
    assert!(!nft_tables(&lab).contains("sessiongate"), "{}", nft_tables(&lab));
    assert_eq!(lab.exec_ok(Ns::Client, &["ip", "rule"]).expect("ip rule"), before);
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443),
        Ok(format!("peer={}", addr::CLIENT_V4)),
        "the network is not back after stop"
    );
}

#[test]
fn status_answers_during_a_waiting_start_and_says_starting() {
    let lab = lab();
    waiting_profile(&lab);
    let daemon = lab.start_sessiond().expect("start sessiond");
    let (text, _start) = during_a_waiting_start(&lab, &daemon, || {
        let status = daemon.status().expect("status during the start");
        let text = daemon.ctl_ok(&["status"]).expect("status during the start");
        daemon.ctl_ok(&["stop"]).expect("stop");
        (status, text)
    });
    let (status, text) = text;
    assert_eq!(status["state"], "starting", "{status}");
    assert_eq!(status["profile"], "lab", "{status}");
    assert!(
        text.starts_with("Not protected yet: starting lab; everything is blocked"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// The guard in the other states of a session.

/// Our two tables as nft lists them, without what changes on its own: the
/// counters' values (`-s`) and the answer sets' times (an answer put back
/// after a restore keeps its remaining time, so its `timeout` is shorter).
fn our_shape(lab: &Lab) -> String {
    let mut text = String::new();
    for family in ["inet", "netdev"] {
        match lab.exec_ok(Ns::Client, &["nft", "-s", "list", "table", family, "sessiongate"]) {
            Ok(listing) => text.push_str(&listing),
            Err(_) => text.push_str(&format!("(no table {family} sessiongate)\n")),
        }
    }
    without_times(&text)
}

/// `text` without the `timeout N` and `expires N` of set elements.
fn without_times(text: &str) -> String {
    text.lines()
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let mut kept = Vec::new();
            let mut i = 0;
            while i < words.len() {
                let timed = matches!(words[i], "timeout" | "expires")
                    && words
                        .get(i + 1)
                        .is_some_and(|w| w.starts_with(|c: char| c.is_ascii_digit()));
                if timed {
                    i += 2;
                } else {
                    kept.push(words[i]);
                    i += 1;
                }
            }
            kept.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn both_tables_listed(lab: &Lab) -> bool {
    let tables = nft_tables(lab);
    tables.contains("table inet sessiongate") && tables.contains("table netdev sessiongate")
}

/// Forbidden in every state of the lab profile's session, each outside what
/// the profile allows (meet.test is 203.0.113.10 and 2001:db8:203::10 on
/// TCP 443 and UDP 10000): another host (v4), the allowed host's other
/// port (v4 and v6) and the public resolver. All of them are routed into
/// the tunnel while a session's routes are up, so the window between a
/// flush and the restore must hold for them too (the tunnel's own filter).
/// The LAN is probed only once the table is back: in the window it leaves
/// in clear (docs/threat-model.md, "While a removed table is being put
/// back").
const SPRAYED: [&str; 5] = [
    "203.0.113.20:10000",
    "203.0.113.10:8443",
    "203.0.113.53:53",
    "[2001:db8:203::10]:8443",
    "[2001:db8:203::10]:10001",
];

fn start_spray(lab: &Lab) -> LabChild {
    let labhost = lab.labhost_path().to_string_lossy().into_owned();
    let mut args = vec![labhost.as_str(), "spray"];
    args.extend(SPRAYED);
    let spray = lab.spawn(Ns::Client, &args).expect("start the spray");
    wait_until(Duration::from_secs(5), "the spray running", || {
        spray.log().contains("spraying")
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", spray.log()));
    spray
}

/// Probes refused in every state, once our tables are back: IPv6 to the
/// allowed host's unlisted port, TCP to another host, DNS to the public
/// resolver and to the LAN's router (v4 and v6). Returns the ones that got
/// an answer (the leak meters catch the ones that left without one).
fn state_probes_that_passed(lab: &Lab) -> Vec<String> {
    let short = Duration::from_millis(700);
    let mut passed = Vec::new();
    for (host, port) in [(addr::HOST_V6, 8443), (addr::OTHER_V4, 443)] {
        if let Ok(reply) = lab.probe_tcp_timeout(Ns::Client, host, port, short) {
            passed.push(format!("tcp {host}:{port} -> {reply}"));
        }
    }
    // With the allowlist open every query is redirected to the DNS stub,
    // which refuses names it does not allow: that refusal is ours, not the
    // server's (and the meters show the query did not leave).
    for server in [
        addr::PUBLIC_DNS_V4,
        addr::ROUTER_CLIENT_V4,
        addr::ROUTER_CLIENT_V6,
    ] {
        match lab.dns_query_timeout(Ns::Client, server, addr::OTHER_NAME, "A", short) {
            Ok(reply) if reply.rcode == "REFUSED" && reply.answers.is_empty() => {}
            Ok(reply) => passed.push(format!("dns {server} -> {reply:?}")),
            Err(_) => {}
        }
    }
    passed
}

/// What is taken away from under the guard.
const TAMPERS: [&str; 3] = [
    "flush ruleset",
    "delete table inet sessiongate",
    "delete table netdev sessiongate",
];

/// In the state the session is in now (`in_state` says it still is): each
/// of [`TAMPERS`] while forbidden UDP is sprayed; each time both tables
/// must come back with the shape they had in this state (the time is
/// printed), the state must not change, and at the end nothing forbidden
/// passes and neither leak meter counted anything, the windows included.
fn tamper_in_state(lab: &Lab, daemon: &Daemon, state_name: &str, in_state: impl Fn() -> bool) {
    assert!(
        in_state(),
        "not {state_name}: {}",
        daemon.status().map(|s| s.to_string()).unwrap_or_default()
    );
    let shape = our_shape(lab);
    assert!(
        both_tables_listed(lab),
        "no tables of ours while {state_name}:\n{shape}"
    );
    let spray = start_spray(lab);
    lab.reset_all_leaks().expect("reset leaks");
    for tamper in TAMPERS {
        lab.exec_ok(Ns::Client, &["nft", tamper])
            .unwrap_or_else(|e| panic!("nft {tamper}: {e:#}"));
        let tampered = Instant::now();
        wait_until(
            lab::RESTORE_DEADLINE,
            &format!("our tables back after `nft {tamper}` while {state_name}"),
            || both_tables_listed(lab),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
        println!(
            "{state_name}: tables restored {:?} after `nft {tamper}`",
            tampered.elapsed()
        );
        assert_eq!(
            our_shape(lab),
            shape,
            "the tables put back after `nft {tamper}` are not the {state_name} shape"
        );
        assert!(
            in_state(),
            "no longer {state_name} after `nft {tamper}`: {}",
            daemon.status().map(|s| s.to_string()).unwrap_or_default()
        );
    }
    assert!(spray.is_running(), "the spray stopped: {}", spray.log());
    spray.kill().expect("stop the spray");
    assert_eq!(state_probes_that_passed(lab), Vec::<String>::new());
    lab.assert_no_leaks();
}

fn stop_gives_the_network_back(lab: &Lab, daemon: &Daemon) {
    daemon.ctl_ok(&["stop"]).expect("stop");
    assert!(!nft_tables(lab).contains("sessiongate"), "{}", nft_tables(lab));
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443),
        Ok(format!("peer={}", addr::CLIENT_V4)),
        "the network is not back after stop"
    );
}

fn problem(daemon: &Daemon) -> String {
    daemon
        .status()
        .map(|s| s["problem"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Degraded: the gateway went away after the handshake. The allowlist stays
/// in force (traffic has nowhere to go but the dead tunnel), and that is
/// what the guard must put back, not the bare lockdown.
#[test]
fn the_guard_puts_back_the_degraded_shape() {
    let lab = lab();
    lab.write_profile("lab", |t| t).expect("write profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.kill_gateway().expect("kill wireguard-go");
    wait_until(Duration::from_secs(90), "status degraded", || {
        state(&daemon) == "degraded"
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let degraded = || state(&daemon) == "degraded" && problem(&daemon).contains("stopped answering");
    tamper_in_state(&lab, &daemon, "degraded", degraded);
    // Still the allowlist, not the bare lockdown.
    assert!(our_shape(&lab).contains(addr::HOST_V4), "{}", our_shape(&lab));
    stop_gives_the_network_back(&lab, &daemon);
}

/// Resuming: sessiond was killed with -9 during a session and restarted
/// over the persisted session, with the gateway gone meanwhile, so the
/// resumed session waits for its handshake behind the bare lockdown.
#[test]
fn the_guard_puts_back_the_resuming_shape() {
    let lab = lab();
    lab.write_profile("lab", |t| t).expect("write profile");
    let mut daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    daemon.kill9().expect("kill -9 sessiond");
    wait_until(Duration::from_secs(5), "sessiond gone", || !daemon.is_running()).expect("sessiond exits");
    lab.kill_gateway().expect("kill wireguard-go");
    daemon.restart().expect("restart sessiond");
    let resuming = || state(&daemon) == "degraded" && problem(&daemon).contains("resuming");
    wait_until(Duration::from_secs(10), "the session resuming", resuming)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    tamper_in_state(&lab, &daemon, "resuming", resuming);
    // The bare lockdown: no allowlist yet.
    assert!(!our_shape(&lab).contains(addr::HOST_V4), "{}", our_shape(&lab));
    stop_gives_the_network_back(&lab, &daemon);
}

/// The answer sink's warning once a resolution of the allowed names gave up.
const NAMES_NOT_RESOLVED: &str = "did not resolve through the pinned DNS servers yet";

/// Reloading: a profile edit (a new allowed network) is in force and its
/// names are being resolved; the pinned resolver is made silent so that
/// the resolution takes its full 3 s. The guard must put back the *edited*
/// allowlist.
#[test]
fn the_guard_puts_back_the_reloaded_shape_while_the_names_resolve() {
    let lab = lab();
    lab.write_profile("lab", |t| t).expect("write profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    assert_eq!(state(&daemon), "active");
    // The pinned resolver stops answering (a table in the gateway's
    // namespace; the lab removes it with the namespace).
    lab.exec_ok(
        Ns::Gateway,
        &[
            "nft",
            "add table inet guard_silent_dns; \
             add chain inet guard_silent_dns input { type filter hook input priority -10; }; \
             add rule inet guard_silent_dns input meta l4proto { tcp, udp } th dport 53 drop",
        ],
    )
    .expect("silence the pinned resolver");
    let added = "203.0.113.96/27";
    let files = lab
        .write_profile("lab", |t| {
            t.replace(
                "[options]",
                &format!("[[allow]]\nhost = \"{added}\"\ntcp = [443]\n\n[options]"),
            )
        })
        .expect("edit the profile");
    lab.set_tunnel_allowed_profile(&files.toml)
        .expect("tunnel meter follows the edit");
    wait_until(Duration::from_secs(10), "the edited allowlist in force", || {
        our_shape(&lab).contains(added)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let warnings = daemon.log().matches(NAMES_NOT_RESOLVED).count();
    let reloading =
        || state(&daemon) == "active" && daemon.log().matches(NAMES_NOT_RESOLVED).count() == warnings;
    tamper_in_state(&lab, &daemon, "reloading", reloading);
    assert!(our_shape(&lab).contains(added), "{}", our_shape(&lab));
    stop_gives_the_network_back(&lab, &daemon);
}

// ---------------------------------------------------------------------------
// The guard's backstop.

/// The pids of `process`'s children whose command line starts with `argv`.
fn children_running(parent: u32, argv: &[&str]) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the comm may hold spaces.
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let ppid = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.len() >= argv.len() && args.iter().zip(argv).all(|(a, b)| a == b) {
            found.push(pid);
        }
    }
    found
}

/// Sends `signal` to sessiond's `nft -j monitor` (there must be exactly
/// one); returns its pid.
fn signal_the_monitor(daemon: &Daemon, signal: nix::sys::signal::Signal) -> i32 {
    let sessiond = daemon.pid().expect("sessiond's pid");
    let monitors = children_running(sessiond, &["nft", "-j", "monitor"]);
    assert_eq!(monitors.len(), 1, "sessiond's nft monitor: {monitors:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(monitors[0]), signal)
        .unwrap_or_else(|e| panic!("{signal} to nft monitor: {e}"));
    monitors[0]
}

/// The guard's `nft monitor` frozen (SIGSTOP: alive, its events unread):
/// a flush during an active session must still be undone, by the health
/// tick's backstop, since no event will ever wake the guard. Flushed twice:
/// a wake-up already queued before the freeze can undo the first flush, but
/// nothing is left to undo the second except the backstop.
#[test]
fn a_flush_is_put_back_even_when_the_guards_monitor_is_frozen() {
    use nix::sys::signal::Signal;
    let lab = lab();
    lab.write_profile("lab", |t| t).expect("write profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    let shape = our_shape(&lab);
    let monitor = signal_the_monitor(&daemon, Signal::SIGSTOP);
    lab.reset_all_leaks().expect("reset leaks");
    let mut restored = Ok(());
    for round in ["first", "second"] {
        lab.exec_ok(Ns::Client, &["nft", "flush", "ruleset"])
            .expect("nft flush ruleset");
        let flushed = Instant::now();
        restored = wait_until(
            lab::RESTORE_DEADLINE,
            &format!("our tables back after the {round} flush with the monitor frozen"),
            || both_tables_listed(&lab),
        );
        if restored.is_err() {
            break;
        }
        println!(
            "monitor frozen: tables restored {:?} after the {round} flush",
            flushed.elapsed()
        );
        assert_eq!(our_shape(&lab), shape);
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(monitor), Signal::SIGCONT);
    restored.unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    assert_eq!(state(&daemon), "active");
    assert_eq!(state_probes_that_passed(&lab), Vec::<String>::new());
    lab.assert_no_leaks();
    stop_gives_the_network_back(&lab, &daemon);
}

/// nft 1.0.6's `nft -j monitor` can die (SIGSEGV) printing an element of
/// an interval set: the guard must start a new one, even while the session
/// loop is busy (here: a file written into the profiles directory every
/// 100 ms, so a reload notice arrives more often than the guard's 500 ms
/// pause before the restart). Before the fix every notice restarted that
/// pause, no new monitor came while the notices went on, and the guard was
/// blind to flushes (in CI, a flush never undone with nothing in the log).
#[test]
fn a_monitor_that_dies_is_started_again_while_the_session_is_busy() {
    use nix::sys::signal::Signal;
    use std::sync::atomic::{AtomicBool, Ordering};
    let lab = lab();
    lab.write_profile("lab", |t| t).expect("write profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    let shape = our_shape(&lab);
    let sessiond = daemon.pid().expect("sessiond's pid");
    let busy = AtomicBool::new(true);
    let dir = daemon.profiles_dir().to_path_buf();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // A new file each time (the watch debounces per file), removed
            // a second later (a file created and removed within the
            // debounce time makes no notice at all).
            let mut n = 0u32;
            while busy.load(Ordering::Relaxed) {
                n += 1;
                let _ = std::fs::write(dir.join(format!("busy-{n}.txt")), "x");
                if n > 10 {
                    let _ = std::fs::remove_file(dir.join(format!("busy-{}.txt", n - 10)));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let dead = signal_the_monitor(&daemon, Signal::SIGKILL);
        let killed = Instant::now();
        let again = wait_until(lab::RESTORE_DEADLINE, "a new nft monitor", || {
            let now = children_running(sessiond, &["nft", "-j", "monitor"]);
            !now.is_empty() && !now.contains(&dead)
        });
        let took = killed.elapsed();
        busy.store(false, Ordering::Relaxed);
        again.unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
        println!("a new nft monitor runs {took:?} after the old one was killed");
    });
    assert!(
        daemon.log().contains("nft monitor ended"),
        "the monitor's end was not logged:\n{}",
        daemon.log()
    );
    lab.reset_all_leaks().expect("reset leaks");
    lab.exec_ok(Ns::Client, &["nft", "flush", "ruleset"])
        .expect("nft flush ruleset");
    wait_until(lab::RESTORE_DEADLINE, "our tables back after a flush", || {
        both_tables_listed(&lab)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    assert_eq!(our_shape(&lab), shape);
    assert_eq!(state_probes_that_passed(&lab), Vec::<String>::new());
    lab.assert_no_leaks();
    for entry in std::fs::read_dir(daemon.profiles_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with("busy-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    stop_gives_the_network_back(&lab, &daemon);
}
