//! `sessiond`: parses the command line, wires the tasks together and shuts
//! them down on SIGTERM/SIGINT. Everything else lives in the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use sessiond::nft::NftRunner;
use sessiond::server::{AccessPolicy, ControlSocket};
use sessiond::session::{self, Paths};
use sessiond::watcher::ProfileWatcher;

/// sessiongate daemon: while a call profile is active, the machine reaches
/// only the approved video host, only through WireGuard, with DNS pinned.
#[derive(Parser, Debug)]
#[command(name = "sessiond", version)]
struct Args {
    /// Where `*.toml` profiles live.
    #[arg(long, default_value = "/etc/sessiongate/profiles")]
    profiles: PathBuf,
    /// The control socket.
    #[arg(long, default_value = sessiond::control::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Persisted session state (survives crash and reboot).
    #[arg(long, default_value = "/var/lib/sessiongate")]
    state_dir: PathBuf,
    /// The resolver file pointed at the local stub during a session.
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Run the nft binary for every firewall change instead of libnftables
    /// in process (slower; for a libnftables that misbehaves).
    #[arg(long)]
    nft_binary: bool,
    /// Members of this group may use the control socket besides root.
    #[arg(long, default_value = sessiond::server::DEFAULT_CONTROL_GROUP)]
    control_group: String,
}

fn main() -> std::process::ExitCode {
    // First, before any thread exists: threads that allocate get arenas.
    let allocator_tuned = tune_allocator();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SESSIOND_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    // Before any key is read: this process will hold the tunnel's private
    // key, so it must never leave a core file (the watchdog's abort would
    // write one) and its memory must stay closed to other processes of
    // its uid.
    if let Err(e) = forbid_core_dumps() {
        tracing::warn!("could not turn core dumps off: {e}");
    }
    if !allocator_tuned {
        tracing::debug!("glibc's allocator did not take the settings for a small resident size");
    }
    // The one way to nft for the whole process, handed to whatever writes
    // the firewall.
    let nft = if args.nft_binary {
        NftRunner::binary_only()
    } else {
        NftRunner::in_process()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sessiond: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Before anything else: never run on profiles, keys or state that
    // someone other than root could have changed. Refusing must not open the
    // machine, though: a session persisted before a reboot is locked down
    // first.
    if let Err(e) = sessiond::trust::check(&args.profiles, &args.state_dir) {
        tracing::error!("{e}");
        match runtime.block_on(sessiond::session::lock_down_persisted(nft, &args.state_dir)) {
            Ok(Some(profile)) => tracing::error!(
                "the session of profile {profile} stays locked down: fix the above and start sessiond again, then `sessionctl stop` ends it (or `nft delete table inet sessiongate` and `nft delete table netdev sessiongate` by hand)"
            ),
            Ok(None) => {}
            Err(e) => tracing::error!("{e:#}"),
        }
        return std::process::ExitCode::FAILURE;
    }
    match runtime.block_on(run(args, nft)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Keeps glibc's allocator from parking memory (docs/benchmarks.md,
/// "Resident memory in a session"): one arena for all threads instead of
/// one per thread that allocates (each kept what its thread freed,
/// resident, for that thread: 2–3 MiB in a session), and blocks of 64 KiB
/// and more (the tunnel's per-session buffers, nft's listings) in their
/// own mappings, whose untouched pages never become resident and which go
/// back to the kernel when freed. The packet path allocates nothing per
/// packet, so the one arena's lock is not on it (measured: throughput and
/// call delay unchanged against wireguard-go). Returns whether both
/// settings took.
fn tune_allocator() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt takes two plain integers; called before any
        // other thread exists.
        let arenas = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        // SAFETY: as above.
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024) };
        arenas == 1 && mmap == 1
    }
    #[cfg(not(target_env = "gnu"))]
    true
}

/// PR_SET_DUMPABLE 0 (no core file unless the administrator set
/// fs.suid_dumpable=2, and no ptrace or /proc/PID/mem without
/// CAP_SYS_PTRACE) and a core size limit of 0 (which also covers
/// fs.suid_dumpable=2; children such as nft inherit it).
fn forbid_core_dumps() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit that outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

async fn run(args: Args, nft: NftRunner) -> anyhow::Result<()> {
    let policy = AccessPolicy::for_group(&args.control_group);
    let (mut machine, handle) = session::new(
        Paths {
            profiles: args.profiles.clone(),
            state_dir: args.state_dir.clone(),
            resolv_conf: args.resolv_conf.clone(),
        },
        nft,
    );
    // A persisted session is locked down before anything else happens.
    machine.resume().await?;
    // A captive-portal namespace needs no clean-up here: it lives only as
    // long as this process's connection to the portal helper, which
    // removes it when that connection closes (portal_helper.rs).
    let watcher = ProfileWatcher::start(&args.profiles, handle.clone())
        .map_err(|e| tracing::warn!("{e}; profile edits need a restart of sessiond"))
        .ok();
    let socket = ControlSocket::bind(&args.socket, &policy).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let machine_task = tokio::spawn(machine.run(shutdown_rx.clone()));
    let server_task = {
        let profiles = args.profiles.clone();
        let shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            socket.serve(handle, profiles, policy, shutdown).await;
            drop(socket);
        })
    };
    tracing::info!("sessiond is listening on {}", args.socket.display());
    // Ready for systemd (Type=notify): the socket is open and any persisted
    // session is locked down.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    drop(watcher);
    let _ = shutdown_tx.send(true);
    let _ = server_task.await;
    let _ = machine_task.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn core_dumps_are_forbidden() {
        super::forbid_core_dumps().expect("prctl and setrlimit");
        // SAFETY: PR_GET_DUMPABLE takes no pointer.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
        let mut limit = libc::rlimit {
            rlim_cur: 1,
            rlim_max: 1,
        };
        // SAFETY: a valid rlimit to fill.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut limit) }, 0);
        assert_eq!((limit.rlim_cur, limit.rlim_max), (0, 0));
    }
}
