//! A new user's first hour (issue 15): `sessionctl keygen`, `check` and
//! `import` as someone with the README alone would run them, and the word a
//! therapist gets when a call is at risk. Every test here runs the real
//! `sessionctl` binary; the last ones run a lab session. Run after
//! `cargo build --workspace`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lab::util;

fn sessionctl() -> PathBuf {
    util::find_binary("sessionctl").unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `sessionctl ARGS` in `dir` against a socket nobody listens on, so a
/// command that needs the daemon shows it.
fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(sessionctl())
        .args(["--socket", "/nonexistent/sessiond.sock"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sessionctl: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn is_wireguard_key(line: &str) -> bool {
    line.len() == 44 && line.ends_with('=') && !line.contains(char::is_whitespace)
}

#[test]
fn keygen_writes_the_private_key_to_a_new_0600_file_and_prints_only_the_public_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_in(dir.path(), &["keygen", "--out", "therapist.key"]);
    assert!(out.status.success(), "keygen --out failed: {}", text(&out.stderr));
    let key_path = dir.path().join("therapist.key");
    let private = std::fs::read_to_string(&key_path).expect("the key file");
    let mode = std::fs::metadata(&key_path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key file is mode {mode:o}");
    let stdout = text(&out.stdout);
    assert!(
        is_wireguard_key(stdout.trim()),
        "stdout is not one public key: {stdout:?}"
    );
    assert!(
        !stdout.contains(private.trim()) && !text(&out.stderr).contains(private.trim()),
        "keygen --out printed the private key"
    );

    // Never over an existing file: the key already handed out stays.
    let again = run_in(dir.path(), &["keygen", "--out", "therapist.key"]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again.stderr));
    assert_eq!(std::fs::read_to_string(&key_path).expect("key"), private);
}

#[test]
fn keygen_without_out_refuses_and_names_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_in(dir.path(), &["keygen"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(out.stdout.is_empty(), "keygen printed {:?}", text(&out.stdout));
    assert!(text(&out.stderr).contains("--out"), "{}", text(&out.stderr));

    // `--out -` is refused too, and creates no file called `-`.
    let dash = run_in(dir.path(), &["keygen", "--out", "-"]);
    assert_eq!(dash.status.code(), Some(2));
    assert!(
        dash.stdout.is_empty(),
        "keygen --out - printed {:?}",
        text(&dash.stdout)
    );
    assert!(
        text(&dash.stderr).contains("--private-to-stdout"),
        "{}",
        text(&dash.stderr)
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("ls").count(),
        0,
        "a file was created"
    );

    // Only the flag named for it prints the private key.
    let private = run_in(dir.path(), &["keygen", "--private-to-stdout"]);
    assert!(private.status.success(), "{}", text(&private.stderr));
    assert!(is_wireguard_key(text(&private.stdout).trim()));
    assert!(
        text(&private.stderr).starts_with("public key: "),
        "{}",
        text(&private.stderr)
    );
}

const GATEWAY_PUBLIC: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const CLIENT_PRIVATE: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

/// A profiles directory with one valid profile, `practice`, and its key.
fn profiles_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("keys")).expect("keys dir");
    let key = dir.path().join("keys/practice.key");
    std::fs::write(&key, format!("{CLIENT_PRIVATE}\n")).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(dir.path().join("practice.toml"), practice_profile()).expect("profile");
    dir
}

fn practice_profile() -> String {
    format!(
        r#"[tunnel]
private_key_file = "keys/practice.key"
address = ["192.0.2.66/32"]
[tunnel.peer]
public_key = "{GATEWAY_PUBLIC}"
endpoint = "198.51.100.2:51820"
[dns]
servers = ["192.0.2.65"]
[[allow]]
host = "meet.test"
tcp = [443]
udp = [10000]
"#
    )
}

/// `check` fails with exit 2, saying `expected`, and points to the format.
fn assert_check_refuses(dir: &Path, args: &[&str], expected: &str) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let out = run_in(dir, &all);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "check {args:?} passed: {}{stderr}",
        text(&out.stdout)
    );
    assert!(
        stderr.contains(expected),
        "check {args:?} does not say {expected:?}:\n{stderr}"
    );
    assert!(
        stderr.contains("profiles.md"),
        "check {args:?} does not point to the format:\n{stderr}"
    );
}

