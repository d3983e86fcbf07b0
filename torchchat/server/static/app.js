// The chat page: streams replies from /v1/chat/completions (server-sent events) with fetch.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // {role, content} of the conversation so far
let modelId = null;
let controller = null; // aborts the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message || "";
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text; // never innerHTML: model output is untrusted text
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModel() {
  localStorage.setItem("torchchat-api-key", $("api-key").value);
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) {
      $("model").textContent = r.status === 401 ? "enter the API key" : await errorMessage(r);
      return;
    }
    modelId = (await r.json()).data[0].id;
    $("model").textContent = modelId;
    showError("");
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

// Yields the JSON payload of each `data:` event of an SSE body until `[DONE]`.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!frame.startsWith("data: ")) continue;
      const data = frame.slice(6);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  showError("");
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...history] : history;
  const body = {
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: parseFloat($("temperature").value),
    max_tokens: parseInt($("max-tokens").value, 10),
  };
  if (modelId) body.model = modelId;
  controller = new AbortController();
  $("send").hidden = true;
  $("stop").hidden = false;
  let reply = "";
  let first = null;
  let usage = null;
  const start = performance.now();
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorMessage(r));
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices.length ? chunk.choices[0].delta : null;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        reply += delta.content;
        bubble.textContent = reply;
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
    const end = performance.now();
    if (usage) {
      const decode = first !== null && usage.completion_tokens > 1
        ? ((usage.completion_tokens - 1) / ((end - first) / 1000)).toFixed(1) + " tokens/s"
        : "";
      $("stats").textContent = `${usage.completion_tokens} tokens in ${((end - start) / 1000).toFixed(2)} s` +
        (decode ? `; ${decode}` : "") +
        `; prompt ${usage.prompt_tokens} (${usage.prompt_tokens_details.cached_tokens} cached)`;
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    controller = null;
    $("send").hidden = false;
    $("stop").hidden = true;
    if (reply) history.push({ role: "assistant", content: reply });
    else {
      history.pop(); // nothing came back: forget the question so the turns still alternate
      bubble.remove();
    }
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("log").replaceChildren();
  $("stats").textContent = "";
  showError("");
});
$("temperature").addEventListener("input", () => {
  $("temperature-value").textContent = $("temperature").value;
});
$("api-key").addEventListener("change", loadModel);
$("api-key").value = localStorage.getItem("torchchat-api-key") || "";
loadModel();
