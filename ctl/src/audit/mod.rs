//! `sessionctl audit`: checks the far end of the session, host by host.
//! `verify` proves the path holds; this asks whether what is at the end
//! of it is fit for a confidential call: TLS versions and suite, the
//! certificate chain and its expiry, HSTS, a Jitsi Meet host's config.js
//! and the third parties its page loads, and whether the profile's ports
//! match what the host serves.
//!
//! It runs here, as the calling user, never in the root daemon: the
//! daemon is only asked what the session allows (`status`) and which CA
//! the profile names (`check`). It only connects to the hosts the active
//! session allows, so everything goes through the tunnel. It changes
//! nothing, anywhere; it sends handshakes and anonymous GETs only.
//! Synchronous on purpose: sessionctl has no async runtime.

mod jitsi;
mod tls;

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use serde::Serialize;
use serde_json::Value;
use sessiongate_common::profile::{self, Host};

use tls::{ChainProblem, ConnectError, Target, Version};

/// `sessionctl audit` found something to change (README "Exit codes").
pub const EXIT_FINDINGS: i32 = 5;
/// A certificate that expires within this many days is a finding.
pub const EXPIRY_WARNING_DAYS: u64 = 14;
/// The videobridge's media port: what a Jitsi profile must allow over UDP.
const JITSI_MEDIA_PORT: u16 = 10000;

/// One line of the report: something checked, with its evidence; a
/// finding says in one sentence what to change and where.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub host: String,
    pub port: Option<u16>,
    pub check: &'static str,
    pub finding: bool,
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub profile: String,
    pub trust: String,
    pub findings: usize,
    pub lines: Vec<Line>,
    /// What could not be checked (the audit then exits 1).
    pub errors: Vec<String>,
}

/// What the daemon says the session allows: one entry per `[[allow]]`.
pub struct Allowed {
    pub host: String,
    pub addresses: Vec<String>,
    /// TCP ports to probe (single ports; a range is not probed port by port).
    pub tcp: Vec<u16>,
    /// UDP ports and ranges as status gives them (`10000`, `50000-60000`).
    pub udp: Vec<String>,
}

impl Allowed {
    /// The entries of a `status` reply's `allowed` list.
    pub fn from_status(status: &Value) -> Vec<Allowed> {
        let ports = |a: &Value, proto: &str| -> Vec<u16> {
            a[proto]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .filter_map(|p| u16::try_from(p).ok())
                .collect()
        };
        status["allowed"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| {
                Some(Allowed {
                    host: a["host"].as_str()?.to_string(),
                    addresses: a["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect(),
                    tcp: ports(a, "tcp"),
                    udp: a["udp"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| {
                            p.as_u64()
                                .map(|n| n.to_string())
                                .or_else(|| p.as_str().map(str::to_string))
                        })
                        .collect(),
                })
            })
            .collect()
    }
}

/// Audits every host of the session's profile. `Err` only when nothing
/// could be audited (no usable trust anchors).
pub fn audit(profile_name: &str, allowed: &[Allowed], ca_file: Option<&Path>) -> Result<Report, String> {
    let (roots, trust) = tls::trusted_roots(ca_file)?;
    let roots = Arc::new(roots);
    let mut report = Report {
        profile: profile_name.to_string(),
        trust,
        findings: 0,
        lines: Vec::new(),
        errors: Vec::new(),
    };
    for entry in allowed {
        HostAudit {
            entry,
            allowed,
            profile: profile_name,
            roots: roots.clone(),
            report: &mut report,
            jitsi: false,
        }
        .run();
    }
    report.findings = report.lines.iter().filter(|l| l.finding).count();
    Ok(report)
}

struct HostAudit<'a> {
    entry: &'a Allowed,
    allowed: &'a [Allowed],
    profile: &'a str,
    roots: Arc<rustls::RootCertStore>,
    report: &'a mut Report,
    /// Whether any port served a Jitsi Meet config.js.
    jitsi: bool,
}

