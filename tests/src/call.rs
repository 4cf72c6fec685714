//! A real WebRTC call in the lab: on the video host (`meet.test`, the host
//! namespace) Janus with its video room, coturn for STUN/TURN and nginx
//! serving the call page (tests/call/) over HTTPS with a certificate from a
//! lab CA made at test time; on each participant's side headless Chromium,
//! driven through the DevTools protocol over `--remote-debugging-pipe`.
//! Owns those processes' config files (in the lab's temp dir) and the
//! browsers' throwaway profiles; the lab kills every process on Drop.
//!
//! Chromium must only ever run with `ip netns exec` inside a participant's
//! namespace: started anywhere else it would reach the real internet.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};

use crate::lab::{addr, write_file_mode, Lab, LabChild, Ns};
use crate::util::{self, wait_until};

/// The UDP ports Janus may use for media, one per peer connection (two
/// participants: two publishers and two subscribers), with room to spare.
/// Listed one by one in the profile (no port ranges in profiles yet).
pub const JANUS_MEDIA_PORTS: [u16; 6] = [20000, 20001, 20002, 20003, 20004, 20005];
/// coturn's STUN/TURN port on the video host.
pub const TURN_PORT: u16 = 3478;
/// The video room the page joins (configured in Janus).
pub const ROOM: u32 = 1234;
/// A STUN server the call page names that no call profile allows: its name
/// must be refused by the stub (the pinned resolver never sees it).
pub const FORBIDDEN_STUN_NAME: &str = "stun.other.test";
/// And one named by an address the profile does not allow.
pub const FORBIDDEN_STUN_V4: &str = addr::OTHER_V4;

/// How long servers and the browser may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one DevTools command may take.
const CDP_TIMEOUT: Duration = Duration::from_secs(20);

/// The `[[allow]]` block a call profile needs: the video host's HTTPS, its
/// STUN/TURN port and Janus's media ports, `media_ports` listed one by one.
pub fn call_allow_block(media_ports: &[u16]) -> String {
    let mut udp: Vec<String> = media_ports.iter().map(u16::to_string).collect();
    udp.push(TURN_PORT.to_string());
    format!(
        "[[allow]]\nhost = \"{}\"\ntcp = [443]\nudp = [{}]\n",
        addr::MEET_NAME,
        udp.join(", ")
    )
}

/// The lab profile text with its `[[allow]]` block replaced by `allow`.
pub fn with_allow_block(profile: String, allow: &str) -> String {
    let standard = format!(
        "[[allow]]\nhost = \"{}\"\ntcp = [443]\nudp = [10000]\n",
        addr::MEET_NAME
    );
    profile.replace(&standard, allow)
}

/// The servers of the call on the video host.
pub struct CallHost {
    pub janus: LabChild,
    pub coturn: LabChild,
    pub nginx: LabChild,
    /// SHA-256 of the server certificate's and the CA's public keys, base64,
    /// for Chromium's `--ignore-certificate-errors-spki-list` (trusts this
    /// lab CA's certificate only; all other certificate checks stay on).
    pub spki_hashes: Vec<String>,
    pub dir: PathBuf,
}

fn page_dir() -> PathBuf {
    util::workspace_root().join("tests").join("call")
}

impl CallHost {
    /// Starts the call servers on the video host and waits until each
    /// listens. Stops the lab's labhost service first (it holds port 443).
    pub fn start(lab: &Lab) -> Result<CallHost> {
        if let Some(services) = lab.host_services() {
            services
                .kill()
                .context("stopping labhost serve to free port 443")?;
        }
        let dir = lab.tmp_dir().join("callhost");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let spki_hashes = make_certificates(&dir)?;
        let janus = start_janus(lab, &dir)?;
        let coturn = start_coturn(lab, &dir)?;
        let nginx = start_nginx(lab, &dir)?;
        let host = CallHost {
            janus,
            coturn,
            nginx,
            spki_hashes,
            dir,
        };
        host.wait_listening(lab)?;
        Ok(host)
    }

