//! The control protocol between `sessionctl` and `sessiond`: one JSON request
//! per line, one JSON reply per line, over a Unix socket. The one exception,
//! `watch`, is answered with a stream: a status line now and one more each
//! time the session's state changes, until the client hangs up.
//!
//! This module owns the wire format, its size limit and the mapping from
//! error kinds to `sessionctl` exit codes. It never touches the session: the
//! server decides what a request does.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest request the daemon reads, newline excluded.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest reply a client accepts (replies list profiles and addresses).
pub const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;
/// Default control socket path.
pub const DEFAULT_SOCKET: &str = "/run/sessiongate/sessiond.sock";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Start {
        profile: String,
    },
    Stop,
    Profiles,
    Check {
        profile: String,
    },
    /// Active probes of the boundary during a session (see verify.rs).
    Verify,
    /// Follow the session: the current status, then each new one, one
    /// `{"ok": STATUS}` line each, for as long as the client listens.
    Watch,
    /// A captive portal's login page, in a network namespace of its own
    /// that reaches only the local network's web and DNS servers, for a
    /// limited time (see the daemon's portal.rs).
    Portal(PortalRequest),
}

/// What `sessionctl portal` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalRequest {
    /// Remove the portal namespace now (and what runs in it).
    #[serde(default)]
    pub close: bool,
    /// Open it although a session is running, in so many words: the
    /// session's firewall stays, with one named exception for the
    /// namespace's own traffic to the local network.
    #[serde(default)]
    pub during_session: bool,
    /// How long the namespace stays (seconds; the daemon's default when
    /// absent, never more than its maximum).
    #[serde(default)]
    pub seconds: Option<u64>,
    /// A program and its arguments to run in the namespace as the calling
    /// user, with the login page's address appended; empty: none.
    #[serde(default)]
    pub browser: Vec<String>,
    /// The caller's display variables for that program (DISPLAY,
    /// WAYLAND_DISPLAY, XAUTHORITY, XDG_RUNTIME_DIR, ...; the daemon keeps
    /// only those it knows).
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

/// Why a request failed; decides `sessionctl`'s exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The operation was tried and failed (exit 1).
    Failed,
    /// The request was malformed or named something invalid (exit 2).
    BadRequest,
    /// The profile is invalid (exit 2).
    InvalidProfile,
    /// The caller may not use the daemon (exit 4).
    PermissionDenied,
}

impl ErrorKind {
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Failed => exit::FAILED,
            ErrorKind::BadRequest | ErrorKind::InvalidProfile => exit::USAGE,
            ErrorKind::PermissionDenied => exit::PERMISSION,
        }
    }
}

/// `sessionctl` exit codes (README "Exit codes", the man page's EXIT STATUS).
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILED: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const UNREACHABLE: i32 = 3;
    pub const PERMISSION: i32 = 4;
}

/// Names of `verify` probes that `sessionctl` gives advice on (the daemon's
/// verify module names the rest).
pub mod probe {
    pub const ALLOWED_HOST: &str = "allowed host";
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The request succeeded; `result` is the command's answer.
    Ok(serde_json::Value),
    Error {
        kind: ErrorKind,
        message: String,
    },
}

impl Reply {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Reply {
        Reply::Error {
            kind,
            message: message.into(),
        }
    }

    pub fn ok(value: impl Serialize) -> Reply {
        match serde_json::to_value(value) {
            Ok(v) => Reply::Ok(v),
            Err(e) => Reply::error(ErrorKind::Failed, format!("could not encode the reply: {e}")),
        }
    }

    /// One line of JSON, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"error":{{"kind":"failed","message":"could not encode the reply: {e}"}}}}"#)
        });
        line.push('\n');
        line
    }
}

