//! `sessionctl verify`: active probes, sent by the daemon itself
//! (so from the daemon's network namespace, through the same routes and the
//! same firewall as any application), that show the session's boundary
//! holds right now:
//!
//! 1. *allowed host*: a TCP connection to the first allowed host with a TCP
//!    port and a resolved address must succeed, from an address of the
//!    tunnel interface (read with getifaddrs);
//! 2. *outside host*: a TCP connection to a documentation address outside
//!    the profile must be refused, and the table's `refused` counter must
//!    have gone up (our rule refused it, not the far end);
//! 3. *other dns server*: a query to a server that is not pinned, for a name
//!    outside the profile, must be answered REFUSED by the local stub (or,
//!    with no stub yet, refused on this machine), never by a resolver;
//! 4. *ipv6 host*: the same as 2 with an IPv6 documentation address; a
//!    machine without IPv6 ("network unreachable", no socket) passes too.
//!
//! What it owns: the probes, their targets, their timeouts and the report
//! (`{"passed", "probes": [{"name", "result", "evidence"}]}`).
//!
//! What it must never do: send a packet that our firewall has not decided on
//! (each blocked-traffic probe goes out only after our table was found in
//! place, the session machine runs verify as its own command and cancels
//! it before a `stop` takes the firewall away, and the targets are
//! documentation addresses or an allowed host); change the
//! firewall, the routes or the session; take longer than [`PROBE_TIMEOUT`]
//! per probe; or log a destination (the log gets counts only).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use rand_core::{OsRng, RngCore};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, UdpSocket};

use crate::firewall::{Firewall, VERIFY_MARK};
use crate::io_reason;
use crate::session::{AllowedHost, Phase, StatusReport};

/// The longest any one probe waits.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The reply to `verify` when no session runs.
pub const NEEDS_SESSION: &str = "verify needs a running session; start one with `sessionctl start PROFILE`";

/// Probe names, as `sessionctl verify` prints them.
pub use crate::control::probe::ALLOWED_HOST;
pub const OUTSIDE_HOST: &str = "outside host";
pub const OTHER_DNS: &str = "other dns server";
pub const IPV6_HOST: &str = "ipv6 host";

/// Where the outside probes go: documentation addresses (RFC 5737, RFC
/// 3849), the first one that no allowed host covers. Port 443, like a video
/// call's.
const OUTSIDE_V4: [Ipv4Addr; 3] = [
    Ipv4Addr::new(192, 0, 2, 254),
    Ipv4Addr::new(198, 51, 100, 254),
    Ipv4Addr::new(203, 0, 113, 254),
];
const OUTSIDE_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1),
];
const OUTSIDE_PORT: u16 = 443;
/// The evidence of an outside probe not sent in the gateway-enforced kind.
const GATEWAY_ENFORCED: &str = "not probed: this profile is gateway-enforced, so this machine sends every address into the tunnel and the practice's gateway, not this machine, refuses hosts outside the allowlist";
/// A resolver nobody pins, and a name no profile allows.
const DNS_SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 53)), 53);
const DNS_NAME: &str = "verify.sessiongate.invalid.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    Fail,
}

/// One probe's result and its one line of evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub name: String,
    pub result: Verdict,
    pub evidence: String,
}

impl Probe {
    fn new(name: &str, result: Verdict, evidence: impl Into<String>) -> Probe {
        Probe {
            name: name.to_string(),
            result,
            evidence: evidence.into(),
        }
    }
}

/// What `verify` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Every probe passed.
    pub passed: bool,
    pub probes: Vec<Probe>,
}

/// Runs the probes one after another (the outside probes read the refuse
/// counter around themselves, so they must not overlap). `Err` is the
/// reply's message: there is no session.
/// The firewall is the session's: the probes read its refuse counter and
/// check its table is in place before sending.
pub async fn run(firewall: Arc<Firewall>, status: StatusReport) -> Result<Report, String> {
    if status.phase == Phase::Idle {
        return Err(NEEDS_SESSION.to_string());
    }
    // The gateway-enforced kind sends every address into the tunnel by
    // design: an outside host is the gateway's to refuse, not this
    // machine's, so the probes that prove this machine refuses are not sent.
    let gateway_enforced = status.allowed.iter().any(|h| h.gateway_enforced);
    let outside = |name: &'static str, v6: bool| {
        let target = outside_target(&status.allowed, v6);
        let firewall = &firewall;
        async move {
            if gateway_enforced {
                Probe::new(name, Verdict::Pass, GATEWAY_ENFORCED)
            } else {
                outside_host(firewall, name, target).await
            }
        }
    };
    let probes = vec![
        allowed_host(&status).await,
        outside(OUTSIDE_HOST, false).await,
        other_dns_server(&firewall).await,
        outside(IPV6_HOST, true).await,
    ];
    let failed = probes.iter().filter(|p| p.result == Verdict::Fail).count();
    tracing::info!(
        "verify: {} of {} probes passed",
        probes.len() - failed,
        probes.len()
    );
    Ok(Report {
        passed: failed == 0,
        probes,
    })
}

