//! The soak (`sudo ./scripts/soak`): many sessions in a row against one
//! sessiond, then many crashes and resumes, in the lab. Nothing may leak
//! (the router's leak meter stays at zero, checked every few cycles and at
//! the end) and nothing may pile up: sessiond's open files, threads and
//! memory, and in the client namespace the nftables objects, links, policy
//! rules, routes and processes. Figures are printed before and after; any
//! growth beyond the stated tolerance fails the run (exit 1).
//!
//! Tunable by environment:
//! - `SOAK_CYCLES` start/stop cycles against one daemon (default 200);
//! - `SOAK_CRASH_CYCLES` start, kill -9, restart, resume to active, stop
//!   (default 20);
//! - `SOAK_CHECK_EVERY` cycles between checks of the leak meter and the
//!   figures (default 20);
//! - `SOAK_RSS_TOLERANCE_KIB` growth of sessiond's resident memory allowed
//!   between before and after (default 4096: the allocator keeps freed
//!   memory in per-thread arenas, so RSS settles somewhat above its first
//!   figure without leaking);
//! - `SOAK_RSS_HALF_TOLERANCE_KIB` growth allowed over the second half of
//!   the start/stop cycles, once the allocator has settled (default 1024: a
//!   leak of even 10 KiB per session shows there);
//! - `SOAK_SETTLE_SECS` wait before measuring, so tokio's idle blocking
//!   threads (kept 10 s) have exited (default 12);
//! - `SOAK_CALL_MINUTES` a last phase: one long session carrying the
//!   call-shaped flow (lab::callflow: audio and 2.5 Mbit/s video) minute
//!   after minute, with sessiond's memory, files and threads read each
//!   minute; they must stay flat (default 2; `scripts/soak --hour` sets 60;
//!   0 skips it);
//! - `SOAK_CALL_RSS_TOLERANCE_KIB` growth of VmRSS allowed from the end of
//!   the call's first minute to its last (default 1024).

use std::collections::BTreeMap;
use std::fmt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lab::{addr, wait_until, Daemon, Lab, Ns};
use serde_json::Value;

fn main() -> ExitCode {
    // The call phase runs this binary's call-send / call-recv in the lab's
    // namespaces.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sub = match args.first().map(String::as_str) {
        Some("call-send") => Some(lab::callflow::cli_send(&args[1..])),
        Some("call-recv") => Some(lab::callflow::cli_receive(&args[1..])),
        _ => None,
    };
    if let Some(result) = sub {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("soak: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run() {
        Ok(()) => {
            println!("soak: PASSED");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("soak: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Config {
    cycles: u32,
    crash_cycles: u32,
    check_every: u32,
    rss_tolerance_kib: u64,
    rss_half_tolerance_kib: u64,
    settle: Duration,
    call_minutes: u32,
    call_rss_tolerance_kib: u64,
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Config> {
        let small = |name: &str, default: u64| -> Result<u32> {
            u32::try_from(env_number(name, default)?).with_context(|| format!("{name} is too large"))
        };
        Ok(Config {
            cycles: small("SOAK_CYCLES", 200)?,
            crash_cycles: small("SOAK_CRASH_CYCLES", 20)?,
            check_every: small("SOAK_CHECK_EVERY", 20)?.max(1),
            rss_tolerance_kib: env_number("SOAK_RSS_TOLERANCE_KIB", 4096)?,
            rss_half_tolerance_kib: env_number("SOAK_RSS_HALF_TOLERANCE_KIB", 1024)?,
            settle: Duration::from_secs(env_number("SOAK_SETTLE_SECS", 12)?),
            call_minutes: small("SOAK_CALL_MINUTES", 2)?,
            call_rss_tolerance_kib: env_number("SOAK_CALL_RSS_TOLERANCE_KIB", 1024)?,
        })
    }
}

/// sessiond's own resources, from /proc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Process {
    pid: u32,
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {}: {} open files, {} threads, VmRSS {} KiB",
            self.pid, self.fds, self.threads, self.rss_kib
        )
    }
}

/// The client namespace's state, counted.
#[derive(Clone, Debug, PartialEq, Eq)]
struct System {
    /// tables, chains, rules, sets, set elements (and anything else nft
    /// lists), by kind.
    nft: BTreeMap<String, usize>,
    links: usize,
    rules: usize,
    routes: usize,
    /// Processes in the namespace (sessiond, and anything it left behind).
    processes: usize,
}

impl System {
    fn nft_total(&self) -> usize {
        self.nft.values().sum()
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nft: Vec<String> = self.nft.iter().map(|(k, n)| format!("{n} {k}")).collect();
        write!(
            f,
            "nft objects {} [{}], links {}, ip rules {}, routes {}, processes {}",
            self.nft_total(),
            nft.join(", "),
            self.links,
            self.rules,
            self.routes,
            self.processes
        )
    }
}

