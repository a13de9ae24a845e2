// The page's views, chosen by the URL's #fragment: #certify, #job/<id>[/<upload sha256>], #history,
// #admin/models, #admin/training. The API key lives in this tab's sessionStorage only: what is
// typed in "API key" is the key at once (each keystroke or paste, "Use key", Enter); the view
// asks the API again once typing pauses. "Forget" clears it.

import * as admin from "./admin.js";
import { alertIn, getKey, setKey } from "./api.js";
import { clearModels, initCertify, loadModels, openJob, stopWatching } from "./certify.js";
import { initHistory, loadHistory } from "./history.js";

const $ = (id) => document.getElementById(id);

const KEY_SETTLE_MS = 400; // typing pauses this long: the view reloads with the key
let keyTimer = null;
let routedKey = null; // the key the shown view was loaded with
let ready = false; // the service's settings are read and every view is set up

/** Show the view the URL names and load its data; `reveal`: a person navigated to it. */
function route({ reveal = false } = {}) {
  clearTimeout(keyTimer);
  routedKey = getKey();
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
  if (!getKey()) { // nothing to ask the API without a key; nothing of the last key's shown
    clearModels();
    return;
  }
  if (shown === "certify") {
    loadModels();
    if (job) openJob(decodeURIComponent(job[1]), job[2] ?? null, { reveal });
  }
  if (shown === "history") loadHistory();
  if (shown === "admin/models") admin.loadModels();
  if (shown === "admin/training") admin.loadTraining();
}

/** The key field's handlers: use what is typed, reload the view when it changed. */
function initKey() {
  const keyInput = $("api-key");
  keyInput.value = getKey();
  const use = (settleMs) => {
    setKey(keyInput.value.trim()); // a request made from now on sends it
    clearTimeout(keyTimer);
    keyTimer = setTimeout(() => { if (ready && getKey() !== routedKey) route(); }, settleMs);
  };
  keyInput.addEventListener("input", () => use(KEY_SETTLE_MS));
  keyInput.addEventListener("change", () => use(0));
  $("key-form").addEventListener("submit", (e) => { // "Use key" or Enter: reload now
    e.preventDefault();
    setKey(keyInput.value.trim());
    route();
  });
  $("key-forget").addEventListener("click", () => {
    setKey("");
    keyInput.value = "";
    route();
  });
}

async function start() {
  initKey();
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
  window.addEventListener("hashchange", () => route({ reveal: true }));
  for (const button of document.querySelectorAll('button[type="submit"]')) button.disabled = false;
  ready = true;
  route();
}

start();
