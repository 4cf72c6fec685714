//! The session state machine: the one place that decides the order in which
//! the machine is locked down, tunnelled and given back.
//!
//! `idle → starting → active ⇄ degraded → stopping → idle`, held
//! as typed stages (`stage.rs`), one file per stage for its transitions:
//!
//! - `idle.rs` — start: persist the session → lockdown firewall → tunnel →
//!   routes → connecting; and resume after a restart;
//! - `connecting.rs` — the first handshake (or its timeout) arrives as an
//!   event → open the allowlist with the DNS stub → open; with `transport
//!   = "auto"`, UDP unanswered → lockdown on the relay's TCP → tunnel over
//!   TCP → connecting again;
//! - `open.rs` — names resolved → pin the resolver file → active; the peer
//!   lost and back (health); a hot reload of the profile;
//! - `udp_again.rs` — open over TCP after UDP went unanswered: UDP is
//!   tried again (after a network change, and every few minutes) and the
//!   session goes back to it when the gateway answers there;
//! - `tcp_fallback.rs` — open over UDP with `transport = "auto"`: the
//!   gateway stops answering there (a network that blocks UDP) → persisted
//!   over TCP → the firewall admits the relay's TCP instead → the tunnel
//!   moves to TCP;
//! - `blocked.rs` — locked down with a cause;
//! - `stop.rs` — from any stage: resolver file → stub → tunnel → routes →
//!   firewall removed → persisted session cleared → idle.
//!
//! The tunnel's own allow filter (what it may encrypt, independent of
//! nftables) follows the firewall: every change of the session's shape goes
//! through `Ctx::apply_shape`, which sets the tunnel's first.
//!
//! A failure after the lockdown went up leaves it up (blocked, with a
//! [`Cause`]); only `stop` takes it down. Nothing waits inside the loop: the
//! handshake, its timeout, name resolution and verify's probes run beside
//! it and report as events, so `stop` can cancel a waiting start, `status`
//! answers at once, and the tamper guard is served in every stage.
//!
//! Every side effect goes through [`Effects`] (`effects.rs`); this module
//! never builds packets, routes or rules itself, and never builds a control
//! reply: it answers with an [`Outcome`] that the server turns into one.

mod blocked;
use sessiongate_common::cause;
mod connecting;
mod effects;
mod idle;
mod open;
mod portal;
mod stage;
mod status;
mod stop;
mod tcp_fallback;
#[cfg(test)]
mod tests;
mod udp_again;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

pub use cause::{Cause, Step};
pub use effects::{Effects, SystemEffects, TunnelView};
pub use portal::PortalReport;
pub use status::{AllowedHost, Phase, Snapshot, StatusReport};

use crate::firewall::{Allowlist, Firewall};
use crate::nft::NftRunner;
use crate::profile::Profile;
use crate::store::SessionStore;
use crate::{sleep, verify};
use stage::{Locked, Stage, Task};

/// How often the health check looks at the tunnel.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// What a command came to; the server turns it into a control reply.
#[derive(Debug)]
pub enum Outcome {
    /// `start`: the session is active; its status.
    Started(StatusReport),
    /// `stop`: normal networking is back (or there was nothing to stop).
    Stopped(String),
    /// `verify`: the probes' report.
    Verified(verify::Report),
    /// Refused or failed before anything changed.
    Refused(String),
    /// Failed after something changed; the cause says where it stands.
    Failed { cause: Option<Cause>, message: String },
    /// `portal`: the namespace is open.
    Portal(PortalReport),
}

pub(crate) type Responder = oneshot::Sender<Outcome>;

/// Requests the state machine acts on, one at a time.
pub enum Command {
    Start {
        profile: Box<Profile>,
        reply: Responder,
    },
    Stop {
        reply: Responder,
    },
    Verify {
        reply: Responder,
    },
    /// Something in the profiles directory changed (hot reload).
    ProfilesChanged,
    /// `portal`, from the user `uid` (the socket's peer credentials).
    Portal {
        request: sessiongate_common::control::PortalRequest,
        uid: u32,
        reply: Responder,
    },
}

