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

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::svcb::{IpHint, SvcParamValue, SVCB};
use hickory_proto::rr::rdata::HTTPS;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use rand_core::{OsRng, RngCore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

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

// ---------------------------------------------------------------------------
// Names

/// A CNAME target the stub saw in an answer for an allowed name.
struct Learned {
    /// The allowed name whose chain led here.
    origin: String,
    expires: Instant,
}

#[derive(Default)]
struct Names {
    allowed: HashSet<String>,
    learned: HashMap<String, Learned>,
}

impl Names {
    fn set_allowed(&mut self, names: &[String]) {
        self.allowed = names.iter().filter_map(|n| canonical_name(n)).collect();
        let allowed = &self.allowed;
        self.learned.retain(|_, l| allowed.contains(&l.origin));
    }

    /// The allowed name `key` answers for, if it is allowed at all.
    fn origin_of(&self, key: &str, now: Instant) -> Option<String> {
        if self.allowed.contains(key) {
            return Some(key.to_string());
        }
        self.learned
            .get(key)
            .filter(|l| l.expires > now && self.allowed.contains(&l.origin))
            .map(|l| l.origin.clone())
    }

    fn learn(&mut self, target: String, origin: &str, ttl: u32, now: Instant) {
        if self.allowed.contains(&target) || !self.allowed.contains(origin) {
            return;
        }
        let expires = now + Duration::from_secs(u64::from(ttl.clamp(LEARNED_TTL_MIN, LEARNED_TTL_MAX)));
        if let Some(known) = self.learned.get_mut(&target) {
            if known.origin == origin || known.expires <= now {
                known.origin = origin.to_string();
                known.expires = known.expires.max(expires);
            }
            return;
        }
        if self.learned.len() >= MAX_LEARNED {
            self.learned.retain(|_, l| l.expires > now);
            if self.learned.len() >= MAX_LEARNED {
                return;
            }
        }
        self.learned.insert(
            target,
            Learned {
                origin: origin.to_string(),
                expires,
            },
        );
    }
}

/// A wire name as the allowlist compares it: lower case, no trailing dot,
/// odd bytes escaped (so a label holding a dot never equals two labels).
fn name_key(name: &Name) -> String {
    let mut out = String::new();
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        for &b in label {
            match b {
                b'.' | b'\\' => {
                    out.push('\\');
                    out.push(char::from(b));
                }
                0x21..=0x7e => out.push(char::from(b.to_ascii_lowercase())),
                _ => {
                    let _ = write!(out, "\\{b:03}");
                }
            }
        }
    }
    out
}

/// A profile's host name as the stub compares it, and as it names it to the
/// [`AnswerSink`] and in [`StubResolver::resolve_all`]: lower case, no
/// trailing dot, IDNs as punycode. None for an empty name.
pub fn canonical_name(name: &str) -> Option<String> {
    let trimmed = name.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return None;
    }
    match Name::from_utf8(trimmed) {
        Ok(parsed) => Some(name_key(&parsed)).filter(|k| !k.is_empty()),
        Err(_) => Some(trimmed.to_ascii_lowercase()),
    }
}

/// What an answer means for the allowlist: the CNAME targets reached from
/// the question (each with the smallest TTL along the chain so far) and the
/// addresses owned by a name on that chain, with their TTLs. Records for
/// names off the chain are ignored.
///
/// Public so that the fuzz targets (fuzz/) can feed it arbitrary answers; a
/// pure function of its arguments.
pub fn digest(question: &Name, response: &Message) -> (Vec<(String, u32)>, Addresses) {
    let mut chain: Vec<&Name> = vec![question];
    let mut targets = Vec::new();
    let mut chain_ttl = u32::MAX;
    for _ in 0..MAX_CHAIN {
        let Some(current) = chain.last() else { break };
        let next = response.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name == **current => Some((&target.0, r.ttl)),
            _ => None,
        });
        let Some((target, ttl)) = next else { break };
        if chain.contains(&target) {
            break;
        }
        chain_ttl = chain_ttl.min(ttl);
        targets.push((name_key(target), chain_ttl));
        chain.push(target);
    }

    let mut addrs: Addresses = Vec::new();
    let mut add = |ip: IpAddr, ttl: u32| add_address(&mut addrs, ip, ttl);
    for record in response.answers.iter().filter(|r| chain.contains(&&r.name)) {
        match &record.data {
            RData::A(a) => add(IpAddr::V4(a.0), record.ttl),
            RData::AAAA(aaaa) => add(IpAddr::V6(aaaa.0), record.ttl),
            RData::SVCB(svcb) | RData::HTTPS(HTTPS(svcb)) => {
                for ip in svcb_hints(svcb) {
                    add(ip, record.ttl);
                }
            }
            _ => {}
        }
    }
    (targets, addrs)
}

/// Adds an address once, keeping its longest TTL.
fn add_address(addrs: &mut Addresses, ip: IpAddr, ttl: u32) {
    match addrs.iter_mut().find(|(a, _)| *a == ip) {
        Some(known) => known.1 = known.1.max(ttl),
        None => addrs.push((ip, ttl)),
    }
}

