//! The captive-portal helper: the one process allowed to do the portal
//! namespace's privileged part, and sessiond's way of asking it.
//!
//! # What it owns, and what it must never do
//!
//! It owns the conversation between sessiond and `sessiongate-portal`
//! (one JSON request and one JSON reply a line, over one Unix stream
//! connection) and the helper's side of it. The helper only does what
//! sessiond tells it, in the order sessiond tells it ([`crate::portal`]
//! does the work): it never decides when a portal opens or closes and
//! never touches the session's firewall (the link-level exception is
//! sessiond's, put in by the session machine between [`Request::Create`]
//! and [`Request::BringUp`]).
//!
//! # Why a separate process
//!
//! The namespace needs CAP_SYS_ADMIN (a network namespace and its
//! mounts), CAP_NET_RAW (the RFC 5227 ARP probe on an AF_PACKET socket)
//! and CAP_SETUID/CAP_SETGID (the browser runs as the calling user);
//! sessiond's unit grants none of them, and widening sessiond's sandbox
//! for a login page would be the wrong trade. The helper runs in a unit of
//! its own (`sessiongate-portal@.service`, started by
//! `sessiongate-portal.socket` when sessiond connects, `Accept=yes`) with
//! exactly those. Its life is the connection's: the namespace and what
//! runs in it go when sessiond says [`Request::Remove`], when sessiond
//! closes the connection (a time limit, `--close`, a session start, or
//! sessiond stopping or dying) and when systemd stops the unit.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::portal::{self, PortalPlan, Uplink};

/// Where sessiond finds the helper unless [`SOCKET_ENV`] says otherwise:
/// the socket of `sessiongate-portal.socket` (root only).
pub const DEFAULT_SOCKET: &str = "/run/sessiongate-portal.sock";
/// Tests only: another socket (the lab runs the helper under
/// `systemd-socket-activate`, which stands in for the socket unit).
pub const SOCKET_ENV: &str = "SESSIOND_TEST_PORTAL_SOCKET";
/// How long one request may take: probing up to 16 addresses (about 5 s)
/// and a few `ip`/`nft` runs that take milliseconds. The session machine
/// waits for the answer, so it must stay well below sessiond's watchdog
/// (30 s), or a hung helper would have systemd kill sessiond.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest request line accepted (a browser's arguments and display
/// variables fit many times over).
const MAX_LINE: usize = 64 * 1024;

/// What sessiond asks the helper to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Set up the namespace (its table, address, resolver file) with its
    /// link down; a namespace of that name left from before goes first.
    Create {
        namespace: String,
        uplink: Uplink,
        dns: Ipv4Addr,
    },
    /// Bring the namespace's link up (the exception is in place by now).
    BringUp,
    /// Start the browser in the namespace as the user `uid`.
    StartBrowser {
        uid: u32,
        program: Vec<String>,
        env: Vec<(String, String)>,
    },
    /// Remove the namespace and what runs in it; the helper then exits.
    Remove,
}

/// The helper's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Created(PortalPlan),
    Done,
    BrowserStarted(u32),
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("the captive-portal helper is not available at {path} ({reason}): install and enable its unit with `systemctl enable --now sessiongate-portal.socket` (the sessiongate package does)")]
    Missing { path: String, reason: String },
    #[error(
        "the captive-portal helper stopped answering ({0}); `journalctl -u 'sessiongate-portal@*'` says why"
    )]
    Broken(String),
    #[error("{0}")]
    Failed(String),
}

/// The helper's socket (see [`SOCKET_ENV`]).
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Whether a namespace name is one the helper makes: short, letters and
/// digits only (it becomes a path under /run/netns and /etc/netns).
pub fn valid_namespace(name: &str) -> bool {
    !name.is_empty() && name.len() <= 32 && name.chars().all(|c| c.is_ascii_alphanumeric())
}

/// sessiond's open connection to one helper (one portal).
pub struct HelperConnection {
    lines: Lines,
}

type Lines = LineStream<tokio::net::unix::OwnedReadHalf, tokio::net::unix::OwnedWriteHalf>;

