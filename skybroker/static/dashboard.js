// The skybroker dashboard: pages over the broker's REST API (no build step, no CDN).
// Routes (location.hash): #/ deployments, #/d/NAME one deployment, #/plan the plan page.
// Everything shown comes from /v1 routes; text goes in with textContent, never as HTML.
"use strict";

const TOKEN_KEY = "skybroker.token";
const DETAIL_EVERY_MS = 5000;
const METRICS_EVERY_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fdf", "#e0712c", "#1f9d55", "#9b51e0", "#d64545", "#1aa3b8", "#8a6d3b"];

let timers = [];
let charts = {};

// ---------------------------------------------------------------- DOM helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function card(title, ...body) {
  return h("section", { class: "card" }, title ? h("h2", {}, title) : null, ...body);
}

function table(headers, rows, numeric = []) {
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((t, i) => h("th", { class: numeric.includes(i) ? "num" : null }, t)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c, i) => h("td", { class: numeric.includes(i) ? "num" : null }, c))))));
}

function statItems(pairs) {
  return pairs.map(([v, t]) => h("div", { class: "stat" }, h("b", {}, v), h("span", {}, t)));
}

function badge(text) {
  return h("span", { class: `badge ${text}` }, text);
}

const money = (x) => (typeof x === "number" ? `$${x.toFixed(2)}/h` : "-");
const ms = (x) => (typeof x === "number" ? `${(x * 1000).toFixed(x < 0.1 ? 1 : 0)} ms` : "-");

function age(t) {
  const d = Math.max(0, Date.now() / 1000 - t);
  if (d < 90) return `${Math.round(d)}s`;
  if (d < 5400) return `${Math.round(d / 60)}m`;
  if (d < 172800) return `${Math.round(d / 3600)}h`;
  return `${Math.round(d / 86400)}d`;
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

// ---------------------------------------------------------------- the API, with its token

class Unauthorized extends Error {}

function askToken(message) {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  document.getElementById("token-error").textContent = message || "";
  if (!dialog.open) dialog.showModal();
  input.focus();
  return new Promise((resolve) => {
    document.getElementById("token-form").onsubmit = (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      input.value = "";
      dialog.close();
      resolve();
    };
  });
}

let tokenAsked = null; // one prompt however many requests wait for it

async function api(path, options = {}, retry = true) {
  const headers = { ...(options.headers || {}) };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const r = await fetch(path, { ...options, headers });
  if (r.status === 401 && retry) {
    if (!tokenAsked) {
      const why = token ? "That token was refused; try again." : "";
      tokenAsked = askToken(why).finally(() => { tokenAsked = null; });
    }
    await tokenAsked;
    return api(path, options, retry);
  }
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) {
    const err = (body && body.error) || {};
    const lines = [err.message || `HTTP ${r.status}`];
    for (const e of err.errors || []) if (e.message !== err.message) lines.push(`${e.field || ""}: ${e.message}`);
    throw new Error(lines.join("\n"));
  }
  return body;
}

// ---------------------------------------------------------------- router

function clearTimers() {
  timers.forEach(clearInterval);
  timers = [];
  Object.values(charts).forEach((c) => c.plot && c.plot.destroy());
  charts = {};
}

function every(ms, fn) {
  fn();
  timers.push(setInterval(fn, ms));
}

function route() {
  clearTimers();
  const hash = location.hash || "#/";
  const main = document.getElementById("main");
  main.replaceChildren();
  let page = "deployments";
  if (hash.startsWith("#/d/")) deploymentPage(main, decodeURIComponent(hash.slice(4)));
  else if (hash.startsWith("#/plan")) { page = "plan"; planPage(main); }
  else deploymentsPage(main);
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === page));
}

function failed(where, e) {
  where.replaceChildren(h("p", { class: "error" }, e.message));
}

// ---------------------------------------------------------------- deployments

