//! Unit tests of the stub, against a fake upstream on loopback (no
//! namespaces, no root); the one against dnsmasq in network namespaces is
//! in the lab (`tests/tests/dns_stub.rs`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::names::{canonical_name, digest, name_key, Names};
use super::upstream::{random_id, set_mark};
use super::users::{proc_socket_addr, uid_in_proc_net_tcp, UserSlot};

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

async fn stub(upstream: Vec<SocketAddr>, names: &[&str], sink: Arc<Recorder>) -> (StubResolver, SocketAddr) {
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
