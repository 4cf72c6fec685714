//! `sessionctl`: the command-line client for sessiond.
//!
//! It turns a command into one request on the control socket and the reply
//! into text for a person (or JSON with `--json`) and an exit code (SPEC §2).
//! It changes nothing on the machine itself, except `keygen`'s key file.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;
use sessiond::control::{self, exit, Reply, Request};
use sessiond::import::AllowArg;
use sessiond::keys::Key;
use sessiond::profile::Profile;

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
    Start { profile: String },
    /// End the session; returns once normal networking is back.
    Stop,
    /// Show the session's state, tunnel and allowed hosts.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List every profile the daemon sees, valid or not.
    Profiles {
        #[arg(long)]
        json: bool,
    },
    /// Validate a profile file (or a profile by name) without touching the system.
    Check {
        #[arg(value_name = "FILE_OR_PROFILE")]
        target: String,
    },
    /// Prove the boundary holds with active probes (not built yet).
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Turn a wg-quick config into a profile and a 0600 key file.
    Import {
        wg_conf: PathBuf,
        /// The new profile's name.
        #[arg(long)]
        name: String,
        /// A host to allow, e.g. meet.practice.example:443/tcp (repeat it).
        #[arg(long = "allow", value_name = "HOST:PORT/PROTO", required = true)]
        allow: Vec<String>,
        /// Where to write NAME.toml and keys/NAME.key.
        #[arg(long, default_value = "/etc/sessiongate/profiles")]
        dir: PathBuf,
    },
    /// Make a WireGuard private key file (mode 0600) and print its public key.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

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
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("sessionctl: {}", f.message);
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
        Command::Status { json } => {
            let result = ask(socket, &Request::Status, Duration::from_secs(10))?;
            print_json_or(json, &result, describe_status);
            Ok(())
        }
        Command::Profiles { json } => {
            let result = ask(socket, &Request::Profiles, Duration::from_secs(10))?;
            print_json_or(json, &result, describe_profiles);
            Ok(())
        }
        Command::Check { target } => check(socket, &target),
        Command::Verify { .. } => Err(Failure::new(exit::FAILED, "verify is not built yet")),
        Command::Import {
            wg_conf,
            name,
            allow,
            dir,
        } => import(&wg_conf, &name, &allow, &dir),
        Command::Keygen { out } => keygen(out.as_deref()),
    }
}

fn ask(socket: &Path, request: &Request, timeout: Duration) -> Result<Value, Failure> {
    match control::call(socket, request, timeout) {
        Ok(Reply::Ok(value)) => Ok(value),
        Ok(Reply::Error { kind, message }) => Err(Failure::new(kind.exit_code(), message)),
        Err(e) => Err(Failure::new(e.exit_code(), e.to_string())),
    }
}

fn print_json_or(json: bool, value: &Value, human: fn(&Value) -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", human(value));
    }
}

/// A file is checked here; a bare name is checked by the daemon, which
/// knows its profiles directory.
fn check(socket: &Path, target: &str) -> Result<(), Failure> {
    let path = Path::new(target);
    if target.contains('/') || target.ends_with(".toml") || path.is_file() {
        return match Profile::load(path) {
            Ok(p) => {
                println!("profile {} is valid", p.name);
                Ok(())
            }
            Err(e) => Err(Failure::new(exit::USAGE, e.to_string())),
        };
    }
    let result = ask(
        socket,
        &Request::Check {
            profile: target.to_string(),
        },
        Duration::from_secs(10),
    )?;
    println!(
        "profile {} is valid",
        result["profile"].as_str().unwrap_or(target)
    );
    Ok(())
}

fn import(wg_conf: &Path, name: &str, allow: &[String], dir: &Path) -> Result<(), Failure> {
    sessiond::profile::check_profile_name(name).map_err(|m| Failure::new(exit::USAGE, m))?;
    let allow = allow
        .iter()
        .map(|a| a.parse::<AllowArg>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| Failure::new(exit::USAGE, m))?;
    let text = std::fs::read_to_string(wg_conf).map_err(|e| {
        let reason = sessiond::profile::io_reason(&e);
        Failure::new(
            exit::USAGE,
            format!("cannot read {}: {reason}", wg_conf.display()),
        )
    })?;
    let key_rel = format!("keys/{name}.key");
    let source = wg_conf.display().to_string();
    let imported = sessiond::import::import(&source, &text, &key_rel, &allow)
        .map_err(|m| Failure::new(exit::USAGE, m))?;
    let profile_path = dir.join(format!("{name}.toml"));
    let key_path = dir.join(&key_rel);
    let io = |path: &Path, e: std::io::Error| {
        let reason = sessiond::profile::io_reason(&e);
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
    if let Err(e) = write_new(&profile_path, imported.profile.as_bytes()) {
        let _ = std::fs::remove_file(&key_path);
        return Err(io(&profile_path, e));
    }
    // The written pair must pass the same check the daemon applies.
    if let Err(e) = Profile::load(&profile_path) {
        let _ = std::fs::remove_file(&key_path);
        let _ = std::fs::remove_file(&profile_path);
        return Err(Failure::new(exit::USAGE, e.to_string()));
    }
    println!("wrote {} and {}", profile_path.display(), key_path.display());
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

fn keygen(out: Option<&Path>) -> Result<(), Failure> {
    let private = Key::generate_private();
    let public = private.public_key().to_base64();
    match out {
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    let reason = sessiond::profile::io_reason(&e);
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

fn describe_status(v: &Value) -> String {
    let state = v["state"].as_str().unwrap_or("unknown");
    let mut lines = Vec::new();
    match v["profile"].as_str() {
        Some(profile) => lines.push(format!("State: {state} (profile {profile})")),
        None => lines.push(format!("State: {state}")),
    }
    if let Some(problem) = v["problem"].as_str() {
        lines.push(format!("Problem: {problem}"));
    }
    let t = &v["tunnel"];
    if t.is_object() {
        let handshake = match t["last_handshake_secs"].as_u64() {
            Some(age) => format!("handshake {age} s ago"),
            None => "no handshake yet".to_string(),
        };
        lines.push(format!(
            "Tunnel: {} to {}, {handshake}, received {}, sent {}",
            t["interface"].as_str().unwrap_or("?"),
            t["endpoint"].as_str().unwrap_or("?"),
            bytes(t["rx_bytes"].as_u64().unwrap_or(0)),
            bytes(t["tx_bytes"].as_u64().unwrap_or(0)),
        ));
    }
    for a in v["allowed"].as_array().into_iter().flatten() {
        let ports = |proto: &str| {
            let list: Vec<String> = a[proto]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .map(|p| p.to_string())
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
            String::new()
        } else {
            format!(" = {}", addrs.join(", "))
        };
        lines.push(format!(
            "Allowed: {}{addrs} ({})",
            a["host"].as_str().unwrap_or("?"),
            ports.join("; ")
        ));
    }
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
