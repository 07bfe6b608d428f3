// The web chat: Qwen2 web_demo's features (streamed answers, history, clear, regenerate, sampling settings)
// over the server's own OpenAI API (/v1/chat/completions with stream: true). Plain browser JavaScript, no build.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "max_tokens", "seed"];
const INTEGERS = new Set(["top_k", "max_tokens", "seed"]);
const STORE = "qwen2-pure-chat-settings";

let modelId = null;
let history = [];        // [{role: "user"|"assistant", content}], the conversation sent with each request
let controller = null;   // AbortController of the answer being streamed

// ---- settings (kept in localStorage) ----------------------------------------------------------------------

function loadSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(STORE) || "{}"); } catch (e) { saved = {}; }
  for (const k of [...SETTINGS, "system", "stop_strings", "api_key"]) {
    if (saved[k] !== undefined) $(k).value = saved[k];
  }
}

function saveSettings() {
  const out = {};
  for (const k of [...SETTINGS, "system", "stop_strings", "api_key"]) out[k] = $(k).value;
  try { localStorage.setItem(STORE, JSON.stringify(out)); } catch (e) { /* private mode */ }
}

function samplingFields() {
  const body = {};
  for (const k of SETTINGS) {
    const raw = $(k).value.trim();
    if (raw === "") continue;
    body[k] = INTEGERS.has(k) ? parseInt(raw, 10) : parseFloat(raw);
  }
  const stop = $("stop_strings").value.split("\n").filter((s) => s.length > 0);
  if (stop.length) body.stop = stop;
  return body;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// ---- rendering --------------------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role === "assistant" ? "Qwen" : "Error";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;   // textContent, never innerHTML: model output is not trusted markup
  div.append(who, body);
  $("chat").append(div);
  scrollDown();
  return div;
}

function scrollDown() { const c = $("chat"); c.scrollTop = c.scrollHeight; }

function setBusy(busy) {
  $("send").disabled = busy;
  $("regenerate").disabled = busy;
  $("clear").disabled = busy;
  $("stop").disabled = !busy;
}

function status(text) { $("status").textContent = text; }

function render() {
  $("chat").replaceChildren();
  for (const m of history) addMessage(m.role, m.content);
}

// ---- talking to the API -----------------------------------------------------------------------------------

async function apiError(resp) {
  try {
    const j = await resp.json();
    if (j && j.error && j.error.message) return `${resp.status}: ${j.error.message}`;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

async function fetchModel() {
  try {
    const resp = await fetch("/v1/models", {headers: headers()});
    if (!resp.ok) { $("model").textContent = "(" + await apiError(resp) + ")"; return; }
    const j = await resp.json();
    modelId = j.data[0].id;
    $("model").textContent = modelId;
  } catch (e) {
    $("model").textContent = "(server unreachable)";
  }
}

// Stream one answer to the current history into a new assistant bubble; the answer joins the history.
async function answer() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  messages.push(...history);
  const body = {messages, stream: true, stream_options: {include_usage: true}, ...samplingFields()};
  if (modelId) body.model = modelId;

  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  const textSpan = div.querySelector(".text");
  let text = "", finish = null, usage = null, failed = null;
  controller = new AbortController();
  setBusy(true);
  status("generating…");
  const t0 = performance.now();
  try {
    const resp = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
                                                     body: JSON.stringify(body), signal: controller.signal});
    if (!resp.ok) throw new Error(await apiError(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", done = false;
    while (!done) {
      const {value, done: eof} = await reader.read();
      if (eof) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {       // one server-sent event per blank-line block
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) {
              text += choice.delta.content;
              textSpan.textContent = text;
              scrollDown();
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
  } catch (e) {
    failed = e.name === "AbortError" ? "stopped" : e.message;
  }
  controller = null;
  div.classList.remove("streaming");
  const seconds = (performance.now() - t0) / 1000;
  if (failed && failed !== "stopped") {
    div.remove();
    addMessage("error", failed);   // the question stays in the history: Regenerate retries it
    status("error");
  } else {
    history.push({role: "assistant", content: text});
    const meta = document.createElement("span");
    meta.className = "meta";
    const parts = [failed === "stopped" ? "stopped" : `finish: ${finish}`];
    if (usage) parts.push(`${usage.completion_tokens} tokens, ${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
    meta.textContent = parts.join(" · ");
    div.append(meta);
    div.dataset.finish = failed === "stopped" ? "stopped" : (finish || "");
    status("");
  }
  setBusy(false);
  $("input").focus();
}

function send(ev) {
  if (ev) ev.preventDefault();
  if (controller) return;
  const text = $("input").value;
  if (!text.trim()) { status("the message is empty"); return; }
  $("input").value = "";
  history.push({role: "user", content: text});
  addMessage("user", text);
  answer();
}

function regenerate() {
  if (controller) return;
  if (history.length && history[history.length - 1].role === "assistant") history.pop();
  if (!history.length) { status("nothing to regenerate"); return; }
  render();
  answer();
}

function clearHistory() {
  if (controller) return;
  history = [];
  render();
  status("history cleared");
}

// ---- wiring -----------------------------------------------------------------------------------------------

$("composer").addEventListener("submit", send);
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) send(ev);
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("regenerate").addEventListener("click", regenerate);
$("clear").addEventListener("click", clearHistory);
$("reset_settings").addEventListener("click", () => {
  for (const k of [...SETTINGS, "system", "stop_strings"]) $(k).value = "";
  saveSettings();
});
for (const k of [...SETTINGS, "system", "stop_strings", "api_key"]) $(k).addEventListener("change", saveSettings);
$("api_key").addEventListener("change", fetchModel);
loadSettings();
setBusy(false);
fetchModel();
