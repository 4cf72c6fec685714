//! Call profiles: the TOML format of docs/profiles.md, parsed strictly and validated
//! into a [`Profile`] that the rest of the daemon can trust.
//!
//! This module owns every rule about what a valid profile is, and the wording
//! of the error a person sees when one is not. It reads files (the profile and
//! its key files) and never changes anything on the system; it never reads
//! anything but a regular file, nor more than a size limit of one
//! (`read_bounded`: a FIFO, a device or a huge file is refused before it is
//! read). Buffers that
//! held key material (the profile text, which may hold an inline key, key
//! files, decoded bytes) are wiped when dropped (`zeroize`).

use std::fmt;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::io_reason;
use crate::keys::Key;

/// Default name of the tunnel interface.
pub const DEFAULT_INTERFACE: &str = "sg0";
/// Default tunnel MTU: WireGuard's usual 1420.
pub const DEFAULT_MTU: u16 = 1420;
/// Default time `start` waits for the first handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// The largest profile file sessiond, `check` and `import` read: real
/// profiles are a few hundred bytes; anything near this is the wrong file
/// (a log, a disk image, /dev/zero), refused before it is read.
pub const MAX_PROFILE_FILE_BYTES: u64 = 1024 * 1024;
/// The largest `[audit] ca` file read: a system bundle is about 200 KiB.
const MAX_CA_FILE_BYTES: u64 = 1024 * 1024;
/// A key file holds 44 base64 characters and some white space.
const KEY_FILE_MAX_BYTES: usize = 256;

/// A profile that failed to load or validate. Displays as one sentence:
/// `profile NAME: FIELD: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("profile {profile}: {}{message}", field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct ProfileError {
    pub profile: String,
    pub field: Option<String>,
    pub message: String,
}

impl ProfileError {
    fn new(profile: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        ProfileError {
            profile: profile.to_string(),
            field: Some(field.into()),
            message: message.into(),
        }
    }

