//! `sessionctl`: the command-line client for sessiond.
//!
//! It turns a command into one request on the control socket and the reply
//! into text for a person (or JSON with `--json`) and an exit code (see the
//! man page's EXIT STATUS).
//! It changes nothing on the machine itself, except `keygen`'s key file.

mod audit;

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::Value;
use sessiongate_common::cause::Cause;
use sessiongate_common::control::{self, exit, Reply, Request};
use sessiongate_common::import::AllowArg;
use sessiongate_common::keys::Key;
use sessiongate_common::profile::Profile;

#[derive(Parser, Debug)]
#[command(name = "sessionctl", version, about = "Control sessiongate sessions")]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "SESSIONCTL_SOCKET", default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Activate a profile; returns once the session is active or has failed.
    Start {
        /// The profile's name: NAME for /etc/sessiongate/profiles/NAME.toml.
        profile: String,
    },
    /// End the session; returns once normal networking is back.
    Stop,
    /// Show the session's state, tunnel and allowed hosts.
    Status {
        /// Print sessiond's answer as one line of JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// Keep following: print the status again each time it changes
        /// (sessiond sends it; nothing polls), until interrupted or sessiond
        /// goes away (exit 3).
        #[arg(long)]
        watch: bool,
    },
    /// List every profile the daemon sees, valid or not.
    Profiles {
        /// Print sessiond's answer as one line of JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Validate a profile file (or a profile by name) without touching the system.
    ///
    /// A file is read here, with its key files, exactly as sessiond would
    /// read it. A name is checked by sessiond if it runs, and read here
    /// from the profiles directory if not: no running daemon is needed, and
    /// nothing is changed. The format of every field is in docs/profiles.md
    /// (installed as /usr/share/doc/sessiongate/profiles.md).
    Check {
        /// A profile file (anything with a `/` or ending in `.toml`), or a
        /// profile's name, looked up in --profiles.
        #[arg(value_name = "FILE_OR_PROFILE", required = true)]
        targets: Vec<String>,
        /// Look names up in DIR, here, instead of asking sessiond (which
        /// is asked when it runs; otherwise /etc/sessiongate/profiles is
        /// read here).
        #[arg(long, value_name = "DIR")]
        profiles: Option<PathBuf>,
    },
    /// Prove the boundary holds with active probes (during a session).
    Verify {
        /// Print the probes' report as one line of JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Check the approved hosts themselves, not only the path (during a session).
    ///
    /// Runs here, as you, through the session's tunnel: for each host the
    /// active profile allows, the TLS versions it accepts (TLS 1.2 is a
    /// finding; 1.0 and 1.1 are not probed), the cipher suite, the
    /// certificate chain (against the system trust store, or the CA named
    /// in the profile's [audit] ca) and its expiry (a finding under 14
    /// days), HSTS; for a Jitsi Meet host its config.js (P2P, third-party
    /// requests, STUN servers, E2EE, avatars) and every third party the
    /// call page loads; TCP ports the profile allows where nothing listens,
    /// and missing UDP media ports. One line per check; each finding says
    /// what to change and where. `verify` proves the path holds; `audit`
    /// checks the far end. Exits 5 when there are findings.
    Audit {
        /// The profile to audit: the active session's (the default; any
        /// other name is refused, as the session reaches only its hosts).
        profile: Option<String>,
        /// Print the report as one line of JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Open this network's login page (hotel, café) in a namespace of its own.
    ///
    /// sessiond makes a network namespace that reaches only the local
    /// network's web and DNS servers (TCP 80/443/53, UDP 53) and the DNS
    /// server the network gave, on an address of its own on the same
    /// subnet, for a limited time (5 minutes unless --seconds says
    /// otherwise); nothing else on the machine changes, and a running
    /// session's firewall stays as it is, with one named exception for that
    /// namespace's traffic. With --browser, sessiond starts that program
    /// there as you (never as root), with the login page's address as its
    /// last argument; use a separate profile, e.g. `--browser chromium
    /// --browser-arg=--user-data-dir=/tmp/portal-profile`. During a session
    /// it is refused unless you say --during-session. The namespace and the
    /// browser are the work of sessiond's captive-portal helper, a unit of
    /// its own (sessiongate-portal.socket), which must be enabled.
    Portal {
        /// Open it although a session is running (the session stays locked down).
        #[arg(long)]
        during_session: bool,
        /// Remove the namespace now, with whatever runs in it.
        #[arg(long, conflicts_with_all = ["during_session", "seconds", "browser"])]
        close: bool,
        /// How long the namespace stays, in seconds (at most 900).
        #[arg(long, value_name = "SECONDS")]
        seconds: Option<u64>,
        /// The browser to start in the namespace, as you.
        #[arg(long, value_name = "PROGRAM")]
        browser: Option<String>,
        /// An argument for the browser, before the page's address (repeat it).
        #[arg(
            long = "browser-arg",
            value_name = "ARG",
            allow_hyphen_values = true,
            requires = "browser"
        )]
        browser_args: Vec<String>,
        /// Print sessiond's answer as one line of JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Turn a wg-quick config into a profile and a 0600 key file.
    Import {
        /// The wg-quick configuration file (e.g. the practice's wg0.conf).
        wg_conf: PathBuf,
        /// The new profile's name.
        #[arg(long)]
        name: String,
        /// A host to allow, e.g. meet.practice.example:443/tcp (repeat it).
        #[arg(long = "allow", value_name = "HOST:PORT/PROTO", required = true)]
        allow: Vec<String>,
        /// Where to write NAME.toml and keys/NAME.key.
        #[arg(long, default_value = DEFAULT_PROFILES_DIR)]
        dir: PathBuf,
    },
    /// Print shell completions for sessionctl (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to print completions for.
        shell: clap_complete::Shell,
    },
    /// Print sessionctl's man page (roff), e.g. `sessionctl man | man -l -`.
    Man,
    /// Make a WireGuard private key file (mode 0600) and print its public key.
    ///
    /// Standard output gets only the public key, the one to give to whoever
    /// runs the gateway. The private key goes to FILE, which must not exist.
    Keygen {
        /// Where to write the new private key (mode 0600; an existing file
        /// is never overwritten). `-` is refused: see --private-to-stdout.
        #[arg(long, value_name = "FILE", required_unless_present = "private_to_stdout")]
        out: Option<PathBuf>,
        /// Print the PRIVATE key to standard output instead of writing a
        /// file (the public key then goes to standard error). Only for
        /// piping into something that keeps secrets.
        #[arg(long, conflicts_with = "out")]
        private_to_stdout: bool,
    },
}

