//! Local trust at startup: sessiond runs only on files that nobody but root
//! (or the daemon's own user) can change.
//!
//! Whoever can write the profiles directory decides where a session's
//! traffic goes (the endpoint, the allow list, the DNS servers); whoever can
//! write a key file decides which key the tunnel uses; whoever can write the
//! state directory decides what a restart resumes. So before anything else
//! happens, [`check`] refuses to start when
//! - the profiles directory, its `keys/` directory, a file in `keys/`, or a
//!   key file a profile names (`private_key_file`, `preshared_key_file`) is
//!   writable by group or others, or owned by anyone but root or the
//!   daemon's user;
//! - the state directory exists and is not a directory of mode 0700 owned
//!   by root or the daemon's user (it is created with mode 0700 when it is
//!   missing).
//!
//! A profile file that others may write is warned about here (the other
//! profiles stay usable) and refused by [`check_profile_file`] whenever it
//! is loaded: at `sessionctl start`, at a hot reload, at a resume.
//!
//! It only reads metadata (and the profiles, to find the key files they
//! name); it never changes a mode or an owner, except for creating a missing
//! state directory.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::io_reason;

/// Why sessiond refuses to start: one plain sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refusing to start: {0}")]
pub struct TrustError(pub String);

/// Checks the profiles directory, its key files and the state directory
/// (see the module documentation); creates a missing state directory with
/// mode 0700. Warnings go to the log.
pub fn check(profiles: &Path, state_dir: &Path) -> Result<(), TrustError> {
    let euid = nix::unistd::geteuid().as_raw();
    check_profiles(profiles, euid)?;
    check_state_dir(state_dir, euid)
}

/// Who may own what we trust: root, or the user the daemon runs as.
fn trusted_owner(uid: u32, euid: u32) -> bool {
    uid == 0 || uid == euid
}

