//! The shape of what the tunnel sends toward the gateway: how far each data
//! packet's plaintext is padded, and, in cover mode, when packets leave.
//!
//! Padding is zeros after the IP packet, inside the encryption: the inner IP
//! header's length lets every standard peer (wireguard-go, the kernel's
//! WireGuard, boringtun) trim it, so the gateway needs no change. boringtun
//! does not pad at all (cloudflare/boringtun issue 494) although the
//! WireGuard paper asks for a multiple of 16; wireguard-go does.
//!
//! Cover mode is a constant-rate envelope: one MTU-sized data packet every
//! [`COVER_INTERVAL`] for the whole session, a real packet when one waits in
//! the [`CoverQueue`] and a decoy otherwise. A decoy is a data packet whose
//! plaintext is all zeros: IP version 0, which wireguard-go ("Packet with
//! invalid IP version", verbose log only), the kernel's WireGuard (counted as
//! a frame error) and boringtun (`InvalidPacket`) drop after decryption
//! without touching the session.
//!
//! The envelope is a plain tokio interval rather than a `maybenot` machine:
//! a constant rate has no state and no randomness to express, and maybenot
//! leaves the timers, the blocking and the replacement of padding by real
//! packets to its host anyway, which is all this module does. A
//! probabilistic defence (DAITA-like bursts and delays) would be the time to
//! take maybenot.
//!
//! The gateway side built from this workspace (daemon/gateway,
//! `sessiongate-gateway`) shapes the other direction with the same padding,
//! envelope and decoys, one envelope per client.
//!
//! This module owns the padding rule of each shape, the cover queue and the
//! decoy. It never decides whether a packet may be sent (the allow filter
//! decides before a packet gets here) and never touches keys, the socket,
//! routes or the firewall.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub use crate::profile::TrafficShape;

/// The cover envelope's period: 500 packets a second toward the gateway.
/// A call of 2.5 Mbit/s video in ~1200-byte packets and 50 audio packets a
/// second needs about 310 slots a second; the headroom drains a video
/// frame's burst in ~20 ms. Whole milliseconds, because tokio's timer ticks
/// in milliseconds: a 2.5 ms period would alternate 2 and 3 ms gaps.
pub const COVER_INTERVAL: Duration = Duration::from_millis(2);

/// Encrypted real packets that may wait for a slot (128 ms of the
/// envelope); more are dropped, as a full router queue would, instead of
/// growing the delay.
pub const COVER_QUEUE_PACKETS: usize = 64;

/// Encrypted decoys kept ready for the sender thread (256 ms of the
/// envelope): the packet task tops them up when half are used, so a busy
/// moment of the packet task does not leave a slot empty.
pub const DECOY_RESERVE: usize = 128;

/// After falling this far behind (the machine was suspended or starved),
/// the envelope starts a new schedule instead of sending the backlog of
/// slots in a burst.
const MAX_LATE_SLOTS: u32 = 10;

/// WireGuard asks for plaintext padded to a multiple of this.
const PADDING_MULTIPLE: usize = 16;

/// How long a packet of `len` bytes is once padded for `shape`, for a tunnel
/// of `mtu`. Never shorter than the packet: a packet longer than the MTU
/// (which the TUN device does not hand over) would leave unpadded. Like
/// wireguard-go, spec padding stops at the MTU.
pub fn padded_len(len: usize, shape: TrafficShape, mtu: usize) -> usize {
    let target = match shape {
        TrafficShape::Spec => len.next_multiple_of(PADDING_MULTIPLE).min(mtu),
        TrafficShape::Pad | TrafficShape::Cover => mtu,
    };
    target.max(len)
}

/// Pads the packet in `buf[..len]` with zeros in place, as far as `shape`
/// asks and `buf` holds; returns the padded length.
pub fn pad_in_place(buf: &mut [u8], len: usize, shape: TrafficShape, mtu: usize) -> usize {
    let len = len.min(buf.len());
    let padded = padded_len(len, shape, mtu).min(buf.len());
    buf[len..padded].fill(0);
    padded
}

/// The cover envelope's sender: its own thread, so the slots keep their
/// clock however busy the packet task is (a tokio timer in the packet task
/// ticked late exactly when a call loaded it: the observer saw the call in
/// the gaps). The packet task encrypts, the thread only times and sends:
/// real datagrams first, a ready decoy otherwise. WireGuard's replay window
/// (thousands of counters) accepts the small reordering between decoys
/// encrypted ahead and real packets encrypted later.
pub struct CoverSender {
    shared: Arc<CoverShared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// A decoy's plaintext: MTU zeros, IP version 0.
    decoy: Vec<u8>,
}

