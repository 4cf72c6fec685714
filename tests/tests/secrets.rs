//! Secrets ("no key material is ever logged or sent over the
//! socket"). A full session with sessiond at its most verbose
//! (SESSIOND_LOG=trace, every crate's events included), a preshared key on
//! top of the private key, a crash and a resume, profiles whose mistakes
//! sit right next to a key; then every log line, every sessionctl reply and
//! every file in the state directory is searched for each key in every form
//! it could be printed in. Run as root after `cargo build --workspace`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lab::{addr, wait_until, Daemon, Lab, Ns};

/// A key under a name, in the forms a careless `{}`/`{:?}`/hex dump would
/// print it.
struct Secret {
    name: &'static str,
    forms: Vec<String>,
    bytes: Vec<u8>,
}

impl Secret {
    fn new(name: &'static str, base64: &str) -> Secret {
        let base64 = base64.trim();
        let bytes = decode_base64(base64).unwrap_or_else(|| panic!("{name}: {base64:?} is not base64"));
        assert_eq!(bytes.len(), 32, "{name} is not a WireGuard key");
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let url_safe = base64.replace('+', "-").replace('/', "_");
        let forms = vec![
            // The unpadded form is a prefix of the padded one, so this
            // matches both.
            base64.trim_end_matches('=').to_string(),
            url_safe.trim_end_matches('=').to_string(),
            hex.clone(),
            hex.to_uppercase(),
            // `{:?}` of the byte array, and of its first half (a partial dump).
            format!("{bytes:?}"),
            format!("{:?}", &bytes[..16]).trim_end_matches(']').to_string(),
        ];
        Secret { name, forms, bytes }
    }

    /// The forms of this key that `haystack` contains.
    fn found_in(&self, haystack: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(haystack);
        let mut found: Vec<String> = self
            .forms
            .iter()
            .filter(|f| text.contains(f.as_str()))
            .cloned()
            .collect();
        if haystack
            .windows(self.bytes.len())
            .any(|w| w == self.bytes.as_slice())
        {
            found.push("the raw bytes".to_string());
        }
        found
    }
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in text.trim_end_matches('=').bytes() {
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

/// Everything a person or a program could read from the daemon: what each
/// command printed (stdout and stderr), by command.
#[derive(Default)]
struct Transcript {
    replies: Vec<(String, Vec<u8>)>,
}

impl Transcript {
    /// Runs `sessionctl ARGS`, keeps what it printed, returns stdout and
    /// the exit code.
    fn ctl(&mut self, daemon: &Daemon, args: &[&str]) -> (String, Option<i32>) {
        let out = daemon
            .ctl(args)
            .unwrap_or_else(|e| panic!("sessionctl {}: {e:#}", args.join(" ")));
        let mut printed = out.stdout.clone();
        printed.extend_from_slice(&out.stderr);
        self.replies
            .push((format!("sessionctl {}", args.join(" ")), printed));
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.status.code(),
        )
    }

    fn ctl_ok(&mut self, daemon: &Daemon, args: &[&str]) -> String {
        let (stdout, code) = self.ctl(daemon, args);
        assert_eq!(
            code,
            Some(0),
            "sessionctl {} failed: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&self.replies.last().map(|r| r.1.clone()).unwrap_or_default()),
            daemon.log()
        );
        stdout
    }

    fn keep(&mut self, what: &str, bytes: Vec<u8>) {
        self.replies.push((what.to_string(), bytes));
    }
}

/// Every regular file under `dir` (not following links out of it).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => out.extend(files_under(&path)),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
    out.sort();
    out
}

/// A stand-in for `sessiond` that runs the real one with SESSIOND_LOG=trace
/// (`ip netns exec` passes the environment on; `exec` keeps the pid).
fn trace_wrapper(lab: &Lab) -> PathBuf {
    let sessiond = lab::util::find_binary("sessiond").expect("sessiond binary");
    let path = lab.tmp_dir().join("sessiond-trace");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nSESSIOND_LOG=trace exec '{}' \"$@\"\n",
            sessiond.display()
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).expect("chmod the wrapper");
    path
}

