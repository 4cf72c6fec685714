//! The checks behind sessiond's fuzz targets, one function per target. Each
//! takes the raw fuzzer input, feeds it to the daemon's own code and panics
//! when the code panics or breaks one of the properties written down here.
//! The libFuzzer targets (fuzz_targets/*.rs) and the plain replay harness
//! (examples/replay.rs) both call these, so a crash found by one reproduces
//! with the other.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hickory_proto::op::{Message, OpCode, ResponseCode};
use sessiond::profile::{self, Host};
use sessiond::profile::key_files_named;

/// A target's check: takes the raw input, panics on a finding.
pub type Check = fn(&[u8]);

/// The targets by name, as `cargo fuzz run NAME` and `replay NAME` know them.
pub const TARGETS: &[(&str, Check)] = &[
    ("profile", profile),
    ("control", control),
    ("import", import),
    ("dns", dns),
];

/// A key that the profile seeds refer to (`keys/client.key`).
pub const CLIENT_KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

/// A directory standing in for the profiles dir: `keys/client.key` and
/// `keys/psk` (0600, valid), `keys/open.key` (0644) and `keys/bad.key`
/// (0600, not a key). Made once per process, removed at exit by nobody:
/// it lives in the temp dir and is tiny.
fn profiles_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("sg-fuzz-profiles-")
            .tempdir()
            .map(tempfile::TempDir::keep)
            .unwrap_or_else(|e| panic!("fuzz setup: cannot make a temp dir: {e}"));
        let keys = dir.join("keys");
        let write = |name: &str, text: &str, mode: u32| {
            let path = keys.join(name);
            std::fs::write(&path, text)
                .and_then(|_| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)))
                .unwrap_or_else(|e| panic!("fuzz setup: cannot write {}: {e}", path.display()));
        };
        std::fs::create_dir(&keys).unwrap_or_else(|e| panic!("fuzz setup: {e}"));
        write("client.key", &format!("{CLIENT_KEY}\n"), 0o600);
        write("psk", "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n", 0o600);
        write("open.key", &format!("{CLIENT_KEY}\n"), 0o644);
        write("bad.key", "not a key\n", 0o600);
        dir
    })
}

/// `sessiond::profile::parse` (parser and validator) on arbitrary text.
///
/// Properties: no panic; a valid profile satisfies every rule of docs/profiles.md
/// that the type system does not already; an error names the profile; and
/// an inline private key never shows up in the error a person (or a
/// `profiles --json` reply, or the log) sees.
pub fn profile(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Key files are read from disk: keep the fuzzer inside its own
    // directory (no /proc/kcore, no /dev/stdin).
    if key_files_named(text)
        .iter()
        .any(|p| p.starts_with('/') || p.contains("..") || p.contains('\0'))
    {
        return;
    }
    let doc = toml::from_str::<toml::Table>(text).ok();
    let inline_key = doc
        .as_ref()
        .and_then(|d| {
            d.get("tunnel")?
                .as_table()?
                .get("private_key")?
                .as_str()
                .map(str::to_string)
        })
        .map(|k| k.trim().to_string())
        .filter(|k| profile::decode_key(k).is_ok() && text.matches(k.as_str()).count() == 1);
    for mode in [0o600, 0o644] {
        match profile::parse("fuzz", text, profiles_dir(), mode) {
            Ok(p) => {
                check_valid_profile(&p);
                // The shape is the one written, or spec when none is.
                let written = doc
                    .as_ref()
                    .and_then(|d| d.get("privacy")?.get("shape")?.as_str().map(str::to_string));
                assert_eq!(written.as_deref().unwrap_or("spec"), p.shape.as_str());
            }
            Err(e) => {
                let shown = e.to_string();
                assert!(shown.starts_with("profile fuzz: "), "{shown:?}");
                assert!(!e.message.is_empty(), "an empty error message");
                if let Some(key) = &inline_key {
                    assert!(
                        !shown.contains(key.as_str()),
                        "the inline private key is in the error: {shown:?}"
                    );
                }
            }
        }
    }
}

