// Placing and deleting instances from the page, through /v1/instances (the master's placement
// API). Shown only when the master answers GET /v1/instances; a master without that API shows
// nothing of it. Shapes: POST {model, replicas} -> 201 a placement | 409 {error: {message}};
// GET -> {data: [placement]} with id, model, status, replicas, ready, reason, managed and
// instances: [{instance_id, node_id, state, progress}]; DELETE /v1/instances/{placement id}.

import { call } from "./api.js";

const REFRESH_MS = 2000;

function button(label, onClick) {
  const node = document.createElement("button");
  node.type = "button";
  node.className = "quiet";
  node.textContent = label;
  node.addEventListener("click", onClick);
  return node;
}

function td(content, className) {
  const cell = document.createElement("td");
  if (className) cell.className = className;
  if (content instanceof Node) cell.append(content);
  else cell.textContent = content;
  return cell;
}

function progress(placement) {
  const loading = (placement.instances || []).filter((r) => r.state === "loading");
  if (!loading.length) return placement.reason || "";
  return loading.map((r) => `${r.node_id} ${Math.round(100 * (r.progress || 0))}%`).join(", ");
}

async function message(response) {
  const data = await response.json().catch(() => ({}));
  return data?.error?.message || `HTTP ${response.status}`;
}

export async function setupInstances(els) {
  let available = false;
  try {
    available = (await call("/v1/instances")).ok;
  } catch {
    available = false;
  }
  els.form.hidden = !available;
  els.table.hidden = !available;
  if (!available) return false;

  const refresh = async () => {
    const response = await call("/v1/instances").catch(() => null);
    if (!response || !response.ok) return;
    const placements = (await response.json()).data || [];
    const rows = placements.map((p) => {
      const tr = document.createElement("tr");
      tr.dataset.placement = p.id;
      const badge = document.createElement("span");
      badge.className = `badge ${p.status}`;
      badge.textContent = p.status;
      const actions = p.managed === false ? "declared by its worker" : button("Delete", async () => {
        const answer = await call(`/v1/instances/${encodeURIComponent(p.id)}`, { method: "DELETE" });
        els.result.textContent = answer.ok ? `deleting ${p.id}: it drains, then unloads` : await message(answer);
        refresh();
      });
      tr.append(td(p.id, "id"), td(p.model), td(badge), td(`${p.ready}/${p.replicas}`, "num"), td(progress(p)),
        td(actions));
      return tr;
    });
    els.table.tBodies[0].replaceChildren(...rows);
  };

  els.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { model: els.model.value.trim(), replicas: Number(els.replicas.value) || 1 };
    els.result.textContent = "placing…";
    const response = await call("/v1/instances", { method: "POST", body });
    els.result.textContent = response.ok ? "placed: its replicas load on the nodes with room" : await message(response);
    refresh();
  });
  refresh();
  setInterval(refresh, REFRESH_MS);
  return true;
}
