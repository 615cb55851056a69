// Small DOM helpers: h() builds elements, announce() speaks through the aria-live region.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function announce(message) {
  const live = document.getElementById("live");
  live.textContent = "";
  // a fresh text node, so screen readers read a repeated message again
  setTimeout(() => { live.textContent = message; }, 30);
}

export function table(caption, columns, rows, { id, empty = "nothing yet" } = {}) {
  // columns: [{label, key | render(row), num}]
  const head = h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : null }, c.label)));
  const cell = (row, c, i) => {
    const value = c.render ? c.render(row) : row[c.key];
    const attrs = { class: c.num ? "num" : null };
    return i === 0 ? h("th", { scope: "row", ...attrs }, value) : h("td", attrs, value ?? "");
  };
  const body = rows.length
    ? rows.map((row) => h("tr", {}, columns.map((c, i) => cell(row, c, i))))
    : [h("tr", {}, h("td", { colspan: columns.length, class: "hint" }, empty))];
  return h("table", { id }, h("caption", {}, caption), h("thead", {}, head), h("tbody", {}, body));
}

export function badge(state) {
  return h("span", { class: `badge ${state}` }, state);
}

export function copyBlock(label, content, id) {
  const pre = h("pre", { id, tabindex: "0", "aria-label": label }, h("code", {}, content));
  const button = h("button", {
    type: "button",
    class: "secondary",
    "aria-label": `Copy ${label}`,
    onclick: async () => {
      try {
        await navigator.clipboard.writeText(content);
        announce(`${label} copied`);
      } catch {
        const range = document.createRange();
        range.selectNodeContents(pre);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        announce(`${label} selected: press Ctrl+C to copy`);
      }
    },
  }, "Copy");
  return h("div", { class: "copy" }, pre, button);
}

export function card(label, value, id) {
  return h("div", { class: "card" }, h("div", { class: "label" }, label), h("div", { class: "value", id }, value));
}

export function when(iso) {
  if (!iso) return "never";
  const d = new Date(iso);
  const s = Math.round((Date.now() - d.getTime()) / 1000);
  if (s < 60) return `${Math.max(s, 0)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return d.toLocaleString();
}

export function money(micros, currency) {
  return `${(micros / 1e6).toFixed(6).replace(/0{1,4}$/, "")} ${currency}`;
}
