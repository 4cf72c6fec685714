//! Open over TCP after UDP went unanswered (`transport = "auto"`): trying
//! UDP again, and going back to it when the gateway answers there.
//!
//! A session that fell back to TCP in a hotel that blocks UDP would
//! otherwise stay on TCP (head-of-line blocking on every loss, worse for a
//! call) on every network after it. So UDP is tried again when it is
//! likely to work: after the network changed (once the tunnel has its
//! handshake over the new path), and every [`RETRY_EVERY`] besides (for
//! a network that stopped blocking UDP, or a block that was only a
//! moment's loss).
//!
//! A try, in order: the firewall admits the gateway's UDP beside the
//! relay's TCP → the tunnel sends one handshake over UDP, still sending
//! everything else over TCP → if the gateway answers within [`PROBE_WAIT`]
//! the tunnel moves to UDP by itself, and the machine persists that, then
//! narrows the firewall to the gateway's UDP alone; otherwise it ends the
//! probe in the tunnel, then narrows the firewall back to the relay's TCP
//! alone. Either way the table admits exactly the flows in use.
//!
//! Never: let the tunnel send over UDP before the firewall admits it, or
//! leave the firewall admitting a flow the tunnel no longer uses.

use std::time::Duration;

use tokio::time::Instant;

use super::effects::Effects;
use super::stage::{
    allowlist_of, fell_back_to_tcp, lockdown_over_udp, persisted_transport, Open, Stage, UdpAgain,
    UdpAgainReason,
};
use super::Ctx;
use crate::firewall::Lockdown;
use crate::tunnel::OuterProtocol;

/// How often a session over TCP tries UDP again when nothing changed: one
/// handshake each time, cheap, and a call that could be on UDP is not on
/// TCP for long.
pub(crate) const RETRY_EVERY: Duration = Duration::from_secs(180);
/// Tests only: [`RETRY_EVERY`] in seconds, so a lab test sees the periodic
/// try without waiting minutes.
pub const TEST_RETRY_ENV: &str = "SESSIOND_TEST_UDP_RETRY_SECS";

/// [`RETRY_EVERY`], unless [`TEST_RETRY_ENV`] says otherwise.
fn retry_every() -> Duration {
    std::env::var(TEST_RETRY_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|secs| *secs > 0)
        .map_or(RETRY_EVERY, Duration::from_secs)
}
/// How long a probe waits for the gateway's answer over UDP: a gateway
/// that hears it answers in a round trip, and after WireGuard's 5 s retry
/// timer the next handshake goes over TCP and replaces the probe's.
pub(crate) const PROBE_WAIT: Duration = Duration::from_secs(5);

impl UdpAgain {
    /// The first try after a fall-back to TCP is [`RETRY_EVERY`] away.
    pub fn new() -> UdpAgain {
        UdpAgain {
            next_try: Instant::now() + retry_every(),
            probing_since: None,
            reason: UdpAgainReason::Periodic,
            firewall_behind: false,
            relay_silent: false,
        }
    }
}

/// One health tick of an open session: starts a try when one is due, ends
/// it when it was answered or its time is up. `path_changed`: the tunnel
/// saw a new way out since the last tick.
pub(crate) async fn on_health<E: Effects>(
    ctx: &mut Ctx<E>,
    mut open: Open<E>,
    path_changed: bool,
) -> Stage<E> {
    if open.udp_again.firewall_behind {
        open.udp_again.firewall_behind = reapply(ctx, &open).await.is_err();
    }
    if fell_back_to_tcp(&open.locked).is_none() || open.opening.is_some() {
        return Stage::Open(open);
    }
    let Some(view) = open.locked.view.clone() else {
        return Stage::Open(open);
    };
    let now = Instant::now();
    if path_changed {
        open.udp_again.next_try = now;
        open.udp_again.reason = UdpAgainReason::NetworkChanged;
    }
    match open.udp_again.probing_since {
        Some(since) => {
            if view.stats().transport == OuterProtocol::Udp {
                return back_on_udp(ctx, open).await;
            }
            if now.duration_since(since) < PROBE_WAIT {
                return Stage::Open(open);
            }
            // The tunnel first: from here on it hears no UDP and sends
            // none, so the firewall can close it.
            let answered = match &open.locked.tunnel {
                Some(tunnel) => ctx.effects.tunnel_end_udp_probe(tunnel),
                None => false,
            };
            if answered {
                return back_on_udp(ctx, open).await;
            }
            tracing::info!(
                "the gateway {} did not answer over UDP; the tunnel stays on TCP",
                open.locked.endpoint
            );
            open.udp_again.probing_since = None;
            open.udp_again.next_try = now + retry_every();
            open.udp_again.reason = UdpAgainReason::Periodic;
            open.locked.lockdown.udp_probe = None;
            if let Err(e) = reapply(ctx, &open).await {
                tracing::warn!("could not close the gateway's UDP after the probe again: {e}; retrying");
                open.udp_again.firewall_behind = true;
            }
            Stage::Open(open)
        }
        None => {
            // While the tunnel recovers over TCP, a probe's handshake would
            // replace the one it waits for.
            // Unless the relay has not answered either since a move to
            // TCP mid-session: then UDP is the call's only chance.
            let settled =
                (open.recovering.is_none() && open.peer_lost.is_none()) || open.udp_again.relay_silent;
            if now < open.udp_again.next_try || !settled {
                return Stage::Open(open);
            }
            start_probe(ctx, open, now).await
        }
    }
}

