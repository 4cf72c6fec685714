//! What a Jitsi Meet host tells every browser, read from the text it
//! serves: its `config.js` (P2P, third-party requests, STUN servers, E2EE,
//! the avatar service) and the absolute URLs its call page loads.
//!
//! Pure text reading, no network and no JavaScript engine: comments are
//! dropped first (a commented-out setting is not a setting), then the few
//! keys the audit asks about are looked up. A value this reader cannot
//! make out counts as Jitsi's default, which is what a browser would get
//! if the setting were really absent.

/// Jitsi's own default for `gravatarBaseURL`, used when config.js sets none.
pub const DEFAULT_GRAVATAR: &str = "https://www.gravatar.com/avatar/";

/// The settings of one config.js that the audit reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `p2p.enabled`; Jitsi enables P2P when it is not set.
    pub p2p_enabled: bool,
    /// `disableThirdPartyRequests: true`.
    pub third_party_disabled: bool,
    /// `e2ee.disabled: true` or `disableE2EE: true`.
    pub e2ee_disabled: bool,
    /// The avatar service's base URL (Jitsi's default if not set).
    pub gravatar_base_url: String,
    /// `stun:`/`turn:` URLs handed out (host:port, scheme dropped).
    pub stun_servers: Vec<String>,
    /// Hosts of other absolute URLs in string values (http, https, wss).
    pub url_hosts: Vec<String>,
}

/// Whether a served file is a Jitsi Meet config.js.
pub fn is_config_js(text: &str) -> bool {
    let code = strip_comments(text);
    code.contains("var config") || code.contains("config = {")
}

/// Reads the settings out of config.js text.
pub fn parse_config(text: &str) -> Config {
    let code = strip_comments(text);
    let p2p = object_of(&code, "p2p").unwrap_or("");
    let e2ee = object_of(&code, "e2ee").unwrap_or("");
    let gravatar = value_of(&code, "gravatarBaseURL").and_then(string_literal);
    let mut stun_servers = Vec::new();
    let mut url_hosts = Vec::new();
    for literal in string_literals(&code) {
        let lower = literal.to_ascii_lowercase();
        if let Some(rest) = ["stun:", "stuns:", "turn:", "turns:"]
            .iter()
            .find_map(|s| lower.starts_with(s).then(|| &literal[s.len()..]))
        {
            let server = rest.split('?').next().unwrap_or(rest).to_string();
            if !stun_servers.contains(&server) {
                stun_servers.push(server);
            }
        } else if Some(&literal) != gravatar.as_ref() {
            if let Some(host) = url_host(&literal) {
                if !url_hosts.contains(&host) {
                    url_hosts.push(host);
                }
            }
        }
    }
    Config {
        p2p_enabled: value_of(p2p, "enabled").map(is_true).unwrap_or(true),
        third_party_disabled: value_of(&code, "disableThirdPartyRequests")
            .map(is_true)
            .unwrap_or(false),
        e2ee_disabled: value_of(e2ee, "disabled").is_some_and(is_true)
            || value_of(&code, "disableE2EE").is_some_and(is_true),
        gravatar_base_url: gravatar.unwrap_or_else(|| DEFAULT_GRAVATAR.to_string()),
        stun_servers,
        url_hosts,
    }
}

/// Hosts of the absolute URLs an HTML page loads: every `src=` and the
/// `href=` of `<link>` elements (style sheets, icons, preloads), written
/// absolute (`https://host/…`) or scheme-relative (`//host/…`).
pub fn page_hosts(html: &str) -> Vec<String> {
    let mut hosts = Vec::new();
    let lower = html.to_ascii_lowercase();
    let mut add = |value: &str| {
        let url = if let Some(rest) = value.strip_prefix("//") {
            format!("https://{rest}")
        } else {
            value.to_string()
        };
        if let Some(host) = url_host(&url) {
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
    };
    for (at, _) in lower.match_indices("src=") {
        if let Some(v) = attribute_value(&html[at + 4..]) {
            add(v);
        }
    }
    for (start, _) in lower.match_indices("<link") {
        let end = lower[start..].find('>').map(|e| start + e).unwrap_or(lower.len());
        if let Some(at) = lower[start..end].find("href=") {
            if let Some(v) = attribute_value(&html[start + at + 5..end]) {
                add(v);
            }
        }
    }
    hosts
}

/// The host of an http, https, ws or wss URL, in lower case.
pub fn url_host(url: &str) -> Option<String> {
    let lower = url.to_ascii_lowercase();
    let rest = ["https://", "http://", "wss://", "ws://"]
        .iter()
        .find_map(|s| lower.strip_prefix(s))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    host_of(authority)
}

/// The host of `host:port`, `[v6]:port` or a bare host.
pub fn host_of(authority: &str) -> Option<String> {
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// A quoted attribute value at the start of `text` (after `name=`).
fn attribute_value(text: &str) -> Option<&str> {
    let quote = text.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let rest = &text[1..];
    rest.find(quote).map(|end| &rest[..end])
}

fn is_true(value: &str) -> bool {
    value.starts_with("true")
}

/// The text after `key:` (or `'key':`, `"key":`), white space trimmed,
/// for the first `key` that stands alone as a property name.
fn value_of<'a>(code: &'a str, key: &str) -> Option<&'a str> {
    let bytes = code.as_bytes();
    for (at, _) in code.match_indices(key) {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let quoted = matches!(before, Some(b'\'' | b'"'));
        let start_ok = match before {
            None => true,
            Some(_) if quoted => at < 2 || !is_ident(bytes[at - 2]),
            Some(b) => !is_ident(b),
        };
        if !start_ok {
            continue;
        }
        let mut rest = &code[at + key.len()..];
        if quoted {
            rest = rest.strip_prefix(['\'', '"']).unwrap_or(rest);
        }
        if let Some(value) = rest.trim_start().strip_prefix(':') {
            return Some(value.trim_start());
        }
    }
    None
}

