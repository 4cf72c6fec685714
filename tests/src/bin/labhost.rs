//! `labhost`: the lab's tiny network services and probes. It owns nothing but
//! its own sockets; the lab (tests/src) starts it inside network namespaces.
//!
//! Subcommands:
//! - `labhost serve [--tcp PORT]... [--udp PORT]...` — TCP listeners (default
//!   443 and 8443) that write `peer=<remote ip>\n` to each client and close,
//!   and UDP echo servers (default 10000) that reply `peer=<remote ip> <payload>`
//!   from the address the datagram was sent to. IPv4 and IPv6 on separate
//!   sockets. Prints `ready` on stdout once every socket is bound. Also TCP
//!   echo listeners (`--echo PORT`, default 9000) that write `peer=<remote
//!   ip>\n` and then send back every byte they receive until the client
//!   closes its side.
//! - `labhost probe-tcp ADDR PORT [--timeout-ms N]` — connects, prints what the
//!   server sent, exit 0; else prints one line (`connect 203.0.113.20:443:
//!   Connection refused`) and exits 1. ADDR may be a name (system resolver).
//! - `labhost probe-udp ADDR PORT [--timeout-ms N] [--payload TEXT] [--sport N]
//!   [--mark N] [--proto udplite]` — sends one datagram (from source port N;
//!   with SO_MARK N, decimal or 0x hex; as UDP-Lite), prints the reply, exit
//!   0; else one line and exit 1.
//! - `labhost bulk ADDR PORT BYTES [--timeout-ms N]` — through an echo
//!   listener, sends BYTES of a fixed pseudo-random stream while reading the
//!   echo back, and checks every byte; prints `peer=<ip> bytes=BYTES`, exit 0;
//!   else one line (`byte 1234 differs`, a timeout) and exit 1.
//! - `labhost spray ADDR:PORT... [--interval-us N]` — sends one small UDP
//!   datagram to each target in turn, every N microseconds (default 500),
//!   from one unconnected socket per family, ignoring every error, until
//!   killed: an
//!   application that never stops trying (the boot test). Prints `spraying`
//!   once started.
//! - `labhost sink [--udp PORT]... [--tcp PORT]...` — listens (IPv4 and IPv6)
//!   and answers nothing; prints `ready` once bound, then one line per
//!   datagram or connection that arrives (`udp 203.0.113.10:67 -> 40000`,
//!   `tcp ...`): proof that a packet got in.
//! - `labhost icmp6-send ADDR TYPE [--hop-limit N] [--mark N]` — sends one
//!   ICMPv6 message of TYPE (a number; 135 is a neighbour solicitation) to
//!   ADDR from a raw socket, with the given hop limit (default 64), SO_MARK
//!   N if given, and the lab's
//!   marker in its body (for 135/136 after a target address, ADDR itself);
//!   the kernel fills in the checksum. Prints `sent`, exit 0.
//! - `labhost icmp6-sink` — a raw ICMPv6 socket: prints `ready`, then one
//!   line per arriving message that carries the lab's marker (`icmp6
//!   type=135 from 2001:db8:203::10`), so the kernel's own neighbour
//!   discovery does not count: proof that a crafted message got in.
//! - `labhost icmp-error TO SPORT FAR_END DPORT [--kind port-unreachable|too-big]
//!   [--mtu N] [--device DEV]` — sends TO an ICMP (or ICMPv6, by TO's family)
//!   error about a UDP datagram that TO sent from port SPORT to FAR_END:DPORT,
//!   quoting that datagram's headers, as a router on its path (or FAR_END)
//!   would: a port unreachable, or a fragmentation needed / packet too big
//!   with next-hop MTU N (default 1280). From a raw socket, out of DEV if
//!   given (SO_BINDTODEVICE: routed there even without a route); the outer
//!   source is the sender's own. Prints `sent`, exit 0: what a neighbour can
//!   forge about a flow it can guess.
//! - `labhost dhcp-discover DEVICE [--timeout-ms N]` — what a DHCP client
//!   does first: a DHCPDISCOVER (broadcast flag set) from port 68 to
//!   255.255.255.255:67 out of DEVICE, then waits for the DHCPOFFER that
//!   answers it; prints `offer 192.0.2.40 from 192.0.2.1`, exit 0; else one
//!   line and exit 1. (Only the fixed BOOTP header and the message-type
//!   option: the lab needs the exchange to cross the firewall, not a lease.)
//! - `labhost listen-unix PATH [--reply TEXT]` — a unix socket server that
//!   writes TEXT (default `ok`) and a newline to each client (replaces a stale
//!   socket file); the harness uses it as a stand-in daemon.
//! - `labhost dns-query SERVER NAME [--type A|AAAA|CNAME|TXT|MX|ANY|N] [--port N]
//!   [--timeout-ms N]` — one DNS query over UDP straight to SERVER (the lab has
//!   no `dig`); prints `rcode=NOERROR answers=203.0.113.10,... ttl=5`, exit 0
//!   whenever a reply came back; else one line and exit 1.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket,
};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use nix::sys::socket::{
    bind, listen, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily, Backlog, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6,
    SockaddrStorage,
};

