//! The DNS stub: during a session every DNS packet the machine
//! sends is redirected by the firewall to this resolver on loopback.
//!
//! This module owns the stub's listening sockets (127.0.0.1 and ::1, UDP and
//! TCP, one port) and its upstream sockets, nothing else. It answers only the
//! profile's allowed names and the names their CNAME chains led to in answers
//! the stub itself received; every other name gets REFUSED and **no query for
//! it ever leaves the machine**. Allowed questions are forwarded as asked to
//! the pinned servers, from sockets carrying `upstream_mark` so that the
//! firewall's redirect lets them through; the addresses in each answer go to
//! the [`AnswerSink`] (the firewall's allow sets), which is awaited *before*
//! the reply goes back, so an application's first packet never races its
//! rule.
//!
//! It must never: forward a name that is not allowed, use the tunnel's fwmark
//! (that mark means "bypass the tunnel"), panic or grow without bound on what
//! it receives (queries and TCP connections are limited, upstream exchanges
//! time out), or log the names asked: only counts, at debug level.
//! TCP connections are also limited per local user: the stub finds the uid
//! of each client socket in `/proc/net/tcp{,6}` (the owner of the other end
//! of the loopback connection).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

mod answer;
mod listen;
mod names;
#[cfg(test)]
mod tests;
mod upstream;
mod users;

pub use names::{canonical_name, digest};

use listen::{bind_listeners, serve_tcp, serve_udp, Listener};
use names::Names;

/// Budget for one question upstream, all servers and retries included.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the answer hook may hold a reply back.
const HOOK_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries being answered at once (UDP beyond this is dropped).
const MAX_QUERIES: usize = 256;
/// Client TCP connections at once (more are closed at accept).
const MAX_TCP_CONNECTIONS: usize = 64;
/// Client TCP connections at once from one local user (by uid), so that
/// one user cannot take every slot from the others.
const MAX_TCP_PER_USER: usize = 8;
/// A client TCP connection idle this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries served on one client TCP connection before it is closed.
const TCP_MAX_QUERIES: usize = 256;
/// CNAME links followed in one answer.
const MAX_CHAIN: usize = 16;
/// CNAME targets remembered at once.
const MAX_LEARNED: usize = 4096;
/// A remembered CNAME target stays allowed at least this long (so the
/// application's follow-up question works even with TTL 0) and at most this.
const LEARNED_TTL_MIN: u32 = 30;
const LEARNED_TTL_MAX: u32 = 86_400;
/// EDNS payload we advertise upstream: no fragmentation through the tunnel.
const EDNS_PAYLOAD: u16 = 1232;
/// Largest upstream UDP answer we read (more than we ever advertise).
const UPSTREAM_UDP_BUFFER: usize = 4096;

/// Receives the addresses of every answer the stub gives, before the
/// application sees it.
pub trait AnswerSink: Send + Sync {
    /// `name` is the profile's allowed name the answer belongs to (the
    /// question itself, or for a remembered CNAME target, the allowed name
    /// whose chain led to it; lower case, no trailing dot). `addrs` are the
    /// A/AAAA addresses (and SVCB/HTTPS address hints) on that chain, each
    /// with its record's TTL in seconds. Never called with no addresses.
    fn on_answer<'a>(&'a self, name: &'a str, addrs: Addresses) -> BoxFuture<'a, ()>;
}

/// What the stub needs to run.
pub struct StubConfig {
    /// Listening port on 127.0.0.1 and ::1 (UDP and TCP); 0 picks a free one
    /// (see [`StubResolver::port`]).
    pub port: u16,
    /// The pinned servers, tried in order (normally `ip:53`).
    pub upstream: Vec<SocketAddr>,
    /// The profile's host names (any case, trailing dot or not).
    pub allowed_names: Vec<String>,
    /// SO_MARK on every upstream socket, so the redirect exempts them; 0
    /// leaves sockets unmarked (tests only: with the redirect in place the
    /// stub would ask itself). Never the tunnel's fwmark.
    pub upstream_mark: u32,
    pub sink: Arc<dyn AnswerSink>,
}

/// Addresses from answers, each with its record's TTL in seconds.
pub type Addresses = Vec<(IpAddr, u32)>;

