//! The name policy: which names the stub answers (the profile's allowed
//! names, and the CNAME targets its own answers for them led to, each
//! remembered under the allowed name it came from, for a bounded time), how
//! a name is compared, and what an answer says (its CNAME chain and
//! addresses).
//!
//! Pure: no sockets, no clock of its own (callers pass `now`). It never
//! allows a name on a stranger's word: only an answer the stub itself
//! received for an allowed name can teach it a target.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::rdata::svcb::{IpHint, SvcParamValue, SVCB};
use hickory_proto::rr::rdata::HTTPS;
use hickory_proto::rr::{Name, RData};

use super::{Addresses, LEARNED_TTL_MAX, LEARNED_TTL_MIN, MAX_CHAIN, MAX_LEARNED};

/// A CNAME target the stub saw in an answer for an allowed name.
pub(super) struct Learned {
    /// The allowed name whose chain led here.
    origin: String,
    expires: Instant,
}

#[derive(Default)]
pub(super) struct Names {
    pub(super) allowed: HashSet<String>,
    pub(super) learned: HashMap<String, Learned>,
}

impl Names {
    pub(super) fn set_allowed(&mut self, names: &[String]) {
        self.allowed = names.iter().filter_map(|n| canonical_name(n)).collect();
        let allowed = &self.allowed;
        self.learned.retain(|_, l| allowed.contains(&l.origin));
    }

    /// The allowed name `key` answers for, if it is allowed at all.
    pub(super) fn origin_of(&self, key: &str, now: Instant) -> Option<String> {
        if self.allowed.contains(key) {
            return Some(key.to_string());
        }
        self.learned
            .get(key)
            .filter(|l| l.expires > now && self.allowed.contains(&l.origin))
            .map(|l| l.origin.clone())
    }

    pub(super) fn learn(&mut self, target: String, origin: &str, ttl: u32, now: Instant) {
        if self.allowed.contains(&target) || !self.allowed.contains(origin) {
            return;
        }
        let expires = now + Duration::from_secs(u64::from(ttl.clamp(LEARNED_TTL_MIN, LEARNED_TTL_MAX)));
        if let Some(known) = self.learned.get_mut(&target) {
            if known.origin == origin || known.expires <= now {
                known.origin = origin.to_string();
                known.expires = known.expires.max(expires);
            }
            return;
        }
        if self.learned.len() >= MAX_LEARNED {
            self.learned.retain(|_, l| l.expires > now);
            if self.learned.len() >= MAX_LEARNED {
                return;
            }
        }
        self.learned.insert(
            target,
            Learned {
                origin: origin.to_string(),
                expires,
            },
        );
    }
}

/// A wire name as the allowlist compares it: lower case, no trailing dot,
/// odd bytes escaped (so a label holding a dot never equals two labels).
pub(super) fn name_key(name: &Name) -> String {
    let mut out = String::new();
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        for &b in label {
            match b {
                b'.' | b'\\' => {
                    out.push('\\');
                    out.push(char::from(b));
                }
                0x21..=0x7e => out.push(char::from(b.to_ascii_lowercase())),
                _ => {
                    let _ = write!(out, "\\{b:03}");
                }
            }
        }
    }
    out
}

/// A profile's host name as the stub compares it, and as it names it to the
/// [`AnswerSink`] and in [`StubResolver::resolve_all`]: lower case, no
/// trailing dot, IDNs as punycode. None for an empty name.
pub fn canonical_name(name: &str) -> Option<String> {
    let trimmed = name.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return None;
    }
    match Name::from_utf8(trimmed) {
        Ok(parsed) => Some(name_key(&parsed)).filter(|k| !k.is_empty()),
        Err(_) => Some(trimmed.to_ascii_lowercase()),
    }
}

/// What an answer means for the allowlist: the CNAME targets reached from
/// the question (each with the smallest TTL along the chain so far) and the
/// addresses owned by a name on that chain, with their TTLs. Records for
/// names off the chain are ignored.
///
/// Public so that the fuzz targets (fuzz/) can feed it arbitrary answers; a
/// pure function of its arguments.
pub fn digest(question: &Name, response: &Message) -> (Vec<(String, u32)>, Addresses) {
    let mut chain: Vec<&Name> = vec![question];
    let mut targets = Vec::new();
    let mut chain_ttl = u32::MAX;
    for _ in 0..MAX_CHAIN {
        let Some(current) = chain.last() else { break };
        let next = response.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name == **current => Some((&target.0, r.ttl)),
            _ => None,
        });
        let Some((target, ttl)) = next else { break };
        if chain.contains(&target) {
            break;
        }
        chain_ttl = chain_ttl.min(ttl);
        targets.push((name_key(target), chain_ttl));
        chain.push(target);
    }

    let mut addrs: Addresses = Vec::new();
    let mut add = |ip: IpAddr, ttl: u32| add_address(&mut addrs, ip, ttl);
    for record in response.answers.iter().filter(|r| chain.contains(&&r.name)) {
        match &record.data {
            RData::A(a) => add(IpAddr::V4(a.0), record.ttl),
            RData::AAAA(aaaa) => add(IpAddr::V6(aaaa.0), record.ttl),
            RData::SVCB(svcb) | RData::HTTPS(HTTPS(svcb)) => {
                for ip in svcb_hints(svcb) {
                    add(ip, record.ttl);
                }
            }
            _ => {}
        }
    }
    (targets, addrs)
}

/// Adds an address once, keeping its longest TTL.
pub(super) fn add_address(addrs: &mut Addresses, ip: IpAddr, ttl: u32) {
    match addrs.iter_mut().find(|(a, _)| *a == ip) {
        Some(known) => known.1 = known.1.max(ttl),
        None => addrs.push((ip, ttl)),
    }
}

fn svcb_hints(svcb: &SVCB) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (_, value) in &svcb.svc_params {
        match value {
            SvcParamValue::Ipv4Hint(IpHint(hints)) => out.extend(hints.iter().map(|a| IpAddr::V4(a.0))),
            SvcParamValue::Ipv6Hint(IpHint(hints)) => out.extend(hints.iter().map(|a| IpAddr::V6(a.0))),
            _ => {}
        }
    }
    out
}
