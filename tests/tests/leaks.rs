//! Leaks an adversarial review found in the kill switch (issue 13, items
//! 2-9). Several of them go *through* the tunnel, where the router's leak
//! meter does not look: those tests ask the far end (the host's echo
//! services answer with the address they saw) whether a packet arrived.
//! Sockets that must outlive one probe (a flow kept across a reload or a
//! new session) are opened in the client namespace by a thread that joins it.
//! Run as root after `cargo build --workspace`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use lab::{addr, wait_until, Daemon, Lab, LabChild, Ns};

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

/// Runs `f` on a thread that has joined the network namespace `ns`; the
/// sockets it makes stay in that namespace whatever thread uses them later.
fn in_namespace<T: Send + 'static>(lab: &Lab, ns: Ns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", lab.ns_name(ns));
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on this thread only, with a namespace file we opened.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the namespace thread panicked")
}

/// A UDP socket in the client namespace, bound to `local_port` (0: any).
fn client_udp(lab: &Lab, v6: bool, local_port: u16) -> UdpSocket {
    in_namespace(lab, Ns::Client, move || {
        let any: IpAddr = if v6 {
            "::".parse().expect("addr")
        } else {
            "0.0.0.0".parse().expect("addr")
        };
        let sock = UdpSocket::bind(SocketAddr::new(any, local_port)).expect("bind udp");
        sock.set_read_timeout(Some(Duration::from_millis(800)))
            .expect("timeout");
        sock
    })
}

/// A TCP connection from the client namespace.
fn client_tcp(lab: &Lab, to: SocketAddr) -> std::io::Result<TcpStream> {
    in_namespace(lab, Ns::Client, move || {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(stream)
    })
}

/// One datagram to `to` and the echo's answer (`peer=ADDR payload`), or why
/// none came.
fn udp_exchange(sock: &UdpSocket, to: SocketAddr, payload: &str) -> Result<String, String> {
    sock.send_to(payload.as_bytes(), to)
        .map_err(|e| format!("send to {to}: {e}"))?;
    let mut buf = [0u8; 2048];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if from == to => return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("no answer from {to}: {e}")),
        }
    }
}

/// Sends a line on an echo connection and reads it back.
fn tcp_echo(stream: &mut TcpStream, line: &str) -> Result<String, String> {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(0) => return Err("the connection was closed".into()),
            Ok(_) => got.push(byte[0]),
            // A signal for another thread of the test binary; not an answer.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&got).trim().to_string())
}

/// Reads the echo service's greeting (`peer=ADDR`).
fn tcp_greeting(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => panic!("no greeting: {other:?}"),
        }
    }
    String::from_utf8_lossy(&got).trim().to_string()
}

fn sock(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().expect("address"), port)
}

/// The lab profile with its `[[allow]]` entries replaced by `allow` and,
/// unless `v6_tunnel`, an IPv4-only tunnel address (like both real-world
/// templates). Returns the text (for [`follow`]).
fn write_profile(lab: &Lab, name: &str, v6_tunnel: bool, allow: &str) -> String {
    lab.write_profile(name, |t| {
        let start = t.find("[[allow]]").expect("the lab profile has [[allow]]");
        let end = t[start..].find("[options]").map_or(t.len(), |i| start + i);
        let mut text = format!("{}{allow}\n{}", &t[..start], &t[end..]);
        if !v6_tunnel {
            text = text.replace(
                &format!(
                    "address = [\"{}/32\", \"{}/128\"]",
                    addr::DAEMON_TUN_V4,
                    addr::DAEMON_TUN_V6
                ),
                &format!("address = [\"{}/32\"]", addr::DAEMON_TUN_V4),
            );
            assert!(!text.contains(addr::DAEMON_TUN_V6), "{text}");
        }
        text
    })
    .expect("write profile")
    .toml
}

/// Points the inside-tunnel meter at a profile's allowlist (the one in
/// force) and zeroes both meters.
fn follow(lab: &Lab, profile: &str) {
    lab.set_tunnel_allowed_profile(profile)
        .expect("the inside meter follows the profile");
    lab.reset_all_leaks().expect("reset the meters");
}

fn allow(host: &str, tcp: &[u16], udp: &[u16]) -> String {
    let list = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    format!(
        "[[allow]]\nhost = \"{host}\"\ntcp = [{}]\nudp = [{}]\n",
        list(tcp),
        list(udp)
    )
}

