//! Listening: the stub's UDP and TCP sockets on 127.0.0.1 and ::1, one
//! port, and the tasks that serve them within the limits (queries in
//! flight, TCP connections in all and per user, idle time).
//!
//! It never listens beyond loopback and never answers a message itself
//! (that is `answer`'s job); what it cannot serve it drops or closes.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::answer::Transport;
use super::users::{client_uid, UserSlot};
use super::{Counters, DnsError, Inner, TCP_IDLE, TCP_MAX_QUERIES, UPSTREAM_TIMEOUT};

pub(super) enum Listener {
    Udp(UdpSocket),
    Tcp(TcpListener),
}

/// A plain sentence for an I/O error ("Address already in use").
pub(super) fn plain(e: &io::Error) -> String {
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
pub(super) fn bind_listeners(port: u16) -> Result<(u16, Vec<Listener>), DnsError> {
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

pub(super) async fn serve_udp(
    inner: Arc<Inner>,
    socket: Arc<UdpSocket>,
    mut shutdown: watch::Receiver<bool>,
) {
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

pub(super) async fn serve_tcp(inner: Arc<Inner>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
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
