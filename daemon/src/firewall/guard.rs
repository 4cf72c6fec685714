//! The tamper guard: `nft -j monitor` (and `ip -o monitor link`) wake the
//! caller when something touches our tables, and the comparisons
//! [`is_present`](super::Firewall::is_present) makes against the last
//! apply (the listing's fingerprint, the base chains, elements that are not
//! this session's answers). It reaches nft through the firewall's own
//! runner, and has no state outside its [`FirewallWatch`].
//!
//! It only watches and compares. It never writes our tables (the caller
//! re-applies), and the only thing it writes at all is a throwaway table of
//! its own name, added and deleted in one transaction, that proves the
//! monitor listens.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Stdio;
use std::time::Duration;

use nftables::batch::Batch;
use nftables::schema::{NfListObject, Table};
use nftables::types::NfFamily;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::expr::canonical;
use super::learned::parse_range_set_name;
use super::runner::run_nft;
use super::{
    FirewallError, LearnedKey, PortRange, ALLOW4, ALLOW6, FORWARD, INPUT, KNOWN4, KNOWN6, OUTPUT, TABLE, TCP,
    UDP,
};
use crate::nft::NftRunner;

/// The sets whose elements come and go with DNS answers and timeouts.
const ANSWER_SETS: [&str; 4] = [ALLOW4, ALLOW6, KNOWN4, KNOWN6];

/// Whether `name` is one of the answer sets: the four shared ones, or a
/// port range's own (`allow4_udp_50000_60000`, see learned.rs).
fn is_answer_set(name: &Value) -> bool {
    ANSWER_SETS.iter().any(|set| name == *set)
        || name.as_str().is_some_and(|n| parse_range_set_name(n).is_some())
}

/// The elements of the answer sets in `listing` that are not answers of
/// this session (`sources`), as text; an element we cannot read counts.
pub(super) fn foreign_elements(
    listing: &Value,
    sources: &BTreeMap<LearnedKey, BTreeSet<String>>,
) -> Vec<String> {
    let mut foreign = Vec::new();
    for item in listing["nftables"].as_array().into_iter().flatten() {
        let Some(set) = item.get("set") else { continue };
        if set["family"] != "inet" || set["table"] != TABLE || !is_answer_set(&set["name"]) {
            continue;
        }
        let range = set["name"].as_str().and_then(parse_range_set_name);
        for elem in set["elem"].as_array().into_iter().flatten() {
            // {"concat": [...]} or "ADDR", or either as {"elem": {"val": ..., "timeout": ..}}
            let val = elem.get("elem").and_then(|e| e.get("val")).unwrap_or(elem);
            let key = match range {
                None => val.get("concat").and_then(|p| learned_key_of(p.as_array()?)),
                Some((proto, ports)) => val
                    .as_str()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    .map(|addr| (canonical(addr), proto, ports)),
            };
            if !key.is_some_and(|k| sources.contains_key(&k)) {
                foreign.push(format!("{}: {elem}", set["name"].as_str().unwrap_or("?")));
            }
        }
    }
    foreign
}

/// (address, protocol, port) from a listed `addr . proto . port` element.
fn learned_key_of(parts: &[Value]) -> Option<LearnedKey> {
    let [addr, proto, port] = parts else { return None };
    let addr: IpAddr = addr.as_str()?.parse().ok()?;
    let proto = match proto {
        Value::String(name) if name == "tcp" => TCP,
        Value::String(name) if name == "udp" => UDP,
        other => u8::try_from(other.as_u64()?).ok()?,
    };
    let port = u16::try_from(port.as_u64()?).ok()?;
    Some((canonical(addr), proto, PortRange::single(port)))
}

/// The listed objects of our table that the tamper guard compares: every
/// chain, rule and set, without handles and without set elements (those
/// come and go with DNS answers and timeouts).
pub(super) fn fingerprint(listing: &Value) -> String {
    let mut parts = Vec::new();
    for item in listing["nftables"].as_array().into_iter().flatten() {
        let Some(obj) = item.as_object() else { continue };
        for (kind, body) in obj {
            if kind == "metainfo" || kind == "table" {
                continue;
            }
            let mut body = body.clone();
            let answers = is_answer_set(&body["name"]);
            if let Some(fields) = body.as_object_mut() {
                fields.remove("handle");
                // The literal sets' elements are fixed at apply: part of
                // the reference. The answer sets' are checked one by one
                // (see `foreign_elements`).
                if kind == "map" || (kind == "set" && answers) {
                    fields.remove("elem");
                }
                if kind == "counter" {
                    fields.remove("packets");
                    fields.remove("bytes");
                }
            }
            parts.push(format!("{kind}:{body}"));
        }
    }
    parts.join("\n")
}

