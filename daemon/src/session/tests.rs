//! The order of every transition, without root: the machine runs on a
//! recorder of side effects that can make any one step fail. Every test
//! checks the calls in order and where the firewall ends up; no failure may
//! leave it open.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{oneshot, watch};

use super::stage::Stage;
use super::*;
use crate::dns::AnswerSink;
use crate::firewall::{Allowlist, Firewall, Lockdown};
use crate::nft::NftRunner;
use crate::store::PersistedSession;
use crate::tunnel::filter::{decide, Verdict};
use crate::tunnel::{AllowFilter, TunnelStats};

/// What our table looks like, as far as the recorder knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Absent,
    Lockdown,
    Open,
}

struct FakeView {
    handshake: watch::Receiver<bool>,
    reachable: Arc<AtomicBool>,
    roam: Arc<FakeRoam>,
}

/// What the fake tunnel says of network changes and forced handshakes.
#[derive(Default)]
struct FakeRoam {
    path_changes: AtomicU64,
    rehandshakes: AtomicU64,
    answered: AtomicBool,
    /// Whether the datagrams go over TCP now.
    over_tcp: AtomicBool,
    /// Whether the gateway answers a probe over UDP (then the tunnel moves
    /// back to UDP at once, as the real one does).
    udp_works: AtomicBool,
    /// A probe was answered and not yet ended.
    probe_answered: AtomicBool,
    /// How long (ms) the tunnel's oldest handshake has gone unanswered;
    /// 0: none waits.
    unanswered_ms: AtomicU64,
}

impl TunnelView for FakeView {
    fn stats(&self) -> TunnelStats {
        TunnelStats {
            interface: "sg0".into(),
            endpoint: "198.51.100.2:51820".into(),
            last_handshake_secs: (*self.handshake.borrow()).then_some(1),
            rx_bytes: 0,
            tx_bytes: 0,
            peer_reachable: self.reachable.load(Ordering::SeqCst),
            refused_packets: 0,
            path_changes: self.roam.path_changes.load(Ordering::SeqCst),
            transport: if self.roam.over_tcp.load(Ordering::SeqCst) {
                crate::tunnel::OuterProtocol::Tcp
            } else {
                crate::tunnel::OuterProtocol::Udp
            },
        }
    }

    fn rehandshake(&self) {
        self.roam.rehandshakes.fetch_add(1, Ordering::SeqCst);
        self.roam.answered.store(false, Ordering::SeqCst);
    }

    fn rehandshake_answered(&self) -> Option<std::time::Duration> {
        self.roam
            .answered
            .load(Ordering::SeqCst)
            .then_some(std::time::Duration::from_millis(7))
    }

    fn handshake_unanswered_for(&self) -> Option<std::time::Duration> {
        let ms = self.roam.unanswered_ms.load(Ordering::SeqCst);
        (ms > 0).then(|| std::time::Duration::from_millis(ms))
    }

    fn handshake_done(&self) -> BoxFuture<'static, ()> {
        let mut rx = self.handshake.clone();
        async move {
            let _ = rx.wait_for(|done| *done).await;
        }
        .boxed()
    }
}

struct Recorder {
    calls: Vec<String>,
    fail: HashSet<&'static str>,
    table: Table,
    /// What `firewall_present` answers (false: someone flushed the table).
    present: bool,
    handshake_tx: watch::Sender<bool>,
    handshake: watch::Receiver<bool>,
    reachable: Arc<AtomicBool>,
    roam: Arc<FakeRoam>,
    /// What `load_profile` reads (a reload or a resume).
    on_disk: Option<Profile>,
    persisted: Option<PersistedSession>,
    /// Every lockdown the firewall was given, in order.
    lockdowns: Vec<Lockdown>,
    /// What `read_src_valid_mark` answers.
    src_valid_mark: String,
    /// What each `add_routes` was told to give back on removal.
    routes_restore: Vec<Option<String>>,
    /// Verify's probes never finish unless told.
    verify_done: bool,
    /// The filter of the tunnel last started (a real one: the tests ask it
    /// about packets).
    tunnel: Option<AllowFilter>,
    /// The DNS answer sink of the stub last started.
    sink: Option<Arc<dyn AnswerSink>>,
    /// A real firewall for the answer sink that never applies anything: it
    /// holds no allowed names, so it drops every answer before nft.
    answer_firewall: Arc<Firewall>,
}

impl Recorder {
    fn new() -> Recorder {
        let (handshake_tx, handshake) = watch::channel(false);
        Recorder {
            calls: Vec::new(),
            fail: HashSet::new(),
            table: Table::Absent,
            present: true,
            handshake_tx,
            handshake,
            reachable: Arc::new(AtomicBool::new(false)),
            roam: Arc::default(),
            on_disk: Some(profile()),
            persisted: None,
            lockdowns: Vec::new(),
            src_valid_mark: "0".into(),
            routes_restore: Vec::new(),
            verify_done: true,
            tunnel: None,
            sink: None,
            answer_firewall: Arc::new(Firewall::new(NftRunner::binary_only())),
        }
    }

    fn call(&mut self, name: &'static str) -> Result<(), String> {
        self.calls.push(name.to_string());
        if self.fail.contains(name) {
            Err(format!("{name} failed"))
        } else {
            Ok(())
        }
    }
}

impl Effects for Recorder {
    async fn create_portal(&mut self) -> Result<crate::portal::PortalPlan, String> {
        self.call("portal create")?;
        Ok(crate::portal::PortalPlan {
            namespace: "sgportal".into(),
            uplink: crate::portal::Uplink {
                interface: "eth0".into(),
                gateway: "192.0.2.1".parse().expect("address"),
                own: "192.0.2.2".parse().expect("address"),
                prefix: 26,
            },
            address: "192.0.2.61".parse().expect("address"),
            dns: "192.0.2.1".parse().expect("address"),
            mark: 0x5a1b_0001,
        })
    }
    fn set_portal_exception(&mut self, exception: Option<crate::firewall::PortalException>) {
        self.calls.push(
            match exception {
                Some(_) => "portal exception on",
                None => "portal exception off",
            }
            .into(),
        );
    }
    async fn bring_up_portal(&mut self, _plan: &crate::portal::PortalPlan) -> Result<(), String> {
        self.call("portal up")
    }
    async fn start_portal_browser(
        &mut self,
        _plan: &crate::portal::PortalPlan,
        _uid: u32,
        _program: &[String],
        _env: &[(String, String)],
    ) -> Result<u32, String> {
        self.call("portal browser")?;
        Ok(4242)
    }
    async fn remove_portal(&mut self) -> Result<(), String> {
        self.call("portal remove")
    }
    type Tunnel = AllowFilter;
    type Routes = ();
    type Stub = ();

