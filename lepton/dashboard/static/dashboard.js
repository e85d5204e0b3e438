// Lepton fleet dashboard: one EventSource, plain DOM, SVG charts. No framework, no build step.
// Everything in a document came from devices and workers: it is only ever set as text
// (textContent, SVG text nodes), never parsed as HTML.
"use strict";

const state = { devices: new Map(), rows: new Map(), history: [], fleet: "" };
// What the page measured, for tests and bench/dashboard.py: when it applied each device update, how
// long after the report's own timestamp (sender clock; the same machine in the bench).
// A ring of the latest MAX_LAGS (never Array.shift on every update: that copies the whole array).
window.leptonPage = { updates: 0, snapshots: 0, lags: [], next: 0 };
const MAX_LAGS = 100000;
const COLORS = ["#3b6fd6", "#e07b39", "#2f9e6e", "#b04fc4", "#c9a227", "#d64545", "#4bb3c4", "#7a7f8c"];

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  return digits === undefined ? String(value) : value.toFixed(digits);
}

function age(ts) {
  if (typeof ts !== "number") return "–";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 120) return `${s.toFixed(0)} s ago`;
  if (s < 7200) return `${(s / 60).toFixed(0)} min ago`;
  if (s < 172800) return `${(s / 3600).toFixed(0)} h ago`;
  return `${(s / 86400).toFixed(0)} d ago`;
}

function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function yesNo(cell, value) {
  cell.textContent = value === true ? "yes" : value === false ? "no" : "–";
  cell.className = value === true ? "yes" : value === false ? "no" : "";
}

// -- devices ---------------------------------------------------------------------------------------
const DEVICE_CELLS = ["device", "online", "seen", "model", "accuracy", "spool", "capture", "ack", "esc", "p99", "error"];

function deviceRow(name) {
  let row = state.rows.get(name);
  if (row) return row;
  const tr = el("tr");
  tr.dataset.device = name;
  const cells = {};
  for (const key of DEVICE_CELLS) {
    const td = el("td");
    if (["accuracy", "spool", "capture", "ack", "esc", "p99"].includes(key)) td.className = "num";
    if (key === "error") td.className = "error";
    cells[key] = td;
    tr.appendChild(td);
  }
  const tbody = $("devices").tBodies[0];
  let before = null;
  for (const other of tbody.rows) { if (other.dataset.device > name) { before = other; break; } }
  tbody.insertBefore(tr, before);
  row = { tr, cells };
  state.rows.set(name, row);
  return row;
}

function renderDevice(d) {
  const { tr, cells } = deviceRow(d.device);
  tr.dataset.online = String(d.online);
  tr.dataset.version = d.model_version === null ? "" : String(d.model_version);
  cells.device.textContent = d.device;
  yesNo(cells.online, d.online);
  cells.seen.textContent = age(d.last_seen);
  cells.model.textContent = d.model ? `${d.model} v${fmt(d.model_version)}` : (d.model_version ? `v${d.model_version}` : "–");
  cells.accuracy.textContent = d.accuracy === null ? "–"
    : `${(100 * d.accuracy).toFixed(1)} %` + (d.accuracy_samples !== null ? ` (${d.accuracy_samples})` : "");
  cells.spool.textContent = fmt(d.spool_depth);
  cells.capture.textContent = fmt(d.capture_rate, 1);
  cells.ack.textContent = fmt(d.ack_rate, 1);
  cells.esc.textContent = fmt(d.escalation_rate, 2);
  cells.p99.textContent = fmt(d.inference_ms_p99, 2);
  cells.error.textContent = d.model_error ? d.model_error + (d.model_error_message ? `: ${d.model_error_message}` : "") : "";
}

function applyDevices(rows, measure) {
  const now = Date.now() / 1000;
  for (const d of rows) {
    const previous = state.devices.get(d.device);
    state.devices.set(d.device, d);
    renderDevice(d);
    if (measure && typeof d.last_seen === "number" && (!previous || previous.last_seen !== d.last_seen)) {
      const page = window.leptonPage;
      page.lags[page.next] = now - d.last_seen;
      page.next = (page.next + 1) % MAX_LAGS;
    }
    window.leptonPage.updates++;
  }
}

