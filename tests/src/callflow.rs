//! A call-shaped flow: what a video call puts on the wire, and what its
//! receiver would feel. Audio is 50 packets a second of 120 bytes; video is
//! about 2.5 Mbit/s sent as 30 frames a second, each frame a burst of
//! 1200-byte packets back to back (how a WebRTC sender paces a frame onto
//! the network). Every packet carries the run's id, its stream, its sequence
//! number and its send time (CLOCK_REALTIME, nanoseconds): the lab's
//! namespaces share one clock, so the receiver computes the exact one-way
//! delay of each packet, the loss, and the jitter with RFC 3550's estimator.
//!
//! This module owns the schedule, the packet format and the bookkeeping. It
//! never decides where the flow runs: a binary (the bench, the soak, a lab
//! test) starts [`send`] in one namespace and [`receive`] in another. It
//! makes no timing judgements of its own; the numbers go to benchmarks.

use std::net::{IpAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Audio: one packet every 20 ms (50 per second) of this many bytes.
pub const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
pub const AUDIO_BYTES: usize = 120;
/// Video: frames per second, bits per second, and the packet size a frame
/// is cut into (RTP video packets stay near 1200 bytes).
pub const VIDEO_FPS: u32 = 30;
pub const VIDEO_BITS_PER_SECOND: u64 = 2_500_000;
pub const VIDEO_PACKET_BYTES: usize = 1200;
/// What a packet carries before its padding: magic, run id, stream,
/// sequence number, send time.
const MAGIC: &[u8; 4] = b"SGCF";
const HEADER_BYTES: usize = 4 + 4 + 1 + 4 + 8;

/// The two streams of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Audio,
    Video,
}

impl Stream {
    pub const ALL: [Stream; 2] = [Stream::Audio, Stream::Video];

    fn index(self) -> usize {
        match self {
            Stream::Audio => 0,
            Stream::Video => 1,
        }
    }

    fn from_byte(b: u8) -> Option<Stream> {
        match b {
            0 => Some(Stream::Audio),
            1 => Some(Stream::Video),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Stream::Audio => "audio",
            Stream::Video => "video",
        }
    }
}

/// The sizes of one video frame's packets: full packets and a shorter last
/// one, adding up to the frame's share of the bit rate.
pub fn video_frame_sizes() -> Vec<usize> {
    let frame = (VIDEO_BITS_PER_SECOND / 8 / u64::from(VIDEO_FPS)) as usize;
    let mut sizes = vec![VIDEO_PACKET_BYTES; frame / VIDEO_PACKET_BYTES];
    let rest = frame % VIDEO_PACKET_BYTES;
    if rest > 0 {
        sizes.push(rest.max(HEADER_BYTES));
    }
    sizes
}

fn video_frame_interval() -> Duration {
    Duration::from_secs(1) / VIDEO_FPS
}

/// How many packets of each stream a call of `length` sends: the schedule is
/// fixed, so the receiver knows what to expect without being told.
pub fn expected_packets(length: Duration) -> [u32; 2] {
    let audio = length.as_nanos().div_ceil(AUDIO_INTERVAL.as_nanos());
    // Frames at 0, 1/30 s, 2/30 s, ... before the end (not through the
    // rounded frame interval, which would add one at whole seconds).
    let frames = (length.as_nanos() * u128::from(VIDEO_FPS)).div_ceil(1_000_000_000);
    [audio as u32, (frames as usize * video_frame_sizes().len()) as u32]
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One packet's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub run: u32,
    pub stream: Stream,
    pub seq: u32,
    pub sent_ns: u64,
}

