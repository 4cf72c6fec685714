//! The seam between the session machine and the machine it changes: every
//! side effect (persisted session, firewall and its tamper guard, tunnel
//! and its allow filter, routes, DNS stub, resolver file, verify's probes)
//! is one call of
//! [`Effects`]. [`SystemEffects`] does them by delegating to the modules
//! that own each; it owns the session's one [`Firewall`] value and lends
//! it (by `Arc`) to the DNS answer sink, verify and the tamper guard. The
//! unit tests use a recorder instead, so the order of every transition is
//! tested without root.
//!
//! What it must never do: decide anything. Each call does exactly one thing
//! and reports how it went; order, retries and what a failure means are the
//! machine's (`session/mod.rs` and the stage files).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::status::StatusReport;
use super::Paths;
use crate::dns::{AnswerSink, StubConfig, StubResolver};
use crate::firewall::{Allowlist, Firewall, FirewallWatch, Lockdown, PortalException};
use crate::nft::NftRunner;
use crate::portal::{self, PortalPlan};
use crate::portal_helper::{self, HelperConnection, Reply, Request};
use crate::profile::{Host, Profile};
use crate::resolvconf::{Pinned, ResolverFile};
use crate::routing::{self, RouteConfig, Routes};
use crate::store::{PersistedSession, SessionStore};
use crate::tunnel::{AllowFilter, OuterTransport, Tunnel, TunnelConfig, TunnelMonitor, TunnelStats};
use crate::verify;
use crate::{DNS_STUB_MARK, ROUTE_TABLE, TUNNEL_FWMARK};

/// A read-only view of a running tunnel, for status and for the machine's
/// handshake and health events.
pub trait TunnelView: Send + Sync {
    fn stats(&self) -> TunnelStats;
    /// Resolves once the tunnel has had its first handshake.
    fn handshake_done(&self) -> BoxFuture<'static, ()>;
    /// Asks the tunnel for a fresh handshake at once.
    fn rehandshake(&self);
    /// How long after the last forced handshake (asked for, or after a
    /// network change) the peer answered, once it has.
    fn rehandshake_answered(&self) -> Option<Duration>;
    /// How long the tunnel's oldest handshake initiation has gone
    /// unanswered, while one has.
    fn handshake_unanswered_for(&self) -> Option<Duration>;
}

/// Every side effect the session machine has. Errors are one sentence.
#[allow(async_fn_in_trait)]
pub trait Effects {
    type Tunnel: Send + Sync + 'static;
    type Routes: Send + Sync + 'static;
    type Stub: Send + Sync + 'static;

    fn load_session(&mut self) -> Result<Option<PersistedSession>, String>;
    fn save_session(&mut self, session: &PersistedSession) -> Result<(), String>;
    fn clear_session(&mut self) -> Result<(), String>;

    /// Reads the profile `name` from the profiles directory.
    async fn load_profile(&mut self, name: &str) -> Result<Profile, String>;
    async fn resolve_endpoint(&mut self, profile: &Profile) -> Result<SocketAddr, String>;

    /// Replaces our table with the lockdown (`allow` = None) or the session
    /// shape, in one transaction.
    async fn apply_firewall(&mut self, lockdown: &Lockdown, allow: Option<&Allowlist>) -> Result<(), String>;
    async fn remove_firewall(&mut self) -> Result<(), String>;
    /// Whether our table is in place as we last applied it.
    async fn firewall_present(&mut self) -> Result<bool, String>;
    /// Whether any table of ours exists at all, in any shape.
    async fn firewall_exists(&mut self) -> Result<bool, String>;
    /// The firewall the DNS answer sink adds answered addresses to (beside
    /// the loop, hence shared).
    fn answer_firewall(&self) -> Arc<Firewall>;
    fn start_guard(&mut self);
    fn stop_guard(&mut self);
    /// Resolves when the guard saw a change of the ruleset; never without a
    /// guard. Cancel-safe.
    async fn firewall_changed(&mut self);