/// Our three filtering base chains, with their hooks and policy drop (the
/// fingerprint covers `postrouting` and the rest once we applied).
pub(super) fn has_base_chains(listing: &Value) -> bool {
    let chains: Vec<&Value> = listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("chain"))
        .collect();
    [(OUTPUT, "output"), (INPUT, "input"), (FORWARD, "forward")]
        .iter()
        .all(|(name, hook)| {
            chains.iter().any(|c| {
                c["table"] == TABLE
                    && c["family"] == "inet"
                    && c["name"] == *name
                    && c["hook"] == *hook
                    && c["policy"] == "drop"
            })
        })
}

/// Watches the ruleset for changes to our table (another firewall manager,
/// `nft flush ruleset`, `nft delete table inet sessiongate`) through
/// `nft -j monitor`. The monitor is killed when the watch is dropped.
pub struct FirewallWatch {
    /// The firewall's way to nft (the start-up check writes through it).
    nft: NftRunner,
    events: mpsc::Receiver<()>,
    monitor: Option<Child>,
    /// `ip -o monitor link`: an interface that appears needs its egress
    /// chain (see [`is_present`](super::Firewall::is_present)).
    links: Option<Child>,
    /// An event was taken off the channel but not reported yet (keeps
    /// `changed` cancel-safe).
    pending: bool,
    /// When the monitor that ended is started again. A deadline, not a
    /// sleep started on each call: the session loop drops `changed`
    /// whenever another of its branches fires, and a fresh 500 ms sleep on
    /// every call never ended while something woke the loop more often
    /// than that (the guard then stayed blind for the rest of the session).
    restart_at: Option<tokio::time::Instant>,
    warned: bool,
}

/// After the first event, wait this long and swallow the rest of the burst
/// (one transaction gives one event per object).
const DEBOUNCE: Duration = Duration::from_millis(20);
/// When the monitor is gone: how often to retry it (and wake the caller).
const RETRY: Duration = Duration::from_millis(500);
/// A table that lives only inside one transaction (added and deleted at
/// once). `nft monitor` subscribes some milliseconds after it was spawned,
/// and a flush in between would never be reported; seeing this table go by
/// proves the monitor listens, and the check it triggers catches anything
/// that happened before.
const SYNC_TABLE: &str = "sessiongate_guard_sync";
/// How often that transaction is repeated until the monitor reports it.
const SYNC_RETRY: Duration = Duration::from_millis(20);
const SYNC_TRIES: u32 = 250;

impl FirewallWatch {
    /// Resolves when something changed our table, or every 500 ms while the
    /// monitor cannot run (events may have been missed, so the caller should
    /// check [`is_present`](super::Firewall::is_present) whenever this
    /// returns). Our own writes wake it too; `is_present` then says all is
    /// well. Cancel-safe: dropping the future (e.g. in `select!`) never
    /// loses a change.
    pub async fn changed(&mut self) {
        if self.restart_at.is_some() {
            return self.restart().await;
        }
        if !self.pending {
            match self.events.recv().await {
                Some(()) => self.pending = true,
                None => return self.restart().await,
            }
        }
        tokio::time::sleep(DEBOUNCE).await;
        while self.events.try_recv().is_ok() {}
        self.pending = false;
    }

