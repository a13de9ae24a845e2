// The page's views, chosen by the URL's #fragment: #certify, #job/<id>[/<upload sha256>], #history,
// #admin/models, #admin/training. The API key lives in this tab's sessionStorage only.

import * as admin from "./admin.js";
import { alertIn, getKey, setKey } from "./api.js";
import { initCertify, loadModels, openJob, stopWatching } from "./certify.js";
import { initHistory, loadHistory } from "./history.js";

const $ = (id) => document.getElementById(id);

function route() {
  const hash = location.hash.replace(/^#/, "") || "certify";
  const job = /^job\/([^/]+)(?:\/([0-9a-f]{64}))?$/.exec(hash);
  const view = job ? "certify" : hash;
  const known = [...document.querySelectorAll("[data-view]")].map((v) => v.dataset.view);
  const shown = known.includes(view) ? view : "certify";
  for (const v of document.querySelectorAll("[data-view]")) v.hidden = v.dataset.view !== shown;
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === shown && !job) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  alertIn($("page-alert"), "");
  admin.stopRuns();
  stopWatching();
  $("job").hidden = true;
  $("no-key-hint").hidden = Boolean(getKey());
  if (!getKey()) return; // nothing to ask the API without a key
  if (shown === "certify") {
    loadModels();
    if (job) openJob(decodeURIComponent(job[1]), job[2] ?? null);
  }
  if (shown === "history") loadHistory();
  if (shown === "admin/models") admin.loadModels();
  if (shown === "admin/training") admin.loadTraining();
}

async function start() {
  const keyInput = $("api-key");
  keyInput.value = getKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setKey(keyInput.value.trim());
    route();
  });
  $("key-forget").addEventListener("click", () => {
    setKey("");
    keyInput.value = "";
    route();
  });
  let config;
  try {
    const r = await fetch("/web/config.json", { cache: "no-store" });
    if (!r.ok) throw new Error(`${r.status} ${r.statusText}`);
    config = await r.json();
  } catch (err) {
    alertIn($("page-alert"), `Could not read the service's settings: ${err.message}`);
    return;
  }
  initCertify(config);
  initHistory();
  admin.initModels();
  admin.initTraining();
  window.addEventListener("hashchange", route);
  for (const button of document.querySelectorAll('button[type="submit"]')) button.disabled = false;
  route();
}

start();
