//! The `Lab`: four network namespaces (client, router, gateway, host) wired
//! with veth pairs, plus every process and file it starts. Owns their whole
//! life: `Lab::new` builds the topology step by step, recording each resource
//! as it is created, and `Drop` removes all of them again (also after a
//! panic or a failed setup). Nothing here touches the host's own namespace.
//!
//! Topology (all documentation addresses):
//! ```text
//!  client c2r ── r2c router r2g ── g2r gateway [wg{id} 192.0.2.65/26, dnsmasq]
//!  192.0.2.2/26   192.0.2.1     198.51.100.1    198.51.100.2 (NAT to g2r)
//!                       router r2h ── h2r host 203.0.113.10/.20/.53 (labhost, dnsmasq)
//! ```

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::util::{self, display_cmd, wait_until};

/// Documentation addresses and fixed names used by the lab.
pub mod addr {
    /// Client's veth address (and its IPv6 one).
    pub const CLIENT_V4: &str = "192.0.2.2";
    pub const CLIENT_V6: &str = "2001:db8:1::2";
    /// Router on the client link.
    pub const ROUTER_CLIENT_V4: &str = "192.0.2.1";
    pub const ROUTER_CLIENT_V6: &str = "2001:db8:1::1";
    /// Router on the gateway link.
    pub const ROUTER_GATEWAY_V4: &str = "198.51.100.1";
    pub const ROUTER_GATEWAY_V6: &str = "2001:db8:100::1";
    /// Gateway's public address (the WireGuard endpoint, and the NAT source).
    pub const GATEWAY_V4: &str = "198.51.100.2";
    pub const GATEWAY_V6: &str = "2001:db8:100::2";
    /// WireGuard listen port of the gateway.
    pub const WG_PORT: u16 = 51820;
    /// `GATEWAY_V4:WG_PORT`.
    pub const GATEWAY_ENDPOINT: &str = "198.51.100.2:51820";
    /// Gateway's tunnel addresses; also where the pinned resolver listens.
    pub const GATEWAY_TUN_V4: &str = "192.0.2.65";
    pub const GATEWAY_TUN_V6: &str = "2001:db8:66::1";
    /// Tunnel addresses of the sessiond profile written by the lab.
    pub const DAEMON_TUN_V4: &str = "192.0.2.66";
    pub const DAEMON_TUN_V6: &str = "2001:db8:66::2";
    /// Tunnel address of the plain wireguard-go client.
    pub const PLAIN_TUN_V4: &str = "192.0.2.70";
    pub const PLAIN_TUN_V6: &str = "2001:db8:66::70";
    /// Router on the host link.
    pub const ROUTER_HOST_V4: &str = "203.0.113.1";
    pub const ROUTER_HOST_V6: &str = "2001:db8:203::1";
    /// The video host (`meet.test`).
    pub const HOST_V4: &str = "203.0.113.10";
    pub const HOST_V6: &str = "2001:db8:203::10";
    /// Another host on the internet side (`other.test`), same services.
    pub const OTHER_V4: &str = "203.0.113.20";
    /// The public (non-pinned) resolver on the host.
    pub const PUBLIC_DNS_V4: &str = "203.0.113.53";
    /// Names the resolvers know.
    pub const MEET_NAME: &str = "meet.test";
    pub const OTHER_NAME: &str = "other.test";
    /// Interface names inside the namespaces.
    pub const CLIENT_IF: &str = "c2r";
    /// The second client (`Lab::add_second_client`): its veth address, the
    /// router's on that link, the router's interface, its tunnel addresses.
    pub const SECOND_CLIENT_V4: &str = "192.0.2.130";
    pub const SECOND_CLIENT_V6: &str = "2001:db8:2::2";
    pub const ROUTER_SECOND_CLIENT_V4: &str = "192.0.2.129";
    pub const ROUTER_SECOND_CLIENT_V6: &str = "2001:db8:2::1";
    pub const ROUTER_SECOND_CLIENT_IF: &str = "r2d";
    pub const SECOND_DAEMON_TUN_V4: &str = "192.0.2.67";
    pub const SECOND_DAEMON_TUN_V6: &str = "2001:db8:66::3";
    pub const ROUTER_CLIENT_IF: &str = "r2c";
    /// The roaming link (see `Lab::add_roaming_link`): another network the
    /// client can move to, behind another router port and subnet.
    pub const ROAM_CLIENT_IF: &str = "c2r2";
    pub const ROUTER_ROAM_IF: &str = "r2c2";
    pub const ROAM_CLIENT_V4: &str = "192.0.2.194";
    pub const ROUTER_ROAM_V4: &str = "192.0.2.193";
    pub const ROAM_CLIENT_V6: &str = "2001:db8:3::2";
    pub const ROUTER_ROAM_V6: &str = "2001:db8:3::1";
    pub const ROUTER_GATEWAY_IF: &str = "r2g";
    pub const ROUTER_HOST_IF: &str = "r2h";
    pub const GATEWAY_IF: &str = "g2r";
    pub const HOST_IF: &str = "h2r";
}

