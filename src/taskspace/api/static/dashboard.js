// taskspace dashboard: live updates (EventSource) and actions (fetch).
// No framework, no build step. Each page's live part has a server-rendered
// twin under /partials/..., re-fetched when an event concerns it; without an
// event stream the page polls instead.
"use strict";

(() => {
  const body = document.body;
  const base = body.dataset.base || "";
  const live = document.getElementById("live");
  const toastBox = document.getElementById("toast");
  const MAX_LINES = 2000;
  const MAX_FEED = 50;
  let streamOpen = false;

  const $ = (sel, root = document) => root.querySelector(sel);
  const api = (path) => base + path;

  function setLive(state, label) {
    if (!live) return;
    live.dataset.state = state;
    $(".live-label", live).textContent = label;
  }

  let toastTimer = null;
  function toast(message, bad = false) {
    if (!toastBox) return;
    toastBox.textContent = message;
    toastBox.className = bad ? "bad" : "";
    toastBox.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { toastBox.hidden = true; }, 4000);
  }

  // Run fn at most once per `ms`, after the first call of a burst.
  function throttle(fn, ms) {
    let timer = null;
    return () => {
      if (timer === null) timer = setTimeout(() => { timer = null; fn(); }, ms);
    };
  }

  async function refresh(section) {
    if (!section || !section.dataset.partial) return;
    try {
      const r = await fetch(section.dataset.partial, {
        credentials: "same-origin", headers: { Accept: "text/html" },
      });
      if (r.status === 401) {  // the token cookie is gone: sign in again, then come back
        const here = window.location.pathname + window.location.search;
        window.location.assign(`${base}/login?next=${encodeURIComponent(here)}`);
        return;
      }
      if (!r.ok) {
        setLive("bad", `refresh failed (${r.status})`);
        return;
      }
      const html = await r.text();
      const open = [...section.querySelectorAll("details[open]")].map(keyOf);
      section.innerHTML = html;
      for (const d of section.querySelectorAll("details")) {
        if (open.includes(keyOf(d))) d.open = true;
      }
      if (streamOpen) setLive("on", "live"); else setLive("off", "polling");
      section.dispatchEvent(new CustomEvent("refreshed"));
    } catch (err) {
      setLive("bad", "server unreachable");
    }
  }

  function keyOf(el) {
    const row = el.closest("[data-worker],[data-id]");
    return row ? (row.dataset.worker || row.dataset.id) : "";
  }

  // Follow the SSE stream at `path` from the id `after` (none: only new items);
  // onData gets each item's JSON. On an error it reconnects itself with backoff,
  // resuming after the last id seen (the server may restart, or lack the stream).
  function follow(path, onData, { after = null, indicator = true } = {}) {
    if (!("EventSource" in window)) return;
    let last = after === null || after === "" ? null : Number(after);
    let delay = 1000;
    const connect = () => {
      const sep = path.includes("?") ? "&" : "?";
      const es = new EventSource(api(last === null ? path : `${path}${sep}after=${last}`),
        { withCredentials: true });
      es.onopen = () => {
        delay = 1000;
        if (indicator) { streamOpen = true; setLive("on", "live"); }
      };
      es.onmessage = (msg) => {
        let doc;
        try { doc = JSON.parse(msg.data); } catch (err) { return; }
        if (typeof doc.id === "number") last = last === null ? doc.id : Math.max(last, doc.id);
        onData(doc);
      };
      es.onerror = () => {
        es.close();
        if (indicator) { streamOpen = false; setLive("wait", "reconnecting"); }
        setTimeout(connect, delay);
        delay = Math.min(delay * 2, 15000);
      };
    };
    connect();
  }

  async function post(url, payload) {
    const r = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(payload || {}),
    });
    let doc = null;
    try { doc = await r.json(); } catch (err) { doc = null; }
    if (!r.ok) {
      const message = doc && doc.error ? doc.error.message : `HTTP ${r.status}`;
      throw new Error(message);
    }
    return doc;
  }

  // -- rendering of streamed items (the same markup as the templates) --------

  const pad = (n) => String(n).padStart(2, "0");
  function clock(wall) {
    const d = new Date(wall * 1000);
    return `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}`;
  }
  function duration(s) {
    if (s === null || s === undefined) return "";
    if (s < 0.01) return `${(s * 1000).toFixed(1)} ms`;
    return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
  }
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }
  function taskLink(id, label) {
    const a = el("a", "", label);
    a.href = `${base}/tasks/${encodeURIComponent(id)}`;
    return a;
  }
  function dropPlaceholder(container) {
    const p = $("[data-placeholder]", container);
    if (p) p.remove();
  }

  function eventItem(e) {
    const li = el("li", "event");
    li.dataset.taskId = e.task_id;
    li.append(el("time", "", clock(e.time)), " ", el("span", `badge k-${e.kind}`, e.kind), " ",
      taskLink(e.task_id, e.name), " ");
    const bits = [e.queue];
    if (e.worker) bits.push(e.worker);
    if (e.duration !== null && e.duration !== undefined) bits.push(duration(e.duration));
    if (e.error) bits.push(e.error);
    li.append(el("span", "muted", bits.join(" · ")));
    return li;
  }

  function logLine(rec, hideTask) {
    const div = el("div", `logline lv-${String(rec.level || "").toLowerCase()}`);
    div.dataset.id = rec.id;
    const time = el("time", "", clock(rec.time));
    time.title = new Date(rec.time * 1000).toISOString();
    const who = el("span", "who");
    if (rec.task_id && !hideTask) who.append(taskLink(rec.task_id, rec.task || rec.task_id), " ");
    who.append(rec.worker || "");
    div.append(time, el("span", "lvl", rec.level), who, el("span", "msg", rec.message));
    if (rec.exc) div.append(el("pre", "exc", rec.exc));
    return div;
  }

  // -- log panes: initial records rendered by the server, then followed -------

  function followLogs(pane, { hideTask = false, paused = () => false } = {}) {
    const query = pane.dataset.follow || "";
    const seen = new Set([...pane.querySelectorAll(".logline")].map((d) => Number(d.dataset.id)));
    const held = [];
    const atBottom = () => pane.scrollHeight - pane.scrollTop - pane.clientHeight < 40;
    const show = (rec) => {
      const stick = atBottom();
      dropPlaceholder(pane);
      pane.append(logLine(rec, hideTask));
      while (pane.children.length > MAX_LINES) {
        seen.delete(Number(pane.firstElementChild.dataset.id));
        pane.firstElementChild.remove();
      }
      if (stick) pane.scrollTop = pane.scrollHeight;
    };
    const add = (rec) => {
      if (typeof rec.id !== "number" || seen.has(rec.id)) return;
      seen.add(rec.id);
      if (!paused()) { show(rec); return; }
      held.push(rec);
      if (held.length > MAX_LINES) seen.delete(held.shift().id);  // bounded while paused
    };
    pane.scrollTop = pane.scrollHeight;
    follow(`/api/logs/stream${query ? "?" + query : ""}`, add,
      { after: pane.dataset.after, indicator: body.dataset.page === "logs" });
    return { flush: () => { while (held.length) show(held.shift()); } };
  }

  // -- pages ----------------------------------------------------------------

  const pages = {
    queues() {
      const section = $("#queues");
      const feed = $("#feed");
      const soon = throttle(() => refresh(section), 1000);
      follow("/api/events/stream", (e) => {
        dropPlaceholder(feed);
        feed.prepend(eventItem(e));
        while (feed.children.length > MAX_FEED) feed.lastElementChild.remove();
        soon();
      }, { after: body.dataset.eventsAfter });
      let ticks = 0;
      setInterval(() => { ticks += 1; if (!streamOpen || ticks % 4 === 0) refresh(section); }, 2500);
    },

    workers() {
      const section = $("#workers");
      setLive("off", "polling");
      setInterval(() => refresh(section), 3000);
    },

    tasks() {
      const section = $("#tasks");
      const soon = throttle(() => refresh(section), 800);
      follow("/api/events/stream", (e) => {
        const table = $("table", section);
        const listed = [...section.querySelectorAll("tr[data-id]")].some((tr) => tr.dataset.id === e.task_id);
        if (listed || (table && table.dataset.lastPage === "yes")) soon();
      }, { after: body.dataset.eventsAfter });
      setInterval(() => { if (!streamOpen) refresh(section); }, 3000);
    },

    task() {
      const id = body.dataset.taskId;
      const section = $("#task");
      const soon = throttle(() => refresh(section), 300);
      follow("/api/events/stream", (e) => { if (e.task_id === id) soon(); },
        { after: body.dataset.eventsAfter });
      // Progress moves without events: poll while the task is not final.
      setInterval(() => {
        const head = $(".task-head", section);
        if (!streamOpen || (head && head.dataset.final !== "yes")) refresh(section);
      }, 2000);
      section.addEventListener("click", async (ev) => {
        const button = ev.target.closest("button[data-action]");
        if (!button) return;
        button.disabled = true;
        try {
          const doc = await post(button.dataset.url);
          toast(`${button.dataset.action}: task is ${doc && doc.state ? doc.state : "updated"}`);
        } catch (err) {
          toast(`${button.dataset.action} failed: ${err.message}`, true);
        }
        await refresh(section);
      });
      const pane = $("#logs");
      if (pane) followLogs(pane, { hideTask: true });
    },

    dead() {
      const section = $("#tasks");
      const button = $("#retry-selected");
      const count = $("#selected-count");
      const picked = () => [...section.querySelectorAll("input.pick:checked")].map((i) => i.value);
      const update = () => {
        const n = picked().length;
        button.disabled = n === 0;
        count.textContent = n ? `${n} selected` : "none selected";
      };
      section.addEventListener("change", (ev) => {
        if (ev.target.id === "select-all") {
          for (const box of section.querySelectorAll("input.pick")) box.checked = ev.target.checked;
        }
        update();
      });
      section.addEventListener("refreshed", update);
      button.addEventListener("click", async () => {
        const ids = picked();
        button.disabled = true;
        try {
          const doc = await post(button.dataset.url, { ids });
          const skipped = doc.skipped || [];
          toast(`retried ${(doc.retried || []).length}` + (skipped.length ? `, skipped ${skipped.length}` : ""));
        } catch (err) {
          toast(`retry failed: ${err.message}`, true);
        }
        await refresh(section);
      });
      // Refresh live, but never under a selection in progress.
      const soon = throttle(() => { if (!picked().length) refresh(section); }, 1000);
      follow("/api/events/stream", soon, { after: body.dataset.eventsAfter });
      setInterval(() => { if (!streamOpen) soon(); }, 3000);
    },

    logs() {
      const pane = $("#logs");
      const pause = $("#pause");
      const logs = followLogs(pane, { paused: () => pause.checked });
      pause.addEventListener("change", () => { if (!pause.checked) logs.flush(); });
    },

    usage() {
      const section = $("#usage");
      setLive("off", "polling");
      setInterval(() => refresh(section), 10000);
    },

    login() {
      const form = $("#login");
      const error = $("#login-error");
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        try {
          await post(api("/login"), { token: form.token.value });
          window.location.assign(body.dataset.next || `${base}/`);
        } catch (err) {
          error.textContent = err.message;
          error.hidden = false;
        }
      });
    },
  };

  const init = pages[body.dataset.page];
  if (init) init();
})();
