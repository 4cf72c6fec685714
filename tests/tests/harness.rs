//! Tests of the lab itself: the topology routes, the leak meter sees leaks
//! and ignores the tunnel, the resolvers answer and log, the gateway can be
//! killed and restarted, and a dropped lab leaves nothing behind.
//! Run as root: `cargo test -p lab`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use lab::{addr, Lab, Ns};

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

#[test]
fn client_reaches_host_directly_and_the_meter_sees_it() {
    let lab = lab();
    lab.reset_leaks().expect("reset leaks");
    assert_eq!(lab.leaks().expect("read leaks"), 0, "{}", lab.leak_report());

    let tcp = lab.probe_tcp(Ns::Client, addr::HOST_V4, 443);
    assert_eq!(tcp, Ok(format!("peer={}", addr::CLIENT_V4)));
    let tcp2 = lab.probe_tcp(Ns::Client, addr::OTHER_V4, 8443);
    assert_eq!(tcp2, Ok(format!("peer={}", addr::CLIENT_V4)));
    let udp = lab.probe_udp(Ns::Client, addr::HOST_V4, 10000);
    assert_eq!(udp, Ok(format!("peer={} probe", addr::CLIENT_V4)));
    // The echo answers from the address it was asked on (the host has several).
    let udp_other = lab.probe_udp(Ns::Client, addr::OTHER_V4, 10000);
    assert_eq!(udp_other, Ok(format!("peer={} probe", addr::CLIENT_V4)));
    let tcp6 = lab.probe_tcp(Ns::Client, addr::HOST_V6, 443);
    assert_eq!(tcp6, Ok(format!("peer={}", addr::CLIENT_V6)));
    let udp6 = lab.probe_udp(Ns::Client, addr::HOST_V6, 10000);
    assert_eq!(udp6, Ok(format!("peer={} probe", addr::CLIENT_V6)));

    // Not WireGuard, so it counts although it goes to the endpoint.
    let to_endpoint = lab.probe_udp_timeout(
        Ns::Client,
        addr::GATEWAY_V4,
        addr::WG_PORT,
        Duration::from_millis(200),
    );
    assert!(
        to_endpoint.is_err(),
        "wireguard-go answered a probe: {to_endpoint:?}"
    );

    let leaks = lab.leaks().expect("read leaks");
    assert!(leaks > 0, "the meter must count direct traffic");
    let dests = lab.leak_destinations().expect("leak destinations");
    for want in [
        format!("{} tcp/443", addr::HOST_V4),
        format!("{} udp/10000", addr::HOST_V4),
        format!("{} tcp/8443", addr::OTHER_V4),
        format!("{} tcp/443", addr::HOST_V6),
        format!("{} udp/{}", addr::GATEWAY_V4, addr::WG_PORT),
    ] {
        assert!(dests.contains(&want), "{want} missing from {dests:?}");
    }

    lab.reset_leaks().expect("reset leaks");
    assert_eq!(lab.leaks().expect("read leaks"), 0, "{}", lab.leak_report());
    assert!(lab.leak_destinations().expect("dests").is_empty());
}

