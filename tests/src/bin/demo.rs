//! The demo (README: `sudo ./scripts/demo`): brings the lab up, starts
//! sessiond in the client namespace with the bundled lab profile, runs a
//! session, shows what gets through and what does not, stops it and tears it
//! all down.

use std::process::ExitCode;

use anyhow::{bail, Result};
use lab::{addr, Lab, Ns};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn show(label: &str, result: &std::result::Result<String, String>) {
    match result {
        Ok(reply) => println!("    {label}: reached ({reply})"),
        Err(reason) => println!("    {label}: blocked ({reason})"),
    }
}

/// What the client's own resolver (libc, via the resolver file) says.
fn lookup(lab: &Lab, name: &str) -> std::result::Result<String, String> {
    let out = lab
        .exec(Ns::Client, &["getent", "hosts", name])
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(format!("answer {}", text.split_whitespace().next().unwrap_or("")))
    } else {
        Err("no address".to_string())
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

fn run() -> Result<()> {
    step("Building the lab: client, router, wireguard-go gateway, video host (network namespaces)");
    let lab = Lab::new()?;
    println!("    namespaces: {}", lab.namespaces().join(", "));
    println!(
        "    gateway: wireguard-go at {} (key {})",
        addr::GATEWAY_ENDPOINT,
        lab.gateway_public_key()
    );
    let profile = lab.sessiond_profile()?;
    println!(
        "    profile {} (from profiles/lab.toml):\n{}",
        profile.path.display(),
        indent(&profile.toml)
    );

    step("Before the session: the client goes straight out");
    show("DNS other.test", &lookup(&lab, addr::OTHER_NAME));
    show(
        "video host 203.0.113.10:443",
        &lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
    );
    show(
        "other host 203.0.113.20:443",
        &lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443),
    );

    step("Starting sessiond in the client namespace");
    let daemon = lab.start_sessiond()?;
    print!("{}", indent(&daemon.ctl_ok(&["status"])?));

    step("sessionctl start lab");
    lab.reset_leaks()?;
    let out = daemon.ctl(&["start", "lab"])?;
    if !out.status.success() {
        bail!(
            "start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.log()
        );
    }
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));

    step("During the session");
    show("DNS meet.test (allowed)", &lookup(&lab, addr::MEET_NAME));
    show("DNS other.test (not allowed)", &lookup(&lab, addr::OTHER_NAME));
    show(
        "video host meet.test:443",
        &lab.probe_tcp(Ns::Client, addr::MEET_NAME, 443),
    );
    show(
        "video host 203.0.113.10 udp/10000",
        &lab.probe_udp(Ns::Client, addr::HOST_V4, 10000),
    );
    show(
        "other host 203.0.113.20:443",
        &lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443),
    );
    show(
        "video host, unlisted port 8443",
        &lab.probe_tcp(Ns::Client, addr::HOST_V4, 8443),
    );
    show(
        "DNS-over-TLS to 203.0.113.53:853",
        &lab.probe_tcp(Ns::Client, addr::PUBLIC_DNS_V4, 853),
    );
    let leaks = lab.leaks()?;
    println!("    leak meter on the router: {leaks} packet(s) outside the tunnel");
    print!("{}", indent(&daemon.ctl_ok(&["status"])?));

    step("sessionctl stop");
    print!("{}", indent(&daemon.ctl_ok(&["stop"])?));
    show("DNS other.test", &lookup(&lab, addr::OTHER_NAME));
    show(
        "other host 203.0.113.20:443",
        &lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443),
    );
    let tables = lab.exec_ok(Ns::Client, &["nft", "list", "tables"])?;
    println!(
        "    nftables tables in the client: {}",
        if tables.trim().is_empty() {
            "none"
        } else {
            tables.trim()
        }
    );

    step("Tearing the lab down");
    drop(daemon);
    drop(lab);
    if leaks > 0 {
        bail!("{leaks} packet(s) left the client outside the tunnel during the session");
    }
    println!("    done: during the session the client reached only meet.test, only through the tunnel");
    Ok(())
}
