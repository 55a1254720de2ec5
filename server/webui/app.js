"use strict";
// The chat page: streams answers from this server's /v1/chat/completions and keeps the
// conversations in localStorage. Text reaches the page only through textContent and
// markdown.js (DOM nodes), never as HTML.
const $ = (id) => document.getElementById(id);
const KEYS = {
  conversations: "nanoserve.conversations",
  current: "nanoserve.current",
  settings: "nanoserve.settings",
  apiKey: "nanoserve.apiKey",
};
const NUMBER_SETTINGS = ["temperature", "top_p", "max_tokens", "seed"];

let conversations = load(KEYS.conversations, []);
let settings = load(KEYS.settings, {});
let current = null; // the open conversation (listed once it has a message)
let controller = null; // the AbortController of the running request, if any
let retryAfterKey = null; // what to run again once the user gives an API key

function load(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

function store(key, value) {
  try {
    localStorage.setItem(key, typeof value === "string" ? value : JSON.stringify(value));
  } catch (err) {
    notice("Could not save in this browser: " + err.message);
  }
}

function save() {
  store(KEYS.conversations, conversations);
  store(KEYS.current, current.id);
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function button(text, className, onClick) {
  const node = document.createElement("button");
  node.type = "button";
  node.className = className;
  node.textContent = text;
  node.addEventListener("click", onClick);
  return node;
}

function span(className, text) {
  const node = document.createElement("span");
  node.className = className;
  node.textContent = text;
  return node;
}

// ---- requests --------------------------------------------------------------------------

function headers() {
  const key = localStorage.getItem(KEYS.apiKey);
  const result = { "Content-Type": "application/json" };
  if (key) result.Authorization = "Bearer " + key;
  return result;
}

async function errorText(response) {
  const text = await response.text();
  try {
    return `${response.status}: ${JSON.parse(text).error.message}`;
  } catch {
    return `${response.status}: ${text || response.statusText}`;
  }
}

function askForKey(retry) {
  retryAfterKey = retry;
  $("key-prompt").hidden = false;
  $("key-input").focus();
}

// Server-sent events from a fetch body: yields each event's parsed JSON until [DONE].
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        if (line !== "" || !data.length) continue; // ": ping" comments and other fields
        const payload = data.join("\n");
        data = [];
        if (payload === "[DONE]") return;
        yield JSON.parse(payload);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

async function loadModels() {
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (response.status === 401) return askForKey(null);
    if (!response.ok) throw new Error(await errorText(response));
    const ids = (await response.json()).data.map((m) => m.id);
    $("model").replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(settings.model)) $("model").value = settings.model;
  } catch (err) {
    notice("Could not list the models: " + err.message);
  }
}

function requestBody(conv) {
  const messages = conv.system.trim() ? [{ role: "system", content: conv.system }] : [];
  for (const m of conv.messages) if (m.content) messages.push({ role: m.role, content: m.content });
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if ($("model").value) body.model = $("model").value;
  for (const name of NUMBER_SETTINGS) {
    if (settings[name] !== undefined && settings[name] !== "") body[name] = Number(settings[name]);
  }
  return body;
}

async function generate() {
  const conv = current;
  const answer = { role: "assistant", content: "" };
  const stats = { ttft_s: null, tokens: 0, tps: null, finish: null };
  answer.stats = stats;
  conv.messages.push(answer);
  controller = new AbortController();
  setBusy(true);
  const live = $("messages").lastChild;
  const started = performance.now();
  let first = null;
  let queued = false;
  const show = () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      const near = isNearBottom();
      fillMessage(live, answer);
      if (near) scrollDown();
    });
  };
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody(conv)),
      signal: controller.signal,
    });
    if (response.status === 401) {
      conv.messages.pop();
      askForKey(generate);
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of sseEvents(response.body)) {
      if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
      const choice = event.choices && event.choices[0];
      const text = choice && choice.delta && choice.delta.content;
      if (text) {
        first = first ?? performance.now();
        stats.ttft_s = (first - started) / 1000;
        answer.content += text;
        stats.tokens += 1; // until usage says better
      }
      if (choice && choice.finish_reason) stats.finish = choice.finish_reason;
      if (event.usage) stats.tokens = event.usage.completion_tokens;
      show();
    }
  } catch (err) {
    if (err.name === "AbortError") stats.finish = "stopped";
    else answer.error = err.message;
  } finally {
    const decode_s = first === null ? 0 : (performance.now() - first) / 1000;
    if (stats.tokens > 1 && decode_s > 0) stats.tps = (stats.tokens - 1) / decode_s;
    controller = null;
    conv.updated = Date.now();
    save();
    if (conv === current) renderMessages();
    renderConversations();
    setBusy(false);
  }
}

// ---- conversation actions --------------------------------------------------------------

function newChat() {
  const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  current = { id, title: "New chat", system: $("system").value, messages: [], updated: Date.now() };
  renderAll();
  $("prompt").focus();
}