/// The inside of the `{ … }` object that `key` is set to.
fn object_of<'a>(code: &'a str, key: &str) -> Option<&'a str> {
    let value = value_of(code, key)?;
    let inner = value.strip_prefix('{')?;
    let mut depth = 1usize;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&inner[..i]);
                }
            }
            _ => {}
        }
    }
    Some(inner)
}

/// The string a value starts with, if it starts with a string literal.
fn string_literal(value: &str) -> Option<String> {
    let quote = value.chars().next().filter(|c| matches!(c, '\'' | '"' | '`'))?;
    let rest = &value[1..];
    rest.find(quote).map(|end| rest[..end].to_string())
}

/// Every string literal in `code` (comments already gone).
fn string_literals(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = code.chars();
    while let Some(c) = chars.next() {
        if matches!(c, '\'' | '"' | '`') {
            let mut literal = String::new();
            let mut escaped = false;
            for d in chars.by_ref() {
                if escaped {
                    literal.push(d);
                    escaped = false;
                } else if d == '\\' {
                    escaped = true;
                } else if d == c {
                    break;
                } else {
                    literal.push(d);
                }
            }
            out.push(literal);
        }
    }
    out
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b == b'.'
}

/// JavaScript text without its `//` and `/* */` comments; string literals
/// (where `//` is part of a URL) are kept as they are.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' | '`' => {
                out.push(c);
                let mut escaped = false;
                for d in chars.by_ref() {
                    out.push(d);
                    if escaped {
                        escaped = false;
                    } else if d == '\\' {
                        escaped = true;
                    } else if d == c || (d == '\n' && c != '`') {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut last = ' ';
                for d in chars.by_ref() {
                    if last == '*' && d == '/' {
                        break;
                    }
                    last = d;
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const RISKY: &str = r#"
var config = {
    hosts: { domain: 'meet.test' },
    // p2p: { enabled: false },
    bosh: 'https://meet.test/http-bind', // the XMPP endpoint
    p2p: {
        enabled: true,
        stunServers: [ { urls: 'stun:stun.avatars.test:3478' } ],
    },
    /* disableThirdPartyRequests: true, */
    gravatarBaseURL: 'https://avatars.test/avatar/',
    analytics: { scriptURLs: [ "https://stats.test/a.js" ] },
};
"#;

    const CAREFUL: &str = r#"
var config = {
    p2p: { enabled: false, stunServers: [ { urls: 'stun:meet.test:3478' } ] },
    disableThirdPartyRequests: true,
    e2ee: { labels: {}, disabled: false },
};
"#;

    #[test]
    fn commented_out_settings_do_not_count() {
        let c = parse_config(RISKY);
        assert!(is_config_js(RISKY));
        assert!(c.p2p_enabled);
        assert!(!c.third_party_disabled);
        assert!(!c.e2ee_disabled);
        assert_eq!(c.gravatar_base_url, "https://avatars.test/avatar/");
        assert_eq!(c.stun_servers, vec!["stun.avatars.test:3478"]);
        assert_eq!(c.url_hosts, vec!["meet.test", "stats.test"]);
    }

    #[test]
    fn careful_settings_are_read_and_defaults_fill_the_rest() {
        let c = parse_config(CAREFUL);
        assert!(!c.p2p_enabled);
        assert!(c.third_party_disabled);
        assert!(!c.e2ee_disabled);
        assert_eq!(c.gravatar_base_url, DEFAULT_GRAVATAR);
        let bare = parse_config("var config = { disableE2EE: true };");
        assert!(bare.p2p_enabled, "Jitsi enables P2P unless told not to");
        assert!(bare.e2ee_disabled);
        assert!(!is_config_js("<html>not found</html>"));
    }

    #[test]
    fn the_page_loads_what_its_src_and_link_href_name() {
        let html = r#"<html><head><link rel="stylesheet" href="https://cdn.test/a.css">
<script src='//scripts.test/x.js'></script><script src="libs/app.js"></script>
<a href="https://elsewhere.test/">a link loads nothing</a><img src="https://Pics.test:8443/p.png"></head></html>"#;
        assert_eq!(page_hosts(html), vec!["scripts.test", "pics.test", "cdn.test"]);
        assert_eq!(url_host("wss://[2001:db8::1]:443/x"), Some("2001:db8::1".into()));
    }
}