/// sessiond's profiles directory unless `sessiond --profiles` says otherwise.
const DEFAULT_PROFILES_DIR: &str = "/etc/sessiongate/profiles";

/// Where a user reads what every profile field means.
const FORMAT_REFERENCE: &str = "/usr/share/doc/sessiongate/profiles.md (docs/profiles.md in the source)";

/// A failure with the exit code it deserves.
struct Failure {
    code: i32,
    message: String,
}

impl Failure {
    fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`sessionctl
    // status | head -1`) would panic; a command-line tool should just end,
    // as cat and grep do.
    // SAFETY: no other thread runs yet and no handler is replaced but the
    // default's.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // An empty message: the output already said what went wrong.
            if !f.message.is_empty() {
                eprintln!("sessionctl: {}", f.message);
            }
            ExitCode::from(u8::try_from(f.code).unwrap_or(1))
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let socket = cli.socket.as_path();
    match cli.command {
        Command::Start { profile } => {
            // The daemon answers once the handshake is done or has timed out
            // (at most 300 s by the profile rules).
            let result = ask(socket, &Request::Start { profile }, Duration::from_secs(330))?;
            println!("{}", describe_status(&result));
            Ok(())
        }
        Command::Stop => {
            let result = ask(socket, &Request::Stop, Duration::from_secs(60))?;
            println!("{}", result["message"].as_str().unwrap_or("stopped"));
            Ok(())
        }
        Command::Status { json, watch: true } => watch_status(socket, json),
        Command::Status { json, watch: false } => {
            let result = ask(socket, &Request::Status, Duration::from_secs(10))?;
            print_json_or(json, &result, describe_status);
            Ok(())
        }
        Command::Profiles { json } => {
            let result = ask(socket, &Request::Profiles, Duration::from_secs(10))?;
            print_json_or(json, &result, describe_profiles);
            Ok(())
        }
        Command::Check { targets, profiles } => check(socket, &targets, profiles.as_deref()),
        Command::Verify { json } => {
            // Four probes of at most 3 s each, plus the daemon's own checks.
            let result = ask(socket, &Request::Verify, Duration::from_secs(60))?;
            print_json_or(json, &result, describe_verify);
            if result["passed"].as_bool() == Some(true) {
                Ok(())
            } else {
                Err(Failure::new(exit::FAILED, ""))
            }
        }
        Command::Audit { profile, json } => run_audit(socket, profile.as_deref(), json),
        Command::Portal {
            during_session,
            close,
            seconds,
            browser,
            browser_args,
            json,
        } => {
            let request = Request::Portal(portal_request(
                during_session,
                close,
                seconds,
                browser,
                browser_args,
            ));
            let result = ask(socket, &request, Duration::from_secs(30))?;
            print_json_or(json, &result, |v| {
                let message = v["message"].as_str().unwrap_or("done").to_string();
                if v["url"].is_string() && v["browser_pid"].is_null() {
                    format!("{message}.\nNo browser was started there: give `--browser PROGRAM` to have one started as you.")
                } else {
                    message
                }
            });
            Ok(())
        }
        Command::Import {
            wg_conf,
            name,
            allow,
            dir,
        } => import(&wg_conf, &name, &allow, &dir),
        Command::Keygen {
            out,
            private_to_stdout,
        } => keygen(out.as_deref(), private_to_stdout),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "sessionctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => man_page(&mut std::io::stdout())
            .map_err(|e| Failure::new(exit::FAILED, format!("cannot write the man page: {e}"))),
    }
}

