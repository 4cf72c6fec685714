//! sessiond in the lab: writes profiles into the lab's profiles
//! dir with a client key registered at the gateway, runs `sessiond` in the
//! client namespace and `sessionctl` against its socket. Owns the profiles
//! dir, the daemon's socket/state paths and its processes.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::lab::{addr, lock, write_file_mode, Lab, LabChild, Ns};
use crate::util::{self, wait_until};

/// How long `start_sessiond`/`restart` wait for the control socket.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Extra sessiond arguments for every run, whitespace-separated (for
/// scripts/mutants, which needs `--nft-binary`).
pub const EXTRA_ARGS_ENV: &str = "LAB_SESSIOND_EXTRA_ARGS";

/// The control group sessiond is given unless a test names another; the lab
/// does not create it (so only root may use the socket).
const DEFAULT_CONTROL_GROUP: &str = "sessiongate";

/// The profile's interface name inside the client namespace.
pub const DAEMON_TUN_IF: &str = "sgtun0";

/// The bundled lab profile; its gateway key is a placeholder.
const LAB_PROFILE: &str = include_str!("../../profiles/lab.toml");
const LAB_GATEWAY_KEY_PLACEHOLDER: &str = "@LAB_GATEWAY_PUBLIC_KEY@";

/// Files of one written profile.
#[derive(Debug, Clone)]
pub struct ProfileFiles {
    /// Profile name (file stem).
    pub name: String,
    /// The profiles directory (give it to `sessiond --profiles`).
    pub dir: PathBuf,
    /// The TOML file; overwrite it to change the profile.
    pub path: PathBuf,
    /// `keys/client.key` (mode 0600).
    pub key_file: PathBuf,
    /// Public key of `key_file`, registered at the gateway.
    pub public_key: String,
    /// The TOML text written.
    pub toml: String,
}

fn mkdir_0700(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("creating {}", path.display()))
}

impl Lab {
    /// The profiles directory (mode 0700, owned by root), created on demand.
    pub fn profiles_dir(&self) -> Result<PathBuf> {
        let dir = self.tmp_dir().join("profiles");
        mkdir_0700(&dir)?;
        mkdir_0700(&dir.join("keys"))?;
        Ok(dir)
    }

    /// The client key (`keys/client.key`, made on first use and added as a
    /// gateway peer with 192.0.2.66/32 and 2001:db8:66::2/128); returns
    /// (path, public key).
    pub fn client_key(&self) -> Result<(PathBuf, String)> {
        let mut slot = lock(&self.client_key);
        if let Some(k) = slot.as_ref() {
            return Ok(k.clone());
        }
        let path = self.profiles_dir()?.join("keys").join("client.key");
        let public = crate::gateway::write_new_key(&path)?;
        self.add_gateway_peer(
            &public,
            &[
                &format!("{}/32", addr::DAEMON_TUN_V4),
                &format!("{}/128", addr::DAEMON_TUN_V6),
            ],
        )?;
        *slot = Some((path.clone(), public.clone()));
        Ok((path, public))
    }

    /// The lab's standard profile: the bundled `profiles/lab.toml` with this
    /// lab's gateway key filled in (tunnel to the gateway with the client
    /// key, DNS pinned to 192.0.2.65, allow meet.test tcp 443 and udp 10000).
    pub fn default_profile_toml(&self) -> String {
        LAB_PROFILE.replace(LAB_GATEWAY_KEY_PLACEHOLDER, self.gateway_public_key())
    }

    /// Writes `lab.toml` with the standard profile (see `default_profile_toml`).
    pub fn sessiond_profile(&self) -> Result<ProfileFiles> {
        self.write_profile("lab", |t| t)
    }

    /// Writes `<name>.toml` (mode 0600): the standard profile text passed
    /// through `edit`. Makes the client key first if needed.
    pub fn write_profile(&self, name: &str, edit: impl FnOnce(String) -> String) -> Result<ProfileFiles> {
        let (key_file, public_key) = self.client_key()?;
        let dir = self.profiles_dir()?;
        let toml = edit(self.default_profile_toml());
        let path = dir.join(format!("{name}.toml"));
        write_file_mode(&path, &toml, 0o600)?;
        Ok(ProfileFiles {
            name: name.to_string(),
            dir,
            path,
            key_file,
            public_key,
            toml,
        })
    }

