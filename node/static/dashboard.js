// The dashboard: polls the status port's JSON and draws it. Text from peers goes in as text, never HTML.
"use strict";

const POLL_MS = 2000;
const CHAIN_LIMIT = 500;
const RECENT_HEADS = 12;
const SVG_NS = "http://www.w3.org/2000/svg";
const PLOT = { width: 800, height: 300, left: 56, right: 16, top: 14, bottom: 36 };

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const reason = body && body.error ? body.error : response.statusText;
    throw new Error(`${path}: ${response.status} ${reason}`);
  }
  return body;
}

function shortId(id) {
  if (!id) return "–";
  return id.startsWith("b3:") ? id.slice(3, 15) : id.slice(-12);
}

function setText(id, value) {
  document.getElementById(id).textContent = value === null || value === undefined ? "–" : String(value);
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function svg(name, attributes, parent) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (parent) parent.appendChild(element);
  return element;
}

// Round numbers for axis ticks: 1, 2 or 5 times a power of ten.
function ticks(low, high, count) {
  const span = high - low || Math.abs(high) || 1;
  const raw = span / count;
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const values = [];
  for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) values.push(v);
  return values;
}

function drawLoss(chain) {
  const plot = document.getElementById("loss-plot");
  plot.replaceChildren();
  const points = chain.filter((h) => typeof h.val_loss === "number").map((h) => [h.round, h.val_loss]);
  plot.setAttribute("data-points", String(points.length));
  if (points.length === 0) {
    svg("text", { x: PLOT.width / 2, y: PLOT.height / 2, "text-anchor": "middle", class: "empty" }, plot)
      .textContent = "no evaluated heads yet";
    return;
  }
  const rounds = points.map((p) => p[0]);
  const losses = points.map((p) => p[1]);
  let [x0, x1] = [Math.min(...rounds), Math.max(...rounds)];
  let [y0, y1] = [Math.min(...losses), Math.max(...losses)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
  y0 -= pad; y1 += pad;
  const innerW = PLOT.width - PLOT.left - PLOT.right;
  const innerH = PLOT.height - PLOT.top - PLOT.bottom;
  const sx = (x) => PLOT.left + ((x - x0) / (x1 - x0)) * innerW;
  const sy = (y) => PLOT.top + (1 - (y - y0) / (y1 - y0)) * innerH;

  for (const y of ticks(y0, y1, 5)) {
    svg("line", { x1: PLOT.left, x2: PLOT.width - PLOT.right, y1: sy(y), y2: sy(y), class: "grid" }, plot);
    svg("text", { x: PLOT.left - 6, y: sy(y) + 4, "text-anchor": "end", class: "tick" }, plot)
      .textContent = Number(y.toPrecision(3)).toString();
  }
  for (const x of ticks(x0, x1, 8).filter(Number.isInteger)) {
    svg("text", { x: sx(x), y: PLOT.height - PLOT.bottom + 16, "text-anchor": "middle", class: "tick" }, plot)
      .textContent = String(x);
  }
  const bottom = PLOT.height - PLOT.bottom;
  svg("line", { x1: PLOT.left, x2: PLOT.width - PLOT.right, y1: bottom, y2: bottom, class: "axis" }, plot);
  svg("line", { x1: PLOT.left, x2: PLOT.left, y1: PLOT.top, y2: bottom, class: "axis" }, plot);
  svg("text", { x: PLOT.left + innerW / 2, y: PLOT.height - 4, "text-anchor": "middle", class: "tick" }, plot)
    .textContent = "round";

  const d = points.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
  svg("path", { id: "loss-line", d, class: "line", "data-points": String(points.length) }, plot);
  for (const [x, y] of points) {
    const dot = svg("circle", { cx: sx(x), cy: sy(y), r: 3, class: "point", "data-round": x }, plot);
    svg("title", {}, dot).textContent = `round ${x}: ${y.toFixed(4)}`;
  }
}

function drawPeers(status, peers) {
  const body = document.querySelector("#peers tbody");
  body.replaceChildren();
  const training = status.training || {};
  const headRound = training.head_round;
  const rows = [{
    peer_id: status.peer_id, role: training.role, alive: true, connected: true,
    head: training.head, round: headRound, last_seen_s_ago: 0, self: true,
  }, ...peers];
  for (const peer of rows) {
    const row = document.createElement("tr");
    row.dataset.peer = peer.peer_id;
    if (peer.self) row.className = "self";
    cell(row, shortId(peer.peer_id), "mono").title = peer.peer_id;
    cell(row, peer.role);
    const state = peer.alive ? (peer.connected ? "live" : "live, not connected") : "dead";
    cell(row, state, peer.alive ? "alive" : "dead");
    cell(row, shortId(peer.head), "mono").title = peer.head || "";
    cell(row, peer.round);
    const lag = typeof headRound === "number" && typeof peer.round === "number" ? headRound - peer.round : null;
    cell(row, lag === null ? null : lag > 0 ? `${lag} behind` : lag < 0 ? `${-lag} ahead` : "in sync");
    cell(row, peer.self ? "now" : `${peer.last_seen_s_ago} s ago`);
    body.appendChild(row);
  }
}

function drawHeads(heads) {
  const body = document.querySelector("#heads tbody");
  body.replaceChildren();
  for (const head of heads.slice(0, RECENT_HEADS)) {
    const row = document.createElement("tr");
    row.dataset.head = head.id;
    if (head.canonical) row.className = "canonical";
    cell(row, head.round);
    cell(row, shortId(head.id) + (head.canonical ? " (canonical)" : ""), "mono").title = head.id;
    cell(row, head.epoch);
    cell(row, head.updates);
    cell(row, head.samples_total);
    cell(row, typeof head.val_loss === "number" ? head.val_loss.toFixed(4) : null);
    body.appendChild(row);
  }
}

function drawSummary(status) {
  const training = status.training || {};
  setText("node-name", status.name);
  setText("node-id", status.peer_id);
  setText("swarm", status.swarm);
  setText("round", training.round);
  setText("head-round", training.head_round);
  setText("epoch", training.epoch);
  setText("phase", training.phase);
  setText("val-loss", typeof training.val_loss === "number" ? training.val_loss.toFixed(4) : null);
  setText("samples", training.samples_total);
  setText("utilisation", typeof training.utilisation === "number" ? `${Math.round(training.utilisation * 100)} %` : null);
  setText("peer-count", `${status.peers.live} / ${status.peers.connected}`);
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const [status, peers] = await Promise.all([getJson("/status"), getJson("/peers")]);
    drawSummary(status);
    drawPeers(status, peers.peers);
    if (status.training) {
      const [chain, heads] = await Promise.all([getJson(`/chain?limit=${CHAIN_LIMIT}`), getJson("/heads")]);
      drawLoss(chain.chain);
      drawHeads(heads.heads);
    }
    error.hidden = true;
    setText("updated", `updated ${new Date().toLocaleTimeString()}`);
  } catch (problem) {
    error.textContent = `cannot reach the node: ${problem.message}`;
    error.hidden = false;
  }
}

async function poll() {
  await refresh();
  setTimeout(poll, POLL_MS);
}

poll();