    /// Starts the tunnel to `endpoint`, over TCP through `relay` from the
    /// start when there is one (the lockdown admits that flow), else UDP.
    async fn start_tunnel(
        &mut self,
        profile: &Profile,
        endpoint: SocketAddr,
        relay: Option<SocketAddr>,
    ) -> Result<Self::Tunnel, String>;
    fn tunnel_view(&self, tunnel: &Self::Tunnel) -> Arc<dyn TunnelView>;
    /// Moves the tunnel's datagrams to TCP through the relay at `relay`
    /// (the firewall admits that flow already).
    fn tunnel_use_tcp(&mut self, tunnel: &Self::Tunnel, relay: SocketAddr) -> Result<(), String>;
    /// Moves the tunnel's datagrams back to UDP straight to the gateway
    /// (the firewall admits that flow already).
    fn tunnel_use_udp(&mut self, tunnel: &Self::Tunnel) -> Result<(), String>;
    /// A tunnel over TCP tries UDP to the gateway again (the firewall
    /// admits that flow already): one handshake over UDP, beside the TCP
    /// it keeps using; if the gateway answers it, the tunnel moves back
    /// to UDP by itself.
    fn tunnel_probe_udp(&mut self, tunnel: &Self::Tunnel) -> Result<(), String>;
    /// Ends that try; whether the tunnel had already moved back to UDP.
    fn tunnel_end_udp_probe(&mut self, tunnel: &Self::Tunnel) -> bool;
    /// Tells the tunnel what it may encrypt, whatever the firewall says:
    /// nothing but its own handshakes and keepalives (`None`, which is
    /// also where a new tunnel starts) or what `allow` admits.
    fn set_tunnel_allow(&mut self, tunnel: &Self::Tunnel, allow: Option<&Allowlist>);
    /// The tunnel's allow filter, for the DNS answer sink to add answered
    /// addresses to.
    fn tunnel_filter(&self, tunnel: &Self::Tunnel) -> AllowFilter;
    async fn stop_tunnel(&mut self, tunnel: Self::Tunnel);
    /// Reads `net.ipv4.conf.all.src_valid_mark`; changes nothing.
    fn read_src_valid_mark(&mut self) -> Result<String, String>;
    /// Routes everything through the tunnel; removing the routes gives
    /// `src_valid_mark` back as `src_valid_mark_before` (None: as found now).
    async fn add_routes(
        &mut self,
        profile: &Profile,
        src_valid_mark_before: Option<&str>,
    ) -> Result<Self::Routes, String>;
    async fn remove_routes(&mut self, routes: Self::Routes) -> Result<(), String>;
    /// Removes routing rules a previous run left behind.
    async fn remove_stale_routes(&mut self) -> Result<(), String>;

    async fn start_stub(
        &mut self,
        profile: &Profile,
        sink: Arc<dyn AnswerSink>,
    ) -> Result<Self::Stub, String>;
    fn stub_port(&self, stub: &Self::Stub) -> u16;
    /// Resolves every allowed name through the stub (its sink puts the
    /// addresses in place); runs beside the machine's loop.
    fn resolve_names(&self, stub: &Arc<Self::Stub>) -> BoxFuture<'static, ()>;
    async fn stop_stub(&mut self, stub: Arc<Self::Stub>);

    /// Points the resolver file at the stub.
    fn pin_resolver_file(&mut self) -> Result<(), String>;
    fn restore_resolver_file(&mut self) -> Result<(), String>;

    /// Runs verify's probes beside the machine's loop.
    fn verify(&self, status: StatusReport) -> BoxFuture<'static, Result<verify::Report, String>>;

    /// Sets up the captive-portal namespace with its own table and
    /// address, its link still down (see portal.rs).
    async fn create_portal(&mut self) -> Result<PortalPlan, String>;
    /// The link-level exception every later firewall apply carries.
    fn set_portal_exception(&mut self, exception: Option<PortalException>);
    /// Brings the portal namespace's link up.
    async fn bring_up_portal(&mut self, plan: &PortalPlan) -> Result<(), String>;
    /// Runs `program` in the portal namespace as the user `uid`.
    async fn start_portal_browser(
        &mut self,
        plan: &PortalPlan,
        uid: u32,
        program: &[String],
        env: &[(String, String)],
    ) -> Result<u32, String>;
    /// Removes the portal namespace and what runs in it (none is fine).
    async fn remove_portal(&mut self) -> Result<(), String>;
}

impl TunnelView for TunnelMonitor {
    fn stats(&self) -> TunnelStats {
        TunnelMonitor::stats(self)
    }

    fn rehandshake(&self) {
        TunnelMonitor::rehandshake(self)
    }

    fn rehandshake_answered(&self) -> Option<Duration> {
        TunnelMonitor::rehandshake_answered(self)
    }