/// Runs `edit` (a change of the running profile, returning its text) and
/// waits until the daemon says the new allow list is in force (after the
/// new table and the new names' answers); then the inside meter follows
/// the new profile (without zeroing: what leaked before still counts).
fn reload(lab: &Lab, daemon: &Daemon, edit: impl FnOnce() -> String) {
    const IN_FORCE: &str = "the new allow list is in force";
    let before = daemon.log().matches(IN_FORCE).count();
    let profile = edit();
    wait_until(Duration::from_secs(15), "the reload in force", || {
        daemon.log().matches(IN_FORCE).count() > before
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    lab.set_tunnel_allowed_profile(&profile)
        .expect("the inside meter follows the profile");
}

/// Echo services on UDP `ports` in namespace `ns` (labhost serve).
fn udp_echo(lab: &Lab, ns: Ns, ports: &[u16]) -> LabChild {
    let bin = lab.labhost_path().to_string_lossy().into_owned();
    let mut args = vec![bin, "serve".into()];
    for p in ports {
        args.extend(["--udp".into(), p.to_string()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = lab.spawn_named(ns, "udp-echo", &refs).expect("spawn labhost");
    wait_until(Duration::from_secs(10), "labhost serve ready", || {
        child.log().contains("ready") || !child.is_running()
    })
    .expect("labhost serve");
    assert!(child.is_running(), "{}", child.log());
    child
}

fn link_local(lab: &Lab, ns: Ns, ifname: &str) -> String {
    let out = lab
        .exec_ok(
            ns,
            &["ip", "-6", "-o", "addr", "show", "dev", ifname, "scope", "link"],
        )
        .expect("ip addr");
    let word = out
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .unwrap_or_else(|| panic!("no link-local address on {ifname}: {out}"));
    word.split('/').next().expect("address").to_string()
}

fn ifindex(lab: &Lab, ns: Ns, ifname: &str) -> u32 {
    let out = lab
        .exec_ok(ns, &["cat", &format!("/sys/class/net/{ifname}/ifindex")])
        .expect("ifindex");
    out.trim().parse().expect("ifindex number")
}

// ---------------------------------------------------------------- 13.2

/// A process that can bind the DHCP client ports must not get a channel to
/// any host: not through the tunnel to a host the profile does not allow
/// (IPv4), not in clear beside an IPv4-only tunnel (IPv6). DHCP to on-link
/// servers (unicast renewals) still works.
#[test]
fn dhcp_ports_reach_only_on_link_servers() {
    let lab = lab();
    let profile = write_profile(&lab, "lab", false, &allow(addr::HOST_V4, &[443], &[10000]));
    let _far = udp_echo(&lab, Ns::Host, &[67, 547]);
    let _near = udp_echo(&lab, Ns::Router, &[67, 547, 10000]);
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &profile);

    let v4 = client_udp(&lab, false, 68);
    let far_v4 = udp_exchange(&v4, sock(addr::OTHER_V4, 67), "dhcp4");
    assert!(
        far_v4.is_err(),
        "UDP 68->67 reached a host the profile does not allow: {far_v4:?}"
    );
    let v6 = client_udp(&lab, true, 546);
    let far_v6 = udp_exchange(&v6, sock(addr::HOST_V6, 547), "dhcp6");
    assert!(
        far_v6.is_err(),
        "UDP 546->547 reached an internet host beside an IPv4-only tunnel: {far_v6:?}"
    );
    // On the link, DHCP only between DHCP's ports: not from the client's
    // port to another port of a neighbour, not from another port to a
    // neighbour's server port.
    let to_other_port = udp_exchange(&v4, sock(addr::ROUTER_CLIENT_V4, 10000), "dhcp4");
    assert!(
        to_other_port.is_err(),
        "UDP 68->10000 reached a neighbour: {to_other_port:?}"
    );
    let high = client_udp(&lab, false, 40000);
    let from_other_port = udp_exchange(&high, sock(addr::ROUTER_CLIENT_V4, 67), "dhcp4");
    assert!(
        from_other_port.is_err(),
        "UDP 40000->67 reached a neighbour: {from_other_port:?}"
    );
    lab.assert_no_leaks();

    // Broadcast (bound to the link, as a DHCP client is), and DHCPv6 to
    // the router's link-local address: also only between DHCP's ports.
    // Nothing answers these (the router's echo answers to a port the
    // client does not let in), so the outside meter (which exempts DHCP's
    // broadcasts) is the judge, read after a datagram through the tunnel
    // has crossed the same link behind them.
    let router_ll = link_local(&lab, Ns::Router, addr::ROUTER_CLIENT_IF);
    let scope = ifindex(&lab, Ns::Client, addr::CLIENT_IF);
    let link_local_port = |port| {
        SocketAddr::V6(std::net::SocketAddrV6::new(
            router_ll.parse().expect("link-local"),
            port,
            0,
            scope,
        ))
    };
    let on_link = |sock: &UdpSocket| {
        sock.set_broadcast(true).expect("broadcast on");
        nix::sys::socket::setsockopt(
            sock,
            nix::sys::socket::sockopt::BindToDevice,
            &std::ffi::OsString::from(addr::CLIENT_IF),
        )
        .expect("bind to the link");
    };
    on_link(&v4);
    on_link(&high);
    let high6 = client_udp(&lab, true, 40001);
    for (from, to) in [
        (&v4, sock("255.255.255.255", 10000)),
        (&high, sock("255.255.255.255", 67)),
        (&v6, link_local_port(10000)),
        (&high6, link_local_port(547)),
    ] {
        let _ = from.send_to(b"not-dhcp", to);
    }
    assert!(
        lab.probe_udp(Ns::Client, addr::HOST_V4, 10000).is_ok(),
        "the tunnel after the tries"
    );
    lab.assert_no_leaks();

    // A unicast renewal to the on-link server, v4 and v6 (link-local).
    assert_eq!(
        udp_exchange(&v4, sock(addr::ROUTER_CLIENT_V4, 67), "renew"),
        Ok(format!("peer={} renew", addr::CLIENT_V4))
    );
    let reply = udp_exchange(&v6, link_local_port(547), "renew6").expect("DHCPv6 to the on-link server");
    assert!(reply.ends_with("renew6"), "{reply}");
    daemon.ctl_ok(&["stop"]).expect("stop");
}

// ---------------------------------------------------------------- 13.3

/// A UDP flow opened under one profile must not go on through the tunnel in
/// the next session of a profile that does not allow it.
#[test]
fn a_flow_does_not_outlive_the_session_that_admitted_it() {
    let lab = lab();
    let a = write_profile(&lab, "a", true, &allow(addr::HOST_V4, &[], &[10000]));
    let b = write_profile(&lab, "b", true, &allow(addr::OTHER_V4, &[443], &[]));
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "a"]).expect("start a");
    follow(&lab, &a);
    let flow = client_udp(&lab, false, 0);
    let host = sock(addr::HOST_V4, 10000);
    assert_eq!(
        udp_exchange(&flow, host, "under-a"),
        Ok(format!("peer={} under-a", addr::GATEWAY_V4))
    );
    daemon.ctl_ok(&["stop"]).expect("stop a");
    daemon.ctl_ok(&["start", "b"]).expect("start b");
    follow(&lab, &b);
    let under_b = udp_exchange(&flow, host, "under-b");
    assert!(
        under_b.is_err(),
        "profile a's flow went on in profile b's session: {under_b:?}"
    );
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop b");
}

/// A reload that removes a host or a port cuts its established flows at
/// once (TCP and UDP); one that only adds a host cuts nothing.
#[test]
fn a_reload_that_narrows_cuts_established_flows() {
    let lab = lab();
    let both = format!(
        "{}{}",
        allow(addr::HOST_V4, &[9000], &[10000]),
        allow(addr::OTHER_V4, &[9000], &[10000])
    );
    let first = write_profile(&lab, "lab", true, &allow(addr::HOST_V4, &[9000], &[10000]));
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &first);
    let mut tcp = client_tcp(&lab, sock(addr::HOST_V4, 9000)).expect("connect to the echo");
    assert_eq!(tcp_greeting(&mut tcp), format!("peer={}", addr::GATEWAY_V4));
    let udp = client_udp(&lab, false, 0);
    let host_udp = sock(addr::HOST_V4, 10000);
    assert!(udp_exchange(&udp, host_udp, "one").is_ok());
    let mut other = client_tcp(&lab, sock(addr::OTHER_V4, 9000));
    assert!(other.is_err(), "other.test before it was allowed: {other:?}");

    // Widening: nothing is cut.
    reload(&lab, &daemon, || write_profile(&lab, "lab", true, &both));
    assert_eq!(tcp_echo(&mut tcp, "wider"), Ok("wider".into()));
    assert!(udp_exchange(&udp, host_udp, "wider").is_ok());
    other = client_tcp(&lab, sock(addr::OTHER_V4, 9000));
    let mut other = other.expect("other.test once allowed");
    tcp_greeting(&mut other);

    // The host's UDP port goes: its UDP flow stops, its TCP flow goes on.
    let narrower = format!(
        "{}{}",
        allow(addr::HOST_V4, &[9000], &[]),
        allow(addr::OTHER_V4, &[9000], &[10000])
    );
    reload(&lab, &daemon, || write_profile(&lab, "lab", true, &narrower));
    let cut = udp_exchange(&udp, host_udp, "port-removed");
    assert!(cut.is_err(), "a removed port's flow went on: {cut:?}");
    assert_eq!(tcp_echo(&mut tcp, "still"), Ok("still".into()));

    // The host goes: its TCP flow is cut, the other host's goes on.
    reload(&lab, &daemon, || {
        write_profile(&lab, "lab", true, &allow(addr::OTHER_V4, &[9000], &[10000]))
    });
    let cut = tcp_echo(&mut tcp, "host-removed");
    assert!(cut.is_err(), "a removed host's TCP flow went on: {cut:?}");
    assert_eq!(tcp_echo(&mut other, "kept"), Ok("kept".into()));
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

// ---------------------------------------------------------------- 13.4

/// The lab profile's names, with ports.
fn named_profile(lab: &Lab, meet: (&[u16], &[u16]), other: Option<(&[u16], &[u16])>) -> String {
    let mut text = allow(addr::MEET_NAME, meet.0, meet.1);
    if let Some((tcp, udp)) = other {
        text.push_str(&allow(addr::OTHER_NAME, tcp, udp));
    }
    write_profile(lab, "lab", true, &text)
}

/// Asks the stub (every DNS query is redirected to it) for `name`.
fn resolve(lab: &Lab, name: &str) -> Vec<String> {
    let reply = lab
        .dns_query(Ns::Client, addr::PUBLIC_DNS_V4, name, "A")
        .unwrap_or_else(|e| panic!("dns query for {name}: {e}"));
    reply.answers
}

/// After a reload removes a name (or a port of one), its learned addresses
/// stop admitting new connections at once; a name that stays keeps working,
/// and so do established flows to its expired answers.
#[test]
fn a_reload_closes_removed_names_and_ports_at_once() {
    let lab = lab();
    let first = named_profile(&lab, (&[443, 9000], &[10000]), Some((&[443], &[])));
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &first);
    assert_eq!(resolve(&lab, addr::MEET_NAME), [addr::HOST_V4]);
    assert_eq!(resolve(&lab, addr::OTHER_NAME), [addr::OTHER_V4]);
    let tunnel = Ok(format!("peer={}", addr::GATEWAY_V4));
    assert_eq!(lab.probe_tcp(Ns::Client, addr::HOST_V4, 443), tunnel);
    assert_eq!(lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443), tunnel);
    assert!(lab.probe_udp(Ns::Client, addr::HOST_V4, 10000).is_ok());

    // An answer's TTL running out is not a narrowing: take meet.test's
    // answer out of the timed set as the kernel does at expiry; a new
    // connection is refused, an established one goes on.
    let mut call = client_tcp(&lab, sock(addr::HOST_V4, 9000)).expect("connect");
    tcp_greeting(&mut call);
    lab.exec_ok(
        Ns::Client,
        &[
            "nft",
            "delete",
            "element",
            "inet",
            "sessiongate",
            "allow4",
            &format!("{{ {} . tcp . 9000 }}", addr::HOST_V4),
        ],
    )
    .expect("expire the answer");
    assert!(lab.probe_tcp(Ns::Client, addr::HOST_V4, 9000).is_err());
    assert_eq!(tcp_echo(&mut call, "after-ttl"), Ok("after-ttl".into()));
    // The same over IPv6, whose answers have their own set.
    let aaaa = lab
        .dns_query(Ns::Client, addr::PUBLIC_DNS_V4, addr::MEET_NAME, "AAAA")
        .unwrap_or_else(|e| panic!("dns query for {} AAAA: {e}", addr::MEET_NAME));
    assert_eq!(aaaa.answers, [addr::HOST_V6]);
    let mut call6 = client_tcp(&lab, sock(addr::HOST_V6, 9000)).expect("connect over IPv6");
    tcp_greeting(&mut call6);
    lab.exec_ok(
        Ns::Client,
        &[
            "nft",
            "delete",
            "element",
            "inet",
            "sessiongate",
            "allow6",
            &format!("{{ {} . tcp . 9000 }}", addr::HOST_V6),
        ],
    )
    .expect("expire the IPv6 answer");
    assert!(lab.probe_tcp(Ns::Client, addr::HOST_V6, 9000).is_err());
    assert_eq!(tcp_echo(&mut call6, "after-ttl"), Ok("after-ttl".into()));

    // meet.test loses its UDP port.
    reload(&lab, &daemon, || {
        named_profile(&lab, (&[443, 9000], &[]), Some((&[443], &[])))
    });
    let removed = lab.probe_udp(Ns::Client, addr::HOST_V4, 10000);
    assert!(removed.is_err(), "a removed port still answers: {removed:?}");
    assert_eq!(lab.probe_tcp(Ns::Client, addr::HOST_V4, 443), tunnel);

    // meet.test goes.
    reload(&lab, &daemon, || {
        write_profile(&lab, "lab", true, &allow(addr::OTHER_NAME, &[443], &[]))
    });
    let removed = lab.probe_tcp(Ns::Client, addr::HOST_V4, 443);
    assert!(removed.is_err(), "a removed host still answers: {removed:?}");
    assert!(tcp_echo(&mut call, "removed").is_err());
    assert_eq!(lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443), tunnel);
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

