// The lab's call client: Janus video room over the Janus HTTP API, no
// library. One publisher connection (our fake camera and microphone) and one
// subscriber connection (the other participant). Candidates are trickled.
"use strict";

const params = new URLSearchParams(location.search);
const me = params.get("name") || "guest";
const ROOM = 1234;
// meet.test's STUN/TURN (coturn) is in the profile. The last two are not:
// the stub must refuse the name and the firewall the address.
const ICE_SERVERS = [
  { urls: "stun:meet.test:3478" },
  { urls: "turn:meet.test:3478?transport=udp", username: "lab", credential: "labsecret" },
  { urls: "stun:stun.other.test:3478" },
  { urls: "stun:203.0.113.20:3478" },
];

const state = {
  me, joined: false, publisherId: null, remoteFeed: null, remoteName: null,
  log: [], errors: [], iceErrors: [], candidates: [], pubPc: null, subPc: null,
};
window.callState = state;

function log(text) {
  state.log.push(new Date().toISOString().slice(11, 19) + " " + text);
  document.getElementById("log").textContent = state.log.slice(-6).join("\n");
}
function status(text) { document.getElementById("status").textContent = text; }
function fail(where, e) { state.errors.push(where + ": " + e); log("error " + where + ": " + e); }

let session = null;
let pubHandle = null;
const waiters = [];

async function api(path, body) {
  body.transaction = Math.random().toString(36).slice(2);
  const r = await fetch("/janus" + path, { method: "POST", body: JSON.stringify(body) });
  const j = await r.json();
  if (j.janus === "error") throw new Error(JSON.stringify(j.error));
  return j;
}

// Resolves with the first event from `handle` that `pred` accepts.
function waitEvent(handle, pred) {
  return new Promise((resolve) => waiters.push({ handle, pred, resolve }));
}

function dispatch(ev) {
  if (ev.janus === "keepalive") return;
  const data = ev.plugindata ? ev.plugindata.data : null;
  for (let i = 0; i < waiters.length; i++) {
    const w = waiters[i];
    if (w.handle === ev.sender && w.pred(ev, data)) {
      waiters.splice(i, 1);
      w.resolve(ev);
      return;
    }
  }
  if (ev.janus === "webrtcup") log("media up on handle " + ev.sender);
  if (ev.janus === "hangup") log("hangup on handle " + ev.sender + ": " + ev.reason);
  if (data && ev.sender === pubHandle && data.publishers) {
    for (const p of data.publishers) subscribe(p).catch((e) => fail("subscribe", e));
  }
}

