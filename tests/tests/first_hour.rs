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