    fn whole(profile: &str, message: impl Into<String>) -> Self {
        ProfileError {
            profile: profile.to_string(),
            field: None,
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------------------
// The file format, exactly as written by people. Ports and numbers are read
// wide so that an out-of-range value gets our message, not serde's.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    description: Option<String>,
    tunnel: TunnelSection,
    dns: DnsSection,
    #[serde(default)]
    allow: Vec<AllowSection>,
    #[serde(default)]
    options: OptionsSection,
    #[serde(default)]
    audit: AuditSection,
    #[serde(default)]
    privacy: PrivacySection,
    #[serde(default)]
    gateway: GatewaySection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelSection {
    private_key_file: Option<String>,
    private_key: Option<String>,
    address: Vec<String>,
    mtu: Option<i64>,
    interface: Option<String>,
    peer: PeerSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerSection {
    public_key: String,
    endpoint: String,
    preshared_key_file: Option<String>,
    persistent_keepalive: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsSection {
    servers: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowSection {
    host: String,
    #[serde(default)]
    tcp: Vec<PortSpec>,
    #[serde(default)]
    udp: Vec<PortSpec>,
}

/// One entry of an `[[allow]]` port list as written: a port number, or a
/// string holding a port or a range `"LOW-HIGH"`. Read wide (a number as
/// `i64`, any string) so that a wrong value gets our message, not serde's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PortSpec {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port (a whole number) or a range of ports such as \"50000-60000\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortSpec, E> {
                Ok(PortSpec::Number(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortSpec, E> {
                Ok(PortSpec::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortSpec, E> {
                // Only a range is written as a string; a lone port is a
                // number (`tcp = [443]`, not `tcp = ["443"]`).
                if v.contains('-') {
                    Ok(PortSpec::Text(v.to_string()))
                } else {
                    Err(E::invalid_type(serde::de::Unexpected::Str(v), &self))
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptionsSection {
    #[serde(default)]
    allow_lan: bool,
    handshake_timeout_secs: Option<i64>,
}

/// `[audit]`: what `sessionctl audit` needs to know about the hosts that
/// the profile itself does not say (only read by the audit, never by the
/// session).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditSection {
    ca: Option<String>,
}

/// `[gateway]`: how the tunnel reaches the gateway (UDP, or TCP through a
/// relay where a network blocks UDP), and what the practice's gateway does
/// for this profile.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewaySection {
    /// Read as text so a misspelt choice gets our message with the choices.
    transport: Option<String>,
    tcp_endpoint: Option<String>,
    /// The gateway, not this machine, enforces the allowlist (see
    /// [`Profile::gateway_enforces_allowlist`]).
    #[serde(default)]
    enforces_allowlist: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivacySection {
    /// Read as text so a misspelt shape gets our message with the choices.
    shape: Option<String>,
}

// ---------------------------------------------------------------------------
// The validated model.

/// An address with a prefix length, such as `192.0.2.66/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpCidr {
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpCidr {
    type Err = String;

    /// Parses `ADDR/PREFIX`, or a bare address as a single host.
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("{addr_text:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("prefix /{p} is not between /0 and /{max}"))?,
        };
        Ok(IpCidr { addr, prefix })
    }
}

/// What an `[[allow]]` entry names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Host {
    /// A DNS name, resolved through the tunnel during the session.
    Name(String),
    /// A literal address or network.
    Net(IpCidr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Net(net) if net.prefix == if net.addr.is_ipv4() { 32 } else { 128 } => {
                write!(f, "{}", net.addr)
            }
            Host::Net(net) => write!(f, "{net}"),
        }
    }
}

/// What the tunnel does to the size and timing of the packets it sends
/// (`[privacy] shape`; the costs are in the README's privacy section).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrafficShape {
    /// Every data packet padded to a multiple of 16 bytes, as the WireGuard
    /// protocol asks.
    #[default]
    Spec,
    /// Every data packet padded to the tunnel MTU.
    Pad,
    /// A constant-rate stream of MTU-sized packets for the whole session;
    /// real packets take the place of decoys.
    Cover,
}

impl TrafficShape {
    pub const CHOICES: &'static str = "\"spec\", \"pad\" or \"cover\"";

    pub fn as_str(self) -> &'static str {
        match self {
            TrafficShape::Spec => "spec",
            TrafficShape::Pad => "pad",
            TrafficShape::Cover => "cover",
        }
    }
}

/// How the tunnel's encrypted datagrams reach the gateway (`[gateway]
/// transport`; the cost of TCP is in the README's travelling-therapists
/// section).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// UDP to the peer's endpoint, as WireGuard does.
    #[default]
    Udp,
    /// Always TCP to the relay at `relay` (an address, never a name: the
    /// relay is found without a lookup in clear).
    Tcp { relay: SocketAddr },
    /// UDP first; TCP to `relay` if the gateway does not answer over UDP.
    Auto { relay: SocketAddr },
}

impl Transport {
    pub const CHOICES: &'static str = "\"udp\", \"tcp\" or \"auto\"";

    /// The relay, unless the transport is UDP only.
    pub fn relay(self) -> Option<SocketAddr> {
        match self {
            Transport::Udp => None,
            Transport::Tcp { relay } | Transport::Auto { relay } => Some(relay),
        }
    }
}

impl FromStr for TrafficShape {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spec" => Ok(TrafficShape::Spec),
            "pad" => Ok(TrafficShape::Pad),
            "cover" => Ok(TrafficShape::Cover),
            other => Err(format!("{other:?} is not a shape; use {}", TrafficShape::CHOICES)),
        }
    }
}

/// A port, or an inclusive range of ports (`first..=last`), as an
/// `[[allow]]` entry lists it. On the wire (status) a single port is a
/// number and a range the string `"FIRST-LAST"`, so clients that know
/// only single ports read those as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// One port.
    pub const fn single(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// The range `first..=last`; None when it runs backwards.
    pub fn new(first: u16, last: u16) -> Option<PortRange> {
        (first <= last).then_some(PortRange { first, last })
    }

    pub fn is_single(&self) -> bool {
        self.first == self.last
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Whether the two share at least one port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// How many ports it holds.
    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// Never true: a range holds at least one port (for clippy's `len`).
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `"PORT"` or `"LOW-HIGH"`, each port 1-65535, LOW <= HIGH.
    fn from_str(text: &str) -> Result<Self, String> {
        let port = |part: &str| -> Result<u16, String> {
            let part = part.trim();
            let n: u64 = part.parse().map_err(|_| {
                format!("{text:?} is not a port or a range of ports; write a port such as 443 or a range such as \"50000-60000\"")
            })?;
            u16::try_from(n)
                .ok()
                .filter(|p| *p >= 1)
                .ok_or_else(|| format!("port {n} is out of range 1-65535"))
        };
        match text.split_once('-') {
            None => Ok(PortRange::single(port(text)?)),
            Some((low, high)) => {
                let (low, high) = (port(low)?, port(high)?);
                PortRange::new(low, high).ok_or_else(|| {
                    format!(
                        "the range {text:?} runs backwards; write the lower port first, as \"{high}-{low}\""
                    )
                })
            }
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.is_single() {
            serializer.serialize_u16(self.first)
        } else {
            serializer.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match PortSpec::deserialize(deserializer)? {
            PortSpec::Number(n) => u16::try_from(n)
                .ok()
                .filter(|p| *p >= 1)
                .map(PortRange::single)
                .ok_or_else(|| D::Error::custom(format!("port {n} is out of range 1-65535"))),
            PortSpec::Text(text) => text.parse().map_err(D::Error::custom),
        }
    }
}

/// Whether `port` is in any of `ranges`.
pub fn ports_contain(ranges: &[PortRange], port: u16) -> bool {
    ranges.iter().any(|r| r.contains(port))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowRule {
    pub host: Host,
    pub tcp: Vec<PortRange>,
    pub udp: Vec<PortRange>,
}

/// The peer's endpoint as written: a name or an address, and a port. A name is
/// resolved once at session start, before the lockdown goes up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: Key,
    pub endpoint: Endpoint,
    pub preshared_key: Option<Key>,
    pub persistent_keepalive: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    pub private_key: Key,
    pub addresses: Vec<IpCidr>,
    pub mtu: u16,
    pub interface: String,
    pub peer: Peer,
}

/// A validated profile. Holding one means every rule of docs/profiles.md was checked.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub path: PathBuf,
    pub description: Option<String>,
    pub tunnel: Tunnel,
    pub dns_servers: Vec<IpAddr>,
    pub allow: Vec<AllowRule>,
    pub allow_lan: bool,
    pub handshake_timeout: Duration,
    /// `[audit] ca`: the CA certificate(s) the approved hosts' certificates
    /// are checked against by `sessionctl audit`, instead of the system's
    /// trust store (a practice's own CA). Checked to hold at least one PEM
    /// certificate.
    pub audit_ca: Option<PathBuf>,
    /// `[privacy] shape`: how the tunnel shapes what it sends.
    pub shape: TrafficShape,
    /// `[gateway] transport` and `tcp_endpoint`.
    pub transport: Transport,
    /// `[gateway] enforces_allowlist`: the gateway-enforced kind. This
    /// machine then sends every TCP and UDP packet (any address, any port)
    /// into the tunnel and trusts the practice's gateway to enforce the
    /// allowlist; DNS stays pinned and the kill switch still refuses
    /// everything off the tunnel. For services that hand out addresses
    /// outside DNS (Signal's call relays).
    pub gateway_enforces_allowlist: bool,
}

impl Profile {
    /// Reads and validates the profile file at `path`. The profile's name is
    /// the file stem; relative key paths are taken from the file's directory.
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let name = profile_name_of(path);
        // The daemon finds profiles by name; a file whose name it would
        // refuse could be checked but never started.
        check_profile_name(&name).map_err(|m| {
            ProfileError::whole(
                &name,
                format!(
                    "the file name {} does not make a profile name: {m}; rename the file",
                    path.display()
                ),
            )
        })?;
        // Type, size, mode, owner and text from one open file, so the file
        // checked is the file read. Whoever can write a profile decides
        // where traffic goes: one that others may write is refused, at
        // every start and every reload. The text may hold an inline private
        // key: `read_bounded` wipes it when dropped.
        let (bytes, meta) = read_bounded(path, MAX_PROFILE_FILE_BYTES, "a profile")
            .map_err(|e| ProfileError::whole(&name, e.to_string()))?;
        crate::trust::check_profile_file(path, &meta).map_err(|e| ProfileError::whole(&name, e.0))?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| ProfileError::whole(&name, format!("{} is not UTF-8 text", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut profile = parse(&name, text, base, meta.mode())?;
        profile.path = path.to_path_buf();
        Ok(profile)
    }
}

/// Why a file could not be read as a profile, key or wg-quick file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path} is {kind}, not a regular file; give the path of {what} file")]
    NotRegular {
        path: String,
        kind: &'static str,
        what: &'static str,
    },
    #[error("{path} is larger than {limit}, far more than {what} can be; is it the right file?")]
    TooLarge {
        path: String,
        limit: String,
        what: &'static str,
    },
}

/// Opens `path` for reading and checks, on the open file, that it is a
/// regular file. Opened non-blocking, so a FIFO is refused instead of
/// waiting forever for a writer (reads of a regular file never block).
pub fn open_regular(path: &Path, what: &'static str) -> Result<(fs::File, fs::Metadata), ReadError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let io = |e: std::io::Error| ReadError::Io {
        path: path.display().to_string(),
        reason: io_reason(&e),
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let kind = meta.file_type();
    let not_regular = |kind: &'static str| ReadError::NotRegular {
        path: path.display().to_string(),
        kind,
        what,
    };
    if kind.is_dir() {
        return Err(not_regular("a directory"));
    }
    if kind.is_fifo() {
        return Err(not_regular("a FIFO (named pipe)"));
    }
    if kind.is_char_device() || kind.is_block_device() {
        return Err(not_regular("a device"));
    }
    if kind.is_socket() {
        return Err(not_regular("a socket"));
    }
    if !kind.is_file() {
        return Err(not_regular("not a plain file"));
    }
    Ok((file, meta))
}

/// Reads a regular file of at most `limit` bytes (see [`open_regular`]),
/// refusing a bigger one before reading it and never reading more than
/// `limit + 1` bytes of one that grows meanwhile. The bytes are wiped when
/// dropped (profiles and key files hold keys); room for them is reserved up
/// front so no grown-out copy is left in freed memory.
pub fn read_bounded(
    path: &Path,
    limit: u64,
    what: &'static str,
) -> Result<(Zeroizing<Vec<u8>>, fs::Metadata), ReadError> {
    use std::io::Read;
    let (file, meta) = open_regular(path, what)?;
    let too_large = || ReadError::TooLarge {
        path: path.display().to_string(),
        limit: if limit >= 1024 * 1024 {
            format!("{} MiB", limit / (1024 * 1024))
        } else {
            format!("{limit} bytes")
        },
        what,
    };
    if meta.len() > limit {
        return Err(too_large());
    }
    let room = usize::try_from(meta.len().min(limit) + 1).unwrap_or(0);
    let mut bytes = Zeroizing::new(Vec::with_capacity(room));
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadError::Io {
            path: path.display().to_string(),
            reason: io_reason(&e),
        })?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok((bytes, meta))
}

/// The name of the profile stored at `path`: its file stem.
pub fn profile_name_of(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Checks a profile name received from a client: a plain file stem, never a
/// path, so a request cannot make the daemon read outside its directory.
pub fn check_profile_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with('.') {
        return Err(format!(
            "{name:?} is not a profile name: use letters, digits, '-', '_' and '.', at most 64 characters, not starting with '.'"
        ));
    }
    Ok(())
}

/// The file that holds profile `name` in the profiles directory `dir`: the
/// one place that turns a name into a path. The name is checked first, so a
/// name from a request or a command line can never reach another path.
pub fn profile_path(dir: &Path, name: &str) -> Result<PathBuf, String> {
    check_profile_name(name)?;
    Ok(dir.join(format!("{name}.toml")))
}

/// The key files profile text names (`tunnel.private_key_file`,
/// `tunnel.peer.preshared_key_file`), as written: the files [`parse`] would
/// read. Text that is not a profile names none, since `parse` refuses it
/// before reading any file.
pub fn key_files_named(text: &str) -> Vec<String> {
    let Ok(file) = toml::from_str::<ProfileFile>(text) else {
        return Vec::new();
    };
    [file.tunnel.private_key_file, file.tunnel.peer.preshared_key_file]
        .into_iter()
        .flatten()
        .collect()
}

/// Parses and validates profile text. `base` is the directory that relative
/// key paths are taken from; `file_mode` is the profile file's mode, which
/// decides whether an inline private key is acceptable.
pub fn parse(name: &str, text: &str, base: &Path, file_mode: u32) -> Result<Profile, ProfileError> {
    // The path of the field a type error is in (`allow[0].tcp[0]`), not
    // only its line: serde_path_to_error follows the deserializer.
    let deserializer = toml::Deserializer::parse(text).map_err(|e| toml_error(name, text, &e, ""))?;
    let file: ProfileFile = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        toml_error(name, text, e.inner(), if path == "." { "" } else { &path })
    })?;
    Validator {
        name,
        base,
        file_mode,
    }
    .profile(file)
}

/// A TOML or type error as `FIELD, line N: message`, in words people use
/// for the types (`a whole number`, not `i64`).
fn toml_error(name: &str, text: &str, e: &toml::de::Error, field: &str) -> ProfileError {
    let message = e
        .message()
        .trim()
        .replace("expected i64", "expected a whole number")
        .replace("expected u64", "expected a whole number")
        .replace("a sequence", "a list ([...])");
    let line = e
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    match (field, line) {
        ("", Some(line)) => ProfileError::new(name, format!("line {line}"), message),
        ("", None) => ProfileError::whole(name, message),
        (field, Some(line)) => ProfileError::new(name, format!("{field} (line {line})"), message),
        (field, None) => ProfileError::new(name, field, message),
    }
}

struct Validator<'a> {
    name: &'a str,
    base: &'a Path,
    file_mode: u32,
}