impl HostAudit<'_> {
    fn line(&mut self, port: Option<u16>, check: &'static str, finding: bool, text: String) {
        self.report.lines.push(Line {
            host: self.entry.host.clone(),
            port,
            check,
            finding,
            text,
        });
    }

    fn run(mut self) {
        let host = self.entry.host.clone();
        let name = match profile::parse_host(&host) {
            Ok(Host::Name(name)) => name,
            Ok(Host::Net(net)) if net.prefix == if net.addr.is_ipv4() { 32 } else { 128 } => {
                net.addr.to_string()
            }
            Ok(Host::Net(_)) | Err(_) => {
                self.line(
                    None,
                    "host",
                    false,
                    "not audited: a network, not one host".to_string(),
                );
                return;
            }
        };
        let Ok(server_name) = ServerName::try_from(name.clone()) else {
            self.report
                .errors
                .push(format!("{host} is not a name TLS can check"));
            return;
        };
        for &port in &self.entry.tcp.clone() {
            let addrs: Vec<_> = match (name.as_str(), port).to_socket_addrs() {
                Ok(addrs) => addrs.collect(),
                Err(_) => Vec::new(),
            };
            if addrs.is_empty() {
                {
                    self.report.errors.push(format!(
                        "{host} does not resolve through the session's resolver; check `sessionctl status`"
                    ));
                    return;
                }
            }
            let target = Target::new(server_name.clone(), addrs, self.roots.clone());
            self.port(&target, &name, port);
        }
        if self.jitsi && self.entry.udp.is_empty() {
            self.line(
                None,
                "udp",
                true,
                format!(
                    "Profile {} allows no UDP port for {host}, so calls fall back to slower TCP: add udp = [{JITSI_MEDIA_PORT}] (the videobridge's media port) to the [[allow]] entry for {host}.",
                    self.profile
                ),
            );
        } else if !self.entry.udp.is_empty() {
            let list = self.entry.udp.clone();
            self.line(
                None,
                "udp",
                false,
                format!(
                    "media ports allowed: udp {} (not probed: UDP gives no refusal to see)",
                    list.join(",")
                ),
            );
        }
    }

    fn port(&mut self, target: &Target, name: &str, port: u16) {
        let host = self.entry.host.clone();
        let profile = self.profile.to_string();
        let p = Some(port);
        match target.connect() {
            Ok(_) => {}
            Err(ConnectError::Refused) => {
                self.line(
                    p,
                    "tcp",
                    true,
                    format!(
                        "Nothing listens on {host} tcp port {port} ({}): remove {port} from the tcp list of {host}'s [[allow]] entry in profile {profile}.",
                        target.addr_list()
                    ),
                );
                return;
            }
            Err(ConnectError::TimedOut) => {
                self.report.errors.push(format!(
                    "{host} tcp port {port} ({}) did not answer; check the session with `sessionctl verify`",
                    target.addr_list()
                ));
                return;
            }
            Err(ConnectError::Other(e)) => {
                self.report
                    .errors
                    .push(format!("cannot connect to {host} tcp port {port}: {e}"));
                return;
            }
        }
        let tls13 = target.probe(Version::Tls13);
        let tls12 = target.probe(Version::Tls12);
        let best = match (&tls13, &tls12) {
            (Ok(h), _) => (Version::Tls13, h.clone()),
            (Err(_), Ok(h)) => (Version::Tls12, h.clone()),
            (Err(e13), Err(_)) => {
                self.line(
                    p,
                    "tls",
                    true,
                    format!(
                        "{host} tcp port {port} does not complete a TLS handshake ({e13}): a call page must come over TLS 1.3; if this port is not part of the call, remove it from {host}'s [[allow]] entry in profile {profile}."
                    ),
                );
                return;
            }
        };
        match &tls13 {
            Ok(h) => self.line(p, "tls1.3", false, format!("accepted, cipher suite {}", h.cipher_suite)),
            Err(e) => self.line(
                p,
                "tls1.3",
                true,
                format!(
                    "{host}:{port} does not accept TLS 1.3 ({e}): enable TLS 1.3 in its web server's TLS settings (nginx: ssl_protocols TLSv1.3;)."
                ),
            ),
        }
        match &tls12 {
            Ok(h) => self.line(
                p,
                "tls1.2",
                true,
                format!(
                    "{host}:{port} accepts TLS 1.2 (cipher suite {}): allow only TLS 1.3 in its web server's TLS settings (nginx: ssl_protocols TLSv1.3;).",
                    h.cipher_suite
                ),
            ),
            Err(e) => self.line(p, "tls1.2", false, format!("refused ({e})")),
        }
        self.line(
            p,
            "tls1.0/1.1",
            false,
            "not probed (rustls cannot offer them)".to_string(),
        );
        self.certificate(p, &best.1.certificate);
        self.http(target, best.0, name, port);
    }

    fn certificate(&mut self, p: Option<u16>, cert: &tls::Certificate) {
        let host = self.entry.host.clone();
        let port = p.unwrap_or(0);
        let trust = self.report.trust.clone();
        let now = tls::now_secs();
        let expiry = cert
            .not_after
            .map(|t| (tls::date(t), t.saturating_sub(now) / 86_400));
        let expires = match &expiry {
            Some((date, _)) => format!(" (it expires {date})"),
            None => String::new(),
        };
        match &cert.problem {
            None => {
                self.line(p, "chain", false, format!("valid for {host}, signed by {trust}"));
                match expiry {
                    Some((date, days)) if days < EXPIRY_WARNING_DAYS => self.line(
                        p,
                        "expiry",
                        true,
                        format!(
                            "The certificate of {host}:{port} expires on {date}, in {days} days: renew it on the server before then."
                        ),
                    ),
                    Some((date, days)) => self.line(p, "expiry", false, format!("{date}, in {days} days")),
                    None => self.line(p, "expiry", false, "cannot read the date".to_string()),
                }
            }
            Some(ChainProblem::Expired) => {
                let when = match &expiry {
                    Some((date, _)) => format!("expired on {date}"),
                    None => "has expired".to_string(),
                };
                self.line(
                    p,
                    "expiry",
                    true,
                    format!("The certificate of {host}:{port} {when}: install a renewed certificate on the server."),
                );
            }
            Some(ChainProblem::NotYetValid) => self.line(
                p,
                "chain",
                true,
                format!(
                    "The certificate of {host}:{port} is not valid yet{expires}: check the server's certificate and this machine's clock."
                ),
            ),
            Some(ChainProblem::UnknownIssuer) => self.line(
                p,
                "chain",
                true,
                format!(
                    "The certificate of {host}:{port} is not signed by {trust}: install a certificate from a trusted CA on the server, or name the practice's CA in [audit] ca of profile {}.",
                    self.profile
                ),
            ),
            Some(ChainProblem::WrongName) => self.line(
                p,
                "chain",
                true,
                format!(
                    "The certificate of {host}:{port} is not valid for the name {host}: install a certificate for {host} on the server."
                ),
            ),
            Some(ChainProblem::Other(why)) => self.line(
                p,
                "chain",
                true,
                format!("The certificate chain of {host}:{port} is not valid ({why}): fix the certificate on the server."),
            ),
        }
    }

    fn http(&mut self, target: &Target, version: Version, name: &str, port: u16) {
        let host = self.entry.host.clone();
        let p = Some(port);
        let authority = if port == 443 {
            name.to_string()
        } else {
            format!("{name}:{port}")
        };
        // A TLS port that is no web server (TURN over TLS on 5349) is
        // fine: there is no page to check, which is not the audit failing.
        let page = match target.get(version, &authority, "/") {
            Ok(page) => page,
            Err(e) => {
                self.line(
                    p,
                    "http",
                    false,
                    format!("no HTTP answer ({e}): not a web server, so HSTS and config.js are not checked"),
                );
                return;
            }
        };
        let hsts = page.header("strict-transport-security");
        match hsts.map(|v| (v, hsts_max_age(v))) {
            Some((value, Some(age))) if age > 0 => self.line(p, "hsts", false, value.to_string()),
            Some((value, _)) => self.line(
                p,
                "hsts",
                true,
                format!(
                    "{host}:{port} sends Strict-Transport-Security \"{value}\", which sets no lasting policy: give it max-age=31536000 in its web server's configuration."
                ),
            ),
            None => self.line(
                p,
                "hsts",
                true,
                format!(
                    "{host}:{port} sends no Strict-Transport-Security header: add one (max-age=31536000) to the HTTPS responses in its web server's configuration."
                ),
            ),
        }
        let mut third_parties: Vec<(String, String)> = jitsi::page_hosts(&page.body)
            .into_iter()
            .map(|h| (h, "the call page".to_string()))
            .collect();
        let config = match target.get(version, &authority, "/config.js") {
            Ok(r) if r.status == 200 && jitsi::is_config_js(&r.body) => Some(jitsi::parse_config(&r.body)),
            Ok(_) => None,
            Err(e) => {
                self.report
                    .errors
                    .push(format!("cannot fetch https://{authority}/config.js: {e}"));
                None
            }
        };
        if let Some(config) = config {
            self.jitsi = true;
            self.jitsi_config(p, &config, &mut third_parties);
        }
        third_parties.retain(|(h, _)| !h.eq_ignore_ascii_case(name));
        third_parties.dedup_by(|a, b| a.0 == b.0);
        for (third, source) in third_parties {
            let allowed_too = self
                .allowed
                .iter()
                .any(|a| a.host.eq_ignore_ascii_case(&third) || a.addresses.contains(&third));
            let text = if allowed_too {
                format!(
                    "{host}'s call page loads {third} ({source}), a third party that profile {} also allows, so the call's metadata reaches it: remove {third}'s [[allow]] entry and stop {host} from loading it.",
                    self.profile
                )
            } else {
                format!(
                    "{host}'s call page loads {third} ({source}), a third party (the profile blocks it, so that part fails): stop {host} from loading it (Jitsi: disableThirdPartyRequests: true in its config.js)."
                )
            };
            self.line(p, "third-party", true, text);
        }
    }

    fn jitsi_config(&mut self, p: Option<u16>, config: &jitsi::Config, third: &mut Vec<(String, String)>) {
        let host = self.entry.host.clone();
        let where_ = format!("{host}'s config.js (Jitsi: /etc/jitsi/meet/{host}-config.js)");
        if config.p2p_enabled {
            self.line(
                p,
                "p2p",
                true,
                format!(
                    "{host} lets two-person calls go peer-to-peer (p2p.enabled is on), bypassing the approved server: set p2p: {{ enabled: false }} in {where_}."
                ),
            );
        } else {
            self.line(p, "p2p", false, "p2p.enabled: false".to_string());
        }
        if config.third_party_disabled {
            self.line(
                p,
                "third-party",
                false,
                "disableThirdPartyRequests: true".to_string(),
            );
        } else {
            self.line(
                p,
                "third-party",
                true,
                format!("{host} does not set disableThirdPartyRequests: true: set it in {where_}."),
            );
            if let Some(avatar) = jitsi::url_host(&config.gravatar_base_url) {
                third.push((avatar, format!("gravatarBaseURL {}", config.gravatar_base_url)));
            }
        }
        if config.e2ee_disabled {
            self.line(
                p,
                "e2ee",
                true,
                format!("{host} turns end-to-end encryption off: remove disableE2EE / e2ee.disabled from {where_}."),
            );
        } else {
            self.line(
                p,
                "e2ee",
                false,
                "available (not disabled in config.js)".to_string(),
            );
        }
        if config.stun_servers.is_empty() {
            self.line(p, "stun", false, "hands out no STUN server".to_string());
        } else {
            self.line(
                p,
                "stun",
                false,
                format!("hands out {}", config.stun_servers.join(", ")),
            );
            // STUN servers are only used for P2P: a third one matters then.
            if config.p2p_enabled {
                for server in &config.stun_servers {
                    if let Some(h) = jitsi::host_of(server) {
                        third.push((h, format!("STUN server {server}")));
                    }
                }
            }
        }
        for h in &config.url_hosts {
            third.push((h.clone(), "config.js".to_string()));
        }
    }
}

