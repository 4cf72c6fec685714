//! `bench` (docs/benchmarks.md, `sudo ./scripts/bench`): sessiongate against
//! wireguard-go (set up the way wg-quick does it) and boringtun-cli, in the
//! lab, with the three systems taking turns round by round in one run. The
//! machine is shared and noisy, so the result is a table of ratios; absolute
//! numbers are printed for context only.
//!
//! Every system gets its own client key and tunnel address at the lab's
//! wireguard-go gateway, and only one of them is up in the client namespace at
//! a time. Per round and system it measures: TCP throughput up and down
//! (iperf3 to the lab host 203.0.113.10:5201), the tunnel process's CPU
//! seconds per GB over those transfers and its CPU share while carrying a
//! steady 20 Mbit/s UDP stream, UDP round trips (p50/p99, pings on a fixed
//! schedule) idle and under a concurrent bulk upload with the gateway's
//! socket-queue drops meanwhile, the same under a bulk upload through a
//! shaped uplink (BENCH_UPLINK_RATE, default 50mbit), the time from "bring it up" to the first TCP
//! connection that arrives through the tunnel, resident memory, and the
//! lab's leak meter (sessiongate must leak nothing).
//!
//! Two helper subcommands run inside the client namespace (the bench starts
//! itself there): `udp-ping` and `first-packet`.
//!
//! Environment: BENCH_ROUNDS (3), BENCH_SECS (5, per transfer), BENCH_PINGS
//! (200), BENCH_PING_INTERVAL_MS (10), BENCH_UDP_RATE (20M),
//! BENCH_UPLINK_RATE (50mbit, a tc rate), BENCH_SYSTEMS
//! (sessiongate,wireguard-go,boringtun-cli), BENCH_BORINGTUN (path of
//! boringtun-cli; default target/bench-tools/bin/boringtun-cli),
//! BENCH_PROFILE=1 (afterwards: an strace timeline of `sessionctl start`,
//! a perf profile and `strace -c` of sessiond during an upload),
//! BENCH_START_ONLY=1 (only start to first packet), BENCH_TRANSPORT=tcp
//! (sessiongate's datagrams over TCP port 443 through the lab's relay
//! beside the gateway, as on a network that blocks UDP; the other systems
//! stay on UDP). LAB_BIN_SESSIOND / LAB_BIN_SESSIONCTL pick the
//! daemon's binaries (scripts/bench points them at the release build).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use lab::{addr, Daemon, Lab, LabChild, Ns};
use serde_json::Value;

/// The iperf3 port the bench profile allows (TCP and UDP).
const IPERF_PORT: &str = "5201";
/// labhost's TCP service (first-packet probe) and UDP echo (ping) on the host.
const PROBE_TCP_PORT: &str = "443";
const ECHO_UDP_PORT: &str = "10000";
/// The call-shaped flow's receiver on the host (lab::callflow::LAB_PORT).
const CALL_UDP_PORT: u16 = lab::callflow::LAB_PORT;
/// Tunnel addresses of the two comparison clients (sessiongate uses the lab's
/// 192.0.2.66). Each system has its own key, so the gateway keeps them apart.
const WG_GO_TUN_V4: &str = "192.0.2.71";
const BORINGTUN_TUN_V4: &str = "192.0.2.72";
/// wg-quick's routing table and fwmark (51820) for the full-tunnel setup.
const WGQ_TABLE: &str = "51820";
/// Every tunnel uses WireGuard's usual MTU (sessiond's default too).
const MTU: &str = "1420";
/// A lost ping counts as this round trip in the percentiles.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
const MIB: f64 = 1024.0 * 1024.0;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None => run(),
        Some("udp-ping") => udp_ping(&args[1..]),
        Some("first-packet") => first_packet(&args[1..]),
        Some("call-send") => lab::callflow::cli_send(&args[1..]),
        Some("call-recv") => lab::callflow::cli_receive(&args[1..]),
        Some("-h" | "--help") => {
            println!("usage: sudo ./scripts/bench   (see docs/benchmarks.md for the BENCH_* variables)");
            Ok(())
        }
        Some(other) => Err(anyhow!(
            "unknown argument `{other}`: run `sudo ./scripts/bench` without arguments"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ------------------------------------------------------------ configuration

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Sessiongate,
    WireguardGo,
    Boringtun,
}

impl System {
    const ALL: [System; 3] = [System::Sessiongate, System::WireguardGo, System::Boringtun];

    fn label(self) -> &'static str {
        match self {
            System::Sessiongate => "sessiongate",
            System::WireguardGo => "wireguard-go",
            System::Boringtun => "boringtun-cli",
        }
    }

    fn index(self) -> usize {
        match self {
            System::Sessiongate => 0,
            System::WireguardGo => 1,
            System::Boringtun => 2,
        }
    }
}

struct Config {
    rounds: usize,
    secs: u64,
    pings: u32,
    ping_interval_ms: u64,
    udp_rate: String,
    /// tc rate of the shaped uplink (the second loaded-ping run).
    uplink_rate: String,
    systems: Vec<System>,
    boringtun: Option<PathBuf>,
    profile: bool,
    /// The call-shaped flow: its length, the uplinks it runs on (None: the
    /// lab's plain link) and whether the other measurements are skipped.
    call_secs: u64,
    call_links: Vec<Option<String>>,
    call_only: bool,
    /// BENCH_START_ONLY=1: only bring each system up and down (start to
    /// first packet, setup command time, resident memory); no transfers.
    start_only: bool,
    /// BENCH_TUN_QDISC: a qdisc (e.g. `fq_codel`, `cake`) put on sessiond's
    /// tunnel interface after each start, to measure that lever.
    tun_qdisc: Option<String>,
}

fn env_num<T>(name: &str, default: T, min: T) -> Result<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) => {
            let n: T = v
                .trim()
                .parse()
                .map_err(|_| anyhow!("{name}={v} is not a number"))?;
            if n < min {
                bail!("{name}={v} is below the minimum {min}");
            }
            Ok(n)
        }
        Err(_) => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Config> {
        let systems = match std::env::var("BENCH_SYSTEMS") {
            Ok(list) => {
                let mut v = Vec::new();
                for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let s = System::ALL
                        .into_iter()
                        .find(|s| s.label() == name)
                        .with_context(|| {
                            format!("BENCH_SYSTEMS: unknown system `{name}` (sessiongate, wireguard-go, boringtun-cli)")
                        })?;
                    v.push(s);
                }
                if !v.contains(&System::Sessiongate) {
                    bail!("BENCH_SYSTEMS must include sessiongate (it is what the table compares)");
                }
                v
            }
            Err(_) => System::ALL.to_vec(),
        };
        let boringtun = if systems.contains(&System::Boringtun) {
            let path = match std::env::var_os("BENCH_BORINGTUN") {
                Some(p) => PathBuf::from(p),
                None => lab::util::workspace_root().join("target/bench-tools/bin/boringtun-cli"),
            };
            if !path.is_file() {
                bail!(
                    "boringtun-cli not found at {}: run `sudo ./scripts/bench` (it installs it), or set \
                     BENCH_BORINGTUN, or leave it out with BENCH_SYSTEMS=sessiongate,wireguard-go",
                    path.display()
                );
            }
            Some(path)
        } else {
            None
        };
        let udp_rate = std::env::var("BENCH_UDP_RATE").unwrap_or_else(|_| "20M".to_string());
        let uplink_rate = std::env::var("BENCH_UPLINK_RATE").unwrap_or_else(|_| "50mbit".to_string());
        Ok(Config {
            rounds: env_num("BENCH_ROUNDS", 3, 1)?,
            secs: env_num("BENCH_SECS", 5, 1)?,
            pings: env_num("BENCH_PINGS", 200, 10)?,
            ping_interval_ms: env_num("BENCH_PING_INTERVAL_MS", 10, 1)?,
            udp_rate,
            uplink_rate,
            systems,
            boringtun,
            profile: std::env::var("BENCH_PROFILE").is_ok_and(|v| v == "1"),
            call_secs: env_num("BENCH_CALL_SECS", 5, 1)?,
            call_links: call_links()?,
            call_only: std::env::var("BENCH_CALL_ONLY").is_ok_and(|v| v == "1"),
            start_only: std::env::var("BENCH_START_ONLY").is_ok_and(|v| v == "1"),
            tun_qdisc: std::env::var("BENCH_TUN_QDISC")
                .ok()
                .filter(|q| !q.trim().is_empty()),
        })
    }

    /// The call scenarios in the order they run: each link, alone and
    /// beside an upload and a download.
    fn call_scenarios(&self) -> Vec<Scenario> {
        let mut v = Vec::new();
        for link in &self.call_links {
            for load in [Load::Alone, Load::Upload, Load::Download] {
                v.push(Scenario {
                    link: link.clone(),
                    load,
                });
            }
        }
        v
    }

    fn ping_secs(&self) -> u64 {
        (u64::from(self.pings) * self.ping_interval_ms).div_ceil(1000)
    }
}

/// BENCH_CALL_LINKS: a comma-separated list of `plain` and tc rates
/// (default `plain,50mbit,10mbit`); `none` runs no call.
fn call_links() -> Result<Vec<Option<String>>> {
    let list = std::env::var("BENCH_CALL_LINKS").unwrap_or_else(|_| "plain,50mbit,10mbit".to_string());
    let mut v = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item {
            "none" => return Ok(Vec::new()),
            "plain" => v.push(None),
            rate if rate.ends_with("bit") && rate.chars().next().is_some_and(|c| c.is_ascii_digit()) => {
                v.push(Some(rate.to_string()))
            }
            other => bail!("BENCH_CALL_LINKS: `{other}` is neither `plain` nor a tc rate such as 50mbit"),
        }
    }
    Ok(v)
}

/// What runs beside the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Load {
    Alone,
    /// A saturating TCP upload (iperf3, client → host).
    Upload,
    /// A saturating TCP download (iperf3 -R, host → client).
    Download,
}

impl Load {
    fn label(self) -> &'static str {
        match self {
            Load::Alone => "alone",
            Load::Upload => "beside an upload",
            Load::Download => "beside a download",
        }
    }
}

