// Conveyor dashboard: plain JS, no build step and no external assets.
//
// Polls the broker's management API (/api/*) once a second, draws the message-rate chart
// on a <canvas>, and keeps the queue and connection tables current. If the broker wants a
// token, the header shows a token field; the token is kept in sessionStorage (this tab
// only) and sent as "Authorization: Bearer <token>".
"use strict";

(function () {
  const POLL_MS = 1000;
  const HISTORY = 120;            // chart samples kept (2 minutes at 1/s)
  const TOKEN_KEY = "conveyor.token";

  const $ = (sel) => document.querySelector(sel);
  const state = {
    samples: [],                  // {t, publish, deliver}
    polls: 0,
    inspecting: null,             // queue name shown in the inspect panel
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

  let errorTimer = null;
  function showError(msg) {
    const box = $("#error");
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
    pollNow();
  });
  $("#token-clear").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("#token").placeholder = "cvy1.…";
    pollNow();
  });
  if (token()) {
    $("#auth").hidden = false;
    $("#token").placeholder = "token set";
  }

  // ------------------------------------------------------------------ overview + chart
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
    setText("#ov-connections", fmtInt(pick(ov, "connections")));
    setText("#ov-consumers", fmtInt(pick(ov, "consumers")));
    setText("#ov-memory", fmtBytes(pick(ov, "memory.rss")));
    setText("#ov-disk", fmtBytes(pick(ov, "disk.free")));

    state.samples.push({ t: Date.now(), publish: num(pick(rates, "publish")),
                         deliver: num(pick(rates, "deliver")) });
    if (state.samples.length > HISTORY) state.samples.shift();
    drawChart();
  }

  function niceMax(v) {
    if (v <= 4) return 4;   // an idle chart still has a readable 0..4 scale
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function drawChart() {
    const canvas = $("#rate-chart");
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
    const samples = state.samples;
    let max = 0;
    for (const s of samples) max = Math.max(max, s.publish, s.deliver);
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
    ctx.fillText("-" + HISTORY + "s", left, h - 6);
    ctx.textAlign = "right";
    ctx.fillText("now", left + pw, h - 6);

    const x = (i) => left + pw - ((samples.length - 1 - i) * pw) / (HISTORY - 1);
    const y = (v) => top + ph - (v / ymax) * ph;
    for (const [key, name, dflt] of [["deliver", "--deliver", "#1e9e63"], ["publish", "--publish", "#2f6fde"]]) {
      if (samples.length < 1) break;
      ctx.strokeStyle = colour(name, dflt);
      ctx.lineWidth = 2;
      ctx.beginPath();
      samples.forEach((s, i) => (i ? ctx.lineTo(x(i), y(s[key])) : ctx.moveTo(x(i), y(s[key]))));
      ctx.stroke();
    }
    // For tests and scripts: how much the chart holds.
    canvas.dataset.samples = String(samples.length);
    canvas.dataset.maxRate = String(max);
  }

  // ------------------------------------------------------------------ queues
  function queueRow(name) {
    const tr = el("tr", { dataset: { queue: name } },
      el("td", { class: "name" }, name),
      el("td", { class: "num ready" }), el("td", { class: "num unacked" }),
      el("td", { class: "num consumers" }), el("td", { class: "num publish-rate" }),
      el("td", { class: "num deliver-rate" }), el("td", { class: "dlx" }),
      el("td", { class: "actions" },
        el("button", { type: "button", class: "inspect", onclick: () => openInspect(name) }, "Inspect")));
    return tr;
  }

  function renderQueues(list) {
    const queues = Array.isArray(list) ? list : [];
    const tbody = $("#queue-table tbody");
    const rows = new Map([...tbody.rows].map((r) => [r.dataset.queue, r]));
    const seen = new Set();
    for (const q of queues) {
      const name = q.name;
      seen.add(name);
      let tr = rows.get(name);
      if (!tr) { tr = queueRow(name); }
      tbody.append(tr);  // keeps the API's order
      const rates = pick(q, "rates") || {};
      const args = pick(q, "arguments") || {};
      const cell = (cls, text) => { const c = tr.querySelector("." + cls); if (c.textContent !== text) c.textContent = text; };
      cell("ready", fmtInt(pick(q, "ready")));
      cell("unacked", fmtInt(pick(q, "unacked")));
      cell("consumers", fmtInt(pick(q, "consumers")));
      cell("publish-rate", fmtRate(pick(rates, "publish")));
      cell("deliver-rate", fmtRate(pick(rates, "deliver")));
      const dlx = pick(args, "dead_letter_exchange");
      cell("dlx", dlx === undefined ? "" : (dlx || "(default)") + (args.dead_letter_routing_key ? " → " + args.dead_letter_routing_key : ""));
      tr.classList.toggle("dlq", state.dlqs.has(name));
      tr.classList.toggle("selected", state.inspecting === name);
    }
    for (const [name, tr] of rows) if (!seen.has(name)) tr.remove();
    setText("#queue-count", "(" + queues.length + ")");
    $("#queues-empty").hidden = queues.length > 0;
    if (state.inspecting !== null && !seen.has(state.inspecting)) closeInspect();
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
      const ex = pick(b, "exchange");
      const dest = pick(b, "queue");
      if (dlxs.has(ex) && dest !== undefined) out.add(dest);
    }
    state.dlqs = out;
  }

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

  async function refreshPeek() {
    const name = state.inspecting;
    if (name === null) return;
    const count = Math.max(1, Math.min(1000, parseInt($("#peek-count").value, 10) || 20));
    let data;
    try {
      data = await api("/api/queues/" + enc(name) + "/peek?count=" + count);
    } catch (e) {
      showError("peek " + name + ": " + e.message);
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
        el("td", { class: "death-reason" }, d.reason ?? ""),
        el("td", { class: "death-queue" }, d.queue ?? ""),
        el("td", { class: "num death-count" }, d.count ?? ""));
    }));
    $("#peek-empty").hidden = msgs.length > 0;
    $("#peek-table").dataset.loaded = String(msgs.length);
  }

  function openInspect(name) {
    state.inspecting = name;
    setText("#inspect-queue", name);
    setText("#inspect-result", "");
    $("#inspect").hidden = false;
    $("#peek-table tbody").replaceChildren();
    delete $("#peek-table").dataset.loaded;
    for (const tr of $("#queue-table tbody").rows) tr.classList.toggle("selected", tr.dataset.queue === name);
    refreshPeek();
  }

  function closeInspect() {
    state.inspecting = null;
    $("#inspect").hidden = true;
    for (const tr of $("#queue-table tbody").rows) tr.classList.remove("selected");
  }

  $("#peek-refresh").addEventListener("click", refreshPeek);
  $("#inspect-close").addEventListener("click", closeInspect);
  $("#redrive").addEventListener("click", async () => {
    const name = state.inspecting;
    if (name === null) return;
    const to = $("#redrive-to").value.trim();
    const btn = $("#redrive");
    btn.disabled = true;
    try {
      const res = await api("/api/queues/" + enc(name) + "/redrive" + (to ? "?to=" + enc(to) : ""), { method: "POST" });
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
          el("td", { class: "id" }, id), el("td", { class: "name" }), el("td", { class: "peer" }),
          el("td", { class: "user" }),
          el("td", { class: "num published" }), el("td", { class: "num rate" }),
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
      const blocked = pick(c, "blocked");
      cell("blocked", blocked ? String(blocked) : "");
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
    const [ov, queues, conns, bindings] = await Promise.allSettled([
      api("/api/overview"), api("/api/queues"), api("/api/connections"),
      state.polls % 5 === 0 ? api("/api/bindings") : Promise.resolve(null),
    ]);
    state.polls++;
    const failed = [ov, queues, conns].find((r) => r.status === "rejected");
    if (ov.status === "fulfilled") renderOverview(ov.value);
    if (queues.status === "fulfilled") {
      const qs = renderQueues(queues.value);
      if (bindings.status === "fulfilled" && bindings.value !== null) computeDlqs(qs, bindings.value);
    }
    if (conns.status === "fulfilled") renderConnections(conns.value);
    if (!failed) {
      setStatus("ok", "live");
      if (!token()) $("#auth").hidden = !state.authNeeded;
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
  window.addEventListener("resize", drawChart);
  window.addEventListener("beforeunload", () => clearInterval(peekTimer));
  pollNow();
})();
