//! Connection-tracking clean-up: deletes the flows our `postrouting` chain
//! marked with [`SESSION_CT_BIT`] when a session ends or a fresh one starts.
//!
//! It owns that one deletion: a single ctnetlink request in process (the
//! kernel walks its table once for IPv4 and IPv6 together), or the
//! `conntrack` tool when the kernel refuses the request. It never deletes
//! a flow without our mark bit, and it is best effort: the table's rules,
//! not this, are what keeps a flow from leaking.

use std::process::Stdio;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use tokio::process::Command;

use super::SESSION_CT_BIT;
use crate::nft::NFT_TIMEOUT;

/// CTA_MARK_MASK (linux/netfilter/nfnetlink_conntrack.h), which the crate
/// has no variant for.
const CTA_MARK_MASK: u16 = 21;

/// Deletes every tracked flow that carries [`SESSION_CT_BIT`], IPv4 and
/// IPv6. Best effort: while a table of ours is in place its rules already
/// refuse flows the allowlist does not hold; this only keeps a later
/// ruleset (ours or anyone's, with `ct state established`) from meeting
/// them.
pub(super) async fn forget_session_flows() {
    // Synchronous on purpose, as the libnftables commits are: the kernel
    // does the whole walk inside the one send, and the caller waits for it
    // anyway (a fresh lockdown before the tunnel starts, a removal after
    // it stopped).
    match delete_marked_flows(SESSION_CT_BIT) {
        Ok(()) => {}
        Err(e) => {
            tracing::debug!("the kernel refused to delete the session's tracked connections in one request ({e}); using the conntrack tool");
            forget_with_tool().await;
        }
    }
}

/// One `IPCTNL_MSG_CT_DELETE` without a tuple but with `CTA_MARK` and
/// `CTA_MARK_MASK`: the kernel's flush, filtered to flows whose mark has
/// `bit` set, in this network namespace only. The header's version 0 makes
/// the kernel ignore the family, so IPv4 and IPv6 go in the same walk (the
/// `conntrack` tool needs a dump and a delete per flow, per family). A
/// namespace without tracked flows returns at once.
fn delete_marked_flows(bit: u32) -> std::io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            ConntrackMessage::Delete(mark_filter(bit)),
        )),
    );
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer);

    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buffer, 0)?;
    // The kernel queued its answer before send returned; never wait here.
    let mut answer = Vec::with_capacity(4096);
    socket.recv(&mut answer, libc::MSG_DONTWAIT)?;
    match NetlinkMessage::<NetfilterMessage>::deserialize(&answer) {
        Ok(NetlinkMessage {
            payload: NetlinkPayload::Error(error),
            ..
        }) => match error.code {
            None => Ok(()),
            Some(_) => Err(error.to_io()),
        },
        Ok(other) => Err(std::io::Error::other(format!(
            "unexpected answer {:?}",
            other.payload.message_type()
        ))),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
}

/// The request's attributes: the mark value and the mask, both `bit`, so
/// the kernel keeps flows where `ct mark & bit == bit`. Both are needed:
/// without a filter attribute the same request deletes every flow.
fn mark_filter(bit: u32) -> Vec<ConntrackAttribute> {
    vec![
        ConntrackAttribute::CtaMark(bit),
        ConntrackAttribute::Other(netlink_packet_core::DefaultNla::new(
            CTA_MARK_MASK,
            bit.to_be_bytes().to_vec(),
        )),
    ]
}

/// The same deletion with the `conntrack` tool (package conntrack), once
/// per family.
async fn forget_with_tool() {
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