/// The man page: clap_mangen's title, synopsis, description and options;
/// then every command with its arguments on this one page (clap_mangen's
/// own command list points to sessionctl-start(1) and such, which do not
/// exist); then EXIT STATUS, FILES and SEE ALSO.
fn man_page(w: &mut dyn Write) -> std::io::Result<()> {
    let cli = Cli::command();
    let man = clap_mangen::Man::new(cli.clone());
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    writeln!(w, ".SH COMMANDS")?;
    for sub in cli.get_subcommands().filter(|c| c.get_name() != "help") {
        let mut usage = format!("sessionctl {}", sub.get_name());
        for arg in sub.get_arguments().filter(|a| !a.is_global_set()) {
            let id = arg.get_id().as_str();
            if id == "help" {
                continue;
            }
            let value = arg
                .get_value_names()
                .and_then(|v| v.first())
                .map(|v| v.to_string())
                .unwrap_or_else(|| id.to_ascii_uppercase());
            usage.push(' ');
            let many = if matches!(arg.get_action(), clap::ArgAction::Append) {
                "..."
            } else {
                ""
            };
            let shown = match arg.get_long() {
                Some(long) if arg.get_action().takes_values() => format!("--{long} {value}{many}"),
                Some(long) => format!("--{long}"),
                None => format!("{value}{many}"),
            };
            usage.push_str(&if arg.is_required_set() {
                shown
            } else {
                format!("[{shown}]")
            });
        }
        writeln!(w, ".TP\n\\fB{}\\fR", roff(&usage))?;
        let about = sub
            .get_long_about()
            .or(sub.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        for (i, paragraph) in about.split("\n\n").enumerate() {
            if i > 0 {
                writeln!(w, ".IP")?;
            }
            writeln!(w, "{}", roff(paragraph))?;
        }
        for arg in sub.get_arguments().filter(|a| !a.is_global_set()) {
            let id = arg.get_id().as_str();
            let Some(help) = arg.get_long_help().or(arg.get_help()) else {
                continue;
            };
            if id == "help" {
                continue;
            }
            let name = match arg.get_long() {
                Some(long) => format!("--{long}"),
                None => arg
                    .get_value_names()
                    .and_then(|v| v.first())
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| id.to_ascii_uppercase()),
            };
            writeln!(
                w,
                ".RS\n.TP\n\\fI{}\\fR\n{}\n.RE",
                roff(&name),
                roff(&help.to_string())
            )?;
        }
    }
    writeln!(w, ".SH EXIT STATUS")?;
    for (code, meaning) in [
        (exit::OK, "The command did what it says (for verify: every probe passed)."),
        (
            exit::FAILED,
            "The operation was tried and failed, or verify found the boundary not holding; the message says what to do.",
        ),
        (
            exit::USAGE,
            "The command line, a profile or a file given is invalid (check, import, keygen without --out).",
        ),
        (exit::UNREACHABLE, "sessiond is not running or its control socket cannot be reached."),
        (
            exit::PERMISSION,
            "The caller may not use sessiond: only root and members of its control group may.",
        ),
        (
            audit::EXIT_FINDINGS,
            "audit found something to change at an approved host or in the profile; each finding says what and where.",
        ),
    ] {
        writeln!(w, ".TP\n\\fB{code}\\fR\n{}", roff(meaning))?;
    }
    writeln!(w, ".SH FILES")?;
    for (path, meaning) in [
        (
            control::DEFAULT_SOCKET,
            "sessiond's control socket (mode 0660, group sessiongate).",
        ),
        (
            "/etc/sessiongate/profiles/NAME.toml",
            "The profile NAME, as `sessionctl start NAME` uses it.",
        ),
        (
            "/etc/sessiongate/profiles/keys/",
            "Private and preshared key files, mode 0600, owned by root.",
        ),
        (
            "/usr/share/doc/sessiongate/profiles.md",
            "The profile format: every field, its type and default.",
        ),
        (
            "/usr/share/doc/sessiongate/README.md",
            "What sessiongate does, how to install it and start a first session.",
        ),
        ("/usr/share/doc/sessiongate/examples/", "Example profiles."),
    ] {
        writeln!(w, ".TP\n\\fI{}\\fR\n{}", roff(path), roff(meaning))?;
    }
    writeln!(w, ".SH SEE ALSO")?;
    writeln!(w, "\\fBsystemctl\\fR(1), \\fBwg\\fR(8), \\fBnft\\fR(8)")?;
    man.render_version_section(w)
}

