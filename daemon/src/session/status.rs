//! What the session shows: the published [`Snapshot`] that `status` reads
//! without asking the machine, and the DNS answer sink that adds answered
//! addresses to the firewall and to that snapshot.
//!
//! The phase in the snapshot is always derived from the machine's typed
//! stage (see `stage.rs`); nothing here decides a transition.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use super::cause::Cause;
use super::effects::TunnelView;
use crate::dns::{Addresses, AnswerSink};
use crate::firewall::{self, Firewall, LearnedAddress};
use crate::profile::{Host, PortRange, Profile};
use crate::tunnel::{AllowFilter, TunnelStats};

/// An answered address stays allowed at least this long, whatever its TTL,
/// plus a grace period so a connection opened just before expiry works.
const MIN_ALLOW_SECS: u32 = 60;
const ALLOW_GRACE_SECS: u32 = 30;

/// The word `status` shows for the session: `idle → starting →
/// active ⇄ degraded → stopping → idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
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
    /// Ports as numbers, ranges as `"FIRST-LAST"` strings.
    pub tcp: Vec<PortRange>,
    pub udp: Vec<PortRange>,
    /// The profile is of the gateway-enforced kind: this machine sends
    /// everything into the tunnel and the gateway, not this machine,
    /// enforces this entry. Only present when true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gateway_enforced: bool,
}

/// What `status` reports. The phase goes on the wire as `state`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusReport {
    #[serde(rename = "state")]
    pub phase: Phase,
    pub profile: Option<String>,
    pub tunnel: Option<TunnelStats>,
    pub allowed: Vec<AllowedHost>,
    /// Why the session is not simply active, in one sentence, if it is not.
    pub problem: Option<String>,
    /// The same as a type, for clients to act on.
    pub cause: Option<Cause>,
    /// A profile change that waits for the next start, if any.
    pub pending: Option<String>,
    /// The last time the tunnel recovered from a network change or a
    /// resume from sleep, in one sentence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_recovery: Option<String>,
}

/// The state machine's published view; the tunnel's live numbers are read
/// from its view when a status is asked for.
#[derive(Clone)]
pub struct Snapshot {
    pub phase: Phase,
    pub profile: Option<String>,
    pub allowed: Vec<AllowedHost>,
    pub problem: Option<String>,
    pub cause: Option<Cause>,
    pub pending: Option<String>,
    pub last_recovery: Option<String>,
    pub tunnel: Option<Arc<dyn TunnelView>>,
}

impl Snapshot {
    pub fn idle() -> Snapshot {
        Snapshot {
            phase: Phase::Idle,
            profile: None,
            allowed: Vec::new(),
            problem: None,
            cause: None,
            pending: None,
            last_recovery: None,
            tunnel: None,
        }
    }

    pub fn report(&self) -> StatusReport {
        StatusReport {
            phase: self.phase,
            profile: self.profile.clone(),
            tunnel: self.tunnel.as_ref().map(|t| t.stats()),
            allowed: self.allowed.clone(),
            problem: self.problem.clone(),
            cause: self.cause.clone(),
            pending: self.pending.clone(),
            last_recovery: self.last_recovery.clone(),
        }
    }
}

pub(crate) fn allowed_hosts(profile: &Profile) -> Vec<AllowedHost> {
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
            gateway_enforced: profile.gateway_enforces_allowlist,
        })
        .collect()
}

/// Puts the addresses the stub answers into the firewall's allow sets (for
/// that host's ports only) and into the status, before the application gets
/// the answer.
pub(crate) struct AllowSink {
    ports: HashMap<String, (Vec<PortRange>, Vec<PortRange>)>,
    firewall: Arc<Firewall>,
    snapshot: Arc<watch::Sender<Snapshot>>,
    /// The tunnel's own filter, which learns the same answers.
    tunnel: Option<AllowFilter>,
}

impl AllowSink {
    pub(crate) fn new(
        profile: &Profile,
        firewall: Arc<Firewall>,
        snapshot: Arc<watch::Sender<Snapshot>>,
        tunnel: Option<AllowFilter>,
    ) -> AllowSink {
        let mut ports: HashMap<String, (Vec<PortRange>, Vec<PortRange>)> = HashMap::new();
        for rule in &profile.allow {
            if let Host::Name(name) = &rule.host {
                let entry = ports.entry(name.clone()).or_default();
                entry.0.extend(&rule.tcp);
                entry.1.extend(&rule.udp);
            }
        }
        AllowSink {
            ports,
            firewall,
            snapshot,
            tunnel,
        }
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
                    learned.extend(ports.iter().map(|&ports| LearnedAddress {
                        addr: *addr,
                        proto,
                        ports,
                        timeout,
                    }));
                }
            }
            if let Err(e) = self.firewall.add_addresses(name, &learned).await {
                tracing::warn!("could not add answered addresses to the allowlist: {e}");
                return;
            }
            if let Some(tunnel) = &self.tunnel {
                let keys: Vec<_> = learned.iter().map(|l| (l.addr, l.proto, l.ports)).collect();
                tunnel.learn(name, &keys);
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
