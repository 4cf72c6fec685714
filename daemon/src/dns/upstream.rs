//! Upstream forwarding: the pinned servers, asked in order over UDP (TCP
//! when truncated) from sockets that carry the stub's mark, within one
//! time budget; and resolving the allowed names at session start.
//!
//! It never chooses a server outside the configured list, never sends a
//! socket without the mark (unless the mark is 0, in tests), and never
//! accepts an answer that does not match its query's id and question.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::time::Instant;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use rand_core::{OsRng, RngCore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};
use tokio::time::timeout;

use super::answer::Transport;
use super::listen::plain;
use super::names::{add_address, digest};
use super::{Addresses, DnsError, Inner, EDNS_PAYLOAD, HOOK_TIMEOUT, UPSTREAM_TIMEOUT, UPSTREAM_UDP_BUFFER};

#[derive(Debug)]
pub(super) enum UpstreamError {
    Timeout,
    Io(String),
}

impl Inner {
    /// Asks the pinned servers in order within [`UPSTREAM_TIMEOUT`]; a server
    /// failing, timing out, or answering SERVFAIL/REFUSED passes the question
    /// to the next. Returns the raw answer and its parse.
    pub(super) async fn exchange(
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
    pub(super) async fn resolve_name(&self, name: &str) -> Result<Addresses, DnsError> {
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
pub(super) fn upstream_query(question: &Query, rd: bool, cd: bool, edns: Option<(u16, bool)>) -> Message {
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

pub(super) fn random_id() -> u16 {
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

pub(super) fn set_mark<F: AsFd>(socket: &F, mark: u32) -> io::Result<()> {
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