/// Firewall first (the gateway's UDP beside the relay's TCP), then the
/// tunnel's handshake over UDP.
async fn start_probe<E: Effects>(ctx: &mut Ctx<E>, mut open: Open<E>, now: Instant) -> Stage<E> {
    let gateway = open.locked.endpoint;
    let probing = Lockdown {
        udp_probe: Some(gateway),
        ..open.locked.lockdown.clone()
    };
    let before = std::mem::replace(&mut open.locked.lockdown, probing);
    if let Err(e) = reapply(ctx, &open).await {
        // A transaction: the table in force is the one before.
        tracing::warn!("could not let the tunnel try UDP to {gateway} again: {e}");
        open.locked.lockdown = before;
        open.udp_again.next_try = now + retry_every();
        return Stage::Open(open);
    }
    let sent = match &open.locked.tunnel {
        Some(tunnel) => ctx.effects.tunnel_probe_udp(tunnel),
        None => Err("internal error: no tunnel".to_string()),
    };
    if let Err(e) = sent {
        tracing::warn!("could not try UDP to {gateway} again: {e}");
        open.locked.lockdown = before;
        open.udp_again.next_try = now + retry_every();
        if let Err(e) = reapply(ctx, &open).await {
            tracing::warn!("could not close the gateway's UDP again: {e}; retrying");
            open.udp_again.firewall_behind = true;
        }
        return Stage::Open(open);
    }
    let why = match open.udp_again.reason {
        UdpAgainReason::NetworkChanged => "the network changed",
        UdpAgainReason::Periodic => "the session has been on TCP for a while",
    };
    tracing::info!("{why}: trying whether UDP reaches the gateway {gateway} again");
    open.udp_again.probing_since = Some(now);
    Stage::Open(open)
}

/// The gateway answered over UDP and the tunnel moved there: persist it
/// (a crash from here on resumes on UDP), then the firewall admits the
/// gateway's UDP alone, the relay's TCP no more.
async fn back_on_udp<E: Effects>(ctx: &mut Ctx<E>, mut open: Open<E>) -> Stage<E> {
    if let Some(tunnel) = &open.locked.tunnel {
        ctx.effects.tunnel_end_udp_probe(tunnel);
    }
    let gateway = open.locked.endpoint;
    let relay = open.locked.lockdown.endpoint;
    let over_udp = lockdown_over_udp(&open.locked.lockdown, gateway);
    if let Err(e) = persist_transport(ctx, &over_udp) {
        // The state file still says TCP: a resume from it would lock down
        // on the relay's TCP and try UDP again later. Closed either way.
        tracing::warn!("{e}");
    }
    open.locked.lockdown = over_udp;
    if let Err(e) = reapply(ctx, &open).await {
        tracing::warn!("could not close the TCP to the relay {relay}: {e}; retrying");
        open.udp_again.firewall_behind = true;
    }
    let why = match open.udp_again.reason {
        UdpAgainReason::NetworkChanged => "after the network changed",
        UdpAgainReason::Periodic => "on a periodic try",
    };
    let note = format!(
        "{why}, the gateway {gateway} answered over UDP again: the tunnel is back on UDP (the TCP to the relay {relay} is closed)"
    );
    tracing::info!("{note}");
    ctx.publish(|s| s.last_recovery = Some(note));
    open.udp_again = UdpAgain::new();
    // A move to TCP whose relay never answered is over: its note would
    // say the wrong thing.
    if open
        .recovering
        .as_ref()
        .is_some_and(|r| r.cause == crate::session::Cause::TryingTcp)
    {
        open.recovering = None;
    }
    Stage::Open(open)
}

/// Puts the open session's shape in force again with its lockdown as it
/// is now: the same allowlist (its learned addresses stay), so the
/// tunnel's own filter needs no change, and a failure leaves the table
/// in force as it was (a transaction).
pub(super) async fn reapply<E: Effects>(ctx: &mut Ctx<E>, open: &Open<E>) -> Result<(), String> {
    let allow = open
        .locked
        .profile
        .as_ref()
        .map(|p| allowlist_of(p, Some(ctx.effects.stub_port(&open.stub))));
    ctx.effects
        .apply_firewall(&open.locked.lockdown, allow.as_ref())
        .await
}

/// Rewrites the persisted session with the way out `lockdown` admits, so
/// a resume after a crash puts back the same one.
pub(crate) fn persist_transport<E: Effects>(ctx: &mut Ctx<E>, lockdown: &Lockdown) -> Result<(), String> {
    let mut persisted = ctx
        .effects
        .load_session()?
        .ok_or_else(|| "the persisted session is gone; cannot record its transport".to_string())?;
    persisted.transport = Some(persisted_transport(lockdown));
    ctx.effects
        .save_session(&persisted)
        .map_err(|e| format!("could not record the session's transport: {e}"))
}