// ---------------------------------------------------------------------------
// 1. The allowed host, through the tunnel.

async fn allowed_host(status: &StatusReport) -> Probe {
    let fail = |evidence: String| Probe::new(ALLOWED_HOST, Verdict::Fail, evidence);
    let Some(tunnel) = &status.tunnel else {
        return fail("the tunnel is not up, so nothing can reach the allowed host".into());
    };
    let interface = tunnel.interface.as_str();
    let local = match interface_addresses(interface) {
        Ok(addrs) => addrs,
        Err(e) => return fail(format!("cannot read the addresses of {interface}: {e}")),
    };
    let Some(target) = allowed_target(&status.allowed, &local) else {
        return fail(
            "no allowed host with a TCP port has a resolved address yet (see `sessionctl status`)".into(),
        );
    };
    let socket = match new_tcp_socket(target, None) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot open a socket for {target}: {}", io_reason(&e))),
    };
    match tokio::time::timeout(PROBE_TIMEOUT, socket.connect(target)).await {
        Ok(Ok(stream)) => {
            let from = match stream.local_addr() {
                Ok(a) => a.ip(),
                Err(e) => return fail(format!("connected to {target}, but: {}", io_reason(&e))),
            };
            drop(stream);
            judge_allowed(target, from, interface, &local)
        }
        Ok(Err(e)) => fail(format!(
            "connecting to {target} failed: {}",
            lower(&io_reason(&e))
        )),
        Err(_) => fail(format!(
            "no answer from {target} within {} s through {interface}{}",
            PROBE_TIMEOUT.as_secs(),
            match status.phase {
                Phase::Active => String::new(),
                state => format!(" (the session is {})", state_word(state)),
            }
        )),
    }
}

fn judge_allowed(target: SocketAddr, from: IpAddr, interface: &str, local: &[IpAddr]) -> Probe {
    if local.contains(&from) {
        Probe::new(
            ALLOWED_HOST,
            Verdict::Pass,
            format!("connected to {target} from {from} on {interface}"),
        )
    } else {
        Probe::new(
            ALLOWED_HOST,
            Verdict::Fail,
            format!("connected to {target} from {from}, which is not an address of {interface}: not through the tunnel"),
        )
    }
}

/// The first allowed host's first single address with a TCP port, of a
/// family the tunnel has an address of (else of any family).
fn allowed_target(allowed: &[AllowedHost], tunnel_addrs: &[IpAddr]) -> Option<SocketAddr> {
    let candidates: Vec<SocketAddr> = allowed
        .iter()
        .filter_map(|h| h.tcp.first().map(|ports| (h, ports.first)))
        .flat_map(|(h, port)| {
            h.addresses
                .iter()
                .filter_map(|a| single_address(a))
                .map(move |ip| SocketAddr::new(ip, port))
        })
        .collect();
    candidates
        .iter()
        .find(|c| tunnel_addrs.iter().any(|t| t.is_ipv4() == c.is_ipv4()))
        .or(candidates.first())
        .copied()
}