function deploymentsPage(main) {
  const body = h("div", {}, h("p", { class: "empty" }, "loading ..."));
  const stats = h("div", { class: "stats" });
  main.append(h("h1", {}, "Deployments"), h("div", { class: "sub" }, "every deployment this broker manages"), stats, card(null, body));
  every(DETAIL_EVERY_MS, async () => {
    try {
      const { deployments } = await api("/v1/deployments");
      const sum = (f) => deployments.reduce((n, d) => n + (d[f] || 0), 0);
      stats.replaceChildren(...statItems([
        [String(deployments.length), "deployments"], [`${sum("ready_replicas")}/${sum("desired_replicas")}`, "replicas ready"],
        [money(sum("cost_per_hour")), "now"], [money(sum("planned_cost_per_hour")), "planned"],
      ]));
      if (!deployments.length) {
        body.replaceChildren(h("p", { class: "empty" }, "No deployments. Launch one with ",
          h("code", {}, "skybroker launch SPEC"), ", or plan one on the ", h("a", { href: "#/plan" }, "plan page"), "."));
        return;
      }
      body.replaceChildren(table(
        ["name", "status", "replicas", "$/h now", "$/h planned", "model", "endpoint", "age"],
        deployments.map((d) => [
          h("a", { href: `#/d/${encodeURIComponent(d.name)}` }, d.name), badge(d.status),
          `${d.ready_replicas}/${d.desired_replicas}`, money(d.cost_per_hour), money(d.planned_cost_per_hour),
          d.model || "-", h("code", {}, d.endpoint || "-"), age(d.created_at),
        ]), [2, 3, 4]));
    } catch (e) { failed(body, e); }
  });
}

// ---------------------------------------------------------------- the map

function mapView(map, height = 300) {
  const located = (p) => p.lat !== null && p.lon !== null;
  const xy = (p) => [p.lon + 180, 90 - p.lat];
  const users = map.users.filter(located);
  const sites = map.sites.filter(located);
  const pts = [...users, ...sites].map(xy);
  // Fit the view to the points (the whole world when there are none), 2.4:1 like the card,
  // with room for the labels; sizes are in screen pixels of a ~560 px wide map (px units).
  let [x0, y0, w] = [0, 0, 360];
  if (pts.length) {
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const lo = [Math.min(...xs), Math.min(...ys)], hi = [Math.max(...xs), Math.max(...ys)];
    w = Math.min(360, Math.max(60, (hi[0] - lo[0] + 40) * 1.35, (hi[1] - lo[1] + 10) * 1.5 * 2.4));
    const cx = (lo[0] + hi[0]) / 2 + w * 0.08, cy = (lo[1] + hi[1]) / 2;
    x0 = Math.min(Math.max(cx - w / 2, 0), 360 - w);
    y0 = Math.min(Math.max(cy - w / 4.8, 0), 150 - w / 2.4);
  }
  const x1 = x0 + w, y1 = y0 + Math.min(150, w / 2.4);
  const k = w / 560;
  const svg = s("svg", { viewBox: `${x0} ${y0} ${x1 - x0} ${y1 - y0}`, role: "img", "aria-label": "map of users and serving regions" });
  svg.append(s("image", { href: "/dashboard/static/world-110m.svg", x: 0, y: 0, width: 360, height: 150 }));
  const byName = Object.fromEntries(map.users.map((u) => [u.name, u]));
  const byId = Object.fromEntries(map.sites.map((t) => [t.id, t]));
  const maxRate = Math.max(1e-9, ...map.flows.map((f) => f.rate));
  for (const f of map.flows) {
    const u = byName[f.user], t = byId[f.site];
    if (!u || !t || !located(u) || !located(t)) continue;
    const [ax, ay] = xy(u), [bx, by] = xy(t);
    const mx = (ax + bx) / 2, my = (ay + by) / 2 - Math.hypot(bx - ax, by - ay) * 0.2 - 2 * k;
    svg.append(s("path", { class: "flow", d: `M${ax} ${ay} Q${mx} ${my} ${bx} ${by}`,
      "stroke-width": (1.5 + 4 * f.rate / maxRate) * k }));
    const label = f.rtt_ms === null ? "" : `${f.rtt_ms.toFixed(0)} ms`;
    const short = Math.hypot(bx - ax, by - ay) < 60 * k; // beside a short flow, not on it
    svg.append(s("text", { class: "rtt", x: (ax + 2 * mx + bx) / 4 - (short ? 10 * k : 0), y: (ay + 2 * my + by) / 4 - 4 * k,
      "font-size": 12 * k, "stroke-width": 3 * k, "text-anchor": short ? "end" : "middle" }, label));
  }
  for (const t of sites) {
    const [x, y] = xy(t), r = (5 + Math.min(t.replicas, 8) * 0.6) * k;
    svg.append(s("rect", { class: "site", x: x - r, y: y - r, width: 2 * r, height: 2 * r, rx: 2 * k, "stroke-width": 1.5 * k }));
    svg.append(s("text", { x: x + r + 3 * k, y: y - r - 3 * k, "font-size": 12 * k, "stroke-width": 3 * k },
      `${t.id} (${t.city || "?"}) x${t.replicas}`));
  }
  for (const u of users) {
    const [x, y] = xy(u);
    svg.append(s("circle", { class: "user", cx: x, cy: y, r: (4 + 6 * u.share) * k, "stroke-width": 1.5 * k }));
    svg.append(s("text", { x: x, y: y + 22 * k, "font-size": 12 * k, "stroke-width": 3 * k, "text-anchor": "middle" },
      `${u.name} ${u.rate.toFixed(2)} req/s`));
  }
  svg.style.maxHeight = `${height}px`;
  const off = [...map.users.filter((u) => !located(u)).map((u) => `users "${u.name}" (${u.rate} req/s, anywhere)`),
    ...map.sites.filter((t) => !located(t)).map((t) => `${t.id}${t.city ? ` (${t.city})` : ""} x${t.replicas}`)];
  return h("div", { class: "map" }, svg,
    h("div", { class: "legend" },
      h("span", {}, h("span", { class: "dot user" }), "users (req/s)"),
      h("span", {}, h("span", { class: "dot site" }), "serving region (replicas)"),
      h("span", {}, "lines: flows, labelled with their estimated RTT",
        map.max_rtt_ms ? ` (SLO <= ${map.max_rtt_ms} ms)` : ""),
      off.length ? h("span", {}, `not on the map: ${off.join("; ")}`) : null));
}

