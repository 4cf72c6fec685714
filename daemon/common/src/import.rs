//! `sessionctl import`: turns a wg-quick configuration into a profile.
//!
//! This module owns reading wg-quick's INI format and writing the profile
//! text. It never writes files itself (the client does) and never logs keys.
//! The profile it produces is validated by the same rules as every other
//! profile before anyone writes it, so an import cannot produce a profile
//! that `check` would refuse.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::keys::Key;
use crate::profile::{self, decode_key, parse_endpoint, IpCidr, PortRange};

/// An `--allow HOST:PORT/PROTO` (or `HOST:LOW-HIGH/PROTO`) argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowArg {
    pub host: String,
    pub ports: PortRange,
    pub tcp: bool,
}

impl std::str::FromStr for AllowArg {
    type Err = String;

    fn from_str(text: &str) -> Result<AllowArg, String> {
        let bad = || format!("--allow {text:?}: write HOST:PORT/PROTO, e.g. meet.example:443/tcp");
        let (rest, proto) = text.rsplit_once('/').ok_or_else(bad)?;
        let tcp = match proto.to_ascii_lowercase().as_str() {
            "tcp" => true,
            "udp" => false,
            _ => return Err(format!("--allow {text:?}: the protocol must be tcp or udp")),
        };
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let ports = port
            .parse::<PortRange>()
            .map_err(|m| format!("--allow {text:?}: {m}"))?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(AllowArg { host, ports, tcp })
    }
}

/// What an import produces: the private key (for the key file) and the
/// profile text that refers to it.
pub struct Imported {
    pub private_key: Key,
    /// The peer's preshared key, for `psk_file`, when the file has one.
    pub preshared_key: Option<Key>,
    pub profile: String,
    /// What the profile does differently from the wg-quick file, one
    /// sentence each, for the user to read (also written into the profile
    /// as comments).
    pub notes: Vec<String>,
}

#[derive(Debug, Default)]
struct WgQuick {
    private_key: Option<(usize, String)>,
    addresses: Vec<(usize, String)>,
    dns: Vec<(usize, String)>,
    mtu: Option<(usize, String)>,
    public_key: Option<(usize, String)>,
    preshared_key: Option<(usize, String)>,
    endpoint: Option<(usize, String)>,
    keepalive: Option<(usize, String)>,
    allowed_ips: Vec<(usize, String)>,
    /// wg-quick settings a session has no use for, by their wg-quick name.
    dropped: Vec<&'static str>,
    peers: usize,
}

