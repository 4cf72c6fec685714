//! Learned addresses: the DNS stub's answers as elements of the answer
//! sets (`allow4`/`allow6` with a timeout, `known4`/`known6` without),
//! how a new answer merges with a remembered one, and which answers a
//! narrowed allowlist forgets.
//!
//! It owns the element batches and the bookkeeping rules for answers. It
//! never runs nft and never widens: an answer whose name and port the
//! allowlist in force does not hold is dropped, not added.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use nftables::batch::Batch;
use nftables::expr::{Elem, Expression, NamedExpression};
use nftables::schema::{Element, NfListObject};
use nftables::types::NfFamily;

use super::expr::{canonical, concat, num, s};
use super::{LearnedAddress, LearnedKey, NamedEntry, ALLOW4, ALLOW6, KNOWN4, KNOWN6, TABLE};

/// Bounds of a DNS answer's timeout in the allow sets.
const MIN_TIMEOUT_SECS: u64 = 1;
const MAX_TIMEOUT_SECS: u64 = 24 * 60 * 60;
/// Forgets the answers whose names (or ports) `names` no longer holds.
pub(super) fn narrow(
    learned: &mut BTreeMap<LearnedKey, Instant>,
    sources: &mut BTreeMap<LearnedKey, BTreeSet<String>>,
    names: &[NamedEntry],
) {
    sources.retain(|&(_, proto, port), asked_by| {
        asked_by.retain(|name| names.iter().any(|n| &n.name == name && n.allows(proto, port)));
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
        .map(|(&(addr, proto, port), expiry)| LearnedAddress {
            addr,
            proto,
            port,
            timeout: expiry.saturating_duration_since(now),
        })
        .collect()
}

/// One element per key, with the later of the remembered and the new
/// expiry, the timeout clamped and rounded up to whole seconds.
pub(super) fn merge_learned(
    known: &BTreeMap<(IpAddr, u8, u16), Instant>,
    entries: &[LearnedAddress],
    now: Instant,
) -> Vec<LearnedAddress> {
    let mut merged: BTreeMap<(IpAddr, u8, u16), Duration> = BTreeMap::new();
    for entry in entries {
        let key = (canonical(entry.addr), entry.proto, entry.port);
        let mut timeout = clamp_timeout(entry.timeout);
        if let Some(expiry) = known.get(&key) {
            timeout = timeout.max(expiry.saturating_duration_since(now));
        }
        let slot = merged.entry(key).or_insert(timeout);
        *slot = (*slot).max(timeout);
    }
    merged
        .into_iter()
        .map(|((addr, proto, port), timeout)| LearnedAddress {
            addr,
            proto,
            port,
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

fn learned_key(entry: &LearnedAddress) -> Expression<'static> {
    concat(vec![
        s(entry.addr.to_string()),
        Expression::Number(u32::from(entry.proto)),
        Expression::Number(u32::from(entry.port)),
    ])
}

pub(super) fn learned_elem(entry: &LearnedAddress) -> Expression<'static> {
    Expression::Named(NamedExpression::Elem(Elem {
        val: Box::new(learned_key(entry)),
        timeout: Some(timeout_secs(entry.timeout)),
        expires: None,
        comment: None,
        counter: None,
    }))
}

/// add + delete + add for each element: the first add makes the delete
/// valid whether or not the element is there, the second add sets its
/// timeout (kernels before 6.10 or so keep the old timeout on a plain
/// re-add). One transaction, so no packet sees the element missing.
pub(super) fn element_batch(entries: &[LearnedAddress]) -> Batch<'static> {
    let mut batch = Batch::new();
    for (set, v6) in [(ALLOW4, false), (ALLOW6, true)] {
        let mine: Vec<&LearnedAddress> = entries.iter().filter(|e| e.addr.is_ipv6() == v6).collect();
        if mine.is_empty() {
            continue;
        }
        let element = |elem: Vec<Expression<'static>>| {
            NfListObject::Element(Element {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: set.into(),
                elem: Cow::Owned(elem),
            })
        };
        let with_timeouts: Vec<_> = mine.iter().map(|e| learned_elem(e)).collect();
        batch.add(element(with_timeouts.clone()));
        batch.delete(element(mine.iter().map(|e| learned_key(e)).collect()));
        batch.add(element(with_timeouts));
    }
    batch
}

/// Adds answers to the `known` sets (no timeout: they stay while their
/// name and port are allowed; adding one that is there already is fine).
pub(super) fn add_known(batch: &mut Batch<'static>, keys: &[LearnedKey]) {
    for (set, v6) in [(KNOWN4, false), (KNOWN6, true)] {
        let elems: Vec<Expression<'static>> = keys
            .iter()
            .filter(|(addr, _, _)| addr.is_ipv6() == v6)
            .map(|&(addr, proto, port)| concat(vec![s(addr.to_string()), num(proto), num(port)]))
            .collect();
        if !elems.is_empty() {
            batch.add(NfListObject::Element(Element {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: set.into(),
                elem: Cow::Owned(elems),
            }));
        }
    }
}
