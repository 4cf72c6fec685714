//! `sessionctl verify` in the lab: the daemon's own probes must
//! pass in a good session and must tell the truth when the tunnel is dead,
//! and running them must never leak anything (the router's leak meter).
//! Run as root after `cargo build --workspace --bins`.

use std::time::Duration;

use lab::{addr, wait_until, Daemon, Lab, Ns, DAEMON_TUN_IF};
use serde_json::Value;

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

/// `sessionctl verify --json`: (exit code, report).
fn verify_json(daemon: &Daemon) -> (Option<i32>, Value) {
    let out = daemon
        .ctl(&["verify", "--json"])
        .expect("run sessionctl verify --json");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify --json printed no JSON ({e}): {}\nstderr: {}\nsessiond log:\n{}",
            text(&out.stdout),
            text(&out.stderr),
            daemon.log()
        )
    });
    (out.status.code(), report)
}

/// The probe called `name` of a report: (result, evidence).
fn probe(report: &Value, name: &str) -> (String, String) {
    let p = report["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no probe {name:?} in {report}"));
    (
        p["result"].as_str().unwrap_or("?").to_string(),
        p["evidence"].as_str().unwrap_or("").to_string(),
    )
}

/// Packets of verify probes our table counted as refused.
fn refused_counter(lab: &Lab) -> u64 {
    let out = lab
        .exec_ok(
            Ns::Client,
            &["nft", "-j", "list", "counter", "inet", "sessiongate", "refused"],
        )
        .expect("list the refused counter");
    let v: Value = serde_json::from_str(&out).expect("nft -j output");
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|item| item.get("counter")?.get("packets")?.as_u64())
        .unwrap_or_else(|| panic!("no counter in {out}"))
}

const BLOCKING: [&str; 3] = ["outside host", "other dns server", "ipv6 host"];

#[test]
fn a_good_session_passes_every_probe_with_evidence() {
    let lab = lab();
    lab.sessiond_profile().expect("write the lab profile");
    let daemon = lab.start_sessiond().expect("start sessiond");

    // No session: a clear error, nothing probed.
    let out = daemon.ctl(&["verify"]).expect("run sessionctl verify");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        text(&out.stderr),
        "sessionctl: verify needs a running session; start one with `sessionctl start PROFILE`"
    );

    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.reset_all_leaks().expect("reset the leak meter");
    let counted_before = refused_counter(&lab);

    let human = daemon.ctl(&["verify"]).expect("run sessionctl verify");
    let stdout = text(&human.stdout);
    assert_eq!(
        human.status.code(),
        Some(0),
        "verify failed:\n{stdout}\n{}\nsessiond log:\n{}",
        text(&human.stderr),
        daemon.log()
    );
    println!("{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    for line in &lines[..4] {
        assert!(line.starts_with("PASS  "), "{stdout}");
    }
    assert_eq!(
        lines[0],
        format!(
            "PASS  allowed host      connected to {}:443 from {} on {DAEMON_TUN_IF}",
            addr::HOST_V4,
            addr::DAEMON_TUN_V4
        )
    );
    assert_eq!(lines[4], "The boundary holds: all 4 probes passed.");
    // Each outside probe was refused by our own rule: two packets counted.
    assert_eq!(refused_counter(&lab), counted_before + 2);

    let (code, report) = verify_json(&daemon);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["probes"].as_array().map(Vec::len), Some(4), "{report}");
    let (result, evidence) = probe(&report, "allowed host");
    assert_eq!(result, "PASS");
    assert!(
        evidence.contains(&format!("from {} on {DAEMON_TUN_IF}", addr::DAEMON_TUN_V4)),
        "{evidence}"
    );
    let (result, evidence) = probe(&report, "outside host");
    assert_eq!(result, "PASS");
    assert!(
        evidence.contains("refused by sessiongate's firewall (connection refused; refuse counter +1)"),
        "{evidence}"
    );
    let (result, evidence) = probe(&report, "other dns server");
    assert_eq!(result, "PASS");
    assert!(
        evidence.contains("answered REFUSED by the local stub"),
        "{evidence}"
    );
    let (result, evidence) = probe(&report, "ipv6 host");
    assert_eq!(result, "PASS");
    assert!(
        evidence.starts_with("[2001:db8::1]:443 refused by sessiongate's firewall"),
        "{evidence}"
    );

    lab.assert_no_leaks();
    // The session is untouched.
    assert_eq!(daemon.status().expect("status")["state"], "active");

    daemon.ctl_ok(&["stop"]).expect("stop");
    let out = daemon.ctl(&["verify", "--json"]).expect("run sessionctl verify");
    assert_eq!(out.status.code(), Some(1), "verify after stop: {out:?}");
}

#[test]
fn a_dead_gateway_fails_the_allowed_host_while_everything_stays_blocked() {
    let lab = lab();
    lab.sessiond_profile().expect("write the lab profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    // The name must be resolved for the allowed-host probe to have a target.
    wait_until(Duration::from_secs(10), "meet.test resolved in status", || {
        daemon.status().is_ok_and(|s| {
            s["allowed"][0]["addresses"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    lab.reset_all_leaks().expect("reset the leak meter");

    lab.kill_gateway().expect("kill wireguard-go");
    let (code, report) = verify_json(&daemon);
    println!("{report}");
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["passed"], false, "{report}");
    let (result, evidence) = probe(&report, "allowed host");
    assert_eq!(result, "FAIL", "{report}");
    assert!(evidence.contains(addr::HOST_V4), "{evidence}");
    for name in BLOCKING {
        let (result, evidence) = probe(&report, name);
        assert_eq!(result, "PASS", "{name}: {evidence}\n{report}");
    }

    let human = daemon.ctl(&["verify"]).expect("run sessionctl verify");
    let stdout = text(&human.stdout);
    println!("{stdout}");
    assert_eq!(human.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with("FAIL  allowed host      "), "{stdout}");
    assert!(
        stdout
            .lines()
            .last()
            .unwrap_or("")
            .starts_with("Still locked down"),
        "{stdout}"
    );

    lab.assert_no_leaks();
}