#[test]
fn probes_report_failures_in_one_line() {
    let lab = lab();
    // Nothing listens on port 9 on the host: refused.
    let err = lab
        .probe_tcp(Ns::Client, addr::HOST_V4, 9)
        .expect_err("port 9 is closed");
    assert_eq!(err, format!("connect {}:9: Connection refused", addr::HOST_V4));
    // A UDP port without a listener: the ICMP error comes back.
    let err = lab
        .probe_udp(Ns::Client, addr::HOST_V4, 9)
        .expect_err("udp 9 is closed");
    assert!(err.contains("refused"), "{err}");
    // A silently dropped probe times out within the given time.
    lab.exec_ok(
        Ns::Host,
        &["nft", "add table inet drop_test; add chain inet drop_test c { type filter hook input priority 0; tcp dport 8443 drop; }"],
    )
    .expect("add a drop rule on the host");
    let started = Instant::now();
    let err = lab
        .probe_tcp_timeout(Ns::Client, addr::HOST_V4, 8443, Duration::from_millis(300))
        .expect_err("dropped");
    assert!(err.contains("timed out"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn plain_wireguard_client_reaches_host_through_gateway_without_leaking() {
    let lab = lab();
    let client = lab
        .start_plain_wireguard_client()
        .unwrap_or_else(|e| panic!("plain client: {e:#}"));
    lab.reset_leaks().expect("reset leaks");

    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
    assert_eq!(
        lab.probe_udp(Ns::Client, addr::HOST_V4, 10000),
        Ok(format!("peer={} probe", addr::GATEWAY_V4))
    );
    // IPv6 through the tunnel, NATed to the gateway's v6 address.
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V6, 443),
        Ok(format!("peer={}", addr::GATEWAY_V6))
    );
    assert_eq!(
        lab.probe_udp(Ns::Client, addr::HOST_V6, 10000),
        Ok(format!("peer={} probe", addr::GATEWAY_V6))
    );
    // The pinned resolver answers through the tunnel.
    let reply = lab
        .dns_query(Ns::Client, addr::GATEWAY_TUN_V4, addr::MEET_NAME, "A")
        .expect("pinned resolver through the tunnel");
    assert_eq!(reply.rcode, "NOERROR");
    assert_eq!(reply.answers, vec![addr::HOST_V4.to_string()]);
    assert_eq!(reply.ttl, Some(5));
    let reply6 = lab
        .dns_query(Ns::Client, addr::GATEWAY_TUN_V4, addr::MEET_NAME, "AAAA")
        .expect("AAAA through the tunnel");
    assert_eq!(reply6.answers, vec![addr::HOST_V6.to_string()]);
    let log = lab.pinned_resolver_log();
    assert!(
        log.contains(&format!("query[A] meet.test from {}", addr::PLAIN_TUN_V4)),
        "pinned resolver log:\n{log}"
    );

    lab.assert_no_leaks();
    assert!(client.latest_handshake(&lab).expect("handshake") > 0);
    let peers = lab.gateway_wg_show(&["peers"]).expect("wg show peers");
    assert!(peers.contains(&client.public_key), "{peers}");
}

/// The inside meter counts what comes out of the tunnel to anything the
/// lab profile does not allow: another host, an allowed host on another
/// port, DNS to a resolver that is not pinned, DNS-over-TLS to the pinned one.
/// The outside meter sees none of it (it is all inside the tunnel).
#[test]
fn the_tunnel_meter_counts_what_the_profile_does_not_allow() {
    let lab = lab();
    let _client = lab
        .start_plain_wireguard_client()
        .unwrap_or_else(|e| panic!("plain client: {e:#}"));
    lab.reset_all_leaks().expect("reset leaks");
    assert_eq!(
        lab.tunnel_leaks().expect("read"),
        0,
        "{}",
        lab.tunnel_leak_report()
    );

    // Each of these gets through the gateway (the lab forwards everything);
    // only the meter knows they are not allowed.
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 8443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V6, 8443),
        Ok(format!("peer={}", addr::GATEWAY_V6))
    );
    let reply = lab
        .dns_query(Ns::Client, addr::PUBLIC_DNS_V4, addr::MEET_NAME, "A")
        .expect("public resolver through the tunnel");
    assert_eq!(reply.answers, vec![addr::HOST_V4.to_string()]);
    // Nothing listens on 853 on the gateway: refused, but it was sent.
    let _ = lab.probe_tcp(Ns::Client, addr::GATEWAY_TUN_V4, 853);

    let dests = lab.tunnel_leak_destinations().expect("destinations");
    for want in [
        format!("{} tcp/443", addr::OTHER_V4),
        format!("{} tcp/8443", addr::HOST_V4),
        format!("{} tcp/8443", addr::HOST_V6),
        format!("{} udp/53", addr::PUBLIC_DNS_V4),
        format!("{} tcp/853", addr::GATEWAY_TUN_V4),
    ] {
        assert!(
            dests.contains(&want),
            "{want} missing: {}",
            lab.tunnel_leak_report()
        );
    }
    assert!(
        lab.tunnel_leaks().expect("read") >= 5,
        "{}",
        lab.tunnel_leak_report()
    );
    assert_eq!(lab.leaks().expect("read"), 0, "{}", lab.leak_report());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lab.assert_no_leaks()));
    let message = panicked.expect_err("assert_no_leaks must fail");
    let text = message.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("inside the tunnel, to: ["), "{text}");

    lab.reset_tunnel_leaks().expect("reset");
    assert_eq!(lab.tunnel_leaks().expect("read"), 0);
    assert!(lab.tunnel_leak_destinations().expect("dests").is_empty());
}

