//! The captive-portal namespace: a network namespace of its own (`sgportal`)
//! from which a browser reaches a hotel's or café's login page while the
//! session's own firewall stays as it is.
//!
//! # What it owns, and what it must never do
//!
//! It owns the namespace, the ipvlan child of the physical interface
//! inside it, its address, the resolver file `ip netns exec` shows in it
//! (`/etc/netns/sgportal/resolv.conf`), its own nftables table (`inet
//! sgportal`, inside the namespace only) and the program started in it. It
//! never touches the session's tables (the link-level exception for the
//! namespace's traffic is the firewall's, put in by the session machine),
//! never sends anything from sessiond's own namespace but an ARP probe
//! (which the lockdown lets out anyway), and never runs the browser as
//! root.
//!
//! # Design
//!
//! - **ipvlan (L2), not macvlan**: the child shares the physical
//!   interface's MAC address. A Wi-Fi station may only send with the MAC it
//!   associated with (macvlan children do not work on most Wi-Fi), and a
//!   portal that lets a device through by its MAC address (most do) lets
//!   this machine through, not a made-up one. On a kernel built without
//!   ipvlan a macvlan child is the fallback (Ethernet only; a MAC-keyed
//!   portal then admits the child, and the log says so). The link-level
//!   exception matches the child's IPv4 source address, which works for
//!   both.
//! - **A free address on the same subnet, not DHCP**: a DHCP client on a
//!   child that shares the MAC would be given the machine's own lease (the
//!   server keys on the MAC), and ipvlan delivers by address, so that
//!   address would be taken from the machine. The address is the highest of
//!   the subnet that nobody answers an RFC 5227 ARP probe for (sender
//!   0.0.0.0, so no one's ARP cache changes).
//! - **Its own table**: output only to the subnet on TCP 53/80/443 and UDP
//!   53, and to the network's DNS server on 53; input only for
//!   established flows; no IPv6 (its link has no IPv6 address, and the
//!   table refuses IPv6). The DNS server is the pre-session resolver
//!   file's first IPv4 server outside loopback (the one the lease gave),
//!   else the default gateway.
//! - **Order**: the namespace, its table and its address are in place
//!   before its link comes up ([`create`] then [`bring_up`]); the session
//!   puts the link-level exception in between. [`remove`] kills what runs
//!   inside, then deletes the namespace; the session then withdraws the
//!   exception.
//! - **The browser** runs as the calling user (its uid from the control
//!   socket's peer credentials, never from the request), through
//!   `setpriv` with no capabilities, no new privileges and a cleared
//!   environment apart from the display variables that user passed.
//!
//! Needs root with CAP_SYS_ADMIN (a namespace and its mount), CAP_NET_ADMIN,
//! CAP_NET_RAW (the ARP probe) and CAP_SETUID/CAP_SETGID (the browser);
//! the `ip`, `nft` and `setpriv` programs. sessiond has none of those
//! capabilities: it runs in the helper `sessiongate-portal`
//! (portal_helper.rs), in a unit of its own, on sessiond's request.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::firewall::PortalException;

/// The namespace's name unless [`NAMESPACE_ENV`] says otherwise.
pub const DEFAULT_NAMESPACE: &str = "sgportal";
/// Tests only: another name for the namespace, so labs side by side do not
/// share one.
pub const NAMESPACE_ENV: &str = "SESSIOND_TEST_PORTAL_NAMESPACE";
/// The ipvlan child's name (in sessiond's namespace for a moment, then in
/// the portal namespace).
const LINK: &str = "sgportal0";
/// How long the namespace stays unless asked otherwise, and at most.
pub const DEFAULT_SECONDS: u64 = 300;
pub const MAX_SECONDS: u64 = 900;
/// How long an ARP probe waits for an answer (RFC 5227 waits 1-2 s between
/// probes; a LAN answers within milliseconds).
const PROBE_WAIT: Duration = Duration::from_millis(300);
/// How many candidate addresses are probed before giving up.
const MAX_CANDIDATES: usize = 16;
/// Said when the kernel refuses what the namespace needs.
const SANDBOXED: &str = " (this process is not allowed to make the portal namespace here: it needs the capabilities sessiongate-portal@.service grants)";
/// The display variables a browser may be given.
pub const DISPLAY_VARIABLES: &[&str] = &[
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XAUTHORITY",
    "XDG_RUNTIME_DIR",
    "DBUS_SESSION_BUS_ADDRESS",
    "LANG",
];

