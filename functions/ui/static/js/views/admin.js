// The operator's view (admin key): worker capacity and warm functions (live), tenants, plans.

import { api } from "../api.js";
import { card, h, table } from "../dom.js";

const gib = (bytes) => `${(bytes / 2 ** 30).toFixed(bytes < 2 ** 30 ? 3 : 1)} GiB`;

export function render(container, ctx) {
  const cards = h("div", { class: "cards", id: "capacity" });
  const warm = h("div", { id: "warm" });
  const tenants = h("div", { id: "tenants" });
  const plans = h("div", { id: "plans" });
  container.append(
    h("h1", {}, "Platform"),
    h("section", { "aria-labelledby": "cap-title" }, h("h2", { id: "cap-title" }, "Capacity in use"),
      h("p", { class: "hint" }, "Updates every 2 seconds."), cards,
      h("h3", {}, "Warm functions"), warm),
    h("section", { "aria-labelledby": "tenants-title" }, h("h2", { id: "tenants-title" }, "Tenants"), tenants),
    h("section", { "aria-labelledby": "plans-title" }, h("h2", { id: "plans-title" }, "Plans"), plans),
  );

  ctx.every(2000, async () => {
    const cap = await api("/v1/capacity");
    const w = cap.workers;
    cards.replaceChildren(
      ...Object.entries(w).map(([k, v]) => card(k.replaceAll("_", " "), v, `capacity-${k}`)),
      card("warm functions", cap.warm.length, "capacity-warm"));
    warm.replaceChildren(table("Functions with replicas now", [
      { label: "Function", render: (f) => `${f.tenant}/${f.function}` },
      { label: "Replicas", key: "replicas", num: true },
      { label: "In flight", render: (f) => f.ready.reduce((a, r) => a + (r.in_flight || 0), 0), num: true },
    ], cap.warm, { id: "warm-table", empty: "every function is asleep" }));
  });

  ctx.every(5000, async () => {
    const { tenants: list } = await api("/v1/tenants");
    tenants.replaceChildren(table(`${list.length} tenants`, [
      { label: "Tenant", key: "name" }, { label: "Plan", key: "plan" },
      { label: "Functions", render: (t) => `${t.usage.functions} / ${t.limits.max_functions}`, num: true },
      { label: "Replicas", render: (t) => `${t.usage.replicas} / ${t.limits.max_replicas}`, num: true },
      { label: "Requests in flight", render: (t) => t.usage.concurrent_requests, num: true },
      { label: "Storage", render: (t) => `${gib(t.usage.storage_bytes)} / ${gib(t.limits.max_storage_bytes)}`, num: true },
    ], list, { id: "tenants-table", empty: "no tenants yet: paddlefn tenants create NAME" }));
  });

  api("/v1/plans").then(({ plans: all }) => {
    const rows = Object.entries(all).map(([name, p]) => ({ name, ...p }));
    plans.replaceChildren(table("Prices (micro-units) and limits", [
      { label: "Plan", key: "name" },
      { label: "Per million requests", render: (p) => `${p.prices.request_per_million_micros} ${p.prices.currency}`, num: true },
      { label: "Per compute-second", render: (p) => Object.entries(p.prices.compute_second_micros).map(([d, v]) => `${d} ${v}`).join(", ") },
      { label: "Free per month", render: (p) => p.prices.free_micros_per_month, num: true },
      { label: "Limits", render: (p) => `${p.limits.max_functions} functions, ${p.limits.max_replicas} replicas, ${p.limits.requests_per_second} req/s, GPU ${p.limits.gpu_allowed ? "yes" : "no"}` },
    ], rows, { id: "plans-table" }));
  }).catch((e) => plans.replaceChildren(h("p", { class: "error" }, e.message)));
}
