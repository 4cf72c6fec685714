//! A real systemd for the lab: a minimal Debian root booted with
//! `systemd-nspawn --boot` inside the lab's client namespace, so sessiond
//! runs under its shipped unit, sandbox and boot order, while the router,
//! gateway, video host and leak meter stay the lab's.
//!
//! This module owns the cached root (built once with `mmdebstrap` under
//! [`CACHE_DIR`], keyed by a hash of its package list), the per-test copy of
//! it (an overlay mount over the cached root, so a test never changes the
//! cache) and the nspawn process. It must never boot a container outside a
//! lab namespace (the container would share the host's network), and it
//! removes the nspawn process, the overlay mount and the copy when dropped,
//! also after a failed test.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::lab::{Lab, Ns};
use crate::util::{self, wait_until};

/// Where cached container roots live (one directory per package list).
pub const CACHE_DIR: &str = "/var/cache/sessiongate-lab";

/// Debian release of the container root.
const SUITE: &str = "bookworm";

/// What the root holds besides Debian's minimal base: systemd as PID 1 and
/// what sessiond needs at run time (libnftables, nft, iproute2), adduser and
/// passwd for a test user, and procps for looking around.
pub const ROOT_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "libnftables1",
    "nftables",
    "iproute2",
    "procps",
    "passwd",
    "adduser",
];

/// How long a boot may take until `systemctl is-system-running` settles.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long building the cached root may take.
const ROOT_BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// The cached root for [`ROOT_PACKAGES`], built on first use. Concurrent
/// tests (and test binaries) wait for one build under a file lock.
pub fn cached_root() -> Result<PathBuf> {
    let key = root_key();
    let root = Path::new(CACHE_DIR).join(format!("{SUITE}-{key}"));
    let ready = root.join(".sessiongate-lab-ready");
    if ready.exists() {
        return Ok(root);
    }
    std::fs::create_dir_all(CACHE_DIR).with_context(|| format!("creating {CACHE_DIR}"))?;
    let lock_path = Path::new(CACHE_DIR).join(".lock");
    let lock_file = File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", lock_path.display()))?;
    if ready.exists() {
        return Ok(root);
    }
    for tool in ["mmdebstrap", "systemd-nspawn"] {
        if util::output(&["sh", "-c", &format!("command -v {tool}")])
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("{tool} is missing: install the Debian packages mmdebstrap and systemd-container (.ci/run does)");
        }
    }
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .with_context(|| format!("removing a half-built {}", root.display()))?;
    }
    let include = format!("--include={}", ROOT_PACKAGES.join(","));
    let target = root.to_string_lossy().into_owned();
    let args = [
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        include.as_str(),
        SUITE,
        target.as_str(),
    ];
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run mmdebstrap")?;
    let mut finished = None;
    let waited = wait_until(
        ROOT_BUILD_TIMEOUT,
        "mmdebstrap to build the container root",
        || {
            finished = child.try_wait().ok().flatten();
            finished.is_some()
        },
    );
    if waited.is_err() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().context("waiting for mmdebstrap")?;
    waited?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&root);
        bail!(
            "mmdebstrap could not build the container root ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    File::create(&ready).with_context(|| format!("creating {}", ready.display()))?;
    Ok(root)
}

/// A short hash of the suite and package list: a changed list gets a new root.
fn root_key() -> String {
    // FNV-1a: stable across Rust versions (the std hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in SUITE.bytes().chain(ROOT_PACKAGES.join(",").bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

/// One booted (or bootable) container in the lab's client namespace.
pub struct Container<'a> {
    lab: &'a Lab,
    /// Per-test overlay: `upper`, `work`, and the merged tree `root`.
    dir: PathBuf,
    root: PathBuf,
    mounted: bool,
    nspawn: Option<Child>,
    pid1: Option<u32>,
    boots: u32,
}

