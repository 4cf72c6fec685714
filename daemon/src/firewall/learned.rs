//! Learned addresses: the DNS stub's answers as elements of the answer
//! sets (`allow4`/`allow6` with a timeout, `known4`/`known6` without),
//! how a new answer merges with a remembered one, and which answers a
//! narrowed allowlist forgets.
//!
//! A name's port *range* (`udp = ["50000-60000"]`) gets sets of its own,
//! named after it ([`range_set_name`]: `allow4_udp_50000_60000` with a
//! timeout, `known4_udp_50000_60000` without), holding addresses only; the
//! rules that use them match the range. Not one set of `address . proto .
//! port-interval` elements: the kernel takes those (`flags interval,
//! timeout`), but nft 1.0.6's `nft -j monitor` prints nothing for an
//! element added to a concatenated interval set and crashes (SIGSEGV) on
//! the second such event, so the tamper guard would neither see a foreign
//! element there nor keep its monitor running while answers arrive.
//!
//! It owns the element batches and the bookkeeping rules for answers. It
//! never runs nft and never widens: an answer whose name and port the
//! allowlist in force does not hold is dropped, not added.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nftables::batch::Batch;
use nftables::expr::{Elem, Expression, NamedExpression};
use nftables::schema::{Element, NfListObject};
use nftables::types::NfFamily;

use super::expr::{canonical, concat, num, s};
use super::{
    LearnedAddress, LearnedKey, NamedEntry, PortRange, ALLOW4, ALLOW6, KNOWN4, KNOWN6, TABLE, TCP, UDP,
};

/// The set that holds the answers for one port range of the allowed names
/// (`known`: the established-flow set, without timeout), e.g.
/// `allow4_udp_50000_60000`. Single ports stay in `allow4`/`known4` etc.
pub fn range_set_name(v6: bool, known: bool, proto: u8, ports: PortRange) -> String {
    let kind = match (known, v6) {
        (false, false) => ALLOW4,
        (false, true) => ALLOW6,
        (true, false) => KNOWN4,
        (true, true) => KNOWN6,
    };
    let proto = if proto == TCP { "tcp" } else { "udp" };
    format!("{kind}_{proto}_{}_{}", ports.first, ports.last)
}

/// The protocol and range of a set named by [`range_set_name`].
pub(super) fn parse_range_set_name(name: &str) -> Option<(u8, PortRange)> {
    let mut parts = name.split('_');
    let kind = parts.next()?;
    if ![ALLOW4, ALLOW6, KNOWN4, KNOWN6].contains(&kind) {
        return None;
    }
    let proto = match parts.next()? {
        "tcp" => TCP,
        "udp" => UDP,
        _ => return None,
    };
    let first = parts.next()?.parse().ok()?;
    let last = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((proto, PortRange::new(first, last)?))
}

/// The distinct (protocol, range) of the names' port ranges: one group of
/// four sets (allow and known, IPv4 and IPv6) each.
pub(super) fn name_ranges(names: &[NamedEntry]) -> BTreeSet<(u8, PortRange)> {
    let mut ranges = BTreeSet::new();
    for name in names {
        for (proto, list) in [(TCP, &name.tcp), (UDP, &name.udp)] {
            ranges.extend(list.iter().filter(|r| !r.is_single()).map(|&r| (proto, r)));
        }
    }
    ranges
}

/// Bounds of a DNS answer's timeout in the allow sets.
const MIN_TIMEOUT_SECS: u64 = 1;
const MAX_TIMEOUT_SECS: u64 = 24 * 60 * 60;
/// Forgets the answers whose names (or ports) `names` no longer holds.
pub(super) fn narrow(
    learned: &mut BTreeMap<LearnedKey, Instant>,
    sources: &mut BTreeMap<LearnedKey, BTreeSet<String>>,
    names: &[NamedEntry],
) {
    sources.retain(|&(_, proto, ports), asked_by| {
        asked_by.retain(|name| names.iter().any(|n| &n.name == name && n.allows(proto, ports)));
        !asked_by.is_empty()
    });
    learned.retain(|key, _| sources.contains_key(key));
}

/// Every answer the `known` sets hold.
pub(super) fn known_keys(sources: &BTreeMap<LearnedKey, BTreeSet<String>>) -> Vec<LearnedKey> {
    sources.keys().copied().collect()
}

/// The answers that have not expired at `now`, with their remaining time
/// (the expired ones are forgotten).
pub(super) fn unexpired_learned(
    learned: &mut BTreeMap<LearnedKey, Instant>,
    now: Instant,
) -> Vec<LearnedAddress> {
    learned.retain(|_, expiry| *expiry > now);
    learned
        .iter()
        .map(|(&(addr, proto, ports), expiry)| LearnedAddress {
            addr,
            proto,
            ports,
            timeout: expiry.saturating_duration_since(now),
        })
        .collect()
}