    fn wait_listening(&self, lab: &Lab) -> Result<()> {
        let checks: [(&LabChild, &str, &str); 3] = [
            (&self.nginx, "-Hltn", "203.0.113.10:443"),
            (&self.janus, "-Hltn", "127.0.0.1:8088"),
            (&self.coturn, "-Hlun", "203.0.113.10:3478"),
        ];
        for (child, flags, local) in checks {
            let mut exited = false;
            wait_until(
                START_TIMEOUT,
                &format!("{} to listen on {local}", child.name()),
                || {
                    if !child.is_running() {
                        exited = true;
                        return true;
                    }
                    lab.exec_ok(Ns::Host, &["ss", flags])
                        .is_ok_and(|out| out.split_whitespace().any(|w| w == local))
                },
            )
            .with_context(|| format!("{} log:\n{}", child.name(), child.log()))?;
            if exited {
                bail!("{} exited: {}", child.name(), child.log());
            }
        }
        // The room exists once the plugin has read its configuration.
        wait_until(START_TIMEOUT, "Janus's video room plugin", || {
            self.janus.log().contains("VideoRoom plugin initialized")
        })
        .with_context(|| format!("janus log:\n{}", self.janus.log()))?;
        Ok(())
    }

    /// Janus's log, e.g. for failure messages.
    pub fn janus_log(&self) -> String {
        self.janus.log()
    }

    /// coturn's log (it names every allocation and binding request's peer).
    pub fn coturn_log(&self) -> String {
        self.coturn.log()
    }
}

/// A lab CA and a certificate for meet.test signed by it; returns the SPKI
/// hashes of both.
fn make_certificates(dir: &Path) -> Result<Vec<String>> {
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["openssl", "req", "-x509"];
    ca.extend(ec);
    let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
    ca.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
        "-days",
        "2",
        "-subj",
        "/CN=sessiongate lab CA",
    ]);
    util::run(&ca)?;
    let (key, csr, crt) = (p("meet.key"), p("meet.csr"), p("meet.crt"));
    let mut req = vec!["openssl", "req"];
    req.extend(ec);
    req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=meet.test"]);
    util::run(&req)?;
    let ext = p("meet.ext");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:meet.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .with_context(|| format!("writing {ext}"))?;
    util::run(&[
        "openssl",
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &crt,
        "-days",
        "2",
        "-extfile",
        &ext,
    ])?;
    let mut hashes = Vec::new();
    for cert in [&crt, &ca_crt] {
        let public = util::run(&["openssl", "x509", "-in", cert, "-noout", "-pubkey"])?;
        let der = util::output_with_stdin(
            &["openssl", "pkey", "-pubin", "-outform", "der"],
            public.as_bytes(),
        )?;
        if !der.status.success() {
            bail!("openssl pkey failed: {}", String::from_utf8_lossy(&der.stderr));
        }
        let digest = util::output_with_stdin(&["openssl", "dgst", "-sha256", "-binary"], &der.stdout)?;
        hashes.push(base64::engine::general_purpose::STANDARD.encode(&digest.stdout));
    }
    Ok(hashes)
}