impl Header {
    /// Writes the header into the front of `buf` (at least [`HEADER_BYTES`]).
    pub fn write(&self, buf: &mut [u8]) {
        buf[..4].copy_from_slice(MAGIC);
        buf[4..8].copy_from_slice(&self.run.to_be_bytes());
        buf[8] = self.stream.index() as u8;
        buf[9..13].copy_from_slice(&self.seq.to_be_bytes());
        buf[13..21].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    /// The header of a received datagram, or None if it is not one of ours.
    pub fn read(buf: &[u8]) -> Option<Header> {
        if buf.len() < HEADER_BYTES || &buf[..4] != MAGIC {
            return None;
        }
        Some(Header {
            run: u32::from_be_bytes(buf[4..8].try_into().ok()?),
            stream: Stream::from_byte(buf[8])?,
            seq: u32::from_be_bytes(buf[9..13].try_into().ok()?),
            sent_ns: u64::from_be_bytes(buf[13..21].try_into().ok()?),
        })
    }
}

/// Sends a call of `length` on `socket` (connected to the receiver), on a
/// fixed schedule from now: a packet that is due goes out even if the ones
/// before it were late, as a real sender's media does. Send errors (a full
/// queue, an ICMP error from an earlier packet) are not retried: the packet
/// is lost, and the receiver counts it. Returns the packets sent per stream.
pub fn send(socket: &UdpSocket, run: u32, length: Duration) -> Result<[u32; 2]> {
    let expected = expected_packets(length);
    let frame_sizes = video_frame_sizes();
    let frame_interval = video_frame_interval();
    let mut buf = vec![0u8; VIDEO_PACKET_BYTES.max(AUDIO_BYTES)];
    let start = Instant::now();
    let (mut audio_seq, mut video_seq, mut frame) = (0u32, 0u32, 0u32);
    loop {
        let audio_due = (audio_seq < expected[0]).then(|| start + AUDIO_INTERVAL * audio_seq);
        let video_due = (video_seq < expected[1]).then(|| start + frame_interval * frame);
        let (due, stream) = match (audio_due, video_due) {
            (None, None) => break,
            (Some(a), Some(v)) if v < a => (v, Stream::Video),
            (Some(a), _) => (a, Stream::Audio),
            (None, Some(v)) => (v, Stream::Video),
        };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        match stream {
            Stream::Audio => {
                let header = Header {
                    run,
                    stream,
                    seq: audio_seq,
                    sent_ns: unix_ns(),
                };
                header.write(&mut buf);
                let _ = socket.send(&buf[..AUDIO_BYTES]);
                audio_seq += 1;
            }
            Stream::Video => {
                for &size in &frame_sizes {
                    let header = Header {
                        run,
                        stream,
                        seq: video_seq,
                        sent_ns: unix_ns(),
                    };
                    header.write(&mut buf);
                    let _ = socket.send(&buf[..size]);
                    video_seq += 1;
                }
                frame += 1;
            }
        }
    }
    Ok([audio_seq, video_seq])
}

/// RFC 3550's interarrival jitter (section 6.4.1 and A.8): for consecutive
/// packets i, j in arrival order, D = (Rj - Ri) - (Sj - Si), the change in
/// transit time, and J += (|D| - J) / 16.
#[derive(Clone, Debug, Default)]
pub struct Jitter {
    last_transit_ns: Option<i128>,
    jitter_ns: f64,
    /// Sum and count of the estimate after each packet, for its mean.
    sum_ns: f64,
    samples: u64,
    max_ns: f64,
}

impl Jitter {
    pub fn update(&mut self, sent_ns: u64, received_ns: u64) {
        let transit = i128::from(received_ns) - i128::from(sent_ns);
        if let Some(last) = self.last_transit_ns {
            let d = (transit - last).abs() as f64;
            self.jitter_ns += (d - self.jitter_ns) / 16.0;
            self.sum_ns += self.jitter_ns;
            self.samples += 1;
            self.max_ns = self.max_ns.max(self.jitter_ns);
        }
        self.last_transit_ns = Some(transit);
    }

    /// The estimate now (what an RTCP receiver report would carry).
    pub fn current_ms(&self) -> f64 {
        self.jitter_ns / 1e6
    }

    /// The estimate's mean over the call (one sample per packet).
    pub fn mean_ms(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.sum_ns / self.samples as f64 / 1e6
        }
    }

    pub fn max_ms(&self) -> f64 {
        self.max_ns / 1e6
    }
}

/// What arrived of one stream.
#[derive(Clone, Debug, Default)]
struct StreamLog {
    seen: Vec<bool>,
    /// One-way delays of the packets that arrived, in microseconds.
    delays_us: Vec<f64>,
    duplicates: u32,
    /// Packets that arrived after one with a higher sequence number.
    reordered: u32,
    highest: Option<u32>,
    jitter: Jitter,
}

