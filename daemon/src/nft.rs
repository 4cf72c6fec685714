//! The way to nft: one [`NftRunner`] value, chosen once by sessiond's
//! `--nft-binary`, that hands a command to libnftables in this process (the
//! library the `nft` binary is a thin front end for) when it can be loaded,
//! and otherwise runs the `nft` binary.
//!
//! # What this module owns, and what it must never do
//!
//! It owns the runner: at most one libnftables context (behind a lock:
//! libnftables is not thread-safe), shared by the runner's clones, and the
//! spawning of `nft` with its timeout. It runs exactly the command text it
//! is given and returns nft's own output or error words; it knows nothing
//! about tables, rules or sessions (that is the firewall module's
//! business), it never runs anything on its own, and it keeps no state
//! outside the value (no process-wide globals: whoever built the runner
//! decides which way it goes).
//!
//! # Why in process
//!
//! Spawning `nft -j -f -` costs about 16 ms per change on the lab machine:
//! fork, exec, loading libnftables and its libraries, and only then the
//! parse and the netlink commit, which take well under 1 ms. Two changes sit
//! between `sessionctl start` and the first allowed packet (the lockdown,
//! then the allowlist after the handshake), and one more sits between a
//! tamper and its repair. The same library does the same parse and the same
//! single transaction per call, so the behaviour is `nft -j -f -`'s.
//!
//! The library is opened at run time (`dlopen` of `libnftables.so.1`, which
//! Debian's `nftables` package depends on), not linked, and only at the
//! runner's first command, so a machine without it still builds and runs
//! sessiond (the runner falls back to the binary) and an idle daemon never
//! maps it. [`NftRunner::binary_only`] (sessiond's `--nft-binary`) asks for
//! that fallback on purpose: for a libnftables that misbehaves, and so the
//! lab can prove the fallback keeps every guarantee.
//!
//! The context binds to the network namespace the process is in when it is
//! first used; sessiond never changes namespace. A call blocks its thread
//! (a tokio worker) for the parse and the commit, about a millisecond; unlike
//! a spawned `nft` it has no timeout, since there is no process to stop.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// `NFT_CTX_DEFAULT` for `nft_ctx_new`.
const NFT_CTX_DEFAULT: c_uint = 0;
/// `NFT_CTX_OUTPUT_JSON`: JSON output, and JSON input accepted (what
/// `nft -j` sets).
const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type SetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type Buffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// How long one `nft` run may take before we give up on it.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(10);

/// The way to nft, chosen once; clones share it (and its one libnftables
/// context).
#[derive(Clone)]
pub struct NftRunner {
    way: Arc<Way>,
}

struct Way {
    /// `--nft-binary`: never load libnftables.
    binary_only: bool,
    /// The library, loaded at the first command; `None` when it is not
    /// usable (or not wanted): the binary runs then.
    library: OnceLock<Option<Libnftables>>,
}

