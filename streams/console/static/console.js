// Trackside console: live updates (server-sent events) and charts. Every value from the store or
// the topics is untrusted: it reaches the page as text (textContent), never as markup.
"use strict";
const Trackside = (() => {
  const el = (tag, text, cls) => {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  };
  const usd = (v) => (v === null || v === undefined ? "-" : "$" + Number(v).toFixed(4));
  const utc = (ms) => new Date(ms).toISOString().replace("T", " ").slice(0, 19);
  const elapsed = (ms) => {
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    return s < 120 ? s + " s" : Math.round(s / 60) + " min";
  };
  const params = new URLSearchParams(location.search);

  async function stop(runId) {
    const reason = prompt("Stop run " + runId + " at its next step. Why?");
    if (!reason) return;
    const headers = {"Content-Type": "application/json"};
    const token = sessionStorage.getItem("trackside-token");
    if (token) headers["Authorization"] = "Bearer " + token;
    let response = await fetch("/api/v1/runs/" + encodeURIComponent(runId) + "/stop",
                               {method: "POST", headers, body: JSON.stringify({reason})});
    if (response.status === 401) {
      const given = prompt("The console needs its token (TRACKSIDE_CONSOLE_TOKEN):");
      if (!given) return;
      sessionStorage.setItem("trackside-token", given);
      headers["Authorization"] = "Bearer " + given;
      response = await fetch("/api/v1/runs/" + encodeURIComponent(runId) + "/stop",
                             {method: "POST", headers, body: JSON.stringify({reason})});
    }
    const body = await response.json();
    const note = document.getElementById("stop-note") || document.body.appendChild(el("p", "", "note"));
    note.id = "stop-note";
    note.textContent = response.ok ? "stop_run " + body.control_id + " sent for " + runId : "not sent: " + body.error;
  }

  function liveRuns() {
    const table = document.getElementById("live-runs");
    const body = table.querySelector("tbody");
    const budgets = JSON.parse(table.dataset.budgets || "{}");
    const status = document.getElementById("live-status");
    body.addEventListener("click", (event) => {
      const button = event.target.closest("button.stop");
      if (button) stop(button.dataset.run);
    });
    const render = (runs) => {
      body.replaceChildren(...runs.map((run) => {
        const row = el("tr");
        row.dataset.run = run.run_id;
        const link = el("a", run.run_id.slice(0, 12));
        link.href = "/runs/" + encodeURIComponent(run.run_id);
        const first = el("td"); first.appendChild(link); row.appendChild(first);
        const budget = budgets[run.agent_id];
        const spent = usd(run.cost_usd) + (budget ? " / " + usd(budget) : "");
        for (const [text, cls] of [[run.agent_id], [run.agent_version], [utc(run.started_at)], [elapsed(run.started_at)],
                                   [run.steps, "num"], [spent, "num"], [run.last_tool],
                                   [run.loop_suspected ? "suspected" : "", run.loop_suspected ? "warn" : ""]]) {
          row.appendChild(el("td", text, cls));
        }
        const button = el("button", "Stop", "stop");
        button.dataset.run = run.run_id;
        const last = el("td"); last.appendChild(button); row.appendChild(last);
        return row;
      }));
      document.getElementById("live-count").textContent = runs.length + " open";
    };
    const agent = table.dataset.agent;
    const source = new EventSource("/api/v1/runs/live/stream" + (agent ? "?agent_id=" + encodeURIComponent(agent) : ""));
    source.onopen = () => { status.textContent = "live"; status.className = "pill on"; };
    source.onerror = () => { status.textContent = "reconnecting"; status.className = "pill"; };
    source.onmessage = (message) => render(JSON.parse(message.data));
  }

  function liveAlerts() {
    const table = document.getElementById("alerts");
    const body = table.querySelector("tbody");
    const want = table.dataset;
    const source = new EventSource("/api/v1/alerts/stream");
    source.onmessage = (message) => {
      const a = JSON.parse(message.data);
      if ((want.kind && a.kind !== want.kind) || (want.agent && a.agent_id !== want.agent) ||
          (want.severity && a.severity !== want.severity) || (want.status && a.status !== want.status)) return;
      const none = body.querySelector("tr.none");
      if (none) none.remove();
      const row = el("tr", undefined, "new");
      row.dataset.alert = a.alert_id;
      row.appendChild(el("td", utc(a.ts)));
      row.appendChild(el("td", a.kind));
      const sev = el("td"); sev.appendChild(el("span", a.severity, "badge " + a.severity)); row.appendChild(sev);
      row.appendChild(el("td", a.status));
      row.appendChild(el("td", a.agent_id + " " + (a.agent_version || "")));
      const run = el("td");
      if (a.run_id) { const link = el("a", a.run_id.slice(0, 12)); link.href = "/runs/" + encodeURIComponent(a.run_id); run.appendChild(link); }
      row.appendChild(run);
      row.appendChild(el("td", a.summary));
      const details = el("details"); details.appendChild(el("summary", "numbers"));
      const list = el("dl", undefined, "evidence");
      for (const [key, value] of Object.entries(a.evidence || {})) {
        list.appendChild(el("dt", key)); list.appendChild(el("dd", typeof value === "object" ? JSON.stringify(value) : value));
      }
      details.appendChild(list);
      const ev = el("td"); ev.appendChild(details); row.appendChild(ev);
      body.prepend(row);
    };
  }

  function canaryChart() {
    const box = document.getElementById("canary-chart");
    const t = JSON.parse(box.dataset.trajectory);
    if (!t.runs.length) { box.textContent = "No canary run stored yet."; return; }
    const colors = ["#d1495b", "#edae49", "#00798c", "#30638e", "#6a4c93", "#8d6a9f", "#2e933c", "#a0522d"];
    const floor = 1e-6;
    const series = [{label: "canary runs"}];
    const data = [t.runs];
    t.metrics.forEach((metric, i) => {
      series.push({label: metric, stroke: colors[i % colors.length], width: 1.5, spanGaps: false});
      data.push(t.p_values[metric].map((p) => (p === null ? null : Math.max(p, floor))));
    });
    series.push({label: "threshold", stroke: "#000", dash: [6, 4], width: 1});
    data.push(t.runs.map(() => t.threshold));
    const opts = {
      width: Math.min(box.clientWidth || 900, 1000), height: 340, series,
      scales: {x: {time: false}, y: {distr: 3, range: [floor, 1]}},
      axes: [{label: "canary runs"}, {label: "always-valid p", size: 60,
              values: (u, ticks) => ticks.map((v) => (v === null ? "" : v.toExponential(0)))}],
      hooks: {draw: [(u) => {
        if (!t.decided_at_run) return;
        const x = u.valToPos(t.decided_at_run, "x", true);
        const ctx = u.ctx; ctx.save(); ctx.strokeStyle = "#d1495b"; ctx.setLineDash([2, 3]);
        ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke(); ctx.restore();
      }]},
    };
    new uPlot(opts, data, box);
  }

  function failureTrends() {
    // one small uPlot per mode: its failed runs per bucket, on the time axis every mode shares
    for (const box of document.querySelectorAll("div.trend[data-trend]")) {
      const t = JSON.parse(box.dataset.trend);
      const top = Math.max(1, ...t.runs);
      const opts = {
        width: 160, height: 34, legend: {show: false}, cursor: {show: false}, select: {show: false},
        axes: [{show: false}, {show: false}],
        scales: {x: {time: true}, y: {range: [-0.06 * top, 1.06 * top]}},  // a little below 0: the zero line shows
        series: [{}, {stroke: "#d1495b", fill: "rgba(209, 73, 91, 0.15)", width: 1.5, points: {show: false}}],
      };
      new uPlot(opts, [t.bucket_ms.map((ms) => ms / 1000), t.runs], box);
      box.dataset.drawn = "1";
    }
  }

  function pipeline() {
    const box = document.getElementById("pipeline");
    const refresh = async () => {
      const response = await fetch("/api/v1/pipeline");
      const f = await response.json();
      if (f.error) { box.replaceChildren(el("p", f.error, "empty")); return; }
      const totals = el("table", undefined, "grid"); totals.id = "pipeline-totals";
      const tbody = el("tbody");
      for (const [key, value] of Object.entries(f.totals)) {
        const row = el("tr"); row.appendChild(el("th", key.replaceAll("_", " ")));
        const cell = el("td", Number(value).toPrecision(4), "num"); cell.dataset.key = key; row.appendChild(cell);
        tbody.appendChild(row);
      }
      totals.appendChild(tbody);
      const stages = el("table", undefined, "grid"); stages.id = "pipeline-stages";
      const head = el("tr");
      for (const name of ["stage", "lag", "age of the last message"]) head.appendChild(el("th", name));
      const thead = el("thead"); thead.appendChild(head); stages.appendChild(thead);
      const sbody = el("tbody");
      for (const [stage, figures] of Object.entries(f.stages)) {
        const row = el("tr"); row.appendChild(el("td", stage));
        row.appendChild(el("td", (figures.lag_seconds ?? "-") + " s", "num"));
        row.appendChild(el("td", (figures.last_message_age_seconds ?? "-") + " s", "num"));
        sbody.appendChild(row);
      }
      stages.appendChild(sbody);
      box.replaceChildren(totals, el("h2", "Stages"), stages);
      box.dataset.refreshed = String(Date.now());
    };
    setInterval(refresh, 2000);
  }

  return {liveRuns, liveAlerts, canaryChart, failureTrends, pipeline, stop, params};
})();
