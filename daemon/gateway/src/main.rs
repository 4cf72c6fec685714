//! `sessiongate-gateway`: a small WireGuard gateway, built on boringtun
//! like sessiond's tunnel, that a practice can run in place of its
//! WireGuard so that what it sends back to clients is shaped too (issue
//! 19): padded to 16 bytes (`spec`), to the MTU (`pad`), or carried in a
//! constant-rate envelope of MTU-sized packets with decoys (`cover`), per
//! client, with sessiond's own padding, envelope and decoys
//! (sessiond::shape). With a standard gateway (wireguard-go, the kernel's
//! WireGuard) only the client→gateway direction can be shaped.
//!
//! What it does: one TUN device with the configured addresses, one UDP
//! port, the configured clients (public key, tunnel addresses, shape);
//! it answers their handshakes, follows them when they roam, and drops
//! packets whose inner source is not the client's own address.
//!
//! What it does not do: routing, forwarding, NAT and the firewall are the
//! practice's, as with wg (enable forwarding, masquerade, filter); no wg
//! control socket (`wg show` does not see it), no reload (restart it after
//! editing the file), no endpoints of its own (it never contacts a client
//! it has not heard from), no GSO/GRO batching (fine for calls, not for
//! bulk throughput), no maybenot machines. It needs CAP_NET_ADMIN for the
//! TUN device; the cover envelope asks for real-time priority and runs
//! without it when refused.

mod config;
mod gateway;

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "A WireGuard gateway that shapes what it sends back to sessiongate clients"
)]
struct Args {
    /// The configuration file (see the README's traffic shape section).
    #[arg(long, default_value = "/etc/sessiongate-gateway/gateway.toml")]
    config: PathBuf,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SESSIONGATE_GATEWAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sessiongate-gateway: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let config = config::Config::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let peers = config.peers.len();
        let interface = config.interface.clone();
        let port = config.listen_port;
        let gateway = gateway::Gateway::start(config)?;
        tracing::info!("listening on UDP port {port} with {peers} client(s), interface {interface}");
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = gateway.run() => result,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = terminate.recv() => Ok(()),
        }
    })
}