    /// The monitor ended: start it again after a pause (returning counts as
    /// a change, since events may have been missed meanwhile). Cancel-safe:
    /// the pause runs to one deadline however often this is called.
    async fn restart(&mut self) {
        let at = match self.restart_at {
            Some(at) => at,
            None => {
                // Said once per outage, with how it ended: a monitor that
                // ends is a defect (nft 1.0.6 can die printing an element
                // of an interval set), and it must not go unseen.
                let ended = match self.monitor.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => status.to_string(),
                    _ => "its output ended".to_string(),
                };
                if !self.warned {
                    tracing::warn!(
                        "the firewall tamper guard's nft monitor ended ({ended}); starting it again"
                    );
                }
                self.monitor = None;
                self.links = None;
                let at = tokio::time::Instant::now() + RETRY;
                self.restart_at = Some(at);
                at
            }
        };
        tokio::time::sleep_until(at).await;
        self.restart_at = None;
        match spawn_monitor(&self.nft) {
            Ok((child, links, events)) => {
                if self.warned {
                    tracing::info!("the firewall tamper guard's nft monitor runs again");
                }
                self.monitor = Some(child);
                self.links = links;
                self.events = events;
                self.warned = false;
            }
            Err(e) => {
                if !self.warned {
                    tracing::warn!("the firewall tamper guard cannot run nft monitor ({e}); checking the table every 500 ms instead");
                    self.warned = true;
                }
                // Try again after the next pause.
                self.restart_at = Some(tokio::time::Instant::now() + RETRY);
            }
        }
    }
}

/// Starts watching our table; the start-up check runs through `nft`.
/// Needs a tokio runtime (it spawns a task).
pub(super) fn watch(nft: NftRunner) -> Result<FirewallWatch, FirewallError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(FirewallError::Spawn(
            "the tamper guard needs a tokio runtime".into(),
        ));
    }
    let (child, links, events) = spawn_monitor(&nft)?;
    Ok(FirewallWatch {
        nft,
        events,
        monitor: Some(child),
        links,
        pending: false,
        restart_at: None,
        warned: false,
    })
}

/// `nft -j monitor` (required) and `ip -o monitor link` (best effort: without
/// it a new interface waits for the next check), both waking one channel.
#[allow(clippy::type_complexity)]
fn spawn_monitor(nft: &NftRunner) -> Result<(Child, Option<Child>, mpsc::Receiver<()>), FirewallError> {
    let (child, stdout) = spawn_monitor_process("nft", &["-j", "monitor"])?;
    let monitor_pid = child.id();
    let (tx, rx) = mpsc::channel(64);
    let nft = nft.clone();
    // Weak: when nft monitor ends the channel must close (the watch then
    // restarts both), whatever the link monitor does.
    let link_tx = tx.downgrade();
    tokio::spawn(async move {
        let mut stdout = BufReader::new(stdout);
        let mut raw = Vec::new();
        let mut sync = Some(tokio::spawn(prove_monitor_listens(nft, monitor_pid)));
        // Bytes, not `lines()`: nft 1.0.6 prints garbage (uninitialised
        // memory) for an element of an interval set with a concatenation,
        // and a line that is not UTF-8 would end `lines()` and with it the
        // watch. Such a line counts as a change (`touches_our_table` cannot
        // read it).
        loop {
            raw.clear();
            match stdout.read_until(b'\n', &mut raw).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&raw);
            if sync.is_some() && line.contains(SYNC_TABLE) {
                if let Some(task) = sync.take() {
                    task.abort();
                }
                // The monitor listens from here on; whatever happened before
                // it did is found by the check this wake-up asks for.
                if tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
                continue;
            }
            // A full channel already holds a wake-up: dropping this is fine.
            let wake = touches_our_table(&line) || adds_elements_to_our_table(&line);
            if wake && tx.try_send(()).is_err() && tx.is_closed() {
                return;
            }
        }
        if let Some(task) = sync.take() {
            task.abort();
        }
        // Dropping tx tells FirewallWatch::changed that the monitor ended.
    });
    let links = match spawn_link_monitor(link_tx) {
        Ok(links) => Some(links),
        Err(e) => {
            tracing::warn!("the firewall tamper guard cannot watch network interfaces ({e}); a new interface gets its link-level chain at the next check");
            None
        }
    };
    Ok((child, links, rx))
}