fn start_janus(lab: &Lab, dir: &Path) -> Result<LabChild> {
    let conf = dir.join("janus");
    std::fs::create_dir_all(&conf).with_context(|| format!("creating {}", conf.display()))?;
    let lib = "/usr/lib/x86_64-linux-gnu/janus";
    let first = JANUS_MEDIA_PORTS[0];
    let last = JANUS_MEDIA_PORTS[JANUS_MEDIA_PORTS.len() - 1];
    // Only the video room and the HTTP transport; candidates only on the
    // video host's address (the host namespace has others).
    let main = format!(
        r#"general: {{
	configs_folder = "{conf}"
	plugins_folder = "{lib}/plugins"
	transports_folder = "{lib}/transports"
	events_folder = "{lib}/events"
	loggers_folder = "{lib}/loggers"
	debug_level = 4
	server_name = "meet.test"
	session_timeout = 60
}}
media: {{
	ipv6 = false
	rtp_port_range = "{first}-{last}"
}}
nat: {{
	nice_debug = false
	ice_enforce_list = "{host}"
	ice_ignore_list = "vmnet"
}}
plugins: {{
	disable = "libjanus_audiobridge.so,libjanus_duktape.so,libjanus_echotest.so,libjanus_lua.so,libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_streaming.so,libjanus_textroom.so,libjanus_videocall.so,libjanus_voicemail.so"
}}
transports: {{
	disable = "libjanus_websockets.so,libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_pfunix.so,libjanus_rabbitmq.so"
}}
events: {{
	broadcast = false
}}
loggers: {{
	disable = "libjanus_jsonlog.so"
}}
"#,
        conf = conf.display(),
        host = addr::HOST_V4,
    );
    let http = r#"general: {
	json = "indented"
	base_path = "/janus"
	http = true
	port = 8088
	ip = "127.0.0.1"
	https = false
}
admin: {
	admin_http = false
	admin_https = false
}
"#;
    let room = format!(
        r#"general: {{
}}
room-{ROOM}: {{
	description = "sessiongate lab call"
	publishers = 4
	bitrate = 384000
	fir_freq = 2
	audiocodec = "opus"
	videocodec = "vp8"
}}
"#
    );
    write_file_mode(&conf.join("janus.jcfg"), &main, 0o644)?;
    write_file_mode(&conf.join("janus.transport.http.jcfg"), http, 0o644)?;
    write_file_mode(&conf.join("janus.plugin.videoroom.jcfg"), &room, 0o644)?;
    let main_path = conf.join("janus.jcfg").to_string_lossy().into_owned();
    let conf_dir = conf.to_string_lossy().into_owned();
    lab.spawn_named(
        Ns::Host,
        "janus",
        &["janus", "-C", &main_path, "-F", &conf_dir, "-o"],
    )
}

fn start_coturn(lab: &Lab, dir: &Path) -> Result<LabChild> {
    let pid = dir.join("turnserver.pid").to_string_lossy().into_owned();
    lab.spawn_named(
        Ns::Host,
        "coturn",
        &[
            "turnserver",
            "--listening-ip",
            addr::HOST_V4,
            "--relay-ip",
            addr::HOST_V4,
            "--listening-port",
            "3478",
            "--min-port",
            "49160",
            "--max-port",
            "49200",
            "--lt-cred-mech",
            "--user",
            "lab:labsecret",
            "--realm",
            "meet.test",
            "--fingerprint",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--no-multicast-peers",
            "--simple-log",
            "--log-file",
            "stdout",
            "--pidfile",
            &pid,
            "--verbose",
        ],
    )
}

fn start_nginx(lab: &Lab, dir: &Path) -> Result<LabChild> {
    let d = dir.display();
    let root = page_dir();
    let conf = format!(
        r#"daemon off;
master_process off;
user root;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log info;
events {{ worker_connections 256; }}
http {{
	access_log {d}/nginx-access.log;
	client_body_temp_path {d}/nginx-body;
	proxy_temp_path {d}/nginx-proxy;
	types {{ text/html html; application/javascript js; }}
	server {{
		listen {host}:443 ssl;
		server_name meet.test;
		ssl_certificate {d}/meet.crt;
		ssl_certificate_key {d}/meet.key;
		root {root};
		index index.html;
		location /janus {{
			proxy_pass http://127.0.0.1:8088;
			proxy_buffering off;
			proxy_read_timeout 90s;
		}}
	}}
}}
"#,
        host = addr::HOST_V4,
        root = root.display(),
    );
    let path = dir.join("nginx.conf");
    write_file_mode(&path, &conf, 0o644)?;
    let path = path.to_string_lossy().into_owned();
    let prefix = dir.to_string_lossy().into_owned();
    let err = dir.join("nginx-error.log").to_string_lossy().into_owned();
    lab.spawn_named(
        Ns::Host,
        "nginx",
        &["nginx", "-p", &prefix, "-e", &err, "-c", &path],
    )
}

/// The nft table in a participant's namespace that counts local discovery
/// (mDNS 5353, LLMNR 5355, SSDP 1900) sent from it. Counts only; its
/// output hook runs before sessiond's tables (priority -400).
const DISCOVERY_TABLE: &str = "labdiscovery";

