//! Connecting: lockdown, tunnel and routes are up; the first handshake is
//! awaited beside the loop (like talpid-core's connecting state, which
//! serves commands while it waits). Its arrival or its timeout comes back
//! as an event; `stop`, `status` and the tamper guard are served meanwhile.
//!
//! Next: the handshake opens the allowlist (→ open); the timeout blocks
//! (→ blocked, no handshake); `stop` cancels (see `stop.rs`). With
//! `transport = "auto"`, UDP that gets no handshake within [`UDP_TRY`]
//! moves the session to TCP through the relay: first the persisted
//! session (a resume comes back on TCP), then the lockdown (the relay's
//! TCP replaces the gateway's UDP as the one way out), then the tunnel,
//! then a fresh wait with the whole timeout (→ connecting).
//!
//! An `auto` session resumed over TCP (it had fallen back before a crash
//! or a reboot) whose relay gets no handshake within [`TCP_TRY`] moves to
//! the gateway's UDP the same way, firewall before tunnel, and back again
//! after [`UDP_TRY`]: a resumed session waits as long as it takes, on
//! whichever of the two answers.
//!
//! Never: wait for the handshake inside the machine's loop; let the tunnel
//! try TCP before the firewall admits exactly that flow.

use std::net::SocketAddr;
use std::time::Duration;

use futures::FutureExt;

use super::cause::{Cause, Step};
use super::effects::Effects;
use super::idle::fail;
use super::open;
use super::stage::{lockdown_over_tcp, lockdown_over_udp, Connecting, Locked, Stage, Task, Waiter};
use super::udp_again::persist_transport;
use super::{Ctx, Event};
use crate::firewall::EndpointProtocol;
use crate::profile::Transport;