    fn handshake_unanswered_for(&self) -> Option<Duration> {
        TunnelMonitor::handshake_unanswered_for(self)
    }

    fn handshake_done(&self) -> BoxFuture<'static, ()> {
        let monitor = self.clone();
        async move {
            loop {
                if monitor.wait_for_handshake(Duration::from_secs(1)).await {
                    return;
                }
                // A tunnel whose task ended answers "no" at once: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        .boxed()
    }
}

/// The real side effects, through the modules that own each.
pub struct SystemEffects {
    profiles: PathBuf,
    resolv_conf: PathBuf,
    store: SessionStore,
    resolver_file: ResolverFile,
    /// The process's one firewall: the machine's calls, the DNS answer
    /// sink, verify and the tamper guard all go through it.
    firewall: Arc<Firewall>,
    /// Watches our nftables table while a session runs (tamper guard).
    guard: Option<FirewallWatch>,
    state_dir: PathBuf,
    /// The captive-portal namespace's exception in the link-level table.
    portal_exception: Option<PortalException>,
    /// The connection to the portal helper while a namespace is open
    /// (portal_helper.rs): closing it removes the namespace.
    portal_helper: Option<HelperConnection>,
}

impl SystemEffects {
    /// The real side effects; the firewall reaches nft through `nft`.
    pub fn new(paths: &Paths, nft: NftRunner) -> SystemEffects {
        SystemEffects {
            firewall: Arc::new(Firewall::new(nft)),
            profiles: paths.profiles.clone(),
            resolv_conf: paths.resolv_conf.clone(),
            store: SessionStore::new(&paths.state_dir),
            resolver_file: ResolverFile::new(&paths.resolv_conf, &paths.state_dir),
            guard: None,
            state_dir: paths.state_dir.clone(),
            portal_exception: None,
            portal_helper: None,
        }
    }
}

impl Effects for SystemEffects {
    type Tunnel = Tunnel;
    type Routes = Routes;
    type Stub = StubResolver;

    fn load_session(&mut self) -> Result<Option<PersistedSession>, String> {
        self.store.load().map_err(|e| e.to_string())
    }

    fn save_session(&mut self, session: &PersistedSession) -> Result<(), String> {
        self.store.save(session).map_err(|e| e.to_string())
    }

    fn clear_session(&mut self) -> Result<(), String> {
        self.store.clear().map_err(|e| e.to_string())
    }

    async fn load_profile(&mut self, name: &str) -> Result<Profile, String> {
        let path = crate::profile::profile_path(&self.profiles, name)?;
        match tokio::task::spawn_blocking(move || Profile::load(&path)).await {
            Ok(loaded) => loaded.map_err(|e| e.to_string()),
            Err(e) => Err(format!("loading profile {name} failed: {e}")),
        }
    }

