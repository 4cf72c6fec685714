//! The WireGuard side of the lab: the gateway's wireguard-go (Debian's, set up
//! with `wg`), or on request this workspace's sessiongate-gateway
//! ([`GatewayProgram`]), its NAT towards the internet, its peers, killing and
//! restarting it, and a plain wireguard-go client in the client namespace for
//! harness tests. Owns the gateway's key, interface and peer list.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::lab::{addr, lock, write_file_mode, Lab, LabChild, Ns, SETUP_TIMEOUT};
use crate::meter::{parse_profile, TunnelFlow};
use crate::util::{self, wait_until};

/// Which WireGuard program the lab's gateway runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayProgram {
    /// Debian's wireguard-go, configured with `wg` (every lab but those
    /// that ask otherwise).
    WireguardGo,
    /// This workspace's `sessiongate-gateway`, every client with this
    /// `shape` ("spec", "pad" or "cover"). It has no wg control socket:
    /// `gateway_wg_show` fails, and adding a peer restarts it.
    Sessiongate { shape: &'static str },
}

/// Writes sessiongate-gateway's configuration for the lab (same key, port,
/// interface name and addresses as the wireguard-go gateway) and starts
/// it; returns once the process runs (`configure_gateway` waits for its
/// interface).
fn start_sessiongate_gateway(lab: &Lab, shape: &str) -> Result<LabChild> {
    let ifname = lab.gateway_ifname();
    let peers = lock(&lab.gateway).peers.clone();
    let mut config = format!(
        "private_key_file = \"{}\"\nlisten_port = {}\ninterface = \"{ifname}\"\n\
         address = [\"{}/26\", \"{}/64\"]\n",
        lab.gw_key_file.display(),
        addr::WG_PORT,
        addr::GATEWAY_TUN_V4,
        addr::GATEWAY_TUN_V6,
    );
    for (public, allowed) in &peers {
        let allowed: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
        config.push_str(&format!(
            "\n[[peer]]\npublic_key = \"{public}\"\nallowed_ips = [{}]\nshape = \"{shape}\"\n",
            allowed.join(", ")
        ));
    }
    let path = lab.tmp.path().join("sessiongate-gateway.toml");
    write_file_mode(&path, &config, 0o600)?;
    let binary = util::find_binary("sessiongate-gateway")?;
    let (binary, path) = (binary.to_string_lossy(), path.to_string_lossy());
    lab.spawn_named(
        Ns::Gateway,
        &format!("sessiongate-gateway-{ifname}"),
        &[&binary, "--config", &path],
    )
}

/// Makes a private key with `wg genkey`, writes it to `path` (mode 0600) and
/// returns the public key.
pub fn write_new_key(path: &Path) -> Result<String> {
    let private = util::run(&["wg", "genkey"])?;
    write_file_mode(path, &private, 0o600)?;
    public_key_of(private.trim())
}

/// `wg pubkey` of a base64 private key.
pub fn public_key_of(private: &str) -> Result<String> {
    let public = util::run_with_stdin(&["wg", "pubkey"], format!("{private}\n").as_bytes())?;
    Ok(public.trim().to_string())
}

/// NAT on the gateway: everything leaving towards the router is masqueraded,
/// so the internet host sees 198.51.100.2 (or 2001:db8:100::2).
pub(crate) fn install_nat(lab: &Lab) -> Result<()> {
    let rules = format!(
        "table inet labnat {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"{}\" masquerade\n\
         \t}}\n\
         }}\n",
        addr::GATEWAY_IF
    );
    lab.exec_stdin(Ns::Gateway, &["nft", "-f", "-"], rules.as_bytes())
        .context("installing the gateway's NAT")?;
    Ok(())
}