/// Installs the local discovery counter in `ns` (before sessiond starts, so
/// that its tables are the ones installed last).
pub fn watch_local_discovery(lab: &Lab, ns: Ns) -> Result<()> {
    let rules = format!(
        "table inet {DISCOVERY_TABLE} {{\n\
         \tcounter sent {{ }}\n\
         \tchain out {{\n\
         \t\ttype filter hook output priority -400; policy accept;\n\
         \t\tudp dport {{ 1900, 5353, 5355 }} counter name sent\n\
         \t}}\n\
         }}\n"
    );
    lab.exec_stdin(ns, &["nft", "-f", "-"], rules.as_bytes())
        .context("installing the local discovery counter")?;
    Ok(())
}

/// Packets the local discovery counter in `ns` has seen.
pub fn local_discovery_packets(lab: &Lab, ns: Ns) -> Result<u64> {
    let out = lab.exec_ok(
        ns,
        &["nft", "-j", "list", "counter", "inet", DISCOVERY_TABLE, "sent"],
    )?;
    let v: Value = serde_json::from_str(&out).context("parsing nft -j output")?;
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|item| item["counter"]["packets"].as_u64())
        .with_context(|| format!("no counter in nft output: {out}"))
}

/// Headless Chromium in a participant's namespace, driven over the DevTools
/// pipe (fd 3: commands to the browser, fd 4: replies and events, each
/// message NUL-terminated JSON).
pub struct Browser {
    pub name: String,
    pub process: LabChild,
    to_browser: Mutex<std::fs::File>,
    from_browser: Mutex<Receiver<Value>>,
    next_id: Mutex<u64>,
    session: String,
    /// Events read while waiting for replies (method -> count), for
    /// diagnostics.
    events: Mutex<HashMap<String, u64>>,
}

/// The Chromium flags: headless, fake camera and microphone, no prompts,
/// nothing of its own in the background (no updates, sync, metrics,
/// safe browsing), a throwaway profile, and only the lab CA's keys trusted
/// beyond the system's roots.
fn chromium_args(user_data: &Path, spki: &[String], url: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "--headless=new",
        "--no-sandbox",
        "--remote-debugging-pipe",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-breakpad",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--disable-features=Translate,OptimizationHints,AutofillServerCommunication,CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
        "--no-first-run",
        "--no-default-browser-check",
        "--metrics-recording-only",
        "--password-store=basic",
        "--mute-audio",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=640,360",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--user-data-dir={}", user_data.display()));
    args.push(format!(
        "--ignore-certificate-errors-spki-list={}",
        spki.join(",")
    ));
    args.push(url.to_string());
    args
}

