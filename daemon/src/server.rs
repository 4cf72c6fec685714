//! The control server: the Unix socket, who may use it, and turning each
//! request line into a call on the session, and what the session did into
//! the reply.
//!
//! This module owns the socket file, its permissions, the per-connection
//! limits (size, time) and the credential check. It must never let one client
//! disturb another or the session: every failure here is a reply to that
//! client and nothing more.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

pub use crate::control::DEFAULT_CONTROL_GROUP;
use crate::control::{parse_request, refusal_message, ErrorKind, Reply, Request, MAX_REQUEST_BYTES};
use crate::profile::{self, Profile};
use crate::session::{Outcome, SessionHandle};

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reply may take to be written before the client is dropped.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not create the socket directory {path}: {reason}")]
    SocketDir { path: String, reason: String },
    #[error("another sessiond is already listening on {0}")]
    InUse(String),
    #[error("could not listen on {path}: {reason}")]
    Bind { path: String, reason: String },
    #[error("could not set the permissions of {path}: {reason}")]
    Permissions { path: String, reason: String },
}

/// Who may talk to the daemon: root, the daemon's own user, and members of
/// the control group.
///
/// Membership is looked up in the group database at every connection, not
/// once at start: a user added to the group gets in at their next login (when
/// their processes carry the group and the socket's mode lets them connect),
/// and a user removed from it is refused at once, all without restarting
/// sessiond.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    group_name: String,
}

impl AccessPolicy {
    pub fn for_group(name: &str) -> AccessPolicy {
        let policy = AccessPolicy {
            group_name: name.to_string(),
        };
        if policy.group().is_none() {
            tracing::warn!("control group {name} does not exist; only root may use the control socket");
        }
        policy
    }

    /// The control group's name.
    pub fn group_name(&self) -> &str {
        &self.group_name
    }

    /// The control group as the group database has it now.
    pub fn group(&self) -> Option<nix::unistd::Group> {
        nix::unistd::Group::from_name(&self.group_name).ok().flatten()
    }

    /// Decides from the peer's credentials (SO_PEERCRED) and the group
    /// database as it is now. Reads the database (files, or whatever NSS
    /// says), so it blocks: call it off the async threads.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
            return true;
        }
        let Some(group) = self.group() else { return false };
        if gid == group.gid.as_raw() {
            return true;
        }
        let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
            return false;
        };
        if user.gid == group.gid || group.mem.contains(&user.name) {
            return true;
        }
        // Supplementary groups from every NSS source, not only /etc/group.
        let Ok(name) = std::ffi::CString::new(user.name) else {
            return false;
        };
        nix::unistd::getgrouplist(&name, user.gid).is_ok_and(|groups| groups.contains(&group.gid))
    }
}

