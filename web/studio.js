// FrameCast studio: live video over WHEP (WebRTC), controls over the "control" data channel (protocol v1, see
// stream/control.py), stats from getStats and /metrics. No build step: plain browser JavaScript.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const $ = (id) => document.getElementById(id);
const video = $("video");

// the world model's vocabulary first (the embedded default), then free text for other models
const PRESETS = [
  "a red circle on grass by day in clear weather", "snow at night", "sand at dusk in fog",
  "water in rain", "a cyan diamond on snow in snowfall", "a yellow triangle on grass at dusk",
];
const ACTION_KEYS = {  // key code -> action id (models/world/vocabulary.py: 1 up, 2 down, 3 left, 4 right)
  ArrowUp: 1, KeyW: 1, ArrowDown: 2, KeyS: 2, ArrowLeft: 3, KeyA: 3, ArrowRight: 4, KeyD: 4,
};
const HISTORY_KEY = "framecast.prompts";
const RECONNECT_MAX_S = 10;
const STALL_S = 5;  // no new frame decoded for this long while connected: treat the connection as lost

// what the page knows, exposed for people in the console and for the browser test
const studio = window.studio = {
  state: "connecting", connects: 0, hello: null, acks: [], errors: [], chunks: 0,
  framesDecoded: 0, framesDropped: 0, fps: 0, latencyMs: null, rttMs: null, history: [],
  sent: 0, held: [],
  grab(size) {  // the current video frame, scaled to size x size, as a flat RGB array (for tests and tools)
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = size;
    const context = canvas.getContext("2d", {willReadFrequently: true});
    context.drawImage(video, 0, 0, size, size);
    const rgba = context.getImageData(0, 0, size, size).data, rgb = new Array(size * size * 3);
    for (let i = 0, j = 0; i < rgba.length; i += 4) { rgb[j++] = rgba[i]; rgb[j++] = rgba[i + 1]; rgb[j++] = rgba[i + 2]; }
    return rgb;
  },
};

let pc = null, channel = null, resource = null, retry = 0, reconnectTimer = null;

function log(text) {
  const line = `${new Date().toISOString().slice(11, 23)} ${text}\n`;
  console.info(`framecast: ${text}`);
  $("log").textContent = (line + $("log").textContent).slice(0, 6000);
}

function setState(state, text) {
  studio.state = state;
  const status = $("status");
  status.className = `status ${state}`;
  status.textContent = text;
}

function banner(text) {
  const element = $("banner");
  element.hidden = !text;
  element.textContent = text || "";
}

// --- connection: WHEP (POST the offer, get the answer; DELETE the resource to end) ---------------------------------
function gathered(peer, timeoutMs) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (peer.iceGatheringState === "complete") { clearTimeout(timer); resolve(); } };
    const timer = setTimeout(resolve, timeoutMs);  // send what we have: host candidates come first
    peer.addEventListener("icegatheringstatechange", done);
  });
}

async function connect() {
  reconnectTimer = null;
  previous = stalledSince = null;  // counters start again with each connection
  studio.framesDecoded = studio.framesDropped = 0;
  setState("connecting", "connecting…");
  const peer = pc = new RTCPeerConnection({iceServers: []});
  peer.addTransceiver("video", {direction: "recvonly"});
  const control = channel = peer.createDataChannel("control");
  control.onmessage = (event) => onMessage(event.data);
  control.onopen = () => log("control channel open");
  control.onclose = () => { if (peer === pc) lost("control channel closed"); };
  peer.ontrack = (event) => { video.srcObject = event.streams[0] || new MediaStream([event.track]); };
  peer.onconnectionstatechange = () => {
    if (peer !== pc) return;
    const state = peer.connectionState;
    log(`connection ${state}`);
    if (state === "connected") {
      retry = 0;
      studio.connects += 1;
      banner(null);
      setState("connected", "live");
    } else if (state === "failed" || state === "closed") {
      lost(`connection ${state}`);
    }
  };
  try {
    await peer.setLocalDescription(await peer.createOffer());
    await gathered(peer, 2000);
    const headers = {"Content-Type": "application/sdp"};
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch("/whep", {method: "POST", headers, body: peer.localDescription.sdp});
    const body = await response.text();
    if (response.status !== 201) throw new Error(`WHEP answer ${response.status}: ${body}`);
    resource = new URL(response.headers.get("Location"), location.href).href;
    await peer.setRemoteDescription({type: "answer", sdp: body});
  } catch (error) {
    lost(String(error.message || error));
  }
}