/// Allowed traffic through the tunnel is not counted; the allowed list
/// follows a changed profile (narrowing too) and a changed pinned answer.
#[test]
fn the_tunnel_meter_lets_allowed_traffic_pass_and_follows_the_profile() {
    let lab = lab();
    let _client = lab
        .start_plain_wireguard_client()
        .unwrap_or_else(|e| panic!("plain client: {e:#}"));
    lab.reset_all_leaks().expect("reset leaks");
    let allowed_traffic = || {
        for host in [addr::HOST_V4, addr::HOST_V6] {
            assert!(lab.probe_tcp(Ns::Client, host, 443).is_ok(), "tcp {host}");
            assert!(lab.probe_udp(Ns::Client, host, 10000).is_ok(), "udp {host}");
        }
        lab.dns_query(Ns::Client, addr::GATEWAY_TUN_V4, addr::MEET_NAME, "A")
            .expect("pinned resolver over udp");
        lab.dns_query_tcp(Ns::Client, addr::GATEWAY_TUN_V4, addr::MEET_NAME, "A")
            .expect("pinned resolver over tcp");
    };
    allowed_traffic();
    lab.assert_no_leaks();

    // Narrowed: meet.test on tcp 443 only, and a literal address; udp now counts.
    let narrowed = lab
        .write_profile("narrow", |t| {
            t.replace("udp = [10000]", "").replace(
                "[options]",
                "[[allow]]\nhost = \"203.0.113.20/32\"\nudp = [10000]\n\n[options]",
            )
        })
        .expect("write profile");
    lab.set_tunnel_allowed_profile(&narrowed.toml)
        .expect("follow profile");
    let allowed: Vec<String> = lab.tunnel_allowed().iter().map(ToString::to_string).collect();
    assert!(
        allowed.contains(&"203.0.113.20/32 udp/10000".to_string()),
        "{allowed:?}"
    );
    assert!(
        !allowed.contains(&"203.0.113.10/32 udp/10000".to_string()),
        "{allowed:?}"
    );
    assert!(lab.probe_udp(Ns::Client, addr::OTHER_V4, 10000).is_ok());
    assert!(lab.probe_tcp(Ns::Client, addr::HOST_V4, 443).is_ok());
    lab.assert_no_leaks();
    assert!(lab.probe_udp(Ns::Client, addr::HOST_V4, 10000).is_ok());
    assert_eq!(
        lab.tunnel_leak_destinations().expect("dests"),
        vec![format!("{} udp/10000", addr::HOST_V4)]
    );

    // A new pinned answer for meet.test is allowed at once.
    lab.reset_tunnel_leaks().expect("reset");
    lab.set_pinned_answer(addr::MEET_NAME, "203.0.113.30")
        .expect("answer");
    let allowed: Vec<String> = lab.tunnel_allowed().iter().map(ToString::to_string).collect();
    assert!(
        allowed.contains(&"203.0.113.30/32 tcp/443".to_string()),
        "{allowed:?}"
    );
    assert!(
        allowed.contains(&"203.0.113.10/32 tcp/443".to_string()),
        "{allowed:?}"
    );
}