    fn load_session(&mut self) -> Result<Option<PersistedSession>, String> {
        self.call("load session")?;
        Ok(self.persisted.clone())
    }
    fn save_session(&mut self, session: &PersistedSession) -> Result<(), String> {
        self.call("save session")?;
        self.persisted = Some(session.clone());
        Ok(())
    }
    fn clear_session(&mut self) -> Result<(), String> {
        self.call("clear session")?;
        self.persisted = None;
        Ok(())
    }
    async fn load_profile(&mut self, _name: &str) -> Result<Profile, String> {
        self.call("load profile")?;
        self.on_disk
            .clone()
            .ok_or_else(|| "profile lab: there is no lab.toml".to_string())
    }
    async fn resolve_endpoint(&mut self, _profile: &Profile) -> Result<SocketAddr, String> {
        self.call("resolve endpoint")?;
        Ok("198.51.100.2:51820".parse().expect("address"))
    }
    async fn apply_firewall(&mut self, lockdown: &Lockdown, allow: Option<&Allowlist>) -> Result<(), String> {
        self.lockdowns.push(lockdown.clone());
        match allow {
            None => {
                self.call("firewall lockdown")?;
                self.table = Table::Lockdown;
            }
            Some(_) => {
                self.call("firewall allowlist")?;
                self.table = Table::Open;
            }
        }
        self.present = true;
        Ok(())
    }
    async fn remove_firewall(&mut self) -> Result<(), String> {
        self.call("firewall remove")?;
        self.table = Table::Absent;
        Ok(())
    }
    async fn firewall_present(&mut self) -> Result<bool, String> {
        self.call("firewall present")?;
        Ok(self.present)
    }
    async fn firewall_exists(&mut self) -> Result<bool, String> {
        self.call("firewall exists")?;
        Ok(self.table != Table::Absent)
    }
    fn answer_firewall(&self) -> Arc<Firewall> {
        self.answer_firewall.clone()
    }
    fn start_guard(&mut self) {
        self.calls.push("guard on".into());
    }
    fn stop_guard(&mut self) {
        self.calls.push("guard off".into());
    }
    async fn firewall_changed(&mut self) {
        std::future::pending().await
    }
    async fn start_tunnel(
        &mut self,
        _profile: &Profile,
        _endpoint: SocketAddr,
        relay: Option<SocketAddr>,
    ) -> Result<AllowFilter, String> {
        self.call(if relay.is_some() {
            "tunnel up over tcp"
        } else {
            "tunnel up"
        })?;
        self.roam.over_tcp.store(relay.is_some(), Ordering::SeqCst);
        let filter = AllowFilter::new();
        self.tunnel = Some(filter.clone());
        Ok(filter)
    }
    fn tunnel_view(&self, _tunnel: &AllowFilter) -> Arc<dyn TunnelView> {
        Arc::new(FakeView {
            handshake: self.handshake.clone(),
            reachable: self.reachable.clone(),
            roam: self.roam.clone(),
        })
    }
    fn set_tunnel_allow(&mut self, tunnel: &AllowFilter, allow: Option<&Allowlist>) {
        self.calls.push(
            match allow {
                None => "tunnel lockdown",
                Some(_) => "tunnel allowlist",
            }
            .into(),
        );
        tunnel.set(allow);
    }
    fn tunnel_filter(&self, tunnel: &AllowFilter) -> AllowFilter {
        tunnel.clone()
    }
    fn tunnel_use_tcp(&mut self, _tunnel: &AllowFilter, _relay: SocketAddr) -> Result<(), String> {
        self.call("tunnel over tcp")?;
        self.roam.over_tcp.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn tunnel_use_udp(&mut self, _tunnel: &AllowFilter) -> Result<(), String> {
        self.call("tunnel over udp")?;
        self.roam.over_tcp.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn tunnel_probe_udp(&mut self, _tunnel: &AllowFilter) -> Result<(), String> {
        self.call("tunnel probe udp")?;
        if self.roam.udp_works.load(Ordering::SeqCst) {
            self.roam.over_tcp.store(false, Ordering::SeqCst);
            self.roam.probe_answered.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    fn tunnel_end_udp_probe(&mut self, _tunnel: &AllowFilter) -> bool {
        self.calls.push("tunnel probe end".into());
        self.roam.probe_answered.swap(false, Ordering::SeqCst)
    }
    async fn stop_tunnel(&mut self, _tunnel: AllowFilter) {
        self.calls.push("tunnel down".into());
        self.tunnel = None;
    }
    fn read_src_valid_mark(&mut self) -> Result<String, String> {
        self.call("read src_valid_mark")?;
        Ok(self.src_valid_mark.clone())
    }
    async fn add_routes(
        &mut self,
        _profile: &Profile,
        src_valid_mark_before: Option<&str>,
    ) -> Result<(), String> {
        self.call("routes up")?;
        self.routes_restore
            .push(src_valid_mark_before.map(str::to_string));
        Ok(())
    }
    async fn remove_routes(&mut self, _routes: ()) -> Result<(), String> {
        self.call("routes down")
    }
    async fn remove_stale_routes(&mut self) -> Result<(), String> {
        self.call("stale routes")
    }
    async fn start_stub(&mut self, _profile: &Profile, sink: Arc<dyn AnswerSink>) -> Result<(), String> {
        self.call("stub start")?;
        self.sink = Some(sink);
        Ok(())
    }
    fn stub_port(&self, _stub: &()) -> u16 {
        5353
    }
    fn resolve_names(&self, _stub: &Arc<()>) -> BoxFuture<'static, ()> {
        async {}.boxed()
    }
    async fn stop_stub(&mut self, _stub: Arc<()>) {
        self.calls.push("stub stop".into());
    }
    fn pin_resolver_file(&mut self) -> Result<(), String> {
        self.call("pin resolver")
    }
    fn restore_resolver_file(&mut self) -> Result<(), String> {
        self.call("restore resolver")
    }
    fn verify(&self, _status: StatusReport) -> BoxFuture<'static, Result<verify::Report, String>> {
        let done = self.verify_done;
        async move {
            if !done {
                std::future::pending::<()>().await;
            }
            Ok(verify::Report {
                passed: true,
                probes: Vec::new(),
            })
        }
        .boxed()
    }
}

const PEER: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

fn profile_with(host: &str) -> Profile {
    let text = format!(
        r#"
[tunnel]
private_key = "{PRIV}"
address = ["192.0.2.66/32"]
[tunnel.peer]
public_key = "{PEER}"
endpoint = "198.51.100.2:51820"
[dns]
servers = ["192.0.2.65"]
[[allow]]
host = "{host}"
tcp = [443]
"#
    );
    crate::profile::parse("lab", &text, Path::new("/nonexistent"), 0o600).expect("test profile")
}

fn profile() -> Profile {
    profile_with("meet.test")
}

type Machine = SessionMachine<Recorder>;

fn machine() -> (Machine, SessionHandle) {
    with_effects(Recorder::new())
}

/// Lets the tasks beside the loop run and hands their events to the
/// machine, until nothing more happens.
async fn settle(m: &mut Machine) {
    loop {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let Ok(event) = m.events.try_recv() else { return };
        m.on_event(event).await;
    }
}

fn calls(m: &Machine) -> Vec<&str> {
    m.ctx.effects.calls.iter().map(String::as_str).collect()
}

/// Forgets the calls so far, so a test sees only the next transition's.
fn forget(m: &mut Machine) {
    m.ctx.effects.calls.clear();
}

fn table(m: &Machine) -> Table {
    m.ctx.effects.table
}

fn phase(handle: &SessionHandle) -> (Phase, Option<Cause>) {
    let status = handle.status();
    (status.phase, status.cause)
}

async fn start(m: &mut Machine) -> oneshot::Receiver<Outcome> {
    let (reply, rx) = oneshot::channel();
    m.on_command(Command::Start {
        profile: Box::new(profile()),
        reply,
    })
    .await;
    settle(m).await;
    rx
}

async fn stop(m: &mut Machine) -> Outcome {
    let (reply, rx) = oneshot::channel();
    m.on_command(Command::Stop { reply }).await;
    settle(m).await;
    rx.await.expect("stop answers")
}

fn handshake(m: &Machine) {
    let _ = m.ctx.effects.handshake_tx.send(true);
    m.ctx.effects.reachable.store(true, Ordering::SeqCst);
}

/// A started, active session with the calls forgotten.
async fn active() -> (Machine, SessionHandle) {
    let (mut m, handle) = machine();
    let mut rx = start(&mut m).await;
    handshake(&m);
    settle(&mut m).await;
    assert!(matches!(rx.try_recv(), Ok(Outcome::Started(_))));
    forget(&mut m);
    (m, handle)
}

fn answered(rx: &mut oneshot::Receiver<Outcome>) -> Outcome {
    rx.try_recv().expect("the command was answered")
}

#[tokio::test]
async fn start_locks_down_before_the_tunnel_and_opens_after_the_handshake() {
    let (mut m, handle) = machine();
    let mut rx = start(&mut m).await;
    assert_eq!(
        calls(&m),
        [
            "resolve endpoint",
            "read src_valid_mark",
            "save session",
            "firewall lockdown",
            "guard on",
            "tunnel up",
            "routes up"
        ]
    );
    // The start waits for the handshake as an event: the loop is free and
    // status says starting.
    assert!(rx.try_recv().is_err(), "start answered before the handshake");
    assert_eq!(phase(&handle), (Phase::Starting, None));
    assert_eq!(table(&m), Table::Lockdown);

    forget(&mut m);
    handshake(&m);
    settle(&mut m).await;
    assert_eq!(
        calls(&m),
        [
            "stub start",
            "tunnel allowlist",
            "firewall allowlist",
            "pin resolver"
        ]
    );
    match answered(&mut rx) {
        Outcome::Started(status) => assert_eq!(status.phase, Phase::Active),
        other => panic!("start did not succeed: {other:?}"),
    }
    assert_eq!(phase(&handle), (Phase::Active, None));
    assert_eq!(table(&m), Table::Open);
}

#[tokio::test]
async fn a_start_failing_at_any_step_is_locked_down_or_unchanged_never_open() {
    // (step that fails, whether the lockdown was already up)
    let steps = [
        ("resolve endpoint", false),
        ("read src_valid_mark", false),
        ("save session", false),
        ("firewall lockdown", false),
        ("tunnel up", true),
        ("routes up", true),
        ("stub start", true),
        ("firewall allowlist", true),
        ("pin resolver", true),
    ];
    for (step, locked) in steps {
        let (mut m, handle) = machine();
        m.ctx.effects.fail.insert(step);
        let mut rx = start(&mut m).await;
        handshake(&m);
        settle(&mut m).await;
        let outcome = answered(&mut rx);
        assert!(!matches!(outcome, Outcome::Started(_)), "{step}: start succeeded");
        assert_ne!(table(&m), Table::Open, "{step}: the allowlist is open");
        if locked {
            assert_eq!(table(&m), Table::Lockdown, "{step}");
            let (phase, cause) = phase(&handle);
            assert_eq!(phase, Phase::Degraded, "{step}");
            assert!(
                matches!(cause, Some(Cause::StartFailed { .. })),
                "{step}: {cause:?}"
            );
            assert!(matches!(outcome, Outcome::Failed { .. }), "{step}");
            // Health ticks with a reachable peer do not open it either.
            m.on_health().await;
            assert_eq!(table(&m), Table::Lockdown, "{step}: opened by a health tick");
        } else {
            assert_eq!(table(&m), Table::Absent, "{step}");
            assert_eq!(phase(&handle).0, Phase::Idle, "{step}");
            assert!(matches!(outcome, Outcome::Refused(_)), "{step}");
            assert!(!calls(&m).contains(&"tunnel up"), "{step}: {:?}", calls(&m));
        }
    }
}

#[tokio::test]
async fn a_failed_lockdown_clears_the_persisted_session() {
    let (mut m, _handle) = machine();
    m.ctx.effects.fail.insert("firewall lockdown");
    let _refused = start(&mut m).await;
    assert_eq!(
        calls(&m),
        [
            "resolve endpoint",
            "read src_valid_mark",
            "save session",
            "firewall lockdown",
            "clear session"
        ]
    );
    assert_eq!(m.ctx.effects.persisted, None);
}

#[tokio::test]
async fn stop_takes_the_tunnel_down_before_the_firewall_and_clears_the_store_last() {
    let (mut m, handle) = active().await;
    let outcome = stop(&mut m).await;
    assert!(matches!(outcome, Outcome::Stopped(_)), "{outcome:?}");
    assert_eq!(
        calls(&m),
        [
            "restore resolver",
            "stub stop",
            "tunnel down",
            "routes down",
            "guard off",
            "firewall remove",
            "clear session"
        ]
    );
    assert_eq!(table(&m), Table::Absent);
    assert_eq!(phase(&handle), (Phase::Idle, None));
}

#[tokio::test]
async fn a_stop_failing_part_way_stays_locked_down_and_can_be_run_again() {
    for step in ["restore resolver", "routes down", "firewall remove"] {
        let (mut m, handle) = active().await;
        m.ctx.effects.fail.insert(step);
        let outcome = stop(&mut m).await;
        assert!(
            matches!(
                outcome,
                Outcome::Failed {
                    cause: Some(Cause::StopFailed),
                    ..
                }
            ),
            "{step}: {outcome:?}"
        );
        assert_eq!(table(&m), Table::Lockdown, "{step}");
        assert_eq!(
            phase(&handle),
            (Phase::Degraded, Some(Cause::StopFailed)),
            "{step}"
        );
        m.on_health().await;
        assert_eq!(
            phase(&handle).0,
            Phase::Degraded,
            "{step}: a health tick changed it"
        );
        // The guard keeps the bare lockdown, not the old allowlist.
        m.ctx.effects.present = false;
        m.on_firewall_changed().await;
        assert_eq!(table(&m), Table::Lockdown, "{step}");

        m.ctx.effects.fail.clear();
        let again = stop(&mut m).await;
        assert!(matches!(again, Outcome::Stopped(_)), "{step}: {again:?}");
        assert_eq!(table(&m), Table::Absent, "{step}");
        assert_eq!(m.ctx.effects.persisted, None, "{step}");
    }
}

#[tokio::test]
async fn a_store_that_cannot_be_cleared_is_reported_with_the_network_back() {
    let (mut m, handle) = active().await;
    m.ctx.effects.fail.insert("clear session");
    let outcome = stop(&mut m).await;
    assert!(
        matches!(
            outcome,
            Outcome::Failed {
                cause: Some(Cause::StoreNotCleared),
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(table(&m), Table::Absent);
    assert_eq!(phase(&handle).0, Phase::Idle);
}

#[tokio::test]
async fn stop_cancels_a_start_that_waits_for_its_handshake() {
    let (mut m, handle) = machine();
    let mut start_rx = start(&mut m).await;
    forget(&mut m);
    let outcome = stop(&mut m).await;
    assert!(matches!(outcome, Outcome::Stopped(_)), "{outcome:?}");
    assert!(
        matches!(
            answered(&mut start_rx),
            Outcome::Failed {
                cause: Some(Cause::Cancelled),
                ..
            }
        ),
        "the waiting start was not told"
    );
    assert_eq!(
        calls(&m),
        [
            "restore resolver",
            "tunnel down",
            "routes down",
            "guard off",
            "firewall remove",
            "clear session"
        ]
    );
    // A handshake after the stop is a late event of an ended stage.
    forget(&mut m);
    handshake(&m);
    settle(&mut m).await;
    assert!(calls(&m).is_empty(), "{:?}", calls(&m));
    assert_eq!(phase(&handle).0, Phase::Idle);
}

#[tokio::test]
async fn a_second_start_is_refused_while_one_waits() {
    let (mut m, _handle) = machine();
    let _first = start(&mut m).await;
    forget(&mut m);
    let mut second = start(&mut m).await;
    assert!(matches!(answered(&mut second), Outcome::Refused(_)));
    assert!(calls(&m).is_empty(), "{:?}", calls(&m));
}

#[tokio::test]
async fn the_guard_puts_back_the_shape_of_the_current_stage() {
    // While a start waits for its handshake: the bare lockdown.
    let (mut m, _handle) = machine();
    let _rx = start(&mut m).await;
    forget(&mut m);
    m.ctx.effects.present = false;
    m.ctx.effects.table = Table::Absent;
    m.on_firewall_changed().await;
    assert_eq!(calls(&m), ["firewall present", "firewall lockdown"]);
    assert_eq!(table(&m), Table::Lockdown);

    // While active: the allowlist, and the names again (the learned
    // addresses went with the old table).
    let (mut m, _handle) = active().await;
    m.ctx.effects.present = false;
    m.ctx.effects.table = Table::Absent;
    m.on_firewall_changed().await;
    settle(&mut m).await;
    assert_eq!(calls(&m), ["firewall present", "firewall allowlist"]);
    assert!(m.events.try_recv().is_err());
    assert_eq!(table(&m), Table::Open);

    // Our own writes wake the guard too; a table in place is left alone.
    forget(&mut m);
    m.on_firewall_changed().await;
    assert_eq!(calls(&m), ["firewall present"]);
}

#[tokio::test]
async fn no_handshake_in_time_stays_locked_down_until_a_late_one() {
    let (mut m, handle) = machine();
    let mut rx = start(&mut m).await;
    let Stage::Connecting(c) = &m.stage else {
        panic!("not connecting")
    };
    let id = c.id;
    m.on_event(Event::HandshakeTimeout(id)).await;
    match answered(&mut rx) {
        Outcome::Failed { cause, message } => {
            assert_eq!(cause, Some(Cause::NoHandshake));
            assert!(
                message.contains("no handshake from 198.51.100.2:51820 within 10 s"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::NoHandshake)));
    assert_eq!(table(&m), Table::Lockdown);
    // The tunnel still runs: a late handshake opens the allowlist.
    forget(&mut m);
    handshake(&m);
    settle(&mut m).await;
    assert!(calls(&m).is_empty(), "opened before the health check looked");
    m.on_health().await;
    settle(&mut m).await;
    assert_eq!(
        calls(&m),
        [
            "stub start",
            "tunnel allowlist",
            "firewall allowlist",
            "pin resolver"
        ]
    );
    assert_eq!(phase(&handle), (Phase::Active, None));
}

#[tokio::test]
async fn peer_loss_degrades_and_its_return_recovers() {
    let (mut m, handle) = active().await;
    m.ctx.effects.reachable.store(false, Ordering::SeqCst);
    m.on_health().await;
    assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::PeerLost)));
    assert!(handle
        .status()
        .problem
        .unwrap_or_default()
        .contains("stopped answering"));
    m.ctx.effects.reachable.store(true, Ordering::SeqCst);
    m.on_health().await;
    assert_eq!(phase(&handle), (Phase::Active, None));
    assert!(calls(&m).is_empty(), "{:?}", calls(&m));
}

#[tokio::test]
async fn a_wake_up_forces_a_handshake_and_status_says_why_until_it_is_answered() {
    let (mut m, handle) = active().await;
    m.on_resumed("test: woke up");
    assert_eq!(m.ctx.effects.roam.rehandshakes.load(Ordering::SeqCst), 1);
    assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::ResumedFromSleep)));
    assert!(handle
        .status()
        .problem
        .unwrap_or_default()
        .contains("woke from sleep"));
    m.on_health().await;
    assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::ResumedFromSleep)));
    m.ctx.effects.roam.answered.store(true, Ordering::SeqCst);
    m.on_health().await;
    assert_eq!(phase(&handle), (Phase::Active, None));
    let told = handle.status().last_recovery.unwrap_or_default();
    assert!(
        told.contains("woke from sleep") && told.contains("7 ms"),
        "{told}"
    );
    // The allowlist stayed as it was throughout.
    assert!(calls(&m).is_empty(), "{:?}", calls(&m));
}