/// The receiver's bookkeeping for one call run.
#[derive(Clone, Debug)]
pub struct Recorder {
    run: u32,
    expected: [u32; 2],
    streams: [StreamLog; 2],
    /// Datagrams that were not this run's packets.
    foreign: u32,
}

impl Recorder {
    pub fn new(run: u32, expected: [u32; 2]) -> Recorder {
        let log = |n: u32| StreamLog {
            seen: vec![false; n as usize],
            ..StreamLog::default()
        };
        Recorder {
            run,
            expected,
            streams: [log(expected[0]), log(expected[1])],
            foreign: 0,
        }
    }

    /// Takes one datagram received at `received_ns` (CLOCK_REALTIME).
    pub fn record(&mut self, datagram: &[u8], received_ns: u64) {
        let Some(h) = Header::read(datagram).filter(|h| h.run == self.run) else {
            self.foreign += 1;
            return;
        };
        let log = &mut self.streams[h.stream.index()];
        let Some(seen) = log.seen.get_mut(h.seq as usize) else {
            self.foreign += 1;
            return;
        };
        if *seen {
            log.duplicates += 1;
            return;
        }
        *seen = true;
        if log.highest.is_some_and(|top| h.seq < top) {
            log.reordered += 1;
        }
        log.highest = log.highest.max(Some(h.seq));
        let delay_ns = i128::from(received_ns) - i128::from(h.sent_ns);
        log.delays_us.push(delay_ns as f64 / 1e3);
        log.jitter.update(h.sent_ns, received_ns);
    }

    /// Whether every expected packet has arrived.
    pub fn complete(&self) -> bool {
        self.streams
            .iter()
            .zip(self.expected)
            .all(|(log, n)| log.delays_us.len() == n as usize)
    }

    pub fn report(&self) -> CallReport {
        let stream = |s: Stream| {
            let log = &self.streams[s.index()];
            let mut ms: Vec<f64> = log.delays_us.iter().map(|us| us / 1e3).collect();
            ms.sort_by(f64::total_cmp);
            StreamReport {
                expected: self.expected[s.index()],
                received: log.delays_us.len() as u32,
                duplicates: log.duplicates,
                reordered: log.reordered,
                p50_ms: percentile(&ms, 50.0),
                p99_ms: percentile(&ms, 99.0),
                max_ms: ms.last().copied().unwrap_or(f64::NAN),
                jitter_mean_ms: log.jitter.mean_ms(),
                jitter_max_ms: log.jitter.max_ms(),
            }
        };
        let mut all: Vec<f64> = self
            .streams
            .iter()
            .flat_map(|l| l.delays_us.iter().map(|us| us / 1e3))
            .collect();
        all.sort_by(f64::total_cmp);
        CallReport {
            audio: stream(Stream::Audio),
            video: stream(Stream::Video),
            p50_ms: percentile(&all, 50.0),
            p99_ms: percentile(&all, 99.0),
            foreign: self.foreign,
        }
    }
}

/// Nearest-rank percentile of sorted samples (NaN if there are none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// One stream's result.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamReport {
    pub expected: u32,
    pub received: u32,
    pub duplicates: u32,
    pub reordered: u32,
    /// One-way delay of the packets that arrived.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// RFC 3550 jitter: its mean over the call and its highest value.
    pub jitter_mean_ms: f64,
    pub jitter_max_ms: f64,
}

impl StreamReport {
    pub fn lost(&self) -> u32 {
        self.expected.saturating_sub(self.received)
    }
}

/// A call's result: each stream, and the delay over all packets.
#[derive(Clone, Debug, PartialEq)]
pub struct CallReport {
    pub audio: StreamReport,
    pub video: StreamReport,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub foreign: u32,
}

impl CallReport {
    pub fn lost(&self) -> u32 {
        self.audio.lost() + self.video.lost()
    }

    /// The worse of the two streams' mean jitter.
    pub fn jitter_ms(&self) -> f64 {
        self.audio.jitter_mean_ms.max(self.video.jitter_mean_ms)
    }