const DEFAULT_TIMEOUT_MS: u64 = 2000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("probe-tcp") => probe_tcp(&args[1..]),
        Some("probe-udp") => probe_udp(&args[1..]),
        Some("bulk") => bulk(&args[1..]),
        Some("dns-query") => dns_query(&args[1..]),
        Some("listen-unix") => listen_unix(&args[1..]),
        Some("spray") => spray(&args[1..]),
        Some("sink") => sink(&args[1..]),
        Some("icmp6-send") => icmp6_send(&args[1..]),
        Some("icmp6-sink") => icmp6_sink(&args[1..]),
        Some("dhcp-discover") => dhcp_discover(&args[1..]),
        Some("icmp-error") => icmp_error(&args[1..]),
        _ => Err(
            "usage: labhost serve|probe-tcp ADDR PORT|probe-udp ADDR PORT|dns-query SERVER NAME".to_string(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(line) => {
            println!("{line}");
            ExitCode::FAILURE
        }
    }
}

/// Parsed command line: positional arguments and `--flag value` pairs.
struct Args {
    positional: Vec<String>,
    flags: Vec<(String, String)>,
}

impl Args {
    fn parse(args: &[String]) -> Result<Args, String> {
        let mut positional = Vec::new();
        let mut flags = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                let value = it
                    .next()
                    .ok_or_else(|| format!("usage: --{name} needs a value"))?;
                flags.push((name.to_string(), value.clone()));
            } else {
                positional.push(a.clone());
            }
        }
        Ok(Args { positional, flags })
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.flags
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, name: &str) -> Option<&str> {
        self.all(name).last().copied()
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.one(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("usage: --{name} {v}: not a number")),
        }
    }

    fn timeout(&self) -> Result<Duration, String> {
        Ok(Duration::from_millis(
            self.num("timeout-ms", DEFAULT_TIMEOUT_MS)?.max(1),
        ))
    }

    fn target(&self, what: &str) -> Result<(String, u16), String> {
        match self.positional.as_slice() {
            [addr, port] => {
                let port = port
                    .parse()
                    .map_err(|_| format!("usage: {what}: port {port} is not a number"))?;
                Ok((addr.clone(), port))
            }
            _ => Err(format!("usage: labhost {what} ADDR PORT [--timeout-ms N]")),
        }
    }
}

/// An io::Error as a short phrase, without the "(os error N)" tail.
fn err_text(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn resolve(addr: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = addr.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = (addr, port)
        .to_socket_addrs()
        .map_err(|e| format!("resolve {addr}: {}", err_text(&e)))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("resolve {addr}: no addresses"));
    }
    Ok(addrs)
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

// ---------------------------------------------------------------- serve

fn serve(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    let mut tcp_ports: Vec<u16> = Vec::new();
    for p in args.all("tcp") {
        tcp_ports.push(p.parse().map_err(|_| format!("usage: --tcp {p}"))?);
    }
    let mut udp_ports: Vec<u16> = Vec::new();
    for p in args.all("udp") {
        udp_ports.push(p.parse().map_err(|_| format!("usage: --udp {p}"))?);
    }
    let mut echo_ports: Vec<u16> = Vec::new();
    for p in args.all("echo") {
        echo_ports.push(p.parse().map_err(|_| format!("usage: --echo {p}"))?);
    }
    if tcp_ports.is_empty() && udp_ports.is_empty() && echo_ports.is_empty() {
        tcp_ports = vec![443, 8443];
        udp_ports = vec![10000];
        echo_ports = vec![9000];
    }

    let mut threads = Vec::new();
    // Each TCP service: its ports, and what it does with each listener.
    let greet: fn(TcpListener) = tcp_accept_loop;
    let echo: fn(TcpListener) = tcp_echo_loop;
    let tcp_services = [(&tcp_ports, greet), (&echo_ports, echo)];
    for (ports, serve) in tcp_services {
        for &port in ports {
            for v6 in [false, true] {
                let listener = tcp_listener(v6, port)
                    .map_err(|e| format!("listen tcp {} port {port}: {e}", if v6 { "v6" } else { "v4" }))?;
                threads.push(std::thread::spawn(move || serve(listener)));
            }
        }
    }
    for &port in &udp_ports {
        for v6 in [false, true] {
            let sock = udp_socket(v6, port)
                .map_err(|e| format!("bind udp {} port {port}: {e}", if v6 { "v6" } else { "v4" }))?;
            threads.push(std::thread::spawn(move || udp_echo_loop(sock, v6)));
        }
    }
    println!("ready");
    let _ = io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn new_socket(v6: bool, ty: SockType) -> nix::Result<OwnedFd> {
    let family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if v6 {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    Ok(fd)
}

fn bind_any(fd: &OwnedFd, v6: bool, port: u16) -> nix::Result<()> {
    if v6 {
        bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from(std::net::SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)),
        )
    } else {
        bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
        )
    }
}

