//! Open: the allowlist is in force with the DNS stub behind it.
//!
//! - opening: start the stub → open the allowlist with every DNS packet
//!   redirected to it (one transaction) → resolve the allowed names beside
//!   the loop → when they are in place, pin the resolver file → active;
//! - health: active ⇄ degraded (peer lost) as the peer comes and goes;
//! - reload: a new allow list or DNS server list replaces the stub, then
//!   the table, then resolves the new names; if that fails the session is
//!   locked down (blocked), never left on an allow list it no longer means.
//!
//! Never: leave the allowlist in force after a failure here; any failure
//! goes back to the bare lockdown before it reports.

use std::sync::Arc;

use futures::FutureExt;

use super::cause::{Cause, Step};
use super::effects::Effects;
use super::idle::fail;
use super::stage::{
    allowlist_of, stays_locked, Blocked, Locked, Open, Recovering, Stage, Task, TcpFallback, UdpAgain, Waiter,
};
use super::status::{allowed_hosts, AllowSink};
use super::{answer, Ctx, Event, Outcome};
use crate::profile::Profile;

impl<E: Effects> Open<E> {
    /// (Re)starts resolving the allowed names beside the loop; a resolution
    /// already running is dropped.
    pub fn resolve(&mut self, ctx: &mut Ctx<E>) {
        let resolution = ctx.effects.resolve_names(&self.stub);
        self.resolving = Some(Task::spawn(ctx, |id| {
            async move {
                resolution.await;
                Event::NamesResolved(id)
            }
            .boxed()
        }));
    }
}

/// The handshake is done: opens the allowlist.
pub(crate) async fn open_allowlist<E: Effects>(
    ctx: &mut Ctx<E>,
    locked: Locked<E>,
    waiter: Waiter,
) -> Stage<E> {
    let Some(profile) = locked.profile.clone() else {
        return fail(
            ctx,
            locked,
            waiter,
            Cause::StartFailed {
                step: Step::Allowlist,
            },
            "internal error: no profile",
        );
    };
    let stub = match start_stub(ctx, &locked, &profile).await {
        Ok(stub) => stub,
        Err(message) => {
            return fail(
                ctx,
                locked,
                waiter,
                Cause::StartFailed { step: Step::DnsStub },
                &message,
            )
        }
    };
    tracing::debug!("start: DNS stub listening");
    let allowlist = allowlist_of(&profile, Some(ctx.effects.stub_port(&stub)));
    if let Err(e) = ctx.apply_shape(&locked, Some(&allowlist)).await {
        ctx.effects.stop_stub(Arc::new(stub)).await;
        let message = format!("could not open the allowlist: {e}");
        return fail(
            ctx,
            locked,
            waiter,
            Cause::StartFailed {
                step: Step::Allowlist,
            },
            &message,
        );
    }
    tracing::debug!("start: allowlist in force");
    let path_changes_seen = locked.view.as_ref().map_or(0, |v| v.stats().path_changes);
    let mut open = Open {
        locked,
        stub: Arc::new(stub),
        resolving: None,
        opening: Some(waiter),
        peer_lost: None,
        recovering: None,
        path_changes_seen,
        udp_again: UdpAgain::new(),
        tcp_fallback: TcpFallback::default(),
    };
    open.resolve(ctx);
    Stage::Open(open)
}

async fn start_stub<E: Effects>(
    ctx: &mut Ctx<E>,
    locked: &Locked<E>,
    profile: &Profile,
) -> Result<E::Stub, String> {
    // Answers go to the firewall and to the tunnel's own filter.
    let tunnel = locked.tunnel.as_ref().map(|t| ctx.effects.tunnel_filter(t));
    let firewall = ctx.effects.answer_firewall();
    let sink = Arc::new(AllowSink::new(profile, firewall, ctx.snapshot.clone(), tunnel));
    ctx.effects
        .start_stub(profile, sink)
        .await
        .map_err(|e| format!("could not start the DNS stub: {e}"))
}