/// Parses one request line. The error is the message sent back to the client.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "the request is not UTF-8 text".to_string())?;
    let value: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("the request is not valid JSON: {e}"))?;
    let cmd = value.get("cmd").and_then(|c| c.as_str()).map(str::to_string);
    let request: Request = serde_json::from_value(value.clone()).map_err(|e| match &cmd {
        Some(cmd) if !KNOWN_COMMANDS.contains(&cmd.as_str()) => format!("unknown command {cmd:?}"),
        Some(cmd) => format!("bad {cmd:?} request: {e}"),
        None => "the request has no \"cmd\" field".to_string(),
    })?;
    // serde ignores extra fields on internally tagged unit variants; a field
    // the request does not have is refused here, so typos never pass silently.
    let known = serde_json::to_value(&request).unwrap_or_default();
    if let (Some(given), Some(known)) = (value.as_object(), known.as_object()) {
        if let Some(extra) = given.keys().find(|k| !known.contains_key(*k)) {
            return Err(format!(
                "unknown field {extra:?} in a {:?} request",
                cmd.unwrap_or_default()
            ));
        }
    }
    Ok(request)
}

const KNOWN_COMMANDS: &[&str] = &[
    "status", "start", "stop", "profiles", "check", "verify", "watch", "portal",
];

/// The control group's name unless `sessiond --control-group` says
/// otherwise; the sysusers snippet creates it.
pub const DEFAULT_CONTROL_GROUP: &str = "sessiongate";

/// What a caller without permission is told: who may use sessiond and how
/// to become one of them.
pub fn refusal_message(group: &str) -> String {
    format!(
        "permission denied: only root and members of the control group {group} may use sessiond; \
         add yourself with `sudo usermod -aG {group} $USER` and log in again"
    )
}

/// The name of the group that owns the control socket at `path` (the
/// control group, for a socket sessiond made), for the client's refusal
/// message; the default group when the socket cannot be looked at.
pub fn socket_group_name(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .and_then(|m| {
            nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(m.gid()))
                .ok()
                .flatten()
        })
        .filter(|g| g.gid.as_raw() != 0)
        .map(|g| g.name)
        .unwrap_or_else(|| DEFAULT_CONTROL_GROUP.to_string())
}

/// Why a client could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach sessiond at {path}: {reason} (is the daemon running?)")]
    Unreachable { path: String, reason: String },
    #[error("{} (on {path})", refusal_message(&socket_group_name(std::path::Path::new(path))))]
    PermissionDenied { path: String },
    #[error("sessiond closed the connection without answering")]
    NoReply,
    #[error("sessiond closed the connection (stopped or restarted)")]
    Closed,
    #[error("{message}")]
    Refused { kind: ErrorKind, message: String },
    #[error("sessiond sent a reply this sessionctl does not understand: {0}")]
    BadReply(String),
    #[error("lost the connection to sessiond: {0}")]
    Io(String),
}

impl ClientError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::PermissionDenied { .. } => exit::PERMISSION,
            ClientError::Refused { kind, .. } => kind.exit_code(),
            ClientError::Unreachable { .. } | ClientError::Closed => exit::UNREACHABLE,
            _ => exit::FAILED,
        }
    }
}

/// Connects to sessiond's control socket, saying why not in the caller's
/// words (permission denied, or unreachable and why).
fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(socket).map_err(|e| {
        let path = socket.display().to_string();
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { path },
            _ => ClientError::Unreachable {
                path,
                reason: crate::io_reason(&e),
            },
        }
    })
}

/// Sends one request and waits for its reply. `timeout` bounds the wait
/// (`start` may legitimately take as long as the handshake timeout).
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let mut stream = connect(socket)?;
    let io = |e: std::io::Error| ClientError::Io(crate::io_reason(&e));
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let mut line = serde_json::to_string(request).map_err(|e| ClientError::Io(e.to_string()))?;
    line.push('\n');
    // The daemon may answer and close before reading a request it refuses
    // (permission denied): then the write fails but the reply is waiting.
    let written = stream.write_all(line.as_bytes());
    let mut reader = BufReader::new(stream.take(MAX_REPLY_BYTES as u64));
    let mut reply = String::new();
    let read = reader.read_line(&mut reply);
    let n = match (read, written) {
        (Ok(n), _) if n > 0 => n,
        (_, Err(e)) => return Err(io(e)),
        (Ok(n), Ok(())) => n,
        (Err(e), Ok(())) => {
            return Err(match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    ClientError::Io(format!("no reply within {} s", timeout.as_secs()))
                }
                _ => io(e),
            })
        }
    };
    if n == 0 {
        return Err(ClientError::NoReply);
    }
    serde_json::from_str(reply.trim()).map_err(|e| ClientError::BadReply(e.to_string()))
}

