//! The resolver file (`--resolv-conf`): pointed at the local stub during a
//! session and given back byte for byte afterwards.
//!
//! This module owns the file's content during a session and its backup in
//! the state directory. The backup is written (and synced) before the file
//! is touched, and never overwritten while it exists, so a crash at any
//! point leaves the original recoverable: a resumed session finds it and
//! `stop` restores it.
//!
//! It must never replace a symlinked resolver file. A symlink means a
//! manager owns it (systemd-resolved's stub-resolv.conf, resolvconf,
//! NetworkManager); replacing it would fight that manager and lose its
//! setup. Such files are left alone: during a session the firewall redirects
//! every DNS packet to the stub whatever server it is addressed to, so
//! resolved's own upstream queries are answered by the stub as well.
//!
//! The file is rewritten in place (truncate, write, fsync) rather than by
//! rename, because it is often a bind mount (`ip netns exec`, containers),
//! where rename fails with EBUSY.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::io_reason;

const BACKUP_NAME: &str = "resolv.conf.orig";

/// What the resolver file says during a session. Queries to 127.0.0.1:53
/// are redirected to the stub like every other DNS packet.
pub const PINNED_CONTENT: &str = "# Written by sessiongate for the length of a session; restored on `sessionctl stop`.\nnameserver 127.0.0.1\noptions edns0 trust-ad\n";

#[derive(Debug, thiserror::Error)]
pub enum ResolverFileError {
    #[error("could not read the resolver file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("could not save a copy of the resolver file to {path}: {reason}")]
    Backup { path: String, reason: String },
    #[error("could not write the resolver file {path}: {reason}")]
    Write { path: String, reason: String },
}

/// What `pin` did, for the log and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// The file now points at the stub.
    Rewritten,
    /// A manager owns the file (symlink); DNS is pinned by the redirect alone.
    LeftToManager,
}

#[derive(Debug, Clone)]
pub struct ResolverFile {
    path: PathBuf,
    backup: PathBuf,
}

impl ResolverFile {
    pub fn new(path: &Path, state_dir: &Path) -> ResolverFile {
        ResolverFile {
            path: path.to_path_buf(),
            backup: state_dir.join(BACKUP_NAME),
        }
    }

    /// Points the file at the stub, saving the original first. Calling it
    /// again (a resumed session) keeps the first backup.
    pub fn pin(&self) -> Result<Pinned, ResolverFileError> {
        let is_symlink = fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_symlink());
        if is_symlink {
            return Ok(Pinned::LeftToManager);
        }
        if !self.backup.exists() {
            let original = match fs::read(&self.path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => {
                    return Err(ResolverFileError::Read {
                        path: self.path.display().to_string(),
                        reason: io_reason(&e),
                    })
                }
            };
            self.save_backup(&original)?;
        }
        write_in_place(&self.path, PINNED_CONTENT.as_bytes()).map_err(|e| ResolverFileError::Write {
            path: self.path.display().to_string(),
            reason: io_reason(&e),
        })?;
        Ok(Pinned::Rewritten)
    }

    /// Writes the original back byte for byte and drops the backup. Nothing
    /// to do when there is no backup (the file was never pinned).
    pub fn restore(&self) -> Result<(), ResolverFileError> {
        let original = match fs::read(&self.backup) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(ResolverFileError::Read {
                    path: self.backup.display().to_string(),
                    reason: io_reason(&e),
                })
            }
        };
        write_in_place(&self.path, &original).map_err(|e| ResolverFileError::Write {
            path: self.path.display().to_string(),
            reason: io_reason(&e),
        })?;
        let _ = fs::remove_file(&self.backup);
        Ok(())
    }

    fn save_backup(&self, original: &[u8]) -> Result<(), ResolverFileError> {
        let err = |e: std::io::Error| ResolverFileError::Backup {
            path: self.backup.display().to_string(),
            reason: io_reason(&e),
        };
        let dir = self.backup.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(err)?;
        let tmp = dir.join(format!(".{BACKUP_NAME}.tmp"));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        file.write_all(original)
            .and_then(|_| file.sync_all())
            .map_err(err)?;
        fs::rename(&tmp, &self.backup).map_err(err)?;
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        Ok(())
    }
}

/// Truncate, write, fsync: works on bind-mounted files where rename cannot.
fn write_in_place(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_and_restore_give_back_the_exact_bytes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("resolv.conf");
        let original = b"# odd spacing kept\nnameserver 203.0.113.53  \nsearch lab.test\n\n".to_vec();
        fs::write(&path, &original).expect("write");
        let file = ResolverFile::new(&path, &tmp.path().join("state"));
        assert_eq!(file.pin().expect("pin"), Pinned::Rewritten);
        assert_eq!(fs::read_to_string(&path).expect("read"), PINNED_CONTENT);
        // A resumed session pins again: the first backup must survive.
        assert_eq!(file.pin().expect("pin again"), Pinned::Rewritten);
        file.restore().expect("restore");
        assert_eq!(fs::read(&path).expect("read"), original);
        assert!(!tmp.path().join("state").join(BACKUP_NAME).exists());
        file.restore().expect("restoring twice is a no-op");
        assert_eq!(fs::read(&path).expect("read"), original);
    }

    #[test]
    fn a_symlinked_file_is_left_to_its_manager() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("stub-resolv.conf");
        fs::write(&target, b"nameserver 127.0.0.53\n").expect("write");
        let link = tmp.path().join("resolv.conf");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let file = ResolverFile::new(&link, &tmp.path().join("state"));
        assert_eq!(file.pin().expect("pin"), Pinned::LeftToManager);
        assert_eq!(fs::read(&target).expect("read"), b"nameserver 127.0.0.53\n");
        assert!(fs::symlink_metadata(&link)
            .expect("meta")
            .file_type()
            .is_symlink());
        file.restore().expect("restore");
    }
}