/// How long `transport = "auto"` gives UDP before it tries TCP: WireGuard
/// sends its first handshake at once and the next after 5 s, and a gateway
/// that hears it answers in a round trip; at most half the handshake
/// timeout, so a short one still leaves TCP its turn.
pub(crate) const UDP_TRY: Duration = Duration::from_secs(5);
/// How long an `auto` session resumed over TCP gives the relay before it
/// tries UDP: a connect and a handshake take a few round trips, and the
/// forwarder connects again after a second; if the relay is gone (or the
/// machine woke on a network that passes UDP) UDP gets its turn, and the
/// two take turns until one answers.
pub(crate) const TCP_TRY: Duration = Duration::from_secs(10);

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
        let relay = locked.profile.as_ref().and_then(|p| match p.transport {
            Transport::Auto { relay } => Some(relay),
            Transport::Udp | Transport::Tcp { .. } => None,
        });
        let resumed = matches!(waiter, Waiter::Resume);
        if relay.is_some() && resumed && locked.lockdown.endpoint_protocol == EndpointProtocol::Tcp {
            waits.push(Task::spawn(ctx, |_| {
                async move {
                    tokio::time::sleep(TCP_TRY).await;
                    Event::TcpUnanswered(id)
                }
                .boxed()
            }));
        }
        if relay.is_some() && locked.lockdown.endpoint_protocol == EndpointProtocol::Udp {
            let udp_try = timeout.map_or(UDP_TRY, |t| UDP_TRY.min(t / 2));
            waits.push(Task::spawn(ctx, |_| {
                async move {
                    tokio::time::sleep(udp_try).await;
                    Event::UdpUnanswered(id)
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
    tracing::debug!("start: handshake done");
    open::open_allowlist(ctx, connecting.locked, connecting.waiter).await
}

/// `transport = "auto"` and UDP got no handshake: the lockdown moves to
/// the relay's TCP, then the tunnel does, then the wait starts again with
/// the whole timeout. A failure on the way keeps the machine locked down.
pub(crate) async fn on_udp_unanswered<E: Effects>(ctx: &mut Ctx<E>, connecting: Connecting<E>) -> Stage<E> {
    let Connecting {
        mut locked,
        waiter,
        endpoint,
        timeout,
        ..
    } = connecting;
    let Some(relay) = locked.profile.as_ref().and_then(|p| p.transport.relay()) else {
        return fail(
            ctx,
            locked,
            waiter,
            Cause::StartFailed { step: Step::Tunnel },
            "internal error: no relay",
        );
    };
    tracing::warn!("no handshake from {endpoint} over UDP; trying TCP through the relay {relay}");
    let over_tcp = lockdown_over_tcp(&locked.lockdown, relay);
    // Persisted first, so that a crash from here on resumes on the relay's
    // TCP rather than trying UDP again. If it cannot be written, a resume
    // locks down on UDP and falls back again: closed either way.
    if let Err(e) = persist_transport(ctx, &over_tcp) {
        tracing::warn!("{e}");
    }
    if let Err(e) = ctx.effects.apply_firewall(&over_tcp, None).await {
        let message =
            format!("could not let the tunnel's TCP to the relay {relay} through the lockdown: {e}");
        return fail(
            ctx,
            locked,
            waiter,
            Cause::StartFailed { step: Step::Tunnel },
            &message,
        );
    }
    locked.lockdown = over_tcp;
    let moved = match &locked.tunnel {
        Some(tunnel) => ctx.effects.tunnel_use_tcp(tunnel, relay),
        None => Err("internal error: no tunnel".to_string()),
    };
    if let Err(message) = moved {
        return fail(
            ctx,
            locked,
            waiter,
            Cause::StartFailed { step: Step::Tunnel },
            &message,
        );
    }
    Stage::Connecting(Connecting::new(ctx, locked, waiter, endpoint, timeout))
}

/// `transport = "auto"` resumed over TCP and the relay got no handshake:
/// the lockdown moves to the gateway's UDP (persisted first), then the
/// tunnel does, then the wait starts again (and UDP unanswered moves back
/// to TCP). A failure on the way keeps the machine locked down.
pub(crate) async fn on_tcp_unanswered<E: Effects>(ctx: &mut Ctx<E>, connecting: Connecting<E>) -> Stage<E> {
    let Connecting {
        mut locked,
        waiter,
        endpoint,
        timeout,
        ..
    } = connecting;
    let relay = locked.lockdown.endpoint;
    tracing::warn!("no handshake through the TCP relay {relay} since the resume; trying UDP to {endpoint}");
    let over_udp = lockdown_over_udp(&locked.lockdown, locked.endpoint);
    if let Err(e) = persist_transport(ctx, &over_udp) {
        tracing::warn!("{e}");
    }
    if let Err(e) = ctx.effects.apply_firewall(&over_udp, None).await {
        let message = format!("could not let the tunnel's UDP to {endpoint} through the lockdown: {e}");
        return fail(
            ctx,
            locked,
            waiter,
            Cause::StartFailed { step: Step::Tunnel },
            &message,
        );
    }
    locked.lockdown = over_udp;
    let moved = match &locked.tunnel {
        Some(tunnel) => ctx.effects.tunnel_use_udp(tunnel),
        None => Err("internal error: no tunnel".to_string()),
    };
    if let Err(message) = moved {
        return fail(
            ctx,
            locked,
            waiter,
            Cause::StartFailed { step: Step::Tunnel },
            &message,
        );
    }
    Stage::Connecting(Connecting::new(ctx, locked, waiter, endpoint, timeout))
}

pub(crate) fn on_timeout<E: Effects>(ctx: &mut Ctx<E>, connecting: Connecting<E>) -> Stage<E> {
    let endpoint = connecting.endpoint;
    let lockdown = &connecting.locked.lockdown;
    let message = match lockdown.endpoint_protocol {
        EndpointProtocol::Udp => format!(
            "no handshake from {endpoint} within {} s: check the peer's public key and that UDP {} reaches it",
            connecting.timeout.unwrap_or_default().as_secs(),
            endpoint.port()
        ),
        EndpointProtocol::Tcp => format!(
            "no handshake from {endpoint} through the TCP relay {} within {} s: check the peer's public key, that TCP {} reaches the relay and that the relay forwards to the gateway",
            lockdown.endpoint,
            connecting.timeout.unwrap_or_default().as_secs(),
            lockdown.endpoint.port()
        ),
    };
    fail(
        ctx,
        connecting.locked,
        connecting.waiter,
        Cause::NoHandshake,
        &message,
    )
}