fn tcp_listener(v6: bool, port: u16) -> nix::Result<TcpListener> {
    let fd = new_socket(v6, SockType::Stream)?;
    bind_any(&fd, v6, port)?;
    listen(&fd, Backlog::new(128)?)?;
    Ok(TcpListener::from(fd))
}

fn tcp_accept_loop(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else { continue };
        std::thread::spawn(move || {
            if let Ok(peer) = stream.peer_addr() {
                let _ = stream.write_all(format!("peer={}\n", canonical(peer.ip())).as_bytes());
            }
            let _ = stream.shutdown(Shutdown::Write);
            // Drain what the client may send so close() does not reset.
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let mut sink = [0u8; 512];
            while let Ok(n) = stream.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        });
    }
}

fn tcp_echo_loop(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else { continue };
        std::thread::spawn(move || {
            let Ok(peer) = stream.peer_addr() else { return };
            if stream
                .write_all(format!("peer={}\n", canonical(peer.ip())).as_bytes())
                .is_err()
            {
                return;
            }
            let Ok(mut reader) = stream.try_clone() else {
                return;
            };
            let _ = io::copy(&mut reader, &mut stream);
            let _ = stream.shutdown(Shutdown::Write);
        });
    }
}

fn udp_socket(v6: bool, port: u16) -> nix::Result<OwnedFd> {
    let fd = new_socket(v6, SockType::Datagram)?;
    if v6 {
        setsockopt(&fd, sockopt::Ipv6RecvPacketInfo, &true)?;
    } else {
        setsockopt(&fd, sockopt::Ipv4PacketInfo, &true)?;
    }
    bind_any(&fd, v6, port)?;
    Ok(fd)
}

/// Echo loop that answers from the address each datagram was sent to (the host
/// has several addresses; a reply from another one would not match the
/// client's connected socket nor its conntrack entry).
fn udp_echo_loop(fd: OwnedFd, v6: bool) {
    let mut buf = [0u8; 2048];
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo, libc::in_pktinfo);
    loop {
        let (len, from, dst4, dst6) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<SockaddrStorage>(
                fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            ) {
                Ok(m) => m,
                Err(_) => continue,
            };
            let mut dst4 = None;
            let mut dst6 = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::Ipv4PacketInfo(info) => dst4 = Some(info.ipi_addr),
                        ControlMessageOwned::Ipv6PacketInfo(info) => dst6 = Some(info.ipi6_addr),
                        _ => {}
                    }
                }
            }
            (msg.bytes, msg.address, dst4, dst6)
        };
        let Some(from) = from else { continue };
        let peer_ip = if let Some(a) = from.as_sockaddr_in() {
            IpAddr::V4(a.ip())
        } else if let Some(a) = from.as_sockaddr_in6() {
            IpAddr::V6(a.ip())
        } else {
            continue;
        };
        let mut reply = format!("peer={} ", canonical(peer_ip)).into_bytes();
        reply.extend_from_slice(&buf[..len]);
        let iov = [IoSlice::new(&reply)];
        let info4;
        let info6;
        let mut cm = Vec::new();
        if v6 {
            if let Some(addr) = dst6 {
                info6 = libc::in6_pktinfo {
                    ipi6_addr: addr,
                    ipi6_ifindex: 0,
                };
                cm.push(ControlMessage::Ipv6PacketInfo(&info6));
            }
        } else if let Some(addr) = dst4 {
            info4 = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: addr,
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            cm.push(ControlMessage::Ipv4PacketInfo(&info4));
        }
        let _ = sendmsg(fd.as_raw_fd(), &iov, &cm, MsgFlags::empty(), Some(&from));
    }
}