/// One call measurement: a link and a load.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Scenario {
    /// None: the lab's plain link; Some(rate): the router's uplink shaped
    /// to this tc rate.
    link: Option<String>,
    load: Load,
}

impl Scenario {
    fn label(&self) -> String {
        let link = match &self.link {
            None => "plain link".to_string(),
            Some(rate) => format!("{rate} uplink"),
        };
        format!("{link}, {}", self.load.label())
    }

    /// The plain link without load is context; every loaded or shaped call
    /// carries the goals.
    fn has_goal(&self) -> bool {
        self.link.is_some() || self.load != Load::Alone
    }
}

/// One call's numbers.
#[derive(Clone, Debug, Default)]
struct CallSample {
    lost: f64,
    p50_ms: f64,
    p99_ms: f64,
    jitter_ms: f64,
    /// The bulk transfer beside it (Mbit/s; NaN alone).
    load_mbps: f64,
    /// Where packets (of the call and its load) were dropped meanwhile: the
    /// gateway's full socket queue, and the client's tunnel interface (the
    /// kernel's queue towards the tunnel process was full).
    gateway_drops: f64,
    tun_drops: f64,
}

// ------------------------------------------------------------ interruption

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ctrl-C / SIGTERM must not skip the lab's cleanup: a handler turns them
/// into a flag that the measuring loop checks, so `run` returns an error and
/// the lab's Drop removes everything. (Not a blocked mask with a sigwait
/// thread: children would inherit the mask, and strace or sessiond would then
/// never see SIGTERM. Handlers reset to the default on exec.)
extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_signals() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe, and no other handler is replaced.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted by a signal; the lab was cleaned up");
    }
    Ok(())
}

fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

// ------------------------------------------------------------ /proc

/// The clock ticks /proc/PID/stat counts in (USER_HZ).
fn clock_ticks() -> f64 {
    lab::util::run(&["getconf", "CLK_TCK"])
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of every thread of `pid`, in ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let (u, s) = user_system_ticks(pid)?;
    Ok(u + s)
}

/// The first line of /proc/stat: every CPU's busy and total ticks.
struct MachineTicks {
    busy: u64,
    total: u64,
}

impl MachineTicks {
    /// Busy share of the whole machine (all CPUs = 100 %) since `earlier`.
    fn busy_pct_since(&self, earlier: &MachineTicks) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return f64::NAN;
        }
        self.busy.saturating_sub(earlier.busy) as f64 / total as f64 * 100.0
    }
}

fn machine_ticks() -> Result<MachineTicks> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    // user nice system idle iowait irq softirq steal (guest is in user).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    if v.len() < 5 {
        bail!("/proc/stat: short cpu line `{line}`");
    }
    let total: u64 = v.iter().sum();
    Ok(MachineTicks {
        busy: total - v[3] - v[4],
        total,
    })
}

/// (utime, stime) of every thread of `pid`, in ticks.
fn user_system_ticks(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let fields: Vec<u64> = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .unwrap_or("")
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    match fields[..] {
        [u, s] => Ok((u, s)),
        _ => bail!("{path}: no utime/stime"),
    }
}

/// VmRSS of `pid` in MiB.
fn rss_mib(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{path}: no VmRSS"))?;
    Ok(kb * 1024.0 / MIB)
}

/// With BENCH_SMAPS=1, prints sessiond's [`smaps_report`] on stderr.
fn print_smaps(sys: System, pid: u32) {
    if sys == System::Sessiongate && std::env::var("BENCH_SMAPS").is_ok_and(|v| v == "1") {
        match smaps_report(pid) {
            Ok(report) => eprint!("{report}"),
            Err(e) => eprintln!("BENCH_SMAPS: {e:#}"),
        }
    }
}

/// BENCH_SMAPS=1: where `pid`'s resident memory is, from
/// `/proc/PID/smaps`: file-backed pages per file, then the anonymous
/// mappings with resident pages by kind (glibc reserves each thread
/// arena's heap as a 64 MiB-aligned mapping and each thread's stack as an
/// 8 MiB one behind a guard page), plus the thread count. For finding
/// where memory goes, not a goal.
fn smaps_report(pid: u32) -> Result<String> {
    use std::collections::BTreeMap;
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut files: BTreeMap<String, u64> = BTreeMap::new();
    let mut anon: Vec<(String, u64, u64)> = Vec::new();
    let mut current: Option<(String, u64)> = None;
    let mut flush = |cur: &mut Option<(String, u64)>, rss: u64| {
        if let Some((name, size)) = cur.take() {
            if name.starts_with('/') {
                *files.entry(name).or_default() += rss;
            } else if rss > 0 {
                anon.push((name, size, rss));
            }
        }
    };
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                let name = fields.nth(4).unwrap_or("").to_string();
                let perms = line.split_whitespace().nth(1).unwrap_or("").to_string();
                current = Some((
                    if name.is_empty() {
                        format!("anon {perms}")
                    } else {
                        name
                    },
                    (hi - lo) / 1024,
                ));
                continue;
            }
        }
        if first == "Rss:" {
            let kb = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            flush(&mut current, kb);
        }
    }
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    let file_total: u64 = files.values().sum();
    let anon_total: u64 = anon.iter().map(|a| a.2).sum();
    let mut out = format!(
        "sessiond smaps: {threads} threads, file-backed {file_total} KiB, anonymous {anon_total} KiB\n"
    );
    let mut by_rss: Vec<_> = files.into_iter().filter(|f| f.1 > 0).collect();
    by_rss.sort_by_key(|f| std::cmp::Reverse(f.1));
    for (name, kb) in by_rss {
        out.push_str(&format!("  {kb:>6} KiB  {name}\n"));
    }
    anon.sort_by_key(|m| std::cmp::Reverse(m.2));
    for (name, size, kb) in anon {
        out.push_str(&format!("  {kb:>6} KiB  {name} (mapping of {size} KiB)\n"));
    }
    Ok(out)
}

/// The lab starts processes through `ip netns exec`, which execs in place;
/// make sure the pid we account is the real program.
fn check_comm(pid: u32, want: &str) -> Result<()> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.trim();
    // comm is cut at 15 characters.
    if !want.starts_with(comm) || comm.is_empty() {
        bail!("pid {pid} is `{comm}`, not {want}: cannot account its CPU");
    }
    Ok(())
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

// ------------------------------------------------------------ results

/// One system's numbers in one round.
#[derive(Clone, Debug, Default)]
struct Sample {
    up_mbps: f64,
    down_mbps: f64,
    cpu_s_per_gb: f64,
    /// The upload again with the tunnel process pinned to one core.
    up_1core_mbps: f64,
    cpu_s_per_gb_1core: f64,
    udp_cpu_pct: f64,
    udp_loss_pct: f64,
    idle_p50_ms: f64,
    idle_p99_ms: f64,
    load_p50_ms: f64,
    load_p99_ms: f64,
    pings_lost: f64,
    gateway_drops: f64,
    uplink_p50_ms: f64,
    uplink_p99_ms: f64,
    uplink_lost: f64,
    load_mbps: f64,
    first_packet_ms: f64,
    up_cmd_ms: f64,
    rss_mib: f64,
    /// One per call scenario, in `Config::call_scenarios` order.
    calls: Vec<CallSample>,
    tcp_cpu_pct: f64,
    gateway_cpu_pct: f64,
    machine_busy_pct: f64,
    leaks: f64,
}

/// A goal on sessiongate's ratio to one peer, or on its own value.
#[derive(Clone, Copy)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
}

impl Bound {
    fn holds(self, v: f64) -> bool {
        match self {
            Bound::AtLeast(b) => v >= b,
            Bound::AtMost(b) => v <= b,
            Bound::Below(b) => v < b,
        }
    }

    fn text(self, unit: &str) -> String {
        match self {
            Bound::AtLeast(b) => format!("≥ {b}{unit}"),
            Bound::AtMost(0.0) => format!("= 0{unit}"),
            Bound::AtMost(b) => format!("≤ {b}{unit}"),
            Bound::Below(b) => format!("< {b}{unit}"),
        }
    }
}