function teardown() {
  const peer = pc;
  pc = channel = null;
  if (peer) peer.close();
  if (resource) {
    fetch(resource, {method: "DELETE", keepalive: true}).catch(() => {});
    resource = null;
  }
}

function lost(reason) {
  if (reconnectTimer !== null) return;
  log(`connection lost: ${reason}`);
  teardown();
  const wait = Math.min(RECONNECT_MAX_S, 2 ** retry);
  retry += 1;
  setState("lost", "connection lost");
  let left = wait;
  const tick = () => {
    banner(`Connection lost (${reason}). Reconnecting in ${left} s…`);
    if (left-- <= 0) { banner("Reconnecting…"); connect(); return; }
    reconnectTimer = setTimeout(tick, 1000);
  };
  tick();
}

addEventListener("pagehide", teardown);

// --- control messages -----------------------------------------------------------------------------------------------
function send(message) {
  if (!channel || channel.readyState !== "open") { log(`not connected: ${message.type} not sent`); return false; }
  studio.sent += 1;
  channel.send(JSON.stringify({v: 1, ...message, id: studio.sent}));
  return true;
}

function onMessage(text) {
  let message;
  try { message = JSON.parse(text); } catch { log(`unreadable message: ${text.slice(0, 80)}`); return; }
  if (message.type === "hello") {
    studio.hello = message;
    $("role").textContent = message.can_steer ? `session ${message.session}: steering` :
      `session ${message.session}: watching (steering needs the token link)`;
    $("pause").textContent = message.paused ? "Resume" : "Pause";
  } else if (message.type === "ack") {
    studio.acks.push({...message, at: performance.now()});
    $("stat-ack").textContent = `${message.control} at chunk ${message.chunk}${message.superseded ? " (superseded)" : ""}`;
  } else if (message.type === "error") {
    studio.errors.push(message);
    log(`error: ${message.error}`);
  } else if (message.type === "chunk") {
    studio.chunks += 1;
  }
}

function remember(prompt) {
  const history = [prompt, ...studio.history.filter((p) => p !== prompt)].slice(0, 20);
  studio.history = history;
  try { localStorage.setItem(HISTORY_KEY, JSON.stringify(history)); } catch { /* private mode: keep in memory */ }
  $("prompt-history").replaceChildren(...history.map((p) => Object.assign(document.createElement("option"), {value: p})));
}

function switchPrompt(text) {
  const prompt = text.trim();
  if (!prompt) { log("empty prompt: type something first"); return; }
  if (send({type: "prompt", text: prompt})) { remember(prompt); log(`prompt: ${prompt}`); }
}

$("prompt-form").addEventListener("submit", (event) => { event.preventDefault(); switchPrompt($("prompt").value); });
for (const preset of PRESETS) {
  const button = Object.assign(document.createElement("button"), {type: "button", textContent: preset});
  button.addEventListener("click", () => { $("prompt").value = preset; switchPrompt(preset); });
  $("presets").append(button);
}
try { studio.history = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]"); } catch { studio.history = []; }
if (studio.history.length) remember(studio.history[0]);

$("pause").addEventListener("click", () => {
  const pausing = $("pause").textContent === "Pause";
  if (send({type: pausing ? "pause" : "resume"})) $("pause").textContent = pausing ? "Resume" : "Pause";
});
$("steps").addEventListener("change", () => send({type: "steps", steps: Number($("steps").value || 8)}));

// keys: the newest held direction wins; releasing it falls back to the one still held, or to "none" (0)
function heldAction() { return studio.held.length ? ACTION_KEYS[studio.held[studio.held.length - 1]] : 0; }
addEventListener("keydown", (event) => {
  if (!(event.code in ACTION_KEYS) || event.target instanceof HTMLInputElement || event.repeat) return;
  event.preventDefault();
  studio.held = [...studio.held.filter((k) => k !== event.code), event.code];
  send({type: "action", action: heldAction()});
});
addEventListener("keyup", (event) => {
  if (!studio.held.includes(event.code)) return;
  studio.held = studio.held.filter((k) => k !== event.code);
  send({type: "action", action: heldAction()});
});
addEventListener("blur", () => { if (studio.held.length) { studio.held = []; send({type: "action", action: 0}); } });
video.tabIndex = 0;
video.addEventListener("click", () => video.focus());