/// The addresses of one interface of this network namespace.
fn interface_addresses(name: &str) -> Result<Vec<IpAddr>, String> {
    let all = nix::ifaddrs::getifaddrs().map_err(|e| e.desc().to_string())?;
    Ok(all
        .filter(|ifa| ifa.interface_name == name)
        .filter_map(|ifa| {
            let addr = ifa.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

// ---------------------------------------------------------------------------
// 2 and 4. Outside hosts, refused by our table.

/// The first documentation address of the family that no allowed host
/// covers, on port 443.
fn outside_target(allowed: &[AllowedHost], v6: bool) -> Option<SocketAddr> {
    let nets: Vec<(IpAddr, u8)> = allowed
        .iter()
        .flat_map(|h| h.addresses.iter().filter_map(|a| parse_net(a)))
        .collect();
    let candidates: Vec<IpAddr> = if v6 {
        OUTSIDE_V6.iter().map(|a| IpAddr::V6(*a)).collect()
    } else {
        OUTSIDE_V4.iter().map(|a| IpAddr::V4(*a)).collect()
    };
    candidates
        .into_iter()
        .find(|ip| !nets.iter().any(|net| covers(*net, *ip)))
        .map(|ip| SocketAddr::new(ip, OUTSIDE_PORT))
}

/// How a blocked-traffic connect ended.
#[derive(Debug)]
enum Attempt {
    Connected,
    Failed(io::Error),
    TimedOut,
}

async fn outside_host(firewall: &Firewall, name: &'static str, target: Option<SocketAddr>) -> Probe {
    let fail = |evidence: String| Probe::new(name, Verdict::Fail, evidence);
    let Some(target) = target else {
        return fail("every documentation address it could use is inside the profile's allowlist".into());
    };
    if let Some(problem) = firewall_missing(firewall).await {
        return fail(problem);
    }
    let before = match firewall.refused_packets().await {
        Ok(n) => n,
        Err(e) => return fail(format!("cannot read the refuse counter ({e}); nothing was sent")),
    };
    let socket = match new_tcp_socket(target, Some(VERIFY_MARK)) {
        Ok(s) => s,
        Err(e) if target.is_ipv6() && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            return Probe::new(
                name,
                Verdict::Pass,
                "this machine has no IPv6 (no IPv6 socket can be opened), so nothing can go out over it",
            )
        }
        Err(e) => return fail(format!("cannot open a socket for {target}: {}", io_reason(&e))),
    };
    let attempt = match tokio::time::timeout(PROBE_TIMEOUT, socket.connect(target)).await {
        Ok(Ok(stream)) => {
            drop(stream);
            Attempt::Connected
        }
        Ok(Err(e)) => Attempt::Failed(e),
        Err(_) => Attempt::TimedOut,
    };
    let counted = match firewall.refused_packets().await {
        // A smaller value: the table was replaced meanwhile (a reload), its
        // counter started again from zero.
        Ok(after) if after >= before => after - before,
        Ok(after) => after,
        Err(_) => 0,
    };
    judge_outside(name, target, &attempt, counted)
}

fn judge_outside(name: &str, target: SocketAddr, attempt: &Attempt, counted: u64) -> Probe {
    let wait = PROBE_TIMEOUT.as_secs();
    let (result, evidence) = match (attempt, counted) {
        (Attempt::Connected, _) => (
            Verdict::Fail,
            format!("connected to {target}: sessiongate's firewall let it through"),
        ),
        (Attempt::Failed(e), n) if n > 0 => (
            Verdict::Pass,
            format!(
                "{target} refused by sessiongate's firewall ({}; refuse counter +{n})",
                lower(&io_reason(e))
            ),
        ),
        (Attempt::TimedOut, n) if n > 0 => (
            Verdict::Pass,
            format!("{target} refused by sessiongate's firewall (refuse counter +{n}; no reset within {wait} s)"),
        ),
        (Attempt::Failed(e), _) if target.is_ipv6() && e.raw_os_error() == Some(libc::ENETUNREACH) => (
            Verdict::Pass,
            format!("{target}: network is unreachable, this machine has no IPv6 route, so nothing was sent"),
        ),
        (Attempt::Failed(e), _) => (
            Verdict::Fail,
            format!(
                "{target}: {}, but sessiongate's refuse counter did not move: something else stopped it",
                lower(&io_reason(e))
            ),
        ),
        (Attempt::TimedOut, _) => (
            Verdict::Fail,
            format!("{target}: no answer within {wait} s and sessiongate's refuse counter did not move: it may have left the machine"),
        ),
    };
    Probe::new(name, result, evidence)
}

// ---------------------------------------------------------------------------
// 3. DNS to a server that is not pinned.

#[derive(Debug)]
enum DnsAttempt {
    Answered(ResponseCode, Duration),
    Failed(io::Error),
    TimedOut,
}

/// Why a blocking probe must not be sent: our table is not in place as
/// applied (so a "blocked" result would prove nothing), or cannot be read.
async fn firewall_missing(firewall: &Firewall) -> Option<String> {
    match firewall.is_present().await {
        Ok(true) => None,
        Ok(false) => Some(
            "sessiongate's firewall table is not in place as applied (it is being put back); nothing was sent"
                .into(),
        ),
        Err(e) => Some(format!("cannot read sessiongate's firewall table ({e}); nothing was sent")),
    }
}

async fn other_dns_server(firewall: &Firewall) -> Probe {
    let fail = |evidence: String| Probe::new(OTHER_DNS, Verdict::Fail, evidence);
    if let Some(problem) = firewall_missing(firewall).await {
        return fail(problem);
    }
    let query = match dns_query() {
        Ok(q) => q,
        Err(e) => return fail(format!("cannot build the query: {e}")),
    };
    judge_dns(&dns_exchange(&query).await)
}

fn dns_query() -> Result<Message, String> {
    let name = Name::from_ascii(DNS_NAME).map_err(|e| e.to_string())?;
    let mut id = [0u8; 2];
    OsRng
        .try_fill_bytes(&mut id)
        .map_err(|e| format!("no random query id: {e}"))?;
    let mut query = Message::new(u16::from_ne_bytes(id), MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name, RecordType::A));
    Ok(query)
}

async fn dns_exchange(query: &Message) -> DnsAttempt {
    let bytes = match query.to_vec() {
        Ok(b) => b,
        Err(e) => return DnsAttempt::Failed(io::Error::other(e.to_string())),
    };
    let started = Instant::now();
    let exchange = async {
        let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await?;
        socket.connect(DNS_SERVER).await?;
        socket.send(&bytes).await?;
        let mut buf = [0u8; 1500];
        loop {
            let n = socket.recv(&mut buf).await?;
            // Anything that is not the answer to this query is ignored.
            if let Ok(reply) = Message::from_vec(&buf[..n]) {
                if reply.metadata.id == query.metadata.id
                    && reply.metadata.message_type == MessageType::Response
                {
                    return Ok::<_, io::Error>(reply.metadata.response_code);
                }
            }
        }
    };
    match tokio::time::timeout(PROBE_TIMEOUT, exchange).await {
        Ok(Ok(rcode)) => DnsAttempt::Answered(rcode, started.elapsed()),
        Ok(Err(e)) => DnsAttempt::Failed(e),
        Err(_) => DnsAttempt::TimedOut,
    }
}

fn judge_dns(attempt: &DnsAttempt) -> Probe {
    let name = DNS_NAME.trim_end_matches('.');
    let (result, evidence) = match attempt {
        DnsAttempt::Answered(ResponseCode::Refused, took) => (
            Verdict::Pass,
            format!(
                "query for {name} to {DNS_SERVER} answered REFUSED by the local stub in {}",
                match took.as_millis() {
                    0 => "under 1 ms".to_string(),
                    ms => format!("{ms} ms"),
                }
            ),
        ),
        DnsAttempt::Answered(rcode, _) => (
            Verdict::Fail,
            format!("query for {name} to {DNS_SERVER} answered {rcode}: it reached a resolver, not the local stub"),
        ),
        // Our table was in place: it redirects every DNS packet to the stub,
        // or (no stub yet) refuses it, so an error came from this machine.
        DnsAttempt::Failed(e) => (
            Verdict::Pass,
            format!(
                "query to {DNS_SERVER} refused on this machine ({}): no DNS stub answers yet and sessiongate's firewall refuses DNS",
                lower(&io_reason(e))
            ),
        ),
        DnsAttempt::TimedOut => (
            Verdict::Fail,
            format!(
                "query to {DNS_SERVER}: no answer and no refusal within {} s, so it cannot be shown to have stayed on this machine",
                PROBE_TIMEOUT.as_secs()
            ),
        ),
    };
    Probe::new(OTHER_DNS, result, evidence)
}

// ---------------------------------------------------------------------------
// Helpers.

fn new_tcp_socket(target: SocketAddr, mark: Option<u32>) -> io::Result<TcpSocket> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(mark) = mark {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(io::Error::from)?;
    }
    Ok(socket)
}

/// An address string of the status (`203.0.113.10`, `203.0.113.10/32`) as
/// one host address; a wider network is not one host.
fn single_address(text: &str) -> Option<IpAddr> {
    let (addr, len) = parse_net(text)?;
    (len == full_length(addr)).then_some(addr)
}

/// `ADDR` or `ADDR/LEN`.
fn parse_net(text: &str) -> Option<(IpAddr, u8)> {
    match text.split_once('/') {
        Some((addr, len)) => {
            let addr: IpAddr = addr.trim().parse().ok()?;
            let len: u8 = len.trim().parse().ok()?;
            (len <= full_length(addr)).then_some((addr, len))
        }
        None => {
            let addr: IpAddr = text.trim().parse().ok()?;
            Some((addr, full_length(addr)))
        }
    }
}

fn full_length(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn covers((net, len): (IpAddr, u8), ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// "Connection refused" reads better mid-sentence as "connection refused".
fn lower(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn state_word(state: Phase) -> &'static str {
    match state {
        Phase::Idle => "idle",
        Phase::Starting => "starting",
        Phase::Active => "active",
        Phase::Degraded => "degraded",
        Phase::Stopping => "stopping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, addresses: &[&str], tcp: &[u16]) -> AllowedHost {
        AllowedHost {
            host: name.into(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            tcp: tcp
                .iter()
                .map(|&p| crate::profile::PortRange::single(p))
                .collect(),
            udp: vec![crate::profile::PortRange::single(10000)],
            gateway_enforced: false,
        }
    }

    fn sa(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    #[test]
    fn the_allowed_target_has_a_tcp_port_and_the_tunnels_family() {
        let v4_tunnel: Vec<IpAddr> = vec!["192.0.2.66".parse().expect("ip")];
        let hosts = vec![
            host("udp-only.test", &["203.0.113.5"], &[]),
            host("net.test", &["203.0.113.0/24"], &[443]),
            host(
                "meet.test",
                &["2001:db8:203::10", "203.0.113.10/32"],
                &[443, 8443],
            ),
        ];
        assert_eq!(allowed_target(&hosts, &v4_tunnel), Some(sa("203.0.113.10:443")));
        // No family match: the first single address, whatever its family.
        assert_eq!(allowed_target(&hosts, &[]), Some(sa("[2001:db8:203::10]:443")));
        assert_eq!(allowed_target(&hosts[..2], &v4_tunnel), None);
        assert_eq!(allowed_target(&[], &v4_tunnel), None);
    }

    #[test]
    fn outside_targets_avoid_the_allowlist() {
        assert_eq!(outside_target(&[], false), Some(sa("192.0.2.254:443")));
        assert_eq!(outside_target(&[], true), Some(sa("[2001:db8::1]:443")));
        let hosts = vec![
            host("a", &["192.0.2.0/24"], &[443]),
            host("b", &["2001:db8::/64", "198.51.100.254"], &[443]),
        ];
        assert_eq!(outside_target(&hosts, false), Some(sa("203.0.113.254:443")));
        assert_eq!(outside_target(&hosts, true), Some(sa("[2001:db8:ffff::1]:443")));
        let everything = vec![host("all", &["0.0.0.0/0", "::/0"], &[443])];
        assert_eq!(outside_target(&everything, false), None);
        assert_eq!(outside_target(&everything, true), None);
    }

    #[test]
    fn address_strings_parse() {
        assert_eq!(single_address("203.0.113.10"), "203.0.113.10".parse().ok());
        assert_eq!(single_address("203.0.113.10/32"), "203.0.113.10".parse().ok());
        assert_eq!(single_address("2001:db8::1/128"), "2001:db8::1".parse().ok());
        assert_eq!(single_address("203.0.113.0/24"), None);
        assert_eq!(single_address("meet.test"), None);
        assert_eq!(parse_net("192.0.2.0/33"), None);
        assert!(covers(
            parse_net("192.0.2.0/25").expect("net"),
            "192.0.2.100".parse().expect("ip")
        ));
        assert!(!covers(
            parse_net("192.0.2.0/25").expect("net"),
            "192.0.2.200".parse().expect("ip")
        ));
        assert!(!covers(
            parse_net("::/0").expect("net"),
            "192.0.2.1".parse().expect("ip")
        ));
    }

    #[test]
    fn the_allowed_host_must_be_reached_from_a_tunnel_address() {
        let local: Vec<IpAddr> = vec!["192.0.2.66".parse().expect("ip")];
        let target = sa("203.0.113.10:443");
        let pass = judge_allowed(target, local[0], "sgtun0", &local);
        assert_eq!(pass.result, Verdict::Pass);
        assert_eq!(
            pass.evidence,
            "connected to 203.0.113.10:443 from 192.0.2.66 on sgtun0"
        );
        let fail = judge_allowed(target, "192.0.2.2".parse().expect("ip"), "sgtun0", &local);
        assert_eq!(fail.result, Verdict::Fail);
        assert!(
            fail.evidence.contains("not through the tunnel"),
            "{}",
            fail.evidence
        );
    }

    #[test]
    fn outside_probes_pass_only_when_our_counter_moved() {
        let v4 = sa("192.0.2.254:443");
        let v6 = sa("[2001:db8::1]:443");
        let refused = || Attempt::Failed(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        let pass = judge_outside(OUTSIDE_HOST, v4, &refused(), 1);
        assert_eq!(pass.result, Verdict::Pass);
        assert_eq!(
            pass.evidence,
            "192.0.2.254:443 refused by sessiongate's firewall (connection refused; refuse counter +1)"
        );
        // Refused, but not by us: the far end (or something else) did it.
        let other = judge_outside(OUTSIDE_HOST, v4, &refused(), 0);
        assert_eq!(other.result, Verdict::Fail);
        assert!(other.evidence.contains("did not move"), "{}", other.evidence);
        assert_eq!(
            judge_outside(OUTSIDE_HOST, v4, &Attempt::Connected, 3).result,
            Verdict::Fail
        );
        assert_eq!(
            judge_outside(OUTSIDE_HOST, v4, &Attempt::TimedOut, 0).result,
            Verdict::Fail
        );
        assert_eq!(
            judge_outside(OUTSIDE_HOST, v4, &Attempt::TimedOut, 1).result,
            Verdict::Pass
        );
        // No IPv6 route at all: nothing was sent; only for the IPv6 probe.
        let unreachable = || Attempt::Failed(io::Error::from_raw_os_error(libc::ENETUNREACH));
        let no_v6 = judge_outside(IPV6_HOST, v6, &unreachable(), 0);
        assert_eq!(no_v6.result, Verdict::Pass);
        assert!(
            no_v6.evidence.contains("network is unreachable"),
            "{}",
            no_v6.evidence
        );
        assert_eq!(
            judge_outside(OUTSIDE_HOST, v4, &unreachable(), 0).result,
            Verdict::Fail
        );
    }

    #[test]
    fn dns_passes_only_when_it_stayed_here() {
        let refused = judge_dns(&DnsAttempt::Answered(
            ResponseCode::Refused,
            Duration::from_millis(2),
        ));
        assert_eq!(refused.result, Verdict::Pass);
        assert_eq!(
            refused.evidence,
            "query for verify.sessiongate.invalid to 198.51.100.53:53 answered REFUSED by the local stub in 2 ms"
        );
        for rcode in [
            ResponseCode::NXDomain,
            ResponseCode::NoError,
            ResponseCode::ServFail,
        ] {
            let answered = judge_dns(&DnsAttempt::Answered(rcode, Duration::ZERO));
            assert_eq!(answered.result, Verdict::Fail, "{rcode}");
        }
        assert_eq!(judge_dns(&DnsAttempt::TimedOut).result, Verdict::Fail);
        let unreachable = DnsAttempt::Failed(io::Error::from_raw_os_error(libc::EHOSTUNREACH));
        assert_eq!(judge_dns(&unreachable).result, Verdict::Pass);
    }

    #[test]
    fn the_query_is_a_plain_a_question_for_an_invalid_name() {
        let q = dns_query().expect("query");
        let bytes = q.to_vec().expect("encode");
        let back = Message::from_vec(&bytes).expect("decode");
        assert_eq!(back.queries.len(), 1);
        assert_eq!(back.queries[0].query_type(), RecordType::A);
        assert_eq!(back.queries[0].name().to_ascii(), DNS_NAME);
    }

    #[test]
    fn reports_serialize_as_the_protocol_says() {
        let report = Report {
            passed: false,
            probes: vec![Probe::new(ALLOWED_HOST, Verdict::Fail, "no answer")],
        };
        assert_eq!(
            serde_json::to_value(&report).expect("json"),
            serde_json::json!({"passed": false, "probes": [
                {"name": "allowed host", "result": "FAIL", "evidence": "no answer"}]})
        );
    }
}