impl Browser {
    /// Starts Chromium in `ns` (a participant's namespace only) on `url`
    /// and attaches to its page.
    pub fn launch(lab: &Lab, ns: Ns, name: &str, url: &str, spki: &[String]) -> Result<Browser> {
        if !matches!(ns, Ns::Client | Ns::SecondClient) {
            bail!("Chromium runs only in a participant's namespace, never in {ns:?}");
        }
        let home = lab.tmp_dir().join(format!("chromium-{name}"));
        std::fs::create_dir_all(home.join("profile"))
            .with_context(|| format!("creating {}", home.display()))?;
        let (cmd_read, cmd_write) = nix::unistd::pipe().context("making the DevTools command pipe")?;
        let (reply_read, reply_write) = nix::unistd::pipe().context("making the DevTools reply pipe")?;
        let label = format!("chromium-{name}");
        let log = lab.new_log_path(&label);
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file")?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", lab.ns_name(ns), "chromium"])
            .args(chromium_args(&home.join("profile"), spki, url))
            .env("HOME", &home)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let (child_in, child_out) = (cmd_read.as_raw_fd(), reply_write.as_raw_fd());
        // SAFETY: between fork and exec only async-signal-safe calls
        // (fcntl, dup2) on descriptors this process owns.
        unsafe {
            cmd.pre_exec(move || {
                // Move both out of the way first, in case either is 3 or 4.
                let a = libc::fcntl(child_in, libc::F_DUPFD, 10);
                let b = libc::fcntl(child_out, libc::F_DUPFD, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(a);
                libc::close(b);
                Ok(())
            });
        }
        let child = cmd.spawn().context("cannot start chromium")?;
        let process = lab.adopt_child(&label, child, log);
        drop(cmd_read);
        drop(reply_write);
        let (tx, rx) = mpsc::channel();
        spawn_reader(reply_read, tx);
        let mut browser = Browser {
            name: name.to_string(),
            process,
            to_browser: Mutex::new(std::fs::File::from(cmd_write)),
            from_browser: Mutex::new(rx),
            next_id: Mutex::new(1),
            session: String::new(),
            events: Mutex::new(HashMap::new()),
        };
        browser.session = browser.attach_page().with_context(|| {
            format!(
                "attaching to Chromium's page; its log:\n{}",
                browser.process.log()
            )
        })?;
        Ok(browser)
    }

    fn attach_page(&self) -> Result<String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let target = loop {
            let targets = self.call(None, "Target.getTargets", json!({}))?;
            let page = targets["targetInfos"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["targetId"].as_str().map(str::to_string));
            if let Some(id) = page {
                break id;
            }
            if Instant::now() >= deadline {
                bail!("Chromium opened no page");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        )?;
        attached["sessionId"]
            .as_str()
            .map(str::to_string)
            .context("Target.attachToTarget returned no session")
    }

    /// Sends one DevTools command and waits for its reply (events read
    /// meanwhile are counted and dropped).
    fn call(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        let id = {
            let mut n = crate::lab::lock(&self.next_id);
            *n += 1;
            *n
        };
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        crate::lab::lock(&self.to_browser)
            .write_all(&bytes)
            .with_context(|| format!("sending {method} to Chromium"))?;
        let rx = crate::lab::lock(&self.from_browser);
        let deadline = Instant::now() + CDP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = match rx.recv_timeout(left) {
                Ok(v) => v,
                Err(RecvTimeoutError::Timeout) => {
                    bail!("Chromium did not answer {method} in {CDP_TIMEOUT:?}")
                }
                Err(RecvTimeoutError::Disconnected) => bail!("Chromium closed its DevTools pipe"),
            };
            if reply["id"].as_u64() == Some(id) {
                if let Some(err) = reply.get("error") {
                    bail!("{method} failed: {err}");
                }
                return Ok(reply["result"].clone());
            }
            if let Some(m) = reply["method"].as_str() {
                *crate::lab::lock(&self.events).entry(m.to_string()).or_default() += 1;
            }
        }
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns
    /// its value.
    pub fn evaluate(&self, expression: &str) -> Result<Value> {
        let r = self.call(
            Some(&self.session),
            "Runtime.evaluate",
            json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
        )?;
        if let Some(ex) = r.get("exceptionDetails") {
            bail!("the page threw: {ex}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// `window.callStats()` of the call page, parsed.
    pub fn stats(&self) -> Result<CallStats> {
        let text = self.evaluate("typeof window.callStats === 'function' ? window.callStats() : null")?;
        let text = text.as_str().context("the call page is not loaded yet")?;
        let raw: Value = serde_json::from_str(text).context("parsing callStats()")?;
        Ok(CallStats::from_json(raw))
    }

    /// A 640x360 PNG of the page as it looks now.
    pub fn screenshot(&self) -> Result<Vec<u8>> {
        // The headless window's viewport is smaller than --window-size.
        self.call(
            Some(&self.session),
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 640, "height": 360, "deviceScaleFactor": 1, "mobile": false }),
        )?;
        let r = self.call(
            Some(&self.session),
            "Page.captureScreenshot",
            json!({ "format": "png" }),
        )?;
        let data = r["data"].as_str().context("no screenshot data")?;
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| anyhow!("screenshot is not base64: {e}"))
    }
}