#[tokio::test]
async fn a_network_change_degrades_until_the_new_handshake_is_answered() {
    let (mut m, handle) = active().await;
    m.ctx.effects.roam.path_changes.store(1, Ordering::SeqCst);
    m.on_health().await;
    assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::NetworkChanged)));
    // The same shape goes in again, so the firewall reads the new local
    // subnets (allow_lan, DHCP); the tunnel's filter is left as it is.
    assert_eq!(calls(&m), ["firewall allowlist"]);
    m.ctx.effects.calls.clear();
    assert!(handle
        .status()
        .problem
        .unwrap_or_default()
        .contains("network changed"));
    m.ctx.effects.roam.answered.store(true, Ordering::SeqCst);
    m.on_health().await;
    assert_eq!(phase(&handle), (Phase::Active, None));
    assert!(handle
        .status()
        .last_recovery
        .unwrap_or_default()
        .contains("network changed"));
    // An unanswered change with the peer gone reads as the peer lost.
    m.ctx.effects.roam.path_changes.store(2, Ordering::SeqCst);
    m.ctx.effects.roam.answered.store(false, Ordering::SeqCst);
    m.ctx.effects.reachable.store(false, Ordering::SeqCst);
    m.on_health().await;
    assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::PeerLost)));
    assert_eq!(calls(&m), ["firewall allowlist"]);
}

