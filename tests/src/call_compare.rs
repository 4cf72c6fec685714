//! The longer call comparison behind `scripts/call`: the same two-party call
//! over sessiond and over plain wireguard-go clients set up like wg-quick
//! (no kill switch), each calm, with the gateway lost for 10 s mid-call, and
//! under a saturating upload (iperf3) from the therapist's machine; one
//! table of call figures and of what leaked. Owns nothing beyond the labs it
//! builds (each phase its own lab, dropped at the end of the phase).
//! Figures, not assertions: timing belongs here, not in tests.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::call::{self, Browser, CallHost, CallStats, JANUS_MEDIA_PORTS};
use crate::lab::{addr, Lab, Ns};
use crate::util::wait_until;

/// iperf3's port on the video host (allowed in the comparison's profile so
/// that the upload goes through the tunnel in both setups).
const IPERF_PORT: u16 = 5201;
/// How long the gateway stays away in the outage phase.
const OUTAGE: Duration = Duration::from_secs(10);
/// Second plain wireguard-go client (the other participant's wg-quick).
const SECOND_PLAIN_TUN_V4: &str = "192.0.2.71";
const SECOND_PLAIN_TUN_V6: &str = "2001:db8:66::71";

/// How the participants reach the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    Sessiond,
    WgQuick,
}

impl Setup {
    fn label(self) -> &'static str {
        match self {
            Setup::Sessiond => "sessiond",
            Setup::WgQuick => "wg-quick",
        }
    }
}

/// What disturbs the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stress {
    Calm,
    GatewayLost,
    Upload,
}

impl Stress {
    fn label(self) -> &'static str {
        match self {
            Stress::Calm => "calm",
            Stress::GatewayLost => "gateway lost 10 s",
            Stress::Upload => "saturating upload",
        }
    }
}

/// One phase's figures.
pub struct PhaseResult {
    pub setup: Setup,
    pub stress: Stress,
    /// Frames per second decoded by therapist and client over the window.
    pub fps: [f64; 2],
    pub lost: [i64; 2],
    pub jitter_ms: [f64; 2],
    pub rtt_ms: [f64; 2],
    /// Gateway phase: seconds from the gateway's return until both decode
    /// frames again.
    pub recovery_s: Option<f64>,
    /// Upload phase: what iperf3 reached, Mbit/s.
    pub upload_mbps: Option<f64>,
    pub leaks_outside: u64,
    pub leaks_inside: u64,
    pub leak_destinations: Vec<String>,
}

/// The participants of one phase.
struct Call<'a> {
    _host: CallHost,
    therapist: Browser,
    client: Browser,
    _daemons: Vec<crate::Daemon<'a>>,
}

fn profile_allow() -> String {
    let mut block = call::call_allow_block(&JANUS_MEDIA_PORTS);
    block = block.replace("tcp = [443]", &format!("tcp = [443, {IPERF_PORT}]"));
    block
}

fn point_resolver_at_pinned(lab: &Lab, ns: Ns) -> Result<()> {
    let file = std::path::PathBuf::from("/etc/netns")
        .join(lab.ns_name(ns))
        .join("resolv.conf");
    std::fs::write(&file, format!("nameserver {}\n", addr::GATEWAY_TUN_V4))
        .with_context(|| format!("writing {}", file.display()))
}