function openChat(conv) {
  if (controller) return;
  current = conv;
  store(KEYS.current, conv.id);
  renderAll();
  $("app").classList.remove("show-sidebar");
}

function deleteChat(conv) {
  if (controller && conv === current) return;
  conversations = conversations.filter((c) => c !== conv);
  store(KEYS.conversations, conversations);
  if (conv === current) newChat();
  else renderConversations();
}

function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  if (!conversations.includes(current)) conversations.push(current);
  if (!current.messages.length) current.title = text.trim().slice(0, 48);
  current.messages.push({ role: "user", content: text });
  $("prompt").value = "";
  generate();
}

function editLast(index) {
  $("prompt").value = current.messages[index].content;
  current.messages.splice(index);
  save();
  renderMessages();
  $("prompt").focus();
}

function regenerate() {
  current.messages.pop();
  generate();
}

// ---- rendering -------------------------------------------------------------------------

function isNearBottom() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function scrollDown() {
  $("messages").scrollTop = $("messages").scrollHeight;
}

function statsNode(stats) {
  const node = span("stats", "");
  if (stats.ttft_s !== null) node.append(span("ttft", `TTFT ${stats.ttft_s.toFixed(2)} s`));
  if (stats.tps) node.append(span("tps", `${stats.tps.toFixed(1)} tok/s`));
  node.append(span("tokens", `${stats.tokens} tokens`));
  if (stats.finish) node.append(span("finish", stats.finish));
  return node;
}

function fillMessage(node, msg) {
  const body = node.querySelector(".body");
  if (msg.role === "user") body.textContent = msg.content;
  else body.replaceChildren(window.renderMarkdown(msg.content));
  if (msg.error) body.append(span("error-text", "Error " + msg.error));
  node.classList.toggle("error", Boolean(msg.error));
  const actions = node.querySelector(".actions");
  actions.replaceChildren();
  if (msg.stats) actions.append(statsNode(msg.stats));
  const index = current.messages.indexOf(msg);
  const isLast = index === current.messages.length - 1;
  if (controller) return;
  if (msg.role === "user" && (isLast || index === current.messages.length - 2)) {
    actions.append(button("Edit", "edit", () => editLast(index)));
  }
  if (msg.role === "assistant" && isLast) actions.append(button("Regenerate", "regenerate", regenerate));
}

function renderMessages() {
  const nodes = current.messages.map((msg) => {
    const node = document.createElement("div");
    node.className = "msg " + msg.role;
    const body = document.createElement("div");
    body.className = "body";
    const actions = document.createElement("div");
    actions.className = "actions";
    node.append(body, actions);
    fillMessage(node, msg);
    return node;
  });
  $("messages").replaceChildren(...nodes);
  scrollDown();
}

function renderConversations() {
  const items = [...conversations]
    .sort((a, b) => b.updated - a.updated)
    .map((conv) => {
      const item = document.createElement("li");
      if (conv === current) item.className = "active";
      const remove = button("\u00d7", "delete", () => deleteChat(conv));
      remove.setAttribute("aria-label", "Delete " + conv.title);
      item.append(button(conv.title, "open", () => openChat(conv)), remove);
      return item;
    });
  $("conversations").replaceChildren(...items);
}

function renderAll() {
  $("system").value = current.system;
  renderMessages();
  renderConversations();
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  if (busy) renderMessages();
}

// ---- wiring ----------------------------------------------------------------------------

function setUp() {
  for (const name of NUMBER_SETTINGS) {
    const input = $(name);
    input.value = settings[name] ?? "";
    input.addEventListener("change", () => {
      settings[name] = input.value;
      store(KEYS.settings, settings);
    });
  }
  $("model").addEventListener("change", () => {
    settings.model = $("model").value;
    store(KEYS.settings, settings);
  });
  $("api-key").value = localStorage.getItem(KEYS.apiKey) || "";
  $("api-key").addEventListener("change", () => {
    store(KEYS.apiKey, $("api-key").value);
    loadModels();
  });
  $("key-prompt").addEventListener("submit", (event) => {
    event.preventDefault();
    store(KEYS.apiKey, $("key-input").value);
    $("api-key").value = $("key-input").value;
    $("key-prompt").hidden = true;
    const retry = retryAfterKey;
    retryAfterKey = null;
    loadModels().then(() => retry && retry());
  });
  $("settings-toggle").addEventListener("click", () => {
    $("settings").hidden = !$("settings").hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!$("settings").hidden));
  });
  $("menu").addEventListener("click", () => {
    const shown = $("app").classList.toggle("show-sidebar");
    $("menu").setAttribute("aria-expanded", String(shown));
  });
  $("system").addEventListener("input", () => {
    current.system = $("system").value;
    if (conversations.includes(current)) save();
  });
  $("new-chat").addEventListener("click", () => !controller && newChat());
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  const saved = conversations.find((c) => c.id === localStorage.getItem(KEYS.current));
  if (saved) openChat(saved);
  else newChat();
  loadModels();
}

setUp();
