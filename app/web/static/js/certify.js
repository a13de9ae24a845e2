// The certify view: choose a model and an image, submit, watch the job, read the certificate.

import { alertIn, announce, api, apiObjectUrl, ApiError, getKey } from "./api.js";
import {
  abstainReason, count, decisionWords, el, nonCommercial, roundDown, seconds, when,
} from "./format.js";
import { clearDrawing, DRAW_SIZE, drawingPng, hasDrawing, initDraw } from "./draw.js";
import { hasRadius, modeFacts, setModes } from "./modes.js";

const $ = (id) => document.getElementById(id);
const ACTIVE = ["queued", "running"];
const POLL_MS = 250;
const NOISY_COPIES = 4;

let config = null;
let models = [];
let watching = null; // the job id whose panel is shown
let watchingUpload = null; // the upload (bytes sha256) it is seen as, null: the job's own
let timer = null;
let objectUrls = [];

export function initCertify(cfg) {
  config = cfg;
  setModes(cfg.mode_facts);
  const d = cfg.defaults, lim = cfg.limits;
  $("alpha").value = d.alpha;
  $("n0").value = d.n0;
  $("n").value = d.n;
  $("n0").max = lim.n0_max;
  $("n").max = lim.n_max;
  $("alpha").min = lim.alpha_above;
  $("alpha").max = lim.alpha_below;
  $("alpha-help").textContent =
    `alpha in (${lim.alpha_above}, ${lim.alpha_below}); default ${d.alpha}. ` +
    `n0 up to ${count(lim.n0_max)}, n up to ${count(lim.n_max)} ` +
    `(defaults ${count(d.n0)} and ${count(d.n)}; decide: n0 ${count(d.decide_n0)}, class ` +
    `selection merged into the sequential test). More samples: a larger possible radius.`;
  $("image").accept = cfg.image_types.join(",");
  const mode = $("mode");
  mode.replaceChildren(...cfg.modes.map((m) => el("option", { value: m, text: m })));
  mode.value = d.mode;
  let lastN0Mode = mode.value; // the last mode chosen that uses n0
  const n0Default = (m) => modeFacts(m).default_n0 ?? d.n0;
  const modeFields = () => {
    const facts = modeFacts(mode.value);
    $("n0").disabled = !facts.uses_n0;
    // n0's default depends on the mode: switch it along unless the user typed another value;
    // a mode without n0 leaves the (disabled, unsent) value as it is
    if (facts.uses_n0) {
      if (String($("n0").value) === String(n0Default(lastN0Mode))) {
        $("n0").value = n0Default(mode.value);
      }
      lastN0Mode = mode.value;
    }
    $("target_radius").disabled = !facts.takes_target_radius;
    $("time_budget_s").disabled = !facts.takes_time_budget;
  };
  mode.addEventListener("change", modeFields);
  modeFields();
  $("model").addEventListener("change", () => showModel(true));
  $("sigma").addEventListener("input", () => showModel(false));
  initImage();
  $("certify-form").addEventListener("submit", submit);
  $("job-cancel").addEventListener("click", cancel);
}

/** Fill the model picker from GET /models; false (and the API's words shown) if it failed. */
export async function loadModels() {
  const select = $("model");
  const key = getKey();
  let listed;
  try {
    listed = await api("/models");
  } catch (err) {
    // an answer for a key no longer in use (typed over, forgotten) says nothing about this one
    if (getKey() === key) alertIn($("certify-alert"), err.message);
    return false;
  }
  if (getKey() !== key) return false;
  models = listed;
  alertIn($("certify-alert"), "");
  const chosen = select.value;
  select.replaceChildren(
    ...models.map((m) =>
      el("option", {
        value: m.name,
        text: `${m.name} (sigma ${m.sigma}, ${m.num_classes} classes)`,
      }),
    ),
  );
  if (!models.length) {
    select.append(el("option", { value: "", text: "no active model" }));
  }
  if (models.some((m) => m.name === chosen)) select.value = chosen;
  showModel(true);
  return true;
}

/** Forget the model list (no key: the list belonged to the key that asked for it). */
export function clearModels() {
  models = [];
  $("model").replaceChildren();
  $("model-info").replaceChildren();
  $("sigma").value = "";
  alertIn($("certify-alert"), "");
}