#[test]
fn public_resolver_answers_the_client_and_logs_it() {
    let lab = lab();
    let out = lab
        .exec(Ns::Client, &["getent", "ahostsv4", addr::MEET_NAME])
        .expect("run getent");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "getent failed: {out:?}");
    assert!(text.contains(addr::HOST_V4), "{text}");
    let out = lab
        .exec(Ns::Client, &["getent", "hosts", addr::OTHER_NAME])
        .expect("run getent");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(addr::OTHER_V4),
        "{out:?}"
    );
    let log = lab.public_resolver_log();
    assert!(
        log.contains(&format!("meet.test from {}", addr::CLIENT_V4)),
        "public resolver log:\n{log}"
    );
    assert!(
        !lab.pinned_resolver_log().contains("meet.test from"),
        "the pinned resolver was not asked"
    );
    // Probes resolve names with the client's resolver too.
    let by_name = lab.probe_tcp(Ns::Client, addr::MEET_NAME, 443);
    assert!(
        by_name == Ok(format!("peer={}", addr::CLIENT_V4))
            || by_name == Ok(format!("peer={}", addr::CLIENT_V6)),
        "{by_name:?}"
    );
    let err = lab
        .probe_tcp(Ns::Client, "nowhere.test", 443)
        .expect_err("unknown name");
    assert!(err.starts_with("resolve nowhere.test:"), "{err}");
    // Unknown .test names are NXDOMAIN, not forwarded anywhere.
    let reply = lab
        .dns_query(Ns::Client, addr::PUBLIC_DNS_V4, "nowhere.test", "A")
        .expect("query");
    assert_eq!(reply.rcode, "NXDOMAIN");
    // Changing an answer takes effect at once.
    lab.set_public_answers(addr::MEET_NAME, &["203.0.113.99"])
        .expect("set public answer");
    let reply = lab
        .dns_query(Ns::Client, addr::PUBLIC_DNS_V4, addr::MEET_NAME, "A")
        .expect("query");
    assert_eq!(reply.answers, vec!["203.0.113.99".to_string()]);
}

#[test]
fn pinned_answer_can_change() {
    let lab = lab();
    lab.set_pinned_answer(addr::MEET_NAME, addr::OTHER_V4)
        .expect("set pinned answer");
    let reply = lab
        .dns_query(Ns::Gateway, addr::GATEWAY_TUN_V4, addr::MEET_NAME, "A")
        .expect("query");
    assert_eq!(reply.answers, vec![addr::OTHER_V4.to_string()]);
    let reply = lab
        .dns_query(Ns::Gateway, addr::GATEWAY_TUN_V4, addr::MEET_NAME, "AAAA")
        .expect("query");
    assert!(reply.answers.is_empty(), "{reply:?}");
}

#[test]
fn gateway_can_be_killed_and_restarted() {
    let lab = lab();
    let client = lab
        .start_plain_wireguard_client()
        .unwrap_or_else(|e| panic!("plain client: {e:#}"));
    let old = lab.gateway_process().expect("gateway running");
    lab.kill_gateway().expect("kill gateway");
    assert!(!old.is_running());
    assert!(lab.gateway_process().is_none());
    assert!(lab.gateway_wg_show(&[]).is_err(), "gateway still answers");
    assert!(lab
        .probe_tcp_timeout(Ns::Client, addr::HOST_V4, 443, Duration::from_millis(300))
        .is_err());

    lab.restart_gateway().expect("restart gateway");
    let peers = lab.gateway_wg_show(&["peers"]).expect("wg show peers");
    assert!(peers.contains(&client.public_key), "peer lost: {peers}");
    // dnsmasq (--bind-dynamic) is back on the recreated address.
    let reply = lab
        .dns_query(Ns::Gateway, addr::GATEWAY_TUN_V4, addr::MEET_NAME, "A")
        .expect("pinned resolver after restart");
    assert_eq!(reply.answers, vec![addr::HOST_V4.to_string()]);
    // wireguard-go would re-handshake by itself only after ~15 s: force it.
    client
        .reconnect(&lab)
        .expect("handshake with the restarted gateway");
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
}

