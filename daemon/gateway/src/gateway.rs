//! The gateway's packets: one TUN device, one UDP socket, one boringtun
//! `Tunn` per client, driven by a single tokio task; in cover mode one
//! envelope thread per client (sessiond::shape::CoverSender).
//!
//! Owns the clients' WireGuard sessions, their endpoints (learned from
//! their authentic packets, so a roaming client is followed) and the
//! shaping of what goes back to them. Never touches routes, forwarding,
//! NAT or the firewall: the kernel forwards between the TUN device and the
//! practice's network, as it would for wg.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use sessiond::shape::{self, CoverSender, TrafficShape};
use tokio::net::UdpSocket;

use crate::config::{Config, Prefix};

/// How often boringtun's timers run (it asks for about every 250 ms).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How often the cover envelopes' decoy reserves are topped up: a tenth of
/// the reserve's 256 ms, so the envelope never waits for one.
const DECOY_TICK: Duration = Duration::from_millis(20);
/// A client not heard for this long (WireGuard's KEEPALIVE_TIMEOUT +
/// REKEY_TIMEOUT) has gone (its session stopped, or it lost its network):
/// its envelope stops instead of sending a call's worth of decoys into the
/// void. A client in cover mode sends 500 packets a second, so a live one
/// is never this quiet.
const COVER_IDLE: Duration = Duration::from_secs(15);
/// Handshakes per second before boringtun answers with cookies instead
/// (what boringtun's own device uses).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Largest datagram or packet handled.
const MAX_PACKET: usize = 65_535;
/// WireGuard's overhead on a data packet, and a handshake's size.
const WG_OVERHEAD: usize = 32;
const WG_MIN_BUFFER: usize = 148;

/// One client.
struct Peer {
    /// For logs: the start of the base64 public key.
    name: String,
    public_key: [u8; 32],
    tunn: Tunn,
    allowed_ips: Vec<Prefix>,
    shape: TrafficShape,
    /// Where its last authentic datagram came from.
    endpoint: Option<SocketAddr>,
    last_heard: Option<Instant>,
    /// The running envelope (cover mode, while the client is there).
    cover: Option<CoverSender>,
}

pub struct Gateway {
    device: tun_rs::AsyncDevice,
    udp: UdpSocket,
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    peers: Vec<Peer>,
    mtu: usize,
    /// Room for one encrypted packet or handshake.
    wire_len: usize,
}

