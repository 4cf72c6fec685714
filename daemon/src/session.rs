//! The session state machine: the one place that decides the order in which
//! the machine is locked down, tunnelled and given back.
//!
//! `idle → starting → active ⇄ degraded → stopping → idle` (SPEC §4).
//!
//! - start: persist the session → lockdown firewall → tunnel and routes →
//!   handshake → open the allowlist → active;
//! - stop: tunnel and routes down → firewall removed → persisted session
//!   cleared → idle;
//! - a failure after the lockdown went up leaves it up (degraded, with the
//!   reason); only `stop` takes it down;
//! - on daemon start a persisted session is locked down at once and resumed.
//!
//! The modules below (firewall, tunnel, routing, state) only do what they are
//! told; this module never builds packets, routes or rules itself.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::control::{ErrorKind, Reply};
use crate::dns::{Addresses, AnswerSink, StubConfig, StubResolver};
use crate::firewall::{self, AllowEntry, Allowlist, DnsRedirect, FirewallWatch, LearnedAddress, Lockdown};
use crate::profile::{Host, Profile};
use crate::resolvconf::{Pinned, ResolverFile};
use crate::routing::{self, RouteConfig, Routes};
use crate::state::{PersistedSession, StateDir};
use crate::tunnel::{Tunnel, TunnelConfig, TunnelMonitor, TunnelStats};
use crate::{DNS_STUB_MARK, ROUTE_TABLE, TUNNEL_FWMARK};

/// How often the health check looks at the tunnel.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// An answered address stays allowed at least this long, whatever its TTL,
/// plus a grace period so a connection opened just before expiry works.
const MIN_ALLOW_SECS: u32 = 60;
const ALLOW_GRACE_SECS: u32 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Idle,
    Starting,
    Active,
    Degraded,
    Stopping,
}

/// One `[[allow]]` entry as `status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AllowedHost {
    pub host: String,
    pub addresses: Vec<String>,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
}

/// What `status` reports (SPEC §2).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusReport {
    pub state: State,
    pub profile: Option<String>,
    pub tunnel: Option<TunnelStats>,
    pub allowed: Vec<AllowedHost>,
    /// Why the session is not simply active, in one sentence, if it is not.
    pub problem: Option<String>,
    /// A profile change that waits for the next start, if any.
    pub pending: Option<String>,
}

/// The state machine's published view; the tunnel's live numbers are read
/// from its monitor when a status is asked for.
#[derive(Clone)]
pub struct Snapshot {
    pub state: State,
    pub profile: Option<String>,
    pub allowed: Vec<AllowedHost>,
    pub problem: Option<String>,
    pub pending: Option<String>,
    pub tunnel: Option<TunnelMonitor>,
}

impl Snapshot {
    fn idle() -> Snapshot {
        Snapshot {
            state: State::Idle,
            profile: None,
            allowed: Vec::new(),
            problem: None,
            pending: None,
            tunnel: None,
        }
    }

    pub fn report(&self) -> StatusReport {
        StatusReport {
            state: self.state,
            profile: self.profile.clone(),
            tunnel: self.tunnel.as_ref().map(TunnelMonitor::stats),
            allowed: self.allowed.clone(),
            problem: self.problem.clone(),
            pending: self.pending.clone(),
        }
    }
}

/// Requests the state machine acts on, one at a time.
pub enum Command {
    Start {
        profile: Box<Profile>,
        reply: oneshot::Sender<Reply>,
    },
    Stop {
        reply: oneshot::Sender<Reply>,
    },
    /// Something in the profiles directory changed (hot reload).
    ProfilesChanged,
}

/// The handle the control server uses.
#[derive(Clone)]
pub struct SessionHandle {
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Snapshot>,
}

impl SessionHandle {
    pub fn status(&self) -> StatusReport {
        self.snapshot.borrow().report()
    }