// ---------------------------------------------------------------- 13.5

/// labhost serve in `ns` with the given arguments, ready.
fn serve(lab: &Lab, ns: Ns, args: &[&str]) -> LabChild {
    let bin = lab.labhost_path().to_string_lossy().into_owned();
    let mut full = vec![bin.as_str(), "serve"];
    full.extend_from_slice(args);
    let child = lab.spawn_named(ns, "serve", &full).expect("spawn labhost");
    wait_until(Duration::from_secs(10), "labhost serve ready", || {
        child.log().contains("ready") || !child.is_running()
    })
    .expect("labhost serve");
    assert!(child.is_running(), "{}", child.log());
    child
}

/// Another table's `dnat` of a local address (the machine's own) (what Docker and kube-proxy
/// do; here in a nat chain after our filter, where the output hook's
/// interface is still the one routed before NAT: `lo`) must not carry a connection past our table, neither through the
/// tunnel to a host the profile does not allow nor out in clear; nor may
/// another table's route chain re-mark a packet so that it leaves beside
/// the tunnel.
#[test]
fn another_tables_dnat_or_remark_does_not_slip_past_the_kill_switch() {
    let lab = lab();
    let profile = write_profile(&lab, "lab", true, &allow(addr::HOST_V4, &[443], &[]));
    let _router = serve(&lab, Ns::Router, &["--tcp", "8443"]);
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &profile);
    let foreign = format!(
        "table ip lkforeign {{
            chain nat_out {{
                type nat hook output priority 50; policy accept;
                ip daddr {client} tcp dport 8443 dnat to {router}:8443
                ip daddr {client} tcp dport 443 dnat to {other}:443
            }}
            chain remark {{
                type route hook output priority 10; policy accept;
                ip daddr {host} tcp dport 443 meta mark set {mark:#x}
            }}
        }}",
        client = addr::CLIENT_V4,
        router = addr::ROUTER_CLIENT_V4,
        other = addr::OTHER_V4,
        host = addr::HOST_V4,
        // sessiond::TUNNEL_FWMARK (this crate does not link the daemon).
        mark = 0x5347,
    );
    lab.exec_stdin(Ns::Client, &["nft", "-f", "-"], foreign.as_bytes())
        .expect("add the foreign table");
    lab.reset_all_leaks().expect("reset");

    let short = Duration::from_millis(800);
    let in_clear = lab.probe_tcp_timeout(Ns::Client, addr::CLIENT_V4, 8443, short);
    assert!(
        in_clear.is_err(),
        "a foreign DNAT went out in clear: {in_clear:?}"
    );
    let tunnelled = lab.probe_tcp_timeout(Ns::Client, addr::CLIENT_V4, 443, short);
    assert!(
        tunnelled.is_err(),
        "a foreign DNAT reached a host the profile does not allow: {tunnelled:?}"
    );
    let remarked = lab.probe_tcp_timeout(Ns::Client, addr::HOST_V4, 443, short);
    assert!(
        remarked != Ok(format!("peer={}", addr::CLIENT_V4)),
        "a foreign re-mark sent the allowed host's traffic beside the tunnel: {remarked:?}"
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

// ---------------------------------------------------------------- 13.7

/// A 1280-byte link on the path (DS-Lite, LTE, PPPoE are like that): a
/// bulk transfer through the tunnel must complete, not stall while small
/// exchanges work, over IPv4 and over IPv6 (whose "packet too big" must
/// get in through the tunnel as IPv4's "fragmentation needed" does).
#[test]
fn a_bulk_transfer_crosses_a_1280_byte_link() {
    let lab = lab();
    let profile = write_profile(
        &lab,
        "lab",
        true,
        &format!(
            "{}{}",
            allow(addr::HOST_V4, &[443, 9000], &[]),
            allow(addr::HOST_V6, &[9000], &[])
        ),
    );
    // Both ends of the router-gateway link (a veth drops what is larger
    // than its own MTU on receipt, a real link would not be asymmetric).
    for (ns, ifname) in [
        (Ns::Router, addr::ROUTER_GATEWAY_IF),
        (Ns::Gateway, addr::GATEWAY_IF),
    ] {
        lab.exec_ok(ns, &["ip", "link", "set", ifname, "mtu", "1280"])
            .expect("a small MTU on the path");
    }
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &profile);
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
    let bin = lab.labhost_path().to_string_lossy().into_owned();
    let bytes = 4_000_000;
    for host in [addr::HOST_V4, addr::HOST_V6] {
        let out = lab
            .exec(
                Ns::Client,
                &[
                    &bin,
                    "bulk",
                    host,
                    "9000",
                    &bytes.to_string(),
                    "--timeout-ms",
                    "15000",
                ],
            )
            .expect("run labhost bulk");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && report.contains(&format!("bytes={bytes}")),
            "the bulk transfer to {host} through the tunnel did not complete over a 1280-byte link: {}",
            report.trim()
        );
    }
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