fn listen_unix(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    let [path] = args.positional.as_slice() else {
        return Err("usage: labhost listen-unix PATH [--reply TEXT]".into());
    };
    let reply = format!("{}\n", args.one("reply").unwrap_or("ok"));
    let _ = std::fs::remove_file(path);
    let listener =
        std::os::unix::net::UnixListener::bind(path).map_err(|e| format!("bind {path}: {}", err_text(&e)))?;
    println!("ready");
    let _ = io::stdout().flush();
    for mut stream in listener.incoming().flatten() {
        let _ = stream.write_all(reply.as_bytes());
    }
    Ok(())
}

// ---------------------------------------------------------------- probes

fn probe_tcp(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    let (addr, port) = args.target("probe-tcp")?;
    let timeout = args.timeout()?;
    let mut errors = Vec::new();
    for target in resolve(&addr, port)? {
        match TcpStream::connect_timeout(&target, timeout) {
            Ok(mut stream) => {
                let _ = stream.set_read_timeout(Some(timeout));
                let mut got = Vec::new();
                return match stream.read_to_end(&mut got) {
                    Ok(_) => {
                        print!("{}", String::from_utf8_lossy(&got));
                        let _ = io::stdout().flush();
                        Ok(())
                    }
                    Err(e) if !got.is_empty() => {
                        // Partial answer then an error: still report what came.
                        print!("{}", String::from_utf8_lossy(&got));
                        eprintln!("read {target}: {}", err_text(&e));
                        Ok(())
                    }
                    Err(e) => Err(format!("read {target}: {}", err_text(&e))),
                };
            }
            Err(e) => errors.push(format!("connect {target}: {}", err_text(&e))),
        }
    }
    Err(errors.join("; "))
}

/// The bulk test's byte stream: xorshift64, the same on both ends of the
/// check, so any reordering, loss or corruption shows at its offset.
struct Pattern {
    state: u64,
    word: [u8; 8],
    at: usize,
}

impl Pattern {
    fn new() -> Pattern {
        Pattern {
            state: 0x5347_5347_5347_5347,
            word: [0; 8],
            at: 8,
        }
    }

    fn next_byte(&mut self) -> u8 {
        if self.at == 8 {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            self.word = self.state.to_le_bytes();
            self.at = 0;
        }
        self.at += 1;
        self.word[self.at - 1]
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for byte in buf {
            *byte = self.next_byte();
        }
    }
}

fn bulk(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    let usage = || "usage: labhost bulk ADDR PORT BYTES [--timeout-ms N]".to_string();
    let [addr, port, total] = args.positional.as_slice() else {
        return Err(usage());
    };
    let port: u16 = port.parse().map_err(|_| usage())?;
    let total: u64 = total.parse().map_err(|_| usage())?;
    let timeout = args.timeout()?;
    let target = resolve(addr, port)?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{addr} has no address"))?;
    let stream = TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| format!("connect {target}: {}", err_text(&e)))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("socket {target}: {}", err_text(&e)))?;
    let mut reader = io::BufReader::new(stream.try_clone().map_err(|e| err_text(&e))?);
    let mut peer = String::new();
    io::BufRead::read_line(&mut reader, &mut peer).map_err(|e| format!("read {target}: {}", err_text(&e)))?;
    let mut writer = stream;
    // Writes in steps of 1 byte to 64 KiB, so the kernel sees every size.
    let sender = std::thread::spawn(move || -> Result<(), String> {
        let mut pattern = Pattern::new();
        let mut buf = vec![0u8; 65_536];
        let mut sent = 0u64;
        let mut step = 1usize;
        while sent < total {
            let n = (step.min(buf.len()) as u64).min(total - sent) as usize;
            pattern.fill(&mut buf[..n]);
            writer
                .write_all(&buf[..n])
                .map_err(|e| format!("write: {}", err_text(&e)))?;
            sent += n as u64;
            step = step * 7 % 65_537 + 1;
        }
        writer
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {}", err_text(&e)))
    });
    let mut expect = Pattern::new();
    let mut got = vec![0u8; 65_536];
    let mut received = 0u64;
    let mut failure = None;
    while received < total {
        let n = match reader.read(&mut got) {
            Ok(0) => {
                failure = Some(format!("the echo ended after {received} of {total} bytes"));
                break;
            }
            Ok(n) => n,
            Err(e) => {
                failure = Some(format!("read after {received} bytes: {}", err_text(&e)));
                break;
            }
        };
        for &byte in &got[..n] {
            if byte != expect.next_byte() {
                failure.get_or_insert_with(|| format!("byte {received} differs"));
            }
            received += 1;
        }
        if failure.is_some() {
            break;
        }
    }
    let sent = sender.join().map_err(|_| "the sender panicked".to_string())?;
    if let Some(f) = failure {
        return Err(f);
    }
    sent?;
    println!("{} bytes={received}", peer.trim());
    Ok(())
}