    pub async fn start(&self, profile: Profile) -> Reply {
        self.ask(|reply| Command::Start {
            profile: Box::new(profile),
            reply,
        })
        .await
    }

    pub async fn stop(&self) -> Reply {
        self.ask(|reply| Command::Stop { reply }).await
    }

    /// Asks the state machine to look at the profiles again. Never blocks:
    /// if a reload is already queued, that one covers this change too.
    pub fn profiles_changed(&self) {
        let _ = self.commands.try_send(Command::ProfilesChanged);
    }

    async fn ask(&self, make: impl FnOnce(oneshot::Sender<Reply>) -> Command) -> Reply {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(make(tx)).await.is_err() {
            return Reply::error(ErrorKind::Failed, "sessiond is shutting down");
        }
        rx.await
            .unwrap_or_else(|_| Reply::error(ErrorKind::Failed, "sessiond is shutting down"))
    }
}

/// Where the daemon keeps things; filled from the command line.
#[derive(Debug, Clone)]
pub struct Paths {
    pub profiles: PathBuf,
    pub state_dir: PathBuf,
    pub resolv_conf: PathBuf,
}

/// What a session holds while it runs. Everything but `lockdown` may be
/// missing when a start failed part-way or a resumed profile is gone.
struct Running {
    name: String,
    lockdown: Lockdown,
    profile: Option<Profile>,
    tunnel: Option<Tunnel>,
    routes: Option<Routes>,
    /// The DNS stub, running once the allowlist is open.
    stub: Option<StubResolver>,
    /// Whether the firewall has the session shape (allowlist open) rather
    /// than the bare lockdown.
    allowlist_open: bool,
}

impl Running {
    fn new(name: &str, lockdown: Lockdown, profile: Option<Profile>) -> Running {
        Running {
            name: name.to_string(),
            lockdown,
            profile,
            tunnel: None,
            routes: None,
            stub: None,
            allowlist_open: false,
        }
    }

    /// The firewall shape this session should have right now.
    fn allowlist(&self) -> Option<Allowlist> {
        match (&self.profile, self.allowlist_open) {
            (Some(profile), true) => Some(allowlist_of(profile, self.stub.as_ref())),
            _ => None,
        }
    }
}

pub struct SessionMachine {
    commands: mpsc::Receiver<Command>,
    /// Shared with the DNS answer sink, which adds resolved addresses.
    snapshot: Arc<watch::Sender<Snapshot>>,
    paths: Paths,
    state: StateDir,
    resolver_file: ResolverFile,
    running: Option<Running>,
    /// Watches our nftables table while a session runs (tamper guard).
    guard: Option<FirewallWatch>,
}

/// Creates the state machine and its handle. Call [`SessionMachine::resume`]
/// before serving clients, then [`SessionMachine::run`].
pub fn new(paths: Paths) -> (SessionMachine, SessionHandle) {
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let (snap_tx, snap_rx) = watch::channel(Snapshot::idle());
    (
        SessionMachine {
            commands: cmd_rx,
            snapshot: Arc::new(snap_tx),
            state: StateDir::new(&paths.state_dir),
            resolver_file: ResolverFile::new(&paths.resolv_conf, &paths.state_dir),
            paths,
            running: None,
            guard: None,
        },
        SessionHandle {
            commands: cmd_tx,
            snapshot: snap_rx,
        },
    )
}

/// Puts back the lockdown that protects a persisted session until its
/// tunnel is back, and returns it.
async fn lock_down(persisted: &PersistedSession) -> anyhow::Result<Lockdown> {
    let lockdown = Lockdown {
        endpoint: persisted.endpoint,
        fwmark: TUNNEL_FWMARK,
        tunnel_interface: persisted.interface.clone(),
        allow_lan: persisted.allow_lan,
    };
    firewall::apply(&lockdown, None)
        .await
        .map_err(|e| anyhow::anyhow!("could not put the lockdown back for the persisted session: {e}"))?;
    Ok(lockdown)
}