impl Gateway {
    /// Creates the TUN device (with its addresses, up) and the socket.
    pub fn start(config: Config) -> Result<Gateway> {
        let mut builder = tun_rs::DeviceBuilder::new()
            .name(config.interface.clone())
            .mtu(config.mtu);
        for prefix in &config.address {
            builder = match prefix.addr {
                IpAddr::V4(a) => builder.ipv4(a, prefix.len, None),
                IpAddr::V6(a) => builder.ipv6(a, prefix.len),
            };
        }
        let device = builder
            .build_async()
            .with_context(|| format!("could not create the tunnel interface {}", config.interface))?;
        let udp = bind(config.listen_port)?;
        let secret = StaticSecret::from(*config.private_key.as_bytes());
        let public = PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        let peers = config
            .peers
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let name: String = p.public_key.to_base64().chars().take(8).collect();
                let tunn = Tunn::new(
                    secret.clone(),
                    PublicKey::from(*p.public_key.as_bytes()),
                    p.preshared_key.as_ref().map(|k| *k.as_bytes()),
                    None,
                    // boringtun puts this index in the top 24 bits of every
                    // session index, which is how replies find their peer.
                    (i + 1) as u32,
                    Some(limiter.clone()),
                );
                Peer {
                    name,
                    public_key: *p.public_key.as_bytes(),
                    tunn,
                    allowed_ips: p.allowed_ips,
                    shape: p.shape,
                    endpoint: None,
                    last_heard: None,
                    cover: None,
                }
            })
            .collect();
        let mtu = usize::from(config.mtu);
        Ok(Gateway {
            device,
            udp,
            secret,
            public,
            limiter,
            peers,
            mtu,
            wire_len: (mtu + WG_OVERHEAD + 16).max(WG_MIN_BUFFER),
        })
    }

    /// Moves packets until the device fails (it was deleted).
    pub async fn run(mut self) -> Result<()> {
        let mut from_tun = vec![0u8; MAX_PACKET];
        let mut from_net = vec![0u8; MAX_PACKET];
        let mut plain = vec![0u8; MAX_PACKET];
        let mut wire = vec![0u8; self.wire_len.max(MAX_PACKET + WG_OVERHEAD)];
        let mut timers = tokio::time::interval(TIMER_TICK);
        let mut decoys = tokio::time::interval(DECOY_TICK);
        decoys.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut limiter_reset = Instant::now();
        loop {
            tokio::select! {
                read = self.device.recv(&mut from_tun) => match read {
                    Ok(len) => self.outbound(&mut from_tun, len, &mut wire).await,
                    Err(e) if is_device_gone(&e) => {
                        return Err(e).context("the tunnel interface went away");
                    }
                    Err(e) => tracing::debug!("dropped a packet from the tunnel interface: {e}"),
                },
                received = self.udp.recv_from(&mut from_net) => match received {
                    Ok((len, from)) => self.inbound(&from_net[..len], from, &mut plain).await,
                    Err(e) => tracing::debug!("receiving from the network failed: {e}"),
                },
                _ = timers.tick() => {
                    if limiter_reset.elapsed() >= Duration::from_secs(1) {
                        self.limiter.reset_count();
                        limiter_reset = Instant::now();
                    }
                    self.on_timers(&mut wire).await;
                }
                _ = decoys.tick() => self.top_up_decoys().await,
            }
        }
    }

    /// A packet from the practice's network for a client: to the peer whose
    /// allowed IPs hold its destination (the longest prefix), padded for
    /// that peer's shape, encrypted, and sent or queued for its envelope.
    async fn outbound(&mut self, packet: &mut [u8], len: usize, wire: &mut [u8]) {
        let Some(dst) = Tunn::dst_address(&packet[..len]) else {
            return;
        };
        let Some(i) = longest_match(self.peers.iter().map(|p| &p.allowed_ips[..]), dst) else {
            tracing::debug!("no client has the address {dst}; dropped a packet");
            return;
        };
        let peer = &mut self.peers[i];
        let Some(endpoint) = peer.endpoint else {
            // Never heard from: nowhere to send it.
            return;
        };
        let padded = shape::pad_in_place(packet, len, peer.shape, self.mtu);
        if let Some(cover) = &peer.cover {
            // Room for the datagram even if the device handed over more
            // than the MTU (boringtun panics on a short buffer).
            let mut buf = cover.buffer((padded + WG_OVERHEAD).max(self.wire_len));
            let (kind, size) = match peer.tunn.encapsulate(&packet[..padded], &mut buf) {
                TunnResult::WriteToNetwork(d) => (d.first().copied(), d.len()),
                TunnResult::Err(e) => {
                    tracing::debug!("could not encrypt a packet for {}: {e:?}", peer.name);
                    return;
                }
                _ => return,
            };
            buf.truncate(size);
            if kind == Some(4) {
                cover.push_real(buf);
            } else {
                // A handshake instead (no session): handshakes are not shaped.
                send(&self.udp, endpoint, &buf).await;
            }
            return;
        }
        match peer.tunn.encapsulate(&packet[..padded], wire) {
            TunnResult::WriteToNetwork(d) => send(&self.udp, endpoint, d).await,
            TunnResult::Err(e) => tracing::debug!("could not encrypt a packet for {}: {e:?}", peer.name),
            _ => {}
        }
    }

    /// A datagram from the network: finds its peer (a handshake by the
    /// public key inside it, everything else by the session index), lets
    /// that peer's `Tunn` answer it, and writes what it carried to the
    /// device if its source address is the peer's own.
    async fn inbound(&mut self, datagram: &[u8], from: SocketAddr, plain: &mut [u8]) {
        let mut cookie = [0u8; 64];
        let packet = match self.limiter.verify_packet(Some(from.ip()), datagram, &mut cookie) {
            Ok(packet) => packet,
            Err(TunnResult::WriteToNetwork(reply)) => {
                // Under load: make the sender prove its address first.
                send(&self.udp, from, reply).await;
                return;
            }
            Err(_) => return,
        };
        let index = match packet {
            Packet::HandshakeInit(init) => match parse_handshake_anon(&self.secret, &self.public, &init) {
                Ok(half) => self
                    .peers
                    .iter()
                    .position(|p| p.public_key == half.peer_static_public),
                Err(_) => None,
            },
            Packet::HandshakeResponse(p) => peer_by_index(p.receiver_idx, self.peers.len()),
            Packet::PacketCookieReply(p) => peer_by_index(p.receiver_idx, self.peers.len()),
            Packet::PacketData(p) => peer_by_index(p.receiver_idx, self.peers.len()),
        };
        let Some(index) = index else {
            return;
        };
        let peer = &mut self.peers[index];
        let mut result = peer.tunn.decapsulate(Some(from.ip()), datagram, plain);
        let mut authentic = false;
        loop {
            match result {
                TunnResult::WriteToNetwork(reply) => {
                    authentic = true;
                    send(&self.udp, from, reply).await;
                    // Packets queued while the handshake ran.
                    result = peer.tunn.decapsulate(None, &[], plain);
                }
                TunnResult::WriteToTunnelV4(packet, src) => {
                    authentic = true;
                    forward(&self.device, peer, packet, IpAddr::V4(src)).await;
                    break;
                }
                TunnResult::WriteToTunnelV6(packet, src) => {
                    authentic = true;
                    forward(&self.device, peer, packet, IpAddr::V6(src)).await;
                    break;
                }
                TunnResult::Done => {
                    authentic = true;
                    break;
                }
                TunnResult::Err(e) if shape::is_authentic_decoy(datagram, &e) => {
                    authentic = true;
                    break;
                }
                TunnResult::Err(e) => {
                    tracing::debug!("dropped a datagram for {} from {from}: {e:?}", peer.name);
                    break;
                }
            }
        }
        if authentic {
            peer.last_heard = Some(Instant::now());
            if peer.endpoint != Some(from) {
                tracing::info!(
                    "client {} is at {}",
                    peer.name,
                    SocketAddr::new(from.ip().to_canonical(), from.port())
                );
                peer.endpoint = Some(from);
                if let Some(cover) = &peer.cover {
                    cover.set_endpoint(from);
                }
            }
        }
    }

    /// boringtun's timers for every client, and each envelope's life: it
    /// runs while a cover-mode client has a session and was heard lately.
    async fn on_timers(&mut self, wire: &mut [u8]) {
        for peer in &mut self.peers {
            match peer.tunn.update_timers(wire) {
                // A keepalive (an empty data packet) would stand out of the
                // envelope by its size; the decoys keep the client's timers
                // alive instead.
                TunnResult::WriteToNetwork(d) if peer.cover.is_some() && d.first() == Some(&4) => {}
                TunnResult::WriteToNetwork(d) => {
                    if let Some(endpoint) = peer.endpoint {
                        send(&self.udp, endpoint, d).await;
                    }
                }
                // The client starts over when it wants the tunnel back.
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => tracing::debug!("timers of {}: {e:?}", peer.name),
                _ => {}
            }
            let wanted = peer.shape == TrafficShape::Cover
                && peer.tunn.time_since_last_handshake().is_some()
                && peer.last_heard.is_some_and(|t| t.elapsed() < COVER_IDLE);
            match (wanted, &peer.cover, peer.endpoint) {
                (true, None, Some(endpoint)) => match udp_clone(&self.udp) {
                    Ok(socket) => match CoverSender::start(socket, endpoint, self.mtu) {
                        Ok(cover) => {
                            tracing::info!("cover envelope for client {} started", peer.name);
                            peer.cover = Some(cover);
                        }
                        Err(e) => tracing::warn!("could not start the cover envelope for {}: {e}", peer.name),
                    },
                    Err(e) => tracing::warn!("could not start the cover envelope for {}: {e}", peer.name),
                },
                (false, Some(_), _) => {
                    peer.cover = None;
                    tracing::info!(
                        "cover envelope for client {} stopped (no session, or silent)",
                        peer.name
                    );
                }
                (_, Some(cover), _) => {
                    let shared = cover.shared();
                    let dropped = shared.dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
                    let missed = shared.missed.swap(0, std::sync::atomic::Ordering::Relaxed);
                    if dropped + missed > 0 {
                        tracing::debug!(
                            "cover envelope for {}: {dropped} packet(s) dropped on a full queue, {missed} slot(s) left empty",
                            peer.name
                        );
                    }
                }
                _ => {}
            }
        }
    }

    /// Encrypts decoys into every running envelope's reserve.
    async fn top_up_decoys(&mut self) {
        for peer in &mut self.peers {
            let Peer {
                tunn,
                cover: Some(cover),
                endpoint: Some(endpoint),
                ..
            } = peer
            else {
                continue;
            };
            for _ in 0..cover.decoys_wanted() {
                let mut buf = cover.buffer(self.wire_len);
                let len = match tunn.encapsulate(cover.decoy_plaintext(), &mut buf) {
                    TunnResult::WriteToNetwork(d) if d.first() == Some(&4) => d.len(),
                    TunnResult::WriteToNetwork(handshake) => {
                        // The session expired: a new one first.
                        send(&self.udp, *endpoint, handshake).await;
                        break;
                    }
                    _ => break,
                };
                buf.truncate(len);
                cover.push_decoy(buf);
            }
        }
    }
}

