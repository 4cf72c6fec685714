//! The control socket under abuse: garbage, huge lines, invalid JSON,
//! path-like profile names, stalled clients and callers without permission.
//! The daemon must answer each with an error and keep serving `status`.
//!
//! The daemon runs under `unshare --net`, in a fresh network namespace of
//! its own, so nothing here can ever reach the host's network even by
//! mistake. These tests need root (namespaces, and acting as another user).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        assert!(
            nix_is_root(),
            "these tests start sessiond in its own network namespace and need root: run them as root"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let profiles = dir.path().join("profiles");
        std::fs::create_dir(&profiles).expect("profiles dir");
        std::fs::write(profiles.join("broken.toml"), "description = 1\n").expect("write profile");
        let log = std::fs::File::create(dir.path().join("sessiond.log")).expect("log");
        let child = Command::new("unshare")
            .arg("--net")
            .arg(sessiond_bin())
            .arg("--profiles")
            .arg(&profiles)
            .arg("--socket")
            .arg(dir.path().join("sessiond.sock"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--resolv-conf")
            .arg(dir.path().join("resolv.conf"))
            .arg("--control-group")
            .arg("sessiongate-test-no-such-group")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sessiond");
        let daemon = Daemon { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(daemon.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "sessiond did not open its socket within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("sessiond.sock")
    }

    /// Sends raw bytes and returns the reply line.
    fn raw(&self, bytes: &[u8]) -> String {
        let mut s = UnixStream::connect(self.socket()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        // The daemon may answer and close before it has read everything we
        // send (a 10 MB line): a broken pipe is expected then.
        let _ = s.write_all(bytes);
        let mut reply = String::new();
        let _ = BufReader::new(s).read_line(&mut reply);
        reply
    }

    fn status_state(&self) -> String {
        let reply = self.raw(b"{\"cmd\":\"status\"}\n");
        let v: serde_json::Value = serde_json::from_str(&reply).expect("status reply is JSON");
        v["ok"]["state"].as_str().unwrap_or("?").to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// sessiond is built next to sessionctl (`cargo build --workspace --bins`).
fn sessiond_bin() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_sessionctl")).with_file_name("sessiond");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

fn sessionctl(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sessionctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run sessionctl")
}

fn error_kind(reply: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(reply).unwrap_or_else(|e| panic!("reply {reply:?} is not JSON: {e}"));
    v["error"]["kind"].as_str().unwrap_or("none").to_string()
}

fn error_message(reply: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(reply).unwrap_or_default();
    v["error"]["message"].as_str().unwrap_or("").to_string()
}

#[test]
fn status_reports_idle_as_json() {
    let d = Daemon::start();
    let reply = d.raw(b"{\"cmd\":\"status\"}\n");
    let v: serde_json::Value = serde_json::from_str(&reply).expect("json");
    assert_eq!(v["ok"]["state"], "idle");
    assert_eq!(v["ok"]["profile"], serde_json::Value::Null);
    assert_eq!(v["ok"]["tunnel"], serde_json::Value::Null);
    assert_eq!(v["ok"]["allowed"], serde_json::json!([]));
}

#[test]
fn garbage_gets_error_replies_and_the_daemon_keeps_serving() {
    let d = Daemon::start();
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut random_line = random.clone();
    random_line.retain(|b| *b != b'\n');
    random_line.push(b'\n');
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("random bytes", random_line, "bad_request"),
        ("invalid JSON", b"{\"cmd\": status}\n".to_vec(), "bad_request"),
        (
            "unknown command",
            b"{\"cmd\":\"reboot\"}\n".to_vec(),
            "bad_request",
        ),
        (
            "extra field",
            b"{\"cmd\":\"status\",\"x\":1}\n".to_vec(),
            "bad_request",
        ),
        (
            "path-like profile",
            b"{\"cmd\":\"start\",\"profile\":\"../../etc/passwd\"}\n".to_vec(),
            "bad_request",
        ),
        (
            "path-like check",
            b"{\"cmd\":\"check\",\"profile\":\"/etc/passwd\"}\n".to_vec(),
            "bad_request",
        ),
        (
            "missing profile",
            b"{\"cmd\":\"start\",\"profile\":\"nope\"}\n".to_vec(),
            "invalid_profile",
        ),
        (
            "invalid profile",
            b"{\"cmd\":\"start\",\"profile\":\"broken\"}\n".to_vec(),
            "invalid_profile",
        ),
    ];
    for (what, bytes, kind) in cases {
        let reply = d.raw(&bytes);
        assert_eq!(error_kind(&reply), kind, "{what}: reply {reply:?}");
        assert!(
            !error_message(&reply).is_empty(),
            "{what}: the error has no message"
        );
        assert_eq!(d.status_state(), "idle", "after {what}");
    }
    assert!(
        error_message(&d.raw(b"{\"cmd\":\"start\",\"profile\":\"../../etc/passwd\"}\n"))
            .contains("not a profile name")
    );
}

#[test]
fn a_ten_megabyte_line_is_refused_by_size() {
    let d = Daemon::start();
    let mut huge = vec![b'a'; 10 * 1024 * 1024];
    huge.push(b'\n');
    let reply = d.raw(&huge);
    assert_eq!(error_kind(&reply), "bad_request", "{reply:?}");
    assert!(error_message(&reply).contains("larger than 64 KiB"), "{reply:?}");
    assert_eq!(d.status_state(), "idle");
}

#[test]
fn a_stalled_client_is_timed_out_and_does_not_block_others() {
    let d = Daemon::start();
    let mut stalled = UnixStream::connect(d.socket()).expect("connect");
    stalled.write_all(b"{\"cmd\":").expect("partial write");
    // Others are served while the stalled client holds its connection.
    assert_eq!(d.status_state(), "idle");
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut reply = String::new();
    let started = Instant::now();
    stalled
        .read_to_string(&mut reply)
        .expect("the daemon answers and closes");
    assert_eq!(error_kind(reply.trim()), "bad_request", "{reply:?}");
    assert!(
        error_message(reply.trim()).contains("no complete request"),
        "{reply:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(d.status_state(), "idle");
}

#[test]
fn the_socket_is_0660_and_an_unprivileged_user_gets_exit_4() {
    let d = Daemon::start();
    let mode = std::fs::metadata(d.socket())
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "socket mode {:o}", mode & 0o777);

    // `nobody` cannot even connect to a 0660 socket owned by root.
    let out = sessionctl_as_nobody(&d.socket(), &["status"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );

    // Opened up on the file system, the daemon's own SO_PEERCRED check still refuses.
    std::fs::set_permissions(d.socket(), std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = sessionctl_as_nobody(&d.socket(), &["status"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only root and members of the control group"),
        "{out:?}"
    );
    assert_eq!(d.status_state(), "idle");
}

fn sessionctl_as_nobody(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_sessionctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run setpriv")
}

#[test]
fn sessionctl_exit_codes_and_messages() {
    let d = Daemon::start();
    let out = sessionctl(&d.socket(), &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(v["state"], "idle");

    let out = sessionctl(&d.socket(), &["start", "../../etc/passwd"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = sessionctl(&d.socket(), &["start", "broken"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("sessionctl: profile broken: "),
        "{out:?}"
    );

    let out = sessionctl(&d.socket(), &["profiles", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("profiles --json is JSON");
    assert_eq!(v[0]["name"], "broken");
    assert_eq!(v[0]["valid"], false);
    assert!(
        v[0]["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("profile broken: "),
        "{v}"
    );

    let out = sessionctl(&d.socket(), &["stop"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stop without a session is not an error: {out:?}"
    );

    for args in [&["verify"][..], &["verify", "--json"][..]] {
        let out = sessionctl(&d.socket(), args);
        assert_eq!(out.status.code(), Some(1), "verify without a session: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            "sessionctl: verify needs a running session; start one with `sessionctl start PROFILE`"
        );
        assert!(out.stdout.is_empty(), "{out:?}");
    }
    let reply = d.raw(b"{\"cmd\":\"verify\",\"json\":true}\n");
    assert_eq!(error_kind(&reply), "bad_request", "{reply:?}");
    assert_eq!(d.status_state(), "idle");

    let out = sessionctl(&d.dir.path().join("nowhere.sock"), &["status"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = sessionctl(&d.socket(), &["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn check_validates_a_file_without_a_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("client.key");
    std::fs::write(&key, "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n").expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let good = r#"
[tunnel]
private_key_file = "client.key"
address = ["192.0.2.66/32"]
[tunnel.peer]
public_key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
endpoint = "198.51.100.2:51820"
[dns]
servers = ["192.0.2.65"]
[[allow]]
host = "meet.test"
tcp = [443]
udp = [10000]
"#;
    let path = dir.path().join("practice.toml");
    std::fs::write(&path, good).expect("profile");
    let nowhere = dir.path().join("no.sock");
    let out = sessionctl(&nowhere, &["check", path.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "profile practice is valid"
    );

    std::fs::write(&path, good.replace("udp = [10000]", "udp = [70000]")).expect("profile");
    let out = sessionctl(&nowhere, &["check", path.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or(""),
        "sessionctl: profile practice: allow[0].udp: port 70000 is out of range 1-65535"
    );

    std::fs::write(&path, good).expect("profile");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = sessionctl(&nowhere, &["check", path.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is readable by group or others (mode 0644)"),
        "{out:?}"
    );
}

#[test]
fn keygen_writes_a_private_key_file_and_prints_the_public_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("new.key");
    let out = sessionctl(
        &dir.path().join("no.sock"),
        &["keygen", "--out", path.to_str().expect("utf8")],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let mode = std::fs::metadata(&path).expect("key file").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // The public key printed is the one WireGuard's own tool derives.
    let derived = Command::new("sh")
        .arg("-c")
        .arg(format!("wg pubkey < {}", path.display()))
        .output()
        .expect("wg pubkey");
    assert!(derived.status.success(), "wg pubkey failed: {derived:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&derived.stdout).trim()
    );
    // An existing file is never overwritten.
    let again = sessionctl(
        &dir.path().join("no.sock"),
        &["keygen", "--out", path.to_str().expect("utf8")],
    );
    assert_eq!(again.status.code(), Some(1), "{again:?}");
}

#[test]
fn completions_and_the_man_page_come_from_the_command_definitions() {
    let nowhere = Path::new("/nonexistent/sessiond.sock");
    let out = sessionctl(nowhere, &["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for command in ["start", "stop", "status", "verify", "import", "keygen"] {
        assert!(text.contains(command), "bash completion lacks {command}");
    }
    let out = sessionctl(nowhere, &["man"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(".TH sessionctl"), "not a man page:\n{text}");
    assert!(text.contains("verify"), "the man page lacks verify");
}

#[test]
fn the_daemon_refuses_fifos_devices_and_huge_profiles_at_once() {
    let d = Daemon::start();
    let profiles = d.dir.path().join("profiles");
    nix::unistd::mkfifo(
        &profiles.join("fifo.toml"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("mkfifo");
    std::fs::create_dir(profiles.join("dir.toml")).expect("mkdir");
    std::os::unix::fs::symlink("/dev/zero", profiles.join("zero.toml")).expect("symlink");
    let big = std::fs::File::create(profiles.join("big.toml")).expect("big");
    big.set_len(2 * 1024 * 1024).expect("grow");
    for (name, expected) in [
        ("fifo", "is a FIFO (named pipe), not a regular file"),
        ("dir", "is a directory, not a regular file"),
        ("zero", "is a device, not a regular file"),
        ("big", "is larger than 1 MiB"),
    ] {
        for cmd in ["check", "start"] {
            let reply = d.raw(format!("{{\"cmd\":\"{cmd}\",\"profile\":\"{name}\"}}\n").as_bytes());
            assert_eq!(error_kind(&reply), "invalid_profile", "{cmd} {name}: {reply}");
            assert!(error_message(&reply).contains(expected), "{cmd} {name}: {reply}");
        }
    }
    // Listing them does not hang either, and the daemon still serves.
    let reply = d.raw(b"{\"cmd\":\"profiles\"}\n");
    assert!(reply.contains("\"ok\""), "{reply}");
    assert_eq!(d.status_state(), "idle");
}

#[test]
fn watch_streams_the_status_and_ends_when_the_client_hangs_up() {
    let d = Daemon::start();
    let mut s = UnixStream::connect(d.socket()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    s.write_all(b"{\"cmd\":\"watch\"}\n").expect("send");
    let mut reader = BufReader::new(s);
    let mut first = String::new();
    reader.read_line(&mut first).expect("first status");
    let v: serde_json::Value = serde_json::from_str(&first).expect("JSON");
    assert_eq!(v["ok"]["state"], "idle", "{first}");
    // A watcher that goes away leaves the daemon serving everyone else.
    drop(reader);
    assert_eq!(d.status_state(), "idle");
    // `sessionctl status --watch` prints that status and keeps following
    // until sessiond goes away, then exits 3.
    let mut watcher = Command::new(env!("CARGO_BIN_EXE_sessionctl"))
        .arg("--socket")
        .arg(d.socket())
        .args(["status", "--watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sessionctl status --watch");
    let mut line = String::new();
    BufReader::new(watcher.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("a status line");
    assert!(line.contains("\"state\":\"idle\""), "{line}");
    drop(d);
    let out = watcher.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
}

/// Output into a pipe whose reader is gone (`sessionctl completions bash |
/// head -0`)
/// ends sessionctl quietly, without a panic message.
#[test]
fn a_closed_pipe_ends_sessionctl_quietly() {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_sessionctl"))
        .args(["completions", "bash"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run sessionctl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "sessionctl panicked: {stderr}");
}