/// For a sessiond that refuses to run (its startup trust check failed) while
/// a session is persisted: puts that session's lockdown back before the
/// process exits, so a refusal after a reboot leaves the machine closed
/// rather than open. Only the state file is read; nothing from the profiles
/// (which are what the check distrusts). A lockdown from a state file someone
/// else could have written is still a lockdown: it lets out nothing but the
/// tunnel's marked UDP to one endpoint. Returns the persisted profile's name
/// when it locked down.
pub async fn lock_down_persisted(state_dir: &std::path::Path) -> anyhow::Result<Option<String>> {
    let Some(persisted) = StateDir::new(state_dir).load()? else {
        return Ok(None);
    };
    lock_down(&persisted).await?;
    Ok(Some(persisted.profile))
}

impl SessionMachine {
    /// Locks the machine down at once if a session was persisted (after a
    /// crash or a reboot), then brings its tunnel back. Errors here are
    /// reported in the status; the lockdown stays whatever happens after it.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let persisted = match self.state.load() {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(()),
            Err(e) => {
                // A state file we cannot read may still mean a session was
                // running: refuse to guess, and refuse to start open.
                anyhow::bail!("{e}; fix or remove it, then start sessiond again");
            }
        };
        tracing::warn!(
            "resuming the session of profile {} found in the state directory",
            persisted.profile
        );
        let lockdown = lock_down(&persisted).await?;
        self.start_guard();
        if let Err(e) = routing::remove_stale(TUNNEL_FWMARK, ROUTE_TABLE).await {
            tracing::warn!("could not clear routing rules left by the previous run: {e}");
        }
        let profile_path = self.paths.profiles.join(format!("{}.toml", persisted.profile));
        let profile = Profile::load(&profile_path);
        self.running = Some(Running::new(
            &persisted.profile,
            lockdown,
            profile.as_ref().ok().cloned(),
        ));
        let profile = match profile {
            Ok(p) if p.tunnel.interface == persisted.interface => p,
            Ok(_) => {
                self.publish_locked(
                    &persisted.profile,
                    "the profile's tunnel section changed since the session started; the machine stays locked down until `sessionctl stop`".into(),
                );
                return Ok(());
            }
            Err(e) => {
                self.publish_locked(
                    &persisted.profile,
                    format!("cannot resume: {e}; the machine stays locked down until `sessionctl stop`"),
                );
                return Ok(());
            }
        };
        self.publish(|s| {
            *s = Snapshot {
                state: State::Degraded,
                profile: Some(profile.name.clone()),
                allowed: allowed_hosts(&profile),
                problem: Some("resuming after a restart: waiting for the tunnel's handshake".into()),
                pending: None,
                tunnel: None,
            }
        });
        if let Err(message) = self.bring_up_tunnel(&profile, persisted.endpoint).await {
            self.set_state(
                State::Degraded,
                Some(format!(
                    "{message}; the machine stays locked down until `sessionctl stop`"
                )),
            );
        }
        // The health check opens the allowlist once the handshake is done.
        Ok(())
    }

    /// Serves commands until `shutdown` fires. A running session is left in
    /// place on shutdown: the daemon's exit must never open the machine.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut health = tokio::time::interval(HEALTH_INTERVAL);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::shutdown_requested(&mut shutdown) => break,
                command = self.commands.recv() => match command {
                    Some(Command::Start { profile, reply }) => {
                        let answer = self.start(*profile).await;
                        let _ = reply.send(answer);
                    }
                    Some(Command::Stop { reply }) => {
                        let answer = self.stop().await;
                        let _ = reply.send(answer);
                    }
                    Some(Command::ProfilesChanged) => self.reload_profile().await,
                    None => break,
                },
                _ = firewall_changed(&mut self.guard) => self.restore_firewall().await,
                _ = health.tick() => {
                    // systemd's watchdog: the state machine is alive and
                    // looking after the tunnel.
                    ping_watchdog();
                    self.check_health().await
                }
            }
        }
        if let Some(running) = &self.running {
            tracing::warn!(
                "sessiond is exiting during the session of profile {}; the lockdown stays until sessiond resumes it or `sessionctl stop`",
                running.name
            );
        }
    }

    fn publish(&self, f: impl FnOnce(&mut Snapshot)) {
        self.snapshot.send_modify(f);
    }

    fn set_state(&self, state: State, problem: Option<String>) {
        let old = self.snapshot.borrow().state;
        if old != state {
            tracing::info!("session state: {old:?} -> {state:?}");
        }
        if let Some(problem) = &problem {
            tracing::warn!("{problem}");
        }
        self.publish(|s| {
            s.state = state;
            s.problem = problem;
        });
    }

    /// A session that is locked down and cannot go further by itself.
    fn publish_locked(&self, name: &str, problem: String) {
        tracing::error!("{problem}");
        self.publish(|s| {
            *s = Snapshot {
                state: State::Degraded,
                profile: Some(name.to_string()),
                allowed: Vec::new(),
                problem: Some(problem),
                pending: None,
                tunnel: None,
            }
        });
    }

    fn start_guard(&mut self) {
        match firewall::watch() {
            Ok(w) => self.guard = Some(w),
            Err(e) => tracing::error!("cannot watch the firewall for tampering: {e}"),
        }
    }

    async fn start(&mut self, profile: Profile) -> Reply {
        if let Some(running) = &self.running {
            return Reply::error(
                ErrorKind::Failed,
                format!(
                    "a session with profile {} is already running; run `sessionctl stop` first",
                    running.name
                ),
            );
        }
        // Nothing has changed yet: any failure up to the lockdown leaves the
        // machine exactly as it was.
        let endpoint = match resolve_endpoint(&profile).await {
            Ok(e) => e,
            Err(message) => return Reply::error(ErrorKind::Failed, message),
        };
        let lockdown = Lockdown {
            endpoint,
            fwmark: TUNNEL_FWMARK,
            tunnel_interface: profile.tunnel.interface.clone(),
            allow_lan: profile.allow_lan,
        };
        let persisted = PersistedSession {
            profile: profile.name.clone(),
            endpoint,
            interface: profile.tunnel.interface.clone(),
            allow_lan: profile.allow_lan,
        };
        if let Err(e) = self.state.save(&persisted) {
            return Reply::error(ErrorKind::Failed, format!("{e}; nothing was changed"));
        }
        tracing::info!("starting profile {}", profile.name);
        self.publish(|s| {
            *s = Snapshot {
                state: State::Starting,
                profile: Some(profile.name.clone()),
                allowed: allowed_hosts(&profile),
                problem: None,
                pending: None,
                tunnel: None,
            }
        });
        if let Err(e) = firewall::apply(&lockdown, None).await {
            let _ = self.state.clear();
            self.publish(|s| *s = Snapshot::idle());
            return Reply::error(
                ErrorKind::Failed,
                format!("could not install the lockdown firewall: {e}; nothing was changed"),
            );
        }
        self.start_guard();
        self.running = Some(Running::new(&profile.name, lockdown, Some(profile.clone())));

        // From here on the machine is locked down; failures keep it so.
        let result = match self.bring_up_tunnel(&profile, endpoint).await {
            Ok(monitor) => {
                if wait_for_handshake(&monitor, profile.handshake_timeout).await {
                    self.open_allowlist().await
                } else {
                    Err(format!(
                        "no handshake from {endpoint} within {} s: check the peer's public key and that UDP {} reaches it",
                        profile.handshake_timeout.as_secs(),
                        endpoint.port()
                    ))
                }
            }
            Err(message) => Err(message),
        };
        match result {
            Ok(()) => {
                self.set_state(State::Active, None);
                tracing::info!("profile {} is active", profile.name);
                Reply::ok(self.snapshot.borrow().report())
            }
            Err(message) => {
                let message =
                    format!("{message}; the machine stays locked down until you run `sessionctl stop`");
                tracing::error!("start of profile {} failed: {message}", profile.name);
                self.set_state(State::Degraded, Some(message.clone()));
                Reply::error(ErrorKind::Failed, message)
            }
        }
    }

    /// Starts the tunnel and its routes; the lockdown is already up.
    async fn bring_up_tunnel(
        &mut self,
        profile: &Profile,
        endpoint: SocketAddr,
    ) -> Result<TunnelMonitor, String> {
        let running = self.running.as_mut().ok_or("internal error: no session")?;
        let t = &profile.tunnel;
        let tunnel = Tunnel::start(TunnelConfig {
            interface: t.interface.clone(),
            private_key: t.private_key.clone(),
            peer_public_key: t.peer.public_key.clone(),
            preshared_key: t.peer.preshared_key.clone(),
            endpoint,
            persistent_keepalive: t.peer.persistent_keepalive,
            mtu: t.mtu,
            fwmark: TUNNEL_FWMARK,
        })
        .await
        .map_err(|e| e.to_string())?;
        let monitor = tunnel.monitor();
        running.tunnel = Some(tunnel);
        self.snapshot.send_modify(|s| s.tunnel = Some(monitor.clone()));

        let routes = routing::apply(&RouteConfig {
            interface: t.interface.clone(),
            addresses: t.addresses.iter().map(|a| (a.addr, a.prefix)).collect(),
            mtu: u32::from(t.mtu),
            fwmark: TUNNEL_FWMARK,
            table: ROUTE_TABLE,
        })
        .await
        .map_err(|e| e.to_string())?;
        running.routes = Some(routes);
        Ok(monitor)
    }

    /// Replaces the lockdown with the session shape and pins DNS: start the
    /// stub, open the allowlist with every DNS packet redirected to it,
    /// resolve the allowed names so their addresses are in place before any
    /// application asks, then point the resolver file at the stub.
    async fn open_allowlist(&mut self) -> Result<(), String> {
        let snapshot = self.snapshot.clone();
        let running = self.running.as_mut().ok_or("internal error: no session")?;
        let profile = running.profile.clone().ok_or("internal error: no profile")?;
        if running.stub.is_none() {
            let stub = StubResolver::start(StubConfig {
                port: 0,
                upstream: profile
                    .dns_servers
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, 53))
                    .collect(),
                allowed_names: allowed_names(&profile),
                upstream_mark: DNS_STUB_MARK,
                sink: Arc::new(AllowSink::new(&profile, snapshot)),
            })
            .await
            .map_err(|e| format!("could not start the DNS stub: {e}"))?;
            running.stub = Some(stub);
        }
        firewall::apply(
            &running.lockdown,
            Some(&allowlist_of(&profile, running.stub.as_ref())),
        )
        .await
        .map_err(|e| format!("could not open the allowlist: {e}"))?;
        running.allowlist_open = true;
        if let Some(stub) = &running.stub {
            let failed = stub
                .resolve_all()
                .await
                .iter()
                .filter(|(_, r)| r.is_err())
                .count();
            if failed > 0 {
                tracing::warn!(
                    "{failed} allowed host name(s) did not resolve through the pinned DNS servers yet"
                );
            }
        }
        match self.resolver_file.pin() {
            Ok(Pinned::Rewritten) => {}
            Ok(Pinned::LeftToManager) => tracing::info!(
                "{} is managed by another program (a symlink); DNS is pinned by the firewall redirect alone",
                self.paths.resolv_conf.display()
            ),
            Err(e) => return Err(e.to_string()),
        }
        Ok(())
    }

    async fn stop(&mut self) -> Reply {
        let Some(mut running) = self.running.take() else {
            return Reply::ok(serde_json::json!({"message": "no session is running"}));
        };
        tracing::info!("stopping the session of profile {}", running.name);
        self.set_state(State::Stopping, None);
        // DNS first: the resolver file goes back while the stub still answers.
        if let Err(e) = self.resolver_file.restore() {
            return self.stop_failed(running, e.to_string());
        }
        if let Some(stub) = running.stub.take() {
            stub.stop().await;
        }
        // Tunnel down next, with the firewall still closed around it.
        if let Some(tunnel) = running.tunnel.take() {
            tunnel.stop().await;
        }
        self.publish(|s| s.tunnel = None);
        let routes_removed = match running.routes.take() {
            Some(routes) => routes.remove().await,
            None => Ok(()),
        };
        if let Err(e) = routes_removed {
            return self.stop_failed(running, format!("could not remove the session's routes: {e}"));
        }
        // The firewall goes last. Stop the tamper guard first, or it would
        // put the table straight back.
        self.guard = None;
        if let Err(e) = firewall::remove().await {
            self.start_guard();
            return self.stop_failed(running, format!("could not remove the firewall: {e}"));
        }
        if let Err(e) = self.state.clear() {
            // The network is back; a stale state file would lock the machine
            // down again at the next daemon start, so say so loudly.
            tracing::error!("{e}");
            self.publish(|s| *s = Snapshot::idle());
            return Reply::error(
                ErrorKind::Failed,
                format!("normal networking is back, but {e}; remove it by hand or the next start of sessiond locks the machine down again"),
            );
        }
        self.publish(|s| *s = Snapshot::idle());
        tracing::info!("session stopped; normal networking is back");
        Reply::ok(serde_json::json!({"message": "session stopped; normal networking is back"}))
    }

    fn stop_failed(&mut self, mut running: Running, message: String) -> Reply {
        let message = format!("{message}; the machine stays locked down, try `sessionctl stop` again");
        running.allowlist_open = false;
        self.running = Some(running);
        self.set_state(State::Degraded, Some(message.clone()));
        Reply::error(ErrorKind::Failed, message)
    }

    /// The profiles directory changed. Other profiles are read fresh on
    /// every request, so only the running session's profile needs care: an
    /// invalid edit is reported and ignored; a new allow list or DNS server
    /// list takes effect at once, in one firewall transaction; a changed
    /// tunnel section waits for the next start, and status says so.
    async fn reload_profile(&mut self) {
        let Some(running) = &self.running else { return };
        let Some(current) = running.profile.clone() else {
            return;
        };
        let path = self.paths.profiles.join(format!("{}.toml", running.name));
        let edited = match tokio::task::spawn_blocking(move || Profile::load(&path)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::warn!("{e}; the running session keeps the profile it started with");
                return;
            }
            Err(e) => {
                tracing::warn!("reloading profile {} failed: {e}", running.name);
                return;
            }
        };
        let tunnel_changed = !same_tunnel(&edited, &current);
        let pending = tunnel_changed.then(|| {
            "the profile's tunnel section changed; it takes effect at the next `sessionctl start`".to_string()
        });
        if pending != self.snapshot.borrow().pending {
            if let Some(note) = &pending {
                tracing::info!("{note}");
            }
            self.publish(|s| s.pending = pending);
        }
        if edited.allow == current.allow && edited.dns_servers == current.dns_servers {
            return;
        }
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let mut updated = current;
        updated.allow = edited.allow;
        updated.dns_servers = edited.dns_servers;
        running.profile = Some(updated.clone());
        let open = running.allowlist_open;
        let old_stub = running.stub.take();
        self.publish(|s| s.allowed = allowed_hosts(&updated));
        if !open {
            // The new lists apply when the allowlist opens.
            return;
        }
        // The stub's names, upstream servers and answer ports all come from
        // the profile: replace it, then the table (one transaction), then
        // resolve the new names.
        if let Some(stub) = old_stub {
            stub.stop().await;
        }
        match self.open_allowlist().await {
            Ok(()) => tracing::info!("profile {} changed: the new allow list is in force", updated.name),
            Err(message) => {
                self.set_state(
                    State::Degraded,
                    Some(format!("{message}; the machine stays locked down")),
                );
            }
        }
    }

    /// Someone changed the ruleset: put our table back if it is gone or
    /// damaged.
    async fn restore_firewall(&mut self) {
        let Some(running) = &self.running else {
            self.guard = None;
            return;
        };
        match firewall::is_present().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot read the firewall back: {e}"),
        }
        let started = Instant::now();
        match firewall::apply(&running.lockdown, running.allowlist().as_ref()).await {
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
        if let (true, Some(stub)) = (running.allowlist_open, &running.stub) {
            stub.resolve_all().await;
        }
    }

    /// Flips between active and degraded as the peer comes and goes, and
    /// opens the allowlist once a resumed or late tunnel has its handshake.
    async fn check_health(&mut self) {
        let (state, monitor) = {
            let snap = self.snapshot.borrow();
            (snap.state, snap.tunnel.clone())
        };
        let Some(monitor) = monitor else { return };
        if state == State::Starting || state == State::Stopping {
            return;
        }
        let stats = monitor.stats();
        let allowlist_open = self.running.as_ref().is_some_and(|r| r.allowlist_open);
        match state {
            State::Active if !stats.peer_reachable => {
                let message = match stats.last_handshake_secs {
                    Some(age) if age >= crate::tunnel::REJECT_AFTER.as_secs() => format!(
                        "no handshake with {} for {age} s; traffic stays blocked while the tunnel retries",
                        stats.endpoint
                    ),
                    _ => format!(
                        "the peer {} stopped answering; traffic stays blocked while the tunnel retries",
                        stats.endpoint
                    ),
                };
                self.set_state(State::Degraded, Some(message));
            }
            State::Degraded if stats.peer_reachable => {
                if !allowlist_open {
                    if let Err(message) = self.open_allowlist().await {
                        self.set_state(State::Degraded, Some(message));
                        return;
                    }
                }
                tracing::info!("the peer {} answers again", stats.endpoint);
                self.set_state(State::Active, None);
            }
            _ => {}
        }
    }
}