#[derive(Clone, Copy)]
enum Goal {
    None,
    /// On sessiongate / wireguard-go and sessiongate / boringtun-cli.
    Ratio(Option<Bound>, Option<Bound>),
    /// On sessiongate's own value.
    Absolute(Bound, &'static str),
}

struct Metric {
    name: &'static str,
    get: fn(&Sample) -> f64,
    decimals: usize,
    /// Whether a ratio means anything (not for counts that are usually 0).
    ratio: bool,
    /// Show (and judge) the worst round instead of the median.
    worst: bool,
    goal: Goal,
}

fn metrics() -> Vec<Metric> {
    vec![
        Metric {
            name: "TCP upload, client → host (Mbit/s)",
            get: |s| s.up_mbps,
            decimals: 0,
            ratio: true,
            worst: false,
            goal: Goal::Ratio(Some(Bound::AtLeast(1.2)), Some(Bound::AtLeast(1.5))),
        },
        Metric {
            name: "TCP download, host → client (Mbit/s)",
            get: |s| s.down_mbps,
            decimals: 0,
            ratio: true,
            worst: false,
            goal: Goal::Ratio(Some(Bound::AtLeast(1.2)), Some(Bound::AtLeast(1.5))),
        },
        Metric {
            name: "CPU s per GB (tunnel process, TCP up+down)",
            get: |s| s.cpu_s_per_gb,
            decimals: 2,
            ratio: true,
            worst: false,
            goal: Goal::Ratio(Some(Bound::AtMost(0.8)), None),
        },
        Metric {
            name: "TCP upload, tunnel process pinned to one core (Mbit/s)",
            get: |s| s.up_1core_mbps,
            decimals: 0,
            ratio: true,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "scaling: upload on two cores / on one core",
            get: |s| s.up_mbps / s.up_1core_mbps,
            decimals: 2,
            ratio: false,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "CPU s per GB, upload pinned to one core",
            get: |s| s.cpu_s_per_gb_1core,
            decimals: 2,
            ratio: true,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "tunnel process CPU % during the TCP transfers (1 core = 100)",
            get: |s| s.tcp_cpu_pct,
            decimals: 0,
            ratio: true,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "gateway wireguard-go CPU % during the TCP transfers",
            get: |s| s.gateway_cpu_pct,
            decimals: 0,
            ratio: true,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "whole machine busy % during the TCP transfers (all cores = 100)",
            get: |s| s.machine_busy_pct,
            decimals: 0,
            ratio: false,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "CPU % carrying a steady UDP stream",
            get: |s| s.udp_cpu_pct,
            decimals: 1,
            ratio: true,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "UDP stream loss (%)",
            get: |s| s.udp_loss_pct,
            decimals: 2,
            ratio: false,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "UDP round trip idle, p50 (ms)",
            get: |s| s.idle_p50_ms,
            decimals: 3,
            ratio: true,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "UDP round trip idle, p99 (ms)",
            get: |s| s.idle_p99_ms,
            decimals: 3,
            ratio: true,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "UDP round trip under bulk upload, p50 (ms)",
            get: |s| s.load_p50_ms,
            decimals: 2,
            ratio: true,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "UDP round trip under bulk upload, p99 (ms)",
            get: |s| s.load_p99_ms,
            decimals: 2,
            ratio: true,
            worst: false,
            goal: Goal::Ratio(Some(Bound::AtMost(1.0)), None),
        },
        Metric {
            name: "pings lost (idle + loaded, per round)",
            get: |s| s.pings_lost,
            decimals: 0,
            ratio: false,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "datagrams the gateway dropped (socket queue full) during the loaded pings",
            get: |s| s.gateway_drops,
            decimals: 0,
            ratio: false,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "UDP round trip under bulk upload, shaped uplink, p50 (ms)",
            get: |s| s.uplink_p50_ms,
            decimals: 2,
            ratio: true,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "UDP round trip under bulk upload, shaped uplink, p99 (ms)",
            get: |s| s.uplink_p99_ms,
            decimals: 2,
            ratio: true,
            worst: false,
            goal: Goal::Ratio(Some(Bound::AtMost(1.0)), None),
        },
        Metric {
            name: "pings lost under bulk upload, shaped uplink (per round)",
            get: |s| s.uplink_lost,
            decimals: 0,
            ratio: false,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "bulk upload during the loaded pings (Mbit/s)",
            get: |s| s.load_mbps,
            decimals: 0,
            ratio: true,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "start to first packet through the tunnel (ms)",
            get: |s| s.first_packet_ms,
            decimals: 1,
            ratio: true,
            worst: false,
            goal: Goal::Ratio(Some(Bound::AtMost(1.0)), None),
        },
        Metric {
            name: "`sessionctl start` / wg-quick-style setup commands (ms)",
            get: |s| s.up_cmd_ms,
            decimals: 1,
            ratio: true,
            worst: false,
            goal: Goal::None,
        },
        Metric {
            name: "resident memory in a session (MiB)",
            get: |s| s.rss_mib,
            decimals: 1,
            ratio: true,
            worst: false,
            goal: Goal::Absolute(Bound::Below(20.0), " MiB"),
        },
        Metric {
            name: "packets outside the tunnel (leak meter, worst round)",
            get: |s| s.leaks,
            decimals: 0,
            ratio: false,
            worst: true,
            goal: Goal::Absolute(Bound::AtMost(0.0), ""),
        },
    ]
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

struct Results {
    /// rounds × systems.
    rounds: Vec<[Option<Sample>; 3]>,
    sessiond_idle_rss: f64,
    /// The call scenarios, in the order of each sample's `calls`.
    scenarios: Vec<Scenario>,
}

impl Results {
    fn values(&self, sys: System, get: fn(&Sample) -> f64) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|r| r[sys.index()].as_ref().map(get))
            .collect()
    }

    /// Median over rounds of sessiongate / peer, each round's pair measured
    /// back to back.
    fn ratio(&self, peer: System, get: fn(&Sample) -> f64) -> Option<f64> {
        let per_round: Vec<f64> = self
            .rounds
            .iter()
            .filter_map(|r| {
                let sg = get(r[System::Sessiongate.index()].as_ref()?);
                let p = get(r[peer.index()].as_ref()?);
                (p > 0.0 && sg.is_finite()).then(|| sg / p)
            })
            .collect();
        median(per_round)
    }
}

fn fmt_num(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "–".to_string(),
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.2}×"),
        _ => "–".to_string(),
    }
}

/// The call table (Markdown) and whether every call goal with data was met:
/// per scenario, packets lost over all rounds (sessiongate's must not
/// exceed wireguard-go's), and p99 one-way delay and jitter as medians of
/// the per-round ratios to wireguard-go (≤ 1.0×).
fn render_calls(res: &Results) -> (String, bool) {
    let mut out = String::new();
    let mut all_met = true;
    out.push_str(
        "| call | lost, all rounds (sg / wg-go / bt-cli) | one-way p50 ms | one-way p99 ms | p99 sg / wg-go | jitter ms | jitter sg / wg-go | bulk Mbit/s beside it | met (lost ≤ wg-go, p99 and jitter ≤ 1.0×) |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|---|\n",
    );
    for (i, scenario) in res.scenarios.iter().enumerate() {
        let values = |sys: System, get: fn(&CallSample) -> f64| -> Vec<f64> {
            res.rounds
                .iter()
                .filter_map(|r| r[sys.index()].as_ref()?.calls.get(i).map(get))
                .collect()
        };
        let triple = |get: fn(&CallSample) -> f64, decimals: usize, sum: bool| -> String {
            System::ALL
                .iter()
                .map(|&sys| {
                    let v = values(sys, get);
                    let agg = if sum {
                        (!v.is_empty()).then(|| v.iter().sum())
                    } else {
                        median(v)
                    };
                    fmt_num(agg, decimals)
                })
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let ratio = |get: fn(&CallSample) -> f64| -> Option<f64> {
            let sg = values(System::Sessiongate, get);
            let wg = values(System::WireguardGo, get);
            median(
                sg.iter()
                    .zip(&wg)
                    .filter(|(_, w)| **w > 0.0)
                    .map(|(s, w)| s / w)
                    .collect(),
            )
        };
        let lost_sg: f64 = values(System::Sessiongate, |c| c.lost).iter().sum();
        let lost_wg = values(System::WireguardGo, |c| c.lost);
        let (r_p99, r_jit) = (ratio(|c| c.p99_ms), ratio(|c| c.jitter_ms));
        let met = if !scenario.has_goal() {
            "(context)".to_string()
        } else if lost_wg.is_empty() || r_p99.is_none() || r_jit.is_none() {
            "n/a".to_string()
        } else {
            let lost_wg: f64 = lost_wg.iter().sum();
            let mut misses = Vec::new();
            if lost_sg > lost_wg {
                misses.push("loss");
            }
            if r_p99.is_some_and(|r| r > 1.0) {
                misses.push("p99");
            }
            if r_jit.is_some_and(|r| r > 1.0) {
                misses.push("jitter");
            }
            if misses.is_empty() {
                "yes".to_string()
            } else {
                all_met = false;
                format!("**no** ({})", misses.join(", "))
            }
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            scenario.label(),
            triple(|c| c.lost, 0, true),
            triple(|c| c.p50_ms, 2, false),
            triple(|c| c.p99_ms, 2, false),
            fmt_ratio(r_p99),
            triple(|c| c.jitter_ms, 3, false),
            fmt_ratio(r_jit),
            triple(|c| c.load_mbps, 0, false),
            met
        ));
    }
    (out, all_met)
}

/// The table (Markdown) and whether every goal with data was met.
fn render(res: &Results) -> (String, bool) {
    let mut out = String::new();
    let mut all_met = true;
    out.push_str(
        "| metric | sessiongate | wireguard-go | boringtun-cli | sg / wg-go | sg / bt-cli | goal | met |\n\
         |---|--:|--:|--:|--:|--:|---|---|\n",
    );
    for m in metrics() {
        let agg = |sys: System| -> Option<f64> {
            let v = res.values(sys, m.get);
            if m.worst {
                v.into_iter().reduce(f64::max)
            } else {
                median(v)
            }
        };
        let abs: Vec<String> = System::ALL.iter().map(|s| fmt_num(agg(*s), m.decimals)).collect();
        let r_wg = m.ratio.then(|| res.ratio(System::WireguardGo, m.get)).flatten();
        let r_bt = m.ratio.then(|| res.ratio(System::Boringtun, m.get)).flatten();
        let (goal, met) = match m.goal {
            Goal::None => (String::new(), String::new()),
            Goal::Ratio(wg, bt) => {
                let mut texts = Vec::new();
                let mut verdicts = Vec::new();
                for (bound, ratio, who) in [(wg, r_wg, "wg-go"), (bt, r_bt, "bt-cli")] {
                    let Some(bound) = bound else { continue };
                    texts.push(format!("{} {who}", bound.text("×")));
                    match ratio {
                        Some(r) if bound.holds(r) => verdicts.push(format!("yes ({who})")),
                        Some(_) => {
                            all_met = false;
                            verdicts.push(format!("**no** ({who})"));
                        }
                        None => verdicts.push(format!("n/a ({who})")),
                    }
                }
                (texts.join(", "), verdicts.join(", "))
            }
            Goal::Absolute(bound, unit) => {
                let verdict = match agg(System::Sessiongate) {
                    Some(v) if bound.holds(v) => "yes".to_string(),
                    Some(_) => {
                        all_met = false;
                        "**no**".to_string()
                    }
                    None => "n/a".to_string(),
                };
                (format!("sessiongate {}", bound.text(unit)), verdict)
            }
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            m.name,
            abs[0],
            abs[1],
            abs[2],
            fmt_ratio(r_wg),
            fmt_ratio(r_bt),
            goal,
            met
        ));
    }
    let idle_ok = res.sessiond_idle_rss < 20.0;
    all_met &= idle_ok;
    out.push_str(&format!(
        "| sessiond resident memory idle (MiB) | {:.1} | | | | | sessiongate < 20 MiB | {} |\n",
        res.sessiond_idle_rss,
        if idle_ok { "yes" } else { "**no**" }
    ));
    (out, all_met)
}

// ------------------------------------------------------------ iperf3

/// The iperf3 server on the lab host (restarted if a test wedged it).
struct IperfServer {
    child: LabChild,
}

