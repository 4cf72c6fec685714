//! The profile templates under `profiles/` (issue 16): every one passes
//! `sessionctl check` as shipped, once the key file it names exists. Runs
//! the real `sessionctl` binary; run after `cargo build --workspace`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lab::util;

fn sessionctl() -> PathBuf {
    util::find_binary("sessionctl").unwrap_or_else(|e| panic!("{e}"))
}

/// `sessionctl ARGS` in `dir`, against a socket nobody listens on, so
/// `check` reads the file itself as a user with the README would.
fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(sessionctl())
        .args(["--socket", "/nonexistent/sessiond.sock"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sessionctl: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every `*.toml` under `profiles/`, by name, sorted.
fn templates() -> Vec<(String, String)> {
    let dir = util::workspace_root().join("profiles");
    let mut found: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .map(|path| {
            let name = path.file_stem().expect("stem").to_string_lossy().into_owned();
            let body = std::fs::read_to_string(&path).expect("template");
            (name, body)
        })
        .collect();
    found.sort();
    found
}

/// The key file a template names (`private_key_file`, relative to the
/// profiles directory), read as TOML.
fn key_file_of(body: &str) -> String {
    let parsed: toml::Table = body.parse().expect("a template is TOML");
    parsed["tunnel"]["private_key_file"]
        .as_str()
        .expect("every template names a private key file")
        .to_string()
}

#[test]
fn every_template_under_profiles_passes_check_with_its_key_made_by_keygen() {
    let found = templates();
    for expected in [
        "jitsi-practice",
        "nextcloud-talk",
        "nextcloud-talk-hpb",
        "element-call",
        "janus",
        "signal-gateway",
        "client",
        "lab",
    ] {
        assert!(
            found.iter().any(|(name, _)| name == expected),
            "profiles/{expected}.toml is missing"
        );
    }
    for (name, body) in found {
        // What a practice does with a template: copies it next to a keys/
        // directory, makes the key file it names with keygen and puts in
        // the gateway's public key where the placeholder says (the lab's
        // own profile has a placeholder the lab fills in); any real public
        // key does for check. Nothing else is changed.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("keys")).expect("keys dir");
        let made = run_in(dir.path(), &["keygen", "--out", &key_file_of(&body)]);
        assert!(made.status.success(), "keygen for {name}: {}", text(&made.stderr));
        let gateway_key = text(&made.stdout).trim().to_string();
        let body = body
            .replace("REPLACE-WITH-THE-GATEWAY-PUBLIC-KEY-44-CHARS=", &gateway_key)
            .replace("@LAB_GATEWAY_PUBLIC_KEY@", &gateway_key);
        std::fs::write(dir.path().join(format!("{name}.toml")), body).expect("template copy");
        let out = run_in(dir.path(), &["check", &format!("./{name}.toml")]);
        assert!(
            out.status.success(),
            "profiles/{name}.toml does not pass check: {}",
            text(&out.stderr)
        );
        let said = text(&out.stdout);
        if name == "signal-gateway" {
            // The gateway-enforced kind says plainly who enforces the list.
            assert!(
                said.starts_with(&format!("profile {name} is valid; it is gateway-enforced:"))
                    && said.contains("trusts the practice's gateway, not itself, to enforce the allowlist"),
                "{said}"
            );
        } else {
            assert_eq!(said.trim(), format!("profile {name} is valid"));
        }
    }
}

/// The templates that want port ranges list them, as ranges.
#[test]
fn element_call_and_janus_list_their_media_ranges() {
    let found = templates();
    let body = |name: &str| {
        found
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.clone())
            .unwrap_or_else(|| panic!("no profiles/{name}.toml"))
    };
    assert!(body("element-call").contains(r#"udp = [7882, "50000-60000", 3478]"#));
    assert!(body("janus").contains(r#"udp = ["20000-40000"]"#));
    assert!(body("signal-gateway").contains("[gateway]\nenforces_allowlist = true"));
}

#[test]
fn every_template_says_what_it_needs_and_what_it_must_block() {
    for (name, body) in templates() {
        if name == "lab" || name == "client" {
            continue;
        }
        let comments: String = body
            .lines()
            .filter(|line| line.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            comments.contains("Needs:"),
            "profiles/{name}.toml does not say what it needs"
        );
        assert!(
            comments.contains("Must block"),
            "profiles/{name}.toml does not say what it must block"
        );
    }
}

#[test]
fn the_readme_table_lists_every_template() {
    let readme = std::fs::read_to_string(util::workspace_root().join("README.md")).expect("README.md");
    for (name, _) in templates() {
        assert!(
            readme
                .lines()
                .any(|line| line.starts_with(&format!("| `{name}.toml`"))),
            "the README's table of templates has no row for profiles/{name}.toml"
        );
    }
}