/// The listening socket; removes its file when dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds the socket with mode 0660 and the control group as its group.
    /// A stale socket file from a dead daemon is replaced; a live one is not.
    pub async fn bind(path: &Path, policy: &AccessPolicy) -> Result<ControlSocket, ServerError> {
        let shown = path.display().to_string();
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| ServerError::SocketDir {
                    path: dir.display().to_string(),
                    reason: crate::io_reason(&e),
                })?;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
            }
        }
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ServerError::InUse(shown));
            }
            let _ = std::fs::remove_file(path);
        }
        // Create the socket with no access for others from the first moment.
        let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o117));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old_umask);
        let listener = bound.map_err(|e| ServerError::Bind {
            path: shown.clone(),
            reason: crate::io_reason(&e),
        })?;
        let perm_err = |reason: String| ServerError::Permissions {
            path: shown.clone(),
            reason,
        };
        if let Some(group) = policy.group() {
            nix::unistd::chown(path, None, Some(group.gid)).map_err(|e| perm_err(e.desc().to_string()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| perm_err(crate::io_reason(&e)))?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Accepts clients until `shutdown` fires; each client gets its own task.
    pub async fn serve(
        &self,
        session: SessionHandle,
        profiles_dir: PathBuf,
        policy: AccessPolicy,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let ctx = Arc::new(Context {
            session,
            profiles_dir,
            policy,
        });
        loop {
            tokio::select! {
                _ = crate::shutdown_requested(&mut shutdown) => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let ctx = ctx.clone();
                        tokio::spawn(async move { ctx.handle(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!("accepting a control connection failed: {e}");
                        // Out of file descriptors and the like: do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Context {
    session: SessionHandle,
    profiles_dir: PathBuf,
    policy: AccessPolicy,
}

impl Context {
    async fn handle(&self, mut stream: UnixStream) {
        let reply = match stream.peer_cred() {
            Ok(cred) => {
                let (uid, gid) = (cred.uid(), cred.gid());
                let policy = self.policy.clone();
                let allowed = tokio::task::spawn_blocking(move || policy.allows(uid, gid))
                    .await
                    .unwrap_or(false);
                if allowed {
                    match self.read_request(&mut stream).await {
                        Ok(Request::Watch) => return self.stream_status(stream).await,
                        Ok(request) => self.dispatch(request, uid).await,
                        Err(reply) => reply,
                    }
                } else {
                    tracing::warn!(
                        "refused a control connection from uid {uid}: not in the control group {}",
                        self.policy.group_name()
                    );
                    Reply::error(
                        ErrorKind::PermissionDenied,
                        refusal_message(self.policy.group_name()),
                    )
                }
            }
            Err(e) => Reply::error(
                ErrorKind::PermissionDenied,
                format!("cannot identify the caller: {e}"),
            ),
        };
        let line = reply.to_line();
        let _ = tokio::time::timeout(REPLY_TIMEOUT, stream.write_all(line.as_bytes())).await;
        let _ = stream.shutdown().await;
    }

    /// `watch`: the status now, then a new one each time the session
    /// publishes a change, one line each, until the client hangs up (or
    /// sends anything more), stops reading for REPLY_TIMEOUT, or the
    /// session machine is gone. The watch channel keeps only the latest
    /// snapshot, so a slow client skips states rather than piling them up
    /// here.
    async fn stream_status(&self, mut stream: UnixStream) {
        let mut snapshots = self.session.subscribe();
        let (mut from_client, mut to_client) = stream.split();
        loop {
            let report = snapshots.borrow_and_update().report();
            let line = Reply::ok(report).to_line();
            match tokio::time::timeout(REPLY_TIMEOUT, to_client.write_all(line.as_bytes())).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            let mut byte = [0u8; 1];
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                // Read is cancel-safe; the client has nothing more to say,
                // so whatever ends it (EOF, an error, a byte) ends the watch.
                _ = from_client.read(&mut byte) => return,
            }
        }
    }

    async fn read_request(&self, stream: &mut UnixStream) -> Result<Request, Reply> {
        let (read_half, _) = stream.split();
        let mut reader = BufReader::new(read_half.take(MAX_REQUEST_BYTES as u64 + 1));
        let mut line = Vec::new();
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Err(_) => {
                return Err(Reply::error(
                    ErrorKind::BadRequest,
                    format!("no complete request within {} s", REQUEST_TIMEOUT.as_secs()),
                ))
            }
            Ok(Err(e)) => {
                return Err(Reply::error(
                    ErrorKind::BadRequest,
                    format!("could not read the request: {e}"),
                ))
            }
            Ok(Ok(_)) => {}
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        } else if line.len() > MAX_REQUEST_BYTES {
            return Err(Reply::error(
                ErrorKind::BadRequest,
                format!("the request is larger than {} KiB", MAX_REQUEST_BYTES / 1024),
            ));
        }
        parse_request(&line).map_err(|message| Reply::error(ErrorKind::BadRequest, message))
    }

    async fn dispatch(&self, request: Request, uid: u32) -> Reply {
        match request {
            Request::Status => Reply::ok(self.session.status()),
            Request::Profiles => self.list_profiles().await,
            Request::Check { profile } => match self.load_profile(&profile).await {
                // `audit_ca` for `sessionctl audit`, which may not read the
                // profile file itself (it runs as the calling user).
                Ok(p) => Reply::ok(serde_json::json!({
                    "profile": p.name,
                    "valid": true,
                    "audit_ca": p.audit_ca,
                    "gateway_enforces_allowlist": p.gateway_enforces_allowlist,
                })),
                Err(reply) => reply,
            },
            Request::Start { profile } => match self.load_profile(&profile).await {
                Ok(p) => reply_to(self.session.start(p).await),
                Err(reply) => reply,
            },
            // The session machine orders these among themselves: a stop
            // cancels a start that waits and a verify that probes.
            Request::Stop => reply_to(self.session.stop().await),
            Request::Verify => reply_to(self.session.verify().await),
            Request::Portal(portal) => reply_to(self.session.portal(portal, uid).await),
            // Answered by `stream_status` before it gets here.
            Request::Watch => Reply::ok(self.session.status()),
        }
    }

    /// Loads a profile by name from the profiles directory. The name is
    /// checked first so a request can never name a path.
    async fn load_profile(&self, name: &str) -> Result<Profile, Reply> {
        let path = profile::profile_path(&self.profiles_dir, name)
            .map_err(|m| Reply::error(ErrorKind::BadRequest, m))?;
        // Anything else there (a FIFO, a directory, a huge file) gets
        // Profile::load's own reason, at once.
        if !path.exists() {
            return Err(Reply::error(
                ErrorKind::InvalidProfile,
                format!("profile {name}: there is no {}", path.display()),
            ));
        }
        let loaded = tokio::task::spawn_blocking(move || Profile::load(&path)).await;
        match loaded {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(Reply::error(ErrorKind::InvalidProfile, e.to_string())),
            Err(e) => Err(Reply::error(
                ErrorKind::Failed,
                format!("loading profile {name} failed: {e}"),
            )),
        }
    }

    async fn list_profiles(&self) -> Reply {
        let dir = self.profiles_dir.clone();
        let listed = tokio::task::spawn_blocking(move || profile::load_dir(&dir)).await;
        let entries = match listed {
            Ok(Ok(entries)) => entries,
            Ok(Err(e)) => {
                return Reply::error(
                    ErrorKind::Failed,
                    format!(
                        "cannot read the profiles directory {}: {}",
                        self.profiles_dir.display(),
                        crate::io_reason(&e)
                    ),
                )
            }
            Err(e) => return Reply::error(ErrorKind::Failed, format!("listing profiles failed: {e}")),
        };
        let list: Vec<_> = entries
            .into_iter()
            .map(|entry| match entry {
                Ok(p) => serde_json::json!({
                    "name": p.name,
                    "valid": true,
                    "description": p.description,
                    "hosts": p.allow.iter().map(|a| a.host.to_string()).collect::<Vec<_>>(),
                }),
                Err(e) => serde_json::json!({"name": e.profile, "valid": false, "error": e.to_string()}),
            })
            .collect();
        Reply::ok(list)
    }
}

/// Turns what the session did into the reply for the client.
fn reply_to(outcome: Outcome) -> Reply {
    match outcome {
        Outcome::Started(status) => Reply::ok(status),
        Outcome::Stopped(message) => Reply::ok(serde_json::json!({ "message": message })),
        Outcome::Verified(report) => Reply::ok(report),
        Outcome::Portal(report) => Reply::ok(report),
        Outcome::Refused(message) | Outcome::Failed { message, .. } => {
            Reply::error(ErrorKind::Failed, message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_always_allowed_and_strangers_never() {
        let policy = AccessPolicy::for_group("sessiongate-test-no-such-group");
        assert!(policy.allows(0, 0));
        assert!(!policy.allows(65534, 65534));
    }

    #[test]
    fn membership_comes_from_the_group_database_at_each_call() {
        // nobody's primary group is a group of the database on every Debian
        // machine; a caller of that user is a member without any gid of its own.
        let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
            return;
        };
        let Ok(Some(group)) = nix::unistd::Group::from_gid(nobody.gid) else {
            return;
        };
        let policy = AccessPolicy::for_group(&group.name);
        assert!(policy.allows(nobody.uid.as_raw(), 12345));
        assert!(!AccessPolicy::for_group("sessiongate-test-no-such-group").allows(nobody.uid.as_raw(), 12345));
    }

    #[test]
    fn the_refusal_names_the_group_and_the_fix() {
        let message = refusal_message("practice");
        assert!(message.contains("control group practice"), "{message}");
        assert!(message.contains("sudo usermod -aG practice $USER"), "{message}");
    }
}