/// What the tasks beside the loop report.
pub(crate) enum Event {
    Handshake(u64),
    HandshakeTimeout(u64),
    /// `transport = "auto"`: UDP got no handshake in its time.
    UdpUnanswered(u64),
    /// `transport = "auto"` resumed over TCP: the relay got no handshake
    /// in its time.
    TcpUnanswered(u64),
    NamesResolved(u64),
    Verified(u64, Result<verify::Report, String>),
}

/// The handle the control server uses.
#[derive(Clone)]
pub struct SessionHandle {
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Snapshot>,
}

impl SessionHandle {
    /// Answers from the published snapshot, without asking the machine.
    pub fn status(&self) -> StatusReport {
        self.snapshot.borrow().report()
    }

    /// The published snapshots, for a client that follows the session
    /// (`watch`): each change of stage, problem or allowed addresses.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.clone()
    }

    pub async fn start(&self, profile: Profile) -> Outcome {
        self.ask(|reply| Command::Start {
            profile: Box::new(profile),
            reply,
        })
        .await
    }

    pub async fn stop(&self) -> Outcome {
        self.ask(|reply| Command::Stop { reply }).await
    }

    pub async fn verify(&self) -> Outcome {
        self.ask(|reply| Command::Verify { reply }).await
    }

    /// `portal` for the user `uid`.
    pub async fn portal(&self, request: sessiongate_common::control::PortalRequest, uid: u32) -> Outcome {
        self.ask(|reply| Command::Portal { request, uid, reply }).await
    }

    /// Asks the state machine to look at the profiles again. Never blocks:
    /// if a reload is already queued, that one covers this change too.
    pub fn profiles_changed(&self) {
        let _ = self.commands.try_send(Command::ProfilesChanged);
    }

    async fn ask(&self, make: impl FnOnce(Responder) -> Command) -> Outcome {
        let gone = || Outcome::Refused("sessiond is shutting down".into());
        let (tx, rx) = oneshot::channel();
        if self.commands.send(make(tx)).await.is_err() {
            return gone();
        }
        rx.await.unwrap_or_else(|_| gone())
    }
}

/// Where the daemon keeps things; filled from the command line.
#[derive(Debug, Clone)]
pub struct Paths {
    pub profiles: PathBuf,
    pub state_dir: PathBuf,
    pub resolv_conf: PathBuf,
}

/// What the transitions share: the side effects, the published snapshot
/// and the channel the tasks beside the loop report on.
pub(crate) struct Ctx<E: Effects> {
    pub effects: E,
    /// Shared with the DNS answer sink, which adds resolved addresses.
    pub snapshot: Arc<watch::Sender<Snapshot>>,
    pub events: mpsc::UnboundedSender<Event>,
    next_id: u64,
}

impl<E: Effects> Ctx<E> {
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn publish(&self, f: impl FnOnce(&mut Snapshot)) {
        self.snapshot.send_modify(f);
    }

    /// Publishes the phase, cause and problem the stage stands for.
    pub fn publish_stage(&self, stage: &Stage<E>) {
        let (phase, cause, problem) = stage.published();
        let (old, old_problem) = {
            let s = self.snapshot.borrow();
            (s.phase, s.problem.clone())
        };
        if old != phase {
            tracing::info!("session phase: {old:?} -> {phase:?}");
        }
        if let Some(problem) = problem.as_ref().filter(|p| old_problem.as_ref() != Some(*p)) {
            tracing::warn!("{problem}");
        }
        self.publish(|s| {
            s.phase = phase;
            s.cause = cause;
            s.problem = problem;
        });
    }

    pub fn report(&self) -> StatusReport {
        self.snapshot.borrow().report()
    }

    /// Puts the lockdown (`allow` = None) or the allowlist in force for a
    /// session: the tunnel's own filter first, then the firewall, so a
    /// narrowing holds in the tunnel before the table changes. If the
    /// firewall refuses an allowlist the tunnel goes back to encrypting
    /// nothing (the callers then lock the firewall down too).
    pub async fn apply_shape(&mut self, locked: &Locked<E>, allow: Option<&Allowlist>) -> Result<(), String> {
        if let Some(tunnel) = &locked.tunnel {
            self.effects.set_tunnel_allow(tunnel, allow);
        }
        let applied = self.effects.apply_firewall(&locked.lockdown, allow).await;
        if applied.is_err() && allow.is_some() {
            if let Some(tunnel) = &locked.tunnel {
                self.effects.set_tunnel_allow(tunnel, None);
            }
        }
        applied
    }
}

