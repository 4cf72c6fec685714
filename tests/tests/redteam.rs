//! An adversarial review of the kill switch: each test here is an attack
//! that once made a packet leave (seen failing before its fix), or, when
//! ignored, one that still does. Attacks that were tried and refused are
//! listed in docs/threat-model.md ("Attacks tried").
//! Run as root after `cargo build --workspace`.

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use lab::{addr, wait_for, Lab, Ns};

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

/// Runs `f` on a thread that has joined the client namespace and dropped to
/// uid/gid 65534 (nobody) for itself only (raw syscalls change one thread):
/// what any local user can do.
fn as_nobody_in_client<T: Send + 'static>(lab: &Lab, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", lab.ns_name(Ns::Client));
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns and the id changes act on this thread only, with a
        // namespace file we opened; nothing else runs on this thread.
        unsafe {
            assert_eq!(libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET), 0, "setns");
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
        }
        f()
    })
    .join()
    .expect("the unprivileged thread panicked")
}

/// A DNS query (id 0x5254, RD, one question, class IN) for `name`, type A.
fn dns_query_bytes(name: &str) -> Vec<u8> {
    let mut q = vec![0x52, 0x54, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).expect("short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The source ports of the stub's upstream UDP exchanges with the pinned
/// resolver that conntrack still remembers (`src=192.0.2.66 ... sport=P
/// dport=53` whose reply really came from the resolver, i.e. not a redirected
/// application flow). A local user sees the same ports in /proc/net/udp
/// while the stub's socket is open.
fn stub_upstream_ports(lab: &Lab) -> Vec<u16> {
    let out = lab
        .exec(Ns::Client, &["conntrack", "-L", "-p", "udp", "--dport", "53"])
        .expect("conntrack -L");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let reply_from_resolver = format!(
        "src={} dst={} sport=53 ",
        addr::GATEWAY_TUN_V4,
        addr::DAEMON_TUN_V4
    );
    text.lines()
        .filter(|l| l.contains(&reply_from_resolver))
        .filter_map(|l| {
            let field = l.split_whitespace().find(|w| w.starts_with("sport="))?;
            field.trim_start_matches("sport=").parse().ok()
        })
        .collect()
}

/// The DNS redirect is NAT, and NAT decides once per conntrack entry: a
/// datagram that matches an entry the stub's own (unredirected) exchange
/// left behind is not redirected. A local user who binds the stub's last
/// upstream source port (free again once the stub's socket is closed, its
/// conntrack entry alive for 30 s more) and sends to the pinned resolver
/// reached it directly: the filter let DNS to the pinned resolver through
/// by address and port alone. So a name the profile does not allow
/// (`other.test`) was resolved by the pinned resolver, and any name could
/// be carried out through it. It failed like that before the fix (the
/// pinned resolver answered `other.test` with 203.0.113.20 and logged it);
/// now only packets with the stub's mark may go to the pinned resolvers.
#[test]
fn a_local_user_cannot_reuse_the_stubs_flow_to_the_pinned_resolver() {
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    lab.reset_all_leaks().expect("reset");
    daemon.ctl_ok(&["start", "lab"]).expect("start");

    // Make the stub ask upstream, then take over its source port.
    let asked = lab
        .dns_query(Ns::Client, addr::PUBLIC_DNS_V4, addr::MEET_NAME, "A")
        .expect("meet.test through the stub");
    assert_eq!(asked.rcode, "NOERROR");
    let ports = wait_for(
        Duration::from_secs(5),
        "the stub's upstream flow in conntrack",
        || {
            let ports = stub_upstream_ports(&lab);
            anyhow::ensure!(!ports.is_empty(), "none yet");
            Ok(ports)
        },
    )
    .expect("stub flow");

    let query = dns_query_bytes(addr::OTHER_NAME);
    let resolver: SocketAddr = SocketAddr::new(addr::GATEWAY_TUN_V4.parse().expect("ip"), 53);
    let local_ip = addr::DAEMON_TUN_V4.to_string();
    let replies: Vec<String> = as_nobody_in_client(&lab, move || {
        let mut replies = Vec::new();
        // The stub drops its socket right after the answer; until then its
        // port is taken.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut bound = Vec::new();
        while bound.is_empty() && std::time::Instant::now() < deadline {
            bound = ports
                .iter()
                .filter_map(|&port| Some((port, UdpSocket::bind((local_ip.as_str(), port)).ok()?)))
                .collect();
            std::thread::sleep(Duration::from_millis(20));
        }
        for (port, sock) in bound {
            sock.set_read_timeout(Some(Duration::from_millis(1500)))
                .expect("timeout");
            sock.connect(resolver).expect("connect");
            // Our table refusing it on the way out shows as EPERM here.
            if let Err(e) = sock.send(&query) {
                replies.push(format!("port {port}: send: {e}"));
                continue;
            }
            let mut buf = [0u8; 1500];
            match sock.recv(&mut buf) {
                Ok(_) => replies.push(format!(
                    "port {port}: rcode {} answers {} from the resolver",
                    buf[3] & 0x0f,
                    u16::from_be_bytes([buf[6], buf[7]])
                )),
                Err(e) => replies.push(format!("port {port}: {e}")),
            }
        }
        replies
    });
    assert!(!replies.is_empty(), "no port of the stub's could be taken over");
    let log = lab.pinned_resolver_log();
    assert!(
        !log.contains(addr::OTHER_NAME),
        "a local user's query for {} reached the pinned resolver past the stub ({replies:?}):\n{log}",
        addr::OTHER_NAME
    );
    assert!(
        !replies.iter().any(|r| r.contains("rcode 0 answers 1")),
        "the pinned resolver answered a local user directly: {replies:?}"
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// With `allow_lan`, the LAN rule admitted its ranges by destination
/// alone, whatever the output interface. But only the main table's
/// connected routes keep LAN traffic off the tunnel: link-local
/// 169.254.0.0/16 and SSDP's 239.255.255.250 (added as whole ranges) have
/// no route there on most machines, so they took the tunnel's default
/// route and went *through the tunnel* to the gateway, accepted as "LAN":
/// any local program could reach the gateway's own link-local neighbours
/// (a cloud gateway's metadata service at 169.254.169.254) and send
/// multicast to the gateway. (A program may also bind its socket to the
/// tunnel interface, unprivileged, to send any LAN address that way.) It
/// failed like that before the fix (the gateway's tunnel meter counted
/// 169.254.169.254:80 and 239.255.255.250:1900); the LAN is now the LAN
/// only outside the tunnel.
#[test]
fn allow_lan_does_not_open_lan_ranges_through_the_tunnel() {
    let lab = lab();
    lab.write_profile("lan", |t| t.replace("[options]", "[options]\nallow_lan = true"))
        .expect("profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lan"]).expect("start");
    lab.reset_all_leaks().expect("reset");

    // A local user, no privilege: a TCP connect and an SSDP datagram.
    let short = Duration::from_millis(500);
    let metadata = lab.probe_tcp_timeout(Ns::Client, "169.254.169.254", 80, short);
    let ssdp = lab.probe_udp_timeout(Ns::Client, "239.255.255.250", 1900, short);
    assert!(metadata.is_err(), "{metadata:?}");
    assert!(ssdp.is_err(), "{ssdp:?}");
    lab.assert_no_leaks();
    // The LAN itself stays open, outside the tunnel: the router's meter on
    // the client's link sees a connect to the router's address.
    let _ = lab.probe_tcp_timeout(Ns::Client, addr::ROUTER_CLIENT_V4, 443, short);
    assert!(lab.leaks().expect("meter") > 0, "the LAN was not reached");
    assert_eq!(
        lab.tunnel_leaks().expect("meter"),
        0,
        "{}",
        lab.tunnel_leak_report()
    );
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// A UDP socket bound (SO_BINDTODEVICE, unprivileged since Linux 5.7) to
/// `device`, or why not.
fn udp_bound_to(device: &str, v6: bool) -> std::io::Result<UdpSocket> {
    let sock = if v6 {
        UdpSocket::bind("[::]:0")?
    } else {
        UdpSocket::bind("0.0.0.0:0")?
    };
    let name = device.as_bytes();
    // SAFETY: a valid socket and a buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            libc::socklen_t::try_from(name.len()).expect("short name"),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

/// The output chain accepts loopback by address too (a redirected DNS
/// packet still names the interface routed before nat), and `postrouting`
/// repeated that. But a local user may bind a socket to the tunnel
/// interface: a datagram to 127.0.0.2 then really went out through the
/// tunnel, with any payload, to the gateway. It failed like that before
/// the fix (the gateway's tunnel meter counted 127.0.0.2 udp/9999); now
/// `postrouting`, where the real device is known, accepts loopback by
/// interface only.
#[test]
fn a_loopback_destination_bound_to_the_tunnel_does_not_leave() {
    let lab = lab();
    lab.sessiond_profile().expect("profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.reset_all_leaks().expect("reset");

    let sent: Vec<String> = as_nobody_in_client(&lab, || {
        let mut sent = Vec::new();
        for (to, v6) in [("127.0.0.2:9999", false), ("[::1]:9999", true)] {
            let result = udp_bound_to(lab::DAEMON_TUN_IF, v6).and_then(|sock| sock.send_to(b"rt", to));
            sent.push(format!("{to}: {result:?}"));
        }
        sent
    });
    // DNS, redirected to the stub on loopback, still works.
    let asked = lab
        .dns_query(Ns::Client, addr::PUBLIC_DNS_V4, addr::MEET_NAME, "A")
        .expect("meet.test through the stub");
    assert_eq!(asked.rcode, "NOERROR");
    assert_eq!(
        lab.tunnel_leaks().expect("meter"),
        0,
        "sent {sent:?}; {}",
        lab.tunnel_leak_report()
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// Not a leak but the kill switch failing a call: when the machine's own
/// link is smaller than the tunnel's datagrams (LTE, DS-Lite: the tunnel's
/// MTU is 1420, its IPv4 datagrams 1480 bytes), the kernel fragments them
/// after the `inet` hooks, and the link-level table dropped every fragment
/// but the first (no UDP header to match): a bulk transfer froze. It
/// failed like that before the fix (the echo timed out after 0 bytes;
/// fragments counted leaving the chain before ours, none arriving at the
/// router); the later fragments of the tunnel's marked datagrams to the
/// endpoint now pass too.
#[test]
fn a_bulk_transfer_crosses_a_small_link_of_the_machine_itself() {
    let lab = lab();
    let files = lab
        .write_profile("lab", |t| t.replace("tcp = [443]", "tcp = [443, 9000]"))
        .expect("profile");
    for (ns, ifname) in [
        (Ns::Client, addr::CLIENT_IF),
        (Ns::Router, addr::ROUTER_CLIENT_IF),
    ] {
        lab.exec_ok(ns, &["ip", "link", "set", ifname, "mtu", "1280"])
            .expect("a small MTU on the client's link");
    }
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    lab.set_tunnel_allowed_profile(&files.toml).expect("meter");
    lab.reset_all_leaks().expect("reset");
    let bin = lab.labhost_path().to_string_lossy().into_owned();
    let out = lab
        .exec(
            Ns::Client,
            &[
                &bin,
                "bulk",
                addr::HOST_V4,
                "9000",
                "100000",
                "--timeout-ms",
                "40000",
            ],
        )
        .expect("run labhost bulk");
    assert!(
        out.status.success(),
        "the bulk transfer through the tunnel did not complete over the machine's 1280-byte link: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The router's meter cannot tell a later fragment (no UDP header; it
    // reads payload bytes as ports) from other UDP: it must see nothing
    // but datagrams to the endpoint's address.
    let outside = lab.leak_destinations().expect("meter");
    assert!(
        outside
            .iter()
            .all(|d| d.starts_with(&format!("{} udp/", addr::GATEWAY_V4))),
        "{}",
        lab.leak_report()
    );
    assert_eq!(
        lab.tunnel_leaks().expect("meter"),
        0,
        "{}",
        lab.tunnel_leak_report()
    );
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// The outside meter itself: a packet that left the client counts even when
/// the router drops it before its forward and input hooks. A router
/// forwards nothing whose TTL ends there and routes nothing it has no route
/// for (the lab's router has no default route), so a leak by either road
/// (a TTL-1 datagram, any address outside the lab's networks) was on the
/// wire yet counted as nothing. No session: the meter alone is under test.
#[test]
fn the_meter_counts_what_the_router_drops_before_routing() {
    let lab = lab();
    lab.reset_all_leaks().expect("reset");
    let host: SocketAddr = format!("{}:40009", addr::HOST_V4).parse().expect("address");
    // A local user, no privilege: one datagram each road.
    as_nobody_in_client(&lab, move || {
        let short_lived = UdpSocket::bind("0.0.0.0:0").expect("bind");
        short_lived.set_ttl(1).expect("ttl");
        short_lived.send_to(b"ttl-1", host).expect("send ttl-1");
        let v4 = UdpSocket::bind("0.0.0.0:0").expect("bind");
        v4.send_to(b"no-route", "192.0.2.200:40009").expect("send v4");
        let v6 = UdpSocket::bind("[::]:0").expect("bind");
        v6.send_to(b"no-route", "[2001:db8:ffff::1]:40009")
            .expect("send v6");
    });
    let seen = wait_for(
        Duration::from_secs(5),
        "the meter to count three datagrams",
        || {
            let destinations = lab.leak_destinations()?;
            let all = [
                "203.0.113.10 udp/40009",
                "192.0.2.200 udp/40009",
                "2001:db8:ffff::1 udp/40009",
            ]
            .iter()
            .all(|d| destinations.iter().any(|seen| seen == d));
            anyhow::ensure!(all, "{}", lab.leak_report());
            Ok(destinations)
        },
    );
    assert!(seen.is_ok(), "{seen:?}");
}
