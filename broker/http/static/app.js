// Conveyor dashboard: plain JS, no build step and no external assets.
//
// Pages (#/overview, #/queues, #/queue/<name>, #/exchanges, #/consumers, #/connections,
// #/streams, #/access) over the management API (/api/*), polled once a second; charts are
// drawn on <canvas> (a queue's depth from the broker's own history, so it is not empty at
// load). If the broker wants a token, the header shows a token field; the token is kept
// in sessionStorage (this tab only) and sent as "Authorization: Bearer <token>". Every
// state change carries X-Conveyor-Request, which the broker needs from anonymous callers.
"use strict";

(function () {
  const POLL_MS = 1000;
  const HISTORY = 120;            // chart samples kept (2 minutes at 1/s)
  const TOKEN_KEY = "conveyor.token";

  const $ = (sel) => document.querySelector(sel);
  const state = {
    samples: [],                  // {t, publish, deliver}
    polls: 0,
    inspecting: null,             // queue name of the queue page
    page: "overview",
    queues: new Map(),            // name -> the last /api/queues item
    bindings: [],
    consumers: [],
    history: [],                  // the queue page's /history samples
    historyAt: 0,
    whoamiDone: false,
    connPublished: new Map(),     // connection id -> {t, n}: for its publish rate
    dlqs: new Set(),              // queues bound to some queue's dead-letter exchange
    authNeeded: false,
  };
  window.conveyorDashboard = state;  // read by tests and handy in the devtools console

  // ------------------------------------------------------------------ API access
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  async function api(path, options) {
    const opts = Object.assign({ headers: {} }, options || {});
    // X-Conveyor-Request: the broker refuses anonymous state changes without it (CSRF).
    opts.headers = Object.assign({ Accept: "application/json", "X-Conveyor-Request": "1" },
                                 opts.headers);
    const t = token();
    if (t) opts.headers.Authorization = "Bearer " + t;
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), 5000);
    opts.signal = ctrl.signal;
    let resp;
    try {
      resp = await fetch(path, opts);
    } catch (e) {
      throw new ApiError(0, e.name === "AbortError" ? "request timed out" : "broker unreachable");
    } finally {
      clearTimeout(timer);
    }
    const text = await resp.text();
    let body = null;
    if (text) {
      try { body = JSON.parse(text); } catch (e) { body = text; }
    }
    if (resp.status === 401 || resp.status === 403) {
      needAuth(resp.status === 403 ? "token not allowed" : "token required");
    }
    if (!resp.ok) {
      // The API's errors are {"error": {"code", "name", "message"}}.
      const err = body && typeof body === "object" ? (body.error || body) : null;
      const msg = err ? (err.message || JSON.stringify(err)) : (body || resp.statusText);
      throw new ApiError(resp.status, resp.status + ": " + msg);
    }
    return body;
  }

  const enc = encodeURIComponent;

  // ------------------------------------------------------------------ small helpers
  // First defined value among dotted paths ("rates.publish") of obj.
  function pick(obj, ...paths) {
    for (const p of paths) {
      let v = obj;
      for (const k of p.split(".")) {
        if (v === null || v === undefined || typeof v !== "object") { v = undefined; break; }
        v = v[k];
      }
      if (v !== undefined && v !== null) return v;
    }
    return undefined;
  }

  function num(v) { return typeof v === "number" && isFinite(v) ? v : 0; }

  function fmtInt(v) { return v === undefined ? "–" : Math.round(num(v)).toLocaleString("en-US"); }

  function fmtRate(v) {
    if (v === undefined) return "–";
    v = num(v);
    return v >= 100 ? Math.round(v).toLocaleString("en-US") : v.toFixed(1);
  }

  function fmtBytes(v) {
    if (v === undefined || v === null) return "–";
    if (typeof v !== "number") return String(v);
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : String(v)) + " " + units[i];
  }

  function fmtDuration(s) {
    if (s === undefined) return "–";
    s = Math.floor(num(s));
    const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + (s % 60) + "s";
    return s + "s";
  }

  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") e.className = v;
      else if (k === "dataset") Object.assign(e.dataset, v);
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  function setText(sel, text) { const e = $(sel); if (e && e.textContent !== text) e.textContent = text; }

  function showNote(msg) { showError(msg); $("#error").classList.add("note"); }

  let errorTimer = null;
  function showError(msg) {
    const box = $("#error");
    box.classList.remove("note");
    box.textContent = msg;
    box.hidden = false;
    clearTimeout(errorTimer);
    errorTimer = setTimeout(() => { box.hidden = true; }, 6000);
  }

  function setStatus(kind, text) {
    const s = $("#status");
    s.dataset.state = kind;
    s.textContent = text;
  }

  // A button that asks for a second click within 3 s before doing something destructive
  // (no window.confirm: it blocks the page and headless browsers dismiss it).
  function confirmButton(label, cls, action) {
    const b = el("button", { type: "button", class: cls }, label);
    let armed = null;
    b.addEventListener("click", async () => {
      if (!armed) {
        b.textContent = "Sure?";
        armed = setTimeout(() => { armed = null; b.textContent = label; }, 3000);
        return;
      }
      clearTimeout(armed);
      armed = null;
      b.disabled = true;
      try { await action(); } catch (e) { showError(e.message); }
      b.disabled = false;
      b.textContent = label;
    });
    return b;
  }

  // ------------------------------------------------------------------ auth
  function needAuth(why) {
    state.authNeeded = true;
    $("#auth").hidden = false;
    setStatus("auth", why);
  }

  $("#auth").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("#token").value.trim();
    if (t) sessionStorage.setItem(TOKEN_KEY, t); else sessionStorage.removeItem(TOKEN_KEY);
    $("#token").value = "";
    $("#token").placeholder = t ? "token set" : "cvy1.…";
    state.authNeeded = false;
    state.whoamiDone = false;
    pollNow();
  });
  $("#token-clear").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("#token").placeholder = "cvy1.…";
    state.whoamiDone = false;
    pollNow();
  });
  if (token()) {
    $("#auth").hidden = false;
    $("#token").placeholder = "token set";
  }

  // ------------------------------------------------------------------ pages
  // #/overview, #/queues, #/queue/<name>, #/exchanges, #/consumers, #/connections,
  // #/streams, #/access. Every section says which page it belongs to (data-page).
  function route() {
    const h = location.hash.replace(/^#\/?/, "");
    const [page, ...rest] = h.split("/");
    if (page === "queue" && rest.length) return { page: "queue", queue: decodeURIComponent(rest.join("/")) };
    const known = ["overview", "queues", "exchanges", "consumers", "connections", "streams", "access"];
    return { page: known.includes(page) ? page : "overview", queue: null };
  }

  function showPage() {
    const r = route();
    state.page = r.page;
    for (const s of document.querySelectorAll("main > section[data-page]")) s.hidden = s.dataset.page !== r.page;
    for (const a of document.querySelectorAll("#nav a")) {
      a.classList.toggle("active", a.dataset.page === r.page || (r.page === "queue" && a.dataset.page === "queues"));
    }
    document.body.dataset.page = r.page;
    if (r.page === "queue") openQueue(r.queue); else state.inspecting = null;
    drawAll();
    pollNow();
  }
  window.addEventListener("hashchange", showPage);

  // ------------------------------------------------------------------ charts
  function niceMax(v) {
    if (v <= 4) return 4;   // an idle chart still has a readable 0..4 scale
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // Lines of `series` ([key, css colour variable, default colour]) over `samples`
  // ({t: ms, key: value}) for the last spanMs before the newest sample.
  function drawChart(canvas, samples, series, spanMs, label) {
    if (!canvas || canvas.offsetParent === null) return;  // hidden page: drawn when shown
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const css = getComputedStyle(document.documentElement);
    const colour = (name, dflt) => (css.getPropertyValue(name) || dflt).trim();
    const left = 56, right = 10, top = 10, bottom = 22;
    const pw = w - left - right, ph = h - top - bottom;
    let max = 0;
    for (const s of samples) for (const [k] of series) max = Math.max(max, num(s[k]));
    const ymax = niceMax(max);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7385";
    ctx.strokeStyle = "#dde1e8";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = top + ph - (ph * i) / 4;
      ctx.beginPath();
      ctx.moveTo(left, Math.round(y) + 0.5);
      ctx.lineTo(left + pw, Math.round(y) + 0.5);
      ctx.stroke();
      const tick = (ymax * i) / 4;
      ctx.fillText(tick >= 1000 ? fmtRate(tick) : String(+tick.toFixed(2)), left - 6, y);
    }
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    ctx.fillText(label, left, h - 6);
    ctx.textAlign = "right";
    ctx.fillText("now", left + pw, h - 6);
    const t1 = samples.length ? samples[samples.length - 1].t : 0, t0 = t1 - spanMs;
    const x = (t) => left + pw - ((t1 - t) * pw) / spanMs;
    const y = (v) => top + ph - (num(v) / ymax) * ph;
    const shown = samples.filter((s) => s.t >= t0);
    for (const [key, name, dflt] of series) {
      ctx.strokeStyle = colour(name, dflt);
      ctx.fillStyle = ctx.strokeStyle;
      ctx.lineWidth = 2;
      ctx.beginPath();
      shown.forEach((s, i) => (i ? ctx.lineTo(x(s.t), y(s[key])) : ctx.moveTo(x(s.t), y(s[key]))));
      ctx.stroke();
      if (shown.length === 1) ctx.fillRect(x(shown[0].t) - 2, y(shown[0][key]) - 2, 4, 4);
    }
    // For tests and scripts: how much the chart holds.
    canvas.dataset.samples = String(shown.length);
    canvas.dataset.maxRate = String(max);
  }

  const RATE_SERIES = [["deliver", "--deliver", "#1e9e63"], ["publish", "--publish", "#2f6fde"]];
  function drawAll() {
    drawChart($("#rate-chart"), state.samples, RATE_SERIES, (HISTORY - 1) * POLL_MS, "-" + HISTORY + "s");
    if (state.page === "queue") {
      const hist = state.history;
      const span = hist.length > 1 ? Math.max(60000, hist[hist.length - 1].t - hist[0].t) : 60000;
      const label = "-" + fmtDuration(span / 1000);
      drawChart($("#depth-chart"), hist, [["unacked", "--unacked", "#d64f8a"], ["messages", "--ready", "#7a4fd6"]], span, label);
      drawChart($("#qrate-chart"), hist, [["ack", "--ack", "#b7791f"], ...RATE_SERIES], span, label);
    }
  }

  // ------------------------------------------------------------------ overview
  // GET /api/overview: {version, uptime_s, messages: {ready, unacked, total, dead_lettered},
  // rates: {publish, deliver, ack} (per second), connections, consumers, queues,
  // exchanges, memory: {rss}, disk: {free, data_dir}}.
  function renderOverview(ov) {
    const msgs = pick(ov, "messages") || {};
    const rates = pick(ov, "rates") || {};
    const version = pick(ov, "version");
    if (version !== undefined) setText("#version", "v" + version);
    setText("#ov-uptime", fmtDuration(pick(ov, "uptime_s")));
    setText("#ov-ready", fmtInt(pick(msgs, "ready")));
    setText("#ov-unacked", fmtInt(pick(msgs, "unacked")));
    setText("#ov-dead-lettered", fmtInt(pick(msgs, "dead_lettered")));
    setText("#ov-publish-rate", fmtRate(pick(rates, "publish")));
    setText("#ov-deliver-rate", fmtRate(pick(rates, "deliver")));
    setText("#ov-ack-rate", fmtRate(pick(rates, "ack")));
    setText("#ov-queues", fmtInt(pick(ov, "queues")));
    setText("#ov-exchanges", fmtInt(pick(ov, "exchanges")));
    setText("#ov-connections", fmtInt(pick(ov, "connections")));
    setText("#ov-consumers", fmtInt(pick(ov, "consumers")));
    setText("#ov-memory", fmtBytes(pick(ov, "memory.rss")));
    setText("#ov-disk", fmtBytes(pick(ov, "disk.free")));
    state.samples.push({ t: Date.now(), publish: num(pick(rates, "publish")),
                         deliver: num(pick(rates, "deliver")) });
    if (state.samples.length > HISTORY) state.samples.shift();
  }

  // ------------------------------------------------------------------ queues
  const qpath = (name) => "/api/queues/" + enc(name);

  function queueRow(name) {
    return el("tr", { dataset: { queue: name } },
      el("td", { class: "name" }, el("a", { href: "#/queue/" + enc(name) }, name)),
      el("td", { class: "num ready" }), el("td", { class: "num unacked" }),
      el("td", { class: "num consumers" }), el("td", { class: "num publish-rate" }),
      el("td", { class: "num deliver-rate" }), el("td", { class: "dlx" }),
      el("td", { class: "actions" },
        el("button", { type: "button", class: "inspect", onclick: () => { location.hash = "#/queue/" + enc(name); } }, "Inspect"),
        confirmButton("Purge", "danger purge", async () => {
          const r = await api(qpath(name) + "/purge", { method: "POST" });
          showNote("purged " + r.purged + " message(s) from " + name);
          pollNow();
        }),
        confirmButton("Delete", "danger delete", async () => {
          await api(qpath(name), { method: "DELETE" });
          showNote("deleted queue " + name);
          pollNow();
        })));
  }

  function renderQueues(list) {
    const queues = Array.isArray(list) ? list : [];
    const tbody = $("#queue-table tbody");
    const rows = new Map([...tbody.rows].map((r) => [r.dataset.queue, r]));
    const seen = new Set();
    state.queues = new Map();
    for (const q of queues) {
      const name = q.name;
      seen.add(name);
      state.queues.set(name, q);
      let tr = rows.get(name);
      if (!tr) { tr = queueRow(name); }
      tbody.append(tr);  // keeps the API's order
      const rates = pick(q, "rates") || {};
      const args = pick(q, "arguments") || {};
      const cell = (cls, text) => { const c = tr.querySelector("." + cls); if (c.textContent !== text) c.textContent = text; };
      cell("ready", fmtInt(pick(q, "messages")));
      cell("unacked", fmtInt(pick(q, "unacked")));
      cell("consumers", fmtInt(pick(q, "consumers")));
      cell("publish-rate", fmtRate(pick(rates, "publish")));
      cell("deliver-rate", fmtRate(pick(rates, "deliver")));
      const dlx = pick(args, "dead_letter_exchange");
      cell("dlx", dlx === undefined ? "" : (dlx || "(default)") + (args.dead_letter_routing_key ? " → " + args.dead_letter_routing_key : ""));
      tr.classList.toggle("dlq", state.dlqs.has(name));
    }
    for (const [name, tr] of rows) if (!seen.has(name)) tr.remove();
    setText("#queue-count", "(" + queues.length + ")");
    $("#queues-empty").hidden = queues.length > 0;
    renderStreams(queues);
    if (state.page === "queue") renderQueuePage();
    return queues;
  }

  // Queues that receive dead letters: bound to an exchange some queue names as its DLX.
  function computeDlqs(queues, bindings) {
    const dlxs = new Set();
    for (const q of queues) {
      const d = pick(q, "arguments.dead_letter_exchange");
      if (typeof d === "string") dlxs.add(d);
    }
    const out = new Set();
    for (const b of Array.isArray(bindings) ? bindings : []) {
      if (dlxs.has(b.exchange)) out.add(b.queue);
    }
    state.dlqs = out;
  }

  function jsonField(sel, what) {
    const raw = $(sel).value.trim();
    if (!raw) return undefined;
    let v;
    try { v = JSON.parse(raw); } catch (e) { throw new Error(what + " is not valid JSON"); }
    if (v === null || typeof v !== "object" || Array.isArray(v)) throw new Error(what + " must be a JSON object");
    return v;
  }

  // A form whose submit runs `action`, shows its result in `out`, and polls.
  function onSubmit(form, out, action) {
    $(form).addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const btn = $(form).querySelector("button[type=submit]");
      btn.disabled = true;
      try {
        setText(out, await action());
        $(out).dataset.ok = "1";
      } catch (e) {
        setText(out, e.message);
        $(out).dataset.ok = "0";
      } finally {
        btn.disabled = false;
      }
      pollNow();
    });
  }

  onSubmit("#queue-form", "#qf-result", async () => {
    const name = $("#qf-name").value.trim();
    const body = { durable: $("#qf-durable").checked, auto_delete: $("#qf-auto-delete").checked };
    const args = jsonField("#qf-arguments", "arguments");
    if (args) body.arguments = args;
    await api(qpath(name), { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    return "queue " + name + " declared";
  });

  // ------------------------------------------------------------------ the queue page
  function openQueue(name) {
    if (state.inspecting !== name) {
      state.inspecting = name;
      state.history = [];
      setText("#inspect-result", "");
      setText("#gf-result", "");
      setText("#pf-result", "");
      $("#gf-messages").replaceChildren();
      $("#peek-table tbody").replaceChildren();
      delete $("#peek-table").dataset.loaded;
      delete $("#depth-chart").dataset.samples;
      const actions = $("#qp-actions");
      actions.replaceChildren(
        confirmButton("Purge", "danger purge", async () => {
          const r = await api(qpath(name) + "/purge", { method: "POST" });
          setText("#qp-result", "purged " + r.purged + " message(s)");
          await Promise.all([refreshPeek(), pollNow()]);
        }),
        " ",
        confirmButton("Delete", "danger delete", async () => {
          await api(qpath(name), { method: "DELETE" });
          showNote("deleted queue " + name);
          location.hash = "#/queues";
        }));
    }
    setText("#qp-name", name);
    setText("#inspect-queue", name);
    renderQueuePage();
    refreshHistory();
    refreshPeek();
  }

  async function refreshHistory() {
    const name = state.inspecting;
    if (name === null) return;
    try {
      const h = await api(qpath(name) + "/history");
      if (state.inspecting !== name) return;
      state.history = Array.isArray(h.samples) ? h.samples : [];
      state.historyAt = Date.now();
    } catch (e) {
      if (e.status !== 404) showError("history of " + name + ": " + e.message);
    }
    drawAll();
  }

  function renderQueuePage() {
    const name = state.inspecting;
    if (name === null) return;
    const q = state.queues.get(name);
    if (!q) { setText("#qp-type", "(no such queue)"); return; }
    const rates = q.rates || {};
    setText("#qp-type", q.type === "stream"
      ? "(stream: offsets " + q.first_offset + "–" + q.head_offset + ", " + fmtBytes(q.bytes) + ")"
      : "(" + [q.durable ? "durable" : "transient", q.auto_delete ? "auto-delete" : "", q.exclusive ? "exclusive" : ""].filter(Boolean).join(", ") + ")");
    setText("#qp-ready", fmtInt(q.messages));
    setText("#qp-unacked", fmtInt(q.unacked));
    setText("#qp-delayed", fmtInt(q.delayed));
    setText("#qp-consumers", fmtInt(q.consumers));
    setText("#qp-publish", fmtRate(rates.publish));
    setText("#qp-deliver", fmtRate(rates.deliver));
    setText("#qp-ack", fmtRate(rates.ack));
    setText("#qp-dead-lettered", fmtInt(pick(q, "counters.dead_lettered")));
    const args = q.arguments || {};
    const rows = Object.keys(args).sort().map((k) => el("tr", { class: "argument" }, el("th", {}, k), el("td", {}, JSON.stringify(args[k]))));
    const settings = q.settings || {};
    for (const k of Object.keys(settings).sort()) {
      if (k in args) continue;
      rows.push(el("tr", { class: "setting muted" }, el("th", {}, k + " (default)"), el("td", {}, JSON.stringify(settings[k]))));
    }
    const key = JSON.stringify(rows.map((r) => r.textContent));
    const tbody = $("#qp-args tbody");
    if (tbody.dataset.key !== key) { tbody.replaceChildren(...rows); tbody.dataset.key = key; }
    const mine = state.consumers.filter((c) => c.queue === name);
    $("#qp-consumer-table tbody").replaceChildren(...mine.map((c) => el("tr", {},
      el("td", {}, c.consumer_tag), el("td", {}, c.connection), el("td", { class: "num" }, fmtInt(c.credit)),
      el("td", { class: "num" }, fmtInt(c.unacked)))));
    $("#qp-consumers-empty").hidden = mine.length > 0;
    const bound = state.bindings.filter((b) => b.queue === name);
    $("#qp-bindings").replaceChildren(...(bound.length ? bound.map((b) => el("li", {}, b.exchange + (b.routing_key ? " → " + b.routing_key : ""))) : [el("li", { class: "muted" }, "No bindings (the default exchange routes by name).")]));
    if (state.historyAt && Date.now() - state.historyAt > 5000) refreshHistory();
  }

  onSubmit("#publish-form", "#pf-result", async () => {
    const name = state.inspecting;
    const body = { message: $("#pf-body").value };
    const ct = $("#pf-content-type").value.trim();
    const mid = $("#pf-message-id").value.trim();
    const prio = $("#pf-priority").value.trim();
    const headers = jsonField("#pf-headers", "headers");
    if (ct) body.content_type = ct;
    if (mid) body.message_id = mid;
    if (prio) body.priority = parseInt(prio, 10);
    if (headers) body.headers = headers;
    const r = await api("/queues/" + enc(name) + "/messages", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    refreshPeek();
    return "published " + (r && r.id ? r.id : "");
  });

  // Get: take messages through the gateway, show them, then either delete them (ack)
  // or make them visible again at once (requeue).
  onSubmit("#get-form", "#gf-result", async () => {
    const name = state.inspecting;
    const count = Math.max(1, Math.min(100, parseInt($("#gf-count").value, 10) || 1));
    const mode = $("#gf-mode").value;
    const r = await api("/queues/" + enc(name) + "/messages?batch_size=" + count + "&visibility_timeout=30");
    const msgs = (r && r.messages) || [];
    $("#gf-messages").replaceChildren(...msgs.map((m) => el("div", { class: "got" },
      el("div", { class: "got-body" }, bodyText(m)), el("div", { class: "props" }, propsText(m)))));
    const json = { "Content-Type": "application/json" };
    if (mode === "ack" && msgs.length) {
      await api("/queues/" + enc(name) + "/messages/batch-delete", { method: "POST", headers: json,
        body: JSON.stringify({ entries: msgs.map((m, i) => ({ id: "m" + i, receipt_handle: m.receipt_handle })) }) });
    } else {
      for (const m of msgs) {
        await api("/queues/" + enc(name) + "/messages/" + enc(m.receipt_handle) + "/visibility",
          { method: "PUT", headers: json, body: JSON.stringify({ visibility_timeout: 0 }) });
      }
    }
    refreshPeek();
    return msgs.length + " message(s) " + (mode === "ack" ? "taken (acked)" : "looked at (requeued)");
  });

  // ------------------------------------------------------------------ inspect / redrive
  // A peeked message: {id, body, encoding ("utf-8" | "base64"), exchange, routing_key,
  // properties: {headers: {"x-death": [newest first: {reason, queue, count, ...}]}}, ...}.
  function deathsOf(m) {
    const d = pick(m, "properties.headers.x-death");
    return Array.isArray(d) ? d : [];
  }

  function bodyText(m) {
    const b = pick(m, "body");
    if (typeof b !== "string") return b === undefined ? "" : JSON.stringify(b);
    return m.encoding === "base64" ? "(binary, base64) " + b : b;
  }

  // Properties and headers, one "key=value" per item (x-death is shown in its own columns).
  function propsText(m) {
    const props = Object.assign({}, m.properties || {});
    const headers = Object.assign({}, props.headers || {});
    delete props.headers;
    delete headers["x-death"];
    const parts = Object.keys(props).sort().map((k) => k + "=" + JSON.stringify(props[k]));
    for (const k of Object.keys(headers).sort()) parts.push("header " + k + "=" + JSON.stringify(headers[k]));
    return parts.join("  ");
  }

  async function refreshPeek() {
    const name = state.inspecting;
    if (name === null) return;
    const count = Math.max(1, Math.min(1000, parseInt($("#peek-count").value, 10) || 20));
    let data;
    try {
      data = await api(qpath(name) + "/peek?count=" + count);
    } catch (e) {
      if (e.status !== 404) showError("peek " + name + ": " + e.message);
      return;
    }
    if (state.inspecting !== name) return;
    const msgs = Array.isArray(data) ? data : (data && data.messages) || [];
    const tbody = $("#peek-table tbody");
    tbody.replaceChildren(...msgs.map((m, i) => {
      const d = deathsOf(m)[0] || {};
      return el("tr", { class: "message" },
        el("td", { class: "num" }, i + 1),
        el("td", { class: "routing-key" }, pick(m, "routing_key") ?? ""),
        el("td", { class: "body", title: bodyText(m) }, bodyText(m)),
        el("td", { class: "props" }, propsText(m)),
        el("td", { class: "death-reason" }, d.reason ?? ""),
        el("td", { class: "death-queue" }, d.queue ?? ""),
        el("td", { class: "num death-count" }, d.count ?? ""));
    }));
    $("#peek-empty").hidden = msgs.length > 0;
    $("#peek-table").dataset.loaded = String(msgs.length);
  }

  $("#peek-refresh").addEventListener("click", refreshPeek);
  $("#redrive").addEventListener("click", async () => {
    const name = state.inspecting;
    if (name === null) return;
    const to = $("#redrive-to").value.trim();
    const btn = $("#redrive");
    btn.disabled = true;
    try {
      const res = await api(qpath(name) + "/redrive" + (to ? "?to=" + enc(to) : ""), { method: "POST" });
      // {queue, moved, skipped, reasons: {why: count}}
      const moved = pick(res || {}, "moved");
      const skipped = pick(res || {}, "skipped");
      const why = Object.keys(pick(res || {}, "reasons") || {}).join("; ");
      setText("#inspect-result", "moved " + (moved ?? "?") + " message(s)" +
        (skipped ? ", " + skipped + " left (" + why + ")" : ""));
      $("#inspect-result").dataset.moved = String(moved ?? "");
    } catch (e) {
      setText("#inspect-result", "redrive failed: " + e.message);
    } finally {
      btn.disabled = false;
    }
    await Promise.all([refreshPeek(), pollNow()]);
  });

  // ------------------------------------------------------------------ exchanges, bindings
  function renderExchanges(list) {
    const xs = Array.isArray(list) ? list : [];
    $("#exchange-table tbody").replaceChildren(...xs.map((x) => el("tr", { dataset: { exchange: x.name } },
      el("td", { class: "name" }, x.name || "(default)"), el("td", { class: "type" }, x.type),
      el("td", {}, x.durable ? "yes" : "no"), el("td", {}, x.auto_delete ? "yes" : "no"),
      el("td", { class: "num bindings" }, fmtInt(x.bindings)),
      el("td", { class: "actions" }, x.name && !x.name.startsWith("amq.")
        ? confirmButton("Delete", "danger delete", async () => {
          await api("/api/exchanges/" + enc(x.name), { method: "DELETE" });
          showNote("deleted exchange " + x.name);
          pollNow();
        }) : ""))));
    setText("#exchange-count", "(" + xs.length + ")");
  }

  function renderBindings(list) {
    const bs = Array.isArray(list) ? list : [];
    state.bindings = bs;
    $("#binding-table tbody").replaceChildren(...bs.map((b) => el("tr", { dataset: { exchange: b.exchange, queue: b.queue, key: b.routing_key } },
      el("td", {}, b.exchange), el("td", {}, el("a", { href: "#/queue/" + enc(b.queue) }, b.queue)),
      el("td", { class: "key" }, b.routing_key),
      el("td", { class: "actions" }, confirmButton("Unbind", "danger unbind", async () => {
        await api("/api/bindings", { method: "DELETE", headers: { "Content-Type": "application/json" }, body: JSON.stringify(b) });
        showNote("unbound " + b.queue + " from " + b.exchange);
        pollNow();
      })))));
    setText("#binding-count", "(" + bs.length + ")");
  }

  onSubmit("#exchange-form", "#xf-result", async () => {
    const name = $("#xf-name").value.trim();
    const body = { type: $("#xf-type").value, durable: $("#xf-durable").checked, auto_delete: $("#xf-auto-delete").checked };
    await api("/api/exchanges/" + enc(name), { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    return "exchange " + name + " declared";
  });
  onSubmit("#binding-form", "#bf-result", async () => {
    const body = { exchange: $("#bf-exchange").value.trim(), queue: $("#bf-queue").value.trim(), routing_key: $("#bf-key").value };
    await api("/api/bindings", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    return "bound " + body.queue + " to " + body.exchange;
  });

  // ------------------------------------------------------------------ consumers, streams
  function renderConsumers(list) {
    const cs = Array.isArray(list) ? list : [];
    state.consumers = cs;
    $("#consumer-table tbody").replaceChildren(...cs.map((c) => el("tr", { dataset: { consumer: c.consumer_tag } },
      el("td", {}, el("a", { href: "#/queue/" + enc(c.queue) }, c.queue)), el("td", { class: "tag" }, c.consumer_tag),
      el("td", {}, c.connection), el("td", { class: "num" }, fmtInt(c.credit)),
      el("td", { class: "num" }, fmtInt(c.unacked)), el("td", {}, c.no_ack ? "yes" : "no"))));
    setText("#consumer-count", "(" + cs.length + ")");
    $("#consumers-empty").hidden = cs.length > 0;
  }

  function renderStreams(queues) {
    const rows = [];
    const streams = queues.filter((q) => q.type === "stream");
    for (const s of streams) {
      const groups = Object.entries(s.groups || {});
      const base = [el("td", {}, el("a", { href: "#/queue/" + enc(s.name) }, s.name)),
        el("td", { class: "num" }, fmtInt(s.first_offset)), el("td", { class: "num" }, fmtInt(s.head_offset)),
        el("td", { class: "num" }, fmtBytes(s.bytes))];
      if (!groups.length) rows.push(el("tr", { dataset: { stream: s.name } }, ...base, el("td", { class: "muted", colspan: "4" }, "no consumer groups")));
      groups.forEach(([g, info], i) => rows.push(el("tr", { dataset: { stream: s.name, group: g } },
        ...(i ? base.map(() => el("td", {})) : base), el("td", { class: "group" }, g),
        el("td", { class: "num committed" }, fmtInt(info.committed)), el("td", { class: "num lag" }, fmtInt(info.lag)),
        el("td", { class: "num" }, fmtInt(info.members)))));
    }
    const key = JSON.stringify(rows.map((r) => r.textContent));
    const tbody = $("#stream-table tbody");
    if (tbody.dataset.key !== key) { tbody.replaceChildren(...rows); tbody.dataset.key = key; }
    setText("#stream-count", "(" + streams.length + ")");
    $("#streams-empty").hidden = streams.length > 0;
  }

  // ------------------------------------------------------------------ access (whoami)
  function renderWhoami(me) {
    const list = (a) => (a && a.length ? a.join("  ") : "(nothing)");
    setText("#ac-subject", me.subject);
    setText("#ac-kind", me.anonymous ? "(anonymous: no token)" : "(token)");
    setText("#ac-management", me.management ? "yes" : "no (needs configure '*')");
    setText("#ac-configure", list(me.permissions.configure));
    setText("#ac-write", list(me.permissions.write));
    setText("#ac-read", list(me.permissions.read));
    setText("#ac-expires", me.expires_at ? new Date(me.expires_at * 1000).toISOString() : "never");
    setText("#whoami", me.subject);
    document.body.classList.toggle("readonly", !me.management);
  }

  async function refreshWhoami() {
    try { renderWhoami(await api("/api/whoami")); } catch (e) { setText("#whoami", ""); }
  }

  // ------------------------------------------------------------------ connections
  function renderConnections(list) {
    const conns = Array.isArray(list) ? list : [];
    const tbody = $("#connection-table tbody");
    const rows = new Map([...tbody.rows].map((r) => [r.dataset.connection, r]));
    const seen = new Set();
    for (const c of conns) {
      const id = String(pick(c, "id"));
      seen.add(id);
      let tr = rows.get(id);
      if (!tr) {
        tr = el("tr", { dataset: { connection: id } },
          el("td", { class: "id opt" }, id), el("td", { class: "name" }), el("td", { class: "peer" }),
          el("td", { class: "user" }),
          el("td", { class: "num published opt" }), el("td", { class: "num rate" }),
          el("td", { class: "num consumers" }), el("td", { class: "num unacked" }),
          el("td", { class: "blocked" }),
          el("td", { class: "actions" }, confirmButton("Close", "danger close", async () => {
            await api("/api/connections/" + enc(id), { method: "DELETE" });
            tr.remove();
            pollNow();
          })));
      }
      tbody.append(tr);
      const cell = (cls, text) => { const e = tr.querySelector("." + cls); if (e.textContent !== text) e.textContent = text; };
      cell("name", String(pick(c, "name") ?? ""));
      cell("peer", String(pick(c, "peer") ?? "") + (c.tls ? " (TLS)" : ""));
      cell("user", String(pick(c, "subject") ?? ""));
      // The API gives a running count; the rate is its change between two polls.
      const published = num(pick(c, "published"));
      const now = performance.now() / 1000;
      const prev = state.connPublished.get(id);
      state.connPublished.set(id, { t: now, n: published });
      cell("published", fmtInt(published));
      cell("rate", prev && now > prev.t ? fmtRate(Math.max(0, published - prev.n) / (now - prev.t)) : "–");
      cell("consumers", fmtInt(pick(c, "consumers")));
      cell("unacked", fmtInt(pick(c, "unacked")));
      cell("blocked", c.blocked ? "blocked: " + c.blocked_reason : "");
    }
    for (const [id, tr] of rows) if (!seen.has(id)) tr.remove();
    for (const id of [...state.connPublished.keys()]) if (!seen.has(id)) state.connPublished.delete(id);
    setText("#connection-count", "(" + conns.length + ")");
    $("#connections-empty").hidden = conns.length > 0;
  }

  // ------------------------------------------------------------------ polling loop
  let timer = null;
  let running = null;

  async function poll() {
    const page = state.page;
    const skip = Promise.resolve(null);
    const [ov, queues, conns, bindings, exchanges, consumers] = await Promise.allSettled([
      api("/api/overview"), api("/api/queues"), api("/api/connections"),
      state.polls % 5 === 0 || page === "exchanges" || page === "queue" ? api("/api/bindings") : skip,
      page === "exchanges" ? api("/api/exchanges") : skip,
      page === "consumers" || page === "queue" ? api("/api/consumers") : skip,
    ]);
    state.polls++;
    const failed = [ov, queues, conns].find((r) => r.status === "rejected");
    if (ov.status === "fulfilled") renderOverview(ov.value);
    if (bindings.status === "fulfilled" && bindings.value !== null) renderBindings(bindings.value);
    if (exchanges.status === "fulfilled" && exchanges.value !== null) renderExchanges(exchanges.value);
    if (consumers.status === "fulfilled" && consumers.value !== null) renderConsumers(consumers.value);
    if (queues.status === "fulfilled") {
      computeDlqs(queues.value, state.bindings);
      renderQueues(queues.value);
    }
    if (conns.status === "fulfilled") renderConnections(conns.value);
    drawAll();
    if (!failed) {
      setStatus("ok", "live");
      if (!token()) $("#auth").hidden = !state.authNeeded;
      if (!state.whoamiDone) { state.whoamiDone = true; refreshWhoami(); }
    } else if (!state.authNeeded) {
      setStatus("error", failed.reason.message);
    }
    document.body.dataset.polls = String(state.polls);
  }

  function pollNow() {
    clearTimeout(timer);
    if (!running) {
      running = poll().catch((e) => showError(e.message)).finally(() => {
        running = null;
        timer = setTimeout(pollNow, POLL_MS);
      });
    }
    return running;
  }

  const peekTimer = setInterval(() => { if (state.inspecting !== null && !document.hidden) refreshPeek(); }, 3000);
  window.addEventListener("resize", drawAll);
  window.addEventListener("beforeunload", () => clearInterval(peekTimer));
  showPage();
})();
