//! What the session machine holds, as types: one variant per stage, each
//! owning exactly what exists in that stage, so a stage can only be what
//! its data says (no flag can claim an open allowlist whose stub is gone).
//!
//! - [`Stage::Idle`]: nothing of ours is on the machine;
//! - [`Stage::Connecting`]: the lockdown is up, the tunnel and its routes
//!   too, and the machine waits for the first handshake (an event, see
//!   `connecting.rs`), for a client's `start` or for a resumed session;
//! - [`Stage::Open`]: the allowlist is open with the DNS stub behind it;
//!   while the names of a start are still being resolved it is *opening*,
//!   then active, or degraded while the peer is lost;
//! - [`Stage::Blocked`]: locked down with a [`Cause`]; only `stop` (or, for
//!   a start that timed out, a late handshake) gets it out.
//!
//! The phase `status` shows is derived from the stage ([`Stage::published`]),
//! never the other way round. This file never calls a side effect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::cause::Cause;
use super::effects::{Effects, TunnelView};
use super::status::Phase;
use super::{Ctx, Event, Responder};
use crate::firewall::{AllowEntry, Allowlist, DnsRedirect, EndpointProtocol, Lockdown, NamedEntry};
use crate::profile::{Host, Profile, Transport};
use crate::store::PersistedTransport;
use crate::{DNS_STUB_MARK, TUNNEL_FWMARK};

pub(crate) enum Stage<E: Effects> {
    Idle,
    Connecting(Connecting<E>),
    Open(Open<E>),
    Blocked(Blocked<E>),
}

// By hand: a derive would ask `E: Default`, which no effects need be.
#[allow(clippy::derivable_impls)]
impl<E: Effects> Default for Stage<E> {
    fn default() -> Self {
        Stage::Idle
    }
}

/// Who waits for the session to open: a client's `start`, or nobody (a
/// resumed session, or a late handshake after a start timed out).
pub(crate) enum Waiter {
    Client(Responder),
    Resume,
}

/// What every stage but idle holds: the lockdown, and whatever of the
/// tunnel came up. `profile` is missing only when a resumed profile could
/// not be read.
pub(crate) struct Locked<E: Effects> {
    pub name: String,
    /// The gateway's own UDP endpoint (over TCP the lockdown's endpoint
    /// is the relay; this is where UDP would go again).
    pub endpoint: SocketAddr,
    pub lockdown: Lockdown,
    pub profile: Option<Profile>,
    pub tunnel: Option<E::Tunnel>,
    pub view: Option<Arc<dyn TunnelView>>,
    pub routes: Option<E::Routes>,
}

impl<E: Effects> Locked<E> {
    pub fn new(name: &str, endpoint: SocketAddr, lockdown: Lockdown, profile: Option<Profile>) -> Locked<E> {
        Locked {
            name: name.to_string(),
            endpoint,
            lockdown,
            profile,
            tunnel: None,
            view: None,
            routes: None,
        }
    }
}

/// Lockdown, tunnel and routes are up; the first handshake is awaited as
/// an event (the waits run beside the loop and are aborted with the stage).
pub(crate) struct Connecting<E: Effects> {
    pub locked: Locked<E>,
    pub waiter: Waiter,
    /// Tags the events of this wait, so a late one from an earlier stage is
    /// ignored.
    pub id: u64,
    pub endpoint: SocketAddr,
    pub timeout: Option<Duration>,
    pub _waits: Vec<Task>,
}

/// The allowlist is open, with its DNS stub.
pub(crate) struct Open<E: Effects> {
    pub locked: Locked<E>,
    pub stub: Arc<E::Stub>,
    /// The names being resolved beside the loop, if they are.
    pub resolving: Option<Task>,
    /// Who waits for the names to resolve (then the resolver file is pinned
    /// and the session is active); `None` once active.
    pub opening: Option<Waiter>,
    /// Why the session is degraded while the peer is lost.
    pub peer_lost: Option<String>,
    /// A network change or a resume the tunnel is handshaking again after.
    pub recovering: Option<Recovering>,
    /// The tunnel's count of network changes already looked at.
    pub path_changes_seen: u64,
    /// Over TCP after UDP went unanswered: when to try UDP again (see
    /// `udp_again.rs`).
    pub udp_again: UdpAgain,
    /// Over UDP with `transport = "auto"`: the move to TCP when the
    /// gateway stops answering (see `tcp_fallback.rs`).
    pub tcp_fallback: TcpFallback,
}

/// An `auto` session over UDP whose gateway may stop answering: when a
/// move to TCP that failed may be tried again; after a move, since when
/// the relay has not answered (its turn is [`TCP_TRY`](super::connecting::TCP_TRY)).
#[derive(Default)]
pub(crate) struct TcpFallback {
    pub not_before: Option<tokio::time::Instant>,
    pub relay_waited_since: Option<tokio::time::Instant>,
}

