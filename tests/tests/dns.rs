//! DNS pinning (issue: every query answered by the pinned resolver, or not at
//! all). The lab's public resolver (203.0.113.53) is what the client's
//! resolver file names before the session; the pinned resolver is dnsmasq on
//! the gateway, reached only through the tunnel. Run as root after
//! `cargo build --workspace`.

use std::time::{Duration, Instant};

use lab::{addr, wait_until, Daemon, Lab, Ns};

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

/// Starts a session with the bundled lab profile (meet.test allowed by name).
fn session(lab: &Lab) -> Daemon<'_> {
    lab.sessiond_profile().expect("write profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    lab.reset_all_leaks().expect("reset");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    daemon
}

fn getent(lab: &Lab, name: &str) -> Result<String, String> {
    let out = lab
        .exec(Ns::Client, &["getent", "ahostsv4", name])
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.split_whitespace().next().unwrap_or_default().to_string())
    } else {
        Err(format!("getent exited with {}", out.status))
    }
}

#[test]
fn allowed_names_come_from_the_pinned_resolver_and_others_fail() {
    let lab = lab();
    // The public resolver would give another address: seeing the pinned one
    // proves where the answer came from.
    lab.set_public_answers(addr::MEET_NAME, &[addr::OTHER_V4])
        .expect("public answer");
    let daemon = session(&lab);
    lab.reset_all_leaks().expect("reset");

    assert_eq!(getent(&lab, addr::MEET_NAME), Ok(addr::HOST_V4.to_string()));
    assert!(
        getent(&lab, addr::OTHER_NAME).is_err(),
        "a name outside the profile resolved"
    );
    // And the resolved name is reachable through the tunnel, over IPv6 (the
    // pinned resolver has an AAAA record and the tunnel an IPv6 address)
    // and over IPv4.
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::MEET_NAME, 443),
        Ok(format!("peer={}", addr::GATEWAY_V6))
    );
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
    let status = daemon.status().expect("status");
    let allowed = &status["allowed"][0];
    assert_eq!(allowed["host"], addr::MEET_NAME);
    assert!(
        allowed["addresses"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == addr::HOST_V4)),
        "status does not show the resolved address: {status}"
    );

    let pinned = lab.pinned_resolver_log();
    assert!(
        pinned.contains(addr::MEET_NAME),
        "the pinned resolver never saw meet.test:\n{pinned}"
    );
    assert!(
        !pinned.contains(addr::OTHER_NAME),
        "a non-allowed name reached the pinned resolver:\n{pinned}"
    );
    lab.assert_no_leaks();
}

#[test]
fn queries_aimed_at_another_resolver_never_leave_the_machine() {
    let lab = lab();
    // meet.test also on TCP/UDP 853, where the host listens: DNS-over-TLS to
    // it can then only be stopped by the 53/853 refusal rule.
    let files = lab
        .write_profile("lab", |t| {
            t.replace("tcp = [443]", "tcp = [443, 853]")
                .replace("udp = [10000]", "udp = [10000, 853]")
        })
        .expect("write profile");
    lab.set_tunnel_allowed_profile(&files.toml)
        .expect("tunnel meter follows the profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    lab.reset_all_leaks().expect("reset");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    let public_before = lab.public_resolver_log();

    for (proto, reply) in [
        (
            "udp",
            lab.dns_query(Ns::Client, addr::PUBLIC_DNS_V4, addr::OTHER_NAME, "A"),
        ),
        (
            "tcp",
            lab.dns_query_tcp(Ns::Client, addr::PUBLIC_DNS_V4, addr::OTHER_NAME, "A"),
        ),
    ] {
        match reply {
            Ok(r) => {
                assert_eq!(r.rcode, "REFUSED", "{proto}: {r:?}");
                assert!(r.answers.is_empty(), "{proto}: {r:?}");
            }
            Err(e) => panic!("{proto}: the stub should refuse, not time out: {e}"),
        }
    }
    // An allowed name asked of the public resolver is answered by the stub
    // (through the pinned resolver), over UDP and TCP.
    for reply in [
        lab.dns_query(Ns::Client, addr::PUBLIC_DNS_V4, addr::MEET_NAME, "A"),
        lab.dns_query_tcp(Ns::Client, addr::PUBLIC_DNS_V4, addr::MEET_NAME, "A"),
    ] {
        let r = reply.expect("answer for an allowed name");
        assert_eq!(r.answers, vec![addr::HOST_V4.to_string()], "{r:?}");
    }
    // DNS-over-TLS is refused outright: to the public resolver, and to the
    // allowed host (its address is in the allow set now, on 853 too).
    let status = daemon.status().expect("status");
    assert!(
        status["allowed"][0]["addresses"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == addr::HOST_V4)),
        "meet.test not resolved yet: {status}"
    );
    for host in [addr::PUBLIC_DNS_V4, addr::HOST_V4] {
        assert_eq!(
            lab.probe_tcp(Ns::Client, host, 853),
            Err(format!("connect {host}:853: Connection refused"))
        );
    }
    let udp = lab.probe_udp(Ns::Client, addr::HOST_V4, 853);
    assert!(udp.is_err(), "udp 853 to the allowed host: {udp:?}");

    let public_after = lab.public_resolver_log();
    assert_eq!(
        public_before, public_after,
        "the public resolver was asked something during the session"
    );
    assert!(!lab.pinned_resolver_log().contains(addr::OTHER_NAME));
    lab.assert_no_leaks();
}