impl Validator<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ProfileError {
        ProfileError::new(self.name, field, message)
    }

    fn profile(&self, file: ProfileFile) -> Result<Profile, ProfileError> {
        let tunnel = self.tunnel(file.tunnel)?;
        if file.dns.servers.is_empty() {
            return Err(self.err(
                "dns.servers",
                "no DNS server is given; name at least one pinned resolver",
            ));
        }
        let dns_servers = file
            .dns
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<IpAddr>()
                    .map_err(|_| self.err(format!("dns.servers[{i}]"), format!("{s:?} is not an IP address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if file.allow.is_empty() {
            return Err(self.err("allow", "the allow list is empty, so the session would reach nothing; add at least one [[allow]] host"));
        }
        let allow = file
            .allow
            .into_iter()
            .enumerate()
            .map(|(i, a)| self.allow(i, a))
            .collect::<Result<Vec<_>, _>>()?;
        let handshake_timeout_secs = match file.options.handshake_timeout_secs {
            None => DEFAULT_HANDSHAKE_TIMEOUT_SECS,
            Some(s) if (1..=300).contains(&s) => s as u64,
            Some(s) => {
                return Err(self.err(
                    "options.handshake_timeout_secs",
                    format!("{s} is out of range 1-300"),
                ));
            }
        };
        let audit_ca = match &file.audit.ca {
            Some(ca) => Some(self.audit_ca(ca)?),
            None => None,
        };
        let shape = match file.privacy.shape.as_deref() {
            None => TrafficShape::default(),
            Some(text) => text.parse().map_err(|m| self.err("privacy.shape", m))?,
        };
        let transport = self.transport(&file.gateway, shape)?;
        Ok(Profile {
            name: self.name.to_string(),
            path: PathBuf::new(),
            description: file.description,
            tunnel,
            dns_servers,
            allow,
            allow_lan: file.options.allow_lan,
            handshake_timeout: Duration::from_secs(handshake_timeout_secs),
            audit_ca,
            shape,
            transport,
            gateway_enforces_allowlist: file.gateway.enforces_allowlist,
        })
    }

    /// `[gateway]`: `transport` is one of three; TCP needs `tcp_endpoint`
    /// as an address and port (no name: it would have to be looked up in
    /// clear), and cover traffic, which is a UDP stream of its own, cannot
    /// go over TCP.
    fn transport(&self, gateway: &GatewaySection, shape: TrafficShape) -> Result<Transport, ProfileError> {
        let relay = match &gateway.tcp_endpoint {
            None => None,
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                self.err(
                    "gateway.tcp_endpoint",
                    format!("{text:?} is not an address and port (such as \"198.51.100.2:443\"); the relay is given by address so that nothing is looked up outside the tunnel"),
                )
            })?),
        };
        if relay.is_some_and(|r| r.port() == 0) {
            return Err(self.err("gateway.tcp_endpoint", "port 0 is out of range 1-65535"));
        }
        let transport = match (gateway.transport.as_deref(), relay) {
            (None | Some("udp"), None) => Transport::Udp,
            (None | Some("udp"), Some(_)) => {
                return Err(self.err(
                    "gateway.tcp_endpoint",
                    "is only used with transport = \"tcp\" or \"auto\"; set one of them or remove it",
                ));
            }
            (Some("tcp" | "auto"), None) => {
                return Err(self.err(
                    "gateway.tcp_endpoint",
                    "is missing: TCP needs the address and port of the relay beside the gateway (such as \"198.51.100.2:443\")",
                ));
            }
            (Some("tcp"), Some(relay)) => Transport::Tcp { relay },
            (Some("auto"), Some(relay)) => Transport::Auto { relay },
            (Some(other), _) => {
                return Err(self.err(
                    "gateway.transport",
                    format!("{other:?} is not a transport; use {}", Transport::CHOICES),
                ));
            }
        };
        if transport != Transport::Udp && shape == TrafficShape::Cover {
            return Err(self.err(
                "gateway.transport",
                "cover traffic (privacy.shape = \"cover\") needs UDP to the gateway; use transport = \"udp\" or another shape",
            ));
        }
        Ok(transport)
    }

    /// `[audit] ca`: a readable file of PEM certificates (a relative path
    /// is taken from the profile's directory). Only certificates are read
    /// here; whether they sign the host's chain is the audit's question.
    fn audit_ca(&self, ca: &str) -> Result<PathBuf, ProfileError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::CertificateDer;
        let field = "audit.ca";
        let path = if Path::new(ca).is_absolute() {
            PathBuf::from(ca)
        } else {
            self.base.join(ca)
        };
        let (bytes, _) = read_bounded(&path, MAX_CA_FILE_BYTES, "a CA certificate")
            .map_err(|e| self.err(field, e.to_string()))?;
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(&bytes) {
            cert.map_err(|e| {
                self.err(
                    field,
                    format!("{} is not a readable PEM certificate file ({e})", path.display()),
                )
            })?;
            count += 1;
        }
        if count == 0 {
            return Err(self.err(
                field,
                format!(
                    "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the practice's CA certificate",
                    path.display()
                ),
            ));
        }
        Ok(path)
    }

    fn tunnel(&self, mut t: TunnelSection) -> Result<Tunnel, ProfileError> {
        // Wiped on every way out of here.
        let inline_key = t.private_key.take().map(Zeroizing::new);
        let private_key = match (&t.private_key_file, inline_key.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(self.err("tunnel", "give either private_key_file or private_key, not both"));
            }
            (None, None) => {
                return Err(self.err(
                    "tunnel",
                    "no private key: set private_key_file (a file with mode 0600)",
                ));
            }
            (Some(file), None) => self.key_file("tunnel.private_key_file", file)?,
            (None, Some(inline)) => {
                if self.file_mode & 0o077 != 0 {
                    return Err(self.err(
                        "tunnel.private_key",
                        format!(
                            "an inline private key needs the profile file to be readable by its owner only (mode 0600), but it is {:04o}",
                            self.file_mode & 0o7777
                        ),
                    ));
                }
                decode_key(inline).map_err(|m| self.err("tunnel.private_key", m))?
            }
        };
        if t.address.is_empty() {
            return Err(self.err("tunnel.address", "no tunnel address is given"));
        }
        let addresses = t
            .address
            .iter()
            .enumerate()
            .map(|(i, a)| {
                a.parse::<IpCidr>()
                    .map_err(|m| self.err(format!("tunnel.address[{i}]"), m))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let has_v6 = addresses.iter().any(IpCidr::is_ipv6);
        let min_mtu = if has_v6 { 1280 } else { 576 };
        let mtu = match t.mtu {
            None => DEFAULT_MTU,
            Some(m) if (min_mtu..=9000).contains(&m) => m as u16,
            Some(m) => {
                let why = if has_v6 { " (IPv6 needs at least 1280)" } else { "" };
                return Err(self.err("tunnel.mtu", format!("{m} is out of range {min_mtu}-9000{why}")));
            }
        };
        let interface = t.interface.unwrap_or_else(|| DEFAULT_INTERFACE.to_string());
        check_interface_name(&interface).map_err(|m| self.err("tunnel.interface", m))?;
        let peer = self.peer(t.peer)?;
        Ok(Tunnel {
            private_key,
            addresses,
            mtu,
            interface,
            peer,
        })
    }

    fn peer(&self, p: PeerSection) -> Result<Peer, ProfileError> {
        let public_key = decode_key(&p.public_key).map_err(|m| {
            self.err(
                "tunnel.peer.public_key",
                format!("{m}; put the gateway's public key here, as whoever runs the gateway gives it"),
            )
        })?;
        if is_low_order(&public_key) {
            return Err(self.err(
                "tunnel.peer.public_key",
                "is not a usable public key (all zeros or another low-order point, which would make the tunnel's keys predictable); put the gateway's real public key here",
            ));
        }
        let endpoint = parse_endpoint(&p.endpoint).map_err(|m| self.err("tunnel.peer.endpoint", m))?;
        let preshared_key = match &p.preshared_key_file {
            Some(file) => Some(self.key_file("tunnel.peer.preshared_key_file", file)?),
            None => None,
        };
        let persistent_keepalive = match p.persistent_keepalive {
            None | Some(0) => None,
            Some(k) if (1..=65535).contains(&k) => Some(k as u16),
            Some(k) => {
                return Err(self.err(
                    "tunnel.peer.persistent_keepalive",
                    format!("{k} is out of range 0-65535 seconds"),
                ));
            }
        };
        Ok(Peer {
            public_key,
            endpoint,
            preshared_key,
            persistent_keepalive,
        })
    }

    fn allow(&self, i: usize, a: AllowSection) -> Result<AllowRule, ProfileError> {
        let field = format!("allow[{i}]");
        let host = parse_host(&a.host).map_err(|m| self.err(format!("{field}.host"), m))?;
        if a.tcp.is_empty() && a.udp.is_empty() {
            return Err(self.err(
                &field,
                format!("{} lists no tcp or udp port, so it would allow nothing", a.host),
            ));
        }
        let ports = |proto: &str, list: &[PortSpec]| -> Result<Vec<PortRange>, ProfileError> {
            let field = format!("{field}.{proto}");
            let mut out: Vec<PortRange> = Vec::with_capacity(list.len());
            for spec in list {
                let range = match spec {
                    PortSpec::Number(p) => u16::try_from(*p)
                        .ok()
                        .filter(|p| *p >= 1)
                        .map(PortRange::single)
                        .ok_or_else(|| format!("port {p} is out of range 1-65535")),
                    PortSpec::Text(text) => text.parse::<PortRange>(),
                }
                .map_err(|m| self.err(&field, m))?;
                // The same port twice is harmless and kept once; two
                // different entries that share ports are a mistake (and
                // would be overlapping elements in the firewall's sets).
                if out.contains(&range) {
                    continue;
                }
                if let Some(other) = out.iter().find(|o| o.overlaps(&range)) {
                    return Err(self.err(
                        &field,
                        format!("{other} and {range} overlap; list each port once"),
                    ));
                }
                out.push(range);
            }
            Ok(out)
        };
        Ok(AllowRule {
            host,
            tcp: ports("tcp", &a.tcp)?,
            udp: ports("udp", &a.udp)?,
        })
    }

    /// Reads a key file, insisting that only root (or the daemon's own user)
    /// owns it and nobody else can read it.
    fn key_file(&self, field: &str, file: &str) -> Result<Key, ProfileError> {
        let path = if Path::new(file).is_absolute() {
            PathBuf::from(file)
        } else {
            self.base.join(file)
        };
        let (file, meta) = open_regular(&path, "a key").map_err(|e| match e {
            // A preshared key is a secret both ends hold: it comes from the
            // gateway's side, so keygen's advice would be wrong for it.
            ReadError::Io { reason, .. } if !path.exists() && field.ends_with("preshared_key_file") => self.err(
                field,
                format!(
                    "key file {} does not exist ({reason}); a preshared key comes from whoever runs the gateway: save the one they gave you there (mode 0600), or delete preshared_key_file if they gave you none",
                    path.display()
                ),
            ),
            ReadError::Io { reason, .. } if !path.exists() => self.err(
                field,
                format!(
                    "key file {} does not exist ({reason}); make it with `sessionctl keygen --out {}` and give the public key it prints to whoever runs the gateway",
                    path.display(),
                    path.display()
                ),
            ),
            ReadError::Io { reason, .. } if reason == "Permission denied" => self.err(
                field,
                format!(
                    "cannot read key file {}: {reason}; key files are readable by root only, so check this profile with sudo",
                    path.display()
                ),
            ),
            e => self.err(field, e.to_string()),
        })?;
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != 0 && meta.uid() != euid {
            return Err(self.err(
                field,
                format!(
                    "key file {} must be owned by root, but its owner is uid {}",
                    path.display(),
                    meta.uid()
                ),
            ));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(self.err(
                field,
                format!(
                    "key file {} is readable by group or others (mode {:04o}); run chmod 600 on it",
                    path.display(),
                    meta.mode() & 0o7777
                ),
            ));
        }
        let unreadable = |e: std::io::Error| {
            self.err(
                field,
                format!("cannot read key file {}: {}", path.display(), io_reason(&e)),
            )
        };
        // Into a buffer that is wiped when dropped, with room for the whole
        // file reserved first (a grown buffer would leave copies behind).
        let mut text = Zeroizing::new(Vec::with_capacity(KEY_FILE_MAX_BYTES + 1));
        {
            use std::io::Read;
            file.take(KEY_FILE_MAX_BYTES as u64 + 1)
                .read_to_end(&mut text)
                .map_err(unreadable)?;
        }
        if text.len() > KEY_FILE_MAX_BYTES {
            return Err(self.err(
                field,
                format!(
                    "key file {} is longer than a WireGuard key file can be",
                    path.display()
                ),
            ));
        }
        let text = std::str::from_utf8(&text)
            .map_err(|_| self.err(field, format!("key file {}: is not text", path.display())))?;
        decode_key(text.trim()).map_err(|m| self.err(field, format!("key file {}: {m}", path.display())))
    }
}