impl HelperConnection {
    /// Connects to the helper's socket; systemd starts a helper for it.
    pub async fn connect(path: &Path) -> Result<HelperConnection, HelperError> {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| HelperError::Missing {
                path: path.display().to_string(),
                reason: crate::io_reason(&e),
            })?;
        let (read, write) = stream.into_split();
        Ok(HelperConnection {
            lines: LineStream::new(read, write),
        })
    }

    /// Sends one request and waits for its reply; a [`Reply::Failed`]
    /// comes back as [`HelperError::Failed`].
    pub async fn ask(&mut self, request: &Request) -> Result<Reply, HelperError> {
        let exchange = async {
            self.lines.send(request).await?;
            self.lines
                .receive::<Reply>()
                .await?
                .ok_or_else(|| "it closed the connection".to_string())
        };
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| HelperError::Broken(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())))?
            .map_err(HelperError::Broken)?;
        match reply {
            Reply::Failed(message) => Err(HelperError::Failed(message)),
            other => Ok(other),
        }
    }
}

/// One JSON value a line, each way.
struct LineStream<R, W> {
    reader: BufReader<R>,
    writer: W,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> LineStream<R, W> {
    fn new(read: R, write: W) -> Self {
        LineStream {
            reader: BufReader::new(read),
            writer: write,
        }
    }

    async fn send<T: Serialize>(&mut self, value: &T) -> Result<(), String> {
        let mut line = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .map_err(|e| crate::io_reason(&e))?;
        self.writer.flush().await.map_err(|e| crate::io_reason(&e))
    }

    /// The next value, or None at the end of the stream.
    async fn receive<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, String> {
        let mut line = Vec::new();
        let mut limited = (&mut self.reader).take(MAX_LINE as u64 + 1);
        let n = limited
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| crate::io_reason(&e))?;
        if n == 0 {
            return Ok(None);
        }
        if line.len() > MAX_LINE {
            return Err(format!("a message longer than {MAX_LINE} bytes"));
        }
        serde_json::from_slice(&line)
            .map(Some)
            .map_err(|e| format!("a message that is not understood: {e}"))
    }
}

/// The helper's side: serves one connection (sessiond's) until it says
/// [`Request::Remove`], closes the connection or `stop` resolves (SIGTERM
/// from systemd); whatever it made is removed on every one of those ways
/// out.
pub async fn serve<R, W>(read: R, write: W, stop: impl std::future::Future<Output = ()>) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut lines = LineStream::new(read, write);
    let mut made: Option<String> = None;
    let mut plan: Option<PortalPlan> = None;
    tokio::pin!(stop);
    let result = loop {
        let request = tokio::select! {
            r = lines.receive::<Request>() => r,
            () = &mut stop => break Ok(()),
        };
        let request = match request {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let last = request == Request::Remove;
        let reply = handle(request, &mut made, &mut plan).await;
        if let Err(e) = lines.send(&reply).await {
            // sessiond left (it stopped or died): the end of the
            // conversation, as when it closes the connection.
            tracing::info!("sessiond is gone ({e}); removing what was made");
            break Ok(());
        }
        if last {
            break Ok(());
        }
    };
    if let Some(namespace) = made.take() {
        if let Err(e) = portal::remove(&namespace).await {
            tracing::error!("could not remove the portal namespace {namespace}: {e}");
        }
    }
    result
}

