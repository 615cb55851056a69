// The portal's shell: sign-in, navigation (hash routes), the tenant in view, and polling that stops when the
// view changes. Views live in views/*.js and export render(container, ctx).

import { api, clearKey, getKey, setKey } from "./api.js";
import { announce, h } from "./dom.js";
import * as admin from "./views/admin.js";
import * as deploy from "./views/deploy.js";
import * as fn from "./views/function.js";
import * as functions from "./views/functions.js";
import * as usage from "./views/usage.js";

const TENANT = "paddlefn.tenant";
const $ = (id) => document.getElementById(id);
const state = { who: null, tenant: null, timers: new Set(), generation: 0 };

// run task now and then every ms while the view is shown (and the tab visible); it stops when task returns false
function every(ms, task) {
  const generation = state.generation;
  let timer = null;
  const tick = async () => {
    state.timers.delete(timer);
    if (generation !== state.generation) return;
    if (!document.hidden) {
      const banner = document.getElementById("view-error");
      try {
        if ((await task()) === false) return;
        if (banner && banner.dataset.generation === String(generation)) banner.textContent = "";
      } catch (error) {
        if (error.status === 401) return signOut("Your key is no longer valid: sign in again.");
        if (banner) {
          banner.textContent = error.message; // e.g. a key without the manage scope, or the platform is away
          banner.dataset.generation = String(generation);
        }
      }
    }
    if (generation === state.generation) {
      timer = setTimeout(tick, ms);
      state.timers.add(timer);
    }
  };
  tick();
}

function stopTimers() {
  state.generation += 1;
  for (const t of state.timers) clearTimeout(t);
  state.timers.clear();
}

function route() {
  const [name = "", ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  return { name, arg: rest.map(decodeURIComponent).join("/") };
}

function showSignIn(message = "") {
  stopTimers();
  $("sign-in").hidden = false;
  $("view").hidden = true;
  $("nav").hidden = true;
  $("who").hidden = true;
  $("sign-in-error").textContent = message;
  document.title = "Sign in · paddlefn";
  $("api-key").focus();
  $("api-key").select(); // a wrong key is replaced by what is typed next
}

function signOut(message = "") {
  clearKey();
  state.who = null;
  showSignIn(message);
}

async function signIn(key) {
  setKey(key);
  try {
    state.who = await api("/v1/whoami");
  } catch (error) {
    clearKey();
    const why = error.status === 401 ? "That key is not valid: check it, or ask for a new one." : error.message;
    showSignIn(why);
    return false;
  }
  $("sign-in").hidden = true;
  $("view").hidden = false;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("nav-admin").hidden = !state.who.admin;
  await setUpTenants();
  return true;
}

async function setUpTenants() {
  const select = $("tenant-select");
  select.replaceChildren();
  if (state.who.admin) {
    $("who-text").textContent = "admin";
    const { tenants } = await api("/v1/tenants");
    for (const t of tenants) select.append(h("option", { value: t.name }, t.name));
    const saved = sessionStorage.getItem(TENANT);
    state.tenant = tenants.some((t) => t.name === saved) ? saved : tenants[0]?.name ?? null;
    select.value = state.tenant ?? "";
    select.hidden = $("tenant-label").hidden = tenants.length === 0;
  } else {
    state.tenant = state.who.tenant;
    select.append(h("option", { value: state.tenant }, state.tenant));
    select.hidden = $("tenant-label").hidden = true;
    $("who-text").textContent = `tenant ${state.tenant}`;
  }
}

const VIEWS = { functions, deploy, usage, admin };

function show() {
  if (!state.who) return;
  stopTimers();
  let { name, arg } = route();
  if (!VIEWS[name] || (name === "admin" && !state.who.admin)) name = state.who.admin ? "admin" : "functions";
  const view = name === "functions" && arg ? fn : VIEWS[name];
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.route === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const container = $("view");
  container.replaceChildren(h("p", { id: "view-error", class: "error", role: "alert" }));
  const ctx = {
    tenant: state.tenant,
    who: state.who,
    arg,
    every,
    go: (hash) => { location.hash = hash; },
    refreshTenants: setUpTenants,
  };
  if (!ctx.tenant && view !== admin) {
    container.append(h("h1", { tabindex: "-1" }, "No tenant yet"),
      h("p", {}, "Create one first: paddlefn tenants create NAME (admin key), then pick it above."));
  } else {
    view.render(container, ctx);
  }
  const heading = container.querySelector("h1");
  document.title = `${heading ? heading.textContent : "paddlefn"} · paddlefn`;
  if (heading) {
    heading.setAttribute("tabindex", "-1");
    heading.focus();
  }
}

function start() {
  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) {
      $("sign-in-error").textContent = "Enter an API key (paddlefn tenants create prints one).";
      return;
    }
    if (await signIn(key)) {
      $("api-key").value = "";
      announce(`Signed in as ${state.who.admin ? "admin" : `tenant ${state.tenant}`}`);
      show();
    }
  });
  $("sign-out").addEventListener("click", () => {
    signOut();
    announce("Signed out");
  });
  $("tenant-select").addEventListener("change", (event) => {
    state.tenant = event.target.value;
    sessionStorage.setItem(TENANT, state.tenant);
    announce(`Showing tenant ${state.tenant}`);
    if (route().name === "functions" && route().arg) location.hash = "#/functions";
    else show();
  });
  window.addEventListener("hashchange", show);
  const key = getKey();
  if (key) signIn(key).then((ok) => ok && show());
  else showSignIn();
}

start();