/// Text for a roff line: backslashes and hyphens escaped, and a leading
/// `.` or `'` kept from being read as a request.
fn roff(text: &str) -> String {
    text.lines()
        .map(|line| {
            let escaped = line.replace('\\', "\\e").replace('-', "\\-");
            if escaped.starts_with('.') || escaped.starts_with('\'') {
                format!("\\&{escaped}")
            } else {
                escaped
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The portal request: the browser as an absolute path (sessiond runs it
/// with a bare PATH), and this session's display variables for it.
fn portal_request(
    during_session: bool,
    close: bool,
    seconds: Option<u64>,
    browser: Option<String>,
    browser_args: Vec<String>,
) -> control::PortalRequest {
    let browser = browser
        .map(|program| {
            let path = if program.contains('/') {
                Some(PathBuf::from(&program))
            } else {
                std::env::var_os("PATH").and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|dir| dir.join(&program))
                        .find(|candidate| candidate.is_file())
                })
            };
            let program = path
                .and_then(|p| std::fs::canonicalize(p).ok())
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or(program);
            std::iter::once(program).chain(browser_args).collect()
        })
        .unwrap_or_default();
    let env = [
        "DISPLAY",
        "WAYLAND_DISPLAY",
        "XAUTHORITY",
        "XDG_RUNTIME_DIR",
        "DBUS_SESSION_BUS_ADDRESS",
        "LANG",
    ]
    .iter()
    .filter_map(|name| std::env::var(name).ok().map(|value| (name.to_string(), value)))
    .collect();
    control::PortalRequest {
        close,
        during_session,
        seconds,
        browser,
        env,
    }
}

fn ask(socket: &Path, request: &Request, timeout: Duration) -> Result<Value, Failure> {
    match control::call(socket, request, timeout) {
        Ok(Reply::Ok(value)) => Ok(value),
        Ok(Reply::Error { kind, message }) => Err(Failure::new(kind.exit_code(), message)),
        Err(e) => Err(Failure::new(e.exit_code(), e.to_string())),
    }
}

/// `audit`: the active profile and its hosts from sessiond, the checks
/// here as the calling user (see audit/mod.rs).
fn run_audit(socket: &Path, wanted: Option<&str>, json: bool) -> Result<(), Failure> {
    let status = ask(socket, &Request::Status, Duration::from_secs(10))?;
    let active = status["profile"].as_str().filter(|_| status["state"] == "active");
    let Some(active) = active else {
        let why = match status["state"].as_str() {
            Some("degraded") => "the session is not connected (see `sessionctl status`)",
            _ => "there is no active session",
        };
        return Err(Failure::new(
            exit::FAILED,
            format!("audit needs an active session, and {why}; start one with `sessionctl start PROFILE`"),
        ));
    };
    if let Some(wanted) = wanted.filter(|w| *w != active) {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "the session runs profile {active}, so only its hosts can be reached; run `sessionctl audit` during a session of {wanted}"
            ),
        ));
    }
    let checked = ask(
        socket,
        &Request::Check {
            profile: active.to_string(),
        },
        Duration::from_secs(10),
    )?;
    let ca = audit::ca_from_check(&checked);
    let allowed = audit::Allowed::from_status(&status);
    let report = audit::audit(active, &allowed, ca.as_deref()).map_err(|m| Failure::new(exit::FAILED, m))?;
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        println!("{}", audit::describe(&report));
    }
    if !report.errors.is_empty() {
        Err(Failure::new(exit::FAILED, ""))
    } else if report.findings > 0 {
        Err(Failure::new(audit::EXIT_FINDINGS, ""))
    } else {
        Ok(())
    }
}

/// `status --watch`: each status sessiond streams, as text (a blank line
/// between two) or one JSON line each; a status that reads the same as the
/// last one printed is skipped.
fn watch_status(socket: &Path, json: bool) -> Result<(), Failure> {
    let mut last = String::new();
    let followed = control::watch(socket, |status| {
        let shown = if json {
            status.to_string()
        } else {
            describe_status(&status)
        };
        if shown != last {
            if !json && !last.is_empty() {
                println!();
            }
            println!("{shown}");
            last = shown;
        }
        true
    });
    followed.map_err(|e| Failure::new(e.exit_code(), e.to_string()))
}

fn print_json_or(json: bool, value: &Value, human: fn(&Value) -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", human(value));
    }
}

/// Checks each profile the way sessiond loads it (`Profile::load`: name,
/// file type and size, owner and mode, every field, the key files). A file
/// is checked here. A name is checked by sessiond when it answers (it knows
/// its own profiles directory and may read the root-only key files, which a
/// member of the control group may not); when it does not run, or with
/// `--profiles DIR`, the name is looked up and checked here too, so `check`
/// works before sessiond ever ran. Nothing is changed either way.
fn check(socket: &Path, targets: &[String], profiles_dir: Option<&Path>) -> Result<(), Failure> {
    let mut failed = 0;
    for target in targets {
        let is_file = target.contains('/') || target.ends_with(".toml");
        let checked = if is_file {
            check_file(Path::new(target))
        } else {
            check_name(socket, target, profiles_dir)
        };
        match checked {
            Ok((name, false)) => println!("profile {name} is valid"),
            Ok((name, true)) => println!(
                "profile {name} is valid; it is gateway-enforced: during its sessions this machine sends every address into the tunnel and trusts the practice's gateway, not itself, to enforce the allowlist (DNS stays pinned and nothing leaves outside the tunnel)"
            ),
            Err(message) => {
                eprintln!("sessionctl: {message}");
                failed += 1;
            }
        }
    }
    if failed == 0 {
        return Ok(());
    }
    Err(Failure::new(
        exit::USAGE,
        format!("every field is described in {FORMAT_REFERENCE}"),
    ))
}

