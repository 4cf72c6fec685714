//! Small helpers the lab is built from: unique ids, polling with a deadline,
//! running commands with errors that say what failed, finding binaries.
//! Owns no state.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

/// How often polling helpers look again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// A short id (5 chars of [0-9a-z]) unique across threads and processes:
/// mixes the pid, a per-process counter and the clock.
pub fn short_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) as u64;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let pid = std::process::id() as u64;
    // splitmix64 over the three inputs.
    let mut x = pid
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(n.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(nanos);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..5)
        .map(|i| ALPHABET[((x >> (i * 6)) % 36) as usize] as char)
        .collect()
}

/// Polls `cond` every few milliseconds until it is true; fails after `timeout`
/// with a message naming `what`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {:?} waiting for {what}", timeout);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `f` until it returns Ok; on timeout fails with the last error.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("timed out after {timeout:?} waiting for {what}")))
            }
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

/// `program args...` as one string, for error messages.
pub fn display_cmd(args: &[&str]) -> String {
    args.join(" ")
}

/// Runs a command to completion, capturing its output (does not check status).
pub fn output(args: &[&str]) -> Result<Output> {
    let (prog, rest) = args.split_first().context("empty command")?;
    Command::new(prog)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", display_cmd(args)))
}

/// Runs a command with `input` on stdin, capturing its output.
pub fn output_with_stdin(args: &[&str], input: &[u8]) -> Result<Output> {
    let (prog, rest) = args.split_first().context("empty command")?;
    let mut child = Command::new(prog)
        .args(rest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{}`", display_cmd(args)))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .with_context(|| format!("writing stdin of `{}`", display_cmd(args)))?;
    }
    child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", display_cmd(args)))
}

/// Turns a finished command into its stdout, or an error with its stderr.
pub fn check(args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            display_cmd(args),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command and requires success; returns stdout.
pub fn run(args: &[&str]) -> Result<String> {
    check(args, output(args)?)
}

/// Runs a command with stdin and requires success; returns stdout.
pub fn run_with_stdin(args: &[&str], input: &[u8]) -> Result<String> {
    check(args, output_with_stdin(args, input)?)
}

/// Reads a file that may not exist yet as (lossy) text; missing means empty.
pub fn read_text(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The workspace root (the lab crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Directories where cargo puts binaries, best first: the directory of the
/// running test executable (`target/<profile>/deps/..`), then
/// `$CARGO_TARGET_DIR/debug`, then `<workspace>/target/debug`.
pub fn binary_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            if dir.file_name().is_some_and(|n| n == "deps") {
                if let Some(up) = dir.parent() {
                    dirs.push(up.to_path_buf());
                }
            }
            dirs.push(dir.to_path_buf());
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(t).join("debug"));
    }
    dirs.push(workspace_root().join("target").join("debug"));
    dirs
}

/// Finds a workspace binary. `LAB_BIN_<NAME>` (e.g. `LAB_BIN_SESSIOND`) in the
/// environment overrides the search.
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let var = format!("LAB_BIN_{}", name.to_ascii_uppercase());
    if let Some(p) = std::env::var_os(&var) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{var}={} is not a file", p.display());
    }
    let dirs = binary_dirs();
    for d in &dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "binary `{name}` not found (looked in {}): run `cargo build --workspace` first",
        looked.join(", ")
    )
}

/// True if this process runs with euid 0.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
