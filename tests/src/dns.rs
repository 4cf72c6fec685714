//! The lab's two resolvers, both dnsmasq answering from a hosts file:
//! the *pinned* one on the gateway (192.0.2.65 / 2001:db8:66::1, reached
//! through the tunnel) and a *public* one on the host (203.0.113.53, what
//! the client's resolv.conf names). Owns their hosts files, query logs and
//! processes.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::lab::{addr, lock, write_file_mode, Lab, LabChild, Ns, SETUP_TIMEOUT};
use crate::util::{self, wait_until};

/// The name the lab asks for to see that a resolver is up (NXDOMAIN).
pub const READY_NAME: &str = "lab-ready.test";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Which {
    Pinned,
    Public,
}

/// One dnsmasq instance.
pub(crate) struct Resolver {
    ns: Ns,
    label: &'static str,
    listen: Vec<&'static str>,
    hosts: PathBuf,
    log: PathBuf,
    entries: Mutex<Vec<(String, String)>>,
    child: LabChild,
}

fn default_entries() -> Vec<(String, String)> {
    [
        (addr::MEET_NAME, addr::HOST_V4),
        (addr::MEET_NAME, addr::HOST_V6),
        (addr::OTHER_NAME, addr::OTHER_V4),
    ]
    .iter()
    .map(|(n, a)| (n.to_string(), a.to_string()))
    .collect()
}

fn hosts_text(entries: &[(String, String)]) -> String {
    entries.iter().map(|(n, a)| format!("{a} {n}\n")).collect()
}

impl Resolver {
    pub(crate) fn start(lab: &Lab, which: Which) -> Result<Resolver> {
        let (ns, label, listen) = match which {
            Which::Pinned => (
                Ns::Gateway,
                "dnsmasq-pinned",
                vec![addr::GATEWAY_TUN_V4, addr::GATEWAY_TUN_V6],
            ),
            Which::Public => (Ns::Host, "dnsmasq-public", vec![addr::PUBLIC_DNS_V4]),
        };
        let hosts = lab.tmp_dir().join(format!("{label}.hosts"));
        let log = lab.tmp_dir().join(format!("{label}.queries.log"));
        let entries = default_entries();
        write_file_mode(&hosts, &hosts_text(&entries), 0o644)?;
        let mut args: Vec<String> = vec![
            "dnsmasq".into(),
            "--keep-in-foreground".into(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--local=/test/".into(),
            // Binds each listen address whenever it appears (the gateway's
            // comes and goes with wireguard-go).
            "--bind-dynamic".into(),
            "--port=53".into(),
            format!("--addn-hosts={}", hosts.display()),
            "--local-ttl=5".into(),
            "--log-queries".into(),
            format!("--log-facility={}", log.display()),
            "--pid-file=".into(),
            "--user=root".into(),
            "--group=root".into(),
        ];
        for a in &listen {
            args.push(format!("--listen-address={a}"));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = lab.spawn_named(ns, label, &refs)?;
        Ok(Resolver {
            ns,
            label,
            listen,
            hosts,
            log,
            entries: Mutex::new(entries),
            child,
        })
    }

    /// Waits until dnsmasq answers on every listen address (a real query for
    /// `lab-ready.test`, which shows up in the query log; a bound socket alone
    /// proves nothing, see `Lab::build`).
    pub(crate) fn wait_ready(&self, lab: &Lab) -> Result<()> {
        for a in &self.listen {
            let mut exited = false;
            let mut last = String::new();
            wait_until(SETUP_TIMEOUT, &format!("{} to answer on {a}", self.label), || {
                if !self.child.is_running() {
                    exited = true;
                    return true;
                }
                match lab.dns_query_timeout(self.ns, a, READY_NAME, "A", Duration::from_millis(200)) {
                    Ok(_) => true,
                    Err(e) => {
                        last = e;
                        false
                    }
                }
            })
            .with_context(|| format!("last error: {last}; {} log:\n{}", self.label, self.log_text()))?;
            if exited {
                bail!(
                    "{} exited: {}{}",
                    self.label,
                    self.child.log().trim(),
                    self.log_text()
                );
            }
        }
        Ok(())
    }

    pub(crate) fn log_text(&self) -> String {
        util::read_text(&self.log)
    }

    /// Replaces the answers for `name` and makes dnsmasq reload (SIGHUP);
    /// returns once dnsmasq has read the new file.
    pub(crate) fn set_answers(&self, name: &str, addrs: &[&str]) -> Result<()> {
        let mut entries = lock(&self.entries);
        entries.retain(|(n, _)| n != name);
        for a in addrs {
            entries.push((name.to_string(), a.to_string()));
        }
        let tmp = self.hosts.with_extension("hosts.new");
        write_file_mode(&tmp, &hosts_text(&entries), 0o644)?;
        std::fs::rename(&tmp, &self.hosts).with_context(|| format!("replacing {}", self.hosts.display()))?;
        let marker = format!("read {}", self.hosts.display());
        let before = self.log_text().matches(&marker).count();
        self.child.signal(Signal::SIGHUP)?;
        wait_until(
            SETUP_TIMEOUT,
            &format!("{} to reload its hosts file", self.label),
            || self.log_text().matches(&marker).count() > before,
        )
    }
}

impl Lab {
    pub(crate) fn wait_pinned_resolver(&self) -> Result<()> {
        self.resolver(Which::Pinned)?.wait_ready(self)
    }

    fn resolver(&self, which: Which) -> Result<&Resolver> {
        match which {
            Which::Pinned => self.pinned_dns.as_ref(),
            Which::Public => self.public_dns.as_ref(),
        }
        .context("resolver not started")
    }

    /// The pinned resolver's query log so far (dnsmasq lines such as
    /// `query[A] meet.test from 192.0.2.66`).
    pub fn pinned_resolver_log(&self) -> String {
        self.resolver(Which::Pinned)
            .map(Resolver::log_text)
            .unwrap_or_default()
    }

    /// The public resolver's query log so far.
    pub fn public_resolver_log(&self) -> String {
        self.resolver(Which::Public)
            .map(Resolver::log_text)
            .unwrap_or_default()
    }

    /// Makes the pinned resolver answer `name` with exactly `addr` (v4 or v6;
    /// all earlier answers for the name go). Returns after dnsmasq reloaded.
    pub fn set_pinned_answer(&self, name: &str, addr: &str) -> Result<()> {
        self.set_pinned_answers(name, &[addr])
    }

    /// Like `set_pinned_answer` with several addresses (none = unknown name).
    pub fn set_pinned_answers(&self, name: &str, addrs: &[&str]) -> Result<()> {
        self.resolver(Which::Pinned)?.set_answers(name, addrs)?;
        self.tunnel_meter_answers_changed()
    }

    /// The pinned resolver's current answers for `name` (empty if unknown).
    pub fn pinned_answers(&self, name: &str) -> Vec<String> {
        self.resolver(Which::Pinned)
            .map(|r| {
                lock(&r.entries)
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, a)| a.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Same for the public resolver on the host.
    pub fn set_public_answers(&self, name: &str, addrs: &[&str]) -> Result<()> {
        self.resolver(Which::Public)?.set_answers(name, addrs)
    }
}
