//! The WireGuard tunnel: a TUN device, one UDP socket and boringtun's `Tunn`
//! state machine, driven by a single tokio task.
//!
//! The data path moves packets in batches: the TUN device runs with offload
//! (the kernel hands over up to 64 KiB of a TCP stream per read and takes
//! coalesced segments back per write), and the socket sends runs of
//! equal-sized datagrams with UDP GSO and receives with recvmmsg and UDP GRO
//! (quinn-udp). Buffers are allocated once per tunnel.
//!
//! Where a network blocks UDP the datagrams can go over TCP to a relay
//! beside the gateway instead ([`transport`]): the socket then sends them
//! to an in-process forwarder on the loopback, and the batching above is
//! unchanged.
//!
//! This module owns the tunnel's packets, its timers and its view of the
//! peer's health. It never decides *when* a tunnel exists (the session state
//! machine does) and never touches addresses, routes or the firewall.
//!
//! The WireGuard implementation stays behind [`Tunnel`]: start, wait for a
//! handshake, read stats, stop. Swapping boringtun for something else changes
//! this file only.
//!
//! Every packet from the TUN device meets the tunnel's own allow filter
//! ([`filter`]) before it is encrypted: what the session machine last said
//! is allowed, independent of nftables, so a flushed firewall table does not
//! let forbidden traffic reach the gateway while it is being put back.

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

pub mod filter;
pub mod shape;
pub mod transport;

pub use filter::AllowFilter;
use filter::Verdict;
use shape::{CoverSender, CoverShared, TrafficShape};
pub use transport::OuterTransport;
use transport::TcpForwarder;

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
/// Kernel receive buffer for the tunnel's UDP socket.
const RECEIVE_BUFFER: usize = 4 << 20;
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
    /// Padding and timing of what is sent (see [`shape`]).
    pub shape: TrafficShape,
    /// UDP straight to `endpoint`, or TCP to a relay (see [`transport`]).
    pub transport: OuterTransport,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("could not create the tunnel interface {interface}: {reason}")]
    CreateInterface { interface: String, reason: String },
    #[error("could not open the tunnel's UDP socket: {0}")]
    Socket(String),
    #[error("could not start the tunnel's TCP transport: {0}")]
    Transport(String),
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
    /// Packets from applications the tunnel refused to encrypt because the
    /// allowlist in force does not admit them (normally the firewall
    /// refuses them first, so this stays 0 unless the table was tampered
    /// with).
    pub refused_packets: u64,
    /// How often the way out to the endpoint changed (a new address or
    /// default route: Wi-Fi to Ethernet, a new lease) and the tunnel
    /// handshook again from there.
    pub path_changes: u64,
    /// How the encrypted datagrams travel: `udp`, or `tcp` to a relay
    /// (a network that blocks UDP).
    pub transport: OuterProtocol,
}

/// How the encrypted datagrams travel now (`status` shows it): the same
/// choice the lockdown lets out, so the same type.
pub use crate::firewall::EndpointProtocol as OuterProtocol;

/// Counters the packet task updates and `status` reads, without a lock.
struct Shared {
    /// Plaintext bytes received from and sent to the peer.
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    /// When the peer was last heard, in milliseconds since `started`.
    last_rx_ms: AtomicU64,
    started: Instant,
    path_changes: AtomicU64,
    /// When a handshake was last forced (a network change, a request) and
    /// when the peer last answered one of ours, in milliseconds since
    /// `started` plus one (0: never).
    forced_ms: AtomicU64,
    answered_ms: AtomicU64,
    /// When the oldest of our handshake initiations still without an
    /// answer went out (0: none waits), as [`Shared::now_ms`].
    unanswered_since_ms: AtomicU64,
    /// The same for our answers to the peer's initiations: the peer
    /// confirms one with data (or a keepalive). A peer that does not hear
    /// us initiates again and again, which keeps our own timers from ever
    /// initiating; this is what shows it then.
    unconfirmed_since_ms: AtomicU64,
    /// Asks the packet task for a fresh handshake at once (after a resume
    /// from sleep the peer may have forgotten the session).
    rehandshake: tokio::sync::Notify,
    /// Whether the datagrams go over TCP to a relay now.
    over_tcp: std::sync::atomic::AtomicBool,
    /// Over TCP: whether a handshake over UDP is being tried (see
    /// [`Tunnel::probe_udp`]): [`PROBE_IDLE`], [`PROBE_RUNNING`] or
    /// [`PROBE_ANSWERED`]. The packet task moves from running to answered,
    /// the session machine back to idle; whoever comes second sees the
    /// other's move.
    udp_probe: std::sync::atomic::AtomicU8,
    /// Asks the packet task to send the probe's handshake.
    probe_now: tokio::sync::Notify,
}

const PROBE_IDLE: u8 = 0;
const PROBE_RUNNING: u8 = 1;
const PROBE_ANSWERED: u8 = 2;

impl Shared {
    fn mark_heard(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_rx_ms.store(ms, Ordering::Relaxed);
    }

