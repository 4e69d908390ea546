// HOOK(/v1/instances): placing and deleting instances from the page, shown only when the master
// answers GET /v1/instances (the instance placement API). Until then nothing here is visible.
// The request shapes below are the expected ones ({model, replicas} to place, DELETE by id);
// adjust them here, in one place, if the API settles on others.

import { call } from "./api.js";

export async function setupInstances(els, refresh) {
  let available = false;
  try {
    available = (await call("/v1/instances")).ok;
  } catch {
    available = false;
  }
  els.form.hidden = !available;
  if (!available) return false;
  els.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { model: els.model.value.trim(), replicas: Number(els.replicas.value) || 1 };
    els.result.textContent = "placing…";
    const response = await call("/v1/instances", { method: "POST", body });
    const data = await response.json().catch(() => ({}));
    els.result.textContent = response.ok ? "placed: it appears below as it loads" : data?.error?.message || `HTTP ${response.status}`;
    refresh();
  });
  return true;
}

export async function deleteInstance(id) {
  const response = await call(`/v1/instances/${encodeURIComponent(id)}`, { method: "DELETE" });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(data?.error?.message || `HTTP ${response.status}`);
  }
}