fn spawn_reader(fd: OwnedFd, tx: mpsc::Sender<Value>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(std::fs::File::from(fd));
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(0, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if buf.last() == Some(&0) {
                        buf.pop();
                    }
                    if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
}

/// What one participant measured, from `getStats()`.
#[derive(Debug, Clone, Default)]
pub struct CallStats {
    pub raw: Value,
}

impl CallStats {
    fn from_json(raw: Value) -> CallStats {
        CallStats { raw }
    }

    fn num(&self, path: &[&str]) -> f64 {
        let mut v = &self.raw;
        for p in path {
            v = &v[*p];
        }
        v.as_f64().unwrap_or(0.0)
    }

    fn text(&self, path: &[&str]) -> String {
        let mut v = &self.raw;
        for p in path {
            v = &v[*p];
        }
        v.as_str().unwrap_or("-").to_string()
    }

    /// Video frames decoded from the other participant.
    pub fn video_frames_decoded(&self) -> u64 {
        self.num(&["subscriber", "inbound", "video", "framesDecoded"]) as u64
    }
    pub fn video_packets_received(&self) -> u64 {
        self.num(&["subscriber", "inbound", "video", "packetsReceived"]) as u64
    }
    pub fn audio_packets_received(&self) -> u64 {
        self.num(&["subscriber", "inbound", "audio", "packetsReceived"]) as u64
    }
    pub fn packets_lost(&self) -> i64 {
        (self.num(&["subscriber", "inbound", "video", "packetsLost"])
            + self.num(&["subscriber", "inbound", "audio", "packetsLost"])) as i64
    }
    /// Jitter of the received video, ms.
    pub fn video_jitter_ms(&self) -> f64 {
        self.num(&["subscriber", "inbound", "video", "jitter"]) * 1000.0
    }
    /// Round-trip time of the selected pair of the publishing connection, ms.
    pub fn rtt_ms(&self) -> f64 {
        self.num(&["publisher", "pair", "rtt"]) * 1000.0
    }
    pub fn ice_state(&self, pc: &str) -> String {
        self.text(&[pc, "ice"])
    }
    pub fn pair_state(&self, pc: &str) -> String {
        self.text(&[pc, "pair", "state"])
    }
    /// `type address:port/proto` of our side of the selected pair.
    pub fn local_candidate(&self, pc: &str) -> String {
        self.text(&[pc, "pair", "local"])
    }
    pub fn remote_candidate(&self, pc: &str) -> String {
        self.text(&[pc, "pair", "remote"])
    }
    /// URLs of the ICE servers the browser reported errors for.
    pub fn ice_error_urls(&self) -> Vec<String> {
        self.raw["iceErrors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{} ({} {})",
                    e["url"].as_str().unwrap_or("?"),
                    e["code"],
                    e["text"]
                )
            })
            .collect::<std::collections::BTreeSet<String>>()
            .into_iter()
            .collect()
    }
    /// Our candidates as gathered (`type address:port`), both connections.
    pub fn gathered_candidates(&self) -> Vec<String> {
        self.raw["candidates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e.as_str().unwrap_or("?").to_string())
            .collect()
    }
    pub fn page_errors(&self) -> Vec<String> {
        self.raw["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e.as_str().unwrap_or("?").to_string())
            .collect()
    }
}

/// One participant's figures as a table row.
pub fn table_row(name: &str, s: &CallStats) -> String {
    format!(
        "{name:<10} {:<10} {:>7} {:>7} {:>7} {:>5} {:>7.1} {:>7.1}  {}",
        s.ice_state("subscriber"),
        s.video_frames_decoded(),
        s.video_packets_received(),
        s.audio_packets_received(),
        s.packets_lost(),
        s.video_jitter_ms(),
        s.rtt_ms(),
        s.local_candidate("publisher"),
    )
}

/// The header for `table_row`.
pub fn table_header() -> String {
    format!(
        "{:<10} {:<10} {:>7} {:>7} {:>7} {:>5} {:>7} {:>7}  {}",
        "who", "ice", "frames", "v.pkts", "a.pkts", "lost", "jit.ms", "rtt.ms", "local candidate"
    )
}