/// A second descriptor of the socket for an envelope's sender thread.
fn udp_clone(udp: &UdpSocket) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsFd;
    Ok(std::net::UdpSocket::from(udp.as_fd().try_clone_to_owned()?))
}

/// Which of the peers' allowed-IP lists holds `dst` most specifically.
fn longest_match<'a>(lists: impl Iterator<Item = &'a [Prefix]>, dst: IpAddr) -> Option<usize> {
    lists
        .enumerate()
        .flat_map(|(i, list)| list.iter().map(move |a| (i, a)))
        .filter(|(_, a)| a.contains(dst))
        .max_by_key(|(_, a)| a.len)
        .map(|(i, _)| i)
}

/// The peer a session index belongs to (see `Tunn::new`'s index).
fn peer_by_index(receiver_index: u32, peers: usize) -> Option<usize> {
    let i = (receiver_index >> 8) as usize;
    (1..=peers).contains(&i).then(|| i - 1)
}

/// Writes a decrypted packet to the device if its source is one of the
/// peer's addresses (WireGuard's cryptokey routing: a client cannot send
/// as another).
async fn forward(device: &tun_rs::AsyncDevice, peer: &Peer, packet: &[u8], src: IpAddr) {
    if !peer.allowed_ips.iter().any(|a| a.contains(src)) {
        tracing::debug!(
            "dropped a packet from {} with a source outside its allowed_ips",
            peer.name
        );
        return;
    }
    if let Err(e) = device.send(packet).await {
        tracing::debug!("writing to the tunnel interface failed: {e}");
    }
}

