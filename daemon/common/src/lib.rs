//! What sessiond and sessionctl share, and nothing more: the thin client
//! links this crate, never the daemon.
//!
//! - [`control`]: the request/reply protocol over the control socket;
//! - [`cause`]: why a session is degraded or failed, as a type;
//! - [`profile`]: the profile format, its validation and its directory;
//! - [`import`]: turning a wg-quick file into a profile;
//! - [`keys`]: key material that never shows itself;
//! - [`trust`]: who may have written the files sessiond reads;
//! - [`io_reason`]: how an I/O error reads in a message for people.
//!
//! Never: depend on an async runtime, WireGuard, nftables, netlink or DNS
//! code; those belong to the daemon (`sessiond`).

pub mod cause;
pub mod control;
pub mod import;
pub mod keys;
pub mod profile;
pub mod trust;

/// The part of an I/O error a person needs ("No such file or directory").
pub fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}