impl IperfServer {
    fn start(lab: &Lab) -> Result<IperfServer> {
        let child = lab.spawn_named(
            Ns::Host,
            "iperf3-server",
            &["iperf3", "-s", "-B", addr::HOST_V4, "-p", IPERF_PORT],
        )?;
        lab::wait_until(Duration::from_secs(5), "the iperf3 server to listen", || {
            !child.is_running()
                || lab
                    .exec(Ns::Host, &["ss", "-Htln", "sport", "=", ":5201"])
                    .is_ok_and(|o| !o.stdout.is_empty())
        })?;
        if !child.is_running() {
            bail!("the iperf3 server exited: {}", child.log().trim());
        }
        Ok(IperfServer { child })
    }

    fn restart(&mut self, lab: &Lab) -> Result<()> {
        self.child.kill()?;
        *self = IperfServer::start(lab)?;
        Ok(())
    }
}

/// Starts an iperf3 client in the client namespace towards the lab host.
fn spawn_iperf(lab: &Lab, secs: u64, extra: &[&str]) -> Result<LabChild> {
    let t = secs.to_string();
    let mut args = vec![
        "iperf3",
        "-c",
        addr::HOST_V4,
        "-p",
        IPERF_PORT,
        "-t",
        &t,
        "-J",
        "--connect-timeout",
        "3000",
    ];
    args.extend_from_slice(extra);
    lab.spawn_named(Ns::Client, "iperf3-client", &args)
}

/// Waits for a spawned helper (killing it after `timeout`) and returns its log.
fn finish(child: &LabChild, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    while child.is_running() {
        if INTERRUPTED.load(Ordering::SeqCst) || Instant::now() >= deadline {
            child.kill()?;
            check_interrupted()?;
            bail!(
                "{} did not finish within {timeout:?}: {}",
                child.name(),
                child.log().trim()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = child.exit_status().context("exit status vanished")?;
    let log = child.log();
    if !status.success() {
        bail!("{} failed ({status}): {}", child.name(), log.trim());
    }
    Ok(log)
}

/// iperf3's JSON report out of its log (stdout and stderr share the file).
fn iperf_json(log: &str) -> Result<Value> {
    let start = log.find('{').context("iperf3 printed no JSON")?;
    let end = log.rfind('}').context("iperf3 printed no JSON")?;
    let v: Value = serde_json::from_str(&log[start..=end]).context("parsing iperf3's JSON")?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {err}");
    }
    Ok(v)
}

fn json_f64(v: &Value, path: &[&str]) -> Result<f64> {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(p)
            .with_context(|| format!("iperf3 JSON has no {}", path.join(".")))?;
    }
    cur.as_f64()
        .with_context(|| format!("iperf3 JSON {} is not a number", path.join(".")))
}

/// Runs one iperf3 test to the end; restarts the server and retries once if
/// it fails (a wedged server answers "busy" forever).
fn iperf_run(lab: &Lab, server: &mut IperfServer, secs: u64, extra: &[&str]) -> Result<Value> {
    let mut last = None;
    for _ in 0..2 {
        check_interrupted()?;
        let child = spawn_iperf(lab, secs, extra)?;
        match finish(&child, Duration::from_secs(secs + 20)).and_then(|log| iperf_json(&log)) {
            Ok(v) => return Ok(v),
            Err(e) => {
                check_interrupted()?;
                eprintln!(
                    "  iperf3 {} failed ({e:#}); restarting its server",
                    extra.join(" ")
                );
                server.restart(lab)?;
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("iperf3 did not run")))
}

// ------------------------------------------------------------ helpers run in the client namespace

/// Datagrams the gateway's kernel dropped because wireguard-go's socket
/// queue was full (`Udp: RcvbufErrors` in the gateway namespace): where a
/// client that sends faster than the gateway decrypts loses packets.
fn gateway_udp_drops(lab: &Lab) -> Result<u64> {
    let snmp = lab.exec_ok(Ns::Gateway, &["cat", "/proc/net/snmp"])?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        bail!("the gateway's /proc/net/snmp has no Udp lines");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .context("the gateway's /proc/net/snmp has no Udp RcvbufErrors")
}

/// Packets the client's tunnel interface dropped on the way to the tunnel
/// process (TX dropped: its queue was full while the process was busy).
fn tun_tx_dropped(lab: &Lab, ifname: &str) -> Result<u64> {
    let path = format!("/sys/class/net/{ifname}/statistics/tx_dropped");
    let text = lab.exec_ok(Ns::Client, &["cat", &path])?;
    text.trim()
        .parse()
        .with_context(|| format!("{path} is not a number: {text}"))
}

/// `udp-ping ADDR PORT COUNT INTERVAL_MS`: one datagram every interval to
/// labhost's echo, prints JSON {"rtt_us": [...], "lost": N, "peer": "..."}.
fn udp_ping(args: &[String]) -> Result<()> {
    let [a, port, count, interval] = args else {
        bail!("usage: bench udp-ping ADDR PORT COUNT INTERVAL_MS");
    };
    let target: SocketAddr = format!("{a}:{port}").parse().context("udp-ping: bad address")?;
    let count: u32 = count.parse().context("udp-ping: bad COUNT")?;
    let interval = Duration::from_millis(interval.parse().context("udp-ping: bad INTERVAL_MS")?);
    let sock = UdpSocket::bind("0.0.0.0:0").context("udp-ping: bind")?;
    sock.connect(target).context("udp-ping: connect")?;
    // Pings leave on a fixed schedule, like a call's media, whatever happens
    // to earlier ones: a lost reply must not push the later pings out of
    // the window they are meant to measure.
    let sender = sock.try_clone().context("udp-ping: clone")?;
    let start = Instant::now();
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; count as usize]));
    let send_log = sent_at.clone();
    let send_thread = std::thread::spawn(move || -> Result<()> {
        for i in 0..count {
            let due = start + interval * i;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let at = Instant::now();
            if let Ok(mut log) = send_log.lock() {
                log[i as usize] = Some(at);
            }
            // ICMP errors from an earlier ping can surface here; the ping
            // then counts as lost.
            let _ = sender.send(format!("bench-ping {i} ").as_bytes());
        }
        Ok(())
    });
    let mut rtts: Vec<Option<Duration>> = vec![None; count as usize];
    let mut peer = String::new();
    let mut buf = [0u8; 2048];
    let deadline = start + interval * count + PING_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left)).context("udp-ping: timeout")?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(_) => continue,
        };
        let now = Instant::now();
        let reply = String::from_utf8_lossy(&buf[..n]);
        // labhost answers `peer=IP bench-ping SEQ `.
        let mut words = reply.split_whitespace();
        let from = words.next().and_then(|w| w.strip_prefix("peer=")).unwrap_or("");
        let seq = match (words.next(), words.next().and_then(|w| w.parse::<usize>().ok())) {
            (Some("bench-ping"), Some(seq)) if seq < rtts.len() => seq,
            _ => continue,
        };
        let sent = sent_at.lock().ok().and_then(|log| log[seq]);
        if let Some(sent) = sent {
            let rtt = now.duration_since(sent);
            if rtt <= PING_TIMEOUT && rtts[seq].is_none() {
                rtts[seq] = Some(rtt);
                if peer.is_empty() {
                    peer = from.to_string();
                }
            }
        }
    }
    send_thread
        .join()
        .map_err(|_| anyhow::anyhow!("udp-ping: the sender panicked"))??;
    let lost = rtts.iter().filter(|r| r.is_none()).count();
    let rtts: Vec<u64> = rtts.iter().flatten().map(|d| d.as_micros() as u64).collect();
    println!(
        "{}",
        serde_json::json!({ "rtt_us": rtts, "lost": lost, "peer": peer })
    );
    Ok(())
}

/// `first-packet ADDR PORT EXPECT_PEER TIMEOUT_MS`: prints `ready`, then
/// opens a TCP connection to labhost every 2 ms (each in its own thread, so
/// one stuck attempt delays nothing) until one is answered with
/// `peer=EXPECT_PEER`, i.e. came through the tunnel and the gateway's NAT;
/// prints `first_unix_ns=N`, the wall-clock time that connection was
/// established (comparable with the parent's clock).
fn first_packet(args: &[String]) -> Result<()> {
    let [a, port, expect, timeout] = args else {
        bail!("usage: bench first-packet ADDR PORT EXPECT_PEER TIMEOUT_MS");
    };
    let target: SocketAddr = format!("{a}:{port}")
        .parse()
        .context("first-packet: bad address")?;
    let expect = format!("peer={expect}");
    let timeout = Duration::from_millis(timeout.parse().context("first-packet: bad TIMEOUT_MS")?);
    let (tx, rx) = mpsc::channel::<u128>();
    let inflight = Arc::new(AtomicUsize::new(0));
    let expect = Arc::new(expect);
    println!("ready");
    std::io::stdout().flush().context("first-packet: stdout")?;
    let start = Instant::now();
    loop {
        if start.elapsed() > timeout {
            bail!("no connection through the tunnel within {timeout:?}");
        }
        if inflight.load(Ordering::SeqCst) < 256 {
            inflight.fetch_add(1, Ordering::SeqCst);
            let (tx, inflight, expect) = (tx.clone(), inflight.clone(), expect.clone());
            std::thread::spawn(move || {
                let attempt = || -> Option<u128> {
                    let mut s = TcpStream::connect_timeout(&target, Duration::from_millis(500)).ok()?;
                    let at = unix_ns();
                    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
                    let mut text = String::new();
                    s.read_to_string(&mut text).ok()?;
                    text.trim().eq(expect.as_str()).then_some(at)
                };
                if let Some(at) = attempt() {
                    let _ = tx.send(at);
                }
                inflight.fetch_sub(1, Ordering::SeqCst);
            });
        }
        if let Ok(first) = rx.recv_timeout(Duration::from_millis(2)) {
            // Attempts finish out of order: take the earliest of those that
            // complete shortly after the first.
            let mut best = first;
            let until = Instant::now() + Duration::from_millis(30);
            while let Ok(t) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                best = best.min(t);
            }
            println!("first_unix_ns={best}");
            return Ok(());
        }
    }
}