#[test]
fn the_resolver_file_is_restored_byte_for_byte_and_lookups_go_back() {
    let lab = lab();
    let path = lab.client_resolv_conf();
    // Odd spacing and comments must survive exactly.
    let original = format!(
        "# lab resolver\nnameserver {}  \noptions timeout:1\n\n",
        addr::PUBLIC_DNS_V4
    );
    std::fs::write(&path, &original).expect("write resolv.conf");
    let daemon = session(&lab);
    let during = std::fs::read_to_string(&path).expect("read resolv.conf");
    assert_ne!(during, original, "the resolver file was not pointed at the stub");
    assert!(during.contains("nameserver 127.0.0.1"), "{during}");
    assert_eq!(getent(&lab, addr::MEET_NAME), Ok(addr::HOST_V4.to_string()));
    lab.assert_no_leaks();

    daemon.ctl_ok(&["stop"]).expect("stop");
    assert_eq!(
        std::fs::read_to_string(&path).expect("read resolv.conf"),
        original
    );
    let before = lab.public_resolver_log().matches(addr::OTHER_NAME).count();
    assert_eq!(getent(&lab, addr::OTHER_NAME), Ok(addr::OTHER_V4.to_string()));
    let after = lab.public_resolver_log().matches(addr::OTHER_NAME).count();
    assert!(after > before, "the lookup did not go to the original resolver");
}

#[test]
fn the_resolver_file_survives_a_crash_and_resume() {
    let lab = lab();
    let path = lab.client_resolv_conf();
    let original = std::fs::read(&path).expect("read resolv.conf");
    let mut daemon = session(&lab);
    daemon.kill9().expect("kill -9");
    wait_until(Duration::from_secs(5), "sessiond gone", || !daemon.is_running()).expect("exit");
    daemon.restart().expect("restart");
    wait_until(Duration::from_secs(60), "resumed session active", || {
        daemon.status().is_ok_and(|s| s["state"] == "active")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    assert_eq!(getent(&lab, addr::MEET_NAME), Ok(addr::HOST_V4.to_string()));
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
    assert_eq!(std::fs::read(&path).expect("read resolv.conf"), original);
}

#[test]
fn an_allowed_host_whose_address_changes_stays_reachable() {
    let lab = lab();
    let _daemon = session(&lab);
    assert_eq!(getent(&lab, addr::MEET_NAME), Ok(addr::HOST_V4.to_string()));
    lab.reset_all_leaks().expect("reset");
    assert!(
        lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443).is_err(),
        "the future address must be blocked before the DNS answer names it"
    );

    // meet.test moves to the host's other address; the lab's TTL is 5 s.
    lab.set_pinned_answer(addr::MEET_NAME, addr::OTHER_V4)
        .expect("change the answer");
    let changed = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "the new address from the pinned resolver",
        || getent(&lab, addr::MEET_NAME) == Ok(addr::OTHER_V4.to_string()),
    )
    .expect("new answer");
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4)),
        "the moved host is not reachable through the tunnel"
    );
    println!("new address in use {:?} after the change", changed.elapsed());
    // The other host's address is allowed only for meet.test's ports.
    assert!(lab.probe_tcp(Ns::Client, addr::OTHER_V4, 8443).is_err());
    lab.assert_no_leaks();
}

/// Browsers ask `use-application-dns.net` before switching to their own
/// DNS-over-HTTPS: the stub answers NXDOMAIN (so they keep the system
/// resolver) and the question goes nowhere. A search domain that a DHCP
/// client writes into the resolver file mid-session, with ndots high enough
/// that every name is first tried under it, does not turn the allowed name
/// into a query that leaves: `meet.test.corp.test` is refused locally.
#[test]
fn doh_canary_gets_nxdomain_and_a_pushed_search_domain_sends_nothing_out() {
    let lab = lab();
    let daemon = session(&lab);
    let public_before = lab.public_resolver_log();
    lab.reset_all_leaks().expect("reset");

    let canary = lab
        .dns_query(Ns::Client, addr::PUBLIC_DNS_V4, "use-application-dns.net", "A")
        .expect("the canary gets an answer");
    assert_eq!(canary.rcode, "NXDOMAIN", "{canary:?}");

    std::fs::write(
        lab.client_resolv_conf(),
        format!(
            "nameserver {}\nsearch corp.test\noptions ndots:5\n",
            addr::PUBLIC_DNS_V4
        ),
    )
    .expect("a DHCP client rewrites the resolver file");
    assert_eq!(getent(&lab, addr::MEET_NAME), Ok(addr::HOST_V4.to_string()));
    assert!(
        getent(&lab, "meet").is_err(),
        "a bare name resolved under the search domain"
    );

    let pinned = lab.pinned_resolver_log();
    for name in ["corp.test", "use-application-dns"] {
        assert!(
            !pinned.contains(name),
            "{name} reached the pinned resolver:\n{pinned}"
        );
    }
    assert_eq!(
        lab.public_resolver_log(),
        public_before,
        "the public resolver was asked"
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// An application whose resolver file names an IPv6 server (any one) gets
/// its allowed names answered during a session: its query is redirected
/// to the DNS stub on ::1, not refused. (Deleting the kill switch's
/// loopback-by-address accept for ::1 leaks nothing, but takes DNS away
/// from every IPv6-configured resolver.)
#[test]
fn a_query_to_an_ipv6_resolver_is_answered_by_the_stub() {
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.reset_all_leaks().expect("reset");
    let reply = lab
        .dns_query(Ns::Client, addr::HOST_V6, addr::MEET_NAME, "A")
        .unwrap_or_else(|e| panic!("a query to an IPv6 resolver during the session: {e}"));
    assert_eq!(reply.answers, vec![addr::HOST_V4.to_string()], "{reply:?}");
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}