    /// Starts sessiond in the client namespace with the lab's profiles dir,
    /// a private socket and state dir, and the client's resolv.conf; waits
    /// until its control socket accepts connections.
    pub fn start_sessiond(&self) -> Result<Daemon<'_>> {
        self.start_sessiond_with(&[])
    }

    /// `start_sessiond` with extra command-line arguments appended.
    pub fn start_sessiond_with(&self, extra: &[&str]) -> Result<Daemon<'_>> {
        let sessiond = util::find_binary("sessiond")?;
        let sessionctl = util::find_binary("sessionctl")?;
        self.start_sessiond_binaries(&sessiond, &sessionctl, extra)
    }

    /// `start_sessiond` with `--control-group GROUP` instead of the default
    /// `sessiongate` (which the lab does not create).
    pub fn start_sessiond_for_group(&self, group: &str) -> Result<Daemon<'_>> {
        let sessiond = util::find_binary("sessiond")?;
        let sessionctl = util::find_binary("sessionctl")?;
        self.start_daemon(&sessiond, &sessionctl, &[], group)
    }

    /// `start_sessiond_with` using the given binaries instead of the
    /// workspace's (for testing the harness with a stand-in).
    pub fn start_sessiond_binaries(
        &self,
        sessiond: &Path,
        sessionctl: &Path,
        extra: &[&str],
    ) -> Result<Daemon<'_>> {
        self.start_daemon(sessiond, sessionctl, extra, DEFAULT_CONTROL_GROUP)
    }

    /// The second client's profiles dir (`Ns::SecondClient`), with its own
    /// client key (made on first use and added as a gateway peer with
    /// 192.0.2.67/32 and 2001:db8:66::3/128).
    pub fn second_profiles_dir(&self) -> Result<(PathBuf, String)> {
        let dir = self.tmp_dir().join("profiles-d");
        mkdir_0700(&dir.join("keys"))?;
        let key = dir.join("keys").join("client.key");
        let public_file = dir.join("client.pub");
        if let Ok(public) = std::fs::read_to_string(&public_file) {
            return Ok((dir, public.trim().to_string()));
        }
        let public = crate::gateway::write_new_key(&key)?;
        self.add_gateway_peer(
            &public,
            &[
                &format!("{}/32", addr::SECOND_DAEMON_TUN_V4),
                &format!("{}/128", addr::SECOND_DAEMON_TUN_V6),
            ],
        )?;
        std::fs::write(&public_file, &public)
            .with_context(|| format!("writing {}", public_file.display()))?;
        Ok((dir, public))
    }

    /// `write_profile` for the second client: the same text with its tunnel
    /// addresses, in its own profiles dir with its own key.
    pub fn write_second_profile(
        &self,
        name: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Result<ProfileFiles> {
        let (dir, public_key) = self.second_profiles_dir()?;
        let first = format!("\"{}/32\", \"{}/128\"", addr::DAEMON_TUN_V4, addr::DAEMON_TUN_V6);
        let second = format!(
            "\"{}/32\", \"{}/128\"",
            addr::SECOND_DAEMON_TUN_V4,
            addr::SECOND_DAEMON_TUN_V6
        );
        let toml = edit(self.default_profile_toml()).replace(&first, &second);
        let path = dir.join(format!("{name}.toml"));
        write_file_mode(&path, &toml, 0o600)?;
        Ok(ProfileFiles {
            name: name.to_string(),
            key_file: dir.join("keys").join("client.key"),
            dir,
            path,
            public_key,
            toml,
        })
    }

    /// Starts sessiond in the second client namespace with the second
    /// profiles dir and its own socket and state dir (see `start_sessiond`).
    pub fn start_second_sessiond(&self) -> Result<Daemon<'_>> {
        let sessiond = util::find_binary("sessiond")?;
        let sessionctl = util::find_binary("sessionctl")?;
        let (profiles, _) = self.second_profiles_dir()?;
        let state_dir = self.tmp_dir().join("state-d");
        mkdir_0700(&state_dir)?;
        let mut daemon = Daemon {
            lab: self,
            ns: Ns::SecondClient,
            sessiond,
            sessionctl,
            socket: self.tmp_dir().join("sessiond-d.sock"),
            state_dir,
            profiles,
            extra: Vec::new(),
            control_group: DEFAULT_CONTROL_GROUP.to_string(),
            env: Vec::new(),
            runs: Vec::new(),
        };
        daemon.launch()?;
        Ok(daemon)
    }

    fn start_daemon(
        &self,
        sessiond: &Path,
        sessionctl: &Path,
        extra: &[&str],
        control_group: &str,
    ) -> Result<Daemon<'_>> {
        let (sessiond, sessionctl) = (sessiond.to_path_buf(), sessionctl.to_path_buf());
        let profiles = self.profiles_dir()?;
        let state_dir = self.tmp_dir().join("state");
        mkdir_0700(&state_dir)?;
        let mut daemon = Daemon {
            lab: self,
            ns: Ns::Client,
            sessiond,
            sessionctl,
            socket: self.tmp_dir().join("sessiond.sock"),
            state_dir,
            profiles,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            control_group: control_group.to_string(),
            env: Vec::new(),
            runs: Vec::new(),
        };
        daemon.launch()?;
        Ok(daemon)
    }
}

/// A running (or killed) sessiond in the client namespace (or the second
/// client's).
pub struct Daemon<'a> {
    lab: &'a Lab,
    ns: Ns,
    sessiond: PathBuf,
    sessionctl: PathBuf,
    socket: PathBuf,
    state_dir: PathBuf,
    profiles: PathBuf,
    extra: Vec<String>,
    control_group: String,
    env: Vec<(String, String)>,
    runs: Vec<LabChild>,
}