/// Starts `first-packet` in the client namespace and waits until it runs.
fn start_poller(lab: &Lab, me: &str) -> Result<LabChild> {
    let child = lab.spawn_named(
        Ns::Client,
        "first-packet",
        &[
            me,
            "first-packet",
            addr::HOST_V4,
            PROBE_TCP_PORT,
            addr::GATEWAY_V4,
            "20000",
        ],
    )?;
    lab::wait_until(Duration::from_secs(5), "the first-packet poller to start", || {
        !child.is_running() || child.log().contains("ready")
    })?;
    if !child.is_running() && !child.log().contains("first_unix_ns=") {
        bail!("the first-packet poller exited: {}", child.log().trim());
    }
    Ok(child)
}

/// Milliseconds from `t0_ns` to the poller's first tunnelled connection.
fn poller_result(poller: &LabChild, t0_ns: u128) -> Result<f64> {
    let log = finish(poller, Duration::from_secs(25))?;
    let first: u128 = log
        .lines()
        .find_map(|l| l.strip_prefix("first_unix_ns="))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("first-packet printed no time: {}", log.trim()))?;
    Ok(first.saturating_sub(t0_ns) as f64 / 1e6)
}

struct PingStats {
    p50_ms: f64,
    p99_ms: f64,
    lost: u64,
}

fn run_pings(lab: &Lab, me: &str, cfg: &Config) -> Result<PingStats> {
    let count = cfg.pings.to_string();
    let interval = cfg.ping_interval_ms.to_string();
    let child = lab.spawn_named(
        Ns::Client,
        "udp-ping",
        &[me, "udp-ping", addr::HOST_V4, ECHO_UDP_PORT, &count, &interval],
    )?;
    let log = finish(&child, Duration::from_secs(cfg.ping_secs() + 15))?;
    let line = log
        .lines()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("udp-ping printed no result: {}", log.trim()))?;
    let v: Value = serde_json::from_str(line).context("parsing udp-ping's output")?;
    let peer = v["peer"].as_str().unwrap_or("");
    if peer != addr::GATEWAY_V4 {
        bail!(
            "pings were answered as from `{peer}`, not the gateway {}: not through the tunnel",
            addr::GATEWAY_V4
        );
    }
    let lost = v["lost"].as_u64().unwrap_or(0);
    let mut ms: Vec<f64> = v["rtt_us"]
        .as_array()
        .context("udp-ping: no rtt_us")?
        .iter()
        .filter_map(Value::as_f64)
        .map(|us| us / 1000.0)
        .collect();
    // A lost ping counts as the timeout.
    ms.extend(std::iter::repeat_n(
        PING_TIMEOUT.as_secs_f64() * 1000.0,
        lost as usize,
    ));
    ms.sort_by(f64::total_cmp);
    Ok(PingStats {
        p50_ms: percentile(&ms, 50.0),
        p99_ms: percentile(&ms, 99.0),
        lost,
    })
}

// ------------------------------------------------------------ systems

/// A system that is up in the client namespace.
struct Up {
    /// The process that moves the tunnel's packets.
    pid: u32,
    /// Its tunnel interface in the client namespace.
    ifname: String,
    /// How it goes down again.
    kind: UpKind,
}

enum UpKind {
    Session,
    Userspace { child: LabChild, ifname: String },
}

/// Removes the comparison clients' UAPI sockets (in /var/run/wireguard,
/// shared by all namespaces) however the run ends.
struct SocketCleanup {
    paths: Mutex<Vec<PathBuf>>,
}

impl SocketCleanup {
    fn add(&self, ifname: &str) {
        if let Ok(mut p) = self.paths.lock() {
            p.push(lab::lab::wg_socket_path(ifname));
        }
    }
}

impl Drop for SocketCleanup {
    fn drop(&mut self) {
        let paths = match self.paths.lock() {
            Ok(p) => p.clone(),
            Err(e) => e.into_inner().clone(),
        };
        for p in paths {
            if p.exists() {
                if let Err(e) = std::fs::remove_file(&p) {
                    eprintln!("bench: removing {}: {e}", p.display());
                }
            }
        }
    }
}

struct Bench<'a> {
    lab: &'a Lab,
    cfg: Config,
    me: String,
    ticks: f64,
    daemon: Daemon<'a>,
    iperf: IperfServer,
    keys: [Option<PathBuf>; 3],
    sockets: SocketCleanup,
    /// The leak meter's report for each sessiongate round that leaked.
    leak_reports: Vec<String>,
}