function flowsTable(map) {
  return table(["users", "served from", "req/s", "RTT"],
    map.flows.map((f) => [f.user, f.site, f.rate.toFixed(2), f.rtt_ms === null ? "-" : `${f.rtt_ms.toFixed(1)} ms`]), [2, 3]);
}

// ---------------------------------------------------------------- plan parts

function placementsTable(plan) {
  return table(["region", "instance", "GPUs", "replicas", "$/h", "req/s each", "TTFT", "TPOT", "serves", "perf"],
    (plan.placements || []).map((p) => [
      `${p.cloud}/${p.region}`, h("span", {}, p.instance_type, p.spot ? " (spot)" : ""),
      p.gpu_count ? `${p.gpu_count}x ${p.gpu}${p.tensor_parallel > 1 ? ` TP${p.tensor_parallel}` : ""}` : p.gpu,
      p.replicas, money(p.cost_per_hour), p.capacity_rps.toFixed(2), ms(p.ttft_s), ms(p.tpot_s),
      Object.entries(p.serves).map(([u, r]) => `${u} ${r.toFixed(2)}`).join(", "), p.perf_source,
    ]), [3, 4, 5, 6, 7]);
}

function baselinesView(plan) {
  const rows = [["this plan", plan.cost_per_hour, null]];
  for (const [name, cost] of Object.entries(plan.baselines || {})) {
    if (typeof cost === "number") rows.push([name.replaceAll("_", " "), cost, (plan.baseline_notes || {})[name]]);
  }
  const top = Math.max(1e-9, ...rows.map((r) => r[1]));
  const grid = h("div", { class: "bars" });
  rows.forEach(([name, cost, note], i) => {
    const saves = i && cost > 0 ? Math.round(100 * (1 - plan.cost_per_hour / cost)) : null;
    const versus = saves === null ? null : saves >= 0 ? `  plan saves ${saves}%` : `  plan costs ${-saves}% more`;
    grid.append(h("span", {}, name),
      h("div", { title: note || "" }, h("div", { class: i ? "bar" : "bar plan", "data-w": cost / top })),
      h("span", { class: "mono" }, money(cost), versus ? h("span", { class: saves >= 0 ? "save" : "more" }, versus) : null));
  });
  grid.querySelectorAll(".bar").forEach((b) => { b.style.width = `${Math.max(1, 100 * Number(b.dataset.w))}%`; });
  const notes = Object.entries(plan.baseline_notes || {}).map(([k, v]) => h("div", { class: "muted" }, `${k}: ${v}`));
  return h("div", {}, grid, notes.length ? h("div", { class: "notes" }, ...notes) : null);
}

