//! `sessionctl audit` in the lab, against a real nginx on the video host
//! (203.0.113.10, meet.test) with certificates from a lab CA that openssl
//! makes at test time. One nginx, one server block per case on its own
//! port; one lab, three sessions (the findings, the clean host, and the
//! clean host without the profile's CA). The audit runs in the client
//! namespace as an unprivileged member of the control group, through the
//! session's tunnel. Run as root after `cargo build --workspace --bins`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use lab::{addr, util, wait_until, Daemon, Lab, Ns};
use serde_json::Value;

/// TLS 1.2 and 1.3, a good certificate, a careful config.js.
const PORT_TLS12: u16 = 9443;
/// TLS 1.3 only, a good certificate, a careful config.js: nothing to find.
const PORT_CLEAN: u16 = 9444;
/// TLS 1.3 only, a certificate that expired in 2024.
const PORT_EXPIRED: u16 = 9445;
/// TLS 1.3 only, a config.js with P2P on and a third-party avatar host.
const PORT_RISKY: u16 = 9446;
/// Allowed by the findings profile; nothing listens there.
const PORT_CLOSED: u16 = 9447;
/// TLS 1.3 only, a certificate that expires in 7 days.
const PORT_SOON: u16 = 9448;

const CAREFUL_CONFIG: &str = "var config = {\n    hosts: { domain: 'meet.test' },\n    bosh: 'https://meet.test/http-bind',\n    p2p: { enabled: false, stunServers: [ { urls: 'stun:meet.test:3478' } ] },\n    disableThirdPartyRequests: true,\n};\n";
const RISKY_CONFIG: &str = "var config = {\n    hosts: { domain: 'meet.test' },\n    // p2p: { enabled: false },\n    p2p: { enabled: true, stunServers: [ { urls: 'stun:meet.test:3478' } ] },\n    gravatarBaseURL: 'https://avatars.test/avatar/',\n};\n";
const PAGE: &str =
    "<!DOCTYPE html><html><head><script src=\"config.js\"></script></head><body>call</body></html>\n";

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

fn run(args: &[&str], dir: &Path) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]));
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A lab CA and leaf certificates for meet.test, made with openssl in
/// `dir`: good.pem (30 days), soon.pem (7 days), expired.pem (January
/// 2024), all with leaf.key; the CA is ca.pem.
fn make_certificates(dir: &Path) {
    std::fs::write(
        dir.join("lab-ca.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = sessiongate lab CA\n\
         [ca_ext]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n\
         [leaf_ext]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\nsubjectAltName = DNS:meet.test\n\
         [ca]\ndefault_ca = labca\n[labca]\ndatabase = index.txt\nnew_certs_dir = .\ncertificate = ca.pem\nprivate_key = ca.key\n\
         serial = serial\ndefault_md = sha256\npolicy = anything\nunique_subject = no\n[anything]\ncommonName = supplied\n",
    )
    .expect("write the openssl config");
    std::fs::write(dir.join("index.txt"), "").expect("write index.txt");
    std::fs::write(dir.join("serial"), "01\n").expect("write serial");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "openssl",
        "req",
        "-x509",
        "-config",
        "lab-ca.cnf",
        "-extensions",
        "ca_ext",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "60"]);
    run(&ca, dir);
    let mut csr = vec!["openssl", "req", "-new", "-subj", "/CN=meet.test"];
    csr.extend(ec);
    csr.extend(["-keyout", "leaf.key", "-out", "leaf.csr"]);
    run(&csr, dir);
    let sign = |out: &str, validity: &[&str]| {
        let mut args = vec![
            "openssl",
            "ca",
            "-batch",
            "-notext",
            "-config",
            "lab-ca.cnf",
            "-extensions",
            "leaf_ext",
            "-in",
            "leaf.csr",
            "-out",
            out,
        ];
        args.extend(validity);
        run(&args, dir);
    };
    sign("good.pem", &["-days", "30"]);
    sign("soon.pem", &["-days", "7"]);
    sign(
        "expired.pem",
        &["-startdate", "20240101000000Z", "-enddate", "20240201000000Z"],
    );
}

