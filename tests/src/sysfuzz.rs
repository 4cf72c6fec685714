//! The stateful fuzzer's pure half (tests/tests/sysfuzz.rs drives the real
//! system): a seeded PRNG, the actions it draws, and the reference model of
//! what the machine must let through after each of them.
//!
//! Like Firezone's tunnel test (connlib's `tunnel_test`: a reference state
//! machine beside the real one, driven by proptest), the model is small and
//! obviously right, and the system under test is not: here the real kernel,
//! the real nftables ruleset, sessiond and a foreign WireGuard peer
//! (wireguard-go). After every action the driver waits until sessiond has
//! settled, runs a battery of probes and checks each against [`Model::expect`].
//!
//! This module owns the model and the action list. It never touches the
//! system: no commands, no files, no clock (the driver measures time and
//! tells the model what it needs), so a seed always draws the same steps.

use std::collections::BTreeSet;
use std::fmt;

use crate::lab::addr;

/// A small, fast PRNG (splitmix64): the same seed gives the same steps on
/// any machine, which is all a replay needs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A host of the lab that a profile can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Host {
    /// meet.test: 203.0.113.10 and 2001:db8:203::10.
    Meet,
    /// other.test: 203.0.113.20 (IPv4 only).
    Other,
}

impl Host {
    pub const ALL: [Host; 2] = [Host::Meet, Host::Other];