/// Decodes a base64 WireGuard key (32 bytes).
pub fn decode_key(text: &str) -> Result<Key, String> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| "is not valid base64 (expected a 44-character WireGuard key)".to_string())?,
    );
    let array: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        format!(
            "decodes to {} bytes, but a WireGuard key is 32 bytes",
            bytes.len()
        )
    })?;
    Ok(Key::from_bytes(array))
}

/// Whether a peer public key is one of Curve25519's low-order points (the
/// all-zero key among them): a Diffie-Hellman with it gives the all-zero
/// secret whatever our private key is, so it is no key at all.
pub fn is_low_order(public_key: &Key) -> bool {
    use x25519_dalek::{PublicKey, StaticSecret};
    let ours = StaticSecret::random_from_rng(rand_core::OsRng);
    !ours
        .diffie_hellman(&PublicKey::from(*public_key.as_bytes()))
        .was_contributory()
}

/// Parses `host:port` or `[v6]:port`.
pub fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{text:?} has no port; write [ADDRESS]:PORT"))?;
        h.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{h:?} is not an IPv6 address"))?;
        (h.to_string(), p)
    } else {
        let (h, p) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} has no port; write HOST:PORT, e.g. gw.example:51820"))?;
        if h.contains(':') {
            return Err(format!(
                "{text:?}: put an IPv6 address in brackets, e.g. [2001:db8::1]:51820"
            ));
        }
        if h.parse::<IpAddr>().is_err() {
            check_hostname(h)?;
        }
        (h.to_string(), p)
    };
    let port = port
        .parse::<u32>()
        .ok()
        .filter(|p| (1..=65535).contains(p))
        .ok_or_else(|| format!("port {port:?} is out of range 1-65535"))? as u16;
    Ok(Endpoint { host, port })
}