pub(crate) fn answer(reply: Responder, outcome: Outcome) {
    let _ = reply.send(outcome);
}

/// A verify in progress: its probes run beside the loop.
struct Verifying {
    task: Task,
    reply: Responder,
}

pub struct SessionMachine<E: Effects = SystemEffects> {
    commands: mpsc::Receiver<Command>,
    events: mpsc::UnboundedReceiver<Event>,
    ctx: Ctx<E>,
    stage: Stage<E>,
    verifying: Option<Verifying>,
    /// The captive-portal namespace, while it is open.
    portal: Option<portal::OpenPortal>,
}

/// Creates the state machine and its handle; its firewall reaches nft
/// through `nft`. Call [`SessionMachine::resume`] before serving clients,
/// then [`SessionMachine::run`].
pub fn new(paths: Paths, nft: NftRunner) -> (SessionMachine, SessionHandle) {
    with_effects(SystemEffects::new(&paths, nft))
}

/// The machine on other side effects (the unit tests' recorder).
pub fn with_effects<E: Effects>(effects: E) -> (SessionMachine<E>, SessionHandle) {
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let (event_tx, event_rx) = mpsc::unbounded_channel();
    let (snap_tx, snap_rx) = watch::channel(Snapshot::idle());
    (
        SessionMachine {
            commands: cmd_rx,
            events: event_rx,
            ctx: Ctx {
                effects,
                snapshot: Arc::new(snap_tx),
                events: event_tx,
                next_id: 0,
            },
            stage: Stage::Idle,
            verifying: None,
            portal: None,
        },
        SessionHandle {
            commands: cmd_tx,
            snapshot: snap_rx,
        },
    )
}

/// For a sessiond that refuses to run (its startup trust check failed) while
/// a session is persisted: puts that session's lockdown back before the
/// process exits, so a refusal after a reboot leaves the machine closed
/// rather than open. Only the state file is read; nothing from the profiles
/// (which are what the check distrusts). A lockdown from a state file someone
/// else could have written is still a lockdown: it lets out nothing but the
/// tunnel's marked flow to one endpoint (its UDP, or its TCP to a relay
/// when the session was over TCP). Returns the persisted profile's name
/// when it locked down. No session machine (and so no other firewall) runs
/// in such a process.
pub async fn lock_down_persisted(
    nft: NftRunner,
    state_dir: &std::path::Path,
) -> anyhow::Result<Option<String>> {
    let Some(persisted) = SessionStore::new(state_dir).load()? else {
        return Ok(None);
    };
    Firewall::new(nft)
        .apply(&idle::lockdown_of_persisted(&persisted), None)
        .await
        .map_err(|e| anyhow::anyhow!("could not put the lockdown back for the persisted session: {e}"))?;
    Ok(Some(persisted.profile))
}