function removeDevices(names) {
  for (const name of names) {
    state.devices.delete(name);
    const row = state.rows.get(name);
    if (row) row.tr.remove();
    state.rows.delete(name);
  }
}

// -- small tables, rebuilt whole -------------------------------------------------------------------
function fill(tableId, items, build) {
  const tbody = $(tableId).tBodies[0];
  tbody.replaceChildren(...items.map(build));
  $(`${tableId}-empty`).classList.toggle("hidden", items.length > 0);
}

function renderWorkers(workers) {
  fill("workers", workers, (w) => {
    const s = w.summary || {};
    const tr = el("tr");
    tr.dataset.worker = w.worker;
    tr.appendChild(el("td", w.worker));
    const online = el("td"); yesNo(online, w.online); tr.appendChild(online);
    tr.appendChild(el("td", age(w.last_seen)));
    for (const [v, d] of [[s.samples_per_s, 1], [s.stored], [s.duplicates], [s.dead_letters]]) tr.appendChild(el("td", fmt(v, d), "num"));
    tr.appendChild(el("td", `${fmt(s.files)} files, ${bytes(s.bytes)}`, "num"));
    return tr;
  });
}

function renderModels(models) {
  fill("models", models, (m) => {
    const tr = el("tr");
    tr.dataset.model = m.model;
    tr.appendChild(el("td", m.model));
    tr.appendChild(el("td", m.version === null ? "–" : `v${m.version}`));
    tr.appendChild(el("td", bytes(m.size), "num"));
    // the manifest's quantization: "int8", or "none" for an fp32 model
    tr.appendChild(el("td", m.version === null ? "–" : m.quantization && m.quantization !== "none" ? m.quantization : "fp32"));
    tr.appendChild(el("td", Object.entries(m.metrics).map(([k, v]) => `${k} ${v.toFixed(3)}`).join(", ") || "–"));
    const total = Object.values(m.devices).reduce((a, b) => a + b, 0);
    const cell = el("td");
    const bar = el("div", null, "bar");
    Object.entries(m.devices).forEach(([version, count], i) => {
      const part = el("div", version === "none" ? `none ${count}` : `v${version}: ${count}`);
      part.style.width = `${(100 * count) / total}%`;
      part.style.background = version === "none" ? "#9aa1ad" : COLORS[Number(version) % COLORS.length];
      part.title = `${count} device(s) on ${version === "none" ? "no model" : "v" + version}`;
      bar.appendChild(part);
    });
    cell.appendChild(bar);
    tr.appendChild(cell);
    return tr;
  });
}

function renderDeadLetters(items) {
  fill("dead", items, (d) => {
    const tr = el("tr");
    tr.appendChild(el("td", typeof d.ts === "number" ? new Date(d.ts * 1000).toLocaleTimeString() : "–"));
    tr.appendChild(el("td", d.device || "–"));
    tr.appendChild(el("td", d.reason || "–", "error"));
    tr.appendChild(el("td", d.field || "–"));
    tr.appendChild(el("td", d.worker || "–"));
    return tr;
  });
}

function renderSummary(s) {
  $("t-online").textContent = fmt(s.online);
  $("t-devices").textContent = fmt(s.devices);
  $("t-ingest").textContent = fmt(s.ingest_rate, 1);
  $("t-dead").textContent = fmt(s.dead_letters_seen);
  const note = s.devices >= s.max_devices ? `showing the first ${s.max_devices}; more are ignored` : "";
  $("devices-note").textContent = [note, s.ignored_messages ? `${s.ignored_messages} bad message(s) ignored` : ""]
    .filter(Boolean).join(" · ");
  $("devices-empty").classList.toggle("hidden", s.devices > 0);
}