/// One element per key, with the later of the remembered and the new
/// expiry, the timeout clamped and rounded up to whole seconds.
pub(super) fn merge_learned(
    known: &BTreeMap<LearnedKey, Instant>,
    entries: &[LearnedAddress],
    now: Instant,
) -> Vec<LearnedAddress> {
    let mut merged: BTreeMap<LearnedKey, Duration> = BTreeMap::new();
    for entry in entries {
        let key = (canonical(entry.addr), entry.proto, entry.ports);
        let mut timeout = clamp_timeout(entry.timeout);
        if let Some(expiry) = known.get(&key) {
            timeout = timeout.max(expiry.saturating_duration_since(now));
        }
        let slot = merged.entry(key).or_insert(timeout);
        *slot = (*slot).max(timeout);
    }
    merged
        .into_iter()
        .map(|((addr, proto, ports), timeout)| LearnedAddress {
            addr,
            proto,
            ports,
            timeout: clamp_timeout(timeout),
        })
        .collect()
}

pub(super) fn clamp_timeout(timeout: Duration) -> Duration {
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    Duration::from_secs(secs.clamp(MIN_TIMEOUT_SECS, MAX_TIMEOUT_SECS))
}

fn timeout_secs(timeout: Duration) -> u32 {
    u32::try_from(clamp_timeout(timeout).as_secs()).unwrap_or(u32::MAX)
}

/// The element of an answer: `address . proto . port` in the shared sets,
/// the address alone in a range's own sets.
fn key_elem(&(addr, proto, ports): &LearnedKey) -> Expression<'static> {
    if ports.is_single() {
        concat(vec![s(addr.to_string()), num(proto), num(ports.first)])
    } else {
        s(addr.to_string())
    }
}

/// The set an answer goes to (`known`: the established-flow set).
pub(super) fn set_of_key(&(addr, proto, ports): &LearnedKey, known: bool) -> String {
    let v6 = addr.is_ipv6();
    if ports.is_single() {
        match (known, v6) {
            (false, false) => ALLOW4,
            (false, true) => ALLOW6,
            (true, false) => KNOWN4,
            (true, true) => KNOWN6,
        }
        .to_string()
    } else {
        range_set_name(v6, known, proto, ports)
    }
}

fn key_of(entry: &LearnedAddress) -> LearnedKey {
    (entry.addr, entry.proto, entry.ports)
}

pub(super) fn learned_elem(entry: &LearnedAddress) -> Expression<'static> {
    Expression::Named(NamedExpression::Elem(Elem {
        val: Box::new(key_elem(&key_of(entry))),
        timeout: Some(timeout_secs(entry.timeout)),
        expires: None,
        comment: None,
        counter: None,
    }))
}

fn element(set: String, elem: Vec<Expression<'static>>) -> NfListObject<'static> {
    NfListObject::Element(Element {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: set.into(),
        elem: Cow::Owned(elem),
    })
}

/// The answers grouped by the (timed) set they go to.
pub(super) fn by_allow_set(entries: &[LearnedAddress]) -> BTreeMap<String, Vec<&LearnedAddress>> {
    let mut sets: BTreeMap<String, Vec<&LearnedAddress>> = BTreeMap::new();
    for entry in entries {
        sets.entry(set_of_key(&key_of(entry), false))
            .or_default()
            .push(entry);
    }
    sets
}

/// add + delete + add for each element: the first add makes the delete
/// valid whether or not the element is there, the second add sets its
/// timeout (kernels before 6.10 or so keep the old timeout on a plain
/// re-add). One transaction, so no packet sees the element missing.
pub(super) fn element_batch(entries: &[LearnedAddress]) -> Batch<'static> {
    let mut batch = Batch::new();
    for (set, mine) in by_allow_set(entries) {
        let with_timeouts: Vec<_> = mine.iter().map(|e| learned_elem(e)).collect();
        batch.add(element(set.clone(), with_timeouts.clone()));
        batch.delete(element(
            set.clone(),
            mine.iter().map(|e| key_elem(&key_of(e))).collect(),
        ));
        batch.add(element(set, with_timeouts));
    }
    batch
}

/// Adds answers to the `known` sets (no timeout: they stay while their
/// name and port are allowed; adding one that is there already is fine).
pub(super) fn add_known(batch: &mut Batch<'static>, keys: &[LearnedKey]) {
    let mut sets: BTreeMap<String, Vec<Expression<'static>>> = BTreeMap::new();
    for key in keys {
        sets.entry(set_of_key(key, true)).or_default().push(key_elem(key));
    }
    for (set, elems) in sets {
        batch.add(element(set, elems));
    }
}
