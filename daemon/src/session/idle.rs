//! Leaving idle: `start`, and the resume of a persisted session when the
//! daemon starts.
//!
//! Order: remember `src_valid_mark` (a read) → persist the session with it
//! → lockdown firewall (and its guard) → tunnel → routes (told that value
//! to give back) → connecting. Until the lockdown is up a failure changes
//! nothing; after it, the machine stays locked down (blocked).
//!
//! Never: start the tunnel before the lockdown is in place, or leave a
//! persisted session behind a lockdown that failed to go up.

use std::net::SocketAddr;
use std::time::Duration;

use super::cause::{Cause, Step};
use super::effects::Effects;
use super::stage::{
    lockdown_of, lockdown_over_tcp, persisted_transport, relay_of, stays_locked, Blocked, Connecting, Locked,
    Stage, Waiter,
};
use super::status::{allowed_hosts, Phase, Snapshot};
use super::{answer, Ctx, Outcome, Responder};
use crate::firewall::{EndpointProtocol, Lockdown};
use crate::profile::{Profile, Transport};
use crate::store::{PersistedSession, PersistedTransport};
use crate::TUNNEL_FWMARK;

/// The lockdown of a persisted session: the way out it was using, the
/// relay's TCP for a session over TCP (asked for, or an `auto` one that
/// fell back), never the gateway's UDP beside it.
pub(crate) fn lockdown_of_persisted(persisted: &PersistedSession) -> Lockdown {
    let udp = Lockdown {
        endpoint: persisted.endpoint,
        fwmark: TUNNEL_FWMARK,
        tunnel_interface: persisted.interface.clone(),
        allow_lan: persisted.allow_lan,
        endpoint_protocol: EndpointProtocol::Udp,
        udp_probe: None,
    };
    match persisted.transport {
        Some(PersistedTransport::Tcp { relay }) => lockdown_over_tcp(&udp, relay),
        Some(PersistedTransport::Udp) | None => udp,
    }
}

pub(crate) async fn start<E: Effects>(ctx: &mut Ctx<E>, profile: Profile, reply: Responder) -> Stage<E> {
    tracing::debug!("start: request for profile {}", profile.name);
    // Nothing has changed yet: any failure up to the lockdown leaves the
    // machine exactly as it was.
    let endpoint = match ctx.effects.resolve_endpoint(&profile).await {
        Ok(e) => e,
        Err(message) => {
            answer(reply, Outcome::Refused(message));
            return Stage::Idle;
        }
    };
    // Read before anything changes it and kept with the session, so that
    // stop gives it back even after a crash and resume (the kernel then
    // holds the crashed run's value).
    let src_valid_mark_before = match ctx.effects.read_src_valid_mark() {
        Ok(value) => value,
        Err(e) => {
            answer(reply, Outcome::Refused(format!("{e}; nothing was changed")));
            return Stage::Idle;
        }
    };
    let lockdown = lockdown_of(&profile, endpoint);
    let persisted = PersistedSession {
        profile: profile.name.clone(),
        endpoint,
        interface: profile.tunnel.interface.clone(),
        allow_lan: profile.allow_lan,
        src_valid_mark_before: Some(src_valid_mark_before),
        transport: Some(persisted_transport(&lockdown)),
    };
    let saved = ctx.effects.save_session(&persisted);
    tracing::debug!("start: session persisted");
    if let Err(e) = saved {
        answer(reply, Outcome::Refused(format!("{e}; nothing was changed")));
        return Stage::Idle;
    }
    tracing::info!("starting profile {}", profile.name);
    ctx.publish(|s| {
        *s = Snapshot {
            phase: Phase::Starting,
            profile: Some(profile.name.clone()),
            allowed: allowed_hosts(&profile),
            ..Snapshot::idle()
        }
    });
    if let Err(e) = ctx.effects.apply_firewall(&lockdown, None).await {
        if let Err(e) = ctx.effects.clear_session() {
            tracing::error!("{e}");
        }
        ctx.publish(|s| *s = Snapshot::idle());
        answer(
            reply,
            Outcome::Refused(format!(
                "could not install the lockdown firewall: {e}; nothing was changed"
            )),
        );
        return Stage::Idle;
    }
    tracing::debug!("start: lockdown in place");
    ctx.effects.start_guard();
    tracing::debug!("start: tamper guard started");
    let timeout = profile.handshake_timeout;
    let name = profile.name.clone();
    let locked = Locked::new(&name, endpoint, lockdown, Some(profile));
    // From here on the machine is locked down; failures keep it so.
    bring_up(
        ctx,
        locked,
        Waiter::Client(reply),
        endpoint,
        Some(timeout),
        persisted.src_valid_mark_before,
    )
    .await
}