impl Daemon<'_> {
    fn launch(&mut self) -> Result<()> {
        let sessiond = self.sessiond.to_string_lossy().into_owned();
        let profiles = self.profiles.to_string_lossy().into_owned();
        let socket = self.socket.to_string_lossy().into_owned();
        let state = self.state_dir.to_string_lossy().into_owned();
        let mut args: Vec<&str> = vec![
            &sessiond,
            "--profiles",
            &profiles,
            "--socket",
            &socket,
            "--state-dir",
            &state,
            "--resolv-conf",
            "/etc/resolv.conf",
            "--control-group",
            &self.control_group,
        ];
        args.extend(self.extra.iter().map(String::as_str));
        // scripts/mutants runs every sessiond with `--nft-binary` this way.
        let from_env = std::env::var(EXTRA_ARGS_ENV).unwrap_or_default();
        for arg in from_env.split_whitespace() {
            if !args.contains(&arg) {
                args.push(arg);
            }
        }
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let child = self.lab.spawn_env(self.ns, "sessiond", &args, &env)?;
        self.runs.push(child.clone());
        let mut exited = false;
        wait_until(DAEMON_START_TIMEOUT, "sessiond's control socket", || {
            if !child.is_running() {
                exited = true;
                return true;
            }
            UnixStream::connect(&self.socket).is_ok()
        })
        .with_context(|| format!("sessiond log:\n{}", self.log()))?;
        if exited {
            bail!(
                "sessiond exited ({}) before opening its socket; log:\n{}",
                child.exit_status().map(|s| s.to_string()).unwrap_or_default(),
                self.log()
            );
        }
        Ok(())
    }

    fn current(&self) -> Result<&LabChild> {
        self.runs.last().context("sessiond was never started")
    }

    /// Sets an environment variable for the next `restart` (and every one
    /// after it), e.g. `NOTIFY_SOCKET`.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// The control socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The state dir (kept across `kill9`/`restart`).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The profiles dir given to sessiond.
    pub fn profiles_dir(&self) -> &Path {
        &self.profiles
    }

    /// Pid of the current sessiond process.
    pub fn pid(&self) -> Option<u32> {
        self.runs.last().map(LabChild::pid)
    }

    pub fn is_running(&self) -> bool {
        self.runs.last().is_some_and(LabChild::is_running)
    }

    /// stdout+stderr of every run so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        for (i, r) in self.runs.iter().enumerate() {
            if self.runs.len() > 1 {
                text.push_str(&format!("--- sessiond run {} (pid {}) ---\n", i + 1, r.pid()));
            }
            text.push_str(&r.log());
        }
        text
    }

    /// Runs `sessionctl --socket SOCKET args...` in the client namespace.
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        let ctl = self.sessionctl.to_string_lossy().into_owned();
        let socket = self.socket.to_string_lossy().into_owned();
        let mut full: Vec<&str> = vec![&ctl, "--socket", &socket];
        full.extend_from_slice(args);
        self.lab.exec(self.ns, &full)
    }

    /// Runs `sessionctl --socket SOCKET args...` in the client namespace as
    /// another user (`setpriv`: that user's uid, primary group and
    /// supplementary groups from /etc/group).
    pub fn ctl_as(&self, user: &str, args: &[&str]) -> Result<Output> {
        let ctl = self.sessionctl.to_string_lossy().into_owned();
        let socket = self.socket.to_string_lossy().into_owned();
        let mut full: Vec<&str> = vec![
            "setpriv",
            "--reuid",
            user,
            "--regid",
            user,
            "--init-groups",
            "--reset-env",
            &ctl,
            "--socket",
            &socket,
        ];
        full.extend_from_slice(args);
        self.lab.exec(self.ns, &full)
    }

    /// `ctl` that must exit 0; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl(args)?;
        if !out.status.success() {
            bail!(
                "sessionctl {} failed ({}): {}{}\nsessiond log:\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim(),
                self.log()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `sessionctl status --json`, parsed.
    pub fn status(&self) -> Result<Value> {
        let out = self.ctl_ok(&["status", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("status --json printed: {out}"))
    }

    /// SIGKILL (a crash): the firewall and state stay behind.
    pub fn kill9(&mut self) -> Result<()> {
        self.current()?.kill()
    }

    /// SIGTERM and wait for it to exit (SIGKILL after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = self.current()?.clone();
        child.signal(Signal::SIGTERM)?;
        match child.wait_exit(timeout) {
            Ok(status) => Ok(status),
            Err(e) => {
                child.kill()?;
                Err(e.context("sessiond ignored SIGTERM; killed it"))
            }
        }
    }

    /// Starts sessiond again with the same arguments (terminating a running
    /// one first) and waits for its socket.
    pub fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            self.terminate(Duration::from_secs(10))?;
        }
        self.launch()
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        for r in &self.runs {
            let _ = r.kill();
        }
    }
}
