//! `sessionctl-notify`: a desktop notification when a call is at risk.
//!
//! Runs in the user's desktop session (started by the autostart file
//! `sessionctl-notify.desktop`), follows sessiond's status stream (`watch` on
//! the control socket: sessiond sends each change, nothing polls) and shows a
//! notification through the freedesktop notification service on the session
//! bus when the session degrades, recovers or ends, and when sessiond stops
//! answering during a session. A therapist in a call looks at the client,
//! not at a terminal.
//!
//! It only reads: it never starts, stops or changes a session. It is a
//! binary of its own (cargo feature `notify`), so `sessionctl` links no
//! D-Bus code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use notify_rust::{Notification, Urgency};
use serde_json::Value;
use sessiongate_common::control::{self, exit, ClientError};

/// How long to wait before connecting again after sessiond went away.
const RECONNECT_AFTER: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(
    name = "sessionctl-notify",
    version,
    about = "Show a desktop notification when a sessiongate session degrades, recovers or ends"
)]
struct Args {
    /// The daemon's control socket.
    #[arg(long, env = "SESSIONCTL_SOCKET", default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
}

/// What the follower thread saw.
#[derive(Debug)]
enum Event {
    Status(Value),
    /// sessiond went away after answering; the reason, in words.
    Lost(String),
}

/// The last state after sessiond went away mid-session (not a state sessiond
/// reports).
const LOST: &str = "lost contact";

/// A notification to show.
#[derive(Debug, PartialEq)]
struct Notice {
    summary: String,
    body: String,
    critical: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sessionctl-notify: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    // The control client blocks on the socket: it gets a thread of its own.
    let follower = std::thread::spawn(move || follow(&args.socket, &events));
    runtime.block_on(async {
        let mut last_state: Option<String> = None;
        // Each new notice replaces the one before (0: a new one).
        let mut shown_id = 0;
        while let Some(event) = received.recv().await {
            let notice = notice_for(last_state.as_deref(), &event);
            last_state = match &event {
                Event::Status(status) => status["state"].as_str().map(str::to_string),
                Event::Lost(_) => Some(LOST.to_string()),
            };
            if let Some(notice) = notice {
                shown_id = show(&notice, shown_id).await;
            }
        }
    });
    match follower.join() {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(_) => ExitCode::FAILURE,
    }
}

/// Follows sessiond for as long as the notifier runs, connecting again
/// whenever it goes away (a restart, an upgrade). Returns an exit code only
/// when following can never work: the caller may not use sessiond.
fn follow(socket: &Path, events: &tokio::sync::mpsc::UnboundedSender<Event>) -> i32 {
    let mut waiting_said = false;
    loop {
        let mut answered = false;
        let result = control::watch(socket, |status| {
            answered = true;
            events.send(Event::Status(status)).is_ok()
        });
        match result {
            // The receiving side is gone: the notifier is ending.
            Ok(()) => return exit::OK,
            Err(e @ ClientError::PermissionDenied { .. }) => {
                eprintln!("sessionctl-notify: {e}");
                return exit::PERMISSION;
            }
            Err(e) => {
                if answered {
                    if events.send(Event::Lost(e.to_string())).is_err() {
                        return exit::OK;
                    }
                } else if !waiting_said {
                    eprintln!(
                        "sessionctl-notify: {e}; trying again every {} s",
                        RECONNECT_AFTER.as_secs()
                    );
                    waiting_said = true;
                }
            }
        }
        std::thread::sleep(RECONNECT_AFTER);
    }
}