#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error("there is no default route outside the tunnel, so there is no local network to log in to")]
    NoUplink,
    #[error("the local network's interface {0} has no IPv4 address")]
    NoAddress(String),
    #[error("no free address found on {0}: every candidate answered the ARP probe")]
    NoFreeAddress(String),
    #[error("could not set up the portal namespace: {0}")]
    Setup(String),
    #[error("could not start the browser: {0}")]
    Browser(String),
}

/// The local network as seen from sessiond's namespace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Uplink {
    pub interface: String,
    pub gateway: Ipv4Addr,
    pub own: Ipv4Addr,
    pub prefix: u8,
}

impl Uplink {
    /// The subnet's network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.own) & mask(self.prefix))
    }
}

/// What [`create`] set up; the session turns it into the firewall's
/// exception and `status`' report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortalPlan {
    pub namespace: String,
    pub uplink: Uplink,
    pub address: Ipv4Addr,
    pub dns: Ipv4Addr,
    /// The mark the namespace's own table puts on every packet it lets
    /// out, drawn at random for each portal: the link-level exception
    /// admits only packets with it, since another namespace on the same
    /// link can forge the portal's source address (a raw socket is
    /// enough) but cannot set a mark without `CAP_NET_ADMIN`, nor guess
    /// this one.
    pub mark: u32,
}

impl PortalPlan {
    pub fn exception(&self) -> PortalException {
        PortalException {
            source: self.address,
            lan: (self.uplink.network(), self.uplink.prefix),
            dns: self.dns,
            mark: self.mark,
        }
    }

    /// Where the browser starts: the gateway, which on a portal network
    /// answers with (or redirects to) the login page.
    pub fn url(&self) -> String {
        format!("http://{}/", self.uplink.gateway)
    }
}

/// A mark for the portal's packets: random, never 0 and never one of
/// sessiond's own (the tunnel's, the DNS stub's, verify's), which all sit
/// below 0x10000.
fn random_mark() -> u32 {
    use rand_core::RngCore;
    rand_core::OsRng.next_u32() | 0x0001_0000
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0)
}

/// The namespace's name (see [`NAMESPACE_ENV`]).
pub fn namespace() -> String {
    std::env::var(NAMESPACE_ENV)
        .ok()
        .filter(|n| crate::portal_helper::valid_namespace(n))
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
}

/// The default route of the main table (what `/proc/net/route` lists) and
/// its interface: the physical network, whatever the session's tunnel does
/// in its own table.
pub fn parse_default_route(text: &str) -> Option<(String, Ipv4Addr)> {
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            return None;
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (dest, gateway, flags, mask) = (hex(f[1])?, hex(f[2])?, hex(f[3])?, hex(f[7])?);
        // Up and through a gateway, to 0.0.0.0/0.
        (dest == 0 && mask == 0 && flags & 0x3 == 0x3 && gateway != 0)
            .then(|| (f[0].to_string(), Ipv4Addr::from(gateway.to_ne_bytes())))
    })
}

/// The first IPv4 name server of a resolver file outside loopback.
pub fn parse_dns_server(text: &str) -> Option<Ipv4Addr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse::<Ipv4Addr>().ok())
            .flatten()
            .filter(|a| !a.is_loopback() && !a.is_unspecified())
    })
}