/// What the packet task and the sender thread share.
pub struct CoverShared {
    queues: Mutex<CoverQueues>,
    stop: AtomicBool,
    /// Wakes the packet task to encrypt more decoys.
    decoys_low: Notify,
    /// Real packets dropped because the queue was full, not yet logged.
    pub dropped: AtomicU64,
    /// Slots that left empty (no real packet, no decoy ready).
    pub missed: AtomicU64,
}

struct CoverQueues {
    /// Where the slots go; the gateway side moves it when a client roams.
    endpoint: SocketAddr,
    real: VecDeque<Vec<u8>>,
    decoys: VecDeque<Vec<u8>>,
    /// Sent datagrams' buffers, for reuse.
    spare: Vec<Vec<u8>>,
}

impl CoverShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, CoverQueues> {
        // A panic elsewhere cannot leave the queues inconsistent: every
        // change is one push or pop.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves when the sender thread asks for more decoys.
    pub async fn decoys_low(&self) {
        self.decoys_low.notified().await;
    }
}

impl CoverSender {
    /// Starts the sender thread on `socket` (a duplicate of the tunnel's
    /// UDP socket, with its fwmark), sending to `endpoint`.
    pub fn start(
        socket: std::net::UdpSocket,
        endpoint: SocketAddr,
        mtu: usize,
    ) -> std::io::Result<CoverSender> {
        let shared = Arc::new(CoverShared {
            queues: Mutex::new(CoverQueues::new(endpoint)),
            stop: AtomicBool::new(false),
            decoys_low: Notify::new(),
            dropped: AtomicU64::new(0),
            missed: AtomicU64::new(0),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("sg-cover".into())
                .spawn(move || send_slots(&shared, &socket))?
        };
        Ok(CoverSender {
            shared,
            thread: Some(thread),
            decoy: vec![0; mtu],
        })
    }

    pub fn shared(&self) -> Arc<CoverShared> {
        self.shared.clone()
    }

    pub fn decoy_plaintext(&self) -> &[u8] {
        &self.decoy
    }

    /// A buffer of `len` bytes for the next datagram.
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        let mut buf = self.shared.lock().spare.pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    /// Queues an encrypted real packet for the next free slot; drops it
    /// (and counts it) when the queue is full.
    pub fn push_real(&self, datagram: Vec<u8>) {
        let mut q = self.shared.lock();
        if q.real.len() >= COVER_QUEUE_PACKETS {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            q.spare.push(datagram);
        } else {
            q.real.push_back(datagram);
        }
    }

    /// How many decoys the reserve lacks.
    pub fn decoys_wanted(&self) -> usize {
        DECOY_RESERVE.saturating_sub(self.shared.lock().decoys.len())
    }

    pub fn push_decoy(&self, datagram: Vec<u8>) {
        self.shared.lock().decoys.push_back(datagram);
    }

    /// Sends the next slots to `endpoint` (the gateway side follows a
    /// client that moved to another network; the client's own endpoint
    /// never changes during a session).
    pub fn set_endpoint(&self, endpoint: SocketAddr) {
        self.shared.lock().endpoint = endpoint;
    }
}

impl CoverQueues {
    fn new(endpoint: SocketAddr) -> CoverQueues {
        CoverQueues {
            endpoint,
            real: VecDeque::new(),
            decoys: VecDeque::new(),
            spare: Vec::new(),
        }
    }
}

/// Whether `datagram`, which boringtun answered with `error`, was an
/// authentic decoy from the peer: a data message (type 4, reserved bytes
/// zero, long enough to carry a tag) that decrypted, whose plaintext then
/// failed only the IP header check. boringtun reports a failed
/// authentication, a replay or an unknown session with other errors, and
/// `InvalidPacket` for a data message only after decrypting it. An
/// authentic decoy proves the peer alive like a keepalive does.
pub fn is_authentic_decoy(datagram: &[u8], error: &boringtun::noise::errors::WireGuardError) -> bool {
    datagram.len() > DATA_OVERHEAD
        && datagram[..4] == [4, 0, 0, 0]
        && matches!(error, boringtun::noise::errors::WireGuardError::InvalidPacket)
}

/// WireGuard's overhead on a data message: type, receiver, counter, tag.
const DATA_OVERHEAD: usize = 32;

impl Drop for CoverSender {
    /// Stops the thread and waits for it (at most one period), so nothing
    /// is sent after the tunnel is gone.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The sender thread: one slot every [`COVER_INTERVAL`] on an absolute
/// schedule (a late slot is made up at once, so the rate per second stays
/// constant), until told to stop.
fn send_slots(shared: &CoverShared, socket: &std::net::UdpSocket) {
    raise_priority();
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        next += COVER_INTERVAL;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > COVER_INTERVAL * MAX_LATE_SLOTS {
            next = now;
        }
        let (datagram, low, endpoint) = {
            let mut q = shared.lock();
            let datagram = q.real.pop_front().or_else(|| q.decoys.pop_front());
            (datagram, q.decoys.len() < DECOY_RESERVE / 2, q.endpoint)
        };
        if low {
            shared.decoys_low.notify_one();
        }
        let Some(datagram) = datagram else {
            shared.missed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        // The socket is non-blocking (shared with the packet task): a full
        // send buffer loses this slot, as a full link would.
        if let Err(e) = socket.send_to(&datagram, endpoint) {
            tracing::debug!("the cover envelope could not send to {endpoint}: {e}");
        }
        shared.lock().spare.push(datagram);
    }
}

/// Asks for the lowest real-time priority (SCHED_FIFO 1) for this thread:
/// on a busy machine a normal thread wakes late and the gaps between slots
/// change with the load, which a call adds to. The thread sleeps between
/// slots and sends one datagram per wake, so it cannot crowd out others.
/// Needs CAP_SYS_NICE (the shipped unit grants it, with
/// `RestrictRealtime=no`) or an RLIMIT_RTPRIO of at least 1; refused, the
/// envelope runs at normal priority.
fn raise_priority() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: changes only the calling thread's scheduling; `param` is a
    // valid sched_param.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if rc != 0 {
        tracing::debug!(
            "the cover envelope runs at normal priority (no real-time scheduling: {})",
            std::io::Error::from_raw_os_error(rc)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_pads_to_16_but_not_past_the_mtu() {
        let s = TrafficShape::Spec;
        assert_eq!(padded_len(0, s, 1420), 0);
        assert_eq!(padded_len(1, s, 1420), 16);
        assert_eq!(padded_len(84, s, 1420), 96);
        assert_eq!(padded_len(96, s, 1420), 96);
        assert_eq!(padded_len(1410, s, 1420), 1420);
        assert_eq!(padded_len(1420, s, 1420), 1420);
        assert_eq!(padded_len(1500, s, 1420), 1500);
    }

    #[test]
    fn pad_and_cover_fill_the_mtu() {
        for s in [TrafficShape::Pad, TrafficShape::Cover] {
            assert_eq!(padded_len(0, s, 1420), 1420);
            assert_eq!(padded_len(84, s, 1420), 1420);
            assert_eq!(padded_len(1420, s, 1420), 1420);
        }
    }

    #[test]
    fn padding_is_zeros_after_the_packet() {
        let mut buf = vec![0xaa; 1500];
        let padded = pad_in_place(&mut buf, 84, TrafficShape::Spec, 1420);
        assert_eq!(padded, 96);
        assert!(buf[..84].iter().all(|&b| b == 0xaa));
        assert!(buf[84..96].iter().all(|&b| b == 0));
        assert_eq!(buf[96], 0xaa);
        // A buffer shorter than the MTU is padded as far as it goes.
        let mut short = vec![0xaa; 100];
        assert_eq!(pad_in_place(&mut short, 84, TrafficShape::Pad, 1420), 100);
    }

    /// boringtun as the receiving peer (the gateway side a practice could
    /// run): it trims spec and pad padding by the inner IP length, drops a
    /// decoy as an invalid packet, and the session carries on after it.
    /// (wireguard-go does the same in the lab: tests/shape.rs.)
    #[test]
    fn a_boringtun_peer_trims_padding_and_drops_decoys_without_ending_the_session() {
        use boringtun::noise::{Tunn, TunnResult};
        use boringtun::x25519::{PublicKey, StaticSecret};

        let (secret_a, secret_b) = (
            StaticSecret::random_from_rng(rand_core::OsRng),
            StaticSecret::random_from_rng(rand_core::OsRng),
        );
        let (public_a, public_b) = (PublicKey::from(&secret_a), PublicKey::from(&secret_b));
        let mut client = Tunn::new(secret_a, public_b, None, None, 1, None);
        let mut gateway = Tunn::new(secret_b, public_a, None, None, 2, None);
        let (mut wire, mut out) = (vec![0u8; 2048], vec![0u8; 2048]);

        let TunnResult::WriteToNetwork(init) = client.format_handshake_initiation(&mut wire, false) else {
            panic!("no initiation");
        };
        let init = init.to_vec();
        let TunnResult::WriteToNetwork(response) = gateway.decapsulate(None, &init, &mut out) else {
            panic!("no response");
        };
        let response = response.to_vec();
        // The client's answer to the response (a keepalive) confirms the session.
        if let TunnResult::WriteToNetwork(keepalive) = client.decapsulate(None, &response, &mut wire) {
            let keepalive = keepalive.to_vec();
            assert!(matches!(
                gateway.decapsulate(None, &keepalive, &mut out),
                TunnResult::Done
            ));
        }

        // An 84-byte IPv4 packet (total length 84) from the client's address.
        let mut packet = vec![0u8; 1420];
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&84u16.to_be_bytes());
        packet[12..16].copy_from_slice(&[192, 0, 2, 66]);
        let mtu = 1420;
        let mut send = |client: &mut Tunn, plaintext: &[u8]| -> Vec<u8> {
            match client.encapsulate(plaintext, &mut wire) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                _ => panic!("no data packet"),
            }
        };
        for shape in [TrafficShape::Spec, TrafficShape::Pad] {
            let padded = padded_len(84, shape, mtu);
            let datagram = send(&mut client, &packet[..padded]);
            assert_eq!(datagram.len(), padded + 32);
            match gateway.decapsulate(None, &datagram, &mut out) {
                TunnResult::WriteToTunnelV4(p, _) => assert_eq!(p.len(), 84, "{shape:?}: trimmed"),
                _ => panic!("{shape:?}: the padded packet did not come out"),
            }
        }
        let decoy = send(&mut client, &vec![0u8; mtu]);
        assert_eq!(decoy.len(), mtu + 32);
        match gateway.decapsulate(None, &decoy, &mut out) {
            TunnResult::Err(e) => assert!(is_authentic_decoy(&decoy, &e), "a decoy: {e:?}"),
            _ => panic!("the decoy came out as a packet"),
        }
        // A forged one (a flipped bit in the ciphertext) is not a decoy.
        let mut forged = send(&mut client, &vec![0u8; mtu]);
        forged[40] ^= 1;
        match gateway.decapsulate(None, &forged, &mut out) {
            TunnResult::Err(e) => assert!(!is_authentic_decoy(&forged, &e), "forged: {e:?}"),
            _ => panic!("the forged decoy came out as a packet"),
        }
        let after = send(&mut client, &packet[..96]);
        assert!(
            matches!(gateway.decapsulate(None, &after, &mut out), TunnResult::WriteToTunnelV4(p, _) if p.len() == 84),
            "the session carries on after a decoy"
        );
    }