/// Starts the tunnel and its routes behind the lockdown, then waits for
/// the handshake (as an event). `src_valid_mark_before` is the persisted
/// session's, for the routes' removal to give back.
async fn bring_up<E: Effects>(
    ctx: &mut Ctx<E>,
    mut locked: Locked<E>,
    waiter: Waiter,
    endpoint: SocketAddr,
    timeout: Option<Duration>,
    src_valid_mark_before: Option<String>,
) -> Stage<E> {
    let Some(profile) = locked.profile.clone() else {
        return fail(
            ctx,
            locked,
            waiter,
            Cause::StartFailed { step: Step::Tunnel },
            "internal error: no profile",
        );
    };
    let relay = relay_of(&locked.lockdown);
    match ctx.effects.start_tunnel(&profile, endpoint, relay).await {
        Ok(tunnel) => {
            tracing::debug!("start: tunnel up");
            let view = ctx.effects.tunnel_view(&tunnel);
            locked.tunnel = Some(tunnel);
            locked.view = Some(view.clone());
            ctx.publish(|s| s.tunnel = Some(view));
        }
        Err(message) => {
            return fail(
                ctx,
                locked,
                waiter,
                Cause::StartFailed { step: Step::Tunnel },
                &message,
            )
        }
    }
    match ctx
        .effects
        .add_routes(&profile, src_valid_mark_before.as_deref())
        .await
    {
        Ok(routes) => {
            tracing::debug!("start: routes in place; waiting for the handshake");
            locked.routes = Some(routes)
        }
        Err(message) => {
            return fail(
                ctx,
                locked,
                waiter,
                Cause::StartFailed { step: Step::Routes },
                &message,
            )
        }
    }
    Stage::Connecting(Connecting::new(ctx, locked, waiter, endpoint, timeout))
}

/// A start or resume failed after the lockdown went up: it stays up.
pub(crate) fn fail<E: Effects>(
    ctx: &mut Ctx<E>,
    locked: Locked<E>,
    waiter: Waiter,
    cause: Cause,
    message: &str,
) -> Stage<E> {
    let problem = stays_locked(message);
    tracing::error!("start of profile {} failed: {problem}", locked.name);
    let stage = Stage::Blocked(Blocked {
        locked,
        cause: cause.clone(),
        problem: problem.clone(),
    });
    ctx.publish_stage(&stage);
    if let Waiter::Client(reply) = waiter {
        answer(
            reply,
            Outcome::Failed {
                cause: Some(cause),
                message: problem,
            },
        );
    }
    stage
}

/// Locks the machine down at once if a session was persisted, then brings
/// its tunnel back. An unreadable state file is an error: refuse to guess,
/// and refuse to start open.
pub(crate) async fn resume<E: Effects>(ctx: &mut Ctx<E>) -> anyhow::Result<Stage<E>> {
    let persisted = match ctx.effects.load_session() {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(Stage::Idle),
        Err(e) => anyhow::bail!("{e}; fix or remove it, then start sessiond again"),
    };
    tracing::warn!(
        "resuming the session of profile {} found in the state directory",
        persisted.profile
    );
    let lockdown = lockdown_of_persisted(&persisted);
    ctx.effects
        .apply_firewall(&lockdown, None)
        .await
        .map_err(|e| anyhow::anyhow!("could not put the lockdown back for the persisted session: {e}"))?;
    ctx.effects.start_guard();
    if let Err(e) = ctx.effects.remove_stale_routes().await {
        tracing::warn!("could not clear routing rules left by the previous run: {e}");
    }
    let name = persisted.profile.clone();
    let cannot_resume = |ctx: &mut Ctx<E>, profile: Option<Profile>, problem: String| {
        ctx.publish(|s| {
            *s = Snapshot {
                profile: Some(name.clone()),
                ..Snapshot::idle()
            }
        });
        Stage::Blocked(Blocked {
            locked: Locked::new(&name, persisted.endpoint, lockdown.clone(), profile),
            cause: Cause::CannotResume,
            problem,
        })
    };
    let profile = match ctx.effects.load_profile(&persisted.profile).await {
        Ok(p) if p.tunnel.interface == persisted.interface => p,
        Ok(p) => {
            return Ok(cannot_resume(
                ctx,
                Some(p),
                "the profile's tunnel section changed since the session started; the machine stays locked down until `sessionctl stop`".into(),
            ))
        }
        Err(e) => {
            return Ok(cannot_resume(
                ctx,
                None,
                format!("cannot resume: {e}; the machine stays locked down until `sessionctl stop`"),
            ))
        }
    };
    ctx.publish(|s| {
        *s = Snapshot {
            profile: Some(profile.name.clone()),
            allowed: allowed_hosts(&profile),
            ..Snapshot::idle()
        }
    });
    // The way out the session was using is persisted, and already in the
    // lockdown. A file from before that was persisted does not say: then
    // `transport = "tcp"` moves to the relay's TCP before the tunnel
    // starts (and `auto` starts on UDP again).
    let wanted = match (persisted.transport, profile.transport) {
        (None, Transport::Tcp { relay }) => lockdown_over_tcp(&lockdown, relay),
        _ => lockdown.clone(),
    };
    if wanted != lockdown {
        ctx.effects
            .apply_firewall(&wanted, None)
            .await
            .map_err(|e| anyhow::anyhow!("could not put the lockdown back for the persisted session: {e}"))?;
    }
    let locked = Locked::new(&name, persisted.endpoint, wanted, Some(profile));
    Ok(bring_up(
        ctx,
        locked,
        Waiter::Resume,
        persisted.endpoint,
        None,
        persisted.src_valid_mark_before,
    )
    .await)
}