/// Candidate addresses for the namespace, highest first: every host
/// address of the subnet but the machine's, the gateway's and the DNS
/// server's (routers and servers sit at the low end).
pub fn candidates(uplink: &Uplink, dns: Ipv4Addr) -> Vec<Ipv4Addr> {
    let network = u32::from(uplink.network());
    let size = 1u64 << (32 - u32::from(uplink.prefix.min(32)));
    if size < 4 {
        return Vec::new();
    }
    let broadcast = network as u64 + size - 1;
    let taken = [uplink.own, uplink.gateway, dns];
    (network as u64 + 1..broadcast)
        .rev()
        .filter_map(|a| u32::try_from(a).ok())
        .map(Ipv4Addr::from)
        .filter(|a| !taken.contains(a))
        .take(MAX_CANDIDATES)
        .collect()
}

/// The default route's interface, the machine's address there and the
/// gateway.
pub async fn find_uplink() -> Result<Uplink, PortalError> {
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let (interface, gateway) = parse_default_route(&routes).ok_or(PortalError::NoUplink)?;
    let listing = run(&["ip", "-j", "-4", "addr", "show", "dev", &interface]).await?;
    let parsed: serde_json::Value =
        serde_json::from_str(&listing).map_err(|e| PortalError::Setup(format!("ip's listing: {e}")))?;
    let (own, prefix) = parsed
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|link| link["addr_info"].as_array().into_iter().flatten())
        .find_map(|a| {
            let own = a["local"].as_str()?.parse::<Ipv4Addr>().ok()?;
            let prefix = u8::try_from(a["prefixlen"].as_u64()?).ok()?;
            // The subnet the gateway is on.
            (u32::from(own) & mask(prefix) == u32::from(gateway) & mask(prefix)).then_some((own, prefix))
        })
        .ok_or_else(|| PortalError::NoAddress(interface.clone()))?;
    Ok(Uplink {
        interface,
        gateway,
        own,
        prefix,
    })
}

/// Whether the namespace exists (its file under /run/netns).
pub fn exists(namespace: &str) -> bool {
    Path::new("/run/netns").join(namespace).exists()
}

/// Sets up the namespace with everything but a link that is up: its
/// table, the ipvlan child with a free address (and no IPv6 address), the
/// resolver file. Nothing leaves it yet. On failure, what was made is removed.
pub async fn create(namespace: &str, uplink: Uplink, dns: Ipv4Addr) -> Result<PortalPlan, PortalError> {
    let mut address = None;
    for candidate in candidates(&uplink, dns) {
        let interface = uplink.interface.clone();
        let taken = tokio::task::spawn_blocking(move || arp::in_use(&interface, candidate, PROBE_WAIT))
            .await
            .map_err(|e| PortalError::Setup(e.to_string()))?
            .map_err(|e| {
                let unsupported = matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EPERM | libc::EACCES)
                );
                PortalError::Setup(format!(
                    "ARP probe on {}: {e}{}",
                    uplink.interface,
                    if unsupported { SANDBOXED } else { "" }
                ))
            })?;
        if !taken {
            address = Some(candidate);
            break;
        }
        tracing::info!("portal: {candidate} is in use on {}", uplink.interface);
    }
    let address = address.ok_or_else(|| PortalError::NoFreeAddress(uplink.interface.clone()))?;
    let plan = PortalPlan {
        namespace: namespace.to_string(),
        uplink,
        address,
        dns,
        mark: random_mark(),
    };
    if let Err(e) = set_up(&plan).await {
        let _ = remove(namespace).await;
        return Err(match e {
            PortalError::Setup(text)
                if text.contains("Operation not permitted") || text.contains("Permission denied") =>
            {
                PortalError::Setup(format!("{text}{SANDBOXED}"))
            }
            other => other,
        });
    }
    Ok(plan)
}

