//! The tunnel's outer transport when a network blocks UDP: WireGuard's
//! datagrams carried over one TCP connection to a relay beside the gateway
//! (port 443 by convention), with Mullvad's udp-over-tcp framing (each
//! datagram behind its 16-bit length), the relay unwrapping them into
//! UDP for the gateway.
//!
//! The packet task keeps its UDP socket and sends to this forwarder's
//! local socket on the loopback instead of to the gateway; the forwarder
//! moves each datagram into the TCP stream and back. The TCP socket
//! carries the tunnel's fwmark, so routing and the firewall treat it as
//! the tunnel's own flow (the lockdown admits exactly that flow: marked TCP
//! to the relay's address and port).
//!
//! Owns: the forwarder task, its local UDP socket and the TCP connection.
//! Never: look a name up (the relay is an address), take datagrams from
//! anyone but the tunnel's own socket (the local socket is connected to
//! it, so the kernel drops everything else), or decide when the tunnel
//! uses TCP (the session machine does).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The pause before connecting again after the connection closed or a
/// connect failed: the tunnel's own timers retry handshakes every 5 s, so
/// a faster loop would only knock on a relay that refuses.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// Silence on the TCP connection after which it counts as dead and is
/// replaced: longer than the tunnel's own probe interval (it sends a
/// handshake after 15 s without hearing the peer, and the peer answers),
/// so a live connection never reaches it.
const TCP_SILENCE: Duration = Duration::from_secs(30);
/// How long a connect may take before it is tried again (a dropped SYN
/// would otherwise wait out the kernel's two minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which way the tunnel's encrypted datagrams travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OuterTransport {
    /// Straight to the gateway's UDP port.
    Udp,
    /// Over TCP to a relay at this address.
    Tcp { relay: SocketAddr },
}

/// The running forwarder. Dropping it ends the task and closes both
/// sockets.
pub struct TcpForwarder {
    local: SocketAddr,
    relay: SocketAddr,
    reconnect: Arc<Notify>,
    task: JoinHandle<()>,
}

impl TcpForwarder {
    /// Binds the local socket on the loopback of the tunnel socket's
    /// family, connected to the tunnel socket's port `tunnel_port`, and
    /// starts connecting to `relay` with `fwmark` on the TCP socket.
    pub fn start(
        relay: SocketAddr,
        fwmark: u32,
        tunnel_ip_is_v6: bool,
        tunnel_port: u16,
    ) -> std::io::Result<TcpForwarder> {
        let loopback: IpAddr = if tunnel_ip_is_v6 {
            Ipv6Addr::LOCALHOST.into()
        } else {
            Ipv4Addr::LOCALHOST.into()
        };
        let socket = std::net::UdpSocket::bind(SocketAddr::new(loopback, 0))?;
        socket.connect(SocketAddr::new(loopback, tunnel_port))?;
        socket.set_nonblocking(true)?;
        let udp = Arc::new(UdpSocket::from_std(socket)?);
        let local = udp.local_addr()?;
        let reconnect = Arc::new(Notify::new());
        let task = tokio::spawn(forward(udp, relay, fwmark, reconnect.clone()));
        Ok(TcpForwarder {
            local,
            relay,
            reconnect,
            task,
        })
    }

    /// Where the tunnel sends its datagrams (and hears the gateway from).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// Drops the current connection and connects again (the way out
    /// changed: the old connection is bound to an address that is gone).
    pub fn reconnect(&self) {
        self.reconnect.notify_one();
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The local socket, shared between connections (one lives at a time).
struct Local(Arc<UdpSocket>);

impl udp_over_tcp::DatagramSocket for Local {
    fn send(&self, buf: &[u8]) -> impl std::future::Future<Output = std::io::Result<usize>> + Send {
        self.0.send(buf)
    }

    fn recv(&self, buf: &mut [u8]) -> impl std::future::Future<Output = std::io::Result<usize>> + Send {
        self.0.recv(buf)
    }
}

async fn forward(udp: Arc<UdpSocket>, relay: SocketAddr, fwmark: u32, reconnect: Arc<Notify>) {
    let mut connections = 0u64;
    loop {
        match connect(relay, fwmark).await {
            Ok(stream) => {
                connections += 1;
                let count = connections;
                tracing::info!("the tunnel is connected to the TCP relay {relay} (connection {count})");
                tokio::select! {
                    _ = udp_over_tcp::process_udp_over_tcp(Local(udp.clone()), stream, Some(TCP_SILENCE)) => {
                        tracing::info!("the TCP connection to the relay {relay} ended; connecting again");
                    }
                    _ = reconnect.notified() => {
                        tracing::info!("the way out changed; connecting to the TCP relay {relay} again");
                        continue;
                    }
                }
            }
            Err(e) => tracing::debug!("could not connect to the TCP relay {relay}: {e}"),
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// A TCP connection to the relay, marked as the tunnel's own and without
/// Nagle's delay (every datagram is a packet of a call: it must leave now).
async fn connect(relay: SocketAddr, fwmark: u32) -> std::io::Result<TcpStream> {
    let socket = match relay {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &fwmark)
        .map_err(std::io::Error::from)?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(relay))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