/// Parses `text` (the file `source`) and builds a profile whose key file is
/// `key_file` and whose preshared key file, if the peer has one, is
/// `psk_file` (both relative to the profiles directory).
pub fn import(
    source: &str,
    text: &str,
    key_file: &str,
    psk_file: &str,
    allow: &[AllowArg],
) -> Result<Imported, String> {
    let wg = parse_wg_quick(source, text)?;
    let at = |line: usize| format!("{source} line {line}");
    if wg.peers != 1 {
        return Err(format!(
            "{source}: sessiongate needs exactly one [Peer] (the practice's gateway), found {}",
            wg.peers
        ));
    }
    let (line, private) = wg
        .private_key
        .ok_or_else(|| format!("{source}: [Interface] has no PrivateKey"))?;
    let private_key = decode_key(&private).map_err(|m| format!("{}: PrivateKey {m}", at(line)))?;
    let (line, public) = wg
        .public_key
        .ok_or_else(|| format!("{source}: [Peer] has no PublicKey"))?;
    decode_key(&public).map_err(|m| format!("{}: PublicKey {m}", at(line)))?;
    let (line, endpoint) = wg.endpoint.ok_or_else(|| {
        format!("{source}: [Peer] has no Endpoint; sessiongate needs the gateway's address")
    })?;
    parse_endpoint(&endpoint).map_err(|m| format!("{}: Endpoint {m}", at(line)))?;
    if wg.addresses.is_empty() {
        return Err(format!("{source}: [Interface] has no Address"));
    }
    for (line, a) in &wg.addresses {
        a.parse::<IpCidr>()
            .map_err(|m| format!("{}: Address {m}", at(*line)))?;
    }
    let mut notes = Vec::new();
    let mut servers = Vec::new();
    let mut search_domains = Vec::new();
    for (line, d) in &wg.dns {
        // wg-quick mixes resolvers and search domains in DNS; only the
        // addresses matter here.
        if d.parse::<std::net::IpAddr>().is_ok() {
            servers.push(d.clone());
        } else if profile::check_hostname(d).is_ok() {
            search_domains.push(d.as_str());
        } else {
            return Err(format!(
                "{}: DNS {d:?} is neither an address nor a search domain",
                at(*line)
            ));
        }
    }
    if servers.is_empty() {
        return Err(format!(
            "{source}: [Interface] has no DNS server; sessiongate pins DNS to the gateway's resolver, so add DNS = ADDRESS"
        ));
    }
    if allow.is_empty() {
        return Err("name at least one host to allow: --allow HOST:PORT/PROTO".to_string());
    }
    if !search_domains.is_empty() {
        notes.push(format!(
            "dropped the DNS search domain{} {}: during a session only the allowed hosts' full names resolve, so give full names to --allow",
            if search_domains.len() == 1 { "" } else { "s" },
            search_domains.join(", ")
        ));
    }
    for key in &wg.dropped {
        notes.push(match *key {
            "Table" => "dropped Table: a session installs its own full-tunnel routes".to_string(),
            "ListenPort" => "dropped ListenPort: sessiond picks the tunnel's local port".to_string(),
            "FwMark" => "dropped FwMark: sessiond marks the tunnel's own packets itself".to_string(),
            "SaveConfig" => "dropped SaveConfig: sessiond never writes a profile back".to_string(),
            hook => format!(
                "dropped {hook}: sessiongate runs no shell commands from a configuration; the kill switch, routes and DNS are its own"
            ),
        });
    }
    let preshared_key = match &wg.preshared_key {
        Some((line, psk)) => Some(decode_key(psk).map_err(|m| format!("{}: PresharedKey {m}", at(*line)))?),
        None => None,
    };

    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let list = |items: &[String]| items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ");
    let mut out = String::new();
    let _ = writeln!(out, "# Imported from {source} by `sessionctl import`.");
    let _ = writeln!(out, "description = {}\n", q(&format!("imported from {source}")));
    let _ = writeln!(out, "[tunnel]");
    let _ = writeln!(out, "private_key_file = {}", q(key_file));
    let addresses: Vec<String> = wg.addresses.iter().map(|(_, a)| a.clone()).collect();
    let _ = writeln!(out, "address = [{}]", list(&addresses));
    if let Some((line, mtu)) = &wg.mtu {
        let mtu: u16 = mtu
            .parse()
            .map_err(|_| format!("{}: MTU {mtu:?} is not a number", at(*line)))?;
        let _ = writeln!(out, "mtu = {mtu}");
    }
    let _ = writeln!(out, "\n[tunnel.peer]");
    let _ = writeln!(out, "public_key = {}", q(&public));
    let _ = writeln!(out, "endpoint = {}", q(&endpoint));
    if preshared_key.is_some() {
        let _ = writeln!(out, "preshared_key_file = {}", q(psk_file));
    }
    if let Some((line, k)) = &wg.keepalive {
        let k: u16 = k
            .parse()
            .map_err(|_| format!("{}: PersistentKeepalive {k:?} is not a number", at(*line)))?;
        let _ = writeln!(out, "persistent_keepalive = {k}");
    }
    // Each entry is checked as a network before it is echoed into a comment:
    // the comment must never carry text a TOML parser would choke on.
    for (line, a) in &wg.allowed_ips {
        a.parse::<IpCidr>()
            .map_err(|m| format!("{}: AllowedIPs {m}", at(*line)))?;
    }
    let routed: Vec<&str> = wg.allowed_ips.iter().map(|(_, a)| a.as_str()).collect();
    if !routed.is_empty() && !routed.iter().all(|a| *a == "0.0.0.0/0" || *a == "::/0") {
        // sessiongate is a full tunnel by design: everything the session
        // may reach goes through the gateway, and nothing else goes out.
        notes.insert(
            0,
            format!(
                "changed AllowedIPs = {} (a split tunnel) into a full tunnel: during a session everything goes through the gateway, and only the --allow hosts are reachable",
                routed.join(", ")
            ),
        );
    }
    for note in &notes {
        let _ = writeln!(out, "# sessionctl import {note}.");
    }
    let _ = writeln!(out, "\n[dns]\nservers = [{}]", list(&servers));
    let mut hosts: BTreeMap<&str, (Vec<PortRange>, Vec<PortRange>)> = BTreeMap::new();
    for a in allow {
        let entry = hosts.entry(a.host.as_str()).or_default();
        let ports = if a.tcp { &mut entry.0 } else { &mut entry.1 };
        if !ports.contains(&a.ports) {
            ports.push(a.ports);
        }
    }
    for (host, (tcp, udp)) in hosts {
        let _ = writeln!(out, "\n[[allow]]\nhost = {}", q(host));
        // A port as a number, a range as the string "LOW-HIGH".
        let show = |p: &[PortRange]| {
            p.iter()
                .map(|r| {
                    if r.is_single() {
                        r.to_string()
                    } else {
                        format!("\"{r}\"")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !tcp.is_empty() {
            let _ = writeln!(out, "tcp = [{}]", show(&tcp));
        }
        if !udp.is_empty() {
            let _ = writeln!(out, "udp = [{}]", show(&udp));
        }
    }
    Ok(Imported {
        private_key,
        preshared_key,
        profile: out,
        notes,
    })
}

fn parse_wg_quick(source: &str, text: &str) -> Result<WgQuick, String> {
    #[derive(PartialEq)]
    enum Section {
        None,
        Interface,
        Peer,
    }
    let mut wg = WgQuick::default();
    let mut section = Section::None;
    // Windows editors start files with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = match line.to_ascii_lowercase().as_str() {
                "[interface]" => Section::Interface,
                "[peer]" => {
                    wg.peers += 1;
                    Section::Peer
                }
                _ => return Err(format!("{source} line {line_no}: unknown section {line}")),
            };
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("{source} line {line_no}: expected KEY = VALUE, found {line:?}"))?;
        let key = key.trim().to_ascii_lowercase();
        let value = value.trim().to_string();
        let many = |v: &str| {
            v.split(',')
                .map(|s| (line_no, s.trim().to_string()))
                .filter(|(_, s)| !s.is_empty())
                .collect::<Vec<_>>()
        };
        match (&section, key.as_str()) {
            (Section::Interface, "privatekey") => wg.private_key = Some((line_no, value)),
            (Section::Interface, "address") => wg.addresses.extend(many(&value)),
            (Section::Interface, "dns") => wg.dns.extend(many(&value)),
            (Section::Interface, "mtu") => wg.mtu = Some((line_no, value)),
            // wg-quick's own knobs and hooks have no meaning for a session:
            // dropped, and the user is told (by wg-quick's name, never the
            // value, which goes unchecked into no profile or message).
            (
                Section::Interface,
                dropped @ ("listenport" | "fwmark" | "table" | "saveconfig" | "preup" | "postup" | "predown"
                | "postdown"),
            ) => {
                let name = match dropped {
                    "listenport" => "ListenPort",
                    "fwmark" => "FwMark",
                    "table" => "Table",
                    "saveconfig" => "SaveConfig",
                    "preup" => "PreUp",
                    "postup" => "PostUp",
                    "predown" => "PreDown",
                    _ => "PostDown",
                };
                if !wg.dropped.contains(&name) {
                    wg.dropped.push(name);
                }
            }
            (Section::Peer, "publickey") => wg.public_key = Some((line_no, value)),
            (Section::Peer, "presharedkey") => wg.preshared_key = Some((line_no, value)),
            (Section::Peer, "endpoint") => wg.endpoint = Some((line_no, value)),
            (Section::Peer, "persistentkeepalive") => wg.keepalive = Some((line_no, value)),
            (Section::Peer, "allowedips") => wg.allowed_ips.extend(many(&value)),
            (Section::None, _) => {
                return Err(format!(
                    "{source} line {line_no}: {key} comes before any [Interface] or [Peer]"
                ))
            }
            _ => return Err(format!("{source} line {line_no}: unknown key {key:?}")),
        }
    }
    Ok(wg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CONF: &str = "[Interface]
# the therapist's laptop
PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
Address = 10.66.0.2/32, fd00:66::2/128
DNS = 10.66.0.1, practice.example
MTU = 1380

[Peer]
PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
Endpoint = gw.practice.example:51820
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25
";

    fn allow() -> Vec<AllowArg> {
        [
            "meet.practice.example:443/tcp",
            "meet.practice.example:10000/udp",
            "turn.practice.example:3478/udp",
            "meet.practice.example:50000-60000/udp",
        ]
        .iter()
        .map(|a| a.parse().expect("allow"))
        .collect()
    }

    #[test]
    fn a_wg_quick_file_becomes_a_valid_profile() {
        let imported = import(
            "wg0.conf",
            CONF,
            "keys/practice.key",
            "keys/practice.psk",
            &allow(),
        )
        .expect("import");
        assert!(
            !imported.profile.contains("yAnz5TF"),
            "the private key must not be in the profile"
        );
        // The inline key check needs a file mode; give it the key inline to
        // validate everything else with the profile rules.
        let text = imported.profile.replace(
            "private_key_file = \"keys/practice.key\"",
            &format!("private_key = \"{}\"", imported.private_key.to_base64()),
        );
        let p = profile::parse("practice", &text, Path::new("/"), 0o600).expect("valid profile");
        assert_eq!(p.tunnel.mtu, 1380);
        assert_eq!(p.tunnel.addresses.len(), 2);
        assert_eq!(p.dns_servers.len(), 1);
        assert_eq!(p.tunnel.peer.persistent_keepalive, Some(25));
        assert_eq!(p.allow.len(), 2);
        assert_eq!(p.allow[0].tcp, vec![PortRange::single(443)]);
        assert_eq!(
            p.allow[0].udp,
            vec![
                PortRange::single(10000),
                PortRange {
                    first: 50000,
                    last: 60000
                }
            ]
        );
        assert!(
            imported.profile.contains("udp = [10000, \"50000-60000\"]"),
            "{}",
            imported.profile
        );
    }

    #[test]
    fn errors_name_the_line() {
        let bad = CONF.replace(
            "PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
            "PublicKey = not base64!",
        );
        let e = import("wg0.conf", &bad, "k", "p", &allow())
            .err()
            .unwrap_or_default();
        assert!(
            e.starts_with("wg0.conf line 9: PublicKey is not valid base64"),
            "{e}"
        );
        let bad = CONF.replace("MTU = 1380", "Mtu: 1380");
        let e = import("wg0.conf", &bad, "k", "p", &allow())
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("wg0.conf line 6: expected KEY = VALUE"), "{e}");
        let bad = CONF.replace("DNS = 10.66.0.1, practice.example\n", "");
        let e = import("wg0.conf", &bad, "k", "p", &allow())
            .err()
            .unwrap_or_default();
        assert!(e.contains("has no DNS server"), "{e}");
    }

    #[test]
    fn a_preshared_key_goes_to_its_own_file() {
        let with_psk = CONF.replace(
            "Endpoint = gw.practice.example:51820",
            "Endpoint = gw.practice.example:51820\nPresharedKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=",
        );
        let imported = import("wg0.conf", &with_psk, "keys/p.key", "keys/p.psk", &allow()).expect("import");
        assert!(imported.preshared_key.is_some());
        assert!(
            imported.profile.contains("preshared_key_file = \"keys/p.psk\""),
            "{}",
            imported.profile
        );
        assert!(
            !imported.profile.contains("yAnz5TF"),
            "no key material in the profile"
        );
        let bad = with_psk.replace(
            "PresharedKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=",
            "PresharedKey = short",
        );
        let e = import("wg0.conf", &bad, "k", "p", &allow())
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("wg0.conf line 11: PresharedKey"), "{e}");
    }

    #[test]
    fn allowed_ips_are_checked_before_they_reach_the_profile() {
        // Found by the import fuzz target: a control character in AllowedIPs
        // used to end up in a TOML comment and make the profile unparsable.
        let bad = CONF.replace("AllowedIPs = 0.0.0.0/0, ::/0", "AllowedIPs = 10.0.0.0/8\u{1}");
        let e = import("wg0.conf", &bad, "k", "p", &allow())
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("wg0.conf line 11: AllowedIPs"), "{e}");
        let split = CONF.replace("AllowedIPs = 0.0.0.0/0, ::/0", "AllowedIPs = 10.0.0.0/8");
        let imported = import("wg0.conf", &split, "k", "p", &allow()).expect("import");
        assert!(
            imported
                .profile
                .contains("changed AllowedIPs = 10.0.0.0/8 (a split tunnel) into a full tunnel"),
            "{}",
            imported.profile
        );
        assert!(imported.notes[0].starts_with("changed AllowedIPs = 10.0.0.0/8"));
    }

    #[test]
    fn what_the_profile_drops_is_said() {
        let full = import("wg0.conf", CONF, "k", "p", &allow()).expect("import");
        assert_eq!(
            full.notes,
            vec!["dropped the DNS search domain practice.example: during a session only the allowed hosts' full names resolve, so give full names to --allow"]
        );
        let knobs = CONF.replace(
            "MTU = 1380",
            "MTU = 1380\nTable = off\nListenPort = 51820\nFwMark = 0x1\nSaveConfig = true\nPostUp = iptables -F\nPreDown = x",
        );
        let imported = import("wg0.conf", &knobs, "k", "p", &allow()).expect("import");
        for key in ["Table", "ListenPort", "FwMark", "SaveConfig", "PostUp", "PreDown"] {
            assert!(
                imported
                    .notes
                    .iter()
                    .any(|n| n.starts_with(&format!("dropped {key}: "))),
                "{key}: {:?}",
                imported.notes
            );
            assert!(imported
                .profile
                .contains(&format!("# sessionctl import dropped {key}: ")));
        }
        // The values never reach the profile.
        assert!(!imported.profile.contains("iptables"), "{}", imported.profile);
    }

    #[test]
    fn a_byte_order_mark_is_accepted() {
        let with_bom = format!("\u{feff}{CONF}");
        assert!(import("wg0.conf", &with_bom, "k", "p", &allow()).is_ok());
    }

    #[test]
    fn allow_arguments_are_checked() {
        assert!("meet.example:443/tcp".parse::<AllowArg>().is_ok());
        assert!("[2001:db8::1]:443/tcp".parse::<AllowArg>().is_ok());
        assert!("meet.example:443".parse::<AllowArg>().is_err());
        assert!("meet.example:70000/udp".parse::<AllowArg>().is_err());
        assert!("meet.example:443/icmp".parse::<AllowArg>().is_err());
        assert_eq!(
            "meet.example:50000-60000/udp"
                .parse::<AllowArg>()
                .map(|a| a.ports.to_string()),
            Ok("50000-60000".into())
        );
        assert_eq!(
            "meet.example:60000-50000/udp".parse::<AllowArg>().err().as_deref(),
            Some("--allow \"meet.example:60000-50000/udp\": the range \"60000-50000\" runs backwards; write the lower port first, as \"50000-60000\"")
        );
    }
}