impl Bench<'_> {
    /// Brings `sys` up; returns it and (first-packet ms, setup-command ms).
    fn up(&mut self, sys: System, round: usize) -> Result<(Up, f64, f64)> {
        match sys {
            System::Sessiongate => {
                let poller = start_poller(self.lab, &self.me)?;
                let t0 = unix_ns();
                let clock = Instant::now();
                let out = self.daemon.ctl(&["start", "bench"]);
                let cmd_ms = clock.elapsed().as_secs_f64() * 1000.0;
                match out {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => {
                        poller.kill()?;
                        bail!(
                            "sessionctl start bench failed ({}): {}\nsessiond log:\n{}",
                            o.status,
                            String::from_utf8_lossy(&o.stderr).trim(),
                            self.daemon.log()
                        );
                    }
                    Err(e) => {
                        poller.kill()?;
                        return Err(e);
                    }
                }
                let first = poller_result(&poller, t0)?;
                if let Some(qdisc) = &self.cfg.tun_qdisc {
                    let mut args = vec!["tc", "qdisc", "replace", "dev", lab::DAEMON_TUN_IF, "root"];
                    args.extend(qdisc.split_whitespace());
                    self.lab
                        .exec_ok(Ns::Client, &args)
                        .with_context(|| format!("putting {qdisc} on sessiond's tunnel interface"))?;
                }
                let pid = self.daemon.pid().context("sessiond has no pid")?;
                Ok((
                    Up {
                        pid,
                        ifname: lab::DAEMON_TUN_IF.to_string(),
                        kind: UpKind::Session,
                    },
                    first,
                    cmd_ms,
                ))
            }
            System::WireguardGo | System::Boringtun => self.up_userspace(sys, round),
        }
    }

    /// wg-quick's full tunnel, step by step: create the interface (start
    /// the userspace process), configure it with `wg`, address, MTU and up,
    /// default route in table 51820 with wg-quick's two policy rules.
    fn up_userspace(&mut self, sys: System, round: usize) -> Result<(Up, f64, f64)> {
        let lab = self.lab;
        let (prefix, tun_addr) = match sys {
            System::WireguardGo => ("bg", WG_GO_TUN_V4),
            _ => ("bb", BORINGTUN_TUN_V4),
        };
        let ifname = format!("{prefix}{}{round}", lab.id());
        let key = self.keys[sys.index()]
            .clone()
            .context("no key for this system")?
            .to_string_lossy()
            .into_owned();
        // wg-quick sets this only when it is not already 1 (untimed here).
        lab.exec_ok(
            Ns::Client,
            &["sysctl", "-q", "-w", "net.ipv4.conf.all.src_valid_mark=1"],
        )?;
        self.sockets.add(&ifname);
        let sock = lab::lab::wg_socket_path(&ifname);
        let poller = start_poller(lab, &self.me)?;
        let t0 = unix_ns();
        let clock = Instant::now();
        let child = match sys {
            System::WireguardGo => lab.spawn_env(
                Ns::Client,
                &format!("wireguard-go-{ifname}"),
                &["wireguard-go", &ifname],
                &[("WG_PROCESS_FOREGROUND", "1"), ("LOG_LEVEL", "error")],
            )?,
            _ => {
                let bin = self
                    .cfg
                    .boringtun
                    .as_ref()
                    .context("boringtun-cli path unknown")?
                    .to_string_lossy()
                    .into_owned();
                lab.spawn_named(
                    Ns::Client,
                    &format!("boringtun-{ifname}"),
                    &[
                        &bin,
                        &ifname,
                        "--foreground",
                        "--disable-connected-udp",
                        "--disable-drop-privileges",
                        "--verbosity",
                        "error",
                    ],
                )?
            }
        };
        let result = (|| -> Result<()> {
            lab::wait_until(
                Duration::from_secs(10),
                &format!("{ifname}'s UAPI socket"),
                || sock.exists() || !child.is_running(),
            )?;
            let gw = lab.gateway_public_key().to_string();
            let wg_set = [
                "wg",
                "set",
                &ifname,
                "private-key",
                &key,
                "fwmark",
                WGQ_TABLE,
                "peer",
                &gw,
                "endpoint",
                addr::GATEWAY_ENDPOINT,
                "allowed-ips",
                "0.0.0.0/0",
            ];
            // The socket file can appear a moment before it accepts.
            lab::wait_for(Duration::from_secs(5), &format!("`wg set {ifname}`"), || {
                if !child.is_running() {
                    bail!("{} exited: {}", child.name(), child.log().trim());
                }
                lab.exec_ok(Ns::Client, &wg_set)
            })?;
            lab.ip_batch(
                Ns::Client,
                &[
                    format!("addr add {tun_addr}/32 dev {ifname}"),
                    format!("link set mtu {MTU} up dev {ifname}"),
                    format!("route add 0.0.0.0/0 dev {ifname} table {WGQ_TABLE}"),
                    format!("rule add not fwmark {WGQ_TABLE} table {WGQ_TABLE}"),
                    "rule add table main suppress_prefixlength 0".to_string(),
                ],
            )?;
            Ok(())
        })();
        let cmd_ms = clock.elapsed().as_secs_f64() * 1000.0;
        let up = Up {
            pid: child.pid(),
            ifname: ifname.clone(),
            kind: UpKind::Userspace {
                child: child.clone(),
                ifname: ifname.clone(),
            },
        };
        if let Err(e) = result {
            let _ = poller.kill();
            let _ = self.down(up);
            return Err(e.context(format!("bringing up {}", sys.label())));
        }
        let first = match poller_result(&poller, t0) {
            Ok(f) => f,
            Err(e) => {
                let _ = self.down(up);
                return Err(e.context(format!("{} carried no connection", sys.label())));
            }
        };
        let comm = match sys {
            System::WireguardGo => "wireguard-go",
            _ => "boringtun-cli",
        };
        check_comm(up.pid, comm)?;
        Ok((up, first, cmd_ms))
    }

    /// Takes a system down and leaves the client namespace as it was.
    fn down(&mut self, up: Up) -> Result<()> {
        match up.kind {
            UpKind::Session => {
                self.daemon.ctl_ok(&["stop"])?;
            }
            UpKind::Userspace { child, ifname } => {
                let lab = self.lab;
                for rule in [
                    format!("not fwmark {WGQ_TABLE} table {WGQ_TABLE}"),
                    "table main suppress_prefixlength 0".to_string(),
                ] {
                    let mut args = vec!["ip", "rule", "del"];
                    args.extend(rule.split(' '));
                    let _ = lab.exec(Ns::Client, &args);
                }
                child.kill()?;
                let sock = lab::lab::wg_socket_path(&ifname);
                if sock.exists() {
                    std::fs::remove_file(&sock).with_context(|| format!("removing {}", sock.display()))?;
                }
                lab::wait_until(Duration::from_secs(5), &format!("{ifname} to disappear"), || {
                    lab.exec(Ns::Client, &["ip", "link", "show", "dev", &ifname])
                        .is_ok_and(|o| !o.status.success())
                })?;
            }
        }
        Ok(())
    }

    /// Everything measured while `up` carries the traffic.
    fn measure(&mut self, sys: System, up: &Up, sample: &mut Sample) -> Result<()> {
        let lab = self.lab;
        let secs = self.cfg.secs;
        lab.reset_leaks()?;
        if self.cfg.start_only {
            sample.rss_mib = rss_mib(up.pid)?;
            print_smaps(sys, up.pid);
            return Ok(());
        }
        if self.cfg.call_only {
            self.measure_calls(&up.ifname, sample)?;
            sample.rss_mib = rss_mib(up.pid)?;
            print_smaps(sys, up.pid);
            sample.leaks = lab.leaks()? as f64;
            if sys == System::Sessiongate && sample.leaks > 0.0 {
                self.leak_reports.push(lab.leak_report());
            }
            return Ok(());
        }

        // (a) + (c) TCP both ways, CPU of the tunnel process over both; for
        // context also the gateway's wireguard-go and the whole machine.
        let gw_pid = lab.gateway_process().context("the gateway is not running")?.pid();
        let g0 = cpu_ticks(gw_pid)?;
        let m0 = machine_ticks()?;
        let clock = Instant::now();
        let c0 = cpu_ticks(up.pid)?;
        let v = iperf_run(lab, &mut self.iperf, secs, &[])?;
        let up_bytes = json_f64(&v, &["end", "sum_received", "bytes"])?;
        sample.up_mbps = json_f64(&v, &["end", "sum_received", "bits_per_second"])? / 1e6;
        let v = iperf_run(lab, &mut self.iperf, secs, &["-R"])?;
        let down_bytes = json_f64(&v, &["end", "sum_received", "bytes"])?;
        sample.down_mbps = json_f64(&v, &["end", "sum_received", "bits_per_second"])? / 1e6;
        let c1 = cpu_ticks(up.pid)?;
        let wall = clock.elapsed().as_secs_f64();
        let (m1, g1) = (machine_ticks()?, cpu_ticks(gw_pid)?);
        sample.tcp_cpu_pct = (c1 - c0) as f64 / self.ticks / wall * 100.0;
        sample.gateway_cpu_pct = (g1 - g0) as f64 / self.ticks / wall * 100.0;
        sample.machine_busy_pct = m1.busy_pct_since(&m0);
        let gb = (up_bytes + down_bytes) / 1e9;
        sample.cpu_s_per_gb = if gb > 0.0 {
            (c1 - c0) as f64 / self.ticks / gb
        } else {
            f64::NAN
        };
        sample.rss_mib = rss_mib(up.pid)?;

        // Scaling: the upload again with every thread of the tunnel
        // process on CPU 0 (taskset), then back on all CPUs.
        let pid = up.pid.to_string();
        let all_cpus = format!(
            "0-{}",
            std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
        );
        lab::util::run(&["taskset", "-a", "-p", "-c", "0", &pid]).context("pinning the tunnel process")?;
        let c0 = cpu_ticks(up.pid)?;
        let pinned = iperf_run(lab, &mut self.iperf, secs, &[]);
        let c1 = cpu_ticks(up.pid)?;
        lab::util::run(&["taskset", "-a", "-p", "-c", &all_cpus, &pid])
            .context("unpinning the tunnel process")?;
        let v = pinned?;
        sample.up_1core_mbps = json_f64(&v, &["end", "sum_received", "bits_per_second"])? / 1e6;
        let gb = json_f64(&v, &["end", "sum_received", "bytes"])? / 1e9;
        sample.cpu_s_per_gb_1core = if gb > 0.0 {
            (c1 - c0) as f64 / self.ticks / gb
        } else {
            f64::NAN
        };

        // (c) a video call's steady UDP stream.
        let c0 = cpu_ticks(up.pid)?;
        let clock = Instant::now();
        let rate = self.cfg.udp_rate.clone();
        let v = iperf_run(lab, &mut self.iperf, secs, &["-u", "-b", &rate, "-l", "1200"])?;
        let wall = clock.elapsed().as_secs_f64();
        let c1 = cpu_ticks(up.pid)?;
        sample.udp_cpu_pct = (c1 - c0) as f64 / self.ticks / wall * 100.0;
        sample.udp_loss_pct = json_f64(&v, &["end", "sum", "lost_percent"]).unwrap_or(f64::NAN);

        // (b) round trips, idle and under a bulk upload.
        let idle = run_pings(lab, &self.me, &self.cfg)?;
        sample.idle_p50_ms = idle.p50_ms;
        sample.idle_p99_ms = idle.p99_ms;
        let (loaded, bulk_mbps, gateway_drops) = self.pings_under_upload(lab)?;
        sample.gateway_drops = gateway_drops as f64;
        sample.load_p50_ms = loaded.p50_ms;
        sample.load_p99_ms = loaded.p99_ms;
        sample.pings_lost = (idle.lost + loaded.lost) as f64;
        sample.load_mbps = bulk_mbps;
        sample.rss_mib = sample.rss_mib.max(rss_mib(up.pid)?);
        print_smaps(sys, up.pid);

        // (b) again with the bottleneck where it is in real use: the uplink.
        // The client's link to the router is shaped (a token bucket in front
        // of the client's interface, like a slow Wi-Fi or DSL uplink), so
        // the queue forms there for every client instead of in the gateway's
        // socket; replies come back unshaped.
        let shaped = self.shaped_pings(lab);
        let cleared = lab.exec(
            Ns::Client,
            &["tc", "qdisc", "del", "dev", addr::CLIENT_IF, "root"],
        );
        let shaped = shaped?;
        cleared?;
        sample.uplink_p50_ms = shaped.p50_ms;
        sample.uplink_p99_ms = shaped.p99_ms;
        sample.uplink_lost = shaped.lost as f64;

        self.measure_calls(&up.ifname, sample)?;

        sample.leaks = lab.leaks()? as f64;
        if sys == System::Sessiongate && sample.leaks > 0.0 {
            self.leak_reports.push(lab.leak_report());
        }
        Ok(())
    }

    /// Every call scenario, in order; the shaping goes after each.
    fn measure_calls(&mut self, ifname: &str, sample: &mut Sample) -> Result<()> {
        let lab = self.lab;
        for (i, scenario) in self.cfg.call_scenarios().into_iter().enumerate() {
            check_interrupted()?;
            if let Some(rate) = &scenario.link {
                // The uplink a home router gives: a token bucket on the
                // router's way towards the gateway, so the queue forms
                // there, outside the client, for every system alike.
                let shape = format!(
                    "tc qdisc replace dev {} root tbf rate {rate} burst 16kb latency 50ms",
                    addr::ROUTER_GATEWAY_IF
                );
                lab.exec_ok(Ns::Router, &shape.split_whitespace().collect::<Vec<_>>())
                    .context("shaping the router's uplink with tc")?;
            }
            let (gw0, tun0) = (gateway_udp_drops(lab)?, tun_tx_dropped(lab, ifname)?);
            let result = self.one_call(&scenario, i as u32);
            let (gw1, tun1) = (gateway_udp_drops(lab)?, tun_tx_dropped(lab, ifname)?);
            if scenario.link.is_some() {
                lab.exec_ok(
                    Ns::Router,
                    &["tc", "qdisc", "del", "dev", addr::ROUTER_GATEWAY_IF, "root"],
                )
                .context("removing the uplink's shaping")?;
            }
            let mut call = result.with_context(|| format!("the call on the {}", scenario.label()))?;
            call.gateway_drops = gw1.saturating_sub(gw0) as f64;
            call.tun_drops = tun1.saturating_sub(tun0) as f64;
            sample.calls.push(call);
        }
        Ok(())
    }

    /// One call, with its load beside it (the load starts 1 s before the
    /// call and ends 1 s after it).
    fn one_call(&mut self, scenario: &Scenario, index: u32) -> Result<CallSample> {
        let lab = self.lab;
        let secs = self.cfg.call_secs;
        let run = (std::process::id() << 8) ^ (index + 1) ^ (unix_ns() as u32 & 0xffff_0000);
        let bulk = match scenario.load {
            Load::Alone => None,
            Load::Upload => Some(spawn_iperf(lab, secs + 2, &[])?),
            Load::Download => Some(spawn_iperf(lab, secs + 2, &["-R"])?),
        };
        if bulk.is_some() {
            sleep(Duration::from_secs(1))?;
        }
        let call = lab::callflow::run_in_lab(lab, &self.me, secs, run);
        let load_mbps = match bulk {
            None => f64::NAN,
            Some(bulk) => match finish(&bulk, Duration::from_secs(secs + 25))
                .and_then(|log| iperf_json(&log))
                .and_then(|v| json_f64(&v, &["end", "sum_received", "bits_per_second"]))
            {
                Ok(bps) => bps / 1e6,
                Err(e) => {
                    check_interrupted()?;
                    eprintln!(
                        "  the bulk transfer beside the call failed ({e:#}); restarting iperf3's server"
                    );
                    self.iperf.restart(lab)?;
                    f64::NAN
                }
            },
        };
        let call = call?;
        Ok(CallSample {
            lost: f64::from(call.lost()),
            p50_ms: call.p50_ms,
            p99_ms: call.p99_ms,
            jitter_ms: call.jitter_ms(),
            load_mbps,
            gateway_drops: 0.0,
            tun_drops: 0.0,
        })
    }

    /// Pings under a bulk upload while the uplink is shaped to
    /// BENCH_UPLINK_RATE; the caller removes the shaping.
    fn shaped_pings(&mut self, lab: &Lab) -> Result<PingStats> {
        let shape = format!(
            "tc qdisc replace dev {} root tbf rate {} burst 64kb latency 50ms",
            addr::CLIENT_IF,
            self.cfg.uplink_rate
        );
        lab.exec_ok(Ns::Client, &shape.split_whitespace().collect::<Vec<_>>())
            .context("shaping the lab's uplink with tc")?;
        Ok(self.pings_under_upload(lab)?.0)
    }

    /// A ping run while a bulk upload goes on (it starts 1 s before the
    /// pings and ends 1 s after them); the upload's rate in Mbit/s (NaN if
    /// it failed; iperf3's server is then restarted); and the datagrams the
    /// gateway dropped while the pings ran.
    fn pings_under_upload(&mut self, lab: &Lab) -> Result<(PingStats, f64, u64)> {
        let bulk = spawn_iperf(lab, self.cfg.ping_secs() + 2, &[])?;
        sleep(Duration::from_secs(1))?;
        let drops_before = gateway_udp_drops(lab)?;
        let pings = run_pings(lab, &self.me, &self.cfg);
        let drops = gateway_udp_drops(lab)?.saturating_sub(drops_before);
        let bulk_result = finish(&bulk, Duration::from_secs(self.cfg.ping_secs() + 25))
            .and_then(|log| iperf_json(&log))
            .and_then(|v| json_f64(&v, &["end", "sum_received", "bits_per_second"]));
        let pings = pings?;
        let mbps = match bulk_result {
            Ok(bps) => bps / 1e6,
            Err(e) => {
                check_interrupted()?;
                eprintln!("  the bulk upload under the pings failed ({e:#}); restarting iperf3's server");
                self.iperf.restart(lab)?;
                f64::NAN
            }
        };
        Ok((pings, mbps, drops))
    }

    fn round(&mut self, round: usize) -> Result<[Option<Sample>; 3]> {
        let mut out: [Option<Sample>; 3] = [None, None, None];
        let n = self.cfg.systems.len();
        // Rotate the order so no system always runs first (or right after
        // another one's load).
        let order: Vec<System> = (0..n).map(|i| self.cfg.systems[(i + round) % n]).collect();
        for sys in order {
            check_interrupted()?;
            let (up, first_ms, cmd_ms) = self.up(sys, round)?;
            let mut sample = Sample {
                first_packet_ms: first_ms,
                up_cmd_ms: cmd_ms,
                ..Sample::default()
            };
            let measured = self.measure(sys, &up, &mut sample);
            let down = self.down(up);
            measured.with_context(|| format!("measuring {} (round {})", sys.label(), round + 1))?;
            down.with_context(|| format!("taking {} down", sys.label()))?;
            eprintln!(
                "[round {}/{}] {:<13} up {:>6.0} down {:>6.0} Mbit/s | {:>5.2} CPU s/GB | udp {:>4.1}% CPU \
                 | rtt idle {:.2}/{:.2} load {:.2}/{:.2} ms, {} lost, gateway dropped {} | shaped uplink {:.2}/{:.2} ms, {} lost | first packet {:>6.1} ms | rss {:.1} MiB | leaks {}",
                round + 1,
                self.cfg.rounds,
                sys.label(),
                sample.up_mbps,
                sample.down_mbps,
                sample.cpu_s_per_gb,
                sample.udp_cpu_pct,
                sample.idle_p50_ms,
                sample.idle_p99_ms,
                sample.load_p50_ms,
                sample.load_p99_ms,
                sample.pings_lost,
                sample.gateway_drops,
                sample.uplink_p50_ms,
                sample.uplink_p99_ms,
                sample.uplink_lost,
                sample.first_packet_ms,
                sample.rss_mib,
                sample.leaks
            );
            for (scenario, call) in self.cfg.call_scenarios().iter().zip(&sample.calls) {
                eprintln!(
                    "    call, {:<34} lost {:>3} | one-way p50 {:>6.2} p99 {:>7.2} ms | jitter {:>5.2} ms | load {:>5.0} Mbit/s | dropped: gateway {:>5}, tun {:>5}",
                    scenario.label(),
                    call.lost,
                    call.p50_ms,
                    call.p99_ms,
                    call.jitter_ms,
                    call.load_mbps,
                    call.gateway_drops,
                    call.tun_drops
                );
            }
            out[sys.index()] = Some(sample);
        }
        Ok(out)
    }

    /// BENCH_PROFILE=1: where sessiond's time goes. (1) `strace -f` on
    /// sessiond across `sessionctl start`: each program it runs and each
    /// fsync, with their durations; (2) `perf record` during a TCP upload:
    /// the top symbols by self time; (3) `strace -c` during an upload: the
    /// syscalls per packet. strace slows the traced process: read (1) and (3)
    /// for shares and counts, not for absolute times.
    fn profile(&mut self) -> Result<String> {
        let mut report = String::new();
        let have = |tool: &str| lab::util::output(&[tool, "--version"]).is_ok();
        let pid = self.daemon.pid().context("sessiond has no pid")?.to_string();
        let dir = self.lab.tmp_dir().to_path_buf();

        // (1) start, traced.
        if have("strace") {
            let out = dir.join("start.strace").to_string_lossy().into_owned();
            // BENCH_STRACE_COPY=PATH: every syscall, the raw trace copied
            // to PATH, for a full timeline of the start.
            let copy_to = std::env::var_os("BENCH_STRACE_COPY").map(PathBuf::from);
            let mut cmd = vec!["strace", "-f", "-tt", "-T"];
            if copy_to.is_none() {
                cmd.extend(["-e", "trace=execve,fsync,fdatasync"]);
            }
            cmd.extend(["-o", &out, "-p", &pid]);
            let strace = self.lab.spawn_named(Ns::Client, "strace-start", &cmd)?;
            lab::wait_until(Duration::from_secs(5), "strace to attach", || {
                !strace.is_running() || strace.log().contains("attached")
            })?;
            let up = self.up(System::Sessiongate, self.cfg.rounds);
            strace.signal(nix::sys::signal::Signal::SIGTERM)?;
            let _ = strace.wait_exit(Duration::from_secs(5));
            let (up, first_ms, cmd_ms) = up?;
            self.down(up)?;
            if let Some(copy_to) = copy_to {
                std::fs::copy(&out, &copy_to)
                    .with_context(|| format!("copying the trace to {}", copy_to.display()))?;
            }
            report.push_str(&format!(
                "`sessionctl start` under strace: returned after {cmd_ms:.1} ms, first packet after \
                 {first_ms:.1} ms. What sessiond waited for (ms from its first traced event):\n"
            ));
            report.push_str(&summarize_strace(
                &std::fs::read_to_string(&out).unwrap_or_default(),
            ));
        } else {
            report.push_str("strace is not installed: no timeline of `sessionctl start`.\n");
        }
        if self.cfg.start_only {
            return Ok(report);
        }

        let (up, _, _) = self.up(System::Sessiongate, self.cfg.rounds + 1)?;
        let secs = self.cfg.secs.max(3);
        let run = (|| -> Result<()> {
            // (2) perf, during an upload.
            if have("perf") {
                let data = dir.join("perf.data").to_string_lossy().into_owned();
                let bulk = spawn_iperf(self.lab, secs + 1, &[])?;
                sleep(Duration::from_millis(500))?;
                let split0 = user_system_ticks(up.pid)?;
                let dur = secs.to_string();
                let perf = self.lab.spawn_named(
                    Ns::Client,
                    "perf",
                    &[
                        "perf",
                        "record",
                        "-q",
                        "-e",
                        "cpu-clock",
                        "-F",
                        "999",
                        "-g",
                        "-p",
                        &pid,
                        "-o",
                        &data,
                        "--",
                        "sleep",
                        &dur,
                    ],
                )?;
                finish(&perf, Duration::from_secs(secs + 30))?;
                let split1 = user_system_ticks(up.pid)?;
                let _ = finish(&bulk, Duration::from_secs(secs + 20));
                let (user, system) = (split1.0 - split0.0, split1.1 - split0.1);
                report.push_str(&format!(
                    "\nsessiond's CPU during the profiled upload: {:.0} % in user space, {:.0} % in the kernel.\n",
                    user as f64 * 100.0 / (user + system).max(1) as f64,
                    system as f64 * 100.0 / (user + system).max(1) as f64
                ));
                let report_of = |extra: &[&str]| -> Result<Vec<String>> {
                    let mut args = vec!["perf", "report", "-i", &data, "--stdio"];
                    args.extend_from_slice(extra);
                    Ok(lab::util::run(&args)?
                        .lines()
                        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                        .map(|l| l.trim_end().to_string())
                        .collect())
                };
                report.push_str("\nperf, sessiond during a TCP upload, self time by symbol:\n");
                for l in report_of(&[
                    "--no-children",
                    "--sort",
                    "dso,symbol",
                    "-g",
                    "none",
                    "--percent-limit",
                    "0.7",
                ])?
                .iter()
                .take(25)
                {
                    report.push_str(l);
                    report.push('\n');
                }
                report.push_str("\nperf, the same samples, time including callees (kernel paths):\n");
                for l in report_of(&[
                    "--children",
                    "--sort",
                    "symbol",
                    "-g",
                    "none",
                    "--percent-limit",
                    "3",
                ])?
                .iter()
                .take(40)
                {
                    report.push_str(l);
                    report.push('\n');
                }
            } else {
                report.push_str("\nperf is not installed (Debian: linux-perf): no profile.\n");
            }
            // (3) syscalls per packet, during another upload.
            if have("strace") {
                let out = dir.join("upload.strace").to_string_lossy().into_owned();
                let bulk = spawn_iperf(self.lab, 4, &[])?;
                sleep(Duration::from_millis(500))?;
                let strace = self.lab.spawn_named(
                    Ns::Client,
                    "strace-count",
                    &["strace", "-f", "-c", "-o", &out, "-p", &pid],
                )?;
                sleep(Duration::from_secs(2))?;
                strace.signal(nix::sys::signal::Signal::SIGTERM)?;
                let _ = strace.wait_exit(Duration::from_secs(5));
                let _ = finish(&bulk, Duration::from_secs(30));
                report.push_str("\nstrace -c, sessiond during 2 s of a TCP upload (slowed by strace):\n");
                for l in std::fs::read_to_string(&out).unwrap_or_default().lines().take(14) {
                    report.push_str(l);
                    report.push('\n');
                }
            }
            Ok(())
        })();
        self.down(up)?;
        run?;
        Ok(report)
    }
}