    pub fn name(self) -> &'static str {
        match self {
            Host::Meet => addr::MEET_NAME,
            Host::Other => addr::OTHER_NAME,
        }
    }

    /// The addresses both lab resolvers answer for the name.
    pub fn addresses(self) -> &'static [&'static str] {
        match self {
            Host::Meet => &[addr::HOST_V4, addr::HOST_V6],
            Host::Other => &[addr::OTHER_V4],
        }
    }

    fn of_address(address: &str) -> Option<Host> {
        Host::ALL.into_iter().find(|h| h.addresses().contains(&address))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One (host, protocol, port) a profile may allow.
pub type Grant = (Host, Proto, u16);

/// Everything a fuzzed profile can allow: the lab host's services, and
/// DNS-over-TLS (853), which a profile may list but the product refuses
/// whatever the profile says.
pub const UNIVERSE: [Grant; 7] = [
    (Host::Meet, Proto::Tcp, 443),
    (Host::Meet, Proto::Tcp, 853),
    (Host::Meet, Proto::Tcp, 8443),
    (Host::Meet, Proto::Udp, 10000),
    (Host::Other, Proto::Tcp, 443),
    (Host::Other, Proto::Tcp, 8443),
    (Host::Other, Proto::Udp, 10000),
];

/// Ports the product refuses to every host a profile lists.
pub const REFUSED_PORTS: [u16; 2] = [53, 853];

/// A profile's allow list: a non-empty subset of [`UNIVERSE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow(pub BTreeSet<Grant>);

impl Allow {
    pub fn of(grants: &[Grant]) -> Allow {
        Allow(grants.iter().copied().collect())
    }

    /// Whether the product lets this through while the list is in force:
    /// listed, and not DNS or DNS-over-TLS (only the pinned resolvers get
    /// DNS, through the stub).
    pub fn allows(&self, host: Host, proto: Proto, port: u16) -> bool {
        !REFUSED_PORTS.contains(&port) && self.0.contains(&(host, proto, port))
    }

    pub fn names(&self) -> BTreeSet<Host> {
        self.0.iter().map(|g| g.0).collect()
    }

    /// The `[[allow]]` entries of the profile's TOML, one per host.
    pub fn toml(&self) -> String {
        let mut text = String::new();
        for host in self.names() {
            let ports = |proto: Proto| {
                self.0
                    .iter()
                    .filter(|g| g.0 == host && g.1 == proto)
                    .map(|g| g.2.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            text.push_str(&format!(
                "[[allow]]\nhost = \"{}\"\ntcp = [{}]\nudp = [{}]\n\n",
                host.name(),
                ports(Proto::Tcp),
                ports(Proto::Udp)
            ));
        }
        text
    }
}

impl fmt::Display for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .0
            .iter()
            .map(|(h, p, port)| format!("{} {}/{port}", h.name(), p.name()))
            .collect();
        write!(f, "{{{}}}", items.join(", "))
    }
}

/// The two profiles the fuzzer starts: `lab` (meet.test as the bundled lab
/// profile has it) and `alt`, with a different allow list.
pub const PROFILES: [&str; 2] = ["lab", "alt"];

pub fn initial_allow(profile: usize) -> Allow {
    if profile == 0 {
        Allow::of(&[(Host::Meet, Proto::Tcp, 443), (Host::Meet, Proto::Udp, 10000)])
    } else {
        Allow::of(&[
            (Host::Other, Proto::Tcp, 8443),
            (Host::Other, Proto::Udp, 10000),
            (Host::Meet, Proto::Tcp, 8443),
        ])
    }
}

/// The client's physical addresses the fuzzer moves between (IPv4, IPv6).
pub const CLIENT_ADDRESSES: [(&str, &str); 3] = [
    (addr::CLIENT_V4, addr::CLIENT_V6),
    ("192.0.2.4", "2001:db8:1::4"),
    ("192.0.2.5", "2001:db8:1::5"),
];

/// The macvlan child of the client's link, in a namespace of its own.
pub const SIDE_V4: &str = "192.0.2.40";

/// How the physical link is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkDown {
    /// `ip link set c2r down` in the client (routes and IPv6 addresses go).
    Admin,
    /// The far end (the router's r2c) goes down: no carrier, routes stay.
    Carrier,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `sessionctl start PROFILE`.
    Start(usize),
    /// `sessionctl stop`.
    Stop,
    /// SIGKILL to sessiond (the firewall stays: kernel state).
    Kill9,
    /// sessiond starts again (and resumes a persisted session).
    Restart,
    /// The gateway's wireguard-go is killed (its interface goes).
    GatewayDown,
    /// The gateway's wireguard-go starts again with the same key and peers.
    GatewayUp,
    LinkDown(LinkDown),
    /// The link comes back and the network is configured again (what a
    /// network manager does).
    LinkUp,
    /// The client's physical addresses change (a new DHCP lease).
    Readdress(usize),
    /// A profile file is edited: `grant` added (widened) or removed
    /// (narrowed). Hot reload when it is the running session's profile.
    Edit {
        profile: usize,
        grant: Grant,
        widen: bool,
    },
    /// Another program rewrites the resolver file (in place).
    RewriteResolver(u64),
    /// `nft flush ruleset` in the client namespace.
    Flush,
    /// Time passes (seconds): answered addresses reach their timeout.
    TimePasses(u64),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Start(p) => write!(f, "start {}", PROFILES[*p]),
            Action::Stop => write!(f, "stop"),
            Action::Kill9 => write!(f, "kill -9 sessiond"),
            Action::Restart => write!(f, "restart sessiond"),
            Action::GatewayDown => write!(f, "gateway down"),
            Action::GatewayUp => write!(f, "gateway up"),
            Action::LinkDown(LinkDown::Admin) => write!(f, "link down (ip link set c2r down)"),
            Action::LinkDown(LinkDown::Carrier) => write!(f, "link down (carrier lost)"),
            Action::LinkUp => write!(f, "link up"),
            Action::Readdress(i) => write!(
                f,
                "physical address -> {} / {}",
                CLIENT_ADDRESSES[*i].0, CLIENT_ADDRESSES[*i].1
            ),
            Action::Edit {
                profile,
                grant: (h, p, port),
                widen,
            } => write!(
                f,
                "profile {} {} {} {}/{port}",
                PROFILES[*profile],
                if *widen { "widened by" } else { "narrowed by" },
                h.name(),
                p.name()
            ),
            Action::RewriteResolver(n) => write!(f, "resolver file rewritten by another program ({n})"),
            Action::Flush => write!(f, "nft flush ruleset"),
            Action::TimePasses(s) => write!(f, "{s} s pass"),
        }
    }
}

