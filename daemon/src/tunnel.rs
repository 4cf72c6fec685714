//! The WireGuard tunnel: a TUN device, one UDP socket and boringtun's `Tunn`
//! state machine, driven by a single tokio task.
//!
//! This module owns the tunnel's packets, its timers and its view of the
//! peer's health. It never decides *when* a tunnel exists (the session state
//! machine does) and never touches addresses, routes or the firewall.
//!
//! The WireGuard implementation stays behind [`Tunnel`]: start, wait for a
//! handshake, read stats, stop. Swapping boringtun for something else changes
//! this file only.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::keys::Key;

/// How often boringtun's timers run (it asks for about every 250 ms).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// WireGuard's REKEY_TIMEOUT: the pause between handshake attempts.
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// WireGuard's REJECT_AFTER_TIME: session keys older than this are useless.
pub const REJECT_AFTER: Duration = Duration::from_secs(180);
/// Silence from the peer after which we probe it with a fresh handshake
/// (WireGuard's KEEPALIVE_TIMEOUT + REKEY_TIMEOUT). A peer only answers
/// handshakes and data, never bare keepalives, so a handshake is the probe
/// that proves it is alive even on an idle tunnel.
const PROBE_AFTER: Duration = Duration::from_secs(15);
/// Silence after which the peer counts as unreachable: the probe and two
/// retries went unanswered.
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(25);
/// How soon an initiation the network refused is tried again.
const UNSENT_RETRY: Duration = Duration::from_secs(1);
/// Largest IP packet we handle; buffers are sized once from it.
const MAX_PACKET: usize = 65_535;
/// WireGuard's overhead on a data packet, and the size of a handshake.
const WG_OVERHEAD: usize = 32;
const WG_MIN_BUFFER: usize = 148;

/// What the tunnel needs to run. Addresses and routes are the routing
/// module's business.
pub struct TunnelConfig {
    pub interface: String,
    pub private_key: Key,
    pub peer_public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: SocketAddr,
    pub persistent_keepalive: Option<u16>,
    pub mtu: u16,
    /// Marks the tunnel's own UDP packets so routing and the firewall can
    /// send them to the endpoint outside the tunnel.
    pub fwmark: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("could not create the tunnel interface {interface}: {reason}")]
    CreateInterface { interface: String, reason: String },
    #[error("could not open the tunnel's UDP socket: {0}")]
    Socket(String),
}

/// A snapshot of the tunnel for `status` and for the health check.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TunnelStats {
    pub interface: String,
    pub endpoint: String,
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Whether the peer answered recently enough and the session keys are
    /// still valid.
    pub peer_reachable: bool,
}

/// Counters the packet task updates and `status` reads, without a lock.
struct Shared {
    /// Plaintext bytes received from and sent to the peer.
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    /// When the peer was last heard, in milliseconds since `started`.
    last_rx_ms: AtomicU64,
    started: Instant,
}

impl Shared {
    fn mark_heard(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_rx_ms.store(ms, Ordering::Relaxed);
    }
}