/// The max-age of a Strict-Transport-Security value, in seconds.
fn hsts_max_age(value: &str) -> Option<u64> {
    value.split(';').find_map(|d| {
        let (k, v) = d.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("max-age")
            .then(|| v.trim().trim_matches('"').parse().ok())?
    })
}

/// The report as text: one line per check, findings first marked, then
/// a verdict.
pub fn describe(report: &Report) -> String {
    let mut out: Vec<String> = report
        .lines
        .iter()
        .map(|l| {
            let target = match l.port {
                Some(port) => format!("{}:{port}", l.host),
                None => l.host.clone(),
            };
            let mark = if l.finding { "FINDING" } else { "ok" };
            format!("{mark:<8}{target:<22}{:<12}{}", l.check, l.text)
        })
        .collect();
    for e in &report.errors {
        out.push(format!("{:<8}{e}", "ERROR"));
    }
    out.push(if !report.errors.is_empty() {
        format!(
            "The audit of profile {} could not check everything ({} findings so far).",
            report.profile, report.findings
        )
    } else if report.findings == 0 {
        format!(
            "No findings: every host of profile {} passed the audit.",
            report.profile
        )
    } else {
        format!(
            "{} finding{} in profile {}: each says what to change and where.",
            report.findings,
            if report.findings == 1 { "" } else { "s" },
            report.profile
        )
    });
    out.join("\n")
}

