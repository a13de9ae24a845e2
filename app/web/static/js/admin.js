// Admin views (admin key): the model registry, and training runs with their progress and logs.

import { alertIn, api } from "./api.js";
import { count, el, nonCommercial, when } from "./format.js";

const $ = (id) => document.getElementById(id);
const ACTIVE = ["queued", "running"];
const RUNS_PAGE = 10;
const RUNS_POLL_MS = 1000;
let runsOffset = 0;
let runsTimer = null;

// ------------------------------------------------------------------ models

export function initModels() {
  for (const radio of document.querySelectorAll('input[name="source"]')) {
    radio.addEventListener("change", () => {
      const byPath = document.querySelector('input[name="source"]:checked').value === "path";
      $("register-file-row").hidden = byPath;
      $("register-path-row").hidden = !byPath;
    });
  }
  $("register-form").addEventListener("submit", register);
}

export async function loadModels() {
  let rows;
  try {
    rows = await api("/admin/models");
  } catch (err) {
    alertIn($("models-alert"), err.message);
    return [];
  }
  alertIn($("models-alert"), "");
  $("models-table").tBodies[0].replaceChildren(...rows.map((m) => {
    const toggle = el("button", {
      type: "button",
      "aria-label": `${m.active ? "Deactivate" : "Activate"} ${m.name}`,
      onclick: () => setActive(m.name, !m.active),
    }, m.active ? "Deactivate" : "Activate");
    return el("tr", {},
      el("th", { scope: "row", text: m.name }),
      el("td", { text: m.kind }),
      el("td", { class: "num", text: m.sigma ?? "-" }),
      el("td", { class: "num", text: m.num_classes }),
      el("td", { class: "num", text: `${m.input_size}x${m.input_size}` }),
      el("td", { text: m.format }),
      el("td", {}, el("span", { class: nonCommercial(m.licence) ? "licence-nc" : "", text: m.licence || "-" })),
      el("td", {}, el("code", { title: m.checkpoint_sha256, text: m.checkpoint_sha256.slice(0, 12) })),
      el("td", {}, m.active ? "yes " : "no ", toggle),
      el("td", {}, m.default ? "yes" : defaultButton(m)),
    );
  }));
  return rows;
}

// Only an active classifier with a sigma can be a sigma's default (the server says so too).
function defaultButton(m) {
  if (!m.active || m.kind !== "classifier" || m.sigma === null) return "no";
  return el("span", {}, "no ", el("button", {
    type: "button",
    "aria-label": `Make ${m.name} the default for sigma ${m.sigma}`,
    onclick: () => setDefault(m.name),
  }, "Make default"));
}

async function setDefault(name) {
  try {
    await api(`/admin/models/${encodeURIComponent(name)}/default`, { method: "POST" });
  } catch (err) {
    alertIn($("models-alert"), err.message);
    return;
  }
  loadModels();
}

async function setActive(name, active) {
  try {
    await api(`/admin/models/${encodeURIComponent(name)}/${active ? "activate" : "deactivate"}`, {
      method: "POST",
    });
  } catch (err) {
    alertIn($("models-alert"), err.message);
    return;
  }
  loadModels();
}

async function register(event) {
  event.preventDefault();
  alertIn($("register-alert"), "");
  $("register-status").textContent = "";
  const byPath = document.querySelector('input[name="source"]:checked').value === "path";
  const form = new FormData();
  if (byPath) {
    form.append("path", $("register-path").value);
  } else if ($("register-file").files[0]) {
    const file = $("register-file").files[0];
    form.append("file", file, file.name);
  }
  const fields = {
    name: "register-name", licence: "register-licence", sigma: "register-sigma",
    input_size: "register-input-size", classes: "register-classes", num_heads: "register-heads",
    mean: "register-mean", std: "register-std",
  };
  for (const [name, id] of Object.entries(fields)) {
    const value = $(id).value.trim();
    if (value !== "") form.append(name, value);
  }
  form.append("active", $("register-active").checked ? "true" : "false");
  form.append("default", $("register-default").checked ? "true" : "false");
  $("register-status").textContent = "Registering (the file is read and checked)...";
  try {
    const m = await api("/admin/models", { method: "POST", form });
    $("register-status").textContent =
      `Registered ${m.name}: ${m.kind}, sigma ${m.sigma ?? "-"}, ${m.num_classes} classes, ` +
      `${m.active ? "active" : "inactive"}${m.default ? ", the default for its sigma" : ""}.`;
    $("register-form").reset();
    $("register-file-row").hidden = false;
    $("register-path-row").hidden = true;
  } catch (err) {
    $("register-status").textContent = "";
    alertIn($("register-alert"), err.message);
  }
  loadModels();
}

// ------------------------------------------------------------------ training runs