/// nginx's configuration: one server block per case, all on meet.test's
/// address, each on its own port with its own protocols, certificate and
/// web root.
fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    let server = |port: u16, protocols: &str, cert: &str, root: &str| {
        format!(
            "  server {{\n    listen {host}:{port} ssl;\n    server_name meet.test;\n    ssl_protocols {protocols};\n    \
             ssl_certificate {d}/{cert};\n    ssl_certificate_key {d}/leaf.key;\n    \
             add_header Strict-Transport-Security \"max-age=31536000\" always;\n    root {d}/{root};\n  }}\n",
            host = addr::HOST_V4
        )
    };
    let mut conf = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  \
         client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  \
         types {{ text/html html; application/javascript js; }}\n"
    );
    conf += &server(PORT_TLS12, "TLSv1.2 TLSv1.3", "good.pem", "careful");
    conf += &server(PORT_CLEAN, "TLSv1.3", "good.pem", "careful");
    conf += &server(PORT_EXPIRED, "TLSv1.3", "expired.pem", "careful");
    conf += &server(PORT_RISKY, "TLSv1.3", "good.pem", "risky");
    conf += &server(PORT_SOON, "TLSv1.3", "soon.pem", "careful");
    conf + "}\n"
}

/// Starts nginx in the host namespace (the lab kills it on drop) and
/// waits until every case's port listens.
fn start_nginx(lab: &Lab, dir: &Path) {
    for (root, config) in [("careful", CAREFUL_CONFIG), ("risky", RISKY_CONFIG)] {
        let web = dir.join(root);
        std::fs::create_dir_all(&web).expect("web root");
        std::fs::write(web.join("index.html"), PAGE).expect("index.html");
        std::fs::write(web.join("config.js"), config).expect("config.js");
    }
    std::fs::create_dir_all(dir.join("tmp")).expect("nginx temp dir");
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(dir)).expect("write nginx.conf");
    let conf_arg = conf.to_string_lossy().into_owned();
    let error_log = dir.join("error.log").to_string_lossy().into_owned();
    let prefix = dir.to_string_lossy().into_owned();
    let nginx = lab
        .spawn_named(
            Ns::Host,
            "nginx",
            &["nginx", "-p", &prefix, "-e", &error_log, "-c", &conf_arg],
        )
        .expect("start nginx");
    let ports = [PORT_TLS12, PORT_CLEAN, PORT_EXPIRED, PORT_RISKY, PORT_SOON];
    wait_until(Duration::from_secs(10), "nginx to listen on every port", || {
        let listening = lab.exec_ok(Ns::Host, &["ss", "-Htln"]).unwrap_or_default();
        ports
            .iter()
            .all(|p| listening.contains(&format!("{}:{p} ", addr::HOST_V4)))
            || !nginx.is_running()
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", util::read_text(&dir.join("error.log"))));
    assert!(
        nginx.is_running(),
        "nginx exited: {}{}",
        nginx.log(),
        util::read_text(&dir.join("error.log"))
    );
}

/// A throwaway control group and an unprivileged member (the lab's
/// namespaces share /etc/passwd), removed on drop.
struct Member {
    group: String,
    user: String,
}

impl Member {
    fn new(id: &str) -> Member {
        let (group, user) = (format!("sgaud{id}"), format!("sgaudu{id}"));
        util::run(&["groupadd", "--system", &group]).expect("groupadd");
        // Dropped (group removed) if useradd fails.
        let mut member = Member {
            group: group.clone(),
            user: String::new(),
        };
        util::run(&[
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--groups",
            &group,
            &user,
        ])
        .expect("useradd");
        member.user = user;
        member
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if !self.user.is_empty() {
            let _ = util::run(&["userdel", &self.user]);
        }
        let _ = util::run(&["groupdel", &self.group]);
    }
}

/// A profile allowing meet.test on `tcp` (and `udp`), with `[audit] ca`
/// when given; the tunnel meter follows it.
fn write_profile(lab: &Lab, name: &str, tcp: &[u16], udp: &[u16], ca: Option<&Path>) {
    let list = |ports: &[u16]| ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    let allow = format!(
        "[[allow]]\nhost = \"meet.test\"\ntcp = [{}]\nudp = [{}]\n",
        list(tcp),
        list(udp)
    );
    let files = lab
        .write_profile(name, |t| {
            let t = t.replace(
                "[[allow]]\nhost = \"meet.test\"\ntcp = [443]\nudp = [10000]\n",
                &allow,
            );
            match ca {
                Some(ca) => format!("{t}\n[audit]\nca = \"{}\"\n", ca.display()),
                None => t,
            }
        })
        .expect("write profile");
    assert!(
        files.toml.contains(&allow),
        "the lab profile changed: {}",
        files.toml
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

/// `sessionctl audit` as the unprivileged member: (exit code, stdout, stderr).
fn audit(daemon: &Daemon, member: &Member, args: &[&str]) -> (Option<i32>, String, String) {
    let mut full = vec!["audit"];
    full.extend_from_slice(args);
    let out: Output = daemon.ctl_as(&member.user, &full).expect("run sessionctl audit");
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// The JSON line of `check` at `port`, if the audit printed one.
fn line<'a>(report: &'a Value, port: Option<u16>, check: &str) -> Option<&'a Value> {
    report["lines"].as_array()?.iter().find(|l| {
        l["check"] == check
            && match port {
                Some(p) => l["port"] == p,
                None => l["port"].is_null(),
            }
    })
}

/// A line of the text report, as `ok` lines show a check at a port.
fn row(port: u16, check: &str, text: &str) -> String {
    format!("ok      {:<22}{check:<12}{text}", format!("meet.test:{port}"))
}

/// Collects what did not hold, so one run shows every case that fails.
#[derive(Default)]
struct Misses(Vec<String>);

impl Misses {
    /// The line exists, is (or is not) a finding, and its text contains `wanted`.
    fn expect(&mut self, report: &Value, port: Option<u16>, check: &str, finding: bool, wanted: &str) {
        self.expect_one_of(report, port, check, finding, &[wanted]);
    }

    /// As `expect`, with any one of `wanted` in the line: a certificate made
    /// for N days has N-1 whole days left, or N when the audit runs within
    /// the second it was signed.
    fn expect_one_of(
        &mut self,
        report: &Value,
        port: Option<u16>,
        check: &str,
        finding: bool,
        wanted: &[&str],
    ) {
        match line(report, port, check) {
            Some(l)
                if l["finding"] == finding
                    && wanted
                        .iter()
                        .any(|w| l["text"].as_str().unwrap_or("").contains(w)) => {}
            Some(l) => self.0.push(format!(
                "{check} at {port:?}: expected finding={finding} with {wanted:?}, got {l}"
            )),
            None => self
                .0
                .push(format!("{check} at {port:?}: no such line (expected {wanted:?})")),
        }
    }

    fn check(&mut self, ok: bool, what: String) {
        if !ok {
            self.0.push(what);
        }
    }
}

#[test]
fn audit_reports_each_weakness_of_the_far_end_and_passes_a_clean_host() {
    let lab = lab();
    // Readable by the unprivileged member: the CA certificate (public).
    let certs = tempfile::Builder::new()
        .prefix("sg-audit-")
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(certs.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    make_certificates(certs.path());
    std::fs::set_permissions(
        certs.path().join("ca.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod ca.pem");
    start_nginx(&lab, certs.path());
    let ca: PathBuf = certs.path().join("ca.pem");

    let member = Member::new(lab.id());
    // The member passes through the lab's private dir to the socket.
    std::fs::set_permissions(lab.tmp_dir(), std::fs::Permissions::from_mode(0o711)).expect("chmod lab dir");
    write_profile(
        &lab,
        "findings",
        &[PORT_TLS12, PORT_EXPIRED, PORT_RISKY, PORT_CLOSED, PORT_SOON],
        &[],
        Some(&ca),
    );
    write_profile(&lab, "clean", &[PORT_CLEAN], &[10000], Some(&ca));
    write_profile(&lab, "noca", &[PORT_CLEAN], &[10000], None);
    let daemon = lab
        .start_sessiond_for_group(&member.group)
        .expect("start sessiond");
    let mut misses = Misses::default();

    // No session: nothing to audit, exit 1.
    let (code, _, stderr) = audit(&daemon, &member, &[]);
    misses.check(
        code == Some(1) && stderr.contains("audit needs an active session"),
        format!("no session: exit {code:?}, {stderr}"),
    );

    // The findings profile: every weak port has its finding.
    daemon.ctl_ok(&["start", "findings"]).expect("start findings");
    lab.set_tunnel_allowed_profile(&util::read_text(&daemon.profiles_dir().join("findings.toml")))
        .expect("follow the profile");
    let (code, stdout, stderr) = audit(&daemon, &member, &["--json"]);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("audit --json printed no JSON ({e}): {stdout}\n{stderr}"));
    println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    misses.check(
        code == Some(5),
        format!("findings profile: exit {code:?} (want 5): {stderr}"),
    );
    misses.check(
        report["trust"] == format!("the profile's CA {}", ca.display()),
        format!("trust: {}", report["trust"]),
    );
    // TLS 1.2 accepted.
    misses.expect(
        &report,
        Some(PORT_TLS12),
        "tls1.2",
        true,
        &format!("meet.test:{PORT_TLS12} accepts TLS 1.2 (cipher suite TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384): allow only TLS 1.3 in its web server's TLS settings (nginx: ssl_protocols TLSv1.3;)."),
    );
    misses.expect(
        &report,
        Some(PORT_TLS12),
        "tls1.3",
        false,
        "accepted, cipher suite TLS13_",
    );
    misses.expect(&report, Some(PORT_TLS12), "tls1.0/1.1", false, "not probed");
    misses.expect(&report, Some(PORT_RISKY), "tls1.2", false, "refused");
    // The expired certificate.
    misses.expect(
        &report,
        Some(PORT_EXPIRED),
        "expiry",
        true,
        &format!("The certificate of meet.test:{PORT_EXPIRED} expired on 2024-02-01: install a renewed certificate on the server."),
    );
    // The certificate that expires within 14 days.
    misses.expect(
        &report,
        Some(PORT_SOON),
        "expiry",
        true,
        &format!("The certificate of meet.test:{PORT_SOON} expires on "),
    );
    misses.expect_one_of(
        &report,
        Some(PORT_SOON),
        "expiry",
        true,
        &[
            ", in 6 days: renew it on the server before then.",
            ", in 7 days: renew it on the server before then.",
        ],
    );
    misses.expect_one_of(
        &report,
        Some(PORT_TLS12),
        "expiry",
        false,
        &[", in 29 days", ", in 30 days"],
    );
    // P2P on, third parties not disabled, the avatar host.
    misses.expect(
        &report,
        Some(PORT_RISKY),
        "p2p",
        true,
        "meet.test lets two-person calls go peer-to-peer (p2p.enabled is on), bypassing the approved server: set p2p: { enabled: false } in meet.test's config.js (Jitsi: /etc/jitsi/meet/meet.test-config.js).",
    );
    misses.expect(&report, Some(PORT_TLS12), "p2p", false, "p2p.enabled: false");
    let avatar = report["lines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["port"] == PORT_RISKY && l["check"] == "third-party" && l["finding"] == true)
        .filter_map(|l| l["text"].as_str())
        .collect::<Vec<_>>();
    misses.check(
        avatar.contains(&"meet.test does not set disableThirdPartyRequests: true: set it in meet.test's config.js (Jitsi: /etc/jitsi/meet/meet.test-config.js).")
            && avatar.contains(&"meet.test's call page loads avatars.test (gravatarBaseURL https://avatars.test/avatar/), a third party (the profile blocks it, so that part fails): stop meet.test from loading it (Jitsi: disableThirdPartyRequests: true in its config.js)."),
        format!("third-party findings at {PORT_RISKY}: {avatar:?}"),
    );
    // The allowed port where nothing listens (on either address).
    misses.expect(
        &report,
        Some(PORT_CLOSED),
        "tcp",
        true,
        &format!("Nothing listens on meet.test tcp port {PORT_CLOSED} ("),
    );
    misses.expect(
        &report,
        Some(PORT_CLOSED),
        "tcp",
        true,
        &format!(
            "): remove {PORT_CLOSED} from the tcp list of meet.test's [[allow]] entry in profile findings."
        ),
    );
    misses.expect(&report, Some(PORT_CLOSED), "tcp", true, addr::HOST_V4);
    // A Jitsi host without UDP media ports.
    misses.expect(
        &report,
        None,
        "udp",
        true,
        "Profile findings allows no UDP port for meet.test, so calls fall back to slower TCP: add udp = [10000] (the videobridge's media port) to the [[allow]] entry for meet.test.",
    );
    // The text form: one line per check, a verdict last.
    let (code, human, _) = audit(&daemon, &member, &[]);
    let findings = report["findings"].as_u64().unwrap_or(0);
    misses.check(
        code == Some(5) && human.lines().filter(|l| l.starts_with("FINDING ")).count() as u64 == findings,
        format!("text form: exit {code:?}, {findings} findings in JSON:\n{human}"),
    );
    misses.check(
        human.ends_with(&format!(
            "{findings} findings in profile findings: each says what to change and where."
        )),
        format!("verdict:\n{human}"),
    );
    // Another profile's name is refused: the session reaches only its hosts.
    let (code, _, stderr) = audit(&daemon, &member, &["clean"]);
    misses.check(
        code == Some(2),
        format!("audit clean during findings: exit {code:?} {stderr}"),
    );
    daemon.ctl_ok(&["stop"]).expect("stop");

    // TLS 1.3 only, a good certificate from the profile's CA, HSTS, a
    // careful config.js and UDP media allowed: clean, exit 0.
    daemon.ctl_ok(&["start", "clean"]).expect("start clean");
    lab.set_tunnel_allowed_profile(&util::read_text(&daemon.profiles_dir().join("clean.toml")))
        .expect("follow the profile");
    let (code, stdout, stderr) = audit(&daemon, &member, &["clean"]);
    println!("{stdout}");
    misses.check(
        code == Some(0)
            && stdout.ends_with("No findings: every host of profile clean passed the audit.")
            && !stdout.contains("FINDING"),
        format!("clean: exit {code:?}\n{stdout}\n{stderr}"),
    );
    for wanted in [
        row(
            PORT_CLEAN,
            "chain",
            "valid for meet.test, signed by the profile's CA",
        ),
        row(PORT_CLEAN, "hsts", "max-age=31536000"),
        row(PORT_CLEAN, "stun", "hands out meet.test:3478"),
    ] {
        misses.check(
            stdout.contains(&wanted),
            format!("clean report lacks {wanted:?}:\n{stdout}"),
        );
    }
    daemon.ctl_ok(&["stop"]).expect("stop");

    // The same host without [audit] ca: the lab CA is in no system store.
    daemon.ctl_ok(&["start", "noca"]).expect("start noca");
    lab.set_tunnel_allowed_profile(&util::read_text(&daemon.profiles_dir().join("noca.toml")))
        .expect("follow the profile");
    let (code, stdout, _) = audit(&daemon, &member, &["--json"]);
    let report: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    misses.check(code == Some(5), format!("noca: exit {code:?}"));
    misses.expect(
        &report,
        Some(PORT_CLEAN),
        "chain",
        true,
        &format!("The certificate of meet.test:{PORT_CLEAN} is not signed by the system trust store: install a certificate from a trusted CA on the server, or name the practice's CA in [audit] ca of profile noca."),
    );
    daemon.ctl_ok(&["stop"]).expect("stop");

    // `check` refuses an [audit] ca that holds no certificate.
    write_profile(
        &lab,
        "badca",
        &[PORT_CLEAN],
        &[10000],
        Some(&certs.path().join("index.txt")),
    );
    let out = daemon.ctl(&["check", "badca"]).expect("run sessionctl check");
    let stderr = text(&out.stderr);
    misses.check(
        out.status.code() == Some(2)
            && stderr.contains("profile badca: audit.ca: ")
            && stderr.contains("holds no PEM certificate"),
        format!("check badca: {:?} {stderr}", out.status.code()),
    );

    lab.assert_no_leaks();
    drop(daemon);
    // sessiond gone: exit 3.
    let ctl = util::find_binary("sessionctl").expect("sessionctl");
    let gone = lab.tmp_dir().join("gone.sock");
    let out = lab
        .exec(
            Ns::Client,
            &[
                &ctl.to_string_lossy(),
                "--socket",
                &gone.to_string_lossy(),
                "audit",
            ],
        )
        .expect("run sessionctl");
    misses.check(out.status.code() == Some(3), format!("no daemon: {out:?}"));

    assert!(misses.0.is_empty(), "audit missed:\n{}", misses.0.join("\n"));
}