    /// A sender on a socket pair in this process (no network): real
    /// datagrams go before decoys, one per slot, in order.
    #[test]
    fn real_packets_take_the_place_of_decoys_in_order() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        receiver
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let sender_socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = receiver.local_addr().expect("addr");
        let sender = CoverSender::start(sender_socket, to, 64).expect("start");
        // Decoys first into the reserve, then real packets: reals leave first.
        for d in [b"decoy-1", b"decoy-2"] {
            let mut buf = sender.buffer(7);
            buf.copy_from_slice(d);
            sender.push_decoy(buf);
        }
        for r in [b"real-1", b"real-2"] {
            let mut buf = sender.buffer(6);
            buf.copy_from_slice(r);
            sender.push_real(buf);
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..4 {
            let n = receiver.recv(&mut buf).expect("a slot");
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        assert_eq!(got, ["real-1", "real-2", "decoy-1", "decoy-2"]);
        drop(sender);
    }

    #[test]
    fn a_full_queue_drops_the_newest() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let sender = CoverSender {
            shared: Arc::new(CoverShared {
                queues: Mutex::new(CoverQueues::new(socket.local_addr().expect("addr"))),
                stop: AtomicBool::new(true),
                decoys_low: Notify::new(),
                dropped: AtomicU64::new(0),
                missed: AtomicU64::new(0),
            }),
            thread: None,
            decoy: vec![0; 64],
        };
        drop(socket);
        for _ in 0..COVER_QUEUE_PACKETS + 3 {
            sender.push_real(vec![0x45; 40]);
        }
        assert_eq!(sender.shared.lock().real.len(), COVER_QUEUE_PACKETS);
        assert_eq!(sender.shared.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(sender.decoys_wanted(), DECOY_RESERVE);
        assert!(sender.decoy_plaintext().iter().all(|&b| b == 0), "IP version 0");
    }
}