fn svcb_hints(svcb: &SVCB) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (_, value) in &svcb.svc_params {
        match value {
            SvcParamValue::Ipv4Hint(IpHint(hints)) => out.extend(hints.iter().map(|a| IpAddr::V4(a.0))),
            SvcParamValue::Ipv6Hint(IpHint(hints)) => out.extend(hints.iter().map(|a| IpAddr::V6(a.0))),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Answering

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

/// One client TCP connection counted against its user; uncounts on drop.
struct UserSlot {
    uid: u32,
    counts: Arc<Mutex<HashMap<u32, usize>>>,
}

impl UserSlot {
    /// A slot for `uid`, unless that user holds [`MAX_TCP_PER_USER`].
    fn take(counts: &Arc<Mutex<HashMap<u32, usize>>>, uid: u32) -> Option<UserSlot> {
        let mut map = counts.lock().unwrap_or_else(|p| p.into_inner());
        let held = map.entry(uid).or_insert(0);
        if *held >= MAX_TCP_PER_USER {
            return None;
        }
        *held += 1;
        Some(UserSlot {
            uid,
            counts: counts.clone(),
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = map.get_mut(&self.uid) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

/// The uid that owns the client end of a loopback TCP connection: the
/// socket whose local address is `client` in `/proc/net/tcp` or
/// `/proc/net/tcp6` (its remote address is the stub's, or, when the
/// firewall redirected the connection, the server it was meant for). None
/// when it is not found (the caller counts all those as one user).
fn client_uid(client: SocketAddr, stub: SocketAddr) -> Option<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        uid_in_proc_net_tcp(&text, client, stub)
    })
}

fn uid_in_proc_net_tcp(text: &str, client: SocketAddr, stub: SocketAddr) -> Option<u32> {
    let same =
        |a: SocketAddr, b: SocketAddr| a.port() == b.port() && canonical_ip(a.ip()) == canonical_ip(b.ip());
    let mut fallback = None;
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(uid)) = (fields.get(1), fields.get(2), fields.get(7)) else {
            continue;
        };
        let (Some(local), Some(remote), Ok(uid)) = (
            proc_socket_addr(local),
            proc_socket_addr(remote),
            uid.parse::<u32>(),
        ) else {
            continue;
        };
        if !same(local, client) {
            continue;
        }
        if same(remote, stub) {
            return Some(uid);
        }
        fallback.get_or_insert(uid);
    }
    fallback
}

/// `0100007F:0035` or 32 hex digits and a port: each 32-bit word of the
/// address as the kernel holds it (network order read as a native word).
fn proc_socket_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

#[derive(Debug)]
enum UpstreamError {
    Timeout,
    Io(String),
}

impl Inner {
    /// Never held across an await.
    fn names(&self) -> MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The reply to one client message, or None to drop it.
    async fn answer(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        // Shorter than a header, or a response (QR set): never answered, so
        // nothing can bounce replies off the stub.
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            Counters::bump(&self.counters.malformed);
            return None;
        }
        let request = match Message::from_vec(packet) {
            Ok(request) => request,
            Err(_) => {
                Counters::bump(&self.counters.malformed);
                let id = u16::from_be_bytes([packet[0], packet[1]]);
                let op_code = OpCode::from_u8((packet[2] >> 3) & 0x0f);
                return Message::error_msg(id, op_code, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
        };
        if request.metadata.op_code != OpCode::Query {
            Counters::bump(&self.counters.malformed);
            return local_reply(&request, ResponseCode::NotImp);
        }
        let [question] = request.queries.as_slice() else {
            Counters::bump(&self.counters.malformed);
            return local_reply(&request, ResponseCode::FormErr);
        };
        if is_doh_canary(question) {
            Counters::bump(&self.counters.refused);
            return local_reply(&request, ResponseCode::NXDomain);
        }
        let origin = if question.query_class == DNSClass::IN
            && !matches!(question.query_type, RecordType::AXFR | RecordType::IXFR)
        {
            self.names().origin_of(&name_key(&question.name), Instant::now())
        } else {
            None
        };
        let Some(origin) = origin else {
            Counters::bump(&self.counters.refused);
            return local_reply(&request, ResponseCode::Refused);
        };

        let query = upstream_query(
            question,
            request.metadata.recursion_desired,
            request.metadata.checking_disabled,
            request
                .edns
                .as_ref()
                .map(|e| (e.max_payload(), e.flags().dnssec_ok)),
        );
        match self.exchange(&query, transport).await {
            Ok((mut raw, response)) => {
                self.take_in(&origin, &question.name, &response).await;
                Counters::bump(&self.counters.answered);
                // The server's own bytes, under the client's id.
                raw.get_mut(..2)?
                    .copy_from_slice(&request.metadata.id.to_be_bytes());
                Some(raw)
            }
            Err(_) => {
                Counters::bump(&self.counters.failed);
                local_reply(&request, ResponseCode::ServFail)
            }
        }
    }

    /// Remembers the answer's CNAME targets and hands its addresses to the
    /// sink, waiting (boundedly) until the sink has them.
    async fn take_in(&self, origin: &str, question: &Name, response: &Message) {
        let (targets, addrs) = digest(question, response);
        if !targets.is_empty() {
            let now = Instant::now();
            let mut names = self.names();
            for (target, ttl) in targets {
                names.learn(target, origin, ttl, now);
            }
        }
        if !addrs.is_empty()
            && timeout(HOOK_TIMEOUT, self.sink.on_answer(origin, addrs))
                .await
                .is_err()
        {
            tracing::warn!(
                "dns stub: the firewall took too long to take an answer's addresses; replying anyway"
            );
        }
    }

    /// Asks the pinned servers in order within [`UPSTREAM_TIMEOUT`]; a server
    /// failing, timing out, or answering SERVFAIL/REFUSED passes the question
    /// to the next. Returns the raw answer and its parse.
    async fn exchange(
        &self,
        query: &Message,
        transport: Transport,
    ) -> Result<(Vec<u8>, Message), UpstreamError> {
        let bytes = query.to_vec().map_err(|e| UpstreamError::Io(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        let mut fallback = None;
        let mut error = UpstreamError::Timeout;
        let count = self.upstream.len();
        for (i, server) in self.upstream.iter().enumerate() {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                break;
            }
            let share = remaining / u32::try_from(count - i).unwrap_or(1);
            let attempt = async {
                match transport {
                    Transport::Udp => exchange_udp(*server, self.mark, &bytes, query).await,
                    Transport::Tcp => exchange_tcp(*server, self.mark, &bytes, query).await,
                }
            };
            match timeout(share, attempt).await {
                Ok(Ok((raw, response))) => {
                    let rcode = response.metadata.response_code;
                    if matches!(rcode, ResponseCode::ServFail | ResponseCode::Refused) && i + 1 < count {
                        fallback = Some((raw, response));
                        continue;
                    }
                    return Ok((raw, response));
                }
                Ok(Err(e)) => error = UpstreamError::Io(plain(&e)),
                Err(_) => error = UpstreamError::Timeout,
            }
        }
        fallback.ok_or(error)
    }

    /// One allowed name at session start: A and AAAA, then the sink once.
    async fn resolve_name(&self, name: &str) -> Result<Addresses, DnsError> {
        let mut qname = Name::from_ascii(name).map_err(|_| DnsError::BadName {
            name: name.to_string(),
        })?;
        qname.set_fqdn(true);
        let (v4, v6) = futures::join!(
            self.lookup(name, &qname, RecordType::A),
            self.lookup(name, &qname, RecordType::AAAA)
        );
        let mut addrs = Vec::new();
        let mut first_error = None;
        let mut any_ok = false;
        for result in [v4, v6] {
            match result {
                Ok(found) => {
                    any_ok = true;
                    for (ip, ttl) in found {
                        add_address(&mut addrs, ip, ttl);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if !any_ok {
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        if !addrs.is_empty()
            && timeout(HOOK_TIMEOUT, self.sink.on_answer(name, addrs.clone()))
                .await
                .is_err()
        {
            tracing::warn!("dns stub: the firewall took too long to take resolved addresses");
        }
        Ok(addrs)
    }

    /// One question of our own: UDP, then TCP when the answer is truncated.
    async fn lookup(&self, name: &str, qname: &Name, qtype: RecordType) -> Result<Addresses, DnsError> {
        let upstream_error = |e: UpstreamError| match e {
            UpstreamError::Timeout => DnsError::Timeout {
                name: name.to_string(),
            },
            UpstreamError::Io(reason) => DnsError::Upstream {
                name: name.to_string(),
                reason,
            },
        };
        let _permit = self.queries.acquire().await.map_err(|_| DnsError::Timeout {
            name: name.to_string(),
        })?;
        let query = upstream_query(
            &Query::query(qname.clone(), qtype),
            true,
            false,
            Some((EDNS_PAYLOAD, false)),
        );
        let (_, mut response) = self
            .exchange(&query, Transport::Udp)
            .await
            .map_err(upstream_error)?;
        if response.metadata.truncation {
            let query = upstream_query(
                &Query::query(qname.clone(), qtype),
                true,
                false,
                Some((EDNS_PAYLOAD, false)),
            );
            response = self
                .exchange(&query, Transport::Tcp)
                .await
                .map_err(upstream_error)?
                .1;
        }
        match response.metadata.response_code {
            ResponseCode::NoError => {
                let (targets, addrs) = digest(qname, &response);
                let now = Instant::now();
                let mut names = self.names();
                for (target, ttl) in targets {
                    names.learn(target, name, ttl, now);
                }
                Ok(addrs)
            }
            rcode => Err(DnsError::Rcode {
                name: name.to_string(),
                rcode: rcode.to_string(),
            }),
        }
    }
}

/// The question as the client asked it, under a fresh random id, with the
/// client's RD/CD and (if it used EDNS) DO bit and payload size (capped at
/// [`EDNS_PAYLOAD`]); no EDNS options travel upstream.
fn upstream_query(question: &Query, rd: bool, cd: bool, edns: Option<(u16, bool)>) -> Message {
    let mut query = Message::new(random_id(), MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = rd;
    query.metadata.checking_disabled = cd;
    query.add_query(question.clone());
    if let Some((payload, dnssec_ok)) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload.min(EDNS_PAYLOAD));
        e.set_dnssec_ok(dnssec_ok);
        query.set_edns(e);
    }
    query
}

/// The name browsers ask before they switch to their own DNS-over-HTTPS
/// (Firefox's canary domain): NXDOMAIN means "this network filters DNS, do
/// not bypass it". A browser's own DoH would go to a host the profile does
/// not allow and be refused anyway, but the call page would then fail to
/// resolve anything instead of falling back to the system resolver.
const DOH_CANARY: &str = "use-application-dns.net";

/// Whether `question` asks for the DoH canary (any type, class IN); always
/// answered NXDOMAIN here, never forwarded, whatever the profile allows.
fn is_doh_canary(question: &Query) -> bool {
    question.query_class == DNSClass::IN && name_key(&question.name) == DOH_CANARY
}

/// An answer made here (NXDOMAIN for the DoH canary, REFUSED, SERVFAIL,
/// FORMERR, NOTIMP).
fn local_reply(request: &Message, rcode: ResponseCode) -> Option<Vec<u8>> {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.checking_disabled = request.metadata.checking_disabled;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = rcode;
    reply.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        reply.set_edns(e);
    }
    reply.to_vec().ok()
}

fn random_id() -> u16 {
    let mut bytes = [0u8; 2];
    if OsRng.try_fill_bytes(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return (nanos ^ (nanos >> 16)) as u16;
    }
    u16::from_ne_bytes(bytes)
}

/// The upstream's answer, if `raw` is one to `query`: a response with our
/// id and our question (or an error with no question, as servers send for
/// queries they cannot parse).
fn matching_response(raw: &[u8], query: &Message) -> Option<Message> {
    let response = Message::from_vec(raw).ok()?;
    if response.metadata.message_type != MessageType::Response || response.metadata.id != query.metadata.id {
        return None;
    }
    let same_question = match (response.queries.as_slice(), query.queries.as_slice()) {
        ([got], [asked]) => {
            got.name == asked.name
                && got.query_type == asked.query_type
                && got.query_class == asked.query_class
        }
        ([], _) => response.metadata.response_code != ResponseCode::NoError,
        _ => false,
    };
    same_question.then_some(response)
}

fn set_mark<F: AsFd>(socket: &F, mark: u32) -> io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::Mark, &mark).map_err(io::Error::from)
}

async fn exchange_udp(
    server: SocketAddr,
    mark: u32,
    bytes: &[u8],
    query: &Message,
) -> io::Result<(Vec<u8>, Message)> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    set_mark(&socket, mark)?;
    // Connected: the kernel drops datagrams from anyone but the server.
    socket.connect(server).await?;
    socket.send(bytes).await?;
    let mut buf = vec![0u8; UPSTREAM_UDP_BUFFER];
    loop {
        let n = socket.recv(&mut buf).await?;
        if let Some(response) = buf.get(..n).and_then(|raw| matching_response(raw, query)) {
            buf.truncate(n);
            return Ok((buf, response));
        }
    }
}

async fn exchange_tcp(
    server: SocketAddr,
    mark: u32,
    bytes: &[u8],
    query: &Message,
) -> io::Result<(Vec<u8>, Message)> {
    let socket = match server {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    set_mark(&socket, mark)?;
    let mut stream = socket.connect(server).await?;
    let len = u16::try_from(bytes.len()).map_err(|_| io::Error::other("query too long"))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await?;
    let mut raw = vec![0u8; usize::from(len)];
    stream.read_exact(&mut raw).await?;
    let response = matching_response(&raw, query)
        .ok_or_else(|| io::Error::other("the server sent an unrelated answer"))?;
    Ok((raw, response))
}

// ---------------------------------------------------------------------------
// Listening

enum Listener {
    Udp(UdpSocket),
    Tcp(TcpListener),
}

/// A plain sentence for an I/O error ("Address already in use").
fn plain(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

/// UDP and TCP on one address; port 0 picks one free for both (UDP first).
fn bind_pair(addr: SocketAddr) -> io::Result<(u16, Listener, Listener)> {
    let udp = std::net::UdpSocket::bind(addr)?;
    let port = udp.local_addr()?.port();
    udp.set_nonblocking(true)?;
    let tcp = std::net::TcpListener::bind(SocketAddr::new(addr.ip(), port))?;
    tcp.set_nonblocking(true)?;
    Ok((
        port,
        Listener::Udp(UdpSocket::from_std(udp)?),
        Listener::Tcp(TcpListener::from_std(tcp)?),
    ))
}

/// UDP and TCP on 127.0.0.1 and ::1, all on one port. IPv6 loopback may be
/// missing (IPv6 disabled): then IPv4 only, with a warning.
fn bind_listeners(port: u16) -> Result<(u16, Vec<Listener>), DnsError> {
    let listen_error = |addr: SocketAddr, e: &io::Error| DnsError::Listen {
        addr,
        reason: plain(e),
    };
    // With port 0 the free port may be taken on the other address or
    // protocol in between: try again a few times.
    let attempts = if port == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let (chosen, udp4, tcp4) = match bind_pair(v4) {
            Ok(bound) => bound,
            Err(e) => {
                last = Some(listen_error(v4, &e));
                continue;
            }
        };
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, chosen));
        match bind_pair(v6) {
            Ok((_, udp6, tcp6)) => return Ok((chosen, vec![udp4, tcp4, udp6, tcp6])),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EADDRNOTAVAIL) | Some(libc::EAFNOSUPPORT)
                ) =>
            {
                tracing::warn!("IPv6 loopback is unavailable; the DNS stub listens on 127.0.0.1 only");
                return Ok((chosen, vec![udp4, tcp4]));
            }
            Err(e) => last = Some(listen_error(v6, &e)),
        }
    }
    Err(last.unwrap_or_else(|| {
        listen_error(
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            &io::Error::other("no free port"),
        )
    }))
}