    async fn resolve_endpoint(&mut self, profile: &Profile) -> Result<SocketAddr, String> {
        let endpoint = &profile.tunnel.peer.endpoint;
        if let Ok(ip) = endpoint.host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, endpoint.port));
        }
        let mut addrs = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| format!("could not resolve the endpoint {endpoint}: {e}; nothing was changed"))?;
        addrs
            .next()
            .ok_or_else(|| format!("the endpoint {endpoint} resolves to no address; nothing was changed"))
    }

    async fn apply_firewall(&mut self, lockdown: &Lockdown, allow: Option<&Allowlist>) -> Result<(), String> {
        self.firewall
            .apply_with_portal(lockdown, allow, self.portal_exception.as_ref())
            .await
            .map_err(|e| e.to_string())
    }

    async fn remove_firewall(&mut self) -> Result<(), String> {
        self.firewall.remove().await.map_err(|e| e.to_string())
    }

    async fn firewall_present(&mut self) -> Result<bool, String> {
        self.firewall.is_present().await.map_err(|e| e.to_string())
    }

    async fn firewall_exists(&mut self) -> Result<bool, String> {
        self.firewall.any_table_exists().await.map_err(|e| e.to_string())
    }

    fn answer_firewall(&self) -> Arc<Firewall> {
        self.firewall.clone()
    }

    fn start_guard(&mut self) {
        if self.guard.is_some() {
            return;
        }
        match self.firewall.watch() {
            Ok(w) => self.guard = Some(w),
            Err(e) => tracing::error!("cannot watch the firewall for tampering: {e}"),
        }
    }

    fn stop_guard(&mut self) {
        self.guard = None;
    }

    async fn firewall_changed(&mut self) {
        match &mut self.guard {
            Some(watch) => watch.changed().await,
            None => std::future::pending().await,
        }
    }

    async fn start_tunnel(
        &mut self,
        profile: &Profile,
        endpoint: SocketAddr,
        relay: Option<SocketAddr>,
    ) -> Result<Tunnel, String> {
        let t = &profile.tunnel;
        Tunnel::start(TunnelConfig {
            interface: t.interface.clone(),
            private_key: t.private_key.clone(),
            peer_public_key: t.peer.public_key.clone(),
            preshared_key: t.peer.preshared_key.clone(),
            endpoint,
            persistent_keepalive: t.peer.persistent_keepalive,
            mtu: t.mtu,
            fwmark: TUNNEL_FWMARK,
            shape: profile.shape,
            transport: match relay {
                Some(relay) => OuterTransport::Tcp { relay },
                None => OuterTransport::Udp,
            },
        })
        .await
        .map_err(|e| e.to_string())
    }

    fn tunnel_view(&self, tunnel: &Tunnel) -> Arc<dyn TunnelView> {
        Arc::new(tunnel.monitor())
    }

    fn tunnel_use_tcp(&mut self, tunnel: &Tunnel, relay: SocketAddr) -> Result<(), String> {
        tunnel.use_tcp(relay).map_err(|e| e.to_string())
    }

    fn tunnel_use_udp(&mut self, tunnel: &Tunnel) -> Result<(), String> {
        tunnel.use_udp().map_err(|e| e.to_string())
    }

    fn tunnel_probe_udp(&mut self, tunnel: &Tunnel) -> Result<(), String> {
        tunnel.probe_udp().map_err(|e| e.to_string())
    }

    fn tunnel_end_udp_probe(&mut self, tunnel: &Tunnel) -> bool {
        tunnel.end_udp_probe()
    }

    fn set_tunnel_allow(&mut self, tunnel: &Tunnel, allow: Option<&Allowlist>) {
        tunnel.allow_filter().set(allow);
    }

    fn tunnel_filter(&self, tunnel: &Tunnel) -> AllowFilter {
        tunnel.allow_filter()
    }

    async fn stop_tunnel(&mut self, tunnel: Tunnel) {
        tunnel.stop().await;
    }

    fn read_src_valid_mark(&mut self) -> Result<String, String> {
        routing::read_src_valid_mark().map_err(|e| e.to_string())
    }

    async fn add_routes(
        &mut self,
        profile: &Profile,
        src_valid_mark_before: Option<&str>,
    ) -> Result<Routes, String> {
        let t = &profile.tunnel;
        routing::apply(&RouteConfig {
            interface: t.interface.clone(),
            addresses: t.addresses.iter().map(|a| (a.addr, a.prefix)).collect(),
            mtu: u32::from(t.mtu),
            fwmark: TUNNEL_FWMARK,
            table: ROUTE_TABLE,
            src_valid_mark_before: src_valid_mark_before.map(str::to_string),
        })
        .await
        .map_err(|e| e.to_string())
    }

    async fn remove_routes(&mut self, routes: Routes) -> Result<(), String> {
        routes.remove().await.map_err(|e| e.to_string())
    }

    async fn remove_stale_routes(&mut self) -> Result<(), String> {
        routing::remove_stale(TUNNEL_FWMARK, ROUTE_TABLE)
            .await
            .map_err(|e| e.to_string())
    }

    async fn start_stub(
        &mut self,
        profile: &Profile,
        sink: Arc<dyn AnswerSink>,
    ) -> Result<StubResolver, String> {
        StubResolver::start(StubConfig {
            port: 0,
            upstream: profile
                .dns_servers
                .iter()
                .map(|ip| SocketAddr::new(*ip, 53))
                .collect(),
            allowed_names: allowed_names(profile),
            upstream_mark: DNS_STUB_MARK,
            sink,
        })
        .await
        .map_err(|e| e.to_string())
    }

    fn stub_port(&self, stub: &StubResolver) -> u16 {
        stub.port()
    }

    fn resolve_names(&self, stub: &Arc<StubResolver>) -> BoxFuture<'static, ()> {
        let stub = stub.clone();
        async move {
            let failed = stub
                .resolve_all()
                .await
                .iter()
                .filter(|(_, r)| r.is_err())
                .count();
            if failed > 0 {
                tracing::warn!(
                    "{failed} allowed host name(s) did not resolve through the pinned DNS servers yet"
                );
            }
        }
        .boxed()
    }

    async fn stop_stub(&mut self, stub: Arc<StubResolver>) {
        // The machine ends every resolution before it stops the stub, so
        // this is the last reference; if not, dropping it aborts its tasks.
        if let Ok(stub) = Arc::try_unwrap(stub) {
            stub.stop().await;
        }
    }

    fn pin_resolver_file(&mut self) -> Result<(), String> {
        match self.resolver_file.pin() {
            Ok(Pinned::Rewritten) => Ok(()),
            Ok(Pinned::LeftToManager) => {
                tracing::info!(
                    "{} is managed by another program (a symlink); DNS is pinned by the firewall redirect alone",
                    self.resolv_conf.display()
                );
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn restore_resolver_file(&mut self) -> Result<(), String> {
        self.resolver_file.restore().map_err(|e| e.to_string())
    }

    fn verify(&self, status: StatusReport) -> BoxFuture<'static, Result<verify::Report, String>> {
        verify::run(self.firewall.clone(), status).boxed()
    }

    async fn create_portal(&mut self) -> Result<PortalPlan, String> {
        let uplink = portal::find_uplink().await.map_err(|e| e.to_string())?;
        // The resolver the network gave: the pre-session copy while a
        // session has the file pointed at the stub.
        let backup = self.state_dir.join("resolv.conf.orig");
        let text = std::fs::read_to_string(&backup)
            .or_else(|_| std::fs::read_to_string(&self.resolv_conf))
            .unwrap_or_default();
        let dns = portal::parse_dns_server(&text).unwrap_or(uplink.gateway);
        // An earlier helper goes first (closing its connection removes
        // its namespace); a new connection starts a new one.
        self.remove_portal().await?;
        let mut helper = HelperConnection::connect(&portal_helper::socket_path())
            .await
            .map_err(|e| e.to_string())?;
        let request = Request::Create {
            namespace: portal::namespace(),
            uplink,
            dns,
        };
        match helper.ask(&request).await.map_err(|e| e.to_string())? {
            Reply::Created(plan) => {
                self.portal_helper = Some(helper);
                Ok(plan)
            }
            other => Err(format!("the captive-portal helper answered {other:?} to create")),
        }
    }

    fn set_portal_exception(&mut self, exception: Option<PortalException>) {
        self.portal_exception = exception;
    }

    async fn bring_up_portal(&mut self, _plan: &PortalPlan) -> Result<(), String> {
        let helper = self
            .portal_helper
            .as_mut()
            .ok_or("there is no portal namespace to bring up")?;
        helper
            .ask(&Request::BringUp)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn start_portal_browser(
        &mut self,
        _plan: &PortalPlan,
        uid: u32,
        program: &[String],
        env: &[(String, String)],
    ) -> Result<u32, String> {
        let helper = self
            .portal_helper
            .as_mut()
            .ok_or("there is no portal namespace to start a browser in")?;
        let request = Request::StartBrowser {
            uid,
            program: program.to_vec(),
            env: env.to_vec(),
        };
        match helper.ask(&request).await.map_err(|e| e.to_string())? {
            Reply::BrowserStarted(pid) => Ok(pid),
            other => Err(format!(
                "the captive-portal helper answered {other:?} to starting the browser"
            )),
        }
    }

    async fn remove_portal(&mut self) -> Result<(), String> {
        let Some(mut helper) = self.portal_helper.take() else {
            return Ok(());
        };
        match helper.ask(&Request::Remove).await {
            Ok(_) => Ok(()),
            // A helper that is gone took its namespace with it (its way
            // out removes it; systemd's stop kills what ran in it).
            Err(portal_helper::HelperError::Broken(e)) => {
                tracing::warn!(
                    "the captive-portal helper was gone before it was asked to remove the namespace: {e}"
                );
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

fn allowed_names(profile: &Profile) -> Vec<String> {
    profile
        .allow
        .iter()
        .filter_map(|rule| match &rule.host {
            Host::Name(name) => Some(name.clone()),
            Host::Net(_) => None,
        })
        .collect()
}