/// A wg-quick-like wireguard-go client for the second participant (the lab
/// has one for the first, set up the same way): 192.0.2.71 and
/// 2001:db8:66::71, the host side (v4 and v6) and the pinned resolver
/// through the gateway, keepalive 1 s.
fn start_second_plain_client(lab: &Lab) -> Result<()> {
    let ifname = format!("wd{}", lab.id());
    let key = lab.tmp_dir().join(format!("{ifname}.key"));
    let public = crate::gateway::write_new_key(&key)?;
    lab.add_gateway_peer(
        &public,
        &[
            &format!("{SECOND_PLAIN_TUN_V4}/32"),
            &format!("{SECOND_PLAIN_TUN_V6}/128"),
        ],
    )?;
    lab.track_wg_iface(&ifname);
    let child = lab.spawn_env(
        Ns::SecondClient,
        &format!("wireguard-go-{ifname}"),
        &["wireguard-go", &ifname],
        &[("WG_PROCESS_FOREGROUND", "1")],
    )?;
    wait_until(Duration::from_secs(10), "the second plain wireguard-go", || {
        !child.is_running()
            || lab
                .exec(Ns::SecondClient, &["wg", "show", &ifname, "listen-port"])
                .is_ok_and(|o| o.status.success())
    })?;
    if !child.is_running() {
        bail!("wireguard-go exited: {}", child.log());
    }
    let key = key.to_string_lossy().into_owned();
    let allowed = format!("203.0.113.0/24,{}/32,2001:db8:203::/64", addr::GATEWAY_TUN_V4);
    lab.exec_ok(
        Ns::SecondClient,
        &[
            "wg",
            "set",
            &ifname,
            "private-key",
            &key,
            "peer",
            lab.gateway_public_key(),
            "endpoint",
            addr::GATEWAY_ENDPOINT,
            "allowed-ips",
            &allowed,
            "persistent-keepalive",
            "1",
        ],
    )?;
    lab.ip_batch(
        Ns::SecondClient,
        &[
            format!("addr add {SECOND_PLAIN_TUN_V4}/32 dev {ifname}"),
            format!("addr add {SECOND_PLAIN_TUN_V6}/128 dev {ifname} nodad"),
            format!("link set {ifname} up"),
            format!("route add 203.0.113.0/24 dev {ifname} src {SECOND_PLAIN_TUN_V4}"),
            format!(
                "route add {}/32 dev {ifname} src {SECOND_PLAIN_TUN_V4}",
                addr::GATEWAY_TUN_V4
            ),
            format!("route add 2001:db8:203::/64 dev {ifname} src {SECOND_PLAIN_TUN_V6}"),
        ],
    )?;
    Ok(())
}