/// Tells systemd's watchdog the daemon is alive (nothing without systemd).
fn ping_watchdog() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
}

/// Waits for the first handshake in one-second steps, feeding the watchdog,
/// which would otherwise restart a daemon busy with a long `start`.
async fn wait_for_handshake(monitor: &TunnelMonitor, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        if monitor.wait_for_handshake(left.min(HEALTH_INTERVAL)).await {
            return true;
        }
        ping_watchdog();
    }
}

/// Resolves once the tamper guard reports a change; never without a guard.
async fn firewall_changed(guard: &mut Option<FirewallWatch>) {
    match guard {
        Some(watch) => watch.changed().await,
        None => std::future::pending().await,
    }
}

/// Resolves the peer's endpoint once, before anything changes.
async fn resolve_endpoint(profile: &Profile) -> Result<SocketAddr, String> {
    let endpoint = &profile.tunnel.peer.endpoint;
    if let Ok(ip) = endpoint.host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, endpoint.port));
    }
    let mut addrs = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| format!("could not resolve the endpoint {endpoint}: {e}; nothing was changed"))?;
    addrs
        .next()
        .ok_or_else(|| format!("the endpoint {endpoint} resolves to no address; nothing was changed"))
}

/// The firewall's allowlist for a profile: literal addresses now; names join
/// through the DNS stub as they are answered.
fn allowlist_of(profile: &Profile, stub: Option<&StubResolver>) -> Allowlist {
    Allowlist {
        rules: profile
            .allow
            .iter()
            .filter_map(|rule| match &rule.host {
                Host::Net(net) => Some(AllowEntry {
                    net: (net.addr, net.prefix),
                    tcp: rule.tcp.clone(),
                    udp: rule.udp.clone(),
                }),
                Host::Name(_) => None,
            })
            .collect(),
        names: profile
            .allow
            .iter()
            .filter_map(|rule| match &rule.host {
                Host::Name(name) => Some(firewall::NamedEntry {
                    name: name.clone(),
                    tcp: rule.tcp.clone(),
                    udp: rule.udp.clone(),
                }),
                Host::Net(_) => None,
            })
            .collect(),
        dns_servers: profile.dns_servers.clone(),
        tunnel_has_ipv6: profile.tunnel.addresses.iter().any(|a| a.is_ipv6()),
        dns_redirect: stub.map(|stub| DnsRedirect {
            port: stub.port(),
            stub_mark: DNS_STUB_MARK,
        }),
    }
}