/// An `auto` session over TCP trying whether UDP reaches the gateway
/// again: when the next try is due, and the one running.
pub(crate) struct UdpAgain {
    pub next_try: tokio::time::Instant,
    /// When the running probe's handshake was sent.
    pub probing_since: Option<tokio::time::Instant>,
    /// What asked for the running (or next) try, for `status`.
    pub reason: UdpAgainReason,
    /// The firewall could not be brought to the flows in use; tried again
    /// on the next health tick.
    pub firewall_behind: bool,
    /// Moved to TCP mid-session and the relay has not answered either:
    /// try UDP even though the tunnel is still recovering.
    pub relay_silent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UdpAgainReason {
    NetworkChanged,
    Periodic,
}

/// The tunnel handshakes again (after `cause`); the session is degraded
/// until the gateway answers that handshake.
pub(crate) struct Recovering {
    pub cause: Cause,
}

impl Recovering {
    pub fn sentence(&self) -> &'static str {
        match self.cause {
            Cause::ResumedFromSleep => super::cause::RESUMED_FROM_SLEEP,
            _ => super::cause::NETWORK_CHANGED,
        }
    }
}

/// Locked down, with why.
pub(crate) struct Blocked<E: Effects> {
    pub locked: Locked<E>,
    pub cause: Cause,
    pub problem: String,
}

/// A task beside the loop that reports with an [`Event`]; aborted when
/// dropped, so a stage that ends takes its waits with it.
pub(crate) struct Task {
    pub id: u64,
    handle: Option<JoinHandle<()>>,
}

impl Task {
    pub fn spawn<E: Effects>(
        ctx: &mut Ctx<E>,
        make: impl FnOnce(u64) -> futures::future::BoxFuture<'static, Event>,
    ) -> Task {
        let id = ctx.next_id();
        let events = ctx.events.clone();
        let work = make(id);
        let handle = tokio::spawn(async move {
            let event = work.await;
            let _ = events.send(event);
        });
        Task {
            id,
            handle: Some(handle),
        }
    }

