//! Connecting: lockdown, tunnel and routes are up; the first handshake is
//! awaited beside the loop (like talpid-core's connecting state, which
//! serves commands while it waits). Its arrival or its timeout comes back
//! as an event; `stop`, `status` and the tamper guard are served meanwhile.
//!
//! Next: the handshake opens the allowlist (→ open); the timeout blocks
//! (→ blocked, no handshake); `stop` cancels (see `stop.rs`).
//!
//! Never: wait for the handshake inside the machine's loop.

use std::net::SocketAddr;
use std::time::Duration;

use futures::FutureExt;

use super::cause::Cause;
use super::effects::Effects;
use super::idle::fail;
use super::open;
use super::stage::{Connecting, Locked, Stage, Task, Waiter};
use super::{Ctx, Event};

impl<E: Effects> Connecting<E> {
    /// Starts the waits: the handshake, and for a client's start its
    /// deadline. A resumed session waits as long as it takes.
    pub fn new(
        ctx: &mut Ctx<E>,
        locked: Locked<E>,
        waiter: Waiter,
        endpoint: SocketAddr,
        timeout: Option<Duration>,
    ) -> Connecting<E> {
        let id = ctx.next_id();
        let mut waits = Vec::new();
        if let Some(view) = &locked.view {
            let handshake = view.handshake_done();
            waits.push(Task::spawn(ctx, |_| {
                async move {
                    handshake.await;
                    Event::Handshake(id)
                }
                .boxed()
            }));
        }
        if let (Some(timeout), Waiter::Client(_)) = (timeout, &waiter) {
            waits.push(Task::spawn(ctx, |_| {
                async move {
                    tokio::time::sleep(timeout).await;
                    Event::HandshakeTimeout(id)
                }
                .boxed()
            }));
        }
        Connecting {
            locked,
            waiter,
            id,
            endpoint,
            timeout,
            _waits: waits,
        }
    }
}

pub(crate) async fn on_handshake<E: Effects>(ctx: &mut Ctx<E>, connecting: Connecting<E>) -> Stage<E> {
    open::open_allowlist(ctx, connecting.locked, connecting.waiter).await
}

pub(crate) fn on_timeout<E: Effects>(ctx: &mut Ctx<E>, connecting: Connecting<E>) -> Stage<E> {
    let endpoint = connecting.endpoint;
    let message = format!(
        "no handshake from {endpoint} within {} s: check the peer's public key and that UDP {} reaches it",
        connecting.timeout.unwrap_or_default().as_secs(),
        endpoint.port()
    );
    fail(
        ctx,
        connecting.locked,
        connecting.waiter,
        Cause::NoHandshake,
        &message,
    )
}