/// Follows the session (`watch`): calls `on_status` with each status
/// sessiond sends, the current one first, until `on_status` returns false
/// (then `Ok`) or sessiond goes away ([`ClientError::Closed`]). Blocks; no
/// timeout, since a quiet session sends nothing. Each line is bounded like
/// any reply.
pub fn watch(socket: &Path, mut on_status: impl FnMut(serde_json::Value) -> bool) -> Result<(), ClientError> {
    let mut stream = connect(socket)?;
    let io = |e: std::io::Error| ClientError::Io(crate::io_reason(&e));
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let written = stream.write_all(b"{\"cmd\":\"watch\"}\n");
    let mut reader = BufReader::new(stream);
    let mut first = true;
    loop {
        let mut line = String::new();
        let n = (&mut reader)
            .take(MAX_REPLY_BYTES as u64)
            .read_line(&mut line)
            .map_err(io)?;
        if n == 0 {
            return match (&written, first) {
                (Err(e), true) => Err(ClientError::Io(crate::io_reason(e))),
                (_, true) => Err(ClientError::NoReply),
                _ => Err(ClientError::Closed),
            };
        }
        first = false;
        let reply: Reply =
            serde_json::from_str(line.trim()).map_err(|e| ClientError::BadReply(e.to_string()))?;
        match reply {
            Reply::Ok(status) => {
                if !on_status(status) {
                    return Ok(());
                }
            }
            // A refusal (permission, an older sessiond without `watch`)
            // comes as the one and only line.
            Reply::Error { kind, message } => {
                return Err(ClientError::Refused { kind, message });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Status,
            Request::Stop,
            Request::Profiles,
            Request::Verify,
            Request::Watch,
            Request::Start {
                profile: "lab".into(),
            },
            Request::Check {
                profile: "lab".into(),
            },
            Request::Portal(PortalRequest {
                during_session: true,
                seconds: Some(60),
                browser: vec!["/usr/bin/chromium".into(), "--incognito".into()],
                env: vec![("DISPLAY".into(), ":0".into())],
                ..Default::default()
            }),
        ] {
            let line = serde_json::to_string(&r).expect("encode");
            assert_eq!(parse_request(line.as_bytes()), Ok(r));
        }
        assert_eq!(
            parse_request(br#"{"cmd":"portal","close":true}"#),
            Ok(Request::Portal(PortalRequest {
                close: true,
                ..Default::default()
            }))
        );
        assert!(parse_request(br#"{"cmd":"portal","as_user":0}"#).is_err());
        assert_eq!(
            parse_request(br#"{"cmd":"start","profile":"x"}"#),
            Ok(Request::Start { profile: "x".into() })
        );
    }

    #[test]
    fn malformed_requests_get_plain_errors() {
        assert!(parse_request(b"{not json")
            .unwrap_err()
            .starts_with("the request is not valid JSON"));
        assert_eq!(
            parse_request(br#"{"cmd":"reboot"}"#),
            Err("unknown command \"reboot\"".into())
        );
        assert_eq!(
            parse_request(br#"{"x":1}"#),
            Err("the request has no \"cmd\" field".into())
        );
        assert!(parse_request(br#"{"cmd":"start"}"#)
            .unwrap_err()
            .starts_with("bad \"start\" request"));
        assert!(parse_request(br#"{"cmd":"status","extra":1}"#).is_err());
        assert_eq!(
            parse_request(br#"{"cmd":"verify","json":true}"#),
            Err("unknown field \"json\" in a \"verify\" request".into())
        );
        assert_eq!(
            parse_request(&[0xff, 0xfe]),
            Err("the request is not UTF-8 text".into())
        );
    }

    #[test]
    fn replies_encode_as_one_line() {
        let line = Reply::error(ErrorKind::BadRequest, "nope").to_line();
        assert_eq!(
            line,
            "{\"error\":{\"kind\":\"bad_request\",\"message\":\"nope\"}}\n"
        );
        let back: Reply = serde_json::from_str(line.trim()).expect("decode");
        assert_eq!(back, Reply::error(ErrorKind::BadRequest, "nope"));
        assert_eq!(ErrorKind::PermissionDenied.exit_code(), 4);
        assert_eq!(ErrorKind::InvalidProfile.exit_code(), 2);
    }
}
