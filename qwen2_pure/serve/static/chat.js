// The web chat: Qwen2 web_demo's features (streamed answers, history, clear, regenerate, sampling settings)
// over the server's own OpenAI API (/v1/chat/completions with stream: true). Plain browser JavaScript, no build.
// Answers are Markdown: marked renders them, DOMPurify sanitizes the HTML, highlight.js colours code blocks
// (static/vendor/). Model output is never trusted markup: raw HTML in an answer shows as text, and nothing
// reaches the page without the sanitizer. The conversation and the settings live in localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "max_tokens", "seed"];
const INTEGERS = new Set(["top_k", "max_tokens", "seed"]);
const JSON_FIELDS = ["tools", "response_format"];   // sent as parsed JSON when not empty
const FIELDS = [...SETTINGS, "system", "stop_strings", ...JSON_FIELDS, "api_key"];
const STORE = "qwen2-pure-chat-settings";
const CONVERSATION = "qwen2-pure-chat-conversation";

// One entry per message: {role: "user"|"assistant", content, tool_calls?, meta?}; meta (assistant only) is the
// finish line: {finish, tokens, rate}. The API gets role, content and tool_calls.
let history = [];
let modelId = null;
let controller = null;   // AbortController of the answer being streamed

// ---- storage ----------------------------------------------------------------------------------------------

function load(key, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(key));
    return v === null ? fallback : v;
  } catch (e) { return fallback; }
}

function store(key, value) {
  try { localStorage.setItem(key, JSON.stringify(value)); } catch (e) { /* private mode or full */ }
}

function loadSettings() {
  const saved = load(STORE, {});
  for (const k of FIELDS) if (typeof saved[k] === "string") $(k).value = saved[k];
}

function saveSettings() {
  const out = {};
  for (const k of FIELDS) out[k] = $(k).value;
  store(STORE, out);
}

function loadConversation() {
  const saved = load(CONVERSATION, []);
  const ok = (m) => m && (m.role === "user" || m.role === "assistant") &&
                    (typeof m.content === "string" || m.content === null);
  history = Array.isArray(saved) ? saved.filter(ok) : [];
}

function saveConversation() { store(CONVERSATION, history); }

// ---- the request ------------------------------------------------------------------------------------------

// The request's optional fields from the settings; throws an Error naming a field that is not valid JSON.
function requestFields() {
  const body = {};
  for (const k of SETTINGS) {
    const raw = $(k).value.trim();
    if (raw === "") continue;
    body[k] = INTEGERS.has(k) ? parseInt(raw, 10) : parseFloat(raw);
  }
  const stop = $("stop_strings").value.split("\n").filter((s) => s.length > 0);
  if (stop.length) body.stop = stop;
  for (const k of JSON_FIELDS) {
    const raw = $(k).value.trim();
    if (raw === "") continue;
    try { body[k] = JSON.parse(raw); } catch (e) { throw new Error(`${k} is not valid JSON: ${e.message}`); }
  }
  return body;
}

function apiMessages() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  for (const m of history) {
    const out = {role: m.role, content: m.content};
    if (m.tool_calls && m.tool_calls.length) out.tool_calls = m.tool_calls;
    messages.push(out);
  }
  return messages;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// ---- rendering --------------------------------------------------------------------------------------------

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                                 "'": "&#39;"}[c]));
}