async fn serve_udp(inner: Arc<Inner>, socket: Arc<UdpSocket>, mut shutdown: watch::Receiver<bool>) {
    let mut queries = JoinSet::new();
    let mut buf = vec![0u8; 65_535];
    loop {
        let received = tokio::select! {
            _ = crate::shutdown_requested(&mut shutdown) => break,
            received = socket.recv_from(&mut buf) => received,
        };
        while queries.try_join_next().is_some() {}
        let (n, peer) = match received {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!("dns stub: could not receive a UDP query: {}", plain(&e));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = inner.queries.clone().try_acquire_owned() else {
            Counters::bump(&inner.counters.dropped);
            continue;
        };
        let Some(packet) = buf.get(..n).map(<[u8]>::to_vec) else {
            continue;
        };
        let inner = inner.clone();
        let socket = socket.clone();
        queries.spawn(async move {
            let _permit = permit;
            if let Some(reply) = inner.answer(&packet, Transport::Udp).await {
                let _ = socket.send_to(&reply, peer).await;
            }
        });
    }
    queries.shutdown().await;
}

async fn serve_tcp(inner: Arc<Inner>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = crate::shutdown_requested(&mut shutdown) => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("dns stub: could not accept a TCP connection: {}", plain(&e));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = inner.tcp_connections.clone().try_acquire_owned() else {
            Counters::bump(&inner.counters.dropped);
            continue;
        };
        let uid = stream
            .local_addr()
            .ok()
            .and_then(|stub| client_uid(client, stub))
            .unwrap_or(u32::MAX);
        let Some(slot) = UserSlot::take(&inner.tcp_per_user, uid) else {
            Counters::bump(&inner.counters.dropped);
            continue;
        };
        let inner = inner.clone();
        connections.spawn(async move {
            let _permit = permit;
            let _slot = slot;
            serve_tcp_connection(&inner, stream).await;
        });
    }
    connections.shutdown().await;
}