async fn handle(request: Request, made: &mut Option<String>, plan: &mut Option<PortalPlan>) -> Reply {
    match request {
        Request::Create {
            namespace,
            uplink,
            dns,
        } => {
            if made.is_some() {
                return Reply::Failed(
                    "this helper already made a namespace; connect again for another".into(),
                );
            }
            if !valid_namespace(&namespace) {
                return Reply::Failed(format!("{namespace:?} is not a namespace name this helper makes"));
            }
            // One left by a helper that was killed goes first.
            if let Err(e) = portal::remove(&namespace).await {
                return Reply::Failed(e.to_string());
            }
            match portal::create(&namespace, uplink, dns).await {
                Ok(created) => {
                    *made = Some(namespace);
                    *plan = Some(created.clone());
                    tracing::info!(
                        "portal namespace {} made at {} on {}",
                        created.namespace,
                        created.address,
                        created.uplink.interface
                    );
                    Reply::Created(created)
                }
                Err(e) => Reply::Failed(e.to_string()),
            }
        }
        Request::BringUp => match plan.as_ref() {
            Some(p) => match portal::bring_up(p).await {
                Ok(()) => Reply::Done,
                Err(e) => Reply::Failed(e.to_string()),
            },
            None => Reply::Failed("there is no portal namespace to bring up".into()),
        },
        Request::StartBrowser { uid, program, env } => match plan.as_ref() {
            Some(p) => match portal::start_browser(p, uid, &program, &env) {
                Ok(pid) => Reply::BrowserStarted(pid),
                Err(e) => Reply::Failed(e.to_string()),
            },
            None => Reply::Failed("there is no portal namespace to start a browser in".into()),
        },
        Request::Remove => {
            *plan = None;
            match made.take() {
                Some(namespace) => match portal::remove(&namespace).await {
                    Ok(()) => {
                        tracing::info!("portal namespace {namespace} removed");
                        Reply::Done
                    }
                    Err(e) => Reply::Failed(e.to_string()),
                },
                None => Reply::Done,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_are_one_json_line_each() {
        let request = Request::Create {
            namespace: "sgportal".into(),
            uplink: Uplink {
                interface: "eth0".into(),
                gateway: Ipv4Addr::new(192, 0, 2, 1),
                own: Ipv4Addr::new(192, 0, 2, 2),
                prefix: 24,
            },
            dns: Ipv4Addr::new(192, 0, 2, 53),
        };
        let line = serde_json::to_string(&request).expect("serialize");
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&line).expect("parse"), request);
        assert_eq!(
            serde_json::to_string(&Request::Remove).expect("serialize"),
            "\"remove\""
        );
    }

    #[test]
    fn namespace_names_are_short_letters_and_digits() {
        assert!(valid_namespace("sgportal"));
        assert!(valid_namespace("sgp1234"));
        assert!(!valid_namespace(""));
        assert!(!valid_namespace("../etc"));
        assert!(!valid_namespace("a b"));
        assert!(!valid_namespace(&"a".repeat(33)));
    }

    #[tokio::test]
    async fn a_missing_helper_says_which_unit_to_enable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("sessiongate-portal.sock");
        let Err(e) = HelperConnection::connect(&missing).await else {
            panic!("connected to a socket that does not exist");
        };
        let said = e.to_string();
        assert!(
            said.contains("systemctl enable --now sessiongate-portal.socket") && !said.contains('\n'),
            "{said}"
        );
    }

    #[tokio::test]
    async fn sessiond_and_the_helper_talk_over_the_socket_until_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("helper.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let helper = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, write) = stream.into_split();
            serve(read, write, std::future::pending()).await
        });
        let mut connection = HelperConnection::connect(&path).await.expect("connect");
        match connection.ask(&Request::BringUp).await {
            Err(HelperError::Failed(why)) => assert!(why.contains("no portal namespace"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            connection.ask(&Request::Remove).await.expect("remove"),
            Reply::Done
        );
        assert_eq!(helper.await.expect("join"), Ok(()));
        // The helper is gone after remove: a further request says so.
        assert!(matches!(
            connection.ask(&Request::BringUp).await,
            Err(HelperError::Broken(_))
        ));
    }

    #[tokio::test]
    async fn a_closed_connection_ends_the_helper_with_nothing_made() {
        let (ours, theirs) = tokio::io::duplex(4096);
        let (read, write) = tokio::io::split(theirs);
        drop(ours);
        assert_eq!(serve(read, write, std::future::pending()).await, Ok(()));
    }

    #[tokio::test]
    async fn requests_out_of_order_are_refused_and_remove_ends_the_conversation() {
        let (ours, theirs) = tokio::io::duplex(4096);
        let (read, write) = tokio::io::split(theirs);
        let helper = tokio::spawn(serve(read, write, std::future::pending()));
        let (our_read, our_write) = tokio::io::split(ours);
        let mut lines = LineStream::new(our_read, our_write);
        lines.send(&Request::BringUp).await.expect("send");
        assert!(matches!(
            lines.receive::<Reply>().await,
            Ok(Some(Reply::Failed(_)))
        ));
        lines.send(&Request::Remove).await.expect("send");
        assert_eq!(lines.receive::<Reply>().await, Ok(Some(Reply::Done)));
        assert_eq!(helper.await.expect("join"), Ok(()));
    }
}