/// A running tunnel. Dropping it without [`Tunnel::stop`] also ends the
/// packet task (the interface disappears with its file descriptor).
pub struct Tunnel {
    monitor: TunnelMonitor,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A read-only view of a running tunnel, cheap to clone, for status and the
/// health check.
#[derive(Clone)]
pub struct TunnelMonitor {
    interface: String,
    endpoint: SocketAddr,
    shared: Arc<Shared>,
    handshake: watch::Receiver<Option<Instant>>,
}

impl Tunnel {
    /// Creates the TUN device and the socket and starts the packet task,
    /// which sends the first handshake initiation at once.
    pub async fn start(config: TunnelConfig) -> Result<Tunnel, TunnelError> {
        let device = tun_rs::DeviceBuilder::new()
            .name(config.interface.clone())
            .mtu(config.mtu)
            .build_async()
            .map_err(|e| TunnelError::CreateInterface {
                interface: config.interface.clone(),
                reason: crate::profile::io_reason(&e),
            })?;
        let udp = bind_marked_socket(config.endpoint, config.fwmark)
            .map_err(|e| TunnelError::Socket(crate::profile::io_reason(&e)))?;

        let secret = StaticSecret::from(*config.private_key.as_bytes());
        let peer = PublicKey::from(*config.peer_public_key.as_bytes());
        let psk = config.preshared_key.as_ref().map(|k| *k.as_bytes());
        let tunn = Tunn::new(secret, peer, psk, config.persistent_keepalive, rand_index(), None);

        let shared = Arc::new(Shared {
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            last_rx_ms: AtomicU64::new(0),
            started: Instant::now(),
        });
        let (handshake_tx, handshake_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = oneshot::channel();
        let driver = Driver {
            tunn,
            device,
            udp,
            endpoint: config.endpoint,
            shared: shared.clone(),
            handshake: handshake_tx,
            last_rx: Instant::now(),
            last_initiation: None,
            initiation_unsent: false,
        };
        let task = tokio::spawn(driver.run(stop_rx));
        Ok(Tunnel {
            monitor: TunnelMonitor {
                interface: config.interface,
                endpoint: config.endpoint,
                shared,
                handshake: handshake_rx,
            },
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    pub fn monitor(&self) -> TunnelMonitor {
        self.monitor.clone()
    }

    /// Stops the packet task and waits for it, which closes the TUN device
    /// and so removes the interface.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl TunnelMonitor {
    /// Waits until a handshake has completed, or `timeout` passes. Returns
    /// whether it completed.
    pub async fn wait_for_handshake(&self, timeout: Duration) -> bool {
        let mut rx = self.handshake.clone();
        tokio::time::timeout(timeout, rx.wait_for(|h| h.is_some()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn stats(&self) -> TunnelStats {
        let now = Instant::now();
        let last_handshake = *self.handshake.borrow();
        let rx_bytes = self.shared.rx_bytes.load(Ordering::Relaxed);
        let tx_bytes = self.shared.tx_bytes.load(Ordering::Relaxed);
        let last_rx =
            self.shared.started + Duration::from_millis(self.shared.last_rx_ms.load(Ordering::Relaxed));
        let keys_valid = last_handshake.is_some_and(|h| now.duration_since(h) < REJECT_AFTER);
        let heard_lately = now.saturating_duration_since(last_rx) < UNREACHABLE_AFTER;
        TunnelStats {
            interface: self.interface.clone(),
            endpoint: self.endpoint.to_string(),
            last_handshake_secs: last_handshake.map(|h| now.duration_since(h).as_secs()),
            rx_bytes,
            tx_bytes,
            peer_reachable: keys_valid && heard_lately,
        }
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn rand_index() -> u32 {
    use rand_core::RngCore;
    rand_core::OsRng.next_u32() >> 8
}

/// An unconnected UDP socket carrying `fwmark`, so its packets take the
/// normal route to the endpoint instead of looping into the tunnel.
fn bind_marked_socket(endpoint: SocketAddr, fwmark: u32) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = match endpoint.ip() {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &fwmark)
        .map_err(std::io::Error::from)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// The packet task's state. It owns `Tunn`, so no lock sits on the data path.
struct Driver {
    tunn: Tunn,
    device: tun_rs::AsyncDevice,
    udp: UdpSocket,
    endpoint: SocketAddr,
    shared: Arc<Shared>,
    handshake: watch::Sender<Option<Instant>>,
    last_rx: Instant,
    last_initiation: Option<Instant>,
    /// The last initiation never left (no route).
    initiation_unsent: bool,
}

/// Buffers allocated once per tunnel and reused for every packet.
struct Buffers {
    from_tun: Vec<u8>,
    to_net: Vec<u8>,
    from_net: Vec<u8>,
    to_tun: Vec<u8>,
    timer: Vec<u8>,
}

impl Buffers {
    fn new() -> Buffers {
        let wire = (MAX_PACKET + WG_OVERHEAD).max(WG_MIN_BUFFER);
        Buffers {
            from_tun: vec![0; MAX_PACKET],
            to_net: vec![0; wire],
            from_net: vec![0; wire],
            to_tun: vec![0; wire],
            timer: vec![0; wire],
        }
    }
}

impl Driver {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut buf = Buffers::new();
        let mut timer = tokio::time::interval(TIMER_TICK);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.send_initiation(&mut buf.timer).await;
        loop {
            tokio::select! {
                _ = &mut stop => break,
                read = self.device.recv(&mut buf.from_tun) => match read {
                    Ok(n) => self.outbound(&buf.from_tun[..n], &mut buf.to_net).await,
                    Err(e) => {
                        tracing::error!("reading from the tunnel interface failed: {e}; the tunnel stops");
                        break;
                    }
                },
                received = self.udp.recv_from(&mut buf.from_net) => match received {
                    Ok((n, from)) => self.inbound(from, &buf.from_net[..n], &mut buf.to_tun).await,
                    Err(e) => tracing::debug!("receiving from the endpoint failed: {e}"),
                },
                _ = timer.tick() => self.on_timer(&mut buf.timer).await,
            }
        }
    }

    /// A packet from an application, to be encrypted for the peer.
    async fn outbound(&mut self, packet: &[u8], dst: &mut [u8]) {
        match self.tunn.encapsulate(packet, dst) {
            TunnResult::WriteToNetwork(datagram) => {
                // Without a session boringtun queues the packet and hands us a
                // handshake instead (type 1); only data (type 4) counts.
                if datagram.first() == Some(&4) {
                    self.shared
                        .tx_bytes
                        .fetch_add(packet.len() as u64, Ordering::Relaxed);
                }
                self.send(datagram).await
            }
            TunnResult::Err(e) => tracing::debug!("could not encrypt a packet: {e:?}"),
            _ => {}
        }
    }

    /// A datagram from the network. Only the configured endpoint is heard.
    async fn inbound(&mut self, from: SocketAddr, datagram: &[u8], dst: &mut [u8]) {
        if from != self.endpoint {
            return;
        }
        let mut result = self.tunn.decapsulate(Some(from.ip()), datagram, dst);
        let mut authenticated = true;
        loop {
            match result {
                TunnResult::WriteToNetwork(reply) => {
                    send_datagram(&self.udp, self.endpoint, reply).await;
                    // Flush packets that were queued while the handshake ran.
                    result = self.tunn.decapsulate(None, &[], dst);
                }
                TunnResult::WriteToTunnelV4(packet, _) | TunnResult::WriteToTunnelV6(packet, _) => {
                    self.shared
                        .rx_bytes
                        .fetch_add(packet.len() as u64, Ordering::Relaxed);
                    if let Err(e) = self.device.send(packet).await {
                        tracing::debug!("writing to the tunnel interface failed: {e}");
                    }
                    break;
                }
                TunnResult::Done => break,
                TunnResult::Err(e) => {
                    tracing::debug!("dropped a datagram from the endpoint: {e:?}");
                    authenticated = false;
                    break;
                }
            }
        }
        if authenticated {
            self.last_rx = Instant::now();
            self.shared.mark_heard();
            // Only handshake messages (types 1 and 2) make new keys; data
            // packets need no look at the handshake clock.
            if matches!(datagram.first(), Some(1 | 2)) || self.handshake.borrow().is_none() {
                self.publish_handshake();
            }
        }
    }

    async fn on_timer(&mut self, dst: &mut [u8]) {
        match self.tunn.update_timers(dst) {
            TunnResult::WriteToNetwork(datagram) => {
                send_datagram(&self.udp, self.endpoint, datagram).await;
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                // boringtun gives up after 90 s of failed handshakes; a
                // session never gives up, so start over.
                self.send_initiation(dst).await;
            }
            TunnResult::Err(e) => tracing::debug!("tunnel timer: {e:?}"),
            _ => {}
        }
        let now = Instant::now();
        let silent = now.duration_since(self.last_rx) >= PROBE_AFTER;
        let retry_due = self
            .last_initiation
            .is_none_or(|t| now.duration_since(t) >= REKEY_TIMEOUT);
        // An initiation the network refused (no route yet: the interface
        // comes up after sessiond at boot) is retried each second, not after
        // WireGuard's 5 s, so the session is back as soon as the link is.
        let unsent_due = self.initiation_unsent
            && self
                .last_initiation
                .is_none_or(|t| now.duration_since(t) >= UNSENT_RETRY);
        if (silent && retry_due) || unsent_due {
            self.send_initiation(dst).await;
        }
        self.publish_handshake();
    }

    async fn send_initiation(&mut self, dst: &mut [u8]) {
        self.last_initiation = Some(Instant::now());
        match self.tunn.format_handshake_initiation(dst, true) {
            TunnResult::WriteToNetwork(datagram) => {
                self.initiation_unsent = !send_datagram(&self.udp, self.endpoint, datagram).await;
            }
            TunnResult::Err(e) => tracing::warn!("could not start a handshake: {e:?}"),
            _ => {}
        }
    }

    /// Publishes when the current session keys were made, if that changed.
    fn publish_handshake(&self) {
        let Some(age) = self.tunn.time_since_last_handshake() else {
            return;
        };
        let at = Instant::now().checked_sub(age);
        self.handshake.send_if_modified(|current| {
            let changed = match (*current, at) {
                (None, Some(_)) => true,
                (Some(old), Some(new)) => new.saturating_duration_since(old) >= Duration::from_secs(1),
                _ => false,
            };
            if changed {
                *current = at;
            }
            changed
        });
    }

    async fn send(&self, datagram: &[u8]) {
        send_datagram(&self.udp, self.endpoint, datagram).await;
    }
}

/// Sends one datagram; returns whether the kernel took it.
async fn send_datagram(udp: &UdpSocket, endpoint: SocketAddr, datagram: &[u8]) -> bool {
    match udp.send_to(datagram, endpoint).await {
        Ok(_) => true,
        Err(e) => {
            // The lockdown refuses nothing to the endpoint, so this is the
            // network itself (no route, interface down); the timers retry.
            tracing::debug!("sending to {endpoint} failed: {e}");
            false
        }
    }
}