// -- charts ----------------------------------------------------------------------------------------
const SVGNS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function chart(svg, series, { min, max, digits = 0 } = {}) {
  const W = 400, H = 120, L = 34, B = 14;
  const points = series.flatMap((s) => s.points);
  svg.replaceChildren();
  if (points.length < 2) { svg.appendChild(svgEl("text", { x: L, y: H / 2 }, "collecting…")); return; }
  const t0 = Math.min(...points.map((p) => p[0])), t1 = Math.max(...points.map((p) => p[0]));
  const lo = min !== undefined ? min : Math.min(...points.map((p) => p[1]));
  let hi = max !== undefined ? max : Math.max(...points.map((p) => p[1]));
  if (hi <= lo) hi = lo + 1;
  const x = (t) => L + ((W - L - 4) * (t - t0)) / Math.max(1e-9, t1 - t0);
  const y = (v) => 4 + (H - B - 8) * (1 - (v - lo) / (hi - lo));
  for (const v of [lo, hi]) {
    svg.appendChild(svgEl("line", { x1: L, x2: W - 4, y1: y(v), y2: y(v) }));
    svg.appendChild(svgEl("text", { x: 2, y: y(v) + 3 }, v.toFixed(digits)));
  }
  svg.appendChild(svgEl("text", { x: L, y: H - 2 }, `${((t1 - t0) / 60).toFixed(1)} min`));
  for (const s of series) {
    if (!s.points.length) continue;
    svg.appendChild(svgEl("polyline", { stroke: s.color, points: s.points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ") }));
  }
}

function renderCharts() {
  const h = state.history;
  chart($("c-ingest"), [{ color: COLORS[0], points: h.map((p) => [p.t, p.ingest_rate]) }], { min: 0, digits: 0 });
  chart($("c-spool"), [{ color: COLORS[1], points: h.map((p) => [p.t, p.spool_depth]) }], { min: 0 });
  const versions = [...new Set(h.flatMap((p) => Object.keys(p.accuracy)))].sort((a, b) => Number(a) - Number(b)).slice(-8);
  const series = versions.map((v) => ({
    version: v, color: COLORS[Number(v) % COLORS.length],
    points: h.filter((p) => v in p.accuracy).map((p) => [p.t, p.accuracy[v]]),
  }));
  chart($("c-acc"), series, { min: 0, max: 1, digits: 1 });
  $("c-acc-legend").replaceChildren(...series.map((s) => { const n = el("span", `v${s.version}`); n.style.color = s.color; return n; }));
  const last = h[h.length - 1];
  $("t-spool").textContent = last ? fmt(last.spool_depth) : "–";
}

// -- the stream ------------------------------------------------------------------------------------
function apply(doc) {
  if (doc.type === "snapshot") {
    state.fleet = doc.fleet;
    $("fleet").textContent = doc.fleet;
    document.title = `Lepton fleet ${doc.fleet}`;
    removeDevices([...state.devices.keys()].filter((n) => !doc.devices.some((d) => d.device === n)));
    applyDevices(doc.devices, false);
    state.history = doc.history;
    renderWorkers(doc.workers);
    renderModels(doc.models);
    renderDeadLetters(doc.dead_letters);
    window.leptonPage.snapshots++;
  } else {
    applyDevices(doc.devices, true);
    removeDevices(doc.removed);
    if (doc.workers) renderWorkers(doc.workers);
    if (doc.models) renderModels(doc.models);
    if (doc.dead_letters) renderDeadLetters(doc.dead_letters);
    if (doc.point) { state.history.push(doc.point); if (state.history.length > 2000) state.history.shift(); }
  }
  renderSummary(doc.summary);
  if (doc.type === "snapshot" || doc.point) renderCharts();
}

function connect() {
  const source = new EventSource("events");
  source.onopen = () => { $("conn").textContent = "live"; $("conn").className = "badge on"; };
  source.onerror = () => { $("conn").textContent = "reconnecting…"; $("conn").className = "badge off"; };
  source.onmessage = (event) => apply(JSON.parse(event.data));
}

// ages move on even when nothing is published
setInterval(() => {
  for (const [name, d] of state.devices) { const row = state.rows.get(name); if (row) row.cells.seen.textContent = age(d.last_seen); }
}, 1000);

connect();