    /// A handshake initiation (type 1) or answer (type 2) going out starts
    /// the wait for the peer's reply, unless an earlier one still waits.
    fn note_sent(&self, datagram: &[u8]) {
        let waits = match datagram.first() {
            Some(1) => &self.unanswered_since_ms,
            Some(2) => &self.unconfirmed_since_ms,
            _ => return,
        };
        let _ = waits.compare_exchange(0, self.now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }
}

/// A running tunnel. Dropping it without [`Tunnel::stop`] also ends the
/// packet task (the interface disappears with its file descriptor).
pub struct Tunnel {
    monitor: TunnelMonitor,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// Hands the packet task a TCP transport to switch to, or `None`:
    /// back to UDP.
    to_switch: tokio::sync::mpsc::UnboundedSender<Option<TcpForwarder>>,
    /// The packet task's UDP socket, which a TCP forwarder answers.
    udp_local: SocketAddr,
    fwmark: u32,
    cover: bool,
}

/// A read-only view of a running tunnel, cheap to clone, for status and the
/// health check.
#[derive(Clone)]
pub struct TunnelMonitor {
    interface: String,
    endpoint: SocketAddr,
    shared: Arc<Shared>,
    handshake: watch::Receiver<Option<Instant>>,
    filter: AllowFilter,
}

impl Tunnel {
    /// Creates the TUN device and the socket and starts the packet task,
    /// which sends the first handshake initiation at once.
    pub async fn start(config: TunnelConfig) -> Result<Tunnel, TunnelError> {
        let device = tun_rs::DeviceBuilder::new()
            .name(config.interface.clone())
            .mtu(config.mtu)
            // Let the kernel hand over and take back 64 KiB TCP/UDP trains
            // instead of one packet per syscall (virtio headers, TSO/USO).
            .offload(true)
            .build_async()
            .map_err(|e| TunnelError::CreateInterface {
                interface: config.interface.clone(),
                reason: crate::io_reason(&e),
            })?;
        let udp = bind_marked_socket(config.endpoint, config.fwmark)
            .map_err(|e| TunnelError::Socket(crate::io_reason(&e)))?;
        let udp_local = udp
            .local_addr()
            .map_err(|e| TunnelError::Socket(crate::io_reason(&e)))?;
        let forwarder = match config.transport {
            OuterTransport::Udp => None,
            OuterTransport::Tcp { relay } => {
                if config.shape == TrafficShape::Cover {
                    return Err(TunnelError::Transport(
                        "cover traffic needs UDP to the gateway".into(),
                    ));
                }
                Some(
                    TcpForwarder::start(relay, config.fwmark, udp_local.is_ipv6(), udp_local.port())
                        .map_err(|e| TunnelError::Transport(crate::io_reason(&e)))?,
                )
            }
        };
        let udp_state = quinn_udp::UdpSocketState::new((&udp).into())
            .map_err(|e| TunnelError::Socket(crate::io_reason(&e)))?;
        // After quinn-udp, which sets IP_PMTUDISC_PROBE (DF, path MTU
        // ignored): see `survive_small_path_mtu`.
        survive_small_path_mtu(&udp, config.endpoint)
            .map_err(|e| TunnelError::Socket(crate::io_reason(&e)))?;

        let cover = if config.shape == TrafficShape::Cover {
            let socket = cover_socket(&udp).map_err(|e| TunnelError::Socket(crate::io_reason(&e)))?;
            Some(
                CoverSender::start(socket, config.endpoint, usize::from(config.mtu))
                    .map_err(|e| TunnelError::Socket(crate::io_reason(&e)))?,
            )
        } else {
            None
        };

        let secret = StaticSecret::from(*config.private_key.as_bytes());
        let peer = PublicKey::from(*config.peer_public_key.as_bytes());
        let psk = config.preshared_key.as_ref().map(|k| *k.as_bytes());
        let tunn = Tunn::new(secret, peer, psk, config.persistent_keepalive, rand_index(), None);

        let shared = Arc::new(Shared {
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            last_rx_ms: AtomicU64::new(0),
            started: Instant::now(),
            path_changes: AtomicU64::new(0),
            forced_ms: AtomicU64::new(0),
            answered_ms: AtomicU64::new(0),
            unanswered_since_ms: AtomicU64::new(0),
            unconfirmed_since_ms: AtomicU64::new(0),
            rehandshake: tokio::sync::Notify::new(),
            over_tcp: std::sync::atomic::AtomicBool::new(forwarder.is_some()),
            udp_probe: std::sync::atomic::AtomicU8::new(PROBE_IDLE),
            probe_now: tokio::sync::Notify::new(),
        });
        let (handshake_tx, handshake_rx) = watch::channel(None);
        let (to_switch, switch) = tokio::sync::mpsc::unbounded_channel();
        // Over TCP the datagrams go to the forwarder, and the way out that
        // matters for roaming is the one to the relay.
        let (send_to, path_target) = match &forwarder {
            Some(f) => (f.local_addr(), f.relay()),
            None => (config.endpoint, config.endpoint),
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        // Lockdown until the session machine says otherwise.
        let filter = AllowFilter::new();
        let driver = Driver {
            tunn,
            device,
            udp,
            udp_state,
            endpoint: send_to,
            gateway: config.endpoint,
            fwmark: config.fwmark,
            path: way_out(path_target, config.fwmark),
            path_target,
            forwarder,
            switch,
            shared: shared.clone(),
            handshake: handshake_tx,
            last_rx: Instant::now(),
            last_initiation: None,
            initiation_unsent: false,
            filter: filter.clone(),
            refused_logged: 0,
            shape: config.shape,
            mtu: usize::from(config.mtu),
            cover,
            levers: Levers::from_env(),
            paced_until: None,
        };
        let task = tokio::spawn(driver.run(stop_rx, config.mtu));
        Ok(Tunnel {
            monitor: TunnelMonitor {
                interface: config.interface,
                endpoint: config.endpoint,
                shared,
                handshake: handshake_rx,
                filter,
            },
            stop: Some(stop_tx),
            task: Some(task),
            to_switch,
            udp_local,
            fwmark: config.fwmark,
            cover: config.shape == TrafficShape::Cover,
        })
    }

    /// Moves the tunnel's datagrams to TCP through the relay at `relay`
    /// (the network did not pass UDP to the gateway): the packet task
    /// sends to the forwarder from now on and handshakes again through it.
    /// The firewall must admit the TCP flow first (the session machine
    /// puts that lockdown in place before it asks).
    pub fn use_tcp(&self, relay: SocketAddr) -> Result<(), TunnelError> {
        if self.cover {
            return Err(TunnelError::Transport(
                "cover traffic needs UDP to the gateway".into(),
            ));
        }
        let forwarder = TcpForwarder::start(
            relay,
            self.fwmark,
            self.udp_local.is_ipv6(),
            self.udp_local.port(),
        )
        .map_err(|e| TunnelError::Transport(crate::io_reason(&e)))?;
        // The switch handshakes again; marked here, not when the packet
        // task gets to it, so an answer from before the switch cannot count
        // as the answer over TCP (see `rehandshake_answered`).
        self.monitor
            .shared
            .forced_ms
            .store(self.monitor.shared.now_ms(), Ordering::Relaxed);
        self.to_switch
            .send(Some(forwarder))
            .map_err(|_| TunnelError::Transport("the tunnel's packet task has ended".into()))
    }

    /// Moves the tunnel's datagrams back to UDP straight to the gateway
    /// (the relay did not answer): the TCP connection closes and the packet
    /// task handshakes again over UDP. The firewall must admit the
    /// gateway's UDP first.
    pub fn use_udp(&self) -> Result<(), TunnelError> {
        self.to_switch
            .send(None)
            .map_err(|_| TunnelError::Transport("the tunnel's packet task has ended".into()))
    }

    /// Over TCP: tries whether UDP reaches the gateway again, without
    /// leaving TCP. The packet task sends one handshake initiation
    /// straight to the gateway's UDP and, while the probe runs, hears the
    /// gateway there too; if the gateway answers that handshake, the
    /// tunnel moves back to UDP at once (the gateway itself moved to the
    /// address the answer went to) and the TCP connection closes. The
    /// firewall must admit the gateway's UDP first (the session machine
    /// adds it for the probe's length).
    pub fn probe_udp(&self) -> Result<(), TunnelError> {
        let shared = &self.monitor.shared;
        if !shared.over_tcp.load(Ordering::Relaxed) {
            return Err(TunnelError::Transport("the tunnel already uses UDP".into()));
        }
        shared.udp_probe.store(PROBE_RUNNING, Ordering::SeqCst);
        shared.probe_now.notify_one();
        Ok(())
    }

    /// Ends a probe: answers from the gateway's UDP are not heard any
    /// more. Returns whether the probe was answered (the tunnel is back on
    /// UDP then).
    pub fn end_udp_probe(&self) -> bool {
        self.monitor.shared.udp_probe.swap(PROBE_IDLE, Ordering::SeqCst) == PROBE_ANSWERED
    }

    pub fn monitor(&self) -> TunnelMonitor {
        self.monitor.clone()
    }

    /// What this tunnel may encrypt; the session machine sets it.
    pub fn allow_filter(&self) -> AllowFilter {
        self.monitor.filter.clone()
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
        // The packet loop's buffers (about 1.2 MiB) are freed now.
        release_freed_memory();
    }
}

/// Hands the memory the allocator holds free back to the kernel. glibc
/// keeps what a thread freed in that thread's arena, resident, for the
/// next allocation there: after each session the packet loop's buffers
/// would stay, on whichever worker ran it, beside the next session's.
/// Costs about a millisecond, once per session, after the tunnel is down;
/// in the bench it kept sessiond at about 19 MiB in session after session
/// where it grew from 18.7 to 22.1 MiB in four.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes a plain integer and touches only the
    // allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
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
            refused_packets: self.filter.refused(),
            path_changes: self.shared.path_changes.load(Ordering::Relaxed),
            transport: if self.shared.over_tcp.load(Ordering::Relaxed) {
                OuterProtocol::Tcp
            } else {
                OuterProtocol::Udp
            },
        }
    }

    /// Sends a fresh handshake initiation now, whatever the timers think
    /// of the current keys (the session machine asks after a resume).
    pub fn rehandshake(&self) {
        // Marked here, not when the packet task gets to it, so an answer
        // to an earlier handshake cannot count as the answer to this one.
        self.shared
            .forced_ms
            .store(self.shared.now_ms(), Ordering::Relaxed);
        self.shared.rehandshake.notify_one();
    }

    /// How long after the last forced handshake (a network change, a
    /// [`rehandshake`](Self::rehandshake)) the peer answered, once it has.
    pub fn rehandshake_answered(&self) -> Option<Duration> {
        let forced = self.shared.forced_ms.load(Ordering::Relaxed);
        let answered = self.shared.answered_ms.load(Ordering::Relaxed);
        (answered >= forced && answered > 0).then(|| Duration::from_millis(answered - forced))
    }

    /// How long our oldest handshake message has gone without the peer's
    /// reply (an answer to an initiation, data after an answer), while one
    /// has: on UDP, the gateway not hearing us (or not answering).
    pub fn handshake_unanswered_for(&self) -> Option<Duration> {
        let since = [
            self.shared.unanswered_since_ms.load(Ordering::Relaxed),
            self.shared.unconfirmed_since_ms.load(Ordering::Relaxed),
        ]
        .into_iter()
        .filter(|&ms| ms > 0)
        .min()?;
        Some(Duration::from_millis(self.shared.now_ms().saturating_sub(since)))
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
    // The default 208 KiB receive queue overflows while the packet task is
    // busy with a batch the other way, and every overflow is a lost packet
    // inside the tunnel (wireguard-go asks for 7 MiB). SO_RCVBUFFORCE may
    // pass the system maximum, which needs CAP_NET_ADMIN (sessiond has it);
    // without it the default stays, which still works. The send buffer stays
    // small on purpose: on a slow uplink a big one is only a standing queue
    // that every packet of the call would wait in.
    if let Err(e) =
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &RECEIVE_BUFFER)
    {
        tracing::debug!("could not enlarge the tunnel socket's receive buffer: {e}");
    }
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// The outer datagrams' don't-fragment policy. With quinn-udp's
/// IP_PMTUDISC_PROBE every datagram carries DF and the kernel ignores what
/// it learns about the path: behind a link smaller than the interface (a
/// 1280-byte LTE, DS-Lite or PPPoE hop) full-sized datagrams are dropped
/// and a bulk transfer stalls while small packets pass (a frozen picture
/// in a call). IPv4: IP_PMTUDISC_DONT, no DF, so a router on the path
/// fragments what does not fit (kernel WireGuard does the same). IPv6,
/// where routers never fragment: IPV6_PMTUDISC_WANT, so the kernel takes
/// the path MTU from ICMPv6 "packet too big" (the firewall lets those in
/// for this flow only) and fragments at the source. UDP GSO trains larger
/// than a learned path MTU are refused by the kernel; the send path then
/// falls back to single datagrams (see `Driver::send_batch`).
fn survive_small_path_mtu(socket: &UdpSocket, endpoint: SocketAddr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (level, name, value) = match endpoint.ip() {
        IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_WANT,
        ),
    };
    // SAFETY: a valid socket descriptor we own, and a c_int option value
    // whose size we pass.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The packet task's state. It owns `Tunn`, so no lock sits on the data path.