/// The sessiond process behind the pid the lab started (`ip netns exec`
/// execs it, so normally the same pid).
fn sessiond_pid(daemon: &Daemon) -> Result<u32> {
    let pid = daemon.pid().context("sessiond was never started")?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == "sessiond" {
        return Ok(pid);
    }
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children.split_whitespace() {
        let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
        if comm.trim() == "sessiond" {
            return child.parse().context("bad pid in /proc");
        }
    }
    bail!("pid {pid} is {:?}, not sessiond", comm.trim())
}

fn count_dir(path: &str) -> Result<usize> {
    Ok(std::fs::read_dir(path)
        .with_context(|| format!("reading {path}"))?
        .count())
}

fn process(daemon: &Daemon) -> Result<Process> {
    let pid = sessiond_pid(daemon)?;
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc/PID/status")?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(Process {
        pid,
        fds: count_dir(&format!("/proc/{pid}/fd"))?,
        threads: count_dir(&format!("/proc/{pid}/task"))?,
        rss_kib,
    })
}

fn lines(lab: &Lab, args: &[&str]) -> Result<usize> {
    Ok(lab
        .exec_ok(Ns::Client, args)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

fn system(lab: &Lab) -> Result<System> {
    let json = lab.exec_ok(Ns::Client, &["nft", "-j", "list", "ruleset"])?;
    let v: Value = serde_json::from_str(&json).context("parsing nft -j list ruleset")?;
    let mut nft = BTreeMap::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(obj) = item.as_object() else { continue };
        for (kind, body) in obj {
            if kind == "metainfo" {
                continue;
            }
            *nft.entry(format!("{kind}s")).or_insert(0) += 1;
            if let Some(elems) = body.get("elem").and_then(Value::as_array) {
                *nft.entry("set elements".to_string()).or_insert(0) += elems.len();
            }
        }
    }
    let ns = lab.ns_name(Ns::Client).to_string();
    let processes = lab::util::run(&["ip", "netns", "pids", &ns])?
        .split_whitespace()
        .count();
    Ok(System {
        nft,
        links: lines(lab, &["ip", "-o", "link"])?,
        rules: lines(lab, &["ip", "-4", "rule"])? + lines(lab, &["ip", "-6", "rule"])?,
        routes: lines(lab, &["ip", "-4", "route", "show", "table", "all"])?
            + lines(lab, &["ip", "-6", "route", "show", "table", "all"])?,
        processes,
    })
}

fn state(daemon: &Daemon) -> String {
    daemon
        .status()
        .map(|s| s["state"].as_str().unwrap_or("?").to_string())
        .unwrap_or_else(|e| format!("status failed: {e:#}"))
}

fn check_leaks(lab: &Lab, when: &str) -> Result<()> {
    let leaks = lab.leaks()?;
    ensure!(leaks == 0, "{when}: {}", lab.leak_report());
    Ok(())
}

/// The allowed host answers through the tunnel (by name, so the DNS stub
/// takes part).
fn check_tunnel(lab: &Lab, daemon: &Daemon, when: &str) -> Result<()> {
    let reply = lab.probe_tcp(Ns::Client, addr::MEET_NAME, 443);
    let via_gateway = [addr::GATEWAY_V4, addr::GATEWAY_V6]
        .iter()
        .any(|gw| reply.as_deref() == Ok(format!("peer={gw}").as_str()));
    ensure!(
        via_gateway,
        "{when}: {}:443 did not answer through the tunnel: {reply:?}\n{}",
        addr::MEET_NAME,
        daemon.log()
    );
    Ok(())
}

fn start(daemon: &Daemon) -> Result<()> {
    daemon.ctl_ok(&["start", "lab"]).map(|_| ())
}

fn stop(daemon: &Daemon) -> Result<()> {
    daemon.ctl_ok(&["stop"]).map(|_| ())
}

fn run() -> Result<()> {
    let cfg = Config::from_env()?;
    let clock = Instant::now();
    let lab = Lab::new().context("lab setup")?;
    lab.sessiond_profile()?;
    let mut daemon = lab.start_sessiond()?;
    lab.reset_leaks()?;
    println!(
        "soak: lab {} up; {} start/stop cycles, {} crash cycles, checks every {} cycles",
        lab.id(),
        cfg.cycles,
        cfg.crash_cycles,
        cfg.check_every
    );
    let idle_system = system(&lab)?;

    // Warm up (first-use allocations, lazily started threads), then measure.
    for _ in 0..3 {
        start(&daemon)?;
        stop(&daemon)?;
    }
    std::thread::sleep(cfg.settle);
    let before = process(&daemon)?;
    let before_system = system(&lab)?;
    ensure!(
        before_system == idle_system,
        "three sessions already left something behind:\n  before: {idle_system}\n  after:  {before_system}"
    );
    println!("before: sessiond {before}");
    println!("before: client namespace {before_system}");
    check_leaks(&lab, "after the warm-up")?;

    // Phase 1: start/stop against one daemon.
    let mut active_shape: Option<System> = None;
    // VmRSS at each checkpoint, for the growth over the second half.
    let mut rss_seen: Vec<(u32, u64)> = Vec::new();
    let phase = Instant::now();
    for i in 1..=cfg.cycles {
        start(&daemon).with_context(|| format!("cycle {i}: start"))?;
        let checkpoint = i % cfg.check_every == 0 || i == 1 || i == cfg.cycles;
        if checkpoint {
            ensure!(state(&daemon) == "active", "cycle {i}: not active after start");
            check_tunnel(&lab, &daemon, &format!("cycle {i}"))?;
            // The session's own shape must not grow from session to session.
            let during = system(&lab)?;
            match &active_shape {
                None => active_shape = Some(during),
                Some(first) => ensure!(
                    during == *first,
                    "cycle {i}: the session's shape changed:\n  cycle 1:  {first}\n  cycle {i}: {during}"
                ),
            }
        }
        stop(&daemon).with_context(|| format!("cycle {i}: stop"))?;
        if checkpoint {
            check_leaks(&lab, &format!("cycle {i}"))?;
            let now = system(&lab)?;
            ensure!(
                now == before_system,
                "cycle {i}: the idle client namespace differs from before:\n  before: {before_system}\n  now:    {now}"
            );
            let now = process(&daemon)?;
            rss_seen.push((i, now.rss_kib));
            println!(
                "cycle {i:>4}/{}: 0 leaks; sessiond {now}; {:.1} s",
                cfg.cycles,
                phase.elapsed().as_secs_f64()
            );
        }
    }
    if let Some(shape) = &active_shape {
        println!("during a session: client namespace {shape}");
    }
    println!(
        "{} start/stop cycles in {:.1} s ({:.0} ms each)",
        cfg.cycles,
        phase.elapsed().as_secs_f64(),
        phase.elapsed().as_secs_f64() * 1000.0 / f64::from(cfg.cycles.max(1))
    );
    std::thread::sleep(cfg.settle);
    let after = process(&daemon)?;
    let after_system = system(&lab)?;
    println!("after:  sessiond {after}");
    println!("after:  client namespace {after_system}");
    check_leaks(&lab, "after the start/stop cycles")?;
    let mut growth = Vec::new();
    if after.fds > before.fds {
        growth.push(format!("open files {} -> {}", before.fds, after.fds));
    }
    if after.threads > before.threads {
        growth.push(format!("threads {} -> {}", before.threads, after.threads));
    }
    if after.rss_kib > before.rss_kib + cfg.rss_tolerance_kib {
        growth.push(format!(
            "VmRSS {} -> {} KiB (more than {} KiB)",
            before.rss_kib, after.rss_kib, cfg.rss_tolerance_kib
        ));
    }
    let half = rss_seen.iter().find(|(i, _)| *i >= cfg.cycles / 2);
    if let (Some(&(from, mid)), Some(&(to, end))) = (half, rss_seen.last()) {
        println!("VmRSS over the second half: {mid} KiB at cycle {from} -> {end} KiB at cycle {to}");
        if end > mid + cfg.rss_half_tolerance_kib {
            growth.push(format!(
                "VmRSS {mid} -> {end} KiB from cycle {from} to {to} (more than {} KiB)",
                cfg.rss_half_tolerance_kib
            ));
        }
    }
    if after_system != before_system {
        growth.push(format!("client namespace {before_system} -> {after_system}"));
    }
    ensure!(
        growth.is_empty(),
        "growth over {} cycles: {}",
        cfg.cycles,
        growth.join("; ")
    );

    // Phase 2: crash and resume.
    let phase = Instant::now();
    for i in 1..=cfg.crash_cycles {
        start(&daemon).with_context(|| format!("crash cycle {i}: start"))?;
        daemon.kill9()?;
        wait_until(Duration::from_secs(5), "sessiond gone", || !daemon.is_running())?;
        ensure!(
            lab.exec_ok(Ns::Client, &["nft", "list", "tables"])?
                .contains("sessiongate"),
            "crash cycle {i}: the firewall went with the daemon"
        );
        daemon
            .restart()
            .with_context(|| format!("crash cycle {i}: restart"))?;
        wait_until(Duration::from_secs(60), "the resumed session active", || {
            state(&daemon) == "active"
        })
        .with_context(|| format!("crash cycle {i}: no resume\n{}", daemon.log()))?;
        let checkpoint = i % cfg.check_every.min(5) == 0 || i == 1 || i == cfg.crash_cycles;
        if checkpoint {
            check_tunnel(&lab, &daemon, &format!("crash cycle {i}"))?;
        }
        stop(&daemon).with_context(|| format!("crash cycle {i}: stop"))?;
        if checkpoint {
            check_leaks(&lab, &format!("crash cycle {i}"))?;
            let now = system(&lab)?;
            ensure!(
                now == before_system,
                "crash cycle {i}: the idle client namespace differs from before:\n  before: {before_system}\n  now:    {now}"
            );
            println!(
                "crash cycle {i:>3}/{}: resumed to active, stopped, 0 leaks; sessiond {}; {:.1} s",
                cfg.crash_cycles,
                process(&daemon)?,
                phase.elapsed().as_secs_f64()
            );
        }
    }
    let crashed_system = system(&lab)?;
    println!("after the crash cycles: client namespace {crashed_system}");
    ensure!(
        crashed_system == before_system,
        "the crash cycles left something behind:\n  before: {before_system}\n  after:  {crashed_system}"
    );
    check_leaks(&lab, "at the end")?;
    if cfg.call_minutes > 0 {
        call_phase(&lab, &daemon, &cfg)?;
        let after_call = system(&lab)?;
        ensure!(
            after_call == before_system,
            "the long call left something behind:\n  before: {before_system}\n  after:  {after_call}"
        );
        check_leaks(&lab, "after the long call")?;
    }
    println!(
        "soak: {} + {} cycles and a {}-minute call in {:.1} s, leak meter at 0 throughout",
        cfg.cycles,
        cfg.crash_cycles,
        cfg.call_minutes,
        clock.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Phase 3: one session carrying a call for `call_minutes`, one minute-long
/// call after another. sessiond's memory, open files and threads are read
/// after each minute and must stay flat from the first minute's end on
/// (the first minute warms up buffers and allocator arenas). Call quality is
/// printed, never judged here (timing belongs to the bench).
fn call_phase(lab: &Lab, daemon: &Daemon, cfg: &Config) -> Result<()> {
    // The host by its address, as the bench does: the call is one-way and
    // resolves nothing, so an address learned from a DNS answer would stop
    // admitting its new packets when the answer's TTL runs out (a real
    // call's two-way flow stays admitted as established).
    let profile = lab.write_profile("soakcall", |t| {
        t.replace(
            &format!("host = \"{}\"", addr::MEET_NAME),
            &format!("host = \"{}\"", addr::HOST_V4),
        )
        .replace(
            "udp = [10000]",
            &format!("udp = [10000, {}]", lab::callflow::LAB_PORT),
        )
    })?;
    ensure!(
        profile.toml.contains(&format!("{}]", lab::callflow::LAB_PORT))
            && profile.toml.contains(addr::HOST_V4),
        "profiles/lab.toml changed shape; the call profile could not be derived from it"
    );
    let me = std::env::current_exe()
        .context("finding the soak binary")?
        .to_string_lossy()
        .into_owned();
    daemon.ctl_ok(&["start", "soakcall"])?;
    let phase = Instant::now();
    let result = (|| -> Result<()> {
        let mut first: Option<Process> = None;
        let mut last = None;
        for minute in 1..=cfg.call_minutes {
            let call = lab::callflow::run_in_lab(lab, &me, 60, (std::process::id() << 12) | minute)
                .with_context(|| format!("call minute {minute}"))?;
            let now = process(daemon)?;
            println!(
                "call minute {minute:>3}/{}: {} of {} packets lost, one-way p50 {:.2} p99 {:.2} ms, jitter {:.3} ms; sessiond {now}; {:.0} s",
                cfg.call_minutes,
                call.lost(),
                call.audio.expected + call.video.expected,
                call.p50_ms,
                call.p99_ms,
                call.jitter_ms(),
                phase.elapsed().as_secs_f64()
            );
            if first.is_none() {
                first = Some(now);
            }
            last = Some(now);
        }
        if let (Some(first), Some(last)) = (first, last) {
            println!(
                "call: sessiond from minute 1 to minute {}: {first} -> {last}",
                cfg.call_minutes
            );
            let mut growth = Vec::new();
            if last.rss_kib > first.rss_kib + cfg.call_rss_tolerance_kib {
                growth.push(format!(
                    "VmRSS {} -> {} KiB (more than {} KiB)",
                    first.rss_kib, last.rss_kib, cfg.call_rss_tolerance_kib
                ));
            }
            if last.fds > first.fds {
                growth.push(format!("open files {} -> {}", first.fds, last.fds));
            }
            if last.threads > first.threads {
                growth.push(format!("threads {} -> {}", first.threads, last.threads));
            }
            ensure!(
                growth.is_empty(),
                "growth during the long call: {}",
                growth.join("; ")
            );
        }
        Ok(())
    })();
    stop(daemon)?;
    result
}
