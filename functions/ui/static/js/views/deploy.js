// Deploy by upload: a progress bar through the upload, then the deploy's stages as the API reports them.

import { api, upload } from "../api.js";
import { announce, h } from "../dom.js";
import { enc } from "./common.js";

const STAGES = [
  ["upload", "Upload the model"],
  ["check", "Unpack safely and detect the format"],
  ["optimise", "Optimise the program once"],
  ["golden", "Golden check: the optimised outputs equal the examples"],
  ["lite", "Convert for Paddle Lite and check it"],
  ["ready", "Ready to serve"],
];

// The API's `stage` while a function deploys (runtime/prepare.py reports them) -> the step shown here.
const API_STAGES = {
  queued: "optimise", loading: "optimise", optimising: "optimise",
  "golden check": "golden", "converting for Paddle Lite": "lite",
};

const WORDS = { todo: "", active: ": in progress", done: ": done", failed: ": failed" };

function field(id, label, control, hint) {
  return h("div", { class: "row" }, h("label", { for: id }, label), h("div", {}, control,
    hint ? h("div", { class: "hint", id: `${id}-hint` }, hint) : null));
}

export function render(container, ctx) {
  const name = h("input", { id: "fn-name", name: "name", type: "text", required: true, autocomplete: "off",
    pattern: "[a-z][a-z0-9-]{0,62}", "aria-describedby": "fn-name-hint", spellcheck: "false" });
  const file = h("input", { id: "fn-model", name: "model", type: "file", required: true,
    accept: ".tar.gz,.tgz,.zip,application/gzip,application/zip", "aria-describedby": "fn-model-hint" });
  const idle = h("input", { id: "fn-idle", name: "idle_timeout_s", type: "number", min: "1", step: "1",
    "aria-describedby": "fn-idle-hint" });
  const device = h("select", { id: "fn-device", name: "device" },
    ["auto", "cpu", "gpu"].map((d) => h("option", { value: d }, d)));
  const submit = h("button", { type: "submit", id: "deploy-submit" }, "Deploy");
  const error = h("p", { class: "error", role: "alert", id: "deploy-error" });
  const bar = h("progress", { id: "deploy-progress", max: "100", value: "0", "aria-labelledby": "deploy-progress-label" });
  const barLabel = h("p", { id: "deploy-progress-label" }, "Deploy progress");
  const stageText = h("p", { id: "deploy-stage", role: "status", "aria-live": "polite" });
  const stages = h("ol", { class: "stages", id: "deploy-stages" },
    STAGES.map(([key, text]) => h("li", { "data-stage": key, "data-state": "todo" }, text, h("span", { class: "stage-state" }))));
  const progress = h("section", { id: "deploy-status", hidden: true, "aria-labelledby": "deploy-status-title" },
    h("h2", { id: "deploy-status-title" }, "Progress"), barLabel, bar, stageText, stages);
  const form = h("form", { id: "deploy-form", novalidate: true },
    field("fn-name", "Function name", name, "Lowercase letters, digits and '-'; it becomes part of the URL."),
    field("fn-model", "Model archive", file, ".tar.gz or .zip with model.pdmodel (or model.json) + model.pdiparams, optionally example_inputs.npz / example_outputs.npz."),
    field("fn-idle", "Idle timeout (seconds)", idle, "Sleep after this long without requests; empty: the platform's default."),
    field("fn-device", "Device", device),
    h("div", {}, submit),
    error);
  container.append(h("h1", {}, `Deploy a model to ${ctx.tenant}`), form, progress);

  const setStage = (key, state) => {
    for (const li of stages.children) {
      const index = STAGES.findIndex(([k]) => k === li.dataset.stage);
      const at = STAGES.findIndex(([k]) => k === key);
      li.dataset.state = index < at ? "done" : index === at ? state : "todo";
      li.lastChild.textContent = WORDS[li.dataset.state];
    }
  };
  const say = (text) => {
    stageText.textContent = text;
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    if (!name.value.trim() || !/^[a-z][a-z0-9-]{0,62}$/.test(name.value.trim())) {
      error.textContent = "Give the function a name: lowercase letters, digits and '-', starting with a letter.";
      name.focus();
      return;
    }
    if (!file.files.length) {
      error.textContent = "Choose the model archive (.tar.gz or .zip) to upload.";
      file.focus();
      return;
    }
    const fnName = name.value.trim();
    const config = { device: device.value };
    if (idle.value) config.idle_timeout_s = Number(idle.value);
    const data = new FormData();
    data.append("name", fnName);
    data.append("config", JSON.stringify(config));
    data.append("model", file.files[0]);
    submit.disabled = true;
    progress.hidden = false;
    bar.value = 0;
    setStage("upload", "active");
    say("Uploading...");
    let lastPercent = -1;
    let sent = false;
    try {
      await upload(`/v1/tenants/${enc(ctx.tenant)}/functions`, data, (done, total) => {
        const percent = total ? Math.round((100 * done) / total) : 0;
        sent = total > 0 && done >= total;
        bar.value = Math.round(percent * 0.4); // the upload is the first 40 % of the bar
        if (percent !== lastPercent && percent % 25 === 0) say(`Uploading: ${percent} %`);
        lastPercent = percent;
      });
    } catch (e) {
      setStage(sent ? "check" : "upload", "failed"); // sent whole: the platform refused what it unpacked
      say("");
      error.textContent = `${sent ? "Model refused" : "Upload refused"}: ${e.message}`;
      submit.disabled = false;
      return;
    }
    bar.value = 50;
    setStage("optimise", "active");
    say(`${fnName}: deploying (optimising, converting and running the golden check)...`);
    let current = "optimise";
    const started = Date.now();
    ctx.every(1000, async () => {
      const fn = await api(`/v1/tenants/${enc(ctx.tenant)}/functions/${enc(fnName)}`);
      if (fn.status === "deploying") {
        const seconds = Math.round((Date.now() - started) / 1000);
        current = API_STAGES[fn.stage] || current;
        setStage(current, "active");
        const step = STAGES.findIndex(([k]) => k === current);
        bar.value = Math.min(95, 40 + 15 * (step - 1) + Math.min(14, seconds)); // steps of the bar, then creep
        stageText.textContent = `${fnName}: ${fn.stage || "deploying"}, ${seconds} s`;
        return;
      }
      if (fn.status === "ready") {
        bar.value = 100;
        setStage("ready", "done");
        say(`${fnName} is ready (${fn.state}).`);
        stageText.append(" ", h("a", { href: `#/functions/${enc(fnName)}`, id: "deploy-open" }, `Open ${fnName}`));
        announce(`${fnName} is ready`);
      } else {
        setStage(current, "failed");
        say(`${fnName}: deploy failed.`);
        error.textContent = `Deploy failed: ${fn.error}`;
      }
      submit.disabled = false;
      return false;
    });
  });
}