export function initTraining() {
  $("runs-prev").addEventListener("click", () => { runsOffset = Math.max(0, runsOffset - RUNS_PAGE); loadRuns(); });
  $("runs-next").addEventListener("click", () => { runsOffset += RUNS_PAGE; loadRuns(); });
  $("train-form").addEventListener("submit", launch);
}

export function stopRuns() {
  clearTimeout(runsTimer);
  runsTimer = null;
}

export async function loadTraining() {
  const models = await loadInitChoices();
  if (models !== null) await loadRuns();
}

async function loadInitChoices() {
  let rows;
  try {
    rows = await api("/admin/models");
  } catch (err) {
    alertIn($("runs-alert"), err.message);
    return null;
  }
  const select = $("train-init"), chosen = select.value;
  const pre = rows.filter((m) => m.kind === "pretrain");
  select.replaceChildren(
    el("option", { value: "", text: "(none: pre-training starts from scratch)" }),
    el("option", { value: "none", text: "none: fine-tune a random encoder (a baseline)" }),
    ...pre.map((m) => el("option", { value: m.name, text: m.name })),
  );
  if (chosen === "none" || pre.some((m) => m.name === chosen)) select.value = chosen;
  else if (pre.length) select.value = pre[pre.length - 1].name;
  return rows;
}

function runView(run) {
  const running = ACTIVE.includes(run.status);
  const bar = el("progress", { "aria-label": `Progress of ${run.name}` });
  if (run.progress.total > 0) {
    bar.max = run.progress.total;
    bar.value = run.progress.done;
  } else if (!running) {
    bar.max = 1;
    bar.value = run.status === "succeeded" ? 1 : 0;
  } // else indeterminate: the number of steps is known at the end
  const steps = run.progress.total > 0
    ? `${count(run.progress.done)} of ${count(run.progress.total)} optimiser steps`
    : `${count(run.progress.done)} optimiser steps`;
  const log = Array.isArray(run.metrics.log) ? run.metrics.log : [];
  const cancel = running
    ? el("button", { type: "button", "aria-label": `Cancel ${run.name}`, onclick: () => cancelRun(run.url) }, "Cancel")
    : null;
  return el("article", { class: "run", "aria-label": `Training run ${run.name}` },
    el("h3", {}, `${run.name} `, el("span", { class: `status-${run.status}`, text: `(${run.status})` })),
    el("p", { class: "hint" },
      `${run.kind} on ${run.dataset}, ${JSON.stringify(run.params)}; created ${when(run.created_at)}` +
      (run.finished_at ? `, finished ${when(run.finished_at)}` : "")),
    bar,
    el("p", { class: "hint" }, steps, run.model ? `; registered as ${run.model}` : ""),
    run.error ? el("p", { class: "status-failed", text: run.error }) : null,
    log.length ? el("pre", { "aria-label": `Log of ${run.name}`, text: log.join("\n") }) : null,
    cancel,
  );
}

export async function loadRuns() {
  clearTimeout(runsTimer);
  let page;
  try {
    page = await api(`/admin/training?limit=${RUNS_PAGE}&offset=${runsOffset}`);
  } catch (err) {
    alertIn($("runs-alert"), err.message);
    return;
  }
  alertIn($("runs-alert"), "");
  $("runs").replaceChildren(
    ...(page.items.length ? page.items.map(runView) : [el("p", { text: "No training runs yet." })]),
  );
  const last = Math.min(page.total, page.offset + page.items.length);
  $("runs-page").textContent = page.total ? `Runs ${page.offset + 1} to ${last} of ${page.total}` : "";
  $("runs-prev").disabled = page.offset === 0;
  $("runs-next").disabled = last >= page.total;
  if (page.items.some((r) => ACTIVE.includes(r.status)) && location.hash === "#admin/training") {
    runsTimer = setTimeout(loadRuns, RUNS_POLL_MS);
  }
}

async function cancelRun(url) {
  try {
    await api(url, { method: "DELETE" });
  } catch (err) {
    alertIn($("runs-alert"), err.message);
  }
  loadRuns();
}

async function launch(event) {
  event.preventDefault();
  const alertEl = $("train-alert");
  alertIn(alertEl, "");
  let params = {};
  const text = $("train-params").value.trim();
  if (text) {
    try {
      params = JSON.parse(text);
    } catch (err) {
      alertIn(alertEl, `Hyper-parameters: not valid JSON (${err.message}).`);
      return;
    }
  }
  const body = {
    kind: $("train-kind").value,
    dataset: $("train-dataset").value.trim(),
    name: $("train-name").value.trim(),
    params,
    activate: $("train-activate").checked,
    default: $("train-default").checked,
  };
  const sigma = $("train-sigma").value.trim();
  if (sigma !== "") body.sigma = Number(sigma);
  if ($("train-init").value) body.init = $("train-init").value;
  try {
    await api("/admin/training", { method: "POST", json: body });
  } catch (err) {
    alertIn(alertEl, err.message);
    return;
  }
  runsOffset = 0;
  loadRuns();
}