/// One nft command, with JSON output.
pub enum NftCommand<'a> {
    /// A JSON batch, one transaction (what `nft -j -f -` reads).
    Batch(&'a str),
    /// A command line, e.g. `list table inet sessiongate`.
    Line(&'a str),
}

/// nft could not be run at all (as opposed to nft refusing a command).
#[derive(Debug)]
pub enum NftFailure {
    /// The binary could not be started or fed; the sentence says why.
    Spawn(String),
    /// The binary did not finish within [`NFT_TIMEOUT`] and was stopped.
    Timeout,
}

impl NftRunner {
    /// libnftables in this process when it loads, else the binary.
    pub fn in_process() -> NftRunner {
        NftRunner::with(false)
    }

    /// The `nft` binary for every command (sessiond's `--nft-binary`).
    pub fn binary_only() -> NftRunner {
        NftRunner::with(true)
    }

    fn with(binary_only: bool) -> NftRunner {
        NftRunner {
            way: Arc::new(Way {
                binary_only,
                library: OnceLock::new(),
            }),
        }
    }

    /// The runner's libnftables, loaded on first use; `None` when the
    /// library is not installed, not usable (logged once) or not wanted.
    fn library(&self) -> Option<&Libnftables> {
        self.way
            .library
            .get_or_init(|| {
                if self.way.binary_only {
                    tracing::info!("firewall changes run the nft binary, as asked (--nft-binary)");
                    return None;
                }
                Libnftables::open()
            })
            .as_ref()
    }

    /// Runs `command` through libnftables in process, or through the `nft`
    /// binary (`nft -j -f -` for a batch). The outer error: nft could not
    /// be run at all; the inner one: nft refused, in its words.
    pub async fn run(&self, command: NftCommand<'_>) -> Result<Result<String, String>, NftFailure> {
        if let Some(lib) = self.library() {
            let (NftCommand::Batch(text) | NftCommand::Line(text)) = command;
            return Ok(lib.run(text));
        }
        let mut nft = Command::new("nft");
        nft.arg("-j")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let input = match command {
            NftCommand::Batch(json) => {
                nft.args(["-f", "-"]).stdin(Stdio::piped());
                Some(json)
            }
            NftCommand::Line(line) => {
                nft.args(line.split_whitespace()).stdin(Stdio::null());
                None
            }
        };
        let mut child = nft.spawn().map_err(|e| NftFailure::Spawn(e.to_string()))?;
        let run = async {
            if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
                stdin
                    .write_all(input.as_bytes())
                    .await
                    .map_err(|e| NftFailure::Spawn(format!("writing the ruleset to nft failed: {e}")))?;
                // Dropping stdin closes it: nft reads to the end, then commits.
            }
            child
                .wait_with_output()
                .await
                .map_err(|e| NftFailure::Spawn(e.to_string()))
        };
        let out = tokio::time::timeout(NFT_TIMEOUT, run)
            .await
            .map_err(|_| NftFailure::Timeout)??;
        if out.status.success() {
            return Ok(Ok(String::from_utf8_lossy(&out.stdout).into_owned()));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Ok(Err(if stderr.trim().is_empty() {
            format!("nft exited with {} and no message", out.status)
        } else {
            stderr.into_owned()
        }))
    }
}

/// A loaded libnftables with one context.
struct Libnftables {
    context: Mutex<Context>,
}

struct Context {
    ctx: *mut c_void,
    run_cmd: RunCmd,
    output: GetBuffer,
    error: GetBuffer,
    free: CtxFree,
    // Last, so the library is unloaded after the context is freed.
    _library: libloading::Library,
}

// SAFETY: the context pointer is only used under the `Mutex`, one call at a
// time, which is all libnftables asks of its callers.
unsafe impl Send for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from `nft_ctx_new` and is freed once, here.
        unsafe { (self.free)(self.ctx) }
    }
}

impl Libnftables {
    fn open() -> Option<Libnftables> {
        match Context::open() {
            Ok(context) => Some(Libnftables {
                context: Mutex::new(context),
            }),
            Err(reason) => {
                tracing::info!("libnftables is not usable ({reason}); sessiond runs the nft binary instead");
                None
            }
        }
    }

    /// Runs `command` (nft syntax or nft's JSON) as `nft -j -f -` would: one
    /// transaction. Returns nft's output (JSON for listings), or its error
    /// text.
    fn run(&self, command: &str) -> Result<String, String> {
        let command = CString::new(command).map_err(|_| "the nft command contains a NUL byte".to_string())?;
        // A panic elsewhere while holding the lock leaves nothing half-done
        // in the context (each call is complete), so a poisoned lock is fine.
        let context = self.context.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `ctx` is a live context, `command` a NUL-terminated string
        // that outlives the call, and the lock keeps the calls serial. The
        // buffers libnftables returns stay valid until its next call, so they
        // are copied before the lock is released.
        unsafe {
            let status = (context.run_cmd)(context.ctx, command.as_ptr());
            let output = buffer_text((context.output)(context.ctx));
            let error = buffer_text((context.error)(context.ctx));
            if status == 0 {
                Ok(output)
            } else if error.trim().is_empty() {
                Err(format!("nft failed with status {status} and no message"))
            } else {
                Err(error)
            }
        }
    }
}