    pub fn to_json(&self) -> Value {
        let s = |r: &StreamReport| {
            json!({
                "expected": r.expected, "received": r.received,
                "duplicates": r.duplicates, "reordered": r.reordered,
                "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms,
                "jitter_mean_ms": r.jitter_mean_ms, "jitter_max_ms": r.jitter_max_ms,
            })
        };
        json!({
            "audio": s(&self.audio), "video": s(&self.video),
            "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "foreign": self.foreign,
        })
    }

    pub fn from_json(v: &Value) -> Result<CallReport> {
        let f = |v: &Value, k: &str| -> Result<f64> {
            // NaN is written as null.
            match v.get(k) {
                Some(Value::Null) => Ok(f64::NAN),
                Some(x) => x
                    .as_f64()
                    .with_context(|| format!("call report: {k} is not a number")),
                None => bail!("call report: no {k}"),
            }
        };
        let n = |v: &Value, k: &str| -> Result<u32> {
            v.get(k)
                .and_then(Value::as_u64)
                .and_then(|x| u32::try_from(x).ok())
                .with_context(|| format!("call report: no count {k}"))
        };
        let s = |k: &str| -> Result<StreamReport> {
            let v = v.get(k).with_context(|| format!("call report: no {k}"))?;
            Ok(StreamReport {
                expected: n(v, "expected")?,
                received: n(v, "received")?,
                duplicates: n(v, "duplicates")?,
                reordered: n(v, "reordered")?,
                p50_ms: f(v, "p50_ms")?,
                p99_ms: f(v, "p99_ms")?,
                max_ms: f(v, "max_ms")?,
                jitter_mean_ms: f(v, "jitter_mean_ms")?,
                jitter_max_ms: f(v, "jitter_max_ms")?,
            })
        };
        Ok(CallReport {
            audio: s("audio")?,
            video: s("video")?,
            p50_ms: f(v, "p50_ms")?,
            p99_ms: f(v, "p99_ms")?,
            foreign: n(v, "foreign")?,
        })
    }
}

/// Receives the call `run` of `length` on `socket` until every packet has
/// arrived or `grace` after the call's end, counted from its first packet
/// (a packet later than that is lost to a call anyway). Returns the report
/// and the address the call's first packet came from (through a tunnel:
/// the gateway's).
pub fn receive(
    socket: &UdpSocket,
    run: u32,
    length: Duration,
    grace: Duration,
) -> Result<(CallReport, Option<IpAddr>)> {
    let mut recorder = Recorder::new(run, expected_packets(length));
    let mut buf = vec![0u8; 2048];
    // The receiver starts before the sender; the clock runs from the
    // first packet of this run.
    let mut deadline: Option<Instant> = None;
    let mut source = None;
    let idle_limit = Instant::now() + length + grace + Duration::from_secs(10);
    loop {
        let now = Instant::now();
        let until = deadline.unwrap_or(idle_limit);
        if now >= until || recorder.complete() {
            break;
        }
        socket
            .set_read_timeout(Some(until - now))
            .context("call receiver: setting the timeout")?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let at = unix_ns();
                if deadline.is_none() && Header::read(&buf[..n]).is_some_and(|h| h.run == run) {
                    deadline = Some(Instant::now() + length + grace);
                    source = Some(from.ip());
                }
                recorder.record(&buf[..n], at);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => return Err(e).context("call receiver: receiving"),
        }
    }
    Ok((recorder.report(), source))
}

// ------------------------------------------------------------ in the lab

/// The receiver's port on the lab host (an RTP port; a profile that carries
/// the call must allow UDP to it).
pub const LAB_PORT: u16 = 5004;