#[test]
fn check_reads_profiles_by_name_without_the_daemon() {
    let dir = profiles_dir();
    let profiles = dir.path().to_str().expect("utf8");
    let out = run_in(dir.path(), &["check", "--profiles", profiles, "practice"]);
    assert!(
        out.status.success(),
        "check NAME needs the daemon: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "profile practice is valid");
    assert_check_refuses(
        dir.path(),
        &["--profiles", profiles, "absent"],
        "there is no profile absent in",
    );
    // Without --profiles and without a daemon: sessiond's default directory.
    assert_check_refuses(
        dir.path(),
        &["surely-absent"],
        "there is no profile surely-absent in /etc/sessiongate/profiles",
    );
}

#[test]
fn check_says_what_to_do_about_the_shipped_examples_missing_keys() {
    let examples = util::workspace_root().join("profiles");
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["client", "jitsi-practice"] {
        let file = examples.join(format!("{name}.toml"));
        let path = file.to_str().expect("utf8");
        assert_check_refuses(dir.path(), &[path], "make it with `sessionctl keygen --out ");
    }
}

/// `sessionctl ARGS` as the unprivileged user `nobody`, in `dir`.
fn run_as_nobody(dir: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(sessionctl())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run setpriv: {e}"))
}

#[test]
fn check_by_name_before_joining_the_group_says_so_instead_of_no_such_profile() {
    assert!(util::is_root(), "this test needs root to act as another user");
    // A root-only profiles directory holding the profile, and a control
    // socket only root may use: what a new user meets before `usermod`.
    let dir = profiles_dir();
    let profiles = dir.path().to_str().expect("utf8");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let sockets = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(sockets.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = sockets.path().join("sessiond.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let socket = socket.to_str().expect("utf8");

    // The daemon refuses and the directory is closed: the refusal, with
    // the group and the fix, not "there is no profile".
    let out = run_as_nobody(Path::new("/"), &["--socket", socket, "check", "practice"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("usermod -aG") && !stderr.contains("there is no profile"),
        "check as a non-member: {stderr}"
    );
    // No daemon to ask, directory closed: says it cannot look, and how.
    let out = run_as_nobody(Path::new("/"), &["check", "--profiles", profiles, "practice"]);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("permission denied; profiles belong to root, so check it with sudo"),
        "check of a closed directory: {stderr}"
    );
}

/// The first TOML block of docs/profiles.md ("A whole profile").
fn whole_profile_from_the_docs() -> String {
    let path = util::workspace_root().join("docs/profiles.md");
    let docs = std::fs::read_to_string(&path).expect("docs/profiles.md");
    let start = docs.find("```toml\n").expect("a toml block in docs/profiles.md") + "```toml\n".len();
    let len = docs[start..].find("```").expect("the toml block's end");
    docs[start..start + len].to_string()
}

#[test]
fn the_whole_profile_in_the_docs_checks_with_only_the_key_keygen_makes() {
    // A reader with docs/profiles.md alone copies its whole profile and
    // makes the one key file it names the way the docs say.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("keys")).expect("keys dir");
    std::fs::write(
        dir.path().join("jitsi-practice.toml"),
        whole_profile_from_the_docs(),
    )
    .expect("profile");
    let made = run_in(dir.path(), &["keygen", "--out", "keys/therapist.key"]);
    assert!(made.status.success(), "keygen: {}", text(&made.stderr));
    let out = run_in(dir.path(), &["check", "./jitsi-practice.toml"]);
    assert!(
        out.status.success(),
        "the docs' whole profile does not check: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "profile jitsi-practice is valid");
}

#[test]
fn check_refuses_names_the_daemon_would_refuse() {
    let dir = profiles_dir();
    for bad in ["we ird name.toml", ".toml"] {
        std::fs::write(dir.path().join(bad), practice_profile()).expect("profile");
        assert_check_refuses(
            dir.path(),
            &[&format!("./{bad}")],
            "is not a profile name: use letters",
        );
    }
}

#[test]
fn check_refuses_a_low_order_gateway_key_and_names_the_field_of_a_type_error() {
    let dir = profiles_dir();
    let path = dir.path().join("practice.toml");
    let zero = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    std::fs::write(&path, practice_profile().replace(GATEWAY_PUBLIC, zero)).expect("profile");
    assert_check_refuses(
        dir.path(),
        &["./practice.toml"],
        "tunnel.peer.public_key: is not a usable public key",
    );
    std::fs::write(
        &path,
        practice_profile().replace("tcp = [443]", "tcp = [\"443\"]"),
    )
    .expect("profile");
    assert_check_refuses(dir.path(), &["./practice.toml"], "allow[0].tcp[0] (line 11)");
}

#[test]
fn check_and_import_refuse_fifos_devices_directories_and_huge_files_at_once() {
    let dir = profiles_dir();
    let fifo = dir.path().join("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    std::fs::create_dir(dir.path().join("dir.toml")).expect("mkdir");
    let big = std::fs::File::create(dir.path().join("big.toml")).expect("big");
    // Sparse: 600 MB that take no disk, and that a reader would have to read.
    big.set_len(600 * 1024 * 1024).expect("grow");
    for (file, expected) in [
        ("./fifo.toml", "is a FIFO (named pipe), not a regular file"),
        ("/dev/zero", "is a device, not a regular file"),
        ("./dir.toml", "is a directory, not a regular file"),
        ("./big.toml", "is larger than 1 MiB"),
    ] {
        // A FIFO without a writer would hang a plain read: the test's
        // timeout is `timeout`, which kills the command.
        let out = Command::new("timeout")
            .arg("60")
            .arg(sessionctl())
            .args(["check", file])
            .current_dir(dir.path())
            .output()
            .expect("run sessionctl");
        assert_eq!(out.status.code(), Some(2), "check {file}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(expected),
            "check {file}: {}",
            text(&out.stderr)
        );

        let out = Command::new("timeout")
            .arg("60")
            .arg(sessionctl())
            .args([
                "import",
                file,
                "--name",
                "imported",
                "--allow",
                "meet.test:443/tcp",
                "--dir",
            ])
            .arg(dir.path().join("out"))
            .current_dir(dir.path())
            .output()
            .expect("run sessionctl");
        assert_eq!(out.status.code(), Some(2), "import {file}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(expected),
            "import {file}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn import_says_what_it_changed_and_dropped_and_accepts_a_byte_order_mark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = format!(
        "\u{feff}[Interface]\r
PrivateKey = {CLIENT_PRIVATE}\r
Address = 10.66.0.2/32\r
DNS = 10.66.0.1, practice.test\r
Table = off\r
ListenPort = 51820\r
FwMark = 0x1234\r
SaveConfig = true\r
PostUp = iptables -A OUTPUT -j ACCEPT\r
\r
[Peer]\r
PublicKey = {GATEWAY_PUBLIC}\r
Endpoint = 198.51.100.2:51820\r
AllowedIPs = 10.66.0.0/24\r
"
    );
    std::fs::write(dir.path().join("practice.conf"), conf).expect("conf");
    let out = run_in(
        dir.path(),
        &[
            "import",
            "practice.conf",
            "--name",
            "practice",
            "--allow",
            "meet.practice.test:443/tcp",
            "--dir",
            "profiles",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "import failed: {}", text(&out.stderr));
    for said in [
        "changed AllowedIPs = 10.66.0.0/24 (a split tunnel) into a full tunnel",
        "dropped the DNS search domain practice.test",
        "dropped Table",
        "dropped ListenPort",
        "dropped FwMark",
        "dropped SaveConfig",
        "dropped PostUp",
    ] {
        assert!(stdout.contains(said), "import does not say {said:?}:\n{stdout}");
    }
    let checked = run_in(dir.path(), &["check", "profiles/practice.toml"]);
    assert!(
        checked.status.success(),
        "the imported profile: {}",
        text(&checked.stderr)
    );
}

#[test]
fn the_man_page_has_exit_status_and_files_and_points_only_to_pages_that_exist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_in(dir.path(), &["man"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    for section in [".SH COMMANDS", ".SH EXIT STATUS", ".SH FILES", ".SH SEE ALSO"] {
        assert!(page.contains(section), "the man page has no {section}");
    }
    assert!(
        !page.contains("sessionctl\\-start(1)") && !page.contains("sessionctl\\-check(1)"),
        "the man page points to per-command pages that do not exist"
    );
    assert!(
        page.contains("profiles.md"),
        "the man page does not point to the format"
    );
    // Every exit code `sessionctl` documents is in it.
    for code in ["0", "1", "2", "3", "4"] {
        assert!(
            page.contains(&format!(".TP\n\\fB{code}\\fR\n")),
            "exit status {code} missing"
        );
    }
}

#[test]
fn the_units_documentation_points_to_installed_pages() {
    for unit in [
        "sessiond.service",
        "sessiongate-early-lockdown.service",
        "sessiongate-portal.socket",
        "sessiongate-portal@.service",
    ] {
        let path = util::workspace_root().join("systemd").join(unit);
        let text = std::fs::read_to_string(&path).expect("unit");
        let docs: Vec<&str> = text.lines().filter(|l| l.starts_with("Documentation=")).collect();
        assert_eq!(
            docs,
            ["Documentation=man:sessionctl(1) file:/usr/share/doc/sessiongate/README.md"],
            "{unit}"
        );
    }
}

/// A stand-in for the desktop's notification service: owns
/// org.freedesktop.Notifications on the bus it is given and records every
/// notification it is asked to show.
mod notification_service {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// (summary, body) of each Notify call, in order.
    pub type Shown = Arc<Mutex<Vec<(String, String)>>>;

    pub struct Recorder {
        pub shown: Shown,
    }

    #[zbus::interface(name = "org.freedesktop.Notifications")]
    impl Recorder {
        #[allow(clippy::too_many_arguments)]
        fn notify(
            &self,
            _app_name: String,
            replaces_id: u32,
            _app_icon: String,
            summary: String,
            body: String,
            _actions: Vec<String>,
            _hints: HashMap<String, zbus::OwnedVariant>,
            _expire_timeout: i32,
        ) -> u32 {
            let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
            shown.push((summary, body));
            if replaces_id == 0 {
                shown.len() as u32
            } else {
                replaces_id
            }
        }

        fn get_capabilities(&self) -> Vec<String> {
            vec!["body".to_string()]
        }

        fn get_server_information(&self) -> (String, String, String, String) {
            (
                "sessiongate-lab-recorder".into(),
                "sessiongate".into(),
                "1".into(),
                "1.2".into(),
            )
        }

        fn close_notification(&self, _id: u32) {}
    }

    /// Serves the recorder on `address` until the returned runtime and
    /// connection are dropped.
    pub fn serve(address: &str) -> anyhow::Result<(tokio::runtime::Runtime, zbus::Connection, Shown)> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let shown = Shown::default();
        let recorder = Recorder { shown: shown.clone() };
        let connection = runtime.block_on(async {
            zbus::connection::Builder::address(address)
                .name("org.freedesktop.Notifications")
                .serve_at("/org/freedesktop/Notifications", recorder)
                .build()
                .await
        })?;
        Ok((runtime, connection, shown))
    }
}

#[test]
fn a_degraded_recovered_and_ended_session_each_show_a_desktop_notification() {
    use lab::{wait_until, Lab, Ns};
    use std::time::Duration;

    let lab = Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"));
    lab.sessiond_profile().expect("write the lab profile");
    let daemon = lab.start_sessiond().expect("start sessiond");
    daemon.ctl_ok(&["start", "lab"]).expect("start");

    // A real session bus, only for this test, with the recorder on it.
    let bus_dir = tempfile::tempdir().expect("tempdir");
    let (_dbus, address) = lab
        .private_bus(Ns::Client, &bus_dir.path().join("bus"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (_runtime, _connection, shown) =
        notification_service::serve(&address).unwrap_or_else(|e| panic!("notification service: {e:#}"));

    let notifier_bin = util::find_binary("sessionctl-notify").expect("sessionctl-notify");
    let socket = daemon.socket().to_string_lossy().into_owned();
    let notifier = lab
        .spawn_env(
            Ns::Client,
            "sessionctl-notify",
            &[notifier_bin.to_str().expect("utf8"), "--socket", &socket],
            &[("DBUS_SESSION_BUS_ADDRESS", &address)],
        )
        .expect("start sessionctl-notify");
    let sessionctl_bin = sessionctl();
    let watcher = lab
        .spawn_named(
            Ns::Client,
            "status-watch",
            &[
                sessionctl_bin.to_str().expect("utf8"),
                "--socket",
                &socket,
                "status",
                "--watch",
                "--json",
            ],
        )
        .expect("start sessionctl status --watch");
    // Both follow the session before anything happens to it.
    wait_until(
        Duration::from_secs(10),
        "status --watch prints the active session",
        || watcher.log().contains("\"state\":\"active\""),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", watcher.log()));

    let shown_summaries = || -> Vec<String> {
        shown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(summary, _)| summary.clone())
            .collect()
    };
    let wait_for_notice = |summary: &str| {
        wait_until(
            Duration::from_secs(120),
            &format!("a notification {summary:?}"),
            || shown_summaries().iter().any(|s| s == summary),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\nshown: {:?}\nnotifier log:\n{}\nsessiond log:\n{}",
                shown_summaries(),
                notifier.log(),
                daemon.log()
            )
        });
    };

    lab.kill_gateway().expect("kill the gateway");
    wait_for_notice("Call at risk: not connected");
    let body = shown
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(summary, _)| summary == "Call at risk: not connected")
        .map(|(_, body)| body.clone())
        .unwrap_or_default();
    assert!(body.starts_with("lab: "), "{body}");
    assert!(body.contains("Everything stays blocked"), "{body}");

    lab.restart_gateway().expect("restart the gateway");
    wait_for_notice("Protected again");

    daemon.ctl_ok(&["stop"]).expect("stop");
    wait_for_notice("Session ended");
    assert_eq!(
        shown_summaries(),
        ["Call at risk: not connected", "Protected again", "Session ended"],
        "one notification per change, nothing else"
    );
    // status --watch followed the same changes, as sessiond sent them.
    let watched = watcher.log();
    for state in ["active", "degraded", "idle"] {
        assert!(
            watched.contains(&format!("\"state\":\"{state}\"")),
            "{state}:\n{watched}"
        );
    }
}

/// The README's walkthrough, "Installing on a real machine" and "From
/// installation to a first protected call": every command in a block
/// tagged `sh walkthrough`, in order, run the way a new user on a fresh
/// Debian would run it. What the test does in the user's place, and why:
///
/// - `git clone` (prose in the README, not a command: the repository's
///   address depends on where it is hosted): the checkout is
///   [`walkthrough::CHECKOUT`], the directory every command starts in;
/// - `./scripts/package`: the container has no Rust toolchain and no
///   internet, so the test runs the same script on this machine, with
///   `--debug-build` (this build's binaries, seconds instead of a release
///   build's minutes), and puts the package where the README's next
///   command looks for it, `target/debian/` in the checkout;
/// - `sudoedit FILE`: an editor; the test makes the edits the README's table
///   asks for, with the lab's values ([`walkthrough::lab_values`]);
/// - the one line `keygen` prints goes to "whoever runs the gateway": the
///   test adds it as a peer of the lab's gateway with the tunnel address
///   the lab's table hands out.
///
/// Everything else runs as written: a line starting with `sudo` as root
/// (with `$USER` still the user, as under sudo), any other as the user
/// [`walkthrough::USER`] in a fresh login (`runuser -l`, so a group added
/// by `usermod` counts, as after logging in again).
mod walkthrough {
    use std::path::Path;

    /// The new user, and their checkout of the repository.
    pub const USER: &str = "therapist";
    pub const CHECKOUT: &str = "/home/therapist/sessiongate";

    /// The tunnel address the lab's gateway hands out for this machine.
    pub const LAB_TUNNEL_ADDRESS: &str = "192.0.2.66/32";

    /// One command, with the README line it starts on.
    #[derive(Debug, Clone)]
    pub struct Step {
        pub line: usize,
        pub command: String,
    }

    /// The commands of every ```` ```sh walkthrough ```` block, in order;
    /// a line ending in `\` continues on the next; blank and comment lines
    /// are skipped.
    pub fn steps(readme: &str) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut in_block = false;
        let mut pending = String::new();
        let mut pending_line = 0;
        for (index, raw) in readme.lines().enumerate() {
            let line = raw.trim();
            if !in_block {
                in_block = line == "```sh walkthrough";
                continue;
            }
            if line.starts_with("```") {
                assert!(
                    pending.is_empty(),
                    "README line {pending_line}: a walkthrough block ends in `\\`"
                );
                in_block = false;
                continue;
            }
            if pending.is_empty() {
                pending_line = index + 1;
            }
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head.trim_end());
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let command = std::mem::take(&mut pending);
            if !command.is_empty() && !command.starts_with('#') {
                steps.push(Step {
                    line: pending_line,
                    command,
                });
            }
        }
        assert!(!in_block, "the README's last walkthrough block is not closed");
        steps
    }

    pub fn readme() -> String {
        let path = lab::util::workspace_root().join("README.md");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The values a user fills into the example profile (README, step 2),
    /// the lab's where the practice's would go: (in the example, lab value).
    pub fn lab_values(gateway_public_key: &str) -> Vec<(&'static str, String)> {
        use lab::addr;
        vec![
            (
                "REPLACE-WITH-THE-GATEWAY-PUBLIC-KEY-44-CHARS=",
                gateway_public_key.to_string(),
            ),
            ("gw.practice.example:51820", addr::GATEWAY_ENDPOINT.to_string()),
            ("10.66.0.2/32", LAB_TUNNEL_ADDRESS.to_string()),
            ("10.66.0.1", addr::GATEWAY_TUN_V4.to_string()),
            ("meet.practice.example", addr::MEET_NAME.to_string()),
            // The lab has no TURN server: a name its resolver does not know.
            ("turn.practice.example", "turn.test".to_string()),
        ]
    }

    /// The `sessionctl` subcommands a first session needs, in the order
    /// the README must give them.
    pub const FIRST_SESSION: [&str; 6] = [
        "sessionctl keygen",
        "sessionctl check",
        "sessionctl start",
        "sessionctl status",
        "sessionctl verify",
        "sessionctl stop",
    ];

    /// Where each of [`FIRST_SESSION`] is in `steps` (panics if one is missing
    /// or out of order).
    pub fn first_session_order(steps: &[Step]) -> Vec<usize> {
        let mut found = Vec::new();
        let mut from = 0;
        for wanted in FIRST_SESSION {
            let at = steps[from..]
                .iter()
                .position(|s| s.command.contains(wanted))
                .map(|i| i + from)
                .unwrap_or_else(|| {
                    panic!("the README's walkthrough has no `{wanted}` after the steps before it: {steps:#?}")
                });
            found.push(at);
            from = at + 1;
        }
        found
    }

    /// The path `sudoedit` is given, if `command` is one.
    pub fn edited_file(command: &str) -> Option<&Path> {
        command.strip_prefix("sudoedit ").map(|p| Path::new(p.trim()))
    }
}

#[test]
fn the_readme_walkthrough_has_every_step_of_a_first_session_and_the_table_of_values() {
    let readme = walkthrough::readme();
    let steps = walkthrough::steps(&readme);
    walkthrough::first_session_order(&steps);
    assert!(
        steps.iter().any(|s| s.command == "./scripts/package"),
        "the walkthrough does not build the package: {steps:#?}"
    );
    assert!(
        steps
            .iter()
            .any(|s| walkthrough::edited_file(&s.command).is_some()),
        "the walkthrough never opens the profile in an editor: {steps:#?}"
    );
    // The README's table names every value the test fills in, and the
    // example profile holds each of them.
    let example = std::fs::read_to_string(util::workspace_root().join("profiles/jitsi-practice.toml"))
        .expect("profiles/jitsi-practice.toml");
    for (placeholder, _) in walkthrough::lab_values("") {
        assert!(
            readme.contains(&format!("| `{placeholder}` |")),
            "the README's table of values does not name {placeholder}"
        );
        assert!(
            example.contains(placeholder),
            "profiles/jitsi-practice.toml has no {placeholder} to replace"
        );
    }
}

#[test]
fn walkthrough_blocks_are_read_in_order_with_continuations_and_without_comments() {
    let text = "intro\n```sh\nnot this\n```\n```sh walkthrough\n./a\n# a comment\n\n   sudo b \\\n       --c\n```\nmore\n   ```sh walkthrough\n   d # then e\n   ```\n";
    let steps = walkthrough::steps(text);
    let commands: Vec<&str> = steps.iter().map(|s| s.command.as_str()).collect();
    assert_eq!(commands, ["./a", "sudo b --c", "d # then e"]);
    let lines: Vec<usize> = steps.iter().map(|s| s.line).collect();
    assert_eq!(lines, [6, 9, 14]);
}

#[test]
fn a_new_user_follows_the_readme_from_the_checkout_to_a_protected_session_and_back() {
    use lab::container::Container;
    use lab::{addr, Lab};

    let steps = walkthrough::steps(&walkthrough::readme());
    walkthrough::first_session_order(&steps);
    let lab = Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"));
    let mut c = Container::new(&lab).unwrap_or_else(|e| panic!("container: {e:#}"));
    // What DHCP gave the machine: the lab's public resolver.
    let resolv_before = format!("nameserver {}\n", addr::PUBLIC_DNS_V4);
    c.write("/etc/resolv.conf", &resolv_before, 0o644)
        .expect("resolv.conf");
    c.boot().unwrap_or_else(|e| panic!("boot: {e:#}"));
    // The machine's user, made the way Debian's installer makes one
    // (adduser: a home only they can read), with the fresh checkout in it.
    c.exec_ok(&["adduser", "--disabled-password", "--gecos", "", walkthrough::USER])
        .expect("adduser");
    c.exec_ok(&[
        "runuser",
        "-u",
        walkthrough::USER,
        "--",
        "mkdir",
        "-p",
        walkthrough::CHECKOUT,
    ])
    .expect("the checkout");

    let mut outputs: Vec<(walkthrough::Step, String)> = Vec::new();
    let mut profile_text = None;
    for step in &steps {
        let command = step.command.as_str();
        let failed = |what: &str| -> ! {
            panic!(
                "README line {} `{command}`: {what}\njournal:\n{}",
                step.line,
                c.journal("sessiond")
            )
        };
        if command.starts_with("./scripts/package") {
            if command != "./scripts/package" {
                failed("the test stands in for `./scripts/package` without arguments only");
            }
            let out_dir = lab.tmp_dir().join("packages");
            let script = util::workspace_root().join("scripts/package");
            util::run(&[
                &script.to_string_lossy(),
                "--debug-build",
                &out_dir.to_string_lossy(),
            ])
            .unwrap_or_else(|e| failed(&format!("{e:#}")));
            for entry in std::fs::read_dir(&out_dir).expect("the package directory") {
                let path = entry.expect("a directory entry").path();
                let name = path
                    .file_name()
                    .expect("a file name")
                    .to_string_lossy()
                    .into_owned();
                c.install(
                    &path,
                    &format!("{}/target/debian/{name}", walkthrough::CHECKOUT),
                    0o644,
                )
                .unwrap_or_else(|e| failed(&format!("{e:#}")));
            }
            let owner = format!("{0}:{0}", walkthrough::USER);
            c.exec_ok(&["chown", "-R", &owner, walkthrough::CHECKOUT])
                .expect("chown the checkout");
            outputs.push((step.clone(), String::new()));
            continue;
        }
        if let Some(file) = walkthrough::edited_file(command) {
            let path = c.path(&file.to_string_lossy());
            let mut text =
                std::fs::read_to_string(&path).unwrap_or_else(|e| failed(&format!("the file to edit: {e}")));
            for (placeholder, value) in walkthrough::lab_values(lab.gateway_public_key()) {
                if !text.contains(placeholder) {
                    failed(&format!("the file has no {placeholder} to replace:\n{text}"));
                }
                text = text.replace(placeholder, &value);
            }
            // sudoedit writes the file back in place: owner and mode stay.
            std::fs::write(&path, &text).unwrap_or_else(|e| failed(&format!("{e}")));
            profile_text = Some(text);
            outputs.push((step.clone(), String::new()));
            continue;
        }
        if command.contains("sessionctl start") {
            // The session's own traffic is all the meters may see from here.
            if let Some(text) = &profile_text {
                lab.set_tunnel_allowed_profile(text)
                    .unwrap_or_else(|e| failed(&format!("the tunnel meter: {e:#}")));
            }
            lab.reset_all_leaks().expect("reset the leak meters");
        }
        let in_checkout = format!("cd {} && {}", walkthrough::CHECKOUT, command);
        let out = match command.strip_prefix("sudo ") {
            Some(as_root) => c.exec(&[
                "env",
                &format!("USER={}", walkthrough::USER),
                &format!("LOGNAME={}", walkthrough::USER),
                "sh",
                "-c",
                &format!("cd {} && {}", walkthrough::CHECKOUT, as_root),
            ]),
            None => c.exec(&["runuser", "-l", walkthrough::USER, "-c", &in_checkout]),
        }
        .unwrap_or_else(|e| failed(&format!("{e:#}")));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // What the user sees, step by step (shown when the test fails).
        eprintln!("$ {command}\n{said}");
        if !out.status.success() {
            failed(&format!("{}:\n{said}", out.status));
        }
        if command.contains("sessionctl keygen") {
            // The one line it prints goes to whoever runs the gateway.
            let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
            lab.add_gateway_peer(&public, &[walkthrough::LAB_TUNNEL_ADDRESS])
                .unwrap_or_else(|e| {
                    failed(&format!("the gateway refused the printed key {public:?}: {e:#}"))
                });
        }
        outputs.push((step.clone(), said));
    }

    let said_by = |wanted: &str| -> &str {
        outputs
            .iter()
            .find(|(s, _)| s.command.contains(wanted))
            .map(|(_, said)| said.as_str())
            .unwrap_or_else(|| panic!("no `{wanted}` ran"))
    };
    let status = said_by("sessionctl status");
    assert!(
        status.starts_with("Protected: only meet.test"),
        "status during the session: {status}"
    );
    let verify = said_by("sessionctl verify");
    assert!(!verify.contains("FAIL"), "verify: {verify}");
    lab.assert_no_leaks();

    // Stopped: no firewall of ours, the resolver file as it was, idle.
    for family in ["inet", "netdev"] {
        let table = c
            .exec(&["nft", "list", "table", family, "sessiongate"])
            .expect("nft");
        assert!(!table.status.success(), "the {family} table stayed after stop");
    }
    assert_eq!(
        c.exec_ok(&["cat", "/etc/resolv.conf"]).expect("resolv.conf"),
        resolv_before,
        "the resolver file was not restored"
    );
    let idle = c
        .exec(&["runuser", "-l", walkthrough::USER, "-c", "sessionctl status"])
        .expect("status");
    assert!(
        String::from_utf8_lossy(&idle.stdout).starts_with("Not protected: no session"),
        "status after stop: {}",
        String::from_utf8_lossy(&idle.stdout)
    );
    c.poweroff().unwrap_or_else(|e| panic!("poweroff: {e:#}"));
}