/// One of the lab's namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ns {
    /// The machine under test (where sessiond runs).
    Client,
    /// Between everything; forwards, and carries the leak meter.
    Router,
    /// The WireGuard gateway (wireguard-go, NAT, pinned resolver).
    Gateway,
    /// "The internet": the video host, another host, a public resolver.
    Host,
    /// A second machine under test on its own router link, only when a test
    /// asks for it (`Lab::add_second_client`, e.g. the other party of a call).
    SecondClient,
}

impl Ns {
    /// The four namespaces every lab builds.
    pub const ALL: [Ns; 4] = [Ns::Client, Ns::Router, Ns::Gateway, Ns::Host];

    fn index(self) -> usize {
        match self {
            Ns::Client => 0,
            Ns::Router => 1,
            Ns::Gateway => 2,
            Ns::Host => 3,
            Ns::SecondClient => 4,
        }
    }

    fn suffix(self) -> char {
        match self {
            Ns::Client => 'c',
            Ns::Router => 'r',
            Ns::Gateway => 'g',
            Ns::Host => 'h',
            Ns::SecondClient => 'd',
        }
    }
}

/// Locks a mutex even if a panicking test poisoned it (cleanup must go on).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A process the lab started. Clones share the same process. The lab kills
/// every one of them when it is dropped.
#[derive(Clone)]
pub struct LabChild {
    name: String,
    pid: u32,
    child: Arc<Mutex<Child>>,
    log: PathBuf,
}

impl LabChild {
    /// A short label (used in the log file name).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        util::read_text(&self.log)
    }

    /// The exit status, if it has exited (reaps it).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Sends `sig` if the process is still running (never to a reaped pid).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let mut child = lock(&self.child);
        if child.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid as i32), sig)
            .with_context(|| format!("sending {sig} to {} (pid {})", self.name, self.pid))
    }

    /// SIGKILL and reap.
    pub fn kill(&self) -> Result<()> {
        let mut child = lock(&self.child);
        child
            .kill()
            .with_context(|| format!("killing {} (pid {})", self.name, self.pid))?;
        child
            .wait()
            .with_context(|| format!("reaping {} (pid {})", self.name, self.pid))?;
        Ok(())
    }

    /// Waits (polling) until the process exits.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let mut status = None;
        wait_until(timeout, &format!("{} to exit", self.name), || {
            status = self.exit_status();
            status.is_some()
        })?;
        status.context("exit status vanished")
    }
}

/// Everything created so far, in creation order, for Drop.
#[derive(Default)]
struct Resources {
    namespaces: Vec<String>,
    etc_dirs: Vec<PathBuf>,
    children: Vec<LabChild>,
    wg_ifaces: Vec<String>,
}

/// Gateway state that changes after setup.
pub(crate) struct GatewayState {
    pub(crate) child: Option<LabChild>,
    pub(crate) peers: Vec<(String, Vec<String>)>,
    /// What runs there; fixed when the lab is built.
    pub(crate) program: crate::gateway::GatewayProgram,
}

/// The whole lab. All methods take `&self`; it may be shared by threads.
pub struct Lab {
    pub(crate) id: String,
    names: [String; 5],
    pub(crate) tmp: TempDir,
    pub(crate) labhost: PathBuf,
    res: Mutex<Resources>,
    pub(crate) gateway: Mutex<GatewayState>,
    pub(crate) gw_key_file: PathBuf,
    pub(crate) gw_public_key: String,
    pub(crate) pinned_dns: Option<crate::dns::Resolver>,
    pub(crate) public_dns: Option<crate::dns::Resolver>,
    pub(crate) host_server: Option<LabChild>,
    /// Key pair of the sessiond profile, made on first use.
    pub(crate) client_key: Mutex<Option<(PathBuf, String)>>,
    pub(crate) plain_clients: Mutex<u32>,
    /// What the inside-the-tunnel leak meter allows (see meter.rs).
    pub(crate) tunnel_meter: Mutex<crate::meter::TunnelMeterState>,
    /// Setup step at which to fail on purpose (tests of the cleanup).
    fault: Option<&'static str>,
}

/// Where `ip netns exec` finds per-namespace files to bind-mount over /etc.
const ETC_NETNS: &str = "/etc/netns";
/// Set when a lab in this process created /etc/netns (then removed when empty).
static ETC_NETNS_CREATED: AtomicBool = AtomicBool::new(false);

