//! Captive portals (issue 17): `sessionctl portal` opens a hotel's login
//! page in a namespace of its own while the session stays locked down.
//!
//! A fake portal on the router's LAN side (a small Python HTTP server on
//! 192.0.2.1:80) redirects every page to its login form until the form is
//! posted, then lets through. A stand-in browser (a Python script, run by
//! sessiond in the portal namespace as the unprivileged caller) follows
//! the redirect, logs in, and also tries the internet; the test checks
//! what it saw, that the machine itself still reaches nothing, both leak
//! meters, and that the namespace goes after its time and on `--close`.
//! The namespace is made by the portal helper (`sessiongate-portal`),
//! which sessiond reaches over its socket; `systemd-socket-activate`
//! stands in for its socket unit here (tests/systemd.rs runs the real
//! units). Run as root after `cargo build --workspace`.

use std::path::PathBuf;
use std::time::Duration;

use lab::portal_helper::PortalHelper;
use lab::{addr, wait_for, wait_until, Daemon, Lab, Ns};

/// The fake portal: everything redirects to /login until a form is posted
/// from that address; then every page says welcome.
const FAKE_PORTAL: &str = r#"
import http.server, sys
authorized = set()
class Portal(http.server.BaseHTTPRequestHandler):
    def page(self, code, body):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def go(self, code, where):
        self.send_response(code)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def do_GET(self):
        if self.path.startswith("/login"):
            self.page(200, '<form method="post" action="/login"><input name="room"><button>Log in</button></form>')
        elif self.client_address[0] in authorized:
            self.page(200, "welcome, you are online")
        else:
            self.go(302, "http://%s/login" % self.headers.get("Host", ""))
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        authorized.add(self.client_address[0])
        self.go(303, "/")
    def log_message(self, fmt, *args):
        sys.stdout.write("%s %s\n" % (self.client_address[0], fmt % args))
        sys.stdout.flush()
server = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Portal)
print("ready", flush=True)
server.serve_forever()
"#;

/// The stand-in browser: the page it is given (following redirects), the
/// login, the page again, a name looked up through the namespace's
/// resolver, and a connection to the internet; all written to a JSON file.
const BROWSER: &str = r#"
import json, os, socket, sys, urllib.parse, urllib.request
out, url = sys.argv[1], sys.argv[-1]
seen = {"uid": os.getuid(), "url": url}
try:
    first = urllib.request.urlopen(url, timeout=5)
    seen["landed_on"] = first.geturl()
    seen["first_page"] = first.read().decode()
    data = urllib.parse.urlencode({"room": "212"}).encode()
    after = urllib.request.urlopen(urllib.parse.urljoin(first.geturl(), "/login"), data=data, timeout=5)
    seen["after_login"] = after.read().decode()
except Exception as e:
    seen["portal_error"] = repr(e)
try:
    seen["resolved"] = socket.gethostbyname(sys.argv[2])
except Exception as e:
    seen["resolve_error"] = repr(e)
try:
    socket.create_connection((sys.argv[3], 443), timeout=3).close()
    seen["internet"] = "reached"
except Exception as e:
    seen["internet"] = repr(e)
with open(out + ".tmp", "w") as f:
    json.dump(seen, f)
os.rename(out + ".tmp", out)
"#;

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("lab setup failed: {e:#}"))
}

fn link_table(lab: &Lab) -> String {
    lab.exec_ok(Ns::Client, &["nft", "list", "table", "netdev", "sessiongate"])
        .unwrap_or_else(|e| format!("{e:#}"))
}