fn check_valid_profile(p: &profile::Profile) {
    let t = &p.tunnel;
    assert!(
        !t.addresses.is_empty(),
        "a valid profile without tunnel addresses"
    );
    assert!(!p.dns_servers.is_empty(), "a valid profile without DNS servers");
    assert!(!p.allow.is_empty(), "a valid profile without allow rules");
    let min_mtu = if t.addresses.iter().any(|a| a.is_ipv6()) {
        1280
    } else {
        576
    };
    assert!((min_mtu..=9000).contains(&t.mtu), "mtu {} accepted", t.mtu);
    assert!(
        !t.interface.is_empty() && t.interface.len() <= 15,
        "interface {:?} accepted",
        t.interface
    );
    assert!(t.peer.endpoint.port != 0, "endpoint port 0 accepted");
    assert!(t.peer.persistent_keepalive != Some(0));
    let secs = p.handshake_timeout.as_secs();
    assert!((1..=300).contains(&secs), "handshake timeout {secs} s accepted");
    for a in &t.addresses {
        let max = if a.addr.is_ipv4() { 32 } else { 128 };
        assert!(a.prefix <= max, "prefix /{} accepted for {}", a.prefix, a.addr);
    }
    for rule in &p.allow {
        assert!(
            !(rule.tcp.is_empty() && rule.udp.is_empty()),
            "an allow rule without ports: {rule:?}"
        );
        for list in [&rule.tcp, &rule.udp] {
            for (i, r) in list.iter().enumerate() {
                assert!(r.first != 0, "port 0 accepted: {rule:?}");
                assert!(r.first <= r.last, "a backwards range accepted: {rule:?}");
                assert!(
                    !list[..i].iter().any(|o| o.overlaps(r)),
                    "overlapping ports accepted: {rule:?}"
                );
            }
        }
        match &rule.host {
            Host::Name(name) => {
                assert!(profile::check_hostname(name).is_ok(), "host {name:?} accepted");
                assert_eq!(
                    name,
                    &name.to_ascii_lowercase(),
                    "host names are kept in lower case"
                );
            }
            Host::Net(net) => {
                let max = if net.addr.is_ipv4() { 32 } else { 128 };
                assert!(net.prefix <= max, "{net} accepted");
            }
        }
    }
}

/// `sessiond::control::parse_request` on an arbitrary request line.
///
/// Properties: no panic; whatever it accepts encodes back to a line that
/// parses to the same request (so replies and logs can name it faithfully);
/// refusals carry a message.
pub fn control(data: &[u8]) {
    use sessiond::control::parse_request;
    match parse_request(data) {
        Ok(request) => {
            let line =
                serde_json::to_string(&request).unwrap_or_else(|e| panic!("cannot encode {request:?}: {e}"));
            assert_eq!(
                parse_request(line.as_bytes()),
                Ok(request),
                "round trip of {line}"
            );
        }
        Err(message) => assert!(!message.is_empty(), "an empty refusal"),
    }
}

/// `sessiond::import::import` on an arbitrary wg-quick file. The input's
/// first line holds the `--allow` arguments (separated by spaces); the rest
/// is the file.
///
/// Properties: no panic; an accepted file gives a profile that is valid TOML
/// with only the profile's top-level sections, and neither the private key
/// nor the preshared key appears in the profile text (they go to key files).
pub fn import(data: &[u8]) {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let (allow_line, text) = input.split_once('\n').unwrap_or((input, ""));
    // The client refuses a bad --allow before it reads the file.
    let Ok(allow) = allow_line
        .split_whitespace()
        .map(str::parse::<sessiond::import::AllowArg>)
        .collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    if skip_known() && known_import_bug(text) {
        return;
    }
    let Ok(imported) = sessiond::import::import("fuzz.conf", text, "keys/fuzz.key", "keys/fuzz.psk", &allow)
    else {
        return;
    };
    let secrets = std::iter::once(&imported.private_key).chain(imported.preshared_key.as_ref());
    for key in secrets.map(sessiond::keys::Key::to_base64) {
        // Only meaningful when the key is not also written elsewhere in the
        // input (as the peer's public key, or an --allow host).
        if input.matches(key.as_str()).count() == 1 {
            assert!(
                !imported.profile.contains(key.as_str()),
                "a secret key is in the imported profile:\n{}",
                imported.profile
            );
        }
    }
    let doc: toml::Table = toml::from_str(&imported.profile).unwrap_or_else(|e| {
        panic!(
            "the imported profile is not valid TOML ({e}):\n{}",
            imported.profile
        )
    });
    for section in doc.keys() {
        assert!(
            ["description", "tunnel", "dns", "allow"].contains(&section.as_str()),
            "the imported profile has a top-level {section:?}:\n{}",
            imported.profile
        );
    }
}