/// The allowed names are resolved (their addresses are in the allow sets
/// before any application asks): an opening session pins the resolver file
/// and is active.
pub(crate) async fn on_names_resolved<E: Effects>(ctx: &mut Ctx<E>, mut open: Open<E>) -> Stage<E> {
    open.resolving = None;
    let Some(waiter) = open.opening.take() else {
        return Stage::Open(open);
    };
    if let Err(e) = ctx.effects.pin_resolver_file() {
        let locked = close(ctx, open).await;
        return fail(
            ctx,
            locked,
            waiter,
            Cause::StartFailed {
                step: Step::ResolverFile,
            },
            &e,
        );
    }
    let stage = Stage::Open(open);
    ctx.publish_stage(&stage);
    if let Some(name) = stage.name() {
        tracing::info!("profile {name} is active");
    }
    if let Waiter::Client(reply) = waiter {
        answer(reply, Outcome::Started(ctx.report()));
    }
    stage
}

/// Takes the allowlist away again: ends the resolution, stops the stub and
/// puts back the bare lockdown (a transaction: if it fails, the table is
/// as it was, and the failure is logged for the guard's next look).
async fn close<E: Effects>(ctx: &mut Ctx<E>, open: Open<E>) -> Locked<E> {
    let Open {
        locked,
        stub,
        resolving,
        ..
    } = open;
    if let Some(task) = resolving {
        task.finish().await;
    }
    if let Err(e) = ctx.apply_shape(&locked, None).await {
        tracing::error!("could not close the allowlist again: {e}");
    }
    ctx.effects.stop_stub(stub).await;
    locked
}

/// The tunnel is asked for a fresh handshake (`cause`: a resume from
/// sleep); the session is degraded with that cause until it answers.
pub(crate) fn handshake_again<E: Effects>(open: &mut Open<E>, cause: Cause) {
    if let Some(view) = &open.locked.view {
        view.rehandshake();
    }
    open.recovering = Some(Recovering { cause });
}

/// Active ⇄ degraded as the peer comes and goes, and while the tunnel
/// handshakes again after a network change or a resume. While degraded the
/// allowlist stays as it is: traffic has nowhere to go but the tunnel.
pub(crate) fn on_health<E: Effects>(ctx: &mut Ctx<E>, mut open: Open<E>) -> Stage<E> {
    let Some(view) = open.locked.view.clone() else {
        return Stage::Open(open);
    };
    let stats = view.stats();
    if stats.path_changes > open.path_changes_seen {
        // The tunnel has already sent the new handshake from the new
        // address; the session says so until it is answered.
        open.path_changes_seen = stats.path_changes;
        open.recovering = Some(Recovering {
            cause: Cause::NetworkChanged,
        });
    }
    if let Some(recovering) = &open.recovering {
        if let Some(took) = view.rehandshake_answered() {
            let note = match recovering.cause {
                Cause::ResumedFromSleep => "after the computer woke from sleep",
                Cause::TryingTcp => "after UDP went unanswered, over TCP through the relay",
                _ => "after the network changed",
            };
            let last_recovery = format!(
                "{note}, the gateway {} answered a new handshake {} ms after it was sent",
                stats.endpoint,
                took.as_millis()
            );
            tracing::info!("{last_recovery}");
            ctx.publish(|s| s.last_recovery = Some(last_recovery));
            open.recovering = None;
        }
    }
    if open.opening.is_some() {
        return Stage::Open(open);
    }
    match (&open.peer_lost, stats.peer_reachable) {
        (None, false) => {
            open.peer_lost = Some(match stats.last_handshake_secs {
                Some(age) if age >= crate::tunnel::REJECT_AFTER.as_secs() => format!(
                    "no handshake with {} for {age} s; traffic stays blocked while the tunnel retries",
                    stats.endpoint
                ),
                _ => format!(
                    "the peer {} stopped answering; traffic stays blocked while the tunnel retries",
                    stats.endpoint
                ),
            });
        }
        (Some(_), true) => {
            tracing::info!("the peer {} answers again", stats.endpoint);
            open.peer_lost = None;
        }
        _ => {}
    }
    Stage::Open(open)
}