/// `[audit] ca` from the daemon's `check` answer.
pub fn ca_from_check(reply: &Value) -> Option<PathBuf> {
    reply["audit_ca"].as_str().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_report_marks_findings_and_ends_with_a_verdict() {
        let status = serde_json::json!({"state": "active", "profile": "p", "allowed": [
            {"host": "meet.test", "addresses": ["203.0.113.10"], "tcp": [443], "udp": [10000, "50000-60000"]}]});
        let allowed = Allowed::from_status(&status);
        assert_eq!(
            (allowed[0].tcp.clone(), allowed[0].udp.clone()),
            (vec![443], vec!["10000".to_string(), "50000-60000".to_string()])
        );
        let mut report = Report {
            profile: "p".into(),
            trust: "the system trust store".into(),
            findings: 1,
            lines: vec![Line {
                host: "meet.test".into(),
                port: Some(443),
                check: "tls1.2",
                finding: true,
                text: "meet.test:443 accepts TLS 1.2.".into(),
            }],
            errors: Vec::new(),
        };
        assert_eq!(
            describe(&report),
            "FINDING meet.test:443         tls1.2      meet.test:443 accepts TLS 1.2.\n\
             1 finding in profile p: each says what to change and where."
        );
        report.lines[0].finding = false;
        report.findings = 0;
        assert!(describe(&report).ends_with("No findings: every host of profile p passed the audit."));
        report.errors.push("meet.test does not resolve".into());
        assert!(describe(&report).ends_with("could not check everything (0 findings so far)."));
    }

    #[test]
    fn hsts_max_age_is_read_from_the_header() {
        assert_eq!(
            hsts_max_age("max-age=31536000; includeSubDomains"),
            Some(31_536_000)
        );
        assert_eq!(hsts_max_age("includeSubDomains; Max-Age=\"60\""), Some(60));
        assert_eq!(hsts_max_age("max-age=0"), Some(0));
        assert_eq!(hsts_max_age("includeSubDomains"), None);
    }
}