/// The notification, if any, for what just happened after `last_state`
/// (None: not known yet, at the start; [`LOST`]: sessiond went away
/// mid-session).
fn notice_for(last_state: Option<&str>, event: &Event) -> Option<Notice> {
    let status = match event {
        Event::Lost(reason) => {
            // Only a session in progress is at risk when sessiond goes away.
            return matches!(last_state, Some("active" | "degraded" | "starting")).then(|| Notice {
                summary: "sessiongate: lost contact with sessiond".to_string(),
                body: format!(
                    "{reason}. The machine stays locked down until sessiond is back; \
                     `sessionctl status` says more."
                ),
                critical: true,
            });
        }
        Event::Status(status) => status,
    };
    let state = status["state"].as_str().unwrap_or("unknown");
    let profile = status["profile"].as_str().unwrap_or("the session");
    match (last_state, state) {
        (last, "degraded") if last != Some("degraded") => {
            let problem = status["problem"]
                .as_str()
                .map(|p| p.trim_end_matches('.').to_string())
                .unwrap_or_else(|| "the tunnel is not working".to_string());
            Some(Notice {
                summary: "Call at risk: not connected".to_string(),
                body: format!(
                    "{profile}: {problem}. Everything stays blocked, nothing leaks, but the call \
                     cannot get through until the tunnel is back."
                ),
                critical: true,
            })
        }
        (Some("degraded" | LOST), "active") => Some(Notice {
            summary: "Protected again".to_string(),
            body: format!("{profile}: the tunnel is back; the call can go on."),
            critical: false,
        }),
        (Some("active" | "degraded" | "starting" | "stopping" | LOST), "idle") => Some(Notice {
            summary: "Session ended".to_string(),
            body: format!("{profile} ended: this machine's network is no longer restricted."),
            critical: false,
        }),
        _ => None,
    }
}

/// Shows `notice`, replacing notification `replaces` (0: none); returns the
/// id shown, or `replaces` when no notification service answered (said on
/// standard error: the notifier keeps following).
async fn show(notice: &Notice, replaces: u32) -> u32 {
    let mut notification = Notification::new();
    notification
        .appname("sessiongate")
        .summary(&notice.summary)
        .body(&notice.body)
        .icon(if notice.critical {
            "dialog-warning"
        } else {
            "network-vpn"
        })
        .urgency(if notice.critical {
            Urgency::Critical
        } else {
            Urgency::Normal
        });
    if replaces != 0 {
        notification.id(replaces);
    }
    match notification.show_async().await {
        Ok(handle) => handle.id(),
        Err(e) => {
            eprintln!(
                "sessionctl-notify: cannot show {:?} (is a notification service running on the session bus?): {e}",
                notice.summary
            );
            replaces
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(state: &str) -> Event {
        Event::Status(json!({"state": state, "profile": "practice",
            "problem": if state == "degraded" { json!("the peer 198.51.100.2:51820 stopped answering") } else { Value::Null }}))
    }

    #[test]
    fn degraded_recovered_and_ended_each_get_a_notice_and_nothing_else_does() {
        assert_eq!(notice_for(None, &status("idle")), None);
        assert_eq!(notice_for(Some("idle"), &status("starting")), None);
        assert_eq!(notice_for(Some("starting"), &status("active")), None);
        let at_risk = notice_for(Some("active"), &status("degraded")).expect("degraded");
        assert!(at_risk.critical);
        assert_eq!(at_risk.summary, "Call at risk: not connected");
        assert!(at_risk
            .body
            .starts_with("practice: the peer 198.51.100.2:51820 stopped answering. "));
        // Found degraded when the notifier starts: still at risk.
        assert!(notice_for(None, &status("degraded")).is_some());
        assert_eq!(notice_for(Some("degraded"), &status("degraded")), None);
        let back = notice_for(Some("degraded"), &status("active")).expect("recovered");
        assert_eq!(back.summary, "Protected again");
        assert!(!back.critical);
        assert_eq!(
            notice_for(Some("active"), &status("idle")).map(|n| n.summary),
            Some("Session ended".to_string())
        );
        assert_eq!(notice_for(Some("idle"), &Event::Lost("gone".into())), None);
        let lost = notice_for(
            Some("active"),
            &Event::Lost("sessiond closed the connection".into()),
        );
        assert!(lost.is_some_and(|n| n.critical));
        // sessiond back (a restart resumes the session): said too.
        assert_eq!(
            notice_for(Some(LOST), &status("active")).map(|n| n.summary),
            Some("Protected again".to_string())
        );
        assert_eq!(notice_for(Some(LOST), &Event::Lost("again".into())), None);
    }
}
