//! The DNS stub (`sessiond::dns`) against a real resolver: dnsmasq, in
//! network namespaces, with the firewall's redirect shape in front of it.
//! Run as root: `cargo test -p lab --test dns_stub` (needs dnsmasq, nft,
//! ip).
//!
//! The outer test builds two namespaces joined by a veth pair, never
//! touching the host's: "server" runs dnsmasq on 192.0.2.65, "client" gets
//! the firewall's redirect shape (every DNS packet not carrying the stub's
//! mark goes to the stub on 5354) plus counters, then runs the inner test
//! (this binary again, `lab_inside_namespace`) inside "client". It lived in
//! the library's unit tests until they became pure (no root, no
//! namespaces).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use sessiond::dns::{canonical_name, Addresses, AnswerSink, StubConfig, StubResolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

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
    fn on_answer<'a>(
        &'a self,
        name: &'a str,
        addrs: Addresses,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
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
    // Any id will do: each reply is checked against its own query's.
    static NEXT_ID: AtomicU16 = AtomicU16::new(1);
    let mut name = Name::from_ascii(name).expect("name");
    name.set_fqdn(true);
    let mut m = Message::new(
        NEXT_ID.fetch_add(1, Ordering::Relaxed),
        MessageType::Query,
        OpCode::Query,
    );
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name, qtype));
    m
}

/// One datagram out, the first one back (None after 5 s).
async fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await.expect("bind");
    socket.connect(server).await.expect("connect");
    socket.send(bytes).await.expect("send");
    let mut buf = vec![0u8; 65_535];
    match timeout(Duration::from_secs(5), socket.recv(&mut buf)).await {
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

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

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
        .args(["--exact", "lab_inside_namespace", "--ignored", "--nocapture"])
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
    assert!(!seen.contains("alias.test") && !seen.contains("other.test") && !seen.contains("secret.test"));

    // alias.test allowed: its CNAME leads to meet.test, which is then
    // answered under alias.test's name.
    stub.set_allowed_names(vec!["alias.test".into()]);
    let reply = ask_udp(elsewhere, "alias.test", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(reply
        .answers
        .iter()
        .any(|r| matches!(&r.data, RData::CNAME(c) if canonical_name(&c.0.to_string()).as_deref() == Some("meet.test"))));
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
