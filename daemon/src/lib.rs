//! sessiond's library: everything the daemon does, split by concern.
//!
//! What sessionctl shares with the daemon (control protocol, causes,
//! profile, import, keys, trust) lives in `sessiongate-common`
//! (daemon/common) and is re-exported here under its old paths; the rest is
//! the daemon's own:
//!
//! - [`server`]: the control socket and who may use it;
//! - [`session`]: the state machine, the one place that decides ordering
//!   (one file per stage; every side effect behind its `Effects` seam);
//! - `store`: the persisted session, which survives crashes and reboots;
//! - `tunnel`: WireGuard (boringtun) on a TUN device;
//! - `routing`: addresses and the full-tunnel policy routes;
//! - `firewall` and [`nft`]: the nftables kill switch (one `Firewall` value,
//!   owned by the session) and the one way to nft (`nft::NftRunner`, built
//!   once by the binary);
//! - [`dns`]: the pinned DNS stub; `resolvconf`: the resolver file;
//! - `verify`: active probes of the boundary; [`watcher`]: profile reloads.
//!
//! Modules nothing outside the daemon uses are `pub(crate)`, so dead code
//! shows.

// The modules sessionctl shares live in daemon/common; the daemon reaches
// them by their old paths.
pub use sessiongate_common::{control, import, io_reason, keys, profile, trust};

pub mod dns;
pub(crate) mod firewall;
pub mod nft;
pub mod portal;
pub mod portal_helper;
pub(crate) mod resolvconf;
pub(crate) mod routing;
pub mod server;
pub mod session;
pub mod sleep;
pub(crate) mod store;
pub(crate) mod tunnel;
/// The traffic shapes (padding, cover envelope, decoys), shared with the
/// gateway side built from this workspace (daemon/gateway).
pub use tunnel::shape;
pub(crate) mod verify;
pub mod watcher;

/// Marks the tunnel's own UDP packets ("SG"), so policy routing sends them
/// outside the tunnel and the firewall can recognise them.
pub const TUNNEL_FWMARK: u32 = 0x5347;
/// The routing table that holds the tunnel's default routes.
pub const ROUTE_TABLE: u32 = 0x5347;
/// Marks the DNS stub's own upstream queries, so the firewall's redirect of
/// every DNS packet to the stub lets them pass. Any mark but the tunnel's
/// keeps them on the tunnel route.
pub const DNS_STUB_MARK: u32 = 0x5348;

/// Resolves once `shutdown` says so (or its sender is gone). Keeps the
/// watch guard out of the caller's future, so tasks using it stay `Send`.
pub async fn shutdown_requested(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