/// Adds and deletes [`SYNC_TABLE`] in one transaction until the monitor
/// reports it (the caller aborts this task then). Not under the write lock:
/// it never touches our tables.
///
/// The first transaction waits until the monitor process `monitor_pid`
/// has joined the ruleset's event group (at most [`JOIN_WAIT`]): sent at
/// once, it came before `nft monitor` had even loaded, went unseen, and
/// cost a transaction (a full cache fetch and a commit, 0.3–9.5 ms on the
/// loaded bench machine) in the middle of the session's start, beside its
/// own firewall commits (docs/benchmarks.md).
async fn prove_monitor_listens(nft: NftRunner, monitor_pid: Option<u32>) {
    if let Some(pid) = monitor_pid {
        let deadline = tokio::time::Instant::now() + JOIN_WAIT;
        while tokio::time::Instant::now() < deadline {
            let netlink = std::fs::read_to_string("/proc/net/netlink").unwrap_or_default();
            if joined_ruleset_events(&netlink, pid) {
                break;
            }
            tokio::time::sleep(JOIN_POLL).await;
        }
    }
    let sync = Table {
        family: NfFamily::INet,
        name: SYNC_TABLE.into(),
        handle: None,
    };
    for _ in 0..SYNC_TRIES {
        let mut batch = Batch::new();
        batch.add(NfListObject::Table(sync.clone()));
        batch.delete(NfListObject::Table(sync.clone()));
        if let Err(e) = run_nft(&nft, batch, "the tamper guard's start-up check").await {
            tracing::warn!("{e}");
        }
        tokio::time::sleep(SYNC_RETRY).await;
    }
    tracing::warn!("the firewall tamper guard's nft monitor did not report its start-up check; it relies on its events alone");
}

/// nftables' event group (NFNLGRP_NFTABLES), which `nft monitor` joins.
const NFNLGRP_NFTABLES: u32 = 7;
/// How long the start-up check waits for the monitor to join it, and how
/// often it looks.
const JOIN_WAIT: Duration = Duration::from_millis(500);
const JOIN_POLL: Duration = Duration::from_millis(1);

/// Whether the netfilter netlink socket of process `pid` (a process's
/// first netlink socket has its pid as port id) is a member of
/// [`NFNLGRP_NFTABLES`], from `/proc/net/netlink` (this network
/// namespace's sockets: protocol 12 is NETLINK_NETFILTER, `Groups` the
/// first 32 groups as a hexadecimal bit mask).
pub(super) fn joined_ruleset_events(netlink: &str, pid: u32) -> bool {
    let pid = pid.to_string();
    netlink.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_, "12", port, groups, ..]
            if *port == pid
                && u32::from_str_radix(groups, 16)
                    .is_ok_and(|g| g & (1 << (NFNLGRP_NFTABLES - 1)) != 0))
    })
}

/// A long-running `program args…` whose output is read line by line; it is
/// killed when its handle is dropped.
fn spawn_monitor_process(
    program: &str,
    args: &[&str],
) -> Result<(Child, tokio::process::ChildStdout), FirewallError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| FirewallError::Spawn(format!("{program}: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| FirewallError::Spawn(format!("{program} monitor has no output")))?;
    Ok((child, stdout))
}

fn spawn_link_monitor(tx: mpsc::WeakSender<()>) -> Result<Child, FirewallError> {
    let (child, stdout) = spawn_monitor_process("ip", &["-o", "monitor", "link"])?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(_)) = lines.next_line().await {
            let Some(tx) = tx.upgrade() else { return };
            // A full channel already holds a wake-up.
            let _ = tx.try_send(());
        }
    });
    Ok(child)
}

/// Whether one line of `nft -j monitor` adds set elements to our table:
/// ours (DNS answers) or someone else's, which
/// [`is_present`](super::Firewall::is_present) tells apart. Deleted
/// elements (timeouts, someone else's deletes) only close.
pub(super) fn adds_elements_to_our_table(line: &str) -> bool {
    let Ok(Value::Object(event)) = serde_json::from_str::<Value>(line.trim()) else {
        return false;
    };
    event.get("add").is_some_and(|added| {
        added
            .get("element")
            .is_some_and(|e| e["family"] == "inet" && e["table"] == TABLE)
    })
}

/// Whether one line of `nft -j monitor` is about our table (set elements
/// excepted). A line we cannot read counts as a change: checking costs one
/// listing, missing a change costs the lockdown.
pub(super) fn touches_our_table(line: &str) -> bool {
    let ours = |family: &Value| family == "inet" || family == "netdev";
    let line = line.trim();
    if line.is_empty() {
        return false;
    }
    let Ok(Value::Object(event)) = serde_json::from_str::<Value>(line) else {
        return true;
    };
    event.values().any(|command| {
        let Some(objects) = command.as_object() else {
            return false;
        };
        objects.iter().any(|(kind, obj)| match kind.as_str() {
            "element" | "metainfo" => false,
            "table" => ours(&obj["family"]) && obj["name"] == TABLE,
            _ => ours(&obj["family"]) && obj["table"] == TABLE,
        })
    })
}