    /// Aborts the task and waits until it is gone (so whatever it held,
    /// such as a reference to the stub, is released).
    pub async fn finish(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
            let _ = handle.await;
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

pub(crate) const RESUMING: &str = "resuming after a restart: waiting for the tunnel's handshake";
const RESUMING_NAMES: &str = "resuming: the tunnel is up, resolving the allowed names";

impl<E: Effects> Stage<E> {
    /// The session's profile name, unless idle.
    pub fn name(&self) -> Option<&str> {
        self.locked().map(|l| l.name.as_str())
    }

    pub fn locked(&self) -> Option<&Locked<E>> {
        match self {
            Stage::Idle => None,
            Stage::Connecting(c) => Some(&c.locked),
            Stage::Open(o) => Some(&o.locked),
            Stage::Blocked(b) => Some(&b.locked),
        }
    }

    pub fn locked_mut(&mut self) -> Option<&mut Locked<E>> {
        match self {
            Stage::Idle => None,
            Stage::Connecting(c) => Some(&mut c.locked),
            Stage::Open(o) => Some(&mut o.locked),
            Stage::Blocked(b) => Some(&mut b.locked),
        }
    }

    /// The firewall shape this stage must have: none, the lockdown, or the
    /// lockdown with the allowlist. The tamper guard puts back this.
    pub fn firewall_shape(&self, effects: &E) -> Option<(Lockdown, Option<Allowlist>)> {
        match self {
            Stage::Idle => None,
            Stage::Connecting(c) => Some((c.locked.lockdown.clone(), None)),
            Stage::Blocked(b) => Some((b.locked.lockdown.clone(), None)),
            Stage::Open(o) => {
                let allow = o
                    .locked
                    .profile
                    .as_ref()
                    .map(|p| allowlist_of(p, Some(effects.stub_port(&o.stub))));
                Some((o.locked.lockdown.clone(), allow))
            }
        }
    }

    /// What `status` shows for this stage: phase, cause, problem.
    pub fn published(&self) -> (Phase, Option<Cause>, Option<String>) {
        let resuming = |text: &str| (Phase::Degraded, Some(Cause::Resuming), Some(text.to_string()));
        match self {
            Stage::Idle => (Phase::Idle, None, None),
            Stage::Connecting(c) => match (&c.waiter, fell_back_to_tcp(&c.locked)) {
                (Waiter::Client(_), None) => (Phase::Starting, None, None),
                (Waiter::Client(_), Some(port)) => (
                    Phase::Starting,
                    Some(Cause::TryingTcp),
                    Some(super::cause::trying_tcp(port)),
                ),
                (Waiter::Resume, None) => resuming(RESUMING),
                (Waiter::Resume, Some(port)) => (
                    Phase::Degraded,
                    Some(Cause::TryingTcp),
                    Some(super::cause::trying_tcp(port)),
                ),
            },
            Stage::Open(o) => match (&o.opening, &o.recovering, &o.peer_lost) {
                (Some(Waiter::Client(_)), _, _) => (Phase::Starting, None, None),
                (Some(Waiter::Resume), _, _) => resuming(RESUMING_NAMES),
                // Moved to TCP mid-session because UDP went unanswered: the
                // peer is lost on UDP, and this says what is being done.
                (None, Some(r), _) if r.cause == Cause::TryingTcp => (
                    Phase::Degraded,
                    Some(Cause::TryingTcp),
                    Some(super::cause::trying_tcp(o.locked.lockdown.endpoint.port())),
                ),
                // A peer lost is the more telling of the two: the handshake
                // after a change went unanswered too.
                (None, _, Some(problem)) => (Phase::Degraded, Some(Cause::PeerLost), Some(problem.clone())),
                (None, Some(r), None) => (
                    Phase::Degraded,
                    Some(r.cause.clone()),
                    Some(r.sentence().to_string()),
                ),
                (None, None, None) => match fell_back_to_tcp(&o.locked) {
                    None => (Phase::Active, None, None),
                    // Protected, but `status` says why it is slower.
                    Some(port) => (
                        Phase::Active,
                        Some(Cause::UdpUnanswered),
                        Some(super::cause::udp_unanswered(port)),
                    ),
                },
            },
            Stage::Blocked(b) => (Phase::Degraded, Some(b.cause.clone()), Some(b.problem.clone())),
        }
    }
}

/// The lockdown for a profile whose endpoint resolved to `endpoint`: its
/// UDP, or with `transport = "tcp"` only the TCP to the relay (`auto`
/// starts on UDP; see [`lockdown_over_tcp`]).
pub(crate) fn lockdown_of(profile: &Profile, endpoint: SocketAddr) -> Lockdown {
    let udp = Lockdown {
        endpoint,
        fwmark: TUNNEL_FWMARK,
        tunnel_interface: profile.tunnel.interface.clone(),
        allow_lan: profile.allow_lan,
        endpoint_protocol: EndpointProtocol::Udp,
        udp_probe: None,
    };
    match profile.transport {
        Transport::Tcp { relay } => lockdown_over_tcp(&udp, relay),
        Transport::Udp | Transport::Auto { .. } => udp,
    }
}

/// The lockdown's endpoint as it is to be persisted: over TCP the relay.
pub(crate) fn persisted_transport(lockdown: &Lockdown) -> PersistedTransport {
    match lockdown.endpoint_protocol {
        EndpointProtocol::Udp => PersistedTransport::Udp,
        EndpointProtocol::Tcp => PersistedTransport::Tcp {
            relay: lockdown.endpoint,
        },
    }
}

/// The relay the tunnel starts over when the lockdown lets out TCP to it
/// (`None`: UDP to the gateway). The tunnel uses exactly the flow the
/// lockdown admits.
pub(crate) fn relay_of(lockdown: &Lockdown) -> Option<SocketAddr> {
    (lockdown.endpoint_protocol == EndpointProtocol::Tcp).then_some(lockdown.endpoint)
}

/// The same lockdown with the gateway's UDP at `gateway` as its one way
/// out (an `auto` session back on UDP).
pub(crate) fn lockdown_over_udp(lockdown: &Lockdown, gateway: SocketAddr) -> Lockdown {
    Lockdown {
        endpoint: gateway,
        endpoint_protocol: EndpointProtocol::Udp,
        udp_probe: None,
        ..lockdown.clone()
    }
}

/// The same lockdown with the tunnel's TCP to `relay` as its one way out,
/// instead of its UDP to the gateway.
pub(crate) fn lockdown_over_tcp(lockdown: &Lockdown, relay: SocketAddr) -> Lockdown {
    Lockdown {
        endpoint: relay,
        endpoint_protocol: EndpointProtocol::Tcp,
        udp_probe: None,
        ..lockdown.clone()
    }
}

/// Over TCP after UDP went unanswered (`transport = "auto"`): the relay's
/// port, for `status`'s sentence. `None` on UDP, and when the profile
/// asks for TCP outright (nothing to explain then).
pub(crate) fn fell_back_to_tcp<E: Effects>(locked: &Locked<E>) -> Option<u16> {
    let auto = locked
        .profile
        .as_ref()
        .is_some_and(|p| matches!(p.transport, Transport::Auto { .. }));
    (auto && locked.lockdown.endpoint_protocol == EndpointProtocol::Tcp)
        .then_some(locked.lockdown.endpoint.port())
}

/// The firewall's allowlist for a profile: literal addresses now; names join
/// through the DNS stub (listening on `stub_port`) as they are answered.
pub(crate) fn allowlist_of(profile: &Profile, stub_port: Option<u16>) -> Allowlist {
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
                Host::Name(name) => Some(NamedEntry {
                    name: name.clone(),
                    tcp: rule.tcp.clone(),
                    udp: rule.udp.clone(),
                }),
                Host::Net(_) => None,
            })
            .collect(),
        dns_servers: profile.dns_servers.clone(),
        tunnel_has_ipv6: profile.tunnel.addresses.iter().any(|a| a.is_ipv6()),
        dns_redirect: stub_port.map(|port| DnsRedirect {
            port,
            stub_mark: DNS_STUB_MARK,
        }),
        gateway_enforces: profile.gateway_enforces_allowlist,
    }
}

/// The sentence for a failure after the lockdown went up.
pub(crate) fn stays_locked(message: &str) -> String {
    format!("{message}; the machine stays locked down until you run `sessionctl stop`")
}