/// The profiles directory changed. Other profiles are read fresh on every
/// request, so only the running session's profile needs care: an invalid
/// edit is reported and ignored; a new allow list or DNS server list takes
/// effect at once; a changed tunnel section waits for the next start, and
/// status says so.
pub(crate) async fn reload<E: Effects>(ctx: &mut Ctx<E>, mut stage: Stage<E>) -> Stage<E> {
    let Some(locked) = stage.locked() else {
        return stage;
    };
    let Some(current) = locked.profile.clone() else {
        return stage;
    };
    let name = locked.name.clone();
    let edited = match ctx.effects.load_profile(&name).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("{e}; the running session keeps the profile it started with");
            return stage;
        }
    };
    let tunnel_changed = !(edited.tunnel == current.tunnel
        && edited.allow_lan == current.allow_lan
        && edited.transport == current.transport);
    let pending = tunnel_changed.then(|| {
        "the profile's tunnel section changed; it takes effect at the next `sessionctl start`".to_string()
    });
    if pending != ctx.snapshot.borrow().pending {
        if let Some(note) = &pending {
            tracing::info!("{note}");
        }
        ctx.publish(|s| s.pending = pending);
    }
    if edited.allow == current.allow && edited.dns_servers == current.dns_servers {
        return stage;
    }
    let mut updated = current;
    updated.allow = edited.allow;
    updated.dns_servers = edited.dns_servers;
    if let Some(locked) = stage.locked_mut() {
        locked.profile = Some(updated.clone());
    }
    ctx.publish(|s| s.allowed = allowed_hosts(&updated));
    let Stage::Open(open) = stage else {
        // The new lists apply when the allowlist opens.
        return stage;
    };
    // The stub's names, upstream servers and answer ports all come from the
    // profile: replace it, then the table (one transaction), then resolve
    // the new names.
    let Open {
        locked,
        stub,
        resolving,
        opening,
        peer_lost,
        recovering,
        path_changes_seen,
        udp_again,
        tcp_fallback,
    } = open;
    if let Some(task) = resolving {
        task.finish().await;
    }
    ctx.effects.stop_stub(stub).await;
    let failed = |locked: Locked<E>, opening: Option<Waiter>, message: String| {
        let problem = stays_locked(&message);
        if let Some(Waiter::Client(reply)) = opening {
            answer(
                reply,
                Outcome::Failed {
                    cause: Some(Cause::ReloadFailed),
                    message: problem.clone(),
                },
            );
        }
        Stage::Blocked(Blocked {
            locked,
            cause: Cause::ReloadFailed,
            problem,
        })
    };
    let new_stub = match start_stub(ctx, &locked, &updated).await {
        Ok(stub) => stub,
        Err(message) => {
            if let Err(e) = ctx.apply_shape(&locked, None).await {
                tracing::error!("could not close the allowlist again: {e}");
            }
            return failed(locked, opening, message);
        }
    };
    let allowlist = allowlist_of(&updated, Some(ctx.effects.stub_port(&new_stub)));
    if let Err(e) = ctx.apply_shape(&locked, Some(&allowlist)).await {
        ctx.effects.stop_stub(Arc::new(new_stub)).await;
        if let Err(e) = ctx.apply_shape(&locked, None).await {
            tracing::error!("could not close the allowlist again: {e}");
        }
        return failed(locked, opening, format!("could not open the allowlist: {e}"));
    }
    tracing::info!("profile {name} changed: the new allow list is in force");
    let mut open = Open {
        locked,
        stub: Arc::new(new_stub),
        resolving: None,
        opening,
        peer_lost,
        recovering,
        path_changes_seen,
        udp_again,
        tcp_fallback,
    };
    open.resolve(ctx);
    Stage::Open(open)
}
