//! The audit's TLS client: one handshake per protocol version that rustls
//! can offer, with the certificate chain checked (and the result kept)
//! rather than enforced, and a minimal HTTP/1.0 GET over the same kind of
//! connection for the page, its headers and Jitsi's config.js.
//!
//! It owns how the audit talks to a host and never sends anything but a
//! handshake and a GET without cookies or credentials: what an anonymous
//! browser would send first. It never writes TLS or X.509 by hand (rustls
//! with ring, the crypto crate boringtun already uses; x509-cert only to
//! read the certificate's expiry date).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore};

/// How long a connect, or a read or write on a connection, may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a response body read (config.js is a few tens of KiB).
const MAX_RESPONSE_BYTES: u64 = 2 * 1024 * 1024;

/// The protocol versions the audit can probe (rustls has no TLS 1.0/1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Tls13,
    Tls12,
}

impl Version {
    fn rustls(self) -> &'static rustls::SupportedProtocolVersion {
        match self {
            Version::Tls13 => &rustls::version::TLS13,
            Version::Tls12 => &rustls::version::TLS12,
        }
    }
}

/// What the chain check said about the host's certificate.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// None when the chain is valid for the name; otherwise why not.
    pub problem: Option<ChainProblem>,
    /// The end-entity certificate's notAfter, as seconds since the epoch.
    pub not_after: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainProblem {
    Expired,
    NotYetValid,
    UnknownIssuer,
    WrongName,
    Other(String),
}

/// One handshake's outcome.
#[derive(Debug, Clone)]
pub struct Handshake {
    pub cipher_suite: String,
    pub certificate: Certificate,
}

/// Where and how to reach one host's port.
pub struct Target {
    pub name: ServerName<'static>,
    /// Every address the name resolved to, tried in order as a browser
    /// falls back from one to the next.
    pub addrs: Vec<SocketAddr>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

/// Why a connection attempt did not get as far as TLS.
#[derive(Debug)]
pub enum ConnectError {
    /// Connection refused: nothing listens.
    Refused,
    /// No answer at all within the timeout.
    TimedOut,
    Other(String),
}

impl Target {
    pub fn new(name: ServerName<'static>, addrs: Vec<SocketAddr>, roots: Arc<RootCertStore>) -> Target {
        Target {
            name,
            addrs,
            roots,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// Opens a TCP connection to the first address that accepts one,
    /// with the audit's timeouts. Refused only if every address refused.
    pub fn connect(&self) -> Result<TcpStream, ConnectError> {
        let mut error = ConnectError::Other("the name has no address".to_string());
        for addr in &self.addrs {
            match TcpStream::connect_timeout(addr, IO_TIMEOUT) {
                Ok(stream) => {
                    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                    return Ok(stream);
                }
                Err(e) => {
                    let this = match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => ConnectError::Refused,
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                            ConnectError::TimedOut
                        }
                        _ => ConnectError::Other(format!("{addr}: {e}")),
                    };
                    // A refusal is the stronger evidence: something answered.
                    if !matches!(error, ConnectError::Refused) {
                        error = this;
                    }
                }
            }
        }
        Err(error)
    }

    /// The addresses as a list for evidence.
    pub fn addr_list(&self) -> String {
        self.addrs
            .iter()
            .map(|a| a.ip().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A TLS connection offering only `version`, handshake done; the chain
    /// check's verdict is recorded, not enforced, so an expired or unknown
    /// certificate still shows which versions and suites the host takes.
    fn handshake(&self, version: Version) -> Result<(ClientConnection, TcpStream, Certificate), String> {
        let inner = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| format!("cannot use the trusted certificates: {e}"))?;
        let recorder = Arc::new(Recorder {
            inner,
            seen: Mutex::new(None),
        });
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[version.rustls()])
            .map_err(|e| format!("rustls refused the settings: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(recorder.clone())
            .with_no_client_auth();
        let mut conn = ClientConnection::new(Arc::new(config), self.name.clone())
            .map_err(|e| format!("cannot start TLS: {e}"))?;
        let mut sock = self.connect().map_err(|e| match e {
            ConnectError::Refused => "connection refused".to_string(),
            ConnectError::TimedOut => "no answer (timed out)".to_string(),
            ConnectError::Other(e) => e,
        })?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).map_err(|e| describe_io(&e))?;
        }
        let certificate = recorder
            .seen
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .ok_or_else(|| "the server sent no certificate".to_string())?;
        Ok((conn, sock, certificate))
    }