struct Driver {
    tunn: Tunn,
    device: tun_rs::AsyncDevice,
    udp: UdpSocket,
    /// Batched sends (UDP GSO) and receives (recvmmsg, UDP GRO) on `udp`.
    udp_state: quinn_udp::UdpSocketState,
    endpoint: SocketAddr,
    /// The gateway's UDP endpoint (the same as `endpoint` unless the
    /// datagrams go over TCP).
    gateway: SocketAddr,
    fwmark: u32,
    /// The source address the kernel picks for the endpoint now (`None`:
    /// no route); a change means the machine moved to another network.
    path: Option<IpAddr>,
    /// Whose way out `path` is: the endpoint, or over TCP the relay
    /// (`endpoint` is then the forwarder on the loopback).
    path_target: SocketAddr,
    /// The TCP transport, when the datagrams go through a relay.
    forwarder: Option<TcpForwarder>,
    /// A TCP transport to switch to (see [`Tunnel::use_tcp`]), or `None`:
    /// back to UDP (see [`Tunnel::use_udp`]).
    switch: tokio::sync::mpsc::UnboundedReceiver<Option<TcpForwarder>>,
    shared: Arc<Shared>,
    handshake: watch::Sender<Option<Instant>>,
    last_rx: Instant,
    last_initiation: Option<Instant>,
    /// The last initiation never left (no route).
    initiation_unsent: bool,
    /// What may be encrypted (see [`filter`]).
    filter: AllowFilter,
    /// The refused count the debug log last reported.
    refused_logged: u64,
    /// How data packets are padded, and whether they wait for the cover
    /// envelope's slots (`cover`) instead of leaving at once.
    shape: TrafficShape,
    mtu: usize,
    cover: Option<CoverSender>,
    levers: Levers,
    /// With pacing: when the bytes sent so far have left at the paced rate.
    paced_until: Option<Instant>,
}