/// `SG_FUZZ_SKIP_KNOWN=1` steps around bugs that were found and reported
/// but are not fixed yet, so a run can look for new ones. Off by default:
/// then a known bug still fails the run.
fn skip_known() -> bool {
    static SKIP: OnceLock<bool> = OnceLock::new();
    *SKIP.get_or_init(|| std::env::var_os("SG_FUZZ_SKIP_KNOWN").is_some_and(|v| v == "1"))
}

/// Known: an `AllowedIPs` value is copied into a TOML comment as it is, so a
/// control character in it makes the imported profile invalid TOML.
fn known_import_bug(text: &str) -> bool {
    text.lines().any(|line| {
        line.trim_start().to_ascii_lowercase().starts_with("allowedips")
            && line
                .split('#')
                .next()
                .unwrap_or("")
                .chars()
                .any(|c| c.is_control() && c != '\t')
    })
}

/// The DNS stub's handling of one packet, as far as it is pure: the header
/// checks and the parse that `Inner::answer` does on every client packet,
/// the error reply it builds for one it cannot parse, the allowlist key of
/// the question (`sessiond::dns::canonical_name`), and `sessiond::dns::digest`
/// (what an answer adds to the allowlist) with the packet read as an
/// upstream answer to its own first question.
///
/// Properties: no panic; a canonical name is non-empty, lower case and
/// without a trailing dot; a digest follows at most 16 CNAME links and
/// lists each address once.
pub fn dns(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_canonical(text);
    }
    // What the stub drops before parsing: short packets and responses.
    if data.len() < 12 {
        return;
    }
    let message = match Message::from_vec(data) {
        Ok(m) => m,
        Err(_) => {
            // The stub answers FORMERR under the client's id and opcode.
            let id = u16::from_be_bytes([data[0], data[1]]);
            let op_code = OpCode::from_u8((data[2] >> 3) & 0x0f);
            let reply = Message::error_msg(id, op_code, ResponseCode::FormErr);
            let _ = reply.to_vec();
            return;
        }
    };
    // A local reply (REFUSED and friends) carries the client's questions back.
    let mut reply = Message::response(message.metadata.id, message.metadata.op_code);
    reply.metadata.response_code = ResponseCode::Refused;
    reply.add_queries(message.queries.iter().cloned());
    let _ = reply.to_vec();
    for q in &message.queries {
        check_canonical(&q.name.to_utf8());
        check_canonical(&q.name.to_ascii());
    }
    if let Some(question) = message.queries.first() {
        let (targets, addrs) = sessiond::dns::digest(&question.name, &message);
        assert!(targets.len() <= 16, "{} CNAME links followed", targets.len());
        for (i, (ip, _)) in addrs.iter().enumerate() {
            assert!(
                !addrs[..i].iter().any(|(seen, _)| seen == ip),
                "{ip} listed twice"
            );
        }
    }
}

fn check_canonical(text: &str) {
    if let Some(key) = sessiond::dns::canonical_name(text) {
        assert!(!key.is_empty(), "empty canonical name for {text:?}");
        assert!(
            !key.ends_with('.') || key.ends_with("\\."),
            "trailing dot in {key:?} for {text:?}"
        );
        assert!(
            !key.bytes().any(|b| b.is_ascii_uppercase()),
            "upper case in {key:?} for {text:?}"
        );
    }
}