async fn set_up(plan: &PortalPlan) -> Result<(), PortalError> {
    let ns = plan.namespace.as_str();
    run(&["ip", "netns", "add", ns]).await?;
    let etc = etc_dir(ns);
    std::fs::create_dir_all(&etc)
        .and_then(|()| std::fs::write(etc.join("resolv.conf"), format!("nameserver {}\n", plan.dns)))
        .map_err(|e| PortalError::Setup(format!("{}: {}", etc.display(), crate::io_reason(&e))))?;
    run_stdin(&["ip", "netns", "exec", ns, "nft", "-f", "-"], &table(plan)).await?;
    // Made right inside the namespace: it never appears in sessiond's own,
    // where the tamper guard would put a chain on it for a moment.
    let parent = plan.uplink.interface.as_str();
    let child = |kind: &'static str, mode: &'static str| {
        [
            "ip", "link", "add", LINK, "link", parent, "netns", ns, "type", kind, "mode", mode,
        ]
    };
    if let Err(e) = run(&child("ipvlan", "l2")).await {
        // A kernel without ipvlan (CONFIG_IPVLAN unset): a macvlan child
        // works on Ethernet, with a MAC of its own (see the module comment).
        tracing::warn!(
            "portal: no ipvlan here ({e}); using a macvlan child with its own MAC address, so a portal that admits devices by MAC admits that one, not this machine"
        );
        run(&child("macvlan", "private")).await?;
    }
    // No IPv6 address of its own, so the link sends no IPv6 at all (no
    // duplicate-address or router solicitation); the table refuses the
    // rest. Through netlink, not the disable_ipv6 sysctl: the helper's
    // unit leaves /proc/sys read-only, and a writable bind of it would
    // still be the helper's own namespace's.
    run(&["ip", "-n", ns, "link", "set", LINK, "addrgenmode", "none"]).await?;
    let address = format!("{}/{}", plan.address, plan.uplink.prefix);
    run(&["ip", "-n", ns, "addr", "add", &address, "dev", LINK]).await?;
    Ok(())
}

/// The namespace's own table (nft syntax): only the local network's DNS
/// and web servers and the network's DNS server; refusals are loud so the
/// browser fails at once.
pub fn table(plan: &PortalPlan) -> String {
    let lan = format!("{}/{}", plan.uplink.network(), plan.uplink.prefix);
    let dns = plan.dns;
    let mark = plan.mark;
    format!(
        "table inet sgportal {{
  chain output {{
    type filter hook output priority 0; policy drop;
    meta mark set {mark:#x}
    oifname \"lo\" accept
    ip daddr {lan} tcp dport {{ 53, 80, 443 }} accept
    ip daddr {lan} udp dport 53 accept
    ip daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 accept
    meta l4proto tcp reject with tcp reset
    reject with icmpx admin-prohibited
  }}
  chain input {{
    type filter hook input priority 0; policy drop;
    iifname \"lo\" accept
    ct state established,related accept
  }}
  chain forward {{
    type filter hook forward priority 0; policy drop;
  }}
}}
"
    )
}

/// Brings the namespace's link up with its default route (the session's
/// exception is in place by now).
pub async fn bring_up(plan: &PortalPlan) -> Result<(), PortalError> {
    let ns = plan.namespace.as_str();
    run(&["ip", "-n", ns, "link", "set", "lo", "up"]).await?;
    run(&["ip", "-n", ns, "link", "set", LINK, "up"]).await?;
    run(&[
        "ip",
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        &plan.uplink.gateway.to_string(),
    ])
    .await?;
    Ok(())
}