/// Starts wireguard-go in `ns` for `ifname` and waits until `wg show` works.
fn start_wireguard_go(lab: &Lab, ns: Ns, ifname: &str) -> Result<LabChild> {
    lab.track_wg_iface(ifname);
    // wireguard-go makes its control socket's directory itself; a fresh CI
    // machine once saw one exit with "Failed to listen on uapi socket: no
    // such file or directory" while several labs started at once. Having
    // the directory before any of them starts takes that step out of the
    // race (an assumption: the cause was not found).
    std::fs::create_dir_all("/var/run/wireguard").context("creating /var/run/wireguard")?;
    let child = lab.spawn_env(
        ns,
        &format!("wireguard-go-{ifname}"),
        &["wireguard-go", ifname],
        &[("WG_PROCESS_FOREGROUND", "1"), ("LOG_LEVEL", "verbose")],
    )?;
    Ok(child)
}

fn wait_wireguard_go(lab: &Lab, ns: Ns, ifname: &str, child: &LabChild) -> Result<()> {
    let mut exited = false;
    wait_until(SETUP_TIMEOUT, &format!("wireguard-go {ifname} to start"), || {
        if !child.is_running() {
            exited = true;
            return true;
        }
        lab.exec(ns, &["wg", "show", ifname, "listen-port"])
            .is_ok_and(|o| o.status.success())
    })?;
    if exited {
        bail!("wireguard-go {ifname} exited: {}", child.log().trim());
    }
    Ok(())
}

/// The gateway's own allowlist (the gateway-enforced kind): nft table
/// `inet labgatewayfilter` in the gateway namespace.
const GATEWAY_FILTER_TABLE: &str = "labgatewayfilter";

/// The forward filter of a practice gateway that enforces a profile's
/// allowlist: from the tunnel, only `flows` pass; the rest is refused
/// (TCP with a reset, the rest with ICMP admin-prohibited) and counted in
/// `refused`. Traffic for the gateway itself (the pinned resolver) is not
/// forwarded and not filtered here.
fn gateway_filter_ruleset(wg_if: &str, flows: &[TunnelFlow]) -> String {
    let elems = |v6: bool| -> String {
        let list: Vec<String> = flows
            .iter()
            .filter(|f| f.net.contains(':') == v6)
            .map(|f| {
                let ports = if f.port == f.last_port {
                    f.port.to_string()
                } else {
                    format!("{}-{}", f.port, f.last_port)
                };
                format!("{} . {} . {ports}", f.net, f.proto)
            })
            .collect();
        if list.is_empty() {
            String::new()
        } else {
            format!("\n\t\telements = {{ {} }}", list.join(", "))
        }
    };
    format!(
        r#"table inet {GATEWAY_FILTER_TABLE} {{
	counter refused {{
	}}
	set allowed4 {{
		type ipv4_addr . inet_proto . inet_service
		flags interval{}
	}}
	set allowed6 {{
		type ipv6_addr . inet_proto . inet_service
		flags interval{}
	}}
	chain forward {{
		type filter hook forward priority filter; policy accept;
		iifname != "{wg_if}" accept
		meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @allowed4 accept
		meta l4proto {{ tcp, udp }} ip6 daddr . meta l4proto . th dport @allowed6 accept
		counter name refused meta l4proto tcp reject with tcp reset
		counter name refused reject with icmpx admin-prohibited
	}}
}}
"#,
        elems(false),
        elems(true)
    )
}

impl Lab {
    /// Makes the gateway enforce a profile's allowlist itself (its TOML
    /// text): the allowed hosts on their ports and ranges, names resolved
    /// with the pinned resolver's current answers. What a practice gateway
    /// does for a gateway-enforced profile. Replaces an earlier one.
    pub fn install_gateway_allowlist(&self, profile_toml: &str) -> Result<()> {
        let followed = parse_profile(profile_toml)?;
        let flows: Vec<TunnelFlow> = self
            .flows_of(&followed)
            .into_iter()
            .filter(|f| f.port != 53)
            .collect();
        let script = format!(
            "table inet {GATEWAY_FILTER_TABLE} {{}}\ndelete table inet {GATEWAY_FILTER_TABLE}\n{}",
            gateway_filter_ruleset(&self.gateway_ifname(), &flows)
        );
        self.exec_stdin(Ns::Gateway, &["nft", "-f", "-"], script.as_bytes())
            .context("installing the gateway's allowlist")?;
        Ok(())
    }