/// Knobs of the send path that the benchmark turns to measure latency
/// levers (docs/benchmarks.md, "Latency levers"). Read once per tunnel from
/// the environment (SG_BENCH_*); unset, the defaults are what sessiond
/// ships. Not a configuration interface: users have nothing to tune here.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Levers {
    /// Most datagrams in one UDP GSO send.
    gso_segments: usize,
    /// TUN reads drained per turn of the loop.
    tun_reads: usize,
    /// Pace the sends to at most this many bytes per second (None: as fast
    /// as the socket takes them).
    pace_bytes_per_sec: Option<f64>,
}

impl Levers {
    const DEFAULT: Levers = Levers {
        gso_segments: PACKET_BATCH,
        tun_reads: TUN_READS_PER_TURN,
        pace_bytes_per_sec: None,
    };

    fn from_env() -> Levers {
        let num = |name: &str| -> Option<u64> {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .filter(|n| *n > 0)
        };
        let mut levers = Levers::DEFAULT;
        if let Some(n) = num("SG_BENCH_GSO_SEGMENTS") {
            levers.gso_segments = (n as usize).min(PACKET_BATCH);
        }
        if let Some(n) = num("SG_BENCH_TUN_READS") {
            levers.tun_reads = (n as usize).min(64);
        }
        if let Some(mbit) = num("SG_BENCH_PACE_MBIT") {
            levers.pace_bytes_per_sec = Some(mbit as f64 * 1e6 / 8.0);
        }
        if levers != Levers::DEFAULT {
            tracing::info!("tunnel send path levers for a benchmark: {levers:?}");
        }
        levers
    }
}

/// Pacing: `bytes` more to send at `rate` bytes per second, after the
/// earlier sends that leave by `paced_until`. Returns when these bytes will
/// have left, and until when to wait before sending them (None: now, as
/// the schedule is less than [`PACE_SLACK`] ahead).
fn pace(paced_until: Option<Instant>, now: Instant, bytes: usize, rate: f64) -> (Instant, Option<Instant>) {
    let start = paced_until.map_or(now, |t| t.max(now));
    let done = start + Duration::from_secs_f64(bytes as f64 / rate);
    let wait = (done > now + PACE_SLACK).then(|| done - PACE_SLACK);
    (done, wait)
}

/// How far sends may run ahead of the paced schedule (one 64 KiB train at
/// 500 Mbit/s takes about 1 ms; tokio's timer has 1 ms granularity).
const PACE_SLACK: Duration = Duration::from_millis(2);

/// Buffers allocated once per tunnel and reused for every packet. Most of
/// their pages are never touched: the large ones only fill under bulk load.
struct Buffers {
    /// One read from the TUN device: the virtio header and a packet of up to
    /// 64 KiB that the kernel segments lazily (TSO/USO).
    tun_read: Vec<u8>,
    /// That read split into packets of at most the MTU, and their sizes.
    from_tun: Vec<Vec<u8>>,
    from_tun_sizes: Vec<usize>,
    outgoing: OutgoingBatch,
    /// Datagrams from the network: a few buffers, each holding up to 64
    /// datagrams that the kernel coalesced (UDP GRO).
    from_net: Vec<Vec<u8>>,
    from_net_meta: Vec<quinn_udp::RecvMeta>,
    /// Decrypted packets waiting for one coalescing write to the TUN device,
    /// each behind room for the virtio header.
    to_tun: Vec<Vec<u8>>,
    gro: tun_rs::GROTable,
    /// Handshakes and keepalives from the timers.
    timer: Vec<u8>,
    wire_len: usize,
}

/// How many packets one TUN read may split into (64 KiB at the smallest MSS
/// the kernel uses), and how many datagrams go out in one send.
const PACKET_BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;
/// Receive buffers per recvmmsg call; each takes a whole GRO train.
const RECV_BUFFERS: usize = 8;
const GRO_BUFFER: usize = 65_536;
/// How many TUN reads one turn of the loop drains before it lets the other
/// direction and the timers run.
const TUN_READS_PER_TURN: usize = 8;
/// One GSO send is one IP packet before segmentation: its UDP payload
/// cannot pass 64 KiB less the headers.
const MAX_GSO_BYTES: usize = 65_000;
/// Room in front of each packet written to the TUN device.
const VNET_HDR: usize = tun_rs::VIRTIO_NET_HDR_LEN;

impl Buffers {
    fn new(mtu: u16) -> Buffers {
        let packet = usize::from(mtu).max(1280);
        // Data packets grow by the header and tag plus up to 15 bytes of
        // padding; handshakes are 148 bytes.
        let wire_len = (packet + WG_OVERHEAD + 16).max(WG_MIN_BUFFER);
        Buffers {
            tun_read: vec![0; VNET_HDR + MAX_PACKET],
            from_tun: vec![vec![0; packet]; PACKET_BATCH],
            from_tun_sizes: vec![0; PACKET_BATCH],
            outgoing: OutgoingBatch::new(wire_len),
            from_net: vec![vec![0; GRO_BUFFER]; RECV_BUFFERS],
            from_net_meta: vec![quinn_udp::RecvMeta::default(); RECV_BUFFERS],
            to_tun: (0..PACKET_BATCH)
                .map(|_| Vec::with_capacity(VNET_HDR + wire_len))
                .collect(),
            gro: tun_rs::GROTable::default(),
            timer: vec![0; wire_len],
            wire_len,
        }
    }
}

/// Encrypted datagrams waiting to leave together, back to back in one
/// buffer, so a run of equal-sized ones (a TCP stream's full segments) goes
/// out as one UDP GSO send instead of one syscall each.
struct OutgoingBatch {
    buf: Vec<u8>,
    /// Bytes in `buf` that belong to the batch.
    len: usize,
    count: usize,
    /// Size of the run's datagrams (all but a shorter last one, which ends
    /// the run: then `len` falls short of `count * segment`).
    segment: usize,
    wire_len: usize,
}

impl OutgoingBatch {
    fn new(wire_len: usize) -> OutgoingBatch {
        OutgoingBatch {
            buf: vec![0; wire_len * PACKET_BATCH],
            len: 0,
            count: 0,
            segment: 0,
            wire_len,
        }
    }

