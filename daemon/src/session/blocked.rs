//! Blocked: locked down with a [`Cause`], the allowlist closed. Only `stop`
//! gets a session out of here, with one exception kept from before: a start
//! that timed out still has its tunnel, and when its handshake comes late
//! the allowlist opens (no client waits for it any more).
//!
//! In particular a failed reload stays blocked whatever the peer does: the
//! health check never reads the published phase to decide anything.
//!
//! Never: open the allowlist for any other cause.

use super::cause::Cause;
use super::effects::Effects;
use super::open;
use super::stage::{Blocked, Stage, Waiter};
use super::Ctx;

pub(crate) async fn on_health<E: Effects>(ctx: &mut Ctx<E>, blocked: Blocked<E>) -> Stage<E> {
    let late_handshake = blocked.cause == Cause::NoHandshake
        && blocked.locked.routes.is_some()
        && blocked
            .locked
            .view
            .as_ref()
            .is_some_and(|v| v.stats().peer_reachable);
    if !late_handshake {
        return Stage::Blocked(blocked);
    }
    tracing::info!("the handshake came after the start had timed out; opening the allowlist");
    open::open_allowlist(ctx, blocked.locked, Waiter::Resume).await
}