/// Starts `program` (and its arguments, then the login page's address) in
/// the namespace as the user `uid`, with no capabilities, no new
/// privileges and only `env`'s display variables. Returns its process id;
/// a task reaps it.
pub fn start_browser(
    plan: &PortalPlan,
    uid: u32,
    program: &[String],
    env: &[(String, String)],
) -> Result<u32, PortalError> {
    if uid == 0 {
        return Err(PortalError::Browser(
            "the browser would run as root; run `sessionctl portal` as your own user, without sudo".into(),
        ));
    }
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .ok_or_else(|| PortalError::Browser(format!("no user with uid {uid}")))?;
    let Some((first, rest)) = program.split_first() else {
        return Err(PortalError::Browser("no program given".into()));
    };
    let mut command = tokio::process::Command::new("ip");
    command
        .args(["netns", "exec", &plan.namespace, "setpriv"])
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={}", user.gid.as_raw()))
        .args(["--init-groups", "--inh-caps=-all", "--no-new-privs", "--"])
        .arg(first)
        .args(rest)
        .arg(plan.url())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &user.dir)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (name, value) in env {
        if DISPLAY_VARIABLES.contains(&name.as_str()) {
            command.env(name, value);
        }
    }
    let mut child = command
        .spawn()
        .map_err(|e| PortalError::Browser(crate::io_reason(&e)))?;
    let pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(pid)
}

