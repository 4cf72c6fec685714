//! A real video call through sessiongate (issue 16): Janus's video room,
//! coturn and nginx on the video host, and two participants, a therapist
//! and a client, each in its own namespace with its own sessiond and
//! profile, each in headless Chromium with a fake camera and microphone.
//! One test in its own file, so cargo runs it alone: two browsers and the
//! servers share the machine's cores. Run as root after
//! `cargo build --workspace --bins`.

use std::time::{Duration, Instant};

use lab::call::{self, Browser, CallHost, CallStats, FORBIDDEN_STUN_NAME, JANUS_MEDIA_PORTS};
use lab::{addr, Lab, Ns};

/// How long the two may take to join, connect and decode the first frames.
const CONNECT_DEADLINE: Duration = Duration::from_secs(60);
/// How many more frames each must decode after the first, to show media
/// keeps flowing (about two seconds of the fake camera).
const MORE_FRAMES: u64 = 30;

fn wait_stats(
    browser: &Browser,
    deadline: Duration,
    what: &str,
    ok: impl Fn(&CallStats) -> bool,
) -> CallStats {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < deadline {
        if let Ok(s) = browser.stats() {
            if ok(&s) {
                return s;
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "{}: timed out after {deadline:?} waiting for {what}; last stats: {}\nChromium log:\n{}",
        browser.name,
        last.map(|s| serde_json::to_string_pretty(&s.raw).unwrap_or_default())
            .unwrap_or_else(|| "none".into()),
        browser.process.log()
    );
}

#[test]
fn two_participants_call_through_their_gateways() {
    let lab = Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"));
    lab.add_second_client().expect("second client namespace");
    let host = CallHost::start(&lab).unwrap_or_else(|e| panic!("call servers: {e:#}"));

    // Both profiles allow the video host's HTTPS, its STUN/TURN and Janus's
    // media ports, nothing else; the tunnel meter follows the same list.
    let allow = call::call_allow_block(&JANUS_MEDIA_PORTS);
    let therapist_profile = lab
        .write_profile("call", |t| call::with_allow_block(t, &allow))
        .expect("therapist profile");
    assert!(
        therapist_profile.toml.contains("20000"),
        "allow block not replaced"
    );
    lab.write_second_profile("call", |t| call::with_allow_block(t, &allow))
        .expect("client profile");
    lab.set_tunnel_allowed_profile(&therapist_profile.toml)
        .expect("tunnel meter follows the call profile");

    // Counts what the browsers send to mDNS, LLMNR and SSDP, in each
    // participant's own namespace before any of sessiond's tables see it.
    for ns in [Ns::Client, Ns::SecondClient] {
        call::watch_local_discovery(&lab, ns).expect("local discovery counter");
    }
    let therapist_daemon = lab.start_sessiond().expect("therapist's sessiond");
    therapist_daemon
        .ctl_ok(&["start", "call"])
        .expect("therapist session");
    let client_daemon = lab.start_second_sessiond().expect("client's sessiond");
    client_daemon.ctl_ok(&["start", "call"]).expect("client session");
    lab.reset_all_leaks().expect("reset meters");

    let page = |who: &str| format!("https://{}/?name={who}", addr::MEET_NAME);
    let therapist = Browser::launch(
        &lab,
        Ns::Client,
        "therapist",
        &page("therapist"),
        &host.spki_hashes,
    )
    .unwrap_or_else(|e| panic!("therapist's browser: {e:#}"));
    let client = Browser::launch(
        &lab,
        Ns::SecondClient,
        "client",
        &page("client"),
        &host.spki_hashes,
    )
    .unwrap_or_else(|e| panic!("client's browser: {e:#}"));

    let decoding = |s: &CallStats| s.video_frames_decoded() > 0;
    let t1 = wait_stats(&therapist, CONNECT_DEADLINE, "frames from the client", decoding);
    let c1 = wait_stats(&client, CONNECT_DEADLINE, "frames from the therapist", decoding);
    let t2 = wait_stats(&therapist, CONNECT_DEADLINE, "more frames", |s| {
        s.video_frames_decoded() >= t1.video_frames_decoded() + MORE_FRAMES && s.rtt_ms() > 0.0
    });
    let c2 = wait_stats(&client, CONNECT_DEADLINE, "more frames", |s| {
        s.video_frames_decoded() >= c1.video_frames_decoded() + MORE_FRAMES && s.rtt_ms() > 0.0
    });

    println!("{}", call::table_header());
    println!("{}", call::table_row("therapist", &t2));
    println!("{}", call::table_row("client", &c2));
    if let Ok(path) = std::env::var("CALL_SCREENSHOT") {
        // Relative to the workspace (cargo runs tests in tests/).
        let path = lab::util::workspace_root().join(path);
        let png = therapist.screenshot().expect("screenshot");
        std::fs::write(&path, png).expect("writing the screenshot");
        println!("screenshot of the therapist's page: {}", path.display());
    }

    for (who, s, tunnel_addr) in [
        ("therapist", &t2, addr::DAEMON_TUN_V4),
        ("client", &c2, addr::SECOND_DAEMON_TUN_V4),
    ] {
        assert!(
            s.page_errors().is_empty(),
            "{who}'s page failed: {:?}",
            s.page_errors()
        );
        for pc in ["publisher", "subscriber"] {
            assert!(
                matches!(s.ice_state(pc).as_str(), "connected" | "completed"),
                "{who}'s {pc} connection: ICE {}",
                s.ice_state(pc)
            );
            assert_eq!(s.pair_state(pc), "succeeded", "{who}'s {pc} selected pair");
            // Media goes straight through the tunnel (from the tunnel
            // address, seen by Janus and coturn as the gateway's NAT
            // address) to Janus's media port on the video host: not from the
            // veth address, and not relayed by TURN (which the profile also
            // allows, and which carries the call when the media ports are
            // missing from the profile).
            let local = s.local_candidate(pc);
            let remote = s.remote_candidate(pc);
            assert!(
                !local.starts_with("relay")
                    && (local.contains(&format!(" {tunnel_addr}:"))
                        || local.contains(&format!(" {}:", addr::GATEWAY_V4))),
                "{who}'s {pc} media does not go straight from its tunnel to Janus: {local}"
            );
            let janus_port = JANUS_MEDIA_PORTS
                .iter()
                .any(|p| remote.contains(&format!(" {}:{p}/", addr::HOST_V4)));
            assert!(
                janus_port,
                "{who}'s {pc} media does not go to the video host: {remote}"
            );
        }
        assert!(s.audio_packets_received() > 0, "{who} received no audio");
    }

    // The page names a STUN server whose name no profile allows: the stub
    // refuses it, so the pinned resolver never hears of it.
    let pinned = lab.pinned_resolver_log();
    assert!(
        !pinned.contains(FORBIDDEN_STUN_NAME),
        "{FORBIDDEN_STUN_NAME} reached the pinned resolver:\n{pinned}"
    );
    println!(
        "ICE server errors: therapist {:?}, client {:?}",
        t2.ice_error_urls(),
        c2.ice_error_urls()
    );
    for (who, s) in [("therapist", &t2), ("client", &c2)] {
        assert!(
            s.ice_error_urls().iter().any(|e| e.contains(FORBIDDEN_STUN_NAME)),
            "{who}'s browser did not fail to look up {FORBIDDEN_STUN_NAME}: {:?}",
            s.ice_error_urls()
        );
    }
    // coturn on the allowed host did serve the browsers through the tunnel:
    // a server-reflexive candidate with the gateway's address.
    let relay = format!("relay {}:", addr::HOST_V4);
    for (who, browser) in [("therapist", &therapist), ("client", &client)] {
        let s = wait_stats(browser, CONNECT_DEADLINE, "a STUN answer from coturn", |s| {
            s.gathered_candidates()
                .iter()
                .any(|c| c.starts_with(&format!("srflx {}:", addr::GATEWAY_V4)))
        });
        let gathered = s.gathered_candidates();
        // A TURN allocation is reported, not required: on a loaded machine
        // Chromium gives up on it while the direct path already works.
        println!(
            "{who}: TURN relay from coturn: {}",
            gathered.iter().any(|c| c.starts_with(&relay))
        );
        assert!(
            gathered
                .iter()
                .any(|c| c.starts_with(&format!("srflx {}:", addr::GATEWAY_V4))),
            "{who} got no STUN answer from coturn: {gathered:?}"
        );
        // The veth address is a host candidate (the browser sees the
        // interface), but nothing went out from it: the meters say so below.
    }
    let discovery: Vec<u64> = [Ns::Client, Ns::SecondClient]
        .map(|ns| call::local_discovery_packets(&lab, ns).expect("discovery counter"))
        .to_vec();
    println!("mDNS/LLMNR/SSDP packets the browsers sent (therapist, client): {discovery:?}");
    // The page hands each browser a remote candidate with a .local name, so
    // each did send mDNS: the outside meter's zero below is not vacuous.
    assert!(
        discovery.iter().all(|&n| n > 0),
        "a browser sent no mDNS, so the meter proves nothing about it: {discovery:?}"
    );
    // Nothing outside the tunnel (the router watches both participants'
    // links, so mDNS, LLMNR and SSDP included) and nothing inside it but
    // the video host's allowed ports and the pinned resolver.
    lab.assert_no_leaks();

    drop(therapist);
    drop(client);
    client_daemon.ctl_ok(&["stop"]).expect("client stop");
    therapist_daemon.ctl_ok(&["stop"]).expect("therapist stop");
}

/// The longer comparison, run by `scripts/call` (not by the test command):
/// the same call over sessiond and over wg-quick-like wireguard-go, calm,
/// with the gateway lost for 10 s, and under a saturating upload. Prints one
/// table; asserts only that sessiond leaked nothing.
#[test]
#[ignore = "minutes long: run by scripts/call"]
fn compare_with_wg_quick() {
    use lab::call_compare::{run_phase, table, Setup, Stress};
    let secs: u64 = std::env::var("CALL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut results = Vec::new();
    for stress in [Stress::Calm, Stress::GatewayLost, Stress::Upload] {
        for setup in [Setup::Sessiond, Setup::WgQuick] {
            eprintln!("call: {setup:?}, {stress:?}, {secs} s");
            let r = run_phase(setup, stress, Duration::from_secs(secs))
                .unwrap_or_else(|e| panic!("{setup:?} {stress:?}: {e:#}"));
            results.push(r);
        }
    }
    println!("{}", table(&results));
    for r in &results {
        if r.setup == Setup::Sessiond {
            assert_eq!(
                (r.leaks_outside, r.leaks_inside),
                (0, 0),
                "sessiond leaked during {:?}: {:?}",
                r.stress,
                r.leak_destinations
            );
        }
    }
}
