// The dashboard: the state stream (/v1/events) drawn as cards, tables and charts, plus the chat.

import { Unauthorized, apiKey, follow, json, setApiKey } from "./api.js";
import { drawChart } from "./charts.js";
import { setupChat } from "./chat.js";
import { setupInstances } from "./instances.js";

const $ = (id) => document.getElementById(id);
const stats = [];
const KEEP = 150;

function age(seconds) {
  if (seconds < 10) return `${seconds.toFixed(1)}s`;
  if (seconds < 60) return `${Math.floor(seconds)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${String(Math.floor(seconds % 60)).padStart(2, "0")}s`;
  return `${Math.floor(seconds / 3600)}h${String(Math.floor((seconds % 3600) / 60)).padStart(2, "0")}m`;
}

function bytes(n) {
  if (n === undefined || n === null) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(n >= 10 || i === 0 ? 0 : 1)} ${units[i]}`;
}

function cell(content, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (content instanceof Node) td.append(content);
  else td.textContent = content;
  return td;
}

function badge(text) {
  const span = document.createElement("span");
  span.className = `badge ${text}`;
  span.textContent = text;
  return span;
}

function fill(tbody, rows, columns, empty) {
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = cell(empty);
    td.colSpan = columns;
    tr.append(td);
    tbody.replaceChildren(tr);
    return;
  }
  tbody.replaceChildren(...rows);
}

// Memory and backend come with the worker's heartbeat (0 and "" from workers that do not report
// them, or masters that do not carry them yet): shown when present.
function memory(node) {
  if (!node.memory_total) return "-";
  return node.memory_available ? `${bytes(node.memory_available)} free of ${bytes(node.memory_total)}` : bytes(node.memory_total);
}

function loadBar(row) {
  const wrap = document.createElement("span");
  const bar = document.createElement("span");
  bar.className = "bar";
  const cap = Math.max(row.max_concurrency, 1);
  const inFlight = document.createElement("span");
  inFlight.style.width = `${Math.min(100, (100 * row.in_flight) / cap)}%`;
  const pending = document.createElement("span");
  pending.className = "pending";
  pending.style.left = inFlight.style.width;
  pending.style.width = `${Math.min(100, (100 * row.pending) / cap)}%`;
  bar.append(inFlight, pending);
  const label = document.createElement("span");
  label.className = "barlabel";
  label.textContent = `${row.in_flight}+${row.pending}/${row.max_concurrency}`;
  wrap.append(bar, label);
  return wrap;
}

function cacheShare(row) {
  return row.prompt_tokens ? `${Math.round((100 * row.prompt_cache_reused_tokens) / row.prompt_tokens)}%` : "-";
}

function drawState(state, updateModels) {
  $("meta").textContent = `session ${state.session} · policy ${state.policy}`;
  const alive = state.nodes.filter((n) => n.alive).length;
  const ready = state.instances.filter((i) => i.status === "ready").length;
  $("card-nodes").textContent = `${alive}/${state.nodes.length}`;
  $("card-instances").textContent = `${ready}/${state.instances.length}`;
  $("card-flight").textContent = String(state.in_flight_total);
  $("card-queued").textContent = String(state.models.reduce((sum, m) => sum + m.queued, 0));

  fill($("nodes").tBodies[0], state.nodes.map((n) => {
    const tr = document.createElement("tr");
    tr.dataset.node = n.node_id;
    tr.dataset.state = n.alive ? "alive" : "dead";
    tr.append(
      cell(n.node_id, "id"), cell(badge(n.alive ? "alive" : "dead")), cell(`${age(n.last_heartbeat_age)} ago`),
      cell(n.address), cell(memory(n)), cell(n.backend || "-"), cell(n.instances.join(", "), "id"),
    );
    return tr;
  }), 7, "no worker has joined yet");

  fill($("instances").tBodies[0], state.instances.map((i) => {
    const tr = document.createElement("tr");
    tr.dataset.instance = i.instance_id;
    const status = badge(i.status);
    if (i.error) status.title = i.error;
    tr.append(
      cell(i.instance_id, "id"), cell(i.model), cell(status), cell(loadBar(i)), cell(String(i.queued), "num"),
      cell(cacheShare(i), "num"), cell(String(i.completed), "num"), cell(String(i.failed), "num"),
    );
    return tr;
  }), 8, "no instance yet");

  fill($("flight").tBodies[0], state.in_flight.map((t) => {
    const tr = document.createElement("tr");
    tr.append(cell(t.task_id, "id"), cell(t.model), cell(t.instance_id ?? "-", "id"), cell(badge(t.status)),
      cell(age(t.age), "num"));
    return tr;
  }), 5, "nothing in flight");
  updateModels(state.models);
}

function drawStats() {
  const series = (key) => stats.map((p) => ({ t: p.t, value: p[key] }));
  drawChart($("chart-ttft"), series("ttft_ms"));
  drawChart($("chart-tps"), series("tokens_per_s"));
  drawChart($("chart-wait"), series("queue_wait_ms"));
  const last = stats[stats.length - 1];
  $("card-tps").textContent = last ? last.tokens_per_s.toFixed(1) : "-";
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("link").textContent = message;
  $("key-input").focus();
}

function main() {
  const updateModels = setupChat({
    form: $("chat-form"), log: $("chat-log"), input: $("chat-input"), send: $("chat-send"),
    model: $("chat-model"), clear: $("chat-clear"), status: $("chat-status"),
  });
  const start = () => {
    follow((name, data) => {
      if (name === "state") {
        drawState(data, updateModels);
        if (data.stats) { stats.splice(0, stats.length, ...data.stats); drawStats(); }
      } else if (name === "stats") {
        stats.push(data);
        if (stats.length > KEEP) stats.shift();
        drawStats();
      }
    }, (up, why) => {
      const link = $("link");
      link.className = `link ${up ? "up" : "down"}`;
      link.textContent = up ? "live" : `reconnecting (${why})`;
      if (why === "unauthorized") askForKey("API key needed");
    });
    setupInstances({
      form: $("place-form"), table: $("placements"), model: $("place-model"), replicas: $("place-replicas"),
      result: $("place-result"),
    });
  };
  $("key-button").addEventListener("click", () => askForKey(apiKey() ? "change the key" : "enter a key"));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("key-input").value.trim());
    $("key-form").hidden = true;
    start();
  });
  drawStats();
  window.addEventListener("resize", drawStats);
  json("/v1/cluster/state?tasks=0").then(start, (error) => {
    if (error instanceof Unauthorized) askForKey("API key needed");
    else start();
  });
}

main();