    /// Whether the host completes a handshake offering only `version`.
    pub fn probe(&self, version: Version) -> Result<Handshake, String> {
        let (conn, _sock, certificate) = self.handshake(version)?;
        let cipher_suite = conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_else(|| "unknown".to_string());
        Ok(Handshake {
            cipher_suite,
            certificate,
        })
    }

    /// `GET path` over TLS `version`, as HTTP/1.0 (no chunked bodies):
    /// the status code, the headers (names in lower case) and the body.
    pub fn get(&self, version: Version, host_header: &str, path: &str) -> Result<Response, String> {
        let (conn, sock, _) = self.handshake(version)?;
        let mut stream = rustls::StreamOwned::new(conn, sock);
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {host_header}\r\nUser-Agent: sessionctl-audit\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .and_then(|_| stream.flush())
            .map_err(|e| describe_io(&e))?;
        let mut bytes = Vec::new();
        match (&mut stream).take(MAX_RESPONSE_BYTES).read_to_end(&mut bytes) {
            Ok(_) => {}
            // A server that closes without close_notify: the bytes read
            // are still what it sent.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !bytes.is_empty() => {}
            Err(e) => return Err(describe_io(&e)),
        }
        Response::parse(&bytes)
    }
}

/// An HTTP response, read whole.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    fn parse(bytes: &[u8]) -> Result<Response, String> {
        let split = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| "the answer is not an HTTP response".to_string())?;
        let head = String::from_utf8_lossy(&bytes[..split]);
        let body = String::from_utf8_lossy(&bytes[split + 4..]).into_owned();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| "the answer has no HTTP status line".to_string())?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An I/O error from rustls or the socket, in words.
fn describe_io(e: &std::io::Error) -> String {
    if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return match inner {
            rustls::Error::AlertReceived(alert) => format!("the server refused the handshake ({alert:?})"),
            other => other.to_string(),
        };
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "no answer (timed out)".to_string(),
        _ => e.to_string(),
    }
}

/// Checks the chain with webpki like any client would, keeps the verdict
/// and the end-entity certificate's expiry, and lets the handshake go on.
/// Handshake signatures are still verified: the host must hold the key.
#[derive(Debug)]
struct Recorder {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<Option<Certificate>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        let problem = verdict.err().map(|e| match e {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => ChainProblem::Expired,
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    ChainProblem::NotYetValid
                }
                CertificateError::UnknownIssuer => ChainProblem::UnknownIssuer,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    ChainProblem::WrongName
                }
                other => ChainProblem::Other(rustls::Error::InvalidCertificate(other).to_string()),
            },
            other => ChainProblem::Other(other.to_string()),
        });
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(Certificate {
                problem,
                not_after: not_after(end_entity),
            });
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The certificate's notAfter in seconds since the epoch.
fn not_after(der: &CertificateDer<'_>) -> Option<u64> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der.as_ref()).ok()?;
    Some(
        cert.tbs_certificate
            .validity
            .not_after
            .to_unix_duration()
            .as_secs(),
    )
}

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A date as YYYY-MM-DD (UTC), from seconds since the epoch (the civil
/// calendar from a day count, after Howard Hinnant's days_from_civil).
pub fn date(secs: u64) -> String {
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The certificates the chain is checked against: the PEM file the
/// profile names in `[audit] ca`, or the system's trust store.
pub fn trusted_roots(ca_file: Option<&std::path::Path>) -> Result<(RootCertStore, String), String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| {
                    format!(
                        "cannot read the CA file {} that the profile names in [audit] ca: {e}; make it readable by everyone (it holds no secret)",
                        path.display()
                    )
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("{} holds no usable CA certificate", path.display()));
            }
            Ok((roots, format!("the profile's CA {}", path.display())))
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "the system trust store has no certificate (is ca-certificates installed?)".to_string(),
                );
            }
            Ok((roots, "the system trust store".to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_read_as_the_calendar_says() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(1_798_761_599), "2026-12-31");
    }

    #[test]
    fn responses_split_into_status_headers_and_body() {
        let r = Response::parse(
            b"HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=1\r\n\r\nvar config = {};",
        )
        .expect("parse");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("strict-transport-security"), Some("max-age=1"));
        assert_eq!(r.body, "var config = {};");
        assert!(Response::parse(b"garbage").is_err());
    }
}