impl<E: Effects> SessionMachine<E> {
    /// Locks the machine down at once if a session was persisted (after a
    /// crash or a reboot), then brings its tunnel back. Errors here are
    /// reported in the status; the lockdown stays whatever happens after it.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        self.stage = idle::resume(&mut self.ctx).await?;
        self.ctx.publish_stage(&self.stage);
        Ok(())
    }

    /// Serves commands and events until `shutdown` fires. A running session
    /// is left in place on shutdown: the daemon's exit must never open the
    /// machine.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut health = tokio::time::interval(HEALTH_INTERVAL);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut clocks = sleep::ClockWatch::new(sleep::system_clocks);
        let (woke_tx, mut woke) = mpsc::unbounded_channel();
        sleep::listen_for_resume(woke_tx);
        loop {
            tokio::select! {
                _ = crate::shutdown_requested(&mut shutdown) => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    None => break,
                },
                Some(event) = self.events.recv() => self.on_event(event).await,
                _ = self.ctx.effects.firewall_changed() => self.on_firewall_changed().await,
                Some(()) = woke.recv() => self.on_resumed("logind says the computer woke from sleep"),
                _ = health.tick() => {
                    if let Some(slept) = clocks.slept() {
                        self.on_resumed(&format!(
                            "the clocks say the computer slept for about {} s",
                            slept.as_secs()
                        ));
                    }
                    // systemd's watchdog: the state machine is alive and
                    // looking after the tunnel.
                    ping_watchdog();
                    self.on_health().await;
                    self.on_portal_timer().await;
                    // The guard's backstop: should its monitor ever miss a
                    // change, the table is back within a tick all the same.
                    self.on_firewall_changed().await
                }
            }
        }
        // The portal namespace lives only as long as this sessiond (its
        // timer is here): it goes, and its exception with it.
        if self.portal.is_some() {
            if let Err(e) = self.close_portal().await {
                tracing::error!("could not remove the portal namespace: {e}");
            }
        }
        if let Some(name) = self.stage.name() {
            tracing::warn!(
                "sessiond is exiting during the session of profile {name}; the lockdown stays until sessiond resumes it or `sessionctl stop`"
            );
        }
    }

    pub(crate) async fn on_command(&mut self, command: Command) {
        match command {
            Command::Start { profile, reply } => {
                if let Some(name) = self.stage.name() {
                    return answer(
                        reply,
                        Outcome::Refused(format!(
                            "a session with profile {name} is already running; run `sessionctl stop` first"
                        )),
                    );
                }
                // The portal was for getting onto this network; the
                // session's lockdown starts without its exception.
                if self.portal.is_some() {
                    if let Err(e) = self.close_portal().await {
                        tracing::error!("could not remove the portal namespace: {e}");
                    }
                }
                self.stage = idle::start(&mut self.ctx, *profile, reply).await;
            }
            Command::Stop { reply } => {
                // Verify's probes never run while the firewall goes away.
                if let Some(verifying) = self.verifying.take() {
                    verifying.task.finish().await;
                    answer(
                        verifying.reply,
                        Outcome::Refused("verify was cancelled: the session is being stopped".into()),
                    );
                }
                let stage = std::mem::take(&mut self.stage);
                self.stage = stop::stop(&mut self.ctx, stage, reply).await;
            }
            Command::Verify { reply } => self.start_verify(reply),
            Command::Portal { request, uid, reply } => self.on_portal(request, uid, reply).await,
            Command::ProfilesChanged => {
                let stage = std::mem::take(&mut self.stage);
                self.stage = open::reload(&mut self.ctx, stage).await;
            }
        }
        self.ctx.publish_stage(&self.stage);
    }

    pub(crate) async fn on_event(&mut self, event: Event) {
        let stage = std::mem::take(&mut self.stage);
        self.stage = match (event, stage) {
            (Event::Handshake(id), Stage::Connecting(c)) if c.id == id => {
                connecting::on_handshake(&mut self.ctx, c).await
            }
            (Event::HandshakeTimeout(id), Stage::Connecting(c)) if c.id == id => {
                connecting::on_timeout(&mut self.ctx, c)
            }
            (Event::UdpUnanswered(id), Stage::Connecting(c)) if c.id == id => {
                connecting::on_udp_unanswered(&mut self.ctx, c).await
            }
            (Event::TcpUnanswered(id), Stage::Connecting(c)) if c.id == id => {
                connecting::on_tcp_unanswered(&mut self.ctx, c).await
            }
            (Event::NamesResolved(id), Stage::Open(o))
                if o.resolving.as_ref().is_some_and(|t| t.id == id) =>
            {
                open::on_names_resolved(&mut self.ctx, o).await
            }
            (Event::Verified(id, result), stage) => {
                if let Some(verifying) = self.verifying.take_if(|v| v.task.id == id) {
                    answer(
                        verifying.reply,
                        match result {
                            Ok(report) => Outcome::Verified(report),
                            Err(message) => Outcome::Failed { cause: None, message },
                        },
                    );
                }
                stage
            }
            // A late event of a stage that has ended.
            (_, stage) => stage,
        };
        self.ctx.publish_stage(&self.stage);
    }

    /// Someone changed the ruleset: put back the shape of the current stage
    /// if our table is gone or damaged.
    pub(crate) async fn on_firewall_changed(&mut self) {
        let Some((lockdown, allow)) = self.stage.firewall_shape(&self.ctx.effects) else {
            self.ctx.effects.stop_guard();
            return;
        };
        match self.ctx.effects.firewall_present().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot read the firewall back: {e}"),
        }
        let started = Instant::now();
        match self.ctx.effects.apply_firewall(&lockdown, allow.as_ref()).await {
            Ok(()) => tracing::warn!(
                "the sessiongate firewall table was removed or damaged by something else; put it back in {} ms",
                started.elapsed().as_millis()
            ),
            Err(e) => {
                tracing::error!("the sessiongate firewall table was removed and putting it back failed: {e}");
                return;
            }
        }
        // The learned addresses went with the old table.
        if let Stage::Open(open) = &mut self.stage {
            open.resolve(&mut self.ctx);
        }
    }

    /// The computer woke from sleep: the gateway may have dropped the
    /// session's keys while the tunnel's timers stood still, so the tunnel
    /// handshakes again at once instead of after its timers notice.
    pub(crate) fn on_resumed(&mut self, how: &str) {
        let Some(view) = self.stage.locked().map(|locked| locked.view.clone()) else {
            return;
        };
        tracing::info!("{how}; handshaking again");
        match &mut self.stage {
            Stage::Open(open) if open.opening.is_none() => {
                open::handshake_again(open, Cause::ResumedFromSleep)
            }
            _ => {
                if let Some(view) = view {
                    view.rehandshake();
                }
            }
        }
        self.ctx.publish_stage(&self.stage);
    }

    pub(crate) async fn on_health(&mut self) {
        let stage = std::mem::take(&mut self.stage);
        let path_changes_before = match &stage {
            Stage::Open(o) => Some(o.path_changes_seen),
            _ => None,
        };
        self.stage = match stage {
            Stage::Open(o) => open::on_health(&mut self.ctx, o),
            Stage::Blocked(b) => blocked::on_health(&mut self.ctx, b).await,
            other => other,
        };
        let mut path_changed = false;
        if let (Stage::Open(o), Some(before)) = (&self.stage, path_changes_before) {
            if o.path_changes_seen > before {
                path_changed = true;
                self.refresh_networks().await;
            }
        }
        self.stage = match std::mem::take(&mut self.stage) {
            Stage::Open(o) => udp_again::on_health(&mut self.ctx, o, path_changed).await,
            other => other,
        };
        self.stage = match std::mem::take(&mut self.stage) {
            Stage::Open(o) => tcp_fallback::on_health(&mut self.ctx, o).await,
            other => other,
        };
        self.ctx.publish_stage(&self.stage);
    }

    /// The way to the gateway changed (another network, a new lease): the
    /// firewall reads the directly connected subnets only when it is
    /// applied, so the same shape goes in again. Otherwise `allow_lan`
    /// would still open the old network's subnet (reachable now only
    /// through the new router, in clear) and keep the new one closed, and
    /// DHCP renewals to the new subnet's server would be refused.
    async fn refresh_networks(&mut self) {
        let Some((_, allow)) = self.stage.firewall_shape(&self.ctx.effects) else {
            return;
        };
        let Some(locked) = self.stage.locked() else {
            return;
        };
        let lockdown = locked.lockdown.clone();
        match self.ctx.effects.apply_firewall(&lockdown, allow.as_ref()).await {
            Ok(()) => tracing::info!("the network changed: the firewall now knows the new local subnets"),
            // The table in force stays (a transaction): closed to the new
            // subnets, which is the safe side.
            Err(e) => tracing::warn!("could not bring the firewall's local subnets up to date: {e}"),
        }
    }

    fn start_verify(&mut self, reply: Responder) {
        if self.stage.name().is_none() {
            return answer(reply, Outcome::Refused(verify::NEEDS_SESSION.into()));
        }
        if self.verifying.is_some() {
            return answer(
                reply,
                Outcome::Refused("a verify is already running; wait for it to finish".into()),
            );
        }
        let probes = self.ctx.effects.verify(self.ctx.report());
        let task = Task::spawn(&mut self.ctx, |id| {
            Box::pin(async move { Event::Verified(id, probes.await) })
        });
        self.verifying = Some(Verifying { task, reply });
    }
}

/// Tells systemd's watchdog the daemon is alive (nothing without systemd).
fn ping_watchdog() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
}