fn unspecified_for(target: &SocketAddr) -> SocketAddr {
    match target {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// Sends `payload` to `target` on a connected UDP socket and waits for one reply.
/// How a UDP probe's socket is set up besides its target.
#[derive(Default, Clone, Copy)]
struct UdpOptions {
    /// Source port (0: any).
    sport: u16,
    /// SO_MARK (what only root can set; e.g. the tunnel's fwmark).
    mark: Option<u32>,
    /// UDP-Lite (IP protocol 136) instead of UDP: ports at the same place,
    /// another protocol number.
    udplite: bool,
}

/// A datagram socket bound to `local`, UDP or UDP-Lite.
fn datagram_socket(local: SocketAddr, udplite: bool) -> io::Result<UdpSocket> {
    if !udplite {
        return UdpSocket::bind(local);
    }
    let family = if local.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: socket(2) with constant arguments; the result is checked and
    // owned at once.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_UDPLITE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let sock = UdpSocket::from(owned);
    let addr: SockaddrStorage = local.into();
    bind(sock.as_raw_fd(), &addr).map_err(io::Error::from)?;
    Ok(sock)
}

fn udp_exchange(target: SocketAddr, payload: &[u8], timeout: Duration) -> Result<Vec<u8>, String> {
    udp_exchange_with(target, payload, timeout, UdpOptions::default())
}

fn udp_exchange_with(
    target: SocketAddr,
    payload: &[u8],
    timeout: Duration,
    options: UdpOptions,
) -> Result<Vec<u8>, String> {
    let what = |e: &io::Error| format!("udp {target}: {}", err_text(e));
    let mut local = unspecified_for(&target);
    local.set_port(options.sport);
    let sock = datagram_socket(local, options.udplite).map_err(|e| what(&e))?;
    if let Some(mark) = options.mark {
        setsockopt(&sock, sockopt::Mark, &mark)
            .map_err(|e| format!("udp {target}: SO_MARK: {}", e.desc()))?;
    }
    sock.connect(target).map_err(|e| what(&e))?;
    sock.send(payload).map_err(|e| what(&e))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "udp {target}: no reply within {} ms",
                timeout.as_millis()
            ));
        }
        sock.set_read_timeout(Some(left)).map_err(|e| what(&e))?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                continue
            }
            Err(e) => return Err(what(&e)),
        }
    }
}

fn probe_udp(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    let (addr, port) = args.target("probe-udp")?;
    let timeout = args.timeout()?;
    let payload = args.one("payload").unwrap_or("probe").to_string();
    let options = UdpOptions {
        sport: args.num("sport", 0u16)?,
        mark: args
            .one("mark")
            .map(|m| parse_mark(m).ok_or_else(|| format!("usage: --mark {m}: not a number")))
            .transpose()?,
        udplite: args.one("proto") == Some("udplite"),
    };
    let targets = resolve(&addr, port)?;
    let mut errors = Vec::new();
    for target in targets {
        match udp_exchange_with(target, payload.as_bytes(), timeout, options) {
            Ok(reply) => {
                println!("{}", String::from_utf8_lossy(&reply));
                return Ok(());
            }
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("; "))
}

/// A mark in decimal or 0x hex.
fn parse_mark(text: &str) -> Option<u32> {
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

// ---------------------------------------------------------------- sink

fn sink(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    let mut threads = Vec::new();
    for p in args.all("udp") {
        let port: u16 = p.parse().map_err(|_| format!("usage: --udp {p}"))?;
        for v6 in [false, true] {
            let sock = udp_socket(v6, port).map_err(|e| format!("bind udp port {port}: {e}"))?;
            let sock = UdpSocket::from(sock);
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while let Ok((_, from)) = sock.recv_from(&mut buf) {
                    println!("udp {from} -> {port}");
                    let _ = io::stdout().flush();
                }
            }));
        }
    }
    for p in args.all("tcp") {
        let port: u16 = p.parse().map_err(|_| format!("usage: --tcp {p}"))?;
        for v6 in [false, true] {
            let listener = tcp_listener(v6, port).map_err(|e| format!("listen tcp port {port}: {e}"))?;
            threads.push(std::thread::spawn(move || {
                while let Ok((_, from)) = listener.accept() {
                    println!("tcp {from} -> {port}");
                    let _ = io::stdout().flush();
                }
            }));
        }
    }
    println!("ready");
    let _ = io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

// ---------------------------------------------------------------- icmp6

/// In the body of every ICMPv6 message the lab crafts, so a sink tells them
/// from the neighbour discovery the kernel sends all the time.
const ICMP6_MARKER: &[u8] = b"sglab-icmp6";