/// Whether two versions of a profile would build the same tunnel.
fn same_tunnel(a: &Profile, b: &Profile) -> bool {
    a.tunnel == b.tunnel && a.allow_lan == b.allow_lan
}

fn allowed_names(profile: &Profile) -> Vec<String> {
    profile
        .allow
        .iter()
        .filter_map(|rule| match &rule.host {
            Host::Name(name) => Some(name.clone()),
            Host::Net(_) => None,
        })
        .collect()
}

/// Puts the addresses the stub answers into the firewall's allow sets (for
/// that host's ports only) and into the status, before the application gets
/// the answer.
struct AllowSink {
    ports: HashMap<String, (Vec<u16>, Vec<u16>)>,
    snapshot: Arc<watch::Sender<Snapshot>>,
}

impl AllowSink {
    fn new(profile: &Profile, snapshot: Arc<watch::Sender<Snapshot>>) -> AllowSink {
        let mut ports: HashMap<String, (Vec<u16>, Vec<u16>)> = HashMap::new();
        for rule in &profile.allow {
            if let Host::Name(name) = &rule.host {
                let entry = ports.entry(name.clone()).or_default();
                entry.0.extend(&rule.tcp);
                entry.1.extend(&rule.udp);
            }
        }
        AllowSink { ports, snapshot }
    }
}