impl<'a> Call<'a> {
    fn start(lab: &'a Lab, setup: Setup) -> Result<Call<'a>> {
        lab.add_second_client()?;
        let host = CallHost::start(lab)?;
        let allow = profile_allow();
        let profile = lab.write_profile("call", |t| call::with_allow_block(t, &allow))?;
        lab.write_second_profile("call", |t| call::with_allow_block(t, &allow))?;
        lab.set_tunnel_allowed_profile(&profile.toml)?;
        for ns in [Ns::Client, Ns::SecondClient] {
            call::watch_local_discovery(lab, ns)?;
        }
        let mut daemons = Vec::new();
        match setup {
            Setup::Sessiond => {
                let a = lab.start_sessiond()?;
                a.ctl_ok(&["start", "call"])?;
                let b = lab.start_second_sessiond()?;
                b.ctl_ok(&["start", "call"])?;
                daemons.push(a);
                daemons.push(b);
            }
            Setup::WgQuick => {
                // wg-quick's DNS= line: the pinned resolver, through the tunnel.
                lab.start_plain_wireguard_client()?;
                start_second_plain_client(lab)?;
                point_resolver_at_pinned(lab, Ns::Client)?;
                point_resolver_at_pinned(lab, Ns::SecondClient)?;
            }
        }
        lab.reset_all_leaks()?;
        let page = |who: &str| format!("https://{}/?name={who}", addr::MEET_NAME);
        let therapist = Browser::launch(
            lab,
            Ns::Client,
            "therapist",
            &page("therapist"),
            &host.spki_hashes,
        )?;
        let client = Browser::launch(
            lab,
            Ns::SecondClient,
            "client",
            &page("client"),
            &host.spki_hashes,
        )?;
        let call = Call {
            _host: host,
            therapist,
            client,
            _daemons: daemons,
        };
        for b in [&call.therapist, &call.client] {
            crate::util::wait_for(Duration::from_secs(60), "the first decoded frames", || {
                let s = b.stats()?;
                if s.video_frames_decoded() > 0 {
                    Ok(())
                } else {
                    bail!("{} decoded no frame yet", b.name)
                }
            })?;
        }
        Ok(call)
    }

    fn stats(&self) -> Result<[CallStats; 2]> {
        Ok([self.therapist.stats()?, self.client.stats()?])
    }
}

fn loss_delta(before: &CallStats, after: &CallStats) -> i64 {
    after.packets_lost() - before.packets_lost()
}

/// Runs one phase in its own lab and returns its figures.
pub fn run_phase(setup: Setup, stress: Stress, window: Duration) -> Result<PhaseResult> {
    let lab = Lab::new()?;
    let call = Call::start(&lab, setup)?;
    let mut recovery_s = None;
    let mut upload_mbps = None;
    let before = call.stats()?;
    let started = Instant::now();
    match stress {
        Stress::Calm => std::thread::sleep(window),
        Stress::GatewayLost => {
            std::thread::sleep(window / 2);
            lab.kill_gateway()?;
            std::thread::sleep(OUTAGE);
            let frozen = call.stats()?;
            lab.restart_gateway()?;
            let back = Instant::now();
            let mut moving = [false, false];
            let deadline = Duration::from_secs(90);
            while back.elapsed() < deadline && !(moving[0] && moving[1]) {
                let now = call.stats()?;
                for i in 0..2 {
                    moving[i] |= now[i].video_frames_decoded() > frozen[i].video_frames_decoded() + 2;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if moving[0] && moving[1] {
                recovery_s = Some(back.elapsed().as_secs_f64());
            }
            let left = window.saturating_sub(started.elapsed());
            std::thread::sleep(left);
        }
        Stress::Upload => {
            let server = lab.spawn_named(
                Ns::Host,
                "iperf3-server",
                &["iperf3", "-s", "-B", addr::HOST_V4, "-p", &IPERF_PORT.to_string()],
            )?;
            wait_until(Duration::from_secs(10), "iperf3 server", || {
                lab.exec_ok(Ns::Host, &["ss", "-Hltn"])
                    .is_ok_and(|o| o.contains(&format!("{}:{IPERF_PORT}", addr::HOST_V4)))
            })?;
            let secs = window.as_secs().max(5).to_string();
            let out = lab.exec(
                Ns::Client,
                &[
                    "iperf3",
                    "-c",
                    addr::HOST_V4,
                    "-p",
                    &IPERF_PORT.to_string(),
                    "-t",
                    &secs,
                    "-J",
                ],
            )?;
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            upload_mbps = json["end"]["sum_sent"]["bits_per_second"]
                .as_f64()
                .map(|b| b / 1e6);
            let _ = server.kill();
        }
    }
    let after = call.stats()?;
    let elapsed = started.elapsed().as_secs_f64();
    let fps = [0, 1].map(|i| {
        (after[i]
            .video_frames_decoded()
            .saturating_sub(before[i].video_frames_decoded())) as f64
            / elapsed
    });
    let result = PhaseResult {
        setup,
        stress,
        fps,
        lost: [0, 1].map(|i| loss_delta(&before[i], &after[i])),
        jitter_ms: [0, 1].map(|i| after[i].video_jitter_ms()),
        rtt_ms: [0, 1].map(|i| after[i].rtt_ms()),
        recovery_s,
        upload_mbps,
        leaks_outside: lab.leaks()?,
        leaks_inside: lab.tunnel_leaks()?,
        leak_destinations: {
            let mut d = lab.leak_destinations()?;
            d.extend(
                lab.tunnel_leak_destinations()?
                    .into_iter()
                    .map(|x| format!("in tunnel: {x}")),
            );
            d
        },
    };
    drop(call);
    Ok(result)
}

/// The comparison table.
pub fn table(results: &[PhaseResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<9} {:<18} {:>11} {:>9} {:>11} {:>11} {:>9} {:>8} {:>7} {:>7}  leaked to",
        "setup", "stress", "fps (t/c)", "lost", "jitter ms", "rtt ms", "back in s", "upload", "out", "in"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:<9} {:<18} {:>5.1}/{:<5.1} {:>4}/{:<4} {:>5.1}/{:<5.1} {:>5.1}/{:<5.1} {:>9} {:>8} {:>7} {:>7}  {}",
            r.setup.label(),
            r.stress.label(),
            r.fps[0],
            r.fps[1],
            r.lost[0],
            r.lost[1],
            r.jitter_ms[0],
            r.jitter_ms[1],
            r.rtt_ms[0],
            r.rtt_ms[1],
            r.recovery_s.map(|s| format!("{s:.1}")).unwrap_or_else(|| "-".into()),
            r.upload_mbps.map(|m| format!("{m:.0}M")).unwrap_or_else(|| "-".into()),
            r.leaks_outside,
            r.leaks_inside,
            if r.leak_destinations.is_empty() {
                "nothing".to_string()
            } else {
                r.leak_destinations.join(", ")
            }
        );
    }
    out
}