// ---------------------------------------------------------------- one deployment

function deploymentPage(main, name) {
  const head = h("div", {});
  const stats = h("div", { class: "stats" });
  const mapBox = h("div", {}, h("p", { class: "empty" }, "loading ..."));
  const flowsBox = h("div", {});
  const placements = h("div", {});
  const baselines = h("div", {});
  const replicas = h("div", {});
  const events = h("div", { class: "events" });
  const chartBox = h("div", { class: "charts" });
  main.append(head, stats,
    h("div", { class: "split" }, card("Map", mapBox), h("div", {}, card("Flows", flowsBox), card("Cost against the baselines", baselines))),
    card("Live", h("div", { class: "sub", id: "live-note" }, "sampled every few seconds"), chartBox),
    card("Replicas", replicas), card("Placements", placements), card("Events", events));
  let planShown = null;
  every(DETAIL_EVERY_MS, async () => {
    try {
      const d = await api(`/v1/deployments/${encodeURIComponent(name)}?events=50`);
      head.replaceChildren(h("h1", {}, d.name, " ", badge(d.status)),
        h("div", { class: "sub" }, `${d.model || "-"} · ${d.infra} · `, h("code", {}, d.endpoint || "no endpoint yet"),
          d.message ? ` · ${d.message}` : ""));
      stats.replaceChildren(...statItems([
        [`${d.ready_replicas}/${d.desired_replicas}`, "replicas ready"], [money(d.cost_per_hour), "now"],
        [money(d.planned_cost_per_hour), "planned"], [age(d.created_at), "age"], [String(d.failures), "failures in a row"],
      ]));
      const planKey = JSON.stringify([d.map, d.plan]); // a failover re-plans
      if (d.map && planKey !== planShown) {
        mapBox.replaceChildren(mapView(d.map));
        flowsBox.replaceChildren(flowsTable(d.map));
        placements.replaceChildren(placementsTable(d.plan));
        baselines.replaceChildren(baselinesView(d.plan));
        planShown = planKey;
      }
      replicas.replaceChildren(d.replicas.length ? table(["replica", "status", "health", "where", "instance", "$/h", "url", "message"],
        d.replicas.map((r) => [r.name, badge(r.status), h("span", { class: `badge ${r.healthy ? "ok" : "bad"}` }, r.healthy ? "healthy" : "not serving"),
          `${r.cloud}/${r.region}`, r.instance_type, money(r.price_per_hour), h("code", {}, r.url || "-"), r.message]), [5])
        : h("p", { class: "empty" }, "no replicas"));
      events.replaceChildren(d.events.length ? table(["time", "kind", "replica", "message"],
        d.events.slice().reverse().map((e) => [clock(e.time), e.kind, e.replica || "", e.message]))
        : h("p", { class: "empty" }, "no events"));
    } catch (e) { failed(head, e); }
  });
  every(METRICS_EVERY_MS, async () => {
    try {
      const m = await api(`/v1/deployments/${encodeURIComponent(name)}/metrics`);
      document.getElementById("live-note").textContent =
        `request rate at the router and latency percentiles over the last ${m.window_s} s; KV cache and queue per replica; ${m.points.length} samples`;
      drawCharts(chartBox, m);
    } catch (e) { failed(chartBox, e); }
  });
}

