// reliable-msg dashboard: polls the JSON the service serves and redraws in place.
// No framework, no build step; DOM is built with textContent only (never innerHTML).
"use strict";

(function () {
  const body = document.body;
  const base = body.dataset.base || "/dashboard";
  const SVG = "http://www.w3.org/2000/svg";
  const STATUSES = ["pending", "sent", "done", "cancelled", "dead"];
  const FLOW = ["prepared", "sent", "acked", "cancelled"];
  const FAILURES = ["redelivered", "dead", "checkback_errors"];

  async function getJson(path) {
    const response = await fetch(base + path, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    if (response.status === 401) {
      window.location.assign(base + "/login?next=" + encodeURIComponent(window.location.pathname));
      return null;
    }
    if (!response.ok) {
      throw new Error(path + " answered " + response.status);
    }
    return response.json();
  }

  function when(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  function setText(id, text) {
    const el = document.getElementById(id);
    if (el) el.textContent = String(text);
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function badge(value) {
    return el("span", { class: "status status-" + value }, value);
  }

  function setMode(mode) {
    for (const id of ["mode-badge", "broker-mode"]) {
      const node = document.getElementById(id);
      if (node) {
        node.textContent = mode;
        node.className = "mode mode-" + mode;
      }
    }
  }

  function fillRows(tbodyId, rows, emptyText, columns) {
    const tbody = document.getElementById(tbodyId);
    if (!tbody) return;
    const fresh = rows.length
      ? rows
      : [[{ text: emptyText, attrs: { colspan: String(columns), class: "muted" } }]];
    tbody.replaceChildren(
      ...fresh.map((cells) => {
        const tr = el("tr");
        for (const cell of cells) {
          const td = el("td", cell.attrs || {});
          if (cell.node) td.appendChild(cell.node);
          else td.textContent = String(cell.text);
          tr.appendChild(td);
        }
        return tr;
      })
    );
  }

  function link(href, text, cls) {
    const a = el("a", { href: base + href }, text);
    if (cls) a.className = cls;
    return a;
  }

  function groupRows(data) {
    const counts = data.counts.groups;
    const depth = data.broker.fallback_depth || {};
    return data.groups.map((g) => {
      const row = counts[g] || {};
      const dead = row.dead || 0;
      const action = dead
        ? { node: link("/groups/" + encodeURIComponent(g) + "/requeue", "Requeue dead…", "button small") }
        : { text: "" };
      return [
        { node: link("/messages?group=" + encodeURIComponent(g), g) },
        { text: row.sent || 0, attrs: { class: "num" } },
        { text: row.done || 0, attrs: { class: "num" } },
        { text: dead, attrs: { class: "num" } },
        { text: g in depth ? depth[g] : "—", attrs: { class: "num" } },
        action,
      ];
    });
  }

  function topicRows(data) {
    return Object.keys(data.counts.topics)
      .sort()
      .map((topic) => {
        const row = data.counts.topics[topic];
        return [{ node: link("/messages?topic=" + encodeURIComponent(topic), topic) }].concat(
          STATUSES.map((s) => ({ text: row[s] || 0, attrs: { class: "num" } }))
        );
      });
  }

  function historyRows(data) {
    return (data.broker.history || []).map((h) => [
      { text: when(h.at) },
      { node: badge(h.mode) },
      { text: h.by || "" },
      { text: h.reason || "" },
    ]);
  }

  function niceMax(value) {
    if (value <= 0) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 5, 10]) {
      if (value <= step * power) return step * power;
    }
    return 10 * power;
  }

  function svgNode(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function drawChart(svgId, rates, series) {
    const svg = document.getElementById(svgId);
    if (!svg) return;
    const width = 640;
    const height = 180;
    const left = 48;
    const right = 10;
    const top = 10;
    const bottom = 24;
    svg.replaceChildren();
    if (rates.length < 2) {
      svg.appendChild(svgNode("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "collecting samples…"));
      return;
    }
    const t0 = rates[0].at;
    const t1 = rates[rates.length - 1].at;
    let peak = 0;
    for (const r of rates) for (const s of series) peak = Math.max(peak, r[s]);
    const ymax = niceMax(peak);
    const x = (t) => left + ((t - t0) / Math.max(t1 - t0, 1e-9)) * (width - left - right);
    const y = (v) => top + (1 - v / ymax) * (height - top - bottom);
    for (const fraction of [0, 0.5, 1]) {
      const value = ymax * fraction;
      svg.appendChild(svgNode("line", { class: "axis", x1: left, x2: width - right, y1: y(value), y2: y(value) }));
      const label = value >= 10 ? value.toFixed(0) : value.toFixed(1);
      svg.appendChild(svgNode("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end" }, label));
    }
    svg.appendChild(svgNode("text", { x: left, y: height - 6 }, when(t0).slice(11, 19)));
    svg.appendChild(svgNode("text", { x: width - right, y: height - 6, "text-anchor": "end" }, when(t1).slice(11, 19)));
    for (const s of series) {
      const points = rates.map((r) => x(r.at).toFixed(1) + "," + y(r[s]).toFixed(1)).join(" ");
      svg.appendChild(svgNode("polyline", { class: "s-" + s, points: points }));
    }
  }

  function renderOverview(data) {
    for (const s of STATUSES) setText("count-" + s, data.counts.messages[s] || 0);
    setText("counted-at", when(data.counts.counted_at));
    const broker = data.broker;
    setMode(broker.mode);
    setText("broker-connected", broker.connected ? "connected" : "disconnected");
    setText("broker-failures", broker.consecutive_failures);
    const sw = broker.switch;
    setText(
      "broker-switch",
      sw && sw.by ? sw.mode + " since " + when(sw.at) + " by " + sw.by + ": " + sw.reason : "never flipped"
    );
    setText("lag-checkback", (data.lag.checkback || 0).toFixed(1));
    setText("lag-redelivery", (data.lag.redelivery || 0).toFixed(1));
    fillRows("groups-body", groupRows(data), "no consumer group", 6);
    fillRows("topics-body", topicRows(data), "no messages yet", STATUSES.length + 1);
    fillRows("history-body", historyRows(data), "the switch never flipped", 4);
    drawChart("chart-flow", data.rates, FLOW);
    drawChart("chart-failures", data.rates, FAILURES);
  }

  function every(seconds, task) {
    let running = false;
    const tick = async () => {
      if (running) return;
      running = true;
      try {
        await task();
      } catch (error) {
        console.warn("dashboard refresh failed:", error);
      } finally {
        running = false;
      }
    };
    tick();
    return window.setInterval(tick, seconds * 1000);
  }

  function startOverview() {
    const seconds = Number(body.dataset.poll) || 5;
    every(seconds, async () => {
      const data = await getJson("/api/overview");
      if (data) renderOverview(data);
    });
  }

  // Reloads the page (without its notice) once what it shows leaves the status shown.
  function reloadOnMove(path, finals) {
    const shown = body.dataset.status;
    if (finals.includes(shown)) return;
    const timer = every(2, async () => {
      const data = await getJson(path);
      if (data && data.status !== shown) {
        window.clearInterval(timer);
        window.location.replace(window.location.pathname);
      }
    });
  }

  if (body.dataset.page === "overview") startOverview();
  if (body.dataset.page === "message") {
    reloadOnMove("/api/messages/" + encodeURIComponent(body.dataset.id), ["done", "cancelled"]);
  }
  if (body.dataset.page === "transaction") {
    reloadOnMove("/api/tcc/" + encodeURIComponent(body.dataset.gid), ["confirmed", "cancelled"]);
  }
})();