impl Context {
    fn open() -> Result<Context, String> {
        // SAFETY: loading libnftables runs its (and its dependencies')
        // initialisers, which have no preconditions; the symbol types match
        // libnftables.h.
        unsafe {
            let library = libloading::Library::new("libnftables.so.1").map_err(|e| e.to_string())?;
            let new: CtxNew = symbol(&library, b"nft_ctx_new\0")?;
            let free: CtxFree = symbol(&library, b"nft_ctx_free\0")?;
            let set_flags: SetFlags = symbol(&library, b"nft_ctx_output_set_flags\0")?;
            let buffer_output: Buffer = symbol(&library, b"nft_ctx_buffer_output\0")?;
            let buffer_error: Buffer = symbol(&library, b"nft_ctx_buffer_error\0")?;
            let output: GetBuffer = symbol(&library, b"nft_ctx_get_output_buffer\0")?;
            let error: GetBuffer = symbol(&library, b"nft_ctx_get_error_buffer\0")?;
            let run_cmd: RunCmd = symbol(&library, b"nft_run_cmd_from_buffer\0")?;
            let ctx = new(NFT_CTX_DEFAULT);
            if ctx.is_null() {
                return Err("nft_ctx_new failed".into());
            }
            let context = Context {
                ctx,
                run_cmd,
                output,
                error,
                free,
                _library: library,
            };
            set_flags(ctx, NFT_CTX_OUTPUT_JSON);
            if buffer_output(ctx) != 0 || buffer_error(ctx) != 0 {
                return Err("libnftables cannot buffer its output".into());
            }
            Ok(context)
        }
    }
}

/// One function of the library, as a plain function pointer.
///
/// # Safety
/// `T` must be the symbol's real type, and the pointer must not be used
/// after `library` is dropped.
unsafe fn symbol<T: Copy>(library: &libloading::Library, name: &[u8]) -> Result<T, String> {
    // SAFETY: per this function's contract.
    unsafe { library.get::<T>(name) }
        .map(|f| *f)
        .map_err(|e| e.to_string())
}

/// Copies a libnftables buffer (NULL means empty).
///
/// # Safety
/// `text` is NULL or a NUL-terminated string valid for the duration of the
/// call.
unsafe fn buffer_text(text: *const c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: per this function's contract.
    unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_only_never_loads_the_library_and_clones_share_the_way() {
        let runner = NftRunner::binary_only();
        let clone = runner.clone();
        assert!(runner.library().is_none());
        assert!(Arc::ptr_eq(&runner.way, &clone.way));
        assert!(clone.way.binary_only);
        assert!(!NftRunner::in_process().way.binary_only);
    }

    /// The firewall and the way to nft keep their state in values (the
    /// session's `Firewall`, the daemon's `NftRunner`): a process-wide
    /// `static` or `thread_local!` here would bring back the globals they
    /// replaced.
    #[test]
    fn no_process_wide_state_in_the_firewall_or_the_runner() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src.join("nft.rs")];
        for entry in std::fs::read_dir(src.join("firewall")).expect("firewall/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
        for file in files {
            let text = std::fs::read_to_string(&file).expect("source");
            for (n, line) in text.lines().enumerate() {
                let code = line.trim_start();
                let code = code.strip_prefix("pub(crate) ").unwrap_or(code);
                let code = code.strip_prefix("pub(super) ").unwrap_or(code);
                let code = code.strip_prefix("pub ").unwrap_or(code);
                assert!(
                    !code.starts_with("static ") && !code.starts_with("thread_local!"),
                    "{}:{}: {line}",
                    file.display(),
                    n + 1
                );
            }
        }
    }
}
