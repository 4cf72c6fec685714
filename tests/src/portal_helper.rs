//! The captive-portal helper (`sessiongate-portal`) for lab tests that run
//! sessiond without systemd: `systemd-socket-activate --accept --inetd`
//! in the client namespace stands in for `sessiongate-portal.socket` (one
//! helper per connection, the connection on its standard input), on a
//! socket in the lab's directory; the test points sessiond at it and at a
//! namespace name of its own (`SESSIOND_TEST_PORTAL_SOCKET`,
//! `SESSIOND_TEST_PORTAL_NAMESPACE`). tests/systemd.rs runs the real units.
//!
//! It owns the stand-in process and the clean-up of the test's portal
//! namespace: the helpers make it in the mount namespace they share with
//! the stand-in (where `ip netns` mounts it), and a helper killed midway
//! can leave the empty file under /run/netns on the host. It must never
//! touch another namespace than the test's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::lab::{Lab, LabChild, Ns};
use crate::util::{self, wait_until};

pub struct PortalHelper {
    activator: LabChild,
    socket: PathBuf,
    namespace: String,
}

impl PortalHelper {
    /// Starts the stand-in socket unit; the portal namespace will be
    /// `sgp` and the lab's id.
    pub fn start(lab: &Lab) -> Result<PortalHelper> {
        let socket = lab.tmp_dir().join("portal-helper.sock");
        let helper = util::find_binary("sessiongate-portal")?;
        let activator = lab.spawn_named(
            Ns::Client,
            "portal-helper",
            &[
                "systemd-socket-activate",
                "--accept",
                "--inetd",
                "--listen",
                &socket.to_string_lossy(),
                &helper.to_string_lossy(),
            ],
        )?;
        let helper = PortalHelper {
            activator,
            socket,
            namespace: format!("sgp{}", lab.id()),
        };
        wait_until(Duration::from_secs(10), "the portal helper's socket", || {
            helper.socket.exists()
        })
        .map_err(|e| anyhow::anyhow!("{e:#}: {}", helper.log()))?;
        Ok(helper)
    }

    /// The socket sessiond is to connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The portal namespace's name for this test.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// What the stand-in and the helpers wrote (the helpers log there).
    pub fn log(&self) -> String {
        self.activator.log()
    }

    fn mount_namespace(&self) -> String {
        format!("--mount=/proc/{}/ns/mnt", self.activator.pid())
    }

    /// Whether the portal namespace exists, as the helpers see it.
    pub fn namespace_exists(&self) -> bool {
        util::run(&["nsenter", &self.mount_namespace(), "ip", "netns", "list"])
            .map(|list| {
                list.lines()
                    .any(|l| l.split_whitespace().next() == Some(self.namespace.as_str()))
            })
            .unwrap_or(false)
    }
}

impl Drop for PortalHelper {
    fn drop(&mut self) {
        let mnt = self.mount_namespace();
        if let Ok(pids) = util::run(&["nsenter", &mnt, "ip", "netns", "pids", &self.namespace]) {
            for p in pids.split_whitespace() {
                let _ = util::run(&["kill", "-9", p]);
            }
        }
        let _ = util::run(&["nsenter", &mnt, "ip", "netns", "del", &self.namespace]);
        // The file under /run/netns is shared by every mount namespace: a
        // delete that ran while another one still held the mount can leave
        // the empty file behind, which `ip netns list` then shows.
        let _ = util::run(&["ip", "netns", "del", &self.namespace]);
        let _ = std::fs::remove_file(Path::new("/run/netns").join(&self.namespace));
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.namespace));
    }
}