#[tokio::test]
async fn resume_locks_down_first_and_opens_after_the_handshake() {
    let (mut m, handle) = machine();
    m.ctx.effects.persisted = Some(PersistedSession {
        profile: "lab".into(),
        endpoint: "198.51.100.2:51820".parse().expect("address"),
        interface: "sg0".into(),
        allow_lan: false,
        src_valid_mark_before: Some("0".into()),
        transport: None,
    });
    m.resume().await.expect("resume");
    assert_eq!(
        calls(&m),
        [
            "load session",
            "firewall lockdown",
            "guard on",
            "stale routes",
            "load profile",
            "tunnel up",
            "routes up"
        ]
    );
    assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::Resuming)));
    forget(&mut m);
    handshake(&m);
    settle(&mut m).await;
    assert_eq!(
        calls(&m),
        [
            "stub start",
            "tunnel allowlist",
            "firewall allowlist",
            "pin resolver"
        ]
    );
    assert_eq!(phase(&handle), (Phase::Active, None));
}

/// After a crash the kernel holds the crashed run's src_valid_mark (1):
/// the routes of a resumed session must give back the value persisted at
/// start, not the one they find.
#[tokio::test]
async fn start_persists_src_valid_mark_and_resume_hands_it_to_the_routes() {
    let (mut m, _handle) = machine();
    let _rx = start(&mut m).await;
    let persisted = m.ctx.effects.persisted.clone().expect("a persisted session");
    assert_eq!(persisted.src_valid_mark_before.as_deref(), Some("0"));
    assert_eq!(m.ctx.effects.routes_restore, [Some("0".to_string())]);

    let (mut m, _handle) = machine();
    m.ctx.effects.persisted = Some(persisted);
    m.ctx.effects.src_valid_mark = "1".into();
    m.resume().await.expect("resume");
    assert!(!calls(&m).contains(&"read src_valid_mark"), "{:?}", calls(&m));
    assert_eq!(m.ctx.effects.routes_restore, [Some("0".to_string())]);
}

#[tokio::test]
async fn a_resume_without_its_profile_stays_locked_down() {
    let (mut m, handle) = machine();
    m.ctx.effects.persisted = Some(PersistedSession {
        profile: "lab".into(),
        endpoint: "198.51.100.2:51820".parse().expect("address"),
        interface: "sg0".into(),
        allow_lan: false,
        src_valid_mark_before: Some("0".into()),
        transport: None,
    });
    m.ctx.effects.on_disk = None;
    m.resume().await.expect("resume");
    assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::CannotResume)));
    assert_eq!(table(&m), Table::Lockdown);
    assert!(!calls(&m).contains(&"tunnel up"));
    let outcome = stop(&mut m).await;
    assert!(matches!(outcome, Outcome::Stopped(_)), "{outcome:?}");
    assert_eq!(table(&m), Table::Absent);
}

#[tokio::test]
async fn a_reload_replaces_the_stub_then_the_table() {
    let (mut m, handle) = active().await;
    m.ctx.effects.on_disk = Some(profile_with("other.test"));
    m.on_command(Command::ProfilesChanged).await;
    settle(&mut m).await;
    assert_eq!(
        calls(&m),
        [
            "load profile",
            "stub stop",
            "stub start",
            "tunnel allowlist",
            "firewall allowlist"
        ]
    );
    assert_eq!(phase(&handle), (Phase::Active, None));
    assert_eq!(handle.status().allowed[0].host, "other.test");
    // An unchanged profile changes nothing.
    forget(&mut m);
    m.on_command(Command::ProfilesChanged).await;
    assert_eq!(calls(&m), ["load profile"]);
}

/// The bug found by reading: after a failed reload the session was degraded
/// with the stub gone but still marked open, and the next health tick made
/// it active again while DNS pointed at a stopped stub.
#[tokio::test]
async fn a_failed_reload_locks_down_and_a_health_tick_does_not_reopen_it() {
    for step in ["stub start", "firewall allowlist"] {
        let (mut m, handle) = active().await;
        m.ctx.effects.on_disk = Some(profile_with("other.test"));
        m.ctx.effects.fail.insert(step);
        m.on_command(Command::ProfilesChanged).await;
        assert_eq!(
            phase(&handle),
            (Phase::Degraded, Some(Cause::ReloadFailed)),
            "{step}"
        );
        assert_eq!(table(&m), Table::Lockdown, "{step}");
        m.ctx.effects.fail.clear();
        m.on_health().await;
        settle(&mut m).await;
        assert_eq!(
            phase(&handle).0,
            Phase::Degraded,
            "{step}: a health tick made it active"
        );
        assert_eq!(table(&m), Table::Lockdown, "{step}");
    }
}

#[tokio::test]
async fn stop_cancels_a_running_verify_before_the_firewall_goes() {
    let (mut m, _handle) = active().await;
    m.ctx.effects.verify_done = false;
    let (reply, mut verify_rx) = oneshot::channel();
    m.on_command(Command::Verify { reply }).await;
    settle(&mut m).await;
    assert!(verify_rx.try_recv().is_err(), "verify answered early");
    let outcome = stop(&mut m).await;
    assert!(matches!(outcome, Outcome::Stopped(_)), "{outcome:?}");
    assert!(matches!(answered(&mut verify_rx), Outcome::Refused(_)));
}

#[tokio::test]
async fn verify_needs_a_session_and_answers_with_its_report() {
    let (mut m, _handle) = machine();
    let (reply, mut rx) = oneshot::channel();
    m.on_command(Command::Verify { reply }).await;
    assert!(matches!(answered(&mut rx), Outcome::Refused(_)));

    let (mut m, _handle) = active().await;
    let (reply, mut rx) = oneshot::channel();
    m.on_command(Command::Verify { reply }).await;
    settle(&mut m).await;
    assert!(matches!(answered(&mut rx), Outcome::Verified(_)));
}

/// The loop itself: while a start waits for its handshake, `status`
/// answers and `stop` is served (and cancels the start).
#[tokio::test]
async fn the_loop_serves_stop_and_status_while_a_start_waits() {
    let (m, handle) = machine();
    let (shutdown_tx, shutdown) = watch::channel(false);
    let running = tokio::spawn(m.run(shutdown));
    let starter = handle.clone();
    let start = tokio::spawn(async move { starter.start(profile()).await });
    while handle.status().tunnel.is_none() {
        tokio::task::yield_now().await;
    }
    assert_eq!(handle.status().phase, Phase::Starting);
    let stopped = handle.stop().await;
    assert!(matches!(stopped, Outcome::Stopped(_)), "{stopped:?}");
    let started = start.await.expect("the start task");
    assert!(
        matches!(
            started,
            Outcome::Failed {
                cause: Some(Cause::Cancelled),
                ..
            }
        ),
        "{started:?}"
    );
    assert_eq!(handle.status().phase, Phase::Idle);
    let _ = shutdown_tx.send(true);
    running.await.expect("the machine ends on shutdown");
}

