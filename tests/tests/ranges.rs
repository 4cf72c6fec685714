//! Port ranges in profiles (`udp = [7882, "40000-40010"]`) and the
//! gateway-enforced kind (`[gateway] enforces_allowlist = true`), issue 16.
//! Run as root after `cargo build --workspace`.

use std::time::Duration;

use lab::{addr, wait_until, Lab, LabChild, Ns};

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

/// Echo services on UDP `ports` on the video host (every address of it).
fn udp_echo(lab: &Lab, ports: &[u16]) -> LabChild {
    let bin = lab.labhost_path().to_string_lossy().into_owned();
    let mut args = vec![bin, "serve".into()];
    for p in ports {
        args.extend(["--udp".into(), p.to_string()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = lab
        .spawn_named(Ns::Host, "udp-echo-ranges", &refs)
        .expect("spawn labhost");
    wait_until(Duration::from_secs(10), "labhost serve ready", || {
        child.log().contains("ready") || !child.is_running()
    })
    .expect("labhost serve");
    assert!(child.is_running(), "{}", child.log());
    child
}

/// The lab profile with its `[[allow]]` entries replaced by `allow` and
/// `extra` sections appended; returns the text.
fn write_profile(lab: &Lab, allow: &str, extra: &str) -> String {
    lab.write_profile("lab", |t| {
        let start = t.find("[[allow]]").expect("the lab profile has [[allow]]");
        let end = t[start..].find("[options]").map_or(t.len(), |i| start + i);
        format!("{}{allow}\n{}\n{extra}", &t[..start], &t[end..])
    })
    .expect("write profile")
    .toml
}

fn resolve(lab: &Lab, name: &str) -> Vec<String> {
    lab.dns_query(Ns::Client, addr::PUBLIC_DNS_V4, name, "A")
        .unwrap_or_else(|e| panic!("dns query for {name}: {e}"))
        .answers
}

/// The UDP ports of `ports` that answered from the client, through the
/// tunnel (the echo sees the gateway's address).
fn reached(lab: &Lab, host: &str, ports: &[u16]) -> Vec<u16> {
    let through = format!("peer={}", addr::GATEWAY_V4);
    ports
        .iter()
        .copied()
        .filter(|&port| {
            lab.probe_udp_timeout(Ns::Client, host, port, Duration::from_millis(800))
                .is_ok_and(|reply| reply.starts_with(&through))
        })
        .collect()
}

/// A name's UDP range and a literal address's UDP range both reach the
/// host at both ends and inside, and nothing just outside; both meters
/// stay at zero. Without range support the profile does not even load
/// (seen: "expected a whole number"); with ranges read but carried to the
/// firewall as their first port only, 40005/40010 and 41005/41010 were
/// refused (seen failing).
#[test]
fn a_udp_range_reaches_its_ends_and_inside_and_nothing_just_outside() {
    let lab = lab();
    let in_range = [40000, 40001, 40005, 40009, 40010];
    let outside = [39999, 40011];
    let literal_in = [41000, 41005, 41010];
    let literal_outside = [40999, 41011];
    let mut all: Vec<u16> = Vec::new();
    for list in [&in_range[..], &outside, &literal_in, &literal_outside] {
        all.extend(list);
    }
    let _echo = udp_echo(&lab, &all);
    let profile = write_profile(
        &lab,
        &format!(
            "[[allow]]\nhost = \"{}\"\ntcp = [443]\nudp = [\"40000-40010\"]\n\n\
             [[allow]]\nhost = \"{}\"\nudp = [7882, \"41000-41010\"]\n",
            addr::MEET_NAME,
            addr::OTHER_V4
        ),
        "",
    );
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.set_tunnel_allowed_profile(&profile)
        .expect("the inside meter follows the profile");
    lab.reset_all_leaks().expect("reset the meters");

    assert_eq!(resolve(&lab, addr::MEET_NAME), [addr::HOST_V4]);
    assert_eq!(reached(&lab, addr::HOST_V4, &in_range), in_range);
    assert_eq!(reached(&lab, addr::HOST_V4, &outside), Vec::<u16>::new());
    assert_eq!(reached(&lab, addr::OTHER_V4, &literal_in), literal_in);
    assert_eq!(reached(&lab, addr::OTHER_V4, &literal_outside), Vec::<u16>::new());
    // The name's range is not the literal's: other.test's address is not
    // open on meet.test's range, nor meet.test's on the literal's.
    assert_eq!(reached(&lab, addr::OTHER_V4, &[40005]), Vec::<u16>::new());
    assert_eq!(reached(&lab, addr::HOST_V4, &[41005]), Vec::<u16>::new());

    // status shows the range as written.
    let status = daemon.status().expect("status");
    let meet = status["allowed"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["host"] == addr::MEET_NAME)
        .cloned()
        .unwrap_or_default();
    assert_eq!(meet["udp"], serde_json::json!(["40000-40010"]), "{status}");
    let human = daemon.ctl_ok(&["status"]).expect("status");
    assert!(human.contains("udp 40000-40010"), "{human}");

    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// The gateway-enforced kind: the machine sends every TCP/UDP packet into
/// the tunnel and the gateway's own filter enforces the profile's
/// allowlist. An allowed address reached by number (no name, as Signal's
/// relays are handed out) answers; hosts and ports outside the allowlist
/// are refused at the gateway (its counter goes up), not on the machine;
/// DNS stays pinned; both meters read zero, the inside one counting what
/// the gateway lets out toward the internet. Seen failing with the
/// gateway's filter left out: 203.0.113.10:8443 and 203.0.113.20:443
/// answered, and the inside meter counted them.
#[test]
fn the_gateway_enforces_the_allowlist_of_a_gateway_enforced_profile() {
    let lab = lab();
    let profile = write_profile(
        &lab,
        &format!(
            "[[allow]]\nhost = \"{}\"\ntcp = [443]\n\n\
             [[allow]]\nhost = \"203.0.113.16/28\"\nudp = [10000]\n",
            addr::MEET_NAME
        ),
        "[gateway]\nenforces_allowlist = true\n",
    );
    lab.install_gateway_allowlist(&profile)
        .expect("the gateway enforces the allowlist");
    lab.meter_tunnel_after_gateway_filter()
        .expect("the inside meter counts what leaves the gateway");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.set_tunnel_allowed_profile(&profile)
        .expect("the inside meter follows the profile");
    lab.reset_all_leaks().expect("reset the meters");

    let through = Ok(format!("peer={}", addr::GATEWAY_V4));
    // The allowed name, and an allowed address that no name gives.
    assert_eq!(resolve(&lab, addr::MEET_NAME), [addr::HOST_V4]);
    assert_eq!(lab.probe_tcp(Ns::Client, addr::HOST_V4, 443), through);
    let relay = lab.probe_udp(Ns::Client, addr::OTHER_V4, 10000);
    assert!(
        relay
            .as_ref()
            .is_ok_and(|r| r.starts_with(through.as_deref().unwrap_or(""))),
        "{relay:?}"
    );
    // Outside the allowlist: refused by the gateway, which counts them.
    let refused_before = lab.gateway_refused().expect("the gateway's counter");
    for (host, port) in [(addr::HOST_V4, 8443), (addr::OTHER_V4, 443)] {
        let got = lab.probe_tcp(Ns::Client, host, port);
        assert!(got.is_err(), "{host}:{port} answered: {got:?}");
    }
    let got = lab.probe_udp_timeout(Ns::Client, addr::HOST_V4, 10000, Duration::from_millis(800));
    assert!(got.is_err(), "{}:10000 answered: {got:?}", addr::HOST_V4);
    let refused = lab.gateway_refused().expect("the gateway's counter") - refused_before;
    assert!(refused >= 3, "the gateway refused {refused} packets");
    // DNS stays pinned: another resolver is never asked, and a name
    // outside the profile gets no address.
    let other = lab.dns_query(Ns::Client, addr::PUBLIC_DNS_V4, addr::OTHER_NAME, "A");
    assert!(other.as_ref().map_or(true, |r| r.answers.is_empty()), "{other:?}");

    // status and its JSON say who enforces the allowlist.
    let status = daemon.status().expect("status");
    assert!(
        status["allowed"]
            .as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|h| h["gateway_enforced"] == true)),
        "{status}"
    );
    let human = daemon.ctl_ok(&["status"]).expect("status");
    assert!(
        human.contains("the gateway, not this machine, enforces the allowlist"),
        "{human}"
    );

    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// A name's range has answer sets of its own (`allow4_udp_40000_40010`,
/// addresses only); an address someone else adds there is noticed by the
/// tamper guard and taken out, like one added to the shared sets. Seen
/// failing with the guard's element check skipping the range sets (the
/// foreign addresses stayed: "timed out waiting for the foreign elements
/// gone").
#[test]
fn an_address_someone_adds_to_a_range_set_is_taken_out() {
    let lab = lab();
    let _echo = udp_echo(&lab, &[40005]);
    let profile = write_profile(
        &lab,
        &format!(
            "[[allow]]\nhost = \"{}\"\ntcp = [443]\nudp = [\"40000-40010\"]\n",
            addr::MEET_NAME
        ),
        "",
    );
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.set_tunnel_allowed_profile(&profile)
        .expect("the inside meter follows the profile");
    lab.reset_all_leaks().expect("reset the meters");
    assert_eq!(resolve(&lab, addr::MEET_NAME), [addr::HOST_V4]);
    assert_eq!(reached(&lab, addr::HOST_V4, &[40005]), [40005]);
    for (set, element) in [
        ("allow4_udp_40000_40010", format!("{} timeout 1h", addr::OTHER_V4)),
        ("known4_udp_40000_40010", addr::OTHER_V4.to_string()),
    ] {
        lab.exec_ok(
            Ns::Client,
            &[
                "nft",
                "add",
                "element",
                "inet",
                "sessiongate",
                set,
                &format!("{{ {element} }}"),
            ],
        )
        .expect("add a foreign element");
    }
    wait_until(Duration::from_secs(5), "the foreign elements gone", || {
        let listing = lab
            .exec_ok(Ns::Client, &["nft", "list", "table", "inet", "sessiongate"])
            .unwrap_or_default();
        listing.contains("allow4_udp_40000_40010") && !listing.contains(addr::OTHER_V4)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    assert_eq!(reached(&lab, addr::OTHER_V4, &[40005]), Vec::<u16>::new());
    // Our own answer is back.
    wait_until(
        Duration::from_secs(5),
        "meet.test open again on its range",
        || reached(&lab, addr::HOST_V4, &[40005]) == [40005],
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}