/// Which draws are enabled (switches from the environment).
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// `nft flush ruleset` (SYSFUZZ_FLUSH=1).
    pub flush: bool,
    /// Waits long enough for answered addresses to time out (long runs).
    pub time_passes: bool,
}

/// A session as the model knows it: it exists from `start` to `stop`
/// (across crashes: it is persisted, and the firewall is kernel state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub profile: usize,
    /// The allowlist has been opened (first handshake) by the sessiond
    /// that runs now; a hot reload is then put in force at once.
    pub opened: bool,
    /// The resolver file is pinned when the session opens (start and
    /// every resume pin it).
    pub pin_pending: bool,
}

/// What the machine looks like, as far as the probes care.
#[derive(Debug, Clone)]
pub struct Model {
    pub session: Option<Session>,
    pub daemon_up: bool,
    pub gateway_up: bool,
    pub link_down: Option<LinkDown>,
    pub address: usize,
    pub profiles: [Allow; 2],
    /// The resolver file's content now (once settled).
    pub resolver: String,
    /// What `stop` must write back (the content before the first pin).
    pub resolver_saved: Option<String>,
}

/// What the resolver file says while a session has it pinned (sessiond's
/// `PINNED_CONTENT`).
pub const PINNED_RESOLVER: &str = "# Written by sessiongate for the length of a session; restored on `sessionctl stop`.\nnameserver 127.0.0.1\noptions edns0 trust-ad\n";

/// What another program writes into the resolver file.
pub fn foreign_resolver(n: u64) -> String {
    format!(
        "# written by another program ({n})\nnameserver {}\noptions timeout:1 attempts:1\n",
        addr::PUBLIC_DNS_V4
    )
}

/// States `status` may claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusClaim {
    /// Acceptable `state` words.
    pub states: Vec<&'static str>,
    pub profile: Option<&'static str>,
    pub allow: Option<Allow>,
}