#[tokio::test]
async fn a_resume_whose_tunnel_changed_stays_locked_down() {
    let (mut m, handle) = machine();
    m.ctx.effects.persisted = Some(PersistedSession {
        profile: "lab".into(),
        endpoint: "198.51.100.2:51820".parse().expect("address"),
        interface: "sg1".into(),
        allow_lan: false,
        src_valid_mark_before: Some("0".into()),
        transport: None,
    });
    m.resume().await.expect("resume");
    assert_eq!(
        calls(&m),
        [
            "load session",
            "firewall lockdown",
            "guard on",
            "stale routes",
            "load profile"
        ]
    );
    assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::CannotResume)));
    assert_eq!(table(&m), Table::Lockdown);
}

#[tokio::test]
async fn a_reload_while_a_start_waits_only_changes_what_will_open() {
    let (mut m, handle) = machine();
    let mut rx = start(&mut m).await;
    m.ctx.effects.on_disk = Some(profile_with("other.test"));
    forget(&mut m);
    m.on_command(Command::ProfilesChanged).await;
    assert_eq!(calls(&m), ["load profile"]);
    assert_eq!(table(&m), Table::Lockdown);
    assert_eq!(phase(&handle), (Phase::Starting, None));
    handshake(&m);
    settle(&mut m).await;
    assert!(matches!(answered(&mut rx), Outcome::Started(_)));
    assert_eq!(handle.status().allowed[0].host, "other.test");
}

#[tokio::test]
async fn a_changed_tunnel_section_waits_for_the_next_start() {
    let (mut m, handle) = active().await;
    let mut edited = profile();
    edited.tunnel.mtu = 1280;
    m.ctx.effects.on_disk = Some(edited);
    m.on_command(Command::ProfilesChanged).await;
    assert_eq!(calls(&m), ["load profile"]);
    assert!(handle
        .status()
        .pending
        .is_some_and(|p| p.contains("next `sessionctl start`")));
    assert_eq!(phase(&handle), (Phase::Active, None));
}

#[tokio::test]
async fn stop_with_no_session_removes_a_leftover_lockdown_and_only_then() {
    let (mut m, handle) = machine();
    let outcome = stop(&mut m).await;
    assert!(matches!(outcome, Outcome::Stopped(_)), "{outcome:?}");
    assert_eq!(calls(&m), ["firewall exists"]);

    // The early-boot unit's lockdown, with no session to own it.
    forget(&mut m);
    m.ctx.effects.table = Table::Lockdown;
    m.ctx.effects.fail.insert("firewall remove");
    let outcome = stop(&mut m).await;
    assert!(matches!(outcome, Outcome::Failed { .. }), "{outcome:?}");
    assert_eq!(table(&m), Table::Lockdown);

    forget(&mut m);
    m.ctx.effects.fail.clear();
    let outcome = stop(&mut m).await;
    match outcome {
        Outcome::Stopped(message) => assert!(message.contains("lockdown was left"), "{message}"),
        other => panic!("stop did not succeed: {other:?}"),
    }
    assert_eq!(calls(&m), ["firewall exists", "firewall remove"]);
    assert_eq!(table(&m), Table::Absent);
    assert_eq!(phase(&handle), (Phase::Idle, None));
}

// ---------------------------------------------------------------------------
// The tunnel's own filter follows the firewall (a flushed table must not let
// forbidden packets into the tunnel while the guard puts it back).

const TCP: u8 = crate::firewall::TCP;
const UDP: u8 = crate::firewall::UDP;
/// The test profile's pinned DNS server.
const PINNED_DNS: &str = "192.0.2.65";
/// Where the stub's answer for meet.test points.
const ANSWERED: &str = "198.51.100.77";

/// An IPv4 packet to `dst`, `proto`, `port`, as the TUN device hands it over.
fn packet(dst: &str, proto: u8, port: u16) -> Vec<u8> {
    let dst: std::net::Ipv4Addr = dst.parse().expect("address");
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[9] = proto;
    p[12..16].copy_from_slice(&[192, 0, 2, 66]);
    p[16..20].copy_from_slice(&dst.octets());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p
}

/// Whether the running tunnel would encrypt that packet now.
fn tunnel_admits(m: &Machine, dst: &str, proto: u8, port: u16) -> bool {
    let Some(filter) = &m.ctx.effects.tunnel else {
        return false;
    };
    decide(&packet(dst, proto, port), filter.current().as_deref()) == Verdict::Admit
}

/// The stub answers `name` with `addr`, through the sink the machine gave it.
async fn answer(m: &Machine, name: &str, addr: &str) {
    let sink = m.ctx.effects.sink.clone().expect("a stub was started");
    sink.on_answer(name, vec![(addr.parse().expect("address"), 300)])
        .await;
}

#[tokio::test]
async fn the_tunnel_encrypts_nothing_until_the_allowlist_opens_and_then_only_it() {
    let (mut m, handle) = machine();
    let _rx = start(&mut m).await;
    // Starting: the tunnel is up behind the lockdown and admits nothing.
    assert!(m.ctx.effects.tunnel.is_some());
    assert!(!tunnel_admits(&m, PINNED_DNS, UDP, 53));

    forget(&mut m);
    handshake(&m);
    settle(&mut m).await;
    assert_eq!(phase(&handle), (Phase::Active, None));
    // The tunnel's allowlist goes in before the firewall's.
    assert_eq!(
        calls(&m),
        [
            "stub start",
            "tunnel allowlist",
            "firewall allowlist",
            "pin resolver"
        ]
    );
    assert!(tunnel_admits(&m, PINNED_DNS, UDP, 53));
    assert!(tunnel_admits(&m, PINNED_DNS, TCP, 53));
    assert!(!tunnel_admits(&m, "203.0.113.53", UDP, 53));
    assert!(!tunnel_admits(&m, ANSWERED, TCP, 443));

    // The stub's answers reach the tunnel, on the name's ports only.
    answer(&m, "meet.test", ANSWERED).await;
    assert!(tunnel_admits(&m, ANSWERED, TCP, 443));
    assert!(!tunnel_admits(&m, ANSWERED, TCP, 8443));
    assert!(!tunnel_admits(&m, ANSWERED, UDP, 443));
    answer(&m, "other.test", "198.51.100.78").await;
    assert!(!tunnel_admits(&m, "198.51.100.78", TCP, 443));

    // The tamper guard's restore leaves the tunnel as it is.
    forget(&mut m);
    m.ctx.effects.present = false;
    m.on_firewall_changed().await;
    settle(&mut m).await;
    assert!(
        !calls(&m).iter().any(|c| c.starts_with("tunnel")),
        "{:?}",
        calls(&m)
    );
    assert!(tunnel_admits(&m, ANSWERED, TCP, 443));

    // Degraded while the peer is lost: the allowlist stays, as the firewall's.
    m.ctx.effects.reachable.store(false, Ordering::SeqCst);
    m.on_health().await;
    assert_eq!(phase(&handle).1, Some(Cause::PeerLost));
    assert!(tunnel_admits(&m, ANSWERED, TCP, 443));
}

#[tokio::test]
async fn a_reload_narrows_the_tunnel_before_the_firewall() {
    let (mut m, _handle) = active().await;
    answer(&m, "meet.test", ANSWERED).await;
    assert!(tunnel_admits(&m, ANSWERED, TCP, 443));

    // meet.test leaves the profile: its answered address closes at once.
    m.ctx.effects.on_disk = Some(profile_with("other.test"));
    m.on_command(Command::ProfilesChanged).await;
    settle(&mut m).await;
    let order = calls(&m);
    let tunnel = order.iter().position(|c| *c == "tunnel allowlist");
    let firewall = order.iter().position(|c| *c == "firewall allowlist");
    assert!(tunnel.is_some() && tunnel < firewall, "{order:?}");
    assert!(!tunnel_admits(&m, ANSWERED, TCP, 443));
    assert!(tunnel_admits(&m, PINNED_DNS, UDP, 53));
    // A late answer for the removed name does not reopen it.
    answer(&m, "meet.test", ANSWERED).await;
    assert!(!tunnel_admits(&m, ANSWERED, TCP, 443));

    // A literal host in its place: admitted on its port only.
    m.ctx.effects.on_disk = Some(profile_with("203.0.113.10"));
    m.on_command(Command::ProfilesChanged).await;
    settle(&mut m).await;
    assert!(tunnel_admits(&m, "203.0.113.10", TCP, 443));
    assert!(!tunnel_admits(&m, "203.0.113.10", UDP, 10000));
}