function showModel(resetSigma) {
  const m = models.find((x) => x.name === $("model").value);
  const info = $("model-info");
  if (!m) { info.replaceChildren(); return; }
  if (resetSigma) $("sigma").value = m.sigma ?? "";
  const sigma = Number($("sigma").value);
  const classes = m.classes.length > 8
    ? `${m.classes.slice(0, 8).join(", ")} and ${m.classes.length - 8} more`
    : m.classes.join(", ");
  info.replaceChildren(
    el("div", {}, `Trained at sigma ${m.sigma} on ${m.input_size}x${m.input_size} inputs; `,
      `${m.num_classes} classes: ${classes}.`),
    m.licence
      ? el("div", { class: nonCommercial(m.licence) ? "licence-nc" : "" }, `Licence: ${m.licence}`)
      : null,
  );
  $("sigma-help").textContent =
    m.sigma !== null && $("sigma").value !== "" && sigma !== m.sigma
      ? `This model was trained at sigma ${m.sigma}: a certificate at sigma ${sigma} is ` +
        "valid, but the classifier may do poorly under noise it was not trained for."
      : "sigma: the standard deviation of the Gaussian noise, in [0,1] pixel units.";
}

/** The file input, its drop zone and the drawing area. One image at a time: choosing a file
 * clears the drawing, a stroke on the canvas clears the file, and a line says which is sent. */
function initImage() {
  const input = $("image"), drop = $("drop"), preview = $("preview");
  const source = () => {
    const file = input.files && input.files[0];
    $("image-source").textContent = file
      ? `Certify sends the file ${file.name}.`
      : hasDrawing()
        ? `Certify sends the drawing (a ${DRAW_SIZE}x${DRAW_SIZE} PNG).`
        : "Choose a file or draw a digit.";
  };
  const show = () => {
    const file = input.files && input.files[0];
    if (preview.src) URL.revokeObjectURL(preview.src);
    if (file) {
      clearDrawing({ notify: false });
      preview.src = URL.createObjectURL(file);
      preview.alt = `Preview of ${file.name}`;
      preview.hidden = false;
    } else {
      preview.hidden = true;
      preview.removeAttribute("src");
    }
    source();
  };
  initDraw("draw-canvas", "draw-clear", (drawn) => {
    if (drawn && input.files && input.files.length) {
      input.value = ""; // the drawing replaces the chosen file
      show();
    } else {
      source();
    }
  });
  source();
  preview.addEventListener("error", () => { preview.hidden = true; });
  input.addEventListener("change", show);
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      show();
    }
  });
}

async function submit(event) {
  event.preventDefault();
  const alertEl = $("certify-alert");
  alertIn(alertEl, "");
  // A key typed a moment ago: the model (and its sigma) are filled in before sending.
  if (!models.length && !(await loadModels())) return;
  const form = new FormData();
  const file = $("image").files[0];
  if (file) form.append("image", file, file.name);
  else if (hasDrawing()) form.append("image", await drawingPng(), "drawing.png");
  for (const name of ["model", "sigma", "alpha", "n0", "n", "mode", "target_radius",
    "time_budget_s"]) {
    const field = $(name);
    if (!field.disabled && field.value !== "") form.append(name, field.value);
  }
  const button = $("certify-button");
  button.disabled = true;
  try {
    const job = await api("/certify", { method: "POST", form });
    announce(`Job ${job.id} submitted: ${job.status}. It is shown under "Job ${job.id}".`);
    // Another upload of pixels already certified: its own view (its preprocessing, warnings).
    const upload = new URL(job.url, location.origin).searchParams.get("upload");
    const target = upload ? `#job/${job.id}/${upload}` : `#job/${job.id}`;
    if (location.hash === target) openJob(job.id, upload, { reveal: true });
    else location.hash = target; // the hashchange opens and reveals it
  } catch (err) {
    alertIn(alertEl, err.message);
  } finally {
    button.disabled = false;
  }
}

/** Show job `id` in the panel (as upload `upload` sees it, if given: its own preprocessing
 * and warnings) and follow it until it ends. `reveal` (a person asked for it: Certify, a
 * link): scroll the panel into view and move focus to its title, at every width (on a phone
 * the form is long and the panel is above it). */
export function openJob(id, upload = null, { reveal = false } = {}) {
  stopWatching();
  watching = id;
  watchingUpload = upload;
  for (const url of objectUrls) URL.revokeObjectURL(url);
  objectUrls = [];
  $("job").hidden = false;
  $("job-title").textContent = `Job ${id}`;
  $("job-status").textContent = "Loading...";
  $("job-progress").value = 0;
  $("job-progress-text").textContent = "";
  $("certificate").hidden = true;
  $("certificate").replaceChildren();
  $("sees").hidden = true;
  alertIn($("job-alert"), "");
  if (reveal) revealJob();
  poll(id, true);
}

function revealJob() {
  $("job").scrollIntoView({ block: "start" });
  $("job-title").focus({ preventScroll: true });
}

export function stopWatching() {
  clearTimeout(timer);
  timer = null;
  watching = null;
}