#[test]
fn dropped_lab_leaves_nothing_behind() {
    let lab = lab();
    let _client = lab
        .start_plain_wireguard_client()
        .unwrap_or_else(|e| panic!("plain client: {e:#}"));
    let id = lab.id().to_string();
    let namespaces = lab.namespaces();
    assert_eq!(namespaces.len(), 4);
    let pids = lab.pids();
    assert!(pids.len() >= 5, "{pids:?}");
    let sockets = lab.wg_socket_paths();
    assert_eq!(sockets.len(), 2);
    for s in &sockets {
        assert!(s.exists(), "{} missing while running", s.display());
    }
    // remains_of sees everything while the lab lives.
    let alive = remains_of(&id).join("\n");
    for want in [
        "/run/netns/",
        "/var/run/wireguard/",
        "/tmp/sglab-",
        "wireguard-go",
        "dnsmasq",
        "labhost serve",
    ] {
        assert!(alive.contains(want), "{want} not seen in:\n{alive}");
    }
    let tmp = lab.tmp_dir().to_path_buf();
    let etc = lab.client_resolv_conf();
    assert!(etc.exists());
    drop(lab);

    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for ns in &namespaces {
        assert!(!listed.contains(ns.as_str()), "{ns} still exists");
        assert!(!Path::new("/etc/netns").join(ns).exists());
    }
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still exists"
        );
    }
    for s in sockets {
        assert!(!s.exists(), "{} left behind", s.display());
    }
    assert!(!tmp.exists(), "{} left behind", tmp.display());
    assert!(!etc.exists());
    let left = remains_of(&id);
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn many_labs_in_parallel_do_not_collide() {
    let labs: Vec<Lab> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(Lab::new)).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("lab thread").unwrap_or_else(|e| panic!("{e:#}")))
            .collect()
    });
    for l in &labs {
        // Both resolvers answer on every address, and started cleanly.
        for (ns, server) in [
            (Ns::Client, addr::PUBLIC_DNS_V4),
            (Ns::Gateway, addr::GATEWAY_TUN_V4),
            (Ns::Gateway, addr::GATEWAY_TUN_V6),
        ] {
            let reply = l
                .dns_query(ns, server, addr::MEET_NAME, "A")
                .unwrap_or_else(|e| panic!("{server}: {e}"));
            assert_eq!(reply.answers, vec![addr::HOST_V4.to_string()]);
        }
        for log in [l.public_resolver_log(), l.pinned_resolver_log()] {
            assert!(!log.contains("failed"), "{log}");
        }
    }
    let mut ids: Vec<&str> = labs.iter().map(|l| l.id()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    for l in &labs {
        assert_eq!(
            l.probe_tcp(Ns::Client, addr::HOST_V4, 443),
            Ok(format!("peer={}", addr::CLIENT_V4))
        );
    }
}

#[test]
fn sessiond_profile_is_written_to_spec() {
    let lab = lab();
    let p = lab.sessiond_profile().expect("write profile");
    assert_eq!(p.name, "lab");
    assert_eq!(p.path, p.dir.join("lab.toml"));
    assert_eq!(p.key_file, p.dir.join("keys/client.key"));
    let mode = |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&p.dir), 0o700);
    assert_eq!(mode(&p.key_file), 0o600);
    assert_eq!(std::fs::metadata(&p.key_file).expect("stat").uid(), 0);
    let key = std::fs::read_to_string(&p.key_file).expect("key");
    assert_eq!(key.trim().len(), 44, "base64 of 32 bytes: {key}");
    let toml = std::fs::read_to_string(&p.path).expect("toml");
    assert_eq!(toml, p.toml);
    for want in [
        "private_key_file = \"keys/client.key\"",
        "address = [\"192.0.2.66/32\", \"2001:db8:66::2/128\"]",
        "endpoint = \"198.51.100.2:51820\"",
        "servers = [\"192.0.2.65\"]",
        "host = \"meet.test\"",
        lab.gateway_public_key(),
    ] {
        assert!(toml.contains(want), "{want} missing from:\n{toml}");
    }
    let allowed = lab.gateway_wg_show(&["allowed-ips"]).expect("wg show");
    assert!(
        allowed.contains(&format!("{}\t192.0.2.66/32 2001:db8:66::2/128", p.public_key)),
        "{allowed}"
    );
    // A second profile reuses the key; edits apply.
    let q = lab
        .write_profile("other", |t| t.replace("meet.test", "other.test"))
        .expect("write second profile");
    assert_eq!(q.public_key, p.public_key);
    assert!(q.toml.contains("host = \"other.test\""));
    // The peer survives a gateway restart.
    lab.restart_gateway().expect("restart");
    let allowed = lab.gateway_wg_show(&["allowed-ips"]).expect("wg show");
    assert!(allowed.contains(&p.public_key), "{allowed}");
}

