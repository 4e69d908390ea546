// The master's HTTP API from the browser: the key, JSON calls, and Server-Sent Events read with
// fetch (EventSource cannot send an Authorization header).

const KEY = "exo.apiKey";

export class Unauthorized extends Error {}

export function apiKey() {
  return localStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, authorization: `Bearer ${key}` } : extra;
}

export async function call(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: headers(body ? { "content-type": "application/json" } : {}) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (response.status === 401) throw new Unauthorized("this master wants an API key");
  return response;
}

export async function json(path, options) {
  const response = await call(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data?.error?.message || `${path}: HTTP ${response.status}`);
  return data;
}

// Read an SSE body: calls onEvent(name, data) per event until the stream ends or signal aborts.
export async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

// Follow /v1/events forever, reconnecting with backoff; onLink(true|false, why) reports the link.
export function follow(onEvent, onLink) {
  let delay = 500;
  const run = async () => {
    for (;;) {
      try {
        const response = await call("/v1/events");
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        onLink(true);
        delay = 500;
        await readEvents(response, (name, data) => onEvent(name, JSON.parse(data)));
        onLink(false, "the stream ended");
      } catch (error) {
        onLink(false, error instanceof Unauthorized ? "unauthorized" : String(error.message || error));
        if (error instanceof Unauthorized) return;
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 8000);
    }
  };
  run();
}
