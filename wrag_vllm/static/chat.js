// WRAG chat page. Plain JS, no framework, no build: talks to the server that served it.
//   chat:   POST /v1/chat/completions (stream: true); the response headers x-wrag-shards ("id=weight,..."
//           or "-"), x-wrag-scores ("id=relevance p,..."), x-wrag-method and x-wrag-source say which
//           shards were applied
//   store:  GET/POST /wrag/shards, DELETE /wrag/shards/{id}, GET /wrag/config
// Every text from the server is put into the page with textContent (never parsed as HTML).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  // The page lives at <root>wrag/chat; every API path is relative to <root> (works behind --root-path).
  const ROOT = location.pathname.replace(/wrag\/chat\/?$/, "");
  const KEY_STORE = "wrag-chat-api-key";

  const state = {
    apiKey: sessionStorage.getItem(KEY_STORE) || "",
    model: null,
    config: null,
    shards: new Map(),        // id -> meta row
    pins: [],                 // [{id, weight}]
    history: [],              // [{role, content}] sent when "Send conversation history" is on
    running: [],              // AbortControllers of the answers in flight
  };

  // ------------------------------------------------------------------ HTTP helpers
  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    if (state.apiKey) h["Authorization"] = "Bearer " + state.apiKey;
    return h;
  }

  // The server's error bodies come in several shapes: {"error": {"message"}}, {"error": "..."},
  // {"detail": "..."} or [{"msg"}] (FastAPI), {"message": "..."}; else the raw text.
  function errorText(status, text) {
    let msg = "";
    try {
      const b = JSON.parse(text);
      if (b && typeof b.error === "object" && b.error) msg = b.error.message || JSON.stringify(b.error);
      else if (b && typeof b.error === "string") msg = b.error;
      else if (b && typeof b.detail === "string") msg = b.detail;
      else if (b && Array.isArray(b.detail)) msg = b.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
      else if (b && typeof b.message === "string") msg = b.message;
    } catch (e) { /* not JSON */ }
    msg = msg || (text || "").trim().slice(0, 500) || "no details";
    if (status === 401) msg += " — this server needs an API key: enter it at the top and press Connect";
    return "HTTP " + status + ": " + msg;
  }

  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(method, path, body) {
    let resp;
    try {
      resp = await fetch(ROOT + path, {
        method, headers: headers(body !== undefined),
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new HttpError(0, "cannot reach the server (" + e.message + ")");
    }
    const text = await resp.text();
    if (!resp.ok) throw new HttpError(resp.status, errorText(resp.status, text));
    try { return JSON.parse(text); } catch (e) { throw new HttpError(resp.status, "not JSON: " + text.slice(0, 200)); }
  }

  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(e.dataset, v);
      else if (k === "style") Object.assign(e.style, v);  // CSSOM: allowed by the page's CSP
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c != null) e.append(c);
    return e;
  }

  function showMsg(node, text) {
    node.textContent = text || "";
    node.hidden = !text;
  }

  const fmt = (x, d = 3) => (typeof x === "number" && isFinite(x) ? x.toFixed(d) : "—");

  // ------------------------------------------------------------------ server info
  async function connect() {
    const status = $("server-status");
    status.textContent = "Connecting…";
    const parts = [];
    try {
      const models = await api("GET", "v1/models");
      state.model = models.data && models.data.length ? models.data[0].id : null;
      if (state.model) parts.push("model " + state.model);
    } catch (e) {
      state.model = null;
      status.textContent = e.message;
      status.classList.add("error");
      loadShards();
      return;
    }
    status.classList.remove("error");
    try {
      const cfg = await api("GET", "wrag/config");
      state.config = cfg;
      if (!cfg.enabled) parts.push("WRAG is disabled on this server");
      else parts.push("WRAG on", "top_k " + cfg.top_k, "method " + cfg.method, "threshold " + cfg.threshold);
      const def = $("method").querySelector('option[value=""]');
      if (def && cfg.method) def.textContent = "default (" + cfg.method + ")";
      for (const id of ["top-k", "search-k"]) {
        $(id).placeholder = cfg.top_k ? String(cfg.top_k) : "";
        $(id).title = "empty: the server's default" + (cfg.top_k ? " (" + cfg.top_k + ")" : "");
      }
      if (cfg.max_top_k) { $("top-k").max = cfg.max_top_k; $("search-k").max = cfg.max_top_k; }
    } catch (e) {
      parts.push("WRAG config unavailable: " + e.message);
    }
    status.textContent = "Connected · " + parts.join(" · ");
    loadMethods();
    loadShards();
  }

  async function loadMethods() {
    try {
      const out = await api("GET", "wrag/chat/methods");
      const sel = $("method");
      for (const o of [...sel.options]) if (o.value) o.remove();
      for (const m of out.methods || []) sel.append(el("option", { value: m, text: m }));
    } catch (e) { /* the server default still works */ }
  }

  // ------------------------------------------------------------------ store panel
  async function loadShards() {
    const err = $("store-error");
    let out;
    try {
      out = await api("GET", "wrag/shards");
    } catch (e) {
      showMsg(err, "Cannot list shards: " + e.message);
      return;
    }
    showMsg(err, "");
    state.shards = new Map((out.shards || []).map((s) => [s.id, s]));
    renderShards();
  }

  function renderShards() {
    const body = $("shards").querySelector("tbody");
    body.replaceChildren();
    for (const s of state.shards.values()) {
      const remove = el("button", { type: "button", class: "small", text: "Remove",
                                    "aria-label": "Remove shard " + s.id, dataset: { action: "remove", id: s.id } });
      remove.addEventListener("click", () => removeShard(s.id, remove));
      body.append(el("tr", { dataset: { id: s.id } },
        el("td", { class: "id", text: s.id }),
        el("td", { text: s.description || s.name || "" }),
        el("td", { class: "num", text: String(s.rank ?? "") }),
        el("td", { class: "actions" }, pinButton(s.id), remove)));
    }
    $("shard-count").textContent = "(" + state.shards.size + ")";
    if (!state.shards.size) body.append(el("tr", {}, el("td", { colspan: "4", class: "muted", text: "The store is empty." })));
  }

  async function removeShard(id, button) {
    // two clicks: the first arms the button, so a stray click removes nothing
    if (button.dataset.armed !== "1") {
      button.dataset.armed = "1";
      button.textContent = "Confirm remove";
      setTimeout(() => { button.dataset.armed = ""; button.textContent = "Remove"; }, 5000);
      return;
    }
    try {
      await api("DELETE", "wrag/shards/" + encodeURIComponent(id));
      showMsg($("store-error"), "");
      state.pins = state.pins.filter((p) => p.id !== id);
      renderPins();
      showMsg($("add-ok"), "Removed shard " + id + ".");
    } catch (e) {
      showMsg($("store-error"), "Cannot remove " + id + ": " + e.message);
    }
    loadShards();
  }

  async function search(ev) {
    ev.preventDefault();
    const text = $("search-text").value.trim();
    const body = { text };
    const k = parseInt($("search-k").value, 10);
    if (k > 0) body.top_k = k;
    const m = $("method").value;
    if (m) body.method = m;
    const out = $("search-results");
    out.replaceChildren();
    try {
      const plan = await api("POST", "wrag/retrieve", body);
      showMsg($("search-error"), "");
      out.append(planView(plan.shards || [], plan.method, plan.source, false));
    } catch (e) {
      showMsg($("search-error"), "Search failed: " + e.message);
    }
  }

  async function addShard(ev) {
    ev.preventDefault();
    const body = { path: $("add-path").value.trim() };
    const id = $("add-id").value.trim();
    const desc = $("add-desc").value.trim();
    if (id) body.id = id;
    if (desc) body.description = desc;
    showMsg($("add-error"), "");
    showMsg($("add-ok"), "");
    $("add-go").disabled = true;
    try {
      const meta = await api("POST", "wrag/shards", body);
      showMsg($("add-ok"), "Registered shard " + meta.id + " (rank " + meta.rank + ").");
      $("add-form").reset();
      await loadShards();
    } catch (e) {
      showMsg($("add-error"), "Cannot register the shard: " + e.message);
    } finally {
      $("add-go").disabled = false;
    }
  }

  // ------------------------------------------------------------------ pins
  function pinButton(id) {
    const b = el("button", { type: "button", class: "small", text: "Pin", "aria-label": "Pin shard " + id,
                             dataset: { action: "pin", id } });
    b.addEventListener("click", () => pin(id));
    return b;
  }

  function pin(id) {
    if (!state.pins.some((p) => p.id === id)) state.pins.push({ id, weight: 1 });
    renderPins();
  }

  function renderPins() {
    const list = $("pins");
    list.replaceChildren();
    for (const p of state.pins) {
      const w = el("input", { type: "number", min: "0", step: "0.1", value: String(p.weight),
                              "aria-label": "Weight of pinned shard " + p.id });
      w.addEventListener("input", () => { p.weight = parseFloat(w.value); });
      const x = el("button", { type: "button", class: "small", text: "×", "aria-label": "Unpin shard " + p.id });
      x.addEventListener("click", () => { state.pins = state.pins.filter((q) => q !== p); renderPins(); });
      list.append(el("li", { class: "pin", dataset: { id: p.id } }, el("span", { class: "pin-id", text: p.id }),
                     el("span", { class: "muted", text: "weight" }), w, x));
    }
    $("pins-empty").hidden = state.pins.length > 0;
    $("clear-pins").hidden = state.pins.length === 0;
  }

  // ------------------------------------------------------------------ answers
  // x-wrag-shards: "id=weight,id=weight" or "-" (nothing applied)
  function parseShardHeader(h) {
    if (!h || h === "-") return [];
    return h.split(",").filter(Boolean).map((part) => {
      const i = part.lastIndexOf("=");
      return { id: part.slice(0, i), weight: parseFloat(part.slice(i + 1)) };
    });
  }

  const SOURCE_TEXT = {
    retrieved: "retrieved for this message",
    explicit: "pinned by you",
    off: "WRAG off: base model",
    none: "no shard passed the retrieval threshold: base model",
  };

  // A table of shards (id, description, score, weight, pin) with the method and source.
  function planView(shards, method, source, applied = true) {
    const box = el("div", { class: "plan-view" });
    const meta = el("p", { class: "meta" });
    meta.append(applied ? "Shards applied: " : "Would retrieve: ", el("b", { text: String(shards.length) }));
    if (shards.length) meta.append(" · method ", el("b", { class: "plan-method", text: method || "—" }));
    meta.append(" · source ", el("b", { class: "plan-source", text: source || "—" }));
    if (SOURCE_TEXT[source]) meta.append(" (" + SOURCE_TEXT[source] + ")");
    box.append(meta);
    if (!shards.length) return box;
    const tbody = el("tbody");
    for (const s of shards) {
      const d = state.shards.get(s.id);
      const wcell = el("td", { class: "num" });
      if (typeof s.weight === "number" && isFinite(s.weight)) {
        wcell.append(el("span", { class: "bar", style: { width: Math.round(40 * Math.min(1, s.weight)) + "px" },
                                  "aria-hidden": "true" }), fmt(s.weight));
      } else wcell.textContent = "—";
      tbody.append(el("tr", { class: "plan-shard", dataset: { id: s.id } },
        el("td", { class: "id", text: s.id }),
        el("td", { text: d ? (d.description || d.name || "") : "" }),
        el("td", { class: "num score", text: s.score === undefined || s.score === null ? "—" : fmt(s.score) }),
        wcell,
        el("td", { class: "actions" }, pinButton(s.id))));
    }
    box.append(el("table", { class: "table" },
      el("thead", {}, el("tr", {}, ...["shard", "description", "relevance", "weight", ""].map(
        (t) => el("th", { scope: "col", text: t })))), tbody));
    return box;
  }

  function newCard(kind) {
    const node = $("answer-template").content.firstElementChild.cloneNode(true);
    node.classList.add(kind);
    node.dataset.kind = kind;
    node.dataset.state = "waiting";
    node.querySelector(".badge").textContent = kind === "base" ? "base" : "WRAG";
    setState(node, "waiting", "waiting…");
    return node;
  }

  function setState(card, st, text) {
    card.dataset.state = st;
    card.setAttribute("aria-busy", st === "waiting" || st === "streaming" ? "true" : "false");  // no per-chunk announcements
    card.querySelector(".state").textContent = text;
  }

  function failCard(card, message) {
    card.classList.add("failed");
    setState(card, "error", "error");
    card.querySelector(".plan").replaceChildren(el("p", { class: "error", role: "alert", text: message }));
  }

  // Streams one answer into `card`. Returns the answer text (null on error).
  async function streamAnswer(card, messages, xargs, query) {
    const ctl = new AbortController();
    state.running.push(ctl);
    const body = { messages, stream: true, vllm_xargs: xargs };
    if (state.model) body.model = state.model;
    const mt = parseInt($("max-tokens").value, 10);
    if (mt > 0) body.max_tokens = mt;
    const temp = parseFloat($("temperature").value);
    if (isFinite(temp)) body.temperature = temp;
    const t0 = performance.now();
    const textNode = card.querySelector(".answer-text");
    let text = "", finish = null;
    try {
      const resp = await fetch(ROOT + "v1/chat/completions", {
        method: "POST", headers: headers(true), body: JSON.stringify(body), signal: ctl.signal,
      });
      if (!resp.ok) {
        failCard(card, errorText(resp.status, await resp.text()));
        return null;
      }
      showPlan(card, resp.headers);
      setState(card, "streaming", "streaming…");
      const reader = resp.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      const handle = (event) => {
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data || data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        for (const ch of chunk.choices || []) {
          if (ch.delta && typeof ch.delta.content === "string") {
            text += ch.delta.content;
            textNode.textContent = text;
          }
          if (ch.finish_reason) finish = ch.finish_reason;
        }
      };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          handle(buf.slice(0, i));
          buf = buf.slice(i + 2);
        }
      }
      if (buf.trim()) handle(buf);
      const secs = ((performance.now() - t0) / 1000).toFixed(1);
      setState(card, "done", "done in " + secs + " s" + (finish ? " · finish: " + finish : ""));
      if (!text) textNode.textContent = "";
      return text;
    } catch (e) {
      if (e.name === "AbortError") {
        setState(card, "stopped", "stopped");
        return text || null;
      }
      failCard(card, "The answer failed: " + e.message);
      return null;
    } finally {
      state.running = state.running.filter((c) => c !== ctl);
    }
  }

  // Shards, weights and (for retrieved plans) relevance probabilities all come from the response headers.
  function showPlan(card, h) {
    const shards = parseShardHeader(h.get("x-wrag-shards"));
    const scores = new Map(parseShardHeader(h.get("x-wrag-scores")).map((s) => [s.id, s.weight]));
    for (const s of shards) s.score = scores.get(s.id);
    const method = h.get("x-wrag-method");
    const source = h.get("x-wrag-source") || (h.get("x-wrag-shards") === null ? "unknown" : "");
    card.dataset.shards = h.get("x-wrag-shards") || "";
    card.dataset.source = source;
    const plan = card.querySelector(".plan");
    if (h.get("x-wrag-shards") === null) {
      plan.replaceChildren(el("p", { class: "meta", text: "This server sent no x-wrag-* headers (WRAG disabled?)." }));
      return;
    }
    plan.replaceChildren(planView(shards, method, source));
  }

  function controls() {
    const x = {};
    const k = parseInt($("top-k").value, 10);
    if (k > 0) x.wrag_top_k = k;
    const m = $("method").value;
    if (m) x.wrag_method = m;
    if (state.pins.length) {
      // real JSON lists: vLLM passes list[str|int|float] values of vllm_xargs through as lists
      x.wrag_shards = state.pins.map((p) => p.id);
      x.wrag_weights = state.pins.map((p) => (isFinite(p.weight) ? p.weight : 1));
    }
    return x;
  }

  async function send(ev) {
    if (ev) ev.preventDefault();
    const q = $("question").value.trim();
    if (!q) return;
    $("question").value = "";
    const messages = ($("history").checked ? state.history.slice() : []).concat([{ role: "user", content: q }]);
    const off = $("wrag-off").checked;
    const compare = $("compare").checked && !off;
    const xargs = controls();

    const turn = el("div", { class: "turn" }, el("div", { class: "user-msg", text: q }));
    const answers = el("div", { class: "answers" + (compare ? " side-by-side" : "") });
    turn.append(answers);
    $("log").append(turn);

    const main = newCard(off ? "base" : "wrag");
    answers.append(main);
    const jobs = [streamAnswer(main, messages, off ? { wrag_off: true } : xargs, q)];
    if (compare) {
      const base = newCard("base");
      answers.append(base);
      jobs.push(streamAnswer(base, messages, { wrag_off: true }, q));
    }
    $("send").disabled = true;
    $("stop").disabled = false;
    turn.scrollIntoView({ block: "end" });
    const [answer] = await Promise.all(jobs);
    $("send").disabled = false;
    $("stop").disabled = state.running.length === 0;
    if (answer !== null) state.history.push({ role: "user", content: q }, { role: "assistant", content: answer });
    $("log").scrollTop = $("log").scrollHeight;
  }

  // ------------------------------------------------------------------ wiring
  function init() {
    $("api-key").value = state.apiKey;
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      state.apiKey = $("api-key").value.trim();
      if (state.apiKey) sessionStorage.setItem(KEY_STORE, state.apiKey);
      else sessionStorage.removeItem(KEY_STORE);
      connect();
    });
    $("ask-form").addEventListener("submit", send);
    $("question").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); if (!$("send").disabled) send(); }
    });
    $("stop").addEventListener("click", () => { for (const c of state.running) c.abort(); });
    $("new-chat").addEventListener("click", () => { state.history = []; $("log").replaceChildren(); });
    $("clear-pins").addEventListener("click", () => { state.pins = []; renderPins(); });
    $("refresh-shards").addEventListener("click", loadShards);
    $("search-form").addEventListener("submit", search);
    $("add-form").addEventListener("submit", addShard);
    renderPins();
    connect();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