/// The profile's name, and whether it is of the gateway-enforced kind.
fn check_file(path: &Path) -> Result<(String, bool), String> {
    Profile::load(path)
        .map(|p| (p.name, p.gateway_enforces_allowlist))
        .map_err(|e| e.to_string())
}

fn check_name(socket: &Path, name: &str, profiles_dir: Option<&Path>) -> Result<(String, bool), String> {
    sessiongate_common::profile::check_profile_name(name)?;
    let mut refused_by_daemon = None;
    if profiles_dir.is_none() {
        let request = Request::Check {
            profile: name.to_string(),
        };
        match control::call(socket, &request, Duration::from_secs(10)) {
            Ok(Reply::Ok(result)) => {
                return Ok((
                    result["profile"].as_str().unwrap_or(name).to_string(),
                    result["gateway_enforces_allowlist"] == true,
                ))
            }
            Ok(Reply::Error { message, .. }) => return Err(message),
            // Not ours to ask: the profiles directory is root's too, so
            // this refusal (which names the group and the fix) is the
            // answer unless the profile can be read here after all.
            Err(e @ control::ClientError::PermissionDenied { .. }) => refused_by_daemon = Some(e.to_string()),
            // Not running: read the directory here.
            Err(_) => {}
        }
    }
    let dir = profiles_dir.unwrap_or(Path::new(DEFAULT_PROFILES_DIR));
    let path = sessiongate_common::profile::profile_path(dir, name)?;
    match std::fs::metadata(&path) {
        Ok(_) => check_file(&path),
        Err(e) => Err(match refused_by_daemon {
            // sessiond runs and knows where its profiles are: "there is no
            // profile" could be wrong; its refusal says what to do.
            Some(refusal) => refusal,
            // Nor is it right when the directory is closed to us.
            None if e.kind() == std::io::ErrorKind::PermissionDenied => format!(
                "cannot look into {}: permission denied; profiles belong to root, so check it with sudo",
                dir.display()
            ),
            None => format!(
                "there is no profile {name} in {} (give its file, or the directory with --profiles DIR)",
                dir.display()
            ),
        }),
    }
}

fn import(wg_conf: &Path, name: &str, allow: &[String], dir: &Path) -> Result<(), Failure> {
    let profile_path =
        sessiongate_common::profile::profile_path(dir, name).map_err(|m| Failure::new(exit::USAGE, m))?;
    let allow = allow
        .iter()
        .map(|a| a.parse::<AllowArg>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| Failure::new(exit::USAGE, m))?;
    // Bounded like a profile: a FIFO, a device or a huge file is refused at
    // once instead of hanging or filling memory. The text holds a private
    // key, so it stays in the wiped buffer.
    let (bytes, _) = sessiongate_common::profile::read_bounded(
        wg_conf,
        sessiongate_common::profile::MAX_PROFILE_FILE_BYTES,
        "a wg-quick config",
    )
    .map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Failure::new(exit::USAGE, format!("{} is not UTF-8 text", wg_conf.display())))?;
    let key_rel = format!("keys/{name}.key");
    let psk_rel = format!("keys/{name}.psk");
    let source = wg_conf.display().to_string();
    let imported = sessiongate_common::import::import(&source, text, &key_rel, &psk_rel, &allow)
        .map_err(|m| Failure::new(exit::USAGE, m))?;
    let key_path = dir.join(&key_rel);
    let io = |path: &Path, e: std::io::Error| {
        let reason = sessiongate_common::io_reason(&e);
        Failure::new(exit::FAILED, format!("cannot write {}: {reason}", path.display()))
    };
    let keys_dir = dir.join("keys");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&keys_dir)
        .map_err(|e| io(&keys_dir, e))?;
    write_new(
        &key_path,
        format!("{}\n", imported.private_key.to_base64()).as_bytes(),
    )
    .map_err(|e| io(&key_path, e))?;
    let psk_path = dir.join(&psk_rel);
    if let Some(psk) = &imported.preshared_key {
        if let Err(e) = write_new(&psk_path, format!("{}\n", psk.to_base64()).as_bytes()) {
            let _ = std::fs::remove_file(&key_path);
            return Err(io(&psk_path, e));
        }
    }
    if let Err(e) = write_new(&profile_path, imported.profile.as_bytes()) {
        let _ = std::fs::remove_file(&key_path);
        if imported.preshared_key.is_some() {
            let _ = std::fs::remove_file(&psk_path);
        }
        return Err(io(&profile_path, e));
    }
    // The written pair must pass the same check the daemon applies.
    if let Err(e) = Profile::load(&profile_path) {
        let _ = std::fs::remove_file(&key_path);
        if imported.preshared_key.is_some() {
            let _ = std::fs::remove_file(&psk_path);
        }
        let _ = std::fs::remove_file(&profile_path);
        return Err(Failure::new(exit::USAGE, e.to_string()));
    }
    println!("wrote {} and {}", profile_path.display(), key_path.display());
    // What the profile does differently from the wg-quick file.
    for note in &imported.notes {
        println!("{note}");
    }
    Ok(())
}