/// The daemon helper's mechanics, with `labhost listen-unix` standing in
/// for sessiond and a script echoing its arguments for sessionctl.
#[test]
fn daemon_helper_starts_kills_and_restarts() {
    let lab = lab();
    let dir = lab.tmp_dir().join("fake");
    std::fs::create_dir(&dir).expect("mkdir");
    let fake_d = dir.join("sessiond");
    std::fs::write(
        &fake_d,
        format!(
            "#!/bin/sh\necho \"fake sessiond $*\" >&2\n\
             while [ $# -gt 0 ]; do [ \"$1\" = --socket ] && sock=$2; shift; done\n\
             exec {} listen-unix \"$sock\"\n",
            lab.labhost_path().display()
        ),
    )
    .expect("write fake sessiond");
    let fake_c = dir.join("sessionctl");
    std::fs::write(&fake_c, "#!/bin/sh\necho \"ctl $*\"\n").expect("write fake ctl");
    for f in [&fake_d, &fake_c] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    lab.sessiond_profile().expect("profile");

    let mut d = lab
        .start_sessiond_binaries(&fake_d, &fake_c, &[])
        .expect("start fake daemon");
    assert!(d.is_running());
    let sock = d.socket().display().to_string();
    let log = d.log();
    for want in [
        format!("--profiles {}", d.profiles_dir().display()),
        format!("--socket {sock}"),
        format!("--state-dir {}", d.state_dir().display()),
        "--resolv-conf /etc/resolv.conf".to_string(),
        "--control-group sessiongate".to_string(),
    ] {
        assert!(log.contains(&want), "{want} missing from {log}");
    }
    let out = d.ctl_ok(&["status", "--json"]).expect("ctl");
    assert_eq!(out.trim(), format!("ctl --socket {sock} status --json"));

    let first = d.pid().expect("pid");
    d.kill9().expect("kill9");
    assert!(!d.is_running());
    assert!(d.socket().exists(), "a crash leaves the socket file");
    d.restart().expect("restart after a crash");
    assert!(d.is_running());
    assert_ne!(d.pid(), Some(first));
    d.restart().expect("restart while running");
    assert!(d.log().contains("--- sessiond run 3"), "{}", d.log());
}

/// Names of everything a lab with this id may have created that still exists.
fn remains_of(id: &str) -> Vec<String> {
    let mut found = Vec::new();
    for dir in ["/run/netns", "/etc/netns", "/var/run/wireguard", "/tmp"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(id) {
                found.push(format!("{dir}/{name}"));
            }
        }
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(id) {
            found.push(format!("process {}: {cmdline}", e.file_name().to_string_lossy()));
        }
    }
    found
}

#[test]
fn failed_setup_cleans_up() {
    for step in ["namespaces", "processes", "gateway", "resolvers"] {
        let err = match Lab::new_with_fault(Some(step)) {
            Ok(_) => panic!("fault at {step} not injected"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("injected fault"), "{err}");
        let id = err
            .strip_prefix("setting up lab ")
            .and_then(|rest| rest.split(':').next())
            .unwrap_or_else(|| panic!("no lab id in: {err}"));
        assert_eq!(id.len(), 5, "{err}");
        let left = remains_of(id);
        assert!(left.is_empty(), "after a fault at {step}: {left:?}");
    }
}