async function longPoll() {
  for (;;) {
    try {
      const r = await fetch(`/janus/${session}?maxev=10&rid=${Date.now()}`);
      let events = await r.json();
      if (!Array.isArray(events)) events = [events];
      for (const ev of events) dispatch(ev);
    } catch (e) {
      log("long poll: " + e);
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

// Trickles candidates to Janus, holding them until the offer or answer they
// belong to has been sent.
function trickler(pc, handle) {
  const queue = [];
  let ready = false;
  const send = (candidate) =>
    api(`/${session}/${handle}`, { janus: "trickle", candidate }).catch((e) => fail("trickle", e));
  pc.onicecandidate = (e) => {
    const c = e.candidate ? e.candidate.toJSON() : { completed: true };
    if (e.candidate) state.candidates.push(`${e.candidate.type} ${e.candidate.address}:${e.candidate.port}`);
    if (ready) send(c); else queue.push(c);
  };
  pc.onicecandidateerror = (e) => {
    state.iceErrors.push({ url: e.url, code: e.errorCode, text: e.errorText, address: e.address });
  };
  pc.oniceconnectionstatechange = () => log(`ice ${handle}: ${pc.iceConnectionState}`);
  return () => { ready = true; for (const c of queue.splice(0)) send(c); };
}

async function publish() {
  const media = await navigator.mediaDevices.getUserMedia({
    audio: true, video: { width: 320, height: 240, frameRate: 15 },
  });
  document.getElementById("local").srcObject = media;
  const pc = new RTCPeerConnection({ iceServers: ICE_SERVERS });
  state.pubPc = pc;
  const flush = trickler(pc, pubHandle);
  for (const t of media.getTracks()) pc.addTrack(t, media);
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  const answered = waitEvent(pubHandle, (ev) => !!ev.jsep);
  await api(`/${session}/${pubHandle}`, {
    janus: "message", body: { request: "publish", audio: true, video: true }, jsep: offer,
  });
  flush();
  const ev = await answered;
  await pc.setRemoteDescription(ev.jsep);
  log("published");
}

async function subscribe(p) {
  if (state.remoteFeed !== null) return;
  state.remoteFeed = p.id;
  state.remoteName = p.display;
  document.getElementById("remotename").textContent = p.display || "other party";
  const attached = await api(`/${session}`, { janus: "attach", plugin: "janus.plugin.videoroom" });
  const handle = attached.data.id;
  const offered = waitEvent(handle, (ev) => !!ev.jsep);
  await api(`/${session}/${handle}`, {
    janus: "message", body: { request: "join", ptype: "subscriber", room: ROOM, streams: [{ feed: p.id }] },
  });
  const ev = await offered;
  const pc = new RTCPeerConnection({ iceServers: ICE_SERVERS });
  state.subPc = pc;
  const flush = trickler(pc, handle);
  const remote = new MediaStream();
  document.getElementById("remote").srcObject = remote;
  pc.ontrack = (e) => remote.addTrack(e.track);
  await pc.setRemoteDescription(ev.jsep);
  const answer = await pc.createAnswer();
  await pc.setLocalDescription(answer);
  await api(`/${session}/${handle}`, { janus: "message", body: { request: "start", room: ROOM }, jsep: answer });
  flush();
  // A remote candidate named by an mDNS (.local) name, as browsers hide
  // their addresses: resolving it makes Chromium send an mDNS query, which
  // must not leave the machine (the test counts that it was sent).
  pc.addIceCandidate({
    candidate: "candidate:1 1 udp 2122260223 sessiongate-lab-probe.local 40000 typ host",
    sdpMLineIndex: 0,
  }).catch((e) => log("mDNS candidate: " + e));
  log("subscribed to " + p.display);
  status("in the call");
}

async function start() {
  document.getElementById("who").textContent = me;
  const created = await api("", { janus: "create" });
  session = created.data.id;
  longPoll();
  const attached = await api(`/${session}`, { janus: "attach", plugin: "janus.plugin.videoroom" });
  pubHandle = attached.data.id;
  const joined = waitEvent(pubHandle, (ev, d) => d && d.videoroom === "joined");
  await api(`/${session}/${pubHandle}`, {
    janus: "message", body: { request: "join", ptype: "publisher", room: ROOM, display: me },
  });
  const ev = await joined;
  state.joined = true;
  state.publisherId = ev.plugindata.data.id;
  status("joined, waiting for the other party");
  log("joined room " + ROOM);
  await publish();
  for (const p of ev.plugindata.data.publishers || []) await subscribe(p);
}

function pcStats(report) {
  const byId = new Map();
  report.forEach((r) => byId.set(r.id, r));
  const s = { inbound: {}, outbound: {}, remoteInbound: {}, pair: null };
  report.forEach((r) => {
    if (r.type === "inbound-rtp") {
      s.inbound[r.kind] = {
        packetsReceived: r.packetsReceived || 0, packetsLost: r.packetsLost || 0,
        jitter: r.jitter || 0, framesDecoded: r.framesDecoded || 0, framesReceived: r.framesReceived || 0,
        bytesReceived: r.bytesReceived || 0, freezeCount: r.freezeCount || 0,
      };
    } else if (r.type === "outbound-rtp") {
      s.outbound[r.kind] = { packetsSent: r.packetsSent || 0, framesEncoded: r.framesEncoded || 0 };
    } else if (r.type === "remote-inbound-rtp") {
      s.remoteInbound[r.kind] = { roundTripTime: r.roundTripTime, packetsLost: r.packetsLost, jitter: r.jitter };
    } else if (r.type === "transport" && r.selectedCandidatePairId) {
      const pair = byId.get(r.selectedCandidatePairId);
      if (!pair) return;
      const l = byId.get(pair.localCandidateId);
      const m = byId.get(pair.remoteCandidateId);
      const text = (c) =>
        c ? `${c.candidateType} ${c.address}:${c.port}/${c.protocol}` + (c.relatedAddress ? ` base ${c.relatedAddress}` : "") : null;
      s.pair = { state: pair.state, rtt: pair.currentRoundTripTime, local: text(l), remote: text(m) };
    }
  });
  return s;
}

// What the test reads through Runtime.evaluate: one JSON string.
window.callStats = async function () {
  const out = {
    me, joined: state.joined, remoteName: state.remoteName, errors: state.errors,
    iceErrors: state.iceErrors, candidates: state.candidates, log: state.log.slice(-20), publisher: null, subscriber: null,
  };
  for (const [name, pc] of [["publisher", state.pubPc], ["subscriber", state.subPc]]) {
    if (!pc) continue;
    out[name] = Object.assign({ ice: pc.iceConnectionState }, pcStats(await pc.getStats()));
  }
  return JSON.stringify(out);
};

start().catch((e) => { fail("start", e); status("failed: " + e); });
