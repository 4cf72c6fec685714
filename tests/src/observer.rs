//! An observer on the path, and the statistic it judges with.
//!
//! [`Observer`] records what the local network or the provider sees of the
//! tunnel: the size and arrival time of every WireGuard datagram the client
//! sends toward the gateway (or, with [`Direction::ToClient`], the gateway
//! sends back), taken by a packet socket (AF_PACKET) in the router's
//! namespace on its interface toward the client, with the kernel's
//! timestamps (the recorder's own scheduling does not move them).
//! [`ks_distance`] is the two-sample Kolmogorov-Smirnov distance the shape
//! test compares windows with. [`CallFlow`] is a call-shaped UDP generator
//! (audio 50 packets/s of 120 bytes, video 2.5 Mbit/s in 30 frames/s
//! bursts) run from the client namespace.
//!
//! This module only listens on the router and only sends to the video
//! host's echo port from the client; it never touches the host namespace
//! (each thread enters the lab namespace it works in, and dies with it).

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::lab::{addr, Lab, Ns};

/// One datagram the observer saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seen {
    /// Kernel receive time, seconds (CLOCK_REALTIME).
    pub at: f64,
    /// UDP payload length: the whole WireGuard message.
    pub len: usize,
    /// WireGuard message type (1 initiation, 2 response, 3 cookie, 4 data).
    pub kind: u8,
}

/// WireGuard's overhead on a data packet: type, receiver, counter (16) and
/// the Poly1305 tag (16).
pub const WG_DATA_OVERHEAD: usize = 32;

/// Which way the observer looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// What the client sends toward the gateway (arriving at the router).
    ToGateway,
    /// What the gateway sends back to the client (the router sending it on
    /// toward the client).
    ToClient,
}

/// Records WireGuard datagrams of one direction between client and gateway
/// on the router's interface toward the client, until dropped.
pub struct Observer {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Observer {
    /// Starts recording on the router's interface toward the client; returns
    /// once the socket is open (packets from then on are recorded).
    pub fn start(lab: &Lab) -> Result<Observer> {
        Self::start_looking(lab, Direction::ToGateway)
    }

    /// `start`, for the datagrams of `direction`.
    pub fn start_looking(lab: &Lab, direction: Direction) -> Result<Observer> {
        let router = lab.ns_name(Ns::Router).to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || -> Result<()> {
                let socket = enter_namespace(&router)
                    .and_then(|()| open_packet_socket(addr::ROUTER_CLIENT_IF, direction));
                let socket = match socket {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                record(&socket, &seen, &stop, direction)
            })
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Observer {
                seen,
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => bail!("the observer could not start: {e}"),
            Err(_) => bail!("the observer did not start within 10 s"),
        }
    }

    /// Forgets what was recorded so far.
    pub fn clear(&self) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// What was recorded since the last `clear` or `take`.
    pub fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves the calling thread into the network namespace `name` (created by
/// `ip netns add`). Only ever called on a thread of our own.
pub fn enter_namespace(name: &str) -> Result<()> {
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid descriptor of a namespace file; setns affects only
    // this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("entering {name}"));
    }
    Ok(())
}

/// A raw AF_PACKET socket for IPv4 on `interface`, with kernel timestamps and
/// a 100 ms receive timeout (so the thread sees `stop`). Only a socket for
/// every protocol (ETH_P_ALL) sees what the router sends: the kernel hands
/// outgoing packets to those taps alone.
fn open_packet_socket(interface: &str, direction: Direction) -> Result<OwnedFd> {
    let proto = match direction {
        Direction::ToGateway => libc::ETH_P_IP as u16,
        Direction::ToClient => libc::ETH_P_ALL as u16,
    }
    .to_be();
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a packet socket");
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(interface).context("interface name")?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {interface} in the router's namespace");
    }
    // SAFETY: zeroed sockaddr_ll is valid; we fill the fields bind reads.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: a valid sockaddr_ll and its size.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::from_ref(&sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("binding the packet socket");
    }
    set_int(&socket, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
    // The client's veth hands the router UDP GSO trains whole; the virtio
    // header says how the wire would carry them (see `on_the_wire`).
    set_int(&socket, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
    // A call plus the cover envelope is ~1000 packets/s; the thread may be
    // late by a scheduler slice on a busy machine.
    set_int(&socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20)?;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a valid timeval and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO");
    }
    Ok(socket)
}

fn set_int(socket: &OwnedFd, level: i32, name: i32, value: i32) -> Result<()> {
    // SAFETY: a valid c_int option and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setsockopt {name}"));
    }
    Ok(())
}