impl AnswerSink for AllowSink {
    fn on_answer<'a>(&'a self, name: &'a str, addrs: Addresses) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some((tcp, udp)) = self.ports.get(name) else {
                return;
            };
            let mut learned = Vec::new();
            for (addr, ttl) in &addrs {
                let timeout = Duration::from_secs(u64::from((*ttl).max(MIN_ALLOW_SECS) + ALLOW_GRACE_SECS));
                for (proto, ports) in [(firewall::TCP, tcp), (firewall::UDP, udp)] {
                    learned.extend(ports.iter().map(|port| LearnedAddress {
                        addr: *addr,
                        proto,
                        port: *port,
                        timeout,
                    }));
                }
            }
            if let Err(e) = firewall::add_addresses(name, &learned).await {
                tracing::warn!("could not add answered addresses to the allowlist: {e}");
                return;
            }
            self.snapshot.send_modify(|s| {
                for host in s.allowed.iter_mut().filter(|h| h.host == name) {
                    for (addr, _) in &addrs {
                        let text = addr.to_string();
                        if !host.addresses.contains(&text) {
                            host.addresses.push(text);
                        }
                    }
                }
            });
        })
    }
}

fn allowed_hosts(profile: &Profile) -> Vec<AllowedHost> {
    profile
        .allow
        .iter()
        .map(|rule| AllowedHost {
            host: rule.host.to_string(),
            addresses: match &rule.host {
                Host::Net(net) => vec![net.to_string()],
                Host::Name(_) => Vec::new(),
            },
            tcp: rule.tcp.clone(),
            udp: rule.udp.clone(),
        })
        .collect()
}