// ---------------------------------------------------------------- live charts (uPlot)

function chartSpecs(m) {
  const pts = m.points;
  const names = [...new Set(pts.flatMap((p) => Object.keys(p.replicas)))].sort();
  const slo = m.slo, pct = slo.percentile ? `p${slo.percentile}` : "SLO";
  const line = (v) => pts.map(() => (typeof v === "number" ? v : null));
  const lat = (key, q) => pts.map((p) => (p[key][q] === null ? null : p[key][q] * 1000));
  const per = (field, scale = 1) => names.map((n) => pts.map((p) => {
    const v = (p.replicas[n] || {})[field];
    return typeof v === "number" ? v * scale : null;
  }));
  return {
    rate: { title: "Request rate (req/s)", series: [["req/s", pts.map((p) => p.rate)]] },
    ttft: { title: "TTFT (ms, log scale)", latency: true, series: [["p50", lat("ttft_s", "p50")], ["p99", lat("ttft_s", "p99")],
      [`SLO ${pct} <= ${slo.ttft_ms} ms`, line(slo.ttft_ms), true]] },
    tpot: { title: "TPOT (ms, log scale)", latency: true, series: [["p50", lat("tpot_s", "p50")], ["p99", lat("tpot_s", "p99")],
      [`SLO ${pct} <= ${slo.tpot_ms} ms`, line(slo.tpot_ms), true]] },
    kv: { title: "KV cache in use (%)", series: per("kv_cache", 100).map((v, i) => [names[i], v]) },
    queue: { title: "Queue: waiting requests", series: per("waiting").map((v, i) => [names[i], v]) },
    flight: { title: "In flight at the router", series: per("in_flight").map((v, i) => [names[i], v]) },
  };
}

const compact = (v) => (v === null ? "" : Math.abs(v) >= 1000 ? `${+(v / 1000).toFixed(1)}k` : `${+v.toPrecision(3)}`);

function decades(u, axis, min, max) {
  const out = [];
  for (let e = Math.floor(Math.log10(min)); e <= Math.ceil(Math.log10(max)); e++) out.push(10 ** e);
  return out.filter((v) => v >= min * 0.999 && v <= max * 1.001);
}

function drawCharts(box, m) {
  const xs = m.points.map((p) => p.time);
  const specs = Object.entries(chartSpecs(m));
  for (const [id, spec] of specs) { // every box first: the grid sizes its columns on them
    if (!charts[id]) {
      const target = h("div", { class: "chart", id: `chart-${id}` }, h("div", { class: "title" }, spec.title));
      box.append(target);
      charts[id] = { target, labels: null, plot: null };
    }
  }
  for (const [id, spec] of specs) {
    const c = charts[id];
    const labels = spec.series.map((x) => x[0]).join("|");
    const data = [xs, ...spec.series.map((x) => x[1])];
    const points = spec.series.filter((x) => !x[2]).reduce((n, x) => n + x[1].filter((v) => v !== null).length, 0);
    c.target.dataset.points = String(points);
    if (c.labels === labels && c.plot) {
      c.plot.setData(data);
      continue;
    }
    if (c.plot) c.plot.destroy();
    const y = spec.latency
      ? { distr: 3, log: 10 } // latency and its SLO line may be orders of magnitude apart
      : { range: (u, lo, hi) => [0, Math.max(hi || 0, 0.01) * 1.15] };
    c.plot = new uPlot({
      width: Math.max(260, c.target.clientWidth), height: 190, legend: { live: false },
      scales: { x: { time: true }, y },
      axes: [{ stroke: "#677489", space: 70 }, {
        stroke: "#677489", size: 48, values: (u, vals) => vals.map(compact),
        splits: spec.latency ? decades : undefined,
      }],
      series: [{}, ...spec.series.map(([label, , dashed], i) => ({
        label, stroke: dashed ? "#d64545" : COLORS[i % COLORS.length], width: dashed ? 1.5 : 2,
        dash: dashed ? [6, 4] : undefined, points: { show: !dashed, size: 5 }, spanGaps: false,
      }))],
    }, data, c.target);
    c.labels = labels;
  }
}

