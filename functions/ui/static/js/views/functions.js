// Functions of the tenant, with their state, updated every 2 s; state changes are announced.

import { api } from "../api.js";
import { announce, badge, h, when } from "../dom.js";
import { enc, stateOf } from "./common.js";

export function render(container, ctx) {
  const tbody = h("tbody");
  const empty = h("p", { class: "hint", hidden: true }, "No functions yet. ",
    h("a", { href: "#/deploy" }, "Deploy a model"), " to create one.");
  const updated = h("p", { class: "hint" }, "Loading...");
  container.append(
    h("h1", {}, `Functions of ${ctx.tenant}`),
    h("p", {}, h("a", { href: "#/deploy" }, "Deploy a model")),
    h("table", { id: "functions-table" },
      h("caption", {}, "State updates every 2 seconds."),
      h("thead", {}, h("tr", {}, ["Function", "State", "Replicas", "Last request", "URL"].map(
        (c, i) => h("th", { scope: "col", class: i === 2 ? "num" : null }, c))))),
    empty,
    updated,
  );
  container.querySelector("table").append(tbody);
  const rows = new Map();
  const seen = new Map();

  ctx.every(2000, async () => {
    const { functions } = await api(`/v1/tenants/${enc(ctx.tenant)}/functions`);
    const names = new Set();
    for (const fn of functions) {
      names.add(fn.name);
      let row = rows.get(fn.name);
      if (!row) {
        row = h("tr", { "data-function": fn.name },
          h("th", { scope: "row" }, h("a", { href: `#/functions/${enc(fn.name)}` }, fn.name)),
          h("td", { "data-field": "state" }),
          h("td", { "data-field": "replicas", class: "num" }),
          h("td", { "data-field": "last" }),
          h("td", { "data-field": "url" }, h("code", {}, fn.url)));
        rows.set(fn.name, row);
        tbody.append(row);
      }
      const state = stateOf(fn);
      const cell = row.querySelector('[data-field="state"]');
      const reason = fn.status === "failed" && fn.error ? h("div", { class: "reason" }, fn.error) : null;
      if (cell.dataset.state !== state || (reason && !cell.querySelector(".reason"))) {
        cell.dataset.state = state;
        cell.replaceChildren(badge(state), reason || "");
      }
      row.querySelector('[data-field="replicas"]').textContent = String(fn.replicas);
      row.querySelector('[data-field="last"]').textContent = when(fn.last_request_at);
      const before = seen.get(fn.name);
      if (before && before !== state) announce(`${fn.name} is now ${state}${reason ? `: ${fn.error}` : ""}`);
      seen.set(fn.name, state);
    }
    for (const [name, row] of rows) {
      if (!names.has(name)) {
        row.remove();
        rows.delete(name);
        seen.delete(name);
      }
    }
    empty.hidden = functions.length > 0;
    updated.textContent = `Updated ${new Date().toLocaleTimeString()}.`;
  });
}
