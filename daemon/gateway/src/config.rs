//! The gateway's configuration file: its own key, port, interface and
//! addresses, and each client (peer) with its public key, its tunnel
//! addresses and the shape of what the gateway sends it.
//!
//! This module only reads and checks the file; it never touches the
//! network. Errors name the file and the field, in one sentence.
//!
//! ```toml
//! private_key_file = "gateway.key"   # relative to this file, mode 0600
//! listen_port = 51820
//! interface = "sgw0"                 # optional
//! mtu = 1420                         # optional; the clients' tunnel MTU
//! address = ["192.0.2.65/26", "2001:db8:66::1/64"]
//!
//! [[peer]]
//! public_key = "base64 32-byte key"
//! allowed_ips = ["192.0.2.66/32", "2001:db8:66::2/128"]
//! shape = "cover"                    # optional: "spec" (default), "pad", "cover"
//! preshared_key_file = "client.psk"  # optional
//! ```

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sessiongate_common::keys::Key;
use sessiongate_common::profile::{decode_key, TrafficShape};

/// The default interface name and MTU (the MTU of a sessiongate profile).
pub const DEFAULT_INTERFACE: &str = "sgw0";
pub const DEFAULT_MTU: u16 = 1420;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    private_key_file: PathBuf,
    listen_port: u16,
    interface: Option<String>,
    mtu: Option<u16>,
    #[serde(default)]
    address: Vec<String>,
    #[serde(default)]
    peer: Vec<RawPeer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    public_key: String,
    allowed_ips: Vec<String>,
    shape: Option<String>,
    preshared_key_file: Option<PathBuf>,
}