#[tokio::test]
async fn every_failure_that_locks_the_firewall_down_locks_the_tunnel_too() {
    // Opening the allowlist fails; the resolver file cannot be pinned.
    for step in ["firewall allowlist", "pin resolver"] {
        let (mut m, _handle) = machine();
        m.ctx.effects.fail.insert(step);
        let _rx = start(&mut m).await;
        handshake(&m);
        settle(&mut m).await;
        assert_eq!(table(&m), Table::Lockdown, "{step}");
        assert!(calls(&m).contains(&"tunnel lockdown"), "{step}: {:?}", calls(&m));
        assert!(
            !tunnel_admits(&m, PINNED_DNS, UDP, 53),
            "{step}: the tunnel stayed open"
        );
    }
    // A reload fails part-way.
    for step in ["stub start", "firewall allowlist"] {
        let (mut m, _handle) = active().await;
        answer(&m, "meet.test", ANSWERED).await;
        m.ctx.effects.on_disk = Some(profile_with("other.test"));
        m.ctx.effects.fail.insert(step);
        m.on_command(Command::ProfilesChanged).await;
        assert_eq!(table(&m), Table::Lockdown, "{step}");
        assert!(
            !tunnel_admits(&m, PINNED_DNS, UDP, 53),
            "{step}: the tunnel stayed open"
        );
        assert!(
            !tunnel_admits(&m, ANSWERED, TCP, 443),
            "{step}: the tunnel stayed open"
        );
        // Nor does a health tick reopen it.
        m.ctx.effects.fail.clear();
        m.on_health().await;
        settle(&mut m).await;
        assert!(!tunnel_admits(&m, PINNED_DNS, UDP, 53), "{step}: reopened");
    }
    // A stop that fails before the tunnel is down leaves it locked.
    let (mut m, _handle) = active().await;
    m.ctx.effects.fail.insert("restore resolver");
    let outcome = stop(&mut m).await;
    assert!(matches!(outcome, Outcome::Failed { .. }), "{outcome:?}");
    assert!(m.ctx.effects.tunnel.is_some());
    assert!(!tunnel_admits(&m, PINNED_DNS, UDP, 53), "the tunnel stayed open");
}

#[tokio::test]
async fn a_late_handshake_and_a_resume_open_the_tunnel_with_the_firewall() {
    let (mut m, _handle) = machine();
    let _rx = start(&mut m).await;
    let Stage::Connecting(c) = &m.stage else {
        panic!("not connecting")
    };
    let id = c.id;
    m.on_event(Event::HandshakeTimeout(id)).await;
    handshake(&m);
    settle(&mut m).await;
    assert!(
        !tunnel_admits(&m, PINNED_DNS, UDP, 53),
        "open before the health check"
    );
    m.on_health().await;
    settle(&mut m).await;
    assert!(tunnel_admits(&m, PINNED_DNS, UDP, 53));

    let (mut m, _handle) = machine();
    m.ctx.effects.persisted = Some(PersistedSession {
        profile: "lab".into(),
        endpoint: "198.51.100.2:51820".parse().expect("address"),
        interface: "sg0".into(),
        allow_lan: false,
        src_valid_mark_before: Some("0".into()),
        transport: None,
    });
    m.resume().await.expect("resume");
    assert!(!tunnel_admits(&m, PINNED_DNS, UDP, 53));
    handshake(&m);
    settle(&mut m).await;
    assert!(tunnel_admits(&m, PINNED_DNS, UDP, 53));
}

fn portal_request(during_session: bool) -> sessiongate_common::control::PortalRequest {
    sessiongate_common::control::PortalRequest {
        during_session,
        seconds: Some(60),
        ..Default::default()
    }
}

async fn ask_portal(m: &mut Machine, request: sessiongate_common::control::PortalRequest) -> Outcome {
    let (tx, mut rx) = oneshot::channel();
    m.on_command(Command::Portal {
        request,
        uid: 1000,
        reply: tx,
    })
    .await;
    answered(&mut rx)
}

#[tokio::test]
async fn the_portal_is_refused_during_a_session_unless_asked_in_so_many_words() {
    let (mut m, _handle) = active().await;
    let refused = ask_portal(&mut m, portal_request(false)).await;
    assert!(
        matches!(&refused, Outcome::Refused(why) if why.contains("--during-session")),
        "{refused:?}"
    );
    assert!(calls(&m).is_empty(), "{:?}", calls(&m));
    // Asked for: the namespace is set up with its link down, the
    // exception goes into the session's firewall, then the link comes up.
    let opened = ask_portal(&mut m, portal_request(true)).await;
    assert!(matches!(opened, Outcome::Portal(_)), "{opened:?}");
    assert_eq!(
        calls(&m),
        [
            "portal remove",
            "portal create",
            "portal exception on",
            "firewall allowlist",
            "portal up"
        ]
    );
    forget(&mut m);
    // Closing: the namespace goes before the exception is withdrawn.
    let closed = ask_portal(
        &mut m,
        sessiongate_common::control::PortalRequest {
            close: true,
            ..Default::default()
        },
    )
    .await;
    assert!(matches!(closed, Outcome::Stopped(_)), "{closed:?}");
    assert_eq!(
        calls(&m),
        ["portal remove", "portal exception off", "firewall allowlist"]
    );
}

#[tokio::test]
async fn a_portal_that_cannot_come_up_is_removed_and_its_exception_withdrawn() {
    let (mut m, _handle) = active().await;
    m.ctx.effects.fail.insert("portal up");
    let failed = ask_portal(&mut m, portal_request(true)).await;
    assert!(matches!(failed, Outcome::Failed { .. }), "{failed:?}");
    assert_eq!(
        calls(&m)[calls(&m).len() - 3..],
        ["portal remove", "portal exception off", "firewall allowlist"]
    );
    assert!(m.portal.is_none());
}

#[tokio::test]
async fn without_a_session_the_portal_opens_without_touching_any_firewall() {
    let (mut m, _handle) = machine();
    let opened = ask_portal(&mut m, portal_request(false)).await;
    assert!(matches!(opened, Outcome::Portal(_)), "{opened:?}");
    assert_eq!(
        calls(&m),
        [
            "portal remove",
            "portal create",
            "portal exception on",
            "portal up"
        ]
    );
}

fn auto_profile() -> Profile {
    profile_with_transport("auto")
}

fn profile_with_transport(transport: &str) -> Profile {
    let text = format!(
        r#"
[tunnel]
private_key = "{PRIV}"
address = ["192.0.2.66/32"]
[tunnel.peer]
public_key = "{PEER}"
endpoint = "198.51.100.2:51820"
[dns]
servers = ["192.0.2.65"]
[[allow]]
host = "meet.test"
tcp = [443]
[gateway]
transport = "{transport}"
tcp_endpoint = "198.51.100.2:443"
"#
    );
    crate::profile::parse("lab", &text, Path::new("/nonexistent"), 0o600).expect("test profile")
}

async fn start_auto(m: &mut Machine) -> oneshot::Receiver<Outcome> {
    let (reply, rx) = oneshot::channel();
    m.on_command(Command::Start {
        profile: Box::new(auto_profile()),
        reply,
    })
    .await;
    settle(m).await;
    rx
}

fn connecting_id(m: &Machine) -> u64 {
    let Stage::Connecting(c) = &m.stage else {
        panic!("not connecting")
    };
    c.id
}