    /// Where the next datagram is encrypted to.
    fn slot(&mut self) -> &mut [u8] {
        let end = self.len + self.wire_len;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        &mut self.buf[self.len..end]
    }

    /// Whether a datagram of `size` bytes just written to [`slot`] can join
    /// the current send, up to `max_segments` datagrams.
    fn fits(&self, size: usize, max_segments: usize) -> bool {
        let ended_by_a_shorter_one = self.len < self.count * self.segment;
        self.count == 0
            || (!ended_by_a_shorter_one
                && size <= self.segment
                && self.count < max_segments
                && self.len + size <= MAX_GSO_BYTES)
    }

    /// Moves a datagram of `size` bytes from the slot to the front of an
    /// empty batch (after the batch before it was sent).
    fn restart_with_slot(&mut self, size: usize) {
        self.buf.copy_within(self.len..self.len + size, 0);
        self.clear();
    }

    /// Takes the datagram of `size` bytes in the slot into the batch.
    fn commit(&mut self, size: usize) {
        if self.count == 0 {
            self.segment = size;
        }
        self.len += size;
        self.count += 1;
    }

    fn clear(&mut self) {
        self.len = 0;
        self.count = 0;
        self.segment = 0;
    }
}

impl Driver {
    async fn run(mut self, mut stop: oneshot::Receiver<()>, mtu: u16) {
        let mut buf = Buffers::new(mtu);
        let mut timer = tokio::time::interval(TIMER_TICK);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.send_initiation(&mut buf.timer).await;
        // The cover envelope's sender asks for decoys through this.
        let cover: Option<Arc<CoverShared>> = self.cover.as_ref().map(CoverSender::shared);
        let shared = self.shared.clone();
        loop {
            tokio::select! {
                _ = &mut stop => break,
                read = self.device.recv_multiple(
                    &mut buf.tun_read, &mut buf.from_tun, &mut buf.from_tun_sizes, 0,
                ) => {
                    if let Err(e) = self.outbound(read, &mut buf).await {
                        tracing::error!("reading from the tunnel interface failed: {e}; the tunnel stops");
                        break;
                    }
                },
                received = recv_batch(&self.udp, &self.udp_state, &mut buf.from_net, &mut buf.from_net_meta) => match received {
                    Ok(n) => self.inbound(n, &mut buf).await,
                    Err(e) => tracing::debug!("receiving from the endpoint failed: {e}"),
                },
                _ = timer.tick() => self.on_timer(&mut buf.timer).await,
                _ = shared.rehandshake.notified() => {
                    tracing::info!("handshaking again with {} on request", self.endpoint);
                    self.send_initiation(&mut buf.timer).await;
                }
                _ = decoys_low(cover.as_deref()) => self.make_decoys(buf.wire_len).await,
                _ = shared.probe_now.notified() => self.send_udp_probe(&mut buf.timer).await,
                Some(way) = self.switch.recv() => match way {
                    Some(forwarder) => {
                        tracing::info!(
                            "the tunnel's datagrams go over TCP to the relay {} from now on; handshaking again through it",
                            forwarder.relay()
                        );
                        self.endpoint = forwarder.local_addr();
                        self.path_target = forwarder.relay();
                        self.path = way_out(self.path_target, self.fwmark);
                        self.forwarder = Some(forwarder);
                        self.shared.over_tcp.store(true, Ordering::Relaxed);
                        self.send_initiation(&mut buf.timer).await;
                    }
                    None if self.forwarder.is_some() => {
                        tracing::info!(
                            "the tunnel's datagrams go straight to the gateway {} over UDP from now on; handshaking again",
                            self.gateway
                        );
                        self.leave_tcp();
                        self.send_initiation(&mut buf.timer).await;
                    }
                    None => {}
                },
            }
        }
    }

