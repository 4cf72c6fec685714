//! The captive-portal namespace beside the session (`sessionctl portal`):
//! when it may open, in which order its parts and the firewall's exception
//! for it go in and out, and when it closes.
//!
//! - open: refused during a session unless the request says
//!   `during_session`; the namespace with its own table and address, link
//!   down → the link-level exception in the session's firewall (when a
//!   session runs) → the link up → the browser, as the calling user;
//! - close (asked, timed out, or a session starts): the namespace and what
//!   runs in it go → the exception is withdrawn.
//!
//! Never: change the session's `inet` table, or leave the exception in the
//! firewall after the namespace is gone (a failure to withdraw it is
//! logged; the next apply, the guard's at the latest, has it out).

use std::time::{Duration, Instant};

use serde::Serialize;
use sessiongate_common::control::PortalRequest;

use super::effects::Effects;
use super::{answer, Outcome, Responder, SessionMachine};
use crate::portal::{DEFAULT_SECONDS, MAX_SECONDS};

/// The portal namespace while it is open.
pub(crate) struct OpenPortal {
    pub until: Instant,
}

/// What `sessionctl portal` is told.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PortalReport {
    pub namespace: String,
    pub interface: String,
    pub address: String,
    pub gateway: String,
    pub dns: String,
    /// The login page's address to open.
    pub url: String,
    /// How long until the namespace is removed.
    pub seconds: u64,
    /// The browser's process, when one was started.
    pub browser_pid: Option<u32>,
    pub message: String,
}

/// What a portal request is refused with during a session.
pub const NEEDS_CONSENT: &str = "a session is running, and its lockdown keeps this network's login page out of reach on purpose: \
     `sessionctl portal --during-session` opens it in a namespace of its own that reaches only the local network's web and DNS servers, \
     while the session's firewall stays as it is";

impl<E: Effects> SessionMachine<E> {
    pub(crate) async fn on_portal(&mut self, request: PortalRequest, uid: u32, reply: Responder) {
        if request.close {
            let outcome = match self.close_portal().await {
                Ok(()) => Outcome::Stopped("the portal namespace is removed".into()),
                Err(e) => Outcome::Failed {
                    cause: None,
                    message: format!("could not remove the portal namespace: {e}"),
                },
            };
            return answer(reply, outcome);
        }
        if self.stage.name().is_some() && !request.during_session {
            return answer(reply, Outcome::Refused(NEEDS_CONSENT.into()));
        }
        if !request.browser.is_empty() && uid == 0 {
            return answer(
                reply,
                Outcome::Refused(
                    "the browser would run as root: run `sessionctl portal --browser` as your own user, without sudo"
                        .into(),
                ),
            );
        }
        // One portal at a time: a new request replaces the open one.
        if let Err(e) = self.close_portal().await {
            return answer(
                reply,
                Outcome::Failed {
                    cause: None,
                    message: format!("could not remove the portal namespace that was open: {e}"),
                },
            );
        }
        let seconds = request.seconds.unwrap_or(DEFAULT_SECONDS).clamp(1, MAX_SECONDS);
        let plan = match self.ctx.effects.create_portal().await {
            Ok(plan) => plan,
            Err(e) => {
                return answer(
                    reply,
                    Outcome::Failed {
                        cause: None,
                        message: format!("could not open the portal namespace: {e}"),
                    },
                )
            }
        };
        self.ctx.effects.set_portal_exception(Some(plan.exception()));
        self.portal = Some(OpenPortal {
            until: Instant::now() + Duration::from_secs(seconds),
        });
        let opened: Result<Option<u32>, String> = async {
            self.reapply_firewall().await?;
            self.ctx.effects.bring_up_portal(&plan).await?;
            if request.browser.is_empty() {
                Ok(None)
            } else {
                self.ctx
                    .effects
                    .start_portal_browser(&plan, uid, &request.browser, &request.env)
                    .await
                    .map(Some)
            }
        }
        .await;
        let browser_pid = match opened {
            Ok(pid) => pid,
            Err(e) => {
                if let Err(e) = self.close_portal().await {
                    tracing::error!("could not remove the portal namespace again: {e}");
                }
                return answer(
                    reply,
                    Outcome::Failed {
                        cause: None,
                        message: format!("could not open the portal namespace: {e}"),
                    },
                );
            }
        };
        tracing::info!(
            "portal namespace {} open for {seconds} s at {} on {}",
            plan.namespace,
            plan.address,
            plan.uplink.interface
        );
        let message = format!(
            "the login page of this network ({}) opens in namespace {}, which reaches only {}/{} (web and DNS) and the DNS server {}; it is removed in {seconds} s or with `sessionctl portal --close`",
            plan.url(),
            plan.namespace,
            plan.uplink.network(),
            plan.uplink.prefix,
            plan.dns
        );
        answer(
            reply,
            Outcome::Portal(PortalReport {
                namespace: plan.namespace.clone(),
                interface: plan.uplink.interface.clone(),
                address: plan.address.to_string(),
                gateway: plan.uplink.gateway.to_string(),
                dns: plan.dns.to_string(),
                url: plan.url(),
                seconds,
                browser_pid,
                message,
            }),
        );
    }

    /// Removes the namespace (also one left by an earlier run), then
    /// withdraws the firewall's exception for it.
    pub(crate) async fn close_portal(&mut self) -> Result<(), String> {
        let was_open = self.portal.take().is_some();
        self.ctx.effects.remove_portal().await?;
        if was_open {
            self.ctx.effects.set_portal_exception(None);
            self.reapply_firewall().await?;
            tracing::info!("the portal namespace is removed");
        }
        Ok(())
    }

    /// The portal's time is up: it goes.
    pub(crate) async fn on_portal_timer(&mut self) {
        if self.portal.as_ref().is_some_and(|p| Instant::now() >= p.until) {
            tracing::info!("the portal namespace's time is up");
            if let Err(e) = self.close_portal().await {
                tracing::error!("could not remove the portal namespace: {e}");
            }
        }
    }

    /// Puts the current stage's firewall shape in again (nothing when
    /// idle), so it carries the portal exception as it now is.
    async fn reapply_firewall(&mut self) -> Result<(), String> {
        let Some((lockdown, allow)) = self.stage.firewall_shape(&self.ctx.effects) else {
            return Ok(());
        };
        self.ctx.effects.apply_firewall(&lockdown, allow.as_ref()).await
    }
}
