//! The persisted-session store: what the daemon must know after a crash or
//! a reboot to put the lockdown back at once and resume.
//!
//! This module owns the file `session.json` in the state directory and its
//! atomic replacement (write, fsync, rename, fsync the directory). It holds
//! no key material: keys stay in the profile's key files. It never decides
//! when the session is saved or cleared: the session machine does.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE_NAME: &str = "session.json";

/// Enough to lock the machine down again without the profile, and to find
/// the profile to resume it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistedSession {
    pub profile: String,
    pub endpoint: SocketAddr,
    pub interface: String,
    pub allow_lan: bool,
    /// `net.ipv4.conf.all.src_valid_mark` as it was before the session
    /// started, for stop to give back even after a crash (the kernel then
    /// holds the 1 the crashed run set). Files from before this field have
    /// none; their stop leaves the value as it finds it.
    #[serde(default)]
    pub src_valid_mark_before: Option<String>,
    /// How the tunnel's datagrams travel now, so that a resume puts back
    /// the same way out (an `auto` session that fell back to TCP resumes
    /// on TCP, its lockdown admitting the relay's TCP and no UDP). Files
    /// from before this field have none: the profile decides then.
    #[serde(default)]
    pub transport: Option<PersistedTransport>,
}

/// The way out a session's tunnel uses, as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "protocol", deny_unknown_fields)]
pub enum PersistedTransport {
    /// UDP straight to the endpoint.
    Udp,
    /// TCP to the relay at this address.
    Tcp { relay: SocketAddr },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("could not write the session state in {dir}: {reason}")]
    Write { dir: String, reason: String },
    #[error("could not read the session state {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("could not remove the session state {path}: {reason}")]
    Remove { path: String, reason: String },
}

/// The persisted-session store: one file in the state directory.
#[derive(Debug, Clone)]
pub struct SessionStore {
    dir: PathBuf,
}

impl SessionStore {
    pub fn new(dir: &Path) -> SessionStore {
        SessionStore {
            dir: dir.to_path_buf(),
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Writes the session so that a crash at any moment leaves either the
    /// old file or the new one, never a torn one.
    pub fn save(&self, session: &PersistedSession) -> Result<(), StoreError> {
        let err = |e: std::io::Error| StoreError::Write {
            dir: self.dir.display().to_string(),
            reason: crate::io_reason(&e),
        };
        if !self.dir.exists() {
            fs::create_dir_all(&self.dir).map_err(err)?;
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
        let body = serde_json::to_vec_pretty(session).map_err(|e| StoreError::Write {
            dir: self.dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let tmp = self.dir.join(format!(".{FILE_NAME}.tmp"));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        file.write_all(&body).and_then(|_| file.sync_all()).map_err(err)?;
        fs::rename(&tmp, self.file()).map_err(err)?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }

    /// The persisted session, if there is one. A file that cannot be parsed
    /// is an error, not "no session": the caller must lock down rather than
    /// guess.
    pub fn load(&self) -> Result<Option<PersistedSession>, StoreError> {
        let path = self.file();
        let read_err = |reason: String| StoreError::Read {
            path: path.display().to_string(),
            reason,
        };
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| read_err(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(read_err(crate::io_reason(&e))),
        }
    }

    pub fn clear(&self) -> Result<(), StoreError> {
        let path = self.file();
        match fs::remove_file(&path) {
            Ok(()) => {
                let _ = fs::File::open(&self.dir).and_then(|d| d.sync_all());
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Remove {
                path: path.display().to_string(),
                reason: crate::io_reason(&e),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PersistedSession {
        PersistedSession {
            profile: "lab".into(),
            endpoint: "198.51.100.2:51820".parse().expect("addr"),
            interface: "sg0".into(),
            allow_lan: false,
            src_valid_mark_before: Some("0".into()),
            transport: Some(PersistedTransport::Tcp {
                relay: "198.51.100.2:443".parse().expect("addr"),
            }),
        }
    }

    #[test]
    fn save_load_clear_round_trip() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = SessionStore::new(&tmp.path().join("state"));
        assert_eq!(store.load().expect("load"), None);
        store.save(&sample()).expect("save");
        assert_eq!(store.load().expect("load"), Some(sample()));
        let mode = fs::metadata(tmp.path().join("state"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        store.clear().expect("clear");
        assert_eq!(store.load().expect("load"), None);
        store.clear().expect("clearing twice is fine");
    }

    #[test]
    fn a_file_without_src_valid_mark_before_still_loads() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = SessionStore::new(tmp.path());
        let old = r#"{"profile":"lab","endpoint":"198.51.100.2:51820","interface":"sg0","allow_lan":false}"#;
        fs::write(tmp.path().join(FILE_NAME), old).expect("write");
        let loaded = store.load().expect("load").expect("a session");
        assert_eq!(loaded.src_valid_mark_before, None);
        assert_eq!(loaded.transport, None);
        assert_eq!(loaded.profile, "lab");
    }

    #[test]
    fn a_torn_file_is_an_error_not_an_absence() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = SessionStore::new(tmp.path());
        fs::write(tmp.path().join(FILE_NAME), b"{\"profile\":").expect("write");
        assert!(store.load().is_err());
    }
}