async fn send(udp: &UdpSocket, to: SocketAddr, datagram: &[u8]) {
    if let Err(e) = udp.send_to(datagram, to).await {
        tracing::debug!("sending to {to} failed: {e}");
    }
}

/// The listening socket: IPv6 and IPv4 on one socket where the system has
/// IPv6, IPv4 alone otherwise.
fn bind(port: u16) -> Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, port))
        .or_else(|_| std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, port)))
        .with_context(|| format!("could not listen on UDP port {port}"))?;
    socket
        .set_nonblocking(true)
        .context("could not set up the UDP socket")?;
    UdpSocket::from_std(socket).context("could not set up the UDP socket")
}

/// Errors after which the TUN device cannot be used again.
fn is_device_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EBADFD | libc::ENODEV | libc::EIO)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packet_goes_to_the_most_specific_peer() {
        let p = |t: &str| Prefix::parse(t).expect("prefix");
        let lists = [
            vec![p("192.0.2.64/26")],
            vec![p("192.0.2.66/32"), p("2001:db8:66::2/128")],
        ];
        let find = |ip: &str| longest_match(lists.iter().map(|l| &l[..]), ip.parse().expect("ip"));
        assert_eq!(find("192.0.2.66"), Some(1));
        assert_eq!(find("192.0.2.67"), Some(0));
        assert_eq!(find("2001:db8:66::2"), Some(1));
        assert_eq!(find("203.0.113.10"), None);
    }

    #[test]
    fn session_indices_find_their_peer() {
        assert_eq!(peer_by_index(1 << 8, 2), Some(0));
        assert_eq!(peer_by_index((2 << 8) | 0x17, 2), Some(1));
        assert_eq!(peer_by_index(3 << 8, 2), None);
        assert_eq!(peer_by_index(0x17, 2), None);
    }
}
