//! Per-user limit on client TCP connections: the uid that owns the
//! client's end of a loopback connection, read from `/proc/net/tcp{,6}`,
//! and the slots each user holds.
//!
//! It only reads `/proc`; a client it cannot find counts as one shared
//! unknown user, never as a free pass.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use super::MAX_TCP_PER_USER;

/// One client TCP connection counted against its user; uncounts on drop.
pub(super) struct UserSlot {
    uid: u32,
    counts: Arc<Mutex<HashMap<u32, usize>>>,
}

impl UserSlot {
    /// A slot for `uid`, unless that user holds [`MAX_TCP_PER_USER`].
    pub(super) fn take(counts: &Arc<Mutex<HashMap<u32, usize>>>, uid: u32) -> Option<UserSlot> {
        let mut map = counts.lock().unwrap_or_else(|p| p.into_inner());
        let held = map.entry(uid).or_insert(0);
        if *held >= MAX_TCP_PER_USER {
            return None;
        }
        *held += 1;
        Some(UserSlot {
            uid,
            counts: counts.clone(),
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = map.get_mut(&self.uid) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

/// The uid that owns the client end of a loopback TCP connection: the
/// socket whose local address is `client` in `/proc/net/tcp` or
/// `/proc/net/tcp6` (its remote address is the stub's, or, when the
/// firewall redirected the connection, the server it was meant for). None
/// when it is not found (the caller counts all those as one user).
pub(super) fn client_uid(client: SocketAddr, stub: SocketAddr) -> Option<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        uid_in_proc_net_tcp(&text, client, stub)
    })
}

pub(super) fn uid_in_proc_net_tcp(text: &str, client: SocketAddr, stub: SocketAddr) -> Option<u32> {
    let same =
        |a: SocketAddr, b: SocketAddr| a.port() == b.port() && canonical_ip(a.ip()) == canonical_ip(b.ip());
    let mut fallback = None;
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(uid)) = (fields.get(1), fields.get(2), fields.get(7)) else {
            continue;
        };
        let (Some(local), Some(remote), Ok(uid)) = (
            proc_socket_addr(local),
            proc_socket_addr(remote),
            uid.parse::<u32>(),
        ) else {
            continue;
        };
        if !same(local, client) {
            continue;
        }
        if same(remote, stub) {
            return Some(uid);
        }
        fallback.get_or_insert(uid);
    }
    fallback
}

/// `0100007F:0035` or 32 hex digits and a port: each 32-bit word of the
/// address as the kernel holds it (network order read as a native word).
pub(super) fn proc_socket_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