    /// Packets from applications, to be encrypted for the peer: the `first`
    /// read's packets, then whatever else the device has ready, sent in as
    /// few syscalls as the kernel allows. Errs only when the device is gone
    /// (one malformed packet is dropped and logged).
    async fn outbound(&mut self, first: std::io::Result<usize>, buf: &mut Buffers) -> std::io::Result<()> {
        let mut read = first;
        let mut result = Ok(());
        // One look at the allowlist per turn: a change takes effect from
        // the next batch on.
        let admits = self.filter.current();
        let mut refused = 0;
        let reads = self.levers.tun_reads;
        for turn in 1..=reads {
            match read {
                Ok(ready) => {
                    for i in 0..ready {
                        let size = buf.from_tun_sizes[i];
                        let packet = &buf.from_tun[i][..size];
                        if filter::decide(packet, admits.as_deref()) == Verdict::Refuse {
                            refused += 1;
                            continue;
                        }
                        let padded = shape::pad_in_place(&mut buf.from_tun[i], size, self.shape, self.mtu);
                        if self.cover.is_some() {
                            // It leaves in the envelope's next free slot.
                            self.encrypt_for_cover(&buf.from_tun[i][..padded], size, buf.wire_len)
                                .await;
                            continue;
                        }
                        self.encrypt(&buf.from_tun[i][..padded], size, &mut buf.outgoing)
                            .await;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if is_device_gone(&e) => {
                    result = Err(e);
                    break;
                }
                Err(e) => tracing::debug!("dropped a packet from the tunnel interface: {e}"),
            }
            if turn == reads {
                break;
            }
            read = self.device.try_recv_multiple(
                &mut buf.tun_read,
                &mut buf.from_tun,
                &mut buf.from_tun_sizes,
                0,
            );
        }
        self.flush(&mut buf.outgoing).await;
        if refused > 0 {
            self.filter.count_refused(refused);
        }
        result
    }

    /// Encrypts one packet, already padded (`payload_len` bytes before the
    /// padding), into the outgoing batch, sending the batch first when the
    /// new datagram cannot join it.
    async fn encrypt(&mut self, packet: &[u8], payload_len: usize, batch: &mut OutgoingBatch) {
        let size = match self.tunn.encapsulate(packet, batch.slot()) {
            TunnResult::WriteToNetwork(datagram) => {
                // Without a session boringtun queues the packet and hands us a
                // handshake instead (type 1); only data (type 4) counts.
                self.shared.note_sent(datagram);
                if datagram.first() == Some(&4) {
                    self.shared
                        .tx_bytes
                        .fetch_add(payload_len as u64, Ordering::Relaxed);
                }
                datagram.len()
            }
            TunnResult::Err(e) => {
                tracing::debug!("could not encrypt a packet: {e:?}");
                return;
            }
            _ => return,
        };
        let max_segments = self.udp_state.max_gso_segments().min(self.levers.gso_segments);
        if !batch.fits(size, max_segments) {
            self.send_batch(batch).await;
            batch.restart_with_slot(size);
        }
        batch.commit(size);
    }

    async fn flush(&mut self, batch: &mut OutgoingBatch) {
        if batch.count > 0 {
            self.send_batch(batch).await;
        }
        batch.clear();
    }

    /// Sends the batch's datagrams (all of its segment size, the last may be
    /// shorter): one GSO send, or one by one when the kernel turned GSO down.
    async fn send_batch(&mut self, batch: &OutgoingBatch) {
        let (run, segment, count) = (&batch.buf[..batch.len], batch.segment, batch.count);
        if let Some(rate) = self.levers.pace_bytes_per_sec {
            let (done, wait_until) = pace(self.paced_until, Instant::now(), run.len(), rate);
            self.paced_until = Some(done);
            if let Some(at) = wait_until {
                tokio::time::sleep_until(at.into()).await;
            }
        }
        let transmit = quinn_udp::Transmit {
            destination: self.endpoint,
            ecn: None,
            contents: run,
            segment_size: (count > 1).then_some(segment),
            src_ip: None,
        };
        let sent = self
            .udp
            .async_io(tokio::io::Interest::WRITABLE, || {
                self.udp_state.try_send((&self.udp).into(), &transmit)
            })
            .await;
        if let Err(e) = sent {
            if count > 1 && self.udp_state.max_gso_segments() == 1 {
                // quinn-udp just learned that this path cannot do GSO.
                for datagram in run.chunks(segment) {
                    send_datagram(&self.shared, &self.udp, self.endpoint, datagram).await;
                }
            } else {
                // The lockdown refuses nothing to the endpoint, so this is
                // the network itself; WireGuard's timers and TCP retry.
                tracing::debug!("sending to {} failed: {e}", self.endpoint);
            }
        }
    }

    /// Encrypts one padded packet into the cover envelope's queue. A
    /// handshake boringtun answers with instead (no session yet) leaves at
    /// once: handshakes are not shaped.
    async fn encrypt_for_cover(&mut self, packet: &[u8], payload_len: usize, wire_len: usize) {
        let Some(cover) = &self.cover else {
            return;
        };
        let mut wire = cover.buffer(wire_len);
        let (kind, len) = match self.tunn.encapsulate(packet, &mut wire) {
            TunnResult::WriteToNetwork(datagram) => (datagram.first().copied(), datagram.len()),
            TunnResult::Err(e) => {
                tracing::debug!("could not encrypt a packet: {e:?}");
                return;
            }
            _ => return,
        };
        wire.truncate(len);
        if kind == Some(4) {
            self.shared
                .tx_bytes
                .fetch_add(payload_len as u64, Ordering::Relaxed);
            cover.push_real(wire);
        } else {
            send_datagram(&self.shared, &self.udp, self.endpoint, &wire).await;
        }
    }

    /// Tops up the cover envelope's reserve of decoys. None before the
    /// session has keys: boringtun would queue them behind the handshake
    /// and send the backlog in a burst.
    async fn make_decoys(&mut self, wire_len: usize) {
        let Some(cover) = &self.cover else {
            return;
        };
        if self.tunn.time_since_last_handshake().is_none() {
            return;
        }
        for _ in 0..cover.decoys_wanted() {
            let mut wire = cover.buffer(wire_len);
            let len = match self.tunn.encapsulate(cover.decoy_plaintext(), &mut wire) {
                TunnResult::WriteToNetwork(datagram) if datagram.first() == Some(&4) => datagram.len(),
                TunnResult::WriteToNetwork(handshake) => {
                    // The session went away between the check and here.
                    send_datagram(&self.shared, &self.udp, self.endpoint, handshake).await;
                    return;
                }
                _ => return,
            };
            wire.truncate(len);
            cover.push_decoy(wire);
        }
    }

    /// `count` receive buffers from the network. Only datagrams from the
    /// configured endpoint are heard; their packets go to the TUN device in
    /// as few writes as coalescing allows.
    async fn inbound(&mut self, count: usize, buf: &mut Buffers) {
        let mut pending = 0;
        let mut heard = false;
        let mut handshake_seen = false;
        let mut data_seen = false;
        for i in 0..count {
            let meta = buf.from_net_meta[i];
            // Over TCP while UDP is being tried, the gateway's UDP is heard
            // too (its answer, and what it sends once it has moved there).
            let over_udp_probe = meta.addr == self.gateway
                && self.forwarder.is_some()
                && self.shared.udp_probe.load(Ordering::SeqCst) == PROBE_RUNNING;
            if meta.addr != self.endpoint && !over_udp_probe {
                continue;
            }
            let stride = meta.stride.max(1);
            for datagram in buf.from_net[i][..meta.len].chunks(stride) {
                // The answer to the probe's handshake: the keepalive that
                // confirms it must go back over UDP, where the gateway now
                // expects us.
                let probe_answer = over_udp_probe && datagram.first() == Some(&2);
                let before = self.endpoint;
                if probe_answer {
                    self.endpoint = self.gateway;
                }
                // Only the part past the last packet gets zeroed; tun-rs
                // writes the virtio header itself.
                let slot = &mut buf.to_tun[pending];
                slot.resize(VNET_HDR + buf.wire_len, 0);
                let decrypted = self.decrypt(meta.addr, datagram, &mut slot[VNET_HDR..]).await;
                if probe_answer {
                    self.endpoint = before;
                    if !matches!(decrypted, Decrypted::Rejected) {
                        self.back_on_udp();
                    }
                }
                match decrypted {
                    Decrypted::Packet(len) => {
                        slot.truncate(VNET_HDR + len);
                        pending += 1;
                        heard = true;
                    }
                    Decrypted::Nothing => heard = true,
                    Decrypted::Rejected => continue,
                }
                handshake_seen |= matches!(datagram.first(), Some(1 | 2));
                if datagram.first() == Some(&2) {
                    // An authentic answer to one of our initiations.
                    self.shared
                        .answered_ms
                        .store(self.shared.now_ms(), Ordering::Relaxed);
                    self.shared.unanswered_since_ms.store(0, Ordering::Relaxed);
                }
                data_seen |= datagram.first() == Some(&4);
                if pending == buf.to_tun.len() {
                    self.write_to_device(&mut buf.to_tun[..pending], &mut buf.gro)
                        .await;
                    pending = 0;
                }
            }
        }
        if pending > 0 {
            self.write_to_device(&mut buf.to_tun[..pending], &mut buf.gro)
                .await;
        }
        if data_seen {
            // Authentic data or a keepalive: the peer has a session with
            // us, so it heard our answer. Once per batch, not per packet.
            self.shared.unconfirmed_since_ms.store(0, Ordering::Relaxed);
        }
        if heard {
            self.last_rx = Instant::now();
            self.shared.mark_heard();
            // Only handshake messages (types 1 and 2) make new keys; data
            // packets need no look at the handshake clock.
            if handshake_seen || self.handshake.borrow().is_none() {
                self.publish_handshake();
            }
        }
    }

    /// Decrypts one datagram into `dst`, answering handshakes and sending
    /// packets that waited for one on the way.
    async fn decrypt(&mut self, from: SocketAddr, datagram: &[u8], dst: &mut [u8]) -> Decrypted {
        let mut result = self.tunn.decapsulate(Some(from.ip()), datagram, dst);
        loop {
            match result {
                TunnResult::WriteToNetwork(reply) => {
                    send_datagram(&self.shared, &self.udp, self.endpoint, reply).await;
                    // Flush packets that were queued while the handshake ran.
                    result = self.tunn.decapsulate(None, &[], dst);
                }
                TunnResult::WriteToTunnelV4(packet, _) | TunnResult::WriteToTunnelV6(packet, _) => {
                    self.shared
                        .rx_bytes
                        .fetch_add(packet.len() as u64, Ordering::Relaxed);
                    return Decrypted::Packet(packet.len());
                }
                TunnResult::Done => return Decrypted::Nothing,
                // A decoy from a gateway that shapes its side too
                // (sessiongate-gateway in cover mode): authentic, so the
                // peer is alive, but nothing for the device.
                TunnResult::Err(e) if shape::is_authentic_decoy(datagram, &e) => return Decrypted::Nothing,
                TunnResult::Err(e) => {
                    tracing::debug!("dropped a datagram from the endpoint: {e:?}");
                    return Decrypted::Rejected;
                }
            }
        }
    }

    async fn write_to_device(&self, packets: &mut [Vec<u8>], gro: &mut tun_rs::GROTable) {
        if let Err(e) = self.device.send_multiple(gro, packets, VNET_HDR).await {
            tracing::debug!("writing to the tunnel interface failed: {e}");
        }
    }

    async fn on_timer(&mut self, dst: &mut [u8]) {
        self.follow_path(dst).await;
        match self.tunn.update_timers(dst) {
            // A keepalive (an empty data packet) would stand out of the
            // cover envelope by its size; the envelope's decoys already
            // keep the path and the peer's timers alive.
            TunnResult::WriteToNetwork(keepalive)
                if self.cover.is_some() && keepalive.first() == Some(&4) => {}
            TunnResult::WriteToNetwork(datagram) => {
                send_datagram(&self.shared, &self.udp, self.endpoint, datagram).await;
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
        if let Some(cover) = &self.cover {
            let shared = cover.shared();
            let dropped = shared.dropped.swap(0, Ordering::Relaxed);
            let missed = shared.missed.swap(0, Ordering::Relaxed);
            if dropped + missed > 0 {
                tracing::debug!(
                    "cover envelope: {dropped} packet(s) dropped on a full queue, {missed} slot(s) left empty"
                );
            }
        }
        // Counts only, never where the packets were going.
        let refused = self.filter.refused();
        if refused != self.refused_logged {
            tracing::debug!(
                "the tunnel refused {} packet(s) the allowlist does not admit ({refused} this session)",
                refused - self.refused_logged
            );
            self.refused_logged = refused;
        }
    }

    /// Roaming: when the source address towards the endpoint changes (the
    /// default route moved, the old address went away), handshake again at
    /// once from the new one instead of waiting out WireGuard's timers. The
    /// socket is unconnected, so the kernel already sends from the new
    /// address; the handshake makes the gateway learn it and proves the
    /// path. The endpoint is an address: nothing is looked up here.
    async fn follow_path(&mut self, dst: &mut [u8]) {
        let now = way_out(self.path_target, self.fwmark);
        if now == self.path {
            return;
        }
        let before = std::mem::replace(&mut self.path, now);
        if now.is_some() {
            if let Some(forwarder) = &self.forwarder {
                forwarder.reconnect();
            }
            tracing::info!(
                "the way to {} changed (from {} to {}); handshaking again",
                self.path_target,
                before.map_or("no route".to_string(), |a| a.to_string()),
                now.map_or("no route".to_string(), |a| a.to_string()),
            );
            self.shared.path_changes.fetch_add(1, Ordering::Relaxed);
            self.shared
                .forced_ms
                .store(self.shared.now_ms(), Ordering::Relaxed);
            self.send_initiation(dst).await;
        }
    }

    /// Over TCP: one handshake initiation straight to the gateway's UDP
    /// (see [`Tunnel::probe_udp`]). It replaces any handshake in flight;
    /// if UDP does not answer, WireGuard's own retry goes over TCP again.
    async fn send_udp_probe(&mut self, dst: &mut [u8]) {
        if self.forwarder.is_none() {
            return;
        }
        tracing::info!("trying whether UDP reaches {} again", self.gateway);
        self.last_initiation = Some(Instant::now());
        match self.tunn.format_handshake_initiation(dst, true) {
            TunnResult::WriteToNetwork(datagram) => {
                send_datagram(&self.shared, &self.udp, self.gateway, datagram).await;
            }
            TunnResult::Err(e) => tracing::warn!("could not start a handshake: {e:?}"),
            _ => {}
        }
    }

    /// The gateway answered a handshake over UDP while the probe ran: the
    /// datagrams go straight to it from now on, and the TCP connection to
    /// the relay closes. If the session machine ended the probe first, the
    /// tunnel stays on TCP (the firewall no longer admits the UDP).
    fn back_on_udp(&mut self) {
        let answered = self
            .shared
            .udp_probe
            .compare_exchange(PROBE_RUNNING, PROBE_ANSWERED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if !answered {
            return;
        }
        tracing::info!(
            "the gateway {} answered over UDP: the tunnel's datagrams go straight to it from now on",
            self.gateway
        );
        self.leave_tcp();
    }

    /// Datagrams straight to the gateway's UDP from now on; the forwarder
    /// goes, and its TCP connection closes with it.
    fn leave_tcp(&mut self) {
        self.forwarder = None;
        self.endpoint = self.gateway;
        self.path_target = self.gateway;
        self.path = way_out(self.gateway, self.fwmark);
        self.shared.over_tcp.store(false, Ordering::Relaxed);
    }

    async fn send_initiation(&mut self, dst: &mut [u8]) {
        self.last_initiation = Some(Instant::now());
        match self.tunn.format_handshake_initiation(dst, true) {
            TunnResult::WriteToNetwork(datagram) => {
                self.initiation_unsent =
                    !send_datagram(&self.shared, &self.udp, self.endpoint, datagram).await;
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
}

/// What one datagram from the endpoint came to.
enum Decrypted {
    /// A packet of this many bytes for the TUN device.
    Packet(usize),
    /// Authentic, but nothing for the device (a handshake, a keepalive).
    Nothing,
    /// Not authentic, or not for this session.
    Rejected,
}

/// Receives a batch of datagrams (recvmmsg, with GRO trains) when the
/// socket is readable.
async fn recv_batch(
    udp: &UdpSocket,
    state: &quinn_udp::UdpSocketState,
    bufs: &mut [Vec<u8>],
    meta: &mut [quinn_udp::RecvMeta],
) -> std::io::Result<usize> {
    let mut slices: [std::io::IoSliceMut<'_>; RECV_BUFFERS] = {
        let mut iter = bufs.iter_mut();
        std::array::from_fn(|_| std::io::IoSliceMut::new(iter.next().map_or(&mut [][..], |b| &mut b[..])))
    };
    udp.async_io(tokio::io::Interest::READABLE, || {
        state.recv(udp.into(), &mut slices, meta)
    })
    .await
}

/// Resolves when the cover envelope wants decoys, or never without one.
async fn decoys_low(cover: Option<&CoverShared>) {
    match cover {
        Some(cover) => cover.decoys_low().await,
        None => std::future::pending().await,
    }
}

/// A second descriptor of the tunnel's UDP socket (same fwmark, same
/// port) for the cover envelope's sender thread.
fn cover_socket(udp: &UdpSocket) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsFd;
    Ok(std::net::UdpSocket::from(udp.as_fd().try_clone_to_owned()?))
}

/// Errors after which the TUN device cannot be used again (as opposed to
/// one malformed packet, which is dropped).
fn is_device_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EBADFD | libc::ENODEV | libc::EIO)
    )
}

/// The source address the kernel would use for the tunnel's own (marked)
/// datagrams to `endpoint` now, or `None` without a route: a UDP socket
/// `connect` is a route lookup and sends nothing.
fn way_out(endpoint: SocketAddr, fwmark: u32) -> Option<IpAddr> {
    let bind: SocketAddr = match endpoint.ip() {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let probe = std::net::UdpSocket::bind(bind).ok()?;
    nix::sys::socket::setsockopt(&probe, nix::sys::socket::sockopt::Mark, &fwmark).ok()?;
    probe.connect(endpoint).ok()?;
    probe.local_addr().ok().map(|a| a.ip())
}

/// Sends one datagram; returns whether the kernel took it.
async fn send_datagram(shared: &Shared, udp: &UdpSocket, endpoint: SocketAddr, datagram: &[u8]) -> bool {
    shared.note_sent(datagram);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Encrypts a stand-in datagram of `size` bytes into the batch the way
    /// the packet task does; returns the runs sent as (segment, count, len).
    fn push(batch: &mut OutgoingBatch, size: usize, max: usize, sent: &mut Vec<(usize, usize, usize)>) {
        batch.slot()[..size].fill(size as u8);
        if !batch.fits(size, max) {
            sent.push((batch.segment, batch.count, batch.len));
            batch.restart_with_slot(size);
        }
        batch.commit(size);
    }

    #[test]
    fn equal_datagrams_share_one_send_and_a_shorter_one_ends_it() {
        let mut batch = OutgoingBatch::new(1500);
        let mut sent = Vec::new();
        for size in [1452, 1452, 1452, 300, 1452] {
            push(&mut batch, size, 64, &mut sent);
        }
        // Three full ones and the shorter tail went together; the next
        // full one starts a new send, and its bytes moved to the front.
        assert_eq!(sent, vec![(1452, 4, 3 * 1452 + 300)]);
        assert_eq!((batch.count, batch.len, batch.segment), (1, 1452, 1452));
        assert!(batch.buf[..1452].iter().all(|&b| b == 1452u16 as u8));
    }

    #[test]
    fn a_larger_datagram_starts_a_new_send() {
        let mut batch = OutgoingBatch::new(1500);
        let mut sent = Vec::new();
        for size in [96, 96, 1452] {
            push(&mut batch, size, 64, &mut sent);
        }
        assert_eq!(sent, vec![(96, 2, 192)]);
        assert_eq!(batch.segment, 1452);
    }

    #[test]
    fn a_send_stops_at_the_segment_limit_and_at_64_kib() {
        let mut batch = OutgoingBatch::new(1500);
        let mut sent = Vec::new();
        for _ in 0..5 {
            push(&mut batch, 1000, 2, &mut sent);
        }
        assert_eq!(sent, vec![(1000, 2, 2000), (1000, 2, 2000)]);

        let mut batch = OutgoingBatch::new(1500);
        let mut sent = Vec::new();
        for _ in 0..50 {
            push(&mut batch, 1452, 64, &mut sent);
        }
        // 44 * 1452 = 63 888 fits under MAX_GSO_BYTES; 45 would not.
        assert_eq!(sent, vec![(1452, 44, 44 * 1452)]);
        assert!(sent.iter().all(|&(_, _, len)| len <= MAX_GSO_BYTES));
    }

    #[test]
    fn pacing_lets_a_short_burst_through_and_then_waits() {
        let t0 = Instant::now();
        // 1 MB/s: 1000 bytes take 1 ms.
        let (done, wait) = pace(None, t0, 1000, 1e6);
        assert_eq!((done - t0, wait), (Duration::from_millis(1), None));
        let (done, wait) = pace(Some(done), t0, 1000, 1e6);
        assert_eq!((done - t0, wait), (Duration::from_millis(2), None));
        // The third millisecond is past the slack: wait until 1 ms.
        let (done, wait) = pace(Some(done), t0, 1000, 1e6);
        assert_eq!(done - t0, Duration::from_millis(3));
        assert_eq!(wait.map(|w| w - t0), Some(Duration::from_millis(1)));
        // After a pause the schedule starts from now, not from the past.
        let later = t0 + Duration::from_secs(1);
        let (done, wait) = pace(Some(done), later, 1000, 1e6);
        assert_eq!((done - later, wait), (Duration::from_millis(1), None));
    }

    #[test]
    fn without_gso_every_datagram_is_its_own_send() {
        let mut batch = OutgoingBatch::new(1500);
        let mut sent = Vec::new();
        for _ in 0..3 {
            push(&mut batch, 1452, 1, &mut sent);
        }
        assert_eq!(sent, vec![(1452, 1, 1452), (1452, 1, 1452)]);
    }
}
