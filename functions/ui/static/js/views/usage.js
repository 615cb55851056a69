// Usage and invoices of one month: requests and compute per day (charts), per function (table), the invoice and
// its CSV download.

import { api, text } from "../api.js";
import { barChart } from "../charts.js";
import { announce, card, h, money, table } from "../dom.js";
import { enc } from "./common.js";

const thisMonth = () => new Date().toISOString().slice(0, 7);

function monthBounds(period) {
  const [y, m] = period.split("-").map(Number);
  const start = new Date(Date.UTC(y, m - 1, 1));
  const end = new Date(Date.UTC(y, m, 1));
  return { start, end };
}

function daysOf(period) {
  const { start, end } = monthBounds(period);
  const days = [];
  for (let d = new Date(start); d < end; d.setUTCDate(d.getUTCDate() + 1)) days.push(d.toISOString().slice(0, 10));
  return days;
}

export function render(container, ctx) {
  const month = h("input", { id: "usage-month", type: "month", value: thisMonth(), max: thisMonth() });
  const error = h("p", { class: "error", role: "alert" });
  const cards = h("div", { class: "cards", id: "usage-cards" });
  const charts = h("div", { class: "charts", id: "usage-charts" });
  const byFunction = h("div", { id: "usage-functions" });
  const invoice = h("div", { id: "invoice" });
  const download = h("button", { type: "button", id: "invoice-csv", class: "secondary" }, "Download invoice as CSV");
  container.append(
    h("h1", {}, `Usage and invoices of ${ctx.tenant}`),
    h("div", { class: "row" }, h("label", { for: "usage-month" }, "Month (UTC) "), month),
    error, cards, charts,
    h("h2", {}, "By function"), byFunction,
    h("h2", {}, "Invoice"), invoice, h("p", {}, download),
  );
  const t = enc(ctx.tenant);

  const load = async () => {
    const period = month.value || thisMonth();
    const { start, end } = monthBounds(period);
    const range = `start=${start.toISOString()}&end=${end.toISOString()}`;
    let daily, functions, doc;
    try {
      [daily, functions, doc] = await Promise.all([
        api(`/v1/tenants/${t}/usage?${range}&group_by=day`),
        api(`/v1/tenants/${t}/usage?${range}&group_by=function`),
        api(`/v1/tenants/${t}/invoices/${period}`),
      ]);
    } catch (e) {
      error.textContent = e.message;
      return;
    }
    error.textContent = "";
    const sum = (k) => functions.rows.reduce((a, r) => a + r[k], 0);
    cards.replaceChildren(
      card("Requests", sum("requests"), "usage-requests"),
      card("Billable requests", sum("billable_requests"), "usage-billable"),
      card("Cold starts", sum("cold_starts"), "usage-cold-starts"),
      card("Billed compute", `${sum("billed_ms")} ms`, "usage-billed-ms"),
      card("Invoice total", doc.total, "usage-total"));
    const byDay = new Map(daily.rows.map((r) => [r.day, r]));
    const days = daysOf(period);
    const values = (k) => days.map((d) => byDay.get(d)?.[k] ?? 0);
    const dayTimes = days.map((d) => `${d}T12:00:00Z`);
    const labelOf = (iso) => iso.slice(5, 10);
    charts.replaceChildren(
      barChart({ id: "chart-usage-requests", title: "Requests per day", times: dayTimes, labelOf, series: [
        { name: "requests", color: "#0b5cad", values: values("requests") },
        { name: "errors", color: "#a40e26", values: values("errors") }],
      summary: `${sum("requests")} requests in ${period}, ${sum("errors")} errors` }),
      barChart({ id: "chart-usage-compute", title: "Billed compute per day (ms)", times: dayTimes, labelOf, series: [
        { name: "billed ms", color: "#116329", values: values("billed_ms") }],
      summary: `${sum("billed_ms")} ms of billed compute in ${period}` }),
    );
    byFunction.replaceChildren(table(`Usage in ${period}`, [
      { label: "Function", key: "function" }, { label: "Requests", key: "requests", num: true },
      { label: "Billable", key: "billable_requests", num: true }, { label: "Errors", key: "errors", num: true },
      { label: "Cold starts", key: "cold_starts", num: true }, { label: "Compute ms", key: "compute_ms", num: true },
      { label: "Billed ms", key: "billed_ms", num: true },
    ], functions.rows, { id: "usage-table", empty: "no requests this month" }));
    const cur = doc.currency;
    invoice.replaceChildren(
      table(`Invoice ${doc.tenant} ${doc.period} (${doc.status}, plan ${doc.plan})`, [
        { label: "Function", key: "function" }, { label: "Device", key: "device" },
        { label: "Requests", key: "requests", num: true }, { label: "Compute ms", key: "compute_ms", num: true },
        { label: "Amount", render: (l) => money(l.amount_micros, cur), num: true },
      ], doc.lines, { id: "invoice-table", empty: "no billable usage" }),
      h("p", { id: "invoice-total" }, `Subtotal ${money(doc.subtotal_micros, cur)}, free allowance `
        + `-${money(doc.free_allowance_micros, cur)}, total ${doc.total}`),
    );
  };

  download.addEventListener("click", async () => {
    const period = month.value || thisMonth();
    try {
      const csv = await text(`/v1/tenants/${t}/invoices/${period}?format=csv`);
      const url = URL.createObjectURL(new Blob([csv], { type: "text/csv" }));
      const a = h("a", { href: url, download: `invoice-${ctx.tenant}-${period}.csv`, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      announce(`Invoice for ${period} downloaded`);
    } catch (e) {
      error.textContent = `Could not download the invoice: ${e.message}`;
    }
  });
  month.addEventListener("change", load);
  ctx.every(5000, load);
}
