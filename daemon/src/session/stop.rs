//! Stop, from any stage: DNS first (the resolver file goes back while the
//! stub still answers) → stub → tunnel down with the firewall still closed
//! around it → routes → tamper guard off → firewall removed → persisted
//! session cleared → idle. A start still waiting is cancelled first.
//!
//! A failure part-way leaves the machine locked down (blocked, bare
//! lockdown), never open; `stop` can be run again.
//!
//! Never: remove the firewall while the tunnel or its routes are still up,
//! or while the tamper guard could put it back.

use super::cause::Cause;
use super::effects::Effects;
use super::stage::{Blocked, Locked, Open, Stage, Waiter};
use super::status::{Phase, Snapshot};
use super::{answer, Ctx, Outcome, Responder};

pub(crate) async fn stop<E: Effects>(ctx: &mut Ctx<E>, stage: Stage<E>, reply: Responder) -> Stage<E> {
    let (mut locked, open, waiter) = match stage {
        Stage::Idle => {
            leftover(ctx, reply).await;
            return Stage::Idle;
        }
        Stage::Connecting(c) => (c.locked, None, Some(c.waiter)),
        Stage::Blocked(b) => (b.locked, None, None),
        Stage::Open(o) => {
            let Open {
                locked,
                stub,
                resolving,
                opening,
                ..
            } = o;
            (locked, Some((stub, resolving)), opening)
        }
    };
    if let Some(Waiter::Client(waiting)) = waiter {
        answer(
            waiting,
            Outcome::Failed {
                cause: Some(Cause::Cancelled),
                message: "the start was cancelled by `sessionctl stop`".into(),
            },
        );
    }
    tracing::info!("stopping the session of profile {}", locked.name);
    ctx.publish(|s| {
        s.phase = Phase::Stopping;
        s.problem = None;
        s.cause = None;
    });
    // DNS first: the resolver file goes back while the stub still answers.
    let restored = ctx.effects.restore_resolver_file();
    if let Some((stub, resolving)) = open {
        if let Some(task) = resolving {
            task.finish().await;
        }
        ctx.effects.stop_stub(stub).await;
    }
    if let Err(e) = restored {
        return failed(ctx, locked, reply, e).await;
    }
    // Tunnel down next, with the firewall still closed around it.
    if let Some(tunnel) = locked.tunnel.take() {
        ctx.effects.stop_tunnel(tunnel).await;
    }
    locked.view = None;
    ctx.publish(|s| s.tunnel = None);
    if let Some(routes) = locked.routes.take() {
        if let Err(e) = ctx.effects.remove_routes(routes).await {
            let message = format!("could not remove the session's routes: {e}");
            return failed(ctx, locked, reply, message).await;
        }
    }
    // The firewall goes last. Stop the tamper guard first, or it would put
    // the table straight back.
    ctx.effects.stop_guard();
    if let Err(e) = ctx.effects.remove_firewall().await {
        ctx.effects.start_guard();
        let message = format!("could not remove the firewall: {e}");
        return failed(ctx, locked, reply, message).await;
    }
    ctx.publish(|s| *s = Snapshot::idle());
    if let Err(e) = ctx.effects.clear_session() {
        // The network is back; a stale state file would lock the machine
        // down again at the next daemon start, so say so loudly.
        tracing::error!("{e}");
        answer(
            reply,
            Outcome::Failed {
                cause: Some(Cause::StoreNotCleared),
                message: format!(
                    "normal networking is back, but {e}; remove it by hand or the next start of sessiond locks the machine down again"
                ),
            },
        );
        return Stage::Idle;
    }
    tracing::info!("session stopped; normal networking is back");
    answer(
        reply,
        Outcome::Stopped("session stopped; normal networking is back".into()),
    );
    Stage::Idle
}

/// Stop with no session: nothing of ours should be in force, but a lockdown
/// can be left without one: the early-boot unit's (a session whose state
/// could not be read), or one whose state file was removed by hand. Only an
/// explicit stop opens the machine, so this is where it goes.
async fn leftover<E: Effects>(ctx: &mut Ctx<E>, reply: Responder) {
    match ctx.effects.firewall_exists().await {
        Ok(false) => answer(reply, Outcome::Stopped("no session is running".into())),
        Ok(true) => match ctx.effects.remove_firewall().await {
            Ok(()) => {
                tracing::warn!("removed a lockdown that no session owned");
                answer(
                    reply,
                    Outcome::Stopped(
                        "no session was running, but a lockdown was left in place; it is removed and normal networking is back".into(),
                    ),
                )
            }
            Err(e) => answer(
                reply,
                Outcome::Failed {
                    cause: Some(Cause::StopFailed),
                    message: format!(
                        "a lockdown with no session is in place and could not be removed: {e}; the machine stays locked down"
                    ),
                },
            ),
        },
        Err(e) => answer(
            reply,
            Outcome::Failed {
                cause: None,
                message: format!("could not check for a leftover lockdown: {e}"),
            },
        ),
    }
}

/// Stop failed part-way: whatever is left stays behind the bare lockdown.
async fn failed<E: Effects>(
    ctx: &mut Ctx<E>,
    locked: Locked<E>,
    reply: Responder,
    message: String,
) -> Stage<E> {
    let problem = format!("{message}; the machine stays locked down, try `sessionctl stop` again");
    if let Err(e) = ctx.effects.apply_firewall(&locked.lockdown, None).await {
        tracing::error!("could not put the bare lockdown in place: {e}");
    }
    let stage = Stage::Blocked(Blocked {
        locked,
        cause: Cause::StopFailed,
        problem: problem.clone(),
    });
    ctx.publish_stage(&stage);
    answer(
        reply,
        Outcome::Failed {
            cause: Some(Cause::StopFailed),
            message: problem,
        },
    );
    stage
}
