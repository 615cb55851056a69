// Charts as inline SVG, drawn here (no library): bars for counts, lines for latency. Each chart is an image
// with a text summary for screen readers, and its numbers are in a table that follows it.

const NS = "http://www.w3.org/2000/svg";
const W = 480;
const H = 170;
const PAD = { left: 44, right: 10, top: 10, bottom: 24 };

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (value <= m * step) return m * step;
  return 10 * step;
}

function label(iso) {
  const d = new Date(iso);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function frame(svg, max, unit, times, labelOf = label) {
  const plotH = H - PAD.top - PAD.bottom;
  for (const f of [0, 0.5, 1]) {
    const y = PAD.top + plotH * (1 - f);
    svg.append(s("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y, stroke: "#d0d7de", "stroke-width": 1 }));
    const v = max * f;
    svg.append(s("text", { x: PAD.left - 4, y: y + 4, "text-anchor": "end", "font-size": 10, fill: "#57606a" },
      `${Number.isInteger(v) ? v : v.toFixed(1)}${unit}`));
  }
  if (times.length) {
    const n = times.length;
    const ticks = [[0, "start"], [Math.floor((n - 1) / 2), "middle"], [n - 1, "end"]];
    for (const [i, anchor] of n > 2 ? ticks : ticks.slice(0, 1)) {
      const x = anchor === "start" ? PAD.left : anchor === "end" ? W - PAD.right : PAD.left + ((W - PAD.left - PAD.right) * (i + 0.5)) / n;
      svg.append(s("text", { x, y: H - 6, "text-anchor": anchor, "font-size": 10, fill: "#57606a" }, labelOf(times[i])));
    }
  }
}

function figure(id, title, summary, svg, legend) {
  const fig = document.createElement("figure");
  fig.className = "chart";
  fig.id = id;
  const cap = document.createElement("figcaption");
  cap.textContent = title;
  fig.append(cap);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${title}: ${summary}`);
  svg.prepend(s("title", {}, `${title}: ${summary}`));
  fig.append(svg);
  if (legend.length > 1) {
    const div = document.createElement("div");
    div.className = "legend";
    div.setAttribute("aria-hidden", "true");
    for (const { name, color } of legend) {
      const span = document.createElement("span");
      const i = document.createElement("i");
      i.style.background = color;
      span.append(i, name);
      div.append(span);
    }
    fig.append(div);
  }
  const summaryEl = document.createElement("p");
  summaryEl.className = "hint";
  summaryEl.textContent = summary;
  fig.append(summaryEl);
  return fig;
}

// series: [{name, color, values: number[]}] stacked side by side per time slot
export function barChart({ id, title, times, series, unit = "", summary, labelOf }) {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}` });
  const max = niceMax(Math.max(0, ...series.flatMap((x) => x.values)));
  frame(svg, max, unit, times, labelOf);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const slot = plotW / Math.max(times.length, 1);
  const bw = Math.max(1, (slot * 0.8) / series.length);
  series.forEach((x, k) => {
    x.values.forEach((v, i) => {
      if (!v) return;
      const bh = (plotH * v) / max;
      svg.append(s("rect", {
        x: PAD.left + slot * i + slot * 0.1 + bw * k, y: PAD.top + plotH - bh, width: bw, height: bh,
        fill: x.color, "data-value": v,
      }));
    });
  });
  return figure(id, title, summary, svg, series);
}

// series values may be null (no data in that slot): the line breaks there
export function lineChart({ id, title, times, series, unit = "", summary, labelOf }) {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}` });
  const max = niceMax(Math.max(0, ...series.flatMap((x) => x.values.filter((v) => v !== null))));
  frame(svg, max, unit, times, labelOf);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const n = Math.max(times.length, 1);
  for (const x of series) {
    let d = "";
    let pen = false;
    x.values.forEach((v, i) => {
      if (v === null) {
        pen = false;
        return;
      }
      const px = PAD.left + (plotW * (i + 0.5)) / n;
      const py = PAD.top + plotH * (1 - v / max);
      d += `${pen ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`;
      pen = true;
      svg.append(s("circle", { cx: px.toFixed(1), cy: py.toFixed(1), r: 2.2, fill: x.color, "data-value": v }));
    });
    if (d) svg.append(s("path", { d, fill: "none", stroke: x.color, "stroke-width": 1.8 }));
  }
  return figure(id, title, summary, svg, series);
}
