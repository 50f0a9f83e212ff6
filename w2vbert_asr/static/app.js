// The try-it page of `w2vbert-asr serve`: record from the microphone or drop a file, see each word shaded by
// its confidence (hover: its time), download the transcript as text or SRT. Everything goes to this server's
// own POST /v1/audio/transcriptions (verbose_json with words and segments); nothing is loaded from elsewhere.
"use strict";

const API = "/v1/audio/transcriptions";
const RATE = 16000; // recordings are sent as 16 kHz mono 16-bit WAV, which the server reads as it is
const $ = (id) => document.getElementById(id);
const state = { model: "w2vbert-asr", recorder: null, started: 0, tick: null, urls: [] };

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function headers() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function loadModel() {
  $("key").value = sessionStorage.getItem("w2vbert-asr-key") || "";
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("key-row").hidden = false;
    $("model").textContent = "this server needs an API key";
    return;
  }
  const models = await response.json();
  const model = models.data[0];
  state.model = model.id;
  $("model").textContent = `${model.id}${model.language ? ` · ${model.language}` : ""} · speak or drop a file`;
}

// ------------------------------------------------------------------------------------------ audio
function encodeWav(samples, rate) {
  const buffer = new ArrayBuffer(44 + samples.length * 2);
  const view = new DataView(buffer);
  const text = (offset, s) => [...s].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Blob([buffer], { type: "audio/wav" });
}

async function toWav(blob) {
  // Whatever the browser recorded (WebM/Opus in Chromium) or can play -> 16 kHz mono WAV.
  const context = new AudioContext();
  const decoded = await context.decodeAudioData(await blob.arrayBuffer());
  context.close();
  const offline = new OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * RATE)), RATE);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  return encodeWav((await offline.startRendering()).getChannelData(0), RATE);
}

async function toggleRecording() {
  if (state.recorder) {
    state.recorder.stop();
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    setStatus(`No microphone: ${e.message}`, true);
    return;
  }
  const recorder = new MediaRecorder(stream);
  const parts = [];
  recorder.ondataavailable = (e) => e.data.size && parts.push(e.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    clearInterval(state.tick);
    state.recorder = null;
    $("record").setAttribute("aria-pressed", "false");
    $("record-label").textContent = "Record";
    $("timer").textContent = "";
    try {
      const wav = await toWav(new Blob(parts, { type: recorder.mimeType }));
      await transcribe(wav, "recording.wav");
    } catch (e) {
      setStatus(`Could not read the recording: ${e.message}`, true);
    }
  };
  recorder.start();
  state.recorder = recorder;
  state.started = performance.now();
  $("record").setAttribute("aria-pressed", "true");
  $("record-label").textContent = "Stop";
  state.tick = setInterval(() => {
    $("timer").textContent = `${((performance.now() - state.started) / 1000).toFixed(1)} s`;
  }, 100);
  setStatus("Recording… press Stop when you are done.");
}

// ------------------------------------------------------------------------------------------ request
async function post(blob, name) {
  const form = new FormData();
  form.append("file", blob, name);
  form.append("model", state.model);
  form.append("response_format", "verbose_json");
  form.append("timestamp_granularities[]", "word");
  form.append("timestamp_granularities[]", "segment");
  return fetch(API, { method: "POST", body: form, headers: headers() });
}

async function transcribe(blob, name, converted = false) {
  setStatus(`Transcribing ${name}…`);
  $("transcript").dataset.state = "busy";
  const started = performance.now();
  const response = await post(blob, name);
  const body = await response.json().catch(() => ({}));
  if (response.status === 400 && !converted && /undecodable/.test(body.error?.message || "")) {
    // A format the server cannot read (m4a, webm...) may still be one the browser can: send it as WAV.
    try {
      return await transcribe(await toWav(blob), name.replace(/\.[^.]*$/, "") + ".wav", true);
    } catch (e) { /* the browser cannot read it either: report the server's reason */ }
  }
  if (!response.ok) {
    $("transcript").dataset.state = "error";
    if (response.status === 401) $("key-row").hidden = false;
    setStatus(`${response.status}: ${body.error?.message || response.statusText}`, true);
    return;
  }
  if ($("key").value) sessionStorage.setItem("w2vbert-asr-key", $("key").value);
  show(body, blob, name, (performance.now() - started) / 1000);
}

// ------------------------------------------------------------------------------------------ result
function seconds(t) {
  return t.toFixed(2);
}

function srtTime(t) {
  let ms = Math.max(0, Math.round(t * 1000));
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const h = Math.floor(ms / 3600000); ms -= h * 3600000;
  const m = Math.floor(ms / 60000); ms -= m * 60000;
  const s = Math.floor(ms / 1000); ms -= s * 1000;
  return `${pad(h)}:${pad(m)}:${pad(s)},${pad(ms, 3)}`;
}

function toSrt(segments) {
  // The server's own SRT: its segments are the subtitle cues (transcript_formats.py).
  return segments.map((s, i) => {
    const end = Math.max(s.end, s.start + 0.001);
    return `${i + 1}\n${srtTime(s.start)} --> ${srtTime(end)}\n${s.text}\n`;
  }).join("\n");
}

function download(id, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  state.urls.push(url);
  $(id).href = url;
}

function show(result, audio, name, took) {
  state.urls.forEach((u) => URL.revokeObjectURL(u));
  state.urls = [];
  const player = $("player");
  player.src = URL.createObjectURL(audio);
  state.urls.push(player.src);
  $("download-audio").href = player.src; // the audio as sent: the file, or the recording as 16 kHz WAV
  $("download-audio").download = name;
  const transcript = $("transcript");
  transcript.replaceChildren();
  (result.words || []).forEach((w, i) => {
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = w.word;
    const confidence = w.confidence ?? 1;
    span.style.setProperty("--doubt", (0.85 * (1 - confidence)).toFixed(3));
    span.dataset.tip = `${seconds(w.start)}–${seconds(w.end)} s · confidence ${Math.round(confidence * 100)} %`;
    span.tabIndex = 0; // keyboard users get the tip on focus
    span.dataset.start = w.start;
    span.dataset.end = w.end;
    span.dataset.confidence = confidence;
    span.addEventListener("click", () => { player.currentTime = w.start; player.play(); });
    if (i) transcript.append(" ");
    transcript.append(span);
  });
  if (!result.words?.length) transcript.textContent = result.text || "(no speech recognised)";
  transcript.dataset.state = "done";
  transcript.dataset.text = result.text;
  download("download-txt", `${result.text}\n`, "text/plain");
  download("download-srt", toSrt(result.segments || []), "application/x-subrip");
  const confidence = result.confidence === undefined ? "" : ` · confidence ${Math.round(result.confidence * 100)} %`;
  $("meta").textContent = `${result.duration.toFixed(1)} s of audio · ${result.decoding || "greedy"}${confidence}` +
    ` · answered in ${took.toFixed(2)} s`;
  $("result").hidden = false;
  setStatus("");
}

// ------------------------------------------------------------------------------------------ wiring
function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) transcribe(file, file.name);
    e.target.value = "";
  });
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) transcribe(file, file.name);
  });
  $("key").addEventListener("change", loadModel);
  if (!window.MediaRecorder || !navigator.mediaDevices) {
    $("record").disabled = true;
    $("timer").textContent = "no microphone access here (needs localhost or https)";
  } else {
    $("record").addEventListener("click", toggleRecording);
  }
  loadModel().catch((e) => setStatus(`Cannot reach the server: ${e.message}`, true));
}

wire();