#[tokio::test]
async fn auto_moves_the_lockdown_to_the_relay_before_the_tunnel_goes_over_tcp() {
    let (mut m, handle) = machine();
    let mut rx = start_auto(&mut m).await;
    let udp = m.stage.locked().expect("locked").lockdown.clone();
    assert_eq!(udp.endpoint_protocol, crate::firewall::EndpointProtocol::Udp);
    forget(&mut m);
    let first = connecting_id(&m);
    m.on_event(Event::UdpUnanswered(first)).await;
    // Persisted first: a crash from here on resumes on TCP.
    assert_eq!(
        calls(&m),
        [
            "load session",
            "save session",
            "firewall lockdown",
            "tunnel over tcp"
        ]
    );
    assert_eq!(
        m.ctx.effects.persisted.as_ref().and_then(|p| p.transport),
        Some(crate::store::PersistedTransport::Tcp {
            relay: "198.51.100.2:443".parse().expect("address")
        })
    );
    let tcp = m.stage.locked().expect("locked").lockdown.clone();
    assert_eq!(tcp.endpoint, "198.51.100.2:443".parse().expect("address"));
    assert_eq!(tcp.endpoint_protocol, crate::firewall::EndpointProtocol::Tcp);
    assert_eq!(table(&m), Table::Lockdown);
    assert_eq!(phase(&handle), (Phase::Starting, Some(Cause::TryingTcp)));
    assert!(rx.try_recv().is_err(), "start answered before the handshake");
    // A late UDP timer of the first wait changes nothing.
    forget(&mut m);
    m.on_event(Event::UdpUnanswered(first)).await;
    assert!(calls(&m).is_empty(), "{:?}", calls(&m));
    handshake(&m);
    settle(&mut m).await;
    assert!(matches!(answered(&mut rx), Outcome::Started(_)));
    assert_eq!(phase(&handle), (Phase::Active, Some(Cause::UdpUnanswered)));
    assert_eq!(
        handle.status().problem.as_deref(),
        Some("the gateway did not answer over UDP; using TCP port 443 (slower)")
    );
}

#[tokio::test]
async fn a_tunnel_that_cannot_go_over_tcp_stays_locked_down() {
    let (mut m, handle) = machine();
    let mut rx = start_auto(&mut m).await;
    m.ctx.effects.fail.insert("tunnel over tcp");
    m.on_event(Event::UdpUnanswered(connecting_id(&m))).await;
    match answered(&mut rx) {
        Outcome::Failed { cause, .. } => assert_eq!(cause, Some(Cause::StartFailed { step: Step::Tunnel })),
        other => panic!("{other:?}"),
    }
    assert_eq!(table(&m), Table::Lockdown);
    assert_eq!(phase(&handle).0, Phase::Degraded);
}

#[tokio::test]
async fn a_udp_profile_never_tries_tcp() {
    let (mut m, _handle) = machine();
    let _rx = start(&mut m).await;
    let Stage::Connecting(c) = &m.stage else {
        panic!("not connecting")
    };
    // The handshake wait and the start's deadline, no UDP timer.
    assert_eq!(c._waits.len(), 2);
}

/// An `auto` session that fell back to TCP and is active, with the calls
/// and the lockdowns so far forgotten.
async fn active_over_tcp() -> (Machine, SessionHandle) {
    let (mut m, handle) = machine();
    let mut rx = start_auto(&mut m).await;
    m.on_event(Event::UdpUnanswered(connecting_id(&m))).await;
    handshake(&m);
    settle(&mut m).await;
    assert!(matches!(answered(&mut rx), Outcome::Started(_)));
    assert_eq!(phase(&handle), (Phase::Active, Some(Cause::UdpUnanswered)));
    forget(&mut m);
    m.ctx.effects.lockdowns.clear();
    (m, handle)
}

fn last_lockdown(m: &Machine) -> Lockdown {
    m.ctx.effects.lockdowns.last().expect("a lockdown").clone()
}

fn udp_again(m: &mut Machine) -> &mut super::stage::UdpAgain {
    let Stage::Open(open) = &mut m.stage else {
        panic!("not open")
    };
    &mut open.udp_again
}

const GATEWAY: &str = "198.51.100.2:51820";
const RELAY: &str = "198.51.100.2:443";

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("address")
}

#[tokio::test]
async fn over_tcp_a_network_change_tries_udp_again_and_an_answer_moves_the_session_back_to_it() {
    use crate::firewall::EndpointProtocol;
    let (mut m, handle) = active_over_tcp().await;
    m.ctx.effects.roam.udp_works.store(true, Ordering::SeqCst);
    // Another network; the tunnel's handshake over TCP from there is not
    // answered yet: no probe, it would replace that handshake.
    m.ctx.effects.roam.path_changes.fetch_add(1, Ordering::SeqCst);
    m.on_health().await;
    assert_eq!(calls(&m), ["firewall allowlist"], "only the new local subnets");
    forget(&mut m);
    // Answered: now UDP is tried, the firewall admitting it first.
    m.ctx.effects.roam.answered.store(true, Ordering::SeqCst);
    m.on_health().await;
    assert_eq!(calls(&m), ["firewall allowlist", "tunnel probe udp"]);
    let probing = last_lockdown(&m);
    assert_eq!(probing.endpoint, addr(RELAY));
    assert_eq!(probing.endpoint_protocol, EndpointProtocol::Tcp);
    assert_eq!(probing.udp_probe, Some(addr(GATEWAY)));
    forget(&mut m);
    // The gateway answered over UDP and the tunnel moved: persisted, then
    // the firewall admits the gateway's UDP alone.
    m.on_health().await;
    assert_eq!(
        calls(&m),
        [
            "tunnel probe end",
            "load session",
            "save session",
            "firewall allowlist"
        ]
    );
    let back = last_lockdown(&m);
    assert_eq!(back.endpoint, addr(GATEWAY));
    assert_eq!(back.endpoint_protocol, EndpointProtocol::Udp);
    assert_eq!(back.udp_probe, None);
    assert_eq!(
        m.ctx.effects.persisted.as_ref().and_then(|p| p.transport),
        Some(crate::store::PersistedTransport::Udp)
    );
    assert_eq!(table(&m), Table::Open);
    assert_eq!(phase(&handle), (Phase::Active, None));
    let told = handle.status().last_recovery.unwrap_or_default();
    assert!(told.contains("back on UDP"), "{told}");
    // On UDP nothing more is tried.
    forget(&mut m);
    m.on_health().await;
    assert!(calls(&m).is_empty(), "{:?}", calls(&m));
}

#[tokio::test]
async fn over_tcp_an_unanswered_udp_probe_ends_in_the_tunnel_before_the_firewall_closes_it() {
    use crate::firewall::EndpointProtocol;
    let (mut m, handle) = active_over_tcp().await;
    m.on_health().await;
    assert!(calls(&m).is_empty(), "tried before it was due: {:?}", calls(&m));
    // The periodic try is due.
    udp_again(&mut m).next_try = tokio::time::Instant::now();
    m.on_health().await;
    assert_eq!(calls(&m), ["firewall allowlist", "tunnel probe udp"]);
    assert_eq!(last_lockdown(&m).udp_probe, Some(addr(GATEWAY)));
    forget(&mut m);
    m.on_health().await;
    assert!(calls(&m).is_empty(), "ended before its time: {:?}", calls(&m));
    // No answer in its time.
    let since = tokio::time::Instant::now()
        .checked_sub(super::udp_again::PROBE_WAIT)
        .expect("a clock past the probe's wait");
    udp_again(&mut m).probing_since = Some(since);
    m.on_health().await;
    assert_eq!(calls(&m), ["tunnel probe end", "firewall allowlist"]);
    let closed = last_lockdown(&m);
    assert_eq!(closed.endpoint, addr(RELAY));
    assert_eq!(closed.endpoint_protocol, EndpointProtocol::Tcp);
    assert_eq!(closed.udp_probe, None);
    assert_eq!(phase(&handle), (Phase::Active, Some(Cause::UdpUnanswered)));
    // The next try is minutes away.
    let next = udp_again(&mut m).next_try;
    assert!(next > tokio::time::Instant::now() + super::udp_again::RETRY_EVERY / 2);
}

/// A crash during a session over TCP: the resume's first lockdown already
/// admits the relay's TCP and no UDP, and the tunnel starts over TCP
/// (without the persisted transport an `auto` session came back on UDP,
/// and a `tcp` one locked down on UDP until its profile was read).
#[tokio::test]
async fn a_session_persisted_over_tcp_resumes_over_tcp_without_admitting_udp() {
    for transport in ["auto", "tcp"] {
        resumes_over_tcp(profile_with_transport(transport)).await;
    }
}