/// `PROGRAM call-send ADDR PORT RUN SECS`: what a binary runs in the client
/// namespace; prints JSON {"sent": [audio, video]}.
pub fn cli_send(args: &[String]) -> Result<()> {
    let [a, port, run, secs] = args else {
        bail!("usage: call-send ADDR PORT RUN SECS");
    };
    let target: std::net::SocketAddr = format!("{a}:{port}").parse().context("call-send: bad address")?;
    let run: u32 = run.parse().context("call-send: bad RUN")?;
    let secs: u64 = secs.parse().context("call-send: bad SECS")?;
    let sock = UdpSocket::bind("0.0.0.0:0").context("call-send: bind")?;
    sock.connect(target).context("call-send: connect")?;
    let sent = send(&sock, run, Duration::from_secs(secs))?;
    println!("{}", json!({ "sent": sent }));
    Ok(())
}

/// `PROGRAM call-recv ADDR PORT RUN SECS`: binds, prints `ready`, receives
/// the call and prints its report as JSON (with "source", the address it
/// came from).
pub fn cli_receive(args: &[String]) -> Result<()> {
    use std::io::Write;
    let [a, port, run, secs] = args else {
        bail!("usage: call-recv ADDR PORT RUN SECS");
    };
    let bind: std::net::SocketAddr = format!("{a}:{port}").parse().context("call-recv: bad address")?;
    let run: u32 = run.parse().context("call-recv: bad RUN")?;
    let secs: u64 = secs.parse().context("call-recv: bad SECS")?;
    let sock = UdpSocket::bind(bind).context("call-recv: bind")?;
    println!("ready");
    std::io::stdout().flush().context("call-recv: stdout")?;
    let (report, source) = receive(&sock, run, Duration::from_secs(secs), LATE_AFTER)?;
    let mut v = report.to_json();
    v["source"] = json!(source.map(|ip| ip.to_string()).unwrap_or_default());
    println!("{v}");
    Ok(())
}

/// A packet later than this after the call's end is lost to the call.
pub const LATE_AFTER: Duration = Duration::from_secs(1);