/// Refuses `path` (described as `what`) if anyone but root or the daemon's
/// user can write it.
fn only_root_writes(what: &str, path: &Path, meta: &fs::Metadata, euid: u32) -> Result<(), TrustError> {
    if !trusted_owner(meta.uid(), euid) {
        return Err(TrustError(format!(
            "{what} {} belongs to uid {}, so that user can change it; make root its owner (chown root {})",
            path.display(),
            meta.uid(),
            path.display()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(TrustError(format!(
            "{what} {} is writable by group or others (mode {mode:04o}); make it writable by its owner only (chmod go-w {})",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// Refuses a profile file (its metadata from the open file) that anyone
/// but root or the daemon's user can write: such a user could widen a
/// running session's allowlist by a reload.
pub fn check_profile_file(path: &Path, meta: &fs::Metadata) -> Result<(), TrustError> {
    let euid = nix::unistd::geteuid().as_raw();
    only_root_writes("its file", path, meta, euid)
}

fn unreadable(what: &str, path: &Path, e: &io::Error) -> TrustError {
    TrustError(format!(
        "cannot check {what} {}: {}",
        path.display(),
        io_reason(e)
    ))
}

fn check_profiles(dir: &Path, euid: u32) -> Result<(), TrustError> {
    let meta = match fs::metadata(dir) {
        Ok(meta) => meta,
        // Nothing to trust yet; the daemon says so when asked for profiles.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(unreadable("the profiles directory", dir, &e)),
    };
    if !meta.is_dir() {
        return Ok(());
    }
    only_root_writes("the profiles directory", dir, &meta, euid)?;

    let keys = dir.join("keys");
    match fs::metadata(&keys) {
        Ok(meta) if meta.is_dir() => {
            only_root_writes("the key directory", &keys, &meta, euid)?;
            for path in entries(&keys).map_err(|e| unreadable("the key directory", &keys, &e))? {
                check_key_file(&path, euid)?;
            }
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(unreadable("the key directory", &keys, &e)),
    }

    let profiles = entries(dir).map_err(|e| unreadable("the profiles directory", dir, &e))?;
    for profile in profiles
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
    {
        let Ok(meta) = fs::metadata(profile) else { continue };
        if !meta.is_file() {
            continue;
        }
        if let Err(e) = only_root_writes("profile", profile, &meta, euid) {
            tracing::warn!("{}", e.0);
        }
        for key in referenced_key_files(profile, dir) {
            check_key_file(&key, euid)?;
        }
    }
    Ok(())
}

/// A key file, if it exists and is a regular file (a missing or odd one
/// makes its profile invalid, which the profile rules report).
fn check_key_file(path: &Path, euid: u32) -> Result<(), TrustError> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_file() => only_root_writes("the key file", path, &meta, euid),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(unreadable("the key file", path, &e)),
    }
}

/// Everything in `dir`, sorted (so the first complaint is always the same).
fn entries(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths = fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()?;
    paths.sort();
    Ok(paths)
}

/// The key files a profile names, relative paths taken from the profiles
/// directory as the profile rules do. A profile that does not parse names
/// none (it is invalid anyway).
fn referenced_key_files(profile: &Path, dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string(profile) else {
        return Vec::new();
    };
    crate::profile::key_files_named(&text)
        .into_iter()
        .map(|file| dir.join(file))
        .collect()
}

fn check_state_dir(dir: &Path, euid: u32) -> Result<(), TrustError> {
    let what = "the state directory";
    let meta = match fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .and_then(|_| fs::set_permissions(dir, fs::Permissions::from_mode(0o700)))
                .map_err(|e| {
                    TrustError(format!(
                        "cannot create {what} {} with mode 0700: {}",
                        dir.display(),
                        io_reason(&e)
                    ))
                })?;
            tracing::info!("created {what} {} (mode 0700)", dir.display());
            return Ok(());
        }
        Err(e) => return Err(unreadable(what, dir, &e)),
    };
    if !meta.is_dir() {
        return Err(TrustError(format!("{what} {} is not a directory", dir.display())));
    }
    if !trusted_owner(meta.uid(), euid) {
        return Err(TrustError(format!(
            "{what} {} belongs to uid {}, so that user can change what a restart resumes; make root its owner (chown root {})",
            dir.display(),
            meta.uid(),
            dir.display()
        )));
    }
    let mode = meta.mode() & 0o777;
    if mode != 0o700 {
        return Err(TrustError(format!(
            "{what} {} has mode {mode:04o}, but it must be 0700 (chmod 700 {})",
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// A profiles dir (0755) with keys/ (0700), keys/client.key (0600),
    /// a profile naming it and an outside preshared key (0600), and a state
    /// dir (0700): everything a root-run daemon should accept.
    struct Setup {
        root: tempfile::TempDir,
    }

    impl Setup {
        fn new() -> Setup {
            let root = tempfile::tempdir().expect("tempdir");
            chmod(root.path(), 0o755);
            let s = Setup { root };
            fs::create_dir(s.profiles()).expect("profiles");
            chmod(&s.profiles(), 0o755);
            fs::create_dir(s.profiles().join("keys")).expect("keys");
            chmod(&s.profiles().join("keys"), 0o700);
            fs::write(s.client_key(), "key\n").expect("key");
            chmod(&s.client_key(), 0o600);
            fs::write(s.psk(), "psk\n").expect("psk");
            chmod(&s.psk(), 0o600);
            let profile = format!(
                "[tunnel]\nprivate_key_file = \"keys/client.key\"\naddress = [\"10.0.0.2/32\"]\n\
                 [tunnel.peer]\npublic_key = \"k\"\nendpoint = \"gw.test:51820\"\npreshared_key_file = \"{}\"\n\
                 [dns]\nservers = []\n",
                s.psk().display()
            );
            fs::write(s.profiles().join("lab.toml"), profile).expect("profile");
            fs::write(s.profiles().join("broken.toml"), "description = 1\n[[[").expect("profile");
            fs::create_dir(s.state()).expect("state");
            chmod(&s.state(), 0o700);
            s
        }

        fn profiles(&self) -> PathBuf {
            self.root.path().join("profiles")
        }

        fn client_key(&self) -> PathBuf {
            self.profiles().join("keys").join("client.key")
        }

        fn psk(&self) -> PathBuf {
            self.root.path().join("outside.psk")
        }

        fn state(&self) -> PathBuf {
            self.root.path().join("state")
        }

        fn check(&self) -> Result<(), String> {
            check(&self.profiles(), &self.state()).map_err(|e| e.to_string())
        }

        fn refused(&self) -> String {
            match self.check() {
                Ok(()) => panic!("sessiond should refuse to start"),
                Err(e) => e,
            }
        }
    }

    #[test]
    fn a_private_setup_is_accepted() {
        let s = Setup::new();
        assert_eq!(s.check(), Ok(()));
        // No profiles dir at all, or no keys/: nothing to distrust.
        fs::remove_dir_all(s.profiles()).expect("rm");
        assert_eq!(s.check(), Ok(()));
    }

    #[test]
    fn a_writable_profiles_dir_is_refused() {
        let s = Setup::new();
        chmod(&s.profiles(), 0o775);
        let e = s.refused();
        assert_eq!(
            e,
            format!(
                "refusing to start: the profiles directory {0} is writable by group or others (mode 0775); make it writable by its owner only (chmod go-w {0})",
                s.profiles().display()
            )
        );
        chmod(&s.profiles(), 0o757);
        assert!(s.refused().contains("(mode 0757)"));
        // Sticky or not, others may add profiles.
        chmod(&s.profiles(), 0o1777);
        assert!(s.refused().contains("(mode 1777)"));
    }

    #[test]
    fn writable_key_files_are_refused_in_keys_and_where_profiles_point() {
        let s = Setup::new();
        chmod(&s.client_key(), 0o620);
        let e = s.refused();
        assert!(
            e.contains(&format!(
                "the key file {} is writable by group or others (mode 0620)",
                s.client_key().display()
            )),
            "{e}"
        );
        chmod(&s.client_key(), 0o600);

        // A key in keys/ that no profile names yet.
        let spare = s.profiles().join("keys").join("spare.key");
        fs::write(&spare, "k").expect("spare");
        chmod(&spare, 0o602);
        assert!(s.refused().contains("spare.key is writable"));
        chmod(&spare, 0o600);

        // The preshared key outside the profiles dir, named by absolute path.
        chmod(&s.psk(), 0o622);
        assert!(s.refused().contains("outside.psk is writable"));
        chmod(&s.psk(), 0o600);

        // keys/ itself: whoever writes it can swap the files inside.
        chmod(&s.profiles().join("keys"), 0o770);
        assert!(s.refused().contains("the key directory"));
        chmod(&s.profiles().join("keys"), 0o700);
        assert_eq!(s.check(), Ok(()));
    }

    #[test]
    fn readable_but_not_writable_keys_are_left_to_the_profile_rules() {
        // 0644 is wrong for a key (the profile is invalid, and says so), but
        // nobody else can change it: no reason to refuse to start.
        let s = Setup::new();
        chmod(&s.client_key(), 0o644);
        assert_eq!(s.check(), Ok(()));
    }

    #[test]
    fn a_writable_profile_file_is_only_warned_about() {
        let s = Setup::new();
        chmod(&s.profiles().join("lab.toml"), 0o666);
        assert_eq!(s.check(), Ok(()));
    }

    #[test]
    fn the_state_dir_must_be_0700_and_is_made_so_when_missing() {
        let s = Setup::new();
        chmod(&s.state(), 0o755);
        assert_eq!(
            s.refused(),
            format!(
                "refusing to start: the state directory {0} has mode 0755, but it must be 0700 (chmod 700 {0})",
                s.state().display()
            )
        );
        chmod(&s.state(), 0o750);
        assert!(s.refused().contains("has mode 0750"));

        fs::remove_dir(s.state()).expect("rm state");
        let nested = s.state().join("deeper");
        check(&s.profiles(), &nested).expect("a missing state dir is created");
        let mode = fs::metadata(&nested).expect("created").mode() & 0o777;
        assert_eq!(mode, 0o700);

        fs::remove_dir_all(s.state()).expect("rm");
        fs::write(s.state(), "not a dir").expect("file");
        assert!(s.refused().ends_with("is not a directory"));
    }

    #[test]
    fn files_owned_by_another_user_are_refused() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root to give files to another owner: run the tests as root"
        );
        let nobody = Some(nix::unistd::Uid::from_raw(65534));
        let s = Setup::new();
        nix::unistd::chown(&s.client_key(), nobody, None).expect("chown");
        assert!(
            s.refused().contains("client.key belongs to uid 65534"),
            "{}",
            s.refused()
        );
        nix::unistd::chown(&s.client_key(), Some(nix::unistd::Uid::from_raw(0)), None).expect("chown");
        assert_eq!(s.check(), Ok(()));

        nix::unistd::chown(&s.profiles(), nobody, None).expect("chown");
        assert!(s.refused().contains("the profiles directory"));
        nix::unistd::chown(&s.profiles(), Some(nix::unistd::Uid::from_raw(0)), None).expect("chown");

        nix::unistd::chown(&s.state(), nobody, None).expect("chown");
        assert!(s.refused().contains("the state directory"));
        assert!(s.refused().contains("belongs to uid 65534"));
    }
}