/// Receives until `stop`, keeping the WireGuard datagrams of `direction`.
fn record(socket: &OwnedFd, seen: &Mutex<Vec<Seen>>, stop: &AtomicBool, direction: Direction) -> Result<()> {
    let gateway: Ipv4Addr = addr::GATEWAY_V4.parse().context("gateway address")?;
    let mut packet = vec![0u8; 65_536];
    // u64s: the control buffer must be aligned for cmsghdr.
    let mut control = [0u64; 16];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: zeroed sockaddr_ll and msghdr are valid; every pointer
        // below points into a live buffer of the stated length.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: packet.as_mut_ptr().cast(),
            iov_len: packet.len(),
        };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = std::ptr::from_mut(&mut from).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: msg describes the buffers above.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e).context("receiving on the packet socket"),
            }
        }
        // What arrives from the client, or what the router sends to it.
        if (from.sll_pkttype == libc::PACKET_OUTGOING) != (direction == Direction::ToClient) {
            continue;
        }
        let Some(at) = timestamp(&msg) else { continue };
        // Raw (the virtio header needs it): virtio header, Ethernet header,
        // then the IP packet.
        let Some((vnet, frame)) = packet[..n as usize].split_at_checked(VNET_HDR_LEN) else {
            continue;
        };
        // IPv4 only (the socket toward the client takes every protocol).
        if frame.get(12..14) != Some(&[0x08, 0x00][..]) {
            continue;
        }
        let Some(ip) = frame.get(ETHERNET_HDR_LEN..) else {
            continue;
        };
        let datagram = match direction {
            Direction::ToGateway => wireguard_to(ip, gateway, addr::WG_PORT),
            Direction::ToClient => wireguard_from(ip, gateway, addr::WG_PORT),
        };
        if let Some((len, kind)) = datagram {
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            for len in on_the_wire(vnet, len) {
                seen.push(Seen { at, len, kind });
            }
        }
    }
    Ok(())
}

/// The SCM_TIMESTAMPNS of a received message, in seconds.
fn timestamp(msg: &libc::msghdr) -> Option<f64> {
    // SAFETY: the CMSG macros walk the control buffer recvmsg filled, whose
    // length it set in msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                return Some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9);
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    None
}

/// struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset.
const VNET_HDR_LEN: usize = 10;
const ETHERNET_HDR_LEN: usize = 14;
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;

/// The datagram sizes a UDP payload of `len` bytes leaves as: one, or for a
/// UDP GSO train, `gso_size`-byte datagrams and a shorter last one.
pub fn on_the_wire(vnet: &[u8], len: usize) -> Vec<usize> {
    let gso_size = usize::from(u16::from_ne_bytes([vnet[4], vnet[5]]));
    if vnet[1] != VIRTIO_NET_HDR_GSO_UDP_L4 || gso_size == 0 {
        return vec![len];
    }
    let mut sizes = vec![gso_size; len / gso_size];
    if len % gso_size > 0 {
        sizes.push(len % gso_size);
    }
    sizes
}

/// The UDP payload length and first byte of an IPv4 UDP packet to
/// `gateway:port`, or None for anything else.
pub fn wireguard_to(ip: &[u8], gateway: Ipv4Addr, port: u16) -> Option<(usize, u8)> {
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != libc::IPPROTO_UDP as u8 {
        return None;
    }
    let header = usize::from(ip[0] & 0x0f) * 4;
    if Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]) != gateway || ip.len() < header + 9 {
        return None;
    }
    let udp = &ip[header..];
    if u16::from_be_bytes([udp[2], udp[3]]) != port {
        return None;
    }
    // From the IP length: a GSO train's UDP length field is not its size.
    let ip_len = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    Some((ip_len.checked_sub(header + 8)?, udp[8]))
}

/// The UDP payload length and first byte of an IPv4 UDP packet from
/// `gateway:port`, or None for anything else.
pub fn wireguard_from(ip: &[u8], gateway: Ipv4Addr, port: u16) -> Option<(usize, u8)> {
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != libc::IPPROTO_UDP as u8 {
        return None;
    }
    let header = usize::from(ip[0] & 0x0f) * 4;
    if Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]) != gateway || ip.len() < header + 9 {
        return None;
    }
    let udp = &ip[header..];
    if u16::from_be_bytes([udp[0], udp[1]]) != port {
        return None;
    }
    let ip_len = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    Some((ip_len.checked_sub(header + 8)?, udp[8]))
}