/// How a name resolved at session start: its addresses, or why it has none.
pub type Resolved = (String, Result<Addresses, DnsError>);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("could not listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("the DNS stub has no server to forward to")]
    NoUpstream,
    #[error("{name} is not a valid DNS name")]
    BadName { name: String },
    #[error("the DNS servers did not answer for {name} within {} seconds", UPSTREAM_TIMEOUT.as_secs())]
    Timeout { name: String },
    #[error("the DNS servers answered for {name} with \"{rcode}\"")]
    Rcode { name: String, rcode: String },
    #[error("could not ask the DNS servers about {name}: {reason}")]
    Upstream { name: String, reason: String },
}

/// Counts since start (the only thing this module ever logs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StubStats {
    /// Allowed questions answered with the upstream's reply.
    pub answered: u64,
    /// Questions for names outside the profile.
    pub refused: u64,
    /// Allowed questions no server answered (SERVFAIL).
    pub failed: u64,
    /// Packets that were not a well-formed query (dropped or FORMERR).
    pub malformed: u64,
    /// Queries dropped because too many were in flight.
    pub dropped: u64,
}

/// The running stub. [`StubResolver::stop`] shuts it down and waits;
/// dropping it aborts its tasks.
pub struct StubResolver {
    inner: Arc<Inner>,
    port: u16,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl StubResolver {
    /// Binds the listeners and starts answering.
    pub async fn start(cfg: StubConfig) -> Result<StubResolver, DnsError> {
        if cfg.upstream.is_empty() {
            return Err(DnsError::NoUpstream);
        }
        let (port, listeners) = bind_listeners(cfg.port)?;
        let mut names = Names::default();
        names.set_allowed(&cfg.allowed_names);
        let inner = Arc::new(Inner {
            upstream: cfg.upstream,
            mark: cfg.upstream_mark,
            sink: cfg.sink,
            names: Mutex::new(names),
            queries: Arc::new(Semaphore::new(MAX_QUERIES)),
            tcp_connections: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
            tcp_per_user: Arc::new(Mutex::new(HashMap::new())),
            counters: Counters::default(),
        });
        let (shutdown, watcher) = watch::channel(false);
        let tasks = listeners
            .into_iter()
            .map(|listener| {
                let inner = inner.clone();
                let watcher = watcher.clone();
                match listener {
                    Listener::Udp(sock) => tokio::spawn(serve_udp(inner, Arc::new(sock), watcher)),
                    Listener::Tcp(sock) => tokio::spawn(serve_tcp(inner, sock, watcher)),
                }
            })
            .collect();
        tracing::debug!(port, "dns stub listening");
        Ok(StubResolver {
            inner,
            port,
            shutdown,
            tasks,
        })
    }

    /// The port the stub listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Replaces the allowed names; remembered CNAME targets of names no
    /// longer allowed are forgotten at once.
    pub fn set_allowed_names(&self, names: Vec<String>) {
        self.inner.names().set_allowed(&names);
    }

    /// Resolves every allowed name (A and AAAA) through the pinned servers,
    /// feeds the sink, and returns each name's addresses or why it has none.
    /// A name resolves if either family answered; NOERROR with no address
    /// is an empty list.
    pub async fn resolve_all(&self) -> Vec<Resolved> {
        let mut names: Vec<String> = self.inner.names().allowed.iter().cloned().collect();
        names.sort();
        let inner = &self.inner;
        let lookups = names.into_iter().map(|name| async move {
            let result = inner.resolve_name(&name).await;
            (name, result)
        });
        let resolved = futures::future::join_all(lookups).await;
        let failed = resolved.iter().filter(|(_, r)| r.is_err()).count();
        tracing::debug!(
            names = resolved.len(),
            failed,
            "dns stub resolved the allowed names"
        );
        resolved
    }

    pub fn stats(&self) -> StubStats {
        self.inner.counters.snapshot()
    }

    /// Stops listening, ends queries in flight, and returns once every
    /// socket is closed.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        let s = self.stats();
        tracing::debug!(
            answered = s.answered,
            refused = s.refused,
            failed = s.failed,
            malformed = s.malformed,
            dropped = s.dropped,
            "dns stub stopped"
        );
    }
}

impl Drop for StubResolver {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[derive(Default)]
struct Counters {
    answered: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    malformed: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> StubStats {
        StubStats {
            answered: self.answered.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

struct Inner {
    upstream: Vec<SocketAddr>,
    mark: u32,
    sink: Arc<dyn AnswerSink>,
    names: Mutex<Names>,
    queries: Arc<Semaphore>,
    tcp_connections: Arc<Semaphore>,
    /// Open client TCP connections per local uid.
    tcp_per_user: Arc<Mutex<HashMap<u32, usize>>>,
    counters: Counters,
}
