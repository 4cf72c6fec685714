//! Noticing that the machine woke from sleep, two ways: logind's
//! `PrepareForSleep(false)` signal on the system bus, and a jump between
//! CLOCK_BOOTTIME (counts suspended time) and CLOCK_MONOTONIC (does not),
//! which needs no bus at all.
//!
//! After a suspend the gateway may have dropped the session's keys while
//! the tunnel's timers (monotonic, stopped during the sleep) still think
//! they are fresh; the session machine then asks for a new handshake.
//!
//! This module owns only the noticing. It never touches the tunnel, the
//! firewall or the session: it reports, and the session machine decides.
//! The bus is optional: without one (a container, a minimal system)
//! sessiond runs as before and the clock check still works.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;

/// A gap between the two clocks that grew by more than this since the last
/// look is a suspend (a health tick is 1 s; scheduling noise is far less).
pub const SLEEP_GAP: Duration = Duration::from_secs(2);

/// Tests only: the address of a private bus to listen on instead of the
/// system bus (the lab's stand-in `org.freedesktop.login1`).
pub const TEST_BUS_ENV: &str = "SESSIOND_TEST_SYSTEM_BUS";

/// Watches the gap between a clock that runs during suspend and one that
/// does not. Reads come from `read`, so a test can inject the clocks.
pub struct ClockWatch<F: FnMut() -> Option<(Duration, Duration)>> {
    read: F,
    last_gap: Option<Duration>,
}

impl<F: FnMut() -> Option<(Duration, Duration)>> ClockWatch<F> {
    /// `read` returns (boot time, monotonic time).
    pub fn new(mut read: F) -> Self {
        let last_gap = read().map(|(boot, mono)| boot.saturating_sub(mono));
        ClockWatch { read, last_gap }
    }

    /// How long the machine slept since the last look, if it did.
    pub fn slept(&mut self) -> Option<Duration> {
        let (boot, mono) = (self.read)()?;
        let gap = boot.saturating_sub(mono);
        let grown = self.last_gap.map(|last| gap.saturating_sub(last));
        self.last_gap = Some(gap);
        grown.filter(|g| *g > SLEEP_GAP)
    }
}

/// The system's clocks: (CLOCK_BOOTTIME, CLOCK_MONOTONIC).
pub fn system_clocks() -> Option<(Duration, Duration)> {
    use nix::time::{clock_gettime, ClockId};
    // Monotonic first: on a machine that never slept the two are equal,
    // and the later read is the larger.
    let mono = clock_gettime(ClockId::CLOCK_MONOTONIC).ok()?;
    let boot = clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?;
    Some((Duration::from(boot), Duration::from(mono)))
}

/// Listens for logind's `PrepareForSleep(false)` (the machine woke up) and
/// sends `()` on `woke` for each. Returns at once, logging, if there is no
/// bus; never fails the daemon.
pub fn listen_for_resume(woke: mpsc::UnboundedSender<()>) {
    tokio::spawn(async move {
        if let Err(e) = listen(woke).await {
            tracing::info!(
                "not listening for logind's sleep signal ({e}); a resume is still noticed from the clocks"
            );
        }
    });
}

async fn listen(woke: mpsc::UnboundedSender<()>) -> zbus::Result<()> {
    let connection = match std::env::var(TEST_BUS_ENV) {
        Ok(address) => {
            zbus::connection::Builder::address(address.as_str())
                .build()
                .await?
        }
        Err(_) => zbus::Connection::system().await?,
    };
    // Only logind's own signal: the bus matches the well-known name
    // against its current owner.
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender("org.freedesktop.login1")
        .path("/org/freedesktop/login1")
        .interface("org.freedesktop.login1.Manager")
        .member("PrepareForSleep")
        .build()?;
    let mut signals = zbus::MessageStream::for_match_rule(rule, &connection, None).await?;
    tracing::info!("listening for logind's sleep signal");
    while let Some(message) = signals.next().await {
        let Ok(message) = message else { continue };
        // true: going to sleep; false: woke up.
        if let Ok(false) = message.body().deserialize::<bool>() {
            if woke.send(()).is_err() {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn a_jump_between_the_clocks_is_a_sleep_and_steady_ticks_are_not() {
        let boot = Rc::new(Cell::new(Duration::from_secs(100)));
        let mono = Rc::new(Cell::new(Duration::from_secs(90)));
        let (b, m) = (boot.clone(), mono.clone());
        let mut watch = ClockWatch::new(move || Some((b.get(), m.get())));
        // Both clocks advance together: no sleep.
        for _ in 0..5 {
            boot.set(boot.get() + Duration::from_secs(1));
            mono.set(mono.get() + Duration::from_millis(999));
            assert_eq!(watch.slept(), None);
        }
        // Suspended for 40 s: boot time ran on, monotonic time did not.
        boot.set(boot.get() + Duration::from_secs(41));
        mono.set(mono.get() + Duration::from_secs(1));
        assert_eq!(watch.slept(), Some(Duration::from_secs(40)));
        // Reported once.
        boot.set(boot.get() + Duration::from_secs(1));
        mono.set(mono.get() + Duration::from_secs(1));
        assert_eq!(watch.slept(), None);
    }

    #[test]
    fn unreadable_clocks_are_no_sleep() {
        let mut watch = ClockWatch::new(|| None);
        assert_eq!(watch.slept(), None);
    }

    #[test]
    fn the_system_clocks_read() {
        let (boot, mono) = system_clocks().expect("clocks");
        assert!(boot >= mono);
    }
}