async function poll(id, first) {
  if (watching !== id) return;
  let job;
  try {
    const view = watchingUpload ? `?upload=${encodeURIComponent(watchingUpload)}` : "";
    job = await api(`/jobs/${encodeURIComponent(id)}${view}`);
  } catch (err) {
    if (watching !== id) return;
    alertIn($("job-alert"), err.message);
    $("job-status").textContent = "";
    if (err instanceof ApiError && err.status >= 500) timer = setTimeout(() => poll(id), 2000);
    return;
  }
  if (watching !== id) return;
  showProgress(job);
  if (first) {
    if (job.replay_of) $("job-title").textContent = `Job ${id}: replay of job ${job.replay_of}`;
    showWhatItSees(job);
  }
  if (ACTIVE.includes(job.status)) {
    timer = setTimeout(() => poll(id, false), POLL_MS);
    return;
  }
  if (job.status === "succeeded" && job.certificate) showCertificate(job);
  announce(`Job ${id} ${outcome(job)}`);
}

/** How a finished job ended, in words for a screen reader. */
function outcome(job) {
  const c = job.certificate;
  if (job.status !== "succeeded" || !c) return job.status;
  if (c.abstained) return "done: abstained";
  const radius = !hasRadius(c.mode) ? "" : `, certified radius ${roundDown(c.radius, 3)}`;
  return `done: label ${c.label}${radius}`;
}

function showProgress(job) {
  const words = {
    queued: "Queued: waiting for a worker.",
    running: "Running: drawing noisy samples.",
    succeeded: "Done.",
    failed: `Failed: ${job.error || "no reason given"}`,
    cancelled: "Cancelled: no certificate was made.",
  };
  $("job-status").textContent = words[job.status] || job.status;
  $("job-status").className = `status-${job.status}`;
  const bar = $("job-progress");
  bar.max = Math.max(1, job.progress.total);
  bar.value = job.progress.done;
  $("job-progress-text").textContent =
    `${count(job.progress.done)} of ${count(job.progress.total)} noisy samples evaluated`;
  $("job-cancel").hidden = !ACTIVE.includes(job.status);
}