pub fn parse_host(text: &str) -> Result<Host, String> {
    if text.contains('/') || text.parse::<IpAddr>().is_ok() {
        return text.parse::<IpCidr>().map(Host::Net);
    }
    check_hostname(text)?;
    Ok(Host::Name(text.trim_end_matches('.').to_ascii_lowercase()))
}

/// A DNS name of letters, digits and hyphens, labels of 1-63 characters.
pub fn check_hostname(name: &str) -> Result<(), String> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let labels_ok = !trimmed.is_empty()
        && trimmed.len() <= 253
        && trimmed.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if labels_ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid host name, IP address or CIDR"))
    }
}

fn check_interface_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an interface name: 1-15 letters, digits, '-' or '_'"
        ))
    }
}

/// Every `*.toml` profile in `dir`, valid or not, sorted by name.
pub fn load_dir(dir: &Path) -> Result<Vec<Result<Profile, ProfileError>>, std::io::Error> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
        .collect();
    paths.sort();
    Ok(paths.iter().map(|p| Profile::load(p)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const PEER: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

    fn good() -> String {
        format!(
            r#"
description = "lab"
[tunnel]
private_key = "{PRIV}"
address = ["192.0.2.66/32", "2001:db8:66::2/128"]
[tunnel.peer]
public_key = "{PEER}"
endpoint = "198.51.100.2:51820"
persistent_keepalive = 25
[dns]
servers = ["192.0.2.65"]
[[allow]]
host = "meet.test"
tcp = [443]
udp = [10000]
[[allow]]
host = "203.0.113.0/24"
tcp = [5349]
"#
        )
    }

    fn check(text: &str) -> Result<Profile, String> {
        parse("p", text, Path::new("/nonexistent"), 0o600).map_err(|e| e.to_string())
    }

    fn err(text: &str) -> String {
        match check(text) {
            Ok(_) => panic!("profile should be invalid:\n{text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn audit_ca_must_be_a_file_of_pem_certificates() {
        let dir = tempfile::tempdir().expect("temp dir");
        // A self-signed certificate's PEM shape: only the framing and the
        // base64 are checked here, not the DER inside.
        let pem = "-----BEGIN CERTIFICATE-----\nMIIBAA==\n-----END CERTIFICATE-----\n";
        std::fs::write(dir.path().join("lab-ca.pem"), pem).expect("write ca");
        std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").expect("write");
        let with = |ca: &str| {
            let text = format!("{}\n[audit]\nca = \"{ca}\"\n", good());
            parse("p", &text, dir.path(), 0o600).map_err(|e| e.to_string())
        };
        let p = with("lab-ca.pem").expect("valid");
        assert_eq!(p.audit_ca, Some(dir.path().join("lab-ca.pem")));
        assert_eq!(check(&good()).expect("valid").audit_ca, None);
        let e = with("empty.pem").expect_err("no certificate");
        assert!(
            e.starts_with("profile p: audit.ca: ") && e.contains("holds no PEM certificate"),
            "{e}"
        );
        let e = with("/nonexistent/ca.pem").expect_err("missing");
        assert!(
            e.starts_with("profile p: audit.ca: cannot read /nonexistent/ca.pem"),
            "{e}"
        );
        let e = err(&format!("{}\n[audit]\ncaa = \"x\"\n", good()));
        assert!(e.contains("unknown field `caa`"), "{e}");
    }

    #[test]
    fn the_gateway_transport_is_udp_tcp_or_auto_and_tcp_needs_a_relay_address() {
        assert_eq!(check(&good()).expect("valid").transport, Transport::Udp);
        let with = |section: &str| format!("{}\n[gateway]\n{section}\n", good());
        let relay: SocketAddr = "198.51.100.2:443".parse().expect("address");
        assert_eq!(
            check(&with("transport = \"auto\"\ntcp_endpoint = \"198.51.100.2:443\""))
                .expect("valid")
                .transport,
            Transport::Auto { relay }
        );
        assert_eq!(
            check(&with("transport = \"tcp\"\ntcp_endpoint = \"198.51.100.2:443\""))
                .expect("valid")
                .transport,
            Transport::Tcp { relay }
        );
        assert_eq!(
            check(&with("transport = \"udp\"")).expect("valid").transport,
            Transport::Udp
        );
        let e = err(&with("transport = \"quic\""));
        assert_eq!(
            e,
            "profile p: gateway.transport: \"quic\" is not a transport; use \"udp\", \"tcp\" or \"auto\""
        );
        let e = err(&with("transport = \"auto\""));
        assert!(
            e.starts_with("profile p: gateway.tcp_endpoint: is missing"),
            "{e}"
        );
        let e = err(&with(
            "transport = \"tcp\"\ntcp_endpoint = \"relay.practice.test:443\"",
        ));
        assert!(
            e.starts_with(
                "profile p: gateway.tcp_endpoint: \"relay.practice.test:443\" is not an address and port"
            ),
            "{e}"
        );
        let e = err(&with("transport = \"tcp\"\ntcp_endpoint = \"198.51.100.2:0\""));
        assert_eq!(
            e,
            "profile p: gateway.tcp_endpoint: port 0 is out of range 1-65535"
        );
        let e = err(&with("tcp_endpoint = \"198.51.100.2:443\""));
        assert!(
            e.starts_with("profile p: gateway.tcp_endpoint: is only used with"),
            "{e}"
        );
        let e = err(&format!(
            "{}\n[privacy]\nshape = \"cover\"\n",
            with("transport = \"auto\"\ntcp_endpoint = \"198.51.100.2:443\"")
        ));
        assert!(
            e.starts_with("profile p: gateway.transport: cover traffic"),
            "{e}"
        );
        let e = err(&with("relay = \"198.51.100.2:443\""));
        assert!(e.contains("unknown field `relay`"), "{e}");
    }

    #[test]
    fn a_good_profile_validates_with_defaults() {
        let p = check(&good()).expect("valid");
        assert_eq!(p.tunnel.mtu, DEFAULT_MTU);
        assert_eq!(p.tunnel.interface, "sg0");
        assert_eq!(p.tunnel.peer.endpoint.to_string(), "198.51.100.2:51820");
        assert_eq!(p.tunnel.peer.persistent_keepalive, Some(25));
        assert_eq!(p.allow[0].host, Host::Name("meet.test".into()));
        assert_eq!(p.allow[1].host.to_string(), "203.0.113.0/24");
        assert_eq!(p.handshake_timeout, Duration::from_secs(10));
        assert!(!p.allow_lan);
        assert_eq!(p.shape, TrafficShape::Spec);
    }

    #[test]
    fn the_privacy_shape_is_one_of_three_and_a_wrong_one_names_the_field() {
        for (text, shape) in [
            ("spec", TrafficShape::Spec),
            ("pad", TrafficShape::Pad),
            ("cover", TrafficShape::Cover),
        ] {
            let p = check(&format!("{}[privacy]\nshape = \"{text}\"\n", good())).expect("valid");
            assert_eq!(p.shape, shape);
        }
        assert_eq!(
            err(&format!("{}[privacy]\nshape = \"padded\"\n", good())),
            "profile p: privacy.shape: \"padded\" is not a shape; use \"spec\", \"pad\" or \"cover\""
        );
        let e = err(&format!("{}[privacy]\nshape = 1\n", good()));
        assert!(e.starts_with("profile p: privacy.shape (line "), "{e}");
        let e = err(&format!("{}[privacy]\nrate = 1\n", good()));
        assert!(e.contains("unknown field `rate`"), "{e}");
    }

    #[test]
    fn unknown_fields_are_errors_with_a_line() {
        let e = err(&good().replace("[dns]", "[dns]\nservrs = [\"x\"]"));
        assert!(e.contains("unknown field `servrs`"), "{e}");
        assert!(e.starts_with("profile p: dns.servrs (line "), "{e}");
    }

    #[test]
    fn ports_out_of_range_name_the_field() {
        let text = good().replace("tcp = [5349]", "tcp = [5349]\nudp = [70000]");
        assert_eq!(
            err(&text),
            "profile p: allow[1].udp: port 70000 is out of range 1-65535"
        );
        let text = good().replace("tcp = [443]", "tcp = [0]");
        assert_eq!(
            err(&text),
            "profile p: allow[0].tcp: port 0 is out of range 1-65535"
        );
    }

    #[test]
    fn bad_keys_are_explained() {
        let e = err(&good().replace(PEER, "not base64!"));
        assert!(
            e.starts_with("profile p: tunnel.peer.public_key: is not valid base64"),
            "{e}"
        );
        let e = err(&good().replace(PEER, "AAAA"));
        assert_eq!(
            e,
            "profile p: tunnel.peer.public_key: decodes to 3 bytes, but a WireGuard key is 32 bytes; \
             put the gateway's public key here, as whoever runs the gateway gives it"
        );
        // The all-zero key, and a low-order point (order 8), are no keys.
        for low in [
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA=",
        ] {
            let e = err(&good().replace(PEER, low));
            assert!(
                e.starts_with("profile p: tunnel.peer.public_key: is not a usable public key"),
                "{low}: {e}"
            );
        }
    }

    #[test]
    fn port_ranges_are_read_and_checked() {
        // A lone port is a number, as it always was.
        let e = err(&good().replace("udp = [10000]", "udp = [\"10000\"]"));
        assert!(e.starts_with("profile p: allow[0].udp[0] (line "), "{e}");
        assert!(
            e.contains("invalid type: string \"10000\", expected a port (a whole number)"),
            "{e}"
        );
        let p =
            check(&good().replace("udp = [10000]", "udp = [7882, \"50000-60000\", 10000]")).expect("valid");
        assert_eq!(
            p.allow[0].udp,
            vec![
                PortRange::single(7882),
                PortRange {
                    first: 50000,
                    last: 60000
                },
                PortRange::single(10000)
            ]
        );
        for (ports, message) in [
            ("[\"60000-50000\"]", "the range \"60000-50000\" runs backwards; write the lower port first, as \"50000-60000\""),
            ("[\"50000-70000\"]", "port 70000 is out of range 1-65535"),
            ("[\"0-10\"]", "port 0 is out of range 1-65535"),
            ("[\"50000-\"]", "\"50000-\" is not a port or a range of ports; write a port such as 443 or a range such as \"50000-60000\""),
            ("[\"ten-eleven\"]", "\"ten-eleven\" is not a port or a range of ports; write a port such as 443 or a range such as \"50000-60000\""),
            ("[\"50000-60000\", 55555]", "50000-60000 and 55555 overlap; list each port once"),
            ("[\"50000-60000\", \"59000-61000\"]", "50000-60000 and 59000-61000 overlap; list each port once"),
        ] {
            let e = err(&good().replace("udp = [10000]", &format!("udp = {ports}")));
            assert_eq!(e, format!("profile p: allow[0].udp: {message}"), "{ports}");
        }
        // The same port twice is kept once; a range of one port is a port.
        let p =
            check(&good().replace("udp = [10000]", "udp = [10000, 10000, \"7882-7882\"]")).expect("valid");
        assert_eq!(
            p.allow[0].udp,
            vec![PortRange::single(10000), PortRange::single(7882)]
        );
        // On the wire a port stays a number and a range is a string.
        assert_eq!(
            serde_json::to_string(&p.allow[0].udp).ok(),
            Some("[10000,7882]".into())
        );
        assert_eq!(
            serde_json::to_string(&[PortRange {
                first: 50000,
                last: 60000
            }])
            .ok(),
            Some("[\"50000-60000\"]".into())
        );
    }

    #[test]
    fn the_gateway_enforced_kind_is_read() {
        assert!(!check(&good()).expect("valid").gateway_enforces_allowlist);
        let p = check(&format!("{}[gateway]\nenforces_allowlist = true\n", good())).expect("valid");
        assert!(p.gateway_enforces_allowlist);
        let e = err(&format!("{}[gateway]\nenforces = true\n", good()));
        assert!(e.contains("unknown field `enforces`"), "{e}");
    }

    #[test]
    fn type_errors_name_the_field_path() {
        let e = err(&good().replace("tcp = [443]", "tcp = [true]"));
        assert!(e.starts_with("profile p: allow[0].tcp[0] (line "), "{e}");
        assert!(
            e.contains("expected a port (a whole number) or a range of ports"),
            "{e}"
        );
        let e = err(&good().replace("persistent_keepalive = 25", "persistent_keepalive = \"25\""));
        assert!(
            e.starts_with("profile p: tunnel.peer.persistent_keepalive (line "),
            "{e}"
        );
    }

    #[test]
    fn bad_addresses_and_hosts() {
        let e = err(&good().replace("192.0.2.66/32", "192.0.2.666/32"));
        assert_eq!(
            e,
            "profile p: tunnel.address[0]: \"192.0.2.666\" is not an IP address"
        );
        let e = err(&good().replace("192.0.2.66/32", "192.0.2.66/33"));
        assert_eq!(
            e,
            "profile p: tunnel.address[0]: prefix /33 is not between /0 and /32"
        );
        let e = err(&good().replace("meet.test", "meet_practice!.test"));
        assert!(
            e.starts_with("profile p: allow[0].host: \"meet_practice!.test\" is not a valid host name"),
            "{e}"
        );
        let e = err(&good().replace("203.0.113.0/24", "203.0.113.0/40"));
        assert!(e.starts_with("profile p: allow[1].host: prefix /40"), "{e}");
        let e = err(&good().replace("\"192.0.2.65\"", "\"resolver.test\""));
        assert_eq!(
            e,
            "profile p: dns.servers[0]: \"resolver.test\" is not an IP address"
        );
    }

    #[test]
    fn endpoint_needs_a_port() {
        let e = err(&good().replace("198.51.100.2:51820", "gw.practice.test"));
        assert!(
            e.starts_with("profile p: tunnel.peer.endpoint: \"gw.practice.test\" has no port"),
            "{e}"
        );
        let e = err(&good().replace("198.51.100.2:51820", "gw.test:0"));
        assert_eq!(
            e,
            "profile p: tunnel.peer.endpoint: port \"0\" is out of range 1-65535"
        );
        assert_eq!(
            parse_endpoint("[2001:db8::1]:51820").map(|e| e.to_string()),
            Ok("[2001:db8::1]:51820".into())
        );
        assert!(parse_endpoint("2001:db8::1:51820").is_err());
        assert_eq!(
            parse_endpoint("gw.test:51820").map(|e| e.host),
            Ok("gw.test".into())
        );
    }

    #[test]
    fn empty_lists_are_errors() {
        let e = err(&good().replace("servers = [\"192.0.2.65\"]", "servers = []"));
        assert_eq!(
            e,
            "profile p: dns.servers: no DNS server is given; name at least one pinned resolver"
        );
        let no_allow = good().split("[[allow]]").next().unwrap_or_default().to_string();
        assert!(err(&no_allow).starts_with("profile p: allow: the allow list is empty"));
        let e = err(&good().replace("tcp = [5349]", ""));
        assert_eq!(
            e,
            "profile p: allow[1]: 203.0.113.0/24 lists no tcp or udp port, so it would allow nothing"
        );
    }

    #[test]
    fn options_and_numbers_are_range_checked() {
        let e = err(&good().replace("persistent_keepalive = 25", "persistent_keepalive = 70000"));
        assert!(
            e.starts_with("profile p: tunnel.peer.persistent_keepalive: 70000 is out of range"),
            "{e}"
        );
        let e = err(&format!("{}\n[options]\nhandshake_timeout_secs = 0\n", good()));
        assert_eq!(
            e,
            "profile p: options.handshake_timeout_secs: 0 is out of range 1-300"
        );
        let e = err(&good().replace("[tunnel.peer]", "mtu = 1000\n[tunnel.peer]"));
        assert_eq!(
            e,
            "profile p: tunnel.mtu: 1000 is out of range 1280-9000 (IPv6 needs at least 1280)"
        );
        let e = err(&good().replace(
            "[tunnel.peer]",
            "interface = \"a-very-long-interface-name\"\n[tunnel.peer]",
        ));
        assert!(e.starts_with("profile p: tunnel.interface: "), "{e}");
    }

    #[test]
    fn inline_key_needs_a_private_profile_file() {
        let e = parse("p", &good(), Path::new("/"), 0o644).map_err(|e| e.to_string());
        assert_eq!(
            e.err().as_deref(),
            Some("profile p: tunnel.private_key: an inline private key needs the profile file to be readable by its owner only (mode 0600), but it is 0644")
        );
    }

    fn with_key_file(mode: u32, content: &str) -> Result<Profile, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("client.key");
        fs::write(&key, content).expect("write key");
        fs::set_permissions(&key, fs::Permissions::from_mode(mode)).expect("chmod");
        let text = good().replace(
            &format!("private_key = \"{PRIV}\""),
            "private_key_file = \"client.key\"",
        );
        parse("p", &text, dir.path(), 0o644).map_err(|e| e.to_string())
    }

    #[test]
    fn key_files_must_be_private_and_present() {
        assert!(with_key_file(0o600, PRIV).is_ok());
        let e = with_key_file(0o640, PRIV).err().unwrap_or_default();
        assert!(e.contains("is readable by group or others (mode 0640)"), "{e}");
        assert!(
            e.starts_with("profile p: tunnel.private_key_file: key file "),
            "{e}"
        );
        let e = with_key_file(0o600, "garbage").err().unwrap_or_default();
        assert!(e.contains("is not valid base64"), "{e}");
        let text = good().replace(
            &format!("private_key = \"{PRIV}\""),
            "private_key_file = \"missing.key\"",
        );
        let e = check(&text).err().unwrap_or_default();
        assert_eq!(
            e,
            "profile p: tunnel.private_key_file: key file /nonexistent/missing.key does not exist \
             (No such file or directory); make it with `sessionctl keygen --out /nonexistent/missing.key` \
             and give the public key it prints to whoever runs the gateway"
        );
        // A preshared key is not made here: it comes from the gateway's side.
        let text = good().replace(
            "[tunnel.peer]",
            "[tunnel.peer]\npreshared_key_file = \"missing.psk\"",
        );
        let e = check(&text).err().unwrap_or_default();
        assert_eq!(
            e,
            "profile p: tunnel.peer.preshared_key_file: key file /nonexistent/missing.psk does not exist \
             (No such file or directory); a preshared key comes from whoever runs the gateway: save the \
             one they gave you there (mode 0600), or delete preshared_key_file if they gave you none"
        );
    }

    #[test]
    fn key_files_owned_by_someone_else_are_refused() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root to give a file to another owner: run the tests as root"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("client.key");
        fs::write(&key, PRIV).expect("write key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");
        nix::unistd::chown(&key, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
        let text = good().replace(
            &format!("private_key = \"{PRIV}\""),
            "private_key_file = \"client.key\"",
        );
        let e = parse("p", &text, dir.path(), 0o644)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("must be owned by root, but its owner is uid 65534"),
            "{e}"
        );
    }

    #[test]
    fn profile_names_from_clients_are_never_paths() {
        assert!(check_profile_name("jitsi-practice").is_ok());
        assert!(check_profile_name("lab.v2").is_ok());
        for bad in ["../../etc/passwd", "/etc/passwd", "a/b", "", ".hidden", "x\0y"] {
            assert!(check_profile_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_profile_file_others_can_write_is_refused_on_load() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.toml");
        fs::write(&path, good()).expect("write profile");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(Profile::load(&path).is_ok());
        for mode in [0o620, 0o602, 0o666] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
            let e = Profile::load(&path)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains("writable by group or others") && e.contains("chmod go-w"),
                "mode {mode:o}: {e}"
            );
        }
    }

    #[test]
    fn a_key_file_longer_than_a_key_file_can_be_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("client.key");
        fs::write(&key, format!("{PRIV}\n{}", " ".repeat(KEY_FILE_MAX_BYTES))).expect("write key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");
        let text = good().replace(
            &format!("private_key = \"{PRIV}\""),
            "private_key_file = \"client.key\"",
        );
        let e = parse("p", &text, dir.path(), 0o644)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("longer than a WireGuard key file can be"), "{e}");
        fs::write(&key, format!("{PRIV}\n")).expect("write key");
        assert!(parse("p", &text, dir.path(), 0o644).is_ok());
    }
}