    /// Packets from the tunnel the gateway's allowlist refused.
    pub fn gateway_refused(&self) -> Result<u64> {
        let out = self.exec_ok(
            Ns::Gateway,
            &[
                "nft",
                "-j",
                "list",
                "counter",
                "inet",
                GATEWAY_FILTER_TABLE,
                "refused",
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing nft -j output")?;
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|item| item.get("counter")?.get("packets")?.as_u64())
            .with_context(|| format!("no counter in nft output: {out}"))
    }

    /// The gateway's wireguard-go interface (`wg{id}`).
    pub fn gateway_ifname(&self) -> String {
        format!("wg{}", self.id)
    }

    /// The gateway's WireGuard public key (base64).
    pub fn gateway_public_key(&self) -> &str {
        &self.gw_public_key
    }

    /// The gateway's wireguard-go process, if running.
    pub fn gateway_process(&self) -> Option<LabChild> {
        lock(&self.gateway).child.clone()
    }

    /// What the gateway runs.
    pub fn gateway_program(&self) -> GatewayProgram {
        lock(&self.gateway).program
    }

    /// Everything the gateway's WireGuard logged (all runs of it).
    pub fn gateway_log(&self) -> String {
        let dir = self.tmp.path();
        let prefix = match self.gateway_program() {
            GatewayProgram::WireguardGo => format!("wireguard-go-{}.", self.gateway_ifname()),
            GatewayProgram::Sessiongate { .. } => format!("sessiongate-gateway-{}.", self.gateway_ifname()),
        };
        let mut logs: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        logs.sort();
        logs.iter().map(|p| util::read_text(p)).collect()
    }

    pub(crate) fn start_gateway_process(&self) -> Result<()> {
        let ifname = self.gateway_ifname();
        let child = match self.gateway_program() {
            GatewayProgram::WireguardGo => start_wireguard_go(self, Ns::Gateway, &ifname)?,
            GatewayProgram::Sessiongate { shape } => start_sessiongate_gateway(self, shape)?,
        };
        lock(&self.gateway).child = Some(child);
        Ok(())
    }

    /// Waits for the gateway's wireguard-go and configures key, port, peers,
    /// addresses. Used at setup and by `restart_gateway`.
    pub(crate) fn configure_gateway(&self) -> Result<()> {
        let ifname = self.gateway_ifname();
        let (child, peers) = {
            let gw = lock(&self.gateway);
            (gw.child.clone(), gw.peers.clone())
        };
        let child = child.context("the gateway's wireguard-go is not running")?;
        if let GatewayProgram::Sessiongate { .. } = self.gateway_program() {
            // It brings its interface up with its addresses itself.
            let mut exited = false;
            wait_until(SETUP_TIMEOUT, &format!("sessiongate-gateway's {ifname}"), || {
                if !child.is_running() {
                    exited = true;
                    return true;
                }
                self.exec(Ns::Gateway, &["ip", "-4", "addr", "show", "dev", &ifname, "up"])
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(addr::GATEWAY_TUN_V4))
            })?;
            if exited {
                bail!("sessiongate-gateway exited: {}", child.log().trim());
            }
            return Ok(());
        }
        wait_wireguard_go(self, Ns::Gateway, &ifname, &child)?;
        let key = self.gw_key_file.to_string_lossy().into_owned();
        let port = addr::WG_PORT.to_string();
        let mut args: Vec<String> = ["wg", "set", &ifname, "listen-port", &port, "private-key", &key]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (public, allowed) in &peers {
            args.extend(["peer".into(), public.clone()]);
            args.extend(["allowed-ips".into(), allowed.join(",")]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.exec_ok(Ns::Gateway, &refs)?;
        self.ip_batch(
            Ns::Gateway,
            &[
                format!("addr add {}/26 dev {ifname}", addr::GATEWAY_TUN_V4),
                format!("addr add {}/64 dev {ifname} nodad", addr::GATEWAY_TUN_V6),
                format!("link set {ifname} up"),
            ],
        )?;
        Ok(())
    }

    /// Lets a WireGuard key in through the gateway, with these allowed IPs
    /// (e.g. `["192.0.2.66/32", "2001:db8:66::2/128"]`). Remembered for
    /// `restart_gateway`. Adding a known key replaces its allowed IPs.
    pub fn add_gateway_peer(&self, public_key: &str, allowed_ips: &[&str]) -> Result<()> {
        let allowed: Vec<String> = allowed_ips.iter().map(|s| s.to_string()).collect();
        let running = {
            let mut gw = lock(&self.gateway);
            gw.peers.retain(|(k, _)| k != public_key);
            gw.peers.push((public_key.to_string(), allowed.clone()));
            gw.child.as_ref().is_some_and(|c| c.is_running())
        };
        if running {
            if let GatewayProgram::Sessiongate { .. } = self.gateway_program() {
                // No control socket: it reads its peers at start.
                return self
                    .restart_gateway()
                    .context("restarting sessiongate-gateway with a new peer");
            }
            let ifname = self.gateway_ifname();
            let list = allowed.join(",");
            self.exec_ok(
                Ns::Gateway,
                &["wg", "set", &ifname, "peer", public_key, "allowed-ips", &list],
            )
            .context("adding a gateway peer")?;
        }
        Ok(())
    }

    /// `wg show <gateway if> DUMP...` as text (e.g. `&["latest-handshakes"]`).
    pub fn gateway_wg_show(&self, what: &[&str]) -> Result<String> {
        let ifname = self.gateway_ifname();
        let mut args = vec!["wg", "show", ifname.as_str()];
        args.extend_from_slice(what);
        self.exec_ok(Ns::Gateway, &args)
    }

    /// SIGKILLs the gateway's wireguard-go: its interface disappears and the
    /// gateway stops answering. Waits until the interface is gone.
    pub fn kill_gateway(&self) -> Result<()> {
        let child = lock(&self.gateway).child.take();
        let ifname = self.gateway_ifname();
        if let Some(child) = child {
            child.kill()?;
        }
        wait_until(SETUP_TIMEOUT, &format!("{ifname} to disappear"), || {
            self.exec(Ns::Gateway, &["ip", "link", "show", "dev", &ifname])
                .is_ok_and(|o| !o.status.success())
        })?;
        let sock = crate::lab::wg_socket_path(&ifname);
        if sock.exists() {
            std::fs::remove_file(&sock).with_context(|| format!("removing {}", sock.display()))?;
        }
        Ok(())
    }

    /// Starts the gateway's wireguard-go again with the same key, port,
    /// addresses and every peer added so far (kills a running one first).
    pub fn restart_gateway(&self) -> Result<()> {
        if lock(&self.gateway).child.is_some() {
            self.kill_gateway()?;
        }
        self.start_gateway_process()?;
        self.configure_gateway()?;
        // dnsmasq (--bind-dynamic) picks up the recreated address.
        self.wait_pinned_resolver()
    }

    /// Starts a plain wireguard-go client in the client namespace (`wc{id}`):
    /// its own key, tunnel addresses 192.0.2.70/32 and 2001:db8:66::70/128
    /// (added as a gateway peer), routes for 203.0.113.0/24,
    /// 2001:db8:203::/64 and the pinned resolver 192.0.2.65 through it,
    /// keepalive 1 s. Returns once the first handshake is done.
    pub fn start_plain_wireguard_client(&self) -> Result<PlainClient> {
        {
            let mut started = lock(&self.plain_clients);
            if *started > 0 {
                bail!("only one plain wireguard client per lab (tunnel address 192.0.2.70)");
            }
            *started += 1;
        }
        let ifname = format!("wc{}", self.id);
        let key_file = self.tmp.path().join(format!("{ifname}.key"));
        let public = write_new_key(&key_file)?;
        self.add_gateway_peer(
            &public,
            &[
                &format!("{}/32", addr::PLAIN_TUN_V4),
                &format!("{}/128", addr::PLAIN_TUN_V6),
            ],
        )?;
        let child = start_wireguard_go(self, Ns::Client, &ifname)?;
        wait_wireguard_go(self, Ns::Client, &ifname, &child)?;
        let key = key_file.to_string_lossy().into_owned();
        self.exec_ok(Ns::Client, &["wg", "set", &ifname, "private-key", &key])?;
        set_plain_client_peer(self, &ifname)?;
        self.ip_batch(
            Ns::Client,
            &[
                format!("addr add {}/32 dev {ifname}", addr::PLAIN_TUN_V4),
                format!("addr add {}/128 dev {ifname} nodad", addr::PLAIN_TUN_V6),
                format!("link set {ifname} up"),
                format!(
                    "route add {PLAIN_ROUTE_V4} dev {ifname} src {}",
                    addr::PLAIN_TUN_V4
                ),
                format!(
                    "route add {}/32 dev {ifname} src {}",
                    addr::GATEWAY_TUN_V4,
                    addr::PLAIN_TUN_V4
                ),
                format!(
                    "route add {PLAIN_ROUTE_V6} dev {ifname} src {}",
                    addr::PLAIN_TUN_V6
                ),
            ],
        )?;
        let client = PlainClient {
            ifname,
            public_key: public,
            process: child,
        };
        client.wait_handshake(self, Duration::from_secs(5))?;
        Ok(client)
    }
}

/// What the plain client sends through its tunnel (besides the pinned
/// resolver): the host side, v4 and v6.
const PLAIN_ROUTE_V4: &str = "203.0.113.0/24";
const PLAIN_ROUTE_V6: &str = "2001:db8:203::/64";

/// The plain client's only peer: the gateway, for 203.0.113.0/24 and the
/// pinned resolver, keepalive 1 s (so it handshakes at once).
fn set_plain_client_peer(lab: &Lab, ifname: &str) -> Result<()> {
    let allowed = format!("{PLAIN_ROUTE_V4},{}/32,{PLAIN_ROUTE_V6}", addr::GATEWAY_TUN_V4);
    lab.exec_ok(
        Ns::Client,
        &[
            "wg",
            "set",
            ifname,
            "peer",
            lab.gateway_public_key(),
            "endpoint",
            addr::GATEWAY_ENDPOINT,
            "allowed-ips",
            &allowed,
            "persistent-keepalive",
            "1",
        ],
    )?;
    Ok(())
}

/// A plain wireguard-go client in the client namespace.
pub struct PlainClient {
    pub ifname: String,
    pub public_key: String,
    pub process: LabChild,
}

impl PlainClient {
    /// Seconds since the epoch of the latest handshake (0 = none yet).
    pub fn latest_handshake(&self, lab: &Lab) -> Result<u64> {
        let out = lab.exec_ok(Ns::Client, &["wg", "show", &self.ifname, "latest-handshakes"])?;
        Ok(out
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0))
    }

    /// Forces a fresh handshake now (removes and re-adds the gateway peer).
    /// After `restart_gateway`, wireguard-go would otherwise take ~15 s to
    /// notice (it re-handshakes only after REKEY_TIMEOUT + KEEPALIVE_TIMEOUT
    /// without an answer to data it sent).
    pub fn reconnect(&self, lab: &Lab) -> Result<()> {
        let gw = lab.gateway_public_key().to_string();
        lab.exec_ok(Ns::Client, &["wg", "set", &self.ifname, "peer", &gw, "remove"])?;
        set_plain_client_peer(lab, &self.ifname)?;
        self.wait_handshake(lab, Duration::from_secs(5))
    }

    /// Waits for a completed handshake with the gateway.
    pub fn wait_handshake(&self, lab: &Lab, timeout: Duration) -> Result<()> {
        wait_until(timeout, "the plain client's handshake", || {
            self.latest_handshake(lab).is_ok_and(|t| t > 0)
        })
        .with_context(|| format!("wireguard-go log:\n{}", self.process.log()))
    }
}