/// One client TCP connection: length-prefixed queries, answered in turn.
async fn serve_tcp_connection(inner: &Inner, mut stream: TcpStream) {
    for _ in 0..TCP_MAX_QUERIES {
        let Ok(Ok(len)) = timeout(TCP_IDLE, stream.read_u16()).await else {
            return;
        };
        let mut packet = vec![0u8; usize::from(len)];
        if !matches!(timeout(TCP_IDLE, stream.read_exact(&mut packet)).await, Ok(Ok(_))) {
            return;
        }
        let Ok(Ok(_permit)) = timeout(UPSTREAM_TIMEOUT, inner.queries.acquire()).await else {
            return;
        };
        let Some(reply) = inner.answer(&packet, Transport::Tcp).await else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if !matches!(timeout(TCP_IDLE, stream.write_all(&framed)).await, Ok(Ok(()))) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::Record;

    // -- helpers -----------------------------------------------------------

    /// Hears answers after a delay, so a test can tell whether the reply
    /// waited for it.
    struct Recorder {
        delay: Duration,
        events: Mutex<Vec<(String, Addresses)>>,
    }

    impl Recorder {
        fn new(delay_ms: u64) -> Arc<Recorder> {
            Arc::new(Recorder {
                delay: Duration::from_millis(delay_ms),
                events: Mutex::new(Vec::new()),
            })
        }

        fn events(&self) -> Vec<(String, Addresses)> {
            self.events.lock().expect("events").clone()
        }

        fn heard(&self, name: &str, ip: &str, ttl: u32) -> bool {
            let ip: IpAddr = ip.parse().expect("ip");
            self.events()
                .iter()
                .any(|(n, addrs)| n == name && addrs.contains(&(ip, ttl)))
        }
    }

    impl AnswerSink for Recorder {
        fn on_answer<'a>(&'a self, name: &'a str, addrs: Addresses) -> BoxFuture<'a, ()> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                self.events
                    .lock()
                    .expect("events")
                    .push((name.to_string(), addrs));
            })
        }
    }

    fn query_message(name: &str, qtype: RecordType) -> Message {
        let mut name = Name::from_ascii(name).expect("name");
        name.set_fqdn(true);
        let mut m = Message::new(random_id(), MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name, qtype));
        m
    }

    async fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
        udp_raw_within(server, bytes, Duration::from_secs(5)).await
    }

    /// One datagram out, the first one back (None after `wait`).
    async fn udp_raw_within(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
        let local: SocketAddr = if server.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).await.expect("bind");
        socket.connect(server).await.expect("connect");
        socket.send(bytes).await.expect("send");
        let mut buf = vec![0u8; 65_535];
        match timeout(wait, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    async fn ask_udp(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
        let query = query_message(name, qtype);
        let raw = udp_raw(server, &query.to_vec().expect("encode"))
            .await
            .expect("a reply");
        let reply = Message::from_vec(&raw).expect("parse reply");
        assert_eq!(reply.metadata.id, query.metadata.id);
        reply
    }

    async fn ask_tcp(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
        let query = query_message(name, qtype);
        let bytes = query.to_vec().expect("encode");
        let mut stream = TcpStream::connect(server).await.expect("connect");
        let len = u16::try_from(bytes.len()).expect("len");
        stream.write_all(&len.to_be_bytes()).await.expect("write");
        stream.write_all(&bytes).await.expect("write");
        let len = timeout(Duration::from_secs(5), stream.read_u16())
            .await
            .expect("in time")
            .expect("len");
        let mut raw = vec![0u8; usize::from(len)];
        stream.read_exact(&mut raw).await.expect("read");
        let reply = Message::from_vec(&raw).expect("parse reply");
        assert_eq!(reply.metadata.id, query.metadata.id);
        reply
    }

    fn addresses(m: &Message) -> Vec<IpAddr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    }

    /// The session spawns these futures: they must stay `Send`.
    fn assert_send<T: Send>(_: &T) {}

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    // -- a tiny upstream -----------------------------------------------------

    /// A fake pinned server on 127.0.0.1 (UDP and TCP on one port) that
    /// remembers every name it was asked.
    struct Fake {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<String>>>,
        tasks: Vec<JoinHandle<()>>,
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    impl Fake {
        fn seen(&self) -> Vec<String> {
            self.seen.lock().expect("seen").clone()
        }
    }

    fn rec(name: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(Name::from_ascii(format!("{name}.")).expect("name"), ttl, data)
    }

    /// The fake's zone: meet.test (plus an off-chain record that must never
    /// reach the sink), alias.test → meet.test, a CNAME loop, big.test
    /// (truncated over UDP), silent.test (never answered), else NXDOMAIN.
    fn fake_reply(query: &Message, tcp: bool) -> Option<Message> {
        let question = query.queries.first()?;
        let qname = name_key(&question.name);
        let qtype = question.query_type;
        let mut reply = Message::response(query.metadata.id, OpCode::Query);
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.add_query(question.clone());
        let meet = |reply: &mut Message| {
            if qtype == RecordType::A {
                reply.add_answer(rec("meet.test", 60, RData::A(A(Ipv4Addr::new(203, 0, 113, 10)))));
            }
            if qtype == RecordType::AAAA {
                reply.add_answer(rec(
                    "meet.test",
                    60,
                    RData::AAAA(AAAA("2001:db8::10".parse().expect("v6"))),
                ));
            }
        };
        match qname.as_str() {
            "meet.test" => {
                meet(&mut reply);
                reply.add_answer(rec("evil.test", 60, RData::A(A(Ipv4Addr::new(198, 51, 100, 66)))));
            }
            "alias.test" => {
                let target = Name::from_ascii("meet.test.").expect("name");
                reply.add_answer(rec("alias.test", 120, RData::CNAME(CNAME(target))));
                meet(&mut reply);
            }
            "loop.test" | "loop2.test" => {
                let other = if qname == "loop.test" {
                    "loop2.test."
                } else {
                    "loop.test."
                };
                reply.add_answer(rec(
                    "loop.test",
                    5,
                    RData::CNAME(CNAME(Name::from_ascii(other).expect("n"))),
                ));
                reply.add_answer(rec(
                    "loop2.test",
                    5,
                    RData::CNAME(CNAME(Name::from_ascii("loop.test.").expect("n"))),
                ));
            }
            "big.test" if !tcp => reply.metadata.truncation = true,
            "big.test" => {
                reply.add_answer(rec("big.test", 30, RData::A(A(Ipv4Addr::new(203, 0, 113, 20)))));
            }
            "silent.test" => return None,
            _ => reply.metadata.response_code = ResponseCode::NXDomain,
        }
        if query.edns.is_some() {
            reply.set_edns(Edns::new());
        }
        Some(reply)
    }

    async fn fake_upstream() -> Fake {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
            let port = udp.local_addr().expect("addr").port();
            if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
                break (Arc::new(udp), tcp);
            }
        };
        let addr = udp.local_addr().expect("addr");
        let udp_seen = seen.clone();
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if let Some(q) = query.queries.first() {
                    udp_seen.lock().expect("seen").push(name_key(&q.name));
                }
                if let Some(reply) = fake_reply(&query, false) {
                    let _ = udp.send_to(&reply.to_vec().expect("encode"), peer).await;
                }
            }
        });
        let tcp_seen = seen.clone();
        let tcp_task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let seen = tcp_seen.clone();
                tokio::spawn(async move {
                    let Ok(len) = stream.read_u16().await else { return };
                    let mut buf = vec![0u8; usize::from(len)];
                    if stream.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    let Ok(query) = Message::from_vec(&buf) else {
                        return;
                    };
                    if let Some(q) = query.queries.first() {
                        seen.lock().expect("seen").push(name_key(&q.name));
                    }
                    if let Some(reply) = fake_reply(&query, true) {
                        let bytes = reply.to_vec().expect("encode");
                        let len = u16::try_from(bytes.len()).expect("len");
                        let _ = stream.write_all(&len.to_be_bytes()).await;
                        let _ = stream.write_all(&bytes).await;
                    }
                });
            }
        });
        Fake {
            addr,
            seen,
            tasks: vec![udp_task, tcp_task],
        }
    }

    async fn stub(
        upstream: Vec<SocketAddr>,
        names: &[&str],
        sink: Arc<Recorder>,
    ) -> (StubResolver, SocketAddr) {
        let stub = StubResolver::start(StubConfig {
            port: 0,
            upstream,
            allowed_names: names.iter().map(|n| n.to_string()).collect(),
            upstream_mark: 0,
            sink,
        })
        .await
        .expect("stub starts");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, stub.port()));
        (stub, addr)
    }

    // -- pure logic ----------------------------------------------------------

    #[test]
    fn names_compare_case_and_trailing_dot_insensitively() {
        assert_eq!(canonical_name("Meet.Test.").as_deref(), Some("meet.test"));
        assert_eq!(canonical_name("  ").as_deref(), None);
        assert_eq!(canonical_name(".").as_deref(), None);
        assert_eq!(
            canonical_name("Bücher.test").as_deref(),
            Some("xn--bcher-kva.test")
        );
        let wire = Name::from_ascii("MEET.test.").expect("name");
        assert_eq!(name_key(&wire), "meet.test");
        // A label holding a dot is not two labels.
        let odd = Name::from_labels(vec![&b"meet.test"[..]]).expect("name");
        assert_ne!(name_key(&odd), "meet.test");
    }

    #[test]
    fn upstream_sockets_carry_the_mark() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: SO_MARK needs CAP_NET_ADMIN");
            return;
        }
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        set_mark(&socket, 0x5348).expect("mark");
        let mark = nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::Mark).expect("get");
        assert_eq!(mark, 0x5348);
    }

    #[test]
    fn learned_targets_follow_their_origin() {
        let now = Instant::now();
        let mut names = Names::default();
        names.set_allowed(&["alias.test".to_string()]);
        assert_eq!(names.origin_of("meet.test", now), None);
        names.learn("meet.test".into(), "alias.test", 0, now);
        assert_eq!(names.origin_of("meet.test", now).as_deref(), Some("alias.test"));
        // TTL 0 still leaves time for the follow-up question, not forever.
        let later = now + Duration::from_secs(u64::from(LEARNED_TTL_MIN) + 1);
        assert_eq!(names.origin_of("meet.test", later), None);
        // Not learned from a name that is not allowed.
        names.learn("x.test".into(), "other.test", 60, now);
        assert_eq!(names.origin_of("x.test", now), None);
        names.set_allowed(&["other.test".to_string()]);
        assert_eq!(names.origin_of("meet.test", now), None);
    }

    // The next three pin down what cargo-mutants found unchecked in the
    // learned-name bookkeeping (scripts/mutants, docs/mutants.md).

    #[test]
    fn a_learned_name_expires_at_its_deadline_and_never_from_a_stranger() {
        let now = Instant::now();
        let mut names = Names::default();
        names.set_allowed(&["alias.test".to_string()]);
        names.learn("meet.test".into(), "alias.test", 0, now);
        let deadline = now + Duration::from_secs(u64::from(LEARNED_TTL_MIN));
        assert_eq!(
            names.origin_of("meet.test", deadline),
            None,
            "still valid at its deadline"
        );
        // Learned from a name that was not allowed then: allowing that name
        // later does not bring it back.
        names.learn("x.test".into(), "other.test", 60, now);
        names.set_allowed(&["alias.test".to_string(), "other.test".to_string()]);
        assert_eq!(names.origin_of("x.test", now), None);
    }

    #[test]
    fn a_learned_name_keeps_its_origin_until_that_expires() {
        let now = Instant::now();
        let mut names = Names::default();
        names.set_allowed(&["a.test".to_string(), "b.test".to_string()]);
        names.learn("cdn.test".into(), "a.test", 60, now);
        // Another allowed name cannot take it over while it is valid...
        names.learn("cdn.test".into(), "b.test", 600, now);
        assert_eq!(names.origin_of("cdn.test", now).as_deref(), Some("a.test"));
        let after_a = now + Duration::from_secs(61);
        assert_eq!(
            names.origin_of("cdn.test", after_a),
            None,
            "b.test extended a.test's entry"
        );
        // ...its own origin extends it...
        names.learn("cdn.test".into(), "a.test", 60, now + Duration::from_secs(50));
        assert_eq!(
            names
                .origin_of("cdn.test", now + Duration::from_secs(100))
                .as_deref(),
            Some("a.test")
        );
        // ...and once it expired, the other name may.
        let later = now + Duration::from_secs(200);
        names.learn("cdn.test".into(), "b.test", 60, later);
        assert_eq!(names.origin_of("cdn.test", later).as_deref(), Some("b.test"));
    }

    #[test]
    fn learned_names_are_bounded_and_expired_ones_make_room() {
        let now = Instant::now();
        let mut names = Names::default();
        names.set_allowed(&["a.test".to_string()]);
        for i in 0..MAX_LEARNED {
            names.learn(format!("n{i}.test"), "a.test", 0, now);
        }
        assert_eq!(names.origin_of("n0.test", now).as_deref(), Some("a.test"));
        names.learn("one-too-many.test".into(), "a.test", 60, now);
        assert_eq!(
            names.origin_of("one-too-many.test", now),
            None,
            "learned beyond the bound"
        );
        // At the deadline every earlier entry has expired: room again.
        let deadline = now + Duration::from_secs(u64::from(LEARNED_TTL_MIN));
        names.learn("fresh.test".into(), "a.test", 60, deadline);
        assert_eq!(names.origin_of("fresh.test", deadline).as_deref(), Some("a.test"));
        assert!(names.learned.len() <= MAX_LEARNED);
    }

    #[test]
    fn digest_keeps_to_the_chain_and_survives_loops() {
        let question = Name::from_ascii("alias.test.").expect("name");
        let mut m = Message::response(1, OpCode::Query);
        m.add_answer(rec(
            "alias.test",
            120,
            RData::CNAME(CNAME(Name::from_ascii("Meet.test.").expect("n"))),
        ));
        m.add_answer(rec(
            "meet.test",
            300,
            RData::CNAME(CNAME(Name::from_ascii("alias.test.").expect("n"))),
        ));
        m.add_answer(rec("MEET.test", 60, RData::A(A(Ipv4Addr::new(203, 0, 113, 10)))));
        m.add_answer(rec("evil.test", 60, RData::A(A(Ipv4Addr::new(198, 51, 100, 66)))));
        let (targets, addrs) = digest(&question, &m);
        assert_eq!(targets, vec![("meet.test".to_string(), 120)]);
        assert_eq!(addrs, vec![(ip("203.0.113.10"), 60)]);
    }

    // -- against a fake upstream ---------------------------------------------

    #[tokio::test]
    async fn allowed_name_is_answered_after_the_sink_has_its_addresses() {
        let fake = fake_upstream().await;
        let sink = Recorder::new(150);
        let (stub, addr) = stub(vec![fake.addr], &["Meet.Test."], sink.clone()).await;

        let reply = ask_udp(addr, "MEET.test", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(addresses(&reply).contains(&ip("203.0.113.10")));
        // The sink already has it when the reply arrives, and nothing else.
        assert_eq!(
            sink.events(),
            vec![("meet.test".to_string(), vec![(ip("203.0.113.10"), 60)])]
        );

        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, stub.port()));
        let reply = ask_tcp(v6, "meet.test", RecordType::AAAA).await;
        // The reply is the server's (off-chain record included); the sink
        // only hears the chain's addresses.
        assert_eq!(addresses(&reply), vec![ip("2001:db8::10"), ip("198.51.100.66")]);
        assert!(!sink
            .events()
            .iter()
            .any(|(_, a)| a.iter().any(|(i, _)| *i == ip("198.51.100.66"))));
        assert!(sink.heard("meet.test", "2001:db8::10", 60));
        assert_eq!(stub.stats().answered, 2);
        stub.stop().await;
    }

    #[tokio::test]
    async fn other_names_are_refused_and_never_forwarded() {
        let fake = fake_upstream().await;
        let sink = Recorder::new(0);
        let (stub, addr) = stub(vec![fake.addr], &["meet.test"], sink.clone()).await;
        for name in [
            "other.test",
            "eet.test",
            "x.meet.test",
            "meet.test.evil.test",
            "test",
        ] {
            let reply = ask_udp(addr, name, RecordType::A).await;
            assert_eq!(reply.metadata.response_code, ResponseCode::Refused, "{name}");
            assert_eq!(reply.queries.len(), 1);
        }
        let reply = ask_tcp(addr, "other.test", RecordType::AAAA).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        // Zone transfers and other classes are refused even for allowed names.
        let reply = ask_tcp(addr, "meet.test", RecordType::AXFR).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        let mut chaos = query_message("meet.test", RecordType::TXT);
        chaos.queries[0].query_class = DNSClass::CH;
        let raw = udp_raw(addr, &chaos.to_vec().expect("encode"))
            .await
            .expect("reply");
        assert_eq!(
            Message::from_vec(&raw).expect("parse").metadata.response_code,
            ResponseCode::Refused
        );

        assert!(fake.seen().is_empty(), "forwarded: {:?}", fake.seen());
        assert!(sink.events().is_empty());
        assert_eq!(stub.stats().refused, 8);
        stub.stop().await;
    }

    #[tokio::test]
    async fn the_doh_canary_gets_nxdomain_and_is_never_forwarded() {
        let fake = fake_upstream().await;
        let sink = Recorder::new(0);
        // Even a profile that names it does not get it forwarded.
        let (stub, addr) = stub(
            vec![fake.addr],
            &["meet.test", "use-application-dns.net"],
            sink.clone(),
        )
        .await;
        for (name, qtype) in [
            ("use-application-dns.net", RecordType::A),
            ("USE-Application-DNS.net.", RecordType::AAAA),
        ] {
            let reply = ask_udp(addr, name, qtype).await;
            assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(reply.answers.is_empty());
        }
        let reply = ask_tcp(addr, "use-application-dns.net", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        // Only the exact name: a name under it is an ordinary refused name.
        let reply = ask_udp(addr, "x.use-application-dns.net", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert!(fake.seen().is_empty(), "forwarded: {:?}", fake.seen());
        assert!(sink.events().is_empty());
        stub.stop().await;
    }

    #[tokio::test]
    async fn cname_targets_are_allowed_while_their_origin_is() {
        let fake = fake_upstream().await;
        let sink = Recorder::new(0);
        let (stub, addr) = stub(vec![fake.addr], &["alias.test"], sink.clone()).await;

        let reply = ask_udp(addr, "meet.test", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);

        let reply = ask_udp(addr, "alias.test", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.answers.iter().any(|r| matches!(r.data, RData::CNAME(_))));
        assert!(sink.heard("alias.test", "203.0.113.10", 60));

        // The target now resolves, reported under the allowed name.
        let reply = ask_udp(addr, "meet.test", RecordType::AAAA).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(sink.heard("alias.test", "2001:db8::10", 60));

        stub.set_allowed_names(vec!["other.test".into()]);
        let reply = ask_udp(addr, "meet.test", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        let reply = ask_udp(addr, "alias.test", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert_eq!(fake.seen(), vec!["alias.test", "meet.test"]);

        // A CNAME loop is answered as the server gave it, and ends.
        stub.set_allowed_names(vec!["loop.test".into()]);
        let reply = ask_udp(addr, "loop.test", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        stub.stop().await;
    }

    #[tokio::test]
    async fn upstream_rcode_truncation_and_tcp_pass_through() {
        let fake = fake_upstream().await;
        let sink = Recorder::new(0);
        let (stub, addr) = stub(vec![fake.addr], &["nx.test", "big.test"], sink.clone()).await;

        let reply = ask_udp(addr, "nx.test", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);

        // Truncated over UDP: the client sees TC and retries over TCP.
        let reply = ask_udp(addr, "big.test", RecordType::A).await;
        assert!(reply.metadata.truncation);
        let reply = ask_tcp(addr, "big.test", RecordType::A).await;
        assert_eq!(addresses(&reply), vec![ip("203.0.113.20")]);
        assert!(sink.heard("big.test", "203.0.113.20", 30));
        stub.stop().await;
    }

    #[tokio::test]
    async fn resolve_all_feeds_the_sink_and_says_what_failed() {
        let fake = fake_upstream().await;
        let sink = Recorder::new(0);
        let (stub, _) = stub(
            vec![fake.addr],
            &["meet.test", "nx.test", "big.test"],
            sink.clone(),
        )
        .await;
        let resolving = stub.resolve_all();
        assert_send(&resolving);
        let resolved = resolving.await;
        let names: Vec<&str> = resolved.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["big.test", "meet.test", "nx.test"]);
        let meet = resolved[1].1.as_ref().expect("meet.test resolves");
        assert!(meet.contains(&(ip("203.0.113.10"), 60)) && meet.contains(&(ip("2001:db8::10"), 60)));
        // big.test needed the TCP fallback.
        assert_eq!(
            resolved[0].1.as_ref().expect("big.test"),
            &vec![(ip("203.0.113.20"), 30)]
        );
        let err = resolved[2].1.as_ref().expect_err("nx.test fails");
        assert_eq!(
            err.to_string(),
            "the DNS servers answered for nx.test with \"Non-Existent Domain\""
        );
        assert!(sink.heard("meet.test", "2001:db8::10", 60));
        assert!(!sink.events().iter().any(|(n, _)| n == "nx.test"));
        stub.stop().await;
    }

    #[tokio::test]
    async fn malformed_input_is_dropped_or_formerr_and_the_stub_carries_on() {
        let fake = fake_upstream().await;
        let sink = Recorder::new(0);
        let (stub, addr) = stub(vec![fake.addr], &["meet.test"], sink).await;

        // Too short for a header: dropped.
        let quiet = Duration::from_millis(500);
        assert_eq!(udp_raw_within(addr, &[1, 2, 3], quiet).await, None);
        // A header promising a question that is not there: FORMERR.
        let raw = udp_raw(addr, &[0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0])
            .await
            .expect("reply");
        let reply = Message::from_vec(&raw).expect("parse");
        assert_eq!(
            (reply.metadata.id, reply.metadata.response_code),
            (0xabcd, ResponseCode::FormErr)
        );
        // A response (QR set) is never answered.
        let mut response = query_message("meet.test", RecordType::A);
        response.metadata.message_type = MessageType::Response;
        let response = response.to_vec().expect("encode");
        assert_eq!(udp_raw_within(addr, &response, quiet).await, None);
        // Two questions: FORMERR; another opcode: NOTIMP.
        let mut two = query_message("meet.test", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("meet.test.").expect("n"),
            RecordType::AAAA,
        ));
        let raw = udp_raw(addr, &two.to_vec().expect("encode"))
            .await
            .expect("reply");
        assert_eq!(
            Message::from_vec(&raw).expect("parse").metadata.response_code,
            ResponseCode::FormErr
        );
        let mut notify = query_message("meet.test", RecordType::SOA);
        notify.metadata.op_code = OpCode::Notify;
        let raw = udp_raw(addr, &notify.to_vec().expect("encode"))
            .await
            .expect("reply");
        assert_eq!(
            Message::from_vec(&raw).expect("parse").metadata.response_code,
            ResponseCode::NotImp
        );
        // Random bytes, and a TCP connection that lies about its length.
        let junk: Vec<u8> = (0..200u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 & 0x7f)
            .collect();
        let _ = udp_raw(addr, &junk).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(&[0xff, 0xff, 1, 2, 3]).await.expect("write");
        drop(stream);

        assert!(fake.seen().is_empty());
        let reply = ask_udp(addr, "meet.test", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(stub.stats().malformed >= 5);
        stub.stop().await;
    }

    #[tokio::test]
    async fn a_silent_server_is_skipped_then_servfail_in_time() {
        let fake = fake_upstream().await;
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let sink = Recorder::new(0);
        let upstream = vec![silent.local_addr().expect("addr"), fake.addr];
        let (stub, addr) = stub(upstream, &["meet.test", "silent.test"], sink).await;

        let started = Instant::now();
        let reply = ask_udp(addr, "meet.test", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(started.elapsed() < UPSTREAM_TIMEOUT);

        let started = Instant::now();
        let reply = ask_udp(addr, "silent.test", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        let took = started.elapsed();
        assert!(
            took >= UPSTREAM_TIMEOUT - Duration::from_millis(100)
                && took < UPSTREAM_TIMEOUT + Duration::from_secs(1)
        );
        assert_eq!(stub.stats().failed, 1);
        stub.stop().await;
    }

    #[tokio::test]
    async fn stop_frees_the_port_and_a_busy_port_is_one_sentence() {
        let fake = fake_upstream().await;
        let config = |port| StubConfig {
            port,
            upstream: vec![fake.addr],
            allowed_names: vec![],
            upstream_mark: 0,
            sink: Recorder::new(0),
        };
        // A port below the kernel's ephemeral range (32768 and up): a port
        // the kernel handed out could be handed again, to another test's
        // client socket on ::1, between the stop and the second start, and
        // the second start would then fail for a reason this test is not
        // about. Nothing binds these ports without asking for them.
        let mut first = None;
        for candidate in 20_000..20_500 {
            if let Ok(stub) = StubResolver::start(config(candidate)).await {
                first = Some(stub);
                break;
            }
        }
        let first = first.expect("a free port between 20000 and 20500");
        let port = first.port();
        let starting = StubResolver::start(config(port));
        assert_send(&starting);
        let err = starting.await.err().expect("port busy");
        assert_eq!(
            err.to_string(),
            format!("could not listen on 127.0.0.1:{port}: Address already in use")
        );
        let stopping = first.stop();
        assert_send(&stopping);
        stopping.await;
        let again = StubResolver::start(config(port)).await.expect("port free again");
        assert_eq!(again.port(), port);
        drop(again);
        let err = StubResolver::start(StubConfig {
            upstream: vec![],
            ..config(0)
        })
        .await
        .err()
        .expect("no upstream");
        assert_eq!(err.to_string(), "the DNS stub has no server to forward to");
    }

    // -- against dnsmasq, inside network namespaces --------------------------
    //
    // `cargo test -p sessiond --lib dns::tests::lab -- --ignored` (root,
    // dnsmasq, nft, ip). The outer test builds two namespaces joined by a
    // veth pair, never touching the host's: "server" runs dnsmasq on
    // 192.0.2.65, "client" gets the firewall's redirect shape (every DNS
    // packet not carrying the stub's mark goes to the stub on 5354) plus
    // counters, then runs the inner test inside "client".

    const LAB_MARK: u32 = 0x5348;
    const LAB_PORT: u16 = 5354;

    /// Everything the lab created; dropping it removes all of it.
    struct Lab {
        namespaces: Vec<String>,
        dnsmasq: Option<std::process::Child>,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            if let Some(mut child) = self.dnsmasq.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            for ns in self.namespaces.drain(..).rev() {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &ns])
                    .status();
            }
        }
    }

    fn run(args: &[&str]) {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect("spawn");
        assert!(
            out.status.success(),
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn counter(ns: &str, name: &str) -> u64 {
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", ns, "nft", "list", "counter", "inet", "sgdnslab", name,
            ])
            .output()
            .expect("nft");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter {name}: {text}"))
    }

    fn tool(name: &str) -> bool {
        ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(name).exists())
    }

    #[test]
    fn lab_against_dnsmasq_in_netns() {
        assert!(
            nix::unistd::geteuid().is_root() && ["ip", "nft", "dnsmasq"].iter().all(|t| tool(t)),
            "this test needs root, ip, nft and dnsmasq (it builds its own network namespaces): run the tests as root"
        );
        let id = std::process::id();
        let (client, server) = (format!("sgdnsc{id}"), format!("sgdnss{id}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("dnsmasq.log");
        let mut lab = Lab {
            namespaces: Vec::new(),
            dnsmasq: None,
        };
        for ns in [&client, &server] {
            run(&["ip", "netns", "add", ns]);
            lab.namespaces.push(ns.clone());
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        run(&[
            "ip", "-n", &client, "link", "add", "dnsc0", "type", "veth", "peer", "name", "dnss0", "netns",
            &server,
        ]);
        run(&[
            "ip",
            "-n",
            &client,
            "addr",
            "add",
            "192.0.2.66/24",
            "dev",
            "dnsc0",
        ]);
        run(&[
            "ip",
            "-n",
            &server,
            "addr",
            "add",
            "192.0.2.65/24",
            "dev",
            "dnss0",
        ]);
        run(&["ip", "-n", &client, "link", "set", "dnsc0", "up"]);
        run(&["ip", "-n", &server, "link", "set", "dnss0", "up"]);
        run(&[
            "ip",
            "-n",
            &client,
            "route",
            "add",
            "default",
            "via",
            "192.0.2.65",
        ]);

        let log_arg = format!("--log-facility={}", log.display());
        let pid_arg = format!("--pid-file={}", dir.path().join("dnsmasq.pid").display());
        lab.dnsmasq = Some(
            std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &server,
                    "dnsmasq",
                    "--no-resolv",
                    "--no-hosts",
                    "-k",
                ])
                .args([
                    "--conf-file=/dev/null",
                    "--listen-address=192.0.2.65",
                    "--bind-interfaces",
                ])
                .args(["--host-record=meet.test,203.0.113.10,2001:db8::10,300"])
                .args([
                    "--address=/other.test/203.0.113.99",
                    "--address=/secret.test/203.0.113.98",
                ])
                .args([
                    "--cname=alias.test,meet.test",
                    "--log-queries",
                    "--user=root",
                    &log_arg,
                    &pid_arg,
                ])
                .spawn()
                .expect("dnsmasq"),
        );
        let ready = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("started"))
        });
        assert!(ready, "dnsmasq did not start");

        let rules = format!(
            "table inet sgdnslab {{
               counter marked_udp {{ }}
               counter marked_tcp {{ }}
               counter stray_dns {{ }}
               chain nat_out {{ type nat hook output priority -100;
                 meta mark {LAB_MARK:#x} return
                 meta l4proto {{ tcp, udp }} th dport 53 redirect to :{LAB_PORT}
               }}
               chain on_the_wire {{ type filter hook postrouting priority 300; policy accept;
                 oifname != \"dnsc0\" return
                 meta l4proto != {{ tcp, udp }} return
                 th dport != {{ 53, 853 }} return
                 meta mark {LAB_MARK:#x} ip daddr 192.0.2.65 udp dport 53 counter name marked_udp return
                 meta mark {LAB_MARK:#x} ip daddr 192.0.2.65 tcp dport 53 counter name marked_tcp return
                 counter name stray_dns
               }}
             }}"
        );
        let rules_file = dir.path().join("rules.nft");
        std::fs::write(&rules_file, rules).expect("rules");
        run(&[
            "ip",
            "netns",
            "exec",
            &client,
            "nft",
            "-f",
            &rules_file.to_string_lossy(),
        ]);

        let exe = std::env::current_exe().expect("test binary");
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", &client])
            .arg(&exe)
            .args([
                "--exact",
                "dns::tests::lab_inside_namespace",
                "--ignored",
                "--nocapture",
            ])
            .env("SG_DNS_LAB_LOG", &log)
            .env("SG_DNS_LAB_OUTER_NS", own_namespace().expect("own namespace"))
            .status()
            .expect("inner test");
        // Counted in postrouting on the veth, after nat: only DNS that really
        // leaves the machine (a redirected query goes to lo and is not seen
        // here). Stray: any DNS on the wire that is not the stub's marked
        // upstream query to the pinned server (an application's query that
        // escaped the redirect, or the stub asking someone else). Checked
        // before the inner test's verdict, so an escape is reported as what
        // it is.
        let (udp, tcp, stray) = (
            counter(&client, "marked_udp"),
            counter(&client, "marked_tcp"),
            counter(&client, "stray_dns"),
        );
        eprintln!("marked udp {udp}, marked tcp {tcp}, stray dns {stray}");
        assert_eq!(
            stray, 0,
            "DNS left the machine other than as the stub's marked upstream query"
        );
        assert!(status.success(), "the test inside the namespace failed");

        let queries = std::fs::read_to_string(&log).expect("log");
        assert!(
            queries.contains("query[A] meet.test from 192.0.2.66"),
            "{queries}"
        );
        assert!(queries.contains("query[A] alias.test"), "{queries}");
        assert!(
            !queries.contains("other.test") && !queries.contains("secret.test"),
            "{queries}"
        );
        // Upstream left marked over UDP and TCP.
        assert!(udp > 0 && tcp > 0, "upstream packets without the mark");
        drop(lab);
    }

    fn own_namespace() -> Option<std::path::PathBuf> {
        std::fs::read_link("/proc/self/ns/net").ok()
    }

    /// True only in a namespace other than the one the outer test ran in
    /// (and other than init's, when that is readable).
    fn in_test_namespace() -> bool {
        let Some(own) = own_namespace() else { return false };
        let outer = std::env::var_os("SG_DNS_LAB_OUTER_NS").map(std::path::PathBuf::from);
        let init = std::fs::read_link("/proc/1/ns/net").ok();
        outer.is_some_and(|o| o != own) && init.is_none_or(|i| i != own)
    }

    #[tokio::test]
    #[ignore = "run by lab_against_dnsmasq_in_netns inside its namespace"]
    async fn lab_inside_namespace() {
        let Ok(log) = std::env::var("SG_DNS_LAB_LOG") else {
            eprintln!("skipped: only runs inside lab_against_dnsmasq_in_netns");
            return;
        };
        assert!(
            in_test_namespace(),
            "refusing to run in the host's network namespace"
        );
        let dnsmasq_log = || std::fs::read_to_string(&log).unwrap_or_default();

        let sink = Recorder::new(150);
        let stub = StubResolver::start(StubConfig {
            port: LAB_PORT,
            upstream: vec![SocketAddr::from(([192, 0, 2, 65], 53))],
            allowed_names: vec!["meet.test".into()],
            upstream_mark: LAB_MARK,
            sink: sink.clone(),
        })
        .await
        .expect("stub");
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, LAB_PORT));
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, LAB_PORT));
        // Any server: the redirect brings it to the stub.
        let elsewhere = SocketAddr::from(([198, 51, 100, 53], 53));

        // Session start: every allowed name, both families, into the sink.
        let resolved = stub.resolve_all().await;
        let meet = resolved[0].1.as_ref().expect("meet.test resolves");
        assert_eq!(meet, &vec![(ip("203.0.113.10"), 300), (ip("2001:db8::10"), 300)]);
        assert!(sink.heard("meet.test", "203.0.113.10", 300));

        // An application's question, straight and redirected, UDP and TCP;
        // each time the sink had the address before the reply came.
        for (server, tcp) in [(v4, false), (elsewhere, false), (v6, true), (elsewhere, true)] {
            let before = sink.events().len();
            let reply = if tcp {
                ask_tcp(server, "Meet.Test", RecordType::A).await
            } else {
                ask_udp(server, "Meet.Test", RecordType::A).await
            };
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NoError,
                "{server} tcp={tcp}"
            );
            assert_eq!(addresses(&reply), vec![ip("203.0.113.10")]);
            assert_eq!(reply.answers[0].ttl, 300);
            assert_eq!(sink.events().len(), before + 1, "sink heard it before the reply");
            assert!(sink.heard("meet.test", "203.0.113.10", 300));
        }

        // Names outside the profile: REFUSED, and dnsmasq never hears them.
        for server in [v4, elsewhere] {
            for name in ["other.test", "secret.test", "alias.test"] {
                let reply = ask_udp(server, name, RecordType::A).await;
                assert_eq!(
                    reply.metadata.response_code,
                    ResponseCode::Refused,
                    "{name} via {server}"
                );
            }
        }
        let reply = ask_tcp(elsewhere, "secret.test", RecordType::AAAA).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = dnsmasq_log();
        assert!(
            !seen.contains("alias.test") && !seen.contains("other.test") && !seen.contains("secret.test")
        );

        // alias.test allowed: its CNAME leads to meet.test, which is then
        // answered under alias.test's name.
        stub.set_allowed_names(vec!["alias.test".into()]);
        let reply = ask_udp(elsewhere, "alias.test", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply
            .answers
            .iter()
            .any(|r| matches!(&r.data, RData::CNAME(c) if name_key(&c.0) == "meet.test")));
        assert_eq!(addresses(&reply), vec![ip("203.0.113.10")]);
        assert!(sink.heard("alias.test", "203.0.113.10", 300));
        let reply = ask_udp(v4, "meet.test", RecordType::AAAA).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(sink.heard("alias.test", "2001:db8::10", 300));
        let reply = ask_udp(v4, "other.test", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);

        let stats = stub.stats();
        eprintln!("stub stats: {stats:?}");
        assert_eq!((stats.answered, stats.refused, stats.failed), (6, 8, 0));
        stub.stop().await;
    }

    #[test]
    fn tcp_clients_are_counted_per_user_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:9C41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C41 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D431 0100007F:9C41 01 00000000:00000000 00:00000000 00000000  1000        0 3 1 0000000000000000 20 4 30 10 -1
   3: 420200C0:D432 350071CB:0035 01 00000000:00000000 00:00000000 00000000 65534        0 4 1 0000000000000000 20 4 30 10 -1