// --- stats: getStats every second, /metrics every two; a one-minute chart of fps and latency ------------------------
const series = {fps: [], latency: []};
let previous = null, stalledSince = null;

async function sampleStats() {
  if (!pc || studio.state !== "connected") return;
  const report = await pc.getStats();
  let inbound = null, pair = null;
  report.forEach((entry) => {
    if (entry.type === "inbound-rtp" && entry.kind === "video") inbound = entry;
    if (entry.type === "candidate-pair" && entry.nominated && entry.state === "succeeded") pair = entry;
  });
  if (!inbound) return;
  const now = performance.now();
  studio.framesDecoded = inbound.framesDecoded || 0;
  studio.framesDropped = inbound.framesDropped || 0;
  studio.rttMs = pair && pair.currentRoundTripTime !== undefined ? 1000 * pair.currentRoundTripTime : null;
  if (previous) {
    const seconds = (now - previous.at) / 1000, frames = studio.framesDecoded - previous.decoded;
    studio.fps = frames / seconds;
    const emitted = (inbound.jitterBufferEmittedCount || 0) - previous.emitted;
    const jitterMs = emitted > 0 ? 1000 * ((inbound.jitterBufferDelay || 0) - previous.jitter) / emitted : 0;
    const decodeMs = frames > 0 ? 1000 * ((inbound.totalDecodeTime || 0) - previous.decode) / frames : 0;
    // media time -> on screen: the server's latency budget (generation, sent at the frame's deadline), half the
    // round trip, the jitter buffer and the decoder
    const budgetMs = studio.hello ? 1000 * (studio.hello.latency_budget_s || 0) : 0;
    studio.latencyMs = budgetMs + (studio.rttMs || 0) / 2 + jitterMs + decodeMs;
    stalledSince = frames > 0 ? null : (stalledSince ?? now);
    if (stalledSince !== null && now - stalledSince > STALL_S * 1000) lost(`no video for ${STALL_S} s`);
  }
  previous = {at: now, decoded: studio.framesDecoded, emitted: inbound.jitterBufferEmittedCount || 0,
              jitter: inbound.jitterBufferDelay || 0, decode: inbound.totalDecodeTime || 0};
  $("stat-fps").textContent = studio.fps.toFixed(1);
  $("stat-latency").textContent = studio.latencyMs === null ? "–" : `${studio.latencyMs.toFixed(0)} ms (est.)`;
  push(series.fps, studio.fps);
  push(series.latency, studio.latencyMs || 0);
  drawChart();
}

function push(values, value) { values.push(value); if (values.length > 60) values.shift(); }

function metric(text, name) {
  const match = text.match(new RegExp(`^${name}(?:\\{[^}]*\\})? ([0-9.eE+-]+|NaN)$`, "m"));
  return match ? Number(match[1]) : null;
}

async function sampleMetrics() {
  try {
    const text = await (await fetch("/metrics")).text();
    const misses = metric(text, "framecast_deadline_misses_total"), frames = metric(text, "framecast_deadline_frames_total");
    const dropped = metric(text, "framecast_viewer_frames_dropped_total");
    if (misses !== null && frames) $("stat-misses").textContent = `${misses} / ${frames} (${(100 * misses / frames).toFixed(1)}%)`;
    $("stat-dropped").textContent = `${studio.framesDropped} here, ${dropped ?? "?"} all viewers (server)`;
  } catch { /* the connection banner says what is wrong */ }
}

function drawChart() {
  const canvas = $("chart"), context = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  context.clearRect(0, 0, w, h);
  const lines = [["fps", series.fps, "#6c6", Math.max(35, ...series.fps)],
                 ["latency ms", series.latency, "#6af", Math.max(500, ...series.latency)]];
  lines.forEach(([label, values, colour, top], n) => {
    context.strokeStyle = context.fillStyle = colour;
    context.beginPath();
    values.forEach((v, i) => context[i ? "lineTo" : "moveTo"](i * w / 59, h - 4 - (h - 16) * v / top));
    context.stroke();
    context.fillText(`${label} (max ${top.toFixed(0)})`, 6 + n * 150, 12);
  });
}

setInterval(sampleStats, 1000);
setInterval(sampleMetrics, 2000);
connect();