// Raw HTML in an answer is shown as text; an image becomes a link (the page fetches nothing an answer names).
const markdown = new marked.Marked({
  gfm: true, breaks: true,
  renderer: {
    html({text, block}) { return block ? `<p>${escapeHtml(text.trim())}</p>\n` : escapeHtml(text); },
    image({href, text}) { return `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`; },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {       // links open elsewhere and tell nothing about this page
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

// Markdown -> sanitized DOM nodes; the only way model text becomes markup.
function markdownNodes(text) {
  return DOMPurify.sanitize(markdown.parse(text), {USE_PROFILES: {html: true}, FORBID_TAGS: ["style", "img", "form"],
                                                   RETURN_DOM_FRAGMENT: true});
}

// A code block built from text (textContent), highlighted as `language`.
function codeBlock(code, language) {
  const pre = document.createElement("pre");
  const el = document.createElement("code");
  el.className = "language-" + language;
  el.textContent = code;
  pre.append(el);
  return pre;
}

function highlight(root) {
  for (const code of root.querySelectorAll("pre code")) {
    const lang = (code.className.match(/language-(\S+)/) || [])[1];
    if (lang && !hljs.getLanguage(lang)) continue;     // unknown language: plain text
    try { hljs.highlightElement(code); } catch (e) { /* leave it plain */ }
  }
}

// The answer as JSON when the whole of it is a JSON object or array (pretty-printed then), else undefined.
function asJSON(text) {
  const t = text.trim();
  if (!(t.startsWith("{") && t.endsWith("}")) && !(t.startsWith("[") && t.endsWith("]"))) return undefined;
  try { return JSON.parse(t); } catch (e) { return undefined; }
}

function toolCallNodes(call) {
  const box = document.createElement("div");
  box.className = "tool-call";
  const title = document.createElement("div");
  title.className = "tool-title";
  const fn = call.function || {};
  title.textContent = `tool call: ${fn.name || "(unnamed)"}` + (call.id ? `  ·  ${call.id}` : "");
  let args = fn.arguments || "";
  try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (e) { /* partial or not JSON: as sent */ }
  box.append(title, codeBlock(args, "json"));
  return box;
}

function renderBody(body, role, text, toolCalls) {
  if (role !== "assistant") {
    body.textContent = text;     // the user's own words, as typed
    return;
  }
  const json = asJSON(text || "");
  body.replaceChildren(json === undefined ? markdownNodes(text || "")
                                          : codeBlock(JSON.stringify(json, null, 2), "json"));
  for (const call of toolCalls || []) body.append(toolCallNodes(call));
  highlight(body);
}

function metaText(meta) {
  const parts = [meta.finish === "stopped" ? "stopped" : `finish: ${meta.finish}`];
  if (meta.tokens != null) {
    const rate = meta.rate != null ? `, ${meta.rate} tok/s` : "";
    parts.push(`${meta.tokens} token${meta.tokens === 1 ? "" : "s"}${rate}`);
  }
  return parts.join(" · ");
}

function setMeta(div, meta) {
  let line = div.querySelector(".meta");
  if (!line) {
    line = document.createElement("div");
    line.className = "meta";
    div.append(line);
  }
  line.textContent = metaText(meta);
  div.dataset.finish = meta.finish || "";
}

function addMessage(role, text, toolCalls, meta) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role === "assistant" ? "Qwen" : "Error";
  const body = document.createElement("div");
  body.className = "text";
  div.append(who, body);
  if (role === "error") body.textContent = text; else renderBody(body, role, text, toolCalls);
  if (meta) setMeta(div, meta);
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
  for (const m of history) addMessage(m.role, m.content, m.tool_calls, m.meta);
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

// OpenAI's streamed tool calls: pieces keyed by index, strings concatenated (as the openai client does).
function mergeToolCalls(calls, deltas) {
  for (const d of deltas) {
    const i = Number.isInteger(d.index) ? d.index : calls.length;
    const c = calls[i] || (calls[i] = {id: "", type: "function", function: {name: "", arguments: ""}});
    if (d.id) c.id = d.id;
    if (d.type) c.type = d.type;
    if (d.function && d.function.name) c.function.name += d.function.name;
    if (d.function && d.function.arguments) c.function.arguments += d.function.arguments;
  }
}

// Stream one answer to the current history into a new assistant bubble; the answer joins the history.
async function answer() {
  let fields;
  try { fields = requestFields(); } catch (e) { status(e.message); return; }
  const body = {messages: apiMessages(), stream: true, stream_options: {include_usage: true}, ...fields};
  if (modelId) body.model = modelId;

  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  const textBox = div.querySelector(".text");
  let text = "", finish = null, usage = null, failed = null, pending = null;
  const calls = [];
  const show = () => { pending = null; renderBody(textBox, "assistant", text, calls.filter(Boolean)); scrollDown(); };
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
            const delta = choice.delta || {};
            if (delta.content) text += delta.content;
            if (delta.tool_calls) mergeToolCalls(calls, delta.tool_calls);
            if ((delta.content || delta.tool_calls) && pending === null) pending = setTimeout(show, 50);
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
  } catch (e) {
    failed = e.name === "AbortError" ? "stopped" : e.message;
  }
  clearTimeout(pending);
  controller = null;
  div.classList.remove("streaming");
  const seconds = (performance.now() - t0) / 1000;
  if (failed && failed !== "stopped") {
    div.remove();
    addMessage("error", failed);   // the question stays in the history: Regenerate retries it
    status("error");
  } else {
    const toolCalls = calls.filter(Boolean);
    const meta = {finish: failed === "stopped" ? "stopped" : (finish || "")};
    if (usage) {
      meta.tokens = usage.completion_tokens;
      meta.rate = (usage.completion_tokens / seconds).toFixed(1);
    }
    const entry = {role: "assistant", content: text, meta};
    if (toolCalls.length) entry.tool_calls = toolCalls;
    history.push(entry);
    saveConversation();
    renderBody(textBox, "assistant", text, toolCalls);
    setMeta(div, meta);
    scrollDown();
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
  saveConversation();
  addMessage("user", text);
  answer();
}

function regenerate() {
  if (controller) return;
  if (history.length && history[history.length - 1].role === "assistant") history.pop();
  if (!history.length) { status("nothing to regenerate"); return; }
  saveConversation();
  render();
  answer();
}

function clearHistory() {
  if (controller) return;
  history = [];
  saveConversation();
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
  for (const k of FIELDS) if (k !== "api_key") $(k).value = "";
  saveSettings();
});
for (const k of FIELDS) $(k).addEventListener("input", saveSettings);
$("api_key").addEventListener("change", fetchModel);
loadSettings();
loadConversation();
render();
setBusy(false);
fetchModel();