fn icmp6_socket() -> Result<OwnedFd, String> {
    socket(
        AddressFamily::Inet6,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::IcmpV6,
    )
    .map_err(|e| format!("raw ICMPv6 socket: {}", e.desc()))
}

fn icmp6_send(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    let usage = || "usage: labhost icmp6-send ADDR TYPE [--hop-limit N] [--mark N]".to_string();
    let [addr, kind] = args.positional.as_slice() else {
        return Err(usage());
    };
    let addr: Ipv6Addr = addr.parse().map_err(|_| usage())?;
    let kind: u8 = kind.parse().map_err(|_| usage())?;
    let hop_limit: libc::c_int = args.num("hop-limit", 64)?;
    // Type, code, checksum (the kernel computes it on ICMPv6 raw sockets),
    // four bytes of flags/reserved, then for neighbour solicitations and
    // advertisements the target address, then the marker.
    let mut message = vec![kind, 0, 0, 0, 0, 0, 0, 0];
    if matches!(kind, 135 | 136) {
        message.extend_from_slice(&addr.octets());
    }
    message.extend_from_slice(ICMP6_MARKER);
    let fd = icmp6_socket()?;
    setsockopt(&fd, sockopt::Ipv6Ttl, &hop_limit)
        .map_err(|e| format!("hop limit {hop_limit}: {}", e.desc()))?;
    if let Some(m) = args.one("mark") {
        let mark = parse_mark(m).ok_or_else(|| format!("usage: --mark {m}: not a number"))?;
        setsockopt(&fd, sockopt::Mark, &mark).map_err(|e| format!("SO_MARK: {}", e.desc()))?;
    }
    let to = SockaddrIn6::from(std::net::SocketAddrV6::new(addr, 0, 0, 0));
    nix::sys::socket::sendto(fd.as_raw_fd(), &message, &to, MsgFlags::empty())
        .map_err(|e| format!("icmp6 {addr}: {}", e.desc()))?;
    println!("sent");
    Ok(())
}

fn icmp6_sink(args: &[String]) -> Result<(), String> {
    Args::parse(args)?;
    let fd = icmp6_socket()?;
    println!("ready");
    let _ = io::stdout().flush();
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = nix::sys::socket::recvfrom::<SockaddrIn6>(fd.as_raw_fd(), &mut buf)
            .map_err(|e| format!("icmp6 receive: {}", e.desc()))?;
        let message = &buf[..n];
        if n > 0 && message.windows(ICMP6_MARKER.len()).any(|w| w == ICMP6_MARKER) {
            let from = from.map(|a| a.ip().to_string()).unwrap_or_else(|| "?".into());
            println!("icmp6 type={} from {from}", message[0]);
            let _ = io::stdout().flush();
        }
    }
}

// ---------------------------------------------------------------- icmp errors

/// The Internet checksum (RFC 1071) of `bytes`.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What `to` sent: the IP and UDP headers of a datagram from `to`:`sport`
/// to `far_end`:`dport` with a four-byte body (only the headers are
/// quoted, which is all an error must carry).
fn quoted_datagram(to: IpAddr, sport: u16, far_end: IpAddr, dport: u16) -> Result<Vec<u8>, String> {
    const BODY: u16 = 4;
    let udp_len = 8 + BODY;
    let mut udp = Vec::with_capacity(8);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    let mut packet = match (to, far_end) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let total = 20 + udp_len;
            let mut header = vec![0x45, 0];
            header.extend_from_slice(&total.to_be_bytes());
            // Identification 0, don't fragment, TTL 64, UDP, checksum later.
            header.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
            header.extend_from_slice(&src.octets());
            header.extend_from_slice(&dst.octets());
            let sum = internet_checksum(&header);
            header[10..12].copy_from_slice(&sum.to_be_bytes());
            header
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut header = vec![0x60, 0, 0, 0];
            header.extend_from_slice(&udp_len.to_be_bytes());
            header.extend_from_slice(&[17, 64]);
            header.extend_from_slice(&src.octets());
            header.extend_from_slice(&dst.octets());
            header
        }
        _ => return Err(format!("icmp-error: {to} and {far_end} are not of one family")),
    };
    packet.extend_from_slice(&udp);
    Ok(packet)
}

