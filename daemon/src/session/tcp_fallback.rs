//! Open over UDP with `transport = "auto"`: moving to TCP mid-session
//! when the gateway stops answering over UDP.
//!
//! A session that came up over UDP and then roams onto a network that
//! blocks UDP (or whose network starts blocking it) would otherwise stay
//! down for the rest of the call: the start's fall-back (`connecting.rs`)
//! runs only before the first handshake. So an open session over UDP
//! moves to the relay's TCP when a handshake it sent has gone unanswered
//! for [`UDP_TRY`] (as long as the start gives UDP): the one after a
//! network change or a resume, or one of WireGuard's own when the gateway
//! went quiet. Answers are what counts, not datagrams heard: on a network
//! that drops only what goes out, the gateway's own handshakes still come
//! in, and the peer looks alive while it hears nothing of ours.
//!
//! The switch, in the start's order: the persisted session says TCP (a
//! crash from here on resumes over TCP) → the firewall admits the relay's
//! TCP instead of the gateway's UDP (one transaction, the allowlist kept)
//! → the tunnel moves to TCP and handshakes through the relay. From then
//! on `udp_again.rs` tries UDP again as after a start over TCP.
//!
//! Never: let the tunnel send over TCP before the firewall admits it, or
//! leave the firewall admitting the gateway's UDP once the tunnel has left
//! it.

use tokio::time::Instant;

use super::cause::Cause;
use super::connecting::{TCP_TRY, UDP_TRY};
use super::effects::Effects;
use super::stage::{lockdown_over_tcp, Open, Recovering, Stage, UdpAgain};
use super::udp_again::{persist_transport, reapply};
use super::Ctx;
use crate::firewall::EndpointProtocol;
use crate::profile::Transport;

/// One health tick of an open session: moves it to TCP once a handshake
/// over UDP has gone unanswered for [`UDP_TRY`].
pub(crate) async fn on_health<E: Effects>(ctx: &mut Ctx<E>, mut open: Open<E>) -> Stage<E> {
    let auto = open
        .locked
        .profile
        .as_ref()
        .is_some_and(|p| matches!(p.transport, Transport::Auto { .. }));
    let over_udp = open.locked.lockdown.endpoint_protocol == EndpointProtocol::Udp;
    if !auto || open.opening.is_some() {
        return Stage::Open(open);
    }
    let now = Instant::now();
    if !over_udp {
        give_udp_its_turn(&mut open, now);
        return Stage::Open(open);
    }
    open.tcp_fallback.relay_waited_since = None;
    let unanswered = open
        .locked
        .view
        .as_ref()
        .and_then(|view| view.handshake_unanswered_for());
    let may_try = open.tcp_fallback.not_before.is_none_or(|t| now >= t);
    let long_enough = unanswered.is_some_and(|waited| waited >= UDP_TRY);
    if !long_enough || !may_try {
        return Stage::Open(open);
    }
    switch_to_tcp(ctx, open, now).await
}

/// Over TCP after a move mid-session whose relay has not answered for
/// [`TCP_TRY`] (it is down, or this network blocks it too): UDP is tried
/// (`udp_again.rs`, a handshake beside the TCP) every [`TCP_TRY`] until
/// one of the two answers, as a resumed start takes turns. Without it a
/// moment's loss over UDP on a network whose relay is gone would leave
/// the call down for good.
fn give_udp_its_turn<E: Effects>(open: &mut Open<E>, now: Instant) {
    let Some(since) = open.tcp_fallback.relay_waited_since else {
        return;
    };
    let relay_answered = !open
        .recovering
        .as_ref()
        .is_some_and(|r| r.cause == Cause::TryingTcp);
    if relay_answered {
        open.tcp_fallback.relay_waited_since = None;
        open.udp_again.relay_silent = false;
        return;
    }
    if now.duration_since(since) >= TCP_TRY && open.udp_again.probing_since.is_none() {
        tracing::warn!(
            "no answer through the relay {} either; trying UDP to {} again",
            open.locked.lockdown.endpoint,
            open.locked.endpoint
        );
        open.udp_again.relay_silent = true;
        open.udp_again.next_try = now;
        open.tcp_fallback.relay_waited_since = Some(now);
    }
}

/// Persisted first, then the firewall (the relay's TCP instead of the
/// gateway's UDP), then the tunnel. A failure puts the UDP lockdown back
/// and tries again after [`UDP_TRY`]; the machine stays locked down
/// throughout.
async fn switch_to_tcp<E: Effects>(ctx: &mut Ctx<E>, mut open: Open<E>, now: Instant) -> Stage<E> {
    let Some(relay) = open.locked.profile.as_ref().and_then(|p| p.transport.relay()) else {
        return Stage::Open(open);
    };
    let gateway = open.locked.endpoint;
    tracing::warn!("the gateway {gateway} stopped answering over UDP; moving the tunnel to TCP through the relay {relay}");
    let over_udp = open.locked.lockdown.clone();
    let over_tcp = lockdown_over_tcp(&over_udp, relay);
    // If this cannot be written, a resume locks down on UDP and falls
    // back again at its start: closed either way.
    if let Err(e) = persist_transport(ctx, &over_tcp) {
        tracing::warn!("{e}");
    }
    open.locked.lockdown = over_tcp;
    if let Err(e) = reapply(ctx, &open).await {
        // A transaction: the table in force is still the one over UDP.
        tracing::warn!("could not let the tunnel's TCP to the relay {relay} through the firewall: {e}");
        return stay_on_udp(ctx, open, over_udp, now).await;
    }
    let moved = match &open.locked.tunnel {
        Some(tunnel) => ctx.effects.tunnel_use_tcp(tunnel, relay),
        None => Err("internal error: no tunnel".to_string()),
    };
    if let Err(e) = moved {
        tracing::warn!("could not move the tunnel to TCP through the relay {relay}: {e}");
        if let Err(e) = reapply_lockdown(ctx, &mut open, over_udp.clone()).await {
            tracing::warn!("could not close the relay's TCP again: {e}; retrying");
            open.udp_again.firewall_behind = true;
        }
        return stay_on_udp(ctx, open, over_udp, now).await;
    }
    open.recovering = Some(Recovering {
        cause: Cause::TryingTcp,
    });
    open.peer_lost = None;
    open.tcp_fallback.not_before = None;
    open.tcp_fallback.relay_waited_since = Some(now);
    open.udp_again = UdpAgain::new();
    Stage::Open(open)
}

/// After a failed switch: the session stays over UDP (persisted so), and
/// the next switch waits [`UDP_TRY`].
async fn stay_on_udp<E: Effects>(
    ctx: &mut Ctx<E>,
    mut open: Open<E>,
    over_udp: crate::firewall::Lockdown,
    now: Instant,
) -> Stage<E> {
    if let Err(e) = persist_transport(ctx, &over_udp) {
        tracing::warn!("{e}");
    }
    open.locked.lockdown = over_udp;
    open.tcp_fallback.not_before = Some(now + UDP_TRY);
    Stage::Open(open)
}

async fn reapply_lockdown<E: Effects>(
    ctx: &mut Ctx<E>,
    open: &mut Open<E>,
    lockdown: crate::firewall::Lockdown,
) -> Result<(), String> {
    open.locked.lockdown = lockdown;
    reapply(ctx, open).await
}