/// Who sends a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// root in the client namespace (the session's namespace).
    Root,
    /// An unprivileged user in the client namespace.
    User,
    /// root in another namespace on a macvlan child of the client's link.
    Side,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// TCP connect to a literal address; the service greets with `peer=IP`.
    Tcp(&'static str, u16),
    /// TCP connect to a name, resolved through the resolver file.
    TcpName(Host, u16),
    /// One datagram to the echo service; it answers `peer=IP ...`.
    Udp(&'static str, u16),
    /// One ICMP echo.
    Ping(&'static str),
    /// One DNS question over UDP straight to `server` (A or AAAA).
    Dns {
        server: &'static str,
        host: Host,
        v6: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub who: Who,
    pub kind: ProbeKind,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = match self.who {
            Who::Root => "root",
            Who::User => "user",
            Who::Side => "macvlan",
        };
        match &self.kind {
            ProbeKind::Tcp(a, p) => write!(f, "{who} tcp {a}:{p}"),
            ProbeKind::TcpName(h, p) => write!(f, "{who} tcp {}:{p} (by name)", h.name()),
            ProbeKind::Udp(a, p) => write!(f, "{who} udp {a}:{p}"),
            ProbeKind::Ping(a) => write!(f, "{who} ping {a}"),
            ProbeKind::Dns { server, host, v6 } => write!(
                f,
                "{who} dns {} {} @{server}",
                host.name(),
                if *v6 { "AAAA" } else { "A" }
            ),
        }
    }
}

/// What a probe must see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// An answer from the service, which saw one of these source addresses.
    Reach(Vec<String>),
    /// No connection, no answer (refused at once, or nothing within the
    /// short timeout).
    Refused,
    /// A DNS reply NOERROR with exactly these addresses (sorted).
    Answer(Vec<String>),
    /// No DNS reply, or one that gives no address.
    NoAnswer,
}

impl Expect {
    /// Whether the probe may take its long timeout (something must answer).
    pub fn answers(&self) -> bool {
        matches!(self, Expect::Reach(_) | Expect::Answer(_))
    }
}

/// Whether an address is IPv6.
pub fn is_v6(address: &str) -> bool {
    address.contains(':')
}

impl Model {
    pub fn new(initial_resolver: &str) -> Model {
        Model {
            session: None,
            daemon_up: true,
            gateway_up: true,
            link_down: None,
            address: 0,
            profiles: [initial_allow(0), initial_allow(1)],
            resolver: initial_resolver.to_string(),
            resolver_saved: None,
        }
    }

    /// The tunnel can carry traffic: the gateway runs and the link is up.
    pub fn path_ok(&self) -> bool {
        self.gateway_up && self.link_down.is_none()
    }

    /// The session's allowlist is open and the tunnel works: what the
    /// profile allows gets through.
    pub fn tunnel_works(&self) -> bool {
        self.daemon_up && self.path_ok() && self.session.is_some()
    }

    pub fn session_allow(&self) -> Option<&Allow> {
        self.session.as_ref().map(|s| &self.profiles[s.profile])
    }

    /// Draws the next action among those that make sense now.
    pub fn draw(&self, rng: &mut Rng, options: Options) -> Action {
        let mut choices: Vec<(u64, Action)> = Vec::new();
        let session = self.session.is_some();
        if self.daemon_up {
            let w = if session { 1 } else { 6 };
            choices.push((w, Action::Start(0)));
            choices.push((w, Action::Start(1)));
            choices.push((if session { 5 } else { 1 }, Action::Stop));
            choices.push((if session { 3 } else { 1 }, Action::Kill9));
            if options.flush {
                choices.push((2, Action::Flush));
            }
        } else {
            choices.push((12, Action::Restart));
        }
        choices.push((
            if self.gateway_up { 1 } else { 4 },
            if self.gateway_up {
                Action::GatewayDown
            } else {
                Action::GatewayUp
            },
        ));
        match self.link_down {
            None => {
                let kind = if rng.below(2) == 0 {
                    LinkDown::Admin
                } else {
                    LinkDown::Carrier
                };
                choices.push((1, Action::LinkDown(kind)));
            }
            Some(_) => choices.push((4, Action::LinkUp)),
        }
        let next_address = (self.address + 1 + rng.below(2) as usize) % CLIENT_ADDRESSES.len();
        choices.push((1, Action::Readdress(next_address)));
        // Edits favour the running profile (a hot reload).
        let profile = match &self.session {
            Some(s) if rng.below(4) != 0 => s.profile,
            _ => rng.below(2) as usize,
        };
        let allow = &self.profiles[profile];
        let absent: Vec<Grant> = UNIVERSE
            .iter()
            .copied()
            .filter(|g| !allow.0.contains(g))
            .collect();
        let present: Vec<Grant> = allow.0.iter().copied().collect();
        let widen = present.len() <= 1 || (!absent.is_empty() && rng.below(2) == 0);
        let pool = if widen { &absent } else { &present };
        if !pool.is_empty() {
            let grant = pool[rng.below(pool.len() as u64) as usize];
            choices.push((
                if session { 4 } else { 2 },
                Action::Edit {
                    profile,
                    grant,
                    widen,
                },
            ));
        }
        choices.push((1, Action::RewriteResolver(rng.below(1_000_000))));
        if options.time_passes && session {
            choices.push((1, Action::TimePasses(95)));
        }
        let total: u64 = choices.iter().map(|c| c.0).sum();
        let mut pick = rng.below(total);
        for (w, action) in choices {
            if pick < w {
                return action;
            }
            pick -= w;
        }
        Action::Stop
    }

    /// Applies an action to the model (what must be true once sessiond has
    /// settled after it).
    pub fn apply(&mut self, action: &Action) {
        match action {
            Action::Start(p) => {
                if self.daemon_up && self.session.is_none() {
                    self.session = Some(Session {
                        profile: *p,
                        opened: false,
                        pin_pending: true,
                    });
                }
            }
            Action::Stop => {
                if self.daemon_up {
                    self.session = None;
                    if let Some(saved) = self.resolver_saved.take() {
                        self.resolver = saved;
                    }
                }
            }
            Action::Kill9 => {
                self.daemon_up = false;
                if let Some(s) = &mut self.session {
                    s.opened = false;
                }
            }
            Action::Restart => {
                self.daemon_up = true;
                if let Some(s) = &mut self.session {
                    s.opened = false;
                    s.pin_pending = true;
                }
            }
            Action::GatewayDown => self.gateway_up = false,
            Action::GatewayUp => self.gateway_up = true,
            Action::LinkDown(kind) => self.link_down = Some(*kind),
            Action::LinkUp => self.link_down = None,
            Action::Readdress(i) => self.address = *i,
            Action::Edit {
                profile,
                grant,
                widen,
            } => {
                let allow = &mut self.profiles[*profile].0;
                if *widen {
                    allow.insert(*grant);
                } else {
                    allow.remove(grant);
                }
            }
            Action::RewriteResolver(n) => self.resolver = foreign_resolver(*n),
            Action::Flush | Action::TimePasses(_) => {}
        }
        self.settle();
    }

    /// What happens by itself once the tunnel works: the session opens
    /// and pins the resolver file.
    fn settle(&mut self) {
        let works = self.tunnel_works();
        let Some(s) = &mut self.session else { return };
        if works {
            s.opened = true;
            if s.pin_pending {
                s.pin_pending = false;
                if self.resolver_saved.is_none() {
                    self.resolver_saved = Some(self.resolver.clone());
                }
                self.resolver = PINNED_RESOLVER.to_string();
            }
        }
    }

    /// What `status` may say (None: sessiond is not running, no answer).
    /// `broken_long` says the tunnel has had no path for longer than
    /// sessiond's 25 s before it calls the peer lost (plus slack).
    pub fn status_claim(&self, broken_long: bool) -> Option<StatusClaim> {
        if !self.daemon_up {
            return None;
        }
        Some(match &self.session {
            None => StatusClaim {
                states: vec!["idle"],
                profile: None,
                allow: Some(Allow(BTreeSet::new())),
            },
            Some(s) => StatusClaim {
                states: if self.path_ok() {
                    vec!["active"]
                } else if broken_long || !s.opened {
                    vec!["degraded"]
                } else {
                    vec!["active", "degraded"]
                },
                profile: Some(PROFILES[s.profile]),
                allow: Some(self.profiles[s.profile].clone()),
            },
        })
    }

    /// The probe battery: DNS questions first (they put answered addresses
    /// in the allowlist, as an application's own lookup would), then the
    /// connections.
    pub fn battery(&self) -> (Vec<Probe>, Vec<Probe>) {
        let p = |who, kind| Probe { who, kind };
        let mut dns = Vec::new();
        for who in [Who::Root, Who::User] {
            dns.push(p(
                who,
                ProbeKind::Dns {
                    server: addr::PUBLIC_DNS_V4,
                    host: Host::Meet,
                    v6: false,
                },
            ));
            dns.push(p(
                who,
                ProbeKind::Dns {
                    server: addr::PUBLIC_DNS_V4,
                    host: Host::Other,
                    v6: false,
                },
            ));
        }
        dns.push(p(
            Who::Root,
            ProbeKind::Dns {
                server: addr::PUBLIC_DNS_V4,
                host: Host::Meet,
                v6: true,
            },
        ));
        // Nothing serves DNS at this IPv6 address: only the stub's redirect
        // can answer.
        dns.push(p(
            Who::Root,
            ProbeKind::Dns {
                server: addr::HOST_V6,
                host: Host::Meet,
                v6: false,
            },
        ));
        dns.push(p(
            Who::Side,
            ProbeKind::Dns {
                server: addr::PUBLIC_DNS_V4,
                host: Host::Meet,
                v6: false,
            },
        ));
        let mut conn = Vec::new();
        for (address, port) in [
            (addr::HOST_V4, 443),
            (addr::HOST_V4, 8443),
            (addr::HOST_V6, 443),
            (addr::HOST_V6, 8443),
            (addr::OTHER_V4, 443),
            (addr::OTHER_V4, 8443),
            // DNS-over-TLS: something listens, the product must refuse.
            (addr::HOST_V4, 853),
        ] {
            conn.push(p(Who::Root, ProbeKind::Tcp(address, port)));
        }
        for address in [addr::HOST_V4, addr::HOST_V6, addr::OTHER_V4] {
            conn.push(p(Who::Root, ProbeKind::Udp(address, 10000)));
        }
        conn.push(p(Who::Root, ProbeKind::Udp(addr::HOST_V4, 853)));
        conn.push(p(Who::Root, ProbeKind::Ping(addr::HOST_V4)));
        conn.push(p(Who::Root, ProbeKind::Ping(addr::HOST_V6)));
        conn.push(p(Who::Root, ProbeKind::TcpName(Host::Meet, 443)));
        conn.push(p(Who::Root, ProbeKind::TcpName(Host::Other, 8443)));
        for (address, port) in [(addr::HOST_V4, 443), (addr::OTHER_V4, 8443), (addr::HOST_V6, 443)] {
            conn.push(p(Who::User, ProbeKind::Tcp(address, port)));
        }
        conn.push(p(Who::User, ProbeKind::Udp(addr::HOST_V4, 10000)));
        conn.push(p(Who::User, ProbeKind::Ping(addr::OTHER_V4)));
        conn.push(p(Who::User, ProbeKind::TcpName(Host::Meet, 443)));
        conn.push(p(Who::Side, ProbeKind::Tcp(addr::HOST_V4, 443)));
        conn.push(p(Who::Side, ProbeKind::Tcp(addr::OTHER_V4, 8443)));
        conn.push(p(Who::Side, ProbeKind::Udp(addr::HOST_V4, 10000)));
        conn.push(p(Who::Side, ProbeKind::Ping(addr::OTHER_V4)));
        (dns, conn)
    }

    /// What a probe must see now; None: no claim (the probe is skipped).
    pub fn expect(&self, probe: &Probe) -> Option<Expect> {
        let link_up = self.link_down.is_none();
        let (client_v4, client_v6) = CLIENT_ADDRESSES[self.address];
        // No session: the network as the lab offers it.
        let Some(session) = &self.session else {
            if !link_up {
                // Name lookups would wait for the resolver's own timeouts.
                return match probe.kind {
                    ProbeKind::TcpName(..) => None,
                    ProbeKind::Dns { .. } => Some(Expect::NoAnswer),
                    _ => Some(Expect::Refused),
                };
            }
            let source = |address: &str| -> Vec<String> {
                match probe.who {
                    Who::Side => vec![format!("peer={SIDE_V4}")],
                    _ if is_v6(address) => vec![format!("peer={client_v6}")],
                    _ => vec![format!("peer={client_v4}")],
                }
            };
            return Some(match &probe.kind {
                // The macvlan child has no IPv6 address.
                ProbeKind::Tcp(a, _) | ProbeKind::Udp(a, _) | ProbeKind::Ping(a)
                    if probe.who == Who::Side && is_v6(a) =>
                {
                    Expect::Refused
                }
                ProbeKind::Tcp(a, _) | ProbeKind::Udp(a, _) | ProbeKind::Ping(a) => Expect::Reach(source(a)),
                ProbeKind::TcpName(host, _) => {
                    Expect::Reach(host.addresses().iter().flat_map(|a| source(a)).collect())
                }
                ProbeKind::Dns { server, host, v6 } => {
                    if *server != addr::PUBLIC_DNS_V4 {
                        Expect::NoAnswer
                    } else {
                        answer(*host, *v6)
                    }
                }
            });
        };
        // A session: nothing but the profile's hosts and ports, only
        // through the tunnel, and only while it works.
        let allow = &self.profiles[session.profile];
        let works = self.tunnel_works();
        if probe.who == Who::Side {
            return Some(match probe.kind {
                ProbeKind::Dns { .. } => Expect::NoAnswer,
                _ => Expect::Refused,
            });
        }
        let through_tunnel = |address: &str| {
            vec![format!(
                "peer={}",
                if is_v6(address) {
                    addr::GATEWAY_V6
                } else {
                    addr::GATEWAY_V4
                }
            )]
        };
        Some(match &probe.kind {
            ProbeKind::Tcp(a, port) | ProbeKind::Udp(a, port) => {
                let proto = if matches!(probe.kind, ProbeKind::Tcp(..)) {
                    Proto::Tcp
                } else {
                    Proto::Udp
                };
                match Host::of_address(a) {
                    Some(host) if works && allow.allows(host, proto, *port) => {
                        Expect::Reach(through_tunnel(a))
                    }
                    _ => Expect::Refused,
                }
            }
            ProbeKind::Ping(_) => Expect::Refused,
            ProbeKind::TcpName(host, port) => {
                if !works {
                    // The stub waits for its upstream's timeout.
                    return None;
                }
                if allow.allows(*host, Proto::Tcp, *port) {
                    Expect::Reach(host.addresses().iter().flat_map(|a| through_tunnel(a)).collect())
                } else {
                    Expect::Refused
                }
            }
            ProbeKind::Dns { host, v6, .. } => {
                if works && allow.names().contains(host) {
                    answer(*host, *v6)
                } else {
                    Expect::NoAnswer
                }
            }
        })
    }
}

/// Both lab resolvers answer the same: meet.test A and AAAA, other.test A.
fn answer(host: Host, v6: bool) -> Expect {
    let mut addrs: Vec<String> = host
        .addresses()
        .iter()
        .filter(|a| is_v6(a) == v6)
        .map(|a| a.to_string())
        .collect();
    addrs.sort();
    Expect::Answer(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_draws_the_same_steps() {
        let run = |seed| {
            let mut rng = Rng::new(seed);
            let mut model = Model::new("nameserver 203.0.113.53\n");
            let mut steps = Vec::new();
            for _ in 0..200 {
                let a = model.draw(&mut rng, Options::default());
                model.apply(&a);
                steps.push(a.to_string());
            }
            steps
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn profiles_never_become_empty() {
        let mut rng = Rng::new(1);
        let mut model = Model::new("");
        for _ in 0..2000 {
            let a = model.draw(&mut rng, Options::default());
            model.apply(&a);
            assert!(model.profiles.iter().all(|p| !p.0.is_empty()), "after {a}");
        }
    }

    #[test]
    fn an_active_session_reaches_only_its_grants_through_the_tunnel() {
        let mut model = Model::new("nameserver 203.0.113.53\n");
        model.apply(&Action::Start(0));
        let tcp = |a, p| Probe {
            who: Who::Root,
            kind: ProbeKind::Tcp(a, p),
        };
        assert_eq!(
            model.expect(&tcp(addr::HOST_V4, 443)),
            Some(Expect::Reach(vec![format!("peer={}", addr::GATEWAY_V4)]))
        );
        assert_eq!(model.expect(&tcp(addr::HOST_V4, 8443)), Some(Expect::Refused));
        assert_eq!(model.expect(&tcp(addr::OTHER_V4, 443)), Some(Expect::Refused));
        model.apply(&Action::Edit {
            profile: 0,
            grant: (Host::Meet, Proto::Tcp, 853),
            widen: true,
        });
        assert_eq!(model.expect(&tcp(addr::HOST_V4, 853)), Some(Expect::Refused));
        assert_eq!(model.resolver, PINNED_RESOLVER);
        model.apply(&Action::GatewayDown);
        assert_eq!(model.expect(&tcp(addr::HOST_V4, 443)), Some(Expect::Refused));
        model.apply(&Action::Stop);
        assert_eq!(model.resolver, "nameserver 203.0.113.53\n");
        assert_eq!(
            model.expect(&tcp(addr::OTHER_V4, 443)),
            Some(Expect::Reach(vec![format!("peer={}", addr::CLIENT_V4)]))
        );
    }

    #[test]
    fn a_resume_pins_the_resolver_file_again_but_keeps_the_first_copy() {
        let mut model = Model::new("original\n");
        model.apply(&Action::Start(1));
        model.apply(&Action::RewriteResolver(3));
        assert_eq!(model.resolver, foreign_resolver(3));
        model.apply(&Action::Kill9);
        model.apply(&Action::Restart);
        assert_eq!(model.resolver, PINNED_RESOLVER);
        model.apply(&Action::Stop);
        assert_eq!(model.resolver, "original\n");
    }
}
