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
//! This module owns the padding rule of each shape, the cover queue and the
//! decoy. It never decides whether a packet may be sent (the allow filter
//! decides before a packet gets here) and never touches keys, the socket,
//! routes or the firewall.

use std::time::Duration;

pub use crate::profile::TrafficShape;

/// The cover envelope's period: 500 packets a second toward the gateway.
/// A call of 2.5 Mbit/s video in ~1200-byte packets and 50 audio packets a
/// second needs about 310 slots a second; the headroom drains a video
/// frame's burst in ~20 ms. Whole milliseconds, because tokio's timer ticks
/// in milliseconds: a 2.5 ms period would alternate 2 and 3 ms gaps.
pub const COVER_INTERVAL: Duration = Duration::from_millis(2);

/// Real packets that may wait for a slot (128 ms of the envelope); more are
/// dropped, as a full router queue would, instead of growing the delay.
pub const COVER_QUEUE_PACKETS: usize = 64;

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

/// Real packets waiting for a slot of the cover envelope, already padded to
/// the MTU, in buffers allocated once per tunnel.
pub struct CoverQueue {
    slots: Vec<Vec<u8>>,
    /// Each slot's packet length before padding (what `tx_bytes` counts).
    lens: Vec<usize>,
    head: usize,
    count: usize,
    mtu: usize,
    /// A decoy's plaintext: MTU zeros, IP version 0.
    decoy: Vec<u8>,
    /// Packets dropped because the queue was full, not yet logged.
    pub dropped: u64,
}

/// What the next slot of the envelope carries.
pub enum Slot<'a> {
    /// A real packet (padded) and its length before padding.
    Real(&'a [u8], usize),
    Decoy(&'a [u8]),
}

impl CoverQueue {
    pub fn new(mtu: usize) -> CoverQueue {
        CoverQueue {
            slots: vec![vec![0; mtu]; COVER_QUEUE_PACKETS],
            lens: vec![0; COVER_QUEUE_PACKETS],
            head: 0,
            count: 0,
            mtu,
            decoy: vec![0; mtu],
            dropped: 0,
        }
    }

    /// Queues a copy of `packet`, padded to the MTU; drops it (and counts
    /// it) when the queue is full.
    pub fn push(&mut self, packet: &[u8]) {
        if self.count == self.slots.len() || packet.len() > self.mtu {
            self.dropped += 1;
            return;
        }
        let at = (self.head + self.count) % self.slots.len();
        let slot = &mut self.slots[at];
        slot[..packet.len()].copy_from_slice(packet);
        slot[packet.len()..].fill(0);
        self.lens[at] = packet.len();
        self.count += 1;
    }

    /// The oldest real packet, or a decoy when none waits. `decoy_allowed`
    /// false (no session keys yet) gives `None` instead of a decoy.
    pub fn next(&mut self, decoy_allowed: bool) -> Option<Slot<'_>> {
        if self.count == 0 {
            return decoy_allowed.then_some(Slot::Decoy(&self.decoy));
        }
        let at = self.head;
        self.head = (self.head + 1) % self.slots.len();
        self.count -= 1;
        Some(Slot::Real(&self.slots[at], self.lens[at]))
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
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

    #[test]
    fn real_packets_take_the_place_of_decoys_in_order() {
        let mut q = CoverQueue::new(64);
        assert!(q.next(false).is_none(), "no decoy before the session has keys");
        match q.next(true) {
            Some(Slot::Decoy(d)) => assert!(d.len() == 64 && d[0] >> 4 == 0),
            _ => panic!("expected a decoy"),
        }
        q.push(&[0x45; 20]);
        q.push(&[0x46; 30]);
        match q.next(false) {
            Some(Slot::Real(p, 20)) => {
                assert_eq!(p.len(), 64);
                assert!(p[..20].iter().all(|&b| b == 0x45) && p[20..].iter().all(|&b| b == 0));
            }
            _ => panic!("expected the first packet"),
        }
        assert!(matches!(q.next(true), Some(Slot::Real(_, 30))));
        assert!(matches!(q.next(true), Some(Slot::Decoy(_))));
    }

    #[test]
    fn a_full_queue_drops_the_newest() {
        let mut q = CoverQueue::new(64);
        for _ in 0..COVER_QUEUE_PACKETS + 3 {
            q.push(&[0x45; 40]);
        }
        assert_eq!(q.len(), COVER_QUEUE_PACKETS);
        assert_eq!(q.dropped, 3);
        q.push(&[0x45; 65]);
        assert_eq!(q.dropped, 4, "a packet longer than the MTU is dropped too");
    }
}