fn icmp_error(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    let usage = || {
        "usage: labhost icmp-error TO SPORT FAR_END DPORT [--kind port-unreachable|too-big] [--mtu N] [--device DEV]"
            .to_string()
    };
    let [to, sport, far_end, dport] = args.positional.as_slice() else {
        return Err(usage());
    };
    let to: IpAddr = to.parse().map_err(|_| usage())?;
    let far_end: IpAddr = far_end.parse().map_err(|_| usage())?;
    let sport: u16 = sport.parse().map_err(|_| usage())?;
    let dport: u16 = dport.parse().map_err(|_| usage())?;
    let too_big = match args.one("kind").unwrap_or("port-unreachable") {
        "port-unreachable" => false,
        "too-big" => true,
        _ => return Err(usage()),
    };
    let mtu: u32 = args.num("mtu", 1280)?;
    let quoted = quoted_datagram(to, sport, far_end, dport)?;
    // Type, code, checksum, then four bytes (for "too big", the MTU).
    let mut message = match (to.is_ipv4(), too_big) {
        // Destination unreachable: port unreachable, or fragmentation
        // needed with the next hop's MTU in the last two bytes.
        (true, false) => vec![3, 3, 0, 0, 0, 0, 0, 0],
        (true, true) => {
            let mtu = u16::try_from(mtu).map_err(|_| usage())?;
            let mut m = vec![3, 4, 0, 0, 0, 0];
            m.extend_from_slice(&mtu.to_be_bytes());
            m
        }
        // ICMPv6 destination unreachable, port unreachable; packet too big.
        (false, false) => vec![1, 4, 0, 0, 0, 0, 0, 0],
        (false, true) => {
            let mut m = vec![2, 0, 0, 0];
            m.extend_from_slice(&mtu.to_be_bytes());
            m
        }
    };
    message.extend_from_slice(&quoted);
    let (family, protocol) = if to.is_ipv4() {
        // The kernel fills in ICMPv6 checksums on raw sockets, not ICMP's.
        let sum = internet_checksum(&message);
        message[2..4].copy_from_slice(&sum.to_be_bytes());
        (AddressFamily::Inet, SockProtocol::Icmp)
    } else {
        (AddressFamily::Inet6, SockProtocol::IcmpV6)
    };
    let fd = socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, protocol)
        .map_err(|e| format!("raw ICMP socket: {}", e.desc()))?;
    if let Some(device) = args.one("device") {
        setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(device))
            .map_err(|e| format!("bind to {device}: {}", e.desc()))?;
    }
    let sent = match to {
        IpAddr::V4(a) => nix::sys::socket::sendto(
            fd.as_raw_fd(),
            &message,
            &SockaddrIn::from(std::net::SocketAddrV4::new(a, 0)),
            MsgFlags::empty(),
        ),
        IpAddr::V6(a) => nix::sys::socket::sendto(
            fd.as_raw_fd(),
            &message,
            &SockaddrIn6::from(std::net::SocketAddrV6::new(a, 0, 0, 0)),
            MsgFlags::empty(),
        ),
    };
    sent.map_err(|e| format!("icmp error to {to}: {}", e.desc()))?;
    println!("sent");
    Ok(())
}

// ---------------------------------------------------------------- dhcp

/// BOOTP's fixed header (RFC 2131 figure 1) up to the options, then the
/// magic cookie.
const BOOTP_HEADER: usize = 236;
const DHCP_COOKIE: [u8; 4] = [99, 130, 83, 99];