";
        let stub: SocketAddr = "127.0.0.1:40001".parse().expect("addr");
        let client: SocketAddr = "127.0.0.1:54321".parse().expect("addr");
        assert_eq!(uid_in_proc_net_tcp(table, client, stub), Some(1000));
        // Redirected: the client's socket still names the server it meant.
        let redirected: SocketAddr = "192.0.2.66:54322".parse().expect("addr");
        assert_eq!(uid_in_proc_net_tcp(table, redirected, stub), Some(65534));
        assert_eq!(
            uid_in_proc_net_tcp(table, "127.0.0.1:1".parse().expect("addr"), stub),
            None
        );
        assert_eq!(
            proc_socket_addr("00000000000000000000000001000000:0035"),
            Some("[::1]:53".parse().expect("addr"))
        );

        let counts = Arc::new(Mutex::new(HashMap::new()));
        let held: Vec<UserSlot> = (0..MAX_TCP_PER_USER)
            .map(|_| UserSlot::take(&counts, 0).expect("a slot"))
            .collect();
        assert!(
            UserSlot::take(&counts, 0).is_none(),
            "one user took more than its share"
        );
        assert!(
            UserSlot::take(&counts, 1000).is_some(),
            "another user was shut out"
        );
        drop(held);
        assert!(UserSlot::take(&counts, 0).is_some());
    }
}
