//! The tamper guard and the commands while a start waits for its handshake
//! (leak issue, item 1): the session machine must not sleep while `start`
//! waits, so the guard puts the lockdown back at once, `stop` cancels the
//! waiting start and `status` answers. Every start here has a dead gateway,
//! so it waits for a handshake that never comes.
//! Run as root after `cargo build --workspace`.

use std::process::Output;
use std::time::Duration;

use lab::{addr, wait_until, Daemon, Lab, Ns};

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
