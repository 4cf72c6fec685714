//! How nftables commands reach the kernel: in this process, through
//! libnftables (the library the `nft` binary is a thin front end for), when
//! it can be loaded; otherwise the caller runs `nft` itself.
//!
//! # What this module owns, and what it must never do
//!
//! It owns one libnftables context for the whole process, behind a lock
//! (libnftables is not thread-safe). It runs exactly the command text it is
//! given and returns nft's own output or error words; it knows nothing about
//! tables, rules or sessions (that is the firewall module's business), and it
//! never runs anything on its own.
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
//! Debian's `nftables` package depends on), not linked, so a machine without
//! it still builds and runs sessiond: [`Libnftables::get`] answers `None` and
//! the firewall falls back to the binary. [`use_binary_only`] (sessiond's
//! `--nft-binary`) asks for that fallback on purpose: for a libnftables that
//! misbehaves, and so the lab can prove the fallback keeps every guarantee.
//!
//! The context binds to the network namespace the process is in when it is
//! first used; sessiond never changes namespace. A call blocks its thread
//! (a tokio worker) for the parse and the commit, about a millisecond; unlike
//! a spawned `nft` it has no timeout, since there is no process to stop.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

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

/// A loaded libnftables with one context.
pub struct Libnftables {
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

static LIBNFTABLES: OnceLock<Option<Libnftables>> = OnceLock::new();
static BINARY_ONLY: AtomicBool = AtomicBool::new(false);

/// Never load libnftables in this process: every command runs the `nft`
/// binary. Takes effect only before the first firewall change.
pub fn use_binary_only() {
    BINARY_ONLY.store(true, Ordering::Relaxed);
}

impl Libnftables {
    /// The process's libnftables, loaded on first use; `None` when the
    /// library is not installed or not usable (logged once).
    pub fn get() -> Option<&'static Libnftables> {
        LIBNFTABLES
            .get_or_init(|| {
                if BINARY_ONLY.load(Ordering::Relaxed) {
                    tracing::info!("firewall changes run the nft binary, as asked (--nft-binary)");
                    return None;
                }
                Libnftables::open()
            })
            .as_ref()
    }

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
    pub fn run(&self, command: &str) -> Result<String, String> {
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