/// Creates a file readable by its owner only; never overwrites.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// `keygen`: the private key goes to a new 0600 file and only the public key
/// to standard output, so `sessionctl keygen --out k | mail admin` sends
/// nothing secret. The private key reaches standard output only when asked
/// for by name (`--private-to-stdout`); `--out -` is refused rather than
/// taken as standard output, because `-` reads like "the usual place" and
/// the usual place for this command's output is a mail or a chat.
fn keygen(out: Option<&Path>, private_to_stdout: bool) -> Result<(), Failure> {
    let path = match (out, private_to_stdout) {
        (Some(path), _) if path.as_os_str() == "-" => return Err(Failure::new(
            exit::USAGE,
            "--out - would print the private key; give a file name, or --private-to-stdout if you mean it",
        )),
        (Some(path), _) => Some(path),
        (None, true) => None,
        (None, false) => {
            return Err(Failure::new(
                exit::USAGE,
                "keygen needs --out FILE for the private key (it prints only the public key)",
            ))
        }
    };
    let private = Key::generate_private();
    let public = private.public_key().to_base64();
    match path {
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    let reason = sessiongate_common::io_reason(&e);
                    Failure::new(
                        exit::FAILED,
                        format!("cannot create {}: {reason}", path.display()),
                    )
                })?;
            writeln!(file, "{}", private.to_base64())
                .and_then(|_| file.sync_all())
                .map_err(|e| Failure::new(exit::FAILED, format!("cannot write {}: {e}", path.display())))?;
            println!("{public}");
        }
        None => {
            println!("{}", private.to_base64());
            eprintln!("public key: {public}");
        }
    }
    Ok(())
}