/// Seconds of the day from strace's `-tt` time (`HH:MM:SS.micro`).
fn strace_time(s: &str) -> Option<f64> {
    let mut it = s.split(':');
    let h: f64 = it.next()?.parse().ok()?;
    let m: f64 = it.next()?.parse().ok()?;
    let sec: f64 = it.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + sec)
}

/// From `strace -f -tt -T` output: each program run (exec to exit) and each
/// fsync, as `+offset ms  duration ms  what`.
fn summarize_strace(text: &str) -> String {
    use std::collections::HashMap;
    let mut first = None;
    let mut running: HashMap<&str, (f64, String)> = HashMap::new();
    let mut rows: Vec<(f64, f64, String)> = Vec::new();
    for line in text.lines() {
        // `PID  HH:MM:SS.micro rest`: strace pads the pid with spaces.
        let Some((pid, tail)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let Some((time, rest)) = tail.trim_start().split_once(' ') else {
            continue;
        };
        let Some(t) = strace_time(time) else { continue };
        let t0 = *first.get_or_insert(t);
        if rest.starts_with("execve(") && !rest.contains("= -1") {
            let prog = rest.split('"').nth(1).unwrap_or("?").to_string();
            running.insert(pid, (t, prog));
        } else if rest.starts_with("+++ exited") {
            if let Some((start, prog)) = running.remove(pid) {
                rows.push((start - t0, t - start, format!("ran {prog}")));
            }
        } else if rest.starts_with("fsync(") || rest.starts_with("fdatasync(") {
            let dur = rest
                .rsplit_once('<')
                .and_then(|(_, d)| d.trim_end_matches('>').parse::<f64>().ok())
                .unwrap_or(f64::NAN);
            let call = rest.split('(').next().unwrap_or("fsync");
            rows.push((t - t0, dur, call.to_string()));
        }
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out = String::new();
    for (at, dur, what) in &rows {
        out.push_str(&format!(
            "  +{:>7.1} ms  {:>6.1} ms  {what}\n",
            at * 1000.0,
            dur * 1000.0
        ));
    }
    if rows.is_empty() {
        out.push_str("  (nothing traced)\n");
    }
    out
}

fn bench_profile_toml(t: String) -> String {
    t.replace(
        &format!("host = \"{}\"", addr::MEET_NAME),
        &format!("host = \"{}\"", addr::HOST_V4),
    )
    .replace("tcp = [443]", &format!("tcp = [{PROBE_TCP_PORT}, {IPERF_PORT}]"))
    .replace(
        "udp = [10000]",
        &format!("udp = [{ECHO_UDP_PORT}, {IPERF_PORT}, {CALL_UDP_PORT}]"),
    )
}

fn read_first(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn machine() -> String {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".into());
    let cpu = read_first("/proc/cpuinfo", "model name");
    let kernel = lab::util::run(&["uname", "-r"])
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let date = lab::util::run(&["date", "-u", "+%Y-%m-%d %H:%M UTC"])
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("{date}; {nproc} CPUs ({cpu}); Linux {kernel}")
}

fn binary_version(path: &Path) -> String {
    lab::util::output(&[&path.to_string_lossy(), "--version"])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn run() -> Result<()> {
    if !lab::util::is_root() {
        bail!("the benchmark builds a lab of network namespaces and needs root: sudo ./scripts/bench");
    }
    let cfg = Config::from_env()?;
    catch_signals()?;
    let clock = Instant::now();
    let me = std::env::current_exe()
        .context("finding the bench binary")?
        .to_string_lossy()
        .into_owned();
    let sessiond = lab::util::find_binary("sessiond")?;
    let sessionctl = lab::util::find_binary("sessionctl")?;
    eprintln!(
        "bench: {} rounds × {} s transfers, {} pings every {} ms, UDP stream {}bit/s; systems: {}",
        cfg.rounds,
        cfg.secs,
        cfg.pings,
        cfg.ping_interval_ms,
        cfg.udp_rate,
        cfg.systems
            .iter()
            .map(|s| s.label())
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!("bench: sessiond = {}", sessiond.display());

    let lab = Lab::new()?;
    let sockets = SocketCleanup {
        paths: Mutex::new(Vec::new()),
    };
    // BENCH_TRANSPORT=tcp: the cost of a network that blocks UDP.
    let over_tcp = match std::env::var("BENCH_TRANSPORT").as_deref() {
        Err(_) | Ok("udp") => false,
        Ok("tcp") => true,
        Ok(other) => bail!("BENCH_TRANSPORT: `{other}` is neither `udp` nor `tcp`"),
    };
    let _relay = if over_tcp {
        eprintln!(
            "bench: sessiongate over TCP through the relay {}",
            lab::relay::RELAY_ENDPOINT
        );
        Some(lab.start_tcp_relay()?)
    } else {
        None
    };
    let profile = lab.write_profile("bench", |t| {
        let t = bench_profile_toml(t);
        if over_tcp {
            format!(
                "{t}\n[gateway]\ntransport = \"tcp\"\ntcp_endpoint = \"{}\"\n",
                lab::relay::RELAY_ENDPOINT
            )
        } else {
            t
        }
    })?;
    if !profile
        .toml
        .contains(&format!("tcp = [{PROBE_TCP_PORT}, {IPERF_PORT}]"))
        || !profile.toml.contains(&format!("host = \"{}\"", addr::HOST_V4))
    {
        bail!("profiles/lab.toml changed shape; the bench profile could not be derived from it");
    }
    let mut keys: [Option<PathBuf>; 3] = [Some(profile.key_file.clone()), None, None];
    for (sys, tun) in [
        (System::WireguardGo, WG_GO_TUN_V4),
        (System::Boringtun, BORINGTUN_TUN_V4),
    ] {
        let path = lab.tmp_dir().join(format!("bench-{}.key", sys.label()));
        let public = lab::gateway::write_new_key(&path)?;
        lab.add_gateway_peer(&public, &[&format!("{tun}/32")])?;
        keys[sys.index()] = Some(path);
    }
    let daemon = lab.start_sessiond_binaries(&sessiond, &sessionctl, &[])?;
    check_comm(daemon.pid().context("sessiond has no pid")?, "sessiond")?;
    let iperf = IperfServer::start(&lab)?;
    let mut bench = Bench {
        lab: &lab,
        me,
        ticks: clock_ticks(),
        daemon,
        iperf,
        keys,
        sockets,
        cfg,
        leak_reports: Vec::new(),
    };
    sleep(Duration::from_millis(500))?;
    let idle_rss = rss_mib(bench.daemon.pid().context("sessiond has no pid")?)?;

    let mut rounds = Vec::new();
    for r in 0..bench.cfg.rounds {
        rounds.push(bench.round(r)?);
    }
    let results = Results {
        rounds,
        sessiond_idle_rss: idle_rss,
        scenarios: bench.cfg.call_scenarios(),
    };
    let profile_text = if bench.cfg.profile {
        Some(
            bench
                .profile()
                .unwrap_or_else(|e| format!("profiling failed: {e:#}")),
        )
    } else {
        None
    };

    // BENCH_DAEMON_LOG=PATH: sessiond's log of the whole run (with
    // SESSIOND_LOG=debug, its start steps and nft runs, timed).
    if let Some(path) = std::env::var_os("BENCH_DAEMON_LOG") {
        std::fs::write(&path, bench.daemon.log())
            .with_context(|| format!("writing sessiond's log to {}", PathBuf::from(&path).display()))?;
    }

    let (table, mut all_met) = if bench.cfg.call_only {
        (String::new(), true)
    } else {
        render(&results)
    };
    let (call_table, calls_met) = render_calls(&results);
    all_met &= calls_met;
    let boringtun_version = bench
        .cfg
        .boringtun
        .as_deref()
        .map(binary_version)
        .unwrap_or_default();
    let wg_go_version = lab::util::output(&["wireguard-go", "--version"])
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    println!();
    println!("Machine: {}", machine());
    println!(
        "Run: {} rounds, systems alternating; {} s per transfer; {} pings / {} ms; UDP stream {}bit/s; \
         peers: {wg_go_version}; {boringtun_version}",
        bench.cfg.rounds, bench.cfg.secs, bench.cfg.pings, bench.cfg.ping_interval_ms, bench.cfg.udp_rate
    );
    let levers: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("SG_BENCH_") || k == "BENCH_TUN_QDISC")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !levers.is_empty() {
        println!("Levers set for sessiond: {}", levers.join(" "));
    }
    println!(
        "Calls: {} s each; load beside them from 1 s before to 1 s after.",
        bench.cfg.call_secs
    );
    println!("Values: median over rounds (noisy); ratios: median of the per-round ratios.");
    println!();
    print!("{table}");
    if !results.scenarios.is_empty() {
        println!();
        println!(
            "Call-shaped flow (audio 50 × 120 B/s, video 2.5 Mbit/s in 30 frames/s), one-way client → host; \
             shaped uplinks: tbf on the router towards the gateway:"
        );
        println!();
        print!("{call_table}");
    }
    if let Some(p) = profile_text {
        println!();
        println!("Profile (BENCH_PROFILE=1):");
        print!("{p}");
    }
    println!();
    println!(
        "Whole run: {:.0} s. Goals {}.",
        clock.elapsed().as_secs_f64(),
        if all_met { "all met" } else { "NOT all met" }
    );
    if !bench.leak_reports.is_empty() {
        bail!(
            "sessiongate let packets out around the tunnel: {}",
            bench.leak_reports.join("; ")
        );
    }
    Ok(())
}