/// How long setup steps may take before the lab gives up.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

impl Lab {
    /// Builds the whole lab. Needs root. Everything it creates is removed when
    /// the returned value is dropped, and also if setup fails half-way.
    pub fn new() -> Result<Lab> {
        Self::new_with_fault(None)
    }

    /// `new`, but fails on purpose right after setup step `fault`
    /// ("namespaces", "processes", "gateway" or "resolvers"), to test that a
    /// failed setup cleans up. Not for normal use.
    #[doc(hidden)]
    pub fn new_with_fault(fault: Option<&'static str>) -> Result<Lab> {
        Self::create(fault, crate::gateway::GatewayProgram::WireguardGo)
    }

    /// `new`, with `program` as the gateway's WireGuard instead of
    /// wireguard-go (e.g. this workspace's sessiongate-gateway).
    pub fn with_gateway(program: crate::gateway::GatewayProgram) -> Result<Lab> {
        Self::create(None, program)
    }

    fn create(fault: Option<&'static str>, program: crate::gateway::GatewayProgram) -> Result<Lab> {
        if !util::is_root() {
            bail!("the lab needs root (CAP_NET_ADMIN) to create network namespaces: run the tests as root");
        }
        let labhost = util::find_binary("labhost")?;
        let id = Self::pick_id()?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("sglab-{id}-"))
            .tempdir()
            .context("creating the lab's temp dir")?;
        let gw_key_file = tmp.path().join("gateway.key");
        let gw_public_key = crate::gateway::write_new_key(&gw_key_file)?;
        let names = [Ns::Client, Ns::Router, Ns::Gateway, Ns::Host, Ns::SecondClient]
            .map(|ns| format!("sg{id}{}", ns.suffix()));
        let mut lab = Lab {
            id,
            names,
            tmp,
            labhost,
            res: Mutex::new(Resources::default()),
            gateway: Mutex::new(GatewayState {
                child: None,
                peers: Vec::new(),
                program,
            }),
            gw_key_file,
            gw_public_key,
            pinned_dns: None,
            public_dns: None,
            host_server: None,
            client_key: Mutex::new(None),
            plain_clients: Mutex::new(0),
            tunnel_meter: Mutex::new(Default::default()),
            fault,
        };
        lab.build()
            .with_context(|| format!("setting up lab {}", lab.id))?;
        Ok(lab)
    }

    fn pick_id() -> Result<String> {
        for _ in 0..20 {
            let id = util::short_id();
            let taken = Ns::ALL.iter().chain([&Ns::SecondClient]).any(|ns| {
                Path::new(&format!("/run/netns/sg{id}{}", ns.suffix())).exists()
                    || Path::new(&format!("/etc/netns/sg{id}{}", ns.suffix())).exists()
            }) || ["wg", "wc"]
                .iter()
                .any(|p| Path::new(&format!("/var/run/wireguard/{p}{id}.sock")).exists());
            if !taken {
                return Ok(id);
            }
        }
        bail!("could not find a free lab id")
    }

    fn checkpoint(&self, step: &str) -> Result<()> {
        if self.fault == Some(step) {
            bail!("injected fault after step {step}");
        }
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        for ns in Ns::ALL {
            let name = self.ns_name(ns).to_string();
            util::run(&["ip", "netns", "add", &name])?;
            lock(&self.res).namespaces.push(name);
        }
        self.checkpoint("namespaces")?;
        for ns in Ns::ALL {
            let forwarding = matches!(ns, Ns::Router | Ns::Gateway) as u8;
            self.exec_ok(
                ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    &format!("net.ipv4.ip_forward={forwarding}"),
                    &format!("net.ipv6.conf.all.forwarding={forwarding}"),
                    "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv6.conf.default.router_solicitations=0",
                    "net.ipv6.conf.default.accept_ra=0",
                ],
            )?;
        }

        // Start the slow-ish processes first; they need only their namespace.
        self.start_gateway_process()?;
        let labhost = self.labhost.to_string_lossy().into_owned();
        // `--lab ID` only labels the process (ps shows whose it is). 853
        // listens too, so a DNS-over-TLS probe to an allowed address can
        // only be stopped by the product's refusal, not by a closed port.
        let serve = [
            labhost.as_str(),
            "serve",
            "--lab",
            self.id.as_str(),
            "--tcp",
            "443",
            "--tcp",
            "8443",
            "--tcp",
            "853",
            "--udp",
            "10000",
            "--udp",
            "853",
            "--echo",
            "9000",
        ];
        self.host_server = Some(self.spawn_named(Ns::Host, "labhost-serve", &serve)?);
        self.checkpoint("processes")?;

        self.build_links()?;
        self.install_meter()?;
        crate::gateway::install_nat(self)?;
        self.configure_gateway()?;
        self.checkpoint("gateway")?;
        // dnsmasq after its addresses exist: with --bind-dynamic, an address
        // that appears while dnsmasq starts can end up bound but not served.
        self.pinned_dns = Some(crate::dns::Resolver::start(self, crate::dns::Which::Pinned)?);
        self.public_dns = Some(crate::dns::Resolver::start(self, crate::dns::Which::Public)?);
        self.write_client_resolv_conf()?;
        // Needs the pinned resolver's answers for the profile's names.
        self.set_tunnel_allowed_profile(&self.default_profile_toml())?;
        self.checkpoint("resolvers")?;

        let host = self.host_server.as_ref().context("labhost serve not started")?;
        wait_until(SETUP_TIMEOUT, "labhost serve to print ready", || {
            host.log().contains("ready") || !host.is_running()
        })?;
        if !host.is_running() {
            bail!("labhost serve exited: {}", host.log().trim());
        }
        for r in [&self.pinned_dns, &self.public_dns].into_iter().flatten() {
            r.wait_ready(self)?;
        }
        Ok(())
    }

    fn build_links(&self) -> Result<()> {
        use addr::*;
        let (c, r, g, h) = (
            self.ns_name(Ns::Client),
            self.ns_name(Ns::Router),
            self.ns_name(Ns::Gateway),
            self.ns_name(Ns::Host),
        );
        for (ns, a, peer_ns, b) in [
            (c, CLIENT_IF, r, ROUTER_CLIENT_IF),
            (r, ROUTER_GATEWAY_IF, g, GATEWAY_IF),
            (r, ROUTER_HOST_IF, h, HOST_IF),
        ] {
            util::run(&[
                "ip", "-n", ns, "link", "add", a, "type", "veth", "peer", "name", b, "netns", peer_ns,
            ])?;
        }
        self.ip_batch(
            Ns::Router,
            &[
                format!("link set {ROUTER_CLIENT_IF} up"),
                format!("link set {ROUTER_GATEWAY_IF} up"),
                format!("link set {ROUTER_HOST_IF} up"),
                format!("addr add {ROUTER_CLIENT_V4}/26 dev {ROUTER_CLIENT_IF}"),
                format!("addr add {ROUTER_CLIENT_V6}/64 dev {ROUTER_CLIENT_IF} nodad"),
                format!("addr add {ROUTER_GATEWAY_V4}/24 dev {ROUTER_GATEWAY_IF}"),
                format!("addr add {ROUTER_GATEWAY_V6}/64 dev {ROUTER_GATEWAY_IF} nodad"),
                format!("addr add {ROUTER_HOST_V4}/24 dev {ROUTER_HOST_IF}"),
                format!("addr add {ROUTER_HOST_V6}/64 dev {ROUTER_HOST_IF} nodad"),
            ],
        )?;
        self.ip_batch(
            Ns::Client,
            &[
                format!("link set {CLIENT_IF} up"),
                format!("addr add {CLIENT_V4}/26 dev {CLIENT_IF}"),
                format!("addr add {CLIENT_V6}/64 dev {CLIENT_IF} nodad"),
                format!("route add default via {ROUTER_CLIENT_V4}"),
                format!("route add default via {ROUTER_CLIENT_V6}"),
            ],
        )?;
        self.ip_batch(
            Ns::Gateway,
            &[
                format!("link set {GATEWAY_IF} up"),
                format!("addr add {GATEWAY_V4}/24 dev {GATEWAY_IF}"),
                format!("addr add {GATEWAY_V6}/64 dev {GATEWAY_IF} nodad"),
                format!("route add default via {ROUTER_GATEWAY_V4}"),
                format!("route add default via {ROUTER_GATEWAY_V6}"),
            ],
        )?;
        self.ip_batch(
            Ns::Host,
            &[
                format!("link set {HOST_IF} up"),
                format!("addr add {HOST_V4}/24 dev {HOST_IF}"),
                format!("addr add {OTHER_V4}/24 dev {HOST_IF}"),
                format!("addr add {PUBLIC_DNS_V4}/24 dev {HOST_IF}"),
                format!("addr add {HOST_V6}/64 dev {HOST_IF} nodad"),
                format!("route add default via {ROUTER_HOST_V4}"),
                format!("route add default via {ROUTER_HOST_V6}"),
            ],
        )?;
        Ok(())
    }

    /// Runs `ip -n NS -batch -` over the given lines (lo is brought up first).
    pub fn ip_batch(&self, ns: Ns, lines: &[String]) -> Result<()> {
        let mut script = String::from("link set lo up\n");
        for l in lines {
            script.push_str(l);
            script.push('\n');
        }
        let name = self.ns_name(ns);
        util::run_with_stdin(&["ip", "-n", name, "-batch", "-"], script.as_bytes())
            .with_context(|| format!("in namespace {name}, script:\n{script}"))?;
        Ok(())
    }

    fn write_client_resolv_conf(&self) -> Result<()> {
        if !Path::new(ETC_NETNS).exists() && std::fs::create_dir(ETC_NETNS).is_ok() {
            ETC_NETNS_CREATED.store(true, Ordering::SeqCst);
        }
        let dir = PathBuf::from(ETC_NETNS).join(self.ns_name(Ns::Client));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        lock(&self.res).etc_dirs.push(dir.clone());
        let file = dir.join("resolv.conf");
        std::fs::write(&file, format!("nameserver {}\n", addr::PUBLIC_DNS_V4))
            .with_context(|| format!("writing {}", file.display()))?;
        Ok(())
    }

    /// Adds the second client namespace (`Ns::SecondClient`): a veth to the
    /// router (192.0.2.130/26, 2001:db8:2::2/64, default route via the
    /// router), its own resolver file naming the public resolver like the
    /// first client's, and the outside leak meter watching its link too.
    /// Removed on Drop with everything else. Once per lab.
    pub fn add_second_client(&self) -> Result<()> {
        use addr::*;
        let name = self.ns_name(Ns::SecondClient).to_string();
        if lock(&self.res).namespaces.contains(&name) {
            bail!("the lab has a second client already");
        }
        util::run(&["ip", "netns", "add", &name])?;
        lock(&self.res).namespaces.push(name.clone());
        self.exec_ok(
            Ns::SecondClient,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=0",
                "net.ipv6.conf.all.forwarding=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.default.router_solicitations=0",
                "net.ipv6.conf.default.accept_ra=0",
            ],
        )?;
        let router = self.ns_name(Ns::Router);
        util::run(&[
            "ip",
            "-n",
            &name,
            "link",
            "add",
            CLIENT_IF,
            "type",
            "veth",
            "peer",
            "name",
            ROUTER_SECOND_CLIENT_IF,
            "netns",
            router,
        ])?;
        self.ip_batch(
            Ns::Router,
            &[
                format!("link set {ROUTER_SECOND_CLIENT_IF} up"),
                format!("addr add {ROUTER_SECOND_CLIENT_V4}/26 dev {ROUTER_SECOND_CLIENT_IF}"),
                format!("addr add {ROUTER_SECOND_CLIENT_V6}/64 dev {ROUTER_SECOND_CLIENT_IF} nodad"),
            ],
        )?;
        self.ip_batch(
            Ns::SecondClient,
            &[
                format!("link set {CLIENT_IF} up"),
                format!("addr add {SECOND_CLIENT_V4}/26 dev {CLIENT_IF}"),
                format!("addr add {SECOND_CLIENT_V6}/64 dev {CLIENT_IF} nodad"),
                format!("route add default via {ROUTER_SECOND_CLIENT_V4}"),
                format!("route add default via {ROUTER_SECOND_CLIENT_V6}"),
            ],
        )?;
        self.watch_second_client_link()?;
        let dir = PathBuf::from(ETC_NETNS).join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        lock(&self.res).etc_dirs.push(dir.clone());
        let file = dir.join("resolv.conf");
        std::fs::write(&file, format!("nameserver {}\n", addr::PUBLIC_DNS_V4))
            .with_context(|| format!("writing {}", file.display()))?;
        Ok(())
    }

    /// Adds a second link from the client to the router, on another subnet
    /// (192.0.2.192/26, 2001:db8:3::/64), up and addressed on both ends but
    /// with no default route through it yet: the network a roaming test
    /// moves to. The outside leak meter watches it too. Removed with the
    /// namespaces on Drop.
    pub fn add_roaming_link(&self) -> Result<()> {
        use addr::*;
        util::run(&[
            "ip",
            "-n",
            self.ns_name(Ns::Client),
            "link",
            "add",
            ROAM_CLIENT_IF,
            "type",
            "veth",
            "peer",
            "name",
            ROUTER_ROAM_IF,
            "netns",
            self.ns_name(Ns::Router),
        ])?;
        self.watch_router_link(ROUTER_ROAM_IF)?;
        self.ip_batch(
            Ns::Router,
            &[
                format!("link set {ROUTER_ROAM_IF} up"),
                format!("addr add {ROUTER_ROAM_V4}/26 dev {ROUTER_ROAM_IF}"),
                format!("addr add {ROUTER_ROAM_V6}/64 dev {ROUTER_ROAM_IF} nodad"),
            ],
        )?;
        self.ip_batch(
            Ns::Client,
            &[
                format!("link set {ROAM_CLIENT_IF} up"),
                format!("addr add {ROAM_CLIENT_V4}/26 dev {ROAM_CLIENT_IF}"),
                format!("addr add {ROAM_CLIENT_V6}/64 dev {ROAM_CLIENT_IF} nodad"),
            ],
        )?;
        Ok(())
    }

    /// Makes a process started outside `spawn` (e.g. with extra file
    /// descriptors) the lab's: killed and reaped on Drop like the others.
    pub fn adopt_child(&self, label: &str, child: Child, log: PathBuf) -> LabChild {
        let lc = LabChild {
            name: label.to_string(),
            pid: child.id(),
            child: Arc::new(Mutex::new(child)),
            log,
        };
        lock(&self.res).children.push(lc.clone());
        lc
    }

    /// A new log file in the lab's temp dir for a process labelled `label`.
    pub fn new_log_path(&self, label: &str) -> PathBuf {
        let n = lock(&self.res).children.len();
        self.tmp.path().join(format!("{label}.{n}.log"))
    }

    /// The labhost service on the video host (TCP 443, 8443, 853, UDP 10000,
    /// 853, echo 9000), e.g. to stop it when a real web server takes 443.
    pub fn host_services(&self) -> Option<&LabChild> {
        self.host_server.as_ref()
    }

    // ------------------------------------------------------------ accessors

    /// The lab's unique short id (part of every name it creates).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name of a namespace, for `ip netns exec`.
    pub fn ns_name(&self, ns: Ns) -> &str {
        &self.names[ns.index()]
    }

    /// The lab's private temp dir (removed on Drop).
    pub fn tmp_dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The resolver file every `ip netns exec` in the client namespace sees as
    /// /etc/resolv.conf (initially `nameserver 203.0.113.53`).
    pub fn client_resolv_conf(&self) -> PathBuf {
        PathBuf::from(ETC_NETNS)
            .join(self.ns_name(Ns::Client))
            .join("resolv.conf")
    }

    /// Path of the `labhost` binary in use.
    pub fn labhost_path(&self) -> &Path {
        &self.labhost
    }

    /// Pids of every process the lab started (running or not).
    pub fn pids(&self) -> Vec<u32> {
        lock(&self.res).children.iter().map(|c| c.pid).collect()
    }

    /// Namespace names the lab created.
    pub fn namespaces(&self) -> Vec<String> {
        lock(&self.res).namespaces.clone()
    }

    /// wireguard-go control sockets the lab may have caused to exist.
    pub fn wg_socket_paths(&self) -> Vec<PathBuf> {
        lock(&self.res)
            .wg_ifaces
            .iter()
            .map(|i| wg_socket_path(i))
            .collect()
    }

    pub(crate) fn track_wg_iface(&self, ifname: &str) {
        let mut res = lock(&self.res);
        if !res.wg_ifaces.iter().any(|i| i == ifname) {
            res.wg_ifaces.push(ifname.to_string());
        }
    }

    // ------------------------------------------------------------ exec

    fn ns_command(&self, ns: Ns, args: &[&str]) -> Vec<String> {
        let mut v = vec![
            "ip".to_string(),
            "netns".to_string(),
            "exec".to_string(),
            self.ns_name(ns).to_string(),
        ];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    /// Runs a command inside a namespace and returns its output (whatever the
    /// exit status).
    pub fn exec(&self, ns: Ns, args: &[&str]) -> Result<Output> {
        let full = self.ns_command(ns, args);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        util::output(&refs)
    }

    /// Runs a command inside a namespace, requires success, returns stdout.
    pub fn exec_ok(&self, ns: Ns, args: &[&str]) -> Result<String> {
        let full = self.ns_command(ns, args);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        util::run(&refs)
    }

    /// Like `exec_ok` with `input` on stdin.
    pub fn exec_stdin(&self, ns: Ns, args: &[&str], input: &[u8]) -> Result<String> {
        let full = self.ns_command(ns, args);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        util::run_with_stdin(&refs, input)
    }

    /// Starts a background process inside a namespace; stdout and stderr go
    /// to a log file. The lab kills it on Drop.
    pub fn spawn(&self, ns: Ns, args: &[&str]) -> Result<LabChild> {
        let label = args
            .first()
            .and_then(|p| Path::new(p).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "proc".into());
        self.spawn_named(ns, &label, args)
    }

    /// `spawn` with a label for the log file name.
    /// A private D-Bus bus daemon in `ns` listening on `socket`, returned
    /// once it accepts connections (the socket file exists from bind(),
    /// before the daemon listens: a connection then is refused). Returns the
    /// child (killed on drop) and the bus address.
    pub fn private_bus(&self, ns: Ns, socket: &Path) -> Result<(LabChild, String)> {
        let address = format!("unix:path={}", socket.display());
        let child = self
            .spawn_named(
                ns,
                "dbus-daemon",
                &[
                    "dbus-daemon",
                    "--session",
                    "--nofork",
                    &format!("--address={address}"),
                ],
            )
            .context("dbus-daemon (Debian package dbus-daemon)")?;
        wait_until(Duration::from_secs(10), "the private bus to accept", || {
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        })?;
        Ok((child, address))
    }

    pub fn spawn_named(&self, ns: Ns, label: &str, args: &[&str]) -> Result<LabChild> {
        self.spawn_env(ns, label, args, &[])
    }

    /// `spawn` with extra environment variables.
    pub fn spawn_env(&self, ns: Ns, label: &str, args: &[&str], env: &[(&str, &str)]) -> Result<LabChild> {
        let full = self.ns_command(ns, args);
        let n = lock(&self.res).children.len();
        let log = self.tmp.path().join(format!("{label}.{n}.log"));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log)
            .with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        let mut cmd = Command::new(&full[0]);
        cmd.args(&full[1..]).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", full.join(" ")))?;
        let lc = LabChild {
            name: label.to_string(),
            pid: child.id(),
            child: Arc::new(Mutex::new(child)),
            log,
        };
        lock(&self.res).children.push(lc.clone());
        Ok(lc)
    }

    // ------------------------------------------------------------ probes

    fn labhost_probe(&self, ns: Ns, args: &[&str]) -> Result<String, String> {
        let bin = self.labhost.to_string_lossy().into_owned();
        let mut full = vec![bin.as_str()];
        full.extend_from_slice(args);
        let out = self.exec(ns, &full).map_err(|e| format!("{e:#}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Ok(stdout)
        } else if stdout.is_empty() {
            Err(format!(
                "`{}` failed ({}): {}",
                display_cmd(&full),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        } else {
            Err(stdout)
        }
    }

    /// TCP connect from inside `ns`; Ok(what the server sent, trimmed, e.g.
    /// `peer=192.0.2.2`) or Err(one line such as `connect 203.0.113.20:443:
    /// Connection refused`). `addr` may be a name (resolved in `ns`).
    pub fn probe_tcp(&self, ns: Ns, addr: &str, port: u16) -> Result<String, String> {
        self.probe_tcp_timeout(ns, addr, port, Duration::from_secs(2))
    }

    pub fn probe_tcp_timeout(
        &self,
        ns: Ns,
        addr: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<String, String> {
        let port = port.to_string();
        let ms = timeout.as_millis().to_string();
        self.labhost_probe(ns, &["probe-tcp", addr, &port, "--timeout-ms", &ms])
    }

    /// UDP datagram from inside `ns` to the echo service; Ok(`peer=IP probe`)
    /// or Err(one line).
    pub fn probe_udp(&self, ns: Ns, addr: &str, port: u16) -> Result<String, String> {
        self.probe_udp_timeout(ns, addr, port, Duration::from_secs(2))
    }

    pub fn probe_udp_timeout(
        &self,
        ns: Ns,
        addr: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<String, String> {
        let port = port.to_string();
        let ms = timeout.as_millis().to_string();
        self.labhost_probe(ns, &["probe-udp", addr, &port, "--timeout-ms", &ms])
    }

    /// `probe_udp` from a chosen source port (0: any) and with SO_MARK
    /// `mark` (what only root can set), e.g. to try the tunnel's fwmark.
    pub fn probe_udp_crafted(
        &self,
        ns: Ns,
        addr: &str,
        port: u16,
        sport: u16,
        mark: Option<u32>,
        timeout: Duration,
    ) -> Result<String, String> {
        let port = port.to_string();
        let sport = sport.to_string();
        let ms = timeout.as_millis().to_string();
        let mark = mark.map(|m| format!("{m:#x}"));
        let mut args = vec!["probe-udp", addr, &port, "--timeout-ms", &ms, "--sport", &sport];
        if let Some(m) = &mark {
            args.extend(["--mark", m.as_str()]);
        }
        self.labhost_probe(ns, &args)
    }

    /// One UDP-Lite datagram (IP protocol 136: ports where UDP has them,
    /// but not UDP) from inside `ns`; Ok(reply) or Err(one line).
    pub fn probe_udplite(&self, ns: Ns, addr: &str, port: u16, timeout: Duration) -> Result<String, String> {
        let port = port.to_string();
        let ms = timeout.as_millis().to_string();
        self.labhost_probe(
            ns,
            &[
                "probe-udp",
                addr,
                &port,
                "--timeout-ms",
                &ms,
                "--proto",
                "udplite",
            ],
        )
    }

    /// One DNS query over UDP from inside `ns` straight to `server`
    /// (`qtype`: "A", "AAAA", ...). Ok(parsed reply) whenever a reply came.
    pub fn dns_query(&self, ns: Ns, server: &str, name: &str, qtype: &str) -> Result<DnsReply, String> {
        self.dns_query_timeout(ns, server, name, qtype, Duration::from_secs(2))
    }

    pub fn dns_query_timeout(
        &self,
        ns: Ns,
        server: &str,
        name: &str,
        qtype: &str,
        timeout: Duration,
    ) -> Result<DnsReply, String> {
        self.dns_query_over(ns, server, name, qtype, "udp", timeout)
    }

    /// `dns_query` over TCP.
    pub fn dns_query_tcp(&self, ns: Ns, server: &str, name: &str, qtype: &str) -> Result<DnsReply, String> {
        self.dns_query_over(ns, server, name, qtype, "tcp", Duration::from_secs(2))
    }

    fn dns_query_over(
        &self,
        ns: Ns,
        server: &str,
        name: &str,
        qtype: &str,
        proto: &str,
        timeout: Duration,
    ) -> Result<DnsReply, String> {
        let ms = timeout.as_millis().to_string();
        let line = self.labhost_probe(
            ns,
            &[
                "dns-query",
                server,
                name,
                "--type",
                qtype,
                "--timeout-ms",
                &ms,
                "--proto",
                proto,
            ],
        )?;
        DnsReply::parse(&line).ok_or_else(|| format!("unexpected dns-query output: {line}"))
    }
}

/// A DNS reply as `labhost dns-query` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsReply {
    /// "NOERROR", "NXDOMAIN", "REFUSED", ...
    pub rcode: String,
    /// Addresses (or CNAME targets) in the answer section, in order.
    pub answers: Vec<String>,
    /// Smallest TTL in the answer section.
    pub ttl: Option<u32>,
}

impl DnsReply {
    fn parse(line: &str) -> Option<DnsReply> {
        let mut rcode = None;
        let mut answers = Vec::new();
        let mut ttl = None;
        for word in line.split_whitespace() {
            if let Some(v) = word.strip_prefix("rcode=") {
                rcode = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("answers=") {
                answers = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
            } else if let Some(v) = word.strip_prefix("ttl=") {
                ttl = v.parse().ok();
            }
        }
        Some(DnsReply {
            rcode: rcode?,
            answers,
            ttl,
        })
    }
}

/// wireguard-go's control socket for an interface (shared by all namespaces).
pub fn wg_socket_path(ifname: &str) -> PathBuf {
    PathBuf::from("/var/run/wireguard").join(format!("{ifname}.sock"))
}

/// Writes `text` to a new file with `mode`.
pub(crate) fn write_file_mode(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    let mut f: File = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(())
}

impl Drop for Lab {
    fn drop(&mut self) {
        let res = std::mem::take(&mut *lock(&self.res));
        // 1. Our processes (wireguard-go outlives its namespace otherwise).
        for c in res.children.iter().rev() {
            if let Err(e) = c.kill() {
                eprintln!("lab {}: {e:#}", self.id);
            }
        }
        // 2. Anything else still living in our namespaces (e.g. children of a
        //    daemon under test).
        for ns in &res.namespaces {
            if let Ok(out) = util::output(&["ip", "netns", "pids", ns]) {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            }
        }
        // 3. Stale wireguard-go control sockets.
        for ifname in &res.wg_ifaces {
            let p = wg_socket_path(ifname);
            if p.exists() {
                if let Err(e) = std::fs::remove_file(&p) {
                    eprintln!("lab {}: removing {}: {e}", self.id, p.display());
                }
            }
        }
        // 4. Namespaces.
        for ns in res.namespaces.iter().rev() {
            match util::output(&["ip", "netns", "delete", ns]) {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "lab {}: ip netns delete {ns}: {}",
                    self.id,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("lab {}: {e:#}", self.id),
            }
        }
        // 5. /etc/netns/<ns> dirs.
        for d in &res.etc_dirs {
            if let Err(e) = std::fs::remove_dir_all(d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("lab {}: removing {}: {e}", self.id, d.display());
                }
            }
        }
        if ETC_NETNS_CREATED.load(Ordering::SeqCst) {
            // Only succeeds when empty: another lab's dir keeps it.
            let _ = std::fs::remove_dir(ETC_NETNS);
        }
        // The temp dir goes with `self.tmp`.
    }
}