/// `status` for people: the first line says whether the machine is
/// protected and, when it is not, what to do; details follow.
fn describe_status(v: &Value) -> String {
    let state = v["state"].as_str().unwrap_or("unknown");
    let profile = v["profile"].as_str();
    let t = &v["tunnel"];
    let endpoint = t["endpoint"].as_str();
    let problem = v["problem"].as_str().map(|p| p.trim_end_matches('.').to_string());
    let mut lines = Vec::new();
    lines.push(match state {
        "active" => {
            let hosts: Vec<&str> = v["allowed"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["host"].as_str())
                .collect();
            // The gateway-enforced kind: the machine keeps everything in
            // the tunnel, the gateway decides what gets further.
            let by_gateway = v["allowed"]
                .as_array()
                .is_some_and(|a| a.iter().any(|h| h["gateway_enforced"] == true));
            let only = if by_gateway {
                "everything (the gateway, not this machine, enforces the allowlist)".to_string()
            } else if hosts.is_empty() {
                "nothing".to_string()
            } else {
                format!("only {}", and_list(&hosts))
            };
            let via = match endpoint {
                Some(e) => format!("through {e}"),
                None => "through the tunnel".to_string(),
            };
            match t["last_handshake_secs"].as_u64() {
                Some(age) => format!("Protected: {only} {via}, handshake {}.", ago(age)),
                None => format!("Protected: {only} {via}."),
            }
        }
        "degraded" => {
            let problem = problem
                .clone()
                .unwrap_or_else(|| "the tunnel is not working".to_string());
            // The cause says whether it clears by itself; a cause this
            // sessionctl does not know (or none) gets the advice that always
            // works.
            let clears = serde_json::from_value::<Cause>(v["cause"].clone()).is_ok_and(|c| c.clears_by_itself());
            let todo = if clears {
                "wait, it reconnects by itself when the gateway answers, or run `sessionctl stop` to get the normal network back"
            } else {
                "run `sessionctl stop` to get the normal network back, then start again"
            };
            format!("NOT CONNECTED, but still locked down: {problem}. Everything stays blocked; {todo}.")
        }
        "starting" => format!(
            "Not protected yet: starting {}; everything is blocked until the tunnel is up.",
            profile.unwrap_or("a session")
        ),
        "stopping" => format!(
            "Stopping {}: everything is blocked until the normal network is back, in a moment.",
            profile.unwrap_or("the session")
        ),
        "idle" => "Not protected: no session. Start one with: sessionctl start PROFILE".to_string(),
        other => format!("Unknown state {other:?}: this sessionctl may be older than sessiond."),
    });
    if state == "idle" {
        return lines.join("\n");
    }
    if let Some(profile) = profile {
        lines.push(format!("  Profile:  {profile} ({state})"));
    }
    if state != "degraded" {
        if let Some(problem) = &problem {
            lines.push(format!("  Problem:  {problem}"));
        }
    }
    if let Some(pending) = v["pending"].as_str() {
        lines.push(format!("  Pending:  {pending}"));
    }
    if serde_json::from_value::<Cause>(v["cause"].clone()).is_ok_and(|c| c.may_be_a_portal()) {
        lines.push(format!("  Portal?   {}", sessiongate_common::cause::PORTAL_HINT));
    }
    // A network change or wake-up the tunnel got over by itself.
    if let Some(recovered) = v["last_recovery"].as_str() {
        lines.push(format!("  Lately:   {recovered}"));
    }
    if t.is_object() {
        let handshake = match t["last_handshake_secs"].as_u64() {
            Some(age) => format!("handshake {}", ago(age)),
            None => "no handshake yet".to_string(),
        };
        // UDP is WireGuard's own way; TCP (through the relay, where a
        // network blocks UDP) is the one worth a word.
        let over = if t["transport"] == "tcp" { " over TCP" } else { "" };
        lines.push(format!(
            "  Tunnel:   {} to {}{over}, {handshake}, received {}, sent {}",
            t["interface"].as_str().unwrap_or("?"),
            endpoint.unwrap_or("?"),
            bytes(t["rx_bytes"].as_u64().unwrap_or(0)),
            bytes(t["tx_bytes"].as_u64().unwrap_or(0)),
        ));
    }
    if v["allowed"]
        .as_array()
        .is_some_and(|a| a.iter().any(|h| h["gateway_enforced"] == true))
    {
        lines.push(
            "  Enforced: by the practice's gateway, not this machine: this profile is gateway-enforced, so every address goes into the tunnel (DNS stays pinned, nothing leaves outside the tunnel) and the machine trusts the gateway to refuse what the allowlist below does not hold"
                .to_string(),
        );
    }
    for a in v["allowed"].as_array().into_iter().flatten() {
        let ports = |proto: &str| {
            let list: Vec<String> = a[proto]
                .as_array()
                .into_iter()
                .flatten()
                // A port is a number, a range the string "FIRST-LAST".
                .filter_map(|p| {
                    p.as_u64()
                        .map(|n| n.to_string())
                        .or_else(|| p.as_str().map(String::from))
                })
                .collect();
            (!list.is_empty()).then(|| format!("{proto} {}", list.join(",")))
        };
        let ports: Vec<String> = [ports("tcp"), ports("udp")].into_iter().flatten().collect();
        let addrs: Vec<&str> = a["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let addrs = if addrs.is_empty() {
            " (not resolved yet)".to_string()
        } else {
            format!(" = {}", addrs.join(", "))
        };
        lines.push(format!(
            "  Allowed:  {}{addrs} ({})",
            a["host"].as_str().unwrap_or("?"),
            ports.join("; ")
        ));
    }
    lines.join("\n")
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// A handshake age as people say it.
fn ago(secs: u64) -> String {
    match secs {
        0 => "just now".to_string(),
        1..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        _ => format!("{} h ago", secs / 3600),
    }
}

/// `verify` for people: one line per probe, then the verdict.
fn describe_verify(v: &Value) -> String {
    let probes = v["probes"].as_array().cloned().unwrap_or_default();
    let mut lines: Vec<String> = probes
        .iter()
        .map(|p| {
            format!(
                "{:<6}{:<18}{}",
                p["result"].as_str().unwrap_or("?"),
                p["name"].as_str().unwrap_or("?"),
                p["evidence"].as_str().unwrap_or("")
            )
        })
        .collect();
    let failed: Vec<&str> = probes
        .iter()
        .filter(|p| p["result"] != "PASS")
        .map(|p| p["name"].as_str().unwrap_or("?"))
        .collect();
    lines.push(if v["passed"].as_bool() == Some(true) && failed.is_empty() {
        format!("The boundary holds: all {} probes passed.", probes.len())
    } else if failed == [control::probe::ALLOWED_HOST] {
        "Still locked down (nothing else got through), but the allowed host cannot be reached: \
         the call will not connect until the tunnel works (see `sessionctl status`)."
            .to_string()
    } else {
        format!(
            "The boundary did NOT hold in {} of {} probes: do not hold a confidential call on this machine \
             until `sessionctl verify` passes.",
            failed.len(),
            probes.len()
        )
    });
    lines.join("\n")
}

fn describe_profiles(v: &Value) -> String {
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return "no profiles".to_string();
    }
    list.iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap_or("?");
            if p["valid"].as_bool() == Some(true) {
                let hosts: Vec<&str> = p["hosts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                format!("{name}  valid  {}", hosts.join(", "))
            } else {
                format!("{name}  INVALID  {}", p["error"].as_str().unwrap_or(""))
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn bytes(n: u64) -> String {
    match n {
        0..=1023 => format!("{n} B"),
        1024..=1_048_575 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn active() -> Value {
        json!({
            "state": "active", "profile": "lab", "problem": null, "pending": null,
            "tunnel": {"interface": "sgtun0", "endpoint": "198.51.100.2:51820",
                       "last_handshake_secs": 8, "rx_bytes": 2048, "tx_bytes": 300,
                       "peer_reachable": true},
            "allowed": [{"host": "meet.test", "addresses": ["203.0.113.10"], "tcp": [443], "udp": [10000]}]
        })
    }

    #[test]
    fn status_shows_port_ranges_and_who_enforces_a_gateway_enforced_allowlist() {
        let mut ranges = active();
        ranges["allowed"][0]["udp"] = json!([7882, "50000-60000"]);
        assert!(
            describe_status(&ranges)
                .contains("  Allowed:  meet.test = 203.0.113.10 (tcp 443; udp 7882,50000-60000)"),
            "{}",
            describe_status(&ranges)
        );
        assert!(!describe_status(&ranges).contains("gateway"));
        let mut gateway = active();
        gateway["allowed"][0]["gateway_enforced"] = json!(true);
        let text = describe_status(&gateway);
        assert_eq!(
            text.lines().next(),
            Some("Protected: everything (the gateway, not this machine, enforces the allowlist) through 198.51.100.2:51820, handshake 8 s ago.")
        );
        assert!(
            text.contains("  Enforced: by the practice's gateway, not this machine"),
            "{text}"
        );
    }

    #[test]
    fn status_says_first_whether_the_machine_is_protected() {
        let mut recovered = active();
        recovered["last_recovery"] = "after the network changed, the gateway answered".into();
        assert!(describe_status(&recovered).contains("  Lately:   after the network changed"));
        let mut over_tcp = active();
        over_tcp["tunnel"]["transport"] = "tcp".into();
        assert!(
            describe_status(&over_tcp).contains("  Tunnel:   sgtun0 to 198.51.100.2:51820 over TCP, "),
            "{}",
            describe_status(&over_tcp)
        );

        let text = describe_status(&active());
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("Protected: only meet.test through 198.51.100.2:51820, handshake 8 s ago.")
        );
        assert!(
            text.contains(
                "  Tunnel:   sgtun0 to 198.51.100.2:51820, handshake 8 s ago, received 2.0 KiB, sent 300 B"
            ),
            "{text}"
        );
        assert!(
            text.contains("  Allowed:  meet.test = 203.0.113.10 (tcp 443; udp 10000)"),
            "{text}"
        );

        let mut degraded = active();
        degraded["state"] = "degraded".into();
        degraded["problem"] =
            "the peer 198.51.100.2:51820 stopped answering; traffic stays blocked while the tunnel retries"
                .into();
        degraded["cause"] = json!({"reason": "peer_lost"});
        let text = describe_status(&degraded);
        assert!(
            text.starts_with(
                "NOT CONNECTED, but still locked down: the peer 198.51.100.2:51820 stopped answering"
            ),
            "{text}"
        );
        assert!(
            text.lines()
                .next()
                .unwrap_or("")
                .contains("wait, it reconnects by itself"),
            "{text}"
        );
        // The gateway not answering may be a hotel's login page.
        assert!(
            text.contains("  Portal?   if this network has a login page"),
            "{text}"
        );
        degraded["cause"] = json!({"reason": "no_handshake"});
        assert!(describe_status(&degraded).contains("sessionctl portal --during-session"));
        degraded["cause"] = json!({"reason": "resumed_from_sleep"});
        assert!(!describe_status(&degraded).contains("Portal?"));
        // The advice follows the cause, not the wording of the problem.
        degraded["problem"] = "cannot resume: gone".into();
        degraded["cause"] = json!({"reason": "cannot_resume"});
        let text = describe_status(&degraded);
        assert!(text
            .lines()
            .next()
            .unwrap_or("")
            .contains("run `sessionctl stop` to get the normal network back"));
        degraded["problem"] = "resuming after a restart, not `sessionctl stop`".into();
        degraded["cause"] = json!({"reason": "resuming"});
        assert!(describe_status(&degraded).contains("wait, it reconnects by itself"));
        degraded["cause"] = json!({"reason": "a_cause_from_a_newer_sessiond"});
        assert!(describe_status(&degraded).contains("run `sessionctl stop` to get the normal network back"));

        let idle = json!({"state": "idle", "profile": null, "tunnel": null, "allowed": [], "problem": null});
        assert_eq!(
            describe_status(&idle),
            "Not protected: no session. Start one with: sessionctl start PROFILE"
        );
        let mut starting = active();
        starting["state"] = "starting".into();
        assert!(describe_status(&starting).starts_with("Not protected yet: starting lab"));
    }

    #[test]
    fn every_argument_has_help_text() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{} {}", sub.get_name(), arg.get_id()));
                }
            }
        }
        for arg in cli.get_arguments() {
            if arg.get_help().is_none() {
                missing.push(arg.get_id().to_string());
            }
        }
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn host_lists_and_ages_read_naturally() {
        assert_eq!(and_list(&["a"]), "a");
        assert_eq!(and_list(&["a", "b", "c"]), "a, b and c");
        assert_eq!(ago(0), "just now");
        assert_eq!(ago(185), "3 min ago");
    }

    #[test]
    fn verify_prints_one_line_per_probe_and_a_verdict() {
        let report = json!({"passed": false, "probes": [
            {"name": "allowed host", "result": "FAIL", "evidence": "no answer"},
            {"name": "outside host", "result": "PASS", "evidence": "refused"}]});
        let text = describe_verify(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "FAIL  allowed host      no answer");
        assert_eq!(lines[1], "PASS  outside host      refused");
        assert!(lines[2].starts_with("Still locked down"), "{text}");
    }
}