#[test]
fn no_key_material_in_trace_logs_replies_or_state() {
    let lab = Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"));
    let (client_key_file, client_public) = lab.client_key().expect("client key");
    let profiles = lab.profiles_dir().expect("profiles dir");

    // A preshared key on both sides: the session only comes up if the
    // daemon really uses it.
    let psk = lab::util::run(&["wg", "genpsk"]).expect("wg genpsk");
    let psk_file = profiles.join("keys").join("psk");
    std::fs::write(&psk_file, &psk).expect("write psk");
    std::fs::set_permissions(&psk_file, std::fs::Permissions::from_mode(0o600)).expect("chmod psk");
    let psk_arg = psk_file.to_string_lossy().into_owned();
    lab.exec_ok(
        Ns::Gateway,
        &[
            "wg",
            "set",
            &lab.gateway_ifname(),
            "peer",
            &client_public,
            "preshared-key",
            &psk_arg,
        ],
    )
    .expect("give the gateway the psk");
    let files = lab
        .write_profile("lab", |t| {
            t.replace(
                "persistent_keepalive = 5",
                "persistent_keepalive = 5\npreshared_key_file = \"keys/psk\"",
            )
        })
        .expect("write profile");
    assert!(files.toml.contains("preshared_key_file"), "{}", files.toml);

    let client_private = std::fs::read_to_string(&client_key_file).expect("read client key");
    let gateway_private =
        std::fs::read_to_string(lab.tmp_dir().join("gateway.key")).expect("read gateway key");
    let secrets = [
        Secret::new("the client's private key", &client_private),
        Secret::new("the preshared key", &psk),
        Secret::new("the gateway's private key", &gateway_private),
    ];

    // Profiles whose mistakes sit next to the client's key: a typo in the
    // field name, and an inline key in a file others may read. Their errors
    // go to `profiles`, `check` and the log.
    let inline = |field: &str| {
        lab.default_profile_toml().replace(
            "private_key_file = \"keys/client.key\"",
            &format!("{field} = \"{}\"", client_private.trim()),
        )
    };
    for (name, text, mode) in [
        ("typo", inline("privte_key"), 0o600),
        ("readable", inline("private_key"), 0o644),
    ] {
        let path = profiles.join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("write profile");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    let sessiond = trace_wrapper(&lab);
    let sessionctl = lab::util::find_binary("sessionctl").expect("sessionctl binary");
    let mut daemon = lab
        .start_sessiond_binaries(&sessiond, &sessionctl, &[])
        .expect("start sessiond at trace level");
    let mut t = Transcript::default();

    let listed = t.ctl_ok(&daemon, &["profiles", "--json"]);
    assert!(listed.contains("unknown field `privte_key`"), "{listed}");
    assert!(listed.contains("an inline private key needs"), "{listed}");
    t.ctl_ok(&daemon, &["profiles"]);
    t.ctl_ok(&daemon, &["check", "lab"]);
    for name in ["typo", "readable"] {
        let (_, code) = t.ctl(&daemon, &["check", name]);
        assert_eq!(code, Some(2), "check {name}");
        let (_, code) = t.ctl(&daemon, &["start", name]);
        assert_eq!(code, Some(2), "start {name}");
    }
    let file = profiles.join("typo.toml").to_string_lossy().into_owned();
    let (_, code) = t.ctl(&daemon, &["check", &file]);
    assert_eq!(code, Some(2));

    lab.set_tunnel_allowed_profile(&files.toml)
        .expect("tunnel meter follows the profile");
    lab.reset_all_leaks().expect("reset");
    t.ctl_ok(&daemon, &["start", "lab"]);
    let status = t.ctl_ok(&daemon, &["status", "--json"]);
    assert!(status.contains("\"state\":\"active\""), "{status}");
    t.ctl_ok(&daemon, &["status"]);
    // Traffic through the tunnel and the DNS stub, so their code paths log.
    assert_eq!(
        lab.probe_tcp(Ns::Client, addr::MEET_NAME, 443),
        Ok(format!("peer={}", addr::GATEWAY_V6))
    );
    let _ = lab.dns_query(Ns::Client, addr::PUBLIC_DNS_V4, addr::OTHER_NAME, "A");
    // verify's verdict is not this test's business; what it prints is.
    t.ctl(&daemon, &["verify", "--json"]);
    t.ctl(&daemon, &["verify"]);
    t.ctl(&daemon, &["start", "lab"]);
    for path in files_under(daemon.state_dir()) {
        let bytes = std::fs::read(&path).expect("read state file");
        t.keep(&format!("state file {}", path.display()), bytes);
    }

    // A crash and a resume log their own lines.
    daemon.kill9().expect("kill -9");
    wait_until(Duration::from_secs(5), "sessiond gone", || !daemon.is_running()).expect("exit");
    daemon.restart().expect("restart sessiond");
    wait_until(Duration::from_secs(60), "the resumed session active", || {
        daemon.status().is_ok_and(|s| s["state"] == "active")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    t.ctl_ok(&daemon, &["status", "--json"]);
    lab.assert_no_leaks();
    t.ctl_ok(&daemon, &["stop"]);
    t.ctl_ok(&daemon, &["status", "--json"]);

    // Every log of every sessiond run, as bytes.
    let logs: Vec<PathBuf> = files_under(lab.tmp_dir())
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("sessiond."))
        })
        .collect();
    assert_eq!(logs.len(), 2, "expected two sessiond runs: {logs:?}");
    let mut lines = 0;
    let mut verbose = 0;
    for log in &logs {
        let bytes = std::fs::read(log).expect("read log");
        let text = String::from_utf8_lossy(&bytes).into_owned();
        lines += text.lines().count();
        verbose += text
            .lines()
            .filter(|l| l.contains("TRACE") || l.contains("DEBUG"))
            .count();
        t.keep(&format!("log {}", log.display()), bytes);
    }
    assert!(
        verbose > 0,
        "the log has no debug or trace line: SESSIOND_LOG=trace did not take"
    );
    println!(
        "searched {} log lines ({verbose} at debug/trace) and {} replies and files for {} keys",
        lines,
        t.replies.len() - logs.len(),
        secrets.len()
    );

    for (what, bytes) in &t.replies {
        println!("  {what}: {} bytes", bytes.len());
    }
    let mut leaks = Vec::new();
    for (what, bytes) in &t.replies {
        for secret in &secrets {
            for form in secret.found_in(bytes) {
                leaks.push(format!("{} ({form}) in {what}", secret.name));
            }
        }
    }
    assert!(leaks.is_empty(), "key material found:\n{}", leaks.join("\n"));
    // Nor the names applications asked for (no list of
    // destinations): other.test was asked and refused during the session.
    for (what, bytes) in t.replies.iter().filter(|(w, _)| w.starts_with("log ")) {
        assert!(
            !String::from_utf8_lossy(bytes).contains(addr::OTHER_NAME),
            "{what} names {}, which an application asked for",
            addr::OTHER_NAME
        );
    }
}

#[test]
fn the_secret_forms_are_the_ones_a_dump_would_print() {
    let s = Secret::new("k", "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=");
    // `echo ... | base64 -d | xxd -p`
    let hex = "c809f3e5317e9575c9b5ed78b638b7ce530dabe85ddab614220241801ddf0669";
    for shown in [
        "key=yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk".to_string(),
        format!("secret {hex}"),
        hex.to_uppercase(),
        format!("{:?}", s.bytes),
        "yAnz5TF-lXXJte14tji3zlMNq-hd2rYUIgJBgB3fBmk".to_string(),
    ] {
        assert!(!s.found_in(shown.as_bytes()).is_empty(), "{shown} not recognised");
    }
    assert!(!s.found_in(&[b"x".as_slice(), &s.bytes, b"y"].concat()).is_empty());
    // Public keys and other text are not mistaken for it.
    assert!(s
        .found_in(b"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw= c809f3e5")
        .is_empty());
}
