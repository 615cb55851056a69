// One function: its state, URL, copy-paste examples (curl, tritonclient), charts of requests, latency and cold
// starts per minute, and the engine that served it.

import { api } from "../api.js";
import { barChart, lineChart } from "../charts.js";
import { announce, badge, card, copyBlock, h, table, when } from "../dom.js";
import { enc, stateOf } from "./common.js";

const NUMPY = { FP32: "float32", FP64: "float64", FP16: "float16", INT64: "int64", INT32: "int32",
  INT16: "int16", INT8: "int8", UINT8: "uint8", BOOL: "bool_" };

const concrete = (shape) => shape.map((d) => (d < 0 ? 1 : d));
const size = (shape) => concrete(shape).reduce((a, b) => a * b, 1);

function zero(datatype) {
  if (datatype === "BOOL") return "false";
  return datatype.startsWith("FP") ? "0.0" : "0";
}

function curlExample(fn) {
  const inputs = fn.inputs || [];
  const small = inputs.every((t) => size(t.shape) <= 16);
  const tensor = (t, data) => `{"name": "${t.name}", "shape": [${concrete(t.shape).join(", ")}], "datatype": "${t.datatype}", "data": ${data}}`;
  const auth = fn.config.public ? "" : ` \\\n  -H "Authorization: Bearer $PADDLEFN_KEY"`;
  if (small) {
    const body = `{"inputs": [${inputs.map((t) => tensor(t, `[${Array(size(t.shape)).fill(zero(t.datatype)).join(", ")}]`)).join(", ")}]}`;
    return `curl -s ${fn.url}/infer${auth} \\\n  -H "Content-Type: application/json" \\\n  -d '${body}'`;
  }
  const py = inputs.map((t) => tensor(t, `[${zero(t.datatype).replace("false", "False")}] * ${size(t.shape)}`)).join(", ");
  return `python3 -c 'import json; print(json.dumps({"inputs": [${py}]}))' > request.json\n`
    + `curl -s ${fn.url}/infer${auth} \\\n  -H "Content-Type: application/json" \\\n  -d @request.json`;
}