/// An address with its prefix length, e.g. 192.0.2.66/32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn parse(text: &str) -> Result<Prefix, String> {
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} needs a prefix length, e.g. 192.0.2.66/32"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("{len:?} is not a prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("prefix length {len} is longer than {max}"));
        }
        Ok(Prefix { addr, len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// One client of the gateway.
#[derive(Debug)]
pub struct PeerConfig {
    pub public_key: Key,
    pub allowed_ips: Vec<Prefix>,
    pub shape: TrafficShape,
    pub preshared_key: Option<Key>,
}

#[derive(Debug)]
pub struct Config {
    pub private_key: Key,
    pub listen_port: u16,
    pub interface: String,
    pub mtu: u16,
    pub address: Vec<Prefix>,
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {message}")]
pub struct ConfigError {
    file: String,
    field: String,
    message: String,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |field: &str, message: String| ConfigError {
            file: path.display().to_string(),
            field: field.to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err("file", format!("cannot be read ({e})")))?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| err("file", e.message().to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let private_key =
            read_key_file(&dir.join(&raw.private_key_file)).map_err(|m| err("private_key_file", m))?;
        if raw.listen_port == 0 {
            return Err(err("listen_port", "must be 1-65535".into()));
        }
        let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
        if !(1280..=9000).contains(&mtu) {
            return Err(err("mtu", format!("{mtu} is outside 1280-9000")));
        }
        let address = raw
            .address
            .iter()
            .enumerate()
            .map(|(i, a)| Prefix::parse(a).map_err(|m| err(&format!("address[{i}]"), m)))
            .collect::<Result<Vec<_>, _>>()?;
        if address.iter().filter(|a| a.addr.is_ipv4()).count() > 1 {
            return Err(err("address", "at most one IPv4 address".into()));
        }
        let mut peers = Vec::new();
        for (i, p) in raw.peer.iter().enumerate() {
            let field = |f: &str| format!("peer[{i}].{f}");
            let public_key = decode_key(&p.public_key).map_err(|m| err(&field("public_key"), m))?;
            if peers
                .iter()
                .any(|q: &PeerConfig| q.public_key.as_bytes() == public_key.as_bytes())
            {
                return Err(err(&field("public_key"), "appears twice".into()));
            }
            let allowed_ips = p
                .allowed_ips
                .iter()
                .map(|a| Prefix::parse(a).map_err(|m| err(&field("allowed_ips"), m)))
                .collect::<Result<Vec<_>, _>>()?;
            let shape = match &p.shape {
                Some(s) => s.parse().map_err(|m| err(&field("shape"), m))?,
                None => TrafficShape::Spec,
            };
            let preshared_key = match &p.preshared_key_file {
                Some(f) => {
                    Some(read_key_file(&dir.join(f)).map_err(|m| err(&field("preshared_key_file"), m))?)
                }
                None => None,
            };
            peers.push(PeerConfig {
                public_key,
                allowed_ips,
                shape,
                preshared_key,
            });
        }
        Ok(Config {
            private_key,
            listen_port: raw.listen_port,
            interface: raw.interface.unwrap_or_else(|| DEFAULT_INTERFACE.to_string()),
            mtu,
            address,
            peers,
        })
    }
}

/// A base64 key from a file that only its owner may read.
fn read_key_file(path: &Path) -> Result<Key, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{} cannot be read ({e})", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            meta.mode() & 0o777
        ));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{} cannot be read ({e})", path.display()))?;
    decode_key(text.trim()).map_err(|m| format!("{}: {m}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const KEY: &str = "YAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }

    #[test]
    fn a_config_with_two_peers_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "gw.key", KEY, 0o600);
        let path = write(
            dir.path(),
            "gw.toml",
            &format!(
                "private_key_file = \"gw.key\"\nlisten_port = 51820\naddress = [\"192.0.2.65/26\", \"2001:db8:66::1/64\"]\n\
                 [[peer]]\npublic_key = \"{KEY}\"\nallowed_ips = [\"192.0.2.66/32\"]\nshape = \"cover\"\n\
                 [[peer]]\npublic_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\nallowed_ips = [\"192.0.2.67/32\"]\n"
            ),
            0o644,
        );
        let c = Config::load(&path).expect("loads");
        assert_eq!(
            (c.listen_port, c.mtu, c.interface.as_str()),
            (51820, 1420, "sgw0")
        );
        assert_eq!(c.address.len(), 2);
        assert_eq!(c.peers[0].shape, TrafficShape::Cover);
        assert_eq!(c.peers[1].shape, TrafficShape::Spec);
    }

    #[test]
    fn mistakes_name_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "gw.key", KEY, 0o644);
        let path = write(
            dir.path(),
            "gw.toml",
            "private_key_file = \"gw.key\"\nlisten_port = 51820\n",
            0o644,
        );
        let e = Config::load(&path).expect_err("open key").to_string();
        assert!(e.contains("private_key_file") && e.contains("chmod 600"), "{e}");

        write(dir.path(), "gw.key", KEY, 0o600);
        for (text, field) in [
            ("listen_port = 51820\nprivate_key_file = \"gw.key\"\nlisten_prot = 1\n", "file"),
            (
                "private_key_file = \"gw.key\"\nlisten_port = 1\n[[peer]]\npublic_key = \"x\"\nallowed_ips = []\n",
                "peer[0].public_key",
            ),
            (
                &format!("private_key_file = \"gw.key\"\nlisten_port = 1\n[[peer]]\npublic_key = \"{KEY}\"\nallowed_ips = [\"192.0.2.66\"]\n"),
                "peer[0].allowed_ips",
            ),
            (
                &format!("private_key_file = \"gw.key\"\nlisten_port = 1\n[[peer]]\npublic_key = \"{KEY}\"\nallowed_ips = []\nshape = \"fast\"\n"),
                "peer[0].shape",
            ),
        ] {
            let path = write(dir.path(), "gw.toml", text, 0o644);
            let e = Config::load(&path).expect_err(field).to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn prefixes_match_by_their_length() {
        let p = Prefix::parse("192.0.2.64/26").expect("v4");
        assert!(p.contains("192.0.2.66".parse().expect("ip")));
        assert!(!p.contains("192.0.2.130".parse().expect("ip")));
        assert!(!p.contains("2001:db8::1".parse().expect("ip")));
        let all = Prefix::parse("0.0.0.0/0").expect("default");
        assert!(all.contains("203.0.113.10".parse().expect("ip")));
        let v6 = Prefix::parse("2001:db8:66::2/128").expect("v6");
        assert!(v6.contains("2001:db8:66::2".parse().expect("ip")));
        assert!(!v6.contains("2001:db8:66::3".parse().expect("ip")));
        assert!(Prefix::parse("192.0.2.1/33").is_err());
    }
}
