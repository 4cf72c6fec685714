//! `sessiongate-portal`: the captive-portal helper. systemd starts one per
//! connection to `sessiongate-portal.socket` (`Accept=yes`), with the
//! connection as standard input and output; it makes, brings up and
//! removes the portal namespace and starts the browser in it, each only
//! when sessiond asks (portal_helper.rs), and removes the namespace when
//! the connection closes or systemd stops it. Logs go to standard error.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SESSIOND_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    // Standard input is the connection (StandardInput=socket, or
    // systemd-socket-activate --inetd).
    // SAFETY: descriptor 0 is ours for the life of the process; it is
    // duplicated so the stream owns a descriptor of its own.
    let fd = unsafe { libc::dup(std::io::stdin().as_raw_fd()) };
    if fd < 0 {
        bail!("standard input: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor dup() just returned, owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let std_stream = std::os::unix::net::UnixStream::from(owned);
    std_stream
        .set_nonblocking(true)
        .context("standard input is not the helper's socket connection: start sessiongate-portal through sessiongate-portal.socket")?;
    let stream = tokio::net::UnixStream::from_std(std_stream)
        .context("standard input is not the helper's socket connection: start sessiongate-portal through sessiongate-portal.socket")?;
    // Only root (sessiond) may ask; the socket unit is root-only as well.
    let peer = stream
        .peer_cred()
        .context("standard input is not the helper's socket connection: start sessiongate-portal through sessiongate-portal.socket")?;
    if peer.uid() != 0 {
        bail!(
            "refused a connection from uid {}: only sessiond (root) may ask for a portal namespace",
            peer.uid()
        );
    }
    let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let (read, write) = stream.into_split();
    let stop = async move {
        term.recv().await;
        tracing::info!("SIGTERM: removing the portal namespace");
    };
    sessiond::portal_helper::serve(read, write, stop)
        .await
        .map_err(|e| anyhow::anyhow!("the connection to sessiond broke: {e}"))
}