/// `sessionctl ARGS` as nobody (a member of the control group here).
fn ctl_as_nobody(lab: &Lab, daemon: &Daemon, args: &[&str]) -> std::process::Output {
    let ctl = lab::util::find_binary("sessionctl").expect("sessionctl");
    let ctl = ctl.to_string_lossy().into_owned();
    let socket = daemon.socket().to_string_lossy().into_owned();
    let mut full = vec![
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--init-groups",
        "--reset-env",
        ctl.as_str(),
        "--socket",
        socket.as_str(),
    ];
    full.extend_from_slice(args);
    lab.exec(Ns::Client, &full).expect("run sessionctl")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

#[test]
fn the_login_page_opens_in_a_namespace_of_its_own_and_nothing_else_does() {
    use std::os::unix::fs::PermissionsExt;
    let lab = lab();
    let files = lab
        .write_profile("lab", |t| {
            t.replace(
                &format!("host = \"{}\"", addr::MEET_NAME),
                &format!("host = \"{}\"", addr::HOST_V4),
            )
        })
        .expect("write profile");
    lab.set_tunnel_allowed_profile(&files.toml)
        .expect("tunnel meter follows the profile");
    // nobody (group nogroup) reaches the socket through the lab's dir and
    // writes what the browser saw into a dir of its own.
    std::fs::set_permissions(lab.tmp_dir(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let seen_dir: PathBuf = lab.tmp_dir().join("browser");
    std::fs::create_dir(&seen_dir).expect("browser dir");
    std::fs::set_permissions(&seen_dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let browser = seen_dir.join("browser.py");
    std::fs::write(&browser, BROWSER).expect("write the browser");
    std::fs::set_permissions(&browser, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let portal_script = lab.tmp_dir().join("portal.py");
    std::fs::write(&portal_script, FAKE_PORTAL).expect("write the portal");
    let portal_server = lab
        .spawn_named(
            Ns::Router,
            "fake-portal",
            &[
                "python3",
                &portal_script.to_string_lossy(),
                addr::ROUTER_CLIENT_V4,
                "80",
            ],
        )
        .expect("fake portal");
    wait_until(Duration::from_secs(10), "the fake portal to listen", || {
        portal_server.log().contains("ready")
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", portal_server.log()));

    // The helper, behind a stand-in for its socket unit.
    let helper = PortalHelper::start(&lab).expect("the portal helper");
    let name = helper.namespace().to_string();
    let mut daemon = lab.start_sessiond_for_group("nogroup").expect("start sessiond");
    daemon.set_env(sessiond::portal::NAMESPACE_ENV, &name);
    daemon.set_env(
        sessiond::portal_helper::SOCKET_ENV,
        &helper.socket().to_string_lossy(),
    );
    daemon
        .restart()
        .expect("restart sessiond with the test's namespace name and helper");
    daemon.ctl_ok(&["start", "lab"]).expect("start the session");

    // Refused during a session unless asked in so many words, saying why.
    let refused = ctl_as_nobody(&lab, &daemon, &["portal"]);
    assert!(
        !refused.status.success() && text(&refused).contains("--during-session"),
        "{}",
        text(&refused)
    );
    assert!(!helper.namespace_exists());
    lab.reset_all_leaks().expect("reset leaks");

    let result = seen_dir.join("seen.json");
    let browser_s = browser.to_string_lossy().into_owned();
    let result_s = result.to_string_lossy().into_owned();
    let opened = ctl_as_nobody(
        &lab,
        &daemon,
        &[
            "portal",
            "--during-session",
            "--seconds",
            "6",
            "--json",
            "--browser",
            "/usr/bin/python3",
            &format!("--browser-arg={browser_s}"),
            &format!("--browser-arg={result_s}"),
            &format!("--browser-arg={}", addr::MEET_NAME),
            &format!("--browser-arg={}", addr::HOST_V4),
        ],
    );
    assert!(
        opened.status.success(),
        "{}\n{}\nhelper:\n{}",
        text(&opened),
        daemon.log(),
        helper.log()
    );
    assert!(helper.namespace_exists(), "{}", daemon.log());
    let report: serde_json::Value =
        serde_json::from_slice(&opened.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&opened)));
    let address = report["address"].as_str().unwrap_or_default().to_string();
    assert!(address.starts_with("192.0.2."), "{report}");
    // The link-level table lets the namespace's traffic out by name.
    let table = link_table(&lab);
    assert!(table.contains(&format!("ip saddr {address} ")), "{table}");

    let seen: serde_json::Value = wait_for(Duration::from_secs(30), "the browser's report", || {
        let text = std::fs::read_to_string(&result)?;
        Ok(serde_json::from_str(&text)?)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", portal_server.log(), daemon.log()));
    println!("the browser saw: {seen}");
    assert_eq!(seen["uid"], 65534, "the browser must run as the caller: {seen}");
    assert_eq!(
        seen["url"],
        format!("http://{}/", addr::ROUTER_CLIENT_V4),
        "{seen}"
    );
    assert!(
        seen["landed_on"].as_str().unwrap_or("").ends_with("/login")
            && seen["first_page"].as_str().unwrap_or("").contains("<form"),
        "the portal's redirect to its login page: {seen}\n{}",
        portal_server.log()
    );
    assert!(
        seen["after_login"].as_str().unwrap_or("").contains("welcome"),
        "{seen}"
    );
    // The network's DNS server answers in the namespace; the internet does not.
    assert_eq!(seen["resolved"], addr::HOST_V4, "{seen}");
    assert_ne!(seen["internet"], "reached", "{seen}");

    // The machine itself still reaches nothing but the tunnel: neither the
    // portal nor another host.
    assert!(lab.probe_tcp(Ns::Client, addr::ROUTER_CLIENT_V4, 80).is_err());
    assert!(lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443).is_err());
    // In clear: only the portal namespace's web and DNS traffic.
    let destinations = lab.leak_destinations().expect("leak destinations");
    let expected = [
        format!("{} tcp/80", addr::ROUTER_CLIENT_V4),
        format!("{} udp/53", addr::PUBLIC_DNS_V4),
    ];
    assert!(
        destinations.iter().all(|d| expected.contains(d)),
        "{}",
        lab.leak_report()
    );
    assert_eq!(
        lab.tunnel_leaks().expect("tunnel meter"),
        0,
        "{}",
        lab.tunnel_leak_report()
    );
    lab.reset_leaks().expect("reset leaks");

    // Gone after its time, with its exception.
    wait_until(
        Duration::from_secs(20),
        "the portal namespace to go after its time",
        || !helper.namespace_exists(),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    wait_until(Duration::from_secs(5), "the exception to go", || {
        !link_table(&lab).contains(&format!("ip saddr {address} "))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", link_table(&lab)));
    assert!(
        daemon.ctl_ok(&["status"]).expect("status").contains("Protected"),
        "the session stays as it was"
    );

    // And at once on --close.
    let opened = ctl_as_nobody(&lab, &daemon, &["portal", "--during-session", "--json"]);
    assert!(opened.status.success(), "{}", text(&opened));
    assert!(helper.namespace_exists());
    let closed = ctl_as_nobody(&lab, &daemon, &["portal", "--close"]);
    assert!(closed.status.success(), "{}", text(&closed));
    assert!(!helper.namespace_exists(), "{}", daemon.log());
    assert!(!link_table(&lab).contains(&format!("ip saddr {address} ")));
    assert!(lab.probe_tcp(Ns::Client, addr::OTHER_V4, 443).is_err());
    lab.assert_no_leaks();
}