fn dhcp_discover(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    let [device] = args.positional.as_slice() else {
        return Err("usage: labhost dhcp-discover DEVICE [--timeout-ms N]".into());
    };
    let timeout = args.timeout()?;
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{device}/address"))
        .map_err(|e| format!("{device}: {}", err_text(&e)))?;
    let mac: Vec<u8> = mac_text
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    if mac.len() != 6 {
        return Err(format!("{device}: no Ethernet address ({})", mac_text.trim()));
    }
    let xid: [u8; 4] = (std::process::id() as u32).to_be_bytes();
    let mut discover = vec![0u8; BOOTP_HEADER];
    discover[0] = 1; // BOOTREQUEST
    discover[1] = 1; // Ethernet
    discover[2] = 6;
    discover[4..8].copy_from_slice(&xid);
    discover[10] = 0x80; // broadcast the reply: no address to unicast to yet
    discover[28..34].copy_from_slice(&mac);
    discover.extend_from_slice(&DHCP_COOKIE);
    discover.extend_from_slice(&[53, 1, 1, 255]); // DHCPDISCOVER, end

    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 68))
        .map_err(|e| format!("bind port 68: {}", err_text(&e)))?;
    setsockopt(&sock, sockopt::BindToDevice, &std::ffi::OsString::from(device))
        .map_err(|e| format!("bind to {device}: {}", e.desc()))?;
    sock.set_broadcast(true)
        .map_err(|e| format!("broadcast: {}", err_text(&e)))?;
    sock.send_to(&discover, (Ipv4Addr::BROADCAST, 67))
        .map_err(|e| format!("dhcp discover: {}", err_text(&e)))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("dhcp: no offer within {} ms", timeout.as_millis()));
        }
        sock.set_read_timeout(Some(left)).map_err(|e| err_text(&e))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                continue
            }
            Err(e) => return Err(format!("dhcp: {}", err_text(&e))),
        };
        let reply = &buf[..n];
        let is_offer = n > BOOTP_HEADER + 4
            && reply[0] == 2
            && reply[4..8] == xid
            && reply[BOOTP_HEADER..BOOTP_HEADER + 4] == DHCP_COOKIE
            && reply[BOOTP_HEADER + 4..].windows(3).any(|w| w == [53, 1, 2]);
        if is_offer {
            let offered = Ipv4Addr::new(reply[16], reply[17], reply[18], reply[19]);
            println!("offer {offered} from {}", from.ip());
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------- spray

fn spray(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    let interval = Duration::from_micros(args.num("interval-us", 500u64)?.max(1));
    let mut targets = Vec::new();
    for t in &args.positional {
        targets.push(
            t.parse::<SocketAddr>()
                .map_err(|_| format!("usage: spray: {t} is not ADDR:PORT"))?,
        );
    }
    if targets.is_empty() {
        return Err("usage: labhost spray ADDR:PORT... [--interval-us N]".into());
    }
    let v4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| format!("bind: {}", err_text(&e)))?;
    let v6 = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).map_err(|e| format!("bind: {}", err_text(&e)))?;
    println!("spraying");
    let _ = io::stdout().flush();
    loop {
        for t in &targets {
            let sock = if t.is_ipv6() { &v6 } else { &v4 };
            // Refused, unreachable, no route: an application keeps trying.
            let _ = sock.send_to(b"spray", t);
            std::thread::sleep(interval);
        }
    }
}

// ---------------------------------------------------------------- dns

fn rcode_name(rcode: ResponseCode) -> String {
    match rcode {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

/// One query over UDP, or over TCP with `--tcp` (RFC 1035 length prefix).
fn dns_query(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    let (server, name) = match args.positional.as_slice() {
        [s, n] => (s.clone(), n.clone()),
        _ => {
            return Err("usage: labhost dns-query SERVER NAME [--type T] [--port N] [--proto udp|tcp]".into())
        }
    };
    let server_ip: IpAddr = server
        .parse()
        .map_err(|_| format!("usage: dns-query: server {server} is not an IP address"))?;
    let port: u16 = args.num("port", 53)?;
    let qtype = RecordType::from_str(&args.one("type").unwrap_or("A").to_ascii_uppercase())
        .map_err(|_| "usage: --type: unknown query type".to_string())?;
    let timeout = args.timeout()?;
    let qname = Name::from_ascii(&name).map_err(|e| format!("dns-query: bad name {name}: {e}"))?;
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let mut message = Message::query();
    message.metadata.id = id;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(qname, qtype));
    let query = message
        .to_vec()
        .map_err(|e| format!("dns-query: cannot encode: {e}"))?;
    let target = SocketAddr::new(server_ip, port);
    let reply = if args.one("proto") == Some("tcp") {
        tcp_exchange(target, &query, timeout)?
    } else {
        udp_exchange(target, &query, timeout)?
    };
    let reply = Message::from_vec(&reply).map_err(|e| format!("dns {target}: malformed reply: {e}"))?;
    if reply.metadata.id != id {
        return Err(format!("dns {target}: reply with a wrong id"));
    }
    let answers: Vec<String> = reply
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            RData::CNAME(c) => c.0.to_string().trim_end_matches('.').to_string(),
            other => format!("type{}", u16::from(other.record_type())),
        })
        .collect();
    let ttl = reply.answers.iter().map(|r| r.ttl).min();
    let ttl = ttl.map(|t| format!(" ttl={t}")).unwrap_or_default();
    println!(
        "rcode={} answers={}{ttl}",
        rcode_name(reply.metadata.response_code),
        answers.join(",")
    );
    Ok(())
}

fn tcp_exchange(target: SocketAddr, payload: &[u8], timeout: Duration) -> Result<Vec<u8>, String> {
    let what = |e: &io::Error| format!("tcp {target}: {}", err_text(e));
    let mut stream = TcpStream::connect_timeout(&target, timeout).map_err(|e| what(&e))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| what(&e))?;
    let mut framed = (payload.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(payload);
    stream.write_all(&framed).map_err(|e| what(&e))?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).map_err(|e| what(&e))?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut reply).map_err(|e| what(&e))?;
    Ok(reply)
}