// ---------------------------------------------------------------- the plan page

const PLAN_EXAMPLE = `name: chat-8b
infra: skypilot
model: meta-llama/Llama-3.1-8B-Instruct
workload:
  rate: 20
  input_tokens: {mean: 600, p50: 400, p99: 3000}
  output_tokens: {mean: 250, p50: 180, p99: 800}
  users: {us-east: 0.6, eu-west: 0.4}
slo: {ttft_ms: 1500, tpot_ms: 60, percentile: 99, max_rtt_ms: 60}
constraints: {clouds: [aws, gcp, azure, lambda, runpod], spot: never, min_replicas: 2}
engine: {max_model_len: 8192}
`;

function planPage(main) {
  const text = h("textarea", { id: "spec", spellcheck: "false" });
  text.value = sessionStorage.getItem("skybroker.spec") || PLAN_EXAMPLE;
  const file = h("input", { type: "file", accept: ".yaml,.yml,.json" });
  const go = h("button", { id: "plan-button", type: "button" }, "Plan");
  const status = h("span", { class: "muted" });
  const out = h("div", { id: "plan-result" });
  file.addEventListener("change", async () => {
    if (file.files.length) text.value = await file.files[0].text();
  });
  go.addEventListener("click", async () => {
    go.disabled = true;
    status.textContent = "solving ...";
    sessionStorage.setItem("skybroker.spec", text.value);
    const t0 = performance.now();
    try {
      const answer = await api("/v1/plans", { method: "POST", headers: { "Content-Type": "application/yaml" }, body: text.value });
      status.textContent = `planned in ${((performance.now() - t0) / 1000).toFixed(1)} s; nothing was launched`;
      showPlan(out, answer);
    } catch (e) {
      status.textContent = "";
      out.replaceChildren(card("The spec was not planned", h("p", { class: "error" }, e.message)));
    } finally { go.disabled = false; }
  });
  main.append(h("h1", {}, "Plan"),
    h("div", { class: "sub" }, "Paste or upload a deployment spec: see the cheapest placement that meets its SLO, without launching it (",
      h("code", {}, "POST /v1/plans"), ")."),
    card(null, text, h("div", { class: "toolbar" }, go, file, status)), out);
}

function showPlan(out, answer) {
  const plan = answer.plan;
  const solver = plan.solver || {};
  out.replaceChildren(
    h("div", { class: "stats" }, ...statItems([
      [money(plan.cost_per_hour), `total (egress ${money(plan.egress_per_hour)})`],
      [String((plan.placements || []).reduce((n, p) => n + p.replicas, 0)), "replicas"],
      [solver.status || "-", `solver${typeof solver.gap === "number" ? `, gap ${(100 * solver.gap).toFixed(1)}%` : ""}`],
      [plan.model, "model"],
    ])),
    h("div", { class: "split" }, card("Map", answer.map ? mapView(answer.map) : h("p", { class: "empty" }, "no map")),
      h("div", {}, card("Flows", answer.map ? flowsTable(answer.map) : ""), card("Cost against the baselines", baselinesView(plan)))),
    card("Placements", placementsTable(plan)));
}

// ---------------------------------------------------------------- start

async function serverLine() {
  try {
    const r = await fetch("/health");
    const hl = await r.json();
    document.getElementById("server").textContent = `broker ${hl.version} · pid ${hl.pid}`;
  } catch (_) { /* the pages say what failed */ }
}

function fitCharts() {
  for (const c of Object.values(charts)) {
    if (c.plot) c.plot.setSize({ width: Math.max(260, c.target.clientWidth), height: 190 });
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("resize", fitCharts);
window.addEventListener("DOMContentLoaded", () => { serverLine(); route(); });