/// The two-sample Kolmogorov-Smirnov distance: the largest gap between the
/// two empirical distribution functions (0 = same, 1 = disjoint). Ties are
/// taken together, so discrete samples (sizes, gaps in whole milliseconds)
/// are compared correctly. An empty sample against a non-empty one is 1.
pub fn ks_distance(a: &[f64], b: &[f64]) -> f64 {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => return 0.0,
        (true, false) | (false, true) => return 1.0,
        _ => {}
    }
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let v = a[i].min(b[j]);
        while i < a.len() && a[i] <= v {
            i += 1;
        }
        while j < b.len() && b[j] <= v {
            j += 1;
        }
        d = d.max((i as f64 / na - j as f64 / nb).abs());
    }
    d
}

/// Sizes of the datagrams, as the KS statistic takes them.
pub fn sizes(seen: &[Seen]) -> Vec<f64> {
    seen.iter().map(|s| s.len as f64).collect()
}

/// Gaps between consecutive datagrams in 1 ms bins (rounded to the nearest
/// millisecond, so a steady 2 ms clock with sub-millisecond jitter stays in
/// one bin).
pub fn gaps_ms(seen: &[Seen]) -> Vec<f64> {
    seen.windows(2)
        .map(|w| ((w[1].at - w[0].at) * 1000.0).round())
        .collect()
}