// ---------------------------------------------------------------- 13.8

/// A profile file that others can write is refused at `start` and at a
/// hot reload (such a user could widen the allowlist), with the fix named.
#[test]
fn a_profile_that_others_can_write_is_refused_at_start_and_at_reload() {
    use std::os::unix::fs::PermissionsExt;
    let lab = lab();
    let profile = write_profile(&lab, "lab", true, &allow(addr::HOST_V4, &[443], &[]));
    let path = lab.profiles_dir().expect("profiles dir").join("lab.toml");
    let daemon = lab.start_sessiond().expect("start sessiond");
    let chmod =
        |mode: u32| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");

    chmod(0o666);
    let refused = daemon.ctl(&["start", "lab"]).expect("run sessionctl");
    let said = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(
        !refused.status.success() && said.contains("chmod go-w"),
        "a world-writable profile was started: {said}"
    );
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443),
        Ok(format!("peer={}", addr::CLIENT_V4))
    );

    chmod(0o600);
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &profile);
    chmod(0o666);
    let widened = lab
        .default_profile_toml()
        .replace(
            &format!("host = \"{}\"", addr::MEET_NAME),
            &format!("host = \"{}\"", addr::OTHER_V4),
        )
        .replace("tcp = [443]", "tcp = [443, 8443]");
    let outcomes = || {
        let log = daemon.log();
        log.matches("chmod go-w").count() + log.matches("the new allow list is in force").count()
    };
    let before = outcomes();
    std::fs::write(&path, widened).expect("widen the profile");
    wait_until(Duration::from_secs(15), "the reload refused or done", || {
        outcomes() > before
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let other = lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443);
    assert!(
        other.is_err(),
        "a world-writable edit widened the session: {other:?}"
    );
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

// ---------------------------------------------------------------- 13.9

/// Elements someone else adds to our sets (a host, a port) are noticed by
/// the tamper guard and taken out again.
#[test]
fn elements_someone_else_adds_to_our_sets_are_taken_out() {
    let lab = lab();
    let profile = write_profile(&lab, "lab", true, &allow(addr::MEET_NAME, &[443], &[]));
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &profile);
    assert_eq!(resolve(&lab, addr::MEET_NAME), [addr::HOST_V4]);
    let foreign = [
        ("allow4", format!("{} . tcp . 443 timeout 1h", addr::OTHER_V4)),
        ("allow4_nets", format!("{} . tcp . 8443", addr::OTHER_V4)),
        ("known4", format!("{} . udp . 10000", addr::OTHER_V4)),
    ];
    for (set, element) in &foreign {
        lab.exec_ok(
            Ns::Client,
            &[
                "nft",
                "add",
                "element",
                "inet",
                "sessiongate",
                set,
                &format!("{{ {element} }}"),
            ],
        )
        .expect("add a foreign element");
    }
    wait_until(Duration::from_secs(5), "the foreign elements gone", || {
        let listing = lab
            .exec_ok(Ns::Client, &["nft", "list", "table", "inet", "sessiongate"])
            .unwrap_or_default();
        listing.contains("table inet sessiongate") && !listing.contains(addr::OTHER_V4)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let other = lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443);
    assert!(other.is_err(), "a foreign element opened other.test: {other:?}");
    // Our own answers are back.
    wait_until(Duration::from_secs(5), "meet.test open again", || {
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443) == Ok(format!("peer={}", addr::GATEWAY_V4))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// One local user holding every TCP slot of the DNS stub must not stop
/// another user's lookups over TCP.
#[test]
fn one_local_user_cannot_hold_every_tcp_slot_of_the_dns_stub() {
    let lab = lab();
    let profile = write_profile(&lab, "lab", true, &allow(addr::MEET_NAME, &[443], &[]));
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &profile);
    // Every TCP connection to port 53 is redirected to the stub.
    let dns = sock(addr::PUBLIC_DNS_V4, 53);
    let held: Vec<TcpStream> = in_namespace(&lab, Ns::Client, move || {
        (0..80)
            .filter_map(|_| TcpStream::connect_timeout(&dns, Duration::from_secs(2)).ok())
            .collect()
    });
    assert!(held.len() >= 64, "only {} connections opened", held.len());
    let bin = lab.labhost_path().to_string_lossy().into_owned();
    let out = lab
        .exec(
            Ns::Client,
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                &bin,
                "dns-query",
                addr::PUBLIC_DNS_V4,
                addr::MEET_NAME,
                "--proto",
                "tcp",
                // Generous: the answer waits for an upstream round trip and
                // for the firewall to take its addresses, which took over 3 s
                // on a loaded machine. Without the per-user limit the stub
                // closes this connection at accept, so a failure still shows
                // at once.
                "--timeout-ms",
                "15000",
            ],
        )
        .expect("run labhost as nobody");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("rcode=NOERROR") && said.contains(addr::HOST_V4),
        "another user's TCP lookup failed while root held the stub's connections: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(held);
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// sessiond holds the tunnel's private key: it must never write a core
/// file, even when it was started with cores allowed. (That it is also not
/// dumpable, PR_SET_DUMPABLE 0, is checked by a unit test in main.rs: this
/// machine's kernel lets a process of the same uid without CAP_SYS_PTRACE
/// read /proc/PID/environ of a non-dumpable process, so no lab probe can
/// tell the difference here.)
#[test]
fn sessiond_never_writes_a_core_file() {
    use std::os::unix::fs::PermissionsExt;
    let lab = lab();
    write_profile(&lab, "lab", true, &allow(addr::HOST_V4, &[443], &[]));
    let sessiond = lab::util::find_binary("sessiond").expect("sessiond");
    let sessionctl = lab::util::find_binary("sessionctl").expect("sessionctl");
    let wrapper = lab.tmp_dir().join("sessiond-with-cores");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nulimit -c unlimited\nexec {} \"$@\"\n",
            sessiond.display()
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let daemon = lab
        .start_sessiond_binaries(&wrapper, &sessionctl, &[])
        .expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    let pid = daemon.pid().expect("sessiond's pid");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core limit");
    let words: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(
        (words.get(4), words.get(5)),
        (Some(&"0"), Some(&"0")),
        "sessiond may write a core file: {core}"
    );
    daemon.ctl_ok(&["stop"]).expect("stop");
}

// ---------------------------------------------------------------- 13.6

/// A namespace this test makes beside the lab's (named with the helper tag
/// `lk` and the lab's id), deleted on drop even after a failed assertion.
struct ExtraNamespace(String);

impl ExtraNamespace {
    fn new(lab: &Lab, suffix: &str) -> ExtraNamespace {
        let name = format!("lk{}{suffix}", lab.id());
        lab::util::run(&["ip", "netns", "add", &name]).expect("ip netns add");
        ExtraNamespace(name)
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec!["ip", "netns", "exec", self.0.as_str()];
        full.extend_from_slice(args);
        lab::util::output(&full).expect("ip netns exec")
    }

    /// TCP connect from this namespace: Ok(the server's greeting) or Err.
    fn probe_tcp(&self, lab: &Lab, host: &str, port: u16) -> Result<String, String> {
        let bin = lab.labhost_path().to_string_lossy().into_owned();
        let port = port.to_string();
        let out = self.run(&[&bin, "probe-tcp", host, &port, "--timeout-ms", "800"]);
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Ok(said)
        } else {
            Err(format!("{said} {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
    }
}

impl Drop for ExtraNamespace {
    fn drop(&mut self) {
        if let Ok(out) = lab::util::output(&["ip", "netns", "pids", &self.0]) {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = lab::util::output(&["kill", "-9", pid]);
            }
        }
        let _ = lab::util::output(&["ip", "netns", "delete", &self.0]);
    }
}

/// A macvlan child of `parent` (in the client namespace) moved into `ns`
/// with `address`/26 and a default route via `gateway`.
fn macvlan_child(lab: &Lab, parent: &str, ns: &ExtraNamespace, address: &str, gateway: &str) {
    let child = format!("{parent}m");
    let client = lab.ns_name(Ns::Client).to_string();
    lab::util::run(&[
        "ip", "-n", &client, "link", "add", &child, "link", parent, "type", "macvlan", "mode", "bridge",
    ])
    .expect("add the macvlan child");
    lab::util::run(&["ip", "-n", &client, "link", "set", &child, "netns", &ns.0]).expect("move it");
    for args in [
        vec!["link", "set", "lo", "up"],
        vec!["addr", "add", &format!("{address}/26"), "dev", &child],
        vec!["link", "set", &child, "up"],
        vec!["route", "add", "default", "via", gateway],
    ] {
        let mut full = vec!["ip", "-n", ns.0.as_str()];
        full.extend(args.iter().copied());
        lab::util::run(&full).expect("configure the macvlan child");
    }
}

/// IPv6 from another namespace on the link: its multicast listener
/// reports go out (hop limit 1, as MLD has), so its multicast keeps
/// working during a session, but nothing else does: not an echo request
/// with hop limit 1 to the router, not an MLD-typed message with an
/// ordinary hop limit to a host off the link. Sinks on raw ICMPv6 sockets
/// in the router and the internet host see what arrives.
#[test]
fn other_namespaces_send_only_multicast_listener_reports_over_ipv6() {
    let lab = lab();
    let profile = write_profile(&lab, "lab", true, &allow(addr::HOST_V4, &[443], &[]));
    let side = ExtraNamespace::new(&lab, "v");
    macvlan_child(&lab, addr::CLIENT_IF, &side, "192.0.2.4", addr::ROUTER_CLIENT_V4);
    let child = format!("{}m", addr::CLIENT_IF);
    for args in [
        vec!["ip", "addr", "add", "2001:db8:1::4/64", "dev", &child, "nodad"],
        vec![
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            addr::ROUTER_CLIENT_V6,
        ],
    ] {
        let out = side.run(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    let bin = lab.labhost_path().to_string_lossy().into_owned();
    let sinks: Vec<LabChild> = [Ns::Router, Ns::Host]
        .into_iter()
        .map(|ns| {
            let sink = lab
                .spawn_named(ns, "icmp6-sink", &[&bin, "icmp6-sink"])
                .expect("start an ICMPv6 sink");
            wait_until(Duration::from_secs(10), "an ICMPv6 sink ready", || {
                sink.log().contains("ready")
            })
            .unwrap_or_else(|e| panic!("{e:#}: {}", sink.log()));
            sink
        })
        .collect();
    let (router, internet) = (&sinks[0], &sinks[1]);
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &profile);

    let send = |to: &str, kind: &str, hop_limit: &str| {
        // Refused at the device or not: the sinks tell.
        let _ = side.run(&[&bin, "icmp6-send", to, kind, "--hop-limit", hop_limit]);
    };
    send(addr::HOST_V6, "131", "64");
    send(addr::ROUTER_CLIENT_V6, "128", "1");
    send(addr::ROUTER_CLIENT_V6, "143", "1");
    let from_child = |kind: &str| format!("icmp6 type={kind} from 2001:db8:1::4");
    wait_until(
        Duration::from_secs(10),
        "the child's listener report at the router",
        || router.log().lines().any(|l| l == from_child("143")),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {}", router.log()));
    assert!(
        !router.log().lines().any(|l| l == from_child("128")),
        "a child's echo request with hop limit 1 reached the router: {}",
        router.log()
    );
    // The internet host's copy, if any, is ahead of a message the router
    // sends it now (the same link, in order).
    lab.exec_ok(
        Ns::Router,
        &[&bin, "icmp6-send", addr::HOST_V6, "200", "--hop-limit", "64"],
    )
    .expect("the router's message to the host");
    wait_until(
        Duration::from_secs(10),
        "the router's message at the host",
        || internet.log().contains("icmp6 type=200 from"),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {}", internet.log()));
    assert!(
        !internet.log().lines().any(|l| l == from_child("131")),
        "a child's MLD-typed message with hop limit 64 left the link: {}",
        internet.log()
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// Sends one IPv4 fragment that is not the first (offset 1480, UDP, 8
/// bytes) to argv[1], with the socket mark argv[2] (0: none), through a
/// raw socket: the kernel fills in the source, length, ID and checksum.
const FRAGMENT_SENDER: &str = "import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
if int(sys.argv[2]):
    s.setsockopt(socket.SOL_SOCKET, 36, int(sys.argv[2]))
header = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 28, 0, 1480 // 8, 64, 17, 0, bytes(4), socket.inet_aton(sys.argv[1]))
s.sendto(header + bytes(8), (sys.argv[1], 0))
";

/// Another namespace on the physical link (a macvlan child: `firejail
/// --net=eth0`, containers on macvlan networks) never meets this
/// namespace's `inet` hooks; the link-level table stops it at the device,
/// also on an interface that appears during the session, and goes at stop.
#[test]
fn other_namespaces_on_the_link_are_closed_at_the_device() {
    let lab = lab();
    let profile = write_profile(&lab, "lab", true, &allow(addr::HOST_V4, &[443], &[]));
    let side = ExtraNamespace::new(&lab, "m");
    macvlan_child(&lab, addr::CLIENT_IF, &side, "192.0.2.3", addr::ROUTER_CLIENT_V4);
    let before = side.probe_tcp(&lab, addr::OTHER_V4, 443);
    assert_eq!(
        before,
        Ok("peer=192.0.2.3".to_string()),
        "the macvlan child is not wired"
    );

    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &profile);
    let during = side.probe_tcp(&lab, addr::OTHER_V4, 443);
    assert!(
        during.is_err(),
        "a macvlan child in another namespace got out: {during:?}"
    );
    let allowed_host = side.probe_tcp(&lab, addr::HOST_V4, 443);
    assert!(
        allowed_host.is_err(),
        "a macvlan child got out in clear: {allowed_host:?}"
    );
    // Marked with the tunnel's mark (a child may set marks in its own
    // namespace; they stay on its packets through the macvlan), an echo
    // request to the endpoint: only the tunnel's own UDP may go there.
    let out = side.run(&["ping", "-c", "1", "-W", "1", "-m", "21319", addr::GATEWAY_V4]);
    assert!(
        !out.status.success(),
        "a macvlan child's marked echo request reached the endpoint: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Fragments (not first: offset 1480) go out only as the tunnel's own:
    // with its mark, to the endpoint. The child writes them whole with a
    // raw socket, to the endpoint without the mark and, marked, to another
    // host. Fragments wait for reassembly before the meter's hooks, so the
    // router counts them at its device.
    lab.exec_stdin(
        Ns::Router,
        &["nft", "-f", "-"],
        format!(
            "table netdev labfrag {{\n chain seen {{\n  type filter hook ingress device \"{}\" priority 0; policy accept;\n  \
             ip saddr 192.0.2.3 ip frag-off & 0x1fff != 0 counter\n }}\n}}\n",
            addr::ROUTER_CLIENT_IF
        )
        .as_bytes(),
    )
    .expect("count the child's fragments at the router");
    for (to, mark) in [(addr::GATEWAY_V4, "0"), (addr::OTHER_V4, "21319")] {
        let out = side.run(&["python3", "-c", FRAGMENT_SENDER, to, mark]);
        assert!(out.status.success(), "the fragment sender: {out:?}");
    }
    let fragments = lab
        .exec_ok(Ns::Router, &["nft", "list", "table", "netdev", "labfrag"])
        .expect("list the router's count");
    assert!(
        fragments.contains("counter packets 0 "),
        "a macvlan child's fragments got out: {fragments}"
    );
    lab.assert_no_leaks();
    // The session itself still works.
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );

    // A second link appears during the session, with a macvlan child.
    lab::util::run(&[
        "ip",
        "-n",
        lab.ns_name(Ns::Client),
        "link",
        "add",
        "c2n",
        "type",
        "veth",
        "peer",
        "name",
        "n2r",
        "netns",
        lab.ns_name(Ns::Router),
    ])
    .expect("add a link");
    lab.ip_batch(
        Ns::Router,
        &["addr add 192.0.2.129/26 dev n2r".into(), "link set n2r up".into()],
    )
    .expect("router side");
    lab.ip_batch(Ns::Client, &["link set c2n up".into()])
        .expect("client side");
    let late = ExtraNamespace::new(&lab, "n");
    macvlan_child(&lab, "c2n", &late, "192.0.2.131", "192.0.2.129");
    wait_until(Duration::from_secs(5), "an egress chain on the new link", || {
        lab.exec_ok(Ns::Client, &["nft", "list", "table", "netdev", "sessiongate"])
            .is_ok_and(|t| t.contains("\"c2n\""))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    let on_new_link = late.probe_tcp(&lab, addr::OTHER_V4, 443);
    assert!(
        on_new_link.is_err(),
        "a macvlan child of a new link got out: {on_new_link:?}"
    );

    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
    assert_eq!(
        lab.exec_ok(Ns::Client, &["nft", "list", "tables"])
            .expect("nft")
            .trim(),
        "",
        "a table of ours is left after stop"
    );
    assert_eq!(
        side.probe_tcp(&lab, addr::OTHER_V4, 443),
        Ok("peer=192.0.2.3".to_string())
    );
    assert_eq!(
        late.probe_tcp(&lab, addr::OTHER_V4, 443),
        Ok("peer=192.0.2.131".to_string())
    );
}

// ---------------------------------------------------------------- 13.3, at stop

/// The original-direction flows of the client's connection tracking that
/// go to `dst` (and `dport`, if given), as `conntrack -L` lines.
fn tracked_flows_to(lab: &Lab, dst: &str, dport: Option<u16>) -> Vec<String> {
    let out = lab
        .exec(Ns::Client, &["conntrack", "-L"])
        .expect("run conntrack -L (package conntrack)");
    assert!(
        out.status.success(),
        "conntrack -L: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| {
            let first = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key).map(str::to_string))
            };
            first("dst=").as_deref() == Some(dst)
                && dport.is_none_or(|p| first("dport=") == Some(p.to_string()))
        })
        .map(str::to_string)
        .collect()
}

/// After stop, connection tracking holds no flow of the session (the
/// tunnel's UDP to the endpoint, a flow through the tunnel): a stale entry
/// would let a later ruleset's `ct state established` admit what no
/// allowlist admitted.
#[test]
fn stop_leaves_no_flow_of_the_session_in_connection_tracking() {
    let lab = lab();
    let profile = write_profile(&lab, "lab", true, &allow(addr::HOST_V4, &[443], &[10000]));
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &profile);
    let flow = client_udp(&lab, false, 0);
    assert!(udp_exchange(&flow, sock(addr::HOST_V4, 10000), "tracked").is_ok());
    assert!(!tracked_flows_to(&lab, addr::HOST_V4, Some(10000)).is_empty());
    assert!(!tracked_flows_to(&lab, addr::GATEWAY_V4, Some(addr::WG_PORT)).is_empty());
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
    let left: Vec<String> = [
        tracked_flows_to(&lab, addr::HOST_V4, Some(10000)),
        tracked_flows_to(&lab, addr::GATEWAY_V4, Some(addr::WG_PORT)),
    ]
    .concat();
    assert_eq!(left, Vec::<String>::new(), "flows of the session outlive it");
}

/// A daemon that crashed mid-session leaves its flows tracked (nothing ran
/// its stop); the restarted daemon's first lockdown deletes them before its
/// tunnel starts, so no flow of the crashed session goes on into the
/// resumed one. (The lockdown's clean-up is one ctnetlink request for both
/// families; this is what it must keep doing.)
#[test]
fn a_resumed_session_starts_without_the_crashed_sessions_flows() {
    let lab = lab();
    let profile = write_profile(&lab, "lab", true, &allow(addr::HOST_V4, &[443], &[10000]));
    let mut daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &profile);
    let flow = client_udp(&lab, false, 0);
    assert!(udp_exchange(&flow, sock(addr::HOST_V4, 10000), "tracked").is_ok());
    daemon.kill9().expect("kill -9");
    wait_until(Duration::from_secs(5), "sessiond gone", || !daemon.is_running()).expect("exit");
    assert!(
        !tracked_flows_to(&lab, addr::HOST_V4, Some(10000)).is_empty(),
        "the crash should leave the session's flow tracked"
    );
    daemon.restart().expect("sessiond starts again");
    wait_until(Duration::from_secs(30), "the resumed session active", || {
        daemon.status().is_ok_and(|s| s["state"] == "active")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    assert_eq!(
        tracked_flows_to(&lab, addr::HOST_V4, Some(10000)),
        Vec::<String>::new(),
        "a flow of the crashed session went on into the resumed one"
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}

/// The clean-up at start and stop deletes the flows that carry the
/// session's conntrack mark bit, whatever other bits they carry, and no
/// other flow: another program's flows (and its mark bits) stay tracked.
#[test]
fn the_clean_up_deletes_only_flows_with_the_sessions_mark_bit() {
    let lab = lab();
    let profile = write_profile(&lab, "lab", true, &allow(addr::HOST_V4, &[443], &[10000]));
    let daemon = lab.start_sessiond().expect("start sessiond");
    // Entered by hand, as another program's: one with a mark bit of its
    // own, one that also carries ours (a flow some earlier session marked).
    let insert = |sport: &str, mark: &str| {
        lab.exec_ok(
            Ns::Client,
            &[
                "conntrack",
                "-I",
                "-p",
                "udp",
                "-s",
                "198.51.100.77",
                "-d",
                "198.51.100.78",
                "--sport",
                sport,
                "--dport",
                "4000",
                "-t",
                "300",
                "-m",
                mark,
            ],
        )
        .expect("conntrack -I");
    };
    let sports = |lab: &Lab| -> Vec<String> {
        let mut ports: Vec<String> = tracked_flows_to(lab, "198.51.100.78", Some(4000))
            .iter()
            .filter_map(|l| {
                l.split_whitespace()
                    .find(|w| w.starts_with("sport="))
                    .map(str::to_string)
            })
            .collect();
        ports.sort();
        ports
    };
    insert("4001", "0x1");
    insert("4002", "0x40000001");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &profile);
    assert_eq!(sports(&lab), ["sport=4001"], "after the start's clean-up");
    insert("4003", "0x40000000");
    daemon.ctl_ok(&["stop"]).expect("stop");
    assert_eq!(sports(&lab), ["sport=4001"], "after the stop's clean-up");
}

/// The MAC address of `ifname` in `ns`.
fn mac_of(lab: &Lab, ns: Ns, ifname: &str) -> [u8; 6] {
    let text = lab
        .exec_ok(ns, &["cat", &format!("/sys/class/net/{ifname}/address")])
        .expect("read the MAC address");
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("six bytes")
}

/// One IPv4/UDP datagram from the client's address to `dst`:`dport`,
/// sent with a packet socket on the client's link (no IP stack, so no
/// `inet` hook on the way). Returns the bytes sent.
fn send_with_packet_socket(lab: &Lab, dst: std::net::Ipv4Addr, dport: u16) -> isize {
    let ifindex = ifindex(lab, Ns::Client, addr::CLIENT_IF);
    let router_mac = mac_of(lab, Ns::Router, addr::ROUTER_CLIENT_IF);
    let src: std::net::Ipv4Addr = addr::CLIENT_V4.parse().expect("address");
    let payload = b"packet socket";
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut packet = Vec::with_capacity(total);
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&(total as u16).to_be_bytes());
    packet.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 17, 0, 0]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    let sum = packet
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(&40000u16.to_be_bytes());
    packet.extend_from_slice(&dport.to_be_bytes());
    packet.extend_from_slice(&(udp_len as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
    in_namespace(lab, Ns::Client, move || {
        let ip = (libc::ETH_P_IP as u16).to_be();
        // SAFETY: plain socket(2); the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(ip)) };
        assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ip;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&router_mac);
        // SAFETY: valid buffer and address, with their lengths.
        let sent = unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                std::ptr::from_ref(&to).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(fd) };
        sent
    })
}

/// A program with a packet socket (CAP_NET_RAW) skips every `inet` hook;
/// the link-level table still stops what it sends through the device.
#[test]
fn packet_socket_senders_are_closed_at_the_device() {
    let lab = lab();
    let profile = write_profile(&lab, "lab", true, &allow(addr::HOST_V4, &[443], &[]));
    let other: std::net::Ipv4Addr = addr::OTHER_V4.parse().expect("address");
    // The sender works and the meter sees it, before a session.
    lab.reset_leaks().expect("reset");
    assert!(send_with_packet_socket(&lab, other, 10000) > 0);
    wait_until(Duration::from_secs(5), "the meter sees the raw datagram", || {
        lab.leaks().is_ok_and(|n| n > 0)
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", lab.leak_report()));

    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");
    follow(&lab, &profile);
    let sent = send_with_packet_socket(&lab, other, 10000);
    // Dropped at the device: the send may report it or not.
    println!("packet socket send during the session returned {sent}");
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::HOST_V4, 443),
        Ok(format!("peer={}", addr::GATEWAY_V4))
    );
    lab.assert_no_leaks();
    daemon.ctl_ok(&["stop"]).expect("stop");
}
