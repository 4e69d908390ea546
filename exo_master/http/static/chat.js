// The chat box: streams a reply from /v1/chat/completions into the page as it arrives.

import { call, readEvents } from "./api.js";

export function setupChat(els) {
  let history = [];
  let busy = false;

  const add = (role, content) => {
    const node = document.createElement("div");
    node.className = `msg ${role}`;
    node.textContent = content;
    els.log.append(node);
    els.log.scrollTop = els.log.scrollHeight;
    return node;
  };

  els.clear.addEventListener("click", () => {
    history = [];
    els.log.replaceChildren();
    els.status.textContent = "";
  });

  els.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      els.form.requestSubmit();
    }
  });

  els.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = els.input.value.trim();
    const model = els.model.value;
    if (!text || busy) return;
    if (!model) {
      els.status.textContent = "No model is served yet: start a worker.";
      return;
    }
    busy = true;
    els.send.disabled = true;
    els.input.value = "";
    add("user", text);
    history.push({ role: "user", content: text });
    const reply = add("assistant", "");
    reply.dataset.state = "streaming";
    const started = performance.now();
    let first = null;
    let pieces = 0;
    els.status.textContent = `asking ${model}…`;
    try {
      const response = await call("/v1/chat/completions", {
        method: "POST",
        body: { model, messages: history, stream: true, max_tokens: 256 },
      });
      if (!response.ok) {
        const data = await response.json().catch(() => ({}));
        throw new Error(data?.error?.message || `HTTP ${response.status}`);
      }
      const instance = response.headers.get("x-exo-instance");
      await readEvents(response, (_name, data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const piece = chunk.choices?.[0]?.delta?.content;
        if (piece) {
          first ??= performance.now();
          pieces += 1;
          reply.textContent += piece;
          els.log.scrollTop = els.log.scrollHeight;
        }
      });
      history.push({ role: "assistant", content: reply.textContent });
      const ttft = first === null ? "-" : `${Math.round(first - started)} ms`;
      els.status.textContent = `${model} on ${instance || "?"} · first token ${ttft} · ${pieces} pieces`;
      reply.dataset.state = "done";
    } catch (error) {
      reply.remove();
      history.pop();
      add("error", String(error.message || error));
      els.status.textContent = "";
    } finally {
      busy = false;
      els.send.disabled = false;
    }
  });

  // The models that live instances serve (kept current from the state stream).
  return (models) => {
    const current = els.model.value;
    const names = models.map((m) => m.model).sort();
    if (names.join("\n") === [...els.model.options].map((o) => o.value).join("\n")) return;
    els.model.replaceChildren(...names.map((name) => new Option(name, name)));
    if (names.includes(current)) els.model.value = current;
  };
}
