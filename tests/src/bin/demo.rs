//! The demo (README: `sudo ./scripts/demo`): brings the lab up, starts
//! sessiond in the client namespace with the lab profile, runs a session,
//! shows what gets through and what does not, stops it and tears it all down.

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

fn run() -> Result<()> {
    step("Building the lab: client, router, wireguard-go gateway, video host (network namespaces)");
    let lab = Lab::new()?;
    println!("    namespaces: {}", lab.namespaces().join(", "));
    println!(
        "    gateway: wireguard-go at {} (key {})",
        addr::GATEWAY_ENDPOINT,
        lab.gateway_public_key()
    );

    // The video host is allowed by address until DNS pinning lands.
    let profile = lab.write_profile("lab", |t| {
        t.replace(
            &format!("host = \"{}\"", addr::MEET_NAME),
            &format!("host = \"{}\"", addr::HOST_V4),
        )
    })?;
    println!(
        "    profile {}:\n{}",
        profile.path.display(),
        indent(&profile.toml)
    );

    step("Before the session: the client goes straight out");
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
    show(
        "video host 203.0.113.10:443",
        &lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
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
        "video host over IPv6 (no IPv6 allowed)",
        &lab.probe_tcp(Ns::Client, addr::HOST_V6, 443),
    );
    let leaks = lab.leaks()?;
    println!("    leak meter on the router: {leaks} packet(s) outside the tunnel");
    print!("{}", indent(&daemon.ctl_ok(&["status"])?));

    step("sessionctl stop");
    print!("{}", indent(&daemon.ctl_ok(&["stop"])?));
    show(
        "video host 203.0.113.10:443",
        &lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
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
    println!("    done: the session reached only the video host, only through the tunnel");
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
