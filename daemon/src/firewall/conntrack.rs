//! Connection-tracking clean-up: deletes the flows our `postrouting` chain
//! marked with [`SESSION_CT_BIT`] when a session ends or a fresh one starts.
//!
//! It owns nothing but that one `conntrack -D` per family. It never deletes
//! a flow without our mark bit, and it is best effort: the table's rules,
//! not this, are what keeps a flow from leaking.

use std::process::Stdio;

use tokio::process::Command;

use super::SESSION_CT_BIT;
use crate::nft::NFT_TIMEOUT;

/// Deletes every tracked flow that carries [`SESSION_CT_BIT`], IPv4 and
/// IPv6, with the `conntrack` tool (package conntrack). Best effort: while
/// a table of ours is in place its rules already refuse flows the
/// allowlist does not hold; this only keeps a later ruleset (ours or
/// anyone's, with `ct state established`) from meeting them.
pub(super) async fn forget_session_flows() {
    let mark = format!("{SESSION_CT_BIT:#x}/{SESSION_CT_BIT:#x}");
    for family in ["ipv4", "ipv6"] {
        let run = Command::new("conntrack")
            .args(["-D", "-m", &mark, "-f", family])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(NFT_TIMEOUT, run).await {
            // 1: nothing to delete.
            Ok(Ok(out)) if matches!(out.status.code(), Some(0 | 1)) => {}
            Ok(Ok(out)) => tracing::warn!(
                "could not delete the session's tracked connections: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(
                    "the conntrack tool is not installed: the session's tracked connections are left to time out"
                );
                return;
            }
            Ok(Err(e)) => tracing::warn!("could not run conntrack: {e}"),
            Err(_) => tracing::warn!("conntrack did not finish within 10 seconds"),
        }
    }
}