impl<'a> Container<'a> {
    /// A fresh copy of the cached root (an overlay over it), not booted yet.
    pub fn new(lab: &'a Lab) -> Result<Container<'a>> {
        let base = cached_root()?;
        let dir = lab.tmp_dir().join("container");
        let root = dir.join("root");
        for d in ["upper", "work", "root"] {
            std::fs::create_dir_all(dir.join(d))
                .with_context(|| format!("creating {}/{d}", dir.display()))?;
        }
        let mut container = Container {
            lab,
            dir: dir.clone(),
            root: root.clone(),
            mounted: false,
            nspawn: None,
            pid1: None,
            boots: 0,
        };
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            base.display(),
            dir.join("upper").display(),
            dir.join("work").display()
        );
        let root_s = root.to_string_lossy().into_owned();
        util::run(&["mount", "-t", "overlay", "overlay", "-o", &options, &root_s])?;
        container.mounted = true;
        Ok(container)
    }

    /// The container's root directory as seen from the host (write files
    /// into it before booting).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path` (absolute, inside the container) as seen from the host.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// Copies a host file into the container with `mode` (root-owned).
    pub fn install(&self, from: &Path, inside: &str, mode: u32) -> Result<()> {
        let to = self.path(inside);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::copy(from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", to.display()))?;
        Ok(())
    }

    /// Writes a file inside the container with `mode` (root-owned).
    pub fn write(&self, inside: &str, text: &str, mode: u32) -> Result<()> {
        let to = self.path(inside);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut f = File::create(&to).with_context(|| format!("creating {}", to.display()))?;
        f.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", to.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", to.display()))?;
        Ok(())
    }

    /// Installs sessiond, sessionctl and the portal helper from this build,
    /// the units, the early lockdown's nft file, the sysusers and tmpfiles snippets from
    /// `systemd/`, enables the units the way `systemctl enable` would, and copies `labhost` (for probes that
    /// use the container's own resolver file).
    pub fn install_sessiongate(&self) -> Result<()> {
        let systemd = util::workspace_root().join("systemd");
        self.install(&util::find_binary("sessiond")?, "/usr/sbin/sessiond", 0o755)?;
        self.install(&util::find_binary("sessionctl")?, "/usr/bin/sessionctl", 0o755)?;
        self.install(&util::find_binary("labhost")?, "/usr/local/bin/labhost", 0o755)?;
        self.install(
            &systemd.join("sessiond.service"),
            "/usr/lib/systemd/system/sessiond.service",
            0o644,
        )?;
        self.install(
            &systemd.join("sessiongate.sysusers"),
            "/usr/lib/sysusers.d/sessiongate.conf",
            0o644,
        )?;
        self.install(
            &systemd.join("sessiongate.tmpfiles"),
            "/usr/lib/tmpfiles.d/sessiongate.conf",
            0o644,
        )?;
        self.install(
            &systemd.join("sessiongate-early-lockdown.service"),
            "/usr/lib/systemd/system/sessiongate-early-lockdown.service",
            0o644,
        )?;
        self.install(
            &systemd.join("early-lockdown.nft"),
            "/usr/lib/sessiongate/early-lockdown.nft",
            0o644,
        )?;
        self.install_portal_helper()?;
        self.enable("sessiongate-early-lockdown.service", "sysinit.target")?;
        self.enable("sessiond.service", "multi-user.target")
    }

    /// The captive-portal helper: its binary, its socket unit (enabled)
    /// and its per-connection service unit.
    pub fn install_portal_helper(&self) -> Result<()> {
        let systemd = util::workspace_root().join("systemd");
        self.install(
            &util::find_binary("sessiongate-portal")?,
            "/usr/lib/sessiongate/sessiongate-portal",
            0o755,
        )?;
        for unit in ["sessiongate-portal.socket", "sessiongate-portal@.service"] {
            self.install(
                &systemd.join(unit),
                &format!("/usr/lib/systemd/system/{unit}"),
                0o644,
            )?;
        }
        self.enable("sessiongate-portal.socket", "sockets.target")
    }

    /// `systemctl enable` done from outside: the `WantedBy=` symlink.
    pub fn enable(&self, unit: &str, wanted_by: &str) -> Result<()> {
        let wants = self.path(&format!("/etc/systemd/system/{wanted_by}.wants"));
        std::fs::create_dir_all(&wants).with_context(|| format!("creating {}", wants.display()))?;
        let link = wants.join(unit);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/usr/lib/systemd/system/{unit}"), &link)
            .with_context(|| format!("linking {}", link.display()))
    }

    /// Copies the lab's profile `name` and its key file into
    /// `/etc/sessiongate/profiles` (mode 0600, directories 0700).
    pub fn install_profile(&self, files: &crate::ProfileFiles) -> Result<()> {
        for dir in ["/etc/sessiongate/profiles", "/etc/sessiongate/profiles/keys"] {
            std::fs::create_dir_all(self.path(dir)).with_context(|| format!("creating {dir}"))?;
            std::fs::set_permissions(self.path(dir), std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("chmod {dir}"))?;
        }
        self.write(
            &format!("/etc/sessiongate/profiles/{}.toml", files.name),
            &files.toml,
            0o600,
        )?;
        self.install(
            &files.key_file,
            "/etc/sessiongate/profiles/keys/client.key",
            0o600,
        )
    }

    /// Boots the container (`systemd-nspawn --boot`) in the lab's client
    /// namespace and waits until systemd says the boot has finished.
    pub fn boot(&mut self) -> Result<()> {
        if self.nspawn.is_some() {
            bail!("the container is already running");
        }
        let netns = format!("/run/netns/{}", self.lab.ns_name(Ns::Client));
        if !Path::new(&netns).exists() {
            bail!("the lab's client namespace {netns} is missing; the container never boots outside the lab");
        }
        self.boots += 1;
        let log_path = self.dir.join(format!("nspawn.{}.log", self.boots));
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let log2 = log.try_clone().context("duplicating the nspawn log")?;
        let root = self.root.to_string_lossy().into_owned();
        let machine = self.machine();
        let child = Command::new("systemd-nspawn")
            .args([
                "--quiet",
                "--directory",
                &root,
                "--machine",
                &machine,
                // The host has no systemd as PID 1 to register with.
                "--register=no",
                "--keep-unit",
                "--boot",
                &format!("--network-namespace-path={netns}"),
                // nspawn keeps CAP_NET_ADMIN only for a private network it
                // made itself; a real machine's root has it.
                "--capability=CAP_NET_ADMIN",
                "--bind=/dev/net/tun",
                "--resolv-conf=off",
                "--timezone=off",
                "--link-journal=no",
            ])
            // A real machine's /proc/sys/net is writable (nspawn makes it
            // read-only unless it made the network namespace itself).
            .env("SYSTEMD_NSPAWN_API_VFS_WRITABLE", "network")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .context("cannot run systemd-nspawn (Debian package systemd-container)")?;
        let nspawn_pid = child.id();
        self.nspawn = Some(child);
        // nspawn forks a short-lived helper before the container's init,
        // so wait for a child that runs systemd.
        let mut pid1 = None;
        wait_until(BOOT_TIMEOUT, "the container's PID 1", || {
            pid1 = child_of(nspawn_pid).filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "systemd")
            });
            pid1.is_some() || !self.nspawn_running()
        })?;
        self.pid1 = pid1;
        if self.pid1.is_none() {
            bail!(
                "systemd-nspawn exited before booting: {}",
                util::read_text(&log_path).trim()
            );
        }
        let mut state = String::new();
        wait_until(BOOT_TIMEOUT, "the container's boot to finish", || {
            state = self
                .exec(&["systemctl", "is-system-running"])
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            matches!(state.as_str(), "running" | "degraded") || !self.nspawn_running()
        })
        .with_context(|| format!("boot log:\n{}", self.console_log()))?;
        if !self.nspawn_running() {
            bail!("the container stopped while booting:\n{}", self.console_log());
        }
        Ok(())
    }

    /// The machine name nspawn gets (also the container's hostname).
    fn machine(&self) -> String {
        format!("sglab-{}", self.lab.id())
    }

    fn nspawn_running(&mut self) -> bool {
        match self.nspawn.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// What the container printed on its console (all boots).
    pub fn console_log(&self) -> String {
        (1..=self.boots)
            .map(|n| util::read_text(&self.dir.join(format!("nspawn.{n}.log"))))
            .collect::<Vec<_>>()
            .join("\n--- next boot ---\n")
    }

    /// Runs a command inside the booted container (all its namespaces) and
    /// returns its output, whatever the exit status.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let pid1 = self.pid1.context("the container is not running")?.to_string();
        let mut full = vec!["nsenter", "-t", pid1.as_str(), "-m", "-u", "-i", "-p", "-n", "--"];
        full.extend_from_slice(args);
        util::output(&full)
    }

    /// `exec` that must succeed; returns stdout.
    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.exec(args)?;
        util::check(args, out)
    }

    /// `exec` as `user` with the groups the group database gives them now,
    /// the way a fresh login gets them (`runuser`).
    pub fn exec_as(&self, user: &str, args: &[&str]) -> Result<Output> {
        let mut full = vec!["runuser", "-u", user, "--"];
        full.extend_from_slice(args);
        self.exec(&full)
    }

    /// `journalctl -u UNIT` of the current boot.
    pub fn journal(&self, unit: &str) -> String {
        self.exec(&[
            "journalctl",
            "--no-pager",
            "--boot=0",
            "-o",
            "short-monotonic",
            "-u",
            unit,
        ])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("journalctl failed: {e:#}"))
    }

    /// One property of a unit (`systemctl show -P`).
    pub fn unit_property(&self, unit: &str, property: &str) -> Result<String> {
        Ok(self
            .exec_ok(&["systemctl", "show", "-P", property, unit])?
            .trim()
            .to_string())
    }

    /// `systemctl poweroff` and wait until nspawn has exited.
    pub fn poweroff(&mut self) -> Result<()> {
        let _ = self.exec(&["systemctl", "poweroff"]);
        let mut gone = false;
        wait_until(BOOT_TIMEOUT, "the container to power off", || {
            gone = !self.nspawn_running();
            gone
        })
        .with_context(|| format!("console:\n{}", self.console_log()))?;
        if let Some(mut c) = self.nspawn.take() {
            let _ = c.wait();
        }
        self.pid1 = None;
        Ok(())
    }

    /// Kills the container at once (PID 1 first: that ends its whole PID
    /// namespace), then nspawn.
    pub fn kill(&mut self) {
        if let Some(pid1) = self.pid1.take() {
            let _ = kill(Pid::from_raw(pid1 as i32), Signal::SIGKILL);
        }
        if let Some(mut c) = self.nspawn.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The first child process of `pid` (nspawn's child is the container's PID 1).
fn child_of(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        self.kill();
        // nspawn's bookkeeping under /run for this root and machine name,
        // which it leaves behind: the lock named after the root's inode and
        // the mount-propagation directory.
        if let Ok(meta) = std::fs::metadata(&self.root) {
            use std::os::unix::fs::MetadataExt;
            let lock = format!("/run/systemd/nspawn/locks/inode-{}:{}", meta.dev(), meta.ino());
            let _ = std::fs::remove_file(lock);
        }
        let _ = std::fs::remove_dir_all(format!("/run/systemd/nspawn/propagate/{}", self.machine()));
        if self.mounted {
            let root = self.root.to_string_lossy().into_owned();
            // The mount may be busy for a moment after the container died.
            let unmounted = wait_until(Duration::from_secs(10), "the container root to unmount", || {
                util::output(&["umount", &root]).is_ok_and(|o| o.status.success())
            });
            if let Err(e) = unmounted {
                eprintln!("lab {}: {e:#}; detaching it", self.lab.id());
                let _ = util::output(&["umount", "--lazy", &root]);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("lab {}: removing {}: {e}", self.lab.id(), self.dir.display());
        }
    }
}