function pythonExample(fn) {
  const base = fn.url.replace(/^https?:\/\//, "").replace(/\/v2\/models\/[^/]+$/, "");
  const lines = [
    "import os",
    "",
    "import numpy as np",
    "import tritonclient.http as http",
    "",
    `client = http.InferenceServerClient("${base}")`,
  ];
  lines.push(fn.config.public ? "headers = {}" : `headers = {"Authorization": "Bearer " + os.environ["PADDLEFN_KEY"]}`);
  const names = [];
  (fn.inputs || []).forEach((t, i) => {
    const v = `x${i}`;
    names.push(v);
    const shape = `[${concrete(t.shape).join(", ")}]`;
    lines.push(`${v} = http.InferInput("${t.name}", ${shape}, "${t.datatype}")`);
    lines.push(`${v}.set_data_from_numpy(np.zeros(${shape}, dtype=np.${NUMPY[t.datatype] || "float32"}))`);
  });
  lines.push(`result = client.infer("${fn.name}", [${names.join(", ")}], headers=headers)`);
  for (const t of fn.outputs || []) lines.push(`print(result.as_numpy("${t.name}"))`);
  lines.push("client.close()");
  return lines.join("\n");
}

export function render(container, ctx) {
  const name = ctx.arg;
  const base = `/v1/tenants/${enc(ctx.tenant)}/functions/${enc(name)}`;
  const state = h("span", { id: "fn-state" });
  const reason = h("p", { class: "reason", id: "fn-error", role: "alert" });
  const facts = h("p", { id: "fn-facts" });
  const served = h("p", { id: "fn-engine" }, "Engine: no request yet.");
  const examples = h("section", { "aria-labelledby": "call-title" }, h("h2", { id: "call-title" }, "Call it"));
  const minutes = h("select", { id: "stats-minutes" },
    [[15, "15 minutes"], [60, "hour"], [180, "3 hours"], [1440, "day"]].map(([m, label]) =>
      h("option", { value: m, selected: m === 60 }, `Last ${label}`)));
  const cards = h("div", { class: "cards", id: "stats-cards" });
  const charts = h("div", { class: "charts", id: "charts" });
  const numbers = h("details", { id: "stats-table" }, h("summary", {}, "The numbers behind the charts"), h("div"));
  const config = h("pre", { id: "fn-config", tabindex: "0", "aria-label": "Configuration" });
  container.append(
    h("p", {}, h("a", { href: "#/functions" }, "All functions")),
    h("h1", {}, name),
    h("p", {}, "State: ", state, " ", h("span", { id: "fn-replicas" })),
    reason, facts, served, examples,
    h("section", { "aria-labelledby": "stats-title" },
      h("h2", { id: "stats-title" }, "Requests, latency and cold starts"),
      h("div", { class: "row" }, h("label", { for: "stats-minutes" }, "Time range "), minutes),
      cards, charts, numbers),
    h("section", { "aria-labelledby": "config-title" }, h("h2", { id: "config-title" }, "Configuration"), config),
  );

  let lastState = null;
  let examplesShown = false;
  ctx.every(2000, async () => {
    let fn;
    try {
      fn = await api(base);
    } catch (error) {
      if (error.status === 404) {
        reason.textContent = `There is no function ${name} in ${ctx.tenant} (deleted?).`;
        return false;
      }
      throw error;
    }
    const now = stateOf(fn);
    if (now !== lastState) {
      state.replaceChildren(badge(now));
      if (lastState !== null) announce(`${name} is now ${now}`);
      lastState = now;
    }
    document.getElementById("fn-replicas").textContent = `(${fn.replicas} ${fn.replicas === 1 ? "replica" : "replicas"})`;
    reason.textContent = fn.status === "failed" ? `Deploy failed: ${fn.error}` : "";
    facts.textContent = `Device: ${fn.device || fn.config.device} · version ${fn.version} · last request ${when(fn.last_request_at)}`;
    config.textContent = JSON.stringify(fn.config, null, 2);
    if (!examplesShown && fn.status === "ready") {
      examplesShown = true;
      examples.append(
        h("h3", {}, "URL"), copyBlock("URL", fn.url, "fn-url"),
        h("p", { class: "hint" }, `Base URL for OIP v2 clients: ${fn.url.replace(/\/v2\/models\/[^/]+$/, "")}`),
        h("h3", {}, "curl"), copyBlock("curl example", curlExample(fn), "fn-curl"),
        h("h3", {}, "Python (tritonclient)"), copyBlock("Python example", pythonExample(fn), "fn-python"),
      );
    }
  });

  const drawStats = async () => {
    const stats = await api(`${base}/stats?minutes=${minutes.value}`);
    const t = stats.totals;
    const ms = (v) => (v === null ? "–" : `${v} ms`);
    cards.replaceChildren(
      card("Requests", t.requests, "total-requests"), card("Errors", t.errors, "total-errors"),
      card("Cold starts", t.cold_starts, "total-cold-starts"), card("p50 latency", ms(t.p50_ms), "total-p50"),
      card("p99 latency", ms(t.p99_ms), "total-p99"));
    if (stats.last) {
      served.textContent = `Engine that served the last request: ${stats.last.engine} on ${stats.last.device} (${when(stats.last.at)}).`;
    }
    const times = stats.buckets.map((b) => b.t);
    const pick = (k) => stats.buckets.map((b) => b[k]);
    const span = minutes.selectedOptions[0].textContent.toLowerCase();
    charts.replaceChildren(
      barChart({ id: "chart-requests", title: "Requests per minute", times, series: [
        { name: "requests", color: "#0b5cad", values: pick("requests") },
        { name: "errors", color: "#a40e26", values: pick("errors") }],
      summary: `${t.requests} requests and ${t.errors} errors in the ${span}` }),
      lineChart({ id: "chart-latency", title: "Latency (ms, cold starts included)", times, unit: "", series: [
        { name: "p50", color: "#116329", values: pick("p50_ms") },
        { name: "p99", color: "#7d4e00", values: pick("p99_ms") }],
      summary: t.requests ? `p50 ${t.p50_ms} ms, p99 ${t.p99_ms} ms over the ${span}` : `no requests in the ${span}` }),
      barChart({ id: "chart-cold-starts", title: "Cold starts per minute", times, series: [
        { name: "cold starts", color: "#6639ba", values: pick("cold_starts") }],
      summary: `${t.cold_starts} cold starts in the ${span}` }),
    );
    const busy = stats.buckets.filter((b) => b.requests);
    numbers.lastChild.replaceChildren(table("Minutes with requests", [
      { label: "Minute", render: (b) => new Date(b.t).toLocaleTimeString() },
      { label: "Requests", key: "requests", num: true }, { label: "Errors", key: "errors", num: true },
      { label: "Cold starts", key: "cold_starts", num: true }, { label: "p50 ms", key: "p50_ms", num: true },
      { label: "p99 ms", key: "p99_ms", num: true },
      { label: "Engines", render: (b) => Object.entries(b.engines).map(([e, n]) => `${e} ${n}`).join(", ") },
    ], busy, { empty: "no requests in this range" }));
  };
  minutes.addEventListener("change", () => drawStats());
  ctx.every(5000, drawStats);
}