/// Runs one call of `secs` from the client namespace to the lab host
/// (203.0.113.10:5004). `program` is a binary whose `call-send` and
/// `call-recv` subcommands are [`cli_send`] and [`cli_receive`]; `run` tells
/// this call's packets from any other's. Checks the call came through the
/// tunnel (the host saw the gateway's address).
pub fn run_in_lab(lab: &crate::Lab, program: &str, secs: u64, run: u32) -> Result<CallReport> {
    use crate::{addr, Ns};
    let (port, run_s, secs_s) = (LAB_PORT.to_string(), run.to_string(), secs.to_string());
    let receiver = lab.spawn_named(
        Ns::Host,
        "call-recv",
        &[program, "call-recv", addr::HOST_V4, &port, &run_s, &secs_s],
    )?;
    crate::wait_until(Duration::from_secs(5), "the call receiver to start", || {
        !receiver.is_running() || receiver.log().contains("ready")
    })?;
    let sender = lab.spawn_named(
        Ns::Client,
        "call-send",
        &[program, "call-send", addr::HOST_V4, &port, &run_s, &secs_s],
    )?;
    let finished = |child: &crate::LabChild, limit: Duration| -> Result<String> {
        match child.wait_exit(limit) {
            Ok(status) if status.success() => Ok(child.log()),
            Ok(status) => bail!("{} failed ({status}): {}", child.name(), child.log().trim()),
            Err(e) => {
                let _ = child.kill();
                Err(e)
            }
        }
    };
    let sent = finished(&sender, Duration::from_secs(secs + 15));
    let received = finished(&receiver, Duration::from_secs(secs + 30));
    sent?;
    let log = received?;
    let line = log
        .lines()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("call-recv printed no result: {}", log.trim()))?;
    let v: Value = serde_json::from_str(line).context("parsing call-recv's output")?;
    let source = v["source"].as_str().unwrap_or("");
    if source != addr::GATEWAY_V4 {
        bail!(
            "the call arrived from `{source}`, not the gateway {}: not through the tunnel",
            addr::GATEWAY_V4
        );
    }
    CallReport::from_json(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_a_call() {
        let sizes = video_frame_sizes();
        let frame: usize = sizes.iter().sum();
        // 2.5 Mbit/s in 30 frames: 10 416 bytes each, 8 full packets and a tail.
        assert_eq!(frame, 10_416);
        assert_eq!(sizes.len(), 9);
        assert!(sizes
            .iter()
            .all(|s| (HEADER_BYTES..=VIDEO_PACKET_BYTES).contains(s)));
        let [audio, video] = expected_packets(Duration::from_secs(2));
        assert_eq!(audio, 100);
        assert_eq!(video, 60 * 9);
    }

    #[test]
    fn a_header_survives_the_wire_and_strangers_are_ignored() {
        let h = Header {
            run: 7,
            stream: Stream::Video,
            seq: 123_456,
            sent_ns: 1_700_000_000_123_456_789,
        };
        let mut buf = [0u8; 64];
        h.write(&mut buf);
        assert_eq!(Header::read(&buf), Some(h));
        assert_eq!(Header::read(&buf[..HEADER_BYTES - 1]), None);
        assert_eq!(Header::read(b"bench-ping 1 and some more bytes"), None);
    }

    #[test]
    fn jitter_follows_rfc_3550() {
        let mut j = Jitter::default();
        // Constant transit: no jitter, however large the delay.
        for i in 0..10u64 {
            j.update(i * 20_000_000, i * 20_000_000 + 5_000_000);
        }
        assert_eq!(j.current_ms(), 0.0);
        // One packet 16 ms late: D = 16 ms, J = 16/16 = 1 ms; the next is
        // back on time: D = 16 ms again, J = 1 + (16 - 1)/16 = 1.9375 ms.
        j.update(10 * 20_000_000, 10 * 20_000_000 + 5_000_000 + 16_000_000);
        assert!((j.current_ms() - 1.0).abs() < 1e-9);
        j.update(11 * 20_000_000, 11 * 20_000_000 + 5_000_000);
        assert!((j.current_ms() - 1.9375).abs() < 1e-9);
        assert!((j.max_ms() - 1.9375).abs() < 1e-9);
        // Mean over the 11 updates after the first packet.
        assert!((j.mean_ms() - (1.0 + 1.9375) / 11.0).abs() < 1e-9);
    }

    fn datagram(run: u32, stream: Stream, seq: u32, sent_ns: u64) -> Vec<u8> {
        let mut buf = vec![0u8; 120];
        Header {
            run,
            stream,
            seq,
            sent_ns,
        }
        .write(&mut buf);
        buf
    }

    #[test]
    fn the_recorder_counts_loss_duplicates_reordering_and_delay() {
        let mut r = Recorder::new(9, [4, 3]);
        let ms = 1_000_000u64;
        r.record(&datagram(9, Stream::Audio, 0, 0), 2 * ms);
        r.record(&datagram(9, Stream::Audio, 2, 40 * ms), 44 * ms);
        r.record(&datagram(9, Stream::Audio, 1, 20 * ms), 46 * ms);
        r.record(&datagram(9, Stream::Audio, 1, 20 * ms), 47 * ms);
        // Another run's packet, a sequence number past the schedule, noise.
        r.record(&datagram(8, Stream::Audio, 3, 60 * ms), 61 * ms);
        r.record(&datagram(9, Stream::Video, 3, 60 * ms), 61 * ms);
        r.record(b"not a call", 61 * ms);
        for seq in 0..3 {
            r.record(&datagram(9, Stream::Video, seq, 0), 3 * ms);
        }
        assert!(!r.complete());
        let rep = r.report();
        assert_eq!((rep.audio.received, rep.audio.lost()), (3, 1));
        assert_eq!((rep.audio.duplicates, rep.audio.reordered), (1, 1));
        assert_eq!(rep.video.lost(), 0);
        assert_eq!(rep.lost(), 1);
        assert_eq!(rep.foreign, 3);
        // Audio delays 2, 4, 26 ms; video 3, 3, 3 ms.
        assert_eq!(rep.audio.p50_ms, 4.0);
        assert_eq!(rep.audio.p99_ms, 26.0);
        assert_eq!(rep.p50_ms, 3.0);
        assert_eq!(rep.p99_ms, 26.0);
        let back = CallReport::from_json(&rep.to_json()).expect("the report reads back");
        assert_eq!(back, rep);
        r.record(&datagram(9, Stream::Audio, 3, 60 * ms), 62 * ms);
        assert!(r.complete());
    }
}