async function cancel() {
  const id = watching;
  if (!id) return;
  try {
    const job = await api(`/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (watching === id) showProgress(job);
  } catch (err) {
    alertIn($("job-alert"), err.message);
  }
}

async function showWhatItSees(job) {
  const id = job.id;
  const [c, s] = [job.input_shape[0], job.input_shape[1]];
  try {
    const [input, noisy] = await Promise.all([
      apiObjectUrl(`/jobs/${encodeURIComponent(id)}/input.png`),
      apiObjectUrl(`/jobs/${encodeURIComponent(id)}/noisy.png?k=${NOISY_COPIES}`),
    ]);
    objectUrls.push(input, noisy);
    if (watching !== id) return;
    const inputImg = $("input-img"), noisyImg = $("noisy-img");
    inputImg.alt = `The input exactly as certified: ${s}x${s} pixels, ${c} channels`;
    inputImg.src = input;
    $("input-caption").textContent =
      `The ${c}x${s}x${s} tensor the radius is about: [0,1] pixels after resizing and ` +
      "cropping, shown enlarged pixel for pixel.";
    noisyImg.alt = `${NOISY_COPIES} noisy copies of the input at sigma ${job.sigma}`;
    noisyImg.src = noisy;
    $("noisy-caption").textContent =
      `${NOISY_COPIES} noisy copies at sigma ${job.sigma}, as the smoothed classifier sees ` +
      "them (clipped to [0,1] for display). Drawn for display only: not the certificate's " +
      "own samples.";
    $("sees").hidden = false;
  } catch (err) {
    if (watching === id) alertIn($("job-alert"), err.message);
  }
}

function fact(term, ...value) {
  return [el("dt", { text: term }), el("dd", {}, ...value)];
}

function showCertificate(job) {
  const c = job.certificate;
  const section = $("certificate");
  const nodes = [el("h3", { text: "Certificate" })];
  const withRadius = hasRadius(c.mode);
  if (c.abstained) {
    nodes.push(el("p", { class: "verdict abstain", text: "Abstained" }));
    nodes.push(el("p", { class: "meaning" }, `No label is certified: ${abstainReason(c.abstain_reason)}.`));
  } else {
    nodes.push(el("p", { class: "verdict" }, "Label: ", el("span", { "data-field": "label", text: c.label })));
  }
  if (typeof c.decision === "string") {
    nodes.push(el("p", { class: "radius-line" }, "Decision: ",
      el("strong", { "data-field": "decision", text: decisionWords(c.decision, c.target_radius) })));
  }
  if (withRadius) {
    const r = roundDown(c.radius, 3), max = roundDown(c.max_radius, 3);
    const share = c.max_radius > 0 ? Math.min(1, Math.max(0, c.radius / c.max_radius)) : 0;
    const fill = el("span");
    fill.style.width = `${(share * 100).toFixed(1)}%`;
    nodes.push(
      el("p", { class: "radius-line" }, "Certified radius ",
        el("strong", { "data-field": "radius", text: r }), " (L2)"),
      el("div", { class: "bar", role: "img", "aria-label": `radius ${r} of at most ${max}` }, fill),
      el("p", { class: "hint" }, `0 to ${max}: the largest radius n = ${count(c.n)} samples at ` +
        `alpha = ${c.alpha} can certify (max_radius).`),
    );
    if (!c.abstained) {
      nodes.push(el("p", { class: "meaning" },
        `The smoothed classifier answers "${c.label}" for every input within L2 distance ${r} ` +
        `of this one, measured on the ${c.input_shape.join("x")} tensor of [0,1] pixels after ` +
        `resizing and cropping. This holds unless this run's noise was misleading, which ` +
        `happens with probability at most alpha = ${c.alpha}.`));
    }
  } else if (!c.abstained) {
    nodes.push(el("p", { class: "meaning" },
      `PREDICT: "${c.label}" is the smoothed classifier's answer (binomial test p-value ` +
      `${typeof c.pvalue === "number" ? c.pvalue.toExponential(2) : "-"} <= alpha = ${c.alpha}). ` +
      "This mode certifies no radius."));
  }
  const facts = [];
  if (c.pa_lower !== null && c.pa_lower !== undefined) {
    facts.push(fact("pA lower bound", el("span", { "data-field": "pa_lower", text: roundDown(c.pa_lower, 4) }),
      c.bound ? ` (${c.bound})` : ""));
  }
  if (typeof c.pb_upper === "number") facts.push(fact("pB upper bound", String(c.pb_upper)));
  facts.push(fact("Top-class count", `${count(c.count_a)} of ${count(c.n_used ?? c.n)}`));
  if (typeof c.n_used === "number") {
    facts.push(fact("Samples used", el("span", { "data-field": "n_used", text: count(c.n_used) }),
      ` of at most ${count(c.n)}`));
  }
  if (typeof c.target_radius === "number") facts.push(fact("Target radius", String(c.target_radius)));
  if (typeof c.pvalue === "number") facts.push(fact("p-value", c.pvalue.toExponential(3)));
  facts.push(
    fact("Mode", c.mode),
    fact("n0 / n", `${count(c.n0)} / ${count(c.n)}`),
    ...(typeof c.samples_total === "number"
      ? [fact("Samples in all", `${count(c.samples_total)} (selection included)`)] : []),
    fact("alpha", String(c.alpha)),
    fact("sigma", String(c.sigma)),
    fact("Seed", String(c.seed)),
    fact("Model", c.model),
    fact("Checkpoint sha256", el("code", { class: "mono", text: c.checkpoint_sha256 })),
    fact("Weights sha256", el("code", { class: "mono", text: c.weights_sha256 || "-" })),
    fact("Input sha256", el("code", { class: "mono", text: job.input_sha256 || c.input_sha256 })),
  );
  if (c.tensor_sha256) facts.push(fact("Tensor sha256", el("code", { class: "mono", text: c.tensor_sha256 })));
  facts.push(fact("Space", `${c.input_shape.join("x")}: ${c.space}`));
  const steps = job.preprocessing ?? c.preprocessing; // this upload's own (see job.url)
  if (Array.isArray(steps) && steps.length) {
    facts.push(fact("Preprocessing", el("ol", {}, steps.map((s) => el("li", { text: s })))));
  }
  const warnings = job.warnings ?? c.warnings;
  if (Array.isArray(warnings) && warnings.length) {
    facts.push(fact("Warnings", el("ul", { class: "warning-list" }, warnings.map((w) => el("li", { text: w })))));
  }
  const t = c.timings || {};
  facts.push(
    fact("Device", c.device),
    fact("Time", `${seconds(t.run_s)} (${count(Math.round(t.samples_per_s || 0))} samples/s), ` +
      `finished ${when(job.finished_at)}`),
  );
  nodes.push(el("dl", { class: "facts" }, facts));
  const json = URL.createObjectURL(new Blob([JSON.stringify(job, null, 2)], { type: "application/json" }));
  objectUrls.push(json);
  nodes.push(el("p", {},
    el("a", { href: json, download: `job-${job.id}.json` }, "Certificate JSON"),
    " (as GET ", el("code", { text: job.url }), " answers it)"));
  section.replaceChildren(...nodes);
  section.hidden = false;
}