/// Kills whatever runs in the namespace and deletes it with its resolver
/// file. Nothing to remove is fine.
pub async fn remove(namespace: &str) -> Result<(), PortalError> {
    if exists(namespace) {
        if let Ok(pids) = run(&["ip", "netns", "pids", namespace]).await {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        run(&["ip", "netns", "del", namespace]).await?;
    }
    let etc = etc_dir(namespace);
    if etc.exists() {
        std::fs::remove_dir_all(&etc)
            .map_err(|e| PortalError::Setup(format!("{}: {}", etc.display(), crate::io_reason(&e))))?;
    }
    Ok(())
}

fn etc_dir(namespace: &str) -> PathBuf {
    Path::new("/etc/netns").join(namespace)
}

async fn run(args: &[&str]) -> Result<String, PortalError> {
    run_stdin(args, "").await
}

async fn run_stdin(args: &[&str], input: &str) -> Result<String, PortalError> {
    let Some((program, rest)) = args.split_first() else {
        return Ok(String::new());
    };
    let mut child = tokio::process::Command::new(program)
        .args(rest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| PortalError::Setup(format!("{program}: {}", crate::io_reason(&e))))?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .map_err(|_| PortalError::Setup(format!("`{}` did not finish within 10 s", args.join(" "))))?
        .map_err(|e| PortalError::Setup(format!("{program}: {}", crate::io_reason(&e))))?;
    if !out.status.success() {
        return Err(PortalError::Setup(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An RFC 5227 ARP probe: "who has CANDIDATE?" from sender address
/// 0.0.0.0, so nobody's cache learns anything.
mod arp {
    use std::net::Ipv4Addr;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    const ETH_P_ARP: u16 = 0x0806;

    /// Whether anyone on `interface` answers for (or itself probes) `candidate`
    /// within `wait`.
    pub fn in_use(interface: &str, candidate: Ipv4Addr, wait: Duration) -> std::io::Result<bool> {
        let mac = read_mac(interface)?;
        let name = std::ffi::CString::new(interface)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "interface name"))?;
        // SAFETY: a valid C string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: plain integers.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ARP.to_be()),
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just opened and own.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_ll is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ARP.to_be();
        addr.sll_ifindex = index as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: addr outlives the call and len is its size.
        if unsafe {
            libc::bind(
                socket.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                len,
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let mut probe = Vec::with_capacity(28);
        probe.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        probe.extend_from_slice(&mac);
        probe.extend_from_slice(&[0, 0, 0, 0]);
        probe.extend_from_slice(&[0; 6]);
        probe.extend_from_slice(&candidate.octets());
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        for _ in 0..2 {
            // SAFETY: the buffer and address outlive the call.
            let sent = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    probe.as_ptr() as *const libc::c_void,
                    probe.len(),
                    0,
                    &addr as *const _ as *const libc::sockaddr,
                    len,
                )
            };
            if sent < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 64];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut poll = libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis().max(1) as i32) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if ready == 0 {
                return Ok(false);
            }
            // SAFETY: the buffer outlives the call.
            let n = unsafe {
                libc::recv(
                    socket.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 28 {
                continue;
            }
            let sender_mac = &buf[8..14];
            let sender_ip = Ipv4Addr::new(buf[14], buf[15], buf[16], buf[17]);
            let target_ip = Ipv4Addr::new(buf[24], buf[25], buf[26], buf[27]);
            // Someone has it, or someone else probes for it right now;
            // our own probe (looped back to packet sockets) is neither.
            if sender_mac != mac
                && (sender_ip == candidate || (sender_ip.is_unspecified() && target_ip == candidate))
            {
                return Ok(true);
            }
        }
    }

    fn read_mac(interface: &str) -> std::io::Result<[u8; 6]> {
        let text = std::fs::read_to_string(format!("/sys/class/net/{interface}/address"))?;
        let bytes: Vec<u8> = text
            .trim()
            .split(':')
            .filter_map(|b| u8::from_str_radix(b, 16).ok())
            .collect();
        <[u8; 6]>::try_from(bytes.as_slice())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an Ethernet address"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uplink() -> Uplink {
        Uplink {
            interface: "eth0".into(),
            gateway: Ipv4Addr::new(192, 0, 2, 1),
            own: Ipv4Addr::new(192, 0, 2, 2),
            prefix: 26,
        }
    }

    #[test]
    fn the_default_route_of_the_main_table_is_the_local_network() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    c2r\t000200C0\t00000000\t0001\t0\t0\t0\tC0FFFFFF\t0\t0\t0\n\
                    c2r\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(
            parse_default_route(text),
            Some(("c2r".into(), Ipv4Addr::new(192, 0, 2, 1)))
        );
        assert_eq!(
            parse_default_route(text.lines().take(2).collect::<Vec<_>>().join("\n").as_str()),
            None
        );
    }

    #[test]
    fn the_dns_server_is_the_first_ipv4_one_outside_loopback() {
        let text = "# made by NetworkManager\nnameserver 127.0.0.53\nnameserver 2001:db8::53\nnameserver 192.0.2.53\n";
        assert_eq!(parse_dns_server(text), Some(Ipv4Addr::new(192, 0, 2, 53)));
        assert_eq!(parse_dns_server("nameserver 127.0.0.1\n"), None);
    }

    #[test]
    fn candidates_come_from_the_top_of_the_subnet_and_skip_known_hosts() {
        let c = candidates(&uplink(), Ipv4Addr::new(192, 0, 2, 62));
        assert_eq!(c.first(), Some(&Ipv4Addr::new(192, 0, 2, 61)));
        assert!(c
            .iter()
            .all(|a| u32::from(*a) & mask(26) == u32::from(Ipv4Addr::new(192, 0, 2, 0))));
        assert!(!c.contains(&Ipv4Addr::new(192, 0, 2, 63)), "broadcast");
        assert_eq!(c.len(), MAX_CANDIDATES);
        let tiny = Uplink {
            prefix: 31,
            ..uplink()
        };
        assert!(candidates(&tiny, Ipv4Addr::new(192, 0, 2, 1)).is_empty());
    }

    #[test]
    fn the_namespace_table_opens_only_the_subnet_and_the_dns_server() {
        let plan = PortalPlan {
            namespace: "sgportal".into(),
            uplink: uplink(),
            address: Ipv4Addr::new(192, 0, 2, 61),
            dns: Ipv4Addr::new(203, 0, 113, 53),
            mark: 0x5a1b_0001,
        };
        let table = table(&plan);
        assert!(table.contains("meta mark set 0x5a1b0001\n"), "{table}");
        assert!(
            table.contains("ip daddr 192.0.2.0/26 tcp dport { 53, 80, 443 } accept"),
            "{table}"
        );
        assert!(table.contains("ip daddr 203.0.113.53 meta l4proto { tcp, udp } th dport 53 accept"));
        assert!(table.contains("policy drop"));
        assert_eq!(plan.url(), "http://192.0.2.1/");
        assert_eq!(plan.exception().lan, (Ipv4Addr::new(192, 0, 2, 0), 26));
        assert_eq!(plan.exception().mark, 0x5a1b_0001);
    }
}