async fn resumes_over_tcp(profile: Profile) {
    use crate::firewall::EndpointProtocol;
    let auto = matches!(profile.transport, crate::profile::Transport::Auto { .. });
    let (mut m, handle) = machine();
    m.ctx.effects.on_disk = Some(profile);
    m.ctx.effects.persisted = Some(PersistedSession {
        profile: "lab".into(),
        endpoint: addr(GATEWAY),
        interface: "sg0".into(),
        allow_lan: false,
        src_valid_mark_before: Some("0".into()),
        transport: Some(crate::store::PersistedTransport::Tcp { relay: addr(RELAY) }),
    });
    m.resume().await.expect("resume");
    assert_eq!(
        calls(&m),
        [
            "load session",
            "firewall lockdown",
            "guard on",
            "stale routes",
            "load profile",
            "tunnel up over tcp",
            "routes up"
        ]
    );
    for lockdown in &m.ctx.effects.lockdowns {
        assert_eq!(lockdown.endpoint, addr(RELAY));
        assert_eq!(lockdown.endpoint_protocol, EndpointProtocol::Tcp);
        assert_eq!(lockdown.udp_probe, None);
    }
    let Stage::Connecting(c) = &m.stage else {
        panic!("not connecting")
    };
    // The handshake, and for `auto` the relay's time before UDP's turn.
    let waits = if auto { 2 } else { 1 };
    assert_eq!(c._waits.len(), waits, "a UDP timer on a session resumed over TCP");
    if auto {
        assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::TryingTcp)));
    } else {
        assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::Resuming)));
    }
    // The same for the lockdown a sessiond that refuses to run puts back.
    let persisted = m.ctx.effects.persisted.clone().expect("persisted");
    let refused = super::idle::lockdown_of_persisted(&persisted);
    assert_eq!(refused.endpoint_protocol, EndpointProtocol::Tcp);
    assert_eq!(refused.endpoint, addr(RELAY));
}

/// An `auto` session resumed over TCP whose relay does not answer (gone,
/// or the machine woke on a network that passes UDP): UDP gets its turn,
/// firewall before tunnel, and TCP again after that.
#[tokio::test]
async fn a_resume_over_tcp_that_the_relay_does_not_answer_takes_turns_with_udp() {
    use crate::firewall::EndpointProtocol;
    let (mut m, handle) = machine();
    m.ctx.effects.on_disk = Some(auto_profile());
    m.ctx.effects.persisted = Some(PersistedSession {
        profile: "lab".into(),
        endpoint: addr(GATEWAY),
        interface: "sg0".into(),
        allow_lan: false,
        src_valid_mark_before: Some("0".into()),
        transport: Some(crate::store::PersistedTransport::Tcp { relay: addr(RELAY) }),
    });
    m.resume().await.expect("resume");
    forget(&mut m);
    m.on_event(Event::TcpUnanswered(connecting_id(&m))).await;
    assert_eq!(
        calls(&m),
        [
            "load session",
            "save session",
            "firewall lockdown",
            "tunnel over udp"
        ]
    );
    let udp = last_lockdown(&m);
    assert_eq!(udp.endpoint, addr(GATEWAY));
    assert_eq!(udp.endpoint_protocol, EndpointProtocol::Udp);
    assert_eq!(
        m.ctx.effects.persisted.as_ref().and_then(|p| p.transport),
        Some(crate::store::PersistedTransport::Udp)
    );
    assert_eq!(table(&m), Table::Lockdown);
    assert_eq!(phase(&handle).0, Phase::Degraded);
    // UDP unanswered too: TCP's turn again.
    forget(&mut m);
    m.on_event(Event::UdpUnanswered(connecting_id(&m))).await;
    assert_eq!(
        calls(&m),
        [
            "load session",
            "save session",
            "firewall lockdown",
            "tunnel over tcp"
        ]
    );
    assert_eq!(last_lockdown(&m).endpoint, addr(RELAY));
    // A handshake on either opens the session.
    handshake(&m);
    settle(&mut m).await;
    assert_eq!(table(&m), Table::Open);
}

/// An `auto` session started and active over UDP.
async fn active_auto_over_udp() -> (Machine, SessionHandle) {
    let (mut m, handle) = machine();
    let mut rx = start_auto(&mut m).await;
    handshake(&m);
    settle(&mut m).await;
    assert!(matches!(answered(&mut rx), Outcome::Started(_)));
    assert_eq!(phase(&handle), (Phase::Active, None));
    forget(&mut m);
    m.ctx.effects.lockdowns.clear();
    (m, handle)
}

fn handshake_unanswered_for(m: &Machine, waited: std::time::Duration) {
    m.ctx
        .effects
        .roam
        .unanswered_ms
        .store(waited.as_millis() as u64, Ordering::SeqCst);
}

#[tokio::test]
async fn over_udp_an_unanswered_handshake_moves_an_auto_session_to_tcp_persisted_and_firewall_first() {
    use crate::firewall::EndpointProtocol;
    let (mut m, handle) = active_auto_over_udp().await;
    // Unanswered for less than the start gives UDP: nothing yet.
    handshake_unanswered_for(&m, super::connecting::UDP_TRY / 2);
    m.on_health().await;
    assert!(calls(&m).is_empty(), "moved too early: {:?}", calls(&m));
    // As long as the start gives it: the persisted session says TCP, then
    // the firewall admits the relay's TCP instead, then the tunnel moves.
    handshake_unanswered_for(&m, super::connecting::UDP_TRY);
    m.on_health().await;
    assert_eq!(
        calls(&m),
        [
            "load session",
            "save session",
            "firewall allowlist",
            "tunnel over tcp"
        ]
    );
    let moved = last_lockdown(&m);
    assert_eq!(moved.endpoint, addr(RELAY));
    assert_eq!(moved.endpoint_protocol, EndpointProtocol::Tcp);
    assert_eq!(moved.udp_probe, None);
    assert_eq!(
        m.ctx.effects.persisted.as_ref().and_then(|p| p.transport),
        Some(crate::store::PersistedTransport::Tcp { relay: addr(RELAY) })
    );
    assert_eq!(table(&m), Table::Open, "the allowlist stays");
    assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::TryingTcp)));
    // The gateway answers through the relay: active over TCP, and why.
    forget(&mut m);
    m.ctx.effects.roam.answered.store(true, Ordering::SeqCst);
    m.on_health().await;
    assert_eq!(phase(&handle), (Phase::Active, Some(Cause::UdpUnanswered)));
    let told = handle.status().last_recovery.unwrap_or_default();
    assert!(told.contains("over TCP"), "{told}");
    assert!(calls(&m).is_empty(), "{:?}", calls(&m));
    // UDP is tried again later, as after a start over TCP.
    assert!(udp_again(&mut m).next_try > tokio::time::Instant::now());
}

#[tokio::test]
async fn over_udp_a_tunnel_that_cannot_move_to_tcp_leaves_the_firewall_on_udp() {
    use crate::firewall::EndpointProtocol;
    let (mut m, handle) = active_auto_over_udp().await;
    m.ctx.effects.fail.insert("tunnel over tcp");
    handshake_unanswered_for(&m, super::connecting::UDP_TRY);
    m.on_health().await;
    assert_eq!(
        calls(&m),
        [
            "load session",
            "save session",
            "firewall allowlist",
            "tunnel over tcp",
            "firewall allowlist",
            "load session",
            "save session"
        ]
    );
    let back = last_lockdown(&m);
    assert_eq!(back.endpoint, addr(GATEWAY));
    assert_eq!(back.endpoint_protocol, EndpointProtocol::Udp);
    assert_eq!(
        m.ctx.effects.persisted.as_ref().and_then(|p| p.transport),
        Some(crate::store::PersistedTransport::Udp)
    );
    assert_eq!(table(&m), Table::Open);
    assert_ne!(phase(&handle).1, Some(Cause::TryingTcp));
    // Not tried again on every tick.
    forget(&mut m);
    m.on_health().await;
    assert!(calls(&m).is_empty(), "{:?}", calls(&m));
}

#[tokio::test]
async fn after_a_move_to_tcp_whose_relay_stays_silent_udp_gets_its_turn() {
    use crate::firewall::EndpointProtocol;
    let (mut m, handle) = active_auto_over_udp().await;
    handshake_unanswered_for(&m, super::connecting::UDP_TRY);
    m.on_health().await;
    assert_eq!(last_lockdown(&m).endpoint_protocol, EndpointProtocol::Tcp);
    forget(&mut m);
    // The relay does not answer either; before its turn is up, nothing.
    m.ctx.effects.reachable.store(false, Ordering::SeqCst);
    m.on_health().await;
    assert!(calls(&m).is_empty(), "{:?}", calls(&m));
    assert_eq!(phase(&handle), (Phase::Degraded, Some(Cause::TryingTcp)));
    // Its turn is up: UDP is tried beside the TCP, the firewall first,
    // though the tunnel is still waiting for the relay.
    let Stage::Open(open) = &mut m.stage else {
        panic!("not open")
    };
    open.tcp_fallback.relay_waited_since =
        tokio::time::Instant::now().checked_sub(super::connecting::TCP_TRY);
    m.on_health().await;
    m.on_health().await;
    assert_eq!(calls(&m), ["firewall allowlist", "tunnel probe udp"]);
    assert_eq!(last_lockdown(&m).udp_probe, Some(addr(GATEWAY)));
}