/// A call-shaped UDP flow from the client to the video host's echo port
/// (the echoes come back through the tunnel, as the other side's media
/// would): audio, 50 packets/s of 120 bytes; video, 2.5 Mbit/s as 30 frames
/// a second, each frame ~10.4 kB sent back to back in 1200-byte packets.
/// Before [`CallFlow::call`] and after [`CallFlow::hang_up`] only a
/// background of one 60-byte packet every 250 ms flows (an application's
/// signalling), so a window "without a call" is not empty.
pub struct CallFlow {
    in_call: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Call packets sent, and echoes received.
    pub sent: Arc<AtomicU64>,
    pub echoed: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

const AUDIO_BYTES: usize = 120;
const AUDIO_EVERY: Duration = Duration::from_millis(20);
const VIDEO_PACKET_BYTES: usize = 1200;
/// 2.5 Mbit/s at 30 frames/s.
const VIDEO_FRAME_BYTES: usize = 2_500_000 / 8 / 30;
const VIDEO_EVERY: Duration = Duration::from_micros(33_333);
const BACKGROUND_BYTES: usize = 60;
const BACKGROUND_EVERY: Duration = Duration::from_millis(250);

impl CallFlow {
    pub fn start(lab: &Lab, port: u16) -> Result<CallFlow> {
        let client = lab.ns_name(Ns::Client).to_string();
        let in_call = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let echoed = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (in_call, stop, sent, echoed) = (in_call.clone(), stop.clone(), sent.clone(), echoed.clone());
            std::thread::spawn(move || -> Result<()> {
                let socket = enter_namespace(&client).and_then(|()| {
                    let s = UdpSocket::bind("0.0.0.0:0").context("binding the call socket")?;
                    s.connect((addr::HOST_V4, port))
                        .context("connecting the call socket")?;
                    s.set_nonblocking(true).context("non-blocking")?;
                    Ok(s)
                });
                let socket = match socket {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                run_flow(&socket, &in_call, &stop, &sent, &echoed);
                Ok(())
            })
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(CallFlow {
                in_call,
                stop,
                sent,
                echoed,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(anyhow!("the call generator could not start: {e}")),
            Err(_) => bail!("the call generator did not start within 10 s"),
        }
    }

    pub fn call(&self) {
        self.in_call.store(true, Ordering::Relaxed);
    }

    pub fn hang_up(&self) {
        self.in_call.store(false, Ordering::Relaxed);
    }
}

impl Drop for CallFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The generator's loop: sends what is due, reads echoes, sleeps until the
/// next thing is due (at most 1 ms, to drain echoes).
fn run_flow(
    socket: &UdpSocket,
    in_call: &AtomicBool,
    stop: &AtomicBool,
    sent: &AtomicU64,
    echoed: &AtomicU64,
) {
    let start = Instant::now();
    let (mut next_audio, mut next_video, mut next_background) = (start, start, start);
    let payload = [0x5au8; VIDEO_PACKET_BYTES];
    let mut echo = [0u8; 2048];
    // Counts only the call's own packets (the background is not "the call").
    let send = |bytes: usize, counted: bool| {
        if socket.send(&payload[..bytes]).is_ok() && counted {
            sent.fetch_add(1, Ordering::Relaxed);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let calling = in_call.load(Ordering::Relaxed);
        if now >= next_background {
            send(BACKGROUND_BYTES, false);
            next_background += BACKGROUND_EVERY;
        }
        if now >= next_audio {
            if calling {
                send(AUDIO_BYTES, true);
            }
            next_audio += AUDIO_EVERY;
        }
        if now >= next_video {
            if calling {
                let mut left = VIDEO_FRAME_BYTES;
                while left > 0 {
                    let bytes = left.min(VIDEO_PACKET_BYTES);
                    send(bytes, true);
                    left -= bytes;
                }
            }
            next_video += VIDEO_EVERY;
        }
        // labhost answers `peer=ADDR PAYLOAD`: the background's answers are
        // shorter than any call packet's.
        while let Ok(n) = socket.recv(&mut echo) {
            if n > AUDIO_BYTES {
                echoed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let due = next_audio.min(next_video).min(next_background);
        std::thread::sleep(
            due.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(1)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ks_distance_of_equal_disjoint_and_shifted_samples() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(ks_distance(&a, &a), 0.0);
        assert_eq!(ks_distance(&a, &[10.0, 11.0]), 1.0);
        assert_eq!(ks_distance(&a, &[]), 1.0);
        assert_eq!(ks_distance(&[], &[]), 0.0);
        // Half of a's mass lies below all of b.
        assert_eq!(ks_distance(&a, &[3.0, 4.0]), 0.5);
    }

    #[test]
    fn ks_distance_takes_ties_together() {
        // Same distribution of whole-millisecond gaps in another order and
        // count: distance 0, not the artefact of stepping through ties.
        let a = [2.0, 2.0, 3.0, 2.0];
        let b = [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 3.0, 2.0];
        assert_eq!(ks_distance(&a, &b), 0.0);
        let c = [2.0, 3.0];
        assert!((ks_distance(&a, &c) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn only_udp_to_the_gateway_port_is_wireguard() {
        let mut ip = vec![0u8; 20 + 8 + 148];
        ip[0] = 0x45;
        ip[9] = 17;
        ip[16..20].copy_from_slice(&[198, 51, 100, 2]);
        ip[22..24].copy_from_slice(&51820u16.to_be_bytes());
        ip[2..4].copy_from_slice(&(20u16 + 8 + 148).to_be_bytes());
        ip[24..26].copy_from_slice(&(8u16 + 148).to_be_bytes());
        ip[28] = 1;
        let gw = Ipv4Addr::new(198, 51, 100, 2);
        assert_eq!(wireguard_to(&ip, gw, 51820), Some((148, 1)));
        assert_eq!(wireguard_to(&ip, gw, 53), None);
        assert_eq!(wireguard_to(&ip, Ipv4Addr::new(198, 51, 100, 3), 51820), None);
        // The other way: from the gateway's port to the client.
        let mut back = ip.clone();
        back[12..16].copy_from_slice(&[198, 51, 100, 2]);
        back[16..20].copy_from_slice(&[192, 0, 2, 2]);
        back[20..22].copy_from_slice(&51820u16.to_be_bytes());
        back[22..24].copy_from_slice(&40000u16.to_be_bytes());
        assert_eq!(wireguard_from(&back, gw, 51820), Some((148, 1)));
        assert_eq!(wireguard_to(&back, gw, 51820), None);
        assert_eq!(wireguard_from(&ip, gw, 51820), None);
        ip[9] = 6;
        assert_eq!(wireguard_to(&ip, gw, 51820), None);
        assert_eq!(wireguard_to(&ip[..10], gw, 51820), None);
    }

    #[test]
    fn a_gso_train_is_counted_as_the_datagrams_it_leaves_as() {
        let mut vnet = [0u8; VNET_HDR_LEN];
        assert_eq!(on_the_wire(&vnet, 1452), vec![1452]);
        vnet[1] = VIRTIO_NET_HDR_GSO_UDP_L4;
        vnet[4..6].copy_from_slice(&1452u16.to_ne_bytes());
        assert_eq!(on_the_wire(&vnet, 3 * 1452 + 100), vec![1452, 1452, 1452, 100]);
        assert_eq!(on_the_wire(&vnet, 2 * 1452), vec![1452, 1452]);
    }

    #[test]
    fn gaps_are_rounded_to_whole_milliseconds() {
        let seen: Vec<Seen> = [0.0, 0.0021, 0.0039, 0.0100]
            .iter()
            .map(|&at| Seen {
                at,
                len: 1452,
                kind: 4,
            })
            .collect();
        assert_eq!(gaps_ms(&seen), vec![2.0, 2.0, 6.0]);
    }
}
