//! Why a session is degraded or a command failed, as a type (the sentence
//! for people travels beside it). `sessionctl` decides what to advise from
//! the cause, never from the wording of the sentence.
//!
//! Serialized with a tag (`{"reason": "peer_lost"}`,
//! `{"reason": "start_failed", "step": "routes"}`), like talpid-core's
//! `ErrorStateCause`, so a client can match on it and a newer daemon can add
//! causes an older client reads as unknown.
//!
//! Never: carry a destination or key material (causes reach logs and
//! clients); the details stay in the sentence the session logs.

use serde::{Deserialize, Serialize};

/// The step of a start (or resume) that failed after the lockdown went up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Tunnel,
    Routes,
    DnsStub,
    Allowlist,
    ResolverFile,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Cause {
    /// sessiond restarted during a session and waits for the tunnel's first
    /// handshake; clears by itself.
    Resuming,
    /// The peer stopped answering; the tunnel retries and the session comes
    /// back by itself when it answers.
    PeerLost,
    /// The way to the gateway changed (another network, address or default
    /// route); the tunnel handshakes again from the new address.
    NetworkChanged,
    /// The machine woke from sleep; the gateway may have dropped the
    /// session's keys, so the tunnel handshakes again at once.
    ResumedFromSleep,
    /// No handshake within the profile's timeout at start.
    NoHandshake,
    /// A step of the start failed after the lockdown went up.
    StartFailed { step: Step },
    /// The persisted session cannot be resumed (its profile is gone, invalid
    /// or has a different tunnel).
    CannotResume,
    /// A changed profile could not be put in force; the session was locked
    /// down rather than left on the old allow list.
    ReloadFailed,
    /// `stop` failed part-way; the machine stays locked down.
    StopFailed,
    /// `stop` cancelled a start that was still waiting.
    Cancelled,
    /// The network is back but the persisted session could not be removed.
    StoreNotCleared,
    /// The gateway did not answer over UDP (`transport = "auto"`); the
    /// tunnel now tries TCP through the relay and traffic stays blocked
    /// until the gateway answers there.
    TryingTcp,
    /// The session runs over TCP through the relay because the gateway did
    /// not answer over UDP: protected, but slower under loss.
    UdpUnanswered,
}

impl Cause {
    /// Whether the session gets out of this by itself (the tunnel retries),
    /// rather than only through `sessionctl stop`.
    pub fn clears_by_itself(&self) -> bool {
        matches!(
            self,
            Cause::Resuming
                | Cause::PeerLost
                | Cause::NetworkChanged
                | Cause::ResumedFromSleep
                | Cause::TryingTcp
        )
    }

    /// Whether the gateway never answered, which on a hotel or café network
    /// is most often its login page holding everything back. sessiond
    /// never probes for a portal itself (that would send in clear from
    /// the machine); `status` suggests `sessionctl portal` instead.
    pub fn may_be_a_portal(&self) -> bool {
        matches!(self, Cause::NoHandshake | Cause::PeerLost | Cause::NetworkChanged)
    }
}

/// `status`'s one sentence after the gateway did not answer.
pub const PORTAL_HINT: &str = "if this network has a login page (hotel, café), open it with `sessionctl portal --during-session --browser BROWSER`: it runs apart from the session, which stays locked down";

/// `status`'s sentence while the tunnel handshakes again after a network
/// change.
pub const NETWORK_CHANGED: &str = "the network changed; the tunnel is handshaking again from the new address and traffic stays blocked until it answers";
/// `status`'s sentence while the tunnel tries TCP after UDP went
/// unanswered.
pub fn trying_tcp(port: u16) -> String {
    format!(
        "the gateway did not answer over UDP; trying TCP port {port}, traffic stays blocked until it answers"
    )
}

/// `status`'s sentence for a session that runs over TCP because UDP went
/// unanswered.
pub fn udp_unanswered(port: u16) -> String {
    format!("the gateway did not answer over UDP; using TCP port {port} (slower)")
}

/// `status`'s sentence while the tunnel handshakes again after a resume.
pub const RESUMED_FROM_SLEEP: &str = "the computer woke from sleep; the tunnel is handshaking again with the gateway and traffic stays blocked until it answers";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_carry_a_tag_and_read_back() {
        let cause = Cause::StartFailed { step: Step::Routes };
        let json = serde_json::to_value(&cause).expect("encode");
        assert_eq!(
            json,
            serde_json::json!({"reason": "start_failed", "step": "routes"})
        );
        assert_eq!(serde_json::from_value::<Cause>(json).expect("decode"), cause);
        assert_eq!(
            serde_json::to_value(Cause::PeerLost).expect("encode"),
            serde_json::json!({"reason": "peer_lost"})
        );
        assert!(Cause::PeerLost.clears_by_itself());
        assert!(Cause::NetworkChanged.clears_by_itself());
        assert_eq!(
            serde_json::to_value(Cause::ResumedFromSleep).expect("encode"),
            serde_json::json!({"reason": "resumed_from_sleep"})
        );
        assert!(!Cause::ReloadFailed.clears_by_itself());
        assert!(Cause::NoHandshake.may_be_a_portal());
        assert!(!Cause::ResumedFromSleep.may_be_a_portal());
        assert_eq!(
            serde_json::to_value(Cause::UdpUnanswered).expect("encode"),
            serde_json::json!({"reason": "udp_unanswered"})
        );
        assert_eq!(
            udp_unanswered(443),
            "the gateway did not answer over UDP; using TCP port 443 (slower)"
        );
    }
}
